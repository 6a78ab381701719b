"""``FusedSAM``: Sharpness-Aware Minimization as a ``torch.optim.Optimizer``.

This module holds no math. It validates hyperparameters, collects tensors per step, keeps the
in-flight bookkeeping of a SAM step, and calls :mod:`fused_sam.functional`, the one place that
dispatches to a backend.
"""

from __future__ import annotations

import inspect
import itertools
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from fused_sam import closures, distributed
from fused_sam import functional as F
from fused_sam.backends import native
from fused_sam.hooks import sam_step_hooks
from fused_sam.masks import (
    DynamicMask,
    FisherMask,
    MaskPolicy,
    RandomMask,
    SparseMasks,
    tensor_salt,
)
from fused_sam.variants.direction import Direction
from fused_sam.variants.schedule import PLAIN, SAM, StepSchedule

__all__ = ["FusedSAM"]


@dataclass
class _StepPlan:
    """What the tensors of one SAM step share with those of the previous steps.

    Built when the parameters with a gradient change (or their storage does, e.g. after
    ``model.half()``) and reused otherwise: the backup list and the backend buckets of the
    step, so a step over a thousand small tensors does not redo per-tensor Python work in
    every op.
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

    @property
    def ids(self) -> tuple[int, ...]:
        """``id`` of every parameter of the step, in order."""
        return self.key[0]


@dataclass
class _StepState:
    """The bookkeeping of the SAM step, in ONE mutable object.

    Methods mutate its fields and never rebind them on the optimizer: wrappers that shallow-copy
    the optimizer's ``__dict__`` and call methods on the copy (Lightning's
    ``LightningOptimizer``) then share the step with the original, and attribute writes that a
    tracer drops cannot split the state.
    """

    #: the parameters at ``w + e`` (their backups hold ``w``); ``None`` <=> nothing in flight.
    perturbed: list[Tensor] | None = None
    #: 0-dim float32 device flag of the first pass (1.0: a non-finite gradient, step skipped).
    found_inf: Tensor | None = None
    #: ``second_step(zero_grad=True)`` asked to zero the gradients once the step is done.
    zero_grad: bool = False
    #: the cached plan of the last step (see :class:`_StepPlan`).
    plan: _StepPlan | None = None
    #: 0-dim bool tensor: whether the last finished step skipped its base update.
    last_skipped: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.bool))
    #: the losses at ``w`` and at ``w + e`` of the last step that saw both (see ``sharpness``).
    losses: tuple[Any, Any] | None = None
    #: the next first pass ran on this replica's own batch (``distributed.per_replica_pass``).
    replica_local: bool = False
    #: the loss scale a GradScaler handed to the last ``step()`` (0-dim tensor; ``None``: no
    #: scaler). A schedule's or direction's first-pass hooks see gradients divided by it: the
    #: scaler says the scale only in ``step()``, after the first pass.
    loss_scale: Tensor | None = None
    #: the scale the first-pass gradients of the step in flight were divided by before the
    #: hooks (``None``: not at all), and whether the caller told it (then it is exact).
    first_scale: Tensor | None = None
    first_scale_told: bool = False
    #: called at the start of every ``first_step``; raises when a wrapper will not finish the
    #: step (Accelerate's accumulation, see ``integrations.unwrap_sam``).
    before_first_step: Callable[[], None] | None = None


ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

_ADAPTIVE_CHOICES = (False, True, "weights")
# Keys FusedSAM keeps in every param group (next to the base optimizer's own keys).
_SAM_KEYS = ("rho", "adaptive", "eta")
# Attributes that describe one SAM step in flight or caches; never pickled or deep-copied.
_TRANSIENT = ("step", "_backups", "_step_state")
_MASK_NORMS = ("full", "masked")
#: Top-level ``state_dict()`` key holding the sparse-SAM masks and their policy's state.
SPARSE_KEY = "sparse_sam"
#: Top-level ``state_dict()`` key holding the step count of a step schedule and its state.
SCHEDULE_KEY = "sam_schedule"
#: Top-level ``state_dict()`` key holding the state of a direction policy.
DIRECTION_KEY = "sam_direction"
#: Top-level ``state_dict()`` key holding a random mask's seed, keep and draw count.
RANDOM_MASK_KEY = "sam_random_mask"


def _check_nonneg(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


_CAPTURE = (
    "a CUDA graph can capture a SAM step only where nothing is read on the host: "
    "backend='triton' (its kernels read lr and rho from one-element tensors on the GPU and "
    "decide a skip on the device) with SGD, Adam or AdamW, whose update it fuses with the "
    "restore; see the README, CUDA graphs"
)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_rho(value: Any) -> None:
    """``rho``: a real number, or a one-element float tensor (so that torch.compile does not
    guard on its value, and a CUDA graph reads its current value); its value is checked too
    except while the step is recorded (no host reads there)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.requires_grad:
            raise ValueError(
                "rho as a tensor must be a one-element float tensor without grad, e.g. "
                f"torch.tensor(0.05), got {value!r}"
            )
        if F.building_graph():
            return
        value = float(value)
    _check_nonneg("rho", value)


def _hyper(value: Any) -> float | Tensor:
    """A hyperparameter (``rho``, ``lr``) for the ops: a tensor stays one while the step is
    recorded (traced: a new value reruns the graph instead of recompiling it; captured: the
    kernels read it at each replay) and when it lives on an accelerator (the backend reads it
    where it can, on the device); a CPU tensor's value is read here, which costs nothing."""
    if isinstance(value, Tensor) and (F.building_graph() or value.device.type != "cpu"):
        return value
    return float(value)


def _validate_group(group: dict[str, Any]) -> None:
    _check_rho(group["rho"])
    _check_nonneg("eta", group["eta"])
    if group["adaptive"] not in _ADAPTIVE_CHOICES or (
        isinstance(group["adaptive"], int) and not (isinstance(group["adaptive"], bool))
    ):
        raise ValueError(
            f"adaptive must be False (SAM), True (ASAM on every tensor) or 'weights' (ASAM on "
            f"tensors with 2+ dims only, as official ASAM), got {group['adaptive']!r}"
        )


def _random_mask(
    sparsity: float, mask: Any, update_every: int | None, mask_norm: str
) -> RandomMask | None:
    """The random mask of ``mask=RandomMask(...)`` after checking the options it excludes."""
    if not isinstance(mask, RandomMask):
        return None
    if sparsity != 0 or update_every is not None or mask_norm != "full":
        raise ValueError(
            f"{mask!r} draws its own subset each step (keep={mask.keep}): leave sparsity=0, "
            "mask_update_every=None and mask_norm='full' (the norm is that of the whole "
            "gradient, as in ESAM)"
        )
    return mask


def _sparse_masks(
    sparsity: float, mask: str | MaskPolicy, update_every: int | None, mask_norm: str
) -> SparseMasks | None:
    """Validate the sparse-SAM options; ``None`` (no mask at all) when ``sparsity`` is 0."""
    sparsity = _check_nonneg("sparsity", sparsity)
    if sparsity >= 1:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction NOT perturbed), got {sparsity}")
    if mask_norm not in _MASK_NORMS:
        raise ValueError(f"mask_norm must be one of {_MASK_NORMS}, got {mask_norm!r}")
    if update_every is not None and (
        isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1
    ):
        raise ValueError(f"mask_update_every must be None or an int >= 1, got {update_every!r}")
    if mask == "fisher":
        policy: MaskPolicy = FisherMask()
    elif mask == "dynamic":
        policy = DynamicMask()
    elif isinstance(mask, MaskPolicy):
        policy = mask
    else:
        raise ValueError(
            f"mask must be 'fisher', 'dynamic', a MaskPolicy or a RandomMask, got {mask!r}"
        )
    if update_every is not None and not policy.ready():
        raise ValueError(
            f"mask_update_every={update_every} refreshes the mask inside first_step(), but "
            f"{type(policy).__name__} has nothing to score on: give it its examples "
            "(FisherMask(data, model) or FisherMask(loss=...)), or leave mask_update_every=None "
            "and call opt.update_mask(data, model=model) on your own schedule"
        )
    if sparsity == 0:
        return None
    return SparseMasks(policy, sparsity, update_every)


