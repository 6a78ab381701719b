// Per-element math of the fused_sam CUDA kernels, compiled for the device and for the host.
//
// Every function here is FUSED_SAM_HD (__host__ __device__ under nvcc, plain inline otherwise)
// and uses nothing but arithmetic, so the CUDA kernels (sam_kernels.cu) and their host build
// (host_driver.cc, run by tests/test_cuda_host.py in the default CPU suite) execute the same
// source. With no contraction to FMA on either side (nvcc --fmad=false, g++ -ffp-contract=off)
// and IEEE division and square root (no --use_fast_math), each operation rounds once, in the
// same order, to the same bits.
//
// The one part written twice is the float <-> half/bfloat16 conversion: the device uses the
// hardware conversions (round to nearest even), the host the bit-exact software conversions
// below; the host suite checks the latter against torch's own conversions, which round alike.
// The libm functions differ too: `pow` (Adam's bias corrections with counters on the device)
// may differ in its last bit between CUDA's and the host's math library; sqrt and division are
// correctly rounded on both.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda/sam_kernels.h"  // FUSED_SAM_HD, MaskKind, SgdArgs, AdamArgs

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cmath>

namespace fused_sam::cuda_kernels {

// ---------------------------------------------------------------------------------------------
// Storage types and conversions: math in float for half/bfloat16/float, double for double.

#if defined(__CUDACC__)
using Half = __half;
using BFloat16 = __nv_bfloat16;
#else
// Host stand-ins for __half and __nv_bfloat16: the 16 stored bits.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// __half2float: exact.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) {
    return bits_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN (payload kept)
  }
  if (exp != 0) {
    return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  }
  if (mant == 0) {
    return bits_float(sign);
  }
  // Subnormal half: mant * 2^-24, normal as a float.
  uint32_t e = 113u;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return bits_float(sign | (e << 23) | ((mant & 0x3ffu) << 13));
}

// __float2half_rn: round to nearest, ties to even; overflow to inf; NaN stays NaN (quiet).
inline uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) {
    return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  }
  if (ax >= 0x477ff000u) {  // >= 65520, halfway between 65504 and 2^16: rounds to inf
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (ax >= 0x38800000u) {  // a normal half (>= 2^-14): drop 13 bits, ties to even
    const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
  }
  // Subnormal half (or zero): q = |f| / 2^-24 rounded to nearest even.
  const int e = static_cast<int>(ax >> 23);
  if (e < 102) {  // |f| < 2^-25: rounds to zero
    return static_cast<uint16_t>(sign);
  }
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const int shift = 126 - e;  // 14..24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) {
    ++q;
  }
  return static_cast<uint16_t>(sign | q);
}

// __bfloat162float: exact.
inline float bfloat16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// __float2bfloat16_rn: round to nearest, ties to even. NaN becomes a quiet NaN (the device
// writes 0x7fff, torch 0x7fc0: both NaN, the only bits in which the sides may differ).
inline uint16_t float_to_bfloat16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((x >> 16) | 0x40u);
  }
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
#endif

template <typename T>
struct Num {
  using Op = T;
  static FUSED_SAM_HD Op to_op(T x) { return x; }
  static FUSED_SAM_HD T from_op(Op x) { return x; }
};

template <>
struct Num<Half> {
  using Op = float;
#if defined(__CUDACC__)
  static FUSED_SAM_HD Op to_op(Half x) { return __half2float(x); }
  static FUSED_SAM_HD Half from_op(Op x) { return __float2half_rn(x); }
#else
  static Op to_op(Half x) { return half_to_float(x.bits); }
  static Half from_op(Op x) { return Half{float_to_half(x)}; }
#endif
};

template <>
struct Num<BFloat16> {
  using Op = float;
#if defined(__CUDACC__)
  static FUSED_SAM_HD Op to_op(BFloat16 x) { return __bfloat162float(x); }
  static FUSED_SAM_HD BFloat16 from_op(Op x) { return __float2bfloat16_rn(x); }
#else
  static Op to_op(BFloat16 x) { return bfloat16_to_float(x.bits); }
  static BFloat16 from_op(Op x) { return BFloat16{float_to_bfloat16(x)}; }
#endif
};

// Float64 value of a stored element (exact for every storage type).
template <typename T>
FUSED_SAM_HD double to_double(T x) {
  return static_cast<double>(Num<T>::to_op(x));
}

