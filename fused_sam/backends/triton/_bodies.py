"""The bodies of the registered ops: one launch over a pointer table, or traced, one launch
per tensor with tensor arguments (``DIRECT``), of the same kernels."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from fused_sam.backends._skip import skip_flag
from fused_sam.backends.triton import _launch, _table
from fused_sam.backends.triton._launch import (
    STEPS_BLOCK,
    amp_args,
    common,
    dummy,
    hyper_arg,
    rblock,
    sumsq_args,
)
from fused_sam.backends.triton.combine import axpby_kernel, dot_kernel
from fused_sam.backends.triton.norm import norm_kernel
from fused_sam.backends.triton.perturb import perturb_kernel
from fused_sam.backends.triton.step import adam_kernel, restore_kernel, sgd_kernel


def norm_impl(grads: list[Tensor], params: list[Tensor], adaptive: bool, eta: float) -> Tensor:
    # Squares in float64. Params are read only by ASAM; without it the table does not
    # depend on them.
    table_lists = [grads, params if adaptive else grads]
    const = {"ADAPTIVE": adaptive}
    return _launch.partials(norm_kernel, [grads, params], const, (eta,), table_lists)


def perturb_impl(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor],
    sumsq: Tensor,
    rho: float,
    eps: float,
    adaptive: bool,
    eta: float,
    masks: list[Tensor],
    salts: list[int],
    step_key: int,
    threshold: int,
    rho_t: Tensor | None,
) -> None:
    # ``masks`` is empty for an unmasked step (the op schema has no optional tensor lists);
    # ``salts`` is empty unless the step has a random mask (then ``masks`` is empty). With
    # ``rho_t`` the radius is ``rho * rho_t``, read on the device.
    w0 = params[0]
    sumsq = sumsq.reshape(-1) if sumsq.dim() != 1 else sumsq  # read as flat memory
    sumsq = sumsq if sumsq.is_contiguous() else sumsq.contiguous()
    n_partials = sumsq.numel()
    const = {
        **common(w0.dtype),
        "ACC": _table.acc_dtype(w0.dtype),
        "ADAPTIVE": adaptive,
        "MASK": 1 if masks else 2 if salts else 0,
        "RHO_T": rho_t is not None,
        "RBLOCK": rblock(n_partials),
    }
    rho_arg = hyper_arg(w0, rho_t)
    if _launch.traced(w0):
        launch = _launch.direct_launcher(perturb_kernel, w0)
        if launch is None:
            return
        numels = [w.numel() for w in params]
        geo = _table.geometry(sum(numels))
        for i, (w, g, b, n) in enumerate(zip(params, grads, backups, numels)):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                m = masks[i] if masks else dummy(w0)
                key = salts[i] ^ step_key if salts else 0
                launch[(chunks,)](
                    dummy(w0), 1, chunks, geo.chunk, sumsq, n_partials, rho, rho_arg, eps, eta,
                    step_key, threshold, w, g, b, m, key, n,
                    ALIGNED=0, DIRECT=True, BLOCK=geo.block, **const,
                )  # fmt: skip
        return
    lists = [params, grads, backups] + ([masks] if masks else [salts] if salts else [])
    table = _table.pointer_table(lists, w0.device, vector_rows=3)
    if table.n_chunks == 0:
        return
    perturb_kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, table.chunk, sumsq, n_partials, rho,
        rho_arg, eps, eta, step_key, threshold, table.data, table.data, table.data, table.data,
        0, 0, ALIGNED=table.vector, DIRECT=False, BLOCK=table.block, **const,
    )  # fmt: skip


def restore_impl(params: list[Tensor], backups: list[Tensor]) -> None:
    w0 = params[0]
    const = common(w0.dtype)
    if _launch.traced(w0):
        launch = _launch.direct_launcher(restore_kernel, w0)
        if launch is None:
            return
        numels = [w.numel() for w in params]
        geo = _table.geometry(sum(numels))
        for w, b, n in zip(params, backups, numels):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                launch[(chunks,)](
                    dummy(w0), 1, chunks, geo.chunk, w, b, n,
                    ALIGNED=0, DIRECT=True, BLOCK=geo.block, **const,
                )  # fmt: skip
        return
    table = _table.pointer_table([params, backups], w0.device)
    if table.n_chunks == 0:
        return
    restore_kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, table.chunk, table.data, table.data, 0,
        ALIGNED=table.vector, DIRECT=False, BLOCK=table.block, **const,
    )  # fmt: skip


def _traced_skip(
    like: Tensor, found_inf: Tensor | None, sumsqs: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """``(skipped, live)`` of a traced call from torch ops (0-dim bool and float32): the
    per-tensor launches of a traced step have no program that could write them for all."""
    skip = skip_flag(found_inf, sumsqs, like.device)
    if skip is None:
        skip = torch.zeros((), dtype=torch.bool, device=like.device)
    return skip, (~skip).to(torch.float32)


def sgd_impl(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr_t: Tensor | None,
    sumsqs: list[Tensor],
) -> Tensor:
    # Returns the 0-dim bool skip flag, written by program 0 of the launch.
    w0 = params[0]
    found, scale, flags = amp_args(w0, grad_scale, found_inf)
    checks, nsum, rb = sumsq_args(w0, sumsqs)
    has_momentum = momentum != 0
    const = {
        **common(w0.dtype),
        **flags,
        "NSUM": nsum,
        "RBLOCK": rb,
        "ACC": _table.acc_dtype(w0.dtype),
        "MAXIMIZE": maximize,
        "USE_WD": weight_decay != 0,
        "MOMENTUM": has_momentum,
        "FIRST": first_step,
        "NESTEROV": nesterov,
        "LR_T": lr_t is not None,
    }
    hyper = (lr, hyper_arg(w0, lr_t), weight_decay, momentum, dampening)
    if _launch.traced(w0):
        skip, _ = _traced_skip(w0, found_inf, sumsqs)
        launch = _launch.direct_launcher(sgd_kernel, w0)
        if launch is None:
            return skip
        numels = [w.numel() for w in params]
        geo = _table.geometry(sum(numels))
        for i, (w, g, b, n) in enumerate(zip(params, grads, backups, numels)):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                v = momentum_buffers[i] if has_momentum else dummy(w0)
                launch[(chunks,)](
                    dummy(w0), 1, chunks, geo.chunk, dummy(w0), found, scale, *checks, *hyper,
                    w, g, b, v, n, ALIGNED=0, DIRECT=True, BLOCK=geo.block, **const,
                )  # fmt: skip
        return skip
    lists = [params, grads, backups] + ([momentum_buffers] if has_momentum else [])
    table = _table.pointer_table(lists, w0.device)
    flag = torch.empty((), dtype=torch.bool, device=w0.device)
    sgd_kernel[(max(table.n_chunks, 1),)](
        table.data, table.n_tensors, table.n_chunks, table.chunk, flag, found, scale, *checks,
        *hyper, table.data, table.data, table.data, table.data, 0,
        ALIGNED=table.vector, DIRECT=False, BLOCK=table.block, **const,
    )  # fmt: skip
    return flag


def adam_impl(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr_t: Tensor | None,
    sumsqs: list[Tensor],
) -> Tensor:
    # Returns the 0-dim bool skip flag, written by program 0 of the launch; the step counters
    # advance in the same launch (its last program writes them).
    w0 = params[0]
    found, scale, flags = amp_args(w0, grad_scale, found_inf)
    checks, nsum, rb = sumsq_args(w0, sumsqs)
    const = {
        **common(w0.dtype),
        **flags,
        "NSUM": nsum,
        "RBLOCK": rb,
        "STEPS_BLOCK": STEPS_BLOCK,
        "ACC": _table.acc_dtype(w0.dtype),
        "MAXIMIZE": maximize,
        "USE_WD": weight_decay != 0,
        "DECOUPLED": decoupled_weight_decay,
        "AMSGRAD": amsgrad,
        "LR_T": lr_t is not None,
    }
    hyper = (lr, hyper_arg(w0, lr_t), beta1, beta2, eps, weight_decay)
    if _launch.traced(w0):
        skip, live = _traced_skip(w0, found_inf, sumsqs)
        launch = _launch.direct_launcher(adam_kernel, w0)
        numels = [w.numel() for w in params]
        geo = _table.geometry(sum(numels))
        for i, (w, g, b, n) in enumerate(zip(params, grads, backups, numels)):
            s = state_steps[i]
            s.add_(live)  # a DIRECT launch reads the counter already advanced
            chunks = triton.cdiv(n, geo.chunk)
            if chunks and launch is not None:
                vmax = max_exp_avg_sqs[i] if amsgrad else exp_avg_sqs[i]
                launch[(chunks,)](
                    dummy(w0), 1, chunks, geo.chunk, dummy(w0), dummy(w0), chunks, found,
                    scale, *checks, *hyper, w, g, b, exp_avgs[i], exp_avg_sqs[i], s, vmax, n,
                    ALIGNED=0, DIRECT=True, BLOCK=geo.block, **const,
                )  # fmt: skip
        return skip
    # The table always has a max_exp_avg_sqs row (exp_avg_sqs again without amsgrad, never
    # read then), so the step counters are row 6; they are read as scalars, not vectors.
    vmax_row = max_exp_avg_sqs if amsgrad else exp_avg_sqs
    lists = [params, grads, backups, exp_avgs, exp_avg_sqs, vmax_row, state_steps]
    table = _table.pointer_table(lists, w0.device, vector_rows=6)
    flag = torch.empty((), dtype=torch.bool, device=w0.device)
    n_programs = max(table.n_chunks, 1)
    adam_kernel[(n_programs,)](
        table.data, table.n_tensors, table.n_chunks, table.chunk, flag,
        _table.counter(w0.device), n_programs, found, scale, *checks, *hyper,
        *([table.data] * 7), 0,
        ALIGNED=table.vector, DIRECT=False, BLOCK=table.block, **const,
    )  # fmt: skip
    return flag


def dot_impl(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return _launch.partials(dot_kernel, [a, b], {})  # products and sums in float64


def axpby_impl(
    out: list[Tensor], x: list[Tensor], y: list[Tensor], coefs: Tensor, skip: Tensor | None
) -> None:
    # ``coefs`` and ``skip`` are read by the kernel on the device, never here.
    o0 = out[0]
    const = {**common(o0.dtype), "HAS_SKIP": skip is not None}
    coefs = coefs if coefs.is_contiguous() else coefs.contiguous()  # (a, b): two float64s
    flag = hyper_arg(o0, skip)
    if _launch.traced(o0):
        launch = _launch.direct_launcher(axpby_kernel, o0)
        if launch is None:
            return
        numels = [t.numel() for t in out]
        geo = _table.geometry(sum(numels))
        for o, u, v, n in zip(out, x, y, numels):
            chunks = triton.cdiv(n, geo.chunk)
            if chunks:
                launch[(chunks,)](
                    dummy(o0), 1, chunks, geo.chunk, coefs, flag, o, u, v, n,
                    ALIGNED=0, DIRECT=True, BLOCK=geo.block, **const,
                )  # fmt: skip
        return
    table = _table.pointer_table([out, x, y], o0.device)
    if table.n_chunks == 0:
        return
    axpby_kernel[(table.n_chunks,)](
        table.data, table.n_tensors, table.n_chunks, table.chunk, coefs, flag,
        table.data, table.data, table.data, 0,
        ALIGNED=table.vector, DIRECT=False, BLOCK=table.block, **const,
    )  # fmt: skip
