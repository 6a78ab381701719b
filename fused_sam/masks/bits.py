"""Mask bits as the kernels read them: bit packing and the random-mask hash.

The only part of :mod:`fused_sam.masks` a backend imports (a leaf: it imports nothing of the
package). Storage: a mask is kept as ``ceil(numel / 8)`` bytes per parameter: element ``k`` of
the parameter *in memory order* is bit ``k % 8`` (least significant first) of byte ``k // 8``.
Memory order is what a flat kernel walks, so a ``channels_last`` parameter's mask follows its
storage, not its logical index order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Bit packing (the layout every kernel reads; do not change it)

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
    return _laid_out_like(flat, like)


def _laid_out_like(flat: Tensor, like: Tensor) -> Tensor:
    """A bool tensor with ``like``'s shape and layout whose memory order holds ``flat``."""
    out = torch.empty_like(like, dtype=torch.bool)
    if out.is_contiguous():
        return flat.view(like.shape)
    perm = _memory_order_perm(out)
    out.permute(perm).copy_(flat.view([like.shape[d] for d in perm]))
    return out


def pack_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Pack a logical bool mask for parameter ``like`` (bits follow ``like``'s memory order).

    Args:
        mask: bool tensor with ``like``'s shape, any layout (values are read by logical index).
        like: the parameter.

    Returns:
        ``ceil(like.numel() / 8)`` bytes on ``like``'s device.
    """
    laid_out = torch.empty_like(like, dtype=torch.bool)  # keeps a dense parameter's strides
    laid_out.copy_(mask.reshape(like.shape))
    return pack_bits(laid_out)


# ---------------------------------------------------------------------------------------------
# Random masks (ESAM's stochastic weight perturbation), drawn inside the perturbation kernels

_M32 = 0xFFFFFFFF
#: Odd 32-bit constants: the golden-ratio step of the element counter and murmur3's finaliser.
_GOLDEN = 0x9E3779B9
_FMIX1 = 0x85EBCA6B
_FMIX2 = 0xC2B2AE35


def _fmix32(x: int) -> int:
    """murmur3's 32-bit finaliser (a bijection of ``[0, 2^32)`` with full avalanche)."""
    x ^= x >> 16
    x = (x * _FMIX1) & _M32
    x ^= x >> 13
    x = (x * _FMIX2) & _M32
    return x ^ (x >> 16)


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2^32 for int64 0 <= x < 2^32 with no int64 overflow: c in 16-bit halves.
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _M32


def element_hash(key: int, index: Tensor) -> Tensor:
    r"""The 32-bit hash every kernel computes for element ``index`` of a tensor with ``key``.

    .. math:: h(k, j) = \mathrm{fmix32}\big((k + j \cdot \mathtt{0x9E3779B9}) \bmod 2^{32}\big)

    with :math:`j` the element's position in memory order, taken modulo :math:`2^{32}`. Written
    with int64 tensor ops whose products stay below :math:`2^{63}` (exact on every device).

    Args:
        key: the tensor's 32-bit key for this step (:meth:`RandomBits.key`).
        index: int64 element positions (non-negative).
    """
    x = (_mul32(index & _M32, _GOLDEN) + key) & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX2)
    return x ^ (x >> 16)


@dataclass(frozen=True)
class RandomBits:
    """One step's random mask, as the perturbation ops take it (nothing is materialised).

    Element ``j`` (memory order) of tensor ``i`` is perturbed iff
    ``element_hash(salts[i] ^ step_key, j) < threshold``, and its ``e`` is multiplied by
    ``scale``.

    Attributes:
        salts: one fixed 32-bit value per tensor (from the parameter's position).
        step_key: the 32-bit key of this step (from the seed and the draw count).
        threshold: keep iff the hash is below it; ``round(keep * 2^32)`` in ``[1, 2^32)``.
        scale: ``1 / keep`` (ESAM rescales the kept entries so that ``E[e]`` is SAM's ``e``).
    """

    salts: tuple[int, ...]
    step_key: int
    threshold: int
    scale: float

    def key(self, i: int) -> int:
        """The 32-bit key of tensor ``i``."""
        return self.salts[i] ^ self.step_key

    def pick(self, idx: Sequence[int]) -> RandomBits:
        """The same mask for the tensors ``idx`` of the call (a backend bucket)."""
        salts = tuple(self.salts[i] for i in idx)
        return RandomBits(salts, self.step_key, self.threshold, self.scale)


def random_mask(bits: RandomBits, i: int, like: Tensor) -> Tensor:
    """Materialise tensor ``i``'s mask of ``bits`` as a bool tensor laid out like ``like``.

    What the fused kernels compute on the fly; the reference and ``foreach`` backends use it.
    """
    j = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    return _laid_out_like(element_hash(bits.key(i), j) < bits.threshold, like)


def tensor_salt(position: int) -> int:
    """The fixed salt of the parameter at ``position`` (param-group order, from 0)."""
    return _fmix32((position * _GOLDEN + 0x632BE5AB) & _M32)


def keep_threshold(keep: float) -> int:
    """``round(keep * 2^32)``, kept in ``[1, 2^32 - 1]`` (never all or nothing): an entry is
    kept when its hash is below it."""
    return min(max(round(keep * 2.0**32), 1), _M32)


def draw_key(seed: int, draws: int) -> int:
    """The 32-bit key of draw number ``draws`` of a random mask with ``seed``."""
    x = 0x243F6A88
    for value in (seed, draws):
        for word in (value & _M32, (value >> 32) & _M32):
            x = _fmix32(((x ^ word) + _GOLDEN) & _M32)
    return x
