"""The interface every variant policy shares: two gradient hooks, state, and a word on shards.

A SAM step calls its policies at two fixed points, with the parameters that have a gradient and
their gradients (as the kernels see them: local shards under FSDP2, unscaled under a
GradScaler):

- :meth:`Policy.first_pass` in ``first_step``, before the norm (the gradients at ``w``);
- :meth:`Policy.second_pass` before the base update of a SAM step (the gradients at ``w + e``),
  with the step's skip flag and the factor ``scale`` by which the first-pass gradients it saw
  were off (a GradScaler says its scale only at ``step()``).

Policies wrap a step like nested contexts: the schedule outside the direction (first pass:
schedule, then direction; second pass: direction, then schedule). Each policy owns its
``state_dict`` (saved under its own top-level key of the optimizer's) and says whether its math
holds on FSDP2 shards. The kinds: :class:`~fused_sam.variants.StepSchedule` (which steps are SAM
steps), :class:`~fused_sam.variants.Direction` (the ascent direction and the update gradient);
masks are the third kind (:mod:`fused_sam.masks`), read by the kernels.
"""

from __future__ import annotations

import abc
from typing import Any

from torch import Tensor

__all__ = ["Policy"]


class Policy(abc.ABC):  # noqa: B024 - every hook has a default; subclasses pick theirs
    """A variant policy; see the module docstring."""

    #: whether the hooks' math is right on FSDP2 shards (global reductions need all of them).
    supports_shards: bool = True

    def first_pass(  # noqa: B027
        self, params: list[Tensor], grads: list[Tensor], *, backend: str | None = None
    ) -> None:
        """The first-pass gradients, before the norm (they may be changed in place)."""

    def second_pass(  # noqa: B027
        self,
        params: list[Tensor],
        grads: list[Tensor],
        skip: Tensor | None,
        *,
        scale: Tensor | None = None,
        backend: str | None = None,
    ) -> None:
        """The second-pass gradients, before the base update (they may be changed in place);
        a skipped step (``skip`` set on the device) must leave the policy's state as it was."""

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        """What a resume needs; tensors indexed by their parameter's position in ``params``."""
        return {}

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:  # noqa: B027
        """Restore what :meth:`state_dict` returned."""
