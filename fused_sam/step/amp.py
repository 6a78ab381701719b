"""Mixed precision: torch.amp.GradScaler's optimizer protocol, in one place.

``FusedSAM._step_supports_amp_scaling = True``: ``scaler.step(opt)`` then always calls
``opt.step()``, having set ``opt.grad_scale`` (the loss scale, or ``None`` once the user has
unscaled) and ``opt.found_inf`` (the scaler's device flag for the second-pass gradients).

Three skip conditions meet in a step: the first pass's gradients were not finite (its
squared-norm partials, ``first_sumsq``, have a non-finite total), the scaler's flag
``scaler_inf`` (0-dim float32, 1.0: skip) for the second pass, and the optimizer's own check of
the second pass when no scaler checked it. The fused restore ops take the flag and the partials
and decide on the device, in the kernel that steps; :func:`union` makes the same decision with
tensor ops for the other paths (a base optimizer's own ``step()``, policies that see the flag
before the update).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fused_sam import distributed
from fused_sam import functional as F
from fused_sam.step.validation import raise_sparse


class ScalerArgs(NamedTuple):
    """What a GradScaler handed to this ``step()`` (both ``None`` without a scaler)."""

    #: the loss scale of the second-pass gradients (``None``: unscaled, or no scaler).
    grad_scale: Tensor | None
    #: the scaler's non-finite flag for the second-pass gradients.
    scaler_inf: Tensor | None

    @classmethod
    def of(cls, optimizer: object) -> ScalerArgs:
        """The attributes the scaler sets on ``optimizer`` for the duration of its ``step()``
        (torch's fused optimizers' protocol)."""
        return cls(getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None))


def any_flag(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The OR of two 0-dim float skip flags on ``a``'s device (``None`` stands for unset)."""
    if a is None:
        return b
    if b is None:
        return a
    return torch.maximum(a, b.to(a.device, torch.float32, non_blocking=a.device.type != "cpu"))


def union(found_inf: Tensor | None, sumsqs: Sequence[Tensor]) -> Tensor | None:
    """The 0-dim float skip flag (1.0: skip) of ``found_inf`` or a non-finite total of one of
    ``sumsqs``, on device, with no host read (``None``: nothing to check)."""
    skip = found_inf
    for sumsq in sumsqs:
        skip = any_flag(F.nonfinite(sumsq), skip)
    return skip


def skip_flag(skip: Tensor | None) -> Tensor:
    """The 0-dim bool ``last_step_skipped`` of a step with skip flag ``skip``."""
    return torch.zeros((), dtype=torch.bool) if skip is None else skip.bool()


def unscale(grads: list[Tensor], grad_scale: Tensor) -> None:
    """Divide ``grads`` by the loss scale in place, as ``GradScaler.unscale_`` does.

    The same op (``grad * (1 / scale)``, the reciprocal in float64 rounded to float32) per
    device and dtype, so a FusedSAM step on the base optimizer's own ``step()`` sees the very
    gradients that optimizer sees under a GradScaler (inf/nan stay non-finite).
    """
    inv = grad_scale.double().reciprocal().float()
    groups = torch._C._group_tensors_by_device_and_dtype([grads], False)
    for (device, _dtype), ([gs], _) in groups.items():
        dummy = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, dummy, inv.to(device))


def unscale_grads(params: list[Tensor], grad_scale: Tensor) -> None:
    """:func:`unscale` on the gradients of ``params`` (local shards under FSDP2)."""
    grads = [distributed.local(p.grad) for p in params if p.grad is not None]
    if any(g.is_sparse for g in grads):
        raise_sparse()
    unscale(grads, grad_scale)


def unscale_first_pass(
    grads: list[Tensor], loss_scale: Tensor | None, grad_scale: Tensor | float | None
) -> Tensor | None:
    """Unscale the first-pass gradients in place for a policy's hooks.

    The loss scale is ``grad_scale`` when the caller told it, else the scale the scaler handed
    to the last ``step()`` (``loss_scale``). Returns the scale divided by (``None``: none).
    """
    scale = loss_scale if grad_scale is None else grad_scale
    if scale is None or not grads:
        return None
    scale = torch.as_tensor(scale, dtype=torch.float32, device=grads[0].device)
    unscale(grads, scale)
    return scale


def unscale_second_pass(
    grads: list[Tensor],
    grad_scale: Tensor | None,
    scaler_inf: Tensor | None,
    first_scale: Tensor | None,
    first_scale_told: bool,
    *,
    direction: object | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Unscale the second-pass gradients in place for a policy's hooks, and say by how much
    the first-pass gradients the hooks saw were off.

    Args:
        grads: the second-pass gradients (every parameter's).
        grad_scale, scaler_inf: what the scaler handed to ``step()``.
        first_scale: the scale the first-pass gradients were divided by (``None``: none).
        first_scale_told: whether the caller told that scale (then it is exact).
        direction: the direction policy, if any (it cannot work with an unknown scale).

    Returns:
        The scale left for the base step (``None``: unscaled here), and the factor ``first``
        such that the first-pass gradients the hooks saw were ``first`` times the unscaled ones
        (``None``: exact, or unknown, which only a schedule may meet: its math uses their
        direction only).
    """
    if grad_scale is not None:
        this = grad_scale.to(grads[0].device) if grads else grad_scale
        if grads:
            unscale(grads, this)
    elif scaler_inf is not None and not first_scale_told:
        # scaler.unscale_(opt) ran (to clip): the scaler hands no scale to step(), and the
        # first pass's is not known. A direction would combine gradients of two scales.
        if direction is not None:
            raise RuntimeError(
                f"{direction!r} under a GradScaler whose second pass was unscaled by "
                "scaler.unscale_(opt) needs the scale of the first pass: call "
                "opt.first_step(zero_grad=True, grad_scale=scaler.get_scale())"
            )
        return None, None
    else:
        this = first_scale if first_scale_told else None
    if this is None and first_scale is None:
        return None, None
    if first_scale is None:
        return None, this
    if this is None:
        return None, first_scale.reciprocal()
    return None, this.to(first_scale.device) / first_scale
