"""The native extension ``fused_sam._C``: op registration, CPU kernels, CUDA kernels.

The op-by-op oracle matrix over dtypes and configurations is in ``test_ops.py`` and
``test_op_outputs.py`` (the ``cpu`` backend is one of their parametrisations; the second also
runs each CPU kernel build on many odd sizes and compares the builds bit for bit). This file
adds what is specific to the extension: ``torch.library.opcheck`` on every op, thread count
independence, aliasing, routing of layouts a flat kernel cannot take, whole
:class:`fused_sam.FusedSAM` runs, the reasons reported when the extension is missing, and the
op-output comparisons on CUDA tensors (``-m gpu``; they need a GPU and a CUDA build of the
extension).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_close, require_backend
from test_op_outputs import (
    BUILDS,
    ODD_SIZES,
    bits_equal,
    grads_like,
    odd_size_params,
    op_params,
    twin,
    use_build,
)
from test_ops import check_all
from test_variant_ops import check_axpby

from fused_sam import FusedSAM
from fused_sam import functional as F
from fused_sam.backends import native
from fused_sam.hyperparams import SGDHyper
from fused_sam.masks import pack_bits

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
STEPS = 7


def _ops():
    return torch.ops.fused_sam


def _tensors(sizes, dtype, device="cpu", scale=1.0):
    return [(torch.randn(n, dtype=torch.float64) * scale).to(device, dtype) for n in sizes]


# ---------------------------------------------------------------------------------------------
# opcheck: schemas (mutation annotations), fake implementations, dispatch under aot_autograd


def _opcheck_cases(device: str, dtype: torch.dtype):
    sizes = [5, 17, 40000]
    ps = _tensors(sizes, dtype, device)
    gs = _tensors(sizes, dtype, device)
    bs = [torch.empty_like(p) for p in ps]
    masks = [pack_bits(torch.rand(n, device=device) < 0.5) for n in sizes]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sumsq = torch.tensor([3.0, 4.0], dtype=acc, device=device)
    bufs = [torch.randn_like(p) for p in ps]
    steps = [torch.tensor(float(i), device=device) for i in range(len(ps))]
    scalar = lambda v: torch.tensor(v, device=device)  # noqa: E731
    coefs = torch.tensor([0.5, -2.0], dtype=torch.float64, device=device)
    sgd = dict(lr=0.1, weight_decay=1e-4, momentum=0.9, dampening=0.1, nesterov=True)
    adam = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False)
    cases = {
        "norm_sq_partials": [(gs, ps, False, 0.0), (gs, ps, True, 0.01)],
        "perturb_": [
            (ps, gs, bs, sumsq, 0.05, 1e-12, False, 0.0, []),
            (ps, gs, bs, sumsq, 0.5, 1e-12, True, 0.01, masks),
            (ps, gs, bs, sumsq, 0.5, 1e-12, False, 0.0, [], [7, 2**32 - 1, 0], 2**31 + 9, 3),
        ],
        "restore_": [(ps, bs)],
        "restore_sgd_step_": [
            (
                (ps, gs, bs, bufs),
                dict(
                    sgd,
                    maximize=False,
                    first_step=True,
                    grad_scale=None,
                    found_inf=None,
                    sumsqs=[],
                ),
            ),
            (
                (ps, gs, bs, bufs),
                dict(
                    sgd,
                    maximize=True,
                    first_step=False,
                    grad_scale=scalar(8.0),
                    found_inf=scalar(0.0),
                    sumsqs=[sumsq, sumsq],
                ),
            ),
        ],
        "restore_adam_step_": [
            (
                (ps, gs, bs, [b.abs() for b in bufs], [b.abs() for b in bufs], [], steps),
                dict(
                    adam,
                    amsgrad=False,
                    decoupled_weight_decay=True,
                    grad_scale=None,
                    found_inf=None,
                    sumsqs=[sumsq],
                ),
            ),
            (
                (
                    ps,
                    gs,
                    bs,
                    [b.abs() for b in bufs],
                    [b.abs() for b in bufs],
                    [b.abs() for b in bufs],
                    steps,
                ),
                dict(
                    adam,
                    amsgrad=True,
                    decoupled_weight_decay=False,
                    grad_scale=scalar(2.0),
                    found_inf=scalar(1.0),
                    sumsqs=[],
                ),
            ),
        ],
    }
    # The ops of the SAM variants: a dot of two lists and of a list with itself; out = a x + b y
    # into a third list without and with a zero / nonzero skip flag, and into x itself.
    cases["dot_partials"] = [(gs, ps), (ps, ps)]
    cases["axpby_"] = [
        (bs, ps, gs, coefs, None),
        (bs, ps, gs, coefs, scalar(0.0)),
        (bs, ps, gs, coefs, scalar(1.0)),
        (ps, ps, gs, coefs, None),
    ]
    # The tensor-hyperparameter twins (torch.compile): rho / lr as a CPU scalar tensor, as an
    # LR scheduler keeps a tensor lr.
    cases["perturb_tensor_rho_"] = [
        (*c[:4], torch.tensor(c[4]), *c[5:9], *(c[9:] or ([], 0, 0))) for c in cases["perturb_"]
    ]
    for op in ("restore_sgd_step_", "restore_adam_step_"):
        cases[op.rstrip("_") + "_tensor_lr_"] = [
            (args, {**kwargs, "lr": torch.tensor(kwargs["lr"])}) for args, kwargs in cases[op]
        ]
    return cases


#: Every op of the extension, and the tensor-hyperparameter ops registered beside them.
OPS = [
    "norm_sq_partials",
    "perturb_",
    "restore_",
    "restore_sgd_step_",
    "restore_adam_step_",
    "dot_partials",
    "axpby_",
    "perturb_tensor_rho_",
    "restore_sgd_step_tensor_lr_",
    "restore_adam_step_tensor_lr_",
]


def _normalise(case):
    return case if isinstance(case[-1], dict) and len(case) == 2 else (case, {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_cpu(op: str, dtype: torch.dtype) -> None:
    require_backend("cpu")
    for case in _opcheck_cases("cpu", dtype)[op]:
        args, kwargs = _normalise(case)
        torch.library.opcheck(getattr(_ops(), op).default, args, kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_cuda(op: str, dtype: torch.dtype) -> None:
    _require_cuda()
    for case in _opcheck_cases("cuda", dtype)[op]:
        args, kwargs = _normalise(case)
        torch.library.opcheck(getattr(_ops(), op).default, args, kwargs)


# ---------------------------------------------------------------------------------------------
# CPU kernels beyond the shared matrix


def test_norm_is_independent_of_thread_count() -> None:
    require_backend("cpu")
    gs = _tensors([1_000_003, 7, 300_001], torch.float32)
    ps = _tensors([1_000_003, 7, 300_001], torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.norm_sq_partials(gs, ps, True, 0.01)
        torch.set_num_threads(max(2, before))
        many = native.norm_sq_partials(gs, ps, True, 0.01)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)
    want = sum(((p.double().abs() + 0.01) * g.double()).square().sum() for g, p in zip(gs, ps))
    torch.testing.assert_close(one.double().sum(), want, atol=0, rtol=1e-6)


def _dot_error_bound(a, b) -> float:
    """A few float64 roundings of the sum of ``|a_j b_j|`` (the products themselves are exact)."""
    magnitude = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b))
    return 64 * torch.finfo(torch.float64).eps * magnitude


def _dot_want(a, b) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def test_dot_is_independent_of_thread_count() -> None:
    """Per-chunk float64 partials added in chunk order: the same bits on one thread or many."""
    require_backend("cpu")
    a = _tensors([1_000_003, 7, 300_001], torch.float32)
    b = _tensors([1_000_003, 7, 300_001], torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.dot_partials(a, b)
        torch.set_num_threads(max(2, before))
        many = native.dot_partials(a, b)
    finally:
        torch.set_num_threads(before)
    assert one.shape == (1,) and one.dtype == torch.float64
    assert torch.equal(one, many)
    assert abs(float(one.sum()) - _dot_want(a, b)) <= _dot_error_bound(a, b)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_build_dot_and_axpby(build: str, dtype: torch.dtype, restore_kernels) -> None:
    """dot_partials and axpby_ of each CPU build on the sixteen sizes around the chunk and vector
    boundaries: the dot total at float64 accuracy, and a x + b y into a new list, into x and into
    y bit for bit equal to the reference's (both compute in float64 and convert to the storage
    dtype as torch does)."""
    use_build(build)
    x = odd_size_params(dtype)
    y = grads_like(x, scale=3.0)
    got = native.dot_partials(x, y)
    assert abs(float(got.sum()) - _dot_want(x, y)) <= _dot_error_bound(x, y)
    coefs = torch.tensor([0.9, -1.0 / 3.0], dtype=torch.float64)
    for target in ("new", "x", "y"):
        runs = []
        for backend in ("reference", "cpu"):
            xs, ys = [t.clone() for t in x], [t.clone() for t in y]
            out = {"new": [torch.empty_like(t) for t in x], "x": xs, "y": ys}[target]
            F.axpby_(out, xs, ys, coefs, None, backend)
            runs.append(out)
        assert all(bits_equal(a, b) for a, b in zip(*runs)), target


def test_param_as_its_own_backup_is_a_plain_sgd_step() -> None:
    """``backups[i] is params[i]`` steps without a restore, like torch.optim.SGD."""
    require_backend("cpu")
    ps = _tensors(ODD_SIZES, torch.float32)
    want = [p.clone().requires_grad_() for p in ps]
    gs = _tensors(ODD_SIZES, torch.float32)
    for w, g in zip(want, gs):
        w.grad = g.clone()
    torch.optim.SGD(want, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False).step()
    bufs = [torch.empty_like(p) for p in ps]
    native.restore_sgd_step_(
        ps,
        gs,
        ps,
        bufs,
        SGDHyper(
            lr=0.1, weight_decay=1e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False
        ),
        first_step=True,
        grad_scale=None,
        found_inf=None,
    )
    for a, b in zip(ps, want):
        assert_close(a, b.detach())


def test_stride_mismatch_takes_the_safe_path() -> None:
    """A gradient whose strides differ from its parameter's goes to foreach and stays right."""
    require_backend("cpu")
    p = torch.randn(33, 17)
    g_t = torch.randn(17, 33).t()  # same shape, transposed strides
    ps = [p, torch.randn(100)]
    gs = [g_t, torch.randn(100)]
    assert F.plan("cpu", [ps, gs])[0][0] != F.plan("cpu", [ps, gs])[-1][0]
    out = {}
    for backend in ("reference", "cpu"):
        w = [t.clone() for t in ps]
        b = [torch.empty_like(t) for t in ps]
        s = F.norm_sq(gs, w, [False] * 2, [0.0] * 2, backend=backend)
        F.perturb_(w, gs, b, s, [0.05] * 2, 1e-12, [False] * 2, [0.0] * 2, None, backend)
        out[backend] = w
    check_all(out["cpu"], out["reference"], "params")


