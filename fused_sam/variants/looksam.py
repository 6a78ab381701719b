r"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR
2022): a SAM step every ``k`` steps, and on the steps between one pass whose gradient is pushed
along the part of the last SAM gradient that plain descent misses.

On a SAM step (steps 0, k, 2k, ...), with :math:`g` the gradient at :math:`w` and
:math:`g_s` the gradient at :math:`w + e` (the base step uses :math:`g_s`, as in SAM):

.. math:: g_v = g_s - \frac{g_s \cdot g}{\lVert g \rVert^2}\, g

(the component of :math:`g_s` orthogonal to :math:`g`). On the other steps, one pass at
:math:`w`:

.. math:: g \leftarrow g + \alpha\, \frac{\lVert g \rVert}{\lVert g_v \rVert}\, g_v

then the base step with that :math:`g`. Norms and dot products are global over every
parameter with a gradient, in float64, on the device (no host sync), and both updates are one
fused ``out = a x + b y`` launch per bucket with the coefficients on the device. Costs about
``(1 + 1/k)x`` the base optimizer in passes, and two gradient-sized buffers per parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_sam import functional as F
from fused_sam.variants._ops import coefs, copies, dot, norm_sq, ratio
from fused_sam.variants._state import load_per_param
from fused_sam.variants.schedule import PLAIN, SAM, StepSchedule

__all__ = ["LookSAM"]


class LookSAM(StepSchedule):
    """LookSAM: SAM every ``k`` steps, the stored orthogonal gradient reused in between.

    Args:
        k: SAM steps at 0, k, 2k, ...; 1 is plain SAM.
        alpha: weight of the reused component (the paper's 0.7 on ViTs).
    """

    supports_shards = False  # the global dot products would need every shard

    def __init__(self, k: int = 5, alpha: float = 0.7) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"LookSAM needs an int k >= 1, got {k!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"LookSAM needs alpha >= 0, got {alpha!r}")
        self.k, self.alpha = k, float(alpha)
        self._g1: dict[Tensor, Tensor] = {}  # the first-pass gradient of the SAM step in flight
        self.gv: dict[Tensor, Tensor] = {}  # g_v per parameter, from the last SAM step

    def kind(self, step: int) -> str:
        return SAM if step % self.k == 0 else PLAIN

    def first_pass(
        self, params: list[Tensor], grads: list[Tensor], *, backend: str | None = None
    ) -> None:
        self._g1 = dict(zip(params, copies(grads)))

    def second_pass(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        skip: Tensor | None,
        *,
        scale: Tensor | None = None,
        backend: str | None = None,
    ) -> None:
        # ``scale`` is not needed: coef * g1 below does not depend on the scale of g1, so g_v
        # has the units of g_s, which the optimizer unscales. (The reuse step only needs the
        # direction of g_v, and |g| / |g_v| of gradients in the same units.)
        pairs = [(p, g) for p, g in zip(params, grads) if p in self._g1]
        if not pairs:
            return
        g1 = [self._g1[p] for p, _ in pairs]
        gs = [g for _, g in pairs]
        for p, g in pairs:
            if p not in self.gv:  # the first SAM step (a skipped one leaves zeros)
                self.gv[p] = torch.zeros_like(g)
        gv = [self.gv[p] for p, _ in pairs]
        plan = F.plan(backend, [gv, gs, g1])  # one bucketing for the three ops
        coef = ratio(dot(gs, g1, backend, plan), norm_sq(g1, backend, plan))
        # g_v = g_s - coef g1; a skipped step leaves g_v as it was.
        F.axpby_(gv, gs, g1, coefs(1.0, -coef, gs[0].device), skip, backend, buckets=plan)
        self._g1 = {}

    def plain_pass(
        self, params: list[Tensor], grads: list[Tensor], *, backend: str | None = None
    ) -> None:
        pairs = [(g, self.gv[p]) for p, g in zip(params, grads) if p in self.gv]
        if not pairs:
            return  # before the first SAM step, or a resume without LookSAM state
        # The hot path of LookSAM (every step but one in k): two norms and one fused update.
        g, v = [a for a, _ in pairs], [b for _, b in pairs]
        plan = F.plan(backend, [g, v])  # one bucketing for the three ops
        ng, nv = norm_sq(g, backend, plan).sqrt(), norm_sq(v, backend, plan).sqrt()
        scale = ratio(self.alpha * ng, nv)
        F.axpby_(g, g, v, coefs(1.0, scale, g[0].device), None, backend, buckets=plan)

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        return {"gv": {i: self.gv[p] for i, p in enumerate(params) if p in self.gv}}

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        self.gv = load_per_param(state.get("gv", {}), params, "LookSAM state gv")

    def __repr__(self) -> str:
        return f"LookSAM(k={self.k}, alpha={self.alpha})"
