"""Restore kernels: plain exact restore, restore + SGD step, restore + Adam/AdamW step.

Every kernel first puts the backup back (``w = b``, bit for bit) and then, unless the step is
skipped, applies the base update to the restored weights with the second-pass gradients. The
step is skipped when the AMP ``found_inf`` flag is nonzero or the total of one of the norm
partials given (``sumsqs``: the first pass's, and the second's when it is checked) is not
finite; every program decides it from those device values (no host synchronisation) and
program 0 writes the decision to the 0-dim bool the op returns. Adam's step counters advance
inside the same launch (its last program writes them), so a whole restore + step is one launch.

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
    finite,
    last_program,
    pointer,
    row_entry,
    to_storage,
    total,
    vectorised,
)


@triton.jit
def _live_and_unscale(
    found_inf, grad_scale, s0, n0, s1, n1, s2, n2, s3, n3, HAS_INF: tl.constexpr,
    HAS_SCALE: tl.constexpr, NSUM: tl.constexpr, RBLOCK: tl.constexpr,
):  # fmt: skip
    """``(live, inv_scale)``: whether the base step runs, and ``1 / grad_scale`` in float64.

    Not live when ``found_inf`` is nonzero (nan included) or the total of one of the ``NSUM``
    partial sums ``(s_k, n_k)`` is not finite (the reference's rule, ``skipped``).
    """
    live = tl.full([], 1, tl.int1)
    if HAS_INF:
        live = tl.load(found_inf) == 0
    if NSUM > 0:
        live = live & finite(total(s0, n0, RBLOCK, False))
    if NSUM > 1:
        live = live & finite(total(s1, n1, RBLOCK, False))
    if NSUM > 2:
        live = live & finite(total(s2, n2, RBLOCK, False))
    if NSUM > 3:
        live = live & finite(total(s3, n3, RBLOCK, False))
    inv = tl.full([], 1.0, tl.float64)
    if HAS_SCALE:
        inv = 1.0 / tl.load(grad_scale).to(tl.float64)
    return live, inv


# ---------------------------------------------------------------------------------------------
# Plain restore


@triton.jit
def _restore_chunk(
    table, n_tensors, n_chunks, t, start, count, w_arg, b_arg, DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr, DIRECT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
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
    if ALIGNED == 2:
        if vectorised(table, n_tensors, n_chunks, t):
            _restore_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, b_arg, DTYPE, True,
                           DIRECT, BLOCK)  # fmt: skip
        else:
            _restore_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, b_arg, DTYPE,
                           False, DIRECT, BLOCK)  # fmt: skip
    else:
        _restore_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, b_arg, DTYPE,
                       ALIGNED == 1, DIRECT, BLOCK)  # fmt: skip


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
def _sgd_chunk(
    table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, v_arg, live, inv_scale,
    lr_c, wd_c, mom_c, damp1, HAS_INF: tl.constexpr, HAS_SCALE: tl.constexpr,
    MAXIMIZE: tl.constexpr, USE_WD: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
    NESTEROV: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
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


@triton.jit
def sgd_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    flag,
    found_inf,
    grad_scale,
    s0,
    n0,
    s1,
    n1,
    s2,
    n2,
    s3,
    n3,
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
    NSUM: tl.constexpr,
    LR_T: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    USE_WD: tl.constexpr,
    MOMENTUM: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    r"""Restore ``w = b``, then one ``torch.optim.SGD`` step, for one chunk of one tensor.

    .. math::
        w \leftarrow b;\quad d = \pm g / s + \lambda w;\quad
        v \leftarrow \begin{cases} d & \text{first step} \\ \mu v + (1-\tau) d \end{cases};\quad
        d \leftarrow d + \mu v \ \text{(nesterov) else } v;\quad w \leftarrow w - \eta\, d

    In ``ACC``, each result rounded once on store. A skipped step (``found_inf != 0``, or a
    non-finite total of one of the ``sumsqs``) only restores: the momentum buffer is not
    written. Program 0 stores the decision in ``flag``.

    Args:
        table: pointer table (lists: params, grads, backups[, momentum buffers]).
        n_tensors, n_chunks, chunk: table dimensions and elements per program.
        flag: the 0-dim bool the op returns (``True``: the step was skipped).
        found_inf, grad_scale: 0-dim float32 AMP tensors (read only with their flags).
        s0, n0, ..., s3, n3: the first ``NSUM`` norm partials to check and their lengths.
        lr, weight_decay, momentum, dampening: hyperparameters (runtime, float64).
        lr_t: with ``LR_T``, a one-element tensor read on the device; the learning rate is
            then ``lr * lr_t`` (so a scheduler may change it between CUDA graph replays).
        w_arg, g_arg, b_arg, v_arg, numel_arg: the tensors of a ``DIRECT`` launch.
        DTYPE, ACC: storage and compute types.
        HAS_INF, HAS_SCALE: read ``found_inf`` / ``grad_scale``.
        NSUM: how many of ``s0..s3`` to check (0 to 4).
        LR_T: read the learning rate from ``lr_t``.
        MAXIMIZE, USE_WD, MOMENTUM, FIRST, NESTEROV: which terms of the update exist
            (``USE_WD``: ``weight_decay != 0``; ``MOMENTUM``: ``momentum != 0``; ``FIRST``: the
            buffers hold no history yet and are only written).
        ALIGNED, DIRECT, BLOCK: as in the other kernels of this package.
        RBLOCK: partials per step of the non-finite checks.
    """
    live, inv = _live_and_unscale(found_inf, grad_scale, s0, n0, s1, n1, s2, n2, s3, n3,
                                  HAS_INF, HAS_SCALE, NSUM, RBLOCK)  # fmt: skip
    tl.store(flag, live == 0, mask=tl.program_id(0) == 0)
    inv_scale = inv.to(ACC)
    lr_c = device_scalar(lr, lr_t, LR_T).to(ACC)
    wd_c = f64(weight_decay).to(ACC)
    mom_c = f64(momentum).to(ACC)
    damp1 = (1.0 - f64(dampening)).to(ACC)
    # A skipped step writes no momentum buffer: the buffers' store mask then needs the flag.
    MASKED: tl.constexpr = HAS_INF or NSUM > 0
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    if ALIGNED == 2:
        if vectorised(table, n_tensors, n_chunks, t):
            _sgd_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, v_arg,
                       live, inv_scale, lr_c, wd_c, mom_c, damp1, MASKED, HAS_SCALE, MAXIMIZE,
                       USE_WD, MOMENTUM, FIRST, NESTEROV, DTYPE, True, DIRECT, BLOCK)  # fmt: skip
        else:
            _sgd_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, v_arg,
                       live, inv_scale, lr_c, wd_c, mom_c, damp1, MASKED, HAS_SCALE, MAXIMIZE,
                       USE_WD, MOMENTUM, FIRST, NESTEROV, DTYPE, False, DIRECT,
                       BLOCK)  # fmt: skip
    else:
        _sgd_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, v_arg,
                   live, inv_scale, lr_c, wd_c, mom_c, damp1, MASKED, HAS_SCALE, MAXIMIZE,
                   USE_WD, MOMENTUM, FIRST, NESTEROV, DTYPE, ALIGNED == 1, DIRECT,
                   BLOCK)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Restore + Adam / AdamW


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
def _adam_chunk(
    table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, m_arg, v_arg, vmax_arg,
    live, inv_scale, b1, b2, b1c, b2c, wd, decay, step_size, sqrt_bc2, eps_c,
    MASKED: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, USE_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
    ALIGNED: tl.constexpr, DIRECT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    w_ptr = pointer(table, n_tensors, n_chunks, t, start, 0, w_arg, DTYPE, ALIGNED, DIRECT)
    g_ptr = pointer(table, n_tensors, n_chunks, t, start, 1, g_arg, DTYPE, ALIGNED, DIRECT)
    b_ptr = pointer(table, n_tensors, n_chunks, t, start, 2, b_arg, DTYPE, ALIGNED, DIRECT)
    m_ptr = pointer(table, n_tensors, n_chunks, t, start, 3, m_arg, DTYPE, ALIGNED, DIRECT)
    v_ptr = pointer(table, n_tensors, n_chunks, t, start, 4, v_arg, DTYPE, ALIGNED, DIRECT)
    if AMSGRAD:
        vmax_ptr = pointer(
            table, n_tensors, n_chunks, t, start, 5, vmax_arg, DTYPE, ALIGNED, DIRECT
        )
    else:
        vmax_ptr = v_ptr  # never read
    lanes = tl.arange(0, BLOCK)
    full = count - count % BLOCK
    smask = None
    if MASKED:
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


@triton.jit
def adam_kernel(
    table,
    n_tensors,
    n_chunks,
    chunk,
    flag,
    counter,
    n_programs,
    found_inf,
    grad_scale,
    s0,
    n0,
    s1,
    n1,
    s2,
    n2,
    s3,
    n3,
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
    NSUM: tl.constexpr,
    LR_T: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    USE_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
    STEPS_BLOCK: tl.constexpr,
):
    r"""Restore ``w = b``, then one ``torch.optim.Adam``/``AdamW`` step, for one chunk; and
    the step counters.

    .. math::
        t \leftarrow t+1;\quad g \leftarrow \pm g/s\ (+\lambda w \text{ for Adam});\quad
        w \leftarrow w(1-\eta\lambda) \text{ (AdamW)};\quad
        m \leftarrow \beta_1 m + (1-\beta_1) g;\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2;\\
        \hat v = \max(\hat v, v) \text{ (amsgrad)};\quad
        w \leftarrow w - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    ``t`` is the tensor's float32 step counter plus one (rounded in float32, as the
    reference's ``step_t.add_(1)``); the bias corrections are computed per program in float64
    from it. Every program reads its counter before the launch's last program
    (:func:`._table.last_program`) writes ``t + 1`` into every counter of the table (empty
    tensors' included), so no program sees another's increment. A skipped step only restores
    and leaves the moments and the counters as they were. Program 0 stores the decision in
    ``flag``. A ``DIRECT`` (traced) launch finds its counter already advanced by the caller.

    Args:
        table: pointer table (lists: params, grads, backups, exp_avgs, exp_avg_sqs,
            max_exp_avg_sqs (exp_avg_sqs again without amsgrad), steps).
        n_tensors, n_chunks, chunk: table dimensions and elements per program.
        flag: the 0-dim bool the op returns (``True``: the step was skipped).
        counter, n_programs: the stream's completion counter and the launch's program count
            (``max(n_chunks, 1)``).
        found_inf, grad_scale: 0-dim float32 AMP tensors (read only with their flags).
        s0, n0, ..., s3, n3: the first ``NSUM`` norm partials to check and their lengths.
        lr, beta1, beta2, eps, weight_decay: hyperparameters (runtime, float64).
        lr_t: with ``LR_T``, a one-element tensor read on the device (``lr * lr_t``).
        w_arg, g_arg, b_arg, m_arg, v_arg, s_arg, vmax_arg, numel_arg: the tensors of a
            ``DIRECT`` launch.
        DTYPE, ACC: storage and compute types.
        HAS_INF, HAS_SCALE: read ``found_inf`` / ``grad_scale``.
        NSUM: how many of ``s0..s3`` to check (0 to 4).
        LR_T: read the learning rate from ``lr_t``.
        MAXIMIZE, USE_WD, DECOUPLED, AMSGRAD: which terms of the update exist.
        ALIGNED, DIRECT, BLOCK: as in the other kernels of this package.
        RBLOCK: partials per step of the non-finite checks; STEPS_BLOCK: counters per step of
            the last program's counter update.
    """
    live, inv = _live_and_unscale(found_inf, grad_scale, s0, n0, s1, n1, s2, n2, s3, n3,
                                  HAS_INF, HAS_SCALE, NSUM, RBLOCK)  # fmt: skip
    tl.store(flag, live == 0, mask=tl.program_id(0) == 0)
    MASKED: tl.constexpr = HAS_INF or NSUM > 0
    lr = device_scalar(lr, lr_t, LR_T)
    beta1 = f64(beta1)
    beta2 = f64(beta2)
    weight_decay = f64(weight_decay)
    t, start, count = chunk_span(table, n_chunks, chunk, numel_arg, DIRECT)
    if DIRECT:
        step = tl.load(s_arg).to(tl.float64)  # advanced by the caller
    else:
        s_ptr = row_entry(table, n_tensors, n_chunks, t, 6).to(tl.pointer_type(tl.float32))
        step = (tl.load(s_ptr) + 1.0).to(tl.float64)
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
    if ALIGNED == 2:
        if vectorised(table, n_tensors, n_chunks, t):
            _adam_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, m_arg,
                        v_arg, vmax_arg, live, inv_scale, b1, b2, b1c, b2c, wd, decay,
                        step_size, sqrt_bc2, eps_c, MASKED, HAS_SCALE, MAXIMIZE, USE_WD,
                        DECOUPLED, AMSGRAD, DTYPE, ACC, True, DIRECT, BLOCK)  # fmt: skip
        else:
            _adam_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, m_arg,
                        v_arg, vmax_arg, live, inv_scale, b1, b2, b1c, b2c, wd, decay,
                        step_size, sqrt_bc2, eps_c, MASKED, HAS_SCALE, MAXIMIZE, USE_WD,
                        DECOUPLED, AMSGRAD, DTYPE, ACC, False, DIRECT, BLOCK)  # fmt: skip
    else:
        _adam_chunk(table, n_tensors, n_chunks, t, start, count, w_arg, g_arg, b_arg, m_arg,
                    v_arg, vmax_arg, live, inv_scale, b1, b2, b1c, b2c, wd, decay, step_size,
                    sqrt_bc2, eps_c, MASKED, HAS_SCALE, MAXIMIZE, USE_WD, DECOUPLED, AMSGRAD,
                    DTYPE, ACC, ALIGNED == 1, DIRECT, BLOCK)  # fmt: skip
    if not DIRECT:
        # Every program has read its counter (above, before its increment of the completion
        # counter): the last one advances them all.
        last = last_program(counter, n_programs)
        if last & live:
            base = table + 2 * n_chunks + 8 * n_tensors
            for i in range(0, n_tensors, STEPS_BLOCK):
                idx = i + tl.arange(0, STEPS_BLOCK)
                inb = idx < n_tensors
                addr = tl.load(base + idx, mask=inb, other=0)
                ptrs = addr.to(tl.pointer_type(tl.float32))
                tl.store(ptrs, tl.load(ptrs, mask=inb, other=0.0) + 1.0, mask=inb)