def test_type_errors_are_clear() -> None:
    require_backend("cpu")
    p = torch.randn(10)
    with pytest.raises(RuntimeError, match="dtype"):
        native.restore_([p], [p.double()])
    with pytest.raises(RuntimeError, match="not dense"):
        native.restore_([torch.randn(10, 4)[:, ::2]], [torch.randn(10, 2)])
    with torch.no_grad():  # (torch.ops cannot pick a kernel for empty lists; the direct calls can)
        with pytest.raises(RuntimeError, match="empty tensor list"):
            native.restore_([], [])
        assert torch.equal(native.norm_sq_partials([], [], False, 0.0), torch.zeros(1))
        # The variant ops: an empty dot is zero like the norm; axpby_, like perturb_, refuses.
        zero = torch.zeros(1, dtype=torch.float64)
        assert torch.equal(native.dot_partials([], []), zero)
        with pytest.raises(RuntimeError, match="empty tensor list"):
            native.axpby_([], [], [], torch.zeros(2, dtype=torch.float64), None)
    coefs = torch.tensor([1.0, 2.0], dtype=torch.float64)
    strided = torch.randn(10, 4)[:, ::2]
    with pytest.raises(RuntimeError, match="not dense"):
        native.axpby_([strided], [strided], [strided], coefs, None)
    with pytest.raises(RuntimeError, match="coefs must be a 1-D float64 tensor of 2 elements"):
        native.axpby_([p], [p], [p], coefs.reshape(1, 2), None)
    with pytest.raises(RuntimeError, match="shape and strides"):
        native.dot_partials([p], [p.reshape(2, 5)])