// A float64 result stored in T the way torch converts a float64 tensor (the reference's
// .to(dtype)): float32 and float64 round once; half and bfloat16 round to float32 first, then to
// T. (Rounding once, __double2bfloat16, differs where a value lies within float32 rounding of a
// tie of T, which a x + b y often does: a product of two short mantissas ends just above one.)
template <typename T>
FUSED_SAM_HD T from_double(double x) {
  if constexpr (sizeof(T) == sizeof(double)) {
    return x;
  } else {
    return Num<T>::from_op(static_cast<float>(x));
  }
}

FUSED_SAM_HD inline float op_abs(float x) { return fabsf(x); }
FUSED_SAM_HD inline double op_abs(double x) { return fabs(x); }
FUSED_SAM_HD inline float op_sqrt(float x) { return sqrtf(x); }
FUSED_SAM_HD inline double op_sqrt(double x) { return sqrt(x); }

// Neither inf nor NaN (written without isfinite, whose overloads differ between host and device
// headers). NaN compares false.
FUSED_SAM_HD inline bool is_finite(double x) { return fabs(x) <= 1.7976931348623157e308; }

// ---------------------------------------------------------------------------------------------
// Norms and dot products: float64 terms (squares of widened values never overflow)

// (T(w) g)^2 in float64, T(w) = |w| + eta when adaptive.
template <typename T>
FUSED_SAM_HD double norm_sq_term(T g, T w, bool adaptive, double eta) {
  double x = to_double(g);
  if (adaptive) {
    x = (fabs(to_double(w)) + eta) * x;
  }
  return x * x;
}

template <typename T>
FUSED_SAM_HD double dot_term(T a, T b) {
  return to_double(a) * to_double(b);
}

// ---------------------------------------------------------------------------------------------
// Totals of short partials tensors and the skip decision

// The total of a short partials tensor (the output of a norm launch, or a few concatenated), in
// index order, in every thread (no block reduction: norm_sq already finalized it).
template <typename S>
FUSED_SAM_HD double total_of(const S* sumsq, int64_t len) {
  double x = 0.0;
  for (int64_t k = 0; k < len; ++k) {
    x = x + static_cast<double>(sumsq[k]);
  }
  return x;
}

// Whether a base step is skipped (SkipArgs): found_inf is nonzero or the total of a checked
// norm is not finite. The same decision in every thread of every block, from values no block
// writes.
FUSED_SAM_HD inline bool step_skipped(const SkipArgs& s) {
  bool skip = s.found_inf != nullptr && *s.found_inf != 0.0f;
  for (int i = 0; i < s.count && !skip; ++i) {
    skip = !is_finite(total_of(s.sumsq[i], s.len[i]));
  }
  return skip;
}

// ---------------------------------------------------------------------------------------------
// Perturbation

// The factor rho / (n + eps) of e, or 0 when the norm n is not finite (the step is skipped).
FUSED_SAM_HD inline double perturb_scale(double norm, double rho, double eps) {
  return is_finite(norm) ? rho / (norm + eps) : 0.0;
}

// Bit k of a bit-packed mask (little-endian bit order in each byte).
FUSED_SAM_HD inline bool mask_bit(const uint8_t* mask, int64_t k) {
  return (mask[k >> 3] >> (k & 7)) & 1;
}

