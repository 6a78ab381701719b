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
    return _fused(model, backend, "sgd", schedule=EveryK(k))


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


# ---------------------------------------------------------------------------------------------
# LookSAM


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _split(flat: torch.Tensor, like) -> list[torch.Tensor]:
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in like]), like)]


def _rule_setup(base: str) -> tuple[nn.Module, list[torch.Tensor], torch.optim.Optimizer]:
    """The model of the tests, its parameters and a plain torch base optimizer over them."""
    model = _net()
    params = list(model.parameters())
    if base == "sgd":
        return model, params, torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return model, params, torch.optim.AdamW(params, lr=0.01)


def _fused(model: nn.Module, backend: str | None, base: str, **variant) -> FusedSAM:
    """FusedSAM (rho 0.1) over the base optimizer that :func:`_rule_setup` gives the rules."""
    if base == "sgd":
        return FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                        backend=backend, **variant)  # fmt: skip
    return FusedSAM(torch.optim.AdamW(model.parameters(), lr=0.01), rho=0.1, backend=backend,
                    **variant)  # fmt: skip


def _grad_at(model, params, x, y, e: torch.Tensor | None = None) -> torch.Tensor:
    """The flat float64 gradient of the batch loss at w (or at w + e, weights left at w)."""
    w = [p.detach().clone() for p in params]
    if e is not None:
        with torch.no_grad():
            for p, d in zip(params, _split(e, params)):
                p.add_(d.float())
    g = _flat(torch.autograd.grad(nnf.cross_entropy(model(x), y), params)).double()
    with torch.no_grad():
        for p, b in zip(params, w):
            p.copy_(b)
    return g


def _base_step(opt, params, update: torch.Tensor) -> None:
    for p, u in zip(params, _split(update.float(), params)):
        p.grad = u
    opt.step()
    opt.zero_grad()


def _looksam_rule(k: int, alpha: float, base: str) -> list[torch.Tensor]:
    """LookSAM from the paper: on steps 0, k, ... a SAM step that also keeps
    g_v = g_s - (g_s . g / |g|^2) g; between them one pass with g + alpha |g| / |g_v| g_v."""
    model, params, opt = _rule_setup(base)
    gv = None
    for step in range(STEPS):
        x, y = _batch(step)
        g = _grad_at(model, params, x, y)
        if step % k == 0:
            gs = _grad_at(model, params, x, y, 0.1 * g / (g.norm() + 1e-12))
            gv = gs - (gs @ g) / (g @ g) * g
            _base_step(opt, params, gs)
        else:
            _base_step(opt, params, g + alpha * g.norm() / gv.norm() * gv)
    return [p.detach() for p in params]


def _looksam(model: nn.Module, backend: str | None, base: str, k: int = 3) -> FusedSAM:
    from fused_sam import LookSAM

    return _fused(model, backend, base, schedule=LookSAM(k=k, alpha=0.7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_looksam_matches_the_published_rule(backend: str, base: str) -> None:
    require_backend(backend)
    model = _net()
    opt = _looksam(model, backend, base)
    passes = 0
    for step in range(STEPS):
        x, y = _batch(step)

        def closure(x=x, y=y):
            nonlocal passes
            passes += 1
            opt.zero_grad()
            loss = nnf.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    assert passes == STEPS + 3  # SAM steps 0, 3, 6 take two passes, the others one
    for a, b in zip(model.parameters(), _looksam_rule(3, 0.7, base)):
        torch.testing.assert_close(a.detach(), b, atol=2e-6, rtol=2e-5)


def test_looksam_resume_is_bit_identical() -> None:
    model = _net()
    opt = _looksam(model, "cpu", "sgd")

    def run(model, opt, steps):
        for step in steps:
            x, y = _batch(step)
            nnf.cross_entropy(model(x), y).backward()
            if opt.next_step == "sam":
                opt.first_step(zero_grad=True)
                nnf.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    run(model, opt, range(4))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert len(ckpt["opt"]["sam_schedule"]["policy"]["gv"]) == 4  # g_v of every parameter
    run(model, opt, range(4, STEPS))
    resumed = _net()
    resumed.load_state_dict(ckpt["model"])
    opt2 = _looksam(resumed, "cpu", "sgd")
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, range(4, STEPS))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_looksam_skipped_sam_step_keeps_its_gv() -> None:
    from fused_sam import LookSAM

    model = _net()
    schedule = LookSAM(k=2)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, schedule=schedule)
    for step, poison in ((0, 1.0), (1, 1.0), (2, float("nan"))):
        x, y = _batch(step)
        nnf.cross_entropy(model(x), y).backward()
        if opt.next_step == "sam":
            opt.first_step(zero_grad=True)
            (nnf.cross_entropy(model(x), y) * poison).backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            kept = {p: v.clone() for p, v in schedule.gv.items()}
    assert bool(opt.last_step_skipped)
    for p, v in schedule.gv.items():
        assert torch.equal(v, kept[p])


