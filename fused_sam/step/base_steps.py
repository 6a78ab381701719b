"""Base-optimizer steps: the restore followed by the base optimizer's update.

One entry per supported base family (SGD; Adam/AdamW). An entry creates the base optimizer's
state in its own format (as torch's ``_init_group`` does: a checkpoint of a FusedSAM(SGD) holds
SGD's ``momentum_buffer``) and calls the fused restore-and-step op of
:mod:`fused_sam.functional`. Any other base optimizer (or a backend without fused steps) takes
the unfused path: an exact restore, then the base's own ``step()``. The optimizer looks the
entry up with :func:`fused_entry`; it never branches on the base type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer

from fused_sam import distributed
from fused_sam import functional as F
from fused_sam.hyperparams import AdamHyper, SGDHyper
from fused_sam.step import amp
from fused_sam.step.guards import note_partial_base_step
from fused_sam.step.plan import StepPlan, contiguous, dense_grads
from fused_sam.step.state import StepState

_T = TypeVar("_T")


class Tensors(NamedTuple):
    """The tensors of one fused restore-and-step call (one param group)."""

    params: list[Tensor]
    grads: list[Tensor]
    #: ``w`` of each parameter; a parameter that was not perturbed is its own backup.
    backups: list[Tensor]
    #: the owner of each kernel tensor (the DTensor of an FSDP2 shard, else the tensor itself).
    owners: list[Tensor]
    #: buckets of a plan that covers exactly these tensors, or ``None``.
    buckets: F.Buckets | None
    #: that plan (it remembers whether the state's dtypes were checked), or ``None``.
    plan: StepPlan | None = None


class Flags(NamedTuple):
    """The AMP and skip inputs of a base update (see :mod:`fused_sam.step.amp`).

    The update is skipped when ``found_inf`` is set or the total of one of ``sumsqs`` is not
    finite; the fused ops decide that on the device (no host read).
    """

    grad_scale: Tensor | None
    #: a 0-dim float flag (1.0: skip), or ``None``.
    found_inf: Tensor | None
    #: squared-norm partials of the passes to check (the first pass, and the second when the
    #: optimizer checks it).
    sumsqs: tuple[Tensor, ...] = ()


def _group_lr(value: Any) -> float | Tensor:
    """A group's ``lr`` for the ops: a tensor stays one while the step is recorded
    (traced: a new value reruns the graph instead of recompiling it; captured: the kernels read
    it at each replay) and when it lives on an accelerator (the backend reads it where it can,
    on the device); a CPU tensor's value is read here, which costs nothing."""
    if isinstance(value, Tensor) and (F.building_graph() or value.device.type != "cpu"):
        return value
    return float(value)


def skip_new_state(
    state: dict[Tensor, dict[str, Any]], t: Tensors, flags: Flags, backend: str | None
) -> bool:
    """Whether a step that would create optimizer state is skipped; if so, restore only.

    Skipped means untouched: torch's optimizers create state in their first real step, so
    state is not created on a skipped one. The flags live on the device; they are read on the
    host only here, on steps that create state (a parameter's first step).
    """
    if F.building_graph():
        # Traced, the flag has no value to branch on: the state is created and the kernel
        # skips the update, leaving it as created (zeros; see the README, torch.compile).
        return False
    skip = amp.union(flags.found_inf, flags.sumsqs)
    if skip is None or not bool(skip.item()):
        return False
    for p in t.owners:
        if p in state and not state[p]:
            del state[p]  # an empty entry made by a lookup of the caller
    pairs = [(p, b) for p, b in zip(t.params, t.backups) if p is not b]
    if pairs:
        F.restore_([p for p, _ in pairs], [b for _, b in pairs], backend)
    return True


def _skipped(t: Tensors) -> Tensor:
    """The skip flag of a step that :func:`skip_new_state` skipped."""
    return torch.ones((), dtype=torch.bool, device=t.params[0].device)


