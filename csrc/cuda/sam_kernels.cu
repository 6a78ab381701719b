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

__device__ __forceinline__ float op_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double op_abs(double x) { return fabs(x); }
__device__ __forceinline__ float op_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double op_sqrt(double x) { return sqrt(x); }

// Float64 value of a stored element (exact for every storage type).
template <typename T>
__device__ __forceinline__ double to_double(T x) {
  return static_cast<double>(Num<T>::to_op(x));
}

// A float64 result stored in T the way torch converts a float64 tensor (the reference's
// .to(dtype)): float32 and float64 round once; half and bfloat16 round to float32 first, then to
// T. (Rounding once, __double2bfloat16, differs where a value lies within float32 rounding of a
// tie of T, which a x + b y often does: a product of two short mantissas ends just above one.)
template <typename T>
__device__ __forceinline__ T from_double(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return Num<T>::from_op(static_cast<float>(x));
  }
}

// Whether a base step is skipped (SkipArgs): the same decision in every thread of every
// block, from device values that no block writes. The norm partials are short (one entry per
// norm_sq launch): every thread adds them in index order.
__device__ __forceinline__ bool step_skipped(const SkipArgs& s) {
  bool skip = s.found_inf != nullptr && *s.found_inf != 0.0f;
  for (int i = 0; i < s.count && !skip; ++i) {
    double total = 0.0;
    for (int64_t k = 0; k < s.len[i]; ++k) {
      total = total + s.sumsq[i][k];
    }
    skip = !isfinite(total);
  }
  return skip;
}

// Block 0 reports the decision: the op's 0-dim bool output, written by the kernel itself.
__device__ __forceinline__ void report_skip(const SkipArgs& s, bool skip) {
  if (s.skipped != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    *s.skipped = skip;
  }
}

__device__ __forceinline__ bool mask_bit(const uint8_t* mask, int64_t k) {
  return (mask[k >> 3] >> (k & 7)) & 1;
}

// The random-mask hash of fused_sam.masks.element_hash: fmix32(k + j * 0x9E3779B9), uint32
// arithmetic, j the element's position modulo 2^32.
__device__ __forceinline__ uint32_t element_hash(uint32_t key, int64_t j) {
  uint32_t x = key + static_cast<uint32_t>(j) * 0x9E3779B9u;
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
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
        double x = static_cast<double>(Num<T>::to_op(gp.v[j]));
        if (kAdaptive) {
          x = (fabs(static_cast<double>(Num<T>::to_op(wp.v[j]))) + eta) * x;
        }
        total = total + x * x;
      }
    });
  });
  grid_sum(block_sum(total), ws.ticket, ws.partials, out);
}

// ---------------------------------------------------------------------------------------------
// perturb

