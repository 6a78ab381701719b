"""The SAM ops behind one dispatch point.

:class:`fused_sam.FusedSAM` holds no math: it collects tensors and hyperparameters and calls the
functions here. This module is the one place that chooses a backend and splits the tensors into
buckets a backend can take in one call:

* one bucket per ``(device, dtype, per-tensor hyperparameters)``;
* tensors that a flat kernel cannot index as ``p[i], g[i], b[i]`` alike (not non-overlapping and
  dense, or with unequal strides) go to the ``foreach`` backend, which is stride-correct;
* complex tensors are processed through their real view.

Backends are modules with the functions of :mod:`fused_sam.reference` and the same
signatures, plus ``unavailable_reason(device) -> str | None`` and a ``FLAT`` flag. A backend
that cannot take every call has ``unsupported(op, tensors, **extra) -> str | None``: asked for
each bucket before it runs, it names what the backend cannot take, and this module then runs
the bucket on ``foreach`` and counts it in :data:`FALLBACKS` (or raises with
``FUSED_SAM_TRITON_STRICT=1``). Backends decide nothing about each other and import none of
this.
"""

from __future__ import annotations

import functools
import importlib
import operator
import os
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from fused_sam.backends import _checks
from fused_sam.hyperparams import AdamHyper, SGDHyper, with_lr
from fused_sam.masks.bits import RandomBits, unpack_bits

__all__ = [
    "BACKENDS",
    "FALLBACKS",
    "AdamHyper",
    "BackendUnavailableError",
    "Buckets",
    "SGDHyper",
    "available_backends",
    "axpby_",
    "building_graph",
    "capturable",
    "capturing",
    "collect_grads",
    "dot",
    "layout_key",
    "masked_norm_sq",
    "nonfinite",
    "norm_sq",
    "perturb_",
    "plan",
    "resolve_backend",
    "restore_",
    "restore_adam_step_",
    "restore_sgd_step_",
    "uses_fused_base_step",
]

#: Backend names users may pass as ``backend=``, with the module that implements each.
BACKENDS: dict[str, str] = {
    "reference": "fused_sam.reference",
    "foreach": "fused_sam.backends.foreach",
    "cpu": "fused_sam.backends.native",
    "cuda": "fused_sam.backends.native",
    "triton": "fused_sam.backends.triton",
}

# Preference order of ``backend=None`` / ``"auto"`` for each device type.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "foreach"),
    "cpu": ("cpu", "foreach"),
}

# Backends whose restore+step kernels replace ``base_optimizer.step()`` for SGD/Adam/AdamW.
_FUSED_BASE_STEP = frozenset({"cpu", "cuda", "triton"})


class BackendUnavailableError(RuntimeError):
    """A backend named explicitly cannot run here; the message says why and how to fix it."""


_MODULES: dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    mod = _MODULES.get(name)
    if mod is not None:
        return mod
    try:
        path = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {sorted(BACKENDS)} or None for auto"
        ) from None
    mod = _MODULES[name] = importlib.import_module(path)
    return mod


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (``None`` when it can)."""
    try:
        mod = _module(name)
    except ImportError as exc:  # pragma: no cover - a backend module failing to import at all
        return f"cannot import {BACKENDS[name]}: {exc}"
    if name in ("cpu", "cuda") and device.type != name:
        return f"the {name!r} backend runs on {name} tensors, these are on {device}"
    return mod.unavailable_reason(device)


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """Map every backend name to ``None`` (usable on ``device``) or the reason it is not."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device) for name in BACKENDS}


def resolve_backend(name: str | None, device: torch.device) -> str:
    """Pick the backend for tensors on ``device``.

    Args:
        name: ``None`` or ``"auto"`` for the fastest usable backend, or a backend name, which is
            then required: if it cannot run, :class:`BackendUnavailableError` says why instead of
            silently falling back.
        device: the device of the tensors.
    """
    return _resolve(name, torch.device(device))


