"""The global math of the variants on the fused ops, in float64, on the device (no host sync).

Global dot products and norms go through :func:`fused_sam.functional.dot` and
:func:`~fused_sam.functional.norm_sq` (one multi-tensor launch per bucket on the fused
backends), and gradient combinations through :func:`~fused_sam.functional.axpby_`, whose
coefficients stay on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_sam import functional as F


def copies(ts: list[Tensor]) -> list[Tensor]:
    """Copies of ``ts`` (same layouts) made by one multi-tensor copy, not one per tensor."""
    out = [torch.empty_like(t) for t in ts]
    if out:
        torch._foreach_copy_(out, ts)
    return out


def dot(
    a: list[Tensor], b: list[Tensor], backend: str | None, buckets: F.Buckets | None = None
) -> Tensor:
    """``sum_i a_i . b_i`` in float64 (0-dim, on ``a[0]``'s device); ``buckets`` from
    :func:`fused_sam.functional.plan` over lists of the same layouts, to plan a hook once."""
    return F.dot(a, b, backend, buckets=buckets).sum()


def norm_sq(ts: list[Tensor], backend: str | None, buckets: F.Buckets | None = None) -> Tensor:
    """The squared global 2-norm of ``ts`` in float64 (0-dim, on ``ts[0]``'s device)."""
    n = len(ts)
    return F.norm_sq(ts, ts, [False] * n, [0.0] * n, backend, buckets=buckets).sum()


def ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den`` is 0 (a zero gradient: nothing to project on)."""
    return torch.where(den > 0, num / den, torch.zeros_like(den))


def coefs(a: float | Tensor, b: float | Tensor, device: torch.device) -> Tensor:
    """``(a, b)`` as the float64 device tensor :func:`~fused_sam.functional.axpby_` takes.

    Filled by two small device writes (a number, or a 0-dim device tensor), never by a copy
    from host memory, so a CUDA graph may capture it.
    """
    out = torch.empty(2, dtype=torch.float64, device=device)
    out[0] = a
    out[1] = b
    return out
