"""SAM variants, one module each, behind one small interface (:class:`Policy`) that
:class:`~fused_sam.FusedSAM` calls at fixed points of its step (no per-variant branches in the
optimizer).

- :class:`StepSchedule`: which kind of step comes next, a full SAM step (two passes) or a plain
  base-optimizer step (one pass), with hooks on the gradients of each pass.
  :class:`EveryK` (SAM every k steps), :class:`LookSAM` (SAM every k steps, its orthogonal
  gradient reused in between).
- :class:`Direction`: changes the ascent direction or the update gradient of a SAM step.
  :class:`FriendlySAM` (F-SAM), :class:`GSAM`.
- :class:`MomentumSAM`: one pass per step, perturbing along the optimizer's momentum (an
  optimizer of its own, since its weights sit at the perturbed point between steps).
"""

from __future__ import annotations

from fused_sam.variants.direction import Direction
from fused_sam.variants.friendly_sam import FriendlySAM
from fused_sam.variants.gsam import GSAM
from fused_sam.variants.looksam import LookSAM
from fused_sam.variants.momentum_sam import MomentumSAM
from fused_sam.variants.policy import Policy
from fused_sam.variants.schedule import EveryK, StepSchedule

__all__ = [
    "GSAM",
    "Direction",
    "EveryK",
    "FriendlySAM",
    "LookSAM",
    "MomentumSAM",
    "Policy",
    "StepSchedule",
]
