"""Per-parameter tensors of a variant's ``state_dict()``, saved by parameter index."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def load_per_param(
    saved: dict[Any, Tensor], params: list[Tensor], what: str
) -> dict[Tensor, Tensor]:
    """The tensors of ``saved`` (keyed by parameter index) by parameter, each a copy on its
    parameter's device and in its dtype.

    Raises:
        ValueError: a tensor whose shape is not its parameter's (a checkpoint of another model).
    """
    out: dict[Tensor, Tensor] = {}
    for i, t in saved.items():
        p = params[int(i)]
        if t.shape != p.shape:
            raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}, not {tuple(p.shape)}")
        out[p] = t.to(p.device, p.dtype).clone()
    return out
