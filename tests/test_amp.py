"""Mixed precision: GradScaler and autocast, for SAM and every variant.

Mixed precision: ``torch.amp.GradScaler``'s optimizer protocol and autocast, every backend.

The scaler steps FusedSAM through ``step()`` with ``grad_scale`` and ``found_inf`` set; the
second-pass gradients must be unscaled, the base update skipped on inf, and the weights always
restored. The oracle is the reference backend driven without any loss scale: a power-of-two
scale multiplies float32 gradients exactly, so the two runs agree to float32 rounding.

Every SAM variant under ``torch.amp.GradScaler`` on CPU.

The oracle is the same variant driven without a loss scale: a power-of-two scale multiplies
float32 gradients exactly, so a scaled run must equal the unscaled one (weights and every
optimizer/variant state tensor) to float32 rounding, whatever the variant keeps from the
scaled gradients it is handed (LookSAM's g_v, F-SAM's moving average, GSAM's first-pass
gradient, Momentum-SAM's momentum). An inf/nan gradient under the scaler skips the step and
leaves weights and state bit-identical; only the schedule's clock moves on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend
from helpers import flat_state, state_tensors
from torch import nn
from torch.nn import functional as nnf

from fused_sam import GSAM, EveryK, FriendlySAM, FusedSAM, LookSAM, MomentumSAM

BACKENDS = ["reference", *CPU_BACKENDS]
STEPS = 4


def _net(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(device, dtype)


def _batch(step: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    return x.to(device), y.to(device)


def _opt(model: nn.Module, backend: str, base: str) -> FusedSAM:
    if base == "sgd":
        return FusedSAM(
            model.parameters(),
            torch.optim.SGD,
            rho=0.05,
            lr=0.1,
            momentum=0.9,
            weight_decay=1e-3,
            backend=backend,
        )
    return FusedSAM(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.05, backend=backend)


def _loss(model, x, y, autocast: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(
        x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None
    ):
        return nnf.cross_entropy(model(x), y)


def _scaled_step(model, opt, scaler, step, autocast=None, poison=(1.0, 1.0)) -> None:
    """The recipe of the README's mixed-precision section (``poison`` multiplies each loss)."""
    x, y = _batch(step, next(model.parameters()).device.type)
    scaler.scale(_loss(model, x, y, autocast) * poison[0]).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(_loss(model, x, y, autocast) * poison[1]).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def _plain_step(model, opt, step, autocast=None) -> None:
    x, y = _batch(step, next(model.parameters()).device.type)
    _loss(model, x, y, autocast).backward()
    opt.first_step(zero_grad=True)
    _loss(model, x, y, autocast).backward()
    opt.second_step(zero_grad=True)


def _compare(a: nn.Module, oa: FusedSAM, b: nn.Module, ob: FusedSAM) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p.detach(), q.detach(), "params")
    for s, t in zip(
        state_tensors(oa, list(a.parameters())), state_tensors(ob, list(b.parameters()))
    ):
        assert_close(s, t, "state")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("init_scale", [2.0**10, 2.0**80])
