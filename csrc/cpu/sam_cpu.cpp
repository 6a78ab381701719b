// CPU ops of fused_sam: argument checks, the chunk plan and the threads. The vector math lives in
// kernels.inc, built once per instruction set (see kernels.h); active_kernels() picks the build.
//
// The tensors of a call are cut into fixed-size chunks (a tensor smaller than a chunk is one
// chunk), and the flat chunk list is split between threads with at::parallel_for. A thousand
// small tensors therefore cost one parallel region, not a thousand, and one huge tensor is shared
// by all threads.
//
// Norm and dot partial sums are float64 (squares and products included, whatever the storage
// type), accumulated per chunk and then added in chunk order, so the result does not depend on
// the number of threads. Copies (backup, restore) are byte copies and therefore exact for every
// value, NaN payloads included.

#include "sam_ops.h"

#include "cpu/kernels.h"
#include "op_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#define FUSED_SAM_STREAM_STORES 1
#endif

namespace fused_sam::cpu {

// ---------------------------------------------------------------------------------------------
// Streaming stores
//
// Outputs that are written without being read (the backup in perturb, the weights in restore)
// are stored around the cache where the target is 16-byte aligned: a normal store first reads the
// line it overwrites, which would add 4 B/param of traffic to each of these streams. The copies
// stay byte-exact. stream_fence() orders them before the end of a parallel task.

void stream_copy(void* dst, const void* src, int64_t bytes) {
  const auto size = static_cast<size_t>(bytes);
#ifdef FUSED_SAM_STREAM_STORES
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    const size_t body = size & ~size_t{15};
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    for (size_t k = 0; k < body; k += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + k),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
    }
    if (body != size) {
      std::memcpy(d + body, s + body, size - body);
    }
    return;
  }
#endif
  std::memcpy(dst, src, size);
}

void stream_fence() {
#ifdef FUSED_SAM_STREAM_STORES
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------------------------
// Choice of the kernel build

namespace {

bool cpu_has_avx2() {
#if defined(FUSED_SAM_CPU_AVX2) && (defined(__GNUC__) || defined(__clang__))
  // Also checks that the OS saves the AVX registers.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const KernelTable* default_kernels() {
  // ATEN_CPU_CAPABILITY=default turns off torch's own vector kernels; honour it for ours too.
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  const bool portable = env != nullptr && std::string(env) == "default";
#ifdef FUSED_SAM_CPU_AVX2
  if (!portable && cpu_has_avx2()) {
    return &AVX2::kernel_table();
  }
#endif
  (void)portable;
  return &DEFAULT::kernel_table();
}

std::atomic<const KernelTable*> g_kernels{nullptr};

const KernelTable& active_kernels() {
  const KernelTable* k = g_kernels.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = default_kernels();
    g_kernels.store(k, std::memory_order_release);
  }
  return *k;
}

template <typename T>
const Kernels<T>& kernels_for(const KernelTable& table) {
  if constexpr (std::is_same_v<T, float>) {
    return table.f32;
  } else if constexpr (std::is_same_v<T, double>) {
    return table.f64;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return table.f16;
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "no CPU kernels for this dtype");
    return table.bf16;
  }
}

// Elements per chunk: 64 KiB of float32 per stream, so the few streams an op touches stay in L2
// while a chunk is processed.
constexpr int64_t kChunk = 1 << 14;
// Minimum elements per parallel task: below this, waking another thread costs more than it saves.
constexpr int64_t kTaskElems = 1 << 15;

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
// Argument checks (shared ones in op_checks.h)

// The parameters of a CPU op (the dispatcher, and the direct calls, send CPU tensors only; a
// direct torch.ops call with mixed devices is refused here).
void check_cpu_params(at::TensorList params) {
  check_params(params);
  TORCH_CHECK(params[0].device().is_cpu(), "fused_sam: tensors are on ", params[0].device(),
              ", expected cpu");
}

