"""Restore kernels: plain exact restore, restore + SGD step, restore + Adam/AdamW step.

Every kernel first puts the backup back (``w = b``, bit for bit) and then, unless the AMP
``found_inf`` flag is set, applies the base update to the restored weights with the
second-pass gradients. The flag is read on the device: no host synchronisation.

Full blocks pass ``inb = None`` (unmasked, vectorisable accesses); the tail block passes its
bounds mask. ``smask`` is the store mask of optimizer state: the bounds, and the step not
being skipped (a select rather than an AND, see :func:`._table.block_flag`).
"""

# No ``from __future__ import annotations`` here: Triton reads the kernels' annotations
# (``tl.float64`` scalars, ``tl.constexpr``) as objects, which every supported version parses.

import triton
import triton.language as tl

from fused_sam.backends.triton._table import (
    block_flag,
    chunk_span,
    device_scalar,
    f64,
    pointer,
    to_storage,
)


@triton.jit
def _live_and_unscale(found_inf, grad_scale, HAS_INF: tl.constexpr, HAS_SCALE: tl.constexpr):
    """``(live, inv_scale)``: whether the base step runs, and ``1 / grad_scale`` in float64."""
    live = tl.full([], 1, tl.int1)
    if HAS_INF:
        live = tl.load(found_inf) == 0
    inv = tl.full([], 1.0, tl.float64)
    if HAS_SCALE:
        inv = 1.0 / tl.load(grad_scale).to(tl.float64)
    return live, inv


# ---------------------------------------------------------------------------------------------
# Plain restore


