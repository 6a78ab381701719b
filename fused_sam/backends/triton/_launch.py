"""Launch plumbing shared by the op bodies: traced or tabled launches, placeholders, and the
hyperparameters a kernel reads on the device."""

from __future__ import annotations

from typing import Any

import torch
import triton
from torch import Tensor

from fused_sam.backends.triton import _table

STEPS_BLOCK = 1024  # step counters per step of the Adam kernel's counter update
RBLOCK = 1024  # partials per step of a norm or dot launch's final reduction
#: The most norm partials the restore kernels take as separate arguments (``s0..s3``).
MAX_SUMSQS = 4


def rblock(n: int) -> int:
    """Partials per step of a consumer's reduction of ``n`` partials (a short block for the
    one-per-bucket totals of the fused norm ops)."""
    return 16 if n <= 16 else RBLOCK


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
    const: dict[str, Any],
    scalars: tuple[Any, ...] = (),
    table_lists: list[list[Tensor]] | None = None,
) -> Tensor:
    """The float64 total of a reduction kernel (norm, dot) over a pair of tensor lists, as a
    1-element tensor.

    One launch over the pointer table of ``table_lists`` (default ``lists``): one partial per
    program, reduced on the device by the launch's last program in a fixed order (see
    :func:`.norm.norm_kernel`); a bucket of empty tensors gets one program and total 0.
    Traced, one launch per tensor pair and a sum of their partials (one value as well). The
    kernel takes ``(table, n_tensors, n_chunks, chunk, out, counter, n_programs, *scalars, u,
    v, numel)`` and the constants ``const`` plus ``DTYPE``, ``ALIGNED``, ``DIRECT``, ``BLOCK``
    and ``RBLOCK``.
    """
    t0 = lists[0][0]
    acc = torch.float64  # partials in float64 for every storage type
    const = {**common(t0.dtype), **const, "RBLOCK": RBLOCK}
    if traced(t0):
        numels = [t.numel() for t in lists[0]]
        geo = _table.geometry(sum(numels))
        launch = direct_launcher(kernel, t0)
        parts = []
        for u, v, n in zip(*lists, numels):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                out = torch.zeros(chunks, dtype=acc, device=t0.device)
                if launch is not None:
                    launch[(chunks,)](
                        dummy(t0), 1, chunks, geo.chunk, out, dummy(t0), chunks, *scalars, u, v,
                        n, ALIGNED=0, DIRECT=True, BLOCK=geo.block, **const,
                    )  # fmt: skip
                parts.append(out)
        if not parts:
            return torch.zeros(1, dtype=acc, device=t0.device)
        return torch.cat(parts).sum(0, keepdim=True)
    table = _table.pointer_table(table_lists or lists, t0.device)
    n_programs = max(table.n_chunks, 1)
    out = torch.empty(1 + n_programs, dtype=acc, device=t0.device)
    kernel[(n_programs,)](
        table.data, table.n_tensors, table.n_chunks, table.chunk, out,
        _table.counter(t0.device), n_programs, *scalars, table.data, table.data, 0,
        ALIGNED=table.vector, DIRECT=False, BLOCK=table.block, **const,
    )  # fmt: skip
    return out[:1]


def sumsq_args(like: Tensor, sumsqs: list[Tensor]) -> tuple[list[Any], int, int]:
    """``([s0, n0, ..., s3, n3], NSUM, RBLOCK)``: the norm partials a restore kernel checks.

    Each entry is read as flat float64-convertible memory (made contiguous if it is not).
    More than :data:`MAX_SUMSQS` entries: the tail is concatenated into the last slot (an
    extra op; the total of a concatenation is non-finite when one of its parts' is, as the
    partials of a squared norm are never negative). Unused slots get a placeholder the kernel
    never reads.
    """
    entries = [s.reshape(-1) if s.dim() != 1 else s for s in sumsqs]
    entries = [s if s.is_contiguous() else s.contiguous() for s in entries]
    if len(entries) > MAX_SUMSQS:
        entries = [*entries[: MAX_SUMSQS - 1], torch.cat(entries[MAX_SUMSQS - 1 :])]
    args: list[Any] = []
    longest = 1
    for k in range(MAX_SUMSQS):
        if k < len(entries):
            args += [entries[k], entries[k].numel()]
            longest = max(longest, entries[k].numel())
        else:
            args += [hyper_arg(like, None), 0]
    return args, len(entries), rblock(longest)


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
