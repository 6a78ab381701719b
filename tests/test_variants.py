"""SAM variants against independent implementations of their update rules."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend
from helpers import LoopSAM, state_tensors
from torch import nn
from torch.nn import functional as nnf

from fused_sam import EveryK, FusedSAM

BACKENDS = ["reference", *CPU_BACKENDS]
STEPS = 7


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _every_k_rule(k: int) -> list[torch.Tensor]:
    """SAM (the community per-tensor algorithm) on steps 0, k, 2k, ...; plain SGD between."""
    model = _net()
    loop = LoopSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = _batch(step)
        nnf.cross_entropy(model(x), y).backward()
        if step % k == 0:
            loop.first_step()
            nnf.cross_entropy(model(x), y).backward()
            loop.second_step()
        else:
            loop.base.step()
            loop.base.zero_grad()
    return [p.detach() for p in model.parameters()]


def _sam(model: nn.Module, backend: str | None, k: int) -> FusedSAM:
    return FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                    backend=backend, schedule=EveryK(k))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_k_two_step_loop_matches_the_rule(backend: str) -> None:
    require_backend(backend)
    model = _net()
    opt = _sam(model, backend, 3)
    kinds = []
    for step in range(STEPS):
        x, y = _batch(step)
        kinds.append(opt.next_step)
        nnf.cross_entropy(model(x), y).backward()
        if opt.next_step == "sam":
            opt.first_step(zero_grad=True)
            nnf.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()  # a plain step: allowed by the schedule
            opt.zero_grad()
    assert kinds == ["sam", "plain", "plain", "sam", "plain", "plain", "sam"]
    for a, b in zip(model.parameters(), _every_k_rule(3)):
        assert_close(a.detach(), b, "params")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_every_k_closure_calls_and_resume(backend: str) -> None:
    """step(closure) calls the closure twice on SAM steps and once on plain ones; a resume
    from a checkpoint continues the schedule where it was, bit for bit."""
    require_backend(backend)
    model = _net()
    opt = _sam(model, backend, 3)
    calls = []

    def run(model, opt, steps):
        for step in steps:
            x, y = _batch(step)

            def closure(step=step, x=x, y=y):
                calls.append(step)
                opt.zero_grad()
                loss = nnf.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)

    run(model, opt, range(4))
    assert [calls.count(s) for s in range(4)] == [2, 1, 1, 2]
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert ckpt["opt"]["sam_schedule"]["steps"] == 4
    run(model, opt, range(4, STEPS))
    resumed = _net()
    resumed.load_state_dict(ckpt["model"])
    opt2 = _sam(resumed, backend, 3)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.next_step == "plain"  # step 4 of EveryK(3)
    run(resumed, opt2, range(4, STEPS))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(state_tensors(opt, list(model.parameters())),
                    state_tensors(opt2, list(resumed.parameters()))):  # fmt: skip
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), _every_k_rule(3)):
        assert_close(a.detach(), b, "params")


def test_every_k_guards() -> None:
    model = _net()
    opt = _sam(model, None, 2)
    x, y = _batch(0)
    nnf.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nnf.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert opt.next_step == "plain"
    nnf.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="plain step"):
        opt.first_step()
    assert not opt.in_flight
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k >= 1"):
            EveryK(bad)
    with pytest.raises(ValueError, match="StepSchedule"):
        FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, schedule="every-5")
