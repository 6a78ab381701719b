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
        self._pending: dict[Tensor, Tensor] = {}

    def ascent(self, params: list[Tensor], grads: list[Tensor]) -> None:
        pending = {}
        for p, g in zip(params, grads):
            m = self.m.get(p)
            if m is None:
                pending[p] = g.detach().clone()  # first step: m = g, d = g
                continue
            pending[p] = m * self.lam + g * (1 - self.lam)
            g.sub_(m * self.sigma)
        self._pending = pending

    def update(self, params: list[Tensor], grads: list[Tensor], skip: Tensor | None) -> None:
        pending, self._pending = self._pending, {}
        if skip is not None and any(p not in self.m for p in pending) and bool(skip):
            # A skipped first step creates no state (one host read, on such steps only).
            pending = {p: v for p, v in pending.items() if p in self.m}
        for p, new in pending.items():
            old = self.m.get(p)
            if old is None:
                self.m[p] = new
            elif skip is None:
                old.copy_(new)
            else:
                old.copy_(torch.where(skip.to(old.device).bool(), old, new))

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        return {"m": {i: self.m[p] for i, p in enumerate(params) if p in self.m}}

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        self.m = {}
        for i, t in state.get("m", {}).items():
            p = params[int(i)]
            if t.shape != p.shape:
                raise ValueError(f"FriendlySAM state {i} has shape {tuple(t.shape)}")
            self.m[p] = t.to(p.device, p.dtype).clone()

    def __repr__(self) -> str:
        return f"FriendlySAM(sigma={self.sigma}, lam={self.lam})"
