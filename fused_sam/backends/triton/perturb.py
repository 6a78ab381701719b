"""Perturb: the scale from the norm's total, backup, ``w <- w + e`` (bit or random mask, ASAM)."""

# No ``from __future__ import annotations`` here: Triton reads the kernels' annotations
# (``tl.float64`` scalars, ``tl.constexpr``) as objects, which every supported version parses.

import triton
import triton.language as tl

from fused_sam.backends.triton._table import (
    chunk_span,
    device_scalar,
    entry,
    f64,
    finite,
    pointer,
    to_storage,
    total,
    vectorised,
)


@triton.jit
def finalize(sumsq, n_partials, rho, eps, RBLOCK: tl.constexpr):
    r"""The norm's total from its partials (:func:`._table.total`, a fixed order) and
    ``(scale, finite)``.

    .. math:: n = \sqrt{\textstyle\sum_k s_k}, \qquad
        \mathrm{scale} = \begin{cases} \rho / (n + \epsilon) & n \text{ finite} \\
        0 & \text{otherwise} \end{cases}

    In float64 whatever the partials' type (as the reference does). The norm ops of the fused
    backends return one value per bucket (finalized on the device by the norm launch), so
    this reads a handful of values, not one per program of the norm.
    """
    s = total(sumsq, n_partials, RBLOCK, False)
    ok = finite(s)
    scale = tl.where(ok, rho / (tl.sqrt(s) + eps), 0.0)
    return scale, ok


@triton.jit
def element_hash(key, j):
    r"""The random-mask hash of :func:`fused_sam.masks.element_hash`, in uint32 arithmetic.

    .. math:: h(k, j) = \mathrm{fmix32}\big((k + j \cdot \mathtt{0x9E3779B9}) \bmod 2^{32}\big)

    ``key`` is a uint32 scalar and ``j`` the elements' positions in their tensor (int64, taken
    modulo :math:`2^{32}`); products wrap like the C++ and CUDA kernels'.
    """
    x = key + j.to(tl.uint32) * 0x9E3779B9
    x ^= x >> 16
    x = x * 0x85EBCA6B
    x ^= x >> 13
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


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
    ok,
    first,
    key,
    threshold,
    ADAPTIVE: tl.constexpr,
    MASK: tl.constexpr,
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
    if MASK == 1:
        byte = tl.load(m_ptr + (offs >> 3), mask=inb)
        new = tl.where(((byte.to(tl.int32) >> (offs & 7)) & 1) != 0, new, w_raw)
    elif MASK == 2:
        # Computed, not read: element first + offs of the tensor is kept iff its hash is small.
        new = tl.where(element_hash(key, first + offs) < threshold, new, w_raw)
    # Where nothing moves, the loaded bits go back untouched (w + 0 would turn -0.0 into +0.0).
    # (Two selects: the interpreter cannot AND a scalar flag into a block of flags.)
    tl.store(w_ptr + offs, tl.where(ok, new, w_raw), mask=inb)


