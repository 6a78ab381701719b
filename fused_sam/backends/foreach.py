"""Portable backend built from ``torch._foreach_*`` ops (CPU and every torch device).

A few launches per op whatever the number of tensors, and on accelerators no host
synchronisation and no ``.item()``: the norm, the scale and the non-finite decision stay on the
device. (On the CPU, where reading a scalar costs nothing, the perturbation uses it to avoid
temporaries.) Low-precision tensors are computed in float32 and rounded once when written back.

Unlike a flat kernel, torch ops index every tensor through its strides, so this backend also
takes the tensors a flat kernel cannot (non-dense, or with unequal strides); ``functional``
routes them here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fused_sam.backends._checks import check_axpby, check_lists
from fused_sam.backends._skip import skip_flag
from fused_sam.hyperparams import AdamHyper, SGDHyper
from fused_sam.masks.bits import RandomBits, random_mask, unpack_bits

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

FLAT = False

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device) -> str | None:
    """torch's foreach ops exist on every device torch supports."""
    return None


def _f32(ts: Sequence[Tensor]) -> list[Tensor]:
    """The tensors themselves, or float32 copies of low-precision ones (math in fp32+)."""
    return [t.float() if t.dtype in _LOW_PRECISION else t for t in ts]


def _f32_copy(ts: Sequence[Tensor]) -> list[Tensor]:
    """Like :func:`_f32`, but always new tensors, safe to update in place."""
    return [t.float() if t.dtype in _LOW_PRECISION else t.clone() for t in ts]


def _scaling(
    params: Sequence[Tensor], eta: float, dtype: torch.dtype | None = None
) -> list[Tensor]:
    """``T(w) = |w| + eta`` in float32 (float64 for float64 tensors), or in ``dtype``."""
    t = torch._foreach_abs(_f32(params) if dtype is None else [p.to(dtype) for p in params])
    if eta != 0:
        torch._foreach_add_(t, eta)
    return t


def norm_sq_partials(
    grads: Sequence[Tensor], params: Sequence[Tensor], adaptive: bool, eta: float
) -> Tensor:
    """See :func:`fused_sam.reference.norm_sq_partials`; one float64 partial per tensor.

    The norms are taken in float64 (the squares of any finite gradient fit there) and squared
    there, so a large finite gradient, e.g. one scaled by an AMP loss scale, never gives an
    infinite norm, and float64 tensors of a step keep float64 precision.
    """
    if adaptive:
        scaled = _scaling(params, eta, torch.float64)
        torch._foreach_mul_(scaled, [g.double() for g in grads])
        norms = torch._foreach_norm(scaled, 2)
    else:
        norms = torch._foreach_norm(list(grads), 2, dtype=torch.float64)
    return torch.stack(norms).square()


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    sumsq: Tensor,
    rho: float,
    eps: float,
    adaptive: bool,
    eta: float,
    masks: Sequence[Tensor] | RandomBits | None,
) -> None:
    """See :func:`fused_sam.reference.perturb_`."""
    params, grads = list(params), list(grads)
    keep, rho = _materialise(masks, params, rho)
    torch._foreach_copy_(list(backups), params)
    norm = sumsq.double().sum().sqrt()
    if params[0].device.type == "cpu":
        # On the CPU there is no device queue to drain, so reading the norm costs nothing, and
        # a Python scale lets one in-place multi-tensor op apply e with no temporaries.
        value = float(norm)
        if math.isfinite(value):
            _add_scaled(params, grads, rho / (value + eps), adaptive, eta, keep)
    else:
        _add_guarded(params, grads, norm, rho, eps, adaptive, eta, keep)


def _materialise(
    masks: Sequence[Tensor] | RandomBits | None, params: list[Tensor], rho: float
) -> tuple[list[Tensor] | None, float]:
    """The masks as bool tensors laid out like the params, and rho times a random mask's
    ``1 / keep`` (this backend computes the bits with tensor ops instead of in a kernel)."""
    if masks is None:
        return None, rho
    if isinstance(masks, RandomBits):
        return [random_mask(masks, i, w) for i, w in enumerate(params)], rho * masks.scale
    return [unpack_bits(m, w) for m, w in zip(masks, params)], rho


