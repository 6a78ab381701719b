"""The two halves of a SAM step over explicit arguments: ascend to ``w + e``, then restore and
take the base update.

:class:`fused_sam.FusedSAM` calls :func:`ascend` from ``first_step`` and
:func:`restore_and_step` when a step in flight finishes; both keep their bookkeeping in the
step's :class:`~fused_sam.step.state.StepState`. Every op goes through
:mod:`fused_sam.functional`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor
from torch.optim import Optimizer

from fused_sam import functional as F
from fused_sam.step import amp, base_steps, plan
from fused_sam.step.guards import claim_parameters
from fused_sam.step.policies import Policies
from fused_sam.step.state import StepState
from fused_sam.step.validation import CAPTURE


class Setup(NamedTuple):
    """What a step runs with: the optimizer's parts and options, as explicit values."""

    base: Optimizer
    policies: Policies
    #: the backup of each parameter (``w`` while a step is in flight), allocated once.
    backups: dict[Tensor, Tensor]
    backend: str | None
    norm_eps: float
    skip_nonfinite: bool
    shards: plan.Shards


def ascend(
    st: StepState,
    setup: Setup,
    grad_scale: Tensor | float | None,
) -> tuple[list[Tensor], Tensor | None]:
    r"""Save ``w`` and move the parameters with a gradient to ``w + e``.

    .. math::
        e = \rho\, T(w)^2 g / (\lVert T(w)\, g \rVert_2 + \epsilon)\ (\odot\ \text{mask})

    The policies see the gradients first (unscaled by ``grad_scale``, else by the last scale a
    GradScaler handed to ``step()``); the step's plan (backups, buckets) is cached in ``st``.

    Returns:
        The parameters perturbed, and the first pass's squared-norm partials (``None`` with no
        gradient at all): a non-finite total means nothing was perturbed and the base step is
        skipped, decided on the device by the restore op (or by :func:`amp.union`).
    """
    policies = setup.policies
    fp = plan.first_pass(setup.base.param_groups, setup.shards.owner is not None, policies.rho)
    claim_parameters(st, fp.params)  # not perturbed by another optimizer's step in flight
    st.first_scale, st.first_scale_told = None, grad_scale is not None
    if policies.gradient_hooks:
        st.first_scale = amp.unscale_first_pass(fp.grads, st.loss_scale, grad_scale)
    policies.first_pass(fp.params, fp.grads, setup.backend)
    # Every parameter (a mask's position and refresh need them all), only when a mask is on.
    groups = setup.base.param_groups
    all_params = [p for g in groups for p in g["params"]] if policies.masked else []
    return fp.params, _perturb(st, fp, all_params, setup)


def _perturb(
    st: StepState, fp: plan.FirstPass, all_params: list[Tensor], setup: Setup
) -> Tensor | None:
    """The perturbation of :func:`ascend`: plan, mask, norm, flag, ``perturb_``."""
    policies, backups, backend = setup.policies, setup.backups, setup.backend
    params, grads = fp.params, fp.grads
    masks = policies.sparse_step(all_params, params)
    if not params:
        return None
    if F.building_graph():
        # No step plan (it is keyed on addresses, which a graph does not have): the backups by
        # parameter, the buckets from a traceable grouping (static while traced, so free when
        # the graph runs).
        st.plan = None
        bufs = [plan.backup_for(backups, p) for p in params]
        extras = list(zip(fp.group_of, fp.adaptive, fp.eta))
        buckets = F.plan(backend, [params, grads, bufs], extras)
        salts, traced = None, True
    else:
        st.plan = plan.step_plan(st.plan, fp, backups, backend, policies.salts_of(all_params))
        bufs, salts, traced = st.plan.backups, st.plan.salts, False
        buckets = st.plan.buckets if fp.contiguous else None
    masks = policies.masks(masks, all_params, params, salts, traced=traced)
    ad, eta = fp.adaptive, fp.eta
    if masks is not None and policies.masked_norm:
        sumsq = F.masked_norm_sq(grads, params, ad, eta, masks, backend)
    else:
        sumsq = F.norm_sq(grads, params, ad, eta, backend, buckets=buckets)
    sumsq = plan.global_sumsq(sumsq, setup.shards.group, replica_local=st.replica_local)
    F.perturb_(
        params,
        grads,
        bufs,
        sumsq,
        fp.rho,
        setup.norm_eps,
        ad,
        eta,
        masks,
        backend,
        buckets=buckets,
    )
    policies.perturbed()
    return sumsq


