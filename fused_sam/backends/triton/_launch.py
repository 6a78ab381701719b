"""Launch plumbing shared by the op bodies: traced or tabled launches, placeholders, and the
hyperparameters a kernel reads on the device."""

from __future__ import annotations

from typing import Any

import torch
import triton
from torch import Tensor

from fused_sam.backends.triton import _table

STEPS_BLOCK = 128  # step counters per program of the Adam counter update
RBLOCK = 1024  # norm partials per finalize step


def traced(t: Tensor) -> bool:
    """Fake or functional tensors (torch.compile, opcheck): no addresses to tabulate."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, FunctionalTensor) or is_fake(t)


def direct_launcher(kernel: Any, t: Tensor) -> Any | None:
    """The traceable per-tensor launcher, or ``None`` where nothing may run (fake mode)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    if _table.INTERPRETED:
        if isinstance(t, FunctionalTensor):
            raise RuntimeError(
                "torch.compile cannot trace interpreted Triton kernels (TRITON_INTERPRET=1); "
                "compile on CUDA, or use another backend on CPU"
            )
        return None  # fake mode: the op only has to produce outputs of the right shape
    return torch.library.wrap_triton(kernel)


def dummy(like: Tensor) -> Tensor:
    return torch.empty(1, dtype=torch.int64, device=like.device)


def common(dtype: torch.dtype) -> dict[str, Any]:
    return {"DTYPE": _table.tl_dtype(dtype)}


# ---------------------------------------------------------------------------------------------
# Implementations (the bodies of the registered ops)


def partials(
    kernel: Any,
    lists: list[list[Tensor]],
    scalars: tuple[Any, ...],
    const: dict[str, Any],
    table_lists: list[list[Tensor]] | None = None,
) -> Tensor:
    """Float64 partial sums of a reduction kernel (norm, dot) over a pair of tensor lists.

    One partial per chunk, from one launch over the pointer table of ``table_lists`` (default
    ``lists``), or, traced, from one launch per tensor pair (the same partials); ``(1,)`` zeros
    when every tensor is empty. The kernel takes ``(table, n_tensors, n_chunks, chunk, out,
    *scalars, u, v, numel)`` and the constants ``const`` plus ``DTYPE``, ``ALIGNED``,
    ``DIRECT`` and ``BLOCK``.
    """
    t0 = lists[0][0]
    acc = torch.float64  # partials in float64 for every storage type
    numels = [t.numel() for t in lists[0]]
    geo = _table.geometry(sum(numels))
    const = {**common(t0.dtype), **const, "BLOCK": geo.block}
    if traced(t0):
        launch = direct_launcher(kernel, t0)
        parts = []
        for u, v, n in zip(*lists, numels):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                out = torch.zeros(chunks, dtype=acc, device=t0.device)
                if launch is not None:
                    launch[(chunks,)](
                        dummy(t0), 1, chunks, geo.chunk, out, *scalars, u, v, n,
                        ALIGNED=False, DIRECT=True, **const,
                    )  # fmt: skip
                parts.append(out)
        return torch.cat(parts) if parts else torch.zeros(1, dtype=acc, device=t0.device)
    table = _table.pointer_table(table_lists or lists, numels, geo.chunk, t0.device)
    if table.n_chunks == 0:
        return torch.zeros(1, dtype=acc, device=t0.device)
    out = torch.empty(table.n_chunks, dtype=acc, device=t0.device)
    kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, geo.chunk, out, *scalars,
        table.data, table.data, 0,
        ALIGNED=table.aligned, DIRECT=False, **const,
    )  # fmt: skip
    return out


def amp_args(
    like: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None
) -> tuple[Tensor, Tensor, dict[str, bool]]:
    """``(found_inf, grad_scale, flags)`` with a placeholder for an absent tensor.

    The kernels never read an absent one (its flag is off). Eagerly the placeholder is a
    tensor already at hand (no allocation per step); under tracing a separate empty tensor,
    so that no argument of a traced launch aliases another.
    """
    flags = {"HAS_INF": found_inf is not None, "HAS_SCALE": grad_scale is not None}
    if traced(like):
        placeholder = dummy(like)
    else:
        placeholder = like
    found = found_inf if found_inf is not None else placeholder
    scale = grad_scale if grad_scale is not None else placeholder
    return found, scale, flags


def hyper_arg(like: Tensor, t: Tensor | None) -> Tensor:
    """The pointer argument of a hyperparameter read on the device, or a placeholder that the
    kernel never reads (its flag is off; traced, a tensor of its own, as in :func:`amp_args`)."""
    if t is not None:
        return t
    return dummy(like) if traced(like) else like
