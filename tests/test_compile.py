"""``torch.compile`` of the SAM step (CPU, the native ops).

``first_step`` and ``second_step`` compile with ``fullgraph=True`` (no pybind call and no host
read on the traced path), their results equal the eager optimizer's (parameters and optimizer
state), and with ``rho`` and ``lr`` as 0-dim tensors a scheduler changing them every step does
not recompile. ``torch.compile(opt.step)`` either works or raises, and never leaves a step in
flight. Most tests use the ``aot_eager`` backend (the point is tracing and guards; inductor
on two cores takes seconds per graph); one runs inductor for the numerics.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as nnf
from conftest import require_backend
from helpers import flat_state
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from fused_sam import FusedSAM

STEPS = 5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    require_backend("cpu")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


X = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))


def _backward(model: nn.Module) -> torch.Tensor:
    loss = nnf.cross_entropy(model(X), Y)
    loss.backward()
    return loss


#: name -> (base optimizer, its keyword arguments, scheduler factory)
CONFIGS = {
    "sgd-nesterov": (
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8),
    ),
    "sgd-dampening": (
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    ),
    "adamw": (
        torch.optim.AdamW,
        dict(lr=1e-2, weight_decay=1e-2),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s),
    ),
    "adam-amsgrad": (
        torch.optim.Adam,
        dict(lr=1e-2, amsgrad=True, weight_decay=1e-3),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    ),
}


def _sam(model: Net, cfg: str, *, tensors: bool = True) -> FusedSAM:
    """Two groups with their own rho, ASAM on the weights only (so both groups hold tensors
    of both kinds: only rho tells the groups' buckets apart)."""
    base, kwargs, _ = CONFIGS[cfg]
    num = torch.tensor if tensors else float
    kwargs = {**kwargs, "lr": num(kwargs["lr"])}
    groups = [
        {"params": [model.a.weight, model.a.bias], "rho": num(0.5)},
        {"params": [model.b.weight, model.b.bias], "rho": num(0.05)},
    ]
    return FusedSAM(groups, base, adaptive="weights", backend="cpu", **kwargs)


def _set_rho(opt: FusedSAM, step: int) -> None:
    """Change every group's rho by hand, in place (a tensor) or by rebinding (a float)."""
    for i, group in enumerate(opt.param_groups):
        value = (0.5 if i == 0 else 0.05) * (1 + 0.3 * step)
        if isinstance(group["rho"], torch.Tensor):
            group["rho"].fill_(value)
        else:
            group["rho"] = value


def _assert_same(model: Net, opt: FusedSAM, ref: Net, ref_opt: FusedSAM, step: int) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"{name} after step {step}")
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert state.keys() == ref_state.keys()
        for key in state:
            torch.testing.assert_close(
                state[key], ref_state[key], rtol=1e-6, atol=1e-7, msg=f"{name}.{key}"
            )


def _run(cfg: str, backend, *, tensors: bool = True, steps: int = STEPS):
    """``steps`` SAM steps with both halves compiled (fullgraph) next to an eager twin, with
    the lr scheduled and rho changed by hand every step; recompiling after the first two steps
    (the first creates backups, the second optimizer state) is an error."""
    model = Net()
    ref = copy.deepcopy(model)
    opt, ref_opt = _sam(model, cfg, tensors=tensors), _sam(ref, cfg, tensors=tensors)
    make_scheduler = CONFIGS[cfg][2]
    sched, ref_sched = make_scheduler(opt), make_scheduler(ref_opt)
    first = torch.compile(opt.first_step, backend=backend, fullgraph=True)
    second = torch.compile(opt.second_step, backend=backend, fullgraph=True)
    for step in range(steps):
        with torch._dynamo.config.patch(error_on_recompile=step >= 2):
            _backward(model)
            first(zero_grad=True)
            assert opt.in_flight
            _backward(model)
            second(zero_grad=True)
        assert not opt.in_flight and all(p.grad is None for p in model.parameters())
        _backward(ref)
        ref_opt.first_step(zero_grad=True)
        _backward(ref)
        ref_opt.second_step(zero_grad=True)
        _assert_same(model, opt, ref, ref_opt, step)
        with warnings.catch_warnings():
            # e.g. "lr_scheduler.step() before optimizer.step()": the compiled step recorded
            # the call where the scheduler looks for it
            warnings.simplefilter("error")
            sched.step()
        ref_sched.step()
        _set_rho(opt, step)
        _set_rho(ref_opt, step)
    assert opt._progress["steps"] == steps
    return opt


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_halves_compile_fullgraph_and_match_eager(cfg: str) -> None:
    counter = CompileCounterWithBackend("aot_eager")
    opt = _run(cfg, counter)
    # One graph per half for the first step, one more each for the second: no recompile later
    # although lr and rho changed every step.
    assert counter.frame_count == 4
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) != CONFIGS[cfg][1]["lr"]


