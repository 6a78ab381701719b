"""Step schedules: which steps are SAM steps (two passes) and which are plain ones (one pass).

A schedule answers one question before each step, from the count of steps taken so far. A SAM
step costs two forward/backward passes, a plain step one, so a schedule that interleaves them
trades SAM's effect for time: :class:`EveryK` with ``k = 5`` costs about ``1.2x`` a plain
step (MosaicML Composer's ``interval``; it measured +0.7% ImageNet top-1 on ResNet-50 for about
7% of throughput at ``interval=10``).
"""

from __future__ import annotations

import abc

from torch import Tensor

from fused_sam.variants.policy import Policy

__all__ = ["EveryK", "StepSchedule"]

SAM = "sam"
PLAIN = "plain"


class StepSchedule(Policy):
    """Decides the kind of each step, ``"sam"`` or ``"plain"``, and may act on the gradients.

    The optimizer calls the hooks at fixed points of a step, with the parameters that have a
    gradient and their gradients (as the kernels see them, unscaled under a GradScaler); the
    defaults do nothing:

    - :meth:`first_pass` in ``first_step``, before the perturbation (the gradients at ``w``);
    - :meth:`second_pass` before the base update of a SAM step (the gradients at ``w + e``),
      with the step's skip flag (a non-finite gradient; 0-dim device tensor or ``None``) and
      ``scale``: the first-pass gradients it was given were ``scale`` times the unscaled ones
      (0-dim tensor; ``None``: exactly them, or unknown after ``scaler.unscale_(opt)``). The
      loss scale is known only at ``step()``, so ``first_step`` divides by the last known one;
      ``scale`` corrects whatever the schedule stored from them;
    - :meth:`plain_pass` before a plain step's base update; it may change the gradients in
      place (they are what the base optimizer then uses).

    Every hook also gets the optimizer's ``backend`` request, for the fused ops of
    :mod:`fused_sam.functional` (``dot``, ``norm_sq``, ``axpby_``) that do its math.

    A skipped step (non-finite gradient) still counts in the step number given to :meth:`kind`,
    as a skipped step still counts for an LR scheduler: the kind of the next step is then known
    on the host without reading the device's skip flag.
    """

    @abc.abstractmethod
    def kind(self, step: int) -> str:
        """The kind of step number ``step`` (0 for the first step of training)."""

    def plain_pass(
        self, params: list[Tensor], grads: list[Tensor], *, backend: str | None = None
    ) -> None:
        """Before a plain step's base update (the gradients may be changed in place)."""


class EveryK(StepSchedule):
    """A SAM step every ``k`` steps (steps 0, k, 2k, ...), plain base steps in between.

    Args:
        k: the period; 1 is plain SAM on every step.
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"EveryK needs an int k >= 1, got {k!r}")
        self.k = k

    def kind(self, step: int) -> str:
        return SAM if step % self.k == 0 else PLAIN

    def __repr__(self) -> str:
        return f"EveryK({self.k})"
