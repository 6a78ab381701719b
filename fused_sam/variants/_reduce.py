"""Global reductions over the tensors of a step, in float64, on the device (no host sync)."""

from __future__ import annotations

import torch
from torch import Tensor


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """sum_i a_i . b_i in float64 (0-dim, on the first tensor's device)."""
    total = torch.zeros((), dtype=torch.float64, device=a[0].device)
    for x, y in zip(a, b):
        total = total + torch.vdot(x.reshape(-1).double(), y.reshape(-1).double().to(x.device))
    return total


def norm(ts: list[Tensor]) -> Tensor:
    """The global 2-norm of ``ts`` (float64 per-tensor norms, one multi-tensor call)."""
    return torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64)).norm()
