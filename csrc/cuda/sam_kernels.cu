// CUDA kernels of the fused_sam ops (no torch headers: raw pointers and a stream).
//
// One SAM step is three or four launches per (device, dtype) group, whatever the number of
// tensors:
//
//   norm_sq     s = sum of (T(w) g)^2: per-block partials, added in block order by the grid's
//               last block into one float64 (reads g [, w]); for g1, and for g2 when checked
//   perturb     n = sqrt(s); b = w; w = w + rho T(w)^2 g / (n + eps) (* mask) if n finite
//               (reads w, g; writes b, w)
//   restore+step  w = b, then the SGD or Adam/AdamW update with the second-pass gradient
//               unless found_inf is set or a checked norm is not finite; writes that decision
//               (the 0-dim skip flag) and advances Adam's device step counters
//
// and the two ops of the SAM variants, one launch each:
//
//   dot         s = sum of a b, finalized like norm_sq                           (reads a, b)
//   axpby       out = c0 x + c1 y, (c0, c1) and the skip flag read on the device (reads x, y;
//               writes out, which may be x or y)
//
// No kernel writes its pointer table; the only state that outlives a launch is the glue's
// per-stream Workspace (a ticket counter that the last block resets, and scratch partials).
//
// Math is float32 for half/bfloat16/float32 storage and float64 for float64, rounded once on
// store; norms and dot products are float64 for every storage type (squares included, so a
// finite gradient gives a finite norm), and so is a x + b y (stored as torch converts float64).
// Blocks reduce with a fixed shuffle tree and the last block adds the block sums in block order,
// so results are bitwise reproducible on one GPU model (whose occupancy fixes the grid).
// Build with --fmad=false (setup.py does) so that no multiply-add is contracted behind our back.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>

#include "cuda/multi_tensor.cuh"
#include "cuda/sam_kernels.h"

