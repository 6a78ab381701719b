"""Bit-packed parameter masks shared by every backend.

A mask selects the elements of a parameter that a SAM perturbation may touch. It is stored as
``ceil(numel / 8)`` bytes per parameter: element ``k`` of the parameter *in memory order* is bit
``k % 8`` (least significant first) of byte ``k // 8``. Memory order is what a flat kernel walks,
so a ``channels_last`` parameter's mask follows its storage, not its logical index order.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_bits", "packed_numel", "unpack_bits"]

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def packed_numel(numel: int) -> int:
    """Bytes needed to hold ``numel`` mask bits."""
    return (numel + 7) // 8


def _memory_order_perm(like: Tensor) -> list[int]:
    # Sorting dims by decreasing stride gives the order in which a dense tensor's storage walks
    # them (channels_last: N, H, W, C). Size-1 dims do not affect the element order.
    return sorted(range(like.dim()), key=lambda d: -like.stride(d))


def _flat_memory_order(t: Tensor) -> Tensor:
    if t.is_contiguous():
        return t.reshape(-1)
    return t.permute(_memory_order_perm(t)).reshape(-1)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean mask into little-endian bits in the mask's memory order.

    Args:
        mask: bool tensor laid out like its parameter (``torch.zeros_like(p, dtype=torch.bool)``
            keeps a ``channels_last`` layout).

    Returns:
        A 1-D ``uint8`` tensor of ``ceil(mask.numel() / 8)`` bytes on the mask's device.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool mask, got {mask.dtype}")
    flat = _flat_memory_order(mask).to(torch.uint8)
    pad = packed_numel(flat.numel()) * 8 - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor with ``like``'s shape and memory layout.

    Args:
        packed: ``uint8`` tensor of at least ``ceil(like.numel() / 8)`` bytes.
        like: the parameter the mask belongs to.
    """
    n = like.numel()
    if packed.dtype != torch.uint8 or packed.numel() < packed_numel(n):
        raise ValueError(
            f"mask for a tensor of {n} elements must be uint8 with >= {packed_numel(n)} bytes, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    flat = ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()
    out = torch.empty_like(like, dtype=torch.bool)
    if out.is_contiguous():
        return flat.view(like.shape)
    perm = _memory_order_perm(out)
    out.permute(perm).copy_(flat.view([like.shape[d] for d in perm]))
    return out