template <typename T>
std::vector<T*> ptrs(at::TensorList ts) {
  std::vector<T*> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    out[i] = static_cast<T*>(ts[i].data_ptr());
  }
  return out;
}

// The squared norm: the fixed-order float64 sum of a 1-D cpu tensor of norm partials.
double total_of(const at::Tensor& sumsq, const char* name) {
  TORCH_CHECK(sumsq.device().is_cpu() && sumsq.dim() == 1, "fused_sam: ", name,
              " must be a 1-D cpu tensor");
  const at::Tensor s = sumsq.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  double total = 0.0;
  for (int64_t k = 0; k < s.numel(); ++k) {
    total += sp[k];
  }
  return total;
}

// Whether a base step is skipped: found_inf is nonzero, or the norm of a checked pass is not
// finite (fused_sam.reference.skipped).
bool skipped(const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs) {
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    return true;
  }
  for (const at::Tensor& s : sumsqs) {
    if (!std::isfinite(total_of(s, "sumsqs"))) {
      return true;
    }
  }
  return false;
}

// The 0-dim bool skip flag the restore ops return.
at::Tensor flag(bool skip) {
  at::Tensor out = at::empty({}, at::TensorOptions(at::kBool));
  *out.data_ptr<bool>() = skip;
  return out;
}

void copy_chunk(void* dst, const void* src, const Chunk& c, int64_t elem_size) {
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
  const int64_t elem = params.empty() ? 0 : params[0].element_size();
  for_each_chunk(plan, [&](int64_t, const Chunk& c) {
    copy_chunk(w[c.tensor], b[c.tensor], c, elem);
  });
}

}  // namespace

std::vector<std::string> kernel_builds() {
  std::vector<std::string> out{DEFAULT::kernel_table().name};
#ifdef FUSED_SAM_CPU_AVX2
  if (cpu_has_avx2()) {
    out.emplace_back(AVX2::kernel_table().name);
  }
#endif
  return out;
}

std::string kernels_in_use() { return active_kernels().name; }

int64_t parallel_threads() {
  // The same parallel loop as the ops, over more tasks than threads.
  const int64_t tasks = 8 * static_cast<int64_t>(at::get_num_threads());
  std::vector<std::atomic<bool>> seen(static_cast<size_t>(at::get_num_threads()));
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    if (tid >= 0 && static_cast<size_t>(tid) < seen.size()) {
      seen[static_cast<size_t>(tid)].store(true);
    }
  });
  return std::count_if(seen.begin(), seen.end(), [](const auto& s) { return s.load(); });
}

void use_kernels(const std::string& name) {
  const KernelTable* chosen = nullptr;
  if (name == "auto") {
    chosen = default_kernels();
  } else if (name == DEFAULT::kernel_table().name) {
    chosen = &DEFAULT::kernel_table();
  }
#ifdef FUSED_SAM_CPU_AVX2
  if (name == AVX2::kernel_table().name && cpu_has_avx2()) {
    chosen = &AVX2::kernel_table();
  }
#endif
  TORCH_CHECK(chosen != nullptr, "fused_sam: no CPU kernel build named '", name,
              "' runs here; available: auto, ", c10::Join(", ", kernel_builds()));
  g_kernels.store(chosen, std::memory_order_release);
}

// ---------------------------------------------------------------------------------------------
// Ops

