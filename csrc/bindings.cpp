// The fused_sam op library: schemas, per-device kernels, and the Python module fused_sam._C.
//
// This is the only file that registers ops. The schemas carry exact mutation annotations
// (Tensor(a!)[] for every list an op writes) so that torch.compile, functionalization and
// torch.library.opcheck see the true side effects. The fake (meta) implementations live in
// Python, in fused_sam/backends/native.py, which set_python_module points torch to.
//
// Semantics of every op: fused_sam/reference.py (same names, same arguments).

#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "sam_ops.h"

TORCH_LIBRARY(fused_sam, m) {
  m.set_python_module("fused_sam.backends.native");
  m.def("norm_sq_partials(Tensor[] grads, Tensor[] params, bool adaptive, float eta) -> Tensor");
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sumsq, "
      "float rho, float eps, bool adaptive, float eta, Tensor[] masks) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def(
      "restore_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, "
      "Tensor(b!)[] momentum_buffers, *, float lr, float weight_decay, float momentum, "
      "float dampening, bool nesterov, bool maximize, bool first_step, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");
  m.def(
      "restore_adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
      "Tensor(e!)[] state_steps, *, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
}

TORCH_LIBRARY_IMPL(fused_sam, CPU, m) {
  m.impl("norm_sq_partials", &fused_sam::cpu::norm_sq_partials);
  m.impl("perturb_", &fused_sam::cpu::perturb_);
  m.impl("restore_", &fused_sam::cpu::restore_);
  m.impl("restore_sgd_step_", &fused_sam::cpu::restore_sgd_step_);
  m.impl("restore_adam_step_", &fused_sam::cpu::restore_adam_step_);
}

#ifdef FUSED_SAM_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_sam, CUDA, m) {
  m.impl("norm_sq_partials", &fused_sam::cuda::norm_sq_partials);
  m.impl("perturb_", &fused_sam::cuda::perturb_);
  m.impl("restore_", &fused_sam::cuda::restore_);
  m.impl("restore_sgd_step_", &fused_sam::cuda::restore_sgd_step_);
  m.impl("restore_adam_step_", &fused_sam::cuda::restore_adam_step_);
}
#endif

// Build facts for `fused-sam info` and for the backend's availability checks.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_sam native kernels; the ops are torch.ops.fused_sam.*";
#ifdef FUSED_SAM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_norm_partials") = fused_sam::kCudaNormPartials;
}