def sgd_step(
    base: Optimizer, group: dict[str, Any], t: Tensors, flags: Flags, backend: str | None
) -> Tensor | None:
    """Restore + ``torch.optim.SGD``'s update of one param group; returns the 0-dim bool skip
    flag (on the device)."""
    momentum = group["momentum"]
    bufs = None
    first = [False] * len(t.params)
    buckets = t.buckets
    if momentum != 0:
        state = base.state
        bufs = [state[p].get("momentum_buffer") for p in t.owners]
        if any(buf is None for buf in bufs) and skip_new_state(state, t, flags, backend):
            return _skipped(t)
        for i, buf in enumerate(bufs):
            if buf is None:  # the first step of this parameter: a fresh buffer
                p = t.owners[i]
                bufs[i] = state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
                first[i] = True
        if t.owners is not t.params:
            bufs = list(map(distributed.local, bufs))
    if buckets is not None and (any(first) or (bufs is not None and not contiguous(bufs))):
        buckets = None  # first_step differs per tensor, or a loaded buffer has other strides
    skip = F.restore_sgd_step_(
        t.params,
        t.grads,
        t.backups,
        bufs,
        SGDHyper(
            lr=_group_lr(group["lr"]),
            weight_decay=group["weight_decay"],
            momentum=momentum,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        ),
        first_step=first,
        grad_scale=flags.grad_scale,
        found_inf=flags.found_inf,
        sumsqs=flags.sumsqs,
        backend=backend,
        buckets=buckets,
        state_dtypes_alike=t.plan is not None and t.plan.state_dtypes_alike,
    )
    _note_state_dtypes(t, [bufs])
    return skip


