"""C++ (CPU) and CUDA kernels from the compiled extension ``fused_sam._C``.

The extension is built by ``setup.py`` from ``csrc/`` and registers the ops
``torch.ops.fused_sam.*`` (schemas in ``csrc/bindings.cpp``); this module gives them the
signatures of :mod:`fused_sam.reference` and registers their fake implementations, so
``torch.compile`` and :func:`torch.library.opcheck` can trace them without running a kernel.

``functional`` hands every call tensors of one device and one dtype that are dense with equal
strides per index, so the kernels treat memory as flat. When the extension is missing, or was
built without CUDA and CUDA tensors arrive, :func:`unavailable_reason` says so and how to
rebuild.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fused_sam.hyperparams import AdamHyper, SGDHyper, as_kwargs, with_lr
from fused_sam.masks.bits import RandomBits

__all__ = [
    "FLAT",
    "axpby_",
    "build_info",
    "collect_grads",
    "dot_partials",
    "layout_key",
    "norm_sq_partials",
    "perturb_",
    "restore_",
    "restore_adam_step_",
    "restore_sgd_step_",
    "unavailable_reason",
]

#: The kernels index ``p[i]``, ``g[i]``, ``b[i]`` alike over each tensor's storage.
FLAT = True
#: ``rho`` and ``lr`` may be one-element tensors (kept as tensors under torch.compile).
TENSOR_HYPERPARAMS = True
#: The optimizer-state tensors of the fused steps must have their parameter's dtype
#: (``functional`` hands others, e.g. float32 momentum of a bfloat16 model, to ``foreach``).
STATE_OF_PARAM_DTYPE = True

_BUILD = "pip install --no-build-isolation -e ."
_CUDA_BUILD = f"FUSED_SAM_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 {_BUILD}"

try:
    # By name: a backend imports no package module above it (the compiled extension is a leaf).
    _C = importlib.import_module("fused_sam._C")
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the native kernels cannot run on ``device`` (``None`` when they can)."""
    if _C is None:
        return (
            f"the native extension fused_sam._C is not built or does not load ({_IMPORT_ERROR}); "
            f"build it in the source tree with `{_BUILD}` (needs a C++ compiler and ninja; "
            "FUSED_SAM_NO_NATIVE=1 was perhaps set at install time)"
        )
    if device.type == "cuda":
        if not _C.with_cuda:
            return (
                "fused_sam._C was built without CUDA kernels; rebuild with "
                f"`{_CUDA_BUILD}` (a CUDA build of torch and nvcc are needed)"
            )
        return None
    if device.type != "cpu":
        return f"the native kernels run on cpu and cuda tensors, not {device.type}"
    return None


def build_info() -> str:
    """One line on the extension for ``fused-sam info``: what was built and what runs here."""
    if _C is None:
        return f"not built ({_IMPORT_ERROR}); build with `{_BUILD}`"
    cpu = (
        f"CPU kernels {_C.cpu_kernels()} (builds here: {', '.join(_C.cpu_kernel_builds())}; "
        f"{_C.cpu_parallel_threads()} of {torch.get_num_threads()} threads)"
    )
    if _C.with_cuda:
        return f"built with {cpu} and CUDA kernels"
    return f"built with {cpu} only; for CUDA rebuild with `{_CUDA_BUILD}`"


# ---------------------------------------------------------------------------------------------
# Fake implementations: shapes and dtypes only, for FakeTensor / torch.compile / opcheck.

