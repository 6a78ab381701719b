"""The fused step's promise, counted: at most four ops per SAM step per (device, dtype) bucket,
and no host read in steady state.

A steady-state step (after two warm-up steps: state creation, table builds and a mask refresh
happen there) is run under two modes: a ``TorchDispatchMode`` that counts every op reaching the
dispatcher (:func:`fused_sam.cli.bench.dispatched_ops`, the count ``fused-sam bench`` reports),
and a ``TorchFunctionMode`` that records every Python-level read of a tensor's value
(``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``...) anywhere in the step,
inside a backend's own Python code included. On a GPU, ``torch.cuda.set_sync_debug_mode`` turns
any synchronising call into an error as well.

The four ops are: the norm of the first-pass gradients, the perturbation, the norm of the
second-pass gradients (when ``skip_nonfinite`` checks them and no GradScaler did), and the
restore with the base update, which also decides the skip (from the norm partials and the
scaler's flag) and returns ``last_step_skipped``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from conftest import require_backend
from torch.overrides import TorchFunctionMode

from fused_sam import DynamicMask, FusedSAM, RandomMask
from fused_sam.cli.bench import dispatched_ops

#: Tensor methods that read a value back to the host.
_HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}
#: Ops that are host reads (or copies) when they show up in a step.
_HOST_OPS = {"aten._local_scalar_dense", "aten._to_copy", "aten.copy_", "aten.to"}


class _HostReads(TorchFunctionMode):
    """Records every call of a method in :data:`_HOST_READS`, wherever it happens."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func in _HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 8, 3, 3), (16,), (10, 16), (10,), (3,)]
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]


def _grads(params: list[torch.Tensor], k: int) -> None:
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(100 * k + i)
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


#: name -> (base optimizer, its options, FusedSAM's options)
CONFIGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}, {}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}, {}),
    "sgd-nesterov": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, {}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}, {}),
    "adamw-amsgrad": (torch.optim.AdamW, {"lr": 1e-3, "amsgrad": True}, {}),
    "sgd-no-check": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {"skip_nonfinite": False}),
    "sgd-sparse": (
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9},
        {
            "sparsity": 0.5,
            "mask": DynamicMask(drop_rate=0.5, total_steps=100),
            "mask_update_every": 1000,
        },
    ),
    "adamw-random-mask": (torch.optim.AdamW, {"lr": 1e-3}, {"mask": RandomMask(0.5, seed=0)}),
}


def _sam_step(
    opt: FusedSAM, params: list[torch.Tensor], k: int, scaler: bool, count: bool
) -> Counter:
    """One SAM step as a training loop drives it; with ``scaler``, as ``GradScaler.step``
    drives it (``grad_scale`` and ``found_inf`` set on the optimizer for ``step()``). With
    ``count``, the ops of the optimizer's two calls (not those making the gradients). ``k``:
    the step's index, which seeds its gradients."""
    device = params[0].device
    run = (lambda f: dispatched_ops(f, device, warmup=0)) if count else (lambda f: f() or {})
    _grads(params, 2 * k)
    ops = Counter(run(opt.first_step))
    _grads(params, 2 * k + 1)
    if scaler:
        opt.grad_scale = torch.full((), 1.0, device=device)
        opt.found_inf = torch.zeros((), device=device)
        try:
            ops += run(opt.step)
        finally:
            del opt.grad_scale, opt.found_inf
    else:
        ops += run(opt.second_step)
    return ops


def _check(backend: str, device: str, config: str, scaler: bool, dtype: torch.dtype) -> None:
    base, base_kw, sam_kw = CONFIGS[config]
    params = _params(device, dtype)
    opt = FusedSAM(params, base, rho=0.05, backend=backend, **base_kw, **sam_kw)
    with torch.no_grad():
        for k in range(2):  # state creation, table builds, the mask's refresh
            _sam_step(opt, params, k, scaler, count=False)
        with _HostReads() as reads:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                ops = _sam_step(opt, params, 2, scaler, count=True)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
    fused = Counter({k: v for k, v in ops.items() if k.startswith(("fused_sam", "triton"))})
    assert sum(ops.values()) <= 4, (config, dict(ops))
    assert not reads.reads, (config, reads.reads)
    assert not _HOST_OPS & set(ops), (config, dict(ops))
    # The ops are the fused ones: norm, perturb, (norm of g2), restore + step.
    norms = 1 if scaler or not sam_kw.get("skip_nonfinite", True) else 2
    assert sum(fused.values()) == sum(ops.values()) == norms + 2, (config, dict(ops))
    # The flag of the step is the op's own output, a device tensor.
    assert opt.last_step_skipped.dtype == torch.bool
    assert opt.last_step_skipped.device.type == torch.device(device).type
    assert not opt.last_step_skipped  # read after counting: this one is the test's own read


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "scaler"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_steady_state_step_is_at_most_four_ops_and_no_host_read(
    backend: str, config: str, scaler: bool
) -> None:
    require_backend(backend, "cpu")
    _check(backend, "cpu", config, scaler, torch.float32)


#: The GPU cases: every configuration in float32, two of them in bfloat16 as well (each case
#: JIT-compiles Triton kernels: the GPU session has minutes, not hours).
GPU_CASES = [(c, torch.float32) for c in CONFIGS] + [
    ("sgd-momentum", torch.bfloat16),
    ("adamw-amsgrad", torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "scaler"])
@pytest.mark.parametrize(("config", "dtype"), GPU_CASES, ids=[f"{c}-{d}" for c, d in GPU_CASES])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_steady_state_step_is_at_most_four_launches_and_no_sync(
    backend: str, config: str, dtype: torch.dtype, scaler: bool
) -> None:
    _check(backend, "cuda", config, scaler, dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_param_groups_share_the_norms_and_the_perturbation(backend: str) -> None:
    """Two param groups with different base options (weight decay on one): the norms and the
    perturbation stay one op each, the restore+step is one op per group (README)."""
    require_backend(backend, "cpu")
    params = _params("cpu", torch.float32)
    groups = [{"params": params[:3], "weight_decay": 1e-4}, {"params": params[3:]}]
    opt = FusedSAM(groups, torch.optim.SGD, rho=0.05, backend=backend, lr=0.1, momentum=0.9)
    with torch.no_grad():
        for k in range(2):
            _sam_step(opt, params, k, False, count=False)
        with _HostReads() as reads:
            ops = _sam_step(opt, params, 2, False, count=True)
    assert not reads.reads, reads.reads
    # fused_sam.perturb_ or fused_sam_triton.perturb: the op's name without its namespace
    names = {k.split(".")[-1].rstrip("_"): v for k, v in ops.items()}
    assert sum(ops.values()) == 5, dict(ops)
    assert names == {"norm_sq_partials": 2, "perturb": 1, "restore_sgd_step": 2}, dict(ops)


def test_the_counter_sees_host_reads_and_extra_ops() -> None:
    """The two modes catch what they must: a value read back and an op outside the four."""
    t = torch.ones(3)
    with torch.no_grad(), _HostReads() as reads:
        ops = dispatched_ops(lambda: (t.sum().item(), t.add_(1)), "cpu", warmup=0)
    assert reads.reads == ["item"]
    assert "aten._local_scalar_dense" in ops and "aten.add_" in ops
