"""The Triton backend's interface: the ops with the signatures of :mod:`fused_sam.reference`,
and :func:`unsupported`, which says which calls the kernels cannot take.

The backend decides nothing about other backends: :mod:`fused_sam.functional` asks
:func:`unsupported` for every bucket it would hand over, and routes the refused ones to
``foreach`` (counted in :data:`fused_sam.functional.FALLBACKS`, or an error with
``FUSED_SAM_TRITON_STRICT=1``). An op called directly with such tensors raises.
"""

from __future__ import annotations

import importlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from fused_sam.backends._checks import check_axpby, check_lists, flat_ok
from fused_sam.backends._skip import skip_flag
from fused_sam.backends.triton._registration import call
from fused_sam.hyperparams import AdamHyper, SGDHyper
from fused_sam.masks.bits import RandomBits

__all__ = [
    "FLAT",
    "SUPPORTED",
    "axpby_",
    "dot_partials",
    "norm_sq_partials",
    "perturb_",
    "restore_",
    "restore_adam_step_",
    "restore_sgd_step_",
    "unsupported",
]

#: The kernels index ``p[i]``, ``g[i]``, ``b[i]`` alike over flat memory.
FLAT = True

#: The storage types the kernels take.
SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Checks, once per layout

try:  # one C++ pass over the tensors (by module name: see _table)
    _LAYOUT_KEY: Callable[[list[Tensor]], tuple[bytes | None, bool]] | None = (
        importlib.import_module("fused_sam._C").layout_key
    )
except (ImportError, AttributeError):  # pragma: no cover - installs without the extension
    _LAYOUT_KEY = None

#: Layouts whose checks passed (op, list lengths, layout bytes) -> the result of the check:
#: every check of this module is a function of the tensors' dtypes, devices, sizes and
#: strides (and of the lists' lengths), which the key holds, so a steady-state step checks its
#: tensors once instead of looping over them in Python at every op.
_CHECKED: OrderedDict[Hashable, str | None] = OrderedDict()
_CHECKED_SIZE = 256


def _layout(op: str, lists: Sequence[Sequence[Tensor]]) -> Hashable | None:
    """The memo key of a check of ``lists`` for ``op`` (``None``: check every time, e.g.
    under torch.compile, which cannot trace the C++ call, or without the extension)."""
    if _LAYOUT_KEY is None or torch.compiler.is_compiling():
        return None
    layout = _LAYOUT_KEY(list(itertools.chain.from_iterable(lists)))[0]
    if layout is None:  # a sparse tensor: no strides
        return None
    return (op, tuple(map(len, lists)), layout)


def _memo(op: str, lists: Sequence[Sequence[Tensor]], check: Callable[[], str | None]) -> Any:
    """``check()``, or its remembered result for the same layout. A check that raises is
    not remembered (it raises again next time)."""
    key = _layout(op, lists)
    if key is None:
        return check()
    try:
        result = _CHECKED[key]
    except KeyError:
        result = _CHECKED[key] = check()
        if len(_CHECKED) > _CHECKED_SIZE:
            _CHECKED.popitem(last=False)
    else:
        _CHECKED.move_to_end(key)
    return result


# ---------------------------------------------------------------------------------------------
# What the kernels take


def _uniform(dtype: torch.dtype, *lists: Sequence[Tensor]) -> bool:
    return dtype in SUPPORTED and all(t.dtype == dtype for lst in lists for t in lst)


def _flat(*lists: Sequence[Tensor]) -> bool:
    """Whether the kernels may index the tensors of each index alike over flat memory.

    :func:`fused_sam.functional.plan` only hands this backend such buckets; a direct call with,
    say, a transposed ``y`` against a contiguous ``out`` would otherwise pair the wrong
    elements.
    """
    if all(map(Tensor.is_contiguous, itertools.chain(*lists))):
        return True
    return all(flat_ok(ts) for ts in zip(*lists))


def _mask_ok(mask: Tensor, param: Tensor) -> bool:
    """A mask the kernel can read as flat bytes."""
    return (
        mask.dtype == torch.uint8
        and mask.is_contiguous()
        and mask.device == param.device
        and mask.numel() >= (param.numel() + 7) // 8
    )


def _steps_ok(state_steps: Sequence[Tensor], device: torch.device) -> bool:
    return all(
        s.dtype == torch.float32 and s.numel() == 1 and s.device == device for s in state_steps
    )