if _C is not None:

    @torch.library.register_fake("fused_sam::norm_sq_partials")
    def _norm_sq_partials_fake(
        grads: list[Tensor], params: list[Tensor], adaptive: bool, eta: float
    ) -> Tensor:
        # One float64 total on every device (the CUDA kernel's last block finalizes it).
        device = grads[0].device if grads else torch.device("cpu")
        n = _C.cuda_norm_partials if device.type == "cuda" else 1
        return torch.empty(n, dtype=torch.float64, device=device)

    @torch.library.register_fake("fused_sam::perturb_")
    def _perturb_fake(
        params: list[Tensor],
        grads: list[Tensor],
        backups: list[Tensor],
        sumsq: Tensor,
        rho: float,
        eps: float,
        adaptive: bool,
        eta: float,
        masks: list[Tensor],
        salts: Sequence[int] = (),
        step_key: int = 0,
        threshold: int = 0,
    ) -> None:
        return None

    @torch.library.register_fake("fused_sam::restore_")
    def _restore_fake(params: list[Tensor], backups: list[Tensor]) -> None:
        return None

    def _skip_flag_fake(params: Sequence[Tensor]) -> Tensor:
        """The 0-dim bool skip flag a restore step returns, on the parameters' device."""
        return torch.empty((), dtype=torch.bool, device=params[0].device)

    @torch.library.register_fake("fused_sam::restore_sgd_step_")
    def _restore_sgd_step_fake(params: list[Tensor], *args: object, **kwargs: object) -> Tensor:
        return _skip_flag_fake(params)

    @torch.library.register_fake("fused_sam::restore_adam_step_")
    def _restore_adam_step_fake(params: list[Tensor], *args: object, **kwargs: object) -> Tensor:
        return _skip_flag_fake(params)

    @torch.library.register_fake("fused_sam::dot_partials")
    def _dot_partials_fake(a: list[Tensor], b: list[Tensor]) -> Tensor:
        device = a[0].device if a else torch.device("cpu")
        n = _C.cuda_norm_partials if device.type == "cuda" else 1
        return torch.empty(n, dtype=torch.float64, device=device)

    @torch.library.register_fake("fused_sam::axpby_")
    def _axpby_fake(
        out: list[Tensor], x: list[Tensor], y: list[Tensor], coefs: Tensor, skip: Tensor | None
    ) -> None:
        return None

    _ops = torch.ops.fused_sam
    _norm_sq_partials = _ops.norm_sq_partials.default
    _perturb = _ops.perturb_.default
    _restore = _ops.restore_.default
    _restore_sgd_step = _ops.restore_sgd_step_.default
    _restore_adam_step = _ops.restore_adam_step_.default
    _dot_partials = _ops.dot_partials.default
    _axpby = _ops.axpby_.default

    # -----------------------------------------------------------------------------------------
    # Tensor hyperparameters (torch.compile). A Python float that changes between steps (a
    # scheduled lr or rho) is a constant of a compiled graph, guarded on, so every new value
    # recompiles; torch's optimizers take ``lr`` as a 0-dim tensor for that reason. These three
    # ops are the C++ ops with ``rho``/``lr`` as a tensor: the graph passes the tensor, and the
    # op reads its value when it runs (free for a CPU tensor); for CUDA tensors the CUDA kernels
    # read it on the device (``_C.cuda_*_tensor_*``: no host read, so eager steps do not sync and
    # a CUDA graph replay reads the value of the moment). The kernels and every other argument
    # are those of the float ops, so results are identical.

    @torch.library.custom_op("fused_sam::perturb_tensor_rho_", mutates_args=("params", "backups"))
    def _perturb_tensor_rho(
        params: list[Tensor],
        grads: list[Tensor],
        backups: list[Tensor],
        sumsq: Tensor,
        rho: Tensor,
        eps: float,
        adaptive: bool,
        eta: float,
        masks: list[Tensor],
        salts: list[int],
        step_key: int,
        threshold: int,
    ) -> None:
        _check_scalar("rho", rho)
        if _on_device(rho, params):
            args = (params, grads, backups, sumsq, rho, eps, adaptive, eta, masks)
            _C.cuda_perturb_tensor_rho_(*args, salts, step_key, threshold)
            return
        args = (params, grads, backups, sumsq, float(rho), eps, adaptive, eta, masks)
        _run("direct_perturb_", _perturb, *args, salts, step_key, threshold)

    @_perturb_tensor_rho.register_fake
    def _perturb_tensor_rho_fake(*args: object) -> None:
        _check_scalar("rho", args[4])

    @torch.library.custom_op(
        "fused_sam::restore_sgd_step_tensor_lr_", mutates_args=("params", "momentum_buffers")
    )
    def _restore_sgd_step_tensor_lr(
        params: list[Tensor],
        grads: list[Tensor],
        backups: list[Tensor],
        momentum_buffers: list[Tensor],
        lr: Tensor,
        weight_decay: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        maximize: bool,
        first_step: bool,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        sumsqs: list[Tensor],
    ) -> Tensor:
        _check_scalar("lr", lr)
        if _on_device(lr, params):
            return _C.cuda_restore_sgd_step_tensor_lr_(
                params, grads, backups, momentum_buffers, lr=lr, weight_decay=weight_decay,
                momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize,
                first_step=first_step, grad_scale=grad_scale, found_inf=found_inf, sumsqs=sumsqs,
            )  # fmt: skip
        hyper = SGDHyper(float(lr), weight_decay, momentum, dampening, nesterov, maximize)
        return restore_sgd_step_(
            params, grads, backups, momentum_buffers, hyper, first_step=first_step,
            grad_scale=grad_scale, found_inf=found_inf, sumsqs=sumsqs,
        )  # fmt: skip

    @_restore_sgd_step_tensor_lr.register_fake
    def _restore_sgd_step_tensor_lr_fake(params: list[Tensor], *args: object) -> Tensor:
        _check_scalar("lr", args[3])
        return _skip_flag_fake(params)

    @torch.library.custom_op(
        "fused_sam::restore_adam_step_tensor_lr_",
        mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
    )
    def _restore_adam_step_tensor_lr(
        params: list[Tensor],
        grads: list[Tensor],
        backups: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        lr: Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        maximize: bool,
        decoupled_weight_decay: bool,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        sumsqs: list[Tensor],
    ) -> Tensor:
        _check_scalar("lr", lr)
        if _on_device(lr, params):
            return _C.cuda_restore_adam_step_tensor_lr_(
                params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                grad_scale=grad_scale, found_inf=found_inf, sumsqs=sumsqs,
            )  # fmt: skip
        hyper = AdamHyper(
            float(lr), beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
        )
        return restore_adam_step_(
            params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hyper,
            grad_scale=grad_scale, found_inf=found_inf, sumsqs=sumsqs,
        )  # fmt: skip

    @_restore_adam_step_tensor_lr.register_fake
    def _restore_adam_step_tensor_lr_fake(params: list[Tensor], *args: object) -> Tensor:
        _check_scalar("lr", args[6])
        return _skip_flag_fake(params)

    _perturb_t = _ops.perturb_tensor_rho_.default
    _restore_sgd_step_t = _ops.restore_sgd_step_tensor_lr_.default
    _restore_adam_step_t = _ops.restore_adam_step_tensor_lr_.default


