"""What each SAM op writes, op by op, against :mod:`fused_sam.reference`.

A cycle test (norm, perturb, restore + step, repeated) compares only the end state, in which the
perturbed weights never appear, and after a few steps low-precision runs have drifted apart so
far that only loose tolerances pass. Here every op runs on the same inputs in a backend and in
the reference, and what that op writes is compared at once:

* ``norm_sq``: the total of the partials;
* ``perturb_``: the backups bit for bit, and ``e = w_new - w_old`` (in float64, from the stored
  values), and weights that a mask or a zero gradient keeps bit for bit;
* ``restore_sgd_step_`` and ``restore_adam_step_``: the update ``w_new - backup`` and every state
  tensor. Several steps run, and each step starts both runs from the reference's results of the
  previous one, so every step compares one op rather than accumulated drift; a step skipped by
  ``found_inf`` must leave the weights equal to the backups and the state untouched.

Tolerance (see :func:`check_stored`). A backend computes in float32 (float64 for float64
tensors) and rounds once to the storage dtype; the reference computes in float64 and rounds
once. Per element the stored results may therefore differ by one unit in the last place (ulp) of
the storage dtype at the result, plus the error of the float32 arithmetic: at most 1e-4 of the
value (Adam's bias corrections lose digits to cancellation) and a few float32 roundings of the
other terms. A 1% error in ``e``, an update or a state value exceeds that wherever the value is
larger than about 100 ulps of the stored result. That always holds in float32/float64; for
bfloat16/float16 two of the tensors hold weights 64x smaller than the others, so that ``e`` and
the updates dominate the stored result there.

In bfloat16/float16 the rounding hides smaller errors at ordinary weights (a dropped weight
decay term is a fraction of an ulp there), so for those dtypes the number of elements that
differ at all is bounded too: computed in float32, a correct result rounds to another value than
the float64 one only when it lies within float32 error of a rounding boundary (under 1% of the
elements here); a systematic error of a fraction ``f`` of an ulp moves about ``f`` of them.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from conftest import CPU_BACKENDS, TOL, require_backend
from helpers import odd_params
from test_ops import DTYPES, like, make_params, masks_for
from torch import Tensor, nn

from fused_sam import FusedSAM
from fused_sam import functional as F
from fused_sam.backends import native
from fused_sam.hyperparams import AdamHyper, SGDHyper
from fused_sam.masks import (
    DynamicMask,
    RandomBits,
    RandomMask,
    random_mask,
    tensor_salt,
    unpack_bits,
)

ROOT = Path(__file__).resolve().parents[1]
LOW_PRECISION = (torch.bfloat16, torch.float16)

#: Sizes of the op tests: odd tails, a tensor one element past a chunk (16384 on the CPU and in
#: the Triton interpreter), a 0-dim tensor; make_params adds the non-dense, channels_last and
#: transposed layouts.
SHAPES = ((1,), (3,), (4097,), (16385,), (), (33, 7))
#: Indices of make_params tensors whose weights are scaled by 2**-6 (exactly, a power of two),
#: so that e and the updates dominate the stored result even in bfloat16.
SMALL_WEIGHTS = (2, 5)
#: Steps of each restore+step comparison, and the step that ``found_inf = 1`` skips (AMP runs).
STEPS = 3
SKIP_AT = 1
#: Loss scale of the AMP runs: the gradients arrive multiplied by it.
GRAD_SCALE = 8.0

# Relative error of a backend's result before its final rounding: float32 arithmetic, including
# Adam's bias corrections 1 - beta**t, which lose digits to cancellation (1 - 0.999 is 1.3e-5
# off in float32), stays below it; a 1% error is 100x above it.
REL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# Rounding errors of the other terms of an expression (weights under a decoupled decay,
# gradients and momentum that cancel) in units of the compute type's epsilon; generous.
SLACK = 8
# Fraction of bfloat16/float16 elements allowed to round differently from the reference. The
# backends stay below 1% (their float32 constants such as 1 - beta2 differ from the float64 ones
# by up to 5e-8, and rounded inputs repeat the same values often); a dropped weight decay of the
# configurations below moves 25% or more of them.
FLIP_LIMIT = 0.02


# ---------------------------------------------------------------------------------------------
# Comparisons


def ulp(x: Tensor) -> Tensor:
    """The spacing of ``x``'s dtype at ``|x|`` (the gap to the next larger magnitude), float64."""
    info = torch.finfo(x.dtype)
    mantissa_bits = round(-math.log2(info.eps))
    a = x.detach().double().abs()
    _, exp = torch.frexp(a)  # a = m * 2**exp with 0.5 <= m < 1
    spacing = torch.ldexp(torch.ones_like(a), exp - 1 - mantissa_bits)
    subnormal = torch.full_like(a, info.smallest_normal * info.eps)
    return torch.where(a < info.smallest_normal, subnormal, spacing)


