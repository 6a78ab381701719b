"""The reference implementation of the SAM ops: the test oracle.

Every backend (``foreach``, the native C++/CUDA extension, Triton) implements exactly these
functions with exactly these signatures; ``fused_sam.functional`` dispatches to one of them.
This module is deliberately naive: plain Python loops over tensors, element math in float64,
one result rounded to the storage dtype at the end. It is never optimised and never "fixed" to
agree with a kernel; kernels are fixed to agree with it.

Conventions shared by all backends:

* Every list holds tensors of one device and one dtype (the caller buckets them); the tensors of
  one index (``params[i]``, ``grads[i]``, ``backups[i]``, state ``[i]``) have equal shapes.
* ``T(w)`` is the ASAM scaling: ``|w| + eta`` when ``adaptive`` is true, ``1`` otherwise.
* ``sumsq`` is a 1-D tensor of partial sums whose total is the squared (scaled) gradient norm
  over *all* parameters of the step; a kernel reduces it itself, in a fixed order. Partials are
  float64 whatever the parameter dtype, squares included: the square of a finite float32 (or
  float16/bfloat16) value and any sum of them are finite in float64, so any finite gradient,
  loss-scaled ones included, has a finite norm.
* A perturbation is skipped when its norm is not finite (``sumsq`` total is inf/nan). A base
  step is skipped when ``found_inf`` is nonzero or the total of any of its ``sumsqs`` (the
  partials of the first pass, and of the second when it is checked) is not finite; the restore
  ops return that decision as a 0-dim bool tensor on the parameters' device, computed by the
  kernels from those device values (no host read). A skipped perturbation leaves the weights
  bit-identical; a skipped base step still restores the weights and leaves the optimizer state
  untouched (step counters included).
* Masks are bit-packed ``uint8`` tensors, one per parameter, ``ceil(numel / 8)`` bytes, element
  ``k`` of the flattened tensor (in memory order of a dense tensor) is bit ``k % 8`` of byte
  ``k // 8`` (little-endian bit order, the layout of :func:`fused_sam.masks.pack_bits`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fused_sam.hyperparams import AdamHyper, SGDHyper
from fused_sam.masks.bits import RandomBits, random_mask, unpack_bits

__all__ = [
    "axpby_",
    "dot_partials",
    "norm_sq_partials",
    "perturb_",
    "restore_",
    "restore_adam_step_",
    "restore_sgd_step_",
]


#: Reference loops index every tensor through torch, so any layout is fine.
FLAT = False


def unavailable_reason(device: torch.device) -> str | None:
    """The reference path runs wherever torch runs."""
    return None


def _scale_t(w: Tensor, adaptive: bool, eta: float) -> Tensor:
    """ASAM operator T(w) in float64 (1 for plain SAM)."""
    if adaptive:
        return w.double().abs() + eta
    return torch.ones_like(w, dtype=torch.float64)


def norm_sq_partials(
    grads: Sequence[Tensor], params: Sequence[Tensor], adaptive: bool, eta: float
) -> Tensor:
    r"""Partial sums of squares of the (ASAM-scaled) gradient.

    .. math:: s = \sum_i \sum_j \big(T(w_{ij})\, g_{ij}\big)^2

    Args:
        grads: first-pass gradients.
        params: the parameters (read only when ``adaptive``).
        adaptive: apply ``T(w) = |w| + eta``.
        eta: ASAM offset.

    Returns:
        A 1-element float64 tensor on the grads' device holding ``s``. Non-finite gradients
        make it non-finite.
    """
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g, w in zip(grads, params):
        t = _scale_t(w, adaptive, eta)
        total = total + ((t * g.double()) ** 2).sum()
    return total.reshape(1)


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
    r"""Write ``backup = w`` and move the weights to the SAM ascent point, in place.

    .. math::
        n = \sqrt{\textstyle\sum_k s_k}, \qquad
        e = \frac{\rho\, T(w)^2\, g}{n + \epsilon} \odot m, \qquad w \leftarrow w + e

    When ``n`` is not finite nothing is perturbed (``e = 0`` exactly) and the weights stay
    bit-identical; the backup is written either way. A negative ``rho`` flips the direction
    (used for ``maximize``).

    Args:
        params: weights, perturbed in place.
        grads: first-pass gradients.
        backups: buffers receiving an exact copy of the weights.
        sumsq: 1-D partial sums from :func:`norm_sq_partials` (all buckets concatenated).
        rho: neighbourhood radius (signed).
        eps: added to the norm.
        adaptive: ASAM scaling.
        eta: ASAM offset.
        masks: optional bit-packed masks (1 = perturb this element), one per parameter; or a
            random mask (:class:`fused_sam.masks.RandomBits`), whose kept entries are also
            multiplied by its ``scale`` (``1 / keep``).
    """
    norm = math.sqrt(float(sumsq.double().sum()))
    finite = math.isfinite(norm)
    scale = rho / (norm + eps) if finite else 0.0
    for i, (w, g, b) in enumerate(zip(params, grads, backups)):
        b.copy_(w)
        if not finite:
            continue
        t = _scale_t(w, adaptive, eta)
        e = scale * t * t * g.double()
        if isinstance(masks, RandomBits):
            e = e * random_mask(masks, i, w).double() * masks.scale
        elif masks is not None:
            e = e * unpack_bits(masks[i], w).double()
        w.copy_((w.double() + e).to(w.dtype))


def dot_partials(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    r"""Partial sums of the dot product of two tensor lists (the global products of the SAM
    variants: LookSAM's and GSAM's projections).

    .. math:: s = \sum_i \sum_j a_{ij}\, b_{ij}

    Products and sums are float64: a product of two float32 (or lower) values is exact there,
    so only the sum rounds.

    Args:
        a, b: tensors of equal shapes, index for index.

    Returns:
        A 1-D float64 tensor on ``a``'s device whose sum is ``s`` (one partial here; a kernel
        may return several). Non-finite entries make it non-finite.
    """
    device = a[0].device if a else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in zip(a, b):
        total = total + (x.double() * y.double()).sum()
    return total.reshape(1)


def axpby_(
    out: Sequence[Tensor],
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    coefs: Tensor,
    skip: Tensor | None,
) -> None:
    r"""``out = a x + b y`` over tensor lists, with the coefficients read on the device.

    .. math:: out_{ij} \leftarrow a\, x_{ij} + b\, y_{ij}, \qquad (a, b) = (c_0, c_1)

    computed in float64 and converted to ``out``'s dtype as torch converts float64 (one
    rounding; to bfloat16/float16 through float32, so two). The coefficients are a device
    tensor because the variants derive them from global dot products and norms, which must
    not be read on the host (that would synchronise an accelerator).

    Args:
        out: written; ``out[i]`` may be ``x[i]`` or ``y[i]`` itself (the math is elementwise),
            otherwise it must not overlap them.
        x, y: read; every list has one dtype and ``out``'s shapes.
        coefs: 1-D float64 tensor ``(a, b)`` on the tensors' device.
        skip: optional flag; when nonzero nothing is written (a skipped step leaves a
            variant's state as it was, whatever non-finite values ``x`` or ``y`` hold).
    """
    if skipped(skip, ()):
        return
    a, b = (float(c) for c in coefs.double().cpu())
    for o, u, v in zip(out, x, y):
        o.copy_((a * u.double() + b * v.double()).to(o.dtype))


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """Exact restore ``w = backup`` (a copy: never ``w - e``, never rebinding ``.data``)."""
    for w, b in zip(params, backups):
        w.copy_(b)


def skipped(found_inf: Tensor | None, sumsqs: Sequence[Tensor]) -> bool:
    """Whether a base step is skipped: ``found_inf`` is nonzero, or the total of some partial
    sums in ``sumsqs`` is not finite (every backend's restore op decides alike)."""
    if found_inf is not None and bool(found_inf.item() != 0):
        return True
    return any(not math.isfinite(float(s.double().sum())) for s in sumsqs)


def _flag(skip: bool, like: Tensor) -> Tensor:
    """The 0-dim bool skip flag the restore ops return, on ``like``'s device."""
    return torch.tensor(skip, dtype=torch.bool, device=like.device)


def _unscaled(g: Tensor, grad_scale: Tensor | None) -> Tensor:
    g = g.double()
    if grad_scale is not None:
        g = g / grad_scale.double()
    return g


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
    r"""Restore ``w = backup`` then take one ``torch.optim.SGD`` step with the second-pass grads.

    .. math::
        w \leftarrow b;\quad d = \pm g / s + \lambda w;\quad
        v \leftarrow \begin{cases} d & \text{first step} \\ \mu v + (1-\tau) d \end{cases};\quad
        d \leftarrow d + \mu v \ \text{(nesterov) else } v;\quad w \leftarrow w - \eta_{lr} d

    Args:
        params, grads, backups: weights (written), second-pass gradients, backups. Passing a
            parameter as its own backup steps it without a restore.
        momentum_buffers: one per parameter when ``momentum != 0`` (empty otherwise); they are
            written even on the first step (their previous contents are ignored then).
        hyper: ``lr, weight_decay, momentum, dampening, nesterov, maximize`` with
            ``torch.optim.SGD``'s semantics.
        first_step: the momentum buffers hold no history yet.
        grad_scale: optional loss scale to divide the gradients by (AMP).
        found_inf: optional flag; when nonzero the weights are restored and nothing else changes.
        sumsqs: 1-D float64 norm partials (:func:`norm_sq_partials`, all buckets concatenated)
            of the passes to check; when the total of one is not finite, as for ``found_inf``.

    Returns:
        0-dim bool tensor on the parameters' device: whether the base step was skipped.
    """
    lr, weight_decay, momentum, dampening, nesterov, maximize = hyper
    restore_(params, backups)
    if skipped(found_inf, sumsqs):
        return _flag(True, params[0])
    for i, (w, g) in enumerate(zip(params, grads)):
        d = _unscaled(g, grad_scale)
        if maximize:
            d = -d
        if weight_decay != 0:
            d = d + weight_decay * w.double()
        if momentum != 0:
            buf = momentum_buffers[i]
            v = d if first_step else momentum * buf.double() + (1 - dampening) * d
            buf.copy_(v.to(buf.dtype))
            d = d + momentum * v if nesterov else v
        w.copy_((w.double() - lr * d).to(w.dtype))
    return _flag(False, params[0])


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
    r"""Restore ``w = backup`` then take one ``torch.optim.Adam`` / ``AdamW`` step.

    .. math::
        t \leftarrow t+1;\quad g \leftarrow \pm g/s\ (+\lambda w \text{ for Adam});\quad
        w \leftarrow w(1-\eta\lambda) \text{ (AdamW)};\\
        m \leftarrow \beta_1 m + (1-\beta_1) g;\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2;\quad
        \hat v = \max(\hat v, v) \text{ (amsgrad)};\\
        w \leftarrow w - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        params, grads, backups: as in :func:`restore_sgd_step_`.
        exp_avgs, exp_avg_sqs: first and second moments, one per parameter.
        max_exp_avg_sqs: one per parameter when ``amsgrad`` (empty otherwise).
        state_steps: 0-dim float32 step counters (``torch.optim.Adam``'s ``state["step"]``),
            incremented unless the step is skipped.
        hyper: ``lr, beta1, beta2, eps, weight_decay, amsgrad, maximize`` with
            ``torch.optim.Adam``'s semantics, and ``decoupled_weight_decay``: AdamW's decoupled
            decay instead of L2 in the gradient.
        grad_scale: optional loss scale to divide the gradients by (AMP).
        found_inf: optional flag; when nonzero the weights are restored and nothing else changes.
        sumsqs: 1-D float64 norm partials (:func:`norm_sq_partials`, all buckets concatenated)
            of the passes to check; when the total of one is not finite, as for ``found_inf``.

    Returns:
        0-dim bool tensor on the parameters' device: whether the base step was skipped.
    """
    lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay = hyper
    restore_(params, backups)
    if skipped(found_inf, sumsqs):
        return _flag(True, params[0])
    for i, (w, g) in enumerate(zip(params, grads)):
        step_t = state_steps[i]
        step_t.add_(1)
        step = float(step_t.item())
        g = _unscaled(g, grad_scale)
        if maximize:
            g = -g
        w64 = w.double()
        if weight_decay != 0:
            if decoupled_weight_decay:
                w64 = w64 * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * w64
        m = beta1 * exp_avgs[i].double() + (1 - beta1) * g
        v = beta2 * exp_avg_sqs[i].double() + (1 - beta2) * g * g
        exp_avgs[i].copy_(m.to(exp_avgs[i].dtype))
        exp_avg_sqs[i].copy_(v.to(exp_avg_sqs[i].dtype))
        if amsgrad:
            v = torch.maximum(max_exp_avg_sqs[i].double(), v)
            max_exp_avg_sqs[i].copy_(v.to(max_exp_avg_sqs[i].dtype))
        bias_c1 = 1 - beta1**step
        bias_c2 = 1 - beta2**step
        denom = v.sqrt() / math.sqrt(bias_c2) + eps
        w.copy_((w64 - (lr / bias_c1) * m / denom).to(w.dtype))
    return _flag(False, params[0])