@triton.jit
def restore_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    w_arg,
    b_arg,
    numel_arg,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Exact restore ``w = b`` (a copy of the bits) for one chunk of one tensor.

    Args:
        table: pointer table (lists: params, backups); unused when ``DIRECT``.
        n_tensors, n_chunks, chunk: table dimensions and elements per program.
        w_arg, b_arg, numel_arg: the tensors of a ``DIRECT`` launch.
        DTYPE: storage type.
        ALIGNED, DIRECT, BLOCK: as in the other kernels of this package.
    """
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    w_ptr = pointer(table, n_tensors, n_chunks, t, start, 0, w_arg, DTYPE, ALIGNED, DIRECT)
    b_ptr = pointer(table, n_tensors, n_chunks, t, start, 1, b_arg, DTYPE, ALIGNED, DIRECT)
    lanes = tl.arange(0, BLOCK)
    full = count - count % BLOCK
    for i in range(0, full, BLOCK):
        tl.store(w_ptr + i + lanes, tl.load(b_ptr + i + lanes))
    if full < count:
        offs = full + lanes
        inb = offs < count
        tl.store(w_ptr + offs, tl.load(b_ptr + offs, mask=inb), mask=inb)


# ---------------------------------------------------------------------------------------------
# Restore + SGD


@triton.jit
def _sgd(
    w_ptr,
    g_ptr,
    b_ptr,
    v_ptr,
    offs,
    inb,
    smask,
    live,
    inv_scale,
    lr,
    weight_decay,
    momentum,
    damp1,
    HAS_SCALE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    USE_WD: tl.constexpr,
    MOMENTUM: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    DTYPE: tl.constexpr,
):
    b_raw = tl.load(b_ptr + offs, mask=inb)
    w = b_raw.to(lr.dtype)
    d = tl.load(g_ptr + offs, mask=inb).to(lr.dtype)
    if HAS_SCALE:
        d = d * inv_scale
    if MAXIMIZE:
        d = -d
    if USE_WD:
        d = d + weight_decay * w
    if MOMENTUM:
        if FIRST:
            v = d
        else:
            v = momentum * tl.load(v_ptr + offs, mask=inb).to(lr.dtype) + damp1 * d
        tl.store(v_ptr + offs, to_storage(v, DTYPE), mask=smask)
        if NESTEROV:
            d = d + momentum * v
        else:
            d = v
    tl.store(w_ptr + offs, tl.where(live, to_storage(w - lr * d, DTYPE), b_raw), mask=inb)


@triton.jit
def sgd_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    found_inf,
    grad_scale,
    lr: tl.float64,
    lr_t,
    weight_decay: tl.float64,
    momentum: tl.float64,
    dampening: tl.float64,
    w_arg,
    g_arg,
    b_arg,
    v_arg,
    numel_arg,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    LR_T: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    USE_WD: tl.constexpr,
    MOMENTUM: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r"""Restore ``w = b``, then one ``torch.optim.SGD`` step, for one chunk of one tensor.

    .. math::
        w \leftarrow b;\quad d = \pm g / s + \lambda w;\quad
        v \leftarrow \begin{cases} d & \text{first step} \\ \mu v + (1-\tau) d \end{cases};\quad
        d \leftarrow d + \mu v \ \text{(nesterov) else } v;\quad w \leftarrow w - \eta\, d

    In ``ACC``, each result rounded once on store. With ``found_inf != 0`` only the restore
    happens: the momentum buffer is not written.

    Args:
        table: pointer table (lists: params, grads, backups[, momentum buffers]).
        n_tensors, n_chunks, chunk: table dimensions and elements per program.
        found_inf, grad_scale: 0-dim float32 AMP tensors (read only with their flags).
        lr, weight_decay, momentum, dampening: hyperparameters (runtime, float64).
        lr_t: with ``LR_T``, a one-element tensor read on the device; the learning rate is
            then ``lr * lr_t`` (so a scheduler may change it between CUDA graph replays).
        w_arg, g_arg, b_arg, v_arg, numel_arg: the tensors of a ``DIRECT`` launch.
        DTYPE, ACC: storage and compute types.
        HAS_INF, HAS_SCALE: read ``found_inf`` / ``grad_scale``.
        LR_T: read the learning rate from ``lr_t``.
        MAXIMIZE, USE_WD, MOMENTUM, FIRST, NESTEROV: which terms of the update exist
            (``USE_WD``: ``weight_decay != 0``; ``MOMENTUM``: ``momentum != 0``; ``FIRST``: the
            buffers hold no history yet and are only written).
        ALIGNED, DIRECT, BLOCK: as in the other kernels of this package.
    """
    live, inv = _live_and_unscale(found_inf, grad_scale, HAS_INF, HAS_SCALE)
    inv_scale = inv.to(ACC)
    lr_c = device_scalar(lr, lr_t, LR_T).to(ACC)
    wd_c = f64(weight_decay).to(ACC)
    mom_c = f64(momentum).to(ACC)
    damp1 = (1.0 - f64(dampening)).to(ACC)
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    w_ptr = pointer(table, n_tensors, n_chunks, t, start, 0, w_arg, DTYPE, ALIGNED, DIRECT)
    g_ptr = pointer(table, n_tensors, n_chunks, t, start, 1, g_arg, DTYPE, ALIGNED, DIRECT)
    b_ptr = pointer(table, n_tensors, n_chunks, t, start, 2, b_arg, DTYPE, ALIGNED, DIRECT)
    if MOMENTUM:
        v_ptr = pointer(table, n_tensors, n_chunks, t, start, 3, v_arg, DTYPE, ALIGNED, DIRECT)
    else:
        v_ptr = w_ptr  # never read
    lanes = tl.arange(0, BLOCK)
    full = count - count % BLOCK
    smask = None
    if HAS_INF:
        smask = block_flag(live, BLOCK)
    for i in range(0, full, BLOCK):
        _sgd(
            w_ptr, g_ptr, b_ptr, v_ptr, i + lanes, None, smask, live, inv_scale,
            lr_c, wd_c, mom_c, damp1,
            HAS_SCALE, MAXIMIZE, USE_WD, MOMENTUM, FIRST, NESTEROV, DTYPE,
        )  # fmt: skip
    if full < count:
        offs = full + lanes
        inb = offs < count
        tail_smask = tl.where(live, inb, False)
        _sgd(
            w_ptr, g_ptr, b_ptr, v_ptr, offs, inb, tail_smask, live, inv_scale,
            lr_c, wd_c, mom_c, damp1,
            HAS_SCALE, MAXIMIZE, USE_WD, MOMENTUM, FIRST, NESTEROV, DTYPE,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Restore + Adam / AdamW


@triton.jit
def steps_kernel(
    table,
    n_tensors,
    n_chunks,
    found_inf,
    HAS_INF: tl.constexpr,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``step += 1`` for the 0-dim float32 step counters of list ``ROW``, unless skipped.

    A launch of its own, before the Adam kernel: every program of that kernel reads its
    tensor's counter, so no program of the same launch may write it.
    """
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n_tensors
    addr = tl.load(table + 2 * n_chunks + (1 + ROW) * n_tensors + idx, mask=inb, other=0)
    ptrs = addr.to(tl.pointer_type(tl.float32))
    mask = inb
    if HAS_INF:
        mask = tl.where(tl.load(found_inf) == 0, inb, False)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + 1.0, mask=mask)