namespace fused_sam::cuda_kernels {
namespace {

using namespace lists;

// The element math (to_double, from_double, the hash, the SGD/Adam/perturb values, the skip
// decision, ...) is in element_math.h, compiled for the host too: tests/test_cuda_host.py runs
// it on the CPU.

// Block 0 reports the decision: the op's 0-dim bool output, written by the kernel itself.
__device__ __forceinline__ void report_skip(const SkipArgs& s, bool skip) {
  if (s.skipped != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    *s.skipped = skip;
  }
}

// ---------------------------------------------------------------------------------------------
// norm_sq

template <typename T, bool kAdaptive>
__global__ void __launch_bounds__(kThreads)
    norm_sq_kernel(TableView tab, int64_t chunks, double eta, Workspace ws, double* out) {
  double total = 0.0;
  for_each_chunk(tab, chunks, [&](const ChunkRef& c) {
    const T* g = tab.ptr<const T>(kNormGrad, c.tensor);
    const T* w = tab.ptr<const T>(kNormParam, c.tensor);
    for_each_pack<T>(c, [&](int64_t i, int n) {
      const Pack<T> gp = load_pack(g, i, n, c.vec);
      Pack<T> wp;
      if (kAdaptive) {
        wp = load_pack(w, i, n, c.vec);
      }
#pragma unroll
      for (int j = 0; j < Pack<T>::kSize; ++j) {
        // Widened before squaring: float64 squares of finite float32/16 values never overflow.
        total = total + norm_sq_term(gp.v[j], kAdaptive ? wp.v[j] : gp.v[j], kAdaptive, eta);
      }
    });
  });
  grid_sum(block_sum(total), ws.ticket, ws.partials, out);
}

// ---------------------------------------------------------------------------------------------
// perturb

template <typename T, bool kAdaptive, MaskKind kMask, typename S>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(TableView tab, int64_t chunks, RandomMask random, const S* sumsq,
                   int64_t sumsq_len, double rho, const double* rho_device, double eps,
                   typename Num<T>::Op eta) {
  using Op = typename Num<T>::Op;
  if (rho_device != nullptr) {
    rho = *rho_device;
  }
  const double norm = sqrt(total_of(sumsq, sumsq_len));
  const bool finite = is_finite(norm);
  const Op scale = static_cast<Op>(perturb_scale(norm, rho, eps));
  for_each_chunk(tab, chunks, [&](const ChunkRef& c) {
    T* w = tab.ptr<T>(kPW, c.tensor);
    const T* g = tab.ptr<const T>(kPG, c.tensor);
    T* b = tab.ptr<T>(kPB, c.tensor);
    const uint8_t* mask =
        kMask == MaskKind::kBits ? tab.ptr<const uint8_t>(kPMask, c.tensor) : nullptr;
    const uint32_t key =
        kMask == MaskKind::kRandom
            ? static_cast<uint32_t>(tab.value(kPMask, c.tensor)) ^ random.step_key
            : 0u;
    for_each_pack<T>(c, [&](int64_t i, int n) {
      Pack<T> wp = load_pack(w, i, n, c.vec);
      store_pack(b, i, wp, n, c.vec);  // exact backup: the stored bits, not a conversion
      if (!finite) {
        return;  // skipped: the weights stay bit-identical
      }
      const Pack<T> gp = load_pack(g, i, n, c.vec);
#pragma unroll
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

// ---------------------------------------------------------------------------------------------
// restore (also the skipped-step path of the restore+step kernels)

template <typename T>
__device__ __forceinline__ void restore_chunks(const TableView& tab, int64_t chunks, int w_list,
                                               int b_list) {
  for_each_chunk(tab, chunks, [&](const ChunkRef& c) {
    T* w = tab.ptr<T>(w_list, c.tensor);
    const T* b = tab.ptr<const T>(b_list, c.tensor);
    if (w == b) {
      return;
    }
    for_each_pack<T>(c, [&](int64_t i, int n) {
      store_pack(w, i, load_pack(b, i, n, c.vec), n, c.vec);
    });
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) restore_kernel(TableView tab, int64_t chunks) {
  restore_chunks<T>(tab, chunks, kRW, kRB);
}

// ---------------------------------------------------------------------------------------------
// restore + SGD

// At least 3 resident blocks (at most 42 registers): the skip decision's loop over the norm
// partials otherwise takes float32 to 48 registers, 2 blocks per SM (nvcc 13, sm_90: 40
// registers for every dtype, no spills).
template <typename T>
__global__ void __launch_bounds__(kThreads, 3)
    sgd_kernel(TableView tab, int64_t chunks, SgdArgs a) {
  using Op = typename Num<T>::Op;
  const bool skip = step_skipped(a.skip);
  report_skip(a.skip, skip);
  if (skip) {
    restore_chunks<T>(tab, chunks, kSW, kSB);
    return;
  }
  const double lr64 = a.lr_device != nullptr ? *a.lr_device : a.lr;
  const SgdCoefs<Op> k =
      sgd_coefs<Op>(a, a.grad_scale != nullptr ? *a.grad_scale : 1.0f, lr64);
  for_each_chunk(tab, chunks, [&](const ChunkRef& c) {
    T* w = tab.ptr<T>(kSW, c.tensor);
    const T* g = tab.ptr<const T>(kSG, c.tensor);
    const T* b = tab.ptr<const T>(kSB, c.tensor);
    T* buf = a.with_momentum ? tab.ptr<T>(kSBuf, c.tensor) : nullptr;
    for_each_pack<T>(c, [&](int64_t i, int n) {
      Pack<T> wp = load_pack(b, i, n, c.vec);
      const Pack<T> gp = load_pack(g, i, n, c.vec);
      Pack<T> vp;
      if (a.with_momentum && !a.first_step) {
        vp = load_pack(buf, i, n, c.vec);
      }
#pragma unroll
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
}

// ---------------------------------------------------------------------------------------------
// restore + Adam / AdamW

// Lets the last block to finish advance the step counters: every block has read them by then.
// The ticket is the stream's (Workspace), not the table's: a cached table may be shared by
// streams and graphs, and no kernel writes it.
__device__ __forceinline__ void advance_steps_when_last(const TableView& tab,
                                                        unsigned int* ticket) {
  if (last_block(ticket)) {
    for (int64_t t = threadIdx.x; t < tab.layout.n; t += blockDim.x) {
      float* step = tab.ptr<float>(kAStep, t);
      *step = *step + 1.0f;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(TableView tab, int64_t chunks, AdamArgs a, Workspace ws) {
  using Op = typename Num<T>::Op;
  const bool skip = step_skipped(a.skip);
  report_skip(a.skip, skip);
  if (skip) {
    restore_chunks<T>(tab, chunks, kAW, kAB);
  } else {
    // (A local, not an assignment to a.lr: writing a by-value kernel parameter copies the
    // whole argument struct to local memory.)
    const double lr = a.lr_device != nullptr ? *a.lr_device : a.lr;
    const AdamCoefs<Op> k =
        adam_coefs<Op>(a, a.grad_scale != nullptr ? *a.grad_scale : 1.0f, lr);
    for_each_chunk(tab, chunks, [&](const ChunkRef& c) {
      Op step_size = static_cast<Op>(a.step_size), bc2 = static_cast<Op>(a.bias_c2_sqrt);
      if (a.device_steps) {
        // Bias corrections of this tensor from its counter as it will be after this step.
        const double step = static_cast<double>(*tab.ptr<const float>(kAStep, c.tensor)) + 1.0;
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
      for_each_pack<T>(c, [&](int64_t i, int n) {
        Pack<T> wp = load_pack(b, i, n, c.vec);
        const Pack<T> gp = load_pack(g, i, n, c.vec);
        Pack<T> mp = load_pack(m, i, n, c.vec);
        Pack<T> vp = load_pack(v, i, n, c.vec);
        Pack<T> xp;
        if (a.amsgrad) {
          xp = load_pack(vmax, i, n, c.vec);
        }
#pragma unroll
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
  }
  if (a.device_steps && !skip) {  // skip is the same in every block: all or none take part
    advance_steps_when_last(tab, ws.ticket);
  }
}

// ---------------------------------------------------------------------------------------------
// dot: s_b = sum of a b over the chunks of block b, products and sums in float64 (a product of
// two float32 or lower values is exact there). Each thread adds its packs in chunk order, the
// block reduces with the fixed tree of block_sum, and the last block adds the block sums in
// block order: the same bits on every run with the same grid.

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dot_kernel(TableView tab, int64_t chunks, Workspace ws, double* out) {
  double total = 0.0;
  for_each_chunk(tab, chunks, [&](const ChunkRef& c) {
    const T* a = tab.ptr<const T>(kDotA, c.tensor);
    const T* b = tab.ptr<const T>(kDotB, c.tensor);
    for_each_pack<T>(c, [&](int64_t i, int n) {
      const Pack<T> ap = load_pack(a, i, n, c.vec);  // lanes past n are zero
      const Pack<T> bp = load_pack(b, i, n, c.vec);
#pragma unroll
      for (int j = 0; j < Pack<T>::kSize; ++j) {
        total = total + dot_term(ap.v[j], bp.v[j]);
      }
    });
  });
  grid_sum(block_sum(total), ws.ticket, ws.partials, out);
}

// ---------------------------------------------------------------------------------------------
// axpby: out = c0 x + c1 y in float64, stored as torch converts (from_double). The coefficients
// and the skip flag are read here, on the device, so that a caller never waits for them; a
// nonzero flag returns before anything is written (a skipped step of a variant). out may be x
// or y: every thread loads its pack of both before it stores that pack.

template <typename T>
__global__ void __launch_bounds__(kThreads)
    axpby_kernel(TableView tab, int64_t chunks, const double* coefs, int64_t coefs_stride,
                 const float* skip) {
  if (skip != nullptr && *skip != 0.0f) {
    return;  // skipped: out keeps its bits
  }
  const double c0 = coefs[0];
  const double c1 = coefs[coefs_stride];
  for_each_chunk(tab, chunks, [&](const ChunkRef& c) {
    T* out = tab.ptr<T>(kXOut, c.tensor);
    const T* x = tab.ptr<const T>(kXX, c.tensor);
    const T* y = tab.ptr<const T>(kXY, c.tensor);
    for_each_pack<T>(c, [&](int64_t i, int n) {
      const Pack<T> xp = load_pack(x, i, n, c.vec);
      const Pack<T> yp = load_pack(y, i, n, c.vec);
      Pack<T> op;
#pragma unroll
      for (int j = 0; j < Pack<T>::kSize; ++j) {
        op.v[j] = axpby_value(c0, c1, xp.v[j], yp.v[j]);
      }
      store_pack(out, i, op, n, c.vec);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// dtype dispatch

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat:
      return f(float{});
    case DType::kDouble:
      return f(double{});
    case DType::kHalf:
      return f(Half{});
    case DType::kBFloat16:
      return f(BFloat16{});
  }
  return cudaErrorInvalidValue;
}

TableView view(const Table& t) { return TableView{t.data, t.layout}; }

// Blocks of kKernel resident at once on the current device (its SMs times the occupancy of the
// kernel at kThreads threads: registers differ per kernel and dtype, e.g. Adam on half holds
// fewer blocks per SM than restore), queried once per kernel and device. A template on the
// kernel's address, so every instantiation has its own cache.
template <auto kKernel>
int resident_blocks() {
  constexpr int kDevices = 64;
  static std::atomic<int> cached[kDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    return 1;
  }
  const bool cacheable = device >= 0 && device < kDevices;
  if (cacheable) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) {
      return known;
    }
  }
  int per_sm = 0, sms = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, 0) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // not sticky: the launch reports what is wrong
    return 1;
  }
  const int blocks = per_sm > 0 && sms > 0 ? per_sm * sms : 1;
  if (cacheable) {
    cached[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// The grid of one launch of kKernel: the resident blocks, no more than one per chunk (at least
// one block, which writes a norm's total or a skip flag) and no more than kMaxGrid.
template <auto kKernel>
int grid_of(const Table& t) {
  return launch_grid(t.chunks, resident_blocks<kKernel>(), kMaxGrid);  // harness.h
}

}  // namespace

cudaError_t launch_norm_sq(DType dtype, const Table& table, bool adaptive, double eta,
                           const Workspace& ws, double* out, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto launch = [&](auto adaptive_tag) {
      constexpr auto kernel = &norm_sq_kernel<T, decltype(adaptive_tag)::value>;
      kernel<<<grid_of<kernel>(table), kThreads, 0, stream>>>(view(table), table.chunks, eta, ws,
                                                              out);
    };
    if (adaptive) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_perturb(DType dtype, const Table& table, MaskKind mask, RandomMask random,
                           const void* sumsq, bool sumsq_double, int64_t sumsq_len, double rho,
                           const double* rho_device, double eps, bool adaptive, double eta,
                           cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Op = typename Num<T>::Op;
    const auto launch = [&](auto s_tag, auto adaptive_tag, auto mask_tag) {
      using S = decltype(s_tag);
      constexpr auto kernel =
          &perturb_kernel<T, decltype(adaptive_tag)::value, decltype(mask_tag)::value, S>;
      kernel<<<grid_of<kernel>(table), kThreads, 0, stream>>>(
          view(table), table.chunks, random, static_cast<const S*>(sumsq), sumsq_len, rho,
          rho_device, eps, static_cast<Op>(eta));
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
    return cudaGetLastError();
  });
}

cudaError_t launch_restore(DType dtype, const Table& table, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    constexpr auto kernel = &restore_kernel<decltype(tag)>;
    kernel<<<grid_of<kernel>(table), kThreads, 0, stream>>>(view(table), table.chunks);
    return cudaGetLastError();
  });
}

cudaError_t launch_restore_sgd_step(DType dtype, const Table& table, const SgdArgs& args,
                                    cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    constexpr auto kernel = &sgd_kernel<decltype(tag)>;
    kernel<<<grid_of<kernel>(table), kThreads, 0, stream>>>(view(table), table.chunks, args);
    return cudaGetLastError();
  });
}

cudaError_t launch_restore_adam_step(DType dtype, const Table& table, const AdamArgs& args,
                                     const Workspace& ws, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    constexpr auto kernel = &adam_kernel<decltype(tag)>;
    kernel<<<grid_of<kernel>(table), kThreads, 0, stream>>>(view(table), table.chunks, args,
                                                            ws);
    return cudaGetLastError();
  });
}

cudaError_t launch_dot(DType dtype, const Table& table, const Workspace& ws, double* out,
                       cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    constexpr auto kernel = &dot_kernel<decltype(tag)>;
    kernel<<<grid_of<kernel>(table), kThreads, 0, stream>>>(view(table), table.chunks, ws, out);
    return cudaGetLastError();
  });
}

cudaError_t launch_axpby(DType dtype, const Table& table, const double* coefs, int64_t coefs_stride,
                         const float* skip, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    constexpr auto kernel = &axpby_kernel<decltype(tag)>;
    kernel<<<grid_of<kernel>(table), kThreads, 0, stream>>>(view(table), table.chunks, coefs,
                                                            coefs_stride, skip);
    return cudaGetLastError();
  });
}

}  // namespace fused_sam::cuda_kernels