#: The ops whose variant-op checks pass only a storage type (the other lists are checked
#: against it by :func:`fused_sam.backends._checks.check_lists`) and a flat layout.
_VARIANT_OPS = frozenset({"dot_partials", "axpby"})


def unsupported(
    op: str,
    tensors: Sequence[Sequence[Tensor]],
    *,
    masks: Sequence[Tensor] | RandomBits | None = None,
    state_steps: Sequence[Tensor] | None = None,
) -> str | None:
    """Why the kernels cannot take a call of ``op`` (``None`` when they can).

    Args:
        op: ``norm_sq_partials``, ``perturb``, ``restore``, ``restore_sgd_step``,
            ``restore_adam_step``, ``dot_partials`` or ``axpby``.
        tensors: the lists of one bucket that the op indexes alike (first list first; an
            absent optional list as ``[]``), none of them empty.
        masks: the bit masks of ``perturb``.
        state_steps: the step counters of ``restore_adam_step``.

    Returns:
        ``"dtype"`` (a storage type the kernels do not take, or several in one call),
        ``"layout"`` (tensors a flat kernel cannot pair index for index), ``"mask layout"``
        (a mask not readable as bytes) or ``"step counters not float32 on the tensors'
        device"``; :data:`fused_sam.functional.FALLBACKS` counts them under these names.
    """
    mask_list = list(masks) if masks is not None and not isinstance(masks, RandomBits) else []
    lists = [*tensors, mask_list, list(state_steps or [])]
    tag = f"unsupported:{op}:{masks is None}:{state_steps is None}"
    return _memo(tag, lists, lambda: _unsupported(op, tensors, masks, state_steps))


def _unsupported(
    op: str,
    tensors: Sequence[Sequence[Tensor]],
    masks: Sequence[Tensor] | RandomBits | None,
    state_steps: Sequence[Tensor] | None,
) -> str | None:
    first = tensors[0][0]
    if op in _VARIANT_OPS:
        if first.dtype not in SUPPORTED:
            return "dtype"
        return None if _flat(*tensors) else "layout"
    if state_steps is not None and not _steps_ok(state_steps, first.device):
        return "step counters not float32 on the tensors' device"
    if not _uniform(first.dtype, *tensors):
        return "dtype"
    if (
        masks is not None
        and not isinstance(masks, RandomBits)
        and not all(_mask_ok(m, p) for m, p in zip(masks, tensors[0]))
    ):
        return "mask layout"
    return None


def _refuse(op: str, reason: str | None) -> None:
    """A direct call with tensors the kernels cannot take: an error, never a wrong result."""
    if reason is not None:
        raise ValueError(
            f"fused_sam triton: {op} cannot take these tensors ({reason}); call it through "
            "fused_sam.functional, which runs them on the foreach backend"
        )


def _check_like(params: Sequence[Tensor], **lists: Sequence[Tensor]) -> None:
    """Every list has one tensor per parameter, of its shape and on its device.

    The kernels index each tensor by its parameter's element count: a state tensor of another
    shape (e.g. from a checkpoint of another model) would be read and written out of bounds.
    The native ops make the same checks in C++. Remembered per layout (see :func:`_memo`).
    """
    tag = "like:" + ",".join(lists)
    _memo(tag, [params, *lists.values()], lambda: _check_like_now(params, lists))


def _check_like_now(params: Sequence[Tensor], lists: dict[str, Sequence[Tensor]]) -> None:
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