# ---------------------------------------------------------------------------------------------
# CPU kernel choice, threads, and the dispatcher-free eager calls


@pytest.mark.parametrize("build", BUILDS)
def test_norm_of_float32_squares_overflow_is_finite(build: str, restore_kernels) -> None:
    """Finite float32 gradients whose squares overflow float32 give their finite float64 norm."""
    use_build(build)
    gs = [torch.full((9,), 3e19), torch.full((4097,), -1e38)]
    s = native.norm_sq_partials(gs, gs, False, 0.0)
    assert s.dtype == torch.float64 and F.nonfinite(s).item() == 0.0
    want = 9 * 3e19**2 + 4097 * float(torch.tensor(-1e38)) ** 2
    torch.testing.assert_close(s.sum().item(), want, atol=0, rtol=1e-12)


def test_kernel_choice_errors_and_auto(restore_kernels) -> None:
    require_backend("cpu")
    builds = native._C.cpu_kernel_builds()
    assert builds[0] == "DEFAULT"
    with pytest.raises(RuntimeError, match=r"no CPU kernel build named 'SSE9'.*available: auto"):
        native._C.use_cpu_kernels("SSE9")
    native._C.use_cpu_kernels("DEFAULT")
    assert native._C.cpu_kernels() == "DEFAULT"
    native._C.use_cpu_kernels("auto")
    assert native._C.cpu_kernels() == builds[-1]


