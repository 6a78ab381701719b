"""Faults: whatever goes wrong, no weight is left perturbed, lost or silently wrong.

Each test pins one defect found by adversarial use: large finite gradients, skipped steps
that created state, parameters sharing memory, rejected groups and checkpoints, errors raised
mid-step, base optimizers FusedSAM cannot drive, hooks and schedulers on the base optimizer,
and precision when float64 and float32 tensors share a step. Every CPU backend.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend
from helpers import backward, odd_params, state_tensors
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from fused_sam import FusedSAM
from fused_sam import functional as F
from fused_sam.hyperparams import SGDHyper

BACKENDS = ["reference", *CPU_BACKENDS]


def _sgd(ps, backend, **kw) -> FusedSAM:
    kw = {"lr": 0.1, "momentum": 0.9, **kw}
    return FusedSAM(ps, torch.optim.SGD, rho=0.05, backend=backend, **kw)


def _sam_step(opt, ps, step) -> None:
    backward(ps, step)
    opt.first_step(zero_grad=True)
    backward(ps, step + 100)
    opt.second_step(zero_grad=True)


def _copy(ps) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ps]


def _same(ps, want) -> None:
    for p, w in zip(ps, want):
        assert torch.equal(p, w)


# ---------------------------------------------------------------------------------------------
# Large finite gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_finite_gradients_perturb_along_g(backend: str) -> None:
    """A gradient with ||g|| ~ 1e21 (squares overflow float32) is finite: e = rho g / ||g||."""
    require_backend(backend)
    ps = odd_params()
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    torch.manual_seed(1)
    for p in ps:
        p.grad = torch.randn_like(p) * 1e20
    g = torch.cat([p.grad.double().reshape(-1) for p in ps])
    before = _copy(ps)
    opt.first_step()
    e = torch.cat([(p.double() - b.double()).reshape(-1) for p, b in zip(ps, before)])
    want = 0.05 * g / g.norm()
    # |w| < 5, so w + e rounded to float32 is off by at most 2.4e-7 (e itself is ~1e-3).
    torch.testing.assert_close(e, want, atol=3e-7, rtol=1e-4)
    opt.second_step()
    assert not bool(opt.last_step_skipped)


# ---------------------------------------------------------------------------------------------
# Skipped steps create no state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_skipped_first_step_creates_no_state(backend: str, base: str) -> None:
    """With dampening, a momentum buffer made by a skipped step would change the next step."""
    require_backend(backend)
    ps, ref = odd_params(), odd_params()
    for p, q in zip(ps, ref):
        q.data.copy_(p.data)
    if base == "sgd":
        opt, ref_opt = _sgd(ps, backend, dampening=0.5), _sgd(ref, "reference", dampening=0.5)
    else:
        opt = FusedSAM(torch.optim.Adam(ps, lr=0.01), rho=0.05, backend=backend)
        ref_opt = FusedSAM(torch.optim.Adam(ref, lr=0.01), rho=0.05, backend="reference")
    backward(ps, 0)
    ps[2].grad[0] = float("nan")
    opt.first_step(zero_grad=True)
    backward(ps, 100)
    opt.second_step(zero_grad=True)
    assert bool(opt.last_step_skipped)
    assert not opt.state, "a skipped step must not create optimizer state"
    for step in range(1, 4):
        _sam_step(opt, ps, step)
        _sam_step(ref_opt, ref, step)
    for p, q in zip(ps, ref):
        assert_close(p.detach(), q.detach(), "params")
    for a, b in zip(state_tensors(opt, ps), state_tensors(ref_opt, ref)):
        assert_close(a, b, "state")


# ---------------------------------------------------------------------------------------------
# Parameters that share memory


def test_duplicate_and_overlapping_parameters_are_rejected() -> None:
    p = nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match="more than once"):
        FusedSAM([p, p], torch.optim.SGD, lr=0.1)
    base = torch.randn(9)
    a, b = nn.Parameter(base[0:6]), nn.Parameter(base[3:9])
    with pytest.raises(ValueError, match="share memory"):
        FusedSAM([a, b], torch.optim.SGD, lr=0.1)
    # Adjacent views do not overlap: accepted.
    FusedSAM([nn.Parameter(base[0:3]), nn.Parameter(base[3:9])], torch.optim.SGD, lr=0.1)


def test_param_whose_storage_changes_to_overlap_is_caught_at_the_step() -> None:
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    opt = FusedSAM([a, b], torch.optim.SGD, lr=0.1)
    b.data = a.data[1:]  # b now aliases a
    before = _copy([a, b])
    (a.sum() + b.sum()).backward()
    with pytest.raises(ValueError, match="share memory"):
        opt.first_step()
    assert not opt.in_flight
    _same([a, b], before)


# ---------------------------------------------------------------------------------------------
# Rejected groups and checkpoints leave the optimizer unchanged


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ({"rho": -1.0}, "rho"),
        ({"adaptive": "yes"}, "adaptive"),
        ({"eta": float("nan")}, "eta"),
        ({"params": "dup"}, "more than once"),
    ],
)
def test_rejected_param_group_leaves_optimizer_unchanged(group: dict, match: str) -> None:
    ps = odd_params()
    opt = _sgd(ps[:4], None)
    params = [ps[0]] if group.get("params") == "dup" else ps[4:]
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({**group, "params": params})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1
    _sam_step(opt, ps[:4], 0)  # still usable
    opt.add_param_group({"params": ps[4:], "rho": 0.1})  # a valid group still goes in
    assert opt.param_groups[1]["rho"] == 0.1 and opt.param_groups[1]["adaptive"] is False


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_checkpoint_with_other_shapes_is_rejected(backend: str, base: str) -> None:
    """Same parameter count, other shapes (another model): refused before any kernel reads it;
    the optimizer keeps its own state and trains on."""
    require_backend(backend)

    def make(shapes):
        ps = [nn.Parameter(torch.randn(s)) for s in shapes]
        if base == "sgd":
            return ps, _sgd(ps, backend)
        return ps, FusedSAM(torch.optim.AdamW(ps, lr=0.01), rho=0.05, backend=backend)

    src_ps, src = make([(8, 3), (5,)])
    _sam_step(src, src_ps, 0)
    ps, opt = make([(6, 4), (5,)])
    _sam_step(opt, ps, 1)
    state = [t.clone() for t in state_tensors(opt, ps)]
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(src.state_dict())
    for a, b in zip(state_tensors(opt, ps), state):
        assert torch.equal(a, b)
    _sam_step(opt, ps, 2)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_ops_refuse_state_of_other_shapes(backend: str) -> None:
    """The kernels themselves refuse lists that do not match the parameters (memory safety)."""
    require_backend(backend)
    ps = [torch.randn(6, 4), torch.randn(5)]
    bad = [torch.zeros(8, 3), torch.zeros(5)]
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        F.restore_sgd_step_(
            ps,
            [torch.randn_like(p) for p in ps],
            [p.clone() for p in ps],
            bad,
            SGDHyper(
                0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False
            ),
            first_step=[False, False],
            grad_scale=None,
            found_inf=None,
            backend=backend,
        )


# ---------------------------------------------------------------------------------------------
# Errors raised mid-step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sparse_gradient_in_second_pass_restores_and_goes_idle(backend: str, base: str) -> None:
    require_backend(backend)
    ps = odd_params()
    opt = (
        _sgd(ps, backend)
        if base == "sgd"
        else FusedSAM(torch.optim.AdamW(ps, lr=0.01), rho=0.05, backend=backend)
    )
    _sam_step(opt, ps, 0)
    before, state = _copy(ps), [t.clone() for t in state_tensors(opt, ps)]
    backward(ps, 1)
    opt.first_step(zero_grad=True)
    backward(ps, 101)
    ps[1].grad = ps[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.second_step(zero_grad=True)
    assert not opt.in_flight
    _same(ps, before)
    for a, b in zip(state_tensors(opt, ps), state):
        assert torch.equal(a, b)
    opt.zero_grad()
    _sam_step(opt, ps, 2)  # usable again


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_state_mid_step_restores_and_goes_idle(backend: str) -> None:
    require_backend(backend)
    ps = odd_params()
    opt = _sgd(ps, backend)
    _sam_step(opt, ps, 0)
    before = _copy(ps)
    backward(ps, 1)
    opt.first_step(zero_grad=True)
    backward(ps, 101)
    opt.state[ps[2]]["momentum_buffer"] = torch.zeros(3, 3)  # not the parameter's shape
    with pytest.raises((RuntimeError, ValueError)):
        opt.second_step(zero_grad=True)
    assert not opt.in_flight
    _same(ps, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_in_first_step_leaves_weights_and_goes_idle(backend: str) -> None:
    """A mask policy that fails while the perturbation is prepared: nothing moves."""
    require_backend(backend)
    from fused_sam import MaskPolicy

    class Broken(MaskPolicy):
        def select(self, request):
            raise RuntimeError("scoring failed")

    ps = odd_params()
    opt = _sgd(ps, backend, sparsity=0.5, mask=Broken(), mask_update_every=1)
    before = _copy(ps)
    backward(ps, 0)
    with pytest.raises(RuntimeError, match="scoring failed"):
        opt.first_step()
    assert not opt.in_flight
    _same(ps, before)


def test_failing_bucket_restores_the_buckets_already_perturbed(monkeypatch) -> None:
    """functional.perturb_ is all or nothing across buckets (here: two rho values)."""
    ps = [torch.randn(7), torch.randn(5)]
    gs = [torch.randn_like(p) for p in ps]
    backups = [torch.empty_like(p) for p in ps]
    before = [p.clone() for p in ps]
    from fused_sam.backends import foreach

    calls = []
    real = foreach.perturb_

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("bucket failed")
        real(*args, **kwargs)

    monkeypatch.setattr(foreach, "perturb_", second_fails)
    monkeypatch.setitem(F._MODULES, "cpu", foreach)  # both buckets on the patched module
    sumsq = F.norm_sq(gs, ps, [False, False], [0.0, 0.0], "reference")
    with pytest.raises(RuntimeError, match="bucket failed"):
        F.perturb_(
            ps, gs, backups, sumsq, [0.05, 0.1], 1e-12, [False] * 2, [0.0] * 2, None, "foreach"
        )
    assert len(calls) == 2
    _same(ps, before)


# ---------------------------------------------------------------------------------------------
# Base optimizers FusedSAM cannot drive


def test_closure_only_and_sparse_base_optimizers_are_rejected() -> None:
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="closure"):
        FusedSAM([p], torch.optim.LBFGS, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        FusedSAM(torch.optim.LBFGS([p]))
    with pytest.raises(ValueError, match="SparseAdam"):
        FusedSAM([p], torch.optim.SparseAdam, lr=0.1)


# ---------------------------------------------------------------------------------------------
# Hooks and schedulers of the base optimizer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw", "rmsprop"])
def test_base_optimizer_hooks_fire_once_per_sam_step(backend: str, base: str) -> None:
    require_backend(backend)
    ps = odd_params()
    inner = {
        "sgd": lambda: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adamw": lambda: torch.optim.AdamW(ps, lr=0.01),
        "rmsprop": lambda: torch.optim.RMSprop(ps, lr=0.01),  # never fused: its own step()
    }[base]()
    calls = []
    inner.register_step_pre_hook(lambda *a: calls.append("base-pre"))
    inner.register_step_post_hook(lambda *a: calls.append("base-post"))
    opt = FusedSAM(inner, rho=0.05, backend=backend)
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    handle = register_optimizer_step_post_hook(lambda *a: calls.append("global-post"))
    try:
        _sam_step(opt, ps, 0)
    finally:
        handle.remove()
    assert calls == ["pre", "base-pre", "base-post", "post", "global-post"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduler_built_on_the_base_optimizer_does_not_warn(backend: str) -> None:
    require_backend(backend)
    ps = odd_params()
    inner = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    opt = FusedSAM(inner, rho=0.05, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            _sam_step(opt, ps, step)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


# ---------------------------------------------------------------------------------------------
# Mixed dtypes in one step


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_params_keep_float64_precision_beside_float32(backend: str) -> None:
    """The global norm feeds every tensor's e: float64 tensors need it to float64 precision
    even when float32 tensors contribute most of it."""
    require_backend(backend)
    torch.manual_seed(3)
    p32 = nn.Parameter(torch.randn(4097))
    p64 = nn.Parameter(torch.randn(33, 7, dtype=torch.float64))
    opt = FusedSAM([p32, p64], torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    p32.grad, p64.grad = torch.randn_like(p32), torch.randn_like(p64) * 1e-3
    w64 = p64.detach().clone()
    norm = torch.cat([p32.grad.double().reshape(-1), p64.grad.reshape(-1)]).norm()
    opt.first_step()
    e = p64.detach() - w64
    # atol: w + e rounded to float64 at |w| < 5 (a float32-precision norm errs by ~1e-13).
    torch.testing.assert_close(e, 0.05 * p64.grad / (norm + 1e-12), atol=1e-15, rtol=1e-12)
    opt.restore()


# ---------------------------------------------------------------------------------------------
# fp16 scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_scale_above_fp16_max(backend: str) -> None:
    """rho / ||g|| > 65504 must not be converted to float16 (it used to raise on foreach)."""
    require_backend(backend)
    ps = [nn.Parameter(torch.randn(4097).half()), nn.Parameter(torch.randn(3).half())]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    # ||g|| ~ 3.5e-6: rho / ||g|| ~ 1.4e5, beyond float16's 65504.
    grads = [torch.zeros(4097).half(), torch.full((3,), 2e-6).half()]
    grads[0][::1024] = 1e-6
    out = []
    for params, be in ((ps, backend), (ref, "reference")):
        opt = FusedSAM(params, torch.optim.SGD, rho=0.5, lr=0.1, backend=be)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.first_step()
        out.append([p.detach().clone() for p in params])
        opt.restore()
    for a, b in zip(*out):
        assert_close(a, b, "params")
    assert not torch.equal(out[1][0], ref[0].detach())  # e is resolvable: the test can fail
