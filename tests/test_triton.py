"""Triton-specific checks beyond the shared oracle matrices of ``test_ops.py`` and
``test_op_outputs.py``.

On CPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest);
the ``gpu`` tests run the same comparisons on CUDA tensors with compiled kernels. The variant
ops (``dot_partials``, ``axpby_``) are compared with the reference on every backend by
``test_variant_ops.py``; here are their launch-level checks (many tensors in one launch,
determinism, the per-tensor traced path, the registered ops, fallbacks). An
ahead-of-time compile for sm_90 (no GPU needed) checks that every kernel family compiles and
that the aligned variants issue 16-byte vector accesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close, require_backend
from test_op_outputs import (
    SGD_CONFIGS,
    check_norm,
    check_perturb,
    check_sgd_steps,
    grads_like,
    op_params,
)
from test_variant_ops import COEFS, check_axpby

from fused_sam import functional as F
from fused_sam.hyperparams import AdamHyper, SGDHyper
from fused_sam.masks import RandomMask, pack_bits, tensor_salt

ROOT = Path(__file__).resolve().parents[1]

try:
    import triton
    import triton.language as tl

    from fused_sam.backends.triton._table import to_storage

    @triton.jit
    def _cast_kernel(x_ptr, y_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, to_storage(x, DTYPE), mask=offs < n)

except ImportError:  # the tests below fail through require_backend with the reason
    _cast_kernel = None


@pytest.fixture
def tb():
    """The Triton backend module (failing, or skipping where allowed, when it cannot run)."""
    require_backend("triton")
    from fused_sam.backends import triton as tb

    return tb


def _sizes_many() -> list[int]:
    # 32 tensors in one launch: empty, exactly one block or chunk, one past either, several
    # chunks, and many tiny ones (mask bytes shared by no two tensors, odd tails).
    g = _geometry()
    block, chunk = g.block, g.chunk
    edges = [0, block - 1, block, block + 1, chunk, chunk + 3, 2 * chunk + 5]
    return edges + list(range(1, 26))


def _geometry():
    from fused_sam.backends.triton import _table

    return _table.geometry(0)


def _tensors(sizes, dtype, device="cpu", offset=0):
    """Tensors of ``sizes``, views at ``offset`` elements into one flat buffer when nonzero."""
    if not offset:
        return [torch.randn(n, dtype=torch.float64).to(dtype).to(device) for n in sizes]
    out = []
    for n in sizes:
        buf = torch.randn(n + offset, dtype=torch.float64).to(dtype).to(device)
        out.append(buf[offset:])
    return out


@pytest.mark.parametrize(
    ("offset", "masked"), [(0, False), (1, True)], ids=["aligned", "misaligned-masked"]
)
def test_many_tensors_one_launch(tb, offset: int, masked: bool) -> None:
    """40 tensors of edge sizes in one launch, aligned and 4-byte-misaligned addresses: the norm
    total, e and the backups of the perturbation, and two restore + SGD steps, per op."""
    from fused_sam.backends.triton import _table

    sizes = _sizes_many()
    ps = _tensors(sizes, torch.float32, offset=offset)
    g1 = _tensors(sizes, torch.float32, offset=offset)
    g2 = _tensors(sizes, torch.float32, offset=offset)
    masks = [pack_bits(torch.rand(n) < 0.5) for n in sizes] if masked else None
    n = len(ps)
    ad, eta = [True] * n, [0.01] * n
    check_norm("triton", ps, g1, ad, eta)
    check_perturb("triton", ps, g1, rho=[0.05] * n, eps=1e-12, adaptive=ad, eta=eta, masks=masks)
    check_sgd_steps("triton", ps, SGD_CONFIGS[2], amp=False, grads=lambda step: g2, steps=2)
    # One program per chunk of every tensor, and one total (written by the last of them).
    chunk = _table.geometry(sum(sizes)).chunk
    table = _table.pointer_table([g1, g1], torch.device("cpu"))
    assert table.n_chunks == sum(-(-n // chunk) for n in sizes)
    assert tb.norm_sq_partials(g1, ps, False, 0.0).shape == (1,)
    # Every tensor is a view one element into its buffer: none gets 16-byte access.
    assert table.vector == (_table.VECTOR_ALL if offset == 0 else _table.VECTOR_NONE)
    # The variant ops over the same 32 tensors, one launch each.
    parts = tb.dot_partials(g1, g2)
    assert parts.shape == (1,)
    want = F.dot(g1, g2, "reference").sum()
    torch.testing.assert_close(parts.sum(), want, atol=1e-12, rtol=1e-14)
    coefs = torch.tensor([0.75, -1.5], dtype=torch.float64)
    for out in ([torch.empty_like(p) for p in ps], g1):  # a new list, and x itself
        want = [torch.empty_like(p) for p in ps]
        F.axpby_(want, g1, g2, coefs, None, "reference")
        x0 = [t.clone() for t in g1]
        tb.axpby_(out, g1, g2, coefs, None)
        check_axpby(out, want, x0, g2, 0.75, -1.5)


def test_norm_partials_deterministic(tb) -> None:
    sizes = [5, 70000, 4096, 1]
    g = _tensors(sizes, torch.float32)
    first = tb.norm_sq_partials(g, g, True, 0.1)
    for _ in range(2):
        assert torch.equal(tb.norm_sq_partials(g, g, True, 0.1), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dot_total_deterministic(tb, dtype: torch.dtype) -> None:
    """One float64 total written by the launch's last program: the float64 sum of every
    chunk's exact products (an empty tensor has none), bit-identical from run to run."""
    sizes = [5, 70000, 0, 4096, 1]
    a, b = _tensors(sizes, dtype), _tensors(sizes, dtype)
    first = tb.dot_partials(a, b)
    assert first.dtype == torch.float64 and first.shape == (1,)
    want = sum(float((u.double() * v.double()).sum()) for u, v in zip(a, b))
    torch.testing.assert_close(first, torch.tensor([want], dtype=torch.float64), atol=0,
                               rtol=1e-13)  # fmt: skip
    for _ in range(2):
        assert torch.equal(tb.dot_partials(a, b), first)
    assert torch.equal(tb.dot_partials([torch.zeros(0)], [torch.zeros(0)]), torch.zeros(1).double())


def test_short_mask_is_refused(tb) -> None:
    """A mask with too few bytes is never read out of bounds: it is refused with the reason."""
    ps = _tensors([100], torch.float32)
    with pytest.raises(ValueError, match="mask"):
        tb.perturb_(
            ps, ps, [torch.empty_like(ps[0])], torch.ones(1), 0.05, 1e-12, False, 0.0,
            [torch.zeros(3, dtype=torch.uint8)],
        )  # fmt: skip


def test_table_cache_hits_and_rebuilds(tb) -> None:
    """Same tensors: the cached table (no copy); a moved ``data_ptr``: a new, correct table."""
    from fused_sam.backends.triton import _table

    _table.clear_cache()
    cpu = torch.device("cpu")
    ps = _tensors([300, 5000], torch.float32)
    bs = [torch.empty_like(p) for p in ps]
    t1 = _table.pointer_table([ps, bs], cpu)
    t2 = _table.pointer_table([list(ps), list(bs)], cpu)  # new lists, the same tensors
    assert t1 is t2
    # A backup that comes back elsewhere (as a grad after zero_grad(set_to_none=True) may).
    bs[1] = torch.full_like(ps[1], 3.0)
    t3 = _table.pointer_table([ps, bs], cpu)
    assert t3 is not t1
    assert t3.data[-1].item() == bs[1].data_ptr()
    tb.restore_(ps, bs)
    assert torch.equal(ps[1], torch.full_like(ps[1], 3.0))
    # The same address with another shape (a view of the same storage): another table.
    view = [ps[0], ps[1][:4000]]
    assert _table.pointer_table([view, [bs[0], bs[1][:4000]]], cpu).data[5].item() == 4000
    # The cache is bounded.
    for i in range(_table.cache_info()[1] + 5):
        _table.pointer_table([[torch.zeros(i + 1)]], cpu)
    assert _table.cache_info()[0] == _table.cache_info()[1]


