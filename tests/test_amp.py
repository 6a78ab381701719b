"""Mixed precision: ``torch.amp.GradScaler``'s optimizer protocol and autocast, every backend.

The scaler steps FusedSAM through ``step()`` with ``grad_scale`` and ``found_inf`` set; the
second-pass gradients must be unscaled, the base update skipped on inf, and the weights always
restored. The oracle is the reference backend driven without any loss scale: a power-of-two
scale multiplies float32 gradients exactly, so the two runs agree to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend
from helpers import state_tensors
from torch import nn
from torch.nn import functional as nnf

from fused_sam import FusedSAM

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
