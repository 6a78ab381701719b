"""The step plan: per-tensor SAM values, gradient collection, and what a step reuses.

A SAM step runs over the parameters that have a gradient. This module turns the param groups
into flat per-tensor lists (``rho``, ``adaptive``, ``eta``), collects the gradients as the
kernels see them (local shards under FSDP2), and caches what the tensors of one step share with
the previous steps: the backups and the backend buckets, so a step over a thousand small tensors
does not redo per-tensor Python work in every op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fused_sam import distributed
from fused_sam import functional as F
from fused_sam.step.validation import check_distinct, raise_sparse, validate_group

#: ``(params with a gradient, their gradients, all gradients contiguous, any sparse)``.
Collected = tuple[list[Tensor], list[Tensor], bool, bool]


@dataclass
class StepPlan:
    """What the tensors of one SAM step share with those of the previous steps.

    Built when the parameters with a gradient change (or their storage does, e.g. after
    ``model.half()``) and reused otherwise.
    """

    #: per parameter of the step: ``id`` (first), storage address, layout, dtype and SAM values.
    key: tuple[Any, ...]
    devices: set[torch.device]
    backups: list[Tensor]
    #: buckets of the step's (params, grads, backups) from :func:`functional.plan`; ``None``
    #: when a parameter is not contiguous (every op then buckets for itself).
    buckets: F.Buckets | None
    #: per parameter of the step, its random-mask salt (``None`` without a random mask).
    salts: tuple[int, ...] | None = None
    #: the base optimizer's state tensors had their parameters' dtypes when last checked (the
    #: check runs once per plan: a cast of the model changes the plan's key, a loaded
    #: checkpoint drops the plan).
    state_dtypes_alike: bool = False

    @property
    def ids(self) -> tuple[int, ...]:
        """``id`` of every parameter of the step, in order."""
        return self.key[0]


class Shards(NamedTuple):
    """FSDP2: the group the parameters are sharded over, and the DTensor parameter of each
    local shard by ``id`` (both ``None`` for plain parameters: no per-step cost)."""

    group: object | None
    owner: dict[int, Tensor] | None


def shards(params: list[Tensor]) -> Shards:
    """The :class:`Shards` of ``params``. With DTensor parameters the kernels run on the local
    shards (the same object every step); the optimizer state stays keyed by the DTensor
    parameters, in the base optimizer's format."""
    group = distributed.shard_group(params)
    if group is None:
        return Shards(None, None)
    return Shards(group, {id(distributed.local(p)): p for p in params})


@dataclass
class FirstPass:
    """The parameters of a first pass with a gradient, and their per-tensor SAM values."""

    params: list[Tensor]
    grads: list[Tensor]
    #: signed radius per tensor (negative under ``maximize``): a float, or a tensor while traced.
    rho: list[float | Tensor]
    adaptive: list[bool]
    eta: list[float]
    #: traced only: the group index of each tensor (it stands for a tensor ``rho``'s value).
    group_of: list[int]
    #: every gradient contiguous.
    contiguous: bool


def contiguous(tensors: list[Tensor] | None) -> bool:
    """Every tensor contiguous (one C-level pass); ``None`` counts as contiguous."""
    return tensors is None or all(map(Tensor.is_contiguous, tensors))


def with_grads(params: list[Tensor], sharded: bool) -> Collected:
    """The parameters with a gradient and their gradients as the kernels see them: the local
    shards of DTensor parameters when ``sharded`` (FSDP2), the tensors themselves otherwise."""
    if not sharded:
        return F.collect_grads(params)
    ps = [p for p in params if p.grad is not None]
    gs = [distributed.local(p.grad) for p in ps]
    if any(g.is_sparse for g in gs):
        return [], [], False, True
    return list(map(distributed.local, ps)), gs, contiguous(gs), False


def dense_grads(params: list[Tensor], sharded: bool) -> Collected:
    """:func:`with_grads`, refusing sparse gradients."""
    collected = with_grads(params, sharded)
    if collected[3]:
        raise_sparse()
    return collected


