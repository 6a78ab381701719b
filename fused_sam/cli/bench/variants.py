"""``fused-sam bench --variants``: the gradient math of LookSAM, F-SAM and GSAM per backend."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fused_sam.cli.bench import timing
from fused_sam.cli.bench.params import Shape, make_params
from fused_sam.cli.bench.results import summary

__all__ = ["VARIANT_BYTES", "bench_variants"]


#: Bytes per fp32 parameter of each variant hook set timed by :func:`bench_variants`.
VARIANT_BYTES: dict[str, int] = {
    # plain_pass: |g|^2 4, |g_v|^2 4, g += s g_v 12
    "LookSAM reuse step": 20,
    # first_pass + second_pass: copy of g 8, g_s . g 8, |g|^2 4, g_v = g_s - c g 12
    "LookSAM SAM step": 32,
    # ascent + update: copy of g 8, g -= sigma m 12, m = lam m + (1 - lam) g 12
    "F-SAM": 32,
    # ascent + update: copy of g 8, g . g_s 8, |g_s|^2 4, g_s = a g_s + b g 12
    "GSAM": 32,
}


def _loop_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=a[0].device)
    for x, y in zip(a, b):
        total = total + torch.vdot(x.reshape(-1).double(), y.reshape(-1).double())
    return total


def _variant_hooks_by_tensor(
    name: str, gs: list[Tensor], state: list[Tensor]
) -> Callable[[], None]:
    """The math of hook set ``name`` tensor by tensor (one ``vdot`` and one float64 expression
    per tensor), as peer implementations write it; ``state`` is LookSAM's g_v or F-SAM's m."""
    alpha, sigma, lam = 0.05, 1.0, 0.9

    def looksam_reuse() -> None:
        scale = alpha * _loop_dot(gs, gs).sqrt() / _loop_dot(state, state).sqrt()
        for g, v in zip(gs, state):
            g.copy_((g.double() + scale * v.double()).to(g.dtype))

    def looksam_sam() -> None:
        g1 = [g.clone() for g in gs]
        coef = _loop_dot(gs, g1) / _loop_dot(g1, g1)
        for v, g, h in zip(state, gs, g1):
            v.copy_((g.double() - coef * h.double()).to(v.dtype))

    def fsam() -> None:
        g1 = [g.clone() for g in gs]
        for g, m in zip(gs, state):
            g.sub_(m * sigma)
        for m, g in zip(state, g1):
            m.copy_(m * lam + g * (1 - lam))

    def gsam() -> None:
        g1 = [g.clone() for g in gs]
        coef = _loop_dot(g1, gs) / _loop_dot(gs, gs)
        for g, h in zip(gs, g1):
            g.copy_((g.double() - alpha * (h.double() - coef * g.double())).to(g.dtype))

    hooks = {"LookSAM reuse step": looksam_reuse, "LookSAM SAM step": looksam_sam}
    return {**hooks, "F-SAM": fsam, "GSAM": gsam}[name]


def _variant_hooks(
    name: str, ps: list[Tensor], gs: list[Tensor], state: list[Tensor], backend: str
) -> Callable[[], None]:
    """Hook set ``name`` through the variants' own code on ``backend``."""
    from fused_sam.variants import GSAM, FriendlySAM, LookSAM

    if name.startswith("LookSAM"):
        look = LookSAM(k=5, alpha=0.05)
        look.gv = dict(zip(ps, state))
        if name == "LookSAM reuse step":
            return lambda: look.plain_pass(ps, gs, backend=backend)

        def looksam_sam() -> None:
            look.first_pass(ps, gs, backend=backend)
            look.second_pass(ps, gs, None, backend=backend)

        return looksam_sam
    policy: FriendlySAM | GSAM
    if name == "F-SAM":
        policy = FriendlySAM(sigma=1.0, lam=0.9)
        policy.m = dict(zip(ps, state))
    else:
        policy = GSAM(alpha=0.05)

    def direction() -> None:
        policy.ascent(ps, gs, backend=backend)
        policy.update(ps, gs, None, backend=backend)

    return direction


def bench_variants(
    shapes: Sequence[Shape],
    device: torch.device | str = "cpu",
    repeat: int = 20,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time the gradient math of LookSAM, F-SAM and GSAM (their optimizer hooks) per backend.

    Each hook set runs on the same parameter set with gradients filled in, through the
    variants' code on every usable backend but the reference, and as ``loop``: the same math
    tensor by tensor. Bytes per parameter in :data:`VARIANT_BYTES`. The norms and dot products
    only read, and a read-only pass streams faster than a copy, so a row whose bytes are mostly
    reads can exceed 100% of the copy floor.

    Args:
        shapes: parameter shapes.
        device: where the tensors live.
        repeat: timed calls per row (the median is reported, and the minimum).
        warmup: untimed calls first.
        progress: called with each row's name before it runs.
        on_row: called after each row with the result so far (see :func:`bench_optimizer`).
    """
    from fused_sam.functional import available_backends

    device = torch.device(device)
    numel = sum(math.prod(s) for s in shapes)
    bandwidth = timing.copy_bandwidth(device, numel)
    backends = [b for b, why in available_backends(device).items() if why is None]
    providers = ["loop", *dict.fromkeys(b for b in backends if b != "reference")]
    rows = []
    for name, nbytes in VARIANT_BYTES.items():
        loop_ms = None
        for provider in providers:
            if progress is not None:
                progress(f"{name} [{provider}]")
            ps = make_params(shapes, device, seed=0)
            gs = [p.grad for p in ps]
            state = [p.grad for p in make_params(shapes, device, seed=1)]  # g_v or m
            if provider == "loop":
                fn = _variant_hooks_by_tensor(name, gs, state)
            else:
                fn = _variant_hooks(name, ps, gs, state, provider)
            with torch.no_grad():
                times = timing.time_step(fn, device, repeat, warmup)
                ops = timing.count_ops(fn, device)
            median = statistics.median(times)
            loop_ms = 1e3 * median if provider == "loop" else loop_ms
            rows.append(
                {
                    "hooks": name,
                    "provider": provider,
                    "median_ms": 1e3 * median,
                    "min_ms": 1e3 * min(times),
                    "floor_bytes_per_param": nbytes,
                    "gbps_at_floor_bytes": nbytes * numel / median / 1e9,
                    "pct_of_floor": 100.0 * nbytes * numel / (bandwidth * 1e9) / median,
                    "ops_per_step": ops,
                    "ratio_to_loop": 1e3 * median / loop_ms if loop_ms else None,
                }
            )
            if on_row is not None:
                on_row(summary(shapes, device, bandwidth, rows))
    return summary(shapes, device, bandwidth, rows)
