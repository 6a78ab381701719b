"""The variants of a SAM step behind one object: a schedule, a direction and a mask.

Three kinds of policy change a SAM step, each at fixed points of it:

* a :class:`~fused_sam.variants.StepSchedule` says which steps are SAM steps and which plain
  ones, and may act on the gradients of each pass (LookSAM);
* a :class:`~fused_sam.variants.Direction` changes the radius, the ascent direction and the
  gradient of the update (F-SAM, GSAM);
* a mask restricts the perturbation: sparse SAM's :class:`~fused_sam.masks.SparseMasks`
  (a policy scores, one global top-k keeps) or ESAM's :class:`~fused_sam.masks.RandomMask`
  (a fresh random subset each step, drawn inside the kernels).

:class:`Policies` holds the ones a FusedSAM was built with and is what the optimizer calls;
each policy owns its ``state_dict`` key and its refusals (FSDP2 shards). A new schedule or
direction plugs in as a subclass of its kind and touches nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fused_sam.masks.bits import RandomBits, tensor_salt
from fused_sam.masks.policies import DynamicMask, FisherMask, MaskPolicy, RandomMask
from fused_sam.masks.sparse import SparseMasks
from fused_sam.step.validation import check_nonneg
from fused_sam.variants.direction import Direction
from fused_sam.variants.policy import Policy
from fused_sam.variants.schedule import SAM, StepSchedule

#: Top-level ``state_dict()`` key holding the sparse-SAM masks and their policy's state.
SPARSE_KEY = "sparse_sam"
#: Top-level ``state_dict()`` key holding the step count of a step schedule and its state.
SCHEDULE_KEY = "sam_schedule"
#: Top-level ``state_dict()`` key holding the state of a direction policy.
DIRECTION_KEY = "sam_direction"
#: Top-level ``state_dict()`` key holding a random mask's seed, keep and draw count.
RANDOM_MASK_KEY = "sam_random_mask"
#: Every extra key, in the order they are written.
KEYS = (SPARSE_KEY, DIRECTION_KEY, RANDOM_MASK_KEY, SCHEDULE_KEY)

MASK_NORMS = ("full", "masked")


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
    sparsity = check_nonneg("sparsity", sparsity)
    if sparsity >= 1:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction NOT perturbed), got {sparsity}")
    if mask_norm not in MASK_NORMS:
        raise ValueError(f"mask_norm must be one of {MASK_NORMS}, got {mask_norm!r}")
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


def salts(all_params: list[Tensor], params: list[Tensor]) -> tuple[int, ...]:
    """The random-mask salt of each of ``params``: from its position among all parameters,
    not among those with a gradient this step, so its mask never depends on the others."""
    position = {id(p): i for i, p in enumerate(all_params)}
    return tuple(tensor_salt(position[id(p)]) for p in params)


@torch.compiler.disable
def _draw(random: RandomMask, all_params: list[Tensor], params: list[Tensor]) -> Any:
    """The random mask of a traced step, drawn outside the graph.

    Its step key changes every step; a Python int computed while traced would be a constant of
    the graph (a recompile per step), so the draw is a graph break instead.
    """
    return random.bits(salts(all_params, params))


class Policies:
    """The schedule, direction and mask of one FusedSAM, called at fixed points of its step.

    Built by :meth:`build` from the constructor's options (which it validates).
    """

    def __init__(
        self,
        schedule: StepSchedule | None,
        direction: Direction | None,
        sparse: SparseMasks | None,
        random: RandomMask | None,
        mask_norm: str,
    ) -> None:
        self.schedule = schedule
        self.direction = direction
        #: the gradient policies, outermost first (see :mod:`fused_sam.variants.policy`).
        self._outside_in: tuple[Policy, ...] = tuple(p for p in (schedule, direction) if p)
        self.sparse = sparse
        self.random = random
        self.mask_norm = mask_norm

    @classmethod
    def build(
        cls,
        schedule: StepSchedule | None,
        direction: Direction | None,
        sparsity: float,
        mask: Any,
        mask_update_every: int | None,
        mask_norm: str,
    ) -> Policies:
        """Validate the variant options of ``FusedSAM(...)`` and hold their policies."""
        if schedule is not None and not isinstance(schedule, StepSchedule):
            raise ValueError(
                f"schedule must be a fused_sam.variants.StepSchedule, got {schedule!r}"
            )
        if direction is not None and not isinstance(direction, Direction):
            raise ValueError(f"direction must be a fused_sam.variants.Direction: {direction!r}")
        random = _random_mask(sparsity, mask, mask_update_every, mask_norm)
        sparse = None
        if random is None:
            sparse = _sparse_masks(sparsity, mask, mask_update_every, mask_norm)
        return cls(schedule, direction, sparse, random, mask_norm)

    # -- refusals ----------------------------------------------------------------------------

    def check_shards(self, shard_group: object | None) -> None:
        """Refuse FSDP2 shards (``shard_group`` not ``None``) for a policy that needs whole
        tensors or global reductions over every entry."""
        if shard_group is None:
            return
        if self.sparse is not None:
            raise ValueError(
                "Sparse SAM needs one global top-k over every entry; with FSDP2 shards it is "
                "not supported: use sparsity=0"
            )
        if self.random is not None:
            raise ValueError(
                "RandomMask draws each entry from its position in the parameter, which a FSDP2 "
                "shard does not know: it is not supported with FSDP2 shards"
            )
        for policy in self._outside_in:
            if not policy.supports_shards:
                raise ValueError(f"{policy!r} does not support FSDP2 shards")

    # -- the step ----------------------------------------------------------------------------

    def kind(self, steps: int) -> str:
        """``"sam"`` or ``"plain"``: the kind of step number ``steps``."""
        return SAM if self.schedule is None else self.schedule.kind(steps)

    def rho(self, group: dict[str, Any], rho: float | Tensor) -> float | Tensor:
        """The radius of this step for a param group (``rho`` is the group's own)."""
        return rho if self.direction is None else self.direction.rho(group, rho)

    @property
    def gradient_hooks(self) -> bool:
        """Whether a policy reads or changes the gradients of a pass (they must be unscaled)."""
        return bool(self._outside_in)

    def first_pass(self, params: list[Tensor], grads: list[Tensor], backend: str | None) -> None:
        """In ``first_step``, before the norm: the gradients at ``w`` (unscaled)."""
        if not params:
            return
        for policy in self._outside_in:
            policy.first_pass(params, grads, backend=backend)

    def sparse_step(self, all_params: list[Tensor], params: list[Tensor]) -> list[Tensor] | None:
        """The sparse masks of this step's ``params`` (a refresh that is due happens here,
        before the perturbation, so this step already uses it); ``None`` without sparse SAM."""
        return None if self.sparse is None else self.sparse.step(all_params, params)

    def salts_of(self, all_params: list[Tensor]) -> Any:
        """A function giving the random-mask salts of a step's parameters (``None`` without a
        random mask); the step plan keeps them."""
        if self.random is None:
            return lambda params: None
        return lambda params: salts(all_params, params)

    def masks(
        self,
        sparse: list[Tensor] | None,
        all_params: list[Tensor],
        params: list[Tensor],
        plan_salts: Sequence[int] | None,
        *,
        traced: bool,
    ) -> list[Tensor] | RandomBits | None:
        """The mask the perturbation of this step reads: the random draw of a random mask,
        else ``sparse`` (from :meth:`sparse_step`; ``None`` without a mask)."""
        if self.random is None:
            return sparse
        if traced:
            return _draw(self.random, all_params, params)
        return None if plan_salts is None else self.random.bits(plan_salts)

    @property
    def masked(self) -> bool:
        """Whether a mask (sparse or random) restricts the perturbation."""
        return self.sparse is not None or self.random is not None

    @property
    def masked_norm(self) -> bool:
        """Normalise with the norm of the masked gradient (``mask_norm="masked"``)."""
        return self.mask_norm == "masked"

    def perturbed(self) -> None:
        """After the perturbation: the random mask's next draw is a new one."""
        if self.random is not None:
            self.random.draws += 1

    def second_pass(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        skip: Tensor | None,
        scale: Tensor | None,
        backend: str | None,
    ) -> None:
        """Before the base update of a SAM step: the gradients at ``w + e`` (unscaled), with
        the step's skip flag and the factor the first-pass gradients were off by."""
        for policy in reversed(self._outside_in):
            policy.second_pass(params, grads, skip, scale=scale, backend=backend)

    def plain_pass(self, params: list[Tensor], grads: list[Tensor], backend: str | None) -> None:
        """Before a plain step's base update (the gradients may be changed in place)."""
        if self.schedule is not None:
            self.schedule.plain_pass(params, grads, backend=backend)

    # -- sparse masks by hand ------------------------------------------------------------------

    def update_mask(self, params: list[Tensor], inputs: dict[str, Any]) -> None:
        """Refresh the sparse mask now (``update_mask()``)."""
        if self.sparse is None:
            raise RuntimeError("update_mask() needs a sparse optimizer (sparsity > 0)")
        self.sparse.refresh(params, inputs)

    @property
    def mask_policy(self) -> MaskPolicy | None:
        """The sparse-SAM mask policy (``None`` when ``sparsity`` is 0)."""
        return None if self.sparse is None else self.sparse.policy

    @property
    def packed_masks(self) -> dict[Tensor, Tensor]:
        """The current bit-packed masks by parameter; empty before the first mask."""
        return {} if self.sparse is None else dict(self.sparse.packed)

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self, params: list[Tensor], steps: int) -> dict[str, Any]:
        """The extra ``state_dict()`` keys of the policies (``steps``: the schedule's clock)."""
        state: dict[str, Any] = {}
        if self.sparse is not None:
            state[SPARSE_KEY] = self.sparse.state_dict(params)
        if self.direction is not None:
            state[DIRECTION_KEY] = self.direction.state_dict(params)
        if self.random is not None:
            state[RANDOM_MASK_KEY] = self.random.state_dict()
        if self.schedule is not None:
            state[SCHEDULE_KEY] = {"steps": steps, "policy": self.schedule.state_dict(params)}
        return state

    def check_loadable(self, extras: dict[str, Any]) -> None:
        """Refuse a checkpoint holding a policy's state that this optimizer has not."""
        if extras.get(RANDOM_MASK_KEY) is not None and self.random is None:
            raise ValueError(
                "the checkpoint holds a RandomMask's state but this optimizer has none; build "
                "it with mask=RandomMask(...)"
            )
        if extras.get(SPARSE_KEY) is not None and self.sparse is None:
            raise ValueError(
                "the checkpoint holds sparse-SAM masks but this optimizer has sparsity=0; "
                "build it with the sparsity and mask it was saved with"
            )

    def snapshot(self) -> Any:
        """What :meth:`rollback` needs to undo a refused :meth:`load_state_dict`."""
        return None if self.random is None else self.random.state_dict()

    def load_state_dict(self, extras: dict[str, Any], params: list[Tensor], before: Any) -> int:
        """Load the policies' keys of a checkpoint; returns the schedule's step count.

        A checkpoint of a bare base optimizer (no keys) resets what it cannot say: a fresh
        mask at the next step, random draws from 0, the schedule at step 0.
        """
        sparse = extras.get(SPARSE_KEY)
        schedule = extras.get(SCHEDULE_KEY)
        if self.sparse is not None:
            if sparse is None:
                self.sparse.reset()
            else:
                self.sparse.load_state_dict(sparse, params)
        if self.schedule is not None and schedule is not None:
            self.schedule.load_state_dict(schedule["policy"], params)
        steps = 0 if schedule is None else int(schedule["steps"])
        if self.direction is not None:
            self.direction.load_state_dict(extras.get(DIRECTION_KEY) or {}, params)
        if self.random is not None:
            self.random.load_state_dict(extras.get(RANDOM_MASK_KEY) or {**before, "draws": 0})
        return steps

    def rollback(self, before: Any) -> None:
        """Undo a :meth:`load_state_dict` that raised."""
        if self.random is not None:
            self.random.load_state_dict(before)
