// CPU kernels of the fused_sam ops: one pass over memory per op, vectorised with at::vec and
// parallelised with at::parallel_for over every element of every tensor of a call.
//
// The tensors of a call are cut into fixed-size chunks (a tensor smaller than a chunk is one
// chunk), and the flat chunk list is split between threads. A thousand small tensors therefore
// cost one parallel region, not a thousand, and one huge tensor is shared by all threads.
//
// Numerics follow fused_sam/reference.py: float16/bfloat16/float32 tensors are computed in
// float32 and rounded once when stored, float64 tensors in float64. Norm partial sums are
// accumulated in short float32 vector blocks that are then added in float64, in a fixed order,
// so the result does not depend on the number of threads. Copies (backup, restore) are byte
// copies and therefore exact for every value, NaN payloads included.

#include "sam_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#define FUSED_SAM_STREAM_STORES 1
#endif

namespace fused_sam::cpu {
namespace {

using at::vec::Vectorized;

// Elements per chunk: 64 KiB of float32 per stream, so the few streams an op touches stay in L2
// while a chunk is processed. A multiple of every vector step below.
constexpr int64_t kChunk = 1 << 14;
// Minimum elements per parallel task: below this, waking another thread costs more than it saves.
constexpr int64_t kTaskElems = 1 << 15;
// Elements summed in float32 before the block is added to the float64 total. Short blocks keep
// the float32 rounding error of a norm at the level of a pairwise sum.
constexpr int64_t kSumBlock = 256;

// ---------------------------------------------------------------------------------------------
// Streaming stores
//
// Outputs that a kernel writes without reading them (the backup in perturb, the weights in the
// restore+step kernels, the weights in restore) are stored around the cache where the target is
// 16-byte aligned: a normal store first reads the line it overwrites, which would add 4 B/param
// of traffic to each of these streams. The copies stay byte-exact. stream_fence() orders them
// before the end of a parallel task.

inline void stream_copy(void* dst, const void* src, size_t bytes) {
#ifdef FUSED_SAM_STREAM_STORES
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    const size_t body = bytes & ~size_t{15};
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    for (size_t k = 0; k < body; k += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + k),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
    }
    if (body != bytes) {
      std::memcpy(d + body, s + body, bytes - body);
    }
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void stream_fence() {
#ifdef FUSED_SAM_STREAM_STORES
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------------------------
// Vector loads and stores in the math type.
//
// Lanes<T> moves kStep elements of storage type T to and from kN vectors of the math type
// (float for float16/bfloat16/float32, double for float64). A step shorter than kStep (the tail
// of a chunk) uses the partial loads and stores of at::vec, which zero the missing lanes, so the
// tail runs the very same math as the body.

template <typename T, bool kReduced = at::vec::is_reduced_floating_point_v<T>>
struct Lanes {
  using Op = T;
  using V = Vectorized<T>;
  static constexpr int kN = 1;
  static constexpr int64_t kStep = V::size();

  static void load(const T* p, int64_t n, V* out) {
    out[0] = n == kStep ? V::loadu(p) : V::loadu(p, n);
  }
  static void store(T* p, int64_t n, const V* v) {
    if (n == kStep) {
      v[0].store(p);
    } else {
      v[0].store(p, static_cast<int>(n));
    }
  }
  // store() for an output the kernel never reads (see stream_copy).
  static void store_stream(T* p, int64_t n, const V* v) {
    alignas(64) T tmp[kStep];
    v[0].store(tmp);
    stream_copy(p, tmp, n * sizeof(T));
  }
};

template <typename T>
struct Lanes<T, true> {
  using Op = float;
  using V = Vectorized<float>;
  using Raw = Vectorized<T>;
  static constexpr int kN = 2;
  static constexpr int64_t kStep = Raw::size();
  static_assert(Raw::size() == 2 * V::size(), "a reduced-precision vector holds two float vectors");

  static void load(const T* p, int64_t n, V* out) {
    const Raw raw = n == kStep ? Raw::loadu(p) : Raw::loadu(p, n);
    std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(raw);
  }
  static void store(T* p, int64_t n, const V* v) {
    const Raw raw = at::vec::convert_from_float<T>(v[0], v[1]);
    if (n == kStep) {
      raw.store(p);
    } else {
      raw.store(p, static_cast<int>(n));
    }
  }
  static void store_stream(T* p, int64_t n, const V* v) {
    alignas(64) T tmp[kStep];
    at::vec::convert_from_float<T>(v[0], v[1]).store(tmp);
    stream_copy(p, tmp, n * sizeof(T));
  }
};

// Mask bits of elements [k, k + n) of a tensor as a 0/1 vector; lanes past n are 0.
template <typename Op>
Vectorized<Op> mask_lanes(const uint8_t* mask, int64_t k, int64_t n) {
  using V = Vectorized<Op>;
  alignas(64) Op bits[V::size()];
  for (int64_t j = 0; j < V::size(); ++j) {
    const int64_t e = k + j;
    bits[j] = j < n ? static_cast<Op>((mask[e >> 3] >> (e & 7)) & 1) : Op(0);
  }
  return V::loadu(bits);
}

// The step bodies must be inlined for the constant n of full steps to fold the tail branches.
#if defined(__GNUC__)
#define FUSED_SAM_INLINE __attribute__((always_inline))
#else
#define FUSED_SAM_INLINE
#endif

// Calls step(i, n) for the vector steps of [begin, end): full steps first, where n is the
// constant kStep once inlined (so the partial-load branches fold away), then one partial step.
template <typename L, typename Step>
FUSED_SAM_INLINE inline void for_each_step(int64_t begin, int64_t end, const Step& step) {
  int64_t i = begin;
  for (; i + L::kStep <= end; i += L::kStep) {
    step(i, L::kStep);
  }
  if (i < end) {
    step(i, end - i);
  }
}

// ---------------------------------------------------------------------------------------------
// Chunks and the parallel loop

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct Plan {
  std::vector<Chunk> chunks;
  int64_t total = 0;
};

Plan make_plan(at::TensorList tensors) {
  Plan plan;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t n = tensors[i].numel();
    plan.total += n;
    for (int64_t b = 0; b < n; b += kChunk) {
      plan.chunks.push_back({i, b, std::min(n, b + kChunk)});
    }
  }
  return plan;
}

// Calls fn(chunk_index, chunk) for every chunk, spreading chunks over threads so that every task
// covers at least about kTaskElems elements.
template <typename F>
void for_each_chunk(const Plan& plan, const F& fn) {
  const int64_t n = static_cast<int64_t>(plan.chunks.size());
  if (n == 0) {
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kTaskElems * n / std::max<int64_t>(plan.total, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      fn(c, plan.chunks[c]);
    }
    stream_fence();
  });
}

// ---------------------------------------------------------------------------------------------
// Argument checks. functional.py only sends dense tensors of one dtype whose strides agree per
// index; these checks keep a direct torch.ops call from reading memory out of bounds.

void check_list(at::TensorList ts, at::TensorList like, const char* what, bool same_dtype = true) {
  TORCH_CHECK(ts.size() == like.size(), "fused_sam: ", what, " has ", ts.size(),
              " tensors, expected ", like.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    const at::Tensor& p = like[i];
    TORCH_CHECK(t.device().is_cpu(), "fused_sam: ", what, "[", i, "] is on ", t.device(),
                ", expected cpu");
    TORCH_CHECK(!same_dtype || t.scalar_type() == p.scalar_type(), "fused_sam: ", what, "[", i,
                "] has dtype ", t.scalar_type(), ", expected ", p.scalar_type());
    TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "fused_sam: ", what, "[",
                i, "] must have the shape and strides of the parameter");
  }
}

