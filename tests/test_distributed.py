"""Distributed training (gloo, two spawned ranks on 127.0.0.1): DDP, FSDP2, sparse SAM and
the variants.

SAM under DDP: synchronised and per-replica steps.

One spawn runs every part (a spawn costs seconds of process start and imports): each rank
writes what it ends with, part by part; the tests compare the ranks with each other and with
single-process computations written out in this file.

Sparse SAM under DDP: every rank perturbs with rank 0's mask after each refresh.

Every SAM variant under DDP.

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
from helpers import flat_state, kept, spawn_gloo
from torch import nn
from torch.nn import functional as nnf

from fused_sam import GSAM, DynamicMask, EveryK, FriendlySAM, FusedSAM, LookSAM, MomentumSAM
from fused_sam.distributed import per_replica_pass
from fused_sam.masks import fisher_diagonal, global_topk, unpack_bits

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
def test_ddp_synchronised_and_per_replica(ranks: Path) -> None:
    r0, r1 = _load(ranks, "ddp")
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
def test_fsdp2_shards_equal_the_unsharded_step(ranks: Path) -> None:
    r0, r1 = _load(ranks, "fsdp2")
    for name, make in FSDP_RUNS.items():
        for a, b in zip(r0[name], r1[name]):
            assert torch.equal(a, b), f"ranks differ: {name}"
        for a, b in zip(r0[name], _single_process_sync(make)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
        assert r0[name + "-state"], name
    assert r0["refusals"][0].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Sparse SAM under DDP: one mask on every rank

WORLD = 2
STEPS = 5


def _flat(opt: FusedSAM, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([unpack_bits(opt.masks[p], p).reshape(-1) for p in params])


def _worker_ssam(rank: int, out: str) -> None:
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
def test_every_rank_uses_rank0_mask(ranks: Path) -> None:
    r0, r1 = _load(ranks, "ssam")
    for step, (a, b) in enumerate(zip(r0["dynamic"], r1["dynamic"])):
        assert torch.equal(a, b), f"SSAM-D masks differ across ranks at step {step}"
    assert not torch.equal(r0["dynamic"][0], r0["dynamic"][-1])  # refreshes happened
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    assert torch.equal(r0["fisher"][0], r1["fisher"][0])
    assert torch.equal(r0["fisher"][0], r0["fisher_local"][0])
    assert not torch.equal(r1["fisher"][0], r1["fisher_local"][0])  # rank 1 took rank 0's


# ---------------------------------------------------------------------------------------------
# Every SAM variant under DDP

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


def _train_variants(
    drive: str, module: nn.Module, opt: Any, batch: Callable[[int], Any]
) -> list[str]:
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


def _worker_variants(rank: int, out: str) -> None:
    results = {}
    for name, (drive, make) in VARIANTS.items():
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make(model)
        kinds = _train_variants(drive, ddp, opt, lambda step: _batch(rank, step))
        results[name] = _result(model, opt, kinds)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _single_process(name: str) -> dict[str, Any]:
    drive, make = VARIANTS[name]
    model = _model()
    opt = make(model)
    kinds = _train_variants(drive, model, opt, _full_batch)
    return _result(model, opt, kinds)


@pytest.mark.distributed
def test_every_variant_under_ddp(ranks: Path) -> None:
    r0, r1 = _load(ranks, "variants")
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


# ---------------------------------------------------------------------------------------------
# One spawn for every part above


#: part name -> the function each rank runs for it (it writes ``rank{r}.pt`` in its folder).
_PARTS: dict[str, Callable[[int, str], None]] = {
    "ddp": _worker,
    "fsdp2": _fsdp_worker,
    "ssam": _worker_ssam,
    "variants": _worker_variants,
}


def _every_part(rank: int, out: str) -> None:
    for name, part in _PARTS.items():
        part(rank, os.path.join(out, name))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of every part's outputs, from one spawn of ``WORLD`` gloo ranks."""
    out = tmp_path_factory.mktemp("ranks")
    for name in _PARTS:
        (out / name).mkdir()
    spawn_gloo(_every_part, str(out), world=WORLD)
    return out


def _load(out: Path, part: str) -> list[dict[str, Any]]:
    return [torch.load(out / part / f"rank{r}.pt") for r in range(WORLD)]
