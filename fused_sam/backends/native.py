"""C++ (CPU) and CUDA kernels from the compiled extension ``fused_sam._C``.

The extension is built by ``setup.py`` from ``csrc/``. Until it is built, this module reports
why it cannot run and how to build it.
"""

from __future__ import annotations

import torch

FLAT = True

_REASON = (
    "the native extension fused_sam._C is not built yet; build it with "
    "`pip install --no-build-isolation -e .` (a C++ compiler and ninja are needed)"
)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the native kernels cannot run on ``device`` (``None`` when they can)."""
    return _REASON