def compute_eps(dtype: torch.dtype) -> float:
    """Epsilon of the type the backends compute ``dtype`` tensors in."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def bits_equal(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same bits (``-0.0`` differs from ``0.0``; a NaN equals itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


def twin(t: Tensor) -> Tensor:
    """A copy of ``t`` with its size, strides and storage offset (so the same alignment).

    Both runs of a comparison get twins of the same inputs, so they take the same path through
    the backends (a non-dense view stays non-dense, a misaligned one misaligned).
    """
    numel = t.untyped_storage().nbytes() // t.element_size()
    base = torch.empty(numel, dtype=t.dtype, device=t.device)
    return base.as_strided(t.size(), t.stride(), t.storage_offset()).copy_(t)


def check_stored(
    what: str,
    got: Sequence[Tensor],
    want: Sequence[Tensor],
    *,
    base: Sequence[Tensor] | None = None,
    extra: Sequence[Tensor] | None = None,
    fixed: Sequence[Tensor] | None = None,
) -> None:
    """Stored results ``got`` of a backend against the reference's ``want``, element by element.

    With ``base`` (the op's input, e.g. the weights before it) the compared quantity is the
    change ``x - base`` in float64, exact from the stored values: ``e`` of a perturbation, the
    update of a step. Per element::

        |x_got - x_want| <= ulp(want) + REL * |x_want| + SLACK * eps_compute * extra

    where ``extra`` holds the magnitudes of the other terms of the computation (their float32
    rounding errors). For bfloat16/float16 at most ``FLIP_LIMIT`` of all elements may differ.

    Args:
        what: label for messages.
        got, want: the backend's and the reference's tensors (same dtype and shape, per index).
        base: inputs the change is measured from.
        extra: per-element magnitudes (float64) of terms whose rounding enters the result.
        fixed: bool tensors marking elements that must keep ``base``'s bits exactly.
    """
    assert len(got) == len(want), what
    flips = total = 0
    for i, (a, b) in enumerate(zip(got, want)):
        label = f"{what}[{i}] shape={tuple(b.shape)} {b.dtype}"
        assert a.dtype == b.dtype and a.shape == b.shape, label
        x_got, x_want = a.double(), b.double()
        if base is not None:
            x0 = base[i].double()  # (not in place: .double() of float64 is the tensor itself)
            x_got, x_want = x_got - x0, x_want - x0
        tol = ulp(b).add_(x_want.abs(), alpha=REL[b.dtype])
        if extra is not None:
            tol.add_(extra[i], alpha=SLACK * compute_eps(b.dtype))
        err = (x_got - x_want).abs_()
        bad = ~(err <= tol)  # NaN counts as bad
        if bool(bad.any()):
            k = int(bad.reshape(-1).nonzero()[0])
            ratio = (err / tol).reshape(-1)[k].item()
            worst = (err / tol).nan_to_num(float("inf")).max().item()
            raise AssertionError(
                f"{label}: {int(bad.sum())} of {b.numel()} elements beyond tolerance (worst "
                f"{worst:.3g}x); first at flat index {k}: got {x_got.reshape(-1)[k].item()!r}, "
                f"want {x_want.reshape(-1)[k].item()!r} ({ratio:.3g}x tolerance "
                f"{tol.reshape(-1)[k].item():.3g})"
            )
        if fixed is not None:
            keep = fixed[i]
            assert bits_equal(a[keep], base[i][keep]), f"{label}: a fixed element moved"
        flips += int((a != b).sum())
        total += b.numel()
    if want and want[0].dtype in LOW_PRECISION:
        assert flips <= FLIP_LIMIT * total, (
            f"{what}: {flips} of {total} elements round differently from the reference "
            f"(limit {FLIP_LIMIT:.1%}): a systematic error below one ulp"
        )


# ---------------------------------------------------------------------------------------------
# Inputs


def op_params(
    dtype: torch.dtype, device: str | torch.device = "cpu", shapes: tuple = SHAPES
) -> list[Tensor]:
    """make_params on ``device``: odd sizes and layouts, two tensors with small weights."""
    with torch.device(device):
        ps = make_params(dtype, shapes=shapes)
    for i in SMALL_WEIGHTS:
        ps[i].mul_(2.0**-6)
    return ps


def per_tensor(values: Sequence, n: int) -> list:
    """``values`` repeated over ``n`` tensors (several buckets of SAM hyperparameters)."""
    return [values[i % len(values)] for i in range(n)]


def mask_list(ps: Sequence[Tensor]) -> list[Tensor]:
    """Random bit-packed masks (about half the bits set) on the parameters' device."""
    with torch.device(ps[0].device):
        return masks_for(ps)


def grads_like(ps: Sequence[Tensor], scale: float = 1.0) -> list[Tensor]:
    """Random gradients in each parameter's layout, with one exact zero per tensor of 2+ elements
    (a zero gradient must leave its weight bit for bit)."""
    with torch.device(ps[0].device):
        gs = like(ps, scale=scale)
    for g in gs:
        if g.numel() > 1:
            g[tuple(int(i) for i in torch.unravel_index(torch.tensor(1), g.shape))] = 0.0
    return gs


# ---------------------------------------------------------------------------------------------
# The op checks (shared with the gpu tests of test_native.py and test_triton.py)


#: Relative tolerance of a float64 sum of squares against another order of summation. Every
#: backend widens each element to float64 before squaring (and ``T(w) g`` is formed there), so
#: the only difference from the reference is the order of the float64 additions: a sum of
#: positive terms in chains of at most k additions is off by at most about k * 2**-53
#: relative, ~1e-13 for the chunked sums of the backends. Dropping one element in a million
#: moves the total by ~1e-6, a million times this.
NORM_RTOL = 1e-12


def check_norm(backend: str, ps: Sequence[Tensor], gs: Sequence[Tensor], adaptive, eta) -> None:
    """The total of ``norm_sq``'s partials against the reference's at :data:`NORM_RTOL`."""
    want = F.norm_sq(gs, ps, adaptive, eta, backend="reference").double().sum()
    got = F.norm_sq(gs, ps, adaptive, eta, backend=backend)
    assert got.dim() == 1 and got.dtype == torch.float64 and got.device == gs[0].device
    torch.testing.assert_close(got.sum(), want, atol=0, rtol=NORM_RTOL)


def check_perturb(
    backend: str,
    ps: Sequence[Tensor],
    gs: Sequence[Tensor],
    *,
    rho: Sequence[float],
    eps: float | None,
    adaptive: Sequence[bool],
    eta: Sequence[float],
    masks: Sequence[Tensor] | RandomBits | None,
) -> None:
    """``perturb_`` of ``backend`` against the reference on the same inputs.

    Both get the reference's norm partials (the norm has its own check). ``eps=None`` sets the
    norm epsilon to the norm itself, which halves ``e``: a backend that drops it fails.
    """
    sumsq = F.norm_sq(gs, ps, adaptive, eta, backend="reference")
    if eps is None:
        eps = math.sqrt(sumsq.double().sum().item())
    runs = {}
    for name in ("reference", backend):
        w = [twin(p) for p in ps]
        # NaN-filled backups: a backend that does not write them all fails.
        b = [torch.full_like(p, float("nan")) for p in ps]
        F.perturb_(w, gs, b, sumsq, rho, eps, adaptive, eta, masks, backend=name)
        runs[name] = (w, b)
    got_w, got_b = runs[backend]
    want_w, _ = runs["reference"]
    for i, (b, p) in enumerate(zip(got_b, ps)):
        assert bits_equal(b, p), f"backup[{i}] is not an exact copy of the weights"
    fixed = []
    for i, (p, g) in enumerate(zip(ps, gs)):
        keep = g == 0
        if isinstance(masks, RandomBits):
            keep = keep | ~random_mask(masks, i, p)
        elif masks is not None:
            keep = keep | ~unpack_bits(masks[i], p)
        fixed.append(keep)
    check_stored(f"{backend} perturb e", got_w, want_w, base=ps, fixed=fixed)


SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    # Weight decay large enough to move many bfloat16 results (lr * wd * w: 0.6 ulp of w).
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.05, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05, maximize=False),
    dict(momentum=0.8, dampening=0.1, nesterov=False, weight_decay=0.0, maximize=True),
]
SGD_LR = 0.1

ADAM_CONFIGS = [
    dict(weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False),
    dict(weight_decay=0.1, amsgrad=False, maximize=False, decoupled_weight_decay=False),
    dict(weight_decay=0.1, amsgrad=True, maximize=False, decoupled_weight_decay=True),
    dict(weight_decay=0.0, amsgrad=True, maximize=True, decoupled_weight_decay=True),
]
ADAM = dict(lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8)

#: Gradient callback of the step checks: step index -> gradients (already loss-scaled).
GradsFn = Callable[[int], Sequence[Tensor]]


def _amp_args(amp: bool, step: int, device: torch.device):
    """``(grad_scale, found_inf)`` of a step: both ``None`` without AMP."""
    if not amp:
        return None, None
    found = torch.tensor(float(step == SKIP_AT), device=device)
    return torch.tensor(GRAD_SCALE, device=device), found


def _perturbed_inputs(ps: Sequence[Tensor]) -> list[Tensor]:
    """The weights a restore+step op finds: far from the backups, so a missed restore shows."""
    noise = grads_like(ps, 0.5)
    return [twin(p).add_(n) for p, n in zip(ps, noise)]


def check_sgd_steps(
    backend: str,
    ps: Sequence[Tensor],
    cfg: dict,
    amp: bool,
    grads: GradsFn | None = None,
    steps: int = STEPS,
) -> None:
    """``restore_sgd_step_`` of ``backend`` against the reference, step by step.

    Args:
        backend: the backend under test.
        ps: the weights before the first step (they are the backups of every step).
        cfg: SGD hyperparameters other than ``lr``.
        amp: gradients multiplied by ``GRAD_SCALE`` with ``grad_scale``/``found_inf`` given,
            ``found_inf = 1`` at step ``SKIP_AT``; otherwise both are ``None``.
        grads: gradients per step (default: random ones in each parameter's layout).
        steps: number of steps.
    """
    device = ps[0].device
    n = len(ps)
    scale = GRAD_SCALE if amp else 1.0
    # Garbage before the first step: the buffers' contents are ignored there.
    bufs = [torch.randn_like(p) for p in ps] if cfg["momentum"] else None
    for step in range(steps):
        gs = grads(step) if grads is not None else grads_like(ps, scale)
        grad_scale, found_inf = _amp_args(amp, step, device)
        w_in = _perturbed_inputs(ps)
        runs = {}
        for name in ("reference", backend):
            w = [twin(x) for x in w_in]
            v = [twin(x) for x in bufs] if bufs is not None else None
            F.restore_sgd_step_(
                w,
                gs,
                ps,
                v,
                SGDHyper(lr=SGD_LR, **cfg),
                first_step=[step == 0] * n,
                grad_scale=grad_scale,
                found_inf=found_inf,
                backend=name,
            )
            runs[name] = (w, v)
        (got_w, got_v), (want_w, want_v) = runs[backend], runs["reference"]
        label = f"{backend} sgd step {step} {cfg}"
        if amp and step == SKIP_AT:
            for who, w, v in (("got", got_w, got_v), ("want", want_w, want_v)):
                assert all(bits_equal(a, b) for a, b in zip(w, ps)), f"{label} {who}: restore"
                if bufs is not None:
                    assert all(bits_equal(a, b) for a, b in zip(v, bufs)), f"{label} {who}: state"
        else:
            mu, wd = cfg["momentum"], cfg["weight_decay"]
            d = [g.double().abs() / scale + wd * p.double().abs() for g, p in zip(gs, ps)]
            if bufs is not None:
                old = [mu * x.double().abs() * (step != 0) for x in bufs]
                extra = [o + di for o, di in zip(old, d)]
                check_stored(f"{label} momentum_buffer", got_v, want_v, extra=extra)
                d = [di + o + x.double().abs() for di, o, x in zip(d, old, want_v)]
            check_stored(f"{label} update", got_w, want_w, base=ps, extra=[SGD_LR * x for x in d])
        ps, bufs = want_w, want_v


