"""Thin adapters between :class:`fused_sam.FusedSAM` and the trainers that drive optimizers.

Importing this package imports no framework; each framework's adapter lives in its own module
and imports its framework there (:mod:`.lightning`, :mod:`.transformers`, :mod:`.timm`).

- Lightning automatic optimization:
  :class:`fused_sam.integrations.lightning.SAMLightningModule` (a plain ``LightningModule``
  raises: its second ``training_step`` would be what gets logged). Manual optimization needs no
  adapter: ``self.optimizers()`` is a FusedSAM itself (``first_step`` then ``manual_backward``
  then ``step()``; see the README).
- Hugging Face Trainer: :class:`fused_sam.integrations.transformers.SAMTrainer`.
- Accelerate (and any wrapper that hides ``first_step``): :func:`unwrap_sam`.
- timm: :func:`fused_sam.integrations.timm.register`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from fused_sam.optimizer import FusedSAM

__all__ = ["unwrap_sam"]

_ACCUMULATING = (
    "first_step() inside Accelerate's accelerator.accumulate() on a micro-batch that does not "
    "end the accumulation window (gradient_accumulation_steps > 1): the wrapper's opt.step() "
    "does nothing there, so the SAM step begun here would leave the weights at w + e. Nothing "
    "was perturbed. Build the Accelerator with gradient_accumulation_steps=1 and accumulate "
    "with the two-step loop: every micro-batch at w, first_step, every micro-batch at w + e, "
    "opt.step(), with accelerator.no_sync(model) around all micro-batches but the last of each "
    "pass (README: 'Accelerate'); or use SAMTrainer, which perturbs per micro-batch."
)

# Where wrappers keep the optimizer they wrap: Accelerate's AcceleratedOptimizer (and HF
# Trainer's ``self.optimizer``) uses ``optimizer``; Lightning's LightningOptimizer
# ``_optimizer``; timm's Lookahead ``_base_optimizer``.
_WRAPPED = ("optimizer", "_optimizer", "_base_optimizer")

_WHAT_TO_PASS = (
    "Pass the FusedSAM you built, or the wrapper a framework made of it: accelerator.prepare's "
    "AcceleratedOptimizer, an HF Trainer's trainer.optimizer (or the Trainer once train() has "
    "created it), Lightning's self.optimizers(), timm's Lookahead (opt='lookahead_samsgd')."
)


def unwrap_sam(optimizer: Any) -> FusedSAM:
    """The :class:`~fused_sam.FusedSAM` an optimizer wrapper holds (or ``optimizer`` itself).

    ``accelerator.prepare`` returns an ``AcceleratedOptimizer``, which does not forward
    ``first_step``; call it on ``unwrap_sam(opt)`` and keep calling ``opt.step()`` on the
    wrapper (it adds the GradScaler and the accumulation bookkeeping). A Lightning
    ``LightningOptimizer`` is returned as it is: it is a FusedSAM and its ``step()`` advances
    ``global_step``. timm's ``Lookahead`` is looked through (``first_step`` on the FusedSAM
    inside, ``step()`` on the Lookahead).

    Raises:
        TypeError: no FusedSAM inside; the message names what was found and what to pass.
    """
    seen = optimizer
    chain = [type(optimizer).__name__]
    accumulation = None
    for _ in range(8):  # wrappers nest a few levels at most
        if isinstance(seen, FusedSAM):
            if accumulation is not None:
                seen.set_first_step_check(_refuse_accumulating(accumulation))
            return seen
        # Accelerate's AcceleratedOptimizer: its step() does nothing on the micro-batches of
        # an accumulation window but the last.
        accumulation = getattr(seen, "gradient_state", accumulation)
        attr = next((a for a in _WRAPPED if getattr(seen, a, None) is not None), None)
        inner = None if attr is None else getattr(seen, attr)
        if inner is None or inner is seen:
            break
        seen = inner
        chain.append(f".{attr}: {type(seen).__name__}")
    if len(chain) == 1 and any(hasattr(optimizer, a) for a in _WRAPPED):
        found = f"{chain[0]} holds no optimizer yet"
        if type(optimizer).__name__.endswith("Trainer"):
            found += " (an HF Trainer creates it in train(); pass the FusedSAM you gave it)"
    else:
        found = " -> ".join(chain)
        if not isinstance(seen, FusedSAM) and hasattr(seen, "step"):
            found += f" ({type(seen).__name__} is not a FusedSAM: build the optimizer as "
            found += "FusedSAM(params, base_class, rho=...), or with timm register() it first)"
    raise TypeError(f"no FusedSAM inside {found}. {_WHAT_TO_PASS}")


def _refuse_accumulating(gradient_state: Any) -> Callable[[], None]:
    """A ``first_step`` check that raises while Accelerate's accumulation will skip the step."""

    def check() -> None:
        if not getattr(gradient_state, "sync_gradients", True):
            raise RuntimeError(_ACCUMULATING)

    return check


@contextlib.contextmanager
def _accumulating_allowed(sam: FusedSAM) -> Iterator[None]:
    """Lift :func:`unwrap_sam`'s accumulation check (for an integration that finishes or
    restores every micro-batch's step itself, as ``SAMTrainer``)."""
    check = sam.set_first_step_check(None)
    try:
        yield
    finally:
        sam.set_first_step_check(check)