def _add_guarded(
    params: list[Tensor],
    grads: list[Tensor],
    norm: Tensor,
    rho: float,
    eps: float,
    adaptive: bool,
    eta: float,
    masks: list[Tensor] | None,
) -> None:
    """``w += e`` with the scale and the non-finite decision on the device (no host sync)."""
    # ASAM's T(w)^2 g needs float64 (see _asam_e); SAM's scale * g fits the gradient's dtype.
    acc = torch.float64 if adaptive or grads[0].dtype == torch.float64 else torch.float32
    finite = torch.isfinite(norm)
    scale = torch.where(finite, rho / (norm + eps), torch.zeros_like(norm)).to(acc)
    # On an accelerator the decision stays on the device: e lives in one flat buffer so that
    # the non-finite guard below is a single launch.
    numels = [g.numel() for g in grads]
    flat = torch.cat([g.reshape(-1).to(acc) for g in grads])
    if adaptive:
        t = torch.cat([w.reshape(-1).to(acc) for w in params]).abs_().add_(eta)
        flat.mul_(t).mul_(scale).mul_(t)  # (scale * (T g)) * T: in range, as _asam_e
    else:
        flat.mul_(scale)
    if masks is not None:
        flat.mul_(torch.cat([m.reshape(-1) for m in masks]))
    # scale is 0 when the norm is not finite, but 0 * inf = nan where a gradient itself is not
    # finite: zero those so a skipped perturbation leaves the weights bit-identical.
    flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    e = [v.view(g.shape) for v, g in zip(flat.split(numels), grads)]
    torch._foreach_add_(params, e)


def _add_scaled(
    params: list[Tensor],
    grads: list[Tensor],
    scale: float,
    adaptive: bool,
    eta: float,
    masks: list[Tensor] | None,
) -> None:
    """``w += scale * T(w)^2 * g * m`` with a host scale (the CPU path of :func:`perturb_`).

    ``alpha=scale`` is only used with float32/float64 tensors: torch converts ``alpha`` to the
    tensors' dtype, which for float16 fails (or loses precision) once ``rho / ||g||`` exceeds
    what the dtype holds, so low-precision tensors get ``e`` scaled in float32 first.
    """
    low = params[0].dtype in _LOW_PRECISION
    if not adaptive and masks is None and not low:
        torch._foreach_add_(params, grads, alpha=scale)
        return
    if adaptive:
        e = _asam_e(params, grads, scale, eta)
        if masks is not None:
            torch._foreach_mul_(e, masks)
        torch._foreach_add_(params, e)  # computed in float64, rounded once to the params' dtype
        return
    e = _f32_copy(grads)
    if masks is not None:
        torch._foreach_mul_(e, masks)
    if low:
        torch._foreach_mul_(e, scale)
        torch._foreach_add_(params, e)  # computed in float32, rounded once to the params' dtype
    else:
        torch._foreach_add_(params, e, alpha=scale)


def _asam_e(
    params: Sequence[Tensor], grads: Sequence[Tensor], scale: float | Tensor, eta: float
) -> list[Tensor]:
    """ASAM's ``e = scale * T(w)^2 * g`` in float64, as ``(scale * (T g)) * T``.

    ``T(w)^2 g`` itself overflows float32 where ``e`` is finite (``|w| ~ 1e4`` with
    ``g ~ 1e31``, or ``|w| ~ 1e20``): in float64 it cannot for float32-or-lower inputs, and
    the order keeps every intermediate at most ``rho * T`` (``|T g| <= ||T g||``), so float64
    parameters stay in range too.
    """
    t = _scaling(params, eta, torch.float64)
    e = torch._foreach_mul(t, [g.double() for g in grads])
    torch._foreach_mul_(e, scale)
    torch._foreach_mul_(e, t)
    return e


