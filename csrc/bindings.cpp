// The fused_sam op library: schemas, per-device kernels, and the Python module fused_sam._C.
//
// This is the only file that registers ops. The schemas carry exact mutation annotations
// (Tensor(a!)[] for every list an op writes) so that torch.compile, functionalization and
// torch.library.opcheck see the true side effects. The fake (meta) implementations live in
// Python, in fused_sam/backends/native.py, which set_python_module points torch to.
//
// Semantics of every op: fused_sam/reference.py (same names, same arguments).

#include <ATen/FunctionalTensorWrapper.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "sam_ops.h"

TORCH_LIBRARY(fused_sam, m) {
  m.set_python_module("fused_sam.backends.native");
  m.def("norm_sq_partials(Tensor[] grads, Tensor[] params, bool adaptive, float eta) -> Tensor");
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sumsq, "
      "float rho, float eps, bool adaptive, float eta, Tensor[] masks, int[] salts=[], "
      "int step_key=0, int threshold=0) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def(
      "restore_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, "
      "Tensor(b!)[] momentum_buffers, *, float lr, float weight_decay, float momentum, "
      "float dampening, bool nesterov, bool maximize, bool first_step, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor[] sumsqs) -> Tensor");
  m.def(
      "restore_adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
      "Tensor(e!)[] state_steps, *, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor[] sumsqs) -> Tensor");
  // The two ops of the SAM variants (fused_sam/variants): float64 dot products and
  // out = a x + b y with (a, b) read from a device tensor.
  m.def("dot_partials(Tensor[] a, Tensor[] b) -> Tensor");
  m.def("axpby_(Tensor(a!)[] out, Tensor[] x, Tensor[] y, Tensor coefs, Tensor? skip) -> ()");
}

TORCH_LIBRARY_IMPL(fused_sam, CPU, m) {
  m.impl("norm_sq_partials", &fused_sam::cpu::norm_sq_partials);
  m.impl("perturb_", &fused_sam::cpu::perturb_);
  m.impl("restore_", &fused_sam::cpu::restore_);
  m.impl("restore_sgd_step_", &fused_sam::cpu::restore_sgd_step_);
  m.impl("restore_adam_step_", &fused_sam::cpu::restore_adam_step_);
  m.impl("dot_partials", &fused_sam::cpu::dot_partials);
  m.impl("axpby_", &fused_sam::cpu::axpby_);
}

#ifdef FUSED_SAM_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_sam, CUDA, m) {
  m.impl("norm_sq_partials", &fused_sam::cuda::norm_sq_partials);
  m.impl("perturb_", &fused_sam::cuda::perturb_);
  m.impl("restore_", &fused_sam::cuda::restore_);
  m.impl("restore_sgd_step_", &fused_sam::cuda::restore_sgd_step_);
  m.impl("restore_adam_step_", &fused_sam::cuda::restore_adam_step_);
  m.impl("dot_partials", &fused_sam::cuda::dot_partials);
  m.impl("axpby_", &fused_sam::cuda::axpby_);
}
#endif

// ---------------------------------------------------------------------------------------------
// Direct entry points for eager CPU calls.
//
// A call through torch.ops boxes every tensor of every list into the dispatcher's argument
// stack; for a thousand-tensor list that is a few tenths of a millisecond per op, more than the
// kernels themselves take on small tensors. fused_sam/backends/native.py therefore calls these
// functions when nothing needs the dispatcher: no grad mode, no torch.compile, no dispatch mode
// (fake tensors, profilers' modes) and, checked here, only plain CPU tensors. They return
// false (norm, dot and the restore steps: None) without doing anything otherwise, and the caller takes the
// registered op.
// The ops themselves bump the version counter of every tensor they write (sam_cpu.cpp).

