"""FusedSAM against independent implementations, torch.optim conventions, faults and bad input."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from conftest import CPU_BACKENDS, TOL, assert_close, require_backend
from helpers import LoopSAM, OfficialASAM, backward, odd_params, small_net, state_tensors
from torch import nn

from fused_sam import BackendUnavailableError, FusedSAM, frozen_bn_stats
from fused_sam.backends import native

BACKENDS = ["reference", *CPU_BACKENDS]
STEPS = 7


def same_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with exactly its strides (also a non-dense view's), so that both copies
    take the same path through the backends and runs can be compared bit for bit."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype).copy_(t)


def clone_params(ps: list[nn.Parameter]) -> list[nn.Parameter]:
    return [nn.Parameter(same_layout(p.detach())) for p in ps]


def sam_run(opt, params, steps=STEPS, none_at=3):
    """first_step/second_step over ``steps`` steps; at ``none_at`` some grads are None."""
    for step in range(steps):
        skip = {0, 4} if step == none_at else None
        backward(params, step, skip)
        opt.first_step(zero_grad=True)
        backward(params, step + 100, skip)
        opt.second_step(zero_grad=True)


# ---------------------------------------------------------------------------------------------
# Against independent implementations of the published rules


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_community_sam_over_steps(backend: str, adaptive: bool) -> None:
    require_backend(backend)
    ps = odd_params()
    ref_ps = clone_params(ps)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    opt = FusedSAM(ps, torch.optim.SGD, 0.05, adaptive, backend=backend, **kw)
    ref = LoopSAM(ref_ps, torch.optim.SGD, rho=0.05, adaptive=adaptive, **kw)
    sam_run(opt, ps)
    sam_run(ref, ref_ps)
    for a, b in zip(ps, ref_ps):
        assert_close(a.detach(), b.detach())
    for a, b in zip(state_tensors(opt, ps), state_tensors(ref.base, ref_ps)):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_official_asam(backend: str) -> None:
    require_backend(backend)
    torch.manual_seed(3)
    model = small_net()
    ref_model = copy.deepcopy(model)
    named = list(model.named_parameters())
    weights = [p for n, p in named if "weight" in n]
    others = [p for n, p in named if "weight" not in n]
    groups = [{"params": weights, "adaptive": True}, {"params": others, "adaptive": False}]
    opt = FusedSAM(
        groups,
        torch.optim.SGD,
        rho=0.5,
        eta=0.01,
        norm_eps=1e-16,
        backend=backend,
        lr=0.1,
        momentum=0.9,
    )
    ref = OfficialASAM(
        ref_model.named_parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1, momentum=0.9
    )
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    for m, o in ((model, opt), (ref_model, ref)):
        for _ in range(STEPS):
            with frozen_bn_stats(m):
                nn.functional.cross_entropy(m(x), y).backward()
            o.first_step(zero_grad=True)
            with frozen_bn_stats(m):
                nn.functional.cross_entropy(m(x), y).backward()
            o.second_step(zero_grad=True)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert_close(a.detach(), b.detach())


def test_adaptive_weights_only_leaves_vectors_unscaled() -> None:
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    opt_w = FusedSAM([w, b], torch.optim.SGD, rho=0.5, adaptive="weights", eta=0.01, lr=0.1)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(3)
    g_w, g_b, w0, b0 = w.grad.clone(), b.grad.clone(), w.detach().clone(), b.detach().clone()
    opt_w.first_step()
    t = w0.abs() + 0.01
    norm = torch.cat([(t * g_w).flatten(), g_b]).norm()
    torch.testing.assert_close(w.detach(), w0 + 0.5 * t * t * g_w / norm)
    torch.testing.assert_close(b.detach(), b0 + 0.5 * g_b / norm)
    opt_w.restore()


@pytest.mark.parametrize("base", ["sgd", "adam", "adamw"])
def test_loss_decreases(base: str) -> None:
    torch.manual_seed(0)
    model = small_net()
    x = torch.randn(256, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    if base == "sgd":
        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    elif base == "adam":
        opt = FusedSAM(torch.optim.Adam(model.parameters(), lr=1e-2), rho=0.05)
    else:
        opt = FusedSAM(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2), rho=0.05)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(60):
        last = opt.step(closure).item()
    assert last < 0.5 * first


# ---------------------------------------------------------------------------------------------
# Step protocol


def test_step_closure_returns_first_pass_loss_and_evaluates_twice() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.1, lr=0.1)
    seen = []

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        seen.append(p.detach().clone())
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert len(seen) == 2
    e = 0.1 * torch.tensor([2.0, -4.0]) / torch.tensor([2.0, -4.0]).norm()
    torch.testing.assert_close(seen[1], torch.tensor([1.0, -2.0]) + e)


def test_bare_step_finishes_in_flight_step_and_otherwise_raises() -> None:
    torch.manual_seed(0)
    ps = odd_params()
    ps2 = clone_params(ps)
    a = FusedSAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    b = FusedSAM(ps2, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for step in range(3):
        for params, opt in ((ps, a), (ps2, b)):
            backward(params, step)
            opt.first_step(zero_grad=True)
            backward(params, step + 100)
        a.second_step(zero_grad=True)
        b.step()  # what a trainer does
        b.zero_grad()
        assert not a.in_flight and not b.in_flight
    for x, y in zip(ps, ps2):
        assert torch.equal(x, y)
    # Nothing in flight: a bare step would be a plain base step, not SAM; it raises, weights
    # untouched, unless plain steps were asked for.
    p = nn.Parameter(torch.tensor([1.0]))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=0.5)
    p.grad = torch.tensor([2.0])
    with pytest.raises(RuntimeError, match=r"plain base-optimizer step.*SAMTrainer"):
        opt.step()
    assert p.item() == 1.0 and not opt.state
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=0.5, allow_plain_steps=True)
    opt.step()
    assert p.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adam", "adamw"])
def test_rho_zero_is_bit_identical_to_base(backend: str, base: str) -> None:
    require_backend(backend)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[base]
    kw = dict(lr=0.05, weight_decay=1e-2)
    if base == "sgd":
        kw.update(momentum=0.9)
    ps = odd_params()
    ps2 = clone_params(ps)
    opt = FusedSAM(ps, cls, rho=0.0, backend=backend, **kw)
    plain = cls(ps2, **kw)
    for step in range(STEPS):
        backward(ps, step)
        opt.first_step(zero_grad=True)
        backward(ps, step)
        opt.second_step(zero_grad=True)
        backward(ps2, step)
        plain.step()
        plain.zero_grad()
    if backend in ("reference", "foreach"):
        for x, y in zip(ps, ps2):
            assert torch.equal(x, y)
        for x, y in zip(state_tensors(opt, ps), state_tensors(plain, ps2)):
            assert torch.equal(x, y)
    else:
        # Fused restore+step kernels re-implement the base math in their own (fp32+) order.
        # test_ops pins them to the float64 oracle at 1e-6/1e-5; torch's fp32 Adam itself is
        # ~1e-6 off that oracle after 7 steps near small second moments, hence the margin.
        # A 1% error in an update (lr 0.05, |d| ~ 1) moves a weight by ~5e-4: far outside.
        for x, y in zip(ps, ps2):
            torch.testing.assert_close(x.detach(), y.detach(), atol=1e-5, rtol=1e-4)
        got, want = state_tensors(opt, ps), state_tensors(plain, ps2)
        assert len(got) == len(want)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y.to(x.device), atol=1e-5, rtol=1e-4)


def test_maximize_flips_ascent_direction() -> None:
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.1, lr=0.1, maximize=True)
    p.grad = torch.tensor([3.0, 4.0])
    opt.first_step()
    torch.testing.assert_close(
        p.detach(), torch.tensor([1.0, 2.0]) - 0.1 * torch.tensor([0.6, 0.8])
    )
    opt.restore()


def test_rho_per_group_and_schedulable() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = FusedSAM([{"params": [a], "rho": 0.2}, {"params": [b]}], torch.optim.SGD, rho=0.1, lr=1.0)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    opt.first_step()
    assert a.item() == pytest.approx(0.2 * 3 / 5) and b.item() == pytest.approx(0.1 * 4 / 5)
    opt.restore()
    assert a.item() == 0.0 and b.item() == 0.0
    for g in opt.param_groups:  # a "scheduler" for rho
        g["rho"] = 0.0
    opt.first_step()
    assert a.item() == 0.0 and b.item() == 0.0
    opt.restore()


def test_norm_eps_is_used() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = FusedSAM([p], torch.optim.SGD, rho=1.0, norm_eps=1.0, lr=0.1)
    p.grad = torch.tensor([1.0])
    opt.first_step()
    assert p.item() == pytest.approx(0.5)
    opt.restore()


def test_restore_is_an_exact_copy_and_backups_are_reused() -> None:
    torch.manual_seed(1)
    ps = odd_params()
    before = [p.detach().clone() for p in ps]
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.5, lr=0.0)
    ptrs = None
    for step in range(3):
        backward(ps, step)
        opt.first_step(zero_grad=True)
        assert any(not torch.equal(p, b) for p, b in zip(ps, before))
        backward(ps, step)
        opt.second_step(zero_grad=True)
        for p, b in zip(ps, before):
            assert torch.equal(p, b)  # lr = 0: exactly the original bits, never w - e
        now = [opt._backups[p].data_ptr() for p in ps]
        assert ptrs is None or now == ptrs
        ptrs = now


def test_params_without_grad_are_not_perturbed_and_restore_matches() -> None:
    a, b = nn.Parameter(torch.tensor([1.0])), nn.Parameter(torch.tensor([2.0]))
    opt = FusedSAM([a, b], torch.optim.SGD, rho=0.1, lr=0.1)
    a.grad = torch.tensor([1.0])
    opt.first_step(zero_grad=True)
    assert b.item() == 2.0 and a.item() != 1.0
    b.grad = torch.tensor([1.0])  # only b has a grad in pass 2: a is restored, b is stepped
    opt.second_step()
    assert a.item() == 1.0
    assert b.item() == pytest.approx(2.0 - 0.1)


# ---------------------------------------------------------------------------------------------
# torch.optim contract


def test_isinstance_and_shared_groups_and_state() -> None:
    p = nn.Parameter(torch.randn(3))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["momentum"] == 0.9


def test_wrap_instance() -> None:
    p = nn.Parameter(torch.randn(3))
    base = torch.optim.AdamW([p], lr=1e-3)
    opt = FusedSAM(base, rho=0.1)
    assert opt.base_optimizer is base and opt.param_groups[0]["rho"] == 0.1


def test_lr_scheduler_works_without_warnings() -> None:
    p = nn.Parameter(torch.randn(3))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            (p**2).sum().backward()
            opt.first_step(zero_grad=True)
            (p**2).sum().backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.125)


def test_step_hooks_fire_once_per_sam_step() -> None:
    p = nn.Parameter(torch.randn(3))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    (p**2).sum().backward()
    opt.first_step(zero_grad=True)
    (p**2).sum().backward()
    opt.second_step(zero_grad=True)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert calls == ["pre", "post", "pre", "post"]


def _train(opt, ps, start, stop):
    for step in range(start, stop):
        backward(ps, step)
        opt.first_step(zero_grad=True)
        backward(ps, step + 100)
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_checkpoint_round_trip_resumes_bit_identically(base: str) -> None:
    def make(ps):
        if base == "sgd":
            return FusedSAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        return FusedSAM(torch.optim.AdamW(ps, lr=1e-2), rho=0.05)

    torch.manual_seed(0)
    ps = odd_params()
    ps_resume = clone_params(ps)
    full = make(ps)
    _train(full, ps, 0, 6)

    first = make(ps_resume)
    _train(first, ps_resume, 0, 3)
    buf = io.BytesIO()
    torch.save({"opt": first.state_dict(), "params": [p.detach() for p in ps_resume]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    ps_new = [nn.Parameter(same_layout(t)) for t in ckpt["params"]]  # layouts as saved
    resumed = make(ps_new)
    resumed.load_state_dict(ckpt["opt"])
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.state is resumed.base_optimizer.state
    _train(resumed, ps_new, 3, 6)
    for a, b in zip(ps, ps_new):
        assert torch.equal(a, b)


def test_state_dict_is_in_base_format() -> None:
    p = nn.Parameter(torch.randn(3))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    _train(opt, [p], 0, 1)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"][0]) == {"momentum_buffer"}
    plain = torch.optim.SGD([nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.9)
    plain.load_state_dict(sd)  # a FusedSAM(SGD) checkpoint loads into a bare SGD
    assert torch.equal(
        plain.state[plain.param_groups[0]["params"][0]]["momentum_buffer"],
        opt.state[p]["momentum_buffer"],
    )


def test_load_bare_base_checkpoint_fills_sam_defaults() -> None:
    p = nn.Parameter(torch.randn(3))
    plain = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    opt = FusedSAM([p], torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["rho"] == 0.07


def test_deepcopy_and_pickle_keep_base_optimizer() -> None:
    p = nn.Parameter(torch.randn(3))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # patches opt.step
    _train(opt, [p], 0, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone.base_optimizer, torch.optim.SGD)
        assert clone.param_groups is clone.base_optimizer.param_groups
        assert clone.state is clone.base_optimizer.state
        q = clone.param_groups[0]["params"][0]
        assert torch.equal(clone.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
        q.grad = torch.ones(3)
        clone.first_step()
        q.grad = torch.ones(3)
        clone.second_step()  # works on the copy, does not touch the original
    assert p.grad is None


def test_add_param_group_zero_grad_repr() -> None:
    a, b = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
    opt = FusedSAM([a], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [b], "rho": 0.2})
    assert len(opt.base_optimizer.param_groups) == 2
    g = opt.param_groups[1]
    assert g["rho"] == 0.2 and g["momentum"] == 0.9 and g["adaptive"] is False
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(1))], "rho": -1.0})
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    text = repr(opt)
    assert "FusedSAM" in text and "SGD" in text and "rho: 0.2" in text


# ---------------------------------------------------------------------------------------------
# Faults and bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-0.1), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(rho=float("inf")), "rho"),
        (dict(eta=-1.0), "eta"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(adaptive="yes"), "adaptive"),
        (dict(backend="gpu"), "backend"),
        (dict(bogus=1), "unknown option"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs: dict, match: str) -> None:
    p = nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match=match):
        FusedSAM([p], torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_base_optimizer_arguments() -> None:
    p = nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="base_optimizer"):
        FusedSAM([p], "sgd", lr=0.1)
    with pytest.raises(ValueError, match="either"):
        FusedSAM(torch.optim.SGD([p], lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="rho"):
        opt = FusedSAM([p], torch.optim.SGD, lr=0.1)
        opt.param_groups[0]["rho"] = -1.0  # scheduled into a bad value
        p.grad = torch.ones(2)
        opt.first_step()


def test_forced_missing_backend_raises_with_reason() -> None:
    p = nn.Parameter(torch.randn(2))
    with pytest.raises(BackendUnavailableError, match="cuda"):
        FusedSAM([p], torch.optim.SGD, lr=0.1, backend="cuda")


def test_sparse_gradient_raises() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    opt = FusedSAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    assert not opt.in_flight


def test_complex_params_use_real_view() -> None:
    p = nn.Parameter(torch.tensor([1 + 2j, -1j], dtype=torch.complex64))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.5, lr=0.1)
    p.grad = torch.tensor([3 + 4j, 0j], dtype=torch.complex64)
    before = p.detach().clone()
    opt.first_step()
    torch.testing.assert_close(p.detach(), before + 0.5 * torch.tensor([0.6 + 0.8j, 0j]))
    p.grad = torch.tensor([1 + 1j, 1 + 1j], dtype=torch.complex64)
    opt.second_step()
    torch.testing.assert_close(p.detach(), before - 0.1 * torch.tensor([1 + 1j, 1 + 1j]))


def test_all_grads_none_is_a_noop() -> None:
    ps = odd_params()
    before = [p.detach().clone() for p in ps]
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.first_step()
    opt.second_step()
    for p, b in zip(ps, before):
        assert torch.equal(p, b)
    assert not bool(opt.last_step_skipped)


def test_zero_grads_leave_weights_unchanged() -> None:
    ps = odd_params()
    before = [p.detach().clone() for p in ps]
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.first_step()
    for p, b in zip(ps, before):
        assert torch.equal(p, b)
    opt.second_step()
    for p, b in zip(ps, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_nonfinite_pass1_skips_step_bit_identically(backend: str, bad: float, base: str) -> None:
    require_backend(backend)
    ps = odd_params()
    opt = (
        FusedSAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
        if base == "sgd"
        else FusedSAM(torch.optim.AdamW(ps, lr=0.1), rho=0.05, backend=backend)
    )
    _train(opt, ps, 0, 2)
    before = [p.detach().clone() for p in ps]
    state_before = [t.clone() for t in state_tensors(opt, ps)]
    backward(ps, 5)
    ps[2].grad[17] = bad
    opt.first_step(zero_grad=True)
    for p, b in zip(ps, before):
        assert torch.equal(p, b), "no perturbation on a non-finite gradient"
    backward(ps, 6)
    opt.second_step(zero_grad=True)
    assert bool(opt.last_step_skipped)
    for p, b in zip(ps, before):
        assert torch.equal(p, b)
    for a, b in zip(state_tensors(opt, ps), state_before):
        assert torch.equal(a, b)
    _train(opt, ps, 7, 8)
    assert not bool(opt.last_step_skipped)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_nonfinite_pass2_restores_and_skips_base_update(backend: str, base: str) -> None:
    require_backend(backend)
    ps = odd_params()
    opt = (
        FusedSAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
        if base == "sgd"
        else FusedSAM(torch.optim.AdamW(ps, lr=0.1), rho=0.05, backend=backend)
    )
    _train(opt, ps, 0, 2)
    before = [p.detach().clone() for p in ps]
    state_before = [t.clone() for t in state_tensors(opt, ps)]
    backward(ps, 5)
    opt.first_step(zero_grad=True)
    backward(ps, 6)
    ps[3].grad.fill_(float("nan"))
    opt.second_step(zero_grad=True)
    assert bool(opt.last_step_skipped)
    for p, b in zip(ps, before):
        assert torch.equal(p, b)
    for a, b in zip(state_tensors(opt, ps), state_before):
        assert torch.equal(a, b)


def test_exception_in_closure_restores_weights() -> None:
    ps = odd_params()
    before = [p.detach().clone() for p in ps]
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. the user interrupts the second pass
        opt.zero_grad()
        loss = sum((p * p).sum() for p in ps)
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for p, b in zip(ps, before):
        assert torch.equal(p, b)
    assert not opt.in_flight


def test_first_step_twice_and_second_step_alone_raise() -> None:
    p = nn.Parameter(torch.randn(3))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    p.grad = torch.ones(3)
    opt.first_step()
    with pytest.raises(RuntimeError, match="in flight"):
        opt.first_step()


def test_state_dict_while_perturbed_raises_and_restore_recovers() -> None:
    p = nn.Parameter(torch.randn(3))
    w0 = p.detach().clone()
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=0.1)
    p.grad = torch.ones(3)
    opt.first_step()
    with pytest.raises(RuntimeError, match="in flight"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="in flight"):
        copy.deepcopy(opt)
    opt.restore()
    assert torch.equal(p, w0)
    assert set(opt.state_dict()) == {"state", "param_groups"}


# ---------------------------------------------------------------------------------------------
# BatchNorm helper


@pytest.mark.parametrize("momentum", [0.1, None])
def test_frozen_bn_stats_keeps_first_pass_statistics(momentum: float | None) -> None:
    torch.manual_seed(0)
    model = small_net(bn_momentum=momentum)
    ref = copy.deepcopy(model)
    x1, x2 = torch.randn(16, 10), torch.randn(16, 10) * 3
    model(x1)
    with frozen_bn_stats(model):
        model(x2)
    ref(x1)  # only the first pass reaches the reference
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), n
    assert model[1].num_batches_tracked.item() == 1


def test_frozen_bn_stats_restores_on_exception() -> None:
    model = small_net()
    before = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(RuntimeError), frozen_bn_stats(model):
        model(torch.randn(8, 10))
        raise RuntimeError("boom")
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", ["sgd_plain", "adam_amsgrad", "adamw"])
def test_backend_matches_reference_backend_params_and_state(backend: str, base: str) -> None:
    require_backend(backend)

    def make(ps, name):
        if base == "sgd_plain":
            return FusedSAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, backend=name)
        if base == "adam_amsgrad":
            return FusedSAM(
                torch.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=1e-2),
                rho=0.05,
                adaptive=True,
                backend=name,
            )
        return FusedSAM(
            torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
            rho=0.05,
            adaptive="weights",
            eta=0.01,
            backend=name,
        )

    ps = odd_params()
    ref_ps = clone_params(ps)
    opt, ref = make(ps, backend), make(ref_ps, "reference")
    sam_run(opt, ps)
    sam_run(ref, ref_ps)
    for a, b in zip(ps, ref_ps):
        assert_close(a.detach(), b.detach())
    got, want = state_tensors(opt, ps), state_tensors(ref, ref_ps)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert_close(a.to(b.device), b)


# ---------------------------------------------------------------------------------------------
# The cached step plan (FusedSAM._plan): whatever changes between steps must take effect.
#
# FusedSAM reuses one plan (backups, backend buckets) while the parameters with a gradient, their
# storage and the groups' SAM keys stay the same. Every test below changes one of those between
# steps and compares params and optimizer state after several steps with GroupLoopSAM, an oracle
# that caches nothing. Backend "reference" is included: the plan is built above the backends, so
# a stale plan would fool a FusedSAM(backend="reference") run just as well.

PLAN_BACKENDS = ["reference", "foreach", "cpu"]
PLAN_BASES = ["sgd", "adam"]


class GroupLoopSAM:
    """davda54/sam with per-group ``rho``/``adaptive`` (and ASAM's ``eta``), tensor by tensor.

    Reads every group afresh at every step and keeps nothing between steps, so rho schedules,
    edited groups, replaced storage and replaced state act on it as the user meant them to.
    ``param_groups`` and ``state`` are its base optimizer's, as with FusedSAM.
    """

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base, self.old = base, {}

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @torch.no_grad()
    def first_step(self) -> None:
        def t(p, g):
            return p.abs() + g["eta"] if g["adaptive"] else torch.ones_like(p)

        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        norm = torch.stack([(t(p, g) * p.grad).norm(p=2) for g, ps in groups for p in ps]).norm()
        for g, ps in groups:
            scale = g["rho"] / (norm + 1e-12)
            for p in ps:
                self.old[p] = p.clone()
                p.add_(t(p, g) ** 2 * p.grad * scale)

    @torch.no_grad()
    def second_step(self) -> None:
        for p, old in self.old.items():
            p.copy_(old)
        self.old = {}
        self.base.step()


def plan_params() -> list[nn.Parameter]:
    """Contiguous parameters (the plan holds backend buckets only then), one of them 0-dim."""
    shapes = [(3,), (33, 7), (), (5, 4), (4097,), (6, 6)]
    return [nn.Parameter(torch.randn(s)) for s in shapes]


def plan_groups(ps, spec=None) -> list[dict]:
    """Param groups over ``ps``: ``spec`` is a list of (indices, rho, adaptive, eta)."""
    spec = spec or [(range(len(ps)), 0.05, False, 0.0)]
    return [
        {"params": [ps[i] for i in idx], "rho": rho, "adaptive": ada, "eta": eta}
        for idx, rho, ada, eta in spec
    ]


def plan_base(base: str, groups: list[dict]) -> torch.optim.Optimizer:
    if base == "sgd":
        # dampening: a parameter's first momentum step differs from a zero buffer's
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    return torch.optim.Adam(groups, lr=1e-2, weight_decay=1e-3)


def plan_pair(backend: str, base: str, ps, spec=None):
    """(FusedSAM on ``ps``, the oracle on a same-layout copy of ``ps``, that copy)."""
    require_backend(backend)
    ref_ps = clone_params(ps)
    opt = FusedSAM(plan_base(base, plan_groups(ps, spec)), backend=backend)
    ref = GroupLoopSAM(plan_base(base, plan_groups(ref_ps, spec)))
    return opt, ref, ref_ps


@torch.no_grad()
def plan_grads(ps, step: int, k: int, skip=(), layout=None) -> None:
    """Set the gradient of ``odd_loss`` (pass ``k`` of ``step``) by hand, without autograd, so
    that parameters may change shape or dtype between steps; indices in ``skip`` get None.
    ``layout(i, g)`` may hand the gradient over in other strides."""
    for i, p in enumerate(ps):
        if i in skip:
            p.grad = None
            continue
        c = 0.5 + 0.1 * ((i + step) % 5)
        g = 2 * c * p + torch.cos(p + 0.3 * step + 0.1 * k)
        p.grad = g if layout is None else layout(i, g)


def plan_run(opt, ps, steps=range(6), skip=None, edit=None, layout=None) -> None:
    """SAM steps with hand-set grads: ``skip(step, k)`` -> indices without a grad in pass ``k``;
    ``edit(step, opt, ps)`` runs before each step; ``layout(step, k)`` -> a ``plan_grads``
    layout or None."""
    for step in steps:
        if edit is not None:
            edit(step, opt, ps)
        for k in (0, 1):
            skipped = () if skip is None else skip(step, k)
            plan_grads(ps, step, k, skipped, None if layout is None else layout(step, k))
            (opt.first_step if k == 0 else opt.second_step)()


def assert_plan_matches(opt, ps, ref, ref_ps, tol=None) -> None:
    def close(a, b):
        if tol is None:
            assert_close(a, b)
        else:
            torch.testing.assert_close(a, b, atol=tol[0], rtol=tol[1])

    assert not opt.in_flight
    for a, b in zip(ps, ref_ps, strict=True):
        close(a.detach(), b.detach())
    got, want = state_tensors(opt, ps), state_tensors(ref, ref_ps)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        close(a, b)


def transposed(g: torch.Tensor) -> torch.Tensor:
    """``g``'s values in column-major strides (not contiguous) for a 2-D tensor."""
    return g.t().contiguous().t() if g.dim() == 2 else g


def new_values(shape, dtype=torch.float32) -> torch.Tensor:
    """The same fresh values on every call (both runs of a test must get equal tensors)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("base", PLAN_BASES)
def test_plan_follows_the_params_with_a_grad(backend: str, base: str) -> None:
    # (step, pass) -> params without a grad: whole steps, pass 1 only, pass 2 only, a param whose
    # first grad (first momentum buffer) arrives at step 2, and the same set again after others.
    schedule = {
        (0, 0): {5},
        (0, 1): {5},
        (1, 0): {1, 5},
        (1, 1): {1, 5},
        (2, 0): {0, 3},
        (2, 1): {0, 3},
        (4, 0): {2},
        (5, 1): {4},
        (6, 0): {1},
        (6, 1): {1},
    }
    ps = plan_params()
    opt, ref, ref_ps = plan_pair(backend, base, ps)
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(8), skip=lambda s, k: schedule.get((s, k), ()))
    assert_plan_matches(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("base", PLAN_BASES)
def test_plan_follows_replaced_storage_and_shape(backend: str, base: str) -> None:
    def edit(step, o, q):
        if step == 2:  # new storage, same shape: the backup stays usable
            q[1].data = q[1].data.clone()
        if step == 3:  # every storage at once
            for p in q:
                p.data = p.data.clone()
        if step == 4:  # a new shape (and a fresh optimizer state for it): a new backup
            q[3].data = new_values((2, 9))
            q[5].data = new_values((36,))
            o.state.pop(q[3])
            o.state.pop(q[5])

    ps = plan_params()
    opt, ref, ref_ps = plan_pair(backend, base, ps)
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(7), edit=edit)
    assert ps[3].shape == (2, 9) and opt._backups[ps[3]].shape == (2, 9)
    assert_plan_matches(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("view", ["slice", "reshape"])
def test_plan_follows_a_view_of_the_same_storage(backend: str, view: str) -> None:
    def edit(step, o, q):
        if step == 2:  # same data_ptr, other shape
            if view == "slice":
                q[4].data = q[4].data[:100]
            else:
                q[1].data = q[1].data.view(7, 33)
            o.state.clear()

    ps = plan_params()
    opt, ref, ref_ps = plan_pair(backend, "sgd", ps)
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(4), edit=edit)
    assert_plan_matches(opt, ps, ref, ref_ps)


def plan_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_plan_follows_module_dtype_changes(backend: str) -> None:
    def edit(step, o, q):
        to = {2: torch.float64, 5: torch.float32}.get(step)
        if to is None:
            return
        model = models[id(o)]
        model.to(to)  # .double() / .float(): every .data replaced in place of the Parameter
        for st in o.state.values():
            st["momentum_buffer"] = st["momentum_buffer"].to(to)

    model = plan_mlp()
    ref_model = copy.deepcopy(model)
    ps, ref_ps = list(model.parameters()), list(ref_model.parameters())
    require_backend(backend)
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.05, backend=backend, lr=0.05, momentum=0.9)
    ref = GroupLoopSAM(torch.optim.SGD(plan_groups(ref_ps), lr=0.05, momentum=0.9))
    models = {id(opt): model, id(ref): ref_model}
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(4), edit=edit)
    assert all(p.dtype == torch.float64 for p in ps)
    assert all(opt._backups[p].dtype == torch.float64 for p in ps)
    # float32 rounding of the first steps carries over into float64: float32 tolerances.
    assert_plan_matches(opt, ps, ref, ref_ps, tol=TOL[torch.float32])
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(4, 7), edit=edit)
    assert all(p.dtype == torch.float32 for p in ps)
    assert_plan_matches(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_plan_after_half_restores_exactly(backend: str) -> None:
    require_backend(backend)
    model = plan_mlp()
    ps = list(model.parameters())
    opt = FusedSAM(ps, torch.optim.SGD, rho=0.5, backend=backend, lr=0.0)
    plan_run(opt, ps, range(2))  # float32 plan and backups
    model.half()
    before = [p.detach().clone() for p in ps]
    for step in range(2, 4):
        plan_grads(ps, step, 0)
        opt.first_step()
        assert all(not torch.equal(p, b) for p, b in zip(ps, before))  # perturbed, in half
        plan_grads(ps, step, 1)
        opt.second_step()
        for p, b in zip(ps, before):
            assert p.dtype == torch.float16 and torch.equal(p, b)  # lr = 0: the same bits


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("base", PLAN_BASES)
@pytest.mark.parametrize("n_groups", [1, 2])
def test_plan_follows_scheduled_sam_keys(backend: str, base: str, n_groups: int) -> None:
    # Two groups start with equal SAM keys (one bucket for all) and then drift apart.
    spec = [(range(3), 0.05, False, 0.0), (range(3, 6), 0.05, False, 0.0)]
    if n_groups == 1:
        spec = [(range(6), 0.05, False, 0.0)]

    def edit(step, o, q):
        g = o.param_groups
        if n_groups == 1:
            g[0]["rho"] = 0.05 * (step + 1)  # a rho schedule
            g[0]["adaptive"] = step >= 4
            return
        changes = {
            2: (1, "rho", 0.2),
            3: (0, "rho", 0.1),
            4: (1, "adaptive", True),
            5: (1, "eta", 0.01),
            6: (0, "rho", 0.0),
            7: (1, "rho", 0.1),  # back to group 0's old rho
        }
        if step in changes:
            i, key, value = changes[step]
            g[i][key] = value

    ps = plan_params()
    opt, ref, ref_ps = plan_pair(backend, base, ps, spec)
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(8), edit=edit)
    assert_plan_matches(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("base", PLAN_BASES)
def test_plan_multi_group_different_rho(backend: str, base: str) -> None:
    # Groups 0 and 2 share their SAM keys (their tensors may share a bucket), group 1 differs;
    # some steps leave a whole group without grads. Each group has its own lr and decay.
    spec = [([0, 1], 0.05, False, 0.0), ([2, 3], 0.5, True, 0.01), ([4, 5], 0.05, False, 0.0)]
    schedule = {(1, 0): {2, 3}, (1, 1): {2, 3}, (2, 0): {0, 1, 4, 5}, (3, 1): {4, 5}}
    ps = plan_params()
    opt, ref, ref_ps = plan_pair(backend, base, ps, spec)
    for o in (opt, ref):
        for i, g in enumerate(o.param_groups):
            g["lr"] *= 1 + i
            g["weight_decay"] *= 3 - i
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(6), skip=lambda s, k: schedule.get((s, k), ()))
    assert_plan_matches(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_plan_follows_a_param_moved_between_groups(backend: str) -> None:
    def edit(step, o, q):
        if step == 2:  # param 2 moves from group 0 to group 1: the concatenated order is kept
            g0, g1 = o.param_groups
            g0["params"], g1["params"] = g0["params"][:2], [q[2], *g1["params"]]

    spec = [(range(3), 0.05, False, 0.0), (range(3, 6), 0.5, False, 0.0)]
    ps = plan_params()
    opt, ref, ref_ps = plan_pair(backend, "sgd", ps, spec)
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(4), edit=edit)
    assert_plan_matches(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("base", PLAN_BASES)
def test_plan_with_noncontiguous_grads_on_some_passes(backend: str, base: str) -> None:
    # (step, pass) whose 2-D grads arrive column-major: pass 1 only, pass 2 only, both.
    odd = {(1, 0), (2, 1), (3, 0), (3, 1)}

    def layout(step, k):
        return (lambda i, g: transposed(g)) if (step, k) in odd else None

    ps = plan_params()
    opt, ref, ref_ps = plan_pair(backend, base, ps)
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(6), layout=layout)
    assert_plan_matches(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("base", PLAN_BASES)
def test_plan_with_channels_last_weights_changing_layout(backend: str, base: str) -> None:
    def edit(step, o, q):
        conv = q[0]
        if step == 2:  # contiguous again: new storage, backup and state still channels_last
            conv.data = conv.data.contiguous()
        if step == 4:
            conv.data = conv.data.contiguous(memory_format=torch.channels_last)

    conv = nn.Conv2d(3, 4, 3)
    conv.to(memory_format=torch.channels_last)
    ps = [conv.weight, conv.bias, *plan_params()[:2]]
    assert not ps[0].is_contiguous()
    opt, ref, ref_ps = plan_pair(backend, base, ps)
    for o, q in ((opt, ps), (ref, ref_ps)):
        # Hand-made grads follow the weight's layout (elementwise ops keep it), as autograd's.
        plan_run(o, q, range(6), edit=edit)
    assert_plan_matches(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("base", PLAN_BASES)
def test_plan_with_state_replaced_by_noncontiguous_copies(backend: str, base: str) -> None:
    keys = ["momentum_buffer"] if base == "sgd" else ["exp_avg", "exp_avg_sq"]

    def edit(step, o, q):
        if step in (2, 4):  # equal values, column-major strides, for every 2-D param
            for p in q:
                for key in keys:
                    o.state[p][key] = transposed(o.state[p][key])

    ps = plan_params()
    opt, ref, ref_ps = plan_pair(backend, base, ps)
    for o, q in ((opt, ps), (ref, ref_ps)):
        plan_run(o, q, range(6), edit=edit)
    assert not opt.state[ps[1]][keys[0]].is_contiguous()  # the steps kept the given strides
    assert_plan_matches(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("base", PLAN_BASES)
@pytest.mark.parametrize("into", ["fresh", "same"])
def test_plan_load_state_dict_continues_bit_identically(backend: str, base: str, into: str) -> None:
    # Grad sets change around the checkpoint so that the plan at load time is another step's.
    schedule = {(1, 0): {0}, (1, 1): {0}, (3, 0): {2}, (3, 1): {2}, (4, 1): {4}}

    def skip(s, k):
        return schedule.get((s, k), ())

    def make(q):
        require_backend(backend)
        return FusedSAM(plan_base(base, plan_groups(q)), backend=backend)

    ps = plan_params()
    ps_run = clone_params(ps)
    full = make(ps)
    plan_run(full, ps, range(7), skip=skip)

    opt = make(ps_run)
    plan_run(opt, ps_run, range(2), skip=skip)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps_run]}, buf)
    plan_run(opt, ps_run, range(2, 5), skip=skip)  # keep training past the checkpoint
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    if into == "fresh":
        ps_run = [nn.Parameter(same_layout(t)) for t in ckpt["params"]]
        opt = make(ps_run)
    else:  # the same optimizer and parameters (same storage): its plan is still cached
        with torch.no_grad():
            for p, t in zip(ps_run, ckpt["params"]):
                p.copy_(t)
    opt.load_state_dict(ckpt["opt"])
    plan_run(opt, ps_run, range(2, 7), skip=skip)
    for a, b in zip(ps, ps_run):
        assert torch.equal(a, b)
    got, want = state_tensors(opt, ps_run), state_tensors(full, ps)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["foreach", "cpu"])
def test_plan_without_the_native_helpers(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extension, grads and the plan key come from Python passes: same behaviour."""
    calls = []

    def absent(tensors):
        calls.append(len(tensors))

    monkeypatch.setattr(native, "collect_grads", absent)
    monkeypatch.setattr(native, "layout_key", absent)
    test_plan_follows_the_params_with_a_grad(backend, "sgd")
    test_plan_follows_replaced_storage_and_shape(backend, "adam")
    test_plan_follows_a_view_of_the_same_storage(backend, "slice")
    test_plan_follows_a_param_moved_between_groups(backend)
    assert calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_accumulated_micro_batches_equal_the_full_batch_step(backend: str, base: str) -> None:
    """All micro-batches at w, one perturbation, all at w + e, one finish: the full-batch step."""
    require_backend(backend)
    torch.manual_seed(5)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))

    def run(chunks: int) -> list[torch.Tensor]:
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
        opt = (
            FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                     backend=backend)
            if base == "sgd"
            else FusedSAM(torch.optim.AdamW(model.parameters(), lr=0.01), rho=0.1, backend=backend)
        )  # fmt: skip
        micro = list(zip(x.chunk(chunks), y.chunk(chunks)))
        for _ in range(3):
            for passes in range(2):
                for xb, yb in micro:
                    (nn.functional.cross_entropy(model(xb), yb) / chunks).backward()
                if passes == 0:
                    opt.first_step(zero_grad=True)
            opt.second_step(zero_grad=True)
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(4), run(1)):
        assert_close(a, b, "params")


def test_last_step_skipped_is_a_0dim_bool_tensor() -> None:
    p = nn.Parameter(torch.randn(4))
    opt = FusedSAM([p], torch.optim.SGD, rho=0.05, lr=0.1)
    for bad in (False, True):
        p.grad = torch.full((4,), float("nan")) if bad else torch.ones(4)
        opt.first_step()
        p.grad = torch.ones(4)
        opt.second_step()
        flag = opt.last_step_skipped
        assert isinstance(flag, torch.Tensor) and flag.dim() == 0 and flag.dtype == torch.bool
        assert bool(flag) is bad
