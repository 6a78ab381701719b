"""The sparse-SAM mask state one optimizer keeps: packed masks, refresh schedule, policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fused_sam import distributed
from fused_sam.masks.bits import pack_mask, packed_numel, unpack_bits
from fused_sam.masks.policies import MaskPolicy, MaskRequest
from fused_sam.masks.select import num_kept


class SparseMasks:
    """Packed masks, schedule and policy of one sparse-SAM optimizer (used by ``FusedSAM``).

    Masks live as packed ``uint8`` tensors on each parameter's device, keyed by parameter like
    optimizer state. A refresh is due at ``first_step`` when no mask exists yet, or when
    ``update_every`` is set and the number of SAM steps taken is a multiple of it (and no
    refresh already happened at that step). Under ``torch.distributed`` every rank computes the
    refresh (keeping policy state in step) and then takes rank 0's masks.
    """

    def __init__(self, policy: MaskPolicy, sparsity: float, update_every: int | None) -> None:
        self.policy = policy
        self.sparsity = sparsity
        self.update_every = update_every
        self.steps = 0
        self.last_refresh: int | None = None
        self.packed: dict[Tensor, Tensor] = {}
        #: a refresh fell on a step whose gradients were not finite (a skipped step, which
        #: changes no state): it happens at the next step instead.
        self.pending = False

    def due(self) -> bool:
        if not self.packed or self.pending:
            return True
        every = self.update_every
        return every is not None and self.steps % every == 0 and self.last_refresh != self.steps

    def refresh(self, params: list[Tensor], inputs: dict[str, Any] | None = None) -> None:
        for p in params:
            if p.is_complex():
                raise ValueError("sparse SAM does not support complex parameters")
        inputs = inputs or {}
        if not inputs and not self.policy.ready():
            raise RuntimeError(
                f"{type(self.policy).__name__} cannot refresh the mask on its own: call "
                "opt.update_mask(data, model=model) (or update_mask(loss=...)) before the first "
                "step and whenever it is due, or give the policy its data"
            )
        current = [unpack_bits(self.packed[p], p) for p in params] if self._covers(params) else None
        request = MaskRequest(
            params=params,
            grads=[p.grad for p in params],
            masks=current,
            num_keep=num_kept(sum(p.numel() for p in params), self.sparsity),
            step=self.steps,
            inputs=inputs,
        )
        chosen = self.policy.initial(request) if current is None else self.policy.select(request)
        packed = [pack_mask(m, p) for m, p in zip(chosen, params)]
        distributed.broadcast_from_rank0(packed)
        self.packed = dict(zip(params, packed))
        self.last_refresh = self.steps

    def step(self, all_params: list[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
        """One SAM step: refresh if due, count the step, return the packed masks of ``params``.

        A refresh due on a step whose first-pass gradients are not finite (the step is then
        skipped, and a skipped step changes no state) is put off to the next step: SSAM-D
        would score with the inf/nan gradients. The check reads the device once, on refresh
        steps only (a refresh reads it anyway).
        """
        if self.due() or not self._covers_all(all_params):
            if distributed.all_finite_everywhere([p.grad for p in params if p.grad is not None]):
                self.refresh(all_params)
                self.pending = False
            else:
                self.pending = True
        self.steps += 1
        return self.for_params(params)

    def _covers_all(self, all_params: list[Tensor]) -> bool:
        """Whether every parameter of the optimizer has a mask: one added since the last
        refresh (``add_param_group``, e.g. layers unfrozen while fine-tuning) makes a refresh
        due, as the first mask is, instead of leaving it unperturbed with no word. (The count
        settles the common case; a mask is never dropped, so equal counts mean covered.)"""
        return len(self.packed) >= len(all_params) or self._covers(all_params)

    def _covers(self, params: list[Tensor]) -> bool:
        return bool(self.packed) and all(p in self.packed for p in params)

    def for_params(self, params: Sequence[Tensor]) -> list[Tensor]:
        """Packed masks of ``params``; a parameter without one (added after the last refresh,
        when the refresh due for it was put off by a non-finite step) gets an all-zero mask
        (not perturbed) until the next one."""
        out = []
        for p in params:
            m = self.packed.get(p)
            if m is None:
                m = torch.zeros(packed_numel(p.numel()), dtype=torch.uint8, device=p.device)
            out.append(m)
        return out

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        return {
            "masks": {i: self.packed[p] for i, p in enumerate(params) if p in self.packed},
            "steps": self.steps,
            "last_refresh": self.last_refresh,
            "pending": self.pending,
            "policy": self.policy.state_dict(),
        }

    def reset(self) -> None:
        """Forget the masks and the step count: the next step makes a fresh initial mask."""
        self.packed = {}
        self.steps = 0
        self.last_refresh = None
        self.pending = False

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        self.packed = {}
        for i, m in state["masks"].items():
            p = params[int(i)]
            if m.dtype != torch.uint8 or m.numel() != packed_numel(p.numel()):
                raise ValueError(
                    f"checkpoint mask {i} has {m.numel()} {m.dtype} entries; parameter {i} "
                    f"needs {packed_numel(p.numel())} uint8 bytes"
                )
            self.packed[p] = m.to(p.device).clone()
        self.steps = int(state["steps"])
        self.last_refresh = state["last_refresh"]
        self.pending = bool(state.get("pending", False))
        self.policy.load_state_dict(state["policy"])