@functools.cache
def _resolve(name: str | None, device: torch.device) -> str:
    if name is None or name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("foreach",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return name


def building_graph() -> bool:
    """Whether the step is being recorded rather than run: ``torch.compile`` is tracing it, or
    a CUDA graph is capturing it. Then nothing may be read on the host (a traced value has none
    yet; a device read would sync inside the capture) and hyperparameters given as tensors
    stay tensors."""
    if torch.compiler.is_compiling():
        return True
    return _cuda_present() and torch.cuda.is_current_stream_capturing()


@functools.cache
def _cuda_present() -> bool:
    """Whether this process has CUDA (asked once: the answer does not change, and every step
    asks whether it is being captured)."""
    return torch.cuda.is_available()


def uses_fused_base_step(name: str | None, devices: Iterable[torch.device]) -> bool:
    """Whether the backend chosen for every device fuses restore with the SGD/Adam/AdamW update.

    Backends that do not (``reference``, ``foreach``) restore and then call the base
    optimizer's own ``step()``, which keeps a ``rho = 0`` run bit-identical to the base alone.
    """
    resolve = _resolve_traced if torch.compiler.is_compiling() else _resolve
    return all(resolve(name, torch.device(d)) in _FUSED_BASE_STEP for d in devices)


#: Backends whose kernels read every hyperparameter and flag on the device, so that a CUDA
#: graph can capture a whole SAM step (see the README, CUDA graphs). The native CUDA kernels
#: read ``lr``/``rho`` given as CUDA tensors on the device (native.py, ``_on_device``).
_CAPTURABLE = frozenset({"triton", "cuda"})


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return _cuda_present() and torch.cuda.is_current_stream_capturing()


def capturable(name: str | None, devices: Iterable[torch.device]) -> bool:
    """Whether the backend chosen for every device can run inside a CUDA graph capture."""
    return all(_resolve(name, torch.device(d)) in _CAPTURABLE for d in devices)


def collect_grads(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], bool, bool]:
    """The parameters that have a gradient, their gradients, whether all those are contiguous,
    and whether one is sparse (one C++ pass with the extension, Python passes without; plain
    Python while traced, where a pybind call is opaque and what it reads is static)."""
    if not torch.compiler.is_compiling():
        fast = _native_fast("collect_grads", params)
        if fast is not None:
            return fast
    ps = [p for p in params if p.grad is not None]
    gs = [p.grad for p in ps]
    if any(g.is_sparse for g in gs):
        return ps, gs, False, True
    return ps, gs, all(g.is_contiguous() for g in gs), False


def layout_key(tensors: list[Tensor]) -> tuple[Hashable, bool]:
    """Every tensor's address, sizes, strides and dtype as one comparable value, and whether
    all are contiguous (one C++ pass with the extension; the key is ``None`` for sparse
    tensors, which have no strides)."""
    fast = _native_fast("layout_key", tensors)
    if fast is not None:
        return fast
    layout = (
        tuple(t.data_ptr() for t in tensors),
        tuple(t.size() for t in tensors),
        tuple(t.stride() for t in tensors),
        tuple(t.dtype for t in tensors),
    )
    return layout, all(t.is_contiguous() for t in tensors)


def _native_fast(name: str, tensors: list[Tensor]) -> Any:
    """``native.<name>(tensors)``: ``None`` without the extension."""
    try:
        mod = _module("cpu")
    except ImportError:  # pragma: no cover - the module imports without the extension
        return None
    return getattr(mod, name)(tensors)


# ---------------------------------------------------------------------------------------------
# Bucketing


#: Re-exported from the leaf module that the backends share (see :mod:`fused_sam.backends._checks`).
is_dense = _checks.is_dense
_flat_ok = _checks.flat_ok


_DTYPE = operator.attrgetter("dtype")

#: ``(backend, indices)`` pairs: which backend runs which tensors of a call (see :func:`plan`).
Buckets = list[tuple[str, list[int]]]


