"""Triton multi-tensor kernels for the SAM ops (CUDA, or CPU under the Triton interpreter).

Each op is one launch over every tensor of its ``(device, dtype)`` bucket (Adam: two, the
first a tiny step-counter update), driven by a cached int64 pointer table
(:mod:`._table`). Hyperparameters are runtime float64 arguments, so changing ``lr`` or ``rho``
never recompiles; only block sizes and feature flags (ASAM, mask, momentum, ...) are
compile-time constants. Kernel families live in :mod:`.norm`, :mod:`.perturb` and :mod:`.step`;
the variant ops (``dot_partials``, ``axpby_``) in :mod:`.combine`.

The ops are registered with ``torch.library.triton_op`` in the ``fused_sam_triton`` namespace,
so ``torch.compile`` traces into them (eager calls go straight to the op bodies, see
:func:`_call`). Under tracing (fake or functional tensors) there are no
addresses to put in a table, so each tensor gets a launch of its own with tensor arguments
(``DIRECT``), through ``torch.library.wrap_triton``: the same kernels and the same math, with
the mutations visible to the compiler.

On CPU tensors the kernels run in the Triton interpreter, which needs ``TRITON_INTERPRET=1``
in the environment before this package is imported; that is how CI checks them.
"""

from __future__ import annotations

import inspect
import itertools
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from fused_sam.backends._checks import check_axpby, check_lists
from fused_sam.masks.bits import RandomBits

__all__ = [
    "FLAT",
    "axpby_",
    "dot_partials",
    "norm_sq_partials",
    "perturb_",
    "restore_",
    "restore_adam_step_",
    "restore_sgd_step_",
    "unavailable_reason",
]

#: The kernels index ``p[i]``, ``g[i]``, ``b[i]`` alike over flat memory.
FLAT = True

try:
    import triton

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _IMPORT_ERROR = f"triton is not installed ({exc})"

if _IMPORT_ERROR is None:
    from fused_sam.backends.triton import _table
    from fused_sam.backends.triton.combine import axpby_kernel, dot_kernel
    from fused_sam.backends.triton.norm import norm_kernel
    from fused_sam.backends.triton.perturb import perturb_kernel
    from fused_sam.backends.triton.step import (
        adam_kernel,
        restore_kernel,
        sgd_kernel,
        steps_kernel,
    )


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (``None`` when they can).

    CUDA tensors need triton and a visible GPU; CPU tensors need the Triton interpreter,
    i.e. ``TRITON_INTERPRET=1`` set before this package was imported.
    """
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        if _table.INTERPRETED:
            return (
                "TRITON_INTERPRET=1 is set: the interpreter runs kernels on CPU tensors and "
                "cannot follow device addresses in the pointer table; unset it for CUDA"
            )
        if not torch.cuda.is_available():
            return "CUDA is not available to torch"
        return None
    if device.type == "cpu":
        if _table.INTERPRETED:
            return None
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return (
                "TRITON_INTERPRET=1 was set after fused_sam.backends.triton was imported; "
                "set it before importing fused_sam"
            )
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    return f"the Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), not {device}"


# ---------------------------------------------------------------------------------------------
# Launch plumbing

_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_STEPS_BLOCK = 128  # step counters per program of the Adam counter update
_RBLOCK = 1024  # norm partials per finalize step


def _traced(t: Tensor) -> bool:
    """Fake or functional tensors (torch.compile, opcheck): no addresses to tabulate."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, FunctionalTensor) or is_fake(t)