# ---------------------------------------------------------------------------------------------
# F-SAM


def _friendly_rule(sigma: float, lam: float, base: str) -> list[torch.Tensor]:
    """F-SAM as published: d = g - sigma m (d = g and m = g on the first step), e = rho d/|d|,
    then m = lam m + (1 - lam) g; the base step uses the gradient at w + e."""
    model, params, opt = _rule_setup(base)
    m = None
    for step in range(STEPS):
        x, y = _batch(step)
        g = _grad_at(model, params, x, y)
        if m is None:
            d, m = g, g.clone()
        else:
            d, m = g - sigma * m, lam * m + (1 - lam) * g
        _base_step(opt, params, _grad_at(model, params, x, y, 0.1 * d / (d.norm() + 1e-12)))
    return [p.detach() for p in params]


def _friendly(model: nn.Module, backend: str | None, base: str) -> FusedSAM:
    from fused_sam import FriendlySAM

    return _fused(model, backend, base, direction=FriendlySAM(sigma=1.0, lam=0.6))


def _two_step(model, opt, steps, poison=None) -> None:
    for step in steps:
        x, y = _batch(step)
        loss = nnf.cross_entropy(model(x), y)
        (loss * (poison if step == 0 and poison is not None else 1.0)).backward()
        opt.first_step(zero_grad=True)
        nnf.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_friendly_sam_matches_the_published_rule(backend: str, base: str) -> None:
    require_backend(backend)
    model = _net()
    _two_step(model, _friendly(model, backend, base), range(STEPS))
    for a, b in zip(model.parameters(), _friendly_rule(1.0, 0.6, base)):
        torch.testing.assert_close(a.detach(), b, atol=2e-6, rtol=2e-5)


def test_friendly_sam_resume_and_skips() -> None:
    model = _net()
    opt = _friendly(model, "cpu", "sgd")
    _two_step(model, opt, range(3))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert len(ckpt["opt"]["sam_direction"]["m"]) == 4
    _two_step(model, opt, range(3, STEPS))
    resumed = _net()
    resumed.load_state_dict(ckpt["model"])
    opt2 = _friendly(resumed, "cpu", "sgd")
    opt2.load_state_dict(ckpt["opt"])
    _two_step(resumed, opt2, range(3, STEPS))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    # A skipped first step creates no moving average; a skipped later one keeps it.
    fresh = _net()
    opt3 = _friendly(fresh, "cpu", "sgd")
    _two_step(fresh, opt3, range(1), poison=float("nan"))
    assert bool(opt3.last_step_skipped) and not opt3.direction.m
    _two_step(fresh, opt3, range(1, 2))
    kept = {p: m.clone() for p, m in opt3.direction.m.items()}
    _two_step(fresh, opt3, range(1), poison=float("nan"))
    assert all(torch.equal(m, kept[p]) for p, m in opt3.direction.m.items())


# ---------------------------------------------------------------------------------------------
# GSAM


