"""Perturb: on-device norm finalize, backup, ``w <- w + e`` with optional bit mask and ASAM."""

# No ``from __future__ import annotations`` here: Triton reads the kernels' annotations
# (``tl.float64`` scalars, ``tl.constexpr``) as objects, which every supported version parses.

import triton
import triton.language as tl

from fused_sam.backends.triton._table import address, f64, locate, to_storage


@triton.jit
def finalize(sumsq, n_partials, rho, eps, RBLOCK: tl.constexpr):
    r"""Reduce the norm partials in a fixed order and return ``(scale, finite)``.

    .. math:: n = \sqrt{\textstyle\sum_k s_k}, \qquad
        \mathrm{scale} = \begin{cases} \rho / (n + \epsilon) & n \text{ finite} \\
        0 & \text{otherwise} \end{cases}

    In float64 whatever the partials' type (as the reference does), so every program of a
    launch computes the identical scale without any host round trip.
    """
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    for i in range(0, n_partials, RBLOCK):
        offs = i + tl.arange(0, RBLOCK)
        acc += tl.load(sumsq + offs, mask=offs < n_partials, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0)
    finite = total < float("inf")  # false for +inf and for nan
    scale = tl.where(finite, rho / (tl.sqrt(total) + eps), 0.0)
    return scale, finite


@triton.jit
def _perturb(
    w_ptr,
    g_ptr,
    b_ptr,
    m_ptr,
    offs,
    inb,
    scale,
    eta,
    finite,
    ADAPTIVE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DTYPE: tl.constexpr,
):
    # ``inb`` is None for a full block: unmasked, vectorisable accesses.
    w_raw = tl.load(w_ptr + offs, mask=inb)
    tl.store(b_ptr + offs, w_raw, mask=inb)
    g = tl.load(g_ptr + offs, mask=inb).to(scale.dtype)
    w = w_raw.to(scale.dtype)
    if ADAPTIVE:
        t = tl.abs(w) + eta
        e = scale * t * t * g
    else:
        e = scale * g
    new = to_storage(w + e, DTYPE)
    if HAS_MASK:
        byte = tl.load(m_ptr + (offs >> 3), mask=inb)
        new = tl.where(((byte.to(tl.int32) >> (offs & 7)) & 1) != 0, new, w_raw)
    # Where nothing moves, the loaded bits go back untouched (w + 0 would turn -0.0 into +0.0).
    # (Two selects: the interpreter cannot AND a scalar flag into a block of flags.)
    tl.store(w_ptr + offs, tl.where(finite, new, w_raw), mask=inb)


@triton.jit
def perturb_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    sumsq,
    n_partials,
    rho: tl.float64,
    eps: tl.float64,
    eta: tl.float64,
    w_arg,
    g_arg,
    b_arg,
    m_arg,
    numel_arg,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    r"""Write ``b = w`` and ``w \leftarrow w + e`` for one chunk of one tensor.

    .. math:: e = \mathrm{scale} \cdot T(w)^2\, g \odot m,
        \qquad T(w) = |w| + \eta \ \text{(ASAM) or } 1

    computed in ``ACC`` and rounded once on store. When the norm is not finite the weights
    keep their exact bits (the backup is written either way); a zero gradient gives
    ``e = 0`` exactly, because the scale is finite (``rho / eps`` at worst).

    Args:
        table: pointer table (lists: params, grads, backups[, masks]); unused when ``DIRECT``.
        n_tensors, n_chunks, chunk: table dimensions and elements per program.
        sumsq, n_partials: the norm partials of the whole step (all buckets).
        rho, eps, eta: signed radius, norm epsilon, ASAM offset (runtime, float64).
        w_arg, g_arg, b_arg, m_arg, numel_arg: the tensors of a ``DIRECT`` launch.
        DTYPE, ACC: storage and compute types.
        ADAPTIVE, HAS_MASK: ASAM scaling; bit-packed masks (bit ``k % 8`` of byte ``k // 8``).
        ALIGNED: every address is 16-byte aligned.
        DIRECT: per-tensor launch with tensor arguments (traceable by torch.compile).
        BLOCK, RBLOCK: elements per vector step; partials per finalize step.
    """
    scale64, finite = finalize(sumsq, n_partials, f64(rho), f64(eps), RBLOCK)
    scale = scale64.to(ACC)
    eta_c = f64(eta).to(ACC)
    pid = tl.program_id(0)
    if DIRECT:
        start = pid.to(tl.int64) * chunk
        count = numel_arg - start
        w_ptr = w_arg + start
        g_ptr = g_arg + start
        b_ptr = b_arg + start
        m_ptr = m_arg + start // 8
    else:
        t, start, count = locate(table, n_chunks)
        w_ptr = address(table, n_tensors, n_chunks, t, start, 0, DTYPE, ALIGNED)
        g_ptr = address(table, n_tensors, n_chunks, t, start, 1, DTYPE, ALIGNED)
        b_ptr = address(table, n_tensors, n_chunks, t, start, 2, DTYPE, ALIGNED)
        if HAS_MASK:
            # Chunks start on a multiple of BLOCK (>= 8) elements: a whole mask byte.
            m_ptr = address(table, n_tensors, n_chunks, t, start // 8, 3, tl.uint8, False)
        else:
            m_ptr = w_ptr  # never read
    count = tl.minimum(count, chunk).to(tl.int32)
    lanes = tl.arange(0, BLOCK)
    full = count - count % BLOCK
    for i in range(0, full, BLOCK):
        _perturb(
            w_ptr, g_ptr, b_ptr, m_ptr, i + lanes, None, scale, eta_c, finite,
            ADAPTIVE, HAS_MASK, DTYPE,
        )  # fmt: skip
    if full < count:
        offs = full + lanes
        _perturb(
            w_ptr, g_ptr, b_ptr, m_ptr, offs, offs < count, scale, eta_c, finite,
            ADAPTIVE, HAS_MASK, DTYPE,
        )  # fmt: skip