namespace {

using Tensors = std::vector<at::Tensor>;

bool plain_cpu(const at::Tensor& t) {
  return t.defined() && t.is_cpu() && !t.unsafeGetTensorImpl()->is_python_dispatch() &&
         !at::functionalization::impl::isFunctionalTensor(t);
}

bool plain_cpu(std::initializer_list<const Tensors*> lists,
               std::initializer_list<const std::optional<at::Tensor>*> optionals = {}) {
  for (const Tensors* list : lists) {
    for (const at::Tensor& t : *list) {
      if (!plain_cpu(t)) {
        return false;
      }
    }
  }
  for (const std::optional<at::Tensor>* t : optionals) {
    if (t->has_value() && !plain_cpu(**t)) {
      return false;
    }
  }
  return true;
}

std::optional<at::Tensor> direct_norm_sq_partials(const Tensors& grads, const Tensors& params,
                                                  bool adaptive, double eta) {
  if (!plain_cpu({&grads, &params})) {
    return std::nullopt;
  }
  return fused_sam::cpu::norm_sq_partials(grads, params, adaptive, eta);
}

bool direct_perturb(const Tensors& params, const Tensors& grads, const Tensors& backups,
                    const at::Tensor& sumsq, double rho, double eps, bool adaptive, double eta,
                    const Tensors& masks, const std::vector<int64_t>& salts, int64_t step_key,
                    int64_t threshold) {
  if (!plain_cpu(sumsq) || !plain_cpu({&params, &grads, &backups, &masks})) {
    return false;
  }
  fused_sam::cpu::perturb_(params, grads, backups, sumsq, rho, eps, adaptive, eta, masks, salts,
                           step_key, threshold);
  return true;
}

bool direct_restore(const Tensors& params, const Tensors& backups) {
  if (!plain_cpu({&params, &backups})) {
    return false;
  }
  fused_sam::cpu::restore_(params, backups);
  return true;
}

std::optional<at::Tensor> direct_restore_sgd_step(const Tensors& params, const Tensors& grads, const Tensors& backups,
                             const Tensors& momentum_buffers, double lr, double weight_decay,
                             double momentum, double dampening, bool nesterov, bool maximize,
                             bool first_step, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, const Tensors& sumsqs) {
  if (!plain_cpu({&params, &grads, &backups, &momentum_buffers, &sumsqs},
                 {&grad_scale, &found_inf})) {
    return std::nullopt;
  }
  return fused_sam::cpu::restore_sgd_step_(params, grads, backups, momentum_buffers, lr,
                                           weight_decay, momentum, dampening, nesterov, maximize,
                                           first_step, grad_scale, found_inf, sumsqs);
}

std::optional<at::Tensor> direct_restore_adam_step(const Tensors& params, const Tensors& grads, const Tensors& backups,
                              const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
                              const Tensors& max_exp_avg_sqs, const Tensors& state_steps,
                              double lr, double beta1, double beta2, double eps,
                              double weight_decay, bool amsgrad, bool maximize,
                              bool decoupled_weight_decay,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              const Tensors& sumsqs) {
  if (!plain_cpu({&params, &grads, &backups, &exp_avgs, &exp_avg_sqs, &max_exp_avg_sqs,
                  &state_steps, &sumsqs},
                 {&grad_scale, &found_inf})) {
    return std::nullopt;
  }
  return fused_sam::cpu::restore_adam_step_(params, grads, backups, exp_avgs, exp_avg_sqs,
                                            max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                                            weight_decay, amsgrad, maximize,
                                            decoupled_weight_decay, grad_scale, found_inf, sumsqs);
}

std::optional<at::Tensor> direct_dot_partials(const Tensors& a, const Tensors& b) {
  if (!plain_cpu({&a, &b})) {
    return std::nullopt;
  }
  return fused_sam::cpu::dot_partials(a, b);
}

bool direct_axpby(const Tensors& out, const Tensors& x, const Tensors& y, const at::Tensor& coefs,
                  const std::optional<at::Tensor>& skip) {
  if (!plain_cpu(coefs) || !plain_cpu({&out, &x, &y}, {&skip})) {
    return false;
  }
  fused_sam::cpu::axpby_(out, x, y, coefs, skip);
  return true;
}

// Everything the step plan of FusedSAM depends on, for every tensor: storage address, dtype,
// device, sizes and strides, as raw bytes (compared for equality, never interpreted), plus
// whether all tensors are contiguous. One pass in C++ instead of one Python pass per attribute.
pybind11::tuple layout_key(const Tensors& tensors) {
  std::vector<int64_t> key;
  key.reserve(tensors.size() * 8);
  bool contiguous = true;
  for (const at::Tensor& t : tensors) {
    if (t.layout() != at::kStrided) {  // sparse: no strides; no plan either (see optimizer.py)
      return pybind11::make_tuple(pybind11::none(), false);
    }
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    key.push_back(impl->has_storage() && impl->storage().data() != nullptr
                      ? reinterpret_cast<int64_t>(t.data_ptr())
                      : 0);
    key.push_back(static_cast<int64_t>(t.scalar_type()));
    key.push_back(static_cast<int64_t>(t.device().type()));
    key.push_back(t.device().index());
    key.push_back(t.dim());
    for (const int64_t v : t.sizes()) {
      key.push_back(v);
    }
    for (const int64_t v : t.strides()) {
      key.push_back(v);
    }
    contiguous = contiguous && t.is_contiguous();
  }
  return pybind11::make_tuple(
      pybind11::bytes(reinterpret_cast<const char*>(key.data()), key.size() * sizeof(int64_t)),
      contiguous);
}

// The parameters of a list that have a gradient, and those gradients, in one pass: reading
// `p.grad` from Python costs a property call per tensor. Also reports whether every gradient is
// contiguous and whether one is sparse. Returns None for a tensor subclass with its own dispatch
// (its `grad` may not be the C++ one); the caller then reads `p.grad` in Python.
pybind11::object collect_grads(const pybind11::list& params) {
  pybind11::list with_grad;
  pybind11::list grads;
  bool contiguous = true;
  bool sparse = false;
  for (const pybind11::handle obj : params) {
    if (!THPVariable_Check(obj.ptr())) {
      throw pybind11::type_error("fused_sam: params must be tensors");
    }
    const at::Tensor& p = THPVariable_Unpack(obj.ptr());
    if (p.unsafeGetTensorImpl()->is_python_dispatch()) {
      return pybind11::none();
    }
    const at::Tensor& g = p.grad();
    if (!g.defined()) {
      continue;
    }
    with_grad.append(obj);
    grads.append(pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(g)));
    if (g.layout() != at::kStrided) {
      sparse = true;
    } else {
      contiguous = contiguous && g.is_contiguous();
    }
  }
  return pybind11::make_tuple(with_grad, grads, contiguous, sparse);
}