def _gsam_rule(alpha: float, base: str) -> list[torch.Tensor]:
    """GSAM as published: rho_t = rho lr_t / lr_0 (rho_min = lr_min = 0); the update uses
    g_s - alpha (g - (g . g_s / |g_s|^2) g_s)."""
    model, params, opt = _rule_setup(base)
    lr0 = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for step in range(STEPS):
        x, y = _batch(step)
        g = _grad_at(model, params, x, y)
        rho = 0.1 * opt.param_groups[0]["lr"] / lr0
        gs = _grad_at(model, params, x, y, rho * g / (g.norm() + 1e-12))
        perp = g - (g @ gs) / (gs @ gs) * gs
        _base_step(opt, params, gs - alpha * perp)
        sched.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_gsam_matches_the_published_rule(backend: str, base: str) -> None:
    from fused_sam import GSAM

    require_backend(backend)
    model = _net()
    opt = _fused(model, backend, base, direction=GSAM(alpha=0.4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for step in range(STEPS):
        _two_step(model, opt, [step])
        sched.step()
    for a, b in zip(model.parameters(), _gsam_rule(0.4, base)):
        torch.testing.assert_close(a.detach(), b, atol=2e-6, rtol=2e-5)


def test_gsam_alpha_zero_is_sam_with_the_radius_schedule() -> None:
    from fused_sam import GSAM

    with pytest.raises(ValueError, match="alpha"):
        GSAM(alpha=-0.1)
    runs = []
    for direction in (GSAM(alpha=0.0), None):
        model = _net()
        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, direction=direction)
        _two_step(model, opt, range(3))  # constant lr: rho_t = rho
        runs.append([p.detach() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Momentum-SAM


def _msam_rule(rho: float, base: str) -> list[torch.Tensor]:
    """Momentum-SAM as published: the gradient at w - rho v/|v| (v: SGD's momentum buffer or
    Adam's first moment; unperturbed before the first step), the base step at w."""
    model, params, opt = _rule_setup(base)
    key = "momentum_buffer" if base == "sgd" else "exp_avg"
    for step in range(STEPS):
        x, y = _batch(step)
        if step == 0:
            g = _grad_at(model, params, x, y)
        else:
            v = _flat([opt.state[p][key] for p in params]).double()
            g = _grad_at(model, params, x, y, -rho * v / v.norm())
        _base_step(opt, params, g)
    return [p.detach() for p in params]


def _msam(model: nn.Module, base: str, backend: str | None = None):
    from fused_sam import MomentumSAM

    if base == "sgd":
        return MomentumSAM(
            model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, backend=backend
        )
    return MomentumSAM(torch.optim.AdamW(model.parameters(), lr=0.01), rho=0.5, backend=backend)


def _one_pass(model, opt, steps) -> None:
    for step in steps:
        x, y = _batch(step)
        nnf.cross_entropy(model(x), y).backward()
        opt.step()  # one pass per step: the plain training loop
        opt.zero_grad()


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_momentum_sam_matches_the_published_rule(base: str, backend: str) -> None:
    require_backend(backend)
    model = _net()
    opt = _msam(model, base, backend)
    _one_pass(model, opt, range(STEPS))
    with opt.unperturbed():
        got = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(got, _msam_rule(0.5, base)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


def test_momentum_sam_unperturbed_and_exact_resume() -> None:
    model = _net()
    opt = _msam(model, "sgd")
    _one_pass(model, opt, range(3))
    perturbed = [p.detach().clone() for p in model.parameters()]
    with opt.unperturbed():
        w = [p.detach().clone() for p in model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(w, perturbed))
    for p, b in zip(model.parameters(), perturbed):
        assert torch.equal(p, b)  # perturbed again, bit for bit
    # Resume from a checkpoint whose model weights are the perturbed ones (a trainer saving
    # outside unperturbed()) and from one saved inside it: both continue exactly.
    ckpt_opt = copy.deepcopy(opt.state_dict())
    saved = {"perturbed": copy.deepcopy(model.state_dict())}
    with opt.unperturbed():
        saved["w"] = copy.deepcopy(model.state_dict())
    _one_pass(model, opt, range(3, STEPS))
    for which in ("perturbed", "w"):
        resumed = _net()
        resumed.load_state_dict(saved[which])
        opt2 = _msam(resumed, "sgd")
        opt2.load_state_dict(copy.deepcopy(ckpt_opt))  # loading aliases the state tensors
        _one_pass(resumed, opt2, range(3, STEPS))
        for a, b in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(a, b), which


def test_momentum_sam_resumes_exactly_from_a_checkpoint_saved_inside_unperturbed() -> None:
    """Model AND optimizer saved inside ``opt.unperturbed()`` (the documented place): the
    resumed run continues bit for bit (the optimizer recorded ``perturbed=False`` there, and
    the resume dropped the next perturbation)."""
    model = _net()
    opt = _msam(model, "sgd")
    _one_pass(model, opt, range(3))
    with opt.unperturbed():
        saved_model = copy.deepcopy(model.state_dict())
        saved_opt = copy.deepcopy(opt.state_dict())
    _one_pass(model, opt, range(3, STEPS))
    resumed = _net()
    resumed.load_state_dict(saved_model)
    opt2 = _msam(resumed, "sgd")
    opt2.load_state_dict(saved_opt)
    _one_pass(resumed, opt2, range(3, STEPS))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_sam_keeps_weights_written_between_steps(backend: str) -> None:
    """A rollback (``model.load_state_dict``), an in-place write under no_grad or a ``.data =``
    between two steps is the new unperturbed point: the next step starts from it, as a plain
    SGD step from the written weights with the stored momentum would."""
    require_backend(backend)
    model = _net()
    opt = _msam(model, "sgd", backend)
    _one_pass(model, opt, range(3))
    params = list(model.parameters())
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    model.load_state_dict({k: torch.full_like(v, 5.0) for k, v in model.state_dict().items()})
    with torch.no_grad():
        params[1].clamp_(max=1.0)  # written in place: kept as 1.0
    params[3].data = torch.full_like(params[3], -2.0)  # a new storage: kept too
    written = [p.detach().clone() for p in params]
    # What one SGD step from the written weights, with the same momentum, gives.
    twin = _net()
    with torch.no_grad():
        for t, w in zip(twin.parameters(), written):
            t.copy_(w)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for t, b in zip(twin.parameters(), bufs):
        sgd.state[t]["momentum_buffer"] = b.clone()
    x, y = _batch(3)
    nnf.cross_entropy(twin(x), y).backward()
    sgd.step()
    _one_pass(model, opt, [3])
    with opt.unperturbed():
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)


def test_momentum_sam_refuses_what_it_cannot_drive() -> None:
    from fused_sam import MomentumSAM

    model = _net()
    with pytest.raises(ValueError, match="momentum > 0"):
        MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="RMSprop"):
        MomentumSAM(model.parameters(), torch.optim.RMSprop, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        MomentumSAM(model.parameters(), torch.optim.SGD, rho=-1.0, lr=0.1, momentum=0.9)


def test_variant_state_of_another_model_is_refused() -> None:
    """A checkpoint whose per-parameter variant state (LookSAM's g_v, F-SAM's m, Momentum-SAM's
    w) has another parameter's shape is refused with the shapes named, not loaded."""
    cases = {
        "LookSAM state gv": lambda m: _looksam(m, None, "sgd", k=2),
        "FriendlySAM state m": lambda m: _friendly(m, None, "sgd"),
        "momentum_sam weights": lambda m: _msam(m, "sgd"),
    }
    for what, make in cases.items():
        model = _net()
        opt = make(model)
        if what == "momentum_sam weights":
            _one_pass(model, opt, range(2))
        else:
            _two_step(model, opt, range(1))
        ckpt = copy.deepcopy(opt.state_dict())
        inner = ckpt.get("momentum_sam", {}).get("weights") or next(
            v for v in (ckpt.get("sam_schedule", {}).get("policy", {}).get("gv"),
                        ckpt.get("sam_direction", {}).get("m")) if v
        )  # fmt: skip
        inner[0] = torch.zeros(5, 5)
        with pytest.raises(ValueError, match=rf"{what}\[0\] has shape \(5, 5\), not \(12, 6\)"):
            make(_net()).load_state_dict(ckpt)