void check_params(at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "fused_sam: tensor ", i, " is on ", p.device(),
                ", expected cpu");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "fused_sam: tensor ", i,
                " has dtype ", p.scalar_type(), ", expected ", params[0].scalar_type());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "fused_sam: tensor ", i,
                " is not dense; route it to the foreach backend");
  }
}

template <typename T>
std::vector<T*> ptrs(at::TensorList ts) {
  std::vector<T*> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    out[i] = static_cast<T*>(ts[i].data_ptr());
  }
  return out;
}

bool flag_set(const std::optional<at::Tensor>& flag) {
  return flag.has_value() && flag->item<double>() != 0.0;
}

void copy_chunk(void* dst, const void* src, const Chunk& c, size_t elem_size) {
  if (dst != src) {
    stream_copy(static_cast<char*>(dst) + c.begin * elem_size,
                static_cast<const char*>(src) + c.begin * elem_size,
                (c.end - c.begin) * elem_size);
  }
}

// Exact restore w = b of every chunk (used by restore_ and by a skipped step).
void restore_all(at::TensorList params, at::TensorList backups) {
  const Plan plan = make_plan(params);
  std::vector<void*> w(params.size());
  std::vector<const void*> b(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    w[i] = params[i].data_ptr();
    b[i] = backups[i].data_ptr();
  }
  const size_t elem = params.empty() ? 0 : params[0].element_size();
  for_each_chunk(plan, [&](int64_t, const Chunk& c) {
    copy_chunk(w[c.tensor], b[c.tensor], c, elem);
  });
}

