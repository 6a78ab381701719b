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


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Run the enclosed forward passes without changing any normalisation running statistics.

    Covers every ``BatchNorm*``, ``SyncBatchNorm`` and ``InstanceNorm*`` with
    ``track_running_stats=True``. The layers still normalise with batch statistics in training
    mode (as SAM's second pass should); only their buffers are put back, bit for bit, on exit,
    also when the block raises.

    Example::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _NormBase) and module.track_running_stats:
                for name in _BUFFERS:
                    buf = getattr(module, name, None)
                    if buf is not None:
                        saved.append((buf, buf.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
