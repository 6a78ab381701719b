"""When ``FusedSAM.step``'s step hooks run: one place for both ways to drive a SAM step.

torch runs an optimizer's step pre-hooks when ``step()`` is entered. In the two-step form that
is after both passes (``second_step()`` calls ``step()``): the weights are at ``w + e`` and
``.grad`` holds the second-pass gradients, which the base update is about to use. In the
closure form it would be before any pass (weights at ``w``, no gradient of this step yet), so a
hook that reads or changes the update's gradients would see other things in each form.

FusedSAM runs its pre-hooks at the first point in both: **once per step, after the step's last
pass, just before the restore and the base update** (two-step form and ``step(closure)`` alike:
weights at ``w + e`` and the second-pass gradients in ``.grad`` on a SAM step; on a plain step
of a schedule, weights at ``w`` and that step's gradients). Post-hooks run after the update, as
in torch. Global hooks (``register_optimizer_step_pre_hook``) run with the instance's, as in
torch; hooks on ``base_optimizer`` run around the base update itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

__all__ = ["sam_step_hooks"]

_NEW_ARGS = (
    "a step pre-hook returned new arguments for FusedSAM.step(closure): FusedSAM runs step "
    "pre-hooks after the closure's last pass (just before the base update, as in the two-step "
    "form), when the closure can no longer be replaced; change what the closure does instead"
)


def _pre_hooks(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the global and instance pre-hooks; the last new ``(args, kwargs)`` any returned."""
    result = None
    for hook in chain(_global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()):
        out = hook(opt, args, kwargs)
        if out is not None:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise RuntimeError(
                    f"a step pre-hook must return None or a tuple (new_args, new_kwargs), got {out}"
                )
            result = args, kwargs = out
    return result


class _HooksAfterLastPass:
    """The caller's closure, running the pre-hooks after its ``last``-th call returns."""

    def __init__(self, opt: Optimizer, closure: Callable[[], Any], last: int) -> None:
        self.opt, self.__wrapped__, self.last, self.calls = opt, closure, last, 0

    def __call__(self) -> Any:
        loss = self.__wrapped__()
        self.calls += 1
        if self.calls == self.last and _pre_hooks(self.opt, (self.opt,), {}) is not None:
            raise RuntimeError(_NEW_ARGS)
        return loss


def sam_step_hooks(step: Callable[..., Any]) -> Callable[..., Any]:
    """``Optimizer.profile_hook_step`` for ``FusedSAM.step``, with the pre-hooks moved after
    the closure's last pass (see the module docstring). Marked ``hooked`` so that torch does
    not wrap it again."""

    @functools.wraps(step)
    def wrapper(self: Any, closure: Callable[[], Any] | None = None) -> Any:
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            args: tuple[Any, ...] = (self,)
            kwargs: dict[str, Any] = {}
            if closure is None:
                new = _pre_hooks(self, args, kwargs)
                if new is not None:
                    args, kwargs = new
                out = step(*args, **kwargs)
            else:
                args = (self, closure)
                last = 1 if self.in_flight or self.next_step != "sam" else 2
                out = step(self, _HooksAfterLastPass(self, closure, last))
            self._optimizer_step_code()
            for hook in chain(
                self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()
            ):
                hook(self, args, kwargs)
            return out

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper
