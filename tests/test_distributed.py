"""SAM under DDP (gloo, two spawned ranks on 127.0.0.1): synchronised and per-replica steps.

Each rank writes what it ends with; the parent compares the ranks with each other and with
single-process computations written out in this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import spawn_gloo
from torch import nn
from torch.nn import functional as nnf

from fused_sam import FusedSAM
from fused_sam.distributed import per_replica_pass

WORLD, STEPS, RHO, LR = 2, 3, 0.1, 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights everywhere
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)  # every rank has its own data
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _sam(model: nn.Module) -> FusedSAM:
    return FusedSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)


def _train(module: nn.Module, opt: FusedSAM, rank: int) -> None:
    """The plain two-step loop on this rank's batches (``module``: DDP- or FSDP-wrapped)."""
    for step in range(STEPS):
        x, y = _batch(rank, step)
        nnf.cross_entropy(module(x), y).backward()
        opt.first_step(zero_grad=True)
        nnf.cross_entropy(module(x), y).backward()
        opt.second_step(zero_grad=True)


def _worker(rank: int, out: str) -> None:
    results: dict[str, list[torch.Tensor]] = {}

    # Synchronised (the default): both passes all-reduced.
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    _train(ddp, _sam(model), rank)
    results["sync"] = [p.detach().clone() for p in model.parameters()]

    # Per replica (m-sharpness): pass 1 local, pass 2 all-reduced.
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = _sam(model)
    for step in range(STEPS):
        x, y = _batch(rank, step)
        with per_replica_pass(ddp, opt):
            nnf.cross_entropy(ddp(x), y).backward()
        opt.first_step(zero_grad=True)
        nnf.cross_entropy(ddp(x), y).backward()
        opt.second_step(zero_grad=True)
    results["replica"] = [p.detach().clone() for p in model.parameters()]

    # A NaN in rank 1's local first pass: every rank skips, no replica diverges.
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(rank, 9)
    with per_replica_pass(ddp, opt):
        loss = nnf.cross_entropy(ddp(x), y)
        (loss * (float("nan") if rank == 1 else 1.0)).backward()
    opt.first_step(zero_grad=True)
    nnf.cross_entropy(ddp(x), y).backward()
    opt.second_step(zero_grad=True)
    results["nan_skipped"] = [opt.last_step_skipped.reshape(1).float()]
    results["nan_moved"] = [
        torch.tensor(
            [float(any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)))]
        )
    ]

    # Accumulation: 2 micro-batches per pass, no_sync on the inner one of each pass.
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = _sam(model)
    for step in range(STEPS):
        x, y = _batch(rank, step)
        micro = list(zip(x.chunk(2), y.chunk(2)))
        for second in (False, True):
            with ddp.no_sync():
                (nnf.cross_entropy(ddp(micro[0][0]), micro[0][1]) / 2).backward()
            (nnf.cross_entropy(ddp(micro[1][0]), micro[1][1]) / 2).backward()  # all-reduced
            if not second:
                opt.first_step(zero_grad=True)
        opt.second_step(zero_grad=True)
    results["accumulated"] = [p.detach().clone() for p in model.parameters()]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _single_process_sync(make=_sam) -> list[torch.Tensor]:
    """Synchronised SAM = one process on the global batch (the mean of the ranks' losses)."""
    model = _model()
    opt = make(model)
    for step in range(STEPS):
        batches = [_batch(r, step) for r in range(WORLD)]
        for _ in range(2):
            sum(nnf.cross_entropy(model(x), y) for x, y in batches).div(WORLD).backward()
            if not opt.in_flight:
                opt.first_step(zero_grad=True)
        opt.second_step(zero_grad=True)
    return [p.detach() for p in model.parameters()]


def _independent_m_sharpness() -> list[torch.Tensor]:
    """Per-replica SAM from its rule: each replica ascends along its own normalised gradient,
    the gradients at the replicas' ascent points are averaged, then one SGD step."""
    model = _model()
    params = list(model.parameters())
    for step in range(STEPS):
        g2_sum = [torch.zeros_like(p) for p in params]
        for r in range(WORLD):
            x, y = _batch(r, step)
            g1 = torch.autograd.grad(nnf.cross_entropy(model(x), y), params)
            norm = torch.cat([g.reshape(-1) for g in g1]).norm()
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, g1):
                    p.add_(RHO * g / (norm + 1e-12))
            g2 = torch.autograd.grad(nnf.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, b, acc, g in zip(params, w, g2_sum, g2):
                    p.copy_(b)
                    acc.add_(g)
        with torch.no_grad():
            for p, acc in zip(params, g2_sum):
                p.sub_(LR * acc / WORLD)
    return [p.detach() for p in params]


@pytest.mark.distributed
def test_ddp_synchronised_and_per_replica(tmp_path: Path) -> None:
    spawn_gloo(_worker, str(tmp_path), world=WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for key in ("sync", "replica", "accumulated", "nan_skipped", "nan_moved"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), f"ranks differ: {key}"
    single = _single_process_sync()
    for a, b in zip(r0["sync"], single):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(r0["accumulated"], single):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(r0["replica"], _independent_m_sharpness()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(r0["replica"], r0["sync"]))
    assert r0["nan_skipped"][0].item() == 1.0 and r0["nan_moved"][0].item() == 0.0


# ---------------------------------------------------------------------------------------------
# FSDP2: parameters are DTensor shards


def _adamw(model: nn.Module, backend: str | None = None) -> FusedSAM:
    return FusedSAM(torch.optim.AdamW(model.parameters(), lr=0.01), rho=RHO, backend=backend)


FSDP_RUNS = {
    "sgd-fused": lambda m: FusedSAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9),
    "sgd-foreach": lambda m: FusedSAM(
        m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, backend="foreach"
    ),
    "adamw-fused": _adamw,
}


def _fsdp_worker(rank: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, list[torch.Tensor]] = {}
    for name, make in FSDP_RUNS.items():
        model = _model()
        fully_shard(model, mesh=mesh)
        opt = make(model)
        _train(model, opt, rank)
        results[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
        state = opt.state_dict()["state"]
        results[name + "-state"] = [
            v.full_tensor() for st in state.values() for k, v in sorted(st.items()) if k != "step"
        ]
    # Refused up front: shards mixed with plain parameters, and Sparse SAM over shards.
    model = _model()
    fully_shard(model, mesh=mesh)
    refusals = []
    for bad in (
        lambda: FusedSAM([*model.parameters(), nn.Parameter(torch.zeros(2))], torch.optim.SGD),
        lambda: FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5),
    ):
        try:
            bad()
        except ValueError:
            refusals.append(1.0)
    results["refusals"] = [torch.tensor(refusals)]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.distributed
def test_fsdp2_shards_equal_the_unsharded_step(tmp_path: Path) -> None:
    spawn_gloo(_fsdp_worker, str(tmp_path), world=WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for name, make in FSDP_RUNS.items():
        for a, b in zip(r0[name], r1[name]):
            assert torch.equal(a, b), f"ranks differ: {name}"
        for a, b in zip(r0[name], _single_process_sync(make)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
        assert r0[name + "-state"], name
    assert r0["refusals"][0].tolist() == [1.0, 1.0]
