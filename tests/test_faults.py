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


# ---------------------------------------------------------------------------------------------
# A refused wrapper leaves the base optimizer as it was


def test_refused_wrapper_leaves_the_base_optimizer_unchanged() -> None:
    """FusedSAM(base, ...) that raises (a forced backend that cannot run here, a bad per-group
    rho) writes nothing into base.param_groups: a later wrapper trains at its own rho."""
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    base = torch.optim.SGD([{"params": [a]}, {"params": [b], "rho": -1.0}], lr=0.1)
    before = [dict(g) for g in base.param_groups]
    with pytest.raises(ValueError, match="rho"):
        FusedSAM(base, rho=0.5, adaptive=True, eta=0.1)
    assert base.param_groups == before
    base = torch.optim.SGD([a, b], lr=0.1)
    before = [dict(g) for g in base.param_groups]
    with pytest.raises(RuntimeError, match="cuda"):
        FusedSAM(base, rho=0.5, adaptive=True, eta=0.1, backend="cuda")
    assert base.param_groups == before
    opt = FusedSAM(base, rho=0.05)
    assert [g["rho"] for g in opt.param_groups] == [0.05]
    assert [g["adaptive"] for g in opt.param_groups] == [False]


# ---------------------------------------------------------------------------------------------
# A base-optimizer post-hook that raises


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "rmsprop"])
def test_raising_base_post_hook_leaves_the_step_taken(backend: str, base: str) -> None:
    """As with torch's own step(), a base step post-hook that raises runs after the step is
    complete: weights and state are those of the step, on every backend (not weights rolled
    back to w beside a momentum that counted g2), and the next step goes on from there."""
    require_backend(backend)
    ps, ref = odd_params(), odd_params()
    with torch.no_grad():
        for r, p in zip(ref, ps):
            r.copy_(p)
    make = {
        "sgd": lambda q: torch.optim.SGD(q, lr=0.1, momentum=0.9),
        "rmsprop": lambda q: torch.optim.RMSprop(q, lr=0.01),
    }[base]
    inner = make(ps)
    fail = [True]

    def hook(*args) -> None:
        if fail.pop() if fail else False:
            raise RuntimeError("post-hook failed")

    inner.register_step_post_hook(hook)
    opt, ref_opt = FusedSAM(inner, backend=backend), FusedSAM(make(ref), backend=backend)
    backward(ps, 0)
    opt.first_step(zero_grad=True)
    backward(ps, 100)
    with pytest.raises(RuntimeError, match="post-hook failed"):
        opt.second_step(zero_grad=True)
    assert not opt.in_flight
    _sam_step(ref_opt, ref, 0)
    _same(ps, ref)
    _same(state_tensors(opt, ps), state_tensors(ref_opt, ref))
    opt.zero_grad()
    for step in (1, 2):
        _sam_step(opt, ps, step)
        _sam_step(ref_opt, ref, step)
    _same(ps, ref)
    _same(state_tensors(opt, ps), state_tensors(ref_opt, ref))


# ---------------------------------------------------------------------------------------------
# A skipped step changes no sparse-SAM mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_does_not_rescore_the_dynamic_mask(backend: str) -> None:
    """A refresh due on a step with a nan first-pass gradient would score SSAM-D with it; the
    step is skipped, so masks and the policy's state stay as they were and the refresh happens
    at the next (finite) step."""
    from fused_sam import DynamicMask

    require_backend(backend)
    ps = [nn.Parameter(torch.randn(8, 8))]
    opt = FusedSAM(
        ps,
        torch.optim.SGD,
        lr=0.1,
        backend=backend,
        sparsity=0.5,
        mask=DynamicMask(drop_rate=0.5, seed=0),
        mask_update_every=1,
    )
    _sam_step(opt, ps, 0)
    masks = {p: m.clone() for p, m in opt.masks.items()}
    policy = opt.mask_policy.state_dict()
    backward(ps, 1)
    ps[0].grad[0, :4] = float("nan")
    opt.first_step(zero_grad=True)
    backward(ps, 101)
    opt.second_step(zero_grad=True)
    assert bool(opt.last_step_skipped)
    for p, m in opt.masks.items():
        assert torch.equal(m, masks[p])
    assert str(opt.mask_policy.state_dict()) == str(policy)
    _sam_step(opt, ps, 2)  # finite: the refresh that was put off happens now
    assert any(not torch.equal(m, masks[p]) for p, m in opt.masks.items())


