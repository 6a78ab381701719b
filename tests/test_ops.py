"""The shared oracle matrix: every backend's ops against :mod:`fused_sam.reference`.

Each test drives the ops through :mod:`fused_sam.functional` with one backend forced, so the
routing of tensors a flat kernel cannot take (non-dense, stride-mismatched) is covered too, and
compares parameters AND state with a reference run of the same inputs over several steps.
Sizes are small (the Triton interpreter is slow) but cover tails, several tensors per launch,
more than one block per tensor, a 0-dim tensor, non-contiguous and channels_last tensors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS, TOL, assert_close, require_backend

from fused_sam import functional as F
from fused_sam.hyperparams import AdamHyper, SGDHyper
from fused_sam.masks import RandomMask, pack_bits, tensor_salt

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
STEPS = 7


def _rand(shape, dtype: torch.dtype, store: torch.dtype | None) -> torch.Tensor:
    # Values rounded to ``dtype``, stored as ``store``: a float64 run from exactly the inputs
    # of a low-precision run measures what that precision costs.
    return torch.randn(shape, dtype=torch.float64).to(dtype).to(store or dtype)


#: Dense shapes of :func:`make_params`: odd sizes (tails), a 0-dim tensor, several chunks.
SHAPES = ((1,), (3,), (4097,), (65537,), (), (33, 7))


def make_params(
    dtype: torch.dtype, store: torch.dtype | None = None, shapes: tuple = SHAPES
) -> list[torch.Tensor]:
    """``shapes``, then a non-contiguous view, a channels_last tensor and a transposed one."""
    ps = [_rand(s, dtype, store) for s in shapes]
    ps.append(_rand((16, 10), dtype, store)[:, ::2])  # non-contiguous (and not dense)
    ps.append(_rand((2, 3, 5, 4), dtype, store).to(memory_format=torch.channels_last))
    ps.append(_rand((5, 7), dtype, store).t())  # dense, transposed strides
    return ps


def like(
    ps: list[torch.Tensor], scale: float = 1.0, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Random tensors with each parameter's shape and layout (as AccumulateGrad would make)."""
    out = []
    for p in ps:
        t = torch.empty_like(p)
        t.copy_(_rand(p.shape, dtype or p.dtype, p.dtype) * scale)
        out.append(t)
    return out


def clone(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in ts]  # clone preserves strides of dense tensors


def check_all(
    got: list[torch.Tensor],
    want: list[torch.Tensor],
    what: str,
    exact: list[torch.Tensor] | None = None,
) -> None:
    """``got`` matches the reference ``want`` at the dtype's tolerance.

    For bf16/fp16, ``exact`` (the same run in float64 from the same rounded inputs) enables
    a second criterion: the backend's error against it may be at most twice the
    reference's own error at that dtype.
    """
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        label = f"{what}[{i}] shape={tuple(b.shape)}"
        if exact is not None and b.dtype in (torch.float16, torch.bfloat16):
            x = exact[i]
            err_got = (a.double() - x).abs().max().item()
            err_ref = (b.double() - x).abs().max().item()
            tol = TOL[b.dtype][0]
            assert err_got <= 2 * err_ref + tol, f"{label}: error {err_got} vs reference {err_ref}"
        else:
            assert_close(a, b, label)