def plan(
    backend: str | None,
    columns: Sequence[Sequence[Tensor] | None],
    extras: Sequence[Hashable] | None = None,
) -> Buckets:
    """Split the tensors of a call between backends, once, for reuse by several ops.

    Every op below buckets its tensors itself, which for lists of a thousand tensors costs a
    good part of a millisecond per call. A caller that issues several ops over the same tensors
    (as :class:`~fused_sam.FusedSAM` does in one step) may compute the buckets once and pass
    them as ``buckets=``. They stay valid for another call when its tensors are, index for
    index, of the same device and dtype, all contiguous whenever those of the planned call
    were, and when its per-index hyperparameters are uniform within each bucket.

    Args:
        backend: the backend request (a name, or ``None`` for auto), resolved per device.
        columns: the per-index tensor lists of the call (``None`` for an absent list); the first
            decides device and dtype.
        extras: per-index hyperparameters that must be equal within a bucket.

    Returns:
        ``(backend name, ascending indices)`` pairs covering every index once; indices a flat
        kernel cannot take (non-dense, or strides that differ per index) go to ``foreach``.

    This runs for every op of every step that is given no buckets, so the common case (uniform
    hyperparameters, contiguous tensors) costs a few C-level passes: torch's own C++ grouping
    by device and dtype, and one contiguity scan per column.
    """
    first = columns[0]
    assert first is not None
    if not first:
        return []
    if torch.compiler.is_compiling():
        return _traced_buckets(backend, columns, extras)
    cols = [c for c in columns if c is not None]
    all_contiguous = all(all(map(Tensor.is_contiguous, c)) for c in cols)
    if extras is not None and extras.count(extras[0]) != len(extras):
        return _buckets_by_extras(backend, cols, extras, all_contiguous)
    out: list[tuple[str, list[int]]] = []
    groups = torch._C._group_tensors_by_device_and_dtype([list(first)], True)
    for (device, _dtype), (_, idx) in groups.items():
        name = _resolve(backend, device)
        if not _module(name).FLAT or all_contiguous:
            out.append((name, list(idx)))
            continue
        flat = {i: _flat_ok([c[i] for c in cols]) for i in idx}
        ok, rest = [i for i in idx if flat[i]], [i for i in idx if not flat[i]]
        out += [(chosen, part) for chosen, part in ((name, ok), ("foreach", rest)) if part]
    return out


def _buckets_by_extras(
    backend: str | None,
    cols: list[Sequence[Tensor]],
    extras: Sequence[Hashable],
    all_contiguous: bool,
) -> Buckets:
    """:func:`plan` for per-index hyperparameters that differ: a plain per-index pass."""
    per_device: dict[torch.device, tuple[str, bool]] = {}
    groups: dict[Hashable, list[int]] = {}
    for i, t in enumerate(cols[0]):
        device = t.device
        resolved = per_device.get(device)
        if resolved is None:
            name = _resolve(backend, device)
            resolved = per_device[device] = (name, _module(name).FLAT)
        chosen, flat = resolved
        if flat and not all_contiguous and not _flat_ok([c[i] for c in cols]):
            chosen = "foreach"
        groups.setdefault((chosen, device, t.dtype, extras[i]), []).append(i)
    return [(key[0], idx) for key, idx in groups.items()]


def _traced_buckets(
    backend: str | None,
    columns: Sequence[Sequence[Tensor] | None],
    extras: Sequence[Hashable] | None,
) -> Buckets:
    """:func:`plan` under ``torch.compile``: plain Python over the tensors, which Dynamo traces.

    Devices, dtypes and strides are static while tracing (guarded), so the grouping costs
    nothing at run time; torch's C++ grouping and the cached backend lookup are not traceable.
    """
    cols = [c for c in columns if c is not None]
    groups: dict[Hashable, list[int]] = {}
    for i, t in enumerate(cols[0]):
        chosen = _resolve_traced(backend, t.device)
        if _module(chosen).FLAT and not _flat_ok([c[i] for c in cols]):
            chosen = "foreach"
        extra = None if extras is None else extras[i]
        groups.setdefault((chosen, t.device, t.dtype, extra), []).append(i)
    return [(key[0], idx) for key, idx in groups.items()]