class FusedSAM(Optimizer):
    r"""Sharpness-Aware Minimization (SAM, ASAM, Sparse SAM) around any ``torch.optim`` optimizer.

    One SAM step, with :math:`g_1` the gradient at :math:`w`:

    .. math::
        e = \frac{\rho\, T(w)^2 g_1}{\lVert T(w)\, g_1 \rVert_2 + \epsilon}, \qquad
        w' = w + e \;\to\; g_2 = \nabla L(w'), \qquad
        w \leftarrow \mathrm{base\_step}(w, g_2)

    with :math:`T(w) = 1` (SAM) or :math:`|w| + \eta` (ASAM). The norm is global over all
    parameters with a gradient; the restore of :math:`w` is an exact copy from a backup.

    Sparse SAM (SSAM, ``sparsity > 0``) multiplies :math:`e` by a binary mask :math:`m` that
    keeps :math:`\lfloor N(1 - s)\rfloor` of all :math:`N` parameter entries, chosen by one
    global top-k (see :mod:`fused_sam.masks`): ``mask="fisher"`` (SSAM-F, empirical Fisher) or
    ``"dynamic"`` (SSAM-D, drop/grow), or any :class:`fused_sam.MaskPolicy`. Masks are stored
    bit-packed and read by the perturbation kernel; :meth:`update_mask` refreshes them by hand,
    ``mask_update_every`` inside :meth:`first_step`.

    Two ways to build it::

        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        opt = FusedSAM(torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.05)

    Two ways to drive it::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)          # w -> w + e
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)         # exact restore, then the base step

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)                # both passes; returns the first-pass loss

    A bare ``step()`` finishes a SAM step whose ``first_step`` has run (trainers call ``step()``
    without a closure); with nothing in flight it raises rather than take a plain base step
    (see :mod:`fused_sam.integrations` for trainers that drive one pass per step).

    ``param_groups`` and ``state`` are the base optimizer's own objects: LR schedulers act on
    both at once, ``rho``/``adaptive``/``eta`` live in the same group dicts (so ``rho`` can be
    scheduled too), and ``state_dict()`` is in the base optimizer's format.

    Args:
        params: parameters or param groups, or an already-built optimizer instance.
        base_optimizer: the optimizer class when ``params`` are parameters (``None`` when an
            instance is given).
        rho: neighbourhood radius (per group; SAM uses 0.05, ASAM typically 0.5-2.0).
        adaptive: ``False`` for SAM; ``True`` for ASAM on every tensor (the community
            ``adaptive=True``); ``"weights"`` for ASAM on tensors with two or more dims only,
            leaving biases and norm parameters unscaled (official ASAM).
        eta: ASAM offset in :math:`T(w) = |w| + \eta` (official ASAM uses 0.01; the community
            implementation 0).
        norm_eps: :math:`\epsilon` added to the gradient norm (named so that it cannot clash
            with Adam's ``eps``).
        backend: ``None``/``"auto"`` for the fastest available; or one of ``"reference"``,
            ``"foreach"``, ``"cpu"``, ``"cuda"``, ``"triton"``, which is then required and
            raises :class:`fused_sam.BackendUnavailableError` with the reason if it cannot run.
        skip_nonfinite: check the second-pass gradients too and skip the base update when any
            is inf/nan (costs one read of the gradients). Non-finite first-pass gradients always
            skip the perturbation and the base update.
        sparsity: fraction of entries NOT perturbed, in ``[0, 1)``; 0 is plain SAM/ASAM (no
            mask exists at all).
        mask: ``"fisher"``, ``"dynamic"`` or a :class:`fused_sam.MaskPolicy` instance (e.g.
            ``FisherMask(loader, model, num_samples=16)`` or ``DynamicMask(total_steps=...)``)
            for sparse SAM; or a :class:`fused_sam.RandomMask` (ESAM's stochastic weight
            perturbation: a fresh random subset each step, drawn inside the kernels; then
            ``sparsity`` stays 0).
        mask_update_every: refresh the mask at the start of every this-many-th ``first_step``
            (steps 0, k, 2k, ...), scoring with the first-pass gradients (SSAM-D) or the
            policy's own examples (SSAM-F). ``None``: the first mask is made at the first step
            (the policy must be able to, or :meth:`update_mask` must run first) and refreshed
            only by :meth:`update_mask`, e.g. every few epochs.
        mask_norm: ``"full"`` normalises with the norm of the unmasked gradient, as the official
            SSAM (so :math:`\lVert e \rVert \le \rho`); ``"masked"`` with the norm of
            :math:`g \odot m` (so :math:`\lVert e \rVert = \rho`), at the cost of one extra
            pass over the gradients.
        schedule: which steps are SAM steps and which plain base steps (one pass), e.g.
            :class:`fused_sam.variants.EveryK`; ``None``: every step is a SAM step.
            :attr:`next_step` says which kind comes next.
        direction: a change of the ascent direction or of the update gradient, e.g.
            :class:`fused_sam.variants.FriendlySAM` (F-SAM).
        allow_plain_steps: let a bare ``step()`` with no SAM step in flight take a plain
            base-optimizer step (e.g. to run a trainer's plain loop with the same optimizer for
            comparison). By default it raises: a trainer that calls ``backward(); step()``
            would otherwise train plain SGD/AdamW while the user believes it is SAM.
        freeze_bn_stats: when FusedSAM runs a pass at ``w + e`` itself (a closure given to
            :meth:`step`, and so Lightning, and ``SAMTrainer``), put the running statistics of
            every normalisation layer it calls back as the first pass left them (the official
            SAM's recipe; see :func:`fused_sam.frozen_bn_stats`). ``False``: the second pass
            updates them too. The two-step form runs the second pass in the caller's code, which
            wraps it in ``frozen_bn_stats(model)`` itself.
        **base_kwargs: keyword arguments for ``base_optimizer`` (``lr``, ``momentum``, ...).

    Attributes:
        base_optimizer: the wrapped optimizer.
        last_step_skipped: 0-dim bool tensor, ``True`` when the last SAM step was skipped
            because a gradient was not finite (read it with ``bool()``; that syncs the device).
    """

    #: torch.amp.GradScaler's protocol: scaler.step(opt) always calls step(), having set
    #: ``grad_scale`` and ``found_inf`` on the optimizer (see :meth:`step`).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT | Optimizer,
        base_optimizer: type[Optimizer] | None = None,
        rho: float = 0.05,
        adaptive: bool | str = False,
        *,
        eta: float = 0.0,
        norm_eps: float = 1e-12,
        backend: str | None = None,
        skip_nonfinite: bool = True,
        sparsity: float = 0.0,
        mask: str | MaskPolicy = "fisher",
        mask_update_every: int | None = None,
        mask_norm: str = "full",
        allow_plain_steps: bool = False,
        schedule: StepSchedule | None = None,
        direction: Direction | None = None,
        freeze_bn_stats: bool = True,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(params, Optimizer):
            if base_optimizer is not None or base_kwargs:
                raise ValueError(
                    "pass either an optimizer instance, or parameters plus an optimizer class "
                    "and its keyword arguments, not both"
                )
            base = params
        else:
            if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
                raise ValueError(
                    "base_optimizer must be a torch.optim.Optimizer subclass such as "
                    f"torch.optim.SGD, got {base_optimizer!r}"
                )
            _check_base_kwargs(base_optimizer, base_kwargs)
            base = base_optimizer(params, **base_kwargs)
        if isinstance(base, FusedSAM):
            raise ValueError("FusedSAM cannot wrap another FusedSAM")
        _check_drivable(base)
        self.norm_eps = _check_nonneg("norm_eps", norm_eps, positive=True)
        if backend is not None and backend != "auto" and backend not in F.BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r}; choose one of {sorted(F.BACKENDS)} or None"
            )
        self.backend = backend
        self.skip_nonfinite = bool(skip_nonfinite)
        self.allow_plain_steps = bool(allow_plain_steps)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        if schedule is not None and not isinstance(schedule, StepSchedule):
            raise ValueError(
                f"schedule must be a fused_sam.variants.StepSchedule, got {schedule!r}"
            )
        self.schedule = schedule
        if direction is not None and not isinstance(direction, Direction):
            raise ValueError(f"direction must be a fused_sam.variants.Direction: {direction!r}")
        self.direction = direction
        # Steps taken (SAM and plain), the schedule's clock: mutated in place, saved in
        # state_dict() when a schedule is set.
        self._progress = {"steps": 0}
        self._random = _random_mask(sparsity, mask, mask_update_every, mask_norm)
        if self._random is None:
            self._sparse = _sparse_masks(sparsity, mask, mask_update_every, mask_norm)
        else:
            self._sparse = None
        self.sparsity = float(sparsity)
        self.mask_norm = mask_norm
        self.base_optimizer = base

        sam_defaults = {"rho": rho, "adaptive": adaptive, "eta": eta}
        _validate_group({**sam_defaults})
        _check_distinct([distributed.local(p) for g in base.param_groups for p in g["params"]])
        # Optimizer.__init__ walks the groups through add_param_group, which (while
        # initialising) fills the SAM keys into the base optimizer's own group dicts.
        self._initializing = True
        super().__init__(base.param_groups, sam_defaults)
        self._initializing = False
        # One source of truth: the base optimizer's groups and state.
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults = {**base.defaults, **sam_defaults}
        for group in self.param_groups:
            _validate_group(group)
        self._set_shards()
        self._reset_transient()

        # A forced backend that cannot run must fail now, with its reason, not mid-training.
        for device in self._devices():
            F.resolve_backend(backend, device)

    # -------------------------------------------------------------------------------------
    # torch.optim.Optimizer plumbing

    def _reset_transient(self) -> None:
        self._backups: dict[Tensor, Tensor] = {}
        self._step_state = _StepState()

    def _set_shards(self) -> None:
        """FSDP2: the group the parameters are sharded over, and each local shard's parameter.

        With DTensor parameters the kernels run on the local shards (``_local_tensor``, the
        same object every step); the optimizer state stays keyed by the DTensor parameters, in
        the base optimizer's format. ``None`` for plain parameters (no per-step cost).
        """
        params = self._all_params()
        self._shard_group = distributed.shard_group(params)
        _check_sparse_shards(self._sparse, self._shard_group)
        if self._random is not None and self._shard_group is not None:
            raise ValueError(
                "RandomMask draws each entry from its position in the parameter, which a FSDP2 "
                "shard does not know: it is not supported with FSDP2 shards"
            )
        for policy in (self.schedule, getattr(self, "direction", None)):
            if self._shard_group is not None and policy is not None and not policy.supports_shards:
                raise ValueError(f"{policy!r} does not support FSDP2 shards")
        self._owner: dict[int, Tensor] | None = None
        if self._shard_group is not None:
            self._owner = {id(distributed.local(p)): p for p in params}

    def _param_of(self, t: Tensor) -> Tensor:
        """The parameter whose kernel tensor ``t`` is (itself, or a shard's DTensor)."""
        return t if self._owner is None else self._owner[id(t)]

    @property
    def _opt_called(self) -> bool:
        """Set by an LR scheduler's step() wrapper, read by its first step() (torch's protocol).

        Kept in a mutated dict rather than as an attribute: Dynamo drops attribute writes on an
        optimizer, and a compiled ``second_step`` sets it itself (see there).
        """
        return self._progress.get("opt_called", False)

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._progress["opt_called"] = value

    @property
    def last_step_skipped(self) -> Tensor:
        """0-dim bool tensor: ``True`` when the last SAM step skipped its base update because a
        gradient was not finite (read it with ``bool()``; that syncs the device)."""
        return self._step_state.last_skipped

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer (and so to this one), with SAM defaults.

        A group that is rejected (an invalid SAM value, a parameter already in the optimizer
        or sharing memory with one, a device the forced backend cannot run on) leaves the
        optimizer unchanged.
        """
        if getattr(self, "_initializing", False):
            super().add_param_group(param_group)
            return
        self._check_not_in_flight("add_param_group()")
        group = dict(param_group)
        for key in _SAM_KEYS:
            group.setdefault(key, self.defaults[key])
        _validate_group(group)
        new = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        _check_distinct([distributed.local(p) for p in self._all_params() + new])
        _check_sparse_shards(self._sparse, distributed.shard_group(self._all_params() + new))
        for device in {p.device for p in new}:
            F.resolve_backend(self.backend, device)
        group["params"] = new
        self.base_optimizer.add_param_group(group)
        self._set_shards()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, in its own format (SAM keys ride in the groups).

        With ``sparsity > 0`` one extra top-level key, ``"sparse_sam"``, holds the packed masks
        (``{"masks": {param_index: uint8 tensor}}``, indexed like ``"state"``), the SAM step
        counter, the step of the last refresh and the mask policy's state (e.g. its random
        generator), so a resume continues bit-identically.

        Raises:
            RuntimeError: while a SAM step is in flight (between ``first_step`` and
                ``second_step``): the model then holds perturbed weights, and a checkpoint
                taken now would silently store them. Finish or ``restore()`` first.
        """
        self._check_not_in_flight("state_dict()")
        state = super().state_dict()
        if self._sparse is not None:
            state[SPARSE_KEY] = self._sparse.state_dict(self._all_params())
        if self.direction is not None:
            state[DIRECTION_KEY] = self.direction.state_dict(self._all_params())
        if self._random is not None:
            state[RANDOM_MASK_KEY] = self._random.state_dict()
        if self.schedule is not None:
            state[SCHEDULE_KEY] = {
                "steps": self._progress["steps"],
                "policy": self.schedule.state_dict(self._all_params()),
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer or of a bare base optimizer of the same type.

        A checkpoint without masks leaves a sparse optimizer to make a fresh mask at its next
        step; a checkpoint with masks cannot go into one with ``sparsity=0``.
        """
        self._check_not_in_flight("load_state_dict()")
        state_dict = dict(state_dict)
        sparse = state_dict.pop(SPARSE_KEY, None)
        schedule = state_dict.pop(SCHEDULE_KEY, None)
        direction = state_dict.pop(DIRECTION_KEY, None)
        random = state_dict.pop(RANDOM_MASK_KEY, None)
        if random is not None and self._random is None:
            raise ValueError(
                "the checkpoint holds a RandomMask's state but this optimizer has none; build "
                "it with mask=RandomMask(...)"
            )
        if sparse is not None and self._sparse is None:
            raise ValueError(
                "the checkpoint holds sparse-SAM masks but this optimizer has sparsity=0; "
                "build it with the sparsity and mask it was saved with"
            )
        base = self.base_optimizer
        before = base.param_groups, base.state
        random_before = None if self._random is None else self._random.state_dict()
        base.load_state_dict(state_dict)
        try:
            for group in base.param_groups:
                for key in _SAM_KEYS:
                    group.setdefault(key, self.defaults[key])
                _validate_group(group)
            _check_state_shapes(base)
            if self._sparse is not None:
                if sparse is None:
                    self._sparse.reset()
                else:
                    self._sparse.load_state_dict(sparse, self._all_params())
            if self.schedule is not None and schedule is not None:
                self.schedule.load_state_dict(schedule["policy"], self._all_params())
            self._progress["steps"] = 0 if schedule is None else int(schedule["steps"])
            if self.direction is not None:
                self.direction.load_state_dict(direction or {}, self._all_params())
            if self._random is not None:
                # A checkpoint of a bare base optimizer starts the draws over.
                self._random.load_state_dict(random or {**random_before, "draws": 0})
        except BaseException:
            # Optimizer.load_state_dict builds new group and state objects: a checkpoint that
            # is rejected leaves the optimizer with the ones it had.
            base.param_groups, base.state = before
            if self._random is not None:
                self._random.load_state_dict(random_before)
            raise
        finally:
            # Re-link the wrapper to the base optimizer's (new or kept) objects.
            self.param_groups = base.param_groups
            self.state = base.state
            self._step_state.plan = None

    def __getstate__(self) -> dict[str, Any]:
        self._check_not_in_flight("pickling or copying")
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("freeze_bn_stats", True)  # pickled before the option existed
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._reset_transient()

    def __repr__(self) -> str:
        base = repr(self.base_optimizer)
        head = f"FusedSAM(base={type(self.base_optimizer).__name__}, backend={self.backend!r}, "
        head += f"norm_eps={self.norm_eps}, skip_nonfinite={self.skip_nonfinite})"
        return head + "\n" + base

    # -------------------------------------------------------------------------------------
    # The SAM step

    @property
    def next_step(self) -> str:
        """``"sam"`` or ``"plain"``: the kind of the next step under :attr:`schedule`.

        A plain step is one forward/backward and ``step()`` (or ``step(closure)``, which then
        calls the closure once); a SAM step is ``first_step`` and ``second_step`` (or
        ``step(closure)``, which calls it twice).
        """
        if self.schedule is None:
            return SAM
        return self.schedule.kind(self._progress["steps"])

    @property
    def in_flight(self) -> bool:
        """``True`` between ``first_step`` and the end of the step (weights are perturbed)."""
        return self._step_state.perturbed is not None

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, *, grad_scale: Tensor | float | None = None
    ) -> None:
        """Save the weights and move them to the ascent point ``w + e``.

        Parameters without a gradient are not perturbed. Non-finite gradients leave every weight
        bit-identical and mark the step skipped (its base update is skipped too).

        Under a ``torch.amp.GradScaler`` the gradients here are scaled. The SAM direction does
        not depend on the scale, but a :attr:`schedule` or :attr:`direction` keeps or combines
        them: their hooks get them unscaled (in place), by ``grad_scale`` when given, else by
        the scale the scaler handed to the last ``step()`` (exact while the scale does not
        change; a scaler changes it after an overflow and every ``growth_interval`` steps).
        Whatever a policy stores is corrected to the exact scale at ``step()``; only
        F-SAM's ascent direction uses the scale here, so it is off on the step after a change
        unless ``grad_scale`` is given. Without a schedule or direction the gradients are left
        as they are.

        Args:
            zero_grad: zero the gradients afterwards (``set_to_none`` as ``zero_grad()``).
            grad_scale: the loss scale of these gradients (e.g. ``scaler.get_scale()``, which
                syncs a GPU; or a 0-dim tensor). Needed by a direction when the second pass is
                unscaled by ``scaler.unscale_(opt)`` (to clip it), since ``scaler.step`` then
                hands no scale to ``step()``.

        Raises:
            RuntimeError: a SAM step is already in flight, or a gradient is sparse.
        """
        self._check_not_in_flight("first_step()")
        if self._step_state.before_first_step is not None:
            self._step_state.before_first_step()
        if _capturing() and any(
            F.resolve_backend(self.backend, d) != "triton" for d in self._devices()
        ):
            raise RuntimeError(_CAPTURE)
        if self.next_step == PLAIN:
            raise RuntimeError(
                f"the schedule ({self.schedule!r}) makes step {self._progress['steps']} a plain "
                "step: run one forward/backward and call step() (opt.next_step says which kind "
                "comes next)"
            )
        params: list[Tensor] = []
        grads: list[Tensor] = []
        rho: list[float | Tensor] = []
        adaptive: list[bool] = []
        eta: list[float] = []
        # Traced (torch.compile): the group of each tensor, which stands for its rho when
        # tensors are bucketed (a tensor rho has no value to compare while traced).
        traced = F.building_graph()
        group_of: list[int] = []
        contiguous = True
        # Whole-group list operations: this runs every step over every parameter.
        for index, group in enumerate(self.param_groups):
            _validate_group(group)  # rho may have been scheduled since the last step
            ps, gs, group_contiguous, sparse = self._with_grads(group["params"])
            if sparse:
                _raise_sparse()
            if not ps:
                continue
            contiguous = contiguous and group_contiguous
            n = len(ps)
            sign = -1.0 if group.get("maximize", False) else 1.0
            params += ps
            grads += gs
            group_rho = group["rho"]
            if not (traced and isinstance(group_rho, Tensor)):
                group_rho = float(group_rho)
            if self.direction is not None:
                group_rho = self.direction.rho(group, group_rho)
            rho += [group_rho if sign > 0 else -group_rho] * n
            if traced:
                group_of += [index] * n
            if group["adaptive"] == "weights":
                adaptive += [p.dim() >= 2 for p in ps]
            else:
                adaptive += [bool(group["adaptive"])] * n
            eta += [float(group["eta"])] * n
        st = self._step_state
        st.first_scale, st.first_scale_told = None, grad_scale is not None
        hooks = self.schedule is not None or self.direction is not None
        scale = st.loss_scale if grad_scale is None else grad_scale
        if hooks and params and scale is not None:
            scale = torch.as_tensor(scale, dtype=torch.float32, device=grads[0].device)
            _unscale(grads, scale)
            st.first_scale = scale
        if self.schedule is not None and params:
            self.schedule.first_pass(params, grads, backend=self.backend)
        if self.direction is not None and params:
            self.direction.ascent(params, grads, backend=self.backend)
        # A mask refresh that is due happens here, before the perturbation, so this step
        # already uses it (an SSAM-D refresh scores with these first-pass gradients).
        masks = None if self._sparse is None else self._sparse.step(self._all_params(), params)
        if params:
            if traced:
                # No step plan (it is keyed on addresses, which a graph does not have): the
                # backups by parameter, the buckets from a traceable grouping (static while
                # traced, so free when the graph runs).
                self._step_state.plan = None
                backups = [self._backup_for(p) for p in params]
                extras = list(zip(group_of, adaptive, eta))
                buckets = F.plan(self.backend, [params, grads, backups], extras)
                if self._random is not None:
                    masks = _draw(self._random, self._all_params(), params)
            else:
                plan = self._plan_for(params, rho, adaptive, eta)
                backups = plan.backups
                buckets = plan.buckets if contiguous else None
                if self._random is not None and plan.salts is not None:
                    masks = self._random.bits(plan.salts)
            if masks is not None and self.mask_norm == "masked":
                sumsq = F.masked_norm_sq(grads, params, adaptive, eta, masks, self.backend)
            else:
                sumsq = F.norm_sq(grads, params, adaptive, eta, self.backend, buckets=buckets)
            if self._shard_group is not None:
                sumsq = distributed.sum_over(sumsq, self._shard_group)
            if self._step_state.replica_local:
                # Local first-pass gradients: a non-finite one on any replica skips everywhere.
                sumsq = distributed.agree_nonfinite(sumsq)
            found_inf = F.nonfinite(sumsq)
            F.perturb_(
                params,
                grads,
                backups,
                sumsq,
                rho,
                self.norm_eps,
                adaptive,
                eta,
                masks,
                self.backend,
                buckets=buckets,
            )
            if self._random is not None:
                self._random.draws += 1
        else:
            found_inf = None
        # In flight from here: nothing above left a weight perturbed if it raised.
        st.perturbed, st.found_inf, st.zero_grad = params, found_inf, False
        st.replica_local = False
        if zero_grad:
            self._zero_grad()

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights exactly and take the base optimizer's step with the new grads.

        Goes through :meth:`step`, so step hooks and LR-scheduler bookkeeping see exactly one
        optimizer step per SAM step.

        Args:
            zero_grad: zero the gradients afterwards.

        Raises:
            RuntimeError: no SAM step is in flight (``first_step`` was not called).
        """
        if not self.in_flight:
            raise RuntimeError("second_step() called without a preceding first_step()")
        self._step_state.zero_grad = zero_grad
        if torch.compiler.is_compiling():
            # An LR scheduler replaces the instance's step() with a wrapper in a file that
            # torch.compile refuses to trace; it records the call, as here, then calls this.
            self._opt_called = True
            type(self).step(self)
            return
        self.step()

    def update_mask(
        self,
        data: Iterable[tuple[Tensor, Tensor]] | None = None,
        *,
        model: nn.Module | None = None,
        loss: Callable[[], Tensor] | None = None,
    ) -> None:
        """Refresh the sparse-SAM mask now (e.g. every few epochs, as the official SSAM).

        Arguments given here override the policy's own for this refresh: for SSAM-F the
        examples to score on (``data`` batches with ``model``, or a ``loss`` callable returning
        per-example losses; see :class:`fused_sam.FisherMask`). SSAM-D takes none and scores
        with the current ``.grad`` (``|g|`` by default). Under ``torch.distributed`` every rank
        must call it; all of them end up with rank 0's mask.

        Raises:
            RuntimeError: ``sparsity`` is 0, or a SAM step is in flight.
        """
        self._check_not_in_flight("update_mask()")
        if self._sparse is None:
            raise RuntimeError("update_mask() needs a sparse optimizer (sparsity > 0)")
        given = {"data": data, "model": model, "loss": loss}
        self._sparse.refresh(self._all_params(), {k: v for k, v in given.items() if v is not None})

    @property
    def mask_policy(self) -> MaskPolicy | None:
        """The sparse-SAM mask policy (``None`` when ``sparsity`` is 0)."""
        return None if self._sparse is None else self._sparse.policy

    @property
    def masks(self) -> dict[Tensor, Tensor]:
        """The current bit-packed masks by parameter (``ceil(numel / 8)`` uint8 bytes each,
        layout of :func:`fused_sam.masks.pack_bits`); empty before the first mask."""
        return {} if self._sparse is None else dict(self._sparse.packed)

    @torch.no_grad()
    def restore(self) -> None:
        """Abandon an in-flight SAM step: restore the perturbed weights exactly, no base step.

        A no-op when nothing is in flight.
        """
        st = self._step_state
        perturbed = st.perturbed
        st.perturbed = None
        st.found_inf = None
        st.zero_grad = False
        if perturbed:
            F.restore_(perturbed, [self._backups[p] for p in perturbed], self.backend)

    @sam_step_hooks  # pre-hooks after the last pass, in both forms (see fused_sam.hooks)
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run a whole SAM step with ``closure``, or finish the one in flight.

        Args:
            closure: re-evaluates the model and returns the loss (it should zero the gradients
                and call ``backward()``). With nothing in flight it is called twice, at ``w``
                and at ``w + e``; while a step begun by :meth:`first_step` is in flight it is
                the second pass (called once, at ``w + e``; Lightning's manual optimization
                passes a no-op one after ``manual_backward``).

        Returns:
            The loss of the first pass when ``step`` ran both passes; the closure's loss when it
            ran only the second; ``None`` without a closure.

        Without a closure, ``step()`` finishes the SAM step in flight (the way trainers that
        call ``optimizer.step()`` after their own backward reach it). With nothing in flight it
        raises, since it could only take a plain base-optimizer step, which is not SAM, unless
        the optimizer was built with ``allow_plain_steps=True``.

        Under ``torch.amp.GradScaler`` (``scaler.step(opt)``), the second-pass gradients are
        unscaled by the scaler's ``grad_scale`` and the base update is skipped when its
        ``found_inf`` is set; the weights are restored either way.

        If anything raises while a SAM step is in flight (the closure's second pass, a bad
        gradient or optimizer state), the weights are restored exactly and the optimizer is
        idle before the exception propagates.

        Raises:
            RuntimeError: a bare ``step()`` with nothing in flight (see above); or a closure
                that accumulated onto gradients left from before it ran (gradient accumulation
                around ``step(closure)``, e.g. Lightning's ``accumulate_grad_batches > 1``):
                the second pass would see only the closure's own batch.
        """
        # torch.amp.GradScaler sets these two for the duration of step() on optimizers that
        # declare _step_supports_amp_scaling (torch's fused optimizers' protocol).
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        scaler_inf: Tensor | None = getattr(self, "found_inf", None)
        st = self._step_state
        if grad_scale is not None:
            st.loss_scale = grad_scale
        elif scaler_inf is None:
            st.loss_scale = None  # no scaler (after scaler.unscale_ the last scale still holds)
        if closure is None:
            if self.in_flight:
                self._finish(grad_scale, scaler_inf)
            elif self.allow_plain_steps or self.next_step == PLAIN:
                self._base_step(grad_scale, scaler_inf)
            else:
                raise RuntimeError(_BARE_STEP)
            return None
        params = self._all_params()
        if self.in_flight:
            try:
                with torch.enable_grad(), closures.perturbed_pass(self.freeze_bn_stats):
                    loss = closure()
                closures.check_wrote_gradients(params, None, closure)
            except BaseException:
                self.restore()
                raise
            self._finish(grad_scale, scaler_inf)
            return loss
        closures.check_driver(closure)
        if self.next_step == PLAIN:
            before = closures.grads_before(params)
            with torch.enable_grad():
                loss = closure()
            closures.check_wrote_gradients(params, before, closure)
            self._base_step(grad_scale, scaler_inf)
            return loss
        before = [(p.grad, p.grad._version) for p in params if p.grad is not None]
        with torch.enable_grad():
            loss = closure()
        _check_closure_cleared(before)
        closures.check_wrote_gradients(params, before, closure)
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad(), closures.perturbed_pass(self.freeze_bn_stats):
                loss2 = closure()
            closures.check_wrote_gradients(params, None, closure)
        except BaseException:
            self.restore()
            raise
        self._finish(grad_scale, scaler_inf)
        st.losses = (loss, loss2)
        return loss

    @property
    def sharpness(self) -> Tensor | None:
        r"""``L(w + e) - L(w)`` of the last SAM step whose two losses FusedSAM saw (those of
        ``step(closure)`` and of the trainer integrations), detached; ``None`` otherwise.

        A by-product worth logging: the loss increase at the ascent point that SAM minimises.
        """
        losses = self._step_state.losses
        if losses is None or not all(isinstance(x, Tensor) for x in losses):
            return None
        return losses[1].detach() - losses[0].detach()

    # -------------------------------------------------------------------------------------
    # internals

    @torch.no_grad()
    def _finish(self, grad_scale: Tensor | None, scaler_inf: Tensor | None) -> None:
        """Restore and take the base step: the one exit of an in-flight SAM step."""
        st = self._step_state
        zero_grad = st.zero_grad
        try:
            skipped = self._restore_and_step(grad_scale, scaler_inf)
        except BaseException:
            self.restore()  # a no-op once the restore has happened
            raise
        st.last_skipped = skipped
        self._progress["steps"] += 1
        if zero_grad:
            self._zero_grad()

    def _restore_and_step(self, grad_scale: Tensor | None, scaler_inf: Tensor | None) -> Tensor:
        """Restore the perturbed weights, then the base update unless a skip flag is set.

        Returns:
            The 0-dim bool skip flag of the step (on the device, no host sync).
        """
        st = self._step_state
        perturbed = st.perturbed or []
        plan = st.plan
        groups = self.param_groups
        fused = self._fused_kind()
        if fused is None and _capturing():
            raise RuntimeError(_CAPTURE)
        # The skip flag: the first pass's, OR the scaler's (it has checked the second-pass
        # gradients), OR our own check of them when no scaler did.
        found_inf = _either(st.found_inf, scaler_inf)
        check = self.skip_nonfinite and scaler_inf is None
        # The second-pass gradients are read here for the non-finite check and for the fused
        # step of a single group. The step's plan holds for this pass too when the same
        # parameters have gradients and those are contiguous (norm buckets need only device and
        # dtype to agree).
        with_grad: list[Tensor] = []
        grads: list[Tensor] = []
        buckets = None
        hooks = self.schedule is not None or self.direction is not None
        if check or hooks or (fused is not None and len(groups) == 1):
            with_grad, grads, contiguous, sparse = self._with_grads(
                groups[0]["params"] if len(groups) == 1 else self._all_params()
            )
            if sparse:
                _raise_sparse()
            if (
                perturbed
                and plan is not None
                and plan.buckets is not None
                and contiguous
                and plan.ids == tuple(map(id, with_grad))
            ):
                buckets = plan.buckets
        if check and with_grad:
            n = len(with_grad)
            sumsq2 = F.norm_sq(
                grads, with_grad, [False] * n, [0.0] * n, self.backend, buckets=buckets
            )
            if self._shard_group is not None:
                sumsq2 = distributed.sum_over(sumsq2, self._shard_group)
            inf2 = F.nonfinite(sumsq2)
            found_inf = _either(found_inf, inf2)

        # with_grad and grads cover every parameter (one group's are all of them).
        if hooks:
            grad_scale, first = self._unscale_for_hooks(grads, grad_scale, scaler_inf)
            if self.direction is not None:
                self.direction.update(
                    with_grad, grads, found_inf, scale=first, backend=self.backend
                )
            if self.schedule is not None:
                self.schedule.second_pass(
                    with_grad, grads, found_inf, scale=first, backend=self.backend
                )

        if fused is not None:

            def fused_step() -> None:
                if buckets is not None and len(groups) == 1:
                    # One group holding every parameter of the plan: its buckets and backups
                    # apply, and every parameter with a gradient was perturbed.
                    step = self._sgd if fused == "sgd" else self._adam
                    step(groups[0], with_grad, grads, plan.backups, grad_scale, found_inf, buckets)
                else:
                    self._fused_restore_step(fused, perturbed, grad_scale, found_inf)
                st.perturbed = None  # restored: from here on an error must not restore again

            self._hooked(fused_step)
        else:
            if perturbed:
                F.restore_(perturbed, [self._backups[p] for p in perturbed], self.backend)
            # Still "in flight" while the base optimizer steps: its step() may raise after
            # updating some parameters, and the backups (still w) then restore all of them.
            self._unfused_step(grad_scale, found_inf)
        st.perturbed = None
        st.found_inf = None
        st.zero_grad = False
        return _skip_flag(found_inf)

    def _unscale_for_hooks(
        self, grads: list[Tensor], grad_scale: Tensor | None, scaler_inf: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Unscale the second-pass gradients in place for the hooks, and say by how much the
        first-pass gradients the hooks saw were off.

        Returns:
            The scale left for the base step (``None``: unscaled here), and the factor
            ``first`` such that the first-pass gradients the hooks saw were ``first`` times the
            unscaled ones (``None``: exact, or unknown, which only a schedule may meet: its
            math uses their direction only).
        """
        st = self._step_state
        if grad_scale is not None:
            this = grad_scale.to(grads[0].device) if grads else grad_scale
            if grads:
                _unscale(grads, this)
        elif scaler_inf is not None and not st.first_scale_told:
            # scaler.unscale_(opt) ran (to clip): the scaler hands no scale to step(), and the
            # first pass's is not known. A direction would combine gradients of two scales.
            if self.direction is not None:
                raise RuntimeError(
                    f"{self.direction!r} under a GradScaler whose second pass was unscaled by "
                    "scaler.unscale_(opt) needs the scale of the first pass: call "
                    "opt.first_step(zero_grad=True, grad_scale=scaler.get_scale())"
                )
            return None, None
        else:
            this = st.first_scale if st.first_scale_told else None
        first = st.first_scale
        if this is None and first is None:
            return None, None
        if first is None:
            return None, this
        if this is None:
            return None, first.reciprocal()
        return None, this.to(first.device) / first

    def _base_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """A plain base-optimizer step (nothing in flight), under the scaler's flags if any."""
        if self.schedule is not None:
            ps, gs, _, sparse = self._with_grads(self._all_params())
            if sparse:
                _raise_sparse()
            if grad_scale is not None and gs:
                _unscale(gs, grad_scale.to(gs[0].device))  # the hooks see unscaled gradients
                grad_scale = None
            self.schedule.plain_pass(ps, gs, backend=self.backend)
        self._unfused_step(grad_scale, found_inf)
        self._step_state.last_skipped = _skip_flag(found_inf)
        self._progress["steps"] += 1

    def _unfused_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The base optimizer's own ``step()`` on the current gradients, unless skipped.

        With a loss scale (GradScaler) the gradients are unscaled first, in place, exactly as
        ``GradScaler.unscale_`` does for optimizers without the scaling protocol. The skip is
        a host decision here (the base optimizer's Python ``step()`` cannot read a device
        flag), as it is for such optimizers under ``GradScaler``.
        """
        if found_inf is not None and bool(found_inf.item()):
            return
        if grad_scale is not None:
            _unscale_grads(self._all_params(), grad_scale)
        self._hooked(self._raw_base_step)

    def _raw_base_step(self) -> None:
        base = self.base_optimizer
        step = type(base).step
        # Optimizer patches each class's step() with a wrapper that runs the global and the
        # instance hooks; _hooked runs the instance's, and the global ones already ran once
        # for FusedSAM.step, so call what the wrapper wraps.
        getattr(step, "__wrapped__", step)(base)

    def _hooked(self, body: Callable[[], None]) -> None:
        """Run a base update as ``base_optimizer.step()`` would: with the base optimizer's own
        step hooks around it, and marked as stepped for an LR scheduler built on it."""
        base = self.base_optimizer
        for hook in list(base._optimizer_step_pre_hooks.values()):
            if hook(base, (), {}) is not None:
                raise RuntimeError(
                    "a step pre-hook on the base optimizer returned new arguments; FusedSAM "
                    "calls the base step itself and cannot pass them on"
                )
        body()
        base._opt_called = True  # what an LR scheduler's step() wrapper records
        for hook in list(base._optimizer_step_post_hooks.values()):
            hook(base, (), {})

    def _zero_grad(self) -> None:
        """``zero_grad()`` (``set_to_none``) for ``first_step``/``second_step(zero_grad=True)``;
        traced, the same in plain Python (torch's ``Optimizer.zero_grad`` is not traceable)."""
        if not torch.compiler.is_compiling():
            self.zero_grad()
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _with_grads(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], bool, bool]:
        """:func:`_collect_grads`, as the kernels see them: local shards under FSDP2."""
        if self._owner is None:
            return _collect_grads(params)
        ps = [p for p in params if p.grad is not None]
        gs = [distributed.local(p.grad) for p in ps]
        if any(map(_IS_SPARSE, gs)):
            return [], [], False, True
        return list(map(distributed.local, ps)), gs, _contiguous(gs), False

    def _fused_kind(self) -> str | None:
        """``"sgd"``/``"adam"`` when the backend's fused restore+step can replace base.step()."""
        base = self.base_optimizer
        kind = {SGD: "sgd", Adam: "adam", AdamW: "adam"}.get(type(base))
        plan = self._step_state.plan
        devices = plan.devices if plan is not None else self._devices()
        if kind is None or not F.uses_fused_base_step(self.backend, devices):
            return None
        for group in self.param_groups:
            lr = group["lr"]
            if group.get("differentiable") or (isinstance(lr, Tensor) and lr.requires_grad):
                return None
            if kind == "adam" and any(isinstance(b, Tensor) for b in group["betas"]):
                return None
        return kind

    def _fused_restore_step(
        self,
        kind: str,
        perturbed: list[Tensor],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        """Restore + base step group by group (the general case of ``_finish``)."""
        in_perturbed = set(map(id, perturbed))
        stepped: set[int] = set()
        work = []
        for group in self.param_groups:
            params, grads, _, sparse = self._with_grads(group["params"])
            if not params:
                continue
            stepped.update(map(id, params))
            if sparse:
                _raise_sparse()
            # A parameter that was not perturbed is its own backup: stepped without a restore.
            backups = [self._backups[p] if id(p) in in_perturbed else p for p in params]
            work.append((group, params, grads, backups))
        step = self._sgd if kind == "sgd" else self._adam
        for group, params, grads, backups in work:
            step(group, params, grads, backups, grad_scale, found_inf, None)
        rest = [p for p in perturbed if id(p) not in stepped]
        if rest:
            F.restore_(rest, [self._backups[p] for p in rest], self.backend)

    def _skip_new_state(self, owners, params, backups, found_inf: Tensor | None) -> bool:
        """Whether a step that would create optimizer state is skipped; if so, restore only.

        Skipped means untouched: torch's optimizers create state in their first real step, so
        state is not created on a skipped one. The flag lives on the device; it is read on the
        host only here, on steps that create state (a parameter's first step).
        """
        if found_inf is None or F.building_graph():
            # Traced, the flag has no value to branch on: the state is created and the kernel
            # skips the update, leaving it as created (zeros; see the README, torch.compile).
            return False
        if not bool(found_inf.item()):
            return False
        for p in owners:
            if p in self.state and not self.state[p]:
                del self.state[p]  # an empty entry made by a lookup of the caller
        pairs = [(p, b) for p, b in zip(params, backups) if p is not b]
        if pairs:
            F.restore_([p for p, _ in pairs], [b for _, b in pairs], self.backend)
        return True

    def _sgd(
        self, group: dict[str, Any], params, grads, backups, grad_scale, found_inf, buckets
    ) -> None:
        momentum = group["momentum"]
        bufs = None
        first = [False] * len(params)
        if momentum != 0:
            state = self.state
            owners = params if self._owner is None else list(map(self._param_of, params))
            bufs = [state[p].get("momentum_buffer") for p in owners]
            if any(buf is None for buf in bufs) and self._skip_new_state(
                owners, params, backups, found_inf
            ):
                return
            for i, buf in enumerate(bufs):
                if buf is None:  # the first step of this parameter: a fresh buffer
                    p = owners[i]
                    bufs[i] = state[p]["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                    first[i] = True
            if self._owner is not None:
                bufs = list(map(distributed.local, bufs))
        if buckets is not None and (any(first) or (bufs is not None and not _contiguous(bufs))):
            buckets = None  # first_step differs per tensor, or a loaded buffer has other strides
        F.restore_sgd_step_(
            params,
            grads,
            backups,
            bufs,
            lr=_hyper(group["lr"]),
            weight_decay=group["weight_decay"],
            momentum=momentum,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            first_step=first,
            grad_scale=grad_scale,
            found_inf=found_inf,
            backend=self.backend,
            buckets=buckets,
        )

    def _adam(
        self, group: dict[str, Any], params, grads, backups, grad_scale, found_inf, buckets
    ) -> None:
        amsgrad = group["amsgrad"]
        state = self.state
        owners = params if self._owner is None else list(map(self._param_of, params))
        sts = [state[p] for p in owners]
        if not all(sts) and self._skip_new_state(owners, params, backups, found_inf):
            return
        for p, st in zip(owners, sts):
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
        if buckets is not None and not all(map(_contiguous, (exp_avgs, exp_avg_sqs, max_sqs))):
            buckets = None  # state loaded from a checkpoint with other strides
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", isinstance(self.base_optimizer, AdamW))
        F.restore_adam_step_(
            params,
            grads,
            backups,
            exp_avgs,
            exp_avg_sqs,
            max_sqs if amsgrad else None,
            steps,
            lr=_hyper(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=amsgrad,
            maximize=group["maximize"],
            decoupled_weight_decay=bool(decoupled),
            grad_scale=grad_scale,
            found_inf=found_inf,
            backend=self.backend,
            buckets=buckets,
        )

    def _plan_for(
        self, params: list[Tensor], rho: list[float], adaptive: list[bool], eta: list[float]
    ) -> _StepPlan:
        """The step plan for ``params`` (with their per-tensor SAM values): cached or new."""
        # Everything the backups and buckets depend on, per parameter: identity, storage address,
        # layout and dtype (a `.data =` may keep the address and change the rest), and the SAM
        # values (a parameter may move between groups).
        fast = native.layout_key(params)
        if fast is not None:
            layout, contiguous = fast
        else:  # no extension: the same facts, one Python pass each
            layout = (
                tuple(map(Tensor.data_ptr, params)),
                tuple(map(Tensor.size, params)),
                tuple(map(Tensor.stride, params)),
                tuple(map(_DTYPE, params)),
            )
            contiguous = _contiguous(params)
        key = (tuple(map(id, params)), layout, tuple(rho), tuple(adaptive), tuple(eta))
        st = self._step_state
        plan = st.plan
        if layout is not None and plan is not None and plan.key == key:
            return plan
        # A storage may have changed (`p.data = ...`) since the optimizer checked its params.
        _check_distinct(params)
        backups = [self._backup_for(p) for p in params]
        buckets = None
        if contiguous:
            buckets = F.plan(self.backend, [params, backups], list(zip(rho, adaptive, eta)))
        salts = None if self._random is None else _salts(self._all_params(), params)
        st.plan = _StepPlan(key, {p.device for p in params}, backups, buckets, salts)
        return st.plan

    def _backup_for(self, p: Tensor) -> Tensor:
        # Allocated once per parameter and reused every step; preserve_format keeps a dense
        # parameter's strides so flat kernels can index weight and backup alike.
        buf = self._backups.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            self._backups[p] = buf
        return buf

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _devices(self) -> set[torch.device]:
        return {p.device for g in self.param_groups for p in g["params"]}

    def _check_not_in_flight(self, what: str) -> None:
        if self.in_flight:
            raise RuntimeError(
                f"{what} while a SAM step is in flight: the weights are perturbed (w + e). "
                "Call second_step() (or step()) to finish the step, or restore() to abandon it."
            )


_IS_SPARSE = operator.attrgetter("is_sparse")
_DTYPE = operator.attrgetter("dtype")


@torch.compiler.disable
def _draw(random: RandomMask, all_params: list[Tensor], params: list[Tensor]) -> Any:
    """The random mask of a traced step, drawn outside the graph.

    Its step key changes every step; a Python int computed while traced would be a constant of
    the graph (a recompile per step), so the draw is a graph break instead.
    """
    return random.bits(_salts(all_params, params))


def _salts(all_params: list[Tensor], params: list[Tensor]) -> tuple[int, ...]:
    """The random-mask salt of each of ``params``: from its position among all parameters,
    not among those with a gradient this step, so its mask never depends on the others."""
    position = {id(p): i for i, p in enumerate(all_params)}
    return tuple(tensor_salt(position[id(p)]) for p in params)


def _contiguous(tensors: list[Tensor] | None) -> bool:
    """Every tensor contiguous (one C-level pass); ``None`` counts as contiguous."""
    return tensors is None or all(map(Tensor.is_contiguous, tensors))


def _collect_grads(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], bool, bool]:
    """The parameters that have a gradient, their gradients, whether all those are contiguous,
    and whether one is sparse (one C++ pass with the extension, Python passes without)."""
    if torch.compiler.is_compiling():
        return _collect_grads_traced(params)
    fast = native.collect_grads(params)
    if fast is not None:
        return fast
    ps = [p for p in params if p.grad is not None]
    gs = [p.grad for p in ps]
    if any(map(_IS_SPARSE, gs)):
        return ps, gs, False, True
    return ps, gs, _contiguous(gs), False


def _collect_grads_traced(
    params: list[Tensor],
) -> tuple[list[Tensor], list[Tensor], bool, bool]:
    """:func:`_collect_grads` in plain Python for torch.compile (the extension's pass is a
    pybind call, opaque to it); what it reads is static while traced."""
    ps = [p for p in params if p.grad is not None]
    gs = [p.grad for p in ps]
    if any(g.is_sparse for g in gs):
        return ps, gs, False, True
    return ps, gs, all(g.is_contiguous() for g in gs), False


def _raise_sparse() -> None:
    raise RuntimeError(
        "FusedSAM does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
        "use dense gradients"
    )


def _check_base_kwargs(cls: type[Optimizer], kwargs: dict[str, Any]) -> None:
    sig = inspect.signature(cls.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [n for n in sig.parameters if n not in ("self", "params")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for {cls.__name__}; FusedSAM takes rho, adaptive, "
            f"eta, norm_eps, backend, skip_nonfinite, sparsity, mask, mask_update_every, "
            f"mask_norm, freeze_bn_stats and passes the rest to {cls.__name__}, which accepts "
            f"{accepted}"
        )


def _skip_flag(found_inf: Tensor | None) -> Tensor:
    """The 0-dim bool ``last_step_skipped`` of a step with skip flag ``found_inf``."""
    return torch.zeros((), dtype=torch.bool) if found_inf is None else found_inf.bool()


def _either(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The OR of two 0-dim float skip flags on ``a``'s device (``None`` stands for unset)."""
    if a is None:
        return b
    if b is None:
        return a
    return torch.maximum(a, b.to(a.device, torch.float32, non_blocking=a.device.type != "cpu"))


def _unscale_grads(params: list[Tensor], grad_scale: Tensor) -> None:
    """Divide the gradients by the loss scale in place, as ``GradScaler.unscale_`` does.

    The same op (``grad * (1 / scale)``, the reciprocal in float64 rounded to float32) per
    device and dtype, so a FusedSAM step on the base optimizer's own ``step()`` sees the very
    gradients that optimizer sees under a GradScaler.
    """
    grads = [distributed.local(p.grad) for p in params if p.grad is not None]
    if any(g.is_sparse for g in grads):
        _raise_sparse()
    _unscale(grads, grad_scale)


def _unscale(grads: list[Tensor], grad_scale: Tensor) -> None:
    """:func:`_unscale_grads` on the gradient tensors themselves (inf/nan stay non-finite)."""
    inv = grad_scale.double().reciprocal().float()
    groups = torch._C._group_tensors_by_device_and_dtype([grads], False)
    for (device, _dtype), ([gs], _) in groups.items():
        dummy = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, dummy, inv.to(device))


def _check_sparse_shards(sparse: SparseMasks | None, shard_group: object | None) -> None:
    if sparse is not None and shard_group is not None:
        raise ValueError(
            "Sparse SAM needs one global top-k over every entry; with FSDP2 shards it is not "
            "supported: use sparsity=0"
        )


def _check_drivable(base: Optimizer) -> None:
    """Reject base optimizers whose ``step()`` FusedSAM cannot call as it does."""
    if isinstance(base, torch.optim.SparseAdam):
        raise ValueError(
            "SparseAdam needs sparse gradients, which SAM cannot use (the perturbation needs "
            "the whole gradient); use Adam or AdamW"
        )
    closure = inspect.signature(type(base).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{type(base).__name__}.step() requires a closure (it re-evaluates the model "
            "itself), so FusedSAM cannot take its base step after the second pass; use a "
            "first-order optimizer such as SGD, Adam or AdamW"
        )


def _check_distinct(params: list[Tensor]) -> None:
    """Reject a parameter listed twice, or parameters that share memory.

    Each perturbed parameter has its own backup and is restored from it; two parameters over
    the same elements would be perturbed twice and restored from different copies.
    """
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) appears more than once in the "
                "optimizer; list each parameter once (tied weights are one parameter)"
            )
        seen.add(id(p))
    # Byte extents per storage; sorted, each must end before the next begins. (Interleaved
    # views whose extents overlap but whose elements do not are rejected too.)
    spans: dict[tuple[torch.device, int], list[tuple[int, int, int]]] = {}
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        size = p.element_size()
        start = p.storage_offset() * size
        extent = 1 + sum((n - 1) * abs(st) for n, st in zip(p.shape, p.stride()))
        key = (p.device, p.untyped_storage().data_ptr())
        spans.setdefault(key, []).append((start, start + extent * size, i))
    for spans_of in spans.values():
        spans_of.sort()
        for (_, end, i), (start, _, j) in itertools.pairwise(spans_of):
            if start < end:
                raise ValueError(
                    f"parameters {min(i, j)} and {max(i, j)} share memory (views of one "
                    "tensor); each parameter must have its own storage so that it can be "
                    "perturbed and restored exactly"
                )


#: Per-element optimizer state that must have its parameter's shape (torch's names).
_PER_ELEMENT_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _check_state_shapes(base: Optimizer) -> None:
    """Every per-element state tensor of ``base`` has its parameter's shape."""
    index = {id(p): i for i, p in enumerate(p for g in base.param_groups for p in g["params"])}
    for p, st in base.state.items():
        for key in _PER_ELEMENT_STATE:
            value = st.get(key)
            if isinstance(value, Tensor) and value.shape != p.shape:
                raise ValueError(
                    f"checkpoint state {key!r} of parameter {index.get(id(p), '?')} has shape "
                    f"{tuple(value.shape)}, but the parameter has shape {tuple(p.shape)}: the "
                    "checkpoint is of another model"
                )


_BARE_STEP = (
    "FusedSAM.step() was called with no closure and no SAM step in flight, so it could only "
    "take a plain base-optimizer step: that would train without SAM. A SAM step needs two "
    "forward/backward passes: call first_step() after the first backward and step() (or "
    "second_step()) after the second, or pass a closure to step(closure). Trainers that run one "
    "backward per step need the integration: HF Trainer -> "
    "fused_sam.integrations.transformers.SAMTrainer; Accelerate / timm loops -> the two-step "
    "loop, reaching first_step() through fused_sam.integrations.unwrap_sam(optimizer); "
    "Lightning -> automatic optimization with a module derived from "
    "fused_sam.integrations.lightning.SAMLightningModule, or the manual recipe in the README. "
    "To take plain steps on purpose, "
    "build FusedSAM(..., allow_plain_steps=True) or call opt.base_optimizer.step()."
)


def _check_closure_cleared(before: list[tuple[Tensor, int]]) -> None:
    """Raise if the first closure call accumulated onto gradients it did not clear.

    ``before`` holds the gradients (and their version counters) that existed before the call.
    A closure following torch's convention zeroes them first: it either replaces them
    (``set_to_none``, new tensors) or zeroes them in place and then accumulates (two writes).
    A gradient that is the same tensor written exactly once was accumulated onto, as in a
    trainer that runs backward on earlier micro-batches and then calls ``step(closure)`` for the
    last one: the first pass would see every micro-batch, the second only the closure's.
    """
    for g, version in before:
        if g._version == version + 1:
            raise RuntimeError(
                "step(closure): the closure added its gradients to gradients that were there "
                "before it ran (gradient accumulation, e.g. Lightning's "
                "accumulate_grad_batches > 1), without zeroing them. SAM's second pass would "
                "see only the closure's own batch, so this step would be wrong. Zero the "
                "gradients inside the closure (torch's convention), or accumulate with "
                "first_step()/second_step() (README: 'Gradient accumulation')."
            )