def device_hyper(value: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
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


def _sumsqs(sumsqs: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """The norm partials to check, as the list the op takes; each must be on the parameters'
    device (the kernel reads them there: a host tensor would need a copy, a host read of a
    device one a synchronisation)."""
    out = list(sumsqs)
    for s in out:
        if s.device != device:
            raise ValueError(
                f"fused_sam triton: sumsqs must be on the parameters' device ({device}), "
                f"got a tensor on {s.device}; move it there first (functional does)"
            )
    return out


def _empty_skip(found_inf: Tensor | None, sumsqs: Sequence[Tensor]) -> Tensor:
    """The skip flag of a call without parameters (nothing to launch over), from torch ops on
    the device of ``found_inf`` or the first entry of ``sumsqs`` (the CPU without either)."""
    tensors = [t for t in (found_inf, *sumsqs) if t is not None]
    device = tensors[0].device if tensors else torch.device("cpu")
    skip = skip_flag(found_inf, sumsqs, device)
    return torch.zeros((), dtype=torch.bool, device=device) if skip is None else skip


# ---------------------------------------------------------------------------------------------
# The backend interface (signatures of fused_sam.reference)


def norm_sq_partials(
    grads: Sequence[Tensor], params: Sequence[Tensor], adaptive: bool, eta: float
) -> Tensor:
    """See :func:`fused_sam.reference.norm_sq_partials`: one launch whose last program writes
    the total, returned as a 1-element float64 tensor on the grads' device (one value per
    bucket for :func:`perturb_` and the restore ops to read, not one per program)."""
    if not grads:
        return torch.zeros(1, dtype=torch.float64)
    _refuse("norm_sq_partials", unsupported("norm_sq_partials", [grads, params]))
    return call("norm_sq_partials", list(grads), list(params), adaptive, float(eta))


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
    one-element tensor on the parameters' device, read by the kernel (see :func:`device_hyper`).
    """
    if not params:
        return
    _check_like(params, grads=grads, backups=backups)
    _refuse("perturb", unsupported("perturb", [params, grads, backups], masks=masks))
    random = masks if isinstance(masks, RandomBits) else None
    rho_mult, rho_t = device_hyper(rho, params[0].device)
    call(
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
    _refuse("restore", unsupported("restore", [params, backups]))
    call("restore", list(params), list(backups))


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
    """See :func:`fused_sam.reference.restore_sgd_step_`: one launch, which decides the skip
    on the device from ``found_inf`` and the totals of ``sumsqs`` and writes the returned
    0-dim bool flag itself (no host read). ``hyper.lr`` may be a one-element tensor on the
    parameters' device, read by the kernel."""
    if not params:
        return _empty_skip(found_inf, sumsqs)
    bufs = list(momentum_buffers) if hyper.momentum != 0 else []
    optional = {"momentum_buffers": bufs} if bufs else {}
    _check_like(params, grads=grads, backups=backups, **optional)
    _refuse("restore_sgd_step", unsupported("restore_sgd_step", [params, grads, backups, bufs]))
    lr_mult, lr_t = device_hyper(hyper.lr, params[0].device)
    return call(
        "restore_sgd_step",
        list(params),
        list(grads),
        list(backups),
        bufs,
        lr_mult,
        float(hyper.weight_decay),
        float(hyper.momentum),
        float(hyper.dampening),
        bool(hyper.nesterov),
        bool(hyper.maximize),
        bool(first_step),
        grad_scale,
        found_inf,
        lr_t,
        _sumsqs(sumsqs, params[0].device),
    )


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
    """See :func:`fused_sam.reference.restore_adam_step_`: one launch, which decides the skip
    on the device (as :func:`restore_sgd_step_`), returns the flag it writes, and advances
    the step counters unless skipped. ``hyper.lr`` may be a one-element tensor on the
    parameters' device, read by the kernel."""
    if not params:
        return _empty_skip(found_inf, sumsqs)
    amsgrad = hyper.amsgrad
    vmax = list(max_exp_avg_sqs) if amsgrad else []
    _check_like(
        params,
        grads=grads,
        backups=backups,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        **({"max_exp_avg_sqs": vmax} if amsgrad else {}),
    )
    lists = [params, grads, backups, exp_avgs, exp_avg_sqs, vmax]
    _refuse(
        "restore_adam_step",
        unsupported("restore_adam_step", lists, state_steps=state_steps),
    )
    lr_mult, lr_t = device_hyper(hyper.lr, params[0].device)
    return call(
        "restore_adam_step",
        list(params),
        list(grads),
        list(backups),
        list(exp_avgs),
        list(exp_avg_sqs),
        vmax,
        list(state_steps),
        lr_mult,
        float(hyper.beta1),
        float(hyper.beta2),
        float(hyper.eps),
        float(hyper.weight_decay),
        bool(amsgrad),
        bool(hyper.maximize),
        bool(hyper.decoupled_weight_decay),
        grad_scale,
        found_inf,
        lr_t,
        _sumsqs(sumsqs, params[0].device),
    )


def dot_partials(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """See :func:`fused_sam.reference.dot_partials`: one launch over every tensor pair
    (float64 products and sums for every storage type) whose last program writes the total,
    returned as a 1-element float64 tensor."""
    check_lists("dot_partials", a, b=b)
    _refuse("dot_partials", unsupported("dot_partials", [a, b]))
    return call("dot_partials", list(a), list(b))


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
    _refuse("axpby", unsupported("axpby", [out, x, y]))
    call("axpby", list(out), list(x), list(y), coefs, skip)