@torch.compiler.assume_constant_result
def _resolve_traced(name: str | None, device: torch.device) -> str:
    """:func:`resolve_backend` as a constant of the traced program (it depends on the build)."""
    return _resolve(name, device)


#: Calls handed to the ``foreach`` backend, by ``(op, reason)``: the tensors of a bucket that the
#: Triton kernels do not take (an unsupported dtype, a mask they cannot read as bytes, Adam step
#: counters that are not float32 on the tensors' device; see
#: :func:`fused_sam.backends.triton.unsupported`) are never moved over silently.
FALLBACKS: Counter[tuple[str, str]] = Counter()


def _route(
    chosen: str,
    op: str,
    tensors: Sequence[Sequence[Tensor]],
    **extra: Any,
) -> ModuleType:
    """The backend module that runs one bucket of ``op``: ``chosen``, or ``foreach`` for a
    bucket that ``chosen`` reports it cannot take (its ``unsupported(op, tensors, **extra)``),
    counted in :data:`FALLBACKS`.

    With ``FUSED_SAM_TRITON_STRICT=1`` such a bucket raises instead (for tests and for users
    who want to know that every call runs the Triton kernels).
    """
    mod = _module(chosen)
    check = getattr(mod, "unsupported", None)
    if check is None:
        return mod
    reason = check(op, tensors, **extra)
    if reason is None:
        return mod
    if os.environ.get("FUSED_SAM_TRITON_STRICT") == "1":
        raise RuntimeError(f"fused_sam {chosen}: {op} would run on the foreach backend: {reason}")
    FALLBACKS[(op, reason)] += 1
    return _module("foreach")


def _pick(seq: Sequence[Tensor] | None, idx: list[int]) -> list[Tensor] | None:
    """The tensors of one bucket; complex ones as their real view (a bucket has one dtype)."""
    if seq is None:
        return None
    # Indices are ascending and distinct, so as many as the list holds means all of them.
    out = list(seq) if len(idx) == len(seq) else [seq[i] for i in idx]
    if out and out[0].is_complex():
        return [torch.view_as_real(t) for t in out]
    return out


# ---------------------------------------------------------------------------------------------
# The ops


def norm_sq(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    adaptive: Sequence[bool],
    eta: Sequence[float],
    backend: str | None,
    *,
    buckets: Buckets | None = None,
) -> Tensor:
    """Partial sums of squares of the (ASAM-scaled) gradient over every tensor given.

    Args:
        grads, params: one entry per tensor (params read only where ``adaptive``).
        adaptive, eta: per-tensor ASAM switch and offset.
        backend: the backend request (a name, or ``None`` for auto), resolved per device.
        buckets: from :func:`plan`, to skip bucketing (this and every op below).

    Returns:
        A 1-D float64 tensor on ``grads[0]``'s device whose sum is the squared global norm
        (finite for any finite gradients: the squares are taken in float64).
    """
    parts: list[Tensor] = []
    if buckets is None:
        buckets = plan(backend, [grads, params], list(zip(adaptive, eta)))
    for chosen, idx in buckets:
        i0 = idx[0]
        g, p = _pick(grads, idx), _pick(params, idx)
        mod = _route(chosen, "norm_sq_partials", [g, p])
        parts.append(mod.norm_sq_partials(g, p, adaptive[i0], eta[i0]))
    return _gather(parts, grads[0].device)


