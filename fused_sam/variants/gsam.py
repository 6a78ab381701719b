r"""GSAM, surrogate-gap guided SAM (Zhuang et al., ICLR 2022).

SAM minimises the perturbed loss :math:`f_p = L(w + e)`; GSAM also descends the surrogate gap
:math:`f_p - L(w)` without raising :math:`f_p`, by removing from the update the part of the
first-pass gradient :math:`g` orthogonal to the SAM gradient :math:`g_s`:

.. math::
    g_\perp = g - \frac{g \cdot g_s}{\lVert g_s \rVert^2}\, g_s, \qquad
    g_{update} = g_s - \alpha\, g_\perp

and its radius follows the learning rate, as in the paper's runs:

.. math:: \rho_t = \rho_{min} + (\rho - \rho_{min})\,
    \frac{\eta_t - \eta_{min}}{\eta_{max} - \eta_{min}}

with :math:`\rho` the group's ``rho``, :math:`\eta_t` its learning rate, :math:`\eta_{max}` its
``initial_lr`` (set by any torch LR scheduler; else the learning rate of its first step).
Dot products are global, in float64, on the device, and the update is one fused
``out = a x + b y`` launch per bucket:

.. math:: g_{update} = (1 + \alpha c)\, g_s - \alpha\, g, \qquad
    c = \frac{g \cdot g_s}{\lVert g_s \rVert^2}

One gradient-sized buffer per parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_sam import functional as F
from fused_sam.variants._ops import coefs, copies, dot, norm_sq, ratio
from fused_sam.variants.direction import Direction

__all__ = ["GSAM"]


class GSAM(Direction):
    """The GSAM update gradient and radius schedule.

    Args:
        alpha: weight of the removed orthogonal component (the paper's 0.1-0.4).
        rho_min: the radius when the learning rate reaches ``lr_min``.
        lr_min: the learning rate at the end of the schedule.
    """

    supports_shards = False  # the global dot products would need every shard

    def __init__(self, alpha: float = 0.4, rho_min: float = 0.0, lr_min: float = 0.0) -> None:
        for name, value in (("alpha", alpha), ("rho_min", rho_min), ("lr_min", lr_min)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"GSAM needs {name} >= 0, got {value!r}")
        self.alpha, self.rho_min, self.lr_min = float(alpha), float(rho_min), float(lr_min)
        self._g1: dict[Tensor, Tensor] = {}

    def rho(self, group: dict[str, Any], rho: float) -> float:
        lr_max = float(group.setdefault("initial_lr", group["lr"]))
        if lr_max <= self.lr_min:
            return rho
        frac = (float(group["lr"]) - self.lr_min) / (lr_max - self.lr_min)
        return self.rho_min + (rho - self.rho_min) * frac

    def ascent(
        self, params: list[Tensor], grads: list[Tensor], *, backend: str | None = None
    ) -> None:
        self._g1 = dict(zip(params, copies(grads)))

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
        pairs = [(g, g1[p]) for p, g in zip(params, grads) if p in g1]
        if not pairs or self.alpha == 0:
            return
        gs, h = [a for a, _ in pairs], [b for _, b in pairs]
        device = gs[0].device
        # g_perp is linear in g: the stored h is ``scale`` times g, so divide its terms by it.
        inv = 1.0 if scale is None else scale.to(device, torch.float64).reciprocal()
        plan = F.plan(backend, [gs, h])  # one bucketing for the three ops
        coef = ratio(dot(h, gs, backend, plan) * inv, norm_sq(gs, backend, plan))
        update = coefs(1 + self.alpha * coef, -self.alpha * inv, device)
        F.axpby_(gs, gs, h, update, None, backend, buckets=plan)

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        return {}  # nothing outlives a step

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        pass

    def __repr__(self) -> str:
        return f"GSAM(alpha={self.alpha}, rho_min={self.rho_min}, lr_min={self.lr_min})"
