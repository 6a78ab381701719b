"""Hugging Face ``transformers.Trainer`` with SAM: :class:`SAMTrainer`.

``Trainer`` runs one forward/backward per micro-batch in ``training_step`` and then (at the
end of a gradient-accumulation window) clips and calls ``optimizer.step()``. ``SAMTrainer``
runs both SAM passes inside ``training_step`` and leaves the last one in flight, so the
Trainer's own clipping, ``optimizer.step()`` (which finishes the SAM step), mixed precision,
LR schedule, logging and checkpoints all work unchanged.

Gradient accumulation perturbs per micro-batch (m-sharpness, as the official SAM does per
device): micro-batch ``i`` takes its own ascent step ``e_i`` from its own gradient at ``w``,
its gradient at ``w + e_i`` is accumulated, and ``w`` is restored; the base step at the end of
the window uses the accumulated second-pass gradients. (The exact full-batch SAM step needs
every micro-batch twice, which this loop does not revisit; see the README's two-step recipe.)
Under DDP the first pass of every micro-batch is then replica-local (this device's own
gradient, as on the window's other micro-batches, where the Trainer skips the all-reduce
anyway); without accumulation it is all-reduced (synchronised SAM, the step of one process on
the global batch).

The second pass keeps normalisation running statistics as the first pass left them (the
official SAM's recipe), unless the optimizer was built with ``freeze_bn_stats=False``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from fused_sam.bn import frozen_bn_stats
from fused_sam.distributed import per_replica_pass
from fused_sam.integrations import _accumulating_allowed, unwrap_sam

__all__ = ["SAMTrainer"]


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer is a :class:`fused_sam.FusedSAM`.

    Pass the optimizer as usual (``optimizers=(FusedSAM(...), scheduler)``, or override
    ``create_optimizer``). ``training_step`` returns the first-pass loss (at ``w``), which is
    what the Trainer logs; ``unwrap_sam(trainer.optimizer).sharpness`` holds
    ``L(w + e) - L(w)`` of the last micro-batch.
    """

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        sam = unwrap_sam(self.optimizer)
        if sam.next_step == "plain":
            # A step schedule (e.g. EveryK) makes this a plain step: one pass, and the
            # Trainer's optimizer.step() takes the base step.
            return super().training_step(model, inputs, num_items_in_batch)
        params = [p for group in sam.param_groups for p in group["params"]]
        # Second-pass gradients of earlier micro-batches of this window: set aside (no copy)
        # so that the first pass sees this micro-batch's gradient alone.
        held = [p.grad for p in params]
        for p in params:
            p.grad = None
        if self.args.gradient_accumulation_steps > 1:
            # Every micro-batch perturbs with this device's own gradient (m-sharpness): the
            # window's last one too, whose backward the Trainer would all-reduce.
            with per_replica_pass(model, sam):
                loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        with _accumulating_allowed(sam):  # restored below on the window's other micro-batches
            sam.first_step(zero_grad=True)
        for p, g in zip(params, held):
            p.grad = g
        freeze = frozen_bn_stats(model) if sam.freeze_bn_stats else contextlib.nullcontext()
        try:
            with freeze:
                loss_perturbed = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            sam.restore()
            raise
        sam.record_losses(loss, loss_perturbed)
        if not self.accelerator.sync_gradients:
            # Not the window's last micro-batch: no optimizer step follows, so go back to w
            # (the accumulated second-pass gradients stay in .grad).
            sam.restore()
        return loss