def restore_and_step(
    st: StepState,
    scaler: amp.ScalerArgs,
    setup: Setup,
) -> Tensor:
    """Restore the perturbed weights, then the base update unless the step is skipped.

    Args:
        st: the step in flight (``st.perturbed`` at ``w + e``, their ``backups`` hold ``w``).
        scaler: what a GradScaler handed to ``step()``.
        setup: the optimizer's parts and options.

    Returns:
        The step's 0-dim bool skip flag (``last_step_skipped``), on the device: on the fused
        path the restore op computes it in the kernel that steps (no extra op, no host sync).
    """
    base, policies, backups, backend = setup.base, setup.policies, setup.backups, setup.backend
    owner = setup.shards.owner
    perturbed = st.perturbed or []
    groups = base.param_groups
    sharded = owner is not None
    # One group's list is every parameter (no copy of it per step).
    all_params = (
        groups[0]["params"] if len(groups) == 1 else [p for g in groups for p in g["params"]]
    )
    devices = {p.device for p in all_params} if st.plan is None else st.plan.devices
    entry = base_steps.fused_entry(base, backend, devices)
    if entry is None and F.capturing():
        raise RuntimeError(CAPTURE)
    # The step is skipped when the first pass's norm is not finite, OR the scaler's flag is set
    # (it has checked the second-pass gradients), OR our own check of them fails when no
    # scaler did.
    sumsqs = [] if st.first_sumsq is None else [st.first_sumsq]
    check = setup.skip_nonfinite and scaler.scaler_inf is None
    # The second-pass gradients are read here for the non-finite check, the policies and the
    # fused step of a single group. The step's plan holds for this pass too when the same
    # parameters have gradients and those are contiguous (norm buckets need only device and
    # dtype to agree).
    with_grad: list[Tensor] = []
    grads: list[Tensor] = []
    buckets = None
    if check or policies.gradient_hooks or (entry is not None and len(groups) == 1):
        with_grad, grads, contiguous, _ = plan.dense_grads(all_params, sharded)
        if (
            perturbed
            and st.plan is not None
            and contiguous
            and st.plan.ids == tuple(map(id, with_grad))
        ):
            buckets = st.plan.buckets
    if check and with_grad:
        n = len(with_grad)
        sumsq2 = F.norm_sq(grads, with_grad, [False] * n, [0.0] * n, backend, buckets=buckets)
        sumsqs.append(plan.global_sumsq(sumsq2, setup.shards.group, replica_local=False))
    grad_scale = scaler.grad_scale
    if entry is not None and not policies.gradient_hooks:
        flags = base_steps.Flags(grad_scale, scaler.scaler_inf, tuple(sumsqs))
    else:
        # The flag as a tensor now: the policies see it before the update, and a base
        # optimizer's own step() decides on the host.
        skip = amp.union(scaler.scaler_inf, sumsqs)
        if policies.gradient_hooks:
            # with_grad and grads cover every parameter (one group's are all of them).
            grad_scale, first = amp.unscale_second_pass(
                grads,
                grad_scale,
                scaler.scaler_inf,
                st.first_scale,
                st.first_scale_told,
                direction=policies.direction,
            )
            policies.second_pass(with_grad, grads, skip, first, backend)
        flags = base_steps.Flags(grad_scale, skip)
    if entry is None:
        if perturbed:
            F.restore_(perturbed, [backups[p] for p in perturbed], backend)
        # Still "in flight" while the base optimizer steps: its step() may raise after
        # updating some parameters, and the backups (still w) then restore all of them.
        base_steps.unfused_step(base, all_params, grad_scale, flags.found_inf, st)
        st.end()
        return amp.skip_flag(flags.found_inf)

    def fused_step() -> Tensor | None:
        if buckets is not None and len(groups) == 1:
            # One group holding every parameter of the plan: its buckets and backups apply,
            # and every parameter with a gradient was perturbed.
            owners = with_grad if owner is None else [owner[id(t)] for t in with_grad]
            t = base_steps.Tensors(with_grad, grads, st.plan.backups, owners, buckets, st.plan)
            flag = entry.step(base, groups[0], t, flags, backend)
        else:
            owner_of = None if owner is None else (lambda t: owner[id(t)])
            flag = base_steps.restore_and_step_groups(
                entry, base, perturbed, backups, flags, backend, owner_of
            )
        st.perturbed = None  # restored: from here on an error must not restore again
        return flag

    skipped = base_steps.hooked(base, fused_step, st)
    st.end()
    if skipped is None:  # no parameter had a gradient: nothing stepped
        return amp.skip_flag(amp.union(flags.found_inf, flags.sumsqs))
    return skipped


def plain_step(st: StepState, scaler: amp.ScalerArgs, setup: Setup) -> None:
    """A plain base-optimizer step (nothing in flight), under the scaler's flags if any; a
    schedule's plain-pass hook sees the gradients first (unscaled)."""
    base, policies = setup.base, setup.policies
    all_params = [p for g in base.param_groups for p in g["params"]]
    grad_scale = scaler.grad_scale
    if policies.schedule is not None:
        ps, gs, _, _ = plan.dense_grads(all_params, setup.shards.owner is not None)
        if grad_scale is not None and gs:
            amp.unscale(gs, grad_scale.to(gs[0].device))  # the hooks see unscaled gradients
            grad_scale = None
        policies.plain_pass(ps, gs, setup.backend)
    base_steps.unfused_step(base, all_params, grad_scale, scaler.scaler_inf, st)
