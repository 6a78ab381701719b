"""Lightning automatic optimization with SAM: :class:`SAMLightningModule`.

Lightning's automatic optimization hands ``optimizer.step`` a closure that runs
``training_step``, the backward and (after it) ``on_before_optimizer_step`` and gradient
clipping. Given to a plain ``FusedSAM.step(closure)``, that closure would run twice, and the
second run (at ``w + e``) would win: the step's outputs and everything logged with
``self.log`` would be ``L(w + e)``, torchmetrics would be updated twice and the first-pass
gradients clipped too (``gradient_clip_algorithm="value"`` changes the ascent direction).
FusedSAM therefore refuses a plain ``LightningModule`` in automatic mode, and this module
runs the step right:

- pass 1 (at ``w``) is Lightning's closure as it is: ``training_step`` logs, updates metrics
  and returns the step's outputs; no clipping, no ``on_before_optimizer_step``;
- ``first_step``; pass 2 (at ``w + e``) goes through ``optimizer.step(closure)``, so
  Lightning clips its gradients (only these) and calls ``on_before_optimizer_step`` once,
  before the base step; while it runs :attr:`SAMLightningModule.sam_second_pass` is ``True``,
  ``self.log``/``self.log_dict`` do nothing, torchmetrics states (children of the module) and,
  unless the optimizer was built with ``freeze_bn_stats=False``, normalisation running
  statistics are put back as pass 1 left them;
- the outputs Lightning hands to ``on_train_batch_end`` are pass 1's.

Steps that a schedule makes plain (``EveryK``) run one pass through Lightning as usual.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from fused_sam.bn import frozen_bn_stats
from fused_sam.integrations import unwrap_sam
from fused_sam.step.closures import LIGHTNING_MARK

__all__ = ["SAMLightningModule"]


class SAMLightningModule(pl.LightningModule):
    """A ``LightningModule`` whose automatic optimization runs a :class:`~fused_sam.FusedSAM`
    step as the two-step loop does: derive from it instead of ``LightningModule``.

    ``training_step`` runs twice per SAM step; everything it reports is from the first run
    (at ``w``). Code that must run once per step anyway (a counter, a metric outside the
    module's children) can test :attr:`sam_second_pass`.

    If you override ``optimizer_step``, call ``super().optimizer_step(...)`` from it (the
    step raises otherwise). Not supported (raises before anything is perturbed):
    ``accumulate_grad_batches > 1``; accumulate in manual optimization with the two-step loop.
    """

    @property
    def sam_second_pass(self) -> bool:
        """``True`` while ``training_step`` runs at ``w + e`` (its logs are dropped)."""
        return self.__dict__.get("_sam_second_pass", False)

    def log(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, except in the second pass, where it does nothing."""
        if not self.sam_second_pass:
            super().log(*args, **kwargs)

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log_dict``, except in the second pass, where it does nothing."""
        if not self.sam_second_pass:
            super().log_dict(*args, **kwargs)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> Any:
        """Run the SAM step: pass 1 as Lightning's closure, ``first_step``, pass 2 silently
        through ``optimizer.step``, which finishes the step."""
        try:
            sam = unwrap_sam(optimizer)
        except TypeError:  # not a FusedSAM: Lightning's own step
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if sam.next_step == "plain":
            # One pass through Lightning (clipped as usual). A training_step that returns None
            # skips the step, as in Lightning; FusedSAM would refuse a closure that made no
            # gradient.
            def one_pass() -> Any:
                loss = optimizer_closure()
                if loss is None:
                    raise _SkipStepError
                return loss

            try:
                return super().optimizer_step(epoch, batch_idx, optimizer, one_pass)
            except _SkipStepError:
                return None
        if self.trainer.accumulate_grad_batches > 1:
            raise RuntimeError(
                "SAMLightningModule: accumulate_grad_batches > 1 in automatic optimization "
                "would perturb with every micro-batch's gradient and run the second pass on the "
                "last one only. Use accumulate_grad_batches=1, or manual optimization with the "
                "two-step accumulation loop (README: 'Gradient accumulation')."
            )
        loss = optimizer_closure()  # pass 1 at w: training_step, zero_grad, backward
        first = getattr(optimizer_closure, "_result", None)
        if loss is None:
            # training_step returned None: Lightning's way to skip the step.
            return None

        def second_pass() -> Any:
            with _silent(self, sam.freeze_bn_stats):
                return optimizer_closure()

        try:
            sam.first_step(zero_grad=True)
            optimizer.step(closure=second_pass)
        except BaseException:
            sam.restore()  # a precision plugin may run the closure outside FusedSAM.step
            raise
        finally:
            if first is not None:
                optimizer_closure._result = first  # the step's outputs are pass 1's
        return loss


class _SkipStepError(Exception):
    """training_step returned None on a plain step: leave the optimizer step out."""


# What FusedSAM.step(closure) looks for before it lets Lightning's automatic closure through.
setattr(SAMLightningModule, LIGHTNING_MARK, True)


@contextlib.contextmanager
def _silent(module: SAMLightningModule, freeze_bn: bool) -> Iterator[None]:
    """Pass 2: no logging; metric states and (``freeze_bn``) running statistics put back."""
    metrics = _metric_states(module)
    module._sam_second_pass = True
    try:
        with frozen_bn_stats(module) if freeze_bn else contextlib.nullcontext():
            yield
    finally:
        module._sam_second_pass = False
        for metric, states in metrics:
            for name, value in states.items():
                setattr(metric, name, value)


# What a torchmetrics Metric changes in update()/forward() besides its declared states.
_METRIC_BOOKKEEPING = ("_update_count", "_computed", "_forward_cache")


def _metric_states(module: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Copies of the state of every torchmetrics ``Metric`` below ``module`` (none when
    torchmetrics was never imported: then there is no metric to keep)."""
    torchmetrics = sys.modules.get("torchmetrics")
    if torchmetrics is None:
        return []
    out = []
    for metric in module.modules():
        if isinstance(metric, torchmetrics.Metric):
            names = [*metric._defaults, *_METRIC_BOOKKEEPING]
            out.append((metric, {n: _copy(getattr(metric, n, None)) for n in names}))
    return out


def _copy(value: Any) -> Any:
    # Metric states are tensors (updated in place) or lists of tensors (appended to).
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return list(value)
    return value
