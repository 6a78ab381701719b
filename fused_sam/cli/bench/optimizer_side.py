"""The default mode of ``fused-sam bench``: one SAM step on the optimizer side per provider.

A parameter set with gradients already filled in; one SAM step is ``first_step()`` +
``second_step()``, no forward or backward; every provider of :func:`providers_for` runs on the
same parameters in the same process. "% of floor" is the time the step's minimum memory traffic
would take at the copy bandwidth measured in the same run (40 B/param for SAM on SGD with
momentum, 48 on AdamW, 20 for SGD alone, 28 for AdamW alone) divided by the measured time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fused_sam.cli.bench import timing
from fused_sam.cli.bench.params import Shape, make_params
from fused_sam.cli.bench.providers import providers_for
from fused_sam.cli.bench.results import summary

__all__ = ["bench_optimizer"]


def _summary(
    shapes: Sequence[Shape], device: torch.device, bandwidth: float, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    return summary(
        shapes, device, bandwidth, rows, dispatched_ops_meaning=timing.DISPATCHED_OPS_MEANING
    )


def bench_optimizer(
    shapes: Sequence[Shape],
    device: torch.device | str = "cpu",
    base: str = "sgd",
    repeat: int = 20,
    warmup: int = 3,
    include_reference: bool = False,
    only: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    sparsity: float = 0.0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time every provider on the same parameter set; returns rows plus the copy bandwidth.

    Args:
        shapes: parameter shapes.
        device: where the parameters live.
        base: base optimizer of the SAM providers (``sgd`` with momentum 0.9, or ``adamw``).
        repeat: timed steps per provider (the median is reported).
        warmup: untimed steps before timing.
        include_reference: also time the float64 reference backend (slow; off by default).
        only: restrict to providers whose name contains one of these strings.
        progress: called with each provider's name before it runs.
        sparsity: also time each backend with a Sparse SAM mask of this sparsity.
        on_row: called after each row with the result so far (the rows measured, no ratios
            yet), so a caller can rewrite its results file and a run cut off keeps its rows.
    """
    device = torch.device(device)
    numel = sum(math.prod(s) for s in shapes)
    # Source and destination together span 4 * numel floats, the arrays an SGD-momentum SAM
    # step touches (w, g, momentum, backup): the same cache level as the step itself.
    bandwidth = timing.copy_bandwidth(device, 2 * numel)
    rows = []
    for prov in providers_for(device, base, include_reference, sparsity):
        if only and not any(o in prov.name for o in only):
            continue
        if progress is not None:
            progress(prov.name)
        params = make_params(shapes, device)
        step = prov.make(params)
        times = timing.time_step(step, device, repeat, warmup)
        median = statistics.median(times)
        floor = prov.floor_bytes * numel / (bandwidth * 1e9)
        rows.append(
            {
                "provider": prov.name,
                "kind": prov.kind,
                "base": prov.base,
                "note": prov.note,
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(times),
                "floor_bytes_per_param": prov.floor_bytes,
                "gbps_at_floor_bytes": prov.floor_bytes * numel / median / 1e9,
                "pct_of_floor": 100.0 * floor / median,
                "ops_per_step": timing.count_ops(step, device),
                "dispatched_ops_per_step": timing.count_dispatched_ops(step, device),
            }
        )
        del params, step
        if on_row is not None:
            on_row(_summary(shapes, device, bandwidth, rows))
    base_ms = {r["base"]: r["median_ms"] for r in rows if r["kind"] == "base"}
    for r in rows:
        denom = base_ms.get(r["base"])
        r["ratio_to_base"] = r["median_ms"] / denom if denom else None
    return _summary(shapes, device, bandwidth, rows)
