"""Every SAM variant under ``torch.amp.GradScaler`` on CPU.

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
from helpers import flat_state
from torch import nn
from torch.nn import functional as nnf

from fused_sam import GSAM, EveryK, FriendlySAM, FusedSAM, LookSAM, MomentumSAM

STEPS = 6


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _loss(model: nn.Module, step: int, poison: float = 1.0) -> torch.Tensor:
    x, y = _batch(step)
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

    backward(_loss(model, step, poison[0]))
    if isinstance(opt, FusedSAM) and opt.next_step == "sam":
        if tell_scale and scaler is not None:
            opt.first_step(zero_grad=True, grad_scale=scaler.get_scale())
        else:
            opt.first_step(zero_grad=True)
        backward(_loss(model, step, poison[1]))
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
        model = _net()
        opt = VARIANTS[name](model)
        for step in range(STEPS):
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
        model = _net()
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
        model = _net()
        opt = VARIANTS[name](model)
        for step in range(STEPS):
            _step(model, opt, step, scaler)
        runs.append(_snapshot(model, opt))
    assert scaler.get_scale() == 2.0 ** (4 + STEPS)
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
        model = _net()
        opt = make(model)
        for step in range(STEPS):
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
        model = _net()
        opt = make(model)
        for step in range(STEPS):
            _step(model, opt, step, scaler, tell_scale=True, clip=0.5)
        runs.append(_snapshot(model, opt))
    _assert_same(runs[1], runs[0], exact=False)
    if name == "looksam":
        return
    model = _net()
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
        model = _net()
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
            ref = _net()
            ref_opt = VARIANTS[name](ref)
            for step in [*range(poisoned), poisoned + 1, poisoned + 2]:
                _step(ref, ref_opt, step, None)
            _assert_same(after, _snapshot(ref, ref_opt), exact=False)