#ifdef FUSED_SAM_WITH_CUDA
// The CUDA ops with rho / lr as a one-element device tensor (sam_ops.h), for a step with no host
// read that a CUDA graph can capture; fused_sam/backends/native.py calls them.
void cuda_perturb_tensor_rho(const Tensors& params, const Tensors& grads, const Tensors& backups,
                             const at::Tensor& sumsq, const at::Tensor& rho, double eps,
                             bool adaptive, double eta, const Tensors& masks,
                             const std::vector<int64_t>& salts, int64_t step_key,
                             int64_t threshold) {
  fused_sam::cuda::perturb_tensor_rho_(params, grads, backups, sumsq, rho, eps, adaptive, eta,
                                       masks, salts, step_key, threshold);
}

at::Tensor cuda_restore_sgd_step_tensor_lr(
    const Tensors& params, const Tensors& grads, const Tensors& backups,
    const Tensors& momentum_buffers, const at::Tensor& lr, double weight_decay, double momentum,
    double dampening, bool nesterov, bool maximize, bool first_step,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    const Tensors& sumsqs) {
  return fused_sam::cuda::restore_sgd_step_tensor_lr_(
      params, grads, backups, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov,
      maximize, first_step, grad_scale, found_inf, sumsqs);
}

at::Tensor cuda_restore_adam_step_tensor_lr(
    const Tensors& params, const Tensors& grads, const Tensors& backups, const Tensors& exp_avgs,
    const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs, const Tensors& state_steps,
    const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
    bool amsgrad, bool maximize, bool decoupled_weight_decay,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    const Tensors& sumsqs) {
  return fused_sam::cuda::restore_adam_step_tensor_lr_(
      params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
      beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf,
      sumsqs);
}
#endif  // FUSED_SAM_WITH_CUDA

}  // namespace