// ---------------------------------------------------------------------------------------------
// Kernels on one chunk

// Sum over the chunk of (T(w) g)^2, T(w) = |w| + eta when adaptive, 1 otherwise.
//
// The loop reads 4 B/element at most, so unlike the other kernels it is bound by arithmetic:
// kAcc independent accumulators hide the latency of the adds, and each block's float32 lanes
// are added to the float64 total only once per kSumBlock elements.
template <typename T, bool kAdaptive>
double sumsq_chunk(const T* g, const T* w, int64_t begin, int64_t end,
                   typename Lanes<T>::Op eta) {
  using L = Lanes<T>;
  using V = typename L::V;
  using Op = typename L::Op;
  constexpr int kAcc = 4 / L::kN;  // packs in flight per iteration
  double total = 0.0;
  for (int64_t blk = begin; blk < end; blk += kSumBlock) {
    const int64_t blk_end = std::min(end, blk + kSumBlock);
    V acc[kAcc * L::kN];
    for (auto& a : acc) {
      a = V(Op(0));
    }
    for (int64_t i = blk; i < blk_end; i += kAcc * L::kStep) {
      for (int u = 0; u < kAcc; ++u) {
        const int64_t at = i + u * L::kStep;
        const int64_t n = std::min(L::kStep, blk_end - at);
        if (n <= 0) {
          break;
        }
        V gv[L::kN];
        L::load(g + at, n, gv);
        if constexpr (kAdaptive) {
          V wv[L::kN];
          L::load(w + at, n, wv);
          for (int k = 0; k < L::kN; ++k) {
            gv[k] = (wv[k].abs() + V(eta)) * gv[k];
          }
        }
        for (int k = 0; k < L::kN; ++k) {
          acc[u * L::kN + k] = acc[u * L::kN + k] + gv[k] * gv[k];
        }
      }
    }
    alignas(64) Op lanes[V::size()];
    for (int a = 1; a < kAcc * L::kN; ++a) {
      acc[0] = acc[0] + acc[a];
    }
    acc[0].store(lanes);
    Op block = 0;
    for (int64_t j = 0; j < V::size(); ++j) {
      block += lanes[j];
    }
    total += static_cast<double>(block);
  }
  return total;
}

// backup = w; then w = w + scale * T(w)^2 * g (* mask). Only called when the norm is finite.
template <typename T, bool kAdaptive, bool kMasked>
void perturb_chunk(T* w, const T* g, T* b, const uint8_t* mask, int64_t begin, int64_t end,
                   typename Lanes<T>::Op scale, typename Lanes<T>::Op eta) {
  using L = Lanes<T>;
  using V = typename L::V;
  using Op = typename L::Op;
  // The whole chunk first (one streaming copy), then the update, which reads w again from L2.
  stream_copy(b + begin, w + begin, (end - begin) * sizeof(T));
  for_each_step<L>(begin, end, [&](int64_t i, int64_t n) FUSED_SAM_INLINE {
    V wv[L::kN], gv[L::kN];
    L::load(w + i, n, wv);
    L::load(g + i, n, gv);
    for (int k = 0; k < L::kN; ++k) {
      V e = V(scale);
      if constexpr (kAdaptive) {
        const V t = wv[k].abs() + V(eta);
        e = e * t * t;
      }
      e = e * gv[k];
      if constexpr (kMasked) {
        const int64_t first = i + k * V::size();
        e = e * mask_lanes<Op>(mask, first, std::min<int64_t>(V::size(), end - first));
      }
      wv[k] = wv[k] + e;
    }
    L::store(w + i, n, wv);
  });
}