def test_float_hyperparameters_are_guarded_on() -> None:
    """Why rho and lr are tensors: Python floats are constants of the graph, so a new value
    recompiles (this also shows that the recompile check above can fire)."""
    with pytest.raises(torch._dynamo.exc.RecompileError):
        _run("sgd-nesterov", "aot_eager", tensors=False)


def test_inductor_matches_eager() -> None:
    """The default backend (inductor), for the numerics of the generated code around the ops."""
    counter = CompileCounterWithBackend("inductor")
    _run("adamw", counter, steps=3)
    assert counter.frame_count == 4


def test_skipped_step_under_compile_leaves_weights_and_state() -> None:
    """A non-finite first-pass gradient: the compiled halves skip the perturbation and the base
    update on the device flag (no host read), as eagerly."""
    model = Net()
    ref = copy.deepcopy(model)
    opt, ref_opt = _sam(model, "sgd-dampening"), _sam(ref, "sgd-dampening")
    first = torch.compile(opt.first_step, backend="aot_eager", fullgraph=True)
    second = torch.compile(opt.second_step, backend="aot_eager", fullgraph=True)
    for step in range(3):
        for m, o, f1, f2 in ((model, opt, first, second), (ref, ref_opt, None, None)):
            _backward(m)
            if step == 1:
                m.a.weight.grad[0, 0] = float("inf")
            (f1 or o.first_step)(zero_grad=True)
            _backward(m)  # finite: the skip comes from the first pass's flag
            (f2 or o.second_step)(zero_grad=True)
        assert bool(opt.last_step_skipped) == bool(ref_opt.last_step_skipped) == (step == 1)
        _assert_same(model, opt, ref, ref_opt, step)


def test_compiled_step_finishes_the_step_in_flight() -> None:
    """``torch.compile(opt.step, fullgraph=True)()`` is the second half, as trainers call it."""
    model = Net()
    ref = copy.deepcopy(model)
    opt, ref_opt = _sam(model, "adamw"), _sam(ref, "adamw")
    first = torch.compile(opt.first_step, backend="aot_eager", fullgraph=True)
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    for i in range(3):
        _backward(model)
        first(zero_grad=True)
        _backward(model)
        assert step() is None
        assert not opt.in_flight
        opt.zero_grad()
        _backward(ref)
        ref_opt.first_step(zero_grad=True)
        _backward(ref)
        ref_opt.step()
        ref_opt.zero_grad()
        _assert_same(model, opt, ref, ref_opt, i)


def _closure(model: Net, opt: FusedSAM, fail_on: int | None = None):
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        if calls[0] == fail_on:
            raise KeyError("second pass failed")
        opt.zero_grad()
        return _backward(model)

    return closure