def check_adam_steps(
    backend: str,
    ps: Sequence[Tensor],
    cfg: dict,
    amp: bool,
    grads: GradsFn | None = None,
    steps: int = STEPS,
    steps_on: str | torch.device | None = None,
) -> None:
    """``restore_adam_step_`` of ``backend`` against the reference, step by step.

    Arguments as in :func:`check_sgd_steps`; ``steps_on`` is the device of the step counters
    (default: the parameters').
    """
    device = ps[0].device
    scale = GRAD_SCALE if amp else 1.0
    lr, beta1, beta2 = ADAM["lr"], ADAM["beta1"], ADAM["beta2"]
    state = {
        "exp_avg": [torch.zeros_like(p) for p in ps],
        "exp_avg_sq": [torch.zeros_like(p) for p in ps],
        "max_exp_avg_sq": [torch.zeros_like(p) for p in ps] if cfg["amsgrad"] else None,
        "step": [torch.zeros((), device=steps_on or device) for _ in ps],
    }
    count = 0
    for step in range(steps):
        gs = grads(step) if grads is not None else grads_like(ps, scale)
        grad_scale, found_inf = _amp_args(amp, step, device)
        w_in = _perturbed_inputs(ps)
        runs = {}
        for name in ("reference", backend):
            w = [twin(x) for x in w_in]
            st = {k: None if v is None else [twin(x) for x in v] for k, v in state.items()}
            F.restore_adam_step_(
                w,
                gs,
                ps,
                st["exp_avg"],
                st["exp_avg_sq"],
                st["max_exp_avg_sq"],
                st["step"],
                AdamHyper(**ADAM, **cfg),
                grad_scale=grad_scale,
                found_inf=found_inf,
                backend=name,
            )
            runs[name] = (w, st)
        (got_w, got_st), (want_w, want_st) = runs[backend], runs["reference"]
        label = f"{backend} adam step {step} {cfg}"
        skipped = amp and step == SKIP_AT
        count += not skipped
        for who, w, st in (("got", got_w, got_st), ("want", want_w, want_st)):
            assert [s.item() for s in st["step"]] == [float(count)] * len(ps), f"{label} {who}"
            if skipped:
                assert all(bits_equal(a, b) for a, b in zip(w, ps)), f"{label} {who}: restore"
                for key, old in state.items():
                    for a, b in zip(st[key] or [], old or []):
                        assert bits_equal(a, b), f"{label} {who}: {key} changed when skipped"
        if not skipped:
            wd = cfg["weight_decay"]
            decoupled = cfg["decoupled_weight_decay"]
            g = [x.double().abs() / scale for x in gs]
            if not decoupled:
                g = [gi + wd * p.double().abs() for gi, p in zip(g, ps)]
            m_old = [x.double().abs() for x in state["exp_avg"]]
            v_old = [x.double().abs() for x in state["exp_avg_sq"]]
            m_mag = [beta1 * m + (1 - beta1) * gi for m, gi in zip(m_old, g)]
            v_mag = [beta2 * v + (1 - beta2) * gi * gi for v, gi in zip(v_old, g)]
            check_stored(f"{label} exp_avg", got_st["exp_avg"], want_st["exp_avg"], extra=m_mag)
            check_stored(
                f"{label} exp_avg_sq", got_st["exp_avg_sq"], want_st["exp_avg_sq"], extra=v_mag
            )
            if cfg["amsgrad"]:
                check_stored(
                    f"{label} max_exp_avg_sq",
                    got_st["max_exp_avg_sq"],
                    want_st["max_exp_avg_sq"],
                    extra=v_mag,
                )
            # Adam's step is lr times a ratio bounded by a few; the decoupled decay rounds w.
            extra = [
                torch.full_like(p, 4 * lr, dtype=torch.float64)
                + (p.double().abs() if decoupled and wd else 0.0)
                for p in ps
            ]
            check_stored(f"{label} update", got_w, want_w, base=ps, extra=extra)
        ps, state = want_w, want_st


# ---------------------------------------------------------------------------------------------
# Pointer-table hits, misses and evictions


def _same_bits(what: str, got: Sequence[Tensor], want: Sequence[Tensor]) -> None:
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert bits_equal(a, b), f"{what}[{i}] shape={tuple(b.shape)}: not the same bits"


