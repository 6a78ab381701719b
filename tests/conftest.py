"""Shared test configuration.

Triton kernels run on CPU tensors through the interpreter when no GPU is present, so the flag
must be set before anything imports triton.

A backend that should exist in this environment and is missing is a failure, not a skip: the
native extension is built by the normal install and Triton is a dependency. Only an explicit
``FUSED_SAM_ALLOW_MISSING=cpu,triton`` (e.g. for a pure-Python install) turns that into a skip.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_sam import functional as F

ALLOW_MISSING = {s for s in os.environ.get("FUSED_SAM_ALLOW_MISSING", "").split(",") if s}

#: Backends compared against the reference on CPU tensors.
CPU_BACKENDS = ["foreach", "cpu", "triton"]

#: (atol, rtol) per dtype: the project's comparison tolerances for each storage type.
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-3, 1e-2),
    torch.float16: (1e-4, 1e-3),
}


def require_backend(name: str, device: str | torch.device = "cpu") -> None:
    """Fail (or, if explicitly allowed, skip) when backend ``name`` cannot run on ``device``."""
    device = torch.device(device)
    reason = F.unavailable_reason(name, device)
    if reason is None:
        return
    if name == "triton" and device.type == "cpu" and torch.cuda.is_available():
        # With a GPU the kernels run compiled (the ``gpu`` tests); the interpreter, which CPU
        # tensors need, is CI's and cannot share a process with compiled kernels.
        pytest.skip("Triton on CPU tensors needs the interpreter; this machine runs it compiled")
    if name in ALLOW_MISSING:
        pytest.skip(f"backend {name!r} allowed missing: {reason}")
    pytest.fail(f"backend {name!r} should be available here but is not: {reason}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Compare at the tolerance of ``expected``'s dtype."""
    atol, rtol = TOL[expected.dtype]
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, msg=lambda detail: f"{msg}\n{detail}"
    )


# The Triton interpreter runs the SGD/Adam steps of the oracle matrix (test_ops.py) and of the
# op-output comparisons (test_op_outputs.py) about 10x slower than the other CPU backends. Its
# default run keeps every code path of the kernels: every config in float32 (each combination
# of flags), and every other dtype with the config that writes all optimizer state (its
# rounding and compute type); the other combinations add no path and run under ``-m slow``.
# Test name -> (config list in its module, the entry kept for every dtype).
_TRITON_ALL_DTYPES_CFG = {
    "test_restore_sgd_step": ("SGD_CONFIGS", 1),
    "test_restore_adam_step": ("ADAM_CONFIGS", 2),
    "test_sgd_step_update_and_state": ("SGD_CONFIGS", 2),
    "test_adam_step_update_and_state": ("ADAM_CONFIGS", 2),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is None or spec.params.get("backend") != "triton":
            continue
        keep = _TRITON_ALL_DTYPES_CFG.get(getattr(item, "originalname", ""))
        if keep is None or spec.params.get("dtype") == torch.float32:
            continue
        configs, index = keep
        if spec.params.get("cfg") is not getattr(item.module, configs)[index]:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def restore_kernels():
    """Put the CPU ops back on the automatic kernel build after a test that switches builds."""
    yield
    from fused_sam.backends import native

    if native._C is not None:
        native._C.use_cpu_kernels("auto")
