// CUDA kernels of the fused_sam ops (no torch headers: raw pointers and a stream).
//
// One SAM step is three launches per (device, dtype) group, whatever the number of tensors:
//
//   norm_sq     s_b = sum over the chunks of block b of (T(w) g)^2           (reads g [, w])
//   perturb     n = sqrt(sum_b s_b) in a fixed order, in every block;
//               b = w; w = w + rho T(w)^2 g / (n + eps) (* mask) if n finite (reads w, g;
//               writes b, w)
//   restore+step  w = b, then the SGD or Adam/AdamW update with the second-pass gradient
//
// and the two ops of the SAM variants, one launch each:
//
//   dot         s_b = sum over the chunks of block b of a b                   (reads a, b)
//   axpby       out = c0 x + c1 y, (c0, c1) and the skip flag read on the device (reads x, y;
//               writes out, which may be x or y)
//
// Math is float32 for half/bfloat16/float32 storage and float64 for float64, rounded once on
// store; norms and dot products are float64 for every storage type (squares included, so a
// finite gradient gives a finite norm), and so is a x + b y (stored as torch converts float64).
// Blocks reduce with a fixed shuffle tree, so results are bitwise reproducible on one GPU model.
// Build with --fmad=false (setup.py does) so that no multiply-add is contracted behind our back.

#include <cmath>
#include <type_traits>

#include "cuda/multi_tensor.cuh"
#include "cuda/sam_kernels.h"