def masked_norm_sq(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    adaptive: Sequence[bool],
    eta: Sequence[float],
    masks: Sequence[Tensor],
    backend: str | None,
) -> Tensor:
    r"""Like :func:`norm_sq`, over the masked gradient :math:`\lVert T(w)\, (g \odot m) \rVert^2`.

    Builds ``g * m`` with foreach ops (a temporary copy of the gradients: one extra read and
    write of them, plus the mask bytes) and hands it to :func:`norm_sq`; no kernel has a masked
    norm of its own. Non-finite gradients still make the result non-finite (``nan * 0`` is nan).

    Args:
        masks: bit-packed masks, one per tensor (layout of :func:`fused_sam.masks.pack_bits`).
    """
    # Bits follow each parameter's memory order, so unpack against the parameter.
    dense = [unpack_bits(m, p).to(g.dtype) for m, p, g in zip(masks, params, grads)]
    return norm_sq(torch._foreach_mul(list(grads), dense), params, adaptive, eta, backend)


def nonfinite(sumsq: Tensor) -> Tensor:
    """0-dim float32 flag (1.0 = the norm is inf/nan), computed on device without a host sync."""
    return torch.logical_not(torch.isfinite(sumsq.sum())).float()


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    sumsq: Tensor,
    rho: Sequence[float | Tensor],
    eps: float,
    adaptive: Sequence[bool],
    eta: Sequence[float],
    masks: Sequence[Tensor] | RandomBits | None,
    backend: str | None,
    *,
    buckets: Buckets | None = None,
) -> None:
    """Backup the weights and move them to ``w + e`` (see :func:`fused_sam.reference.perturb_`).

    ``rho``, ``adaptive`` and ``eta`` are per tensor; ``sumsq`` comes from :func:`norm_sq`.
    ``masks``: packed bit masks (one per tensor), a random mask drawn in the kernels, or
    ``None``.
    All or nothing: if a bucket raises, the buckets already perturbed are restored from their
    backups before the error propagates (every backend checks its arguments before it writes).
    """
    if buckets is None:
        buckets = plan(backend, [params, grads, backups], list(zip(rho, adaptive, eta)))
    done: list[tuple[ModuleType, list[int]]] = []
    try:
        for chosen, idx in buckets:
            i0 = idx[0]
            if isinstance(masks, RandomBits):
                bucket_masks: Sequence[Tensor] | RandomBits | None = masks.pick(idx)
            else:
                bucket_masks = None if masks is None else [masks[i] for i in idx]
            p, g, b = _pick(params, idx), _pick(grads, idx), _pick(backups, idx)
            mod = _route(chosen, "perturb", [p, g, b], masks=bucket_masks)
            mod.perturb_(
                p,
                g,
                b,
                _on(sumsq, params[i0].device),
                _hyper(mod, rho[i0]),
                eps,
                adaptive[i0],
                eta[i0],
                bucket_masks,
            )
            done.append((mod, idx))
    except BaseException:
        for mod, idx in done:
            mod.restore_(_pick(params, idx), _pick(backups, idx))
        raise


def dot(
    a: Sequence[Tensor],
    b: Sequence[Tensor],
    backend: str | None,
    *,
    buckets: Buckets | None = None,
) -> Tensor:
    """Partial sums of ``sum_i a_i . b_i`` over every tensor pair given, in float64.

    Args:
        a, b: tensors of equal shapes, index for index (one device and dtype per index).
        backend: the backend request (a name, or ``None`` for auto), resolved per device.
        buckets: from :func:`plan`, to skip bucketing.

    Returns:
        A 1-D float64 tensor on ``a[0]``'s device whose sum is the dot product (see
        :func:`fused_sam.reference.dot_partials`).
    """
    parts = []
    for chosen, idx in plan(backend, [a, b]) if buckets is None else buckets:
        u, v = _pick(a, idx), _pick(b, idx)
        parts.append(_route(chosen, "dot_partials", [u, v]).dot_partials(u, v))
    return _gather(parts, a[0].device)