def test_cpu_ops_run_on_every_thread() -> None:
    """at::parallel_for runs in parallel (the build needs -fopenmp when torch uses OpenMP)."""
    require_backend("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert native._C.cpu_parallel_threads() == 2
    finally:
        torch.set_num_threads(before)


_SGD = SGDHyper(
    lr=0.1, weight_decay=1e-4, momentum=0.9, dampening=0.0, nesterov=True, maximize=False
)
_SGD_AMP = dict(first_step=False, grad_scale=None, found_inf=None)


def test_direct_calls_match_the_registered_ops() -> None:
    """Eager no-grad calls skip the dispatcher: same bits as torch.ops. Both bump the version
    counter of every tensor they write (perturb and the step both write the weights)."""
    require_backend("cpu")
    results = []
    for direct in (True, False):
        torch.manual_seed(4)
        ps, gs = _tensors(ODD_SIZES, torch.float32), _tensors(ODD_SIZES, torch.float32)
        bs, bufs = [torch.empty_like(p) for p in ps], [torch.randn_like(p) for p in ps]
        versions = [p._version for p in ps]
        with torch.no_grad():
            if direct:
                s = native.norm_sq_partials(gs, ps, False, 0.0)
                native.perturb_(ps, gs, bs, s, 0.05, 1e-12, False, 0.0, None)
                flag = native.restore_sgd_step_(ps, gs, bs, bufs, _SGD, **_SGD_AMP, sumsqs=[s])
            else:
                s = _ops().norm_sq_partials(gs, ps, False, 0.0)
                _ops().perturb_(ps, gs, bs, s, 0.05, 1e-12, False, 0.0, [])
                flag = _ops().restore_sgd_step_(
                    ps, gs, bs, bufs, **_SGD._asdict(), **_SGD_AMP, sumsqs=[s]
                )
        assert all(p._version >= v + 2 for p, v in zip(ps, versions))
        assert all(b._version >= 1 for b in bufs + bs)
        assert flag.dtype == torch.bool and flag.dim() == 0
        results.append([*ps, *bufs, s, flag])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_direct_variant_ops_match_the_registered_ops(monkeypatch) -> None:
    """Eager no-grad dot_partials and axpby_ take the dispatcher-free calls and give the bits of
    torch.ops; axpby_ bumps the version counter of out either way."""
    require_backend("cpu")
    calls = []

    def spy(name: str):
        real = getattr(native._C, name)

        def call(*args):
            calls.append(name)
            return real(*args)

        return call

    for name in ("direct_dot_partials", "direct_axpby_"):
        monkeypatch.setattr(native._C, name, spy(name))
    a, b = _tensors(ODD_SIZES, torch.float32), _tensors(ODD_SIZES, torch.float32)
    coefs = torch.tensor([0.75, -1.5], dtype=torch.float64)
    results = []
    for direct in (True, False):
        out = [torch.empty_like(t) for t in a]
        versions = [t._version for t in out]
        with torch.no_grad():
            if direct:
                s = native.dot_partials(a, b)
                native.axpby_(out, a, b, coefs, None)
            else:
                s = _ops().dot_partials(a, b)
                _ops().axpby_(out, a, b, coefs, None)
        assert all(t._version >= v + 1 for t, v in zip(out, versions))
        results.append([s, *out])
    assert calls == ["direct_dot_partials", "direct_axpby_"]
    for x, y in zip(*results):
        assert bits_equal(x, y)


def test_direct_calls_only_when_nothing_needs_the_dispatcher(monkeypatch) -> None:
    require_backend("cpu")
    calls = []
    real = native._C.direct_restore_

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(native._C, "direct_restore_", spy)
    p, b = torch.randn(5), torch.randn(5)
    native.restore_([p], [b])  # grad mode on: autograd must see the op
    assert not calls
    with torch.no_grad():
        native.restore_([p], [b])
    assert len(calls) == 1 and torch.equal(p, b)
    # The C++ side declines what is not a plain CPU tensor (the registered op runs instead).
    meta = torch.empty(5, device="meta")
    assert real([meta], [meta]) is False
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad(), FakeTensorMode() as mode:
        fp, fb = mode.from_tensor(p), mode.from_tensor(b)
        native.restore_([fp], [fb])  # a dispatch mode is active: through torch.ops, fake impl
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Whole optimizer runs: None grads, non-finite grads, SGD and AdamW, SAM and ASAM


def _model_params(dtype: torch.dtype):
    torch.manual_seed(5)
    shapes = [(31, 17), (31,), (5, 3, 3, 3), (1,), (4099,)]
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]