def check_table_misses(backend: str, ps: Sequence[Tensor], flood: int = 80) -> None:
    """Every op's outputs while its pointer tables hit, miss and are evicted.

    The Triton and CUDA backends cache a device-side table of addresses per call signature
    (64 entries each). Over persistent tensors (weights, backups, momentum buffers, Adam state
    and the ``axpby_`` output stay where they are), four rounds of every op:

    0. the first call (misses: tables built);
    1. the same tensors, new values written in place (hits: cached tables, new data);
    2. new gradient tensors, allocated while the old ones are alive (so at new addresses), the
       other lists unchanged: a miss in one list only (``zero_grad(set_to_none=True)``);
    3. as 2 after ``flood`` calls on other tensors evicted every cached table (rebuilt).

    After each op its outputs must be the same bits as those of the same op of ``backend`` on
    fresh copies of its inputs (new tables; the op tests compare those with the reference),
    and the norm total must match the reference at :data:`NORM_RTOL`.
    """
    n = len(ps)
    device = ps[0].device
    ad, eta = [False] * n, [0.0] * n
    rho = per_tensor(RHO, n)
    w = [twin(p) for p in ps]
    b = [torch.empty_like(p) for p in ps]
    bufs = [torch.zeros_like(p) for p in ps]
    adam_w = [twin(p) for p in ps]
    m, v, mx = ([torch.zeros_like(p) for p in ps] for _ in range(3))
    steps = [torch.zeros((), device=device) for _ in ps]
    out = [torch.empty_like(p) for p in ps]
    masks = mask_list(ps)
    coefs = torch.tensor([0.75, -1.5], dtype=torch.float64, device=device)
    sgd = SGDHyper(lr=SGD_LR, **SGD_CONFIGS[2])
    adam = AdamHyper(**ADAM, **ADAM_CONFIGS[2])
    gs = grads_like(ps)
    keep: list[list[Tensor]] = []
    for rnd in range(4):
        if rnd == 1:
            for g, new in zip(gs, grads_like(ps)):
                g.copy_(new)
        elif rnd == 2:
            keep.append(gs)
            gs = grads_like(ps)
        elif rnd == 3:
            others = [grads_like(ps[:3]) for _ in range(flood)]  # all alive: distinct tables
            for o in others:
                F.norm_sq(o, o, [False] * 3, [0.0] * 3, backend=backend)
        label = f"{backend} round {rnd}"

        got = F.norm_sq(gs, w, ad, eta, backend=backend)
        fresh = F.norm_sq([twin(g) for g in gs], [twin(x) for x in w], ad, eta, backend=backend)
        assert bits_equal(got, fresh), f"{label} norm partials"
        want = F.norm_sq(gs, w, ad, eta, backend="reference").double().sum()
        torch.testing.assert_close(got.sum(), want, atol=0, rtol=NORM_RTOL)

        sumsq = F.norm_sq(gs, w, ad, eta, backend="reference")
        w_in = [x.clone() for x in w]
        fw, fb = [twin(x) for x in w], [twin(x) for x in b]
        F.perturb_(w, gs, b, sumsq, rho, 1e-12, ad, eta, masks, backend)
        F.perturb_(fw, [twin(g) for g in gs], fb, sumsq, rho, 1e-12, ad, eta, masks, backend)
        _same_bits(f"{label} perturb w", w, fw)
        _same_bits(f"{label} perturb backup", b, fb)
        _same_bits(f"{label} backup = w before", b, w_in)

        fw, fv = [twin(x) for x in w], [twin(x) for x in bufs]
        first = [rnd == 0] * n
        common = dict(first_step=first, grad_scale=None, found_inf=None, backend=backend)
        F.restore_sgd_step_(w, gs, b, bufs, sgd, **common)
        F.restore_sgd_step_(fw, [twin(g) for g in gs], [twin(x) for x in b], fv, sgd, **common)
        _same_bits(f"{label} sgd w", w, fw)
        _same_bits(f"{label} sgd momentum", bufs, fv)

        fa, fm, fv, fx, fs = [[twin(x) for x in lst] for lst in (adam_w, m, v, mx, steps)]
        amp = dict(grad_scale=None, found_inf=None, backend=backend)
        F.restore_adam_step_(adam_w, gs, b, m, v, mx, steps, adam, **amp)
        fg = [twin(g) for g in gs]
        F.restore_adam_step_(fa, fg, b, fm, fv, fx, fs, adam, **amp)
        _same_bits(f"{label} adam w", adam_w, fa)
        _same_bits(f"{label} adam exp_avg", m, fm)
        _same_bits(f"{label} adam exp_avg_sq", v, fv)
        _same_bits(f"{label} adam max_exp_avg_sq", mx, fx)
        assert [float(t) for t in steps] == [rnd + 1.0] * n == [float(t) for t in fs], label

        got = F.dot(gs, w, backend)
        assert bits_equal(got, F.dot([twin(x) for x in gs], [twin(x) for x in w], backend)), label
        want = F.dot(gs, w, "reference").double().sum()
        mag = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(gs, w))
        assert abs(float(got.sum()) - float(want)) <= 64 * torch.finfo(torch.float64).eps * mag

        fo = [twin(x) for x in out]
        F.axpby_(out, gs, w, coefs, None, backend)
        F.axpby_(fo, [twin(g) for g in gs], [twin(x) for x in w], coefs, None, backend)
        _same_bits(f"{label} axpby out", out, fo)
        coefs.mul_(-0.5)  # new values in the same tensor: read at the next launch


# ---------------------------------------------------------------------------------------------
# Every op, every CPU backend, every dtype