// The random-mask hash of fused_sam.masks.element_hash: fmix32(k + j * 0x9E3779B9), uint32
// arithmetic, j the element's position modulo 2^32.
FUSED_SAM_HD inline uint32_t element_hash(uint32_t key, int64_t j) {
  uint32_t x = key + static_cast<uint32_t>(j) * 0x9E3779B9u;
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// w + e with e = scale T(w)^2 g (* keep), in the math type Op; `keep` is the mask bit (ignored
// without a mask).
template <typename Op, bool kAdaptive, MaskKind kMask>
FUSED_SAM_HD Op perturb_value(Op w, Op g, Op scale, Op eta, bool keep) {
  Op e = scale;
  if (kAdaptive) {
    const Op t = op_abs(w) + eta;
    e = e * t * t;
  }
  e = e * g;
  if (kMask != MaskKind::kNone) {
    e = e * static_cast<Op>(keep);
  }
  return w + e;
}

// ---------------------------------------------------------------------------------------------
// SGD (torch.optim.SGD's update, with the gradient unscaled by the loss scale)

template <typename Op>
struct SgdCoefs {
  Op gs, lr, wd, mu, damp;  // damp = 1 - dampening
  bool unscale, maximize, decay, momentum, first_step, nesterov;
};

// `grad_scale` is the value behind args.grad_scale (read by the caller; ignored when null).
// (and lr the learning rate: args.lr, or the value behind args.lr_device).
template <typename Op>
FUSED_SAM_HD SgdCoefs<Op> sgd_coefs(const SgdArgs& a, float grad_scale, double lr) {
  SgdCoefs<Op> k;
  k.unscale = a.grad_scale != nullptr;
  k.gs = k.unscale ? static_cast<Op>(grad_scale) : Op(1);
  k.lr = static_cast<Op>(lr);
  k.wd = static_cast<Op>(a.weight_decay);
  k.mu = static_cast<Op>(a.momentum);
  k.damp = static_cast<Op>(1.0 - a.dampening);
  k.maximize = a.maximize;
  k.decay = a.weight_decay != 0.0;
  k.momentum = a.with_momentum;
  k.first_step = a.first_step;
  k.nesterov = a.nesterov;
  return k;
}

// The new weight from the restored weight w and gradient g; with momentum, `buf` holds the old
// buffer value on entry (unused on the first step) and the new one on return.
template <typename Op>
FUSED_SAM_HD Op sgd_value(const SgdCoefs<Op>& k, Op w, Op g, Op& buf) {
  Op d = g;
  if (k.unscale) {
    d = d / k.gs;
  }
  if (k.maximize) {
    d = -d;
  }
  if (k.decay) {
    d = d + k.wd * w;
  }
  if (k.momentum) {
    const Op v = k.first_step ? d : k.mu * buf + k.damp * d;
    buf = v;
    d = k.nesterov ? d + k.mu * v : v;
  }
  return w - k.lr * d;
}

// ---------------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam's update, amsgrad included)

template <typename Op>
struct AdamCoefs {
  Op gs, beta1, one_minus_beta1, beta2, one_minus_beta2, wd, decay, eps;
  bool unscale, maximize, weight_decay, decoupled, amsgrad;
};

// As sgd_coefs: the values behind args.grad_scale and (or) args.lr_device, read by the caller.
template <typename Op>
FUSED_SAM_HD AdamCoefs<Op> adam_coefs(const AdamArgs& a, float grad_scale, double lr) {
  AdamCoefs<Op> k;
  k.unscale = a.grad_scale != nullptr;
  k.gs = k.unscale ? static_cast<Op>(grad_scale) : Op(1);
  k.beta1 = static_cast<Op>(a.beta1);
  k.one_minus_beta1 = static_cast<Op>(1.0 - a.beta1);
  k.beta2 = static_cast<Op>(a.beta2);
  k.one_minus_beta2 = static_cast<Op>(1.0 - a.beta2);
  k.wd = static_cast<Op>(a.weight_decay);
  k.decay = static_cast<Op>(1.0 - lr * a.weight_decay);
  k.eps = static_cast<Op>(a.eps);
  k.maximize = a.maximize;
  k.weight_decay = a.weight_decay != 0.0;
  k.decoupled = a.decoupled_weight_decay;
  k.amsgrad = a.amsgrad;
  return k;
}

// lr / (1 - beta1^step) and sqrt(1 - beta2^step), in float64, for a counter that reads `step`
// after this step.
struct AdamBias {
  double step_size, bias_c2_sqrt;
};

FUSED_SAM_HD inline AdamBias adam_bias(double lr, double beta1, double beta2, double step) {
  return AdamBias{lr / (1.0 - pow(beta1, step)), sqrt(1.0 - pow(beta2, step))};
}

// The new weight from the restored weight w and gradient g; m, v (and vmax with amsgrad) hold
// the old moments on entry and the new ones on return.
template <typename Op>
FUSED_SAM_HD Op adam_value(const AdamCoefs<Op>& k, Op step_size, Op bc2, Op w, Op g, Op& m, Op& v,
                           Op& vmax) {
  if (k.unscale) {
    g = g / k.gs;
  }
  if (k.maximize) {
    g = -g;
  }
  if (k.weight_decay) {
    if (k.decoupled) {
      w = w * k.decay;
    } else {
      g = g + k.wd * w;
    }
  }
  m = k.beta1 * m + k.one_minus_beta1 * g;
  v = k.beta2 * v + k.one_minus_beta2 * g * g;
  Op second = v;
  if (k.amsgrad) {
    second = vmax > v || vmax != vmax ? vmax : v;  // torch.maximum: NaN wins
    vmax = second;
  }
  const Op denom = op_sqrt(second) / bc2 + k.eps;
  return w - step_size * m / denom;
}

// ---------------------------------------------------------------------------------------------
// axpby: c0 x + c1 y in float64, stored as torch converts

template <typename T>
FUSED_SAM_HD T axpby_value(double c0, double c1, T x, T y) {
  return from_double<T>(c0 * to_double(x) + c1 * to_double(y));
}

}  // namespace fused_sam::cuda_kernels
