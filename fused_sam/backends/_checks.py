"""Argument checks shared by the Python backends (``foreach``, ``triton``) and the layout test
of :mod:`fused_sam.functional` (a leaf: it imports no other module of the package).

The native ops make the same checks in C++ (``csrc/op_checks.h``). They run before anything is
written, so a bad call raises a clear error and leaves every tensor as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_lists(who: str, first: Sequence[Tensor], **lists: Sequence[Tensor]) -> None:
    """Every list has one tensor per entry of ``first``, of its shape, dtype and device, and
    ``first`` has one dtype and one device."""
    if not first:
        raise ValueError(f"fused_sam {who}: empty tensor list")
    dtype, device = first[0].dtype, first[0].device
    if any(t.dtype != dtype or t.device != device for t in first):
        raise ValueError(f"fused_sam {who}: the tensors must share one dtype and one device")
    shapes = [t.shape for t in first]
    for name, ts in lists.items():
        if len(ts) != len(first):
            raise ValueError(
                f"fused_sam {who}: {name} has {len(ts)} tensors, the first list {len(first)}"
            )
        for i, (t, shape) in enumerate(zip(ts, shapes)):
            if t.shape != shape or t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"fused_sam {who}: {name}[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}, "
                    f"expected {tuple(shape)} {dtype} on {device}"
                )


def check_axpby(
    out: Sequence[Tensor],
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    coefs: Tensor,
    skip: Tensor | None,
) -> None:
    """The arguments of ``axpby_`` (see :func:`fused_sam.reference.axpby_`)."""
    check_lists("axpby_", out, x=x, y=y)
    device = out[0].device
    if coefs.dtype != torch.float64 or coefs.shape != (2,) or coefs.device != device:
        raise ValueError(
            "fused_sam axpby_: coefs must be a float64 tensor of 2 elements on the tensors' "
            f"device, got {coefs.dtype} of shape {tuple(coefs.shape)} on {coefs.device}"
        )
    if skip is not None and (skip.numel() != 1 or skip.device != device):
        raise ValueError(
            "fused_sam axpby_: skip must be a one-element tensor on the tensors' device, got "
            f"shape {tuple(skip.shape)} on {skip.device}"
        )


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive storage slots.

    True for contiguous, channels_last and any permuted-contiguous layout; false for slices
    with gaps and expanded (stride-0) tensors.
    """
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def flat_ok(tensors: Sequence[Tensor]) -> bool:
    """Whether a flat kernel may index all ``tensors`` alike as ``t[i]`` over their storage."""
    # Fast path (the common case, checked in C): every tensor contiguous. Tensors of one shape
    # that are all contiguous walk their elements in the same order.
    if all(t.is_contiguous() for t in tensors):
        return True
    first = tensors[0]
    if not is_dense(first):
        return False
    stride = first.stride()
    return all(t.stride() == stride for t in tensors[1:])
