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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from fused_sam.integrations import unwrap_sam

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
        loss = super().training_step(model, inputs, num_items_in_batch)
        sam.first_step(zero_grad=True)
        for p, g in zip(params, held):
            p.grad = g
        try:
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
