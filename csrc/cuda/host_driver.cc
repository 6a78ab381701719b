// Host build of the CUDA kernels: the launchers of sam_kernels.h, run on the CPU.
//
// Not part of the extension (setup.py compiles csrc/**/*.cpp only): tests/test_cuda_host.py
// compiles this file with the host compiler alone (-DFUSED_SAM_CUDA_HOST_BUILD, no CUDA toolkit,
// no torch, -ffp-contract=off) into a small shared library and calls it through ctypes on CPU
// tensors, so that the default CPU suite executes the CUDA kernels' code paths.
//
// Shared with the device, the very same source: the element math (element_math.h), the table
// image, the grid choice, the chunk and pack walks and the reduction tree (harness.h). Mirrored
// here, line for line with sam_kernels.cu: each kernel's body (which lists it loads and stores,
// in which order, the skip paths), block_sum's shared-memory step, last_block and grid_sum (the
// ticket of the stream's workspace: the block that takes the last ticket adds the block
// partials in block order and advances Adam's counters), and load_pack/store_pack. The host
// runs every block and every thread of the grid the launcher would pick, one after another, so
// the last block is the last one run; the kernels' threads touch disjoint elements (a reduction
// goes through per-thread sums and the tree), so the order cannot change a result. The grid
// comes from the occupancy API on the device; here it is the number of resident blocks given
// (fsh_set_resident_blocks), through the same launch_grid. What the host cannot show: races,
// the memory model (fences, the ticket's atomics), the hardware's conversions and libm
// (element_math.h says which), occupancy, and launch failures.
#ifndef FUSED_SAM_CUDA_HOST_BUILD
#error "compile with -DFUSED_SAM_CUDA_HOST_BUILD (the host build of the CUDA kernels)"
#endif

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/element_math.h"
#include "cuda/harness.h"
#include "cuda/sam_kernels.h"