# ---------------------------------------------------------------------------------------------
# ASAM where T(w)^2 g overflows float32 but e does not


def _asam_cases() -> dict[str, tuple[list[nn.Parameter], list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return {
        # |w| ~ 1e4, g ~ 1e32: T^2 g ~ 1e40 > float32's max; the second tensor is not dense, so
        # the cpu and triton backends hand it to foreach.
        "large g": (
            [nn.Parameter(randn(50) * 1e4), nn.Parameter((randn(16, 10) * 1e4)[:, ::2])],
            [randn(50) * 1e32, randn(16, 5) * 1e32],
        ),
        # |w| ~ 1e20, g ~ 1: T^2 g ~ 1e40, while e ~ rho |w|.
        "large w": ([nn.Parameter(randn(7, 5) * 1e20)], [randn(7, 5)]),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["large g", "large w"])
def test_asam_perturbation_in_range_where_t_squared_g_overflows_float32(
    backend: str, case: str
) -> None:
    """e = rho T(w)^2 g / ||T(w) g|| is finite here: every backend computes it (float64 or in
    range), not w + e = inf and a silently skipped second pass."""
    require_backend(backend)
    moved = {}
    for name in ("reference", backend):
        ps, gs = _asam_cases()[case]
        for p, g in zip(ps, gs):
            p.grad = g
        opt = FusedSAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1, backend=name)
        before = _copy(ps)
        opt.first_step()
        moved[name] = [p.detach().double() - b.double() for p, b in zip(ps, before)]
        assert all(torch.isfinite(p).all() for p in ps)
        opt.restore()
        _same(ps, before)
    for got, want in zip(moved[backend], moved["reference"]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=0, rtol=1e-6)


def test_foreach_device_path_computes_asam_in_range() -> None:
    """The on-device path of the foreach backend (accelerators), run on CPU tensors."""
    from fused_sam import reference
    from fused_sam.backends import foreach

    for case in ("large g", "large w"):
        ps, gs = _asam_cases()[case]
        ws = [p.detach().clone() for p in ps]
        ref = [w.clone() for w in ws]
        sumsq = foreach.norm_sq_partials(gs, ws, True, 0.0)
        foreach._add_guarded(ws, gs, sumsq.sum().sqrt(), 0.5, 1e-12, True, 0.0, None)
        reference.perturb_(ref, gs, [w.clone() for w in ref], sumsq, 0.5, 1e-12, True, 0.0, None)
        for w, r in zip(ws, ref):
            assert torch.isfinite(w).all()
            torch.testing.assert_close(w, r, atol=0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# load_state_dict hooks registered on FusedSAM


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_hooks_on_fused_sam_run(backend: str) -> None:
    """register_load_state_dict_pre_hook/post_hook on FusedSAM run as on any torch optimizer:
    the pre-hook sees (and may replace) the checkpoint, the post-hook runs after it is in."""
    require_backend(backend)
    ps = odd_params()
    opt = _sgd(ps, backend)
    _sam_step(opt, ps, 0)
    ckpt = opt.state_dict()
    calls = []

    def pre(o, sd):
        calls.append(("pre", o is opt))
        sd = dict(sd)
        sd["param_groups"] = [{**g, "lr": 0.25} for g in sd["param_groups"]]
        return sd

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(
        lambda o: calls.append(("post", o.param_groups[0]["lr"]))
    )
    opt.load_state_dict(ckpt)
    assert calls == [("pre", True), ("post", 0.25)]
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.25


# ---------------------------------------------------------------------------------------------
# A checkpoint of another optimizer type


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", [("sgd", "adam"), ("adam", "sgd")])
def test_checkpoint_of_another_optimizer_type_is_refused_up_front(
    backend: str, pair: tuple[str, str]
) -> None:
    """A plain torch SGD state_dict into FusedSAM(Adam) (and the reverse): a clear ValueError,
    and the optimizer unchanged and still linked to its base, stepping as before."""
    require_backend(backend)
    saved_kind, kind = pair
    make = {
        "sgd": lambda q: torch.optim.SGD(q, lr=0.1, momentum=0.9),
        "adam": lambda q: torch.optim.Adam(q, lr=0.01),
    }
    other = odd_params()
    plain = make[saved_kind](other)
    backward(other, 0)
    plain.step()
    ps, ref = odd_params(), odd_params()
    with torch.no_grad():
        for r, p in zip(ref, ps):
            r.copy_(p)
    opt = FusedSAM(make[kind](ps), backend=backend)
    ref_opt = FusedSAM(make[kind](ref), backend=backend)
    _sam_step(opt, ps, 0)
    _sam_step(ref_opt, ref, 0)
    groups = opt.param_groups
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(plain.state_dict())
    assert opt.param_groups is groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    for step in (1, 2):
        _sam_step(opt, ps, step)
        _sam_step(ref_opt, ref, step)
    _same(ps, ref)
    _same(state_tensors(opt, ps), state_tensors(ref_opt, ref))


# ---------------------------------------------------------------------------------------------
# step(closure) with zero_grad(set_to_none=False) and a layer the pass skips


def _layerdrop_run(backend: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)])
    opt = _sgd(layers.parameters(), backend)
    x = torch.randn(8, 4)

    def closure(skip: int | None):
        opt.zero_grad(set_to_none=False)
        h = x
        for i, layer in enumerate(layers):
            if i != skip:
                h = torch.tanh(layer(h))
        loss = h.square().mean()
        loss.backward()
        return loss

    for step in range(4):
        opt.step(lambda step=step: closure(1 if step % 2 else None))
    weights = [p.detach().clone() for p in layers.parameters()]
    # Gradients left from a backward outside the closure, added onto: still refused.
    closure(None)

    def accumulating():
        loss = layers[2](torch.tanh(layers[0](x))).square().mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="accumulat"):
        opt.step(accumulating)
    return weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_zeroing_in_place_with_a_skipped_layer_is_accepted(backend: str) -> None:
    """torch's convention (zero_grad(set_to_none=False)) with a forward that skips a layer
    (LayerDrop, MoE routing): the skipped layer's gradient is zeroed once and not written
    again. That is not gradient accumulation: the step runs, as torch's SGD runs it, and its
    weights equal those of the reference backend. Accumulating onto a nonzero gradient still
    raises."""
    require_backend(backend)
    for a, b in zip(_layerdrop_run(backend), _layerdrop_run("reference")):
        assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# The model cast after optimizer state exists


