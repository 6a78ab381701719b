// Declarations of the per-device implementations of the fused_sam ops.
//
// bindings.cpp defines the op schemas (TORCH_LIBRARY(fused_sam, ...)) and registers these
// functions as their CPU and CUDA kernels; nothing else registers ops. The math and the exact
// semantics of every op are those of fused_sam/reference.py, which is the test oracle.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>
#include <vector>

namespace fused_sam {

// Length of the outputs of the CUDA norm and dot ops: one float64 total, which the last block
// of the kernel adds up from the per-block partials in a fixed order (as the CPU ops and the
// reference return one). A constant, so the output shape is known without running the kernel
// (fake tensors, torch.compile).
constexpr int64_t kCudaNormPartials = 1;

namespace cpu {

// Builds of the CPU kernels this machine can run, portable first ("DEFAULT", then "AVX2" where
// it was compiled in and the CPU has AVX2, FMA and F16C).
std::vector<std::string> kernel_builds();
// The build the CPU ops use: the fastest one, or "DEFAULT" when ATEN_CPU_CAPABILITY=default.
std::string kernels_in_use();
// Switches every later CPU op to the named build ("auto" restores the default choice).
void use_kernels(const std::string& name);
// Threads that one parallel loop of the CPU ops runs on (1 when the build cannot run them in
// parallel, e.g. compiled without OpenMP while torch uses it).
int64_t parallel_threads();

at::Tensor norm_sq_partials(at::TensorList grads, at::TensorList params, bool adaptive, double eta);

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups,
              const at::Tensor& sumsq, double rho, double eps, bool adaptive, double eta,
              at::TensorList masks, c10::IntArrayRef salts, int64_t step_key, int64_t threshold);

void restore_(at::TensorList params, at::TensorList backups);

at::Tensor restore_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       at::TensorList momentum_buffers, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize,
                       bool first_step, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs);

at::Tensor restore_adam_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                        bool maximize, bool decoupled_weight_decay,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs);

at::Tensor dot_partials(at::TensorList a, at::TensorList b);

void axpby_(at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coefs,
            const std::optional<at::Tensor>& skip);

}  // namespace cpu

#ifdef FUSED_SAM_WITH_CUDA
namespace cuda {

at::Tensor norm_sq_partials(at::TensorList grads, at::TensorList params, bool adaptive, double eta);

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups,
              const at::Tensor& sumsq, double rho, double eps, bool adaptive, double eta,
              at::TensorList masks, c10::IntArrayRef salts, int64_t step_key, int64_t threshold);

void restore_(at::TensorList params, at::TensorList backups);

at::Tensor restore_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       at::TensorList momentum_buffers, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize,
                       bool first_step, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs);

at::Tensor restore_adam_step_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                        bool maximize, bool decoupled_weight_decay,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, at::TensorList sumsqs);

at::Tensor dot_partials(at::TensorList a, at::TensorList b);

void axpby_(at::TensorList out, at::TensorList x, at::TensorList y, const at::Tensor& coefs,
            const std::optional<at::Tensor>& skip);

// The ops above with rho / lr as a one-element CUDA tensor that the kernels read when they run
// (no host read, and a CUDA graph replay reads the value of the moment). Not ops: called by
// fused_sam._C (bindings.cpp) for fused_sam/backends/native.py.
void perturb_tensor_rho_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                         const at::Tensor& sumsq, const at::Tensor& rho, double eps,
                         bool adaptive, double eta, at::TensorList masks, c10::IntArrayRef salts,
                         int64_t step_key, int64_t threshold);

at::Tensor restore_sgd_step_tensor_lr_(at::TensorList params, at::TensorList grads,
                                       at::TensorList backups, at::TensorList momentum_buffers,
                                       const at::Tensor& lr, double weight_decay, double momentum,
                                       double dampening, bool nesterov, bool maximize,
                                       bool first_step,
                                       const std::optional<at::Tensor>& grad_scale,
                                       const std::optional<at::Tensor>& found_inf,
                                       at::TensorList sumsqs);

at::Tensor restore_adam_step_tensor_lr_(
    at::TensorList params, at::TensorList grads, at::TensorList backups, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
    const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
    bool amsgrad, bool maximize, bool decoupled_weight_decay,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    at::TensorList sumsqs);

}  // namespace cuda
#endif  // FUSED_SAM_WITH_CUDA

}  // namespace fused_sam