namespace fused_sam::cuda_kernels {
namespace {

using namespace lists;

// A fault the GPU would raise (a misaligned vector access): the launch reports it.
struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

thread_local std::string last_error;

// ---------------------------------------------------------------------------------------------
// load_pack / store_pack of multi_tensor.cuh. The vector path is one 16-byte access on the
// device, which faults unless the address is 16-byte aligned: checked here.

template <typename T>
void check_vector_access(const T* p, int64_t i) {
  if (reinterpret_cast<uintptr_t>(p + i) % 16 != 0) {
    throw Fault("misaligned 16-byte access at element " + std::to_string(i));
  }
}

template <typename T>
Pack<T> load_pack(const T* p, int64_t i, int n, bool vec) {
  Pack<T> out;
  if (vec && n == Pack<T>::kSize) {
    check_vector_access(p, i);
    std::memcpy(&out, p + i, sizeof out);
  } else {
    for (int j = 0; j < Pack<T>::kSize; ++j) {
      out.v[j] = j < n ? p[i + j] : Num<T>::from_op(0);
    }
  }
  return out;
}

template <typename T>
void store_pack(T* p, int64_t i, const Pack<T>& x, int n, bool vec) {
  if (vec && n == Pack<T>::kSize) {
    check_vector_access(p, i);
    std::memcpy(p + i, &x, sizeof x);
  } else {
    for (int j = 0; j < Pack<T>::kSize; ++j) {
      if (j < n) {
        p[i + j] = x.v[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// block_sum of multi_tensor.cuh over the per-thread values of one block: the shuffle tree of
// every warp (warp_tree, evaluated on all 32 lanes at once), the warp sums through "shared
// memory", then warp 0's tree over them (lanes past the warp count read 0).

struct HostLanes {
  double v[kWarp];
  HostLanes operator+(const HostLanes& o) const {
    HostLanes r;
    for (int l = 0; l < kWarp; ++l) {
      r.v[l] = v[l] + o.v[l];
    }
    return r;
  }
};

// __shfl_down_sync(x, off) for every lane: lane l reads lane l + off, or its own value when that
// is past the warp.
HostLanes shfl_down(const HostLanes& x, int off) {
  HostLanes r;
  for (int l = 0; l < kWarp; ++l) {
    r.v[l] = l + off < kWarp ? x.v[l + off] : x.v[l];
  }
  return r;
}

double block_sum(const std::vector<double>& per_thread) {
  const int threads = static_cast<int>(per_thread.size());
  const int warps = (threads + kWarp - 1) / kWarp;
  double warp_sums[kWarp];
  for (int w = 0; w < warps; ++w) {
    HostLanes x;
    for (int l = 0; l < kWarp; ++l) {
      x.v[l] = per_thread[w * kWarp + l];  // kThreads is a multiple of the warp
    }
    warp_sums[w] = warp_tree(x, shfl_down).v[0];
  }
  HostLanes x;
  for (int l = 0; l < kWarp; ++l) {
    x.v[l] = l < warps ? warp_sums[l] : 0.0;
  }
  return warp_tree(x, shfl_down).v[0];
}

static_assert(kThreads % kWarp == 0, "block_sum reads whole warps");

// Runs body(block, thread) for every thread of the grid, block by block.
template <typename Body>
void run_grid(int grid, Body&& body) {
  for (int b = 0; b < grid; ++b) {
    for (int t = 0; t < kThreads; ++t) {
      body(b, t);
    }
  }
}

// last_block of multi_tensor.cuh for block `block` of `grid`, run in block order: the ticket
// reaches grid - 1 in the last block, which puts it back to zero.
bool last_block(unsigned int* ticket, int grid) {
  const bool last = (*ticket)++ == static_cast<unsigned int>(grid) - 1;
  if (last) {
    *ticket = 0;
  }
  return last;
}

// grid_sum of multi_tensor.cuh: block `block` writes its total to the workspace's partials; the
// last block adds them (thread k: entries k, k + kThreads, ...) with block_sum's tree and
// writes the total to *out.
void grid_sum(double block_total, int block, int grid, const Workspace& ws, double* out) {
  ws.partials[block] = block_total;
  if (!last_block(ws.ticket, grid)) {
    return;
  }
  std::vector<double> per_thread(kThreads);
  for (int thread = 0; thread < kThreads; ++thread) {
    double x = 0.0;
    for (int k = thread; k < grid; k += kThreads) {
      x += ws.partials[k];
    }
    per_thread[thread] = x;
  }
  *out = block_sum(per_thread);
}

// report_skip of sam_kernels.cu: block 0 writes the decision.
void report_skip(const SkipArgs& s, bool skip, int block) {
  if (s.skipped != nullptr && block == 0) {
    *s.skipped = skip;
  }
}

// ---------------------------------------------------------------------------------------------
// The kernels of sam_kernels.cu

template <typename T, bool kAdaptive>
void norm_sq_kernel(int grid, const TableView& tab, int64_t chunks, double eta,
                    const Workspace& ws, double* out) {
  std::vector<double> per_thread(kThreads);
  for (int block = 0; block < grid; ++block) {
    for (int thread = 0; thread < kThreads; ++thread) {
      double total = 0.0;
      walk_chunks(tab, chunks, block, grid, [&](const ChunkRef& c) {
        const T* g = tab.ptr<const T>(kNormGrad, c.tensor);
        const T* w = tab.ptr<const T>(kNormParam, c.tensor);
        walk_packs<Pack<T>::kSize>(c, thread, kThreads, [&](int64_t i, int n) {
          const Pack<T> gp = load_pack(g, i, n, c.vec);
          Pack<T> wp;
          if (kAdaptive) {
            wp = load_pack(w, i, n, c.vec);
          }
          for (int j = 0; j < Pack<T>::kSize; ++j) {
            total = total + norm_sq_term(gp.v[j], kAdaptive ? wp.v[j] : gp.v[j], kAdaptive, eta);
          }
        });
      });
      per_thread[thread] = total;
    }
    grid_sum(block_sum(per_thread), block, grid, ws, out);
  }
}

template <typename T, bool kAdaptive, MaskKind kMask, typename S>
void perturb_kernel(int grid, const TableView& tab, int64_t chunks, RandomMask random,
                    const S* sumsq, int64_t sumsq_len, double rho, const double* rho_device,
                    double eps, typename Num<T>::Op eta) {
  using Op = typename Num<T>::Op;
  if (rho_device != nullptr) {
    rho = *rho_device;
  }
  for (int block = 0; block < grid; ++block) {
    // Every thread of every block adds the (short) partials itself, in index order.
    const double norm = sqrt(total_of(sumsq, sumsq_len));
    const bool finite = is_finite(norm);
    const Op scale = static_cast<Op>(perturb_scale(norm, rho, eps));
    for (int thread = 0; thread < kThreads; ++thread) {
      walk_chunks(tab, chunks, block, grid, [&](const ChunkRef& c) {
        T* w = tab.ptr<T>(kPW, c.tensor);
        const T* g = tab.ptr<const T>(kPG, c.tensor);
        T* b = tab.ptr<T>(kPB, c.tensor);
        const uint8_t* mask =
            kMask == MaskKind::kBits ? tab.ptr<const uint8_t>(kPMask, c.tensor) : nullptr;
        const uint32_t key =
            kMask == MaskKind::kRandom
                ? static_cast<uint32_t>(tab.value(kPMask, c.tensor)) ^ random.step_key
                : 0u;
        walk_packs<Pack<T>::kSize>(c, thread, kThreads, [&](int64_t i, int n) {
          Pack<T> wp = load_pack(w, i, n, c.vec);
          store_pack(b, i, wp, n, c.vec);
          if (!finite) {
            return;
          }
          const Pack<T> gp = load_pack(g, i, n, c.vec);
          for (int j = 0; j < Pack<T>::kSize; ++j) {
            bool keep = true;
            if (kMask == MaskKind::kBits) {
              keep = j < n && mask_bit(mask, i + j);
            } else if (kMask == MaskKind::kRandom) {
              keep = element_hash(key, i + j) < random.threshold;
            }
            wp.v[j] = Num<T>::from_op(perturb_value<Op, kAdaptive, kMask>(
                Num<T>::to_op(wp.v[j]), Num<T>::to_op(gp.v[j]), scale, eta, keep));
          }
          store_pack(w, i, wp, n, c.vec);
        });
      });
    }
  }
}

template <typename T>
void restore_thread(const TableView& tab, int64_t chunks, int w_list, int b_list, int block,
                    int grid, int thread) {
  walk_chunks(tab, chunks, block, grid, [&](const ChunkRef& c) {
    T* w = tab.ptr<T>(w_list, c.tensor);
    const T* b = tab.ptr<const T>(b_list, c.tensor);
    if (w == b) {
      return;
    }
    walk_packs<Pack<T>::kSize>(c, thread, kThreads, [&](int64_t i, int n) {
      store_pack(w, i, load_pack(b, i, n, c.vec), n, c.vec);
    });
  });
}

template <typename T>
void restore_kernel(int grid, const TableView& tab, int64_t chunks) {
  run_grid(grid, [&](int b, int t) { restore_thread<T>(tab, chunks, kRW, kRB, b, grid, t); });
}

template <typename T>
void sgd_kernel(int grid, const TableView& tab, int64_t chunks, const SgdArgs& a) {
  using Op = typename Num<T>::Op;
  const bool skip = step_skipped(a.skip);
  for (int block = 0; block < grid; ++block) {
    report_skip(a.skip, skip, block);
  }
  if (skip) {
    run_grid(grid, [&](int b, int t) { restore_thread<T>(tab, chunks, kSW, kSB, b, grid, t); });
    return;
  }
  const double lr64 = a.lr_device != nullptr ? *a.lr_device : a.lr;
  const SgdCoefs<Op> k =
      sgd_coefs<Op>(a, a.grad_scale != nullptr ? *a.grad_scale : 1.0f, lr64);
  run_grid(grid, [&](int block, int thread) {
    walk_chunks(tab, chunks, block, grid, [&](const ChunkRef& c) {
      T* w = tab.ptr<T>(kSW, c.tensor);
      const T* g = tab.ptr<const T>(kSG, c.tensor);
      const T* b = tab.ptr<const T>(kSB, c.tensor);
      T* buf = a.with_momentum ? tab.ptr<T>(kSBuf, c.tensor) : nullptr;
      walk_packs<Pack<T>::kSize>(c, thread, kThreads, [&](int64_t i, int n) {
        Pack<T> wp = load_pack(b, i, n, c.vec);
        const Pack<T> gp = load_pack(g, i, n, c.vec);
        Pack<T> vp;
        if (a.with_momentum && !a.first_step) {
          vp = load_pack(buf, i, n, c.vec);
        }
        for (int j = 0; j < Pack<T>::kSize; ++j) {
          Op v = a.with_momentum && !a.first_step ? Num<T>::to_op(vp.v[j]) : Op(0);
          wp.v[j] = Num<T>::from_op(
              sgd_value(k, Num<T>::to_op(wp.v[j]), Num<T>::to_op(gp.v[j]), v));
          if (a.with_momentum) {
            vp.v[j] = Num<T>::from_op(v);
          }
        }
        if (a.with_momentum) {
          store_pack(buf, i, vp, n, c.vec);
        }
        store_pack(w, i, wp, n, c.vec);
      });
    });
  });
}

template <typename T>
void adam_kernel(int grid, const TableView& tab, int64_t chunks, const AdamArgs& a,
                 const Workspace& ws) {
  using Op = typename Num<T>::Op;
  const bool skip = step_skipped(a.skip);
  for (int block = 0; block < grid; ++block) {
    report_skip(a.skip, skip, block);
  }
  const double lr = a.lr_device != nullptr ? *a.lr_device : a.lr;
  if (skip) {
    run_grid(grid, [&](int b, int t) { restore_thread<T>(tab, chunks, kAW, kAB, b, grid, t); });
  } else {
    const AdamCoefs<Op> k =
        adam_coefs<Op>(a, a.grad_scale != nullptr ? *a.grad_scale : 1.0f, lr);
    run_grid(grid, [&](int block, int thread) {
      walk_chunks(tab, chunks, block, grid, [&](const ChunkRef& c) {
        Op step_size = static_cast<Op>(a.step_size), bc2 = static_cast<Op>(a.bias_c2_sqrt);
        if (a.device_steps) {
          const double step =
              static_cast<double>(*tab.ptr<const float>(kAStep, c.tensor)) + 1.0;
          const AdamBias bias = adam_bias(lr, a.beta1, a.beta2, step);
          step_size = static_cast<Op>(bias.step_size);
          bc2 = static_cast<Op>(bias.bias_c2_sqrt);
        }
        T* w = tab.ptr<T>(kAW, c.tensor);
        const T* g = tab.ptr<const T>(kAG, c.tensor);
        const T* b = tab.ptr<const T>(kAB, c.tensor);
        T* m = tab.ptr<T>(kAM, c.tensor);
        T* v = tab.ptr<T>(kAV, c.tensor);
        T* vmax = a.amsgrad ? tab.ptr<T>(kAVmax, c.tensor) : nullptr;
        walk_packs<Pack<T>::kSize>(c, thread, kThreads, [&](int64_t i, int n) {
          Pack<T> wp = load_pack(b, i, n, c.vec);
          const Pack<T> gp = load_pack(g, i, n, c.vec);
          Pack<T> mp = load_pack(m, i, n, c.vec);
          Pack<T> vp = load_pack(v, i, n, c.vec);
          Pack<T> xp;
          if (a.amsgrad) {
            xp = load_pack(vmax, i, n, c.vec);
          }
          for (int j = 0; j < Pack<T>::kSize; ++j) {
            Op mj = Num<T>::to_op(mp.v[j]), vj = Num<T>::to_op(vp.v[j]);
            Op xj = a.amsgrad ? Num<T>::to_op(xp.v[j]) : Op(0);
            wp.v[j] = Num<T>::from_op(adam_value(k, step_size, bc2, Num<T>::to_op(wp.v[j]),
                                                 Num<T>::to_op(gp.v[j]), mj, vj, xj));
            mp.v[j] = Num<T>::from_op(mj);
            vp.v[j] = Num<T>::from_op(vj);
            if (a.amsgrad) {
              xp.v[j] = Num<T>::from_op(xj);
            }
          }
          store_pack(m, i, mp, n, c.vec);
          store_pack(v, i, vp, n, c.vec);
          if (a.amsgrad) {
            store_pack(vmax, i, xp, n, c.vec);
          }
          store_pack(w, i, wp, n, c.vec);
        });
      });
    });
  }
  if (a.device_steps && !skip) {
    // advance_steps_when_last: every block takes a ticket after its work; the last one, after
    // every block has read the counters, advances them.
    for (int block = 0; block < grid; ++block) {
      if (last_block(ws.ticket, grid)) {
        for (int64_t t = 0; t < tab.layout.n; ++t) {
          float* step = tab.ptr<float>(kAStep, t);
          *step = *step + 1.0f;
        }
      }
    }
  }
}

template <typename T>
void dot_kernel(int grid, const TableView& tab, int64_t chunks, const Workspace& ws,
                double* out) {
  std::vector<double> per_thread(kThreads);
  for (int block = 0; block < grid; ++block) {
    for (int thread = 0; thread < kThreads; ++thread) {
      double total = 0.0;
      walk_chunks(tab, chunks, block, grid, [&](const ChunkRef& c) {
        const T* a = tab.ptr<const T>(kDotA, c.tensor);
        const T* b = tab.ptr<const T>(kDotB, c.tensor);
        walk_packs<Pack<T>::kSize>(c, thread, kThreads, [&](int64_t i, int n) {
          const Pack<T> ap = load_pack(a, i, n, c.vec);
          const Pack<T> bp = load_pack(b, i, n, c.vec);
          for (int j = 0; j < Pack<T>::kSize; ++j) {
            total = total + dot_term(ap.v[j], bp.v[j]);
          }
        });
      });
      per_thread[thread] = total;
    }
    grid_sum(block_sum(per_thread), block, grid, ws, out);
  }
}

template <typename T>
void axpby_kernel(int grid, const TableView& tab, int64_t chunks, const double* coefs,
                  int64_t coefs_stride, const float* skip) {
  if (skip != nullptr && *skip != 0.0f) {
    return;
  }
  const double c0 = coefs[0];
  const double c1 = coefs[coefs_stride];
  run_grid(grid, [&](int block, int thread) {
    walk_chunks(tab, chunks, block, grid, [&](const ChunkRef& c) {
      T* out = tab.ptr<T>(kXOut, c.tensor);
      const T* x = tab.ptr<const T>(kXX, c.tensor);
      const T* y = tab.ptr<const T>(kXY, c.tensor);
      walk_packs<Pack<T>::kSize>(c, thread, kThreads, [&](int64_t i, int n) {
        const Pack<T> xp = load_pack(x, i, n, c.vec);
        const Pack<T> yp = load_pack(y, i, n, c.vec);
        Pack<T> op;
        for (int j = 0; j < Pack<T>::kSize; ++j) {
          op.v[j] = axpby_value(c0, c1, xp.v[j], yp.v[j]);
        }
        store_pack(out, i, op, n, c.vec);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// dtype dispatch and error reporting, as in sam_kernels.cu

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  try {
    switch (dtype) {
      case DType::kFloat:
        f(float{});
        return cudaSuccess;
      case DType::kDouble:
        f(double{});
        return cudaSuccess;
      case DType::kHalf:
        f(Half{});
        return cudaSuccess;
      case DType::kBFloat16:
        f(BFloat16{});
        return cudaSuccess;
    }
    last_error = "unknown dtype";
  } catch (const std::exception& e) {
    last_error = e.what();
  }
  return 1;
}

TableView view(const Table& t) { return TableView{t.data, t.layout}; }

// The blocks resident at once that the occupancy API would report for a kernel (the same for
// every kernel here: set by the test, an H100's 132 SMs x 4 blocks of 512 threads by default).
int resident_blocks = 132 * 4;

// grid_of of sam_kernels.cu, with the shared launch_grid.
int grid_of(const Table& t) { return launch_grid(t.chunks, resident_blocks, kMaxGrid); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// The launchers of sam_kernels.h (the stream is ignored: everything runs before they return)

cudaError_t launch_norm_sq(DType dtype, const Table& table, bool adaptive, double eta,
                           const Workspace& ws, double* out, cudaStream_t) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int grid = grid_of(table);
    if (adaptive) {
      norm_sq_kernel<T, true>(grid, view(table), table.chunks, eta, ws, out);
    } else {
      norm_sq_kernel<T, false>(grid, view(table), table.chunks, eta, ws, out);
    }
  });
}

cudaError_t launch_perturb(DType dtype, const Table& table, MaskKind mask, RandomMask random,
                           const void* sumsq, bool sumsq_double, int64_t sumsq_len, double rho,
                           const double* rho_device, double eps, bool adaptive, double eta,
                           cudaStream_t) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Op = typename Num<T>::Op;
    const auto launch = [&](auto s_tag, auto adaptive_tag, auto mask_tag) {
      using S = decltype(s_tag);
      perturb_kernel<T, decltype(adaptive_tag)::value, decltype(mask_tag)::value, S>(
          grid_of(table), view(table), table.chunks, random, static_cast<const S*>(sumsq),
          sumsq_len, rho, rho_device, eps, static_cast<Op>(eta));
    };
    const auto by_mask = [&](auto s_tag, auto adaptive_tag) {
      using Kind = MaskKind;
      if (mask == Kind::kBits) {
        launch(s_tag, adaptive_tag, std::integral_constant<Kind, Kind::kBits>{});
      } else if (mask == Kind::kRandom) {
        launch(s_tag, adaptive_tag, std::integral_constant<Kind, Kind::kRandom>{});
      } else {
        launch(s_tag, adaptive_tag, std::integral_constant<Kind, Kind::kNone>{});
      }
    };
    const auto by_adaptive = [&](auto s_tag) {
      if (adaptive) {
        by_mask(s_tag, std::true_type{});
      } else {
        by_mask(s_tag, std::false_type{});
      }
    };
    if (sumsq_double) {
      by_adaptive(double{});
    } else {
      by_adaptive(float{});
    }
  });
}

cudaError_t launch_restore(DType dtype, const Table& table, cudaStream_t) {
  return dispatch(dtype, [&](auto tag) {
    restore_kernel<decltype(tag)>(grid_of(table), view(table), table.chunks);
  });
}

cudaError_t launch_restore_sgd_step(DType dtype, const Table& table, const SgdArgs& args,
                                    cudaStream_t) {
  return dispatch(dtype, [&](auto tag) {
    sgd_kernel<decltype(tag)>(grid_of(table), view(table), table.chunks, args);
  });
}

cudaError_t launch_restore_adam_step(DType dtype, const Table& table, const AdamArgs& args,
                                     const Workspace& ws, cudaStream_t) {
  return dispatch(dtype, [&](auto tag) {
    adam_kernel<decltype(tag)>(grid_of(table), view(table), table.chunks, args, ws);
  });
}

cudaError_t launch_dot(DType dtype, const Table& table, const Workspace& ws, double* out,
                       cudaStream_t) {
  return dispatch(dtype, [&](auto tag) {
    dot_kernel<decltype(tag)>(grid_of(table), view(table), table.chunks, ws, out);
  });
}

cudaError_t launch_axpby(DType dtype, const Table& table, const double* coefs, int64_t coefs_stride,
                         const float* skip, cudaStream_t) {
  return dispatch(dtype, [&](auto tag) {
    axpby_kernel<decltype(tag)>(grid_of(table), view(table), table.chunks, coefs, coefs_stride,
                                skip);
  });
}

}  // namespace fused_sam::cuda_kernels

// ---------------------------------------------------------------------------------------------
// C interface for the test (ctypes): the glue's part (table, workspace, launch) over raw
// addresses.
//
// `lists` holds `n_lists` rows of `n` int64 entries (addresses, or values such as the salts of
// a random mask), `kinds[l]` says what row l is: 0 absent (null pointers), 1 addresses that take
// part in the 16-byte decision, 2 addresses that do not (masks, step counters), 3 values.
// A skip input is `n_sumsqs` float64 arrays (addresses in `sumsqs`, lengths in `lens`), the
// optional found_inf and the optional bool the decision is written to.

namespace ck = fused_sam::cuda_kernels;

namespace {

struct HostTable {
  std::vector<int64_t> data;
  ck::Table table;
};

HostTable make_table(int64_t n, const int64_t* numels, int n_lists, const int64_t* lists,
                     const int* kinds) {
  HostTable h;
  const ck::TableLayout layout{n, n_lists};
  h.data.assign(layout.size(), 0);
  const int64_t chunks = ck::fill_table(
      layout, [&](int64_t t) { return numels[t]; },
      [&](int l, int64_t t) {
        const int kind = kinds[l];
        return ck::TableEntry{kind == 0 ? 0 : lists[l * n + t], kind == 1};
      },
      h.data.data());
  h.table = ck::Table{h.data.data(), layout, chunks};
  return h;
}

// The stream's workspace (sam_cuda.cpp's workspace(): zero when made, left at zero by kernels).
unsigned int ticket = 0;
double partials[ck::kMaxGrid] = {};
const ck::Workspace workspace{&ticket, partials};

ck::SkipArgs skip_args(const float* found_inf, int n_sumsqs, const int64_t* sumsqs,
                       const int64_t* lens, bool* skipped) {
  ck::SkipArgs args{};
  args.found_inf = found_inf;
  for (int i = 0; i < n_sumsqs && i < ck::kMaxSumsqs; ++i) {
    args.sumsq[i] = reinterpret_cast<const double*>(sumsqs[i]);
    args.len[i] = lens[i];
  }
  args.count = n_sumsqs;
  args.skipped = skipped;
  return args;
}

}  // namespace

extern "C" {

const char* fsh_last_error() { return ck::last_error.c_str(); }

void fsh_set_resident_blocks(int blocks) { ck::resident_blocks = blocks; }

// The workspace: copies its first `n` partials to out, returns the ticket (0 between launches).
unsigned int fsh_workspace(double* out, int n) {
  for (int k = 0; k < n && k < ck::kMaxGrid; ++k) {
    out[k] = partials[k];
  }
  return ticket;
}

// The table image and grid the launchers would use (for the tests of the indexing itself).
int64_t fsh_table(int64_t n, const int64_t* numels, int n_lists, const int64_t* lists,
                  const int* kinds, int64_t* out, int64_t out_len, int* grid) {
  HostTable h = make_table(n, numels, n_lists, lists, kinds);
  const int64_t size = static_cast<int64_t>(h.data.size());
  for (int64_t k = 0; k < size && k < out_len; ++k) {
    out[k] = h.data[k];
  }
  *grid = ck::grid_of(h.table);
  return size;
}

int fsh_norm_sq(int dtype, int64_t n, const int64_t* numels, const int64_t* lists,
                const int* kinds, int adaptive, double eta, double* out) {
  HostTable h = make_table(n, numels, ck::lists::kNormLists, lists, kinds);
  return ck::launch_norm_sq(static_cast<ck::DType>(dtype), h.table, adaptive != 0, eta,
                            workspace, out, nullptr);
}

int fsh_perturb(int dtype, int64_t n, const int64_t* numels, const int64_t* lists,
                const int* kinds, int mask_kind, int64_t step_key, int64_t threshold,
                const void* sumsq, int sumsq_double, int64_t sumsq_len, double rho,
                const double* rho_device, double eps, int adaptive, double eta) {
  HostTable h = make_table(n, numels, ck::lists::kPerturbLists, lists, kinds);
  const ck::RandomMask random{static_cast<uint32_t>(step_key), static_cast<uint32_t>(threshold)};
  return ck::launch_perturb(static_cast<ck::DType>(dtype), h.table,
                            static_cast<ck::MaskKind>(mask_kind), random, sumsq,
                            sumsq_double != 0, sumsq_len, rho, rho_device, eps, adaptive != 0,
                            eta, nullptr);
}

int fsh_restore(int dtype, int64_t n, const int64_t* numels, const int64_t* lists,
                const int* kinds) {
  HostTable h = make_table(n, numels, ck::lists::kRestoreLists, lists, kinds);
  return ck::launch_restore(static_cast<ck::DType>(dtype), h.table, nullptr);
}

int fsh_sgd(int dtype, int64_t n, const int64_t* numels, const int64_t* lists, const int* kinds,
            double lr, const double* lr_device, double weight_decay, double momentum,
            double dampening, int nesterov, int maximize, int first_step, const float* grad_scale,
            const float* found_inf, int n_sumsqs, const int64_t* sumsqs, const int64_t* lens,
            bool* skipped) {
  HostTable h = make_table(n, numels, ck::lists::kSgdLists, lists, kinds);
  ck::SgdArgs args{};
  args.lr = lr;
  args.weight_decay = weight_decay;
  args.momentum = momentum;
  args.dampening = dampening;
  args.nesterov = nesterov != 0;
  args.maximize = maximize != 0;
  args.first_step = first_step != 0;
  args.with_momentum = momentum != 0.0;
  args.lr_device = lr_device;
  args.grad_scale = grad_scale;
  args.skip = skip_args(found_inf, n_sumsqs, sumsqs, lens, skipped);
  return ck::launch_restore_sgd_step(static_cast<ck::DType>(dtype), h.table, args, nullptr);
}

int fsh_adam(int dtype, int64_t n, const int64_t* numels, const int64_t* lists, const int* kinds,
             double lr, const double* lr_device, double beta1, double beta2, double eps,
             double weight_decay, int amsgrad, int maximize, int decoupled_weight_decay,
             int device_steps, double step_size, double bias_c2_sqrt, const float* grad_scale,
             const float* found_inf, int n_sumsqs, const int64_t* sumsqs, const int64_t* lens,
             bool* skipped) {
  HostTable h = make_table(n, numels, ck::lists::kAdamLists, lists, kinds);
  ck::AdamArgs args{};
  args.lr = lr;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.amsgrad = amsgrad != 0;
  args.maximize = maximize != 0;
  args.decoupled_weight_decay = decoupled_weight_decay != 0;
  args.device_steps = device_steps != 0;
  args.step_size = step_size;
  args.bias_c2_sqrt = bias_c2_sqrt;
  args.lr_device = lr_device;
  args.grad_scale = grad_scale;
  args.skip = skip_args(found_inf, n_sumsqs, sumsqs, lens, skipped);
  return ck::launch_restore_adam_step(static_cast<ck::DType>(dtype), h.table, args, workspace,
                                      nullptr);
}

// The bias corrections the glue computes for counters on the host (element_math.h).
void fsh_adam_bias(double lr, double beta1, double beta2, double step, double* out) {
  const ck::AdamBias bias = ck::adam_bias(lr, beta1, beta2, step);
  out[0] = bias.step_size;
  out[1] = bias.bias_c2_sqrt;
}

int fsh_dot(int dtype, int64_t n, const int64_t* numels, const int64_t* lists, const int* kinds,
            double* out) {
  HostTable h = make_table(n, numels, ck::lists::kDotLists, lists, kinds);
  return ck::launch_dot(static_cast<ck::DType>(dtype), h.table, workspace, out, nullptr);
}

int fsh_axpby(int dtype, int64_t n, const int64_t* numels, const int64_t* lists, const int* kinds,
              const double* coefs, int64_t coefs_stride, const float* skip) {
  HostTable h = make_table(n, numels, ck::lists::kAxpbyLists, lists, kinds);
  return ck::launch_axpby(static_cast<ck::DType>(dtype), h.table, coefs, coefs_stride, skip,
                          nullptr);
}

// The conversions of element_math.h's host side, element by element (checked against torch's).
void fsh_float_to_half(const float* x, uint16_t* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = ck::float_to_half(x[k]);
  }
}
void fsh_half_to_float(const uint16_t* x, float* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = ck::half_to_float(x[k]);
  }
}
void fsh_float_to_bfloat16(const float* x, uint16_t* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = ck::float_to_bfloat16(x[k]);
  }
}
void fsh_bfloat16_to_float(const uint16_t* x, float* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = ck::bfloat16_to_float(x[k]);
  }
}

// The packs thread `thread` of block `block` visits in a grid of `grid` blocks, with no memory
// behind them (so tensors past 2^31 elements cost nothing): (tensor, first element, lanes)
// triples in visiting order, at most out_len / 3 of them; returns how many there are in all.
// `aligned[t]` stands for the table's 16-byte decision; v is the pack size (16 / element size).
int64_t fsh_walk(int64_t n, const int64_t* numels, const int* aligned, int64_t grid,
                 int64_t block, int64_t thread, int v, int64_t* out, int64_t out_len) {
  const ck::TableLayout layout{n, 1};
  std::vector<int64_t> data(layout.size(), 0);
  const int64_t chunks = ck::fill_table(
      layout, [&](int64_t t) { return numels[t]; },
      [&](int, int64_t t) { return ck::TableEntry{aligned[t] ? 0 : 4, true}; }, data.data());
  const ck::TableView tab{data.data(), layout};
  int64_t count = 0;
  const auto record = [&](const ck::ChunkRef& c, int64_t i, int lanes) {
    if (3 * count + 2 < out_len) {
      out[3 * count] = c.tensor;
      out[3 * count + 1] = i;
      out[3 * count + 2] = lanes;
    }
    ++count;
  };
  ck::walk_chunks(tab, chunks, block, grid, [&](const ck::ChunkRef& c) {
    const auto step = [&](int64_t i, int lanes) { record(c, i, lanes); };
    switch (v) {
      case 2:
        ck::walk_packs<2>(c, thread, ck::kThreads, step);
        break;
      case 4:
        ck::walk_packs<4>(c, thread, ck::kThreads, step);
        break;
      default:
        ck::walk_packs<8>(c, thread, ck::kThreads, step);
        break;
    }
  });
  return count;
}

// element_hash for a key and positions (checked against fused_sam.masks.element_hash).
void fsh_element_hash(uint32_t key, const int64_t* j, uint32_t* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = ck::element_hash(key, j[k]);
  }
}

}  // extern "C"