def test_scaled_steps_equal_unscaled_sam(backend: str, base: str, init_scale: float) -> None:
    """Unscaled in the base step, scale-free in the perturbation; 2**80 makes the squared norm
    of the scaled gradients overflow float32 (every step used to be skipped)."""
    require_backend(backend)
    model, ref = _net(), _net()
    opt, ref_opt = _opt(model, backend, base), _opt(ref, "reference", base)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    for step in range(STEPS):
        _scaled_step(model, opt, scaler, step)
        assert not bool(opt.last_step_skipped) and not opt.in_flight
        _plain_step(ref, ref_opt, step)
    assert scaler.get_scale() == init_scale * 4  # grew twice: no step was taken as overflowed
    _compare(model, opt, ref, ref_opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_fp16_autocast_matches_reference(backend: str, base: str) -> None:
    require_backend(backend)
    model, ref = _net(), _net()
    opt, ref_opt = _opt(model, backend, base), _opt(ref, "reference", base)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(STEPS):
        _scaled_step(model, opt, scaler, step, autocast=torch.float16)
        _scaled_step(ref, ref_opt, ref_scaler, step, autocast=torch.float16)
    _compare(model, opt, ref, ref_opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_inf_in_second_pass_restores_skips_and_backs_off(backend: str, base: str) -> None:
    """The scaler's found_inf skips the base update; the weights still leave w + e."""
    require_backend(backend)
    model = _net()
    opt = _opt(model, backend, base)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _scaled_step(model, opt, scaler, 0)
    weights = [p.detach().clone() for p in model.parameters()]
    state = [t.clone() for t in state_tensors(opt, list(model.parameters()))]
    _scaled_step(model, opt, scaler, 1, poison=(1.0, float("inf")))
    assert not opt.in_flight and bool(opt.last_step_skipped)
    assert scaler.get_scale() == 2.0**9
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    for a, b in zip(state_tensors(opt, list(model.parameters())), state):
        assert torch.equal(a, b)
    _scaled_step(model, opt, scaler, 2)  # training goes on
    assert not bool(opt.last_step_skipped)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_pass_overflow_skips_and_scale_backs_off(backend: str) -> None:
    """A scale that overflows float16 backward: pass 1 perturbs nothing, so pass 2 runs at the
    same weights, overflows as well, and the scaler backs off; nothing is created or moved."""
    require_backend(backend)
    model = _net()
    opt = _opt(model, backend, "sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    weights = [p.detach().clone() for p in model.parameters()]
    _scaled_step(model, opt, scaler, 0, autocast=torch.float16)
    assert bool(opt.last_step_skipped) and not opt.in_flight
    assert scaler.get_scale() == 2.0**39
    assert not opt.state  # a skipped step creates no momentum buffers
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_second_pass_gradients(backend: str) -> None:
    """``unscale_`` then ``clip_grad_norm_`` then ``scaler.step``: clipped, unscaled g2."""
    require_backend(backend)
    model, ref = _net(), _net()
    opt, ref_opt = _opt(model, backend, "sgd"), _opt(ref, "reference", "sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for step in range(STEPS):
        x, y = _batch(step)
        scaler.scale(_loss(model, x, y, None)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(_loss(model, x, y, None)).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

        _loss(ref, x, y, None).backward()
        ref_opt.first_step(zero_grad=True)
        _loss(ref, x, y, None).backward()
        nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.05)
        ref_opt.second_step(zero_grad=True)
    _compare(model, opt, ref, ref_opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_zero_under_a_scaler_is_the_base_optimizer_under_it(backend: str) -> None:
    """At rho = 0 a scaled FusedSAM step is the scaled base step: bit for bit where the base
    optimizer's own step() runs (reference, foreach), at float32 rounding on the fused ones."""
    require_backend(backend)
    model, ref = _net(), _net()
    kw = {"lr": 0.1, "momentum": 0.9}
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.0, backend=backend, **kw)
    base = torch.optim.SGD(ref.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(STEPS):
        _scaled_step(model, opt, scaler, step, autocast=torch.float16)
        x, y = _batch(step)
        ref_scaler.scale(_loss(ref, x, y, torch.float16)).backward()
        ref_scaler.step(base)
        ref_scaler.update()
        base.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        if backend in ("reference", "foreach"):
            assert torch.equal(p, q)
        else:
            assert_close(p.detach(), q.detach(), "params")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_needs_no_scaler(backend: str) -> None:
    require_backend(backend)
    model, ref = _net(), _net()
    opt, ref_opt = _opt(model, backend, "adamw"), _opt(ref, "reference", "adamw")
    for step in range(STEPS):
        _plain_step(model, opt, step, autocast=torch.bfloat16)
        _plain_step(ref, ref_opt, step, autocast=torch.bfloat16)
        assert not bool(opt.last_step_skipped)
    _compare(model, opt, ref, ref_opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_restore_bit_exactly(backend: str, dtype: torch.dtype) -> None:
    """``(w + e) - e != w`` in bf16/fp16: the restore must be a copy of the stored bits."""
    require_backend(backend)
    model = _net(dtype)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0, backend=backend)
    x, y = _batch(0)
    weights = [p.detach().clone() for p in model.parameters()]
    nnf.cross_entropy(model(x.to(dtype)), y).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    opt.restore()
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    nnf.cross_entropy(model(x.to(dtype)), y).backward()
    opt.first_step(zero_grad=True)
    nnf.cross_entropy(model(x.to(dtype)), y).backward()
    opt.second_step(zero_grad=True)  # lr = 0: the base step moves nothing
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)


# ---------------------------------------------------------------------------------------------
# The same on a GPU (``python -m pytest -m gpu``): the CUDA and Triton kernels unscale and skip
# in-kernel, reading the scaler's device tensors.


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "foreach"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_gpu_grad_scaler_protocol(backend: str, base: str) -> None:
    require_backend(backend, "cuda")
    for init_scale in (2.0**10, 2.0**80):
        model, ref = _net(device="cuda"), _net(device="cuda")
        opt, ref_opt = _opt(model, backend, base), _opt(ref, "reference", base)
        scaler = torch.amp.GradScaler("cuda", init_scale=init_scale, growth_interval=2)
        for step in range(STEPS):
            _scaled_step(model, opt, scaler, step)
            _plain_step(ref, ref_opt, step)
        assert scaler.get_scale() == init_scale * 4
        _compare(model, opt, ref, ref_opt)

    model, ref = _net(device="cuda"), _net(device="cuda")
    opt, ref_opt = _opt(model, backend, base), _opt(ref, "reference", base)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**12) for _ in range(2)]
    for step in range(STEPS):
        _scaled_step(model, opt, scalers[0], step, autocast=torch.float16)
        _scaled_step(ref, ref_opt, scalers[1], step, autocast=torch.float16)
    _compare(model, opt, ref, ref_opt)

    weights = [p.detach().clone() for p in model.parameters()]
    state = [t.clone() for t in state_tensors(opt, list(model.parameters()))]
    scale = scalers[0].get_scale()
    _scaled_step(model, opt, scalers[0], 9, autocast=torch.float16, poison=(1.0, float("inf")))
    assert not opt.in_flight and bool(opt.last_step_skipped)
    assert scalers[0].get_scale() == scale / 2
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    for a, b in zip(state_tensors(opt, list(model.parameters())), state):
        assert torch.equal(a, b)

    fresh = _net(device="cuda")
    fresh_opt = _opt(fresh, backend, base)
    weights = [p.detach().clone() for p in fresh.parameters()]
    big = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    _scaled_step(fresh, fresh_opt, big, 0, autocast=torch.float16)
    assert bool(fresh_opt.last_step_skipped) and big.get_scale() == 2.0**39
    assert not fresh_opt.state
    for p, w in zip(fresh.parameters(), weights):
        assert torch.equal(p, w)


# ---------------------------------------------------------------------------------------------
# Every SAM variant under a GradScaler

STEPS_V = 6


def _net_v() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _batch_v(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(70 + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _sgd(model: nn.Module, **variant: Any) -> FusedSAM:
    return FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **variant)


def _adamw(model: nn.Module, **variant: Any) -> FusedSAM:
    return FusedSAM(torch.optim.AdamW(model.parameters(), lr=0.01), rho=0.1, **variant)


#: name -> the optimizer. Schedules use k = 2: SAM steps 0, 2, 4, plain/reuse steps between.
VARIANTS: dict[str, Callable[[nn.Module], Any]] = {
    "every-2": lambda m: _sgd(m, schedule=EveryK(2)),
    "looksam": lambda m: _sgd(m, schedule=LookSAM(k=2, alpha=0.7)),
    "looksam-adamw": lambda m: _adamw(m, schedule=LookSAM(k=2, alpha=0.7)),
    "friendly": lambda m: _sgd(m, direction=FriendlySAM(sigma=1.0, lam=0.6)),
    "gsam": lambda m: _adamw(m, direction=GSAM(alpha=0.4)),
    "gsam-sgd": lambda m: _sgd(m, direction=GSAM(alpha=0.4)),
    "momentum": lambda m: MomentumSAM(
        m.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9
    ),
    "momentum-adamw": lambda m: MomentumSAM(torch.optim.AdamW(m.parameters(), lr=0.01), rho=0.5),
}


def _loss_v(model: nn.Module, step: int, poison: float = 1.0) -> torch.Tensor:
    x, y = _batch_v(step)
    return nnf.cross_entropy(model(x), y) * poison


def _step(
    model: nn.Module,
    opt: Any,
    step: int,
    scaler: torch.amp.GradScaler | None,
    poison: tuple[float, float] = (1.0, 1.0),
    tell_scale: bool = False,
    clip: float | None = None,
) -> None:
    """One training step as the README's recipes drive each kind of optimizer; ``poison``
    multiplies the loss of the first and second pass (a plain or one-pass step has only the
    first); ``tell_scale`` hands the scaler's scale to ``first_step``; ``clip`` clips the
    gradients the base step uses (after ``scaler.unscale_``)."""

    def backward(loss: torch.Tensor) -> None:
        (loss if scaler is None else scaler.scale(loss)).backward()

    backward(_loss_v(model, step, poison[0]))
    if isinstance(opt, FusedSAM) and opt.next_step == "sam":
        if tell_scale and scaler is not None:
            opt.first_step(zero_grad=True, grad_scale=scaler.get_scale())
        else:
            opt.first_step(zero_grad=True)
        backward(_loss_v(model, step, poison[1]))
    if clip is not None:
        if scaler is not None:
            scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()


def _snapshot(model: nn.Module, opt: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The weights and every state tensor/number except the schedule's clock (see _clock)."""
    state = opt.state_dict()
    state.get("sam_schedule", {}).pop("steps", None)
    return [p.detach().clone() for p in model.parameters()], flat_state(state)


def _clock(opt: Any) -> int | None:
    """Steps a schedule has counted (``None``: no schedule)."""
    return opt.state_dict().get("sam_schedule", {}).get("steps")


def _assert_same(a, b, exact: bool) -> None:
    for xs, ys, what in ((a[0], b[0], "params"), (a[1], b[1], "state")):
        assert len(xs) == len(ys) > 0, what
        for x, y in zip(xs, ys):
            if exact:
                assert torch.equal(x, y), what
            else:
                assert_close(x, y.to(x.dtype), what)


def _scaler(init_scale: float, growth_interval: int) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)


@pytest.mark.parametrize("name", VARIANTS)
def test_constant_scale_equals_the_unscaled_run(name: str) -> None:
    """2**10 never changes here: every step of the scaled run equals the unscaled one."""
    runs = []
    for scaler in (None, _scaler(2.0**10, 10**6)):
        model = _net_v()
        opt = VARIANTS[name](model)
        for step in range(STEPS_V):
            _step(model, opt, step, scaler)
            assert not isinstance(opt, FusedSAM) or not bool(opt.last_step_skipped)
        runs.append(_snapshot(model, opt))
    _assert_same(runs[1], runs[0], exact=False)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("variant", ["schedule", "direction"])
def test_growing_scale_on_every_backend(backend: str, variant: str) -> None:
    """The unscaling for the hooks on every backend: the fused restore+step kernels (cpu,
    triton) and the base optimizer's own step() (reference, foreach) must not unscale again."""
    require_backend(backend)
    kw: dict[str, Any] = {"backend": backend}
    if variant == "schedule":
        kw["schedule"] = LookSAM(k=2, alpha=0.7)
    else:
        kw["direction"] = GSAM(alpha=0.4)
    runs = []
    for scaler in (None, _scaler(2.0**4, 1)):
        model = _net_v()
        opt = _sgd(model, **kw)
        for step in range(4):
            _step(model, opt, step, scaler)
        runs.append(_snapshot(model, opt))
    _assert_same(runs[1], runs[0], exact=False)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "friendly"])
def test_a_growing_scale_equals_the_unscaled_run(name: str) -> None:
    """The scale doubles after every step. What a variant keeps from one step's scaled
    gradients must not carry that step's scale into the next (F-SAM's ascent needs the scale
    before the scaler hands it over: see the next test)."""
    runs = []
    for scaler in (None, _scaler(2.0**4, 1)):
        model = _net_v()
        opt = VARIANTS[name](model)
        for step in range(STEPS_V):
            _step(model, opt, step, scaler)
        runs.append(_snapshot(model, opt))
    assert scaler.get_scale() == 2.0 ** (4 + STEPS_V)
    _assert_same(runs[1], runs[0], exact=False)


def test_friendly_sam_with_the_scale_told_or_constant() -> None:
    """F-SAM subtracts its moving average from the first-pass gradients before the scaler has
    said their scale: told it (``first_step(grad_scale=...)``) every run equals the unscaled
    one; not told, FusedSAM assumes the scale of the previous step, which holds while the scale
    does (previous test) and is off by the scaler's factor on the one step after a change,
    while the moving average itself stays exact."""
    make = VARIANTS["friendly"]
    runs = []
    for scaler, tell in ((None, False), (_scaler(2.0**4, 1), True), (_scaler(2.0**4, 1), False)):
        model = _net_v()
        opt = make(model)
        for step in range(STEPS_V):
            _step(model, opt, step, scaler, tell_scale=tell)
        runs.append(_snapshot(model, opt))
    _assert_same(runs[1], runs[0], exact=False)
    # Not told, the scale doubles every step: the directions differ from the unscaled run's...
    assert any(not torch.allclose(a, b) for a, b in zip(runs[2][0], runs[0][0]))
    # ... yet the average stays in the units of the gradients (no factor 2**k in it).
    m_told = runs[1][1]
    m_not = runs[2][1]
    ratio = max((a.abs().max() / b.abs().max().clamp_min(1e-30)).item()
                for a, b in zip(m_not, m_told) if a.numel() > 1)  # fmt: skip
    assert ratio < 2.0


@pytest.mark.parametrize("name", ["friendly", "gsam", "looksam"])
def test_clipped_second_pass_under_a_scaler(name: str) -> None:
    """``scaler.unscale_(opt)`` then clipping: the scaler then hands no scale to ``step()``.
    LookSAM needs none (its g_v does not depend on the first pass's scale); a direction needs
    the scale of its first pass, told to ``first_step``, and refuses to guess it."""
    make = VARIANTS[name]
    runs = []
    for scaler in (None, _scaler(2.0**4, 1)):
        model = _net_v()
        opt = make(model)
        for step in range(STEPS_V):
            _step(model, opt, step, scaler, tell_scale=True, clip=0.5)
        runs.append(_snapshot(model, opt))
    _assert_same(runs[1], runs[0], exact=False)
    if name == "looksam":
        return
    model = _net_v()
    opt = make(model)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="grad_scale"):
        _step(model, opt, 0, _scaler(2.0**4, 1), clip=0.5)
    assert not opt.in_flight
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)


