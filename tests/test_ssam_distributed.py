"""Sparse SAM under DDP: every rank perturbs with rank 0's mask after each refresh."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import kept, spawn_gloo
from torch import nn

from fused_sam import DynamicMask, FusedSAM
from fused_sam.masks import fisher_diagonal, global_topk, unpack_bits

WORLD = 2
STEPS = 5


def _flat(opt: FusedSAM, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([unpack_bits(opt.masks[p], p).reshape(-1) for p in params])


def _worker(rank: int, out: str) -> None:
    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(100 + rank)  # each rank has its own data
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    params = list(model.parameters())
    results: dict[str, list[torch.Tensor]] = {}

    # SSAM-D: each rank's policy has its own seed; random growth would disagree.
    opt = FusedSAM(
        params,
        torch.optim.SGD,
        lr=0.1,
        sparsity=0.5,
        mask=DynamicMask(total_steps=STEPS, seed=rank),
        mask_update_every=2,
    )
    masks = []
    for _ in range(STEPS):
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.first_step(zero_grad=True)
        masks.append(_flat(opt, params))
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.second_step(zero_grad=True)
    results["dynamic"] = masks
    results["params"] = [p.detach().clone() for p in params]

    # SSAM-F on each rank's own data: the local top-k differs, the mask must not.
    opt = FusedSAM(params, torch.optim.SGD, lr=0.1, sparsity=0.5, mask="fisher")
    opt.update_mask([(x, y)], model=model)
    local = global_topk(
        fisher_diagonal(params, model=model, data=[(x, y)], num_samples=16),
        kept(sum(p.numel() for p in params), 0.5),
    )
    results["fisher"] = [_flat(opt, params)]
    results["fisher_local"] = [torch.cat([m.reshape(-1) for m in local])]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.distributed
def test_every_rank_uses_rank0_mask(tmp_path: Path) -> None:
    spawn_gloo(_worker, str(tmp_path), world=WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for step, (a, b) in enumerate(zip(r0["dynamic"], r1["dynamic"])):
        assert torch.equal(a, b), f"SSAM-D masks differ across ranks at step {step}"
    assert not torch.equal(r0["dynamic"][0], r0["dynamic"][-1])  # refreshes happened
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    assert torch.equal(r0["fisher"][0], r1["fisher"][0])
    assert torch.equal(r0["fisher"][0], r0["fisher_local"][0])
    assert not torch.equal(r1["fisher"][0], r1["fisher_local"][0])  # rank 1 took rank 0's