def _cast_run(backend: str, base: str, dtype: torch.dtype) -> tuple[list, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    if base == "sgd":
        opt = _sgd(model.parameters(), backend)
    else:
        opt = FusedSAM(model.parameters(), torch.optim.Adam, lr=0.01, backend=backend)
    x = torch.randn(9, 5)

    def closure():
        opt.zero_grad()
        loss = model(x.to(model[0].weight.dtype)).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    model.to(dtype)
    for _ in range(3):
        opt.step(closure)
    params = list(model.parameters())
    return [p.detach().clone() for p in params], state_tensors(opt, params)


# torch.optim.Adam itself cannot step float32 state beside other-dtype params (lerp refuses
# the mix), so Adam runs only on the backends that fuse its step.
_CAST_CASES = [("sgd", b) for b in BACKENDS] + [("adam", "cpu"), ("adam", "triton")]


@pytest.mark.parametrize(("base", "backend"), _CAST_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_model_cast_after_state_exists_keeps_training(
    backend: str, base: str, dtype: torch.dtype
) -> None:
    """model.to(bfloat16) or .double() with momentum stored: the optimizer goes on with its
    float32 state, as torch's SGD does (every backend), equal to the reference. torch's own Adam
    cannot step such a model (lerp refuses the mixed dtypes), so on the backends that call its
    step() (reference, foreach) it is left out; the fused ones agree with each other."""
    require_backend(backend)
    want_backend = "reference" if base == "sgd" else "triton"
    got, got_state = _cast_run(backend, base, dtype)
    want, want_state = _cast_run(want_backend, base, dtype)
    for a, b in zip(got + got_state, want + want_state):
        assert a.dtype == b.dtype
        if b.dtype == torch.float64:  # float64 weights moved by float32 momentum: its precision
            a, b = a.float(), b.float()
        assert_close(a, b)
    assert all(t.dtype == torch.float32 for t in got_state)
    assert all(p.dtype == dtype for p in got)


# ---------------------------------------------------------------------------------------------
# Parameters on the meta device (deferred initialisation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_parameters_are_accepted_and_train_once_materialised(backend: str) -> None:
    """Deferred initialisation builds the optimizer on a meta model (every meta tensor reports
    address 0: not shared memory); after ``to_empty`` and an init the steps equal those of an
    optimizer built on the materialised model."""
    require_backend(backend)

    def make(device: str) -> nn.Module:
        with torch.device(device):
            return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    meta = make("meta")
    opt = _sgd(meta.parameters(), backend)
    opt.add_param_group({"params": [nn.Parameter(torch.empty(3, device="meta"))]})
    # Materialised in place (the same Parameter objects, which the optimizer holds).
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        meta.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert all(p.device.type == "cpu" for p in opt.param_groups[0]["params"])
    twin = make("cpu")
    with torch.no_grad():
        for m, t in zip(meta.parameters(), twin.parameters()):
            m.copy_(t)
    twin_opt = _sgd(twin.parameters(), backend)
    x = torch.randn(6, 3)
    for model, o in ((meta, opt), (twin, twin_opt)):
        for _ in range(3):
            model(x).square().mean().backward()
            o.first_step(zero_grad=True)
            model(x).square().mean().backward()
            o.second_step(zero_grad=True)
    _same(list(meta.parameters()), list(twin.parameters()))


# ---------------------------------------------------------------------------------------------
# Trap: the base optimizer's step() fails half-way


class _FailsHalfWay(torch.optim.SGD):
    """SGD whose step() updates its first group, then raises (a bad second group)."""

    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = groups[:1]
        try:
            super().step()
        finally:
            self.param_groups = groups
        raise RuntimeError("second group is broken")


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_step_failing_half_way_restores_w_and_says_the_state_kept_it(backend: str) -> None:
    """Decision: the weights go back exactly to w (the README's guarantee); the base optimizer's
    state keeps what its step() wrote before raising, as torch leaves it (a rollback would copy
    the whole state every step), and the error says so in a note."""
    require_backend(backend)
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3))
    base = _FailsHalfWay([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9)
    opt = FusedSAM(base, backend=backend)
    ps = [a, b]
    backward(ps, 0)
    w = _copy(ps)
    opt.first_step(zero_grad=True)
    backward(ps, 100)
    g2 = [p.grad.clone() for p in ps]
    with pytest.raises(RuntimeError, match="second group is broken") as info:
        opt.second_step()
    assert not opt.in_flight
    _same(ps, w)
    assert torch.equal(opt.state[a]["momentum_buffer"], g2[0])  # a's part of the step: kept
    assert "momentum_buffer" not in opt.state[b]
    assert any("restored exactly to w" in n for n in getattr(info.value, "__notes__", []))


# ---------------------------------------------------------------------------------------------
# Trap: two optimizers over the same parameters


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_optimizers_cannot_interleave_steps_over_the_same_parameters(backend: str) -> None:
    """Decision: two FusedSAM over the same parameters may take turns (each step finished
    before the other begins: at lr = 0 the weights never move), but a first_step over a
    parameter another optimizer holds at w + e raises, leaving everything as it was (the
    second backup would be the first's w + e: at lr = 0 the weights drifted by e per step)."""
    require_backend(backend)
    ps = odd_params()
    w = _copy(ps)
    one, two = _sgd(ps, backend, lr=0.0), _sgd(ps, backend, lr=0.0)
    for step in range(2):
        _sam_step(one, ps, step)
        _sam_step(two, ps, step)
    _same(ps, w)
    backward(ps, 5)
    one.first_step()
    perturbed = _copy(ps)
    with pytest.raises(RuntimeError, match="another FusedSAM"):
        two.first_step()
    assert not two.in_flight
    _same(ps, perturbed)
    one.second_step(zero_grad=True)
    _same(ps, w)
    _sam_step(two, ps, 6)  # free again once the first has finished
    one_more = _sgd(ps[:2], backend, lr=0.0)  # other parameters of the same set: refused too
    backward(ps, 7)
    two.first_step()
    with pytest.raises(RuntimeError, match="another FusedSAM"):
        one_more.first_step()
    two.restore()
    one_more.first_step()
    one_more.restore()
    _same(ps, w)


# ---------------------------------------------------------------------------------------------
# Trap: hyperparameters of numpy types


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_real_hyperparameters_are_accepted_as_their_value(backend: str) -> None:
    """Decision: rho/eta/norm_eps of every real type torch's optimizers take (np.float32,
    np.int64, a 0-d array, as np.float64 already was) act as the float of their value, at
    construction and in a group changed later; bools, complex and arrays of several elements
    are still refused."""
    np = pytest.importorskip("numpy")
    require_backend(backend)
    cases = [
        {"rho": np.float32(0.25), "eta": np.float32(0.5)},
        {"rho": np.array(0.25), "eta": np.array(0.5)},
        {"rho": np.float64(0.25), "eta": np.int64(1)},
    ]
    want_ps = odd_params()
    runs = []
    for kw in [{"rho": 0.25, "eta": float(kw["eta"])} for kw in cases[:1]] + cases:
        ps = [nn.Parameter(p.detach().clone()) for p in want_ps]
        opt = FusedSAM(
            ps, torch.optim.SGD, adaptive=True, lr=0.1, norm_eps=np.float32(1e-12),
            backend=backend, **kw,
        )  # fmt: skip
        _sam_step(opt, ps, 0)
        opt.param_groups[0]["rho"] = kw["rho"] * 2  # a numpy value set by a schedule
        _sam_step(opt, ps, 1)
        runs.append(_copy(ps))
    for run in runs[1:3]:
        _same(run, runs[0])
    zero = FusedSAM(odd_params(), torch.optim.SGD, lr=0.1, rho=np.int64(0), backend=backend)
    assert zero.param_groups[0]["rho"] == 0
    from fused_sam import MomentumSAM

    msam = MomentumSAM(odd_params(), torch.optim.SGD, rho=np.float32(3), lr=0.1, momentum=0.9)
    assert msam.rho == 3.0 and type(msam.rho) is float
    for bad in (np.bool_(True), np.array([0.1, 0.2]), np.complex64(1), "0.1", True):
        with pytest.raises(ValueError, match="rho"):
            FusedSAM(odd_params(), torch.optim.SGD, lr=0.1, rho=bad, backend=backend)


# ---------------------------------------------------------------------------------------------
# Trap: wrapping the same base optimizer again


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrapping_a_base_optimizer_again_applies_the_new_wrappers_values(backend: str) -> None:
    """Decision: FusedSAM(base, rho=r) applies r to every group that does not set its own, as
    a constructor's defaults do; values an earlier wrapper filled in from its defaults are not
    the group's own and give way, values the user put in a group stay. (The wrappers share
    the groups: the latest one's values hold for both.) A refused wrap changes nothing."""
    require_backend(backend)
    a, b, c = (nn.Parameter(torch.randn(n)) for n in (3, 4, 5))
    base = torch.optim.SGD([{"params": [a]}, {"params": [b], "rho": 0.2}], lr=0.1)
    first = FusedSAM(base, rho=0.5, adaptive=True, eta=0.1, backend=backend)
    first.add_param_group({"params": [c]})
    assert [g["rho"] for g in base.param_groups] == [0.5, 0.2, 0.5]
    with pytest.raises(ValueError, match="eta"):
        FusedSAM(base, rho=0.05, eta=-1.0, backend=backend)
    assert [g["rho"] for g in base.param_groups] == [0.5, 0.2, 0.5]
    second = FusedSAM(base, rho=0.05, backend=backend)
    assert [g["rho"] for g in second.param_groups] == [0.05, 0.2, 0.05]
    assert [g["adaptive"] for g in second.param_groups] == [False, False, False]
    assert [g["eta"] for g in second.param_groups] == [0.0, 0.0, 0.0]
    # What the second trains with: the same as a wrapper built on a fresh base.
    ps = [a, b, c]
    fresh_ps = [nn.Parameter(p.detach().clone()) for p in ps]
    fresh = FusedSAM(
        torch.optim.SGD([{"params": fresh_ps[:1]}, {"params": fresh_ps[1:2], "rho": 0.2}], lr=0.1),
        rho=0.05,
        backend=backend,
    )
    fresh.add_param_group({"params": fresh_ps[2:]})
    for step in range(2):
        _sam_step(second, ps, step)
        _sam_step(fresh, fresh_ps, step)
    _same(ps, fresh_ps)


# ---------------------------------------------------------------------------------------------
# Trap: the random mask's draws on skipped steps


def _random_mask_pattern(backend: str, nan_at: int | None) -> tuple[torch.Tensor, int]:
    """Which entries step 2 perturbs, and the draw count then, with a nan at step ``nan_at``."""
    from fused_sam import RandomMask

    ps = odd_params()
    opt = FusedSAM(ps, torch.optim.SGD, lr=0.1, backend=backend, mask=RandomMask(0.5, seed=3))
    for step in range(2):
        backward(ps, step)
        if step == nan_at:
            ps[2].grad[7] = float("nan")
        opt.first_step(zero_grad=True)
        backward(ps, step + 100)
        opt.second_step(zero_grad=True)
        assert bool(opt.last_step_skipped) == (step == nan_at)
    draws = opt.state_dict()["sam_random_mask"]["draws"]
    backward(ps, 2)
    before = _copy(ps)
    opt.first_step()
    moved = torch.cat([(p.detach() != b).reshape(-1) for p, b in zip(ps, before)])
    opt.restore()
    return moved, draws


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_mask_draw_count_advances_on_skipped_steps(backend: str) -> None:
    """Decision: a skipped step still counts a draw, as it counts for a step schedule and an LR
    scheduler, and as torch's own generator advances for the dropout of a skipped step: the
    mask of step k is draw k whatever steps were skipped, known on the host with no device
    sync (the skip flag stays on the device), and a resume stays exact (the count is saved)."""
    require_backend(backend)
    skipped, draws_skipped = _random_mask_pattern(backend, nan_at=1)
    finite, draws_finite = _random_mask_pattern(backend, nan_at=None)
    assert draws_skipped == draws_finite == 2
    assert torch.equal(skipped, finite)