def dot_partials(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """See :func:`fused_sam.reference.dot_partials`; one partial.

    Each list is flattened into one float64 vector (one concatenation, in each tensor's logical
    order, so the lists pair up whatever their strides) and one ``dot`` takes the products, exact
    in float64 for inputs of float32 or less: a few launches whatever the number of tensors, at
    the price of two float64 copies.
    """
    check_lists("dot_partials", a, b=b)
    flat_a = torch.cat([t.reshape(-1) for t in a]).double()
    flat_b = torch.cat([t.reshape(-1) for t in b]).double()
    return torch.dot(flat_a, flat_b).reshape(1)


def axpby_(
    out: Sequence[Tensor],
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    coefs: Tensor,
    skip: Tensor | None,
) -> None:
    """See :func:`fused_sam.reference.axpby_`: float64 multi-tensor ops, one rounding into
    ``out``; on accelerators the skip flag and the coefficients stay on the device."""
    check_axpby(out, x, y, coefs, skip)
    out = list(out)
    if skip is not None and out[0].device.type == "cpu" and bool(skip):
        return
    c = coefs.double()
    new = torch._foreach_mul([t.double() for t in x], c[0])
    torch._foreach_add_(new, torch._foreach_mul([t.double() for t in y], c[1]))
    if skip is not None and out[0].device.type != "cpu":
        flag = skip.ne(0)
        new = [torch.where(flag, o.double(), n) for o, n in zip(out, new)]
    torch._foreach_copy_(out, new)


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """Exact restore: ``w = backup`` with one multi-tensor copy."""
    torch._foreach_copy_(list(params), list(backups))


def _select(skip: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    return new if skip is None else torch.where(skip, old, new)


def _flag(skip: Tensor | None, device: torch.device) -> Tensor:
    """The skip flag a restore step returns."""
    return torch.zeros((), dtype=torch.bool, device=device) if skip is None else skip


def _prepare(
    grads: Sequence[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    sumsqs: Sequence[Tensor],
    maximize: bool,
) -> tuple[list[Tensor], Tensor | None]:
    g = _f32_copy(grads)
    if grad_scale is not None:
        torch._foreach_div_(g, grad_scale)
    if maximize:
        torch._foreach_neg_(g)
    return g, skip_flag(found_inf, sumsqs, grads[0].device)


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
    """See :func:`fused_sam.reference.restore_sgd_step_`. The skip is decided on device."""
    lr, weight_decay, momentum, dampening, nesterov, maximize = hyper
    restore_(params, backups)
    d, skip = _prepare(grads, grad_scale, found_inf, sumsqs, maximize)
    w32 = _f32(params)
    if weight_decay != 0:
        torch._foreach_add_(d, w32, alpha=weight_decay)
    if momentum != 0:
        if first_step:
            v = [x.clone() for x in d]
        else:
            v = torch._foreach_mul(_f32(momentum_buffers), momentum)
            torch._foreach_add_(v, d, alpha=1 - dampening)
        for buf, new in zip(momentum_buffers, v):
            buf.copy_(_select(skip, buf, new.to(buf.dtype)))
        if nesterov:
            torch._foreach_add_(d, v, alpha=momentum)
        else:
            d = v
    new_w = torch._foreach_add(w32, d, alpha=-lr)
    for w, nw in zip(params, new_w):
        w.copy_(_select(skip, w, nw.to(w.dtype)))
    return _flag(skip, params[0].device)


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
    """See :func:`fused_sam.reference.restore_adam_step_`. The skip is decided on device."""
    lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay = hyper
    restore_(params, backups)
    g, skip = _prepare(grads, grad_scale, found_inf, sumsqs, maximize)
    w = _f32_copy(params)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(w, 1 - lr * weight_decay)
        else:
            torch._foreach_add_(g, w, alpha=weight_decay)
    m = torch._foreach_mul(_f32(exp_avgs), beta1)
    torch._foreach_add_(m, g, alpha=1 - beta1)
    v = torch._foreach_mul(_f32(exp_avg_sqs), beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    vmax = torch._foreach_maximum(_f32(max_exp_avg_sqs), v) if amsgrad else v
    for i, p in enumerate(params):
        step_t = state_steps[i]
        new_step = step_t + 1
        step = new_step.to(p.device, w[i].dtype)
        bias_c1 = 1 - beta1**step
        bias_c2_sqrt = (1 - beta2**step).sqrt()
        denom = vmax[i].sqrt() / bias_c2_sqrt + eps
        new_w = w[i] - (lr / bias_c1) * m[i] / denom
        exp_avgs[i].copy_(_select(skip, exp_avgs[i], m[i].to(exp_avgs[i].dtype)))
        exp_avg_sqs[i].copy_(_select(skip, exp_avg_sqs[i], v[i].to(exp_avg_sqs[i].dtype)))
        if amsgrad:
            mx = max_exp_avg_sqs[i]
            mx.copy_(_select(skip, mx, vmax[i].to(mx.dtype)))
        p.copy_(_select(skip, p, new_w.to(p.dtype)))
        step_skip = None if skip is None else skip.to(step_t.device)
        step_t.copy_(_select(step_skip, step_t, new_step))
    return _flag(skip, params[0].device)
