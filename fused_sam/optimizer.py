r"""``FusedSAM``: Sharpness-Aware Minimization as a ``torch.optim.Optimizer``.

This module is the public API and the step state machine; it holds no math and names no backend,
variant or mask kind. The parts of a step live in :mod:`fused_sam.step` (plan, base steps, AMP,
policies, validation, checkpoints) and every op goes through :mod:`fused_sam.functional`, the
one place that dispatches to a backend.

One SAM step, with :math:`g_1` the gradient at :math:`w`:

.. math::
    e = \frac{\rho\, T(w)^2 g_1}{\lVert T(w)\, g_1 \rVert_2 + \epsilon}, \qquad
    w' = w + e \;\to\; g_2 = \nabla L(w'), \qquad
    w \leftarrow \mathrm{base\_step}(w, g_2)

with :math:`T(w) = 1` (SAM) or :math:`|w| + \eta` (ASAM). The norm is global over all
parameters with a gradient; the restore of :math:`w` is an exact copy from a backup.

``param_groups`` and ``state`` are the base optimizer's own objects: LR schedulers act on
both at once, ``rho``/``adaptive``/``eta`` live in the same group dicts (so ``rho`` can be
scheduled too), and ``state_dict()`` is in the base optimizer's format.

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fused_sam import distributed
from fused_sam import functional as F
from fused_sam.masks.policies import MaskPolicy
from fused_sam.step import amp, base_steps, checkpoint, closures, engine, guards, plan
from fused_sam.step import validation as V
from fused_sam.step.hooks import sam_step_hooks
from fused_sam.step.policies import Policies
from fused_sam.step.state import StepState
from fused_sam.variants.direction import Direction
from fused_sam.variants.schedule import PLAIN, StepSchedule

__all__ = ["FusedSAM"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

# Attributes that describe one SAM step in flight or caches; never pickled or deep-copied.
_TRANSIENT = ("step", "_backups", "_step_state")


class FusedSAM(Optimizer):
    r"""Sharpness-Aware Minimization (SAM, ASAM, Sparse SAM) around any ``torch.optim`` optimizer.

    One SAM step (module docstring): ``w + e`` with ``e = rho T(w)^2 g / (||T(w) g|| + eps)``,
    a second pass there, an exact restore of ``w`` and the base optimizer's step. Its
    ``param_groups`` and ``state`` are the base optimizer's own objects.

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
        skip_nonfinite: also skip the base update on inf/nan second-pass gradients (one read
            of them); non-finite first-pass gradients always skip the step.
        sparsity: fraction of entries NOT perturbed, in ``[0, 1)``; 0 is plain SAM/ASAM (no
            mask exists at all).
        mask: ``"fisher"``, ``"dynamic"`` or a :class:`fused_sam.MaskPolicy` (e.g.
            ``FisherMask(loader, model)``) for sparse SAM; or a :class:`fused_sam.RandomMask`
            (ESAM: a fresh random subset each step, drawn in the kernels; ``sparsity`` stays 0).
        mask_update_every: refresh the mask at every this-many-th ``first_step`` (steps 0, k,
            2k, ...); ``None``: made at the first step, refreshed only by :meth:`update_mask`.
        mask_norm: ``"full"``: the norm of the unmasked gradient (official SSAM,
            :math:`\lVert e \rVert \le \rho`); ``"masked"``: of :math:`g \odot m`
            (:math:`\lVert e \rVert = \rho`, one more pass over the gradients).
        schedule: which steps are SAM steps and which plain base steps (one pass), e.g.
            :class:`fused_sam.variants.EveryK`; ``None``: every step is a SAM step.
            :attr:`next_step` says which kind comes next.
        direction: a change of the ascent direction or of the update gradient, e.g.
            :class:`fused_sam.variants.FriendlySAM` (F-SAM).
        allow_plain_steps: let a bare ``step()`` with nothing in flight take a plain base
            step; by default it raises (a trainer's ``backward(); step()`` would train without
            SAM while the user believes it is SAM).
        freeze_bn_stats: when FusedSAM runs a pass at ``w + e`` itself (a closure given to
            :meth:`step`, Lightning, ``SAMTrainer``), put the running statistics of every
            normalisation layer it calls back as the first pass left them (the official SAM's
            recipe; see :func:`fused_sam.frozen_bn_stats`); ``False``: the second pass updates
            them too.
        **base_kwargs: keyword arguments for ``base_optimizer`` (``lr``, ``momentum``, ...).

    Attributes:
        base_optimizer: the wrapped optimizer.
    """

    #: torch.amp.GradScaler's protocol: scaler.step(opt) always calls step(), having set
    #: ``grad_scale`` and ``found_inf`` on the optimizer (see :mod:`fused_sam.step.amp`).
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
        base = V.base_optimizer(params, base_optimizer, base_kwargs)
        if isinstance(base, FusedSAM):
            raise ValueError("FusedSAM cannot wrap another FusedSAM")
        V.check_drivable(base)
        self.norm_eps = V.check_nonneg("norm_eps", norm_eps, positive=True)
        self.backend = V.check_backend_name(backend)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.allow_plain_steps = bool(allow_plain_steps)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self._policies = Policies.build(
            schedule, direction, sparsity, mask, mask_update_every, mask_norm
        )
        # Steps taken (SAM and plain), the schedule's clock: mutated in place, saved in
        # state_dict() when a schedule is set.
        self._progress = {"steps": 0}
        self.sparsity = float(sparsity)
        self.mask_norm = mask_norm
        self.base_optimizer = base

        sam_defaults = {"rho": rho, "adaptive": adaptive, "eta": eta}
        V.validate_group({**sam_defaults})
        V.check_distinct([distributed.local(p) for g in base.param_groups for p in g["params"]])
        # A wrapper that is refused must leave a given base optimizer as it was: the group
        # dicts written below are put back if anything raises.
        with guards.wrapping(base, V.SAM_KEYS):
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
                V.validate_group(group)
            self._set_shards()
            self._reset_transient()
            # A forced backend that cannot run must fail now, with its reason, not mid-training.
            V.check_backend_runs(backend, self._devices())

    # -------------------------------------------------------------------------------------
    # torch.optim.Optimizer plumbing

    def _reset_transient(self) -> None:
        self._backups: dict[Tensor, Tensor] = {}
        self._step_state = StepState()

    def _set_shards(self) -> None:
        self._shards = plan.shards(self._all_params())
        self._policies.check_shards(self._shards.group)

    def _setup(self) -> engine.Setup:
        """The optimizer's parts and options, as the step engine takes them."""
        return engine.Setup(
            self.base_optimizer,
            self._policies,
            self._backups,
            self.backend,
            self.norm_eps,
            self.skip_nonfinite,
            self._shards,
        )

    @property
    def schedule(self) -> StepSchedule | None:
        """The step schedule (``None``: every step is a SAM step)."""
        return self._policies.schedule

    @property
    def direction(self) -> Direction | None:
        """The direction policy (``None``: plain SAM/ASAM directions)."""
        return self._policies.direction

    @property
    def _opt_called(self) -> bool:
        """An LR scheduler's step() wrapper sets it (torch's protocol); kept in a mutated dict,
        as Dynamo drops attribute writes on an optimizer (a compiled ``second_step`` sets it)."""
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
        group = V.new_group(param_group, self.defaults, self._all_params(), self.backend)
        self._policies.check_shards(distributed.shard_group(self._all_params() + group["params"]))
        self.base_optimizer.add_param_group(group)
        filled = [set(V.SAM_KEYS) - set(param_group)]
        guards.record_filled_keys(self.base_optimizer, [group], filled)
        self._set_shards()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, in its own format (SAM keys ride in the groups), and
        one top-level key per policy with state (e.g. ``"sparse_sam"``): resumes bit-identically.

        Raises:
            RuntimeError: while a SAM step is in flight (the weights are perturbed).
        """
        self._check_not_in_flight("state_dict()")
        state = super().state_dict()
        state.update(self._policies.state_dict(self._all_params(), self._progress["steps"]))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer or of a bare base optimizer of the same type.

        A checkpoint without masks leaves a sparse optimizer to make a fresh mask at its next
        step; a checkpoint with masks cannot go into one with ``sparsity=0``.
        """
        self._check_not_in_flight("load_state_dict()")
        # Hooks registered on FusedSAM, as torch's Optimizer.load_state_dict runs them (the
        # base optimizer's own run inside its load_state_dict).
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = dict(pre_hook(self, state_dict) or state_dict)
        base = self.base_optimizer
        try:
            self._progress["steps"] = checkpoint.load_state_dict(
                base, state_dict, self._policies, self.defaults, self._all_params()
            )
        finally:
            # Re-link the wrapper to the base optimizer's (new or kept) objects.
            self.param_groups = base.param_groups
            self.state = base.state
            self._step_state.plan = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

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
        """``"sam"`` (``first_step`` + ``second_step``, or ``step(closure)``: two passes) or
        ``"plain"`` (one pass and ``step()``): the kind of the next step under the schedule."""
        return self._policies.kind(self._progress["steps"])

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
        bit-identical and mark the step skipped (its base update is skipped too). Scaled
        gradients (GradScaler) are fine; a schedule or direction gets them unscaled in place.

        Args:
            zero_grad: zero the gradients afterwards (``set_to_none`` as ``zero_grad()``).
            grad_scale: the loss scale of these gradients (``scaler.get_scale()`` or a 0-dim
                tensor): a direction needs it when ``scaler.unscale_(opt)`` runs before
                ``scaler.step`` (README, "Mixed precision").

        Raises:
            RuntimeError: a SAM step is already in flight, or a gradient is sparse.
        """
        self._check_not_in_flight("first_step()")
        if self._step_state.first_step_check is not None:
            self._step_state.first_step_check()
        if F.capturing() and not F.capturable(self.backend, self._devices()):
            raise RuntimeError(V.CAPTURE)
        if self.next_step == PLAIN:
            raise RuntimeError(V.plain_step_error(self.schedule, self._progress["steps"]))
        st = self._step_state
        params, first_sumsq = engine.ascend(st, self._setup(), grad_scale)
        # In flight from here: nothing above left a weight perturbed if it raised.
        st.perturbed, st.first_sumsq, st.zero_grad = params, first_sumsq, False
        st.replica_local = False
        if zero_grad:
            self._zero_grad()

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights exactly and take the base optimizer's step with the new grads
        (through :meth:`step`: hooks and LR schedulers see one optimizer step per SAM step).

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

        Arguments given here override the policy's own for this refresh (SSAM-F's examples:
        ``data`` batches with ``model``, or a ``loss`` callable returning per-example losses;
        SSAM-D takes none and scores the current ``.grad``). Under ``torch.distributed`` every
        rank must call it; all of them end up with rank 0's mask.

        Raises:
            RuntimeError: ``sparsity`` is 0, or a SAM step is in flight.
        """
        self._check_not_in_flight("update_mask()")
        given = {"data": data, "model": model, "loss": loss}
        inputs = {k: v for k, v in given.items() if v is not None}
        self._policies.update_mask(self._all_params(), inputs)

    @property
    def mask_policy(self) -> MaskPolicy | None:
        """The sparse-SAM mask policy (``None`` when ``sparsity`` is 0)."""
        return self._policies.mask_policy

    @property
    def masks(self) -> dict[Tensor, Tensor]:
        """The current bit-packed masks by parameter (``ceil(numel / 8)`` uint8 bytes each,
        layout of :func:`fused_sam.masks.pack_bits`); empty before the first mask."""
        return self._policies.packed_masks

    @torch.no_grad()
    def restore(self) -> None:
        """Abandon an in-flight SAM step: restore the perturbed weights exactly, no base step.

        A no-op when nothing is in flight.
        """
        st = self._step_state
        perturbed = st.perturbed
        st.end()
        if perturbed:
            F.restore_(perturbed, [self._backups[p] for p in perturbed], self.backend)

    def mark_replica_local(self) -> None:
        """The next first pass runs on this replica's own batch (no all-reduce): a non-finite
        gradient on any replica skips the step everywhere (``distributed.per_replica_pass``)."""
        self._step_state.replica_local = True

    def set_first_step_check(self, check: Callable[[], None] | None) -> Callable[[], None] | None:
        """Install a check :meth:`first_step` runs first (it raises when a wrapper will not
        finish the step: :func:`fused_sam.integrations.unwrap_sam`); returns the previous."""
        previous, self._step_state.first_step_check = self._step_state.first_step_check, check
        return previous

    def record_losses(self, loss: Any, loss_perturbed: Any) -> None:
        """Record the losses at ``w`` and ``w + e`` of the step that ran both passes, for
        :attr:`sharpness` (the trainer integrations call it)."""
        self._step_state.losses = (loss, loss_perturbed)

    @sam_step_hooks  # pre-hooks after the last pass, in both forms (see fused_sam.step.hooks)
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

        Without a closure, ``step()`` finishes the SAM step in flight (trainers call it after
        their own backward); with nothing in flight it raises (a plain base step is not SAM)
        unless ``allow_plain_steps=True``. Under ``scaler.step(opt)`` the second-pass gradients
        are unscaled and the base update is skipped on the scaler's ``found_inf``. If anything
        raises while a step is in flight, the weights are restored exactly first.

        Raises:
            RuntimeError: a bare ``step()`` with nothing in flight; or a closure that added to
                gradients left from before it ran (accumulation around ``step(closure)``).
        """
        scaler = amp.ScalerArgs.of(self)
        st = self._step_state
        if scaler.grad_scale is not None:
            st.loss_scale = scaler.grad_scale
        elif scaler.scaler_inf is None:
            st.loss_scale = None  # no scaler (after scaler.unscale_ the last scale still holds)
        if closure is None:
            if self.in_flight:
                self._finish(scaler)
            elif self.allow_plain_steps or self.next_step == PLAIN:
                self._base_step(scaler)
            else:
                raise RuntimeError(V.BARE_STEP)
            return None
        params = self._all_params()
        if self.in_flight:
            loss = self._second_pass(closure, params)
            self._finish(scaler)
            return loss
        closures.check_driver(closure)
        before = closures.grads_before(params)
        with torch.enable_grad():
            loss = closure()
        if self.next_step == PLAIN:
            closures.check_wrote_gradients(params, before, closure)
            self._base_step(scaler)
            return loss
        V.check_closure_cleared(before)
        closures.check_wrote_gradients(params, before, closure)
        self.first_step(zero_grad=True)
        loss2 = self._second_pass(closure, params)
        self._finish(scaler)
        st.losses = (loss, loss2)
        return loss

    def _second_pass(self, closure: Callable[[], Any], params: list[Tensor]) -> Any:
        """The closure at ``w + e`` (normalisation statistics kept from the first pass unless
        ``freeze_bn_stats=False``); restores the weights if it raises or made no gradient."""
        try:
            with torch.enable_grad(), closures.perturbed_pass(self.freeze_bn_stats):
                loss = closure()
            closures.check_wrote_gradients(params, None, closure)
            return loss
        except BaseException:
            self.restore()
            raise

    @property
    def sharpness(self) -> Tensor | None:
        r"""``L(w + e) - L(w)`` (detached) of the last SAM step whose two losses FusedSAM saw
        (``step(closure)``, the trainer integrations), else ``None``: worth logging."""
        losses = self._step_state.losses
        if losses is None or not all(isinstance(x, Tensor) for x in losses):
            return None
        return losses[1].detach() - losses[0].detach()

    # -------------------------------------------------------------------------------------
    # internals

    @torch.no_grad()
    def _finish(self, scaler: amp.ScalerArgs) -> None:
        """Restore and take the base step: the one exit of an in-flight SAM step."""
        st = self._step_state
        zero_grad = st.zero_grad
        try:
            skipped = engine.restore_and_step(st, scaler, self._setup())
        except BaseException:
            self.restore()  # a no-op once the restore has happened
            st.post_hooks_due = False
            raise
        st.last_skipped = skipped
        self._progress["steps"] += 1
        base_steps.post_hooks(self.base_optimizer, st)
        if zero_grad:
            self._zero_grad()

    def _base_step(self, scaler: amp.ScalerArgs) -> None:
        """A plain base-optimizer step (nothing in flight), under the scaler's flags if any."""
        engine.plain_step(self._step_state, scaler, self._setup())
        self._step_state.last_skipped = amp.skip_flag(scaler.scaler_inf)
        self._progress["steps"] += 1
        base_steps.post_hooks(self.base_optimizer, self._step_state)

    def _zero_grad(self) -> None:
        """``zero_grad()`` (``set_to_none``) for ``first_step``/``second_step(zero_grad=True)``;
        traced, the same in plain Python (torch's ``Optimizer.zero_grad`` is not traceable)."""
        if torch.compiler.is_compiling():
            plan.drop_grads(self._all_params())
        else:
            self.zero_grad()

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
