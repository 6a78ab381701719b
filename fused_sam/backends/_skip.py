"""The skip decision of the restore+step ops made with tensor ops (a leaf: it imports no other
module of the package).

A fused kernel decides the skip itself; this is the same decision for the Python paths that
have no launch to make it in (the ``foreach`` backend, Triton's traced per-tensor launches and
its calls without tensors). See :func:`fused_sam.reference.skipped` for the rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def skip_flag(
    found_inf: Tensor | None, sumsqs: Sequence[Tensor], device: torch.device
) -> Tensor | None:
    """0-dim bool on ``device``: ``found_inf`` is nonzero, or the total of one of ``sumsqs``
    (float64 norm partials) is not finite. No host read. ``None`` when there is nothing to
    check (the caller then needs no flag in its math)."""
    skip = None if found_inf is None else found_inf.to(device).reshape(()) != 0
    for s in sumsqs:
        bad = ~torch.isfinite(s.to(device, torch.float64).sum())
        skip = bad if skip is None else skip | bad
    return skip
