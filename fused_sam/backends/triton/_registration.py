"""Registration of the op bodies with ``torch.library`` and the one entry that runs them.

The ops are registered with ``torch.library.triton_op`` in the ``fused_sam_triton`` namespace,
so ``torch.compile`` traces into them (eager calls go straight to the op bodies, see
:func:`call`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import increment_version

from fused_sam.backends.triton._availability import IMPORT_ERROR

if IMPORT_ERROR is None:
    from fused_sam.backends.triton import _bodies, _launch


#: Each op's body and the list arguments it writes (``triton_op``'s ``mutates_args``); empty
#: without triton (then :func:`fused_sam.backends.triton.unavailable_reason` says why).
_SPECS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = (
    {}
    if IMPORT_ERROR is not None
    else {
        "norm_sq_partials": (_bodies.norm_impl, ()),
        "perturb": (_bodies.perturb_impl, ("params", "backups")),
        "restore": (_bodies.restore_impl, ("params",)),
        "restore_sgd_step": (_bodies.sgd_impl, ("params", "momentum_buffers")),
        "restore_adam_step": (
            _bodies.adam_impl,
            ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
        ),
        "dot_partials": (_bodies.dot_impl, ()),
        "axpby": (_bodies.axpby_impl, ("out",)),
    }
)


def _register() -> dict[str, Callable[..., Any]]:
    """The ops as ``torch.library.triton_op`` custom ops (plain functions if unavailable)."""
    triton_op = getattr(torch.library, "triton_op", None)
    if triton_op is None or IMPORT_ERROR is not None:  # pragma: no cover - old torch
        return {name: fn for name, (fn, _) in _SPECS.items()}
    ops: dict[str, Callable[..., Any]] = {}
    for name, (fn, mutates) in _SPECS.items():
        qualname = f"fused_sam_triton::{name}"
        try:
            ops[name] = triton_op(qualname, fn, mutates_args=mutates)
        except RuntimeError:
            # Already defined (a re-import of this module): use the existing registration.
            ns, op = qualname.split("::")
            ops[name] = getattr(getattr(torch.ops, ns), op)
    return ops


_OPS = _register()
_IMPLS: dict[str, Callable[..., Any]] = {name: fn for name, (fn, _) in _SPECS.items()}
#: Positions of the written lists among each op's arguments.
_WRITTEN: dict[str, tuple[int, ...]] = {
    name: tuple(list(inspect.signature(fn).parameters).index(arg) for arg in mutates)
    for name, (fn, mutates) in _SPECS.items()
}


def call(name: str, *args: Any) -> Any:
    """Run op ``name``: through the dispatcher when traced or observed, straight to its body
    otherwise.

    torch.compile and fake/functional tensors need the registered op; so does a
    ``TorchDispatchMode`` (an op counter, a profiler of dispatched ops), which then sees one
    ``fused_sam_triton`` op per call, as it sees one ATen op per ATen call, not the
    allocations inside the body. Eagerly without a mode the dispatcher only adds cost: for
    lists of hundreds of tensors its per-call overhead (milliseconds on a slow host) would
    exceed the GPU time of a fused step. An eager call bumps the version counter of every
    tensor it writes, as an in-place ATen op does (so autograd refuses a backward through a
    graph that saved one of them before the write).
    """
    first = args[0][0]
    if (
        torch._C._len_torch_dispatch_stack() > 0
        or torch.compiler.is_compiling()
        or _launch.traced(first)
    ):
        return _OPS[name](*args)
    if first.is_cuda and first.device.index != torch.cuda.current_device():
        # Triton launches on the current device: make it the tensors' one (the native CUDA
        # ops hold a CUDAGuard for the same reason).
        with torch.cuda.device(first.device):
            out = _IMPLS[name](*args)
    else:
        out = _IMPLS[name](*args)
    written = [t for i in _WRITTEN[name] for t in args[i]]
    if written:
        increment_version(written)
    return out
