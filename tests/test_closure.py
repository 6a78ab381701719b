"""``FusedSAM.step(closure)`` runs the pass at ``w + e`` for the caller: it must do what the
two-step loop does around it (BatchNorm statistics from the first pass, by default), refuse a
closure that trains nothing, and run step pre-hooks where the two-step form runs them.

No framework here (the trainers built on this path are in ``test_integrations.py``); the
mutants of this path (``mutation/mutants.py``) run this file.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import CPU_BACKENDS, require_backend
from torch import nn
from torch.nn import functional as nnf

from fused_sam import FusedSAM, frozen_bn_stats

N, D, C = 16, 6, 3  # examples, features, classes
BACKENDS = ["reference", *CPU_BACKENDS]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BNNet(Net):
    """:class:`Net` with a BatchNorm layer (``momentum=None``: a cumulative average)."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(D, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Tanh(), nn.Linear(8, C)
        )


def _sam(model: nn.Module, **kw) -> FusedSAM:
    return FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kw)


def _bn_reference(steps: int, freeze: bool, momentum: float | None) -> nn.Module:
    """The README's two-step loop, ``frozen_bn_stats`` around pass 2 unless ``freeze`` is off."""
    model = BNNet(momentum)
    opt = _sam(model, backend="reference")
    x, y = _data()
    for _ in range(steps):
        nnf.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model) if freeze else contextlib.nullcontext():
            nnf.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return model


def _close(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(
        [*a.named_parameters(), *a.named_buffers()], [*b.named_parameters(), *b.named_buffers()]
    ):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("kind", "freeze", "backend"),
    [("plain", True, b) for b in BACKENDS]
    + [("plain", False, "foreach"), ("cumulative", True, "foreach"), ("compiled", True, "cpu")],
)
def test_step_closure_keeps_bn_stats_of_the_first_pass(
    kind: str, freeze: bool, backend: str
) -> None:
    """``step(closure)`` runs pass 2 itself, so it keeps the BN buffers of pass 1 (by
    default; ``freeze_bn_stats=False`` lets pass 2 update them), whatever module the layer is
    reached through (a ``torch.compile``'d model runs its layers inside its graph)."""
    momentum = None if kind == "cumulative" else 0.1
    model = BNNet(momentum)
    require_backend(backend)
    opt = _sam(model, backend=backend, **({} if freeze else {"freeze_bn_stats": False}))
    run = torch.compile(model, backend="eager") if kind == "compiled" else model
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = nnf.cross_entropy(run(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    ref = _bn_reference(3, freeze=freeze, momentum=momentum)
    assert int(model.body[1].num_batches_tracked) == (3 if freeze else 6)
    _close(model, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_that_makes_no_gradient_raises(backend: str) -> None:
    """``opt.step(lambda: None)`` and a closure that leaves old gradients as they were would
    perturb, restore and step on nothing: they raise, the weights untouched."""
    x, y = _data()
    require_backend(backend)
    model = Net()
    opt = _sam(model, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no parameter of the optimizer had a new gradient"):
        opt.step(lambda: None)
    nnf.cross_entropy(model(x), y).backward()  # gradients from before the call
    with pytest.raises(RuntimeError, match="new gradient"):
        opt.step(lambda: torch.tensor(1.0))
    assert not opt.in_flight
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    opt.zero_grad()
    nnf.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)  # in flight: a closure that runs no second pass
    with pytest.raises(RuntimeError, match="new gradient"):
        opt.step(lambda: None)
    assert not opt.in_flight
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_pre_hooks_see_the_same_point_in_both_forms(backend: str) -> None:
    """Pre-hooks run after the step's last pass, before the base update: weights at w + e and
    the second-pass gradients, in the two-step form and in ``step(closure)`` alike."""
    require_backend(backend)
    x, y = _data()
    seen: dict[str, list[torch.Tensor]] = {}
    for form in ("two-step", "closure"):
        model = Net()
        opt = _sam(model, backend=backend)

        def hook(o, args, kwargs, form=form) -> None:
            params = o.base_optimizer.param_groups[0]["params"]
            seen.setdefault(form, [t.detach().clone() for p in params for t in (p, p.grad)])

        opt.register_step_pre_hook(hook)
        if form == "two-step":
            nnf.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nnf.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:

            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = nnf.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    w = [p.detach() for p in Net().parameters()]
    for a, b in zip(seen["two-step"], seen["closure"]):
        torch.testing.assert_close(a, b)
    assert not torch.equal(seen["closure"][0], w[0])  # at w + e, not w