def _run_fused_sam(backend: str, base: type, adaptive: bool, dtype: torch.dtype, **kw):
    params = _model_params(dtype)
    opt = FusedSAM(params, base, rho=0.05, adaptive=adaptive, eta=0.01, backend=backend, **kw)
    gen = torch.Generator().manual_seed(11)
    for step in range(STEPS):
        for pass_ in range(2):
            for i, p in enumerate(params):
                # Parameter 3 has no gradient on odd steps; step 4 brings a NaN in pass 1.
                if i == 3 and step % 2:
                    p.grad = None
                    continue
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
                if step == 4 and pass_ == 0 and i == 0:
                    p.grad[3, 5] = float("nan")
            if pass_ == 0:
                opt.first_step()
            else:
                opt.second_step()
    state = [
        {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        for p in params
    ]
    return [p.detach().clone() for p in params], state


@pytest.mark.parametrize(
    "base, kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
        (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    ],
)
@pytest.mark.parametrize("adaptive", [False, True])
def test_fused_sam_matches_reference(base: type, kw: dict, adaptive: bool) -> None:
    require_backend("cpu")
    want_p, want_s = _run_fused_sam("reference", base, adaptive, torch.float32, **kw)
    got_p, got_s = _run_fused_sam("cpu", base, adaptive, torch.float32, **kw)
    check_all(got_p, want_p, "params")
    for i, (a, b) in enumerate(zip(got_s, want_s)):
        assert a.keys() == b.keys(), f"state[{i}] keys"
        for key in a:
            assert_close(a[key].to(b[key].dtype), b[key], f"state[{i}][{key}]")


# ---------------------------------------------------------------------------------------------
# Reasons given when the extension cannot run


def test_reason_when_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_C", None)
    reason = native.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "not built" in reason and "pip install" in reason


def test_reason_when_built_without_cuda() -> None:
    require_backend("cpu")
    reason = native.unavailable_reason(torch.device("cuda"))
    if native._C.with_cuda:
        assert reason is None
    else:
        assert reason is not None and "FUSED_SAM_CUDA=1" in reason
        assert "TORCH_CUDA_ARCH_LIST" in reason


# ---------------------------------------------------------------------------------------------
# CUDA: the same checks on a GPU (pytest -m gpu on a machine with one and a CUDA build)

gpu = pytest.mark.gpu


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("-m gpu selected but torch sees no CUDA device")
    require_backend("cuda", "cuda")


# The shapes of the CPU op tests plus tensors of several CUDA chunks and a million elements.
CUDA_SHAPES = ((1,), (3,), (4097,), (65537,), (), (33, 7), (1_000_003,))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dot_and_axpby_outputs(dtype: torch.dtype) -> None:
    """The variant ops on CUDA tensors: the dot's total (one float64, added up by the kernel's
    last block) at float64 accuracy and the same bits on every call; a x + b y into a new list,
    into x and into y against the reference; a nonzero skip flag on the device writes nothing,
    even over non-finite inputs; coefficients rewritten on the device are read by the next
    launch."""
    _require_cuda()
    x = op_params(dtype, "cuda", CUDA_SHAPES)
    y = grads_like(x, scale=3.0)
    dense = [i for i, t in enumerate(x) if F.is_dense(t)]  # (no Tensor method for it)
    xd, yd = [x[i] for i in dense], [y[i] for i in dense]
    got = native.dot_partials(xd, yd)
    assert got.shape == (1,) == (native._C.cuda_norm_partials,) and got.dtype == torch.float64
    assert got.is_cuda and torch.equal(native.dot_partials(xd, yd), got)
    assert abs(float(got.sum()) - _dot_want(xd, yd)) <= _dot_error_bound(xd, yd)
    coefs = torch.tensor([0.9, -1.0 / 3.0], dtype=torch.float64, device="cuda")
    for target in ("new", "x", "y"):
        runs = []
        for backend in ("reference", "cuda"):
            xs, ys = [twin(t) for t in x], [twin(t) for t in y]
            out = {"new": [torch.empty_like(t) for t in x], "x": xs, "y": ys}[target]
            F.axpby_(out, xs, ys, coefs, None, backend)
            runs.append(out)
        check_axpby(runs[1], runs[0], x, y, 0.9, -1.0 / 3.0)
    out = [torch.zeros_like(t) for t in xd]
    bad = [twin(t) for t in yd]
    bad[0].reshape(-1)[0] = float("nan")
    native.axpby_(out, xd, bad, coefs, torch.ones((), device="cuda"))
    assert all(int(t.count_nonzero()) == 0 for t in out)
    for a, b, flag in ((0.9, -1.0 / 3.0, torch.zeros((), device="cuda")), (-1.0, 0.25, None)):
        coefs.copy_(torch.tensor([a, b], dtype=torch.float64))  # new values, same tensor
        native.axpby_(out, xd, yd, coefs, flag)
        want = [torch.empty_like(t) for t in xd]
        F.axpby_(want, xd, yd, coefs, None, "reference")
        check_axpby(out, want, xd, yd, a, b)


@gpu
def test_cuda_nonfinite_and_zero_gradients_leave_weights_bit_identical() -> None:
    _require_cuda()
    ps = _tensors(ODD_SIZES, torch.float32, "cuda")
    gs = _tensors(ODD_SIZES, torch.float32, "cuda")
    gs[5][3] = float("nan")
    orig = [p.clone() for p in ps]
    n = len(ps)
    s = F.norm_sq(gs, ps, [False] * n, [0.0] * n, backend="cuda")
    assert F.nonfinite(s).item() == 1.0
    b = [torch.empty_like(p) for p in ps]
    F.perturb_(ps, gs, b, s, [0.05] * n, 1e-12, [False] * n, [0.0] * n, None, "cuda")
    for p, o, bb in zip(ps, orig, b):
        assert torch.equal(p, o) and torch.equal(bb, o)
    zero = [torch.zeros_like(p) for p in ps]
    s = F.norm_sq(zero, ps, [False] * n, [0.0] * n, backend="cuda")
    F.perturb_(ps, zero, b, s, [0.05] * n, 1e-12, [False] * n, [0.0] * n, None, "cuda")
    for p, o in zip(ps, orig):
        assert torch.equal(p, o)


def _norm_want(gs) -> float:
    """The float64 sum of squares, summed on the host in another order (the kernels square and
    add in float64 too, so the two agree to float64 rounding over the tensors)."""
    return float(sum(float(g.double().square().sum()) for g in gs))


@gpu
def test_cuda_norm_is_one_deterministic_total_and_a_step_is_three_launches() -> None:
    """norm_sq_partials returns one float64, added up by the kernel's last block: the float64
    total (1e-12 relative; a tensor or a chunk tail left out is far larger), the same bits on
    every call, also between launches of other grid sizes (the ticket counter is back at zero
    after each). A step (norm, perturb, restore + SGD checking that norm) is three launches and
    no host synchronisation once the tables are cached."""
    _require_cuda()
    torch.manual_seed(0)
    sizes = [int(s) for s in torch.randint(1, 5000, (1000,))] + [3_000_001]
    ps = _tensors(sizes, torch.float32, "cuda")
    gs = _tensors(sizes, torch.float32, "cuda")
    ops = _ops()
    first = ops.norm_sq_partials(gs, ps, False, 0.0)
    assert first.shape == (1,) and first.dtype == torch.float64 and first.is_cuda
    assert abs(float(first) - _norm_want(gs)) <= 1e-12 * _norm_want(gs)
    for k in range(5):
        one = ops.norm_sq_partials(gs[k : k + 1], ps[k : k + 1], False, 0.0)  # a grid of 1
        assert abs(float(one) - _norm_want(gs[k : k + 1])) <= 1e-12 * _norm_want(gs[k : k + 1])
        assert bits_equal(ops.norm_sq_partials(gs, ps, False, 0.0), first)
    bufs = [torch.zeros_like(p) for p in ps]
    b = [torch.empty_like(p) for p in ps]

    def step() -> torch.Tensor:
        s = ops.norm_sq_partials(gs, ps, False, 0.0)
        ops.perturb_(ps, gs, b, s, 0.05, 1e-12, False, 0.0, [])
        return ops.restore_sgd_step_(
            ps, gs, b, bufs, lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0,
            nesterov=False, maximize=False, first_step=False, grad_scale=None, found_inf=None,
            sumsqs=[s],
        )  # fmt: skip

    step()  # builds and caches the pointer tables and the stream's workspace
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host read or blocking copy raises
    try:
        flag = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flag.shape == () and flag.dtype == torch.bool and flag.is_cuda and not bool(flag)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = sorted({e.name for e in kernels})
    assert len(kernels) == 3, names


def _sgd_step(ps, gs, b, bufs, **kw) -> torch.Tensor:
    args = {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.9, "dampening": 0.0}
    args |= {"nesterov": True, "maximize": False, "first_step": False}
    args |= {"grad_scale": None, "found_inf": None, "sumsqs": []} | kw
    return _ops().restore_sgd_step_(ps, gs, b, bufs, **args)


def _adam_step(ps, gs, b, m, v, steps, **kw) -> torch.Tensor:
    args = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}
    args |= {"amsgrad": False, "maximize": False, "decoupled_weight_decay": True}
    args |= {"grad_scale": None, "found_inf": None, "sumsqs": []} | kw
    return _ops().restore_adam_step_(ps, gs, b, m, v, [], steps, **args)


