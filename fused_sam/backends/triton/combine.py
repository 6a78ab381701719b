"""The ops of the SAM variants: float64 dot-product partials and ``out = a x + b y``.

LookSAM, GSAM and F-SAM combine gradients with global dot products and with linear
combinations whose coefficients come from those products. Both kernels compute in float64
for every storage type: a product of two float32 (or lower) values is exact there, so a dot
product only rounds in its sums, and ``a x + b y`` only rounds on store.
"""

# No ``from __future__ import annotations`` here: Triton reads the kernels' annotations
# (``tl.constexpr``) as objects, which every supported version parses.

import triton
import triton.language as tl

from fused_sam.backends.triton._table import (
    block_flag,
    chunk_span,
    last_program,
    pointer,
    to_storage,
    total,
    vectorised,
)


@triton.jit
def _product(a, b):
    # Exact in float64 for float32/16 inputs: the only rounding of a dot product is its sums.
    return a.to(tl.float64) * b.to(tl.float64)


@triton.jit
def _dot_chunk(
    table, n_tensors, n_chunks, t, start, count, a_arg, b_arg, DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr, DIRECT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The float64 dot product of one chunk (per lane, then across lanes: a fixed order)."""
    a_ptr = pointer(table, n_tensors, n_chunks, t, start, 0, a_arg, DTYPE, ALIGNED, DIRECT)
    b_ptr = pointer(table, n_tensors, n_chunks, t, start, 1, b_arg, DTYPE, ALIGNED, DIRECT)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    full = count - count % BLOCK
    for i in range(0, full, BLOCK):
        acc += _product(tl.load(a_ptr + i + lanes), tl.load(b_ptr + i + lanes))
    if full < count:
        offs = full + lanes
        inb = offs < count
        a = tl.load(a_ptr + offs, mask=inb, other=0.0)
        acc += _product(a, tl.load(b_ptr + offs, mask=inb, other=0.0))
    return tl.sum(acc, axis=0)


@triton.jit
def dot_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    out,
    counter,
    n_programs,
    a_arg,
    b_arg,
    numel_arg,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    r"""The dot product of two tensor lists: one partial per program, and the total written
    once per launch by its last program (as :func:`.norm.norm_kernel` does its sum).

    .. math:: s_p = \sum_{k \in \text{chunk } p} a_k\, b_k, \qquad s = \sum_p s_p

    Each product is taken in float64 (exact for float32/16 inputs) and accumulated in float64
    per lane over the chunk, then reduced across lanes; the last program reduces the partials
    in a fixed order, so repeated runs give bit-identical totals. An inf or nan entry makes
    the total non-finite (``inf * 0`` is nan).

    Args:
        table: pointer table (lists: a, b); unused when ``DIRECT``.
        n_tensors, n_chunks: table dimensions.
        chunk: elements per program.
        out: float64, ``1 + n_programs`` values: the total, then the partials (``DIRECT``:
            one partial per program, no total).
        counter: the stream's zeroed int32 completion counter.
        n_programs: programs of the launch (``max(n_chunks, 1)``).
        a_arg, b_arg, numel_arg: the one tensor pair of a ``DIRECT`` (per-tensor) launch.
        DTYPE: storage type.
        ALIGNED: 16-byte access: 0 none, 1 every tensor, 2 per tensor (its table flag).
        DIRECT: take the tensors from ``*_arg`` instead of the table (traceable launches).
        BLOCK: elements per vector step; RBLOCK: partials per step of the final reduction.
    """
    pid = tl.program_id(0)
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    if ALIGNED == 2:
        if vectorised(table, n_tensors, n_chunks, t):
            part = _dot_chunk(table, n_tensors, n_chunks, t, start, count, a_arg, b_arg, DTYPE,
                              True, DIRECT, BLOCK)  # fmt: skip
        else:
            part = _dot_chunk(table, n_tensors, n_chunks, t, start, count, a_arg, b_arg, DTYPE,
                              False, DIRECT, BLOCK)  # fmt: skip
    else:
        part = _dot_chunk(table, n_tensors, n_chunks, t, start, count, a_arg, b_arg, DTYPE,
                          ALIGNED == 1, DIRECT, BLOCK)  # fmt: skip
    if DIRECT:
        tl.store(out + pid, part)
    else:
        tl.store(out + 1 + pid, part)
        if last_program(counter, n_programs):
            tl.store(out, total(out + 1, n_programs, RBLOCK, True))


@triton.jit
def to_out(x, DTYPE: tl.constexpr):
    r"""The float64 ``x`` stored as ``DTYPE`` the way ``torch``'s ``x.to(dtype)`` stores it.

    float64 and float32 are one round-to-nearest-even. bfloat16 and float16 go through float32,
    as torch's float64 conversions to them do (and so the reference's ``.to(out.dtype)``):

    .. math:: \mathrm{out} = \mathrm{rn}_{T}\big(\mathrm{rn}_{32}(x)\big)

    So an unfused ``a x + b y`` stores exactly what the reference stores. A correctly rounded
    ``rn_T(x)`` would differ where ``x`` lies within half a float32 ulp of a tie of ``T``
    without being one: rare for arbitrary values, but ``a x + b y`` with inputs of 8 or 11
    significant bits lands there on about 0.2% of the elements for coefficients such as
    ``(0.9, 1/30)`` (with the exact coefficients the result would be a tie; their float64
    roundings move it off by about a float64 ulp). Through float32 such a value stays on the
    tie, so it does not depend on whether a multiply-add is fused either.
    """
    if DTYPE == tl.float64:
        return x
    else:
        return to_storage(x.to(tl.float32), DTYPE)


@triton.jit
def _axpby(o_ptr, x_ptr, y_ptr, offs, mask, a, b, DTYPE: tl.constexpr):
    # ``mask`` is None for a full block of an unflagged call: unmasked, vectorisable accesses.
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float64)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float64)
    tl.store(o_ptr + offs, to_out(a * x + b * y, DTYPE), mask=mask)


@triton.jit
def _axpby_chunk(
    table, n_tensors, n_chunks, t, start, count, o_arg, x_arg, y_arg, a, b, live,
    DTYPE: tl.constexpr, HAS_SKIP: tl.constexpr, ALIGNED: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    o_ptr = pointer(table, n_tensors, n_chunks, t, start, 0, o_arg, DTYPE, ALIGNED, DIRECT)
    x_ptr = pointer(table, n_tensors, n_chunks, t, start, 1, x_arg, DTYPE, ALIGNED, DIRECT)
    y_ptr = pointer(table, n_tensors, n_chunks, t, start, 2, y_arg, DTYPE, ALIGNED, DIRECT)
    lanes = tl.arange(0, BLOCK)
    full = count - count % BLOCK
    smask = None
    if HAS_SKIP:
        smask = block_flag(live, BLOCK)
    for i in range(0, full, BLOCK):
        _axpby(o_ptr, x_ptr, y_ptr, i + lanes, smask, a, b, DTYPE)
    if full < count:
        offs = full + lanes
        inb = offs < count
        if HAS_SKIP:
            inb = tl.where(live, inb, False)
        _axpby(o_ptr, x_ptr, y_ptr, offs, inb, a, b, DTYPE)


@triton.jit
def axpby_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    coefs,
    skip,
    o_arg,
    x_arg,
    y_arg,
    numel_arg,
    DTYPE: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r"""``out = a x + b y`` for one chunk of one tensor, unless the skip flag is set.

    .. math:: out_k \leftarrow \mathrm{round}(a\, x_k + b\, y_k), \qquad (a, b) = (c_0, c_1)

    In float64 whatever ``DTYPE`` is, then stored as ``torch``'s conversion stores a float64
    value (:func:`to_out`: once for float32, through float32 for bfloat16/float16), so
    ``1 x + 0 y`` is ``x`` bit for bit. The coefficients are loaded from the device tensor
    ``coefs`` (no host read: the launch can be captured in a CUDA graph, and new values need
    neither a recompile nor a new capture). With ``HAS_SKIP`` the flag ``skip`` is loaded too,
    and when it is nonzero (nan included) every load and store is masked off: nothing is
    written.

    ``out`` may be ``x`` or ``y`` itself: every element is read and then written by the same
    lane of the same program.

    Args:
        table: pointer table (lists: out, x, y); unused when ``DIRECT``.
        n_tensors, n_chunks, chunk: table dimensions and elements per program.
        coefs: two contiguous float64 values ``(a, b)`` on the device.
        skip: with ``HAS_SKIP``, a one-element flag tensor on the device.
        o_arg, x_arg, y_arg, numel_arg: the tensors of a ``DIRECT`` launch.
        DTYPE: storage type.
        HAS_SKIP: read ``skip``.
        ALIGNED, DIRECT, BLOCK: as in the other kernels of this package.
    """
    a = tl.load(coefs).to(tl.float64)
    b = tl.load(coefs + 1).to(tl.float64)
    live = tl.full([], 1, tl.int1)
    if HAS_SKIP:
        live = tl.load(skip) == 0
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    if ALIGNED == 2:
        if vectorised(table, n_tensors, n_chunks, t):
            _axpby_chunk(table, n_tensors, n_chunks, t, start, count, o_arg, x_arg, y_arg, a, b,
                         live, DTYPE, HAS_SKIP, True, DIRECT, BLOCK)  # fmt: skip
        else:
            _axpby_chunk(table, n_tensors, n_chunks, t, start, count, o_arg, x_arg, y_arg, a, b,
                         live, DTYPE, HAS_SKIP, False, DIRECT, BLOCK)  # fmt: skip
    else:
        _axpby_chunk(table, n_tensors, n_chunks, t, start, count, o_arg, x_arg, y_arg, a, b,
                     live, DTYPE, HAS_SKIP, ALIGNED == 1, DIRECT, BLOCK)  # fmt: skip
