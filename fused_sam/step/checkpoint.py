"""Checkpoints: the extra ``state_dict()`` keys of FusedSAM and the rollback of a refused load.

A FusedSAM checkpoint is its base optimizer's, in the base's own format (SAM keys ride in the
param groups), plus one top-level key per policy that has state (see
:mod:`fused_sam.step.policies`). Loading checks everything before the optimizer keeps any of
it: a refused checkpoint leaves the optimizer with the groups and state it had.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from fused_sam.step.guards import check_checkpoint_groups
from fused_sam.step.policies import KEYS, Policies
from fused_sam.step.validation import SAM_KEYS, check_state_shapes, validate_group


def load_state_dict(
    base: Optimizer,
    state_dict: dict[str, Any],
    policies: Policies,
    sam_defaults: dict[str, Any],
    params: list[Tensor],
) -> int:
    """Load a checkpoint into ``base`` and the policies; returns the schedule's step count.

    On any error the base optimizer keeps its own group and state objects and the policies
    their state. The caller re-links its ``param_groups`` and ``state`` afterwards either way.

    Args:
        sam_defaults: the values of the SAM keys for groups of a checkpoint without them (a
            bare base optimizer's).
        params: every parameter, in order (checkpoint tensors are indexed by position).
    """
    state_dict = dict(state_dict)
    extras = {key: state_dict.pop(key, None) for key in KEYS}
    policies.check_loadable(extras)
    check_checkpoint_groups(base, state_dict)
    before = base.param_groups, base.state
    policies_before = policies.snapshot()
    try:
        base.load_state_dict(state_dict)
        for group in base.param_groups:
            for key in SAM_KEYS:
                group.setdefault(key, sam_defaults[key])
            validate_group(group)
        check_state_shapes(base)
        return policies.load_state_dict(extras, params, policies_before)
    except BaseException:
        # Optimizer.load_state_dict builds new group and state objects: a checkpoint that
        # is rejected leaves the optimizer with the ones it had.
        base.param_groups, base.state = before
        policies.rollback(policies_before)
        raise
