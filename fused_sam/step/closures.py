"""What ``FusedSAM.step(closure)`` checks and does around the caller's closure.

- A pass at ``w + e`` that FusedSAM runs through a closure keeps the running statistics of
  normalisation layers from the first pass (:func:`perturbed_pass`), as the official SAM does.
- A closure after which no parameter has a new gradient trained nothing: it raises
  (:func:`check_wrote_gradients`), rather than perturb, restore and step on nothing.
- Lightning's automatic optimization runs ``training_step`` inside the closure, so a plain
  ``step(closure)`` would log and report the pass at ``w + e`` and clip both passes: without
  :class:`fused_sam.integrations.lightning.SAMLightningModule` it raises
  (:func:`check_driver`).

No framework is imported here: Lightning's closure is recognised by its shape.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

from fused_sam.bn import frozen_bn_stats

__all__ = ["check_driver", "check_wrote_gradients", "grads_before", "perturbed_pass"]

#: Set on a LightningModule whose ``optimizer_step`` runs the SAM step itself.
LIGHTNING_MARK = "_fused_sam_drives_sam_step"

_LIGHTNING_MODULE = "fused_sam.integrations.lightning.SAMLightningModule"


@contextlib.contextmanager
def perturbed_pass(freeze_bn_stats: bool) -> Iterator[None]:
    """The context of a closure call at ``w + e``: normalisation running statistics of every
    module it calls are put back on exit unless ``freeze_bn_stats`` is ``False``."""
    with frozen_bn_stats() if freeze_bn_stats else contextlib.nullcontext():
        yield


def grads_before(params: list[Tensor]) -> list[tuple[Tensor, int]]:
    """The gradients there are now, with their version counters (see
    :func:`check_wrote_gradients`)."""
    return [(p.grad, p.grad._version) for p in params if p.grad is not None]


def _lightning_module(closure: Callable[[], Any]) -> Any | None:
    """The LightningModule of a Lightning precision plugin's closure wrapper, else ``None``.

    Lightning calls ``optimizer.step(closure=partial(precision._wrap_closure, model,
    optimizer, closure))``. (FusedSAM.step sees it wrapped once more: ``__wrapped__``.)
    """
    closure = getattr(closure, "__wrapped__", closure)
    if not isinstance(closure, functools.partial):
        return None
    func = closure.func
    if getattr(func, "__name__", "") != "_wrap_closure" or not closure.args:
        return None
    owner = type(getattr(func, "__self__", None)).__module__
    if not owner.startswith(("lightning", "pytorch_lightning")):
        return None
    model = closure.args[0]
    return model if hasattr(model, "automatic_optimization") else None


def check_driver(closure: Callable[[], Any]) -> None:
    """Refuse Lightning's automatic optimization driving ``step(closure)`` by itself.

    Its closure runs ``training_step``: everything the second call logs (``self.log``, the
    step's outputs, torchmetrics updates) would be of the pass at ``w + e``, and Lightning's
    gradient clipping would clip the first pass too.
    """
    model = _lightning_module(closure)
    if model is None or not model.automatic_optimization or getattr(model, LIGHTNING_MARK, False):
        return
    raise RuntimeError(
        "Lightning automatic optimization is driving FusedSAM.step(closure) by itself: "
        "training_step would run twice per step, so self.log, the step's outputs and "
        "torchmetrics would report the pass at w + e, and gradient clipping would clip the "
        "first pass too. Derive the LightningModule from "
        f"{_LIGHTNING_MODULE} instead of LightningModule (it runs the second pass silently and "
        "clips only its gradients); if you override optimizer_step, call "
        "super().optimizer_step(...) from it. Or use manual optimization (README: 'Lightning')."
    )


def check_wrote_gradients(
    params: list[Tensor], before: list[tuple[Tensor, int]] | None, closure: Callable[[], Any]
) -> None:
    """Raise if the closure left no new gradient on any parameter.

    ``before``: :func:`grads_before` taken just before the call. A gradient counts as new when
    it is another tensor than before or was written since; a closure that only zeroes counts
    too (an all-zero gradient is still a gradient). ``None``: any gradient counts (the closure
    of a step already in flight may be a no-op after the caller's own second backward).
    """
    old = {} if before is None else {id(g): version for g, version in before}
    for p in params:
        g = p.grad
        if g is not None and (before is None or old.get(id(g)) != g._version):
            return
    model = _lightning_module(closure)
    if model is not None and not model.automatic_optimization:
        hint = (
            "In Lightning manual optimization the closure Lightning passes to step() does "
            "nothing: run the first pass, opt.first_step(zero_grad=True), the second pass, "
            "then opt.step() (README: 'Lightning')."
        )
    else:
        hint = (
            "The closure must zero the gradients, run the forward pass and call backward() "
            "(torch's convention), and return the loss."
        )
    raise RuntimeError(
        "FusedSAM.step(closure): after the closure ran, no parameter of the optimizer had a new "
        "gradient, so this step would train nothing (the weights were left unchanged). " + hint
    )