// The Python module: build facts for `fused-sam info` and the backend's availability checks,
// the CPU kernel-build switch, and the helpers above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_sam native kernels; the ops are torch.ops.fused_sam.*";
#ifdef FUSED_SAM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_norm_partials") = fused_sam::kCudaNormPartials;
  namespace py = pybind11;
  m.def("direct_norm_sq_partials", &direct_norm_sq_partials);
  m.def("direct_perturb_", &direct_perturb, py::arg("params"), py::arg("grads"),
        py::arg("backups"), py::arg("sumsq"), py::arg("rho"), py::arg("eps"), py::arg("adaptive"),
        py::arg("eta"), py::arg("masks"), py::arg("salts") = std::vector<int64_t>(),
        py::arg("step_key") = 0, py::arg("threshold") = 0);
  m.def("direct_restore_", &direct_restore);
  m.def("direct_restore_sgd_step_", &direct_restore_sgd_step, py::arg("params"),
        py::arg("grads"), py::arg("backups"), py::arg("momentum_buffers"), py::kw_only(),
        py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"),
        py::arg("nesterov"), py::arg("maximize"), py::arg("first_step"), py::arg("grad_scale"),
        py::arg("found_inf"), py::arg("sumsqs") = Tensors());
  m.def("direct_restore_adam_step_", &direct_restore_adam_step, py::arg("params"),
        py::arg("grads"), py::arg("backups"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("state_steps"), py::kw_only(), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled_weight_decay"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("sumsqs") = Tensors());
  m.def("direct_dot_partials", &direct_dot_partials, py::arg("a"), py::arg("b"));
  m.def("direct_axpby_", &direct_axpby, py::arg("out"), py::arg("x"), py::arg("y"),
        py::arg("coefs"), py::arg("skip"));
  m.def("collect_grads", &collect_grads, py::arg("params"),
        "(params with a grad, their grads, all grads contiguous, any grad sparse) or None");
  m.def("layout_key", &layout_key, py::arg("tensors"),
        "(bytes of every tensor's address, dtype, device, sizes and strides; all contiguous)");
  m.def("cpu_kernel_builds", &fused_sam::cpu::kernel_builds,
        "Builds of the CPU kernels this machine can run, portable first.");
  m.def("cpu_kernels", &fused_sam::cpu::kernels_in_use, "The CPU kernel build in use.");
  m.def("use_cpu_kernels", &fused_sam::cpu::use_kernels, pybind11::arg("name"),
        "Switch the CPU ops to a kernel build by name, or 'auto'.");
  m.def("cpu_parallel_threads", &fused_sam::cpu::parallel_threads,
        "Threads one parallel loop of the CPU ops runs on at torch's current thread count.");
#ifdef FUSED_SAM_WITH_CUDA
  m.def("cuda_perturb_tensor_rho_", &cuda_perturb_tensor_rho, py::arg("params"),
        py::arg("grads"), py::arg("backups"), py::arg("sumsq"), py::arg("rho"), py::arg("eps"),
        py::arg("adaptive"), py::arg("eta"), py::arg("masks"),
        py::arg("salts") = std::vector<int64_t>(), py::arg("step_key") = 0,
        py::arg("threshold") = 0, "perturb_ with rho as a one-element CUDA tensor.");
  m.def("cuda_restore_sgd_step_tensor_lr_", &cuda_restore_sgd_step_tensor_lr, py::arg("params"),
        py::arg("grads"), py::arg("backups"), py::arg("momentum_buffers"), py::kw_only(),
        py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"),
        py::arg("nesterov"), py::arg("maximize"), py::arg("first_step"), py::arg("grad_scale"),
        py::arg("found_inf"), py::arg("sumsqs") = Tensors(),
        "restore_sgd_step_ with lr as a one-element CUDA tensor.");
  m.def("cuda_restore_adam_step_tensor_lr_", &cuda_restore_adam_step_tensor_lr,
        py::arg("params"), py::arg("grads"), py::arg("backups"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("state_steps"), py::kw_only(),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("decoupled_weight_decay"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("sumsqs") = Tensors(), "restore_adam_step_ with lr as a one-element CUDA tensor.");
#endif
}