@triton.jit
def _adam(
    w_ptr,
    g_ptr,
    b_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    offs,
    inb,
    smask,
    live,
    inv_scale,
    beta1,
    beta2,
    beta1c,
    beta2c,
    weight_decay,
    decay,
    step_size,
    sqrt_bc2,
    eps,
    HAS_SCALE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    USE_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
):
    b_raw = tl.load(b_ptr + offs, mask=inb)
    w = b_raw.to(ACC)
    g = tl.load(g_ptr + offs, mask=inb).to(ACC)
    if HAS_SCALE:
        g = g * inv_scale
    if MAXIMIZE:
        g = -g
    if USE_WD:
        if DECOUPLED:
            w = w * decay
        else:
            g = g + weight_decay * w
    m = beta1 * tl.load(m_ptr + offs, mask=inb).to(ACC) + beta1c * g
    v = beta2 * tl.load(v_ptr + offs, mask=inb).to(ACC) + beta2c * g * g
    tl.store(m_ptr + offs, to_storage(m, DTYPE), mask=smask)
    tl.store(v_ptr + offs, to_storage(v, DTYPE), mask=smask)
    if AMSGRAD:
        # NaN-propagating, as torch.maximum and the reference: PTX max.f32/max.f64 return
        # the other operand when one is NaN, so a NaN is carried through explicitly.
        vmax = tl.load(vmax_ptr + offs, mask=inb).to(ACC)
        v = tl.where((vmax != vmax) | (v != v), vmax + v, tl.maximum(vmax, v))
        tl.store(vmax_ptr + offs, to_storage(v, DTYPE), mask=smask)
    # IEEE-rounded sqrt and division: Triton's default float32 ones are approximate.
    if ACC == tl.float32:
        denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
        new = w - tl.div_rn(step_size * m, denom)
    else:
        denom = tl.sqrt(v) / sqrt_bc2 + eps
        new = w - step_size * m / denom
    tl.store(w_ptr + offs, tl.where(live, to_storage(new, DTYPE), b_raw), mask=inb)