def _direct_launcher(kernel: Any, t: Tensor) -> Any | None:
    """The traceable per-tensor launcher, or ``None`` where nothing may run (fake mode)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    if _table.INTERPRETED:
        if isinstance(t, FunctionalTensor):
            raise RuntimeError(
                "torch.compile cannot trace interpreted Triton kernels (TRITON_INTERPRET=1); "
                "compile on CUDA, or use another backend on CPU"
            )
        return None  # fake mode: the op only has to produce outputs of the right shape
    return torch.library.wrap_triton(kernel)


def _check_like(params: Sequence[Tensor], **lists: Sequence[Tensor]) -> None:
    """Every list has one tensor per parameter, of its shape and on its device.

    The kernels index each tensor by its parameter's element count: a state tensor of another
    shape (e.g. from a checkpoint of another model) would be read and written out of bounds.
    The native ops make the same checks in C++.
    """
    shapes = list(map(Tensor.size, params))
    devices = {p.device for p in params}
    for name, ts in lists.items():
        if len(ts) != len(params) or list(map(Tensor.size, ts)) != shapes:
            bad = next((i for i, (t, s) in enumerate(zip(ts, shapes)) if t.shape != s), len(shapes))
            raise ValueError(
                f"fused_sam triton: {name} must hold one tensor per parameter with its shape "
                f"({len(ts)} tensors for {len(params)} parameters; first mismatch at index {bad})"
            )
        if {t.device for t in ts} != devices:
            raise ValueError(f"fused_sam triton: {name} must be on the parameters' device")


def _uniform(dtype: torch.dtype, *lists: Sequence[Tensor]) -> bool:
    return dtype in _SUPPORTED and all(t.dtype == dtype for lst in lists for t in lst)


def _flat(*lists: Sequence[Tensor]) -> bool:
    """Whether the kernels may index the tensors of each index alike over flat memory.

    The public ops of :mod:`fused_sam.functional` only hand this backend such buckets (see
    :func:`fused_sam.functional.plan`); a direct call with, say, a transposed ``y`` against a
    contiguous ``out`` would otherwise pair the wrong elements.
    """
    if all(map(Tensor.is_contiguous, itertools.chain(*lists))):
        return True
    from fused_sam.functional import _flat_ok

    return all(_flat_ok(ts) for ts in zip(*lists))


def _mask_ok(mask: Tensor, param: Tensor) -> bool:
    """A mask the kernel can read as flat bytes (else ``foreach`` takes it, or says why not)."""
    return (
        mask.dtype == torch.uint8
        and mask.is_contiguous()
        and mask.device == param.device
        and mask.numel() >= (param.numel() + 7) // 8
    )


#: Calls handed to the ``foreach`` backend, by ``(op, reason)``: the tensors of a call that the
#: Triton kernels do not take (an unsupported dtype, a mask they cannot read as bytes, Adam step
#: counters that are not float32 on the tensors' device) are never moved over silently.
FALLBACKS: Counter[tuple[str, str]] = Counter()


def _fallback(op: str, reason: str) -> Any:
    """The foreach backend for one call of ``op``, counted in :data:`FALLBACKS`.

    With ``FUSED_SAM_TRITON_STRICT=1`` a fallback raises instead (for tests and for users who
    want to know that every call runs the Triton kernels).
    """
    if os.environ.get("FUSED_SAM_TRITON_STRICT") == "1":
        raise RuntimeError(f"fused_sam triton: {op} would run on the foreach backend: {reason}")
    FALLBACKS[(op, reason)] += 1
    return _foreach()


def _foreach() -> Any:
    from fused_sam.backends import foreach

    return foreach


def _dummy(like: Tensor) -> Tensor:
    return torch.empty(1, dtype=torch.int64, device=like.device)


def _common(dtype: torch.dtype) -> dict[str, Any]:
    return {"DTYPE": _table.tl_dtype(dtype)}


# ---------------------------------------------------------------------------------------------
# Implementations (the bodies of the registered ops)


def _partials(
    kernel: Any,
    lists: list[list[Tensor]],
    scalars: tuple[Any, ...],
    const: dict[str, Any],
    table_lists: list[list[Tensor]] | None = None,
) -> Tensor:
    """Float64 partial sums of a reduction kernel (norm, dot) over a pair of tensor lists.

    One partial per chunk, from one launch over the pointer table of ``table_lists`` (default
    ``lists``), or, traced, from one launch per tensor pair (the same partials); ``(1,)`` zeros
    when every tensor is empty. The kernel takes ``(table, n_tensors, n_chunks, chunk, out,
    *scalars, u, v, numel)`` and the constants ``const`` plus ``DTYPE``, ``ALIGNED``,
    ``DIRECT`` and ``BLOCK``.
    """
    t0 = lists[0][0]
    acc = torch.float64  # partials in float64 for every storage type
    numels = [t.numel() for t in lists[0]]
    geo = _table.geometry(sum(numels))
    const = {**_common(t0.dtype), **const, "BLOCK": geo.block}
    if _traced(t0):
        launch = _direct_launcher(kernel, t0)
        parts = []
        for u, v, n in zip(*lists, numels):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                out = torch.zeros(chunks, dtype=acc, device=t0.device)
                if launch is not None:
                    launch[(chunks,)](
                        _dummy(t0), 1, chunks, geo.chunk, out, *scalars, u, v, n,
                        ALIGNED=False, DIRECT=True, **const,
                    )  # fmt: skip
                parts.append(out)
        return torch.cat(parts) if parts else torch.zeros(1, dtype=acc, device=t0.device)
    table = _table.pointer_table(table_lists or lists, numels, geo.chunk, t0.device)
    if table.n_chunks == 0:
        return torch.zeros(1, dtype=acc, device=t0.device)
    out = torch.empty(table.n_chunks, dtype=acc, device=t0.device)
    kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, geo.chunk, out, *scalars,
        table.data, table.data, 0,
        ALIGNED=table.aligned, DIRECT=False, **const,
    )  # fmt: skip
    return out


def _norm_impl(grads: list[Tensor], params: list[Tensor], adaptive: bool, eta: float) -> Tensor:
    # Squares in float64. Params are read only by ASAM; without it the table does not
    # depend on them.
    table_lists = [grads, params if adaptive else grads]
    const = {"ADAPTIVE": adaptive}
    return _partials(norm_kernel, [grads, params], (eta,), const, table_lists)


def _perturb_impl(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor],
    sumsq: Tensor,
    rho: float,
    eps: float,
    adaptive: bool,
    eta: float,
    masks: list[Tensor],
    salts: list[int],
    step_key: int,
    threshold: int,
    rho_t: Tensor | None,
) -> None:
    # ``masks`` is empty for an unmasked step (the op schema has no optional tensor lists);
    # ``salts`` is empty unless the step has a random mask (then ``masks`` is empty). With
    # ``rho_t`` the radius is ``rho * rho_t``, read on the device.
    w0 = params[0]
    numels = [w.numel() for w in params]
    geo = _table.geometry(sum(numels))
    const = {
        **_common(w0.dtype),
        "ACC": _table.acc_dtype(w0.dtype),
        "ADAPTIVE": adaptive,
        "MASK": 1 if masks else 2 if salts else 0,
        "RHO_T": rho_t is not None,
        "BLOCK": geo.block,
        "RBLOCK": _RBLOCK,
    }
    rho_arg = _hyper_arg(w0, rho_t)
    sumsq = sumsq.reshape(-1).contiguous()  # the kernel reads the partials as flat memory
    n_partials = sumsq.numel()
    if _traced(w0):
        launch = _direct_launcher(perturb_kernel, w0)
        if launch is None:
            return
        for i, (w, g, b, n) in enumerate(zip(params, grads, backups, numels)):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                m = masks[i] if masks else _dummy(w0)
                key = salts[i] ^ step_key if salts else 0
                launch[(chunks,)](
                    _dummy(w0), 1, chunks, geo.chunk, sumsq, n_partials, rho, rho_arg, eps, eta,
                    step_key, threshold, w, g, b, m, key, n,
                    ALIGNED=False, DIRECT=True, **const,
                )  # fmt: skip
        return
    lists = [params, grads, backups] + ([masks] if masks else [salts] if salts else [])
    table = _table.pointer_table(lists, numels, geo.chunk, w0.device)
    if table.n_chunks == 0:
        return
    perturb_kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, geo.chunk, sumsq, n_partials, rho, rho_arg,
        eps, eta, step_key, threshold, table.data, table.data, table.data, table.data, 0, 0,
        ALIGNED=table.aligned, DIRECT=False, **const,
    )  # fmt: skip


def _restore_impl(params: list[Tensor], backups: list[Tensor]) -> None:
    w0 = params[0]
    numels = [w.numel() for w in params]
    geo = _table.geometry(sum(numels))
    const = {**_common(w0.dtype), "BLOCK": geo.block}
    if _traced(w0):
        launch = _direct_launcher(restore_kernel, w0)
        if launch is None:
            return
        for w, b, n in zip(params, backups, numels):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                launch[(chunks,)](
                    _dummy(w0), 1, chunks, geo.chunk, w, b, n,
                    ALIGNED=False, DIRECT=True, **const,
                )  # fmt: skip
        return
    table = _table.pointer_table([params, backups], numels, geo.chunk, w0.device)
    if table.n_chunks == 0:
        return
    restore_kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, geo.chunk, table.data, table.data, 0,
        ALIGNED=table.aligned, DIRECT=False, **const,
    )  # fmt: skip


def _amp_args(
    like: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None
) -> tuple[Tensor, Tensor, dict[str, bool]]:
    """``(found_inf, grad_scale, flags)`` with a placeholder for an absent tensor.

    The kernels never read an absent one (its flag is off). Eagerly the placeholder is a
    tensor already at hand (no allocation per step); under tracing a separate empty tensor,
    so that no argument of a traced launch aliases another.
    """
    flags = {"HAS_INF": found_inf is not None, "HAS_SCALE": grad_scale is not None}
    if _traced(like):
        placeholder = _dummy(like)
    else:
        placeholder = like
    found = found_inf if found_inf is not None else placeholder
    scale = grad_scale if grad_scale is not None else placeholder
    return found, scale, flags


def _hyper_arg(like: Tensor, t: Tensor | None) -> Tensor:
    """The pointer argument of a hyperparameter read on the device, or a placeholder that the
    kernel never reads (its flag is off; traced, a tensor of its own, as in :func:`_amp_args`)."""
    if t is not None:
        return t
    return _dummy(like) if _traced(like) else like


def _device_hyper(value: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """``(multiplier, tensor)`` of a hyperparameter for the kernels.

    A one-element float tensor on the tensors' device is read by the kernels on the device
    (no host read: what CUDA graph capture needs, and a new value needs no recompile); any
    other value is a runtime float (a CPU tensor's value is read here, which costs nothing).
    """
    if isinstance(value, Tensor):
        if value.device == device and value.numel() == 1 and value.is_floating_point():
            return 1.0, value.reshape(())
        value = float(value)
    return float(value), None


def _sgd_impl(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr_t: Tensor | None,
) -> None:
    w0 = params[0]
    numels = [w.numel() for w in params]
    geo = _table.geometry(sum(numels))
    found, scale, flags = _amp_args(w0, grad_scale, found_inf)
    has_momentum = momentum != 0
    const = {
        **_common(w0.dtype),
        **flags,
        "ACC": _table.acc_dtype(w0.dtype),
        "MAXIMIZE": maximize,
        "USE_WD": weight_decay != 0,
        "MOMENTUM": has_momentum,
        "FIRST": first_step,
        "NESTEROV": nesterov,
        "LR_T": lr_t is not None,
        "BLOCK": geo.block,
    }
    hyper = (lr, _hyper_arg(w0, lr_t), weight_decay, momentum, dampening)
    if _traced(w0):
        launch = _direct_launcher(sgd_kernel, w0)
        if launch is None:
            return
        for i, (w, g, b, n) in enumerate(zip(params, grads, backups, numels)):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                v = momentum_buffers[i] if has_momentum else _dummy(w0)
                launch[(chunks,)](
                    _dummy(w0), 1, chunks, geo.chunk, found, scale, *hyper, w, g, b, v, n,
                    ALIGNED=False, DIRECT=True, **const,
                )  # fmt: skip
        return
    lists = [params, grads, backups] + ([momentum_buffers] if has_momentum else [])
    table = _table.pointer_table(lists, numels, geo.chunk, w0.device)
    if table.n_chunks == 0:
        return
    sgd_kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, geo.chunk, found, scale, *hyper,
        table.data, table.data, table.data, table.data, 0,
        ALIGNED=table.aligned, DIRECT=False, **const,
    )  # fmt: skip


def _adam_impl(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr_t: Tensor | None,
) -> None:
    w0 = params[0]
    numels = [w.numel() for w in params]
    geo = _table.geometry(sum(numels))
    found, scale, flags = _amp_args(w0, grad_scale, found_inf)
    const = {
        **_common(w0.dtype),
        **flags,
        "ACC": _table.acc_dtype(w0.dtype),
        "MAXIMIZE": maximize,
        "USE_WD": weight_decay != 0,
        "DECOUPLED": decoupled_weight_decay,
        "AMSGRAD": amsgrad,
        "LR_T": lr_t is not None,
        "BLOCK": geo.block,
    }
    hyper = (lr, _hyper_arg(w0, lr_t), beta1, beta2, eps, weight_decay)
    if _traced(w0):
        launch = _direct_launcher(adam_kernel, w0)
        if launch is None:
            return
        live = None if found_inf is None else (found_inf == 0).to(torch.float32)
        for i, (w, g, b, n) in enumerate(zip(params, grads, backups, numels)):
            s = state_steps[i]
            s.add_(1 if live is None else live)
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                vmax = max_exp_avg_sqs[i] if amsgrad else exp_avg_sqs[i]
                launch[(chunks,)](
                    _dummy(w0), 1, chunks, geo.chunk, found, scale, *hyper,
                    w, g, b, exp_avgs[i], exp_avg_sqs[i], s, vmax, n,
                    ALIGNED=False, DIRECT=True, **const,
                )  # fmt: skip
        return
    lists = [params, grads, backups, exp_avgs, exp_avg_sqs, state_steps]
    if amsgrad:
        lists.append(max_exp_avg_sqs)
    table = _table.pointer_table(lists, numels, geo.chunk, w0.device)
    steps_kernel[(triton.cdiv(table.n_tensors, _STEPS_BLOCK),)](
        table.data, table.n_tensors, table.n_chunks, found,
        HAS_INF=flags["HAS_INF"], ROW=5, BLOCK=_STEPS_BLOCK,
    )  # fmt: skip
    if table.n_chunks == 0:
        return
    adam_kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, geo.chunk, found, scale, *hyper,
        *([table.data] * 7), 0,
        ALIGNED=table.aligned, DIRECT=False, **const,
    )  # fmt: skip


def _dot_impl(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return _partials(dot_kernel, [a, b], (), {})  # products and sums in float64


def _axpby_impl(
    out: list[Tensor], x: list[Tensor], y: list[Tensor], coefs: Tensor, skip: Tensor | None
) -> None:
    # ``coefs`` and ``skip`` are read by the kernel on the device, never here.
    o0 = out[0]
    numels = [t.numel() for t in out]
    geo = _table.geometry(sum(numels))
    const = {**_common(o0.dtype), "HAS_SKIP": skip is not None, "BLOCK": geo.block}
    coefs = coefs.contiguous()  # the kernel reads (a, b) as two consecutive float64 values
    flag = _hyper_arg(o0, skip)
    if _traced(o0):
        launch = _direct_launcher(axpby_kernel, o0)
        if launch is None:
            return
        for o, u, v, n in zip(out, x, y, numels):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                launch[(chunks,)](
                    _dummy(o0), 1, chunks, geo.chunk, coefs, flag, o, u, v, n,
                    ALIGNED=False, DIRECT=True, **const,
                )  # fmt: skip
        return
    table = _table.pointer_table([out, x, y], numels, geo.chunk, o0.device)
    if table.n_chunks == 0:
        return
    axpby_kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, geo.chunk, coefs, flag,
        table.data, table.data, table.data, 0,
        ALIGNED=table.aligned, DIRECT=False, **const,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Registration with torch.library


#: Each op's body and the list arguments it writes (``triton_op``'s ``mutates_args``).
_SPECS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "norm_sq_partials": (_norm_impl, ()),
    "perturb": (_perturb_impl, ("params", "backups")),
    "restore": (_restore_impl, ("params",)),
    "restore_sgd_step": (_sgd_impl, ("params", "momentum_buffers")),
    "restore_adam_step": (
        _adam_impl,
        ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
    ),
    "dot_partials": (_dot_impl, ()),
    "axpby": (_axpby_impl, ("out",)),
}


def _register() -> dict[str, Callable[..., Any]]:
    """The ops as ``torch.library.triton_op`` custom ops (plain functions if unavailable)."""
    triton_op = getattr(torch.library, "triton_op", None)
    if triton_op is None or _IMPORT_ERROR is not None:  # pragma: no cover - old torch
        return {name: fn for name, (fn, _) in _SPECS.items()}
    ops: dict[str, Callable[..., Any]] = {}
    for name, (fn, mutates) in _SPECS.items():
        qualname = f"fused_sam_triton::{name}"
        try:
            ops[name] = triton_op(qualname, fn, mutates_args=mutates)
        except RuntimeError:
            # Already defined (a re-import of this module): use the existing registration.
            ns, op = qualname.split("::")
            ops[name] = getattr(getattr(torch.ops, ns), op)
    return ops


_OPS = _register()
_IMPLS: dict[str, Callable[..., Any]] = {name: fn for name, (fn, _) in _SPECS.items()}
#: Positions of the written lists among each op's arguments.
_WRITTEN: dict[str, tuple[int, ...]] = {
    name: tuple(list(inspect.signature(fn).parameters).index(arg) for arg in mutates)
    for name, (fn, mutates) in _SPECS.items()
}


def _call(name: str, *args: Any) -> Any:
    """Run op ``name``: through the dispatcher when traced, straight to its body eagerly.

    torch.compile and fake/functional tensors need the registered op. Eagerly the dispatcher
    only adds cost: for lists of hundreds of tensors its per-call overhead (milliseconds on a
    slow host) would exceed the GPU time of a fused step. An eager call bumps the version
    counter of every tensor it writes, as an in-place ATen op does (so autograd refuses a
    backward through a graph that saved one of them before the write).
    """
    first = args[0][0]
    if torch.compiler.is_compiling() or _traced(first):
        return _OPS[name](*args)
    if first.is_cuda and first.device.index != torch.cuda.current_device():
        # Triton launches on the current device: make it the tensors' one (the native CUDA
        # ops hold a CUDAGuard for the same reason).
        with torch.cuda.device(first.device):
            out = _IMPLS[name](*args)
    else:
        out = _IMPLS[name](*args)
    written = [t for i in _WRITTEN[name] for t in args[i]]
    if written:
        increment_version(written)
    return out


# ---------------------------------------------------------------------------------------------
# The backend interface (signatures of fused_sam.reference)


def norm_sq_partials(
    grads: Sequence[Tensor], params: Sequence[Tensor], adaptive: bool, eta: float
) -> Tensor:
    """See :func:`fused_sam.reference.norm_sq_partials`; one partial per program."""
    if not grads:
        return torch.zeros(1)
    if not _uniform(grads[0].dtype, grads, params):
        return _fallback("norm_sq_partials", "dtype").norm_sq_partials(grads, params, adaptive, eta)
    return _call("norm_sq_partials", list(grads), list(params), adaptive, float(eta))


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
    """See :func:`fused_sam.reference.perturb_`. The scale is computed on the device, and so
    are a random mask's bits (``1 / keep`` is folded into ``rho`` here). ``rho`` may be a
    one-element tensor on the parameters' device, read by the kernel (see :func:`_device_hyper`).
    """
    if not params:
        return
    _check_like(params, grads=grads, backups=backups)
    if not _uniform(params[0].dtype, params, grads, backups):
        _fallback("perturb", "dtype").perturb_(
            params, grads, backups, sumsq, rho, eps, adaptive, eta, masks
        )
        return
    random = masks if isinstance(masks, RandomBits) else None
    if (
        random is None
        and masks is not None
        and not all(_mask_ok(m, p) for m, p in zip(masks, params))
    ):
        _fallback("perturb", "mask layout").perturb_(
            params, grads, backups, sumsq, rho, eps, adaptive, eta, masks
        )
        return
    rho_mult, rho_t = _device_hyper(rho, params[0].device)
    _call(
        "perturb",
        list(params),
        list(grads),
        list(backups),
        sumsq,
        rho_mult if random is None else rho_mult * random.scale,
        float(eps),
        adaptive,
        float(eta),
        [] if masks is None or random is not None else list(masks),
        [] if random is None else list(random.salts),
        0 if random is None else random.step_key,
        0 if random is None else random.threshold,
        rho_t,
    )


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """See :func:`fused_sam.reference.restore_`: a bit-exact copy in one launch."""
    if not params:
        return
    _check_like(params, backups=backups)
    if not _uniform(params[0].dtype, params, backups):
        _fallback("restore", "dtype").restore_(params, backups)
        return
    _call("restore", list(params), list(backups))


def restore_sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """See :func:`fused_sam.reference.restore_sgd_step_`. The skip is decided on the device;
    ``lr`` may be a one-element tensor on the parameters' device, read by the kernel."""
    if not params:
        return
    bufs = list(momentum_buffers) if momentum != 0 else []
    optional = {"momentum_buffers": bufs} if bufs else {}
    _check_like(params, grads=grads, backups=backups, **optional)
    kw = dict(
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        first_step=first_step,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    if not _uniform(params[0].dtype, params, grads, backups, bufs):
        _fallback("restore_sgd_step", "dtype").restore_sgd_step_(
            params, grads, backups, momentum_buffers, **kw
        )
        return
    lr_mult, lr_t = _device_hyper(lr, params[0].device)
    _call(
        "restore_sgd_step",
        list(params),
        list(grads),
        list(backups),
        bufs,
        lr_mult,
        float(weight_decay),
        float(momentum),
        float(dampening),
        bool(nesterov),
        bool(maximize),
        bool(first_step),
        grad_scale,
        found_inf,
        lr_t,
    )


def restore_adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """See :func:`fused_sam.reference.restore_adam_step_`. The skip is decided on the device;
    ``lr`` may be a one-element tensor on the parameters' device, read by the kernel."""
    if not params:
        return
    vmax = list(max_exp_avg_sqs) if amsgrad else []
    _check_like(
        params,
        grads=grads,
        backups=backups,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        **({"max_exp_avg_sqs": vmax} if amsgrad else {}),
    )
    steps_ok = all(
        s.dtype == torch.float32 and s.numel() == 1 and s.device == params[0].device
        for s in state_steps
    )
    if not steps_ok or not _uniform(
        params[0].dtype, params, grads, backups, exp_avgs, exp_avg_sqs, vmax
    ):
        reason = "dtype" if steps_ok else "step counters not float32 on the tensors' device"
        _fallback("restore_adam_step", reason).restore_adam_step_(
            params,
            grads,
            backups,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            state_steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
        return
    lr_mult, lr_t = _device_hyper(lr, params[0].device)
    _call(
        "restore_adam_step",
        list(params),
        list(grads),
        list(backups),
        list(exp_avgs),
        list(exp_avg_sqs),
        vmax,
        list(state_steps),
        lr_mult,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(amsgrad),
        bool(maximize),
        bool(decoupled_weight_decay),
        grad_scale,
        found_inf,
        lr_t,
    )


def dot_partials(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """See :func:`fused_sam.reference.dot_partials`: one float64 partial per program, in one
    launch over every tensor pair (float64 products and sums for every storage type)."""
    check_lists("dot_partials", a, b=b)
    if a[0].dtype not in _SUPPORTED:
        return _fallback("dot_partials", "dtype").dot_partials(a, b)
    if not _flat(a, b):
        return _fallback("dot_partials", "layout").dot_partials(a, b)
    return _call("dot_partials", list(a), list(b))


def axpby_(
    out: Sequence[Tensor],
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    coefs: Tensor,
    skip: Tensor | None,
) -> None:
    """See :func:`fused_sam.reference.axpby_`: one launch, float64 math stored into ``out`` as
    the reference's ``.to(dtype)`` stores it (:func:`.combine.to_out`). The coefficients and
    the skip flag are read by the kernel on the device (nothing is read on the host, so the
    call can be captured in a CUDA graph)."""
    check_axpby(out, x, y, coefs, skip)
    if out[0].dtype not in _SUPPORTED:
        _fallback("axpby", "dtype").axpby_(out, x, y, coefs, skip)
        return
    if not _flat(out, x, y):
        _fallback("axpby", "layout").axpby_(out, x, y, coefs, skip)
        return
    _call("axpby", list(out), list(x), list(y), coefs, skip)