def masks_for(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    # Bits address elements in each parameter's memory order; a random mask needs no layout.
    return [pack_bits(torch.rand(p.shape) < 0.5) for p in ps]


def _lists(ps):
    n = len(ps)
    return n, [0.0] * n


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_sq(backend: str, dtype: torch.dtype, adaptive: bool) -> None:
    require_backend(backend)
    ps = make_params(dtype)
    gs = like(ps)
    n = len(ps)
    args = (gs, ps, [adaptive] * n, [0.01] * n)
    want = F.norm_sq(*args, backend="reference").double().sum()
    got = F.norm_sq(*args, backend=backend)
    # Float64 squares and sums for every storage type: only the summation order differs.
    assert got.dtype == torch.float64 and got.dim() == 1
    torch.testing.assert_close(got.sum(), want, atol=0, rtol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_norm_sq_nonfinite(backend: str) -> None:
    require_backend(backend)
    for bad in (float("inf"), float("nan"), float("-inf")):
        ps = make_params(torch.float32)
        gs = like(ps)
        gs[3][1234] = bad
        n = len(ps)
        s = F.norm_sq(gs, ps, [False] * n, [0.0] * n, backend=backend)
        assert F.nonfinite(s).item() == 1.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_perturb(backend: str, dtype: torch.dtype, adaptive: bool, masked: bool) -> None:
    require_backend(backend)
    ps = make_params(dtype)
    gs = like(ps)
    n = len(ps)
    rho = [0.05 * (1 + i % 3) for i in range(n)]  # several buckets
    ad, eta = [adaptive] * n, [0.01] * n
    masks = masks_for(ps) if masked else None
    sumsq = F.norm_sq(gs, ps, ad, eta, backend="reference")
    want_p, want_b = clone(ps), [torch.empty_like(p) for p in ps]
    F.perturb_(want_p, gs, want_b, sumsq, rho, 1e-12, ad, eta, masks, backend="reference")
    got_p, got_b = clone(ps), [torch.empty_like(p) for p in ps]
    F.perturb_(got_p, gs, got_b, sumsq, rho, 1e-12, ad, eta, masks, backend=backend)
    check_all(got_p, want_p, "params")
    for b, p in zip(got_b, ps):
        assert torch.equal(b, p), "backup must be an exact copy"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_perturb_nonfinite_leaves_weights_bit_identical(backend: str, bad: float) -> None:
    require_backend(backend)
    ps = make_params(torch.float32)
    gs = like(ps)
    gs[2][7] = bad
    n, eta = _lists(ps)
    ad = [False] * n
    sumsq = F.norm_sq(gs, ps, ad, eta, backend=backend)
    got = clone(ps)
    F.perturb_(
        got,
        gs,
        [torch.empty_like(p) for p in ps],
        sumsq,
        [0.05] * n,
        1e-12,
        ad,
        eta,
        None,
        backend=backend,
    )
    for a, b in zip(got, ps):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_perturb_zero_grad_is_exact_noop(backend: str) -> None:
    require_backend(backend)
    ps = make_params(torch.float32)
    gs = [torch.zeros_like(p) for p in ps]
    n, eta = _lists(ps)
    sumsq = F.norm_sq(gs, ps, [False] * n, eta, backend=backend)
    got = clone(ps)
    F.perturb_(
        got,
        gs,
        [torch.empty_like(p) for p in ps],
        sumsq,
        [0.05] * n,
        1e-12,
        [False] * n,
        eta,
        None,
        backend=backend,
    )
    for a, b in zip(got, ps):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_exact(backend: str, dtype: torch.dtype) -> None:
    require_backend(backend)
    ps = make_params(dtype)
    backups = clone(ps)
    for p in ps:
        p.add_(1.0)
    F.restore_(ps, backups, backend=backend)
    for a, b in zip(ps, backups):
        assert torch.equal(a, b)


SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=5e-4, maximize=False),
    dict(momentum=0.8, dampening=0.1, nesterov=False, weight_decay=0.0, maximize=True),
]


def _perturb_step(ps, backups, backend, dtype):
    """Pass 1 of an op cycle: fresh gradients, norm, perturb (writes the backups)."""
    n, eta = _lists(ps)
    g1 = like(ps, dtype=dtype)
    sumsq = F.norm_sq(g1, ps, [False] * n, eta, backend=backend)
    F.perturb_(ps, g1, backups, sumsq, [0.05] * n, 1e-12, [False] * n, eta, None, backend=backend)