def _on_device(value: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether the CUDA kernels can read the tensor hyperparameter ``value`` on the device
    (``_C.cuda_*_tensor_*``): it and the parameters are CUDA tensors of a CUDA build."""
    return value.is_cuda and bool(params) and params[0].is_cuda and bool(_C.with_cuda)


def _number(value: Tensor, name: str) -> float:
    """A tensor hyperparameter's value for the kernels, which take numbers (a host read)."""
    if value.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the native CUDA kernels take {name} as a number, which a CUDA graph would freeze "
            "at its captured value: capture with backend='triton', whose kernels read "
            f"{name} on the device"
        )
    return float(value)


def _check_scalar(name: str, value: object) -> None:
    if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"{name} as a tensor must be a one-element float tensor, got {value!r}")


def collect_grads(
    params: Sequence[Tensor],
) -> tuple[list[Tensor], list[Tensor], bool, bool] | None:
    """``(params with a grad, their grads, all grads contiguous, any grad sparse)`` in one C++
    pass; ``None`` without the extension or for tensor subclasses with their own dispatch."""
    if _C is None:
        return None
    return _C.collect_grads(params if isinstance(params, list) else list(params))


def layout_key(tensors: Sequence[Tensor]) -> tuple[bytes | None, bool] | None:
    """Every tensor's address, dtype, device, sizes and strides as one comparable value, and
    whether all are contiguous; ``None`` without the extension (see ``FusedSAM``'s step plan).
    The key is ``None`` for sparse tensors, which have no strides."""
    return None if _C is None else _C.layout_key(tensors)


