r"""Sparse SAM masks: bit packing, deterministic global top-k, and the SSAM-F / SSAM-D policies.

Sparse SAM (SSAM, Mi et al. 2022) perturbs only a fraction ``1 - sparsity`` of all parameter
entries:

.. math::
    e = \frac{\rho\, g}{\lVert g \rVert_2 + \epsilon} \odot m, \qquad m \in \{0, 1\}^N,
    \qquad \textstyle\sum_j m_j = K = \lfloor N (1 - s) \rfloor

where :math:`N` counts the entries of every parameter of the optimizer and :math:`s` is the
sparsity. The mask is chosen by ONE global top-k over all parameters of a score, and refreshed
on a schedule:

* SSAM-F (:class:`FisherMask`): the score is the empirical Fisher diagonal
  :math:`F_j = \sum_{i=1}^{n} (\partial \ell_i / \partial w_j)^2` over ``n`` single examples.
* SSAM-D (:class:`DynamicMask`): a random initial mask; each refresh drops the
  :math:`d = \min(\lfloor K\,dr(t) \rfloor, N - K)` live entries with the lowest score (``|g|``
  by default) and grows ``d`` entries that were dead (at random by default), with the death rate
  :math:`dr(t) = dr_0 (1 + \cos(\pi t / T)) / 2`.

Storage: a mask is kept as ``ceil(numel / 8)`` bytes per parameter: element ``k`` of the
parameter *in memory order* is bit ``k % 8`` (least significant first) of byte ``k // 8``.
Memory order is what a flat kernel walks, so a ``channels_last`` parameter's mask follows its
storage, not its logical index order. Selection, on the other hand, speaks of the *flat global
index*: parameters in param-group order, each flattened in logical (row-major) order; ties in a
score are broken in favour of the lower flat global index, so masks never depend on the layout,
the device or the sorting algorithm.

The package, by job: :mod:`~fused_sam.masks.bits` (packing and the random-mask hash: the only
part the kernels' backends import), :mod:`~fused_sam.masks.select` (top-k),
:mod:`~fused_sam.masks.policies` (``MaskPolicy``, ``FisherMask``, ``DynamicMask``,
``RandomMask``), :mod:`~fused_sam.masks.fisher` (the empirical Fisher diagonal) and
:mod:`~fused_sam.masks.sparse` (the mask state of one optimizer). The names below load their
module on first use, so importing the bits pulls in no policy.
"""

from __future__ import annotations

import importlib
from typing import Any

from fused_sam.masks.bits import (
    RandomBits,
    element_hash,
    pack_bits,
    pack_mask,
    packed_numel,
    random_mask,
    tensor_salt,
    unpack_bits,
)

__all__ = [
    "DynamicMask",
    "FisherMask",
    "MaskPolicy",
    "MaskRequest",
    "RandomBits",
    "RandomMask",
    "SparseMasks",
    "element_hash",
    "fisher_diagonal",
    "global_topk",
    "num_kept",
    "pack_bits",
    "pack_mask",
    "packed_numel",
    "random_mask",
    "tensor_salt",
    "topk_mask",
    "unpack_bits",
]

#: The module of each name loaded on first use (PEP 562).
_LAZY = {
    "DynamicMask": "policies",
    "FisherMask": "policies",
    "MaskPolicy": "policies",
    "MaskRequest": "policies",
    "RandomMask": "policies",
    "SparseMasks": "sparse",
    "fisher_diagonal": "fisher",
    "global_topk": "select",
    "num_kept": "select",
    "topk_mask": "select",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