namespace fused_sam::cuda_kernels {
namespace {

using namespace lists;

// The element math (to_double, from_double, the hash, the SGD/Adam/perturb values, ...) is in
// element_math.h, compiled for the host too: tests/test_cuda_host.py runs it on the CPU.

// Block b's partial sum (in thread 0 after block_sum) to partials[b]; block 0 also zeroes the
// entries past the grid, so that every one of the num_partials entries is defined.
__device__ __forceinline__ void write_partials(double total, double* partials, int num_partials) {
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = total;
  }
  if (blockIdx.x == 0) {
    for (int k = gridDim.x + threadIdx.x; k < num_partials; k += blockDim.x) {
      partials[k] = 0.0;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// norm_sq

template <typename T, bool kAdaptive>
__global__ void __launch_bounds__(kThreads)
    norm_sq_kernel(TableView tab, int64_t chunks, double eta, double* partials,
                   int num_partials) {
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
  write_partials(block_sum(total), partials, num_partials);
}

// ---------------------------------------------------------------------------------------------
// perturb

template <typename S>
__device__ double reduce_sumsq(const S* sumsq, int64_t len) {
  __shared__ double total;
  double x = 0.0;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) {
    x += static_cast<double>(sumsq[k]);
  }
  x = block_sum(x);
  if (threadIdx.x == 0) {
    total = x;
  }
  __syncthreads();
  return total;
}

template <typename T, bool kAdaptive, MaskKind kMask, typename S>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(TableView tab, int64_t chunks, RandomMask random, const S* sumsq,
                   int64_t sumsq_len, double rho, double eps, typename Num<T>::Op eta) {
  using Op = typename Num<T>::Op;
  const double norm = sqrt(reduce_sumsq(sumsq, sumsq_len));
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

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(TableView tab, int64_t chunks, SgdArgs a) {
  using Op = typename Num<T>::Op;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) {
    restore_chunks<T>(tab, chunks, kSW, kSB);
    return;
  }
  const SgdCoefs<Op> k = sgd_coefs<Op>(a, a.grad_scale != nullptr ? *a.grad_scale : 1.0f);
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
__device__ __forceinline__ void advance_steps_when_last(const TableView& tab) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    int64_t* slot = const_cast<int64_t*>(tab.data) + tab.layout.counter_at();
    auto* counter = reinterpret_cast<unsigned long long*>(slot);
    last = atomicAdd(counter, 1ull) == gridDim.x - 1;
    if (last) {
      *counter = 0;  // ready for the next launch on this table
    }
  }
  __syncthreads();
  if (last) {
    for (int64_t t = threadIdx.x; t < tab.layout.n; t += blockDim.x) {
      float* step = tab.ptr<float>(kAStep, t);
      *step = *step + 1.0f;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(TableView tab, int64_t chunks, AdamArgs a) {
  using Op = typename Num<T>::Op;
  const bool skip = a.found_inf != nullptr && *a.found_inf != 0.0f;
  if (skip) {
    restore_chunks<T>(tab, chunks, kAW, kAB);
  } else {
    const AdamCoefs<Op> k =
        adam_coefs<Op>(a, a.grad_scale != nullptr ? *a.grad_scale : 1.0f);
    for_each_chunk(tab, chunks, [&](const ChunkRef& c) {
      Op step_size = static_cast<Op>(a.step_size), bc2 = static_cast<Op>(a.bias_c2_sqrt);
      if (a.device_steps) {
        // Bias corrections of this tensor from its counter as it will be after this step.
        const double step = static_cast<double>(*tab.ptr<const float>(kAStep, c.tensor)) + 1.0;
        const AdamBias bias = adam_bias(a.lr, a.beta1, a.beta2, step);
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
    advance_steps_when_last(tab);
  }
}

// ---------------------------------------------------------------------------------------------
// dot: s_b = sum of a b over the chunks of block b, products and sums in float64 (a product of
// two float32 or lower values is exact there). Each thread adds its packs in chunk order, the
// block reduces with the fixed tree of block_sum, and the host-side total adds the partials in
// index order: the same bits on every run with the same grid.

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dot_kernel(TableView tab, int64_t chunks, double* partials, int num_partials) {
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
  write_partials(block_sum(total), partials, num_partials);
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

}  // namespace

cudaError_t launch_norm_sq(DType dtype, const Table& table, bool adaptive, double eta,
                           double* partials, int num_partials, int grid, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (adaptive) {
      norm_sq_kernel<T, true><<<grid, kThreads, 0, stream>>>(view(table), table.chunks, eta,
                                                             partials, num_partials);
    } else {
      norm_sq_kernel<T, false><<<grid, kThreads, 0, stream>>>(view(table), table.chunks, eta,
                                                              partials, num_partials);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_perturb(DType dtype, const Table& table, MaskKind mask, RandomMask random,
                           const void* sumsq, bool sumsq_double, int64_t sumsq_len, double rho,
                           double eps, bool adaptive, double eta, int grid, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Op = typename Num<T>::Op;
    const auto launch = [&](auto s_tag, auto adaptive_tag, auto mask_tag) {
      using S = decltype(s_tag);
      perturb_kernel<T, decltype(adaptive_tag)::value, decltype(mask_tag)::value, S>
          <<<grid, kThreads, 0, stream>>>(view(table), table.chunks, random,
                                          static_cast<const S*>(sumsq), sumsq_len, rho, eps,
                                          static_cast<Op>(eta));
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

cudaError_t launch_restore(DType dtype, const Table& table, int grid, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    restore_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(view(table), table.chunks);
    return cudaGetLastError();
  });
}

cudaError_t launch_restore_sgd_step(DType dtype, const Table& table, const SgdArgs& args,
                                    int grid, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    sgd_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(view(table), table.chunks, args);
    return cudaGetLastError();
  });
}

cudaError_t launch_restore_adam_step(DType dtype, const Table& table, const AdamArgs& args,
                                     int grid, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    adam_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(view(table), table.chunks, args);
    return cudaGetLastError();
  });
}

cudaError_t launch_dot(DType dtype, const Table& table, double* partials, int num_partials,
                       int grid, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    dot_kernel<decltype(tag)>
        <<<grid, kThreads, 0, stream>>>(view(table), table.chunks, partials, num_partials);
    return cudaGetLastError();
  });
}

cudaError_t launch_axpby(DType dtype, const Table& table, const double* coefs, int64_t coefs_stride,
                         const float* skip, int grid, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    axpby_kernel<decltype(tag)>
        <<<grid, kThreads, 0, stream>>>(view(table), table.chunks, coefs, coefs_stride, skip);
    return cudaGetLastError();
  });
}

}  // namespace fused_sam::cuda_kernels
