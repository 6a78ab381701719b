"""Directions: policies that change the SAM ascent direction or the gradient of the update.

The optimizer calls them at two fixed points of a SAM step, with the parameters that have a
gradient and their gradients (as the kernels see them, unscaled under a GradScaler):

- :meth:`Direction.rho` in ``first_step``: the radius of the step, per param group;
- :meth:`Direction.ascent` in ``first_step``, before the norm: it may change the first-pass
  gradients in place; the perturbation is then ``rho d / ||d||`` of what it leaves there;
- :meth:`Direction.update` before the base update, with the step's skip flag: it may change
  the second-pass gradients in place, and commits whatever state the step changes (a skipped
  step must leave the policy's state as it was). Its ``scale``: the first-pass gradients
  :meth:`Direction.ascent` was given were ``scale`` times the unscaled ones (0-dim tensor;
  ``None``: exactly them). A GradScaler says its scale only at ``step()``, so ``first_step``
  divides by the last known one; whatever the policy stored from them must be corrected.

The hooks also get the optimizer's ``backend`` request, for the fused ops of
:mod:`fused_sam.functional` (``dot``, ``norm_sq``, ``axpby_``) that do their math.
"""

from __future__ import annotations

import abc
from typing import Any

from torch import Tensor

from fused_sam.variants.policy import Policy

__all__ = ["Direction"]


class Direction(Policy):
    """A change of the SAM direction; see the module docstring. Its :meth:`first_pass` is
    :meth:`ascent` and its :meth:`second_pass` :meth:`update`."""

    def rho(self, group: dict[str, Any], rho: float) -> float:
        """The radius of this step for a param group (``rho`` is the group's own)."""
        return rho

    def ascent(
        self, params: list[Tensor], grads: list[Tensor], *, backend: str | None = None
    ) -> None:
        """See the module docstring."""

    def update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        skip: Tensor | None,
        *,
        scale: Tensor | None = None,
        backend: str | None = None,
    ) -> None:
        """See the module docstring."""

    def first_pass(
        self, params: list[Tensor], grads: list[Tensor], *, backend: str | None = None
    ) -> None:
        self.ascent(params, grads, backend=backend)

    def second_pass(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        skip: Tensor | None,
        *,
        scale: Tensor | None = None,
        backend: str | None = None,
    ) -> None:
        self.update(params, grads, skip, scale=scale, backend=backend)

    @abc.abstractmethod
    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        """What a resume needs; tensors indexed by their parameter's position in ``params``."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