at::Tensor norm_sq_partials(at::TensorList grads, at::TensorList params, bool adaptive,
                            double eta) {
  TORCH_CHECK(params.size() == grads.size(), "fused_sam: params has ", params.size(),
              " tensors, expected ", grads.size());
  if (grads.empty()) {
    return at::zeros({1}, at::TensorOptions().dtype(at::kDouble));
  }
  check_cpu_params(grads);
  check_list(params, grads, "params");
  at::Tensor out = at::empty({1}, at::TensorOptions().dtype(at::kDouble));
  const Plan plan = make_plan(grads);
  // One partial per chunk, then a sequential sum: the result is independent of the threads.
  std::vector<double> partial(plan.chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fused_sam_norm_sq_partials", [&] {
        const auto sumsq = kernels_for<scalar_t>(active_kernels()).sumsq;
        const auto g = ptrs<const scalar_t>(grads);
        const auto w = ptrs<const scalar_t>(params);
        for_each_chunk(plan, [&](int64_t idx, const Chunk& c) {
          partial[idx] = sumsq(g[c.tensor], w[c.tensor], c.begin, c.end, adaptive, eta);
        });
      });
  double total = 0.0;
  for (const double p : partial) {
    total += p;
  }
  out.data_ptr<double>()[0] = total;
  return out;
}

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups,
              const at::Tensor& sumsq, double rho, double eps, bool adaptive, double eta,
              at::TensorList masks, c10::IntArrayRef salts, int64_t step_key,
              int64_t threshold) {
  check_cpu_params(params);
  check_list(grads, params, "grads");
  check_list(backups, params, "backups");
  check_masks(masks, params);
  check_random(salts, step_key, threshold, masks, params);
  const double norm = std::sqrt(total_of(sumsq, "sumsq"));
  const bool finite = std::isfinite(norm);
  const double scale = finite ? rho / (norm + eps) : 0.0;
  bump_versions({params, backups});

  if (!finite) {
    // Skipped perturbation: the backup is still written, the weights are not touched.
    restore_all(backups, params);
    return;
  }
  const Plan plan = make_plan(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_sam_perturb_", [&] {
        const auto perturb = kernels_for<scalar_t>(active_kernels()).perturb;
        const auto w = ptrs<scalar_t>(params);
        const auto g = ptrs<const scalar_t>(grads);
        const auto b = ptrs<scalar_t>(backups);
        const auto m = ptrs<const uint8_t>(masks);
        for_each_chunk(plan, [&](int64_t, const Chunk& c) {
          MaskRef mask;
          if (!m.empty()) {
            mask.bits = m[c.tensor];
          } else if (!salts.empty()) {
            mask.key = static_cast<uint32_t>(salts[c.tensor] ^ step_key);
            mask.threshold = static_cast<uint32_t>(threshold);
          }
          perturb(w[c.tensor], g[c.tensor], b[c.tensor], mask, c.begin, c.end, scale, adaptive,
                  eta);
        });
      });
}

void restore_(at::TensorList params, at::TensorList backups) {
  check_cpu_params(params);
  check_list(backups, params, "backups");
  bump_versions({params});
  restore_all(params, backups);
}

at::Tensor restore_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       at::TensorList momentum_buffers, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize,
                       bool first_step, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs) {
  check_cpu_params(params);
  check_list(grads, params, "grads");
  check_list(backups, params, "backups");
  const bool with_momentum = momentum != 0.0;
  if (with_momentum) {
    check_list(momentum_buffers, params, "momentum_buffers");
  }
  bump_versions({params, with_momentum ? momentum_buffers : at::TensorList()});
  if (skipped(found_inf, sumsqs)) {
    restore_all(params, backups);
    return flag(true);
  }
  const SgdArgs args{lr,         weight_decay,           momentum, dampening, nesterov, maximize,
                     first_step, grad_scale.has_value(),
                     grad_scale.has_value() ? grad_scale->item<double>() : 1.0};
  const Plan plan = make_plan(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_sam_restore_sgd_step_", [&] {
        const auto sgd = kernels_for<scalar_t>(active_kernels()).sgd;
        const auto w = ptrs<scalar_t>(params);
        const auto g = ptrs<const scalar_t>(grads);
        const auto b = ptrs<const scalar_t>(backups);
        const auto buf = ptrs<scalar_t>(with_momentum ? momentum_buffers : at::TensorList());
        for_each_chunk(plan, [&](int64_t, const Chunk& c) {
          sgd(w[c.tensor], g[c.tensor], b[c.tensor], with_momentum ? buf[c.tensor] : nullptr,
              c.begin, c.end, args);
        });
      });
  return flag(false);
}