def _direct() -> bool:
    """Whether an eager call may skip the dispatcher (see ``direct_*`` in csrc/bindings.cpp).

    Not under grad mode (autograd must see the op), torch.compile or any dispatch mode (fake
    tensors, tracing, profiling modes); the C++ side also declines anything but plain CPU
    tensors, and the registered op then runs.
    """
    return (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def _run(direct: str, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``_C.<direct>(...)`` when the dispatcher may be skipped and it takes the tensors (it
    returns ``None``/``False`` when it declines), else the registered ``op``."""
    if _direct():
        out = getattr(_C, direct)(*args, **kwargs)
        if out is not None and out is not False:
            return out
    return op(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The ops, with the signatures of fused_sam.reference. Kept thin: they sit on the hot path.


def norm_sq_partials(
    grads: Sequence[Tensor], params: Sequence[Tensor], adaptive: bool, eta: float
) -> Tensor:
    """See :func:`fused_sam.reference.norm_sq_partials`.

    One float64 total on CPU and on CUDA (``_C.cuda_norm_partials`` = 1, added up by the
    kernel's last block), in both cases reduced in a fixed order (deterministic).
    """
    return _run("direct_norm_sq_partials", _norm_sq_partials, grads, params, adaptive, eta)


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    sumsq: Tensor,
    rho: float | Tensor,
    eps: float,
    adaptive: bool,
    eta: float,
    masks: Sequence[Tensor] | RandomBits | None,
) -> None:
    """See :func:`fused_sam.reference.perturb_`; the norm is finalised inside the kernel, and
    so are a random mask's bits (the op takes the salts, the step key and the threshold;
    ``1 / keep`` is folded into ``rho`` here).

    ``rho`` may be a one-element tensor: traced, it stays one (the ``perturb_tensor_rho_`` op),
    so a new value does not recompile; a CUDA tensor beside CUDA parameters also takes that op
    eagerly, and the CUDA kernel reads it on the device (no sync; CUDA graphs); eagerly a CPU
    tensor's value is read here.
    """
    salts: list[int] = []
    step_key = threshold = 0
    if isinstance(masks, RandomBits):
        rho = rho * masks.scale
        salts, step_key, threshold = list(masks.salts), masks.step_key, masks.threshold
        masks = None
    if isinstance(rho, Tensor):
        if torch.compiler.is_compiling() or _on_device(rho, params):
            args_t = (params, grads, backups, sumsq, rho, eps, adaptive, eta, masks or [])
            _perturb_t(*args_t, salts, step_key, threshold)
            return
        rho = _number(rho, "rho")
    args = (params, grads, backups, sumsq, rho, eps, adaptive, eta, masks or [])
    _run("direct_perturb_", _perturb, *args, salts, step_key, threshold)


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """See :func:`fused_sam.reference.restore_`."""
    _run("direct_restore_", _restore, params, backups)


def restore_sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    hyper: SGDHyper,
    *,
    first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    sumsqs: Sequence[Tensor] = (),
) -> Tensor:
    """See :func:`fused_sam.reference.restore_sgd_step_`; ``hyper.lr`` may be a one-element
    tensor (see :func:`perturb_`)."""
    tensors = (params, grads, backups, momentum_buffers)
    sumsqs = list(sumsqs)
    if isinstance(hyper.lr, Tensor):
        if torch.compiler.is_compiling() or _on_device(hyper.lr, params):
            return _restore_sgd_step_t(*tensors, *hyper, first_step, grad_scale, found_inf, sumsqs)
        hyper = with_lr(hyper, _number(hyper.lr, "lr"))
    amp = {"first_step": first_step, "grad_scale": grad_scale, "found_inf": found_inf}
    return _run(
        "direct_restore_sgd_step_", _restore_sgd_step, *tensors, **as_kwargs(hyper), **amp,
        sumsqs=sumsqs,
    )  # fmt: skip


def restore_adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    hyper: AdamHyper,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    sumsqs: Sequence[Tensor] = (),
) -> Tensor:
    """See :func:`fused_sam.reference.restore_adam_step_`; step counters advance in the op.
    ``hyper.lr`` may be a one-element tensor (see :func:`perturb_`)."""
    tensors = (params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    sumsqs = list(sumsqs)
    if isinstance(hyper.lr, Tensor):
        if torch.compiler.is_compiling() or _on_device(hyper.lr, params):
            return _restore_adam_step_t(*tensors, *hyper, grad_scale, found_inf, sumsqs)
        hyper = with_lr(hyper, _number(hyper.lr, "lr"))
    amp = {"grad_scale": grad_scale, "found_inf": found_inf, "sumsqs": sumsqs}
    return _run(
        "direct_restore_adam_step_", _restore_adam_step, *tensors, **as_kwargs(hyper), **amp
    )


def dot_partials(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """See :func:`fused_sam.reference.dot_partials`.

    Products and sums in float64 for every storage dtype. One total on CPU (per-chunk sums
    added in chunk order, whatever the thread count) and on CUDA (block sums added in block
    order by the kernel's last block); deterministic in both cases.
    """
    return _run("direct_dot_partials", _dot_partials, a, b)


def axpby_(
    out: Sequence[Tensor],
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    coefs: Tensor,
    skip: Tensor | None,
) -> None:
    """See :func:`fused_sam.reference.axpby_`: ``out = a x + b y`` in float64, converted to
    ``out``'s dtype as torch converts (bfloat16/float16 through float32).

    ``coefs`` and ``skip`` must be on the tensors' device; the CUDA kernel reads both there
    (no host synchronisation), and a nonzero ``skip`` writes nothing.
    """
    _run("direct_axpby_", _axpby, out, x, y, coefs, skip)