def _poisoned_steps(name: str) -> list[tuple[int, tuple[float, float]]]:
    """(step, poison) cases: an inf in the second pass (and in the first) of a SAM step; for
    schedules also an inf in a plain/reuse step (steps 2 and 3 with k = 2)."""
    inf = float("inf")
    if name.startswith("momentum"):
        return [(2, (inf, 1.0)), (3, (float("nan"), 1.0))]
    cases = [(2, (1.0, inf)), (2, (inf, 1.0)), (2, (1.0, float("nan")))]
    if name.startswith(("every", "looksam")):
        cases.append((3, (inf, 1.0)))
    return cases


@pytest.mark.parametrize("name", VARIANTS)
def test_nonfinite_gradient_under_a_scaler_skips_cleanly(name: str) -> None:
    """The poisoned step moves no weight and changes no state but the schedule's clock (a
    skipped step still counts, as it does for an LR scheduler: see README); training then goes
    on finite, and (with no clock to move) exactly as if the poisoned batch had never come.
    F-SAM is told the scale: the scaler backs off after the inf, and its ascent needs the new
    scale before the scaler hands it over (see test_friendly_sam_with_the_scale_told_...)."""
    tell = name == "friendly"
    for poisoned, poison in _poisoned_steps(name):
        model = _net_v()
        opt = VARIANTS[name](model)
        scaler = _scaler(2.0**10, 10**6)
        for step in range(poisoned):
            _step(model, opt, step, scaler, tell_scale=tell)
        before, clock = _snapshot(model, opt), _clock(opt)
        # The scaler checks the last pass only: an inf there backs its scale off; one in the
        # first pass of a SAM step only skips the step (README: "Pass-1 overflow").
        last = poison[1] if getattr(opt, "next_step", None) == "sam" else poison[0]
        _step(model, opt, poisoned, scaler, poison=poison, tell_scale=tell)
        assert scaler.get_scale() == (2.0**10 if last == 1.0 else 2.0**9), poison
        if isinstance(opt, FusedSAM):
            assert bool(opt.last_step_skipped) and not opt.in_flight
        _assert_same(_snapshot(model, opt), before, exact=True)
        if clock is not None:
            assert _clock(opt) == clock + 1
        for step in range(poisoned + 1, poisoned + 3):
            _step(model, opt, step, scaler, tell_scale=tell)
        after = _snapshot(model, opt)
        assert all(bool(t.isfinite().all()) for t in after[0] + after[1]), (name, poison)
        if clock is None:
            ref = _net_v()
            ref_opt = VARIANTS[name](ref)
            for step in [*range(poisoned), poisoned + 1, poisoned + 2]:
                _step(ref, ref_opt, step, None)
            _assert_same(after, _snapshot(ref, ref_opt), exact=False)
