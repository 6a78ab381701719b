"""pytest-benchmark suites for the CPU path, built on the same code as ``fused-sam bench``.

Not part of the default test run (``testpaths = ["tests"]``). Run with::

    python -m pytest benchmarks --benchmark-only

Each case times one optimizer step over the same parameters with the gradients already filled
in: plain SGD/AdamW, the per-tensor-loop SAM baseline, and ``FusedSAM`` on every backend that
is usable on the CPU here (``foreach`` always; ``cpu`` and ``triton`` once built). Compare rows
of one run; ``--benchmark-group-by=param:params`` groups them per parameter set.
"""

from __future__ import annotations

import pytest

from fused_sam.cli.bench import PARAM_SETS, make_params, providers_for

#: Parameter sets small enough for a CPU run of a few seconds each.
CPU_SETS = {
    "small1000": PARAM_SETS["small1000"][1](),
    "resnet18": PARAM_SETS["resnet18"][1](),
}

# Baselines once, SAM providers once per base optimizer ("loop SAM+adamw", ...).
PROVIDERS = {
    p.name if p.kind == "base" else f"{p.name}+{base}": p
    for base in ("sgd", "adamw")
    for p in providers_for("cpu", base)
}


@pytest.mark.parametrize("params", list(CPU_SETS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_optimizer_step(benchmark, provider: str, params: str) -> None:
    prov = PROVIDERS[provider]
    step = prov.make(make_params(CPU_SETS[params], "cpu"))
    benchmark.extra_info.update(
        {"kind": prov.kind, "base": prov.base, "floor_bytes_per_param": prov.floor_bytes}
    )
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