def _sgd_run(backend, dtype, cfg, skip_at=None, with_scale=False, store=None):
    torch.manual_seed(1)
    ps = make_params(dtype, store)
    n = len(ps)
    bufs = [torch.zeros_like(p) for p in ps] if cfg["momentum"] else None
    backups = [torch.empty_like(p) for p in ps]
    for step in range(STEPS):
        _perturb_step(ps, backups, backend, dtype)
        g2 = like(ps, scale=1024.0 if with_scale else 1.0, dtype=dtype)
        found = torch.tensor(1.0 if step == skip_at else 0.0)
        F.restore_sgd_step_(
            ps,
            g2,
            backups,
            bufs,
            SGDHyper(lr=0.1, **cfg),
            first_step=[step == 0] * n,
            grad_scale=torch.tensor(1024.0) if with_scale else None,
            found_inf=found if skip_at is not None else None,
            backend=backend,
        )
    return ps, bufs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_restore_sgd_step(backend: str, dtype: torch.dtype, cfg: dict) -> None:
    require_backend(backend)
    want_p, want_b = _sgd_run("reference", dtype, cfg)
    got_p, got_b = _sgd_run(backend, dtype, cfg)
    exact_p, exact_b = _sgd_run("reference", dtype, cfg, store=torch.float64)
    check_all(got_p, want_p, "params", exact_p)
    if want_b is not None:
        check_all(got_b, want_b, "momentum_buffer", exact_b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_restore_sgd_step_skip_and_grad_scale(backend: str) -> None:
    require_backend(backend)
    cfg = SGD_CONFIGS[1]
    want_p, want_b = _sgd_run("reference", torch.float32, cfg, skip_at=3, with_scale=True)
    got_p, got_b = _sgd_run(backend, torch.float32, cfg, skip_at=3, with_scale=True)
    check_all(got_p, want_p, "params")
    check_all(got_b, want_b, "momentum_buffer")


ADAM_CONFIGS = [
    dict(weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False),
    dict(weight_decay=1e-2, amsgrad=False, maximize=False, decoupled_weight_decay=False),
    dict(weight_decay=1e-2, amsgrad=True, maximize=False, decoupled_weight_decay=True),
    dict(weight_decay=0.0, amsgrad=True, maximize=True, decoupled_weight_decay=True),
]


def _adam_run(backend, dtype, cfg, skip_at=None, store=None):
    torch.manual_seed(2)
    ps = make_params(dtype, store)
    m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    vmax = [torch.zeros_like(p) for p in ps] if cfg["amsgrad"] else None
    steps = [torch.zeros((), dtype=torch.float32) for _ in ps]
    backups = [torch.empty_like(p) for p in ps]
    for step in range(STEPS):
        _perturb_step(ps, backups, backend, dtype)
        g2 = like(ps, dtype=dtype)
        F.restore_adam_step_(
            ps,
            g2,
            backups,
            m,
            v,
            vmax,
            steps,
            AdamHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, **cfg),
            grad_scale=None,
            found_inf=torch.tensor(float(step == skip_at)) if skip_at is not None else None,
            backend=backend,
        )
    return ps, m, v, vmax, steps


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", ADAM_CONFIGS)
def test_restore_adam_step(backend: str, dtype: torch.dtype, cfg: dict) -> None:
    require_backend(backend)
    want = _adam_run("reference", dtype, cfg)
    got = _adam_run(backend, dtype, cfg)
    exact = _adam_run("reference", dtype, cfg, store=torch.float64)
    names = ("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name, a, b, x in zip(names, got, want, exact):
        if b is not None:
            check_all(a, b, name, x)
    assert [s.item() for s in got[4]] == [s.item() for s in want[4]] == [float(STEPS)] * len(got[4])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_restore_adam_step_skip(backend: str) -> None:
    require_backend(backend)
    cfg = ADAM_CONFIGS[2]
    want = _adam_run("reference", torch.float32, cfg, skip_at=2)
    got = _adam_run(backend, torch.float32, cfg, skip_at=2)
    for a, b in zip(got[:4], want[:4]):
        check_all(a, b, "adam")
    assert all(s.item() == STEPS - 1 for s in got[4])


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("mask", ["none", "bits", "random"])
@pytest.mark.parametrize("bad", [None, float("nan")])
def test_foreach_device_path_on_cpu_tensors(adaptive: bool, mask: str, bad) -> None:
    """The sync-free accelerator path of the foreach perturbation, checked on CPU tensors."""
    from fused_sam.backends import foreach

    ps = [p.contiguous() for p in make_params(torch.float32)]
    gs = like(ps)
    if bad is not None:
        gs[2][5] = bad
    n = len(ps)
    ad, eta = [adaptive] * n, [0.01] * n
    masks = masks_for(ps) if mask == "bits" else None
    if mask == "random":
        masks = RandomMask(0.5, seed=1).bits([tensor_salt(i) for i in range(n)])
    sumsq = F.norm_sq(gs, ps, ad, eta, backend="reference")
    want = clone(ps)
    F.perturb_(want, gs, clone(ps), sumsq, [0.05] * n, 1e-12, ad, eta, masks, backend="reference")
    got = clone(ps)
    norm = sumsq.sum().sqrt()
    kept, rho = foreach._materialise(masks, got, 0.05)
    foreach._add_guarded(got, gs, norm, rho, 1e-12, adaptive, 0.01, kept)
    check_all(got, want, "params")
    if bad is not None:
        assert all(torch.equal(a, b) for a, b in zip(got, ps))


def test_auto_order_on_cuda_prefers_native_then_triton(monkeypatch) -> None:
    """backend=None on CUDA tensors: the native CUDA kernels, else Triton, else foreach (the
    order the README states), decided from each backend's availability alone."""
    cuda = torch.device("cuda")
    down: set[str] = set()
    monkeypatch.setattr(F, "unavailable_reason", lambda name, d: "down" if name in down else None)
    picks = []
    for off in ((), ("cuda",), ("cuda", "triton")):
        F._resolve.cache_clear()
        down.clear()
        down.update(off)
        picks.append(F.resolve_backend(None, cuda))
    F._resolve.cache_clear()
    assert picks == ["cuda", "triton", "foreach"]
