"""Keep BatchNorm running statistics from the first SAM pass only.

SAM runs two forward passes per step. The second pass (at ``w + e``) should not update the
running statistics of normalisation layers: the official SAM discards them. The common recipe,
setting ``momentum = 0`` for the second pass, is wrong twice: it still increments
``num_batches_tracked``, and a ``momentum=None`` (cumulative average) layer ignores ``momentum``
and keeps updating. This helper snapshots the buffers and restores them with exact copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["frozen_bn_stats"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _tracking(module: nn.Module) -> bool:
    return isinstance(module, _NormBase) and module.track_running_stats


def _snapshot(module: nn.Module, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name in _BUFFERS:
        buf = getattr(module, name, None)
        if buf is not None:
            saved.append((buf, buf.clone()))


@contextmanager
def frozen_bn_stats(model: nn.Module | None = None) -> Iterator[None]:
    """Run the enclosed forward passes without changing any normalisation running statistics.

    Covers every ``BatchNorm*``, ``SyncBatchNorm`` and ``InstanceNorm*`` with
    ``track_running_stats=True``. The layers still normalise with batch statistics in training
    mode (as SAM's second pass should); only their buffers are put back, bit for bit, on exit,
    also when the block raises.

    Args:
        model: the layers of this module are kept. ``None``: those of every module called
            inside the block (found by a global forward pre-hook, the way ``step(closure)``
            keeps them without knowing the model; a layer is found through any module that
            contains it, so ``torch.compile``'d models are covered too).

    Example::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    handle = None

    def keep(root: nn.Module) -> None:
        with torch.no_grad():
            for module in root.modules():
                if id(module) not in seen:
                    seen.add(id(module))
                    if _tracking(module):
                        _snapshot(module, saved)

    @torch.compiler.disable
    def pre_hook(module: nn.Module, args: object) -> None:
        # Every module called inside the block, the first time: all layers below it (a
        # compiled module runs its children inside its graph, where no hook fires).
        if id(module) not in seen:
            keep(module)

    if model is not None:
        keep(model)
    else:
        # (torch warns, once, that a compiled module's global hooks fire once more for its
        # wrapper: harmless here, a module is kept once. Silencing it would mean changing the
        # warning filters each step, which re-arms every once-per-location warning.)
        handle = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
