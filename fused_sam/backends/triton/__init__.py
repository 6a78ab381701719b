"""Triton multi-tensor kernels for the SAM ops."""

from __future__ import annotations

import torch

FLAT = True


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (``None`` when they can)."""
    return "the Triton kernels are not implemented yet"