struct SgdArgs {
  double lr, weight_decay, momentum, dampening;
  bool nesterov, maximize, first_step;
  std::optional<double> grad_scale;
};

// w = b; d = (+-g / s) + wd * w; v = first ? d : mu v + (1 - tau) d; d = nesterov ? d + mu v : v;
// w = w - lr d.
template <typename T>
void sgd_chunk(T* w, const T* g, const T* b, T* buf, int64_t begin, int64_t end,
               const SgdArgs& a) {
  using L = Lanes<T>;
  using V = typename L::V;
  using Op = typename L::Op;
  const V lr(static_cast<Op>(a.lr));
  const V wd(static_cast<Op>(a.weight_decay));
  const V mu(static_cast<Op>(a.momentum));
  const V damp(static_cast<Op>(1.0 - a.dampening));
  const V gs(static_cast<Op>(a.grad_scale.value_or(1.0)));
  for_each_step<L>(begin, end, [&](int64_t i, int64_t n) FUSED_SAM_INLINE {
    V wv[L::kN], d[L::kN], v[L::kN];
    L::load(b + i, n, wv);
    L::load(g + i, n, d);
    if (buf != nullptr && !a.first_step) {
      L::load(buf + i, n, v);
    }
    for (int k = 0; k < L::kN; ++k) {
      if (a.grad_scale.has_value()) {
        d[k] = d[k] / gs;
      }
      if (a.maximize) {
        d[k] = d[k].neg();
      }
      if (a.weight_decay != 0.0) {
        d[k] = d[k] + wd * wv[k];
      }
      if (buf != nullptr) {
        v[k] = a.first_step ? d[k] : mu * v[k] + damp * d[k];
        d[k] = a.nesterov ? d[k] + mu * v[k] : v[k];
      }
      wv[k] = wv[k] - lr * d[k];
    }
    if (buf != nullptr) {
      L::store(buf + i, n, v);
    }
    L::store_stream(w + i, n, wv);
  });
}

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled_weight_decay;
  std::optional<double> grad_scale;
};