def test_hyperparameters_are_runtime_float64_arguments(tb) -> None:
    """lr, rho, eta, ... are annotated float64 runtime arguments, not compile-time constants,
    so a new value cannot specialise a kernel (the compiled-cache count across changing
    hyperparameters is checked on a GPU by ``test_gpu_steady_state_no_copy_no_recompile``)."""
    from fused_sam.backends.triton.norm import norm_kernel
    from fused_sam.backends.triton.perturb import perturb_kernel
    from fused_sam.backends.triton.step import sgd_kernel

    for kernel, hyper in (
        (norm_kernel, {"eta"}),
        (perturb_kernel, {"rho", "eps", "eta"}),
        (sgd_kernel, {"lr", "weight_decay", "momentum", "dampening"}),
    ):
        annotations = kernel.fn.__annotations__
        for name in hyper:
            assert annotations[name] == tl.float64, (kernel, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_once_to_storage(tb, dtype: torch.dtype) -> None:
    """The store rounding is round-to-nearest-even, matching torch's ``.to(dtype)``."""
    from fused_sam.backends.triton._table import tl_dtype

    # Random values, exact ties between neighbours, huge values, infinities and subnormals.
    x = torch.randn(3000, dtype=torch.float64).float()
    lo = torch.randn(500).to(dtype).float()
    hi = torch.nextafter(lo.to(dtype), torch.full_like(lo, float("inf")).to(dtype)).float()
    special = torch.tensor([float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-40, -1e-45, 0.0, -0.0])
    x = torch.cat([x, (lo + hi) / 2, special])
    y = torch.empty_like(x, dtype=dtype)
    _cast_kernel[(1,)](x, y, x.numel(), DTYPE=tl_dtype(dtype), BLOCK=4096)
    assert torch.equal(y.view(torch.int16), x.to(dtype).view(torch.int16))
    nan = torch.full((1,), float("nan"))
    _cast_kernel[(1,)](nan, y[:1], 1, DTYPE=tl_dtype(dtype), BLOCK=16)
    assert torch.isnan(y[0])


def test_direct_launches_match_table_launches(tb, monkeypatch) -> None:
    """The per-tensor (traced, torch.compile) path computes what the table path computes.

    Under tracing the tensors are fake; here the same ``DIRECT`` launches run eagerly in the
    interpreter on real tensors, so their indexing and math are checked on CPU too.
    """
    from fused_sam.backends.triton import _launch

    sizes = [1, 4097, 20000, 3]
    results = {}
    launched = set()

    def launcher(kernel, t):
        launched.add(kernel)
        return kernel

    for mode in ("table", "direct"):
        if mode == "direct":
            # Every op body and the op entry look these up in the launch plumbing module.
            monkeypatch.setattr(_launch, "traced", lambda t: True)
            monkeypatch.setattr(_launch, "direct_launcher", launcher)
        torch.manual_seed(3)
        ps = _tensors(sizes, torch.bfloat16)
        g1 = _tensors(sizes, torch.bfloat16)
        g2 = _tensors(sizes, torch.bfloat16)
        masks = [pack_bits(torch.rand(n) < 0.5) for n in sizes]
        n = len(ps)
        backups = [torch.empty_like(p) for p in ps]
        sumsq = tb.norm_sq_partials(g1, ps, True, 0.01)
        tb.perturb_(ps, g1, backups, sumsq, 0.05, 1e-12, True, 0.01, masks)
        m, v, vmax = (_tensors(sizes, torch.bfloat16) for _ in range(3))
        v = [x.abs() for x in v]
        vmax = [x.abs() for x in vmax]
        steps = [torch.full((), 3.0) for _ in range(n)]
        bad = torch.tensor([float("inf")], dtype=torch.float64)
        flags = []
        for check in ([bad], [sumsq]):  # a skipped Adam step (counters held), then one taken
            flags.append(tb.restore_adam_step_(
                [b.clone() for b in backups], g2, backups, m, v, vmax, steps,
                AdamHyper(1e-2, 0.9, 0.999, 1e-8, 1e-2, True, False, True),
                grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0), sumsqs=check,
            ))  # fmt: skip
        tb.restore_adam_step_(
            ps,
            g2,
            backups,
            m,
            v,
            vmax,
            steps,
            AdamHyper(
                lr=1e-2,
                beta1=0.9,
                beta2=0.999,
                eps=1e-8,
                weight_decay=1e-2,
                amsgrad=True,
                maximize=False,
                decoupled_weight_decay=True,
            ),
            grad_scale=torch.tensor(2.0),
            found_inf=torch.tensor(0.0),
            sumsqs=[sumsq, sumsq],
        )
        bufs = [torch.zeros_like(p) for p in ps]
        flags.append(tb.restore_sgd_step_(
            ps,
            g2,
            [p.clone() for p in ps],
            bufs,
            SGDHyper(
                lr=0.1,
                weight_decay=0.0,
                momentum=0.9,
                dampening=0.1,
                nesterov=False,
                maximize=True,
            ),
            first_step=True,
            grad_scale=None,
            found_inf=None,
            sumsqs=[sumsq],
        ))  # fmt: skip
        tb.restore_(backups, ps)
        # A random mask drawn in the kernel (the direct path gets each tensor's key as an int).
        draw = RandomMask(keep=0.4, seed=6).bits([tensor_salt(i) for i in range(n)])
        rps = _tensors(sizes, torch.bfloat16)
        tb.perturb_(rps, g1, [torch.empty_like(p) for p in rps], sumsq, 0.5, 1e-12, False, 0.0,
                    draw)  # fmt: skip
        # The variant ops: dot partials; a x + b y into x itself, into a new list with a zero
        # skip flag, and with a set flag (nothing written).
        parts = tb.dot_partials(g1, g2)
        coefs = torch.tensor([0.3, -2.0], dtype=torch.float64)
        ax = [p.clone() for p in rps]
        tb.axpby_(ax, ax, g1, coefs, None)
        combo = [torch.zeros_like(p) for p in ps]
        tb.axpby_(combo, g1, ax, coefs, torch.tensor(0.0))
        kept = [torch.zeros_like(p) for p in ps]
        tb.axpby_(kept, g1, ax, coefs, torch.tensor(1.0))
        assert all(not k.any() for k in kept)
        written = (ps, m, v, vmax, steps, bufs, backups, rps, [parts], ax, combo, flags)
        results[mode] = (sumsq.double().sum(), *written)
    assert len(launched) == 7  # norm, perturb, adam, sgd, restore, dot, axpby
    a, b = results["table"], results["direct"]
    assert [bool(f) for f in a[-1]] == [True, False, False]
    assert all(float(s) == 5.0 for s in a[5])  # from 3: the skipped step held them
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=0)
    for xs, ys in zip(a[1:], b[1:]):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("base", "kwargs"),
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.AdamW, {"lr": 1e-3})],
    ids=["sgd", "adamw"],
)
def test_fused_sam_end_to_end(tb, base, kwargs) -> None:
    """FusedSAM with the Triton backend (fused restore+step) tracks the reference backend."""
    from torch import nn

    from fused_sam import FusedSAM

    def train(backend: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
        opt = FusedSAM(model.parameters(), base, rho=0.05, backend=backend, **kwargs)
        x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        return [p.detach() for p in model.parameters()]

    F.FALLBACKS.clear()
    for a, b in zip(train("triton"), train("reference")):
        assert_close(a, b, "params")
    assert not F.FALLBACKS  # every call ran the Triton kernels


def test_eager_calls_bump_the_versions_of_what_they_write(tb) -> None:
    """Like an in-place ATen op: autograd then refuses a backward through a graph that saved
    a tensor before the kernel wrote it."""
    ps = [torch.randn(5), torch.randn(4097)]
    gs, bs = [torch.randn_like(p) for p in ps], [torch.empty_like(p) for p in ps]
    bufs = [torch.zeros_like(p) for p in ps]
    sumsq = tb.norm_sq_partials(gs, ps, False, 0.0)

    def versions(ts):
        return [t._version for t in ts]

    before = versions(ps + bs + gs)
    tb.perturb_(ps, gs, bs, sumsq, 0.05, 1e-12, False, 0.0, None)
    after = versions(ps + bs + gs)
    assert all(a > b for a, b in zip(after[:4], before[:4]))  # params and backups written
    assert after[4:] == before[4:]  # grads only read
    before = versions(ps + bufs)
    sgd = SGDHyper(0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
                   maximize=False)  # fmt: skip
    tb.restore_sgd_step_(ps, gs, bs, bufs, sgd, first_step=True, grad_scale=None, found_inf=None)
    assert all(a > b for a, b in zip(versions(ps + bufs), before))
    before = versions(bs + ps + gs)
    tb.axpby_(bs, ps, gs, torch.tensor([1.0, -0.5], dtype=torch.float64), None)
    after = versions(bs + ps + gs)
    assert all(a > b for a, b in zip(after[:2], before[:2]))  # out written
    assert after[2:] == before[2:]  # x and y only read
    before = versions(ps)
    tb.dot_partials(ps, gs)
    assert versions(ps) == before
    w = torch.randn(5, requires_grad=True)
    p = torch.randn(5)
    y = (w * p).sum()  # saves p for the backward
    tb.restore_([p], [torch.zeros(5)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_amsgrad_max_keeps_a_nan(tb, dtype: torch.dtype) -> None:
    """The running max of amsgrad propagates a NaN as torch.maximum does (on a GPU, PTX's
    max instruction would return the other operand)."""
    from fused_sam import reference

    outs = []
    for mod in (tb, reference):
        ps = [torch.ones(5, dtype=dtype)]
        vmax = [torch.zeros(5, dtype=dtype)]
        vmax[0][2] = float("nan")
        args = (ps, [torch.ones_like(ps[0])], [p.clone() for p in ps], [torch.zeros_like(ps[0])],
                [torch.zeros_like(ps[0])], vmax, [torch.zeros(())])  # fmt: skip
        hyper = AdamHyper(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          amsgrad=True, maximize=False, decoupled_weight_decay=True)  # fmt: skip
        mod.restore_adam_step_(*args, hyper, grad_scale=None, found_inf=None)
        outs.append((vmax[0], ps[0]))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(outs[0][0][2]) and torch.isnan(outs[0][1][2])


def test_fallbacks_are_counted_or_refused(tb, monkeypatch) -> None:
    """Adam step counters kept in float64 cannot be read by the kernel: functional hands the
    call to the foreach backend (its results bit for bit), counts it, and raises in strict
    mode; the backend called directly refuses the tensors instead of guessing."""
    from fused_sam.backends import foreach

    def args():
        torch.manual_seed(0)
        ps = [torch.randn(5), torch.randn(3)]
        state = [[torch.zeros_like(p) for p in ps] for _ in range(2)]
        steps = [torch.zeros((), dtype=torch.float64) for _ in ps]
        return (ps, [torch.randn_like(p) for p in ps], [p.clone() for p in ps], *state, None, steps)

    hyper = AdamHyper(0.1, 0.9, 0.999, 1e-8, 0.0, False, False, True)
    amp = dict(grad_scale=None, found_inf=None)
    F.FALLBACKS.clear()
    got, want = args(), args()
    F.restore_adam_step_(*got, hyper, **amp, backend="triton")
    foreach.restore_adam_step_(*want[:5], [], want[6], hyper, **amp)
    for u, v in zip(got, want):
        assert all(torch.equal(x, y) for x, y in zip(u or [], v or []))
    assert sum(F.FALLBACKS.values()) == 1
    ((op, reason),) = F.FALLBACKS
    assert op == "restore_adam_step" and "float32" in reason
    with pytest.raises(ValueError, match=r"restore_adam_step cannot take .*float32"):
        tb.restore_adam_step_(*args(), hyper, **amp)
    monkeypatch.setenv("FUSED_SAM_TRITON_STRICT", "1")
    with pytest.raises(RuntimeError, match="foreach backend"):
        F.restore_adam_step_(*args(), hyper, **amp, backend="triton")
    F.FALLBACKS.clear()


def test_variant_ops_fall_back_on_layouts_and_dtypes(tb, monkeypatch) -> None:
    """Tensors the flat kernels cannot pair index for index (a transposed ``y`` against a
    contiguous ``out``) go to the foreach backend through functional's buckets; tensors of a
    dtype the kernels do not take go there too, counted, and refused in strict mode. Called
    directly, the backend refuses both."""
    from fused_sam import reference

    x = [torch.randn(6, 4), torch.randn(300)]
    y = [torch.randn(4, 6).t(), torch.randn(300)]
    coefs = torch.tensor([0.5, 2.0], dtype=torch.float64)
    F.FALLBACKS.clear()
    out, want = [torch.empty_like(t) for t in x], [torch.empty_like(t) for t in x]
    F.axpby_(out, x, y, coefs, None, "triton")
    reference.axpby_(want, x, y, coefs, None)
    check_axpby(out, want, x, y, 0.5, 2.0)
    got = F.dot(x, y, "triton").sum()
    torch.testing.assert_close(got, reference.dot_partials(x, y).sum())
    ints = [torch.arange(5), torch.arange(7)]
    assert int(F.dot(ints, ints, "triton").sum()) == 30 + 91
    assert F.FALLBACKS == {("dot_partials", "dtype"): 1}  # layouts are planned, not counted
    with pytest.raises(ValueError, match="axpby cannot take these tensors \\(layout\\)"):
        tb.axpby_(out, x, y, coefs, None)
    with pytest.raises(ValueError, match="dot_partials cannot take these tensors \\(layout\\)"):
        tb.dot_partials(x, y)
    with pytest.raises(ValueError, match="dot_partials cannot take these tensors \\(dtype\\)"):
        tb.dot_partials(ints, ints)
    monkeypatch.setenv("FUSED_SAM_TRITON_STRICT", "1")
    with pytest.raises(RuntimeError, match="foreach backend: dtype"):
        F.dot(ints, ints, "triton")
    F.FALLBACKS.clear()


def test_masks_not_readable_as_bytes_are_routed_by_functional(tb) -> None:
    """A mask the kernel cannot read as flat bytes (a strided view): functional runs that
    bucket on foreach (its bits exactly) and counts it; the backend called directly refuses."""
    from fused_sam.backends import foreach

    torch.manual_seed(0)
    sizes = [5, 300]
    ps, gs = _tensors(sizes, torch.float32), _tensors(sizes, torch.float32)
    packed = [pack_bits(torch.rand(n) < 0.5) for n in sizes]
    masks = [torch.stack([m, m], 1)[:, 0] for m in packed]  # every other byte: not contiguous
    n = len(ps)
    F.FALLBACKS.clear()
    got, got_b = [p.clone() for p in ps], [torch.empty_like(p) for p in ps]
    sumsq = F.norm_sq(gs, got, [False] * n, [0.0] * n, "triton")
    F.perturb_(got, gs, got_b, sumsq, [0.05] * n, 1e-12, [False] * n, [0.0] * n, masks, "triton")
    want, want_b = [p.clone() for p in ps], [torch.empty_like(p) for p in ps]
    foreach.perturb_(want, gs, want_b, sumsq, 0.05, 1e-12, False, 0.0, masks)
    assert all(torch.equal(a, b) for a, b in zip(got + got_b, want + want_b))
    assert F.FALLBACKS == {("perturb", "mask layout"): 1}
    with pytest.raises(ValueError, match=r"perturb cannot take these tensors \(mask layout\)"):
        tb.perturb_([p.clone() for p in ps], gs, want_b, sumsq, 0.05, 1e-12, False, 0.0, masks)
    F.FALLBACKS.clear()


def _imports(path: Path) -> set[str]:
    """The fused_sam modules a source file imports (``from x import y`` as ``x`` and ``x.y``)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("fused_sam")}


@pytest.mark.parametrize("backend", ["triton", "foreach", "native"])
def test_backends_import_only_leaf_modules(backend: str) -> None:
    """Dispatch lives in functional: a backend imports neither it nor the optimizer, the step
    parts, the variants or another backend (only the shared leaf helpers, its own modules, the
    hyperparameter records and the mask bits)."""
    root = ROOT / "fused_sam" / "backends"
    files = (
        sorted((root / backend).rglob("*.py")) if backend == "triton" else [root / f"{backend}.py"]
    )
    own = f"fused_sam.backends.{backend}"
    allowed = {
        "fused_sam._C",
        "fused_sam.backends._checks",
        "fused_sam.backends._skip",
        "fused_sam.hyperparams",
        "fused_sam.masks",
    }
    for path in files:
        for name in _imports(path):
            ok = name == own or name.startswith(own + ".") or name.startswith(tuple(allowed))
            ok = ok or name in ("fused_sam", "fused_sam.backends")  # ``from fused_sam import _C``
            assert ok, f"{path.relative_to(ROOT)} imports {name}"


def test_opcheck(tb) -> None:
    """Schema, declared mutations and fake (meta) behaviour of the registered ops.

    ``test_aot_dispatch_dynamic`` is left out on CPU: it traces the op body with functional
    tensors, which needs compiled (CUDA) kernels; the ``gpu`` test below runs it.
    """
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in _op_args("cpu"):
        torch.library.opcheck(*args, test_utils=utils)


def _op_args(device: str):
    ops = torch.ops.fused_sam_triton
    sizes = [3, 5000]
    ps = _tensors(sizes, torch.float32, device)
    gs = _tensors(sizes, torch.float32, device)
    bs = [torch.empty_like(p) for p in ps]
    st = [torch.zeros((), device=device) for _ in ps]
    masks = [pack_bits(torch.rand(n) < 0.5).to(device) for n in sizes]
    sumsq = ops.norm_sq_partials(gs, ps, True, 0.01)
    fi = torch.zeros((), device=device)
    scale = torch.ones((), device=device)
    like = [torch.zeros_like(p) for p in ps]
    moments = [x.clone() for x in like], [x.clone() for x in like]
    adam_hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, True)
    salts, rt = [5, 2**32 - 1], torch.tensor(0.05, device=device)
    lr_t = torch.ones((), device=device)
    coefs = torch.tensor([0.5, -2.0], dtype=torch.float64, device=device)
    xs = [g.clone() for g in gs]
    return [
        (ops.norm_sq_partials.default, (gs, ps, True, 0.01)),
        (
            ops.perturb.default,
            (ps, gs, bs, sumsq, 0.05, 1e-12, False, 0.0, masks, [], 0, 0, None),
        ),
        # A random mask computed in the kernel, the radius read on the device (rho * rho_t).
        (
            ops.perturb.default,
            (ps, gs, bs, sumsq, -1.0, 1e-12, True, 0.01, [], salts, 7, 2**30, rt),
        ),
        (ops.restore.default, (ps, bs)),
        (
            ops.restore_sgd_step.default,
            (ps, gs, bs, like, 0.1, 0.0, 0.9, 0.0, False, False, True, scale, fi, None, [sumsq]),
        ),
        (
            ops.restore_sgd_step.default,
            (ps, gs, bs, [], 0.1, 0.0, 0.0, 0.0, False, False, True, None, None, None, []),
        ),
        (
            ops.restore_adam_step.default,
            (ps, gs, bs, like, *moments, st, *adam_hyper, scale, fi, lr_t, [sumsq, sumsq]),
        ),
        (ops.dot_partials.default, (gs, ps)),
        # a x + b y into a new list, with and without the skip flag, and into x itself.
        (ops.axpby.default, (bs, ps, gs, coefs, None)),
        (ops.axpby.default, (bs, ps, gs, coefs, fi)),
        (ops.axpby.default, (xs, xs, gs, coefs, fi)),
    ]


def test_unavailable_reasons(tb) -> None:
    assert tb.unavailable_reason(torch.device("cpu")) is None
    assert "TRITON_INTERPRET" in tb.unavailable_reason(torch.device("cuda"))
    assert tb.unavailable_reason(torch.device("meta")) is not None
    with pytest.raises(F.BackendUnavailableError, match="TRITON_INTERPRET"):
        F.resolve_backend("triton", torch.device("cuda"))


def test_reason_without_interpreter() -> None:
    """A fresh process without ``TRITON_INTERPRET`` reports exactly why CPU tensors cannot run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch; from fused_sam import functional as F; "
        "print(F.unavailable_reason('triton', torch.device('cpu')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


def _reason_in_subprocess(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_reason_when_the_interpreter_is_set_after_import() -> None:
    out = _reason_in_subprocess(
        "import os, torch; from fused_sam import functional as F; "
        "F.unavailable_reason('triton', torch.device('cpu')); "
        "os.environ['TRITON_INTERPRET'] = '1'; "
        "print(F.unavailable_reason('triton', torch.device('cpu')))"
    )
    assert "was set after" in out


def test_reason_when_triton_is_not_installed() -> None:
    """``import triton`` failing (here: blocked) is reported as the reason, and a forced
    ``backend="triton"`` raises with it."""
    out = _reason_in_subprocess(
        "import sys; sys.modules['triton'] = None; import torch; "
        "from fused_sam import FusedSAM, functional as F; "
        "print(F.unavailable_reason('triton', torch.device('cpu')))\n"
        "try:\n    FusedSAM([torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1, "
        "backend='triton')\nexcept F.BackendUnavailableError as e:\n    print('raised', e)"
    )
    reason, raised = out.strip().splitlines()
    assert "triton" in reason.lower() and "not installed" in reason.lower(), reason
    assert raised.startswith("raised") and "not installed" in raised.lower()


def test_compiles_for_sm90_and_vectorises() -> None:
    """Every kernel family compiles for an NVIDIA target; aligned variants use 16-byte vectors,
    and so does the vector path of a launch that decides 16-byte access per tensor (a bucket
    with one misaligned tensor): exactly as many vector accesses as the all-aligned variant.
    The kernels that find their launch's last program use the GPU-scope acquire-release
    atomic that pattern needs."""
    pytest.importorskip("triton")  # the backend's own tests fail loudly if triton is missing
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_triton_aot.py")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = {row["kernel"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert len(rows) == 62
    for name, row in rows.items():
        if "/direct" in name:
            continue
        assert row["vector_loads"] > 0, row
        if not name.startswith(("norm", "dot")):  # they store one partial per program
            assert row["vector_stores"] > 0, row
        # The table launches that find their last program (norm and dot totals, Adam's
        # counters) do it with an acquire-release atomic; norm and dot read the partials back
        # with volatile loads.
        last = name.startswith(("norm", "dot", "adam"))
        assert (row["acq_rel_atomics"] > 0) == last, row
        assert (row["volatile_loads"] > 0) == name.startswith(("norm", "dot")), row
        if "/per-tensor" in name:
            aligned = rows[name.replace("/per-tensor", "")]
            assert (row["vector_loads"], row["vector_stores"]) == (
                aligned["vector_loads"],
                aligned["vector_stores"],
            ), (row, aligned)


# ---------------------------------------------------------------------------------------------
# GPU: the same comparisons with compiled kernels on CUDA tensors


def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    require_backend("triton", "cuda")


# The shapes of the CPU op tests plus tensors of several GPU chunks and a million elements.
GPU_SHAPES = ((1,), (3,), (4097,), (65537,), (), (33, 7), (1 << 20,), (100003,))
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_variant_ops(dtype: torch.dtype) -> None:
    """The dot total and ``a x + b y`` (into a new list and into ``x``; skipped) of the compiled
    kernels against the reference, at the tolerances of ``test_variant_ops.py``."""
    _cuda()
    xs = op_params(dtype, "cuda", GPU_SHAPES)
    a, b = grads_like(xs), grads_like(xs, scale=3.0)
    got = F.dot(a, b, "triton")
    assert got.dtype == torch.float64 and got.device == a[0].device
    want = float(F.dot(a, b, "reference").sum())
    magnitude = sum(float((u.double() * v.double()).abs().sum()) for u, v in zip(a, b))
    assert abs(float(got.sum()) - want) <= 64 * torch.finfo(torch.float64).eps * magnitude
    for coefs in COEFS:
        c = torch.tensor(coefs, dtype=torch.float64, device="cuda")
        want = [torch.empty_like(t) for t in a]
        F.axpby_(want, a, b, c, None, "reference")
        out = [torch.empty_like(t) for t in a]
        F.axpby_(out, a, b, c, torch.zeros((), device="cuda"), "triton")
        check_axpby(out, want, a, b, *coefs)
        x = [t.clone() for t in a]
        F.axpby_(x, x, b, c, None, "triton")
        check_axpby(x, want, a, b, *coefs)
        before = [t.clone() for t in out]
        F.axpby_(out, a, b, c, torch.ones((), device="cuda"), "triton")
        assert all(torch.equal(u, v) for u, v in zip(out, before))


@pytest.mark.gpu
def test_gpu_variant_ops_in_a_cuda_graph() -> None:
    """``dot_partials`` and ``axpby_`` captured in a CUDA graph: each replay reads the
    coefficients and the skip flag from their device tensors (new values need no new capture)
    and gives what an eager call with those values gives."""
    _cuda()
    from fused_sam.backends import triton as tb

    sizes = [7, 5000, 70000]
    x = _tensors(sizes, torch.float32, "cuda")
    y = _tensors(sizes, torch.float32, "cuda")
    out = [torch.zeros_like(t) for t in x]
    coefs = torch.zeros(2, dtype=torch.float64, device="cuda")
    skip = torch.zeros((), device="cuda")

    def body() -> torch.Tensor:
        parts = tb.dot_partials(x, y)
        tb.axpby_(out, x, y, coefs, skip)
        return parts

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # compiles the kernels before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        parts = body()
    for a, b, flag in ((0.5, -1.0, 0.0), (2.0, 0.25, 0.0), (3.0, 3.0, 1.0), (-1.0, 1.0, 0.0)):
        before = [t.clone() for t in out]
        coefs.copy_(torch.tensor([a, b], dtype=torch.float64))
        skip.fill_(flag)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(parts, tb.dot_partials(x, y))
        want = before
        if not flag:
            want = [torch.empty_like(t) for t in x]
            tb.axpby_(want, x, y, coefs, None)
        assert all(torch.equal(u, v) for u, v in zip(out, want)), (a, b, flag)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile() -> None:
    """opcheck including aot dispatch, and torch.compile of a whole SAM step (no graph break)."""
    _cuda()
    for args in _op_args("cuda"):
        torch.library.opcheck(*args)
    sizes = [7, 5000, 70000]
    ps = _tensors(sizes, torch.float32, "cuda")
    gs = _tensors(sizes, torch.float32, "cuda")

    from fused_sam.backends import triton as tb

    def sam_half_step(ps, gs, bs):
        sumsq = tb.norm_sq_partials(gs, ps, False, 0.0)
        tb.perturb_(ps, gs, bs, sumsq, 0.05, 1e-12, False, 0.0, None)
        return sumsq

    want_p = [p.clone() for p in ps]
    want_b = [torch.empty_like(p) for p in ps]
    sam_half_step(want_p, gs, want_b)
    got_p = [p.clone() for p in ps]
    got_b = [torch.empty_like(p) for p in ps]
    torch.compile(sam_half_step, fullgraph=True)(got_p, gs, got_b)
    for a, b in zip(got_p + got_b, want_p + want_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_steady_state_no_copy_no_recompile() -> None:
    """After a warm-up step: tables from the cache (no H2D copy) and no recompiles per lr/rho."""
    _cuda()
    from fused_sam.backends.triton import _table
    from fused_sam.backends.triton.step import sgd_kernel

    sizes = [1000, 200000]
    ps = _tensors(sizes, torch.float32, "cuda")
    gs = _tensors(sizes, torch.float32, "cuda")
    bs = [torch.empty_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    n = len(ps)

    draws = RandomMask(keep=0.5, seed=1)

    def step(i: int) -> None:
        sumsq = F.norm_sq(gs, ps, [False] * n, [0.0] * n, backend="triton")
        rho = [0.05 + 0.01 * i] * n
        F.perturb_(ps, gs, bs, sumsq, rho, 1e-12, [False] * n, [0.0] * n, None, "triton")
        # A random mask draws a new step key each step: a runtime argument, no recompile.
        draws.draws = i
        bits = draws.bits([tensor_salt(k) for k in range(n)])
        F.perturb_(ps, gs, bs, sumsq, rho, 1e-12, [False] * n, [0.0] * n, bits, "triton")
        sgd = SGDHyper(0.1 / (i + 1), weight_decay=0.0, momentum=0.9, dampening=0.0,
                       nesterov=False, maximize=False)  # fmt: skip
        F.restore_sgd_step_(
            ps, gs, bs, vs, sgd, first_step=[False] * n, grad_scale=None, found_inf=None,
            backend="triton",
        )  # fmt: skip

    step(0)
    torch.cuda.synchronize()
    entries = _table.cache_info()[0]
    compiled = sum(len(c[0]) for c in sgd_kernel.device_caches.values())
    with torch.profiler.profile() as prof:
        for i in range(1, 4):
            step(i)
        torch.cuda.synchronize()
    assert _table.cache_info()[0] == entries
    assert sum(len(c[0]) for c in sgd_kernel.device_caches.values()) == compiled
    assert not any("HtoD" in e.name for e in prof.events()), "host-to-device copy in steady state"


@pytest.mark.gpu
def test_gpu_device_totals_flags_and_counters() -> None:
    """Compiled kernels whose hundreds of programs finish in any order: the norm total (the
    last program's fixed-order reduction) is the same bits at every call and the reference's
    to 1e-12, with the completion counter back at zero; Adam's counters advance exactly once
    per step taken however many programs share a tensor; and a whole SAM step captured in a
    CUDA graph replays to the bits of the same eager steps, its skip flag included."""
    _cuda()
    from fused_sam import reference
    from fused_sam.backends import triton as tb
    from fused_sam.backends.triton import _table

    sizes = [1 << 22, 3, 100003, 0, 70000] + [257] * 200
    g1 = _tensors(sizes, torch.float32, "cuda")
    g2 = _tensors(sizes, torch.float32, "cuda")
    ps0 = _tensors(sizes, torch.float32, "cuda")
    first = tb.norm_sq_partials(g1, ps0, True, 0.1)
    for _ in range(20):
        assert torch.equal(tb.norm_sq_partials(g1, ps0, True, 0.1), first)
    want = reference.norm_sq_partials(g1, ps0, True, 0.1)
    torch.testing.assert_close(first, want, atol=0, rtol=1e-12)
    assert int(_table.counter(g1[0].device)) == 0

    def fresh():
        ps = [p.clone() for p in ps0]
        state = [[torch.zeros_like(p) for p in ps] for _ in range(3)]
        state.append([torch.zeros((), device="cuda") for _ in ps])
        return ps, [torch.empty_like(p) for p in ps], state

    def sam_step(ps, backups, state, found):
        s1 = tb.norm_sq_partials(g1, ps, False, 0.0)
        tb.perturb_(ps, g1, backups, s1, 0.05, 1e-12, False, 0.0, None)
        s2 = tb.norm_sq_partials(g2, ps, False, 0.0)
        return tb.restore_adam_step_(
            ps, g2, backups, *state[:3], state[3], ADAM_STEP, grad_scale=None, found_inf=found,
            sumsqs=[s1, s2],
        )  # fmt: skip

    found = torch.zeros((), device="cuda")
    eager = fresh()
    flags = [bool(sam_step(*eager, found)) for _ in range(3)]
    found.fill_(1.0)
    flags.append(bool(sam_step(*eager, found)))
    assert flags == [False, False, False, True]
    assert all(float(c) == 3.0 for c in eager[2][3])
    # The same four steps: one eager warm-up (compiles, builds the tables), then replays.
    captured = fresh()
    found.zero_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sam_step(*captured, found)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flag = sam_step(*captured, found)
    replayed = []
    for value in (0.0, 0.0, 1.0):
        found.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        replayed.append(bool(flag))
    assert replayed == flags[1:]
    for a, b in zip(captured[0] + [x for col in captured[2] for x in col],
                    eager[0] + [x for col in eager[2] for x in col]):  # fmt: skip
        assert torch.equal(a, b)


def test_hyperparameters_read_on_the_device(tb) -> None:
    """rho and lr given as one-element tensors on the parameters' device are read by the kernels
    (what a CUDA graph replay needs: a scheduler changes the tensor, not the captured launch).
    Each result equals the one with the same value as a float, and a new value in the same
    tensor takes effect at the next call."""
    sizes = [5, 3000]
    gs = _tensors(sizes, torch.float32)
    rho_t = torch.tensor(0.3, dtype=torch.float64)
    lr_t = torch.tensor(0.1, dtype=torch.float64)
    for value in (0.3, 0.7):
        rho_t.fill_(value)
        lr_t.fill_(value / 3)
        runs = []
        for rho, lr in ((value, value / 3), (rho_t, lr_t)):
            torch.manual_seed(0)
            ps = _tensors(sizes, torch.float32)
            bs = [torch.empty_like(p) for p in ps]
            sumsq = tb.norm_sq_partials(gs, ps, False, 0.0)
            tb.perturb_(ps, gs, bs, sumsq, rho, 1e-12, False, 0.0, None)
            perturbed = [p.clone() for p in ps]
            bufs = [torch.zeros_like(p) for p in ps]
            sgd = SGDHyper(lr, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=True,
                           maximize=False)  # fmt: skip
            tb.restore_sgd_step_(
                ps, gs, bs, bufs, sgd, first_step=True, grad_scale=None, found_inf=None
            )  # fmt: skip
            m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
            steps = [torch.zeros(()) for _ in ps]
            adam_ps = [b.clone() for b in bs]
            adam = AdamHyper(lr, 0.9, 0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False,
                             maximize=False, decoupled_weight_decay=True)  # fmt: skip
            tb.restore_adam_step_(
                adam_ps, gs, bs, m, v, [], steps, adam, grad_scale=None, found_inf=None
            )  # fmt: skip
            runs.append(perturbed + ps + bufs + adam_ps + m + v)
        for a, b in zip(*runs):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The fused SAM step: at most four launches per bucket, the skip flag and Adam's counters in the
# step kernel, the norm finalized once per launch, 16-byte access per tensor, table keys
# without a per-tensor Python pass


SGD_STEP = SGDHyper(0.1, weight_decay=1e-3, momentum=0.9, dampening=0.0, nesterov=True,
                    maximize=False)  # fmt: skip
ADAM_STEP = AdamHyper(0.02, 0.9, 0.999, eps=1e-8, weight_decay=1e-2, amsgrad=True,
                      maximize=False, decoupled_weight_decay=True)  # fmt: skip
ADAM_L2_STEP = AdamHyper(0.02, 0.9, 0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False,
                         maximize=True, decoupled_weight_decay=False)  # fmt: skip
SIZES_STEP = [5, 0, 4097, 20000, 3]
_LOSS_SCALE = torch.tensor(4.0)  # Adam steps divide the gradients by it (read on the device)


def _sam_state(base: str, sizes=SIZES_STEP, seed: int = 0):
    """Params, two passes of gradients, backups and the base optimizer's state (fresh)."""
    torch.manual_seed(seed)
    ps = _tensors(sizes, torch.float32)
    g1, g2 = _tensors(sizes, torch.float32), _tensors(sizes, torch.float32)
    backups = [torch.empty_like(p) for p in ps]
    if base == "sgd":
        state = [[torch.zeros_like(p) for p in ps]]
    else:
        state = [[torch.zeros_like(p) for p in ps] for _ in range(3)]
        state.append([torch.full((), 2.0) for _ in ps])
    return ps, g1, g2, backups, state


def _restore_step(mod, base: str, ps, g2, backups, state, *, first: bool, found_inf, sumsqs):
    if base == "sgd":
        return mod.restore_sgd_step_(
            ps, g2, backups, state[0], SGD_STEP, first_step=first, grad_scale=None,
            found_inf=found_inf, sumsqs=sumsqs,
        )  # fmt: skip
    hyper = ADAM_STEP if base == "adamw" else ADAM_L2_STEP
    return mod.restore_adam_step_(
        ps, g2, backups, *state[:3], state[3], hyper, grad_scale=_LOSS_SCALE,
        found_inf=found_inf, sumsqs=sumsqs,
    )  # fmt: skip


def _nonfinite(kind: str) -> list[torch.Tensor]:
    return {"inf": [torch.tensor([float("inf")], dtype=torch.float64)],
            "nan": [torch.tensor([1.0, float("nan")], dtype=torch.float64)]}[kind]  # fmt: skip


# Step by step: (found_inf, what breaks the first pass's norm, the second's). Each SAM step of
# a run takes one row.
SKIP_CASES = {
    "none": [(0.0, None, None)] * 3,
    "found_inf": [(0.0, None, None), (1.0, None, None), (0.0, None, None)],
    "nonfinite_pass1": [(0.0, None, None), (None, "inf", None), (0.0, None, None)],
    "nonfinite_pass2": [(None, None, None), (0.0, None, "nan"), (None, None, None)],
}


@pytest.mark.parametrize("base", ["sgd", "adamw", "adam"])
@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_restore_step_returns_the_skip_flag(tb, base: str, case: str) -> None:
    """Three SAM steps (norm, perturb, norm of g2, restore + step) of Triton and the reference
    on twin inputs: the returned 0-dim bool flag, the weights, the optimizer state and Adam's
    step counters agree at every step. A step is skipped by ``found_inf``, or by a non-finite
    total among ``sumsqs`` (pass 1's or pass 2's partials); then the weights are restored and
    the state, counters included, stays as it was."""
    from fused_sam import reference

    runs = {}
    for name, mod in (("triton", tb), ("reference", reference)):
        ps, g1, g2, backups, state = _sam_state(base)
        flags, history = [], []
        for step, (found, bad1, bad2) in enumerate(SKIP_CASES[case]):
            s1 = mod.norm_sq_partials(g1, ps, False, 0.0)
            mod.perturb_(ps, g1, backups, s1, 0.05, 1e-12, False, 0.0, None)
            s2 = mod.norm_sq_partials(g2, ps, False, 0.0)
            sumsqs = [_nonfinite(bad1)[0] if bad1 else s1, _nonfinite(bad2)[0] if bad2 else s2]
            fi = None if found is None else torch.tensor(found)
            flag = _restore_step(mod, base, ps, g2, backups, state, first=step == 0,
                                 found_inf=fi, sumsqs=sumsqs)  # fmt: skip
            assert flag.dtype == torch.bool and flag.shape == () and flag.device == ps[0].device
            flags.append(bool(flag))
            history.append([t.clone() for t in ps + [x for col in state for x in col]])
        runs[name] = flags, history
    (flags, got), (want_flags, want) = runs["triton"], runs["reference"]
    assert flags == want_flags == [row[0] not in (None, 0.0) or bool(row[1] or row[2])
                                   for row in SKIP_CASES[case]]  # fmt: skip
    for step_got, step_want in zip(got, want):
        for a, b in zip(step_got, step_want):
            assert_close(a, b, f"{base} {case}")
    if base != "sgd":  # the counters start at 2 and advance once per step not skipped
        counters = got[-1][-len(SIZES_STEP) :]
        assert all(float(c) == 2 + flags.count(False) for c in counters), counters


def test_skip_flag_is_written_by_the_step_launch(tb, monkeypatch) -> None:
    """The flag comes out of the step kernel itself: an op returning a fresh tensor the kernel
    never writes would return garbage. Here the allocation is poisoned (filled with the wrong
    answer), for both decisions, and for a bucket of empty tensors (one program still runs)."""
    import fused_sam.backends.triton._bodies as bodies

    real_empty = torch.empty

    def poisoned(*args, dtype=None, **kwargs):
        t = real_empty(*args, dtype=dtype, **kwargs)
        if dtype == torch.bool:
            t.fill_(poison)
        return t

    monkeypatch.setattr(bodies.torch, "empty", poisoned)
    for sizes in (SIZES_STEP, [0, 0]):
        for base in ("sgd", "adamw"):
            for skip in (False, True):
                poison = not skip
                ps, _, g2, backups, state = _sam_state(base, sizes)
                found = torch.tensor(float(skip))
                flag = _restore_step(tb, base, ps, g2, backups, state, first=True,
                                     found_inf=found, sumsqs=[])  # fmt: skip
                assert bool(flag) is skip, (sizes, base, skip)
                if base == "adamw":
                    assert all(float(c) == (2.0 if skip else 3.0) for c in state[3])


def test_more_sumsqs_than_kernel_slots(tb) -> None:
    """Five partial sums (the kernel has four slots; the tail shares the last): a non-finite
    one anywhere skips the step, all finite do not."""
    fine = [torch.tensor([float(k)], dtype=torch.float64) for k in range(5)]
    for bad in (None, 0, 3, 4):
        sums = [s.clone() for s in fine]
        if bad is not None:
            sums[bad][0] = float("nan")
        ps, _, g2, backups, state = _sam_state("sgd", [7, 3])
        flag = _restore_step(tb, "sgd", ps, g2, backups, state, first=True, found_inf=None,
                             sumsqs=sums)  # fmt: skip
        assert bool(flag) is (bad is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_total_finalized_on_the_device(tb, dtype: torch.dtype, adaptive: bool) -> None:
    """``norm_sq_partials`` returns one float64 value, the total the launch's last program
    reduced from every program's partial: the reference's total to 1e-12 relative (both sum
    in float64), bit-identical from run to run, with the completion counter back at zero."""
    from fused_sam import reference
    from fused_sam.backends.triton import _table

    sizes = [1, 70000, 0, 4096, 16385, 3]
    gs, ps = _tensors(sizes, dtype), _tensors(sizes, dtype)
    assert _table.pointer_table([gs, ps if adaptive else gs], gs[0].device).n_chunks > 4
    got = tb.norm_sq_partials(gs, ps, adaptive, 0.1)
    assert got.shape == (1,) and got.dtype == torch.float64
    want = reference.norm_sq_partials(gs, ps, adaptive, 0.1)
    torch.testing.assert_close(got, want, atol=0, rtol=1e-12)
    for _ in range(2):
        assert torch.equal(tb.norm_sq_partials(gs, ps, adaptive, 0.1), got)
    assert int(_table.counter(gs[0].device)) == 0
    # A non-finite gradient makes the total non-finite; an all-empty bucket totals 0.
    gs[3][7] = float("inf")
    assert not torch.isfinite(tb.norm_sq_partials(gs, ps, adaptive, 0.1)).any()
    empty = [torch.zeros(0, dtype=dtype)] * 2
    assert torch.equal(tb.norm_sq_partials(empty, empty, adaptive, 0.1), torch.zeros(1).double())


def test_perturb_reads_a_short_total(tb, monkeypatch) -> None:
    """perturb_ reduces the partials it is given: one per bucket now, so its programs read a
    handful of values (a short reduction block), not one per program of the norm."""
    import fused_sam.backends.triton._bodies as bodies

    seen = []
    real = bodies.perturb_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["RBLOCK"])
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(bodies, "perturb_kernel", Spy())
    ps, g1, _, backups, _ = _sam_state("sgd")
    total = tb.norm_sq_partials(g1, ps, False, 0.0)
    tb.perturb_(ps, g1, backups, total, 0.05, 1e-12, False, 0.0, None)
    assert seen == [16]


def _misaligned_bucket(dtype: torch.dtype) -> list[torch.Tensor]:
    """Tensors of several chunks, the second a view one element into its buffer (off the
    16-byte grid), the others aligned."""
    ts = _tensors([20000, 4099, 70000, 3], dtype)
    ts[1] = _tensors([4099], dtype, offset=1)[0]
    return ts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_misaligned_tensor_keeps_vector_access_for_the_others(tb, monkeypatch, dtype) -> None:
    """A bucket with one misaligned tensor: the table marks 16-byte access per tensor (only
    that one off), every kernel is launched in the per-tensor mode (``ALIGNED=2``; the
    all-aligned mode would be wrong for it, the no-vector mode slow for the others), and every
    op's outputs equal the reference's (norm, perturb, restore + SGD and Adam steps, restore,
    dot, a x + b y)."""
    import fused_sam.backends.triton._bodies as bodies
    from fused_sam import reference
    from fused_sam.backends.triton import _table

    modes = {}
    for name in ("norm_kernel", "perturb_kernel", "sgd_kernel", "adam_kernel",
                 "restore_kernel", "dot_kernel", "axpby_kernel"):  # fmt: skip
        real = getattr(bodies, name)

        class Spy:
            def __init__(self, name=name, real=real):
                self.name, self.real = name, real

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    modes[self.name] = kwargs["ALIGNED"]
                    return self.real[grid](*args, **kwargs)

                return launch

        monkeypatch.setattr(bodies, name, Spy())
    results = {}
    for mod_name, mod in (("triton", tb), ("reference", reference)):
        torch.manual_seed(1)
        ps, g1, g2 = (_misaligned_bucket(dtype) for _ in range(3))
        backups = [torch.empty_like(p) for p in ps]
        if mod_name == "triton":
            table = _table.pointer_table([ps, g1, backups], ps[0].device)
            assert table.vector == _table.VECTOR_PER_TENSOR
            n = table.n_tensors
            flags = table.data[2 * table.n_chunks + n : 2 * table.n_chunks + 2 * n]
            assert flags.tolist() == [1, 0, 1, 1]
        s1 = mod.norm_sq_partials(g1, ps, True, 0.1)
        mod.perturb_(ps, g1, backups, s1, 0.05, 1e-12, True, 0.1, None)
        perturbed = [p.clone() for p in ps]
        bufs = [torch.zeros_like(p) for p in ps]
        mod.restore_sgd_step_(ps, g2, backups, bufs, SGD_STEP, first_step=True, grad_scale=None,
                              found_inf=None, sumsqs=[s1])  # fmt: skip
        m, v, vmax = ([torch.zeros_like(p) for p in ps] for _ in range(3))
        steps = [torch.zeros(()) for _ in ps]
        adam_ps = [b.clone() for b in backups]
        mod.restore_adam_step_(adam_ps, g2, backups, m, v, vmax, steps, ADAM_STEP,
                               grad_scale=None, found_inf=None, sumsqs=[s1])  # fmt: skip
        stepped = [p.clone() for p in ps]
        mod.restore_(ps, backups)  # ps[1] is the misaligned one
        dot = mod.dot_partials(g1, g2).sum()
        out = [torch.empty_like(p) for p in ps]
        mod.axpby_(out, g1, g2, torch.tensor([0.5, -2.0], dtype=torch.float64), None)
        results[mod_name] = [s1.sum(), dot, *perturbed, *backups, *stepped, *bufs, *adam_ps, *m,
                             *v, *vmax, *steps, *ps, *out]  # fmt: skip
    assert set(modes.values()) == {_table.VECTOR_PER_TENSOR} and len(modes) == 7, modes
    for a, b in zip(results["triton"], results["reference"]):
        if a.dtype == torch.float64 and a.dim() == 0:
            torch.testing.assert_close(a, b, atol=0, rtol=1e-12)
        else:
            assert_close(a, b, "misaligned bucket")


def test_steady_state_table_lookups_do_no_per_tensor_python_work(tb, monkeypatch) -> None:
    """After a warm-up step, a whole SAM step (norm, perturb, norm, restore + Adam step) finds
    every pointer table, and the result of every argument check, from one C++ layout pass per
    op: no table is built, no tensor's ``data_ptr()`` is called from Python and no per-tensor
    check runs; a reallocated gradient is noticed (a new table, checked again)."""
    from fused_sam.backends.triton import _table, ops

    assert _table._layout_bytes is not None  # the native extension's layout_key
    ps, g1, g2, backups, state = _sam_state("adamw")

    def step() -> None:
        s1 = tb.norm_sq_partials(g1, ps, False, 0.0)
        tb.perturb_(ps, g1, backups, s1, 0.05, 1e-12, False, 0.0, None)
        s2 = tb.norm_sq_partials(g2, ps, False, 0.0)
        _restore_step(tb, "adamw", ps, g2, backups, state, first=False, found_inf=None,
                      sumsqs=[s1, s2])  # fmt: skip

    step()
    bucket = {id(t) for t in [*ps, *g1, *g2, *backups, *(x for col in state for x in col)]}
    builds, pointers, checks = [], [], []
    real_build, real_ptr = _table._build, torch.Tensor.data_ptr
    monkeypatch.setattr(_table, "_build", lambda *a: builds.append(1) or real_build(*a))
    for name in ("_check_like_now", "_unsupported"):  # the per-tensor argument checks
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real: checks.append(1) or real(*a))
    # (The interpreter itself reads the addresses of the launch arguments: the tables, the
    # outputs; not those of the bucket's tensors, which are in the tables.)
    monkeypatch.setattr(
        torch.Tensor, "data_ptr", lambda t: pointers.append(id(t) in bucket) or real_ptr(t)
    )
    step()
    assert builds == [] and not any(pointers) and checks == []
    g2[2] = g2[2].clone()  # as a gradient freed by zero_grad(set_to_none=True) and recomputed
    step()
    assert len(builds) == 2  # the norm of g2 and the restore + step read it
    assert checks  # a new layout is checked again
    # A failing check is not remembered: wrong shapes raise at every call.
    for _ in range(2):
        with pytest.raises(ValueError, match="backups must hold one tensor per parameter"):
            tb.restore_(ps, [*backups[:-1], torch.zeros(4)])


class _OpLog:
    """A TorchDispatchMode recording every op that reaches the dispatcher."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self.ops = []
        self.paused = False
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not outer.paused:
                    log.append(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


STEP_CONFIGS = {
    "sgd": ("sgd", None, False),
    "sgd-amp-bits": ("sgd", "bits", True),
    "adamw-random": ("adamw", "random", False),
    "adam-amp": ("adam", None, True),
}


@pytest.mark.parametrize("config", list(STEP_CONFIGS))
@pytest.mark.parametrize("check_g2", [True, False], ids=["g2-checked", "g2-unchecked"])
def test_steady_state_sam_step_is_four_launches(tb, monkeypatch, config: str, check_g2: bool):
    """A steady-state SAM step on one bucket, everything included (the non-finite checks, the
    skip flag, the scaler's found_inf, Adam's step counters): seen by a TorchDispatchMode it
    is one ``fused_sam_triton`` op per launch and nothing else (no host read such as
    ``aten._local_scalar_dense``); inside those ops, nothing but allocations and the 1-element
    view of the norm's output reaches the dispatcher, and exactly 4 Triton kernels are
    launched (3 when the second pass's norm is not checked). The flag is not skipped and the
    results of three steps equal the reference's."""
    import fused_sam.backends.triton._bodies as bodies
    from fused_sam import reference
    from fused_sam.backends.triton import _registration

    base, mask, amp = STEP_CONFIGS[config]
    n = len(SIZES_STEP)

    def masks_for(ps):
        if mask == "bits":
            return [pack_bits(torch.rand(p.numel(), generator=torch.Generator().manual_seed(i))
                              < 0.5) for i, p in enumerate(ps)]  # fmt: skip
        if mask == "random":
            return RandomMask(keep=0.5, seed=3).bits([tensor_salt(i) for i in range(n)])
        return None

    fi = torch.tensor(0.0) if amp else None  # the scaler's flag, made before the step

    def step(mod, ps, g1, g2, backups, state, masks, first):
        s1 = mod.norm_sq_partials(g1, ps, False, 0.0)
        mod.perturb_(ps, g1, backups, s1, 0.05, 1e-12, False, 0.0, masks)
        sums = [s1, mod.norm_sq_partials(g2, ps, False, 0.0)] if check_g2 else [s1]
        return _restore_step(mod, base, ps, g2, backups, state, first=first, found_inf=fi,
                             sumsqs=sums)  # fmt: skip

    want = _sam_state(base)
    ref_masks = masks_for(want[0])
    for k in range(3):
        step(reference, *want, ref_masks, k == 0)
    got = _sam_state(base)
    masks = masks_for(got[0])
    step(tb, *got, masks, True)  # warm-up: tables built, kernels compiled, counter allocated
    outer = _OpLog()
    with outer.mode:
        flag = step(tb, *got, masks, False)
    expected = 4 if check_g2 else 3
    assert len(outer.ops) == expected, outer.ops
    assert all(op.startswith("fused_sam_triton.") for op in outer.ops), outer.ops
    # Inside the ops: the bodies run under the mode (the registered ops bypassed).
    launches = []
    inner = _OpLog()
    for name in ("norm_kernel", "perturb_kernel", "sgd_kernel", "adam_kernel"):
        real = getattr(bodies, name)

        class Count:
            def __init__(self, name=name, real=real):
                self.name, self.real = name, real

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    # The interpreter's own tensor handling is not the op's: a compiled
                    # launch reaches no dispatcher.
                    launches.append(self.name)
                    inner.paused = True
                    try:
                        return self.real[grid](*args, **kwargs)
                    finally:
                        inner.paused = False

                return launch

        monkeypatch.setattr(bodies, name, Count())
    monkeypatch.setattr(_registration, "_OPS", _registration._IMPLS)
    with inner.mode:
        step(tb, *got, masks, False)
    assert len(launches) == expected, launches
    assert set(inner.ops) <= {"aten.empty", "aten.slice"}, inner.ops
    assert not bool(flag)
    ps, _, _, _, state = got
    for a, b in zip(ps + [x for col in state for x in col],
                    want[0] + [x for col in want[4] for x in col]):  # fmt: skip
        assert_close(a, b, config)
