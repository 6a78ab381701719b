"""Hyperparameter values: which Python and numpy numbers count as real numbers.

A leaf module: every layer (the optimizer's validation, the variants) reads values through it.
"""

from __future__ import annotations

import numbers
from typing import Any

from torch import Tensor

__all__ = ["as_real"]


def as_real(value: Any) -> float | None:
    """``value`` as a float when it is a real number of any type torch's optimizers take for a
    hyperparameter, else ``None``.

    Every :class:`numbers.Real` (Python and numpy scalars: ``np.float32``, ``np.int64``, ...)
    and a 0-d numpy-like array of a real dtype count; ``bool`` (also numpy's) does not, nor a
    complex or a multi-element array.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Tensor):
        return None
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if getattr(value, "ndim", None) == 0 and kind in ("f", "i", "u"):
        return float(value)
    return None
