"""Every SAM variant under DDP (gloo, two spawned ranks on 127.0.0.1, ONE spawn for all).

Under synchronised DDP each backward all-reduces the gradients, so every global reduction of a
variant (LookSAM's and GSAM's dot products, the norms of LookSAM's reuse step and of
Momentum-SAM's perturbation) already sees the gradient of the whole batch. The ranks must then
end bit-identical, weights and optimizer state alike, and equal one process that runs the same
variant on the concatenated batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import flat_state, spawn_gloo
from test_distributed import _batch, _model
from torch import nn
from torch.nn import functional as nnf

from fused_sam import GSAM, EveryK, FriendlySAM, FusedSAM, LookSAM, MomentumSAM

WORLD, STEPS = 2, 5


def _full_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the ranks see together: the concatenation of their batches."""
    xs, ys = zip(*(_batch(r, step) for r in range(WORLD)))
    return torch.cat(xs), torch.cat(ys)


def _sgd(model: nn.Module, **variant: Any) -> FusedSAM:
    return FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                    **variant)  # fmt: skip


#: name -> (how its users drive it, the optimizer). Schedules use k = 2 so that five steps hold
#: three SAM steps and two plain (EveryK) or reuse (LookSAM) steps.
VARIANTS: dict[str, tuple[str, Callable[[nn.Module], Any]]] = {
    "every-2": ("closure", lambda m: _sgd(m, schedule=EveryK(2))),
    "looksam": ("closure", lambda m: _sgd(m, schedule=LookSAM(k=2, alpha=0.7))),
    "friendly": ("two-step", lambda m: _sgd(m, direction=FriendlySAM(sigma=1.0, lam=0.6))),
    "gsam": (
        "two-step",
        lambda m: FusedSAM(
            torch.optim.AdamW(m.parameters(), lr=0.01), rho=0.1, direction=GSAM(alpha=0.4)
        ),
    ),
    "momentum": (
        "one-pass",
        lambda m: MomentumSAM(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9),
    ),
}


def _train(drive: str, module: nn.Module, opt: Any, batch: Callable[[int], Any]) -> list[str]:
    """``STEPS`` steps the way the variant's users drive it; returns the kind of each step."""
    kinds = []
    for step in range(STEPS):
        x, y = batch(step)
        kinds.append(getattr(opt, "next_step", "one-pass"))
        if drive == "closure":  # step(closure) takes one pass on plain/reuse steps, two on SAM

            def closure(x=x, y=y) -> torch.Tensor:
                opt.zero_grad()
                loss = nnf.cross_entropy(module(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        elif drive == "two-step":
            nnf.cross_entropy(module(x), y).backward()
            opt.first_step(zero_grad=True)
            nnf.cross_entropy(module(x), y).backward()
            opt.second_step(zero_grad=True)
        else:  # Momentum-SAM: the plain loop
            nnf.cross_entropy(module(x), y).backward()
            opt.step()
            opt.zero_grad()
    return kinds


def _result(model: nn.Module, opt: Any, kinds: list[str]) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": flat_state(opt.state_dict()),
        "kinds": kinds,
    }


def _worker(rank: int, out: str) -> None:
    results = {}
    for name, (drive, make) in VARIANTS.items():
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make(model)
        kinds = _train(drive, ddp, opt, lambda step: _batch(rank, step))
        results[name] = _result(model, opt, kinds)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _single_process(name: str) -> dict[str, Any]:
    drive, make = VARIANTS[name]
    model = _model()
    opt = make(model)
    kinds = _train(drive, model, opt, _full_batch)
    return _result(model, opt, kinds)


@pytest.mark.distributed
def test_every_variant_under_ddp(tmp_path: Path) -> None:
    spawn_gloo(_worker, str(tmp_path), world=WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert set(r0) == set(VARIANTS)
    for name in VARIANTS:
        a, b = r0[name], r1[name]
        assert len(a["state"]) == len(b["state"]) > 0, name
        for key in ("params", "state"):
            for s, t in zip(a[key], b[key], strict=True):
                assert torch.equal(s, t), f"{name}: ranks differ in {key}"
        single = _single_process(name)
        assert a["kinds"] == single["kinds"], name
        for key in ("params", "state"):
            assert len(a[key]) == len(single[key]), name
            for s, t in zip(a[key], single[key]):
                torch.testing.assert_close(s, t, atol=1e-6, rtol=1e-5, msg=f"{name} {key}")
    # The schedules took their plain/reuse steps between SAM steps.
    assert r0["looksam"]["kinds"] == ["sam", "plain", "sam", "plain", "sam"]
    assert r0["every-2"]["kinds"] == r0["looksam"]["kinds"]
