r"""F-SAM, "Friendly" SAM (Li et al., CVPR 2024): perturb along the gradient minus its
exponential moving average, removing the full-batch component that SAM's ascent mostly
repeats.

With :math:`g` the first-pass gradient and :math:`m` the moving average of past ones:

.. math::
    d = g - \sigma m, \qquad e = \rho\, \frac{d}{\lVert d \rVert}, \qquad
    m \leftarrow \lambda m + (1 - \lambda) g

On a parameter's first step :math:`m = g` and :math:`d = g` (as the official code). The update
of :math:`m` takes effect only when the step is not skipped. One gradient-sized buffer per
parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_sam.variants._state import load_per_param
from fused_sam.variants.direction import Direction

__all__ = ["FriendlySAM"]


def _check(name: str, value: Any, low: float, high: float | None = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"FriendlySAM needs {name} {bounds}, got {value!r}")
    return float(value)


class FriendlySAM(Direction):
    """The F-SAM ascent direction ``g - sigma m`` (``m``: moving average of ``g``).

    Args:
        sigma: weight of the removed average (the paper's 1.0).
        lam: decay of the moving average (the paper's 0.9; 0.6-0.95 in its runs).
    """

    def __init__(self, sigma: float = 1.0, lam: float = 0.9) -> None:
        self.sigma = _check("sigma", sigma, 0.0)
        self.lam = _check("lam", lam, 0.0, 1.0)
        self.m: dict[Tensor, Tensor] = {}
        # The first-pass gradients of the step in flight: m is updated in update(), where the
        # loss scale they carried is known exactly (see the Direction interface).
        self._g1: dict[Tensor, Tensor] = {}

    def ascent(self, params: list[Tensor], grads: list[Tensor]) -> None:
        self._g1 = {p: g.detach().clone() for p, g in zip(params, grads)}
        for p, g in zip(params, grads):
            m = self.m.get(p)
            if m is not None:  # first step: d = g
                g.sub_(m * self.sigma)

    def update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        skip: Tensor | None,
        *,
        scale: Tensor | None = None,
    ) -> None:
        g1, self._g1 = self._g1, {}
        if skip is not None and any(p not in self.m for p in g1) and bool(skip):
            # A skipped first step creates no state (one host read, on such steps only).
            g1 = {p: v for p, v in g1.items() if p in self.m}
        for p, g in g1.items():
            if scale is not None:
                g = g / scale.to(g.device)
            old = self.m.get(p)
            if old is None:
                self.m[p] = g  # first step: m = g
                continue
            new = old * self.lam + g * (1 - self.lam)
            if skip is None:
                old.copy_(new)
            else:
                old.copy_(torch.where(skip.to(old.device).bool(), old, new))

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        return {"m": {i: self.m[p] for i, p in enumerate(params) if p in self.m}}

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        self.m = load_per_param(state.get("m", {}), params, "FriendlySAM state m")

    def __repr__(self) -> str:
        return f"FriendlySAM(sigma={self.sigma}, lam={self.lam})"
