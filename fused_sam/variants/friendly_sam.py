r"""F-SAM, "Friendly" SAM (Li et al., CVPR 2024): perturb along the gradient minus its
exponential moving average, removing the full-batch component that SAM's ascent mostly
repeats.

With :math:`g` the first-pass gradient and :math:`m` the moving average of past ones:

.. math::
    d = g - \sigma m, \qquad e = \rho\, \frac{d}{\lVert d \rVert}, \qquad
    m \leftarrow \lambda m + (1 - \lambda) g

On a parameter's first step :math:`m = g` and :math:`d = g` (as the official code). The update
of :math:`m` takes effect only when the step is not skipped. Both are one fused
``out = a x + b y`` launch per bucket. One gradient-sized buffer per parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_sam import functional as F
from fused_sam.variants._ops import coefs, copies
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

    def ascent(
        self, params: list[Tensor], grads: list[Tensor], *, backend: str | None = None
    ) -> None:
        self._g1 = dict(zip(params, copies(grads)))
        pairs = [(g, self.m[p]) for p, g in zip(params, grads) if p in self.m]
        if pairs:  # a parameter's first step: d = g
            g, m = [a for a, _ in pairs], [b for _, b in pairs]
            F.axpby_(g, g, m, coefs(1.0, -self.sigma, g[0].device), None, backend)

    def update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        skip: Tensor | None,
        *,
        scale: Tensor | None = None,
        backend: str | None = None,
    ) -> None:
        g1, self._g1 = self._g1, {}
        if skip is not None and any(p not in self.m for p in g1) and bool(skip):
            # A skipped first step creates no state (one host read, on such steps only).
            g1 = {p: v for p, v in g1.items() if p in self.m}
        old = [(p, g) for p, g in g1.items() if p in self.m]
        for p, g in g1.items():
            if p not in self.m:  # first step: m = g
                self.m[p] = g if scale is None else g / scale.to(g.device)
        if not old:
            return
        m, g = [self.m[p] for p, _ in old], [v for _, v in old]
        device = m[0].device
        # m = lam m + (1 - lam) g, with g unscaled here: the stored g is ``scale`` times it.
        b = 1 - self.lam
        if scale is not None:
            b = scale.to(device, torch.float64).reciprocal() * b
        F.axpby_(m, m, g, coefs(self.lam, b, device), skip, backend)

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        return {"m": {i: self.m[p] for i, p in enumerate(params) if p in self.m}}

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        self.m = load_per_param(state.get("m", {}), params, "FriendlySAM state m")

    def __repr__(self) -> str:
        return f"FriendlySAM(sigma={self.sigma}, lam={self.lam})"