def first_pass(
    param_groups: list[dict[str, Any]],
    sharded: bool,
    rho_of: Callable[[dict[str, Any], float | Tensor], float | Tensor],
) -> FirstPass:
    """Collect the first pass: every group's parameters with a gradient and their SAM values.

    Args:
        param_groups: the optimizer's groups (their SAM values are validated here: ``rho`` may
            have been scheduled since the last step).
        sharded: the parameters are FSDP2 DTensors (see :func:`with_grads`).
        rho_of: the radius of a group's step from its own (a direction policy may change it).
    """
    traced = F.building_graph()
    out = FirstPass([], [], [], [], [], [], True)
    # Whole-group list operations: this runs every step over every parameter.
    for index, group in enumerate(param_groups):
        validate_group(group)
        ps, gs, group_contiguous, _ = dense_grads(group["params"], sharded)
        if not ps:
            continue
        out.contiguous = out.contiguous and group_contiguous
        n = len(ps)
        sign = -1.0 if group.get("maximize", False) else 1.0
        out.params += ps
        out.grads += gs
        group_rho = group["rho"]
        if not (traced and isinstance(group_rho, Tensor)):
            group_rho = float(group_rho)
        group_rho = rho_of(group, group_rho)
        out.rho += [group_rho if sign > 0 else -group_rho] * n
        if traced:
            out.group_of += [index] * n
        if group["adaptive"] == "weights":
            out.adaptive += [p.dim() >= 2 for p in ps]
        else:
            out.adaptive += [bool(group["adaptive"])] * n
        out.eta += [float(group["eta"])] * n
    return out


def backup_for(backups: dict[Tensor, Tensor], p: Tensor) -> Tensor:
    """The backup buffer of ``p``: allocated once and reused every step; ``preserve_format``
    keeps a dense parameter's strides so flat kernels can index weight and backup alike."""
    buf = backups.get(p)
    if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
        buf = torch.empty_like(p, memory_format=torch.preserve_format)
        backups[p] = buf
    return buf


def step_plan(
    cached: StepPlan | None,
    step: FirstPass,
    backups: dict[Tensor, Tensor],
    backend: str | None,
    salts_of: Callable[[list[Tensor]], tuple[int, ...] | None],
) -> StepPlan:
    """The plan of the step ``step``: ``cached`` when nothing it depends on changed, else new.

    Everything the backups and buckets depend on, per parameter: identity, storage address,
    layout and dtype (a ``.data =`` may keep the address and change the rest), and the SAM
    values (a parameter may move between groups).
    """
    params, rho, adaptive, eta = step.params, step.rho, step.adaptive, step.eta
    layout, all_contiguous = F.layout_key(params)
    key = (tuple(map(id, params)), layout, tuple(rho), tuple(adaptive), tuple(eta))
    if layout is not None and cached is not None and cached.key == key:
        return cached
    # A storage may have changed (`p.data = ...`) since the optimizer checked its params.
    check_distinct(params)
    bufs = [backup_for(backups, p) for p in params]
    buckets = None
    if all_contiguous:
        buckets = F.plan(backend, [params, bufs], list(zip(rho, adaptive, eta)))
    return StepPlan(key, {p.device for p in params}, bufs, buckets, salts_of(params))


def global_sumsq(sumsq: Tensor, shard_group: object | None, *, replica_local: bool) -> Tensor:
    """The squared-norm partials of a pass as every process must see them: summed over the
    FSDP2 shard group, and, after a replica-local first pass, NaN everywhere when any replica
    saw a non-finite gradient (so that every replica skips together)."""
    if shard_group is not None:
        sumsq = distributed.sum_over(sumsq, shard_group)
    if replica_local:
        sumsq = distributed.agree_nonfinite(sumsq)
    return sumsq


def drop_grads(params: list[Tensor]) -> None:
    """``zero_grad(set_to_none=True)`` in plain Python, which torch.compile traces (torch's
    ``Optimizer.zero_grad`` is not traceable)."""
    for p in params:
        p.grad = None