def axpby_(
    out: Sequence[Tensor],
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    coefs: Tensor,
    skip: Tensor | None,
    backend: str | None,
    *,
    buckets: Buckets | None = None,
) -> None:
    """``out = a x + b y`` for every tensor given (see :func:`fused_sam.reference.axpby_`).

    Args:
        out, x, y: one device and dtype per index; ``out[i]`` may be ``x[i]`` or ``y[i]``.
        coefs: 1-D float64 ``(a, b)``, on any device (copied to each bucket's, asynchronously).
        skip: optional 0-dim flag; nonzero writes nothing.
        backend: the backend request (a name, or ``None`` for auto), resolved per device.
        buckets: from :func:`plan`, to skip bucketing.
    """
    if buckets is None:
        buckets = plan(backend, [out, x, y])
    for chosen, idx in buckets:
        device = out[idx[0]].device
        o, u, v = _pick(out, idx), _pick(x, idx), _pick(y, idx)
        _route(chosen, "axpby", [o, u, v]).axpby_(o, u, v, _on(coefs, device), _on(skip, device))


def restore_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    backend: str | None,
    *,
    buckets: Buckets | None = None,
) -> None:
    """Exact restore ``w = backup`` for every tensor given."""
    if buckets is None:
        buckets = plan(backend, [params, backups])
    for chosen, idx in buckets:
        p, b = _pick(params, idx), _pick(backups, idx)
        _route(chosen, "restore", [p, b]).restore_(p, b)


def restore_sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor] | None,
    hyper: SGDHyper,
    *,
    first_step: Sequence[bool],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    sumsqs: Sequence[Tensor] = (),
    backend: str | None,
    buckets: Buckets | None = None,
    state_dtypes_alike: bool = False,
) -> Tensor | None:
    """Restore and take one SGD step (see :func:`fused_sam.reference.restore_sgd_step_`).

    ``momentum_buffers`` is ``None`` when ``hyper.momentum == 0``; ``first_step`` is per tensor.
    ``sumsqs``: the norm partials of the passes whose non-finite norm skips the step.
    ``state_dtypes_alike``: the caller knows every state tensor has its parameter's dtype
    (:func:`state_dtypes_alike` said so for these tensors), so the per-tensor check that routes
    mismatched ones to ``foreach`` is skipped (a pass over every tensor per step).

    Returns:
        The 0-dim bool skip flag, on the first parameter's device (every bucket decides alike:
        from the same flags and partials); ``None`` for empty lists (nothing to step).
    """
    if buckets is None:
        buckets = plan(backend, [params, grads, backups, momentum_buffers], first_step)
    if not state_dtypes_alike:
        buckets = _state_dtypes_apart(buckets, params, [momentum_buffers])
    first: Tensor | None = None
    for chosen, idx in buckets:
        dev = params[idx[0]].device
        p, g, b = _pick(params, idx), _pick(grads, idx), _pick(backups, idx)
        bufs = _pick(momentum_buffers, idx) or []
        mod = _route(chosen, "restore_sgd_step", [p, g, b, bufs if hyper.momentum != 0 else []])
        flag = mod.restore_sgd_step_(
            p,
            g,
            b,
            bufs,
            with_lr(hyper, _hyper(mod, hyper.lr)),
            first_step=first_step[idx[0]],
            grad_scale=_on(grad_scale, dev),
            found_inf=_on(found_inf, dev),
            sumsqs=[_on(t, dev) for t in sumsqs],
        )
        first = flag if first is None else first
    return first


