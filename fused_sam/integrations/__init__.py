"""Thin adapters between :class:`fused_sam.FusedSAM` and the trainers that drive optimizers.

Importing this package imports no framework; each framework's adapter lives in its own module
and imports its framework there (:mod:`.transformers`, :mod:`.timm`).

- Lightning needs no adapter: automatic optimization calls ``step(closure)``, and in manual
  optimization ``self.optimizers()`` is a FusedSAM itself (``first_step`` then
  ``manual_backward`` then ``step()``; see the README).
- Hugging Face Trainer: :class:`fused_sam.integrations.transformers.SAMTrainer`.
- Accelerate (and any wrapper that hides ``first_step``): :func:`unwrap_sam`.
- timm: :func:`fused_sam.integrations.timm.register`.
"""

from __future__ import annotations

from typing import Any

from fused_sam.optimizer import FusedSAM

__all__ = ["unwrap_sam"]

# Where wrappers keep the optimizer they wrap: Accelerate's AcceleratedOptimizer (and HF
# Trainer's ``self.optimizer``) uses ``optimizer``; Lightning's LightningOptimizer ``_optimizer``.
_WRAPPED = ("optimizer", "_optimizer")


def unwrap_sam(optimizer: Any) -> FusedSAM:
    """The :class:`~fused_sam.FusedSAM` an optimizer wrapper holds (or ``optimizer`` itself).

    ``accelerator.prepare`` returns an ``AcceleratedOptimizer``, which does not forward
    ``first_step``; call it on ``unwrap_sam(opt)`` and keep calling ``opt.step()`` on the
    wrapper (it adds the GradScaler and the accumulation bookkeeping). A Lightning
    ``LightningOptimizer`` is returned as it is: it is a FusedSAM and its ``step()`` advances
    ``global_step``.

    Raises:
        TypeError: no FusedSAM inside.
    """
    seen = optimizer
    for _ in range(8):  # wrappers nest a few levels at most
        if isinstance(seen, FusedSAM):
            return seen
        inner = next((getattr(seen, a) for a in _WRAPPED if hasattr(seen, a)), None)
        if inner is None or inner is seen:
            break
        seen = inner
    raise TypeError(f"no FusedSAM inside {type(optimizer).__name__}")
