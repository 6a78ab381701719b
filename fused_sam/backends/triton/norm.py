"""Squared norm: float64 partial sums per program, finalized once per launch on the device.

Non-finite gradients need no separate flag: a square of inf or nan is inf or nan, so the
total is non-finite exactly when some ``T(w) * g`` is.
"""

# No ``from __future__ import annotations`` here: Triton reads the kernels' annotations
# (``tl.float64`` scalars, ``tl.constexpr``) as objects, which every supported version parses.

import triton
import triton.language as tl

from fused_sam.backends.triton._table import (
    chunk_span,
    f64,
    last_program,
    pointer,
    total,
    vectorised,
)


@triton.jit
def _norm_chunk(
    table, n_tensors, n_chunks, t, start, count, eta_c, g_arg, w_arg, DTYPE: tl.constexpr,
    ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr, DIRECT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The float64 sum of squares of one chunk (per lane over the chunk, then across lanes:
    a fixed order for a given ``BLOCK``)."""
    g_ptr = pointer(table, n_tensors, n_chunks, t, start, 0, g_arg, DTYPE, ALIGNED, DIRECT)
    w_ptr = pointer(table, n_tensors, n_chunks, t, start, 1, w_arg, DTYPE, ALIGNED, DIRECT)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    full = count - count % BLOCK
    for i in range(0, full, BLOCK):
        g = tl.load(g_ptr + i + lanes).to(tl.float64)
        if ADAPTIVE:
            g = (tl.abs(tl.load(w_ptr + i + lanes).to(tl.float64)) + eta_c) * g
        acc += g * g
    if full < count:
        offs = full + lanes
        inb = offs < count
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float64)
        if ADAPTIVE:
            g = (tl.abs(tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float64)) + eta_c) * g
        acc += g * g
    return tl.sum(acc, axis=0)


@triton.jit
def norm_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    out,
    counter,
    n_programs,
    eta: tl.float64,
    g_arg,
    w_arg,
    numel_arg,
    DTYPE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    r"""Sum of squares of the (ASAM-scaled) gradient: one partial per program, and the total
    written once per launch by its last program.

    .. math:: s_p = \sum_{k \in \text{chunk } p} \big(T(w_k)\, g_k\big)^2,
        \qquad T(w) = |w| + \eta \ \text{(ASAM) or } 1, \qquad s = \sum_p s_p

    Squared and accumulated in float64 per lane over the chunk whatever ``DTYPE`` is (the
    square of a finite float32/16 value never overflows float64, so a finite gradient always
    gives a finite norm), then reduced across lanes. A table launch stores its partial at
    ``out[1 + pid]``; the last program to finish (:func:`._table.last_program`) reduces the
    ``n_programs`` partials in a fixed order (:func:`._table.total`) and stores ``s`` at
    ``out[0]``: repeated runs give bit-identical totals whichever program comes last, and the
    consumers (perturb, the restore ops' non-finite check) read one value instead of
    re-reducing every partial in every program. A ``DIRECT`` launch (one tensor, traced) only
    stores its partials at ``out[pid]``.

    Args:
        table: pointer table (lists: grads, params); unused when ``DIRECT``.
        n_tensors, n_chunks: table dimensions.
        chunk: elements per program.
        out: float64, ``1 + n_programs`` values (``DIRECT``: one per program).
        counter: the stream's zeroed int32 completion counter (:func:`._table.counter`).
        n_programs: programs of the launch (``max(n_chunks, 1)``: a bucket of empty tensors
            still gets its total, 0).
        eta: ASAM offset (runtime, float64).
        g_arg, w_arg, numel_arg: the one tensor pair of a ``DIRECT`` (per-tensor) launch.
        DTYPE: storage type.
        ADAPTIVE: apply ``T(w)`` (params are read only then).
        ALIGNED: 16-byte access: 0 none, 1 every tensor, 2 per tensor (its table flag).
        DIRECT: take the tensors from ``*_arg`` instead of the table (traceable launches).
        BLOCK: elements per vector step; RBLOCK: partials per step of the final reduction.
    """
    pid = tl.program_id(0)
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    eta_c = f64(eta)
    if ALIGNED == 2:
        if vectorised(table, n_tensors, n_chunks, t):
            part = _norm_chunk(table, n_tensors, n_chunks, t, start, count, eta_c, g_arg,
                               w_arg, DTYPE, ADAPTIVE, True, DIRECT, BLOCK)  # fmt: skip
        else:
            part = _norm_chunk(table, n_tensors, n_chunks, t, start, count, eta_c, g_arg,
                               w_arg, DTYPE, ADAPTIVE, False, DIRECT, BLOCK)  # fmt: skip
    else:
        part = _norm_chunk(table, n_tensors, n_chunks, t, start, count, eta_c, g_arg, w_arg,
                           DTYPE, ADAPTIVE, ALIGNED == 1, DIRECT, BLOCK)  # fmt: skip
    if DIRECT:
        tl.store(out + pid, part)
    else:
        tl.store(out + 1 + pid, part)
        if last_program(counter, n_programs):
            tl.store(out, total(out + 1, n_programs, RBLOCK, True))
