"""Norm partials: one float64 partial sum of squares per program.

Non-finite gradients need no separate flag: a square of inf or nan is inf or nan, so the
partials (and their total, which every consumer re-reduces) are non-finite exactly when some
``T(w) * g`` is.
"""

# No ``from __future__ import annotations`` here: Triton reads the kernels' annotations
# (``tl.float64`` scalars, ``tl.constexpr``) as objects, which every supported version parses.

import triton
import triton.language as tl

from fused_sam.backends.triton._table import chunk_span, f64, pointer


@triton.jit
def norm_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    out,
    eta: tl.float64,
    g_arg,
    w_arg,
    numel_arg,
    DTYPE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r"""Partial sums of squares of the (ASAM-scaled) gradient, one per program.

    .. math:: s_p = \sum_{k \in \text{chunk } p} \big(T(w_k)\, g_k\big)^2,
        \qquad T(w) = |w| + \eta \ \text{(ASAM) or } 1

    Squared and accumulated in float64 per lane over the chunk whatever ``DTYPE`` is (the
    square of a finite float32/16 value never overflows float64, so a finite gradient always
    gives a finite norm), then reduced across lanes: a fixed order for a given ``BLOCK``, so
    repeated runs give bit-identical partials.

    Args:
        table: pointer table (lists: grads, params); unused when ``DIRECT``.
        n_tensors, n_chunks: table dimensions.
        chunk: elements per program.
        out: float64 partials, written at index ``program_id``.
        eta: ASAM offset (runtime, float64).
        g_arg, w_arg, numel_arg: the one tensor pair of a ``DIRECT`` (per-tensor) launch.
        DTYPE: storage type.
        ADAPTIVE: apply ``T(w)`` (params are read only then).
        ALIGNED: every address is 16-byte aligned.
        DIRECT: take the tensors from ``*_arg`` instead of the table (traceable launches).
        BLOCK: elements per vector step.
    """
    pid = tl.program_id(0)
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    g_ptr = pointer(table, n_tensors, n_chunks, t, start, 0, g_arg, DTYPE, ALIGNED, DIRECT)
    w_ptr = pointer(table, n_tensors, n_chunks, t, start, 1, w_arg, DTYPE, ALIGNED, DIRECT)
    eta_c = f64(eta)
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
    tl.store(out + pid, tl.sum(acc, axis=0))