// The total of a short partials tensor, in index order, in every thread (no block reduction:
// norm_sq already finalized it to one entry per launch).
template <typename S>
__device__ __forceinline__ double total_of(const S* sumsq, int64_t len) {
  double x = 0.0;
  for (int64_t k = 0; k < len; ++k) {
    x = x + static_cast<double>(sumsq[k]);
  }
  return x;
}

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
  const bool finite = isfinite(norm);
  const Op scale = static_cast<Op>(finite ? rho / (norm + eps) : 0.0);
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
        const Op wj = Num<T>::to_op(wp.v[j]);
        Op e = scale;
        if (kAdaptive) {
          const Op t = op_abs(wj) + eta;
          e = e * t * t;
        }
        e = e * Num<T>::to_op(gp.v[j]);
        if (kMask == MaskKind::kBits) {
          e = e * static_cast<Op>(j < n && mask_bit(mask, i + j));
        } else if (kMask == MaskKind::kRandom) {
          e = e * static_cast<Op>(element_hash(key, i + j) < random.threshold);
        }
        wp.v[j] = Num<T>::from_op(wj + e);
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
  const Op gs = a.grad_scale != nullptr ? static_cast<Op>(*a.grad_scale) : Op(1);
  const double lr64 = a.lr_device != nullptr ? *a.lr_device : a.lr;
  const Op lr = static_cast<Op>(lr64), wd = static_cast<Op>(a.weight_decay);
  const Op mu = static_cast<Op>(a.momentum), damp = static_cast<Op>(1.0 - a.dampening);
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
        const Op wj = Num<T>::to_op(wp.v[j]);
        Op d = Num<T>::to_op(gp.v[j]);
        if (a.grad_scale != nullptr) {
          d = d / gs;
        }
        if (a.maximize) {
          d = -d;
        }
        if (a.weight_decay != 0.0) {
          d = d + wd * wj;
        }
        if (a.with_momentum) {
          const Op v = a.first_step ? d : mu * Num<T>::to_op(vp.v[j]) + damp * d;
          vp.v[j] = Num<T>::from_op(v);
          d = a.nesterov ? d + mu * v : v;
        }
        wp.v[j] = Num<T>::from_op(wj - lr * d);
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
    const Op gs = a.grad_scale != nullptr ? static_cast<Op>(*a.grad_scale) : Op(1);
    const Op beta1 = static_cast<Op>(a.beta1), one_minus_beta1 = static_cast<Op>(1.0 - a.beta1);
    const Op beta2 = static_cast<Op>(a.beta2), one_minus_beta2 = static_cast<Op>(1.0 - a.beta2);
    const Op wd = static_cast<Op>(a.weight_decay);
    // (A local, not an assignment to a.lr: writing a by-value kernel parameter copies the
    // whole argument struct to local memory.)
    const double lr = a.lr_device != nullptr ? *a.lr_device : a.lr;
    const Op decay = static_cast<Op>(1.0 - lr * a.weight_decay);
    const Op eps = static_cast<Op>(a.eps);
    for_each_chunk(tab, chunks, [&](const ChunkRef& c) {
      Op step_size = static_cast<Op>(a.step_size), bc2 = static_cast<Op>(a.bias_c2_sqrt);
      if (a.device_steps) {
        // Bias corrections of this tensor from its counter as it will be after this step.
        const double step = static_cast<double>(*tab.ptr<const float>(kAStep, c.tensor)) + 1.0;
        step_size = static_cast<Op>(lr / (1.0 - pow(a.beta1, step)));
        bc2 = static_cast<Op>(sqrt(1.0 - pow(a.beta2, step)));
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
          Op wj = Num<T>::to_op(wp.v[j]);
          Op gj = Num<T>::to_op(gp.v[j]);
          if (a.grad_scale != nullptr) {
            gj = gj / gs;
          }
          if (a.maximize) {
            gj = -gj;
          }
          if (a.weight_decay != 0.0) {
            if (a.decoupled_weight_decay) {
              wj = wj * decay;
            } else {
              gj = gj + wd * wj;
            }
          }
          const Op mj = beta1 * Num<T>::to_op(mp.v[j]) + one_minus_beta1 * gj;
          const Op vj = beta2 * Num<T>::to_op(vp.v[j]) + one_minus_beta2 * gj * gj;
          mp.v[j] = Num<T>::from_op(mj);
          vp.v[j] = Num<T>::from_op(vj);
          Op second = vj;
          if (a.amsgrad) {
            const Op old = Num<T>::to_op(xp.v[j]);
            second = old > vj || old != old ? old : vj;  // torch.maximum: NaN wins
            xp.v[j] = Num<T>::from_op(second);
          }
          const Op denom = op_sqrt(second) / bc2 + eps;
          wp.v[j] = Num<T>::from_op(wj - step_size * mj / denom);
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
        total = total + to_double(ap.v[j]) * to_double(bp.v[j]);
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
        op.v[j] = from_double<T>(c0 * to_double(xp.v[j]) + c1 * to_double(yp.v[j]));
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
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
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
  const int64_t grid =
      std::min<int64_t>({int64_t{resident_blocks<kKernel>()}, t.chunks, int64_t{kMaxGrid}});
  return static_cast<int>(std::max<int64_t>(1, grid));
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