@gpu
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_cuda_restore_step_skips_on_device_flags_and_returns_the_decision(base: str) -> None:
    """The restore ops decide the skip on the device from found_inf and the totals of sumsqs
    (any non-finite total skips), return it as a 0-dim bool on the GPU written by the kernel,
    and on a skip restore the weights and leave every state tensor (Adam's step counters
    included) as it was; otherwise they step and Adam's counters advance in the kernel."""
    _require_cuda()
    torch.manual_seed(1)
    sizes = [1, 5, 4097, 70000]
    ps = _tensors(sizes, torch.float32, "cuda")
    gs = _tensors(sizes, torch.float32, "cuda")
    finite = _ops().norm_sq_partials(gs, ps, False, 0.0)
    inf = torch.tensor([1.0, float("inf")], dtype=torch.float64, device="cuda")
    nan = torch.tensor([float("nan")], dtype=torch.float64, device="cuda")
    one, zero = torch.ones(1, device="cuda"), torch.zeros(1, device="cuda")
    state = [torch.randn_like(p) for p in ps] + [torch.rand_like(p) for p in ps]
    steps = [torch.full((), 3.0, device="cuda") for _ in ps]

    def run(**kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
        w = [p.clone() for p in ps]
        b = [p + 1.0 for p in ps]  # the weights before the perturbation
        st = [t.clone() for t in state]
        sc = [t.clone() for t in steps]
        if base == "sgd":
            flag = _sgd_step(w, gs, b, st[: len(ps)], **kw)
        else:
            flag = _adam_step(w, gs, b, st[: len(ps)], st[len(ps) :], sc, **kw)
        assert flag.shape == () and flag.dtype == torch.bool and flag.is_cuda
        skipped = bool(flag)
        for wi, bi in zip(w, b):
            assert bits_equal(wi, bi) == skipped
        assert all(bits_equal(x, y) for x, y in zip(st, state)) == skipped
        if base == "adam":
            assert all(float(c) == (3.0 if skipped else 4.0) for c in sc)
        return flag, w

    for kw in (
        {"sumsqs": [finite, inf]},
        {"sumsqs": [nan]},
        {"sumsqs": [finite], "found_inf": one},
    ):
        assert bool(run(**kw)[0]), kw
    for kw in ({}, {"sumsqs": [finite]}, {"sumsqs": [finite, finite], "found_inf": zero}):
        assert not bool(run(**kw)[0]), kw
    # Checking finite norms does not change the step: the same bits as without them.
    assert all(bits_equal(x, y) for x, y in zip(run()[1], run(sumsqs=[finite])[1]))
    empty = [torch.empty(0, device="cuda")]
    flag = _sgd_step(empty, empty, empty, empty, sumsqs=[inf])
    assert bool(flag)  # no element, still one launch that writes the flag


@gpu
def test_cuda_streams_have_their_own_workspace() -> None:
    """Norms launched on two streams at once (each with its own ticket counter and partials)
    give the bits of the same norms run one after the other."""
    _require_cuda()
    torch.manual_seed(2)
    lists = [_tensors([300_000] * 8, torch.float32, "cuda") for _ in range(2)]
    want = [_ops().norm_sq_partials(g, g, False, 0.0) for g in lists]
    streams = [torch.cuda.Stream() for _ in lists]
    got: list[list[torch.Tensor]] = [[], []]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        for k, (s, g) in enumerate(zip(streams, lists)):
            with torch.cuda.stream(s):
                got[k].append(_ops().norm_sq_partials(g, g, False, 0.0))
    torch.cuda.synchronize()
    for k in range(2):
        assert all(bits_equal(x, want[k]) for x in got[k])


@gpu
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_cuda_native_step_replays_in_a_cuda_graph(base: str) -> None:
    """The CUDA ops with lr and rho as device tensors (fused_sam._C.cuda_*_tensor_*), captured
    in a CUDA graph with both norms, are replayed with a new lr and rho written into their
    tensors before each replay: the weights, the state and the skip flag are the bits of the
    same steps run eagerly with those values as numbers, a non-finite second gradient makes a
    replay skip (weights restored, state kept), and the tables and workspace a capture uses
    outlive it."""
    _require_cuda()
    C = native._C
    torch.manual_seed(3)
    sizes = [7, 4097, 65537, 200_003]
    init = _tensors(sizes, torch.float32, "cuda")

    def setup():
        ps = [p.clone() for p in init]
        state = [torch.zeros_like(p) for p in ps] + [torch.zeros_like(p) for p in ps]
        steps = [torch.zeros((), device="cuda") for _ in ps]
        return ps, [torch.empty_like(p) for p in ps], state, steps

    g1s = [_tensors(sizes, torch.float32, "cuda") for _ in range(6)]
    g2s = [_tensors(sizes, torch.float32, "cuda") for _ in range(6)]
    g2s[4][1][7] = float("inf")  # step 4 is skipped
    rhos = [0.05 * 0.9**k for k in range(6)]
    lrs = [0.1 * 0.8**k for k in range(6)]
    hyper_sgd = {"weight_decay": 1e-3, "momentum": 0.9, "dampening": 0.0, "nesterov": True}
    hyper_sgd |= {"maximize": False, "first_step": False, "grad_scale": None, "found_inf": None}
    hyper_adam = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}
    hyper_adam |= {"amsgrad": False, "maximize": False, "decoupled_weight_decay": True}
    hyper_adam |= {"grad_scale": None, "found_inf": None}

    def step(ps, b, state, steps, g1, g2, rho, lr) -> torch.Tensor:
        n = len(ps)
        s1 = _ops().norm_sq_partials(g1, ps, False, 0.0)
        if isinstance(rho, torch.Tensor):
            C.cuda_perturb_tensor_rho_(ps, g1, b, s1, rho, 1e-12, False, 0.0, [])
        else:
            _ops().perturb_(ps, g1, b, s1, rho, 1e-12, False, 0.0, [])
        s2 = _ops().norm_sq_partials(g2, ps, False, 0.0)
        if base == "sgd":
            fn = C.cuda_restore_sgd_step_tensor_lr_ if isinstance(lr, torch.Tensor) else None
            args = (ps, g2, b, state[:n])
            kw = hyper_sgd | {"lr": lr, "sumsqs": [s1, s2]}
            return fn(*args, **kw) if fn else _ops().restore_sgd_step_(*args, **kw)
        fn = C.cuda_restore_adam_step_tensor_lr_ if isinstance(lr, torch.Tensor) else None
        args = (ps, g2, b, state[:n], state[n:], [], steps)
        kw = hyper_adam | {"lr": lr, "sumsqs": [s1, s2]}
        return fn(*args, **kw) if fn else _ops().restore_adam_step_(*args, **kw)

    ref = setup()
    ref_flags = [bool(step(*ref, g1s[k], g2s[k], rhos[k], lrs[k])) for k in range(6)]
    assert ref_flags == [False] * 4 + [True, False]

    ps, b, state, steps = setup()
    g1 = [t.clone() for t in g1s[0]]
    g2 = [t.clone() for t in g2s[0]]
    rho = torch.tensor(rhos[0], dtype=torch.float64, device="cuda")
    lr = torch.tensor(lrs[0], dtype=torch.float64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: tables cached, the side stream's workspace made
        step(ps, b, state, steps, g1, g2, rho, lr)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    ps0, _, state0, steps0 = setup()  # the captured run starts where the eager one did
    for dst, src in zip(ps + state + steps, ps0 + state0 + steps0):
        dst.copy_(src)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # its own capture stream: a workspace made during capture
        flag = step(ps, b, state, steps, g1, g2, rho, lr)
    flags = []
    for k in range(6):
        for dst, src in zip(g1 + g2, g1s[k] + g2s[k]):
            dst.copy_(src)
        rho.fill_(rhos[k])
        lr.fill_(lrs[k])
        graph.replay()
        flags.append(bool(flag))
    assert flags == ref_flags
    for got, want in zip(ps + state + steps, ref[0] + ref[2] + ref[3]):
        assert bits_equal(got, want)


@gpu
def test_cuda_ops_bump_versions() -> None:
    """The CUDA ops bump the version counter of every tensor they write, like the CPU ones."""
    _require_cuda()
    p, b = torch.randn(5, device="cuda"), torch.randn(5, device="cuda")
    before = p._version
    _ops().restore_([p], [b])
    assert p._version == before + 1 and torch.equal(p, b)


# ---------------------------------------------------------------------------------------------
# CUDA: the vector path loads and stores whole 16-byte packs (checked on the PTX; no GPU needed)

#: 16-byte (loads, stores) of each kernel family's vector path, per instantiation: the
#: norm loads g (and w when adaptive: ``Lb1E``, its first bool template argument); perturb
#: loads w and g and stores the backup and w; restore loads the backup and stores w;
#: restore+SGD loads backup, g and the momentum buffer and stores w and the buffer, plus the
#: restore of a skipped step; restore+Adam loads backup, g, m, v, max v and stores w, m, v,
#: max v, plus that restore; dot loads a and b; axpby loads x and y and stores out.
_VECTOR_ACCESSES = {
    "norm_sq_kernel": {"Lb0E": (1, 0), "Lb1E": (2, 0)},
    "perturb_kernel": (2, 2),
    "restore_kernel": (1, 1),
    "sgd_kernel": (4, 3),
    "adam_kernel": (6, 5),
    "dot_kernel": (2, 0),
    "axpby_kernel": (2, 1),
}
#: A 16-byte vector access in PTX: four 32-bit lanes (float, or the bits of 8 half/bfloat16)
#: or two 64-bit ones (double).
_WIDE = r"\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\s"
#: Instantiations per family: 4 dtypes, times 2 (adaptive) for the norm, times 2 x 3 x 2
#: (adaptive, mask kind, float32/float64 sumsq) for perturb.
_INSTANCES = {name: 4 for name in _VECTOR_ACCESSES} | {"norm_sq_kernel": 8, "perturb_kernel": 48}


def test_cuda_vector_path_loads_and_stores_16_bytes(tmp_path) -> None:
    """Every kernel's vector path is ld.global.cs.v4 / st.global.cs.v4 (SASS LDG/STG.E.EF.128),
    exactly as many as the lists it reads and writes: a plain dereference of a table pointer
    would be a generic ld.v4 (LD.E.128), a lost vector access a scalar one. No kernel keeps
    anything in local memory."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (CI has it: .ci/run refuses to run without it)")
    root = Path(__file__).resolve().parents[1]
    ptx = tmp_path / "sam_kernels.ptx"
    subprocess.run(
        [nvcc, "-std=c++17", "-arch=sm_90", "--fmad=false", f"-I{root / 'csrc'}", "-ptx",
         str(root / "csrc" / "cuda" / "sam_kernels.cu"), "-o", str(ptx)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    entries = re.split(r"\n\.(?:visible )?\.?entry ", ptx.read_text())[1:]
    seen: dict[str, int] = {}
    for body in entries:
        name = body.split("(")[0]
        family = next((k for k in _VECTOR_ACCESSES if k in name), None)
        assert family is not None, f"a kernel this test does not know: {name[-80:]}"
        seen[family] = seen.get(family, 0) + 1
        expected = _VECTOR_ACCESSES[family]
        if isinstance(expected, dict):
            # The first bool template argument after the name: the adaptive flag.
            expected = expected[re.search(r"Lb[01]E", name.split(family, 1)[1]).group()]
        got = (
            len(re.findall(rf"\n\s*ld\.global\.cs{_WIDE}", body)),
            len(re.findall(rf"\n\s*st\.global\.cs{_WIDE}", body)),
        )
        assert got == expected, (name[-80:], got, expected)
        # No other vector access beside them (generic, other cache hints, 8-byte pairs): the
        # tails are scalar lanes.
        others = re.findall(
            r"\n\s*(?:ld|st)(?!\.(?:param|shared|local|const))(?:\.\w+)*\.v[248]\.", body
        )
        assert len(others) == sum(got), (name[-80:], others)
        # Nothing in local memory: e.g. a write to a by-value argument struct, or a dynamic
        # index into one, copies it there (a stack frame per thread, spilled through L1).
        assert ".local" not in body and "__local_depot" not in body, name[-80:]
    assert seen == _INSTANCES


def _cuda_include(nvcc: str) -> Path:
    """The CUDA toolkit's include folder (nvcc may be a wrapper script: ask it)."""
    dryrun = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    found = re.findall(r'INCLUDES="(?:-I)?"?([^"\s]+)', dryrun.stdout + dryrun.stderr)
    for folder in [*found, os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]:
        path = Path(folder)
        if path.name != "include":
            path = path / "include"
        if (path / "cuda_runtime.h").exists():
            return path
    pytest.fail(f"nvcc is at {nvcc} but cuda_runtime.h was not found")


def test_cuda_glue_compiles(tmp_path) -> None:
    """The torch-facing CUDA glue (sam_cuda.cpp) and the CUDA registrations of bindings.cpp
    compile (syntax and types) against this torch's headers and the CUDA toolkit's: a CPU-only
    torch cannot build them, and the GPU machine would otherwise be the first to try."""
    import sysconfig

    import pybind11

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (CI has it: .ci/run refuses to run without it)")
    cuda_include = _cuda_include(nvcc)
    root = Path(__file__).resolve().parents[1]
    torch_include = Path(torch.__file__).parent / "include"
    # A CPU wheel ships c10/cuda's headers but not the one its CMake build generates.
    (tmp_path / "c10" / "cuda" / "impl").mkdir(parents=True)
    (tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [
        root / "csrc",
        torch_include,
        torch_include / "torch" / "csrc" / "api" / "include",
        tmp_path,
        cuda_include,
        sysconfig.get_paths()["include"],
        pybind11.get_include(),
    ]
    for source in ("cuda/sam_cuda.cpp", "bindings.cpp"):
        out = subprocess.run(
            ["c++", "-std=c++20", "-fsyntax-only", "-DFUSED_SAM_WITH_CUDA",
             "-DTORCH_EXTENSION_NAME=_C", *(f"-I{i}" for i in includes),
             str(root / "csrc" / source)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-4000:]