def test_compiled_step_with_closure_works_or_raises_and_never_stays_in_flight() -> None:
    """Without fullgraph the closure's backward passes break the graph and the step equals the
    eager one; with fullgraph, tracing raises before anything runs (nothing in flight, weights
    untouched)."""
    model = Net()
    ref = copy.deepcopy(model)
    opt, ref_opt = _sam(model, "sgd-nesterov"), _sam(ref, "sgd-nesterov")
    whole = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(torch._dynamo.exc.Unsupported):
        whole(_closure(model, opt))
    assert not opt.in_flight
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state

    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="aot_eager")
    for i in range(3):
        loss = step(_closure(model, opt))
        ref_loss = ref_opt.step(_closure(ref, ref_opt))
        assert not opt.in_flight
        torch.testing.assert_close(loss, ref_loss)
        _assert_same(model, opt, ref, ref_opt, i)


def test_compiled_step_restores_when_the_second_pass_raises() -> None:
    model = Net()
    opt = _sam(model, "adamw")
    step = torch.compile(opt.step, backend="aot_eager")
    step(_closure(model, opt))  # a first, normal step
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError, match="second pass failed"):
        step(_closure(model, opt, fail_on=2))
    assert not opt.in_flight
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "rho",
    [
        torch.tensor([0.1, 0.2]),
        torch.tensor(-0.1),
        torch.tensor(1),
        torch.tensor(0.1).requires_grad_(),
    ],
)
def test_tensor_rho_is_checked(rho: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="rho"):
        FusedSAM(Net().parameters(), torch.optim.SGD, rho=rho, lr=0.1)


def test_random_mask_compiles_with_a_graph_break_and_matches_eager() -> None:
    """RandomMask draws a new key every step: traced, the draw is a graph break (so
    ``fullgraph=True`` refuses it), and the compiled halves equal the eager optimizer."""
    from fused_sam import RandomMask

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Net()
        opt = FusedSAM(
            model.parameters(), torch.optim.SGD, rho=torch.tensor(0.5), lr=torch.tensor(0.1),
            momentum=0.9, mask=RandomMask(keep=0.5, seed=3),
        )  # fmt: skip
        first, second = opt.first_step, opt.second_step
        if compiled:
            first = torch.compile(first, backend="aot_eager")
            second = torch.compile(second, backend="aot_eager")
        for _ in range(3):
            _backward(model)
            first(zero_grad=True)
            _backward(model)
            second(zero_grad=True)
        runs.append([p.detach().clone() for p in model.parameters()])
        assert opt._policies.random.draws == 3
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    model = Net()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, mask=RandomMask(keep=0.5))
    _backward(model)
    with pytest.raises(Exception, match=r"(?i)graph break|skip|disable"):
        torch.compile(opt.first_step, backend="aot_eager", fullgraph=True)()
    assert not opt.in_flight and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("variant", ["looksam", "fsam", "gsam"])
def test_variants_compile_and_match_eager(variant: str) -> None:
    """The variants' hooks (fused dot, norm and ``axpby_`` ops, device coefficients) trace:
    compiled halves and the compiled plain ``step()`` of LookSAM's reuse steps equal the eager
    optimizer, weights and variant state. (Graph breaks are allowed: F-SAM reads the skip flag
    on a step that would create its state.)"""
    from fused_sam import GSAM, FriendlySAM, LookSAM

    def policy() -> dict:
        return {
            "looksam": dict(schedule=LookSAM(k=2, alpha=0.5)),
            "fsam": dict(direction=FriendlySAM(sigma=1.0, lam=0.6)),
            "gsam": dict(direction=GSAM(alpha=0.3)),
        }[variant]

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Net()
        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9,
                       **policy())  # fmt: skip
        first, step = opt.first_step, opt.step
        if compiled:
            first = torch.compile(first, backend="aot_eager")
            step = torch.compile(step, backend="aot_eager")
        for _ in range(4):
            _backward(model)
            if opt.next_step == "sam":
                first(zero_grad=True)
                _backward(model)
            step()
            opt.zero_grad()
        state = opt.state_dict()
        extra = state.get("sam_schedule", {}).get("policy", state.get("sam_direction", {}))
        runs.append([p.detach().clone() for p in model.parameters()] + flat_state(extra))
    # The variant's state is compared too: LookSAM's g_v, F-SAM's m (GSAM keeps none).
    assert len(runs[0]) == (4 if variant == "gsam" else 8)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