@triton.jit
def adam_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    found_inf,
    grad_scale,
    lr: tl.float64,
    lr_t,
    beta1: tl.float64,
    beta2: tl.float64,
    eps: tl.float64,
    weight_decay: tl.float64,
    w_arg,
    g_arg,
    b_arg,
    m_arg,
    v_arg,
    s_arg,
    vmax_arg,
    numel_arg,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    LR_T: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    USE_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r"""Restore ``w = b``, then one ``torch.optim.Adam``/``AdamW`` step, for one chunk.

    .. math::
        g \leftarrow \pm g/s\ (+\lambda w \text{ for Adam});\quad
        w \leftarrow w(1-\eta\lambda) \text{ (AdamW)};\quad
        m \leftarrow \beta_1 m + (1-\beta_1) g;\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2;\\
        \hat v = \max(\hat v, v) \text{ (amsgrad)};\quad
        w \leftarrow w - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    ``t`` is the tensor's step counter, already incremented by :func:`steps_kernel`; the bias
    corrections are computed per program in float64 from it. With ``found_inf != 0`` only
    the restore happens.

    Args:
        table: pointer table (lists: params, grads, backups, exp_avgs, exp_avg_sqs, steps
            [, max_exp_avg_sqs]).
        n_tensors, n_chunks, chunk: table dimensions and elements per program.
        found_inf, grad_scale: 0-dim float32 AMP tensors (read only with their flags).
        lr, beta1, beta2, eps, weight_decay: hyperparameters (runtime, float64).
        lr_t: with ``LR_T``, a one-element tensor read on the device (``lr * lr_t``).
        w_arg, g_arg, b_arg, m_arg, v_arg, s_arg, vmax_arg, numel_arg: the tensors of a
            ``DIRECT`` launch.
        DTYPE, ACC: storage and compute types.
        HAS_INF, HAS_SCALE: read ``found_inf`` / ``grad_scale``.
        LR_T: read the learning rate from ``lr_t``.
        MAXIMIZE, USE_WD, DECOUPLED, AMSGRAD: which terms of the update exist.
        ALIGNED, DIRECT, BLOCK: as in the other kernels of this package.
    """
    live, inv = _live_and_unscale(found_inf, grad_scale, HAS_INF, HAS_SCALE)
    lr = device_scalar(lr, lr_t, LR_T)
    beta1 = f64(beta1)
    beta2 = f64(beta2)
    weight_decay = f64(weight_decay)
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    w_ptr = pointer(table, n_tensors, n_chunks, t, start, 0, w_arg, DTYPE, ALIGNED, DIRECT)
    g_ptr = pointer(table, n_tensors, n_chunks, t, start, 1, g_arg, DTYPE, ALIGNED, DIRECT)
    b_ptr = pointer(table, n_tensors, n_chunks, t, start, 2, b_arg, DTYPE, ALIGNED, DIRECT)
    m_ptr = pointer(table, n_tensors, n_chunks, t, start, 3, m_arg, DTYPE, ALIGNED, DIRECT)
    v_ptr = pointer(table, n_tensors, n_chunks, t, start, 4, v_arg, DTYPE, ALIGNED, DIRECT)
    s_ptr = pointer(table, n_tensors, n_chunks, t, 0, 5, s_arg, tl.float32, False, DIRECT)
    if AMSGRAD:
        vmax_ptr = pointer(
            table, n_tensors, n_chunks, t, start, 6, vmax_arg, DTYPE, ALIGNED, DIRECT
        )
    else:
        vmax_ptr = v_ptr  # never read
    step = tl.load(s_ptr).to(tl.float64)
    bc1 = 1.0 - tl.exp(step * tl.log(beta1))
    bc2 = 1.0 - tl.exp(step * tl.log(beta2))
    step_size = (lr / bc1).to(ACC)
    sqrt_bc2 = tl.sqrt(bc2).to(ACC)
    b1 = beta1.to(ACC)
    b2 = beta2.to(ACC)
    b1c = (1.0 - beta1).to(ACC)
    b2c = (1.0 - beta2).to(ACC)
    wd = weight_decay.to(ACC)
    decay = (1.0 - lr * weight_decay).to(ACC)
    eps_c = f64(eps).to(ACC)
    inv_scale = inv.to(ACC)
    lanes = tl.arange(0, BLOCK)
    full = count - count % BLOCK
    smask = None
    if HAS_INF:
        smask = block_flag(live, BLOCK)
    for i in range(0, full, BLOCK):
        _adam(
            w_ptr, g_ptr, b_ptr, m_ptr, v_ptr, vmax_ptr, i + lanes, None, smask, live,
            inv_scale, b1, b2, b1c, b2c, wd, decay, step_size, sqrt_bc2, eps_c,
            HAS_SCALE, MAXIMIZE, USE_WD, DECOUPLED, AMSGRAD, DTYPE, ACC,
        )  # fmt: skip
    if full < count:
        offs = full + lanes
        inb = offs < count
        tail_smask = tl.where(live, inb, False)
        _adam(
            w_ptr, g_ptr, b_ptr, m_ptr, v_ptr, vmax_ptr, offs, inb, tail_smask, live,
            inv_scale, b1, b2, b1c, b2c, wd, decay, step_size, sqrt_bc2, eps_c,
            HAS_SCALE, MAXIMIZE, USE_WD, DECOUPLED, AMSGRAD, DTYPE, ACC,
        )  # fmt: skip