// w = b, then one torch.optim.Adam / AdamW step with the bias corrections of this tensor.
template <typename T>
void adam_chunk(T* w, const T* g, const T* b, T* m, T* v, T* vmax, int64_t begin, int64_t end,
                const AdamArgs& a, double step_size, double bias_c2_sqrt) {
  using L = Lanes<T>;
  using V = typename L::V;
  using Op = typename L::Op;
  const V beta1(static_cast<Op>(a.beta1)), one_minus_beta1(static_cast<Op>(1.0 - a.beta1));
  const V beta2(static_cast<Op>(a.beta2)), one_minus_beta2(static_cast<Op>(1.0 - a.beta2));
  const V wd(static_cast<Op>(a.weight_decay));
  const V decay(static_cast<Op>(1.0 - a.lr * a.weight_decay));
  const V gs(static_cast<Op>(a.grad_scale.value_or(1.0)));
  const V eps(static_cast<Op>(a.eps));
  const V lr_t(static_cast<Op>(step_size));
  const V bc2(static_cast<Op>(bias_c2_sqrt));
  for_each_step<L>(begin, end, [&](int64_t i, int64_t n) FUSED_SAM_INLINE {
    V wv[L::kN], gv[L::kN], mv[L::kN], vv[L::kN], vm[L::kN];
    L::load(b + i, n, wv);
    L::load(g + i, n, gv);
    L::load(m + i, n, mv);
    L::load(v + i, n, vv);
    if (a.amsgrad) {
      L::load(vmax + i, n, vm);
    }
    for (int k = 0; k < L::kN; ++k) {
      if (a.grad_scale.has_value()) {
        gv[k] = gv[k] / gs;
      }
      if (a.maximize) {
        gv[k] = gv[k].neg();
      }
      if (a.weight_decay != 0.0) {
        if (a.decoupled_weight_decay) {
          wv[k] = wv[k] * decay;
        } else {
          gv[k] = gv[k] + wd * wv[k];
        }
      }
      mv[k] = beta1 * mv[k] + one_minus_beta1 * gv[k];
      vv[k] = beta2 * vv[k] + one_minus_beta2 * gv[k] * gv[k];
      V second = vv[k];
      if (a.amsgrad) {
        vm[k] = at::vec::maximum(vm[k], vv[k]);
        second = vm[k];
      }
      const V denom = second.sqrt() / bc2 + eps;
      wv[k] = wv[k] - lr_t * mv[k] / denom;
    }
    L::store(m + i, n, mv);
    L::store(v + i, n, vv);
    if (a.amsgrad) {
      L::store(vmax + i, n, vm);
    }
    L::store_stream(w + i, n, wv);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Ops

at::Tensor norm_sq_partials(at::TensorList grads, at::TensorList params, bool adaptive,
                            double eta) {
  check_params(grads);
  check_list(params, grads, "params");
  const bool wide = !grads.empty() && grads[0].scalar_type() == at::kDouble;
  at::Tensor out = at::empty({1}, at::TensorOptions().dtype(wide ? at::kDouble : at::kFloat));
  if (grads.empty()) {
    out.zero_();
    return out;
  }
  const Plan plan = make_plan(grads);
  // One partial per chunk, then a sequential sum: the result is independent of the threads.
  std::vector<double> partial(plan.chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fused_sam_norm_sq_partials", [&] {
        using Op = typename Lanes<scalar_t>::Op;
        const auto g = ptrs<const scalar_t>(grads);
        const auto w = ptrs<const scalar_t>(params);
        for_each_chunk(plan, [&](int64_t idx, const Chunk& c) {
          partial[idx] =
              adaptive ? sumsq_chunk<scalar_t, true>(g[c.tensor], w[c.tensor], c.begin, c.end,
                                                     static_cast<Op>(eta))
                       : sumsq_chunk<scalar_t, false>(g[c.tensor], w[c.tensor], c.begin, c.end,
                                                      static_cast<Op>(eta));
        });
      });
  double total = 0.0;
  for (const double p : partial) {
    total += p;
  }
  if (wide) {
    out.data_ptr<double>()[0] = total;
  } else {
    out.data_ptr<float>()[0] = static_cast<float>(total);
  }
  return out;
}

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups,
              const at::Tensor& sumsq, double rho, double eps, bool adaptive, double eta,
              at::TensorList masks) {
  check_params(params);
  check_list(grads, params, "grads");
  check_list(backups, params, "backups");
  TORCH_CHECK(masks.empty() || masks.size() == params.size(),
              "fused_sam: masks must be empty or one per parameter");
  for (size_t i = 0; i < masks.size(); ++i) {
    TORCH_CHECK(masks[i].scalar_type() == at::kByte && masks[i].is_contiguous() &&
                    masks[i].device().is_cpu() && masks[i].numel() >= (params[i].numel() + 7) / 8,
                "fused_sam: masks[", i, "] must be a contiguous cpu uint8 tensor of at least ",
                (params[i].numel() + 7) / 8, " bytes");
  }
  TORCH_CHECK(sumsq.device().is_cpu() && sumsq.dim() == 1,
              "fused_sam: sumsq must be a 1-D cpu tensor");
  // Finalise the norm: fixed-order float64 sum of the partials.
  const at::Tensor s = sumsq.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  double total = 0.0;
  for (int64_t k = 0; k < s.numel(); ++k) {
    total += sp[k];
  }
  const double norm = std::sqrt(total);
  const bool finite = std::isfinite(norm);
  const double scale = finite ? rho / (norm + eps) : 0.0;

  if (!finite) {
    // Skipped perturbation: the backup is still written, the weights are not touched.
    restore_all(backups, params);
    return;
  }
  const Plan plan = make_plan(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_sam_perturb_", [&] {
        using Op = typename Lanes<scalar_t>::Op;
        const auto w = ptrs<scalar_t>(params);
        const auto g = ptrs<const scalar_t>(grads);
        const auto b = ptrs<scalar_t>(backups);
        const auto m = ptrs<const uint8_t>(masks);
        const auto run = [&](auto adaptive_tag, auto masked_tag) {
          constexpr bool kAdaptive = decltype(adaptive_tag)::value;
          constexpr bool kMasked = decltype(masked_tag)::value;
          for_each_chunk(plan, [&](int64_t, const Chunk& c) {
            perturb_chunk<scalar_t, kAdaptive, kMasked>(
                w[c.tensor], g[c.tensor], b[c.tensor], kMasked ? m[c.tensor] : nullptr, c.begin,
                c.end, static_cast<Op>(scale), static_cast<Op>(eta));
          });
        };
        const auto by_mask = [&](auto adaptive_tag) {
          if (m.empty()) {
            run(adaptive_tag, std::false_type{});
          } else {
            run(adaptive_tag, std::true_type{});
          }
        };
        if (adaptive) {
          by_mask(std::true_type{});
        } else {
          by_mask(std::false_type{});
        }
      });
}