@triton.jit
def _perturb_chunk(
    table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, m_arg, scale, eta_c, ok,
    key, threshold_u32, DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, MASK: tl.constexpr,
    ALIGNED: tl.constexpr, DIRECT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    w_ptr = pointer(table, n_tensors, n_chunks, t, start, 0, w_arg, DTYPE, ALIGNED, DIRECT)
    g_ptr = pointer(table, n_tensors, n_chunks, t, start, 1, g_arg, DTYPE, ALIGNED, DIRECT)
    b_ptr = pointer(table, n_tensors, n_chunks, t, start, 2, b_arg, DTYPE, ALIGNED, DIRECT)
    if MASK == 1:
        # Chunks start on a multiple of BLOCK (>= 8) elements: a whole mask byte.
        m_ptr = pointer(table, n_tensors, n_chunks, t, start // 8, 3, m_arg, tl.uint8, False,
                        DIRECT)  # fmt: skip
    else:
        m_ptr = w_ptr  # never read
    lanes = tl.arange(0, BLOCK)
    full = count - count % BLOCK
    for i in range(0, full, BLOCK):
        _perturb(
            w_ptr, g_ptr, b_ptr, m_ptr, i + lanes, None, scale, eta_c, ok, start, key,
            threshold_u32, ADAPTIVE, MASK, DTYPE,
        )  # fmt: skip
    if full < count:
        offs = full + lanes
        _perturb(
            w_ptr, g_ptr, b_ptr, m_ptr, offs, offs < count, scale, eta_c, ok, start, key,
            threshold_u32, ADAPTIVE, MASK, DTYPE,
        )  # fmt: skip


@triton.jit(do_not_specialize=["step_key", "threshold", "key_arg"])
def perturb_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    sumsq,
    n_partials,
    rho: tl.float64,
    rho_t,
    eps: tl.float64,
    eta: tl.float64,
    step_key: tl.int64,
    threshold: tl.int64,
    w_arg,
    g_arg,
    b_arg,
    m_arg,
    key_arg: tl.int64,
    numel_arg,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    MASK: tl.constexpr,
    RHO_T: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    r"""Write ``b = w`` and ``w \leftarrow w + e`` for one chunk of one tensor.

    .. math:: e = \mathrm{scale} \cdot T(w)^2\, g \odot m,
        \qquad T(w) = |w| + \eta \ \text{(ASAM) or } 1

    where :math:`m` is read from bit-packed masks (``MASK == 1``), computed from the hash of
    the element's position (``MASK == 2``: kept iff ``element_hash(salt ^ step_key, j) <
    threshold``), or 1 (``MASK == 0``).

    computed in ``ACC`` and rounded once on store. When the norm is not finite the weights
    keep their exact bits (the backup is written either way); a zero gradient gives
    ``e = 0`` exactly, because the scale is finite (``rho / eps`` at worst).

    Args:
        table: pointer table (lists: params, grads, backups[, mask addresses or salts]);
            unused when ``DIRECT``.
        n_tensors, n_chunks, chunk: table dimensions and elements per program.
        sumsq, n_partials: the norm partials of the whole step (one per bucket from the
            fused norm ops; any number is taken).
        rho, eps, eta: signed radius, norm epsilon, ASAM offset (runtime, float64).
        rho_t: with ``RHO_T``, a one-element tensor read on the device (radius ``rho * rho_t``).
        step_key, threshold: the random mask's key of this step and its keep threshold.
        w_arg, g_arg, b_arg, m_arg, key_arg, numel_arg: the tensors of a ``DIRECT`` launch
            (``key_arg``: the tensor's random-mask key, ``salt ^ step_key``).
        DTYPE, ACC: storage and compute types.
        ADAPTIVE: ASAM scaling.
        MASK: 0 none, 1 bit-packed masks (bit ``k % 8`` of byte ``k // 8``), 2 random mask.
        RHO_T: read the radius from ``rho_t``.
        ALIGNED: 16-byte access: 0 none, 1 every tensor, 2 per tensor (its table flag).
        DIRECT: per-tensor launch with tensor arguments (traceable by torch.compile).
        BLOCK, RBLOCK: elements per vector step; partials per finalize step.
    """
    rho64 = device_scalar(rho, rho_t, RHO_T)
    scale64, ok = finalize(sumsq, n_partials, rho64, f64(eps), RBLOCK)
    scale = scale64.to(ACC)
    eta_c = f64(eta).to(ACC)
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    if DIRECT:
        key = key_arg.to(tl.uint32)
    elif MASK == 2:
        # Row 3 holds the salts of a random mask.
        key = (entry(table, n_tensors, n_chunks, t, 3) ^ step_key).to(tl.uint32)
    else:
        key = step_key.to(tl.uint32)  # never used
    threshold_u32 = threshold.to(tl.uint32)
    if ALIGNED == 2:
        if vectorised(table, n_tensors, n_chunks, t):
            _perturb_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg,
                           m_arg, scale, eta_c, ok, key, threshold_u32, DTYPE, ADAPTIVE, MASK,
                           True, DIRECT, BLOCK)  # fmt: skip
        else:
            _perturb_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg,
                           m_arg, scale, eta_c, ok, key, threshold_u32, DTYPE, ADAPTIVE, MASK,
                           False, DIRECT, BLOCK)  # fmt: skip
    else:
        _perturb_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, m_arg,
                       scale, eta_c, ok, key, threshold_u32, DTYPE, ADAPTIVE, MASK, ALIGNED == 1,
                       DIRECT, BLOCK)  # fmt: skip
