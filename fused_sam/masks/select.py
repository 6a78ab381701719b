"""Deterministic selection: the number of entries a mask keeps and one global top-k.

Selection speaks of the *flat global index*: parameters in param-group order, each flattened in
logical (row-major) order; ties in a score are broken in favour of the lower flat global index,
so masks never depend on the layout, the device or the sorting algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Deterministic selection


def num_kept(numel: int, sparsity: float) -> int:
    r"""Entries a mask keeps: :math:`K = \lfloor N (1 - s) \rfloor`.

    Computed in exact decimal arithmetic on ``sparsity`` as written (``0.3`` is 3/10, not the
    binary float just above it), so ``num_kept(10, 0.3) == 7`` on every platform. This is the
    official ``int(N * (1 - sparsity))`` without its floating-point off-by-one cases.
    """
    keep = 1 - Fraction(repr(float(sparsity)))
    return math.floor(numel * keep)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of a 1-D tensor, deterministic under ties.

    Entries strictly above the ``k``-th largest value are kept; among the entries equal to it,
    the ones with the lowest indices fill the remaining places. NaN ranks below every number.
    One ``kthvalue`` and one ``cumsum``: O(n), no host synchronisation.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    s = torch.where(torch.isnan(scores), float("-inf"), scores)
    threshold = torch.kthvalue(s, n - k + 1).values  # the (n-k+1)-th smallest = k-th largest
    above = s > threshold
    tie = s == threshold
    room = k - above.sum()
    return above | (tie & (torch.cumsum(tie, 0) <= room))


def flatten(scores: Sequence[Tensor]) -> Tensor:
    device = scores[0].device
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores) else torch.float32
    return torch.cat([s.reshape(-1).to(device, dtype) for s in scores])


def split_like(flat: Tensor, likes: Sequence[Tensor]) -> list[Tensor]:
    parts = flat.split([t.numel() for t in likes])
    return [m.view(t.shape).to(t.device) for m, t in zip(parts, likes)]


def global_topk(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """ONE top-``k`` over the entries of all ``scores`` together.

    Args:
        scores: one tensor per parameter (any real dtype; compared in float32, or float64 when
            any score is float64).
        k: entries to keep in total.

    Returns:
        One bool tensor per score, with its shape and device, holding ``k`` ``True`` entries in
        all. Ties go to the lower flat global index (see the module docstring).
    """
    return split_like(topk_mask(flatten(scores), k), scores)