def restore_adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    state_steps: Sequence[Tensor],
    hyper: AdamHyper,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    sumsqs: Sequence[Tensor] = (),
    backend: str | None,
    buckets: Buckets | None = None,
    state_dtypes_alike: bool = False,
) -> Tensor | None:
    """Restore and take one Adam/AdamW step (see :func:`fused_sam.reference.restore_adam_step_`).

    ``max_exp_avg_sqs`` is ``None`` unless ``hyper.amsgrad``; ``sumsqs``,
    ``state_dtypes_alike`` and the returned skip flag: as in :func:`restore_sgd_step_`.
    """
    if buckets is None:
        cols = [params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
        buckets = plan(backend, cols)
    if not state_dtypes_alike:
        states = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
        buckets = _state_dtypes_apart(buckets, params, states)
    first: Tensor | None = None
    for chosen, idx in buckets:
        dev = params[idx[0]].device
        lists = [
            _pick(params, idx),
            _pick(grads, idx),
            _pick(backups, idx),
            _pick(exp_avgs, idx),
            _pick(exp_avg_sqs, idx),
            _pick(max_exp_avg_sqs, idx) or [],
        ]
        steps = [state_steps[i] for i in idx]
        vmax = lists[5] if hyper.amsgrad else []
        mod = _route(chosen, "restore_adam_step", [*lists[:5], vmax], state_steps=steps)
        flag = mod.restore_adam_step_(
            *lists,
            steps,
            with_lr(hyper, _hyper(mod, hyper.lr)),
            grad_scale=_on(grad_scale, dev),
            found_inf=_on(found_inf, dev),
            sumsqs=[_on(t, dev) for t in sumsqs],
        )
        first = flag if first is None else first
    return first


def state_dtypes_alike(params: Sequence[Tensor], states: Sequence[Sequence[Tensor] | None]) -> bool:
    """Whether every tensor of every state list has the dtype of its parameter."""
    dtypes = _dtypes(params)
    return all(_dtypes(c) == dtypes for c in states if c)


def _state_dtypes_apart(
    buckets: Buckets, params: Sequence[Tensor], states: Sequence[Sequence[Tensor] | None]
) -> Buckets:
    """``buckets`` with the tensors whose optimizer state has another dtype than the parameter
    moved to ``foreach`` where the chosen backend needs them alike (``STATE_OF_PARAM_DTYPE``).

    torch's optimizers keep their state's dtype when the model is cast (``model.to(bfloat16)``
    or ``.double()`` after some steps: float32 momentum beside bfloat16 weights) and go on; so
    does ``foreach``, which computes in float32 or wider and writes each tensor in its own
    dtype. The common case (every dtype alike) costs one comparison of dtype lists.
    """
    cols = [c for c in states if c]
    if not cols:
        return buckets
    dtypes = _dtypes(params)
    if all(_dtypes(c) == dtypes for c in cols):
        return buckets
    out: Buckets = []
    for chosen, idx in buckets:
        if not getattr(_module(chosen), "STATE_OF_PARAM_DTYPE", False):
            out.append((chosen, idx))
            continue
        apart = {i for i in idx if any(c[i].dtype != dtypes[i] for c in cols)}
        kept = [i for i in idx if i not in apart]
        moved = [i for i in idx if i in apart]
        out += [(name, part) for name, part in ((chosen, kept), ("foreach", moved)) if part]
    return out


def _dtypes(tensors: Sequence[Tensor]) -> list[torch.dtype]:
    """The dtype of each tensor (one C-level pass eager; plain Python, which Dynamo traces)."""
    if torch.compiler.is_compiling():
        return [t.dtype for t in tensors]
    return list(map(_DTYPE, tensors))


def _hyper(mod: ModuleType, value: float | Tensor) -> float | Tensor:
    """``rho`` or ``lr`` for backend ``mod``: a one-element tensor stays one for a backend that
    takes it (``TENSOR_HYPERPARAMS``, so that torch.compile does not guard on its value); the
    others get its value (a host read)."""
    if isinstance(value, Tensor) and not getattr(mod, "TENSOR_HYPERPARAMS", False):
        return float(value)
    return value


def _gather(parts: list[Tensor], device: torch.device) -> Tensor:
    """The partial sums of every bucket as one 1-D tensor on ``device`` (the first tensor's)."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([_on(p, device) for p in parts])


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    """``t`` on ``device``; asynchronous only toward an accelerator, since a copy into host
    memory may be read by the host (``.item()``, a CPU kernel) before it lands."""
    if t is None:
        return None
    return t.to(device, non_blocking=device.type != "cpu")