void restore_(at::TensorList params, at::TensorList backups) {
  check_params(params);
  check_list(backups, params, "backups");
  restore_all(params, backups);
}

void restore_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       at::TensorList momentum_buffers, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize,
                       bool first_step, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  check_params(params);
  check_list(grads, params, "grads");
  check_list(backups, params, "backups");
  const bool with_momentum = momentum != 0.0;
  if (with_momentum) {
    check_list(momentum_buffers, params, "momentum_buffers");
  }
  if (flag_set(found_inf)) {
    restore_all(params, backups);
    return;
  }
  SgdArgs args{lr, weight_decay, momentum, dampening, nesterov, maximize, first_step,
               std::nullopt};
  if (grad_scale.has_value()) {
    args.grad_scale = grad_scale->item<double>();
  }
  const Plan plan = make_plan(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_sam_restore_sgd_step_", [&] {
        const auto w = ptrs<scalar_t>(params);
        const auto g = ptrs<const scalar_t>(grads);
        const auto b = ptrs<const scalar_t>(backups);
        const auto buf = ptrs<scalar_t>(with_momentum ? momentum_buffers : at::TensorList());
        for_each_chunk(plan, [&](int64_t, const Chunk& c) {
          sgd_chunk<scalar_t>(w[c.tensor], g[c.tensor], b[c.tensor],
                              with_momentum ? buf[c.tensor] : nullptr, c.begin, c.end, args);
        });
      });
}

void restore_adam_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                        bool maximize, bool decoupled_weight_decay,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  check_params(params);
  check_list(grads, params, "grads");
  check_list(backups, params, "backups");
  check_list(exp_avgs, params, "exp_avgs");
  check_list(exp_avg_sqs, params, "exp_avg_sqs");
  if (amsgrad) {
    check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  }
  TORCH_CHECK(state_steps.size() == params.size(), "fused_sam: one step counter per parameter");
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.device().is_cpu() && s.numel() == 1 &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                "fused_sam: state_steps[", i, "] must be a one-element float32/float64 cpu tensor");
  }
  if (flag_set(found_inf)) {
    restore_all(params, backups);
    return;
  }
  // Step counters and bias corrections are per tensor (a parameter may have missed steps).
  std::vector<double> step_size(params.size()), bias_c2_sqrt(params.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& s = state_steps[i];
    double step;
    if (s.scalar_type() == at::kFloat) {
      float* p = s.data_ptr<float>();
      *p += 1.0f;
      step = *p;
    } else {
      double* p = s.data_ptr<double>();
      *p += 1.0;
      step = *p;
    }
    step_size[i] = lr / (1.0 - std::pow(beta1, step));
    bias_c2_sqrt[i] = std::sqrt(1.0 - std::pow(beta2, step));
  }
  AdamArgs args{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
                std::nullopt};
  if (grad_scale.has_value()) {
    args.grad_scale = grad_scale->item<double>();
  }
  const Plan plan = make_plan(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_sam_restore_adam_step_", [&] {
        const auto w = ptrs<scalar_t>(params);
        const auto g = ptrs<const scalar_t>(grads);
        const auto b = ptrs<const scalar_t>(backups);
        const auto m = ptrs<scalar_t>(exp_avgs);
        const auto v = ptrs<scalar_t>(exp_avg_sqs);
        const auto vmax = ptrs<scalar_t>(amsgrad ? max_exp_avg_sqs : at::TensorList());
        for_each_chunk(plan, [&](int64_t, const Chunk& c) {
          const int64_t t = c.tensor;
          adam_chunk<scalar_t>(w[t], g[t], b[t], m[t], v[t], amsgrad ? vmax[t] : nullptr,
                               c.begin, c.end, args, step_size[t], bias_c2_sqrt[t]);
        });
      });
}

}  // namespace fused_sam::cpu
