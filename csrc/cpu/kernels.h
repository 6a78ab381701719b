// Per-chunk CPU kernels, compiled once per instruction set.
//
// kernels.inc holds the vector kernels of the CPU ops (one chunk of one tensor each, raw
// pointers, no tensors). It is compiled twice: kernels_default.cpp builds it for any CPU of the
// architecture, kernels_avx2.cpp with AVX2/FMA/F16C code generation (x86-64 only). Each build
// lives in its own namespace, named by CPU_CAPABILITY like ATen's own vector code, and exports one
// table of function pointers; sam_cpu.cpp picks a table at run time (see active_kernels) and owns
// the argument checks, the chunk plan and the threads.
//
// This header includes no tensor headers on purpose: the AVX2 object must share as little inline
// code with the rest of the extension as possible (see setup.py on link order).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fused_sam::cpu {

// The mask of one tensor's perturbation: bit-packed (bits), a random draw (threshold > 0: keep
// element j iff element_hash(key, j) < threshold, see fused_sam.masks), or none.
struct MaskRef {
  const uint8_t* bits = nullptr;
  uint32_t key = 0;
  uint32_t threshold = 0;
};

// Hyperparameters of restore_sgd_step_, already resolved to plain numbers.
struct SgdArgs {
  double lr, weight_decay, momentum, dampening;
  bool nesterov, maximize, first_step;
  bool has_grad_scale;
  double grad_scale;
};

// Hyperparameters of restore_adam_step_, already resolved to plain numbers.
struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled_weight_decay;
  bool has_grad_scale;
  double grad_scale;
};

// The kernels of one storage type T. Every function works on the elements [begin, end) of one
// tensor; pointers are the tensor's base addresses.
template <typename T>
struct Kernels {
  // Sum of (T(w) g)^2 over the range, T(w) = |w| + eta when adaptive, 1 otherwise.
  double (*sumsq)(const T* g, const T* w, int64_t begin, int64_t end, bool adaptive, double eta);
  // b = w, then w = w + scale * T(w)^2 * g (* mask bit).
  void (*perturb)(T* w, const T* g, T* b, MaskRef mask, int64_t begin, int64_t end,
                  double scale, bool adaptive, double eta);
  // w = b, then one SGD step; buf is null without momentum.
  void (*sgd)(T* w, const T* g, const T* b, T* buf, int64_t begin, int64_t end,
              const SgdArgs& a);
  // w = b, then one Adam/AdamW step with this tensor's bias corrections; vmax null unless amsgrad.
  void (*adam)(T* w, const T* g, const T* b, T* m, T* v, T* vmax, int64_t begin, int64_t end,
               const AdamArgs& a, double step_size, double bias_c2_sqrt);
  // Sum of x y over the range, products and sums in float64.
  double (*dot)(const T* x, const T* y, int64_t begin, int64_t end);
  // out = a x + b y in float64, converted to T as torch converts; out may be x or y.
  void (*axpby)(T* out, const T* x, const T* y, int64_t begin, int64_t end, double a, double b);
};

struct KernelTable {
  const char* name;
  Kernels<float> f32;
  Kernels<double> f64;
  Kernels<c10::Half> f16;
  Kernels<c10::BFloat16> bf16;
};

// One table per build of kernels.inc.
namespace DEFAULT {
const KernelTable& kernel_table();
}
#ifdef FUSED_SAM_CPU_AVX2
namespace AVX2 {
const KernelTable& kernel_table();
}
#endif

// Streaming (cache-bypassing) copy of bytes, exact for every value; see kernels.inc.
void stream_copy(void* dst, const void* src, int64_t bytes);
// Orders the streaming stores of this thread before the end of a parallel task.
void stream_fence();

}  // namespace fused_sam::cpu