def adam_step(
    base: Optimizer, group: dict[str, Any], t: Tensors, flags: Flags, backend: str | None
) -> Tensor | None:
    """Restore + ``torch.optim.Adam``'s or ``AdamW``'s update of one param group; returns the
    0-dim bool skip flag (on the device)."""
    amsgrad = group["amsgrad"]
    state = base.state
    sts = [state[p] for p in t.owners]
    if not all(sts) and skip_new_state(state, t, flags, backend):
        return _skipped(t)
    for p, st in zip(t.owners, sts):
        if not st:
            # torch.optim.Adam's own state format; the step counter lives on the param's
            # device (as with fused=True) so the kernels never read host memory.
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif p.is_cpu != st["step"].is_cpu or (not p.is_cpu and st["step"].device != p.device):
            # e.g. a checkpoint that kept step counters on the host (is_cpu is cheap to read)
            st["step"] = st["step"].to(p.device)
    loc = distributed.local
    exp_avgs = [loc(st["exp_avg"]) for st in sts]
    exp_avg_sqs = [loc(st["exp_avg_sq"]) for st in sts]
    max_sqs = [loc(st["max_exp_avg_sq"]) for st in sts] if amsgrad else []
    steps = [loc(st["step"]) for st in sts]
    buckets = t.buckets
    if buckets is not None and not all(map(contiguous, (exp_avgs, exp_avg_sqs, max_sqs))):
        buckets = None  # state loaded from a checkpoint with other strides
    beta1, beta2 = group["betas"]
    decoupled = group.get("decoupled_weight_decay", isinstance(base, AdamW))
    skip = F.restore_adam_step_(
        t.params,
        t.grads,
        t.backups,
        exp_avgs,
        exp_avg_sqs,
        max_sqs if amsgrad else None,
        steps,
        AdamHyper(
            lr=_group_lr(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=amsgrad,
            maximize=group["maximize"],
            decoupled_weight_decay=bool(decoupled),
        ),
        grad_scale=flags.grad_scale,
        found_inf=flags.found_inf,
        sumsqs=flags.sumsqs,
        backend=backend,
        buckets=buckets,
        state_dtypes_alike=t.plan is not None and t.plan.state_dtypes_alike,
    )
    _note_state_dtypes(t, [exp_avgs, exp_avg_sqs, max_sqs])
    return skip


def _note_state_dtypes(t: Tensors, states: list[list[Tensor] | None]) -> None:
    """Once per plan: remember whether the state tensors have their parameters' dtypes, so
    that later steps skip that per-tensor check (see :class:`~fused_sam.step.plan.StepPlan`)."""
    if t.plan is not None and not t.plan.state_dtypes_alike:
        t.plan.state_dtypes_alike = F.state_dtypes_alike(t.params, states)


#: A fused base step: ``(base, group, tensors, flags, backend) -> skip flag``.
FusedStep = Callable[[Optimizer, dict[str, Any], Tensors, Flags, str | None], Tensor | None]


def _adam_fusable(group: dict[str, Any]) -> bool:
    return not any(isinstance(b, Tensor) for b in group["betas"])


@dataclass(frozen=True)
class Entry:
    """A base family whose update a backend fuses with the restore."""

    step: FusedStep
    #: whether a param group's options allow the fused update (else: the unfused path).
    group_fusable: Callable[[dict[str, Any]], bool] = lambda group: True


#: The supported base families; the place a new one plugs in (with its op and reference twin).
ENTRIES: dict[type[Optimizer], Entry] = {
    SGD: Entry(sgd_step),
    Adam: Entry(adam_step, _adam_fusable),
    AdamW: Entry(adam_step, _adam_fusable),
}


def fused_entry(base: Optimizer, backend: str | None, devices: set[torch.device]) -> Entry | None:
    """The entry whose fused restore+step replaces ``base.step()``, or ``None`` (unfused)."""
    entry = ENTRIES.get(type(base))
    if entry is None or not F.uses_fused_base_step(backend, devices):
        return None
    for group in base.param_groups:
        lr = group["lr"]
        if group.get("differentiable") or (isinstance(lr, Tensor) and lr.requires_grad):
            return None
        if not entry.group_fusable(group):
            return None
    return entry


def restore_and_step_groups(
    entry: Entry,
    base: Optimizer,
    perturbed: list[Tensor],
    backups: dict[Tensor, Tensor],
    flags: Flags,
    backend: str | None,
    owner_of: Callable[[Tensor], Tensor] | None,
) -> Tensor | None:
    """Restore + base step group by group (the general case: several groups, or no plan).

    Args:
        perturbed: the kernel tensors at ``w + e``; their ``backups`` hold ``w``.
        owner_of: the parameter of a kernel tensor under FSDP2 (``None``: itself).

    Returns:
        The skip flag of the first group stepped (every group decides alike), or ``None`` when
        no parameter has a gradient.
    """
    in_perturbed = set(map(id, perturbed))
    stepped: set[int] = set()
    work = []
    for group in base.param_groups:
        params, grads, _, _ = dense_grads(group["params"], owner_of is not None)
        if not params:
            continue
        stepped.update(map(id, params))
        # A parameter that was not perturbed is its own backup: stepped without a restore.
        bufs = [backups[p] if id(p) in in_perturbed else p for p in params]
        owners = params if owner_of is None else list(map(owner_of, params))
        work.append((group, Tensors(params, grads, bufs, owners, None)))
    skip = None
    for group, t in work:
        flag = entry.step(base, group, t, flags, backend)
        skip = flag if skip is None else skip
    rest = [p for p in perturbed if id(p) not in stepped]
    if rest:
        F.restore_(rest, [backups[p] for p in rest], backend)
    return skip


def hooked(base: Optimizer, body: Callable[[], _T], st: StepState) -> _T:
    """Run a base update as ``base.step()`` would: with the base optimizer's own step
    pre-hooks before it, and marked as stepped for an LR scheduler built on it. Its post-hooks
    run once the whole step is done (:func:`post_hooks`). Returns what ``body`` returns."""
    for hook in list(base._optimizer_step_pre_hooks.values()):
        if hook(base, (), {}) is not None:
            raise RuntimeError(
                "a step pre-hook on the base optimizer returned new arguments; FusedSAM "
                "calls the base step itself and cannot pass them on"
            )
    try:
        out = body()
    except BaseException as err:
        if st.perturbed is not None:  # the caller restores w; the base's state keeps its writes
            note_partial_base_step(err, type(base).__name__)
        raise
    base._opt_called = True  # what an LR scheduler's step() wrapper records
    st.post_hooks_due = True
    return out


def post_hooks(base: Optimizer, st: StepState) -> None:
    """The base optimizer's step post-hooks, after a step that ran its update is complete
    (weights, state, counters): as for torch's own ``step()``, a hook that raises cannot undo
    the step, on every backend alike."""
    if st.post_hooks_due:
        st.post_hooks_due = False
        for hook in list(base._optimizer_step_post_hooks.values()):
            hook(base, (), {})


def raw_base_step(base: Optimizer) -> None:
    """``base.step()`` without torch's hook wrapper: :func:`hooked` runs the instance hooks,
    and the global ones already ran once for ``FusedSAM.step``."""
    step = type(base).step
    getattr(step, "__wrapped__", step)(base)


def unfused_step(
    base: Optimizer,
    params: list[Tensor],
    grad_scale: Tensor | None,
    skip: Tensor | None,
    st: StepState,
) -> None:
    """The base optimizer's own ``step()`` on the current gradients, unless skipped.

    With a loss scale (GradScaler) the gradients are unscaled first, in place, exactly as
    ``GradScaler.unscale_`` does for optimizers without the scaling protocol. The skip is a host
    decision here (the base optimizer's Python ``step()`` cannot read a device flag), as it is
    for such optimizers under ``GradScaler``.

    Args:
        params: every parameter of ``base`` (their gradients are unscaled).
    """
    if skip is not None and bool(skip.item()):
        return
    if grad_scale is not None:
        amp.unscale_grads(params, grad_scale)
    hooked(base, lambda: raw_base_step(base), st)