at::Tensor restore_adam_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                        bool maximize, bool decoupled_weight_decay,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs) {
  check_cpu_params(params);
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
  bump_versions({params, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(),
                 state_steps});
  if (skipped(found_inf, sumsqs)) {
    restore_all(params, backups);
    return flag(true);
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
  const AdamArgs args{lr,       beta1,    beta2,   eps, weight_decay, amsgrad,
                      maximize, decoupled_weight_decay, grad_scale.has_value(),
                      grad_scale.has_value() ? grad_scale->item<double>() : 1.0};
  const Plan plan = make_plan(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_sam_restore_adam_step_", [&] {
        const auto adam = kernels_for<scalar_t>(active_kernels()).adam;
        const auto w = ptrs<scalar_t>(params);
        const auto g = ptrs<const scalar_t>(grads);
        const auto b = ptrs<const scalar_t>(backups);
        const auto m = ptrs<scalar_t>(exp_avgs);
        const auto v = ptrs<scalar_t>(exp_avg_sqs);
        const auto vmax = ptrs<scalar_t>(amsgrad ? max_exp_avg_sqs : at::TensorList());
        for_each_chunk(plan, [&](int64_t, const Chunk& c) {
          const int64_t t = c.tensor;
          adam(w[t], g[t], b[t], m[t], v[t], amsgrad ? vmax[t] : nullptr, c.begin, c.end, args,
               step_size[t], bias_c2_sqrt[t]);
        });
      });
  return flag(false);
}

at::Tensor dot_partials(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), "fused_sam: b has ", b.size(), " tensors, expected ", a.size());
  if (a.empty()) {
    return at::zeros({1}, at::TensorOptions().dtype(at::kDouble));
  }
  check_cpu_params(a);
  check_list(b, a, "b");
  at::Tensor out = at::empty({1}, at::TensorOptions().dtype(at::kDouble));
  const Plan plan = make_plan(a);
  // As in norm_sq_partials: one partial per chunk, then a sequential sum.
  std::vector<double> partial(plan.chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a[0].scalar_type(), "fused_sam_dot_partials", [&] {
        const auto dot = kernels_for<scalar_t>(active_kernels()).dot;
        const auto x = ptrs<const scalar_t>(a);
        const auto y = ptrs<const scalar_t>(b);
        for_each_chunk(plan, [&](int64_t idx, const Chunk& c) {
          partial[idx] = dot(x[c.tensor], y[c.tensor], c.begin, c.end);
        });
      });
  double total = 0.0;
  for (const double p : partial) {
    total += p;
  }
  out.data_ptr<double>()[0] = total;
  return out;
}

void axpby_(at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coefs,
            const std::optional<at::Tensor>& skip) {
  check_cpu_params(out);
  check_list(x, out, "x");
  check_list(y, out, "y");
  check_axpby_scalars(coefs, skip, out[0].device());
  bump_versions({out});
  if (skipped(skip, {})) {
    return;
  }
  const double* c = coefs.const_data_ptr<double>();
  const double a = c[0];
  const double b = c[coefs.stride(0)];
  const Plan plan = make_plan(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out[0].scalar_type(), "fused_sam_axpby_", [&] {
        const auto axpby = kernels_for<scalar_t>(active_kernels()).axpby;
        const auto o = ptrs<scalar_t>(out);
        const auto u = ptrs<const scalar_t>(x);
        const auto v = ptrs<const scalar_t>(y);
        for_each_chunk(plan, [&](int64_t, const Chunk& ch) {
          axpby(o[ch.tensor], u[ch.tensor], v[ch.tensor], ch.begin, ch.end, a, b);
        });
      });
}

}  // namespace fused_sam::cpu
