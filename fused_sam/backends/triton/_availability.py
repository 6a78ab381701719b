"""Whether the Triton kernels can run here, and why not (imports no kernel module).

This module imports without triton installed: it is what :mod:`fused_sam.functional` asks
before it routes a single tensor to this backend.
"""

from __future__ import annotations

import os

import torch

__all__ = ["IMPORT_ERROR", "unavailable_reason"]

try:
    import triton  # noqa: F401

    #: Why triton cannot be imported (``None`` when it can).
    IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the install
    IMPORT_ERROR = f"triton is not installed ({exc})"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (``None`` when they can).

    CUDA tensors need triton and a visible GPU; CPU tensors need the Triton interpreter,
    i.e. ``TRITON_INTERPRET=1`` set before this package was imported.
    """
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    from fused_sam.backends.triton import _table

    device = torch.device(device)
    if device.type == "cuda":
        if _table.INTERPRETED:
            return (
                "TRITON_INTERPRET=1 is set: the interpreter runs kernels on CPU tensors and "
                "cannot follow device addresses in the pointer table; unset it for CUDA"
            )
        if not torch.cuda.is_available():
            return "CUDA is not available to torch"
        return None
    if device.type == "cpu":
        if _table.INTERPRETED:
            return None
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return (
                "TRITON_INTERPRET=1 was set after fused_sam.backends.triton was imported; "
                "set it before importing fused_sam"
            )
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    return f"the Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), not {device}"
