"""Every op of the GPU backends (``cuda``, ``triton``) against the reference on CUDA tensors.

One test per op family, parametrised over the two backends (they take the same tensors and are
held to the same comparisons of ``test_op_outputs.py``): the norm total and ``e = w_new - w_old``
with and without masks, restore + SGD and restore + Adam step by step (AMP scale 8 with a skipped
step), every op's outputs across pointer-table hits, misses and evictions, tensors off the
16-byte grid beside aligned ones, and int64 offsets past 2^31 elements. Marked ``gpu``: they run
on a lent GPU (``benchmarks/gpu_session.sh``); the CPU suite runs the same checks on the CPU
backends and the interpreted Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_backend
from test_op_outputs import (
    ADAM_CONFIGS,
    ETA,
    RHO,
    SGD_CONFIGS,
    check_adam_steps,
    check_far_elements,
    check_misaligned,
    check_norm,
    check_perturb,
    check_sgd_steps,
    check_table_misses,
    grads_like,
    mask_list,
    op_params,
    per_tensor,
)

from fused_sam.masks import RandomMask, tensor_salt

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# The shapes of the CPU op tests plus tensors of several GPU chunks and about a million elements.
SHAPES = ((1,), (3,), (4097,), (65537,), (), (33, 7), (1 << 20,), (100003,), (1_000_003,))


def _require(backend: str) -> None:
    if not torch.cuda.is_available():
        pytest.fail("-m gpu selected but torch sees no CUDA device")
    require_backend(backend, "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("mask", ["none", "bits", "random"])
def test_norm_and_perturb_outputs(backend: str, dtype: torch.dtype, adaptive: bool, mask: str):
    """The norm total, e = w_new - w_old and the backups, per op; unmasked, bit-packed masks,
    and a random mask drawn in the kernel."""
    _require(backend)
    ps = op_params(dtype, "cuda", SHAPES)
    gs = grads_like(ps)
    n = len(ps)
    ad, eta = [adaptive] * n, per_tensor(ETA, n)
    check_norm(backend, ps, gs, ad, eta)
    masks = mask_list(ps) if mask == "bits" else None
    if mask == "random":
        masks = RandomMask(keep=0.3, seed=2**33 + 5).bits([tensor_salt(i) for i in range(n)])
    for eps in (1e-12, None):
        rho = per_tensor(RHO, n)
        check_perturb(backend, ps, gs, rho=rho, eps=eps, adaptive=ad, eta=eta, masks=masks)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", SGD_CONFIGS)
@pytest.mark.parametrize("amp", [False, True], ids=["no-scale", "scale8"])
def test_sgd_step_outputs(backend: str, dtype: torch.dtype, cfg, amp: bool) -> None:
    """Update and momentum buffers, step by step; AMP scale 8 with a skipped step."""
    _require(backend)
    check_sgd_steps(backend, op_params(dtype, "cuda", SHAPES), cfg, amp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", ADAM_CONFIGS)
@pytest.mark.parametrize("amp", [False, True], ids=["no-scale", "scale8"])
@pytest.mark.parametrize("steps_on", ["cuda", "cpu"])
def test_adam_step_outputs(backend: str, dtype: torch.dtype, cfg, amp: bool, steps_on: str):
    """Update, moments and step counters; the counters on the device (read and advanced in the
    kernel) or on the host (the CUDA backend reads them there; functional routes Triton's to
    foreach, counted)."""
    _require(backend)
    check_adam_steps(backend, op_params(dtype, "cuda", SHAPES), cfg, amp, steps_on=steps_on)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_across_table_hits_misses_and_evictions(backend: str, dtype: torch.dtype):
    """Every op's outputs while its pointer tables hit, miss (gradients reallocated, as by
    ``zero_grad(set_to_none=True)``) and are evicted: the same bits as on fresh tables."""
    _require(backend)
    check_table_misses(backend, op_params(dtype, "cuda", SHAPES))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_tensors(backend: str, dtype: torch.dtype) -> None:
    """Every op on tensors off the 16-byte grid beside aligned ones (one table mixes both),
    against the reference."""
    _require(backend)
    check_misaligned(backend, op_params(dtype, "cuda", SHAPES))


@pytest.mark.slow
@pytest.mark.xdist_group("2_pow_31")  # 13-22 GB each: one at a time under pytest -n
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["perturb", "sgd", "adam"])
def test_over_2_pow_31_elements(backend: str, op: str) -> None:
    """int64 offsets: norm and perturbation, restore + SGD, restore + Adam on a tensor of
    2^31 + 37 elements, at its head, around element 2^31 and at its tail."""
    _require(backend)
    check_far_elements(backend, op)
