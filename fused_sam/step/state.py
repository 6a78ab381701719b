"""The in-flight bookkeeping of a SAM step, in ONE mutable object (DESIGN.md section 8)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fused_sam.step.plan import StepPlan


@dataclass
class StepState:
    """The bookkeeping of the SAM step.

    Methods mutate its fields and never rebind them on the optimizer: wrappers that shallow-copy
    the optimizer's ``__dict__`` and call methods on the copy (Lightning's
    ``LightningOptimizer``) then share the step with the original, and attribute writes that a
    tracer drops cannot split the state.
    """

    #: the parameters at ``w + e`` (their backups hold ``w``); ``None`` <=> nothing in flight.
    perturbed: list[Tensor] | None = None
    #: the squared-norm partials of the first pass (a non-finite total: a non-finite
    #: gradient, nothing perturbed and the step skipped); ``None`` without a gradient.
    first_sumsq: Tensor | None = None
    #: ``second_step(zero_grad=True)`` asked to zero the gradients once the step is done.
    zero_grad: bool = False
    #: the cached plan of the last step (see :class:`fused_sam.step.plan.StepPlan`).
    plan: StepPlan | None = None
    #: 0-dim bool tensor: whether the last finished step skipped its base update.
    last_skipped: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.bool))
    #: the losses at ``w`` and at ``w + e`` of the last step that saw both (see ``sharpness``).
    losses: tuple[Any, Any] | None = None
    #: the next first pass ran on this replica's own batch (``distributed.per_replica_pass``).
    replica_local: bool = False
    #: the loss scale a GradScaler handed to the last ``step()`` (0-dim tensor; ``None``: no
    #: scaler). A schedule's or direction's first-pass hooks see gradients divided by it: the
    #: scaler says the scale only in ``step()``, after the first pass.
    loss_scale: Tensor | None = None
    #: the scale the first-pass gradients of the step in flight were divided by before the
    #: hooks (``None``: not at all), and whether the caller told it (then it is exact).
    first_scale: Tensor | None = None
    first_scale_told: bool = False
    #: a base update ran in this step: the base optimizer's step post-hooks are due once the
    #: step is complete.
    post_hooks_due: bool = False
    #: called at the start of every ``first_step``; raises when a wrapper will not finish the
    #: step (Accelerate's accumulation, see ``integrations.unwrap_sam``).
    first_step_check: Callable[[], None] | None = None

    def end(self) -> None:
        """Nothing in flight any more (the weights are at ``w``)."""
        self.perturbed = None
        self.first_sumsq = None
        self.zero_grad = False
