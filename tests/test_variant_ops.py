"""The two ops of the SAM variants, ``dot_partials`` and ``axpby_``, on every backend against
:mod:`fused_sam.reference`.

LookSAM, F-SAM and GSAM combine gradients with global dot products and ``a x + b y`` updates
whose coefficients come from those products (see ``fused_sam/variants``). Both ops compute in
float64 on every backend, so the tolerances here are those of float64 arithmetic, far tighter
than the float32 ones of the SAM step ops:

* ``dot_partials``: the products of float32 (or lower) values are exact in float64 and only the
  sums round, so the total may differ from the reference's by a few float64 roundings of the
  sum of ``|a_j b_j|`` (a float32 accumulation misses by 1e8 times more);
* ``axpby_``: both sides compute ``a x + b y`` in float64 (a kernel may fuse one multiply-add)
  and convert it to the storage dtype as torch does (bfloat16/float16 through float32), so they
  differ by at most one unit in the last place of the stored result, and in bfloat16/float16
  on a handful of elements at most.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from conftest import CPU_BACKENDS, require_backend
from test_op_outputs import bits_equal, grads_like, op_params, twin, ulp
from test_ops import DTYPES
from torch import Tensor

from fused_sam import functional as F

#: The reference's own path through functional is part of what is compared.
BACKENDS = ["reference", *CPU_BACKENDS]
#: Coefficients of the LookSAM/GSAM/F-SAM updates: a unit one, small ones, negative ones.
COEFS = [(1.0, -0.3), (0.9, 0.1 / 3), (1.0 + 0.4 * 0.7, -0.4 / 8.0), (-2.5, 1e-3)]
#: Elements a bfloat16/float16 result may round differently from the reference (near a rounding
#: boundary the fused multiply-add of a kernel may fall on the other side).
FLIPS = 1e-3


def _inputs(dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Three tensor lists in the odd sizes and layouts of the op tests (same layout per index)."""
    xs = op_params(dtype)
    return xs, grads_like(xs), grads_like(xs, scale=3.0)


def check_axpby(got: Sequence[Tensor], want: Sequence[Tensor], x, y, a: float, b: float) -> None:
    """One ulp of the stored result plus float64 rounding of the terms, per element."""
    flips = total = 0
    for i, (g, w) in enumerate(zip(got, want)):
        label = f"[{i}] shape={tuple(w.shape)} {w.dtype}"
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride(), label
        terms = (a * x[i].double()).abs() + (b * y[i].double()).abs()
        tol = ulp(w) + 4 * torch.finfo(torch.float64).eps * terms
        err = (g.double() - w.double()).abs()
        assert bool((err <= tol).all()), f"{label}: worst {(err / tol).max().item():.3g}x tol"
        flips += int((g != w).sum())
        total += w.numel()
    if want[0].dtype != torch.float64:
        assert flips <= max(2, FLIPS * total), f"{flips} of {total} elements round differently"


# ---------------------------------------------------------------------------------------------
# dot_partials


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_total(backend: str, dtype: torch.dtype) -> None:
    if backend != "reference":
        require_backend(backend)
    _, a, b = _inputs(dtype)
    got = F.dot(a, b, backend)
    assert got.dim() == 1 and got.dtype == torch.float64 and got.device == a[0].device
    want = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    magnitude = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b))
    # A float32 accumulation would be off by about 1e-7 of the magnitude; float64: 1e-16 each.
    assert abs(float(got.sum()) - want) <= 64 * torch.finfo(torch.float64).eps * magnitude