RHO = (0.05, -0.5, 2.0)  # several buckets; a negative rho (maximize) ascends the other way
ETA = (0.01, 0.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_sq_total(backend: str, dtype: torch.dtype, adaptive: bool) -> None:
    """The total of the partials, SAM and ASAM (two eta buckets), small weights included."""
    require_backend(backend)
    ps = op_params(dtype)
    n = len(ps)
    check_norm(backend, ps, grads_like(ps), [adaptive] * n, per_tensor(ETA, n))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("mask", ["none", "bits", "random"])
def test_perturb_e(backend: str, dtype: torch.dtype, adaptive: bool, mask: str) -> None:
    """e = w_new - w_old and the backups, with a tiny norm epsilon and one as large as the norm;
    unmasked, with bit-packed masks and with a random mask drawn in the kernels."""
    require_backend(backend)
    ps = op_params(dtype)
    gs = grads_like(ps)
    n = len(ps)
    masks: list[Tensor] | RandomBits | None = None
    if mask == "bits":
        masks = mask_list(ps)
    elif mask == "random":
        draw = RandomMask(keep=0.3, seed=11)
        draw.draws = 5
        masks = draw.bits([tensor_salt(i) for i in range(n)])
    for eps in (1e-12, None):
        check_perturb(
            backend,
            ps,
            gs,
            rho=per_tensor(RHO, n),
            eps=eps,
            adaptive=[adaptive] * n,
            eta=per_tensor(ETA, n),
            masks=masks,
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", SGD_CONFIGS)
@pytest.mark.parametrize("amp", [False, True], ids=["no-scale", "scale8"])
def test_sgd_step_update_and_state(backend: str, dtype: torch.dtype, cfg: dict, amp: bool) -> None:
    """Update and momentum buffers of restore + SGD, step by step, with and without AMP."""
    require_backend(backend)
    check_sgd_steps(backend, op_params(dtype), cfg, amp)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", ADAM_CONFIGS)
@pytest.mark.parametrize("amp", [False, True], ids=["no-scale", "scale8"])
def test_adam_step_update_and_state(backend: str, dtype: torch.dtype, cfg: dict, amp: bool) -> None:
    """Update, moments and step counters of restore + Adam/AdamW, step by step, with and
    without AMP."""
    require_backend(backend)
    check_adam_steps(backend, op_params(dtype), cfg, amp)


#: What skips a restore+step op: nothing, the scaler's flag, or a non-finite norm of the first
#: or the second pass (``sumsqs``; the other entry finite). name -> (found_inf, sumsqs totals).
SKIP_INPUTS = {
    "none": (0.0, [4.0, 9.0]),
    "no-inputs": (None, []),
    "found-inf": (1.0, [4.0, 9.0]),
    "pass1-inf": (0.0, [math.inf, 9.0]),
    "pass2-nan": (None, [4.0, math.nan]),
    "one-partial-inf": (None, [4.0, -math.inf]),
}


def _sumsqs(totals: list[float], device: torch.device) -> list[Tensor]:
    """Norm partials with the given totals, as norm_sq_partials hands them on (float64, 1-D;
    three partials per pass, the non-finite value in one of them)."""
    return [torch.tensor([t, 1.0, -1.0], dtype=torch.float64, device=device) for t in totals]


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("op", ["sgd", "adam"])
@pytest.mark.parametrize("case", list(SKIP_INPUTS))
def test_restore_step_decides_the_skip_and_returns_it(backend: str, op: str, case: str) -> None:
    """The restore+step ops skip on ``found_inf`` or a non-finite total of any ``sumsqs``
    entry, and return that decision as a 0-dim bool tensor on the parameters' device: weights
    restored, state and step counters untouched when skipped; the reference's update when not."""
    require_backend(backend)
    found, totals = SKIP_INPUTS[case]
    skip = case not in ("none", "no-inputs")
    ps = op_params(torch.float32)
    device = ps[0].device
    gs = grads_like(ps, 1.0)
    w_in = _perturbed_inputs(ps)
    state_in = grads_like(ps, 0.5)
    runs = {}
    for name in ("reference", backend):
        w = [twin(x) for x in w_in]
        state = [twin(x) for x in state_in]
        counters = [torch.full((), 3.0, device=device) for _ in ps]
        before = [twin(x) for x in state] + [twin(x) for x in counters]
        flags = dict(
            grad_scale=None,
            found_inf=None if found is None else torch.tensor(found, device=device),
            sumsqs=_sumsqs(totals, device),
            backend=name,
        )
        if op == "sgd":
            hyper = SGDHyper(lr=SGD_LR, weight_decay=0.0, momentum=0.9, dampening=0.0,
                             nesterov=False, maximize=False)  # fmt: skip
            out = F.restore_sgd_step_(
                w, gs, ps, state, hyper, first_step=[False] * len(ps), **flags
            )
            after = state
        else:
            sq = [x.abs() for x in state]
            before = [twin(x) for x in state] + [twin(x) for x in sq] + before[len(ps) :]
            out = F.restore_adam_step_(
                w, gs, ps, state, sq, None, counters, AdamHyper(**ADAM, **ADAM_CONFIGS[0]), **flags
            )
            after = state + sq + counters
        assert out.dtype == torch.bool and out.dim() == 0 and out.device == device, (name, out)
        assert bool(out) == skip, (name, case)
        if skip:
            assert all(bits_equal(a, b) for a, b in zip(w, ps)), f"{name}: not restored"
            assert all(bits_equal(a, b) for a, b in zip(after, before)), f"{name}: state moved"
        else:
            assert not all(bits_equal(a, b) for a, b in zip(w, ps)), f"{name}: no update"
        runs[name] = (w, after)
    for got, want in zip(
        runs[backend][0] + runs[backend][1], runs["reference"][0] + runs["reference"][1]
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def misaligned(ts: Sequence[Tensor], offsets: Sequence[int] = (1, 0, 3)) -> list[Tensor]:
    """Copies of ``ts`` whose contiguous ones start ``offsets[i % len(offsets)]`` elements into
    their storage: an odd offset puts the address off the 16-byte grid for every dtype (2, 4 or
    8 bytes per element), 0 keeps it aligned, so one launch mixes both. Other layouts are
    copied as they are."""
    out = []
    for i, t in enumerate(ts):
        k = offsets[i % len(offsets)]
        if not t.is_contiguous() or k == 0 or t.numel() == 0:
            out.append(twin(t))
            continue
        base = torch.empty(t.numel() + k, dtype=t.dtype, device=t.device)
        view = base[k:].view(t.shape).copy_(t)
        assert view.data_ptr() % 16 != 0
        out.append(view)
    return out


def check_misaligned(backend: str, ps: Sequence[Tensor]) -> None:
    """Every op with weights and gradients at addresses off the 16-byte grid (and off by
    different amounts from each other), mixed with aligned tensors in the same call, against
    the reference: the kernels must take their scalar path for those (or per tensor) and give
    the same results."""
    n = len(ps)
    ws = misaligned(ps)
    gs = misaligned(grads_like(ps), offsets=(3, 1, 0, 5))
    eta = per_tensor(ETA, n)
    for adaptive in (False, True):
        check_norm(backend, ws, gs, [adaptive] * n, eta)
    rho = per_tensor(RHO, n)
    check_perturb(
        backend, ws, gs, rho=rho, eps=None, adaptive=[True] * n, eta=eta, masks=mask_list(ws)
    )

    def grads(step: int, scale: float = 1.0) -> list[Tensor]:
        return misaligned(grads_like(ws, scale), offsets=(2 * step + 1, 0, 2 * step + 3))

    check_sgd_steps(backend, ws, SGD_CONFIGS[2], amp=False, grads=grads)
    check_adam_steps(backend, ws, ADAM_CONFIGS[2], amp=True, grads=lambda s: grads(s, GRAD_SCALE))
    out = misaligned([torch.empty_like(p) for p in ps], offsets=(7, 1))
    coefs = torch.tensor([0.5, -2.0], dtype=torch.float64, device=ps[0].device)
    want = [torch.empty_like(p) for p in ps]
    F.axpby_(want, ws, gs, coefs, None, "reference")
    F.axpby_(out, ws, gs, coefs, None, backend)
    from test_variant_ops import check_axpby

    check_axpby(out, want, ws, gs, 0.5, -2.0)
    got = float(F.dot(ws, gs, backend).sum())
    want_dot = float(F.dot(ws, gs, "reference").sum())
    mag = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(ws, gs))
    assert abs(got - want_dot) <= 64 * torch.finfo(torch.float64).eps * mag


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_tensors(backend: str, dtype: torch.dtype) -> None:
    """Every op on tensors off the 16-byte grid beside aligned ones (the gpu tests run the same
    helper for the CUDA and Triton kernels, whose vector paths need 16-byte addresses)."""
    require_backend(backend)
    check_misaligned(backend, op_params(dtype))


#: Elements of the > 2^31 tests: past the int32 range, with an odd tail.
HUGE = 2**31 + 37


def windows(numel: int, edge: int) -> tuple[tuple[int, int], ...]:
    """The head, the elements around index ``edge`` and the tail of ``numel`` elements."""
    return ((0, 5), (edge - 3, edge + 2), (numel - 5, numel))


def check_far_elements(
    backend: str,
    op: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    numel: int = HUGE,
    edge: int = 2**31,
) -> None:
    """``op`` (``"perturb"``: norm then perturbation; ``"sgd"``; ``"adam"``) on one tensor of
    ``numel`` elements per list; with the defaults 64-bit offsets (bfloat16: 4.3 GB per list,
    13-22 GB in all).

    Only the :func:`windows` (head, around ``edge`` where a 32-bit offset wraps, tail) carry
    values; the bulk is zero, and every op maps zeros to zeros. The ops must give in each
    window the same bits as the same op of ``backend`` on the windows alone (three small
    tensors, whose norm is the big tensor's), and leave the bulk zero: a 32-bit offset reads
    the wrong elements, writes into the bulk or faults.
    """
    device = torch.device(device)
    spans = windows(numel, edge)
    lists = {"perturb": 3, "sgd": 4, "adam": 5}[op]
    big = [torch.zeros(numel, dtype=dtype, device=device) for _ in range(lists)]
    small = [[torch.empty(b - a, dtype=dtype, device=device) for a, b in spans] for _ in big]
    for whole, parts in zip(big, small):
        for (a, b), part in zip(spans, parts):
            part.copy_(torch.randn(b - a, dtype=torch.float64).to(dtype))
            whole[a:b].copy_(part)

    def run(ts: list[list[Tensor]]) -> None:
        k = len(ts[0])
        if op == "perturb":
            w, g, b = ts
            sumsq = F.norm_sq(g, w, [False] * k, [0.0] * k, backend=backend)
            exact = sum(x.double().square().sum() for x in small[1])
            torch.testing.assert_close(sumsq.sum(), exact, atol=0, rtol=NORM_RTOL)
            F.perturb_(w, g, b, sumsq, [0.05] * k, 1e-12, [False] * k, [0.0] * k, None, backend)
        elif op == "sgd":
            w, g, b, buf = ts
            F.restore_sgd_step_(
                w, g, b, buf, SGDHyper(lr=0.1, **SGD_CONFIGS[2]), first_step=[False] * k,
                grad_scale=None, found_inf=None, backend=backend,
            )  # fmt: skip
        else:
            w, g, b, mom, var = ts
            steps = [torch.full((), 3.0, device=device) for _ in range(k)]
            F.restore_adam_step_(
                w, g, b, mom, var, None, steps, AdamHyper(**ADAM, **ADAM_CONFIGS[1]),
                grad_scale=None, found_inf=None, backend=backend,
            )  # fmt: skip
            assert all(float(s) == 4.0 for s in steps)

    run([[t] for t in big])
    run(small)
    for j, (whole, parts) in enumerate(zip(big, small)):
        for (a, b), part in zip(spans, parts):
            assert bits_equal(whole[a:b], part), f"{backend} {op}: list {j}, elements [{a}, {b})"
        inside = sum(int(part.count_nonzero()) for part in parts)
        assert int(whole.count_nonzero()) == inside, f"{backend} {op}: list {j} written outside"
    del big
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next test of the group (on this worker) needs the memory


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["perturb", "sgd", "adam"])
def test_far_elements_check(backend: str, op: str) -> None:
    """The > 2^31-element gpu tests' check, on the CPU at a size it can hold: three chunks of
    16384 and a tail, windows around a chunk boundary."""
    require_backend(backend)
    check_far_elements(backend, op, device="cpu", numel=3 * 16384 + 37, edge=2 * 16384)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outputs_across_table_hits_misses_and_evictions(backend: str) -> None:
    """Every op's outputs over persistent tensors: first call, cache hits with new values, new
    gradient tensors, and after an eviction of every cached table (the Triton tables are
    cached on CPU tensors too; the gpu tests run it for the CUDA and Triton kernels)."""
    require_backend(backend)
    check_table_misses(backend, op_params(torch.float32))


# ---------------------------------------------------------------------------------------------
# The checks themselves: each must fail on a wrong result
#
# A backend "mutant" runs the reference with one argument or one output changed, as a buggy
# kernel would; every check above must reject it. This keeps the tolerances honest: loosened
# until an error of this size passes, these tests fail.


def _mutant(
    op: str,
    args: dict | None = None,
    kwargs: dict | None = None,
    post=None,
    hyper: dict | None = None,
):
    """The reference op ``op`` with positional ``args`` / keyword ``kwargs`` / fields of its
    hyperparameter record ``hyper`` replaced (each a function of the call's argument list and
    the value) and ``post(args, kwargs)`` after it."""
    from fused_sam import reference

    real = getattr(reference, op)

    def wrapped(*call_args, **call_kwargs):
        call_args = list(call_args)
        for i, change in (args or {}).items():
            call_args[i] = change(call_args, call_args[i])
        for key, change in (hyper or {}).items():
            i = next(i for i, a in enumerate(call_args) if isinstance(a, (SGDHyper, AdamHyper)))
            record = call_args[i]
            call_args[i] = record._replace(**{key: change(call_args, getattr(record, key))})
        for key, change in (kwargs or {}).items():
            call_kwargs[key] = change(call_args, call_kwargs[key])
        out = real(*call_args, **call_kwargs)
        if post is not None and not (
            call_kwargs.get("found_inf") is not None and call_kwargs["found_inf"].item()
        ):
            post(call_args)
        return out

    return wrapped


def _scaled(index: int, factor: float):
    """``post`` that multiplies the state list at argument ``index`` by ``factor`` (1% off)."""

    def post(call_args):
        for t in call_args[index] or []:
            t.copy_((t.double() * factor).to(t.dtype))

    return post


MUTANTS = {
    "norm: 1% large": ("norm_sq_partials", dict(args={0: lambda a, gs: [g * 1.005 for g in gs]})),
    "norm: T(w) dropped": ("norm_sq_partials", dict(args={2: lambda a, ad: False})),
    "perturb: e halved": ("perturb_", dict(args={4: lambda a, rho: rho / 2})),
    "perturb: e 1% large": ("perturb_", dict(args={4: lambda a, rho: rho * 1.01})),
    "perturb: sign flipped": ("perturb_", dict(args={4: lambda a, rho: -rho})),
    "perturb: T(w) dropped": ("perturb_", dict(args={6: lambda a, ad: False})),
    "perturb: mask ignored": ("perturb_", dict(args={8: lambda a, m: None})),
    "perturb: norm_eps dropped": ("perturb_", dict(args={5: lambda a, eps: 1e-12})),
    "sgd: update 1% large": ("restore_sgd_step_", dict(hyper={"lr": lambda a, v: v * 1.01})),
    "sgd: weight decay dropped": (
        "restore_sgd_step_",
        dict(hyper={"weight_decay": lambda a, v: 0}),
    ),
    "sgd: grad_scale ignored": (
        "restore_sgd_step_",
        dict(kwargs={"grad_scale": lambda a, v: None}),
    ),
    "sgd: found_inf ignored": ("restore_sgd_step_", dict(kwargs={"found_inf": lambda a, v: None})),
    "sgd: no restore": ("restore_sgd_step_", dict(args={2: lambda a, b: a[0]})),
    "sgd: momentum buffer 1% large": ("restore_sgd_step_", dict(post=_scaled(3, 1.01))),
    "adam: update 1% large": ("restore_adam_step_", dict(hyper={"lr": lambda a, v: v * 1.01})),
    "adam: weight decay dropped": (
        "restore_adam_step_",
        dict(hyper={"weight_decay": lambda a, v: 0}),
    ),
    "adam: grad_scale ignored": (
        "restore_adam_step_",
        dict(kwargs={"grad_scale": lambda a, v: None}),
    ),
    "adam: exp_avg 1% large": ("restore_adam_step_", dict(post=_scaled(3, 1.01))),
    "adam: exp_avg_sq 1% large": ("restore_adam_step_", dict(post=_scaled(4, 1.01))),
    "adam: max_exp_avg_sq 1% large": ("restore_adam_step_", dict(post=_scaled(5, 1.01))),
    "adam: step not counted": (
        "restore_adam_step_",
        dict(post=lambda a: [s.sub_(1) for s in a[6]]),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_checks_reject_wrong_results(
    mutant: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference with one change, registered as backend "mutant", fails the op's check."""
    import types

    from fused_sam import reference

    op, change = MUTANTS[mutant]
    module = types.SimpleNamespace(**{k: getattr(reference, k) for k in reference.__all__})
    module.FLAT = False
    module.unavailable_reason = reference.unavailable_reason
    setattr(module, op, _mutant(op, **change))
    monkeypatch.setitem(F.BACKENDS, "mutant", "not imported: registered below")
    monkeypatch.setitem(F._MODULES, "mutant", module)
    ps = op_params(dtype)
    n = len(ps)
    with pytest.raises(AssertionError):
        if op == "norm_sq_partials":
            check_norm("mutant", ps, grads_like(ps), [True] * n, per_tensor(ETA, n))
        elif op == "perturb_":
            check_perturb(
                "mutant",
                ps,
                grads_like(ps),
                rho=per_tensor(RHO, n),
                eps=None,
                adaptive=[True] * n,
                eta=per_tensor(ETA, n),
                masks=mask_list(ps),
            )
        elif op == "restore_sgd_step_":
            check_sgd_steps("mutant", ps, SGD_CONFIGS[2], amp=True)
        else:
            check_adam_steps("mutant", ps, ADAM_CONFIGS[2], amp=True)


#: The sizes of the gpu norm tests: a million-element tensor beside small ones.
BIG_SHAPES = ((1,), (3,), (4097,), (65537,), (), (33, 7), (1_000_003,))


def _drop_small(gs: list[Tensor]) -> list[Tensor]:
    return [g * 0 if g.numel() <= 3 else g for g in gs]  # the (1,), (3,) and () tensors


def _drop_tail(gs: list[Tensor]) -> list[Tensor]:
    big = max(range(len(gs)), key=lambda i: gs[i].numel())
    cut = gs[big].clone()
    cut.reshape(-1)[-3:] = 0
    return [cut if i == big else g for i, g in enumerate(gs)]


@pytest.mark.parametrize("drop", [_drop_small, _drop_tail], ids=["3-small-tensors", "3-tail"])
def test_check_norm_catches_a_dropped_small_tensor_or_tail(
    drop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A norm that leaves out three small tensors, or the last 3 elements of a million-element
    one (a kernel's missed tail), is off by a few parts in a million: inside a float32-style
    rtol of 1e-5, far outside :data:`NORM_RTOL`. Every backend sums in float64, so the check
    must reject it."""
    import types

    from fused_sam import reference

    def norm_sq_partials(grads, params, adaptive, eta):
        return reference.norm_sq_partials(drop(list(grads)), params, adaptive, eta)

    module = types.SimpleNamespace(**{k: getattr(reference, k) for k in reference.__all__})
    module.FLAT = False
    module.unavailable_reason = reference.unavailable_reason
    module.norm_sq_partials = norm_sq_partials
    monkeypatch.setitem(F.BACKENDS, "mutant", "not imported: registered below")
    monkeypatch.setitem(F._MODULES, "mutant", module)
    ps = op_params(torch.float32, "cpu", BIG_SHAPES)
    gs = grads_like(ps)
    n = len(ps)
    ad, eta = [False] * n, [0.0] * n
    want = float(F.norm_sq(gs, ps, ad, eta, backend="reference").sum())
    got = float(F.norm_sq(gs, ps, ad, eta, backend="mutant").sum())
    assert 0 < 1 - got / want < 1e-5  # what the old tolerance let through
    check_norm("reference", ps, gs, ad, eta)
    with pytest.raises(AssertionError):
        check_norm("mutant", ps, gs, ad, eta)


# ---------------------------------------------------------------------------------------------
# The CPU kernel builds (portable and AVX2)

BUILDS = ["DEFAULT", "AVX2"]
# Sizes around the CPU chunk (16384) and vector steps (4, 8, 16 elements), and primes.
ODD_SIZES = [1, 2, 3, 7, 15, 17, 31, 33, 127, 1000, 4097, 16383, 16384, 16385, 40961, 65537]


def use_build(name: str) -> None:
    """Switch the CPU ops to build ``name`` (skip only where this CPU cannot run it)."""
    require_backend("cpu")
    if name not in native._C.cpu_kernel_builds():
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        if x86 and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
            pytest.fail(f"this x86-64 CPU has AVX2 but the extension has no {name} build")
        pytest.skip(f"the {name} kernels need an x86-64 CPU with AVX2, FMA and F16C")
    native._C.use_cpu_kernels(name)


def odd_size_params(dtype: torch.dtype) -> list[Tensor]:
    """Flat tensors across the CPU chunk and vector boundaries; every other one with small
    weights (scaled by 2**-6), so that e and the updates dominate there."""
    ps = [torch.randn(n, dtype=torch.float64).to(dtype) for n in ODD_SIZES]
    for p in ps[::2]:
        p.mul_(2.0**-6)
    return ps


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_build_op_outputs(build: str, dtype: torch.dtype, restore_kernels) -> None:
    """Norm, perturbation (ASAM, masks), SGD and Adam steps of each build against the reference,
    on sixteen sizes in one call (chunk and vector tails)."""
    use_build(build)
    ps = odd_size_params(dtype)
    n = len(ps)
    gs = grads_like(ps)
    eta = per_tensor(ETA, n)
    check_norm("cpu", ps, gs, [True] * n, eta)
    check_perturb(
        "cpu",
        ps,
        gs,
        rho=per_tensor(RHO, n),
        eps=None,
        adaptive=[True] * n,
        eta=eta,
        masks=mask_list(ps),
    )
    # The configurations that write every state tensor; the others run on the automatic build
    # in the tests above, and every build gives the same bits (test below).
    check_sgd_steps("cpu", ps, SGD_CONFIGS[2], amp=True)
    check_adam_steps("cpu", ps, ADAM_CONFIGS[2], amp=True)


def _build_outputs(dtype: torch.dtype) -> list[Tensor]:
    """Every output of every native op on the same inputs (seeded), flags varied."""
    torch.manual_seed(8)
    ps = odd_size_params(dtype)
    gs = grads_like(ps)
    masks = mask_list(ps)
    scale, found = torch.tensor(GRAD_SCALE), torch.tensor(0.0)
    out = [native.norm_sq_partials(gs, ps, False, 0.0), native.norm_sq_partials(gs, ps, True, 0.5)]
    w, b = [p.clone() for p in ps], [torch.empty_like(p) for p in ps]
    native.perturb_(w, gs, b, out[1], 0.5, 1e-12, True, 0.5, masks)
    out += w + b
    w2 = [p.clone() for p in ps]
    native.perturb_(w2, gs, b, out[0], -0.05, 1e-12, False, 0.0, None)
    out += w2
    for first, nesterov in ((True, False), (False, True)):
        v = [torch.randn_like(p) for p in ps]
        w = [p.clone() for p in ps]
        native.restore_sgd_step_(
            w,
            gs,
            b,
            v,
            SGDHyper(SGD_LR, 0.05, 0.9, 0.1, nesterov=nesterov, maximize=not first),
            first_step=first,
            grad_scale=scale,
            found_inf=found,
        )
        out += w + v
    for cfg in ADAM_CONFIGS[1:]:
        m, v, vmax = ([torch.rand_like(p) for p in ps] for _ in range(3))
        steps = [torch.full((), 3.0) for _ in ps]
        w = [p.clone() for p in ps]
        native.restore_adam_step_(
            w,
            gs,
            b,
            m,
            v,
            vmax if cfg["amsgrad"] else [],
            steps,
            AdamHyper(**ADAM, **cfg),
            grad_scale=scale,
            found_inf=found,
        )
        out += w + m + v + vmax + steps
    out.append(native.dot_partials(gs, ps))
    ax = [torch.empty_like(p) for p in ps]
    native.axpby_(ax, ps, gs, torch.tensor([0.9, -1.0 / 3.0], dtype=torch.float64), None)
    out += ax
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_builds_are_bitwise_identical(dtype: torch.dtype, restore_kernels) -> None:
    """Every build evaluates the same expressions in the same order: the same bits from each
    op (norm partials, perturbation with ASAM and masks, SGD and Adam steps, dot partials and
    a x + b y)."""
    require_backend("cpu")
    builds = native._C.cpu_kernel_builds()
    if len(builds) < 2:
        use_build("AVX2")  # fails on an AVX2 CPU without that build, skips elsewhere
    runs = {}
    for build in builds:
        native._C.use_cpu_kernels(build)
        runs[build] = _build_outputs(dtype)
    first, *others = runs.values()
    for build, other in zip(builds[1:], others):
        for i, (a, b) in enumerate(zip(first, other)):
            assert bits_equal(a, b), f"output {i} of {builds[0]} and {build} differ"


def test_aten_cpu_capability_default_picks_the_portable_build() -> None:
    """``ATEN_CPU_CAPABILITY=default`` (torch's switch off its own vector kernels) makes a fresh
    process run the DEFAULT build, and the environment report says so."""
    require_backend("cpu")
    code = (
        "from fused_sam.backends import native; from fused_sam.cli.info import collect_info; "
        "print(native._C.cpu_kernels()); print(collect_info()['native'])"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    in_use, report = out.stdout.splitlines()[-2:]
    assert in_use == "DEFAULT"
    assert "CPU kernels DEFAULT" in report


# ---------------------------------------------------------------------------------------------
# Options through FusedSAM, on every backend, against backend="reference"


def _real(t: Tensor) -> Tensor:
    """A complex tensor as its real view (real tensors unchanged)."""
    return torch.view_as_real(t) if t.is_complex() else t


@torch.no_grad()
def set_grads(params: Sequence[Tensor], step: int, k: int, bad: bool = False) -> None:
    """The gradient of a smooth loss at the current weights (pass ``k`` of ``step``), so that the
    second pass sees the perturbation; complex tensors through their real view. ``bad`` puts an
    inf into parameter 2."""
    for i, p in enumerate(params):
        r = _real(p.detach())
        c = 0.5 + 0.1 * ((i + step) % 5)
        g = 2 * c * r + torch.cos(r + 0.3 * step + 0.1 * k)
        p.grad = torch.view_as_complex(g) if p.is_complex() else g
    if bad:
        _real(params[2].grad).view(-1)[5] = float("inf")


def on_device(params: Sequence[Tensor], device: str | torch.device) -> list[nn.Parameter]:
    """Same-valued parameters on ``device``, with the same strides (views stay non-dense)."""
    out = []
    for p in params:
        t = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device=device)
        out.append(nn.Parameter(t.copy_(p.detach())))
    return out


def _close(a: Tensor, b: Tensor, what: str, equal_nan: bool = False) -> None:
    """``a`` close to ``b`` at ``b``'s dtype tolerance (complex through the real view)."""
    a, b = _real(a.detach()).to(b.device), _real(b.detach())
    atol, rtol = TOL[b.dtype]
    torch.testing.assert_close(
        a, b, atol=atol, rtol=rtol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}"
    )


def _state(opt: torch.optim.Optimizer, params) -> list[tuple[str, Tensor]]:
    """``(key, tensor)`` of every tensor in the optimizer state, parameter by parameter."""
    return [
        (key, v)
        for p in params
        for key, v in sorted(opt.state[p].items())
        if isinstance(v, torch.Tensor)
    ]


def compare_fused_sam(
    backend: str,
    make: Callable[[list[nn.Parameter], str], FusedSAM],
    params: Sequence[Tensor],
    steps: int = 3,
    nonfinite_at: int | None = None,
) -> None:
    """FusedSAM with ``backend`` and with ``"reference"`` on copies of ``params``, step by step.

    After each ``first_step`` the perturbation ``e`` of every parameter (each run from its own
    weights, which agree to rounding) must agree to 1e-4 of ``e`` plus a few ulps of the weights;
    after each ``second_step`` the weights and the optimizer state at the dtype's tolerance.
    ``nonfinite_at``: the step whose second-pass gradient holds an inf.
    """
    runs = {}
    for name in (backend, "reference"):
        ps = on_device(params, params[0].device)
        runs[name] = (ps, make(ps, name))
    (got_ps, got), (want_ps, want) = runs[backend], runs["reference"]
    for step in range(steps):
        before = [[_real(p.detach()).double() for p in ps] for ps in (got_ps, want_ps)]
        for ps in (got_ps, want_ps):
            set_grads(ps, step, 0)
        got.first_step(zero_grad=True)
        want.first_step(zero_grad=True)
        for i, (a, b) in enumerate(zip(got_ps, want_ps)):
            e_got = _real(a.detach()).double() - before[0][i]
            e_want = _real(b.detach()).double() - before[1][i]
            tol = 4 * ulp(_real(b.detach())) + 1e-4 * e_want.abs()
            assert bool(((e_got - e_want).abs() <= tol).all()), (
                f"step {step} e[{i}]: max |diff| {(e_got - e_want).abs().max().item():.3g}, "
                f"max |e| {e_want.abs().max().item():.3g}"
            )
        bad = step == nonfinite_at
        for ps in (got_ps, want_ps):
            set_grads(ps, step, 1, bad=bad)
        got.second_step(zero_grad=True)
        want.second_step(zero_grad=True)
        assert bool(got.last_step_skipped) == bool(want.last_step_skipped)
        for i, (a, b) in enumerate(zip(got_ps, want_ps)):
            _close(a, b, f"step {step} param[{i}]", equal_nan=bad)
        got_state, want_state = _state(got, got_ps), _state(want, want_ps)
        assert [k for k, _ in got_state] == [k for k, _ in want_state]
        for (key, a), (_, b) in zip(got_state, want_state):
            _close(a, b, f"step {step} state {key}", equal_nan=bad)


def complex_params() -> list[nn.Parameter]:
    """Complex parameters (odd sizes, 0-dim, non-dense) and real ones in the same group."""
    shapes = [(1,), (3,), (257,), (), (9, 7)]
    ps = [torch.randn(s, dtype=torch.complex64) for s in shapes]
    ps.append(torch.randn(8, 10, dtype=torch.complex64)[:, ::2])
    ps += [torch.randn(33), torch.randn(4, 5)]
    return [nn.Parameter(p) for p in ps]


SGD_KW = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3)
ADAM_KW = dict(lr=1e-2, weight_decay=1e-2)

#: name -> (parameters, base optimizer class and its arguments, FusedSAM options, bad step)
OPTION_CASES = {
    # The gradient norm of odd_params() is about 50: this eps halves e.
    "norm_eps": (odd_params, torch.optim.SGD, SGD_KW, dict(rho=0.5, norm_eps=50.0), None),
    "adaptive_weights": (
        odd_params,
        torch.optim.SGD,
        SGD_KW,
        dict(rho=0.5, adaptive="weights", eta=0.01),
        None,
    ),
    "no_skip_nonfinite_sgd": (
        odd_params,
        torch.optim.SGD,
        SGD_KW,
        dict(rho=0.05, skip_nonfinite=False),
        2,
    ),
    "no_skip_nonfinite_adamw": (
        odd_params,
        torch.optim.AdamW,
        ADAM_KW,
        dict(rho=0.05, skip_nonfinite=False),
        2,
    ),
    "complex_sgd": (complex_params, torch.optim.SGD, SGD_KW, dict(rho=0.5), None),
    "complex_adam": (
        complex_params,
        torch.optim.Adam,
        dict(ADAM_KW, amsgrad=True),
        dict(rho=0.5, adaptive=True, eta=0.01),
        None,
    ),
    "complex_adamw": (complex_params, torch.optim.AdamW, ADAM_KW, dict(rho=0.5), None),
    "random_mask": (
        odd_params,
        torch.optim.SGD,
        SGD_KW,
        dict(rho=0.5, mask=RandomMask(keep=0.4, seed=5)),
        None,
    ),
    "random_mask_complex": (
        complex_params,
        torch.optim.AdamW,
        ADAM_KW,
        dict(rho=0.5, mask=RandomMask(keep=0.6, seed=2**40 + 1)),
        None,
    ),
}


# inf / inf in Adam's step of a non-finite gradient is NaN on purpose (numpy, which the Triton
# interpreter runs on, warns about it).
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_fused_sam_option_matches_reference(backend: str, case: str) -> None:
    """Each option of OPTION_CASES: perturbation, weights and state against the reference."""
    require_backend(backend)
    make_params_, base, base_kw, sam_kw, bad_at = OPTION_CASES[case]

    def make(ps, name):
        # A copy of the options per optimizer: a RandomMask counts its own draws.
        return FusedSAM(ps, base, backend=name, **copy.deepcopy(sam_kw), **base_kw)

    compare_fused_sam(backend, make, make_params_(), nonfinite_at=bad_at)
    if bad_at is not None:
        # Run again to the bad step only: the step with the inf was taken, not skipped.
        ps = on_device(make_params_(), "cpu")
        opt = make(ps, backend)
        for step in range(bad_at + 1):
            set_grads(ps, step, 0)
            opt.first_step(zero_grad=True)
            set_grads(ps, step, 1, bad=step == bad_at)
            opt.second_step(zero_grad=True)
        assert not bool(opt.last_step_skipped)
        assert not bool(torch.isfinite(ps[2].detach().view(-1)[5]))


@pytest.mark.parametrize("base, base_kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAM_KW)])
def test_fused_sam_auto_backend_matches_reference(base, base_kw) -> None:
    """``backend="auto"`` picks the native CPU backend when it is built, and matches."""
    require_backend("cpu")
    assert F.resolve_backend("auto", torch.device("cpu")) == "cpu"

    def make(ps, name):
        return FusedSAM(ps, base, rho=0.5, adaptive=True, eta=0.01, backend=name, **base_kw)

    compare_fused_sam("auto", make, odd_params())


# ---------------------------------------------------------------------------------------------
# CUDA: FusedSAM end to end (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("base, base_kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, ADAM_KW)])
def test_gpu_fused_sam_groups_and_masks_match_reference(backend: str, base, base_kw) -> None:
    """Two param groups with their own rho/adaptive/eta and lr, sparse-SAM masks (random drop and
    grow from a seeded policy, so both runs get the same masks), on CUDA tensors."""
    if not torch.cuda.is_available():
        pytest.fail("-m gpu selected but torch sees no CUDA device")
    require_backend(backend, "cuda")
    params = on_device(odd_params(), "cuda")

    def make(ps, name):
        groups = [
            {"params": ps[:4], "rho": 0.5, "adaptive": True, "eta": 0.01},
            {"params": ps[4:], "rho": 0.05, "lr": base_kw["lr"] / 2},
        ]
        policy = DynamicMask(total_steps=4, drop="random", grow="random", seed=5)
        return FusedSAM(
            groups, base, backend=name, sparsity=0.5, mask=policy, mask_update_every=2, **base_kw
        )

    compare_fused_sam(backend, make, params, steps=4)