@pytest.mark.parametrize("backend", BACKENDS)
def test_dot_of_a_list_with_itself_is_its_squared_norm(backend: str) -> None:
    if backend != "reference":
        require_backend(backend)
    _, a, _ = _inputs(torch.float32)
    norm_sq = F.norm_sq(a, a, [False] * len(a), [0.0] * len(a), "reference").sum()
    torch.testing.assert_close(F.dot(a, a, backend).sum(), norm_sq, atol=0, rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_dot_is_nonfinite_with_a_nonfinite_entry(backend: str, bad: float) -> None:
    if backend != "reference":
        require_backend(backend)
    _, a, b = _inputs(torch.float32)
    b[3].reshape(-1)[2] = bad
    assert not bool(torch.isfinite(F.dot(a, b, backend).sum()))


# ---------------------------------------------------------------------------------------------
# axpby_


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["x", "y", "new"])
@pytest.mark.parametrize("coefs", COEFS)
def test_axpby(backend: str, dtype: torch.dtype, target: str, coefs: tuple) -> None:
    """``out = a x + b y`` with ``out`` being ``x``, ``y`` or a third list."""
    if backend != "reference":
        require_backend(backend)
    out0, x0, y0 = _inputs(dtype)
    runs = []
    for name in ("reference", backend):
        out, x, y = ([twin(t) for t in ts] for ts in (out0, x0, y0))
        dest = {"x": x, "y": y, "new": out}[target]
        F.axpby_(dest, x, y, torch.tensor(coefs, dtype=torch.float64), None, name)
        runs.append((dest, x, y))
    (want, *_), (got, gx, gy) = runs
    check_axpby(got, want, x0, y0, *coefs)
    if target == "new":  # the inputs are only read
        assert all(bits_equal(u, v) for u, v in zip(gx + gy, x0 + y0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_axpby_unit_coefficients_are_exact(backend: str) -> None:
    """``1 x + 0 y`` is ``x`` bit for bit, and ``0 x + 1 y`` is ``y``: no intermediate rounding."""
    if backend != "reference":
        require_backend(backend)
    for dtype in DTYPES:
        _, x, y = _inputs(dtype)
        for coefs, want in (((1.0, 0.0), x), ((0.0, 1.0), y)):
            out = [torch.empty_like(t) for t in x]
            F.axpby_(out, x, y, torch.tensor(coefs, dtype=torch.float64), None, backend)
            assert all(bits_equal(u, v) for u, v in zip(out, want)), (dtype, coefs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flag", [0.0, 1.0, float("inf")])
def test_axpby_skip_flag(backend: str, flag: float) -> None:
    """A nonzero flag writes nothing, whatever non-finite values the inputs hold; a zero flag is
    the unflagged op."""
    if backend != "reference":
        require_backend(backend)
    out0, x, y = _inputs(torch.float32)
    if flag != 0:
        y[2].reshape(-1)[0] = float("nan")
        x[4].reshape(-1)[0] = float("inf")
    coefs = torch.tensor([0.5, -2.0], dtype=torch.float64)
    out = [twin(t) for t in out0]
    F.axpby_(out, x, y, coefs, torch.tensor(flag), backend)
    if flag != 0:
        assert all(bits_equal(u, v) for u, v in zip(out, out0))
    else:
        want = [twin(t) for t in out0]
        F.axpby_(want, x, y, coefs, None, "reference")
        check_axpby(out, want, x, y, 0.5, -2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_axpby_reads_new_coefficients_every_call(backend: str) -> None:
    """The coefficients are data, not constants of a compiled kernel or a cached launch."""
    if backend != "reference":
        require_backend(backend)
    _, x, y = _inputs(torch.float32)
    coefs = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for a, b in ((1.0, 2.0), (-1.0, 0.25), (3.0, 0.0)):
        coefs.copy_(torch.tensor([a, b]))
        out = [torch.empty_like(t) for t in x]
        want = [torch.empty_like(t) for t in x]
        F.axpby_(out, x, y, coefs, None, backend)
        F.axpby_(want, x, y, coefs, None, "reference")
        check_axpby(out, want, x, y, a, b)


def _bad_calls(x: list[Tensor], y: list[Tensor]) -> dict[str, tuple]:
    f64 = torch.float64
    coefs = torch.tensor([1.0, 2.0], dtype=f64)
    return {
        "lengths": (x, x, y[:-1], coefs, None),
        "shapes": (x[:2], x[:2], y[1:3], coefs, None),
        "dtypes": (x, x, [t.double() for t in y], coefs, None),
        "coefs of one element": (x, x, y, torch.tensor([1.0], dtype=f64), None),
        "coefs of float32": (x, x, y, torch.tensor([1.0, 2.0]), None),
        "skip of two elements": (x, x, y, coefs, torch.zeros(2)),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(_bad_calls([torch.zeros(1)], [torch.zeros(1)])))
def test_axpby_refuses_bad_arguments_before_writing(backend: str, case: str) -> None:
    """A bad call raises a clear error from the op itself (not from deep inside a kernel, and
    not after writing part of the lists)."""
    require_backend(backend)
    x = [torch.randn(7), torch.randn(3, 5), torch.randn(2)]
    y = [torch.randn(7), torch.randn(3, 5), torch.randn(2)]
    before = [t.clone() for t in x]
    args = _bad_calls(x, y)[case]
    mod = F._module(backend)
    with pytest.raises((ValueError, RuntimeError)):
        mod.axpby_(*args)
    assert all(bits_equal(u, v) for u, v in zip(x, before))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dot_refuses_bad_arguments(backend: str) -> None:
    require_backend(backend)
    mod = F._module(backend)
    a = [torch.randn(7), torch.randn(3, 5)]
    for b in ([torch.randn(7)], [torch.randn(7), torch.randn(5, 3)], [t.double() for t in a]):
        with pytest.raises((ValueError, RuntimeError)):
            mod.dot_partials(a, b)
