"""Guards that keep an optimizer's state whole when something is refused or goes wrong.

Small helpers of :class:`fused_sam.FusedSAM`, callable without it: they take the objects they
check or protect as arguments, and say what to do in their error messages.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "check_checkpoint_groups",
    "claim_parameters",
    "groups_kept_on_error",
    "note_partial_base_step",
    "record_filled_keys",
    "take_back_filled_keys",
    "wrapping",
]


@contextlib.contextmanager
def groups_kept_on_error(base: Optimizer) -> Iterator[None]:
    """Put ``base``'s param-group dicts back as they were if the body raises.

    Wrapping an optimizer instance writes into its own group dicts (the SAM keys; torch's
    ``add_param_group`` fills defaults and copies the ``params`` list); a wrapper that is then
    refused (a backend that cannot run, a bad per-group value) must not leave them changed, or
    the base optimizer, or the next wrapper built on it, would run on values of the refused one.
    """
    groups = list(base.param_groups)
    saved = [dict(g) for g in groups]
    try:
        yield
    except BaseException:
        for group, before in zip(groups, saved):
            group.clear()
            group.update(before)
        base.param_groups[:] = groups
        raise


@contextlib.contextmanager
def wrapping(base: Optimizer, keys: tuple[str, ...]) -> Iterator[None]:
    """The construction of a wrapper that fills ``keys`` into ``base``'s groups: an earlier
    wrapper's filled-in defaults give way to this one's (:func:`take_back_filled_keys`), the
    groups are put back if the body raises (:func:`groups_kept_on_error`), and the keys this
    wrapper filled are recorded when it succeeds."""
    with groups_kept_on_error(base):
        filled = take_back_filled_keys(base, keys)
        yield
        record_filled_keys(base, base.param_groups, filled)


def check_checkpoint_groups(base: Optimizer, state_dict: dict[str, Any]) -> None:
    """Refuse, before anything is loaded, a checkpoint whose param groups cannot drive ``base``.

    A checkpoint of another optimizer type (a plain ``torch.optim.SGD`` one into Adam) lacks
    hyperparameters that ``base`` reads at every step (``betas``, ``eps``); torch would load
    its groups and fail half-way, or at the next step. The groups alone (no state tensors, so
    nothing is copied) are loaded into a scratch twin of ``base``, whose ``__setstate__`` fills
    the keys a newer torch added (as it does for an old checkpoint of the right type); every
    key of ``base.defaults`` must then be there.

    Raises:
        ValueError: a group lacks a hyperparameter of ``base`` (or torch refuses the groups:
            another number of groups or of parameters).
    """
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list):
        raise ValueError("the checkpoint has no 'param_groups' list: it is not an optimizer's")
    twin = object.__new__(type(base))
    twin.__dict__.update(base.__dict__)
    # The user's load hooks belong to the real load; the twin runs none.
    twin._optimizer_load_state_dict_pre_hooks = OrderedDict()
    twin._optimizer_load_state_dict_post_hooks = OrderedDict()
    name = type(base).__name__
    try:
        twin.load_state_dict({"state": {}, "param_groups": groups})
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"the checkpoint's param groups cannot drive {name} ({type(err).__name__}: {err}): "
            f"it is a checkpoint of another optimizer; load it into a FusedSAM built on the "
            "optimizer it was saved from"
        ) from err
    for i, group in enumerate(twin.param_groups):
        missing = sorted(k for k in base.defaults if k not in group)
        if missing:
            raise ValueError(
                f"checkpoint param group {i} has no {missing}, which {name} needs: it is a "
                f"checkpoint of another optimizer (e.g. a plain SGD's loaded into Adam); load "
                "it into a FusedSAM built on the optimizer it was saved from"
            )


#: The note on an error raised by the base update of a SAM step (see the README, Guarantees).
PARTIAL_BASE_STEP = (
    "FusedSAM: the base update of this SAM step ({name}) raised. The weights are restored "
    "exactly to w, as before the step; {name}'s state (momentum, moments, step counts) keeps "
    "whatever its step() wrote before it raised, as torch's optimizers leave it (they do not "
    "roll back). To resume exactly, load the last checkpoint of model and optimizer."
)


def note_partial_base_step(err: BaseException, name: str) -> None:
    """Say on ``err`` (Python 3.11+ exception notes) what a failed base update leaves behind."""
    add_note = getattr(err, "add_note", None)
    if add_note is not None:
        add_note(PARTIAL_BASE_STEP.format(name=name))


#: The step-state objects of every optimizer that has started a SAM step (weakly: a dropped
#: optimizer leaves), by ``id``; each has a ``perturbed`` list, ``None`` when nothing is in flight.
_STEPS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def claim_parameters(step_state: Any, params: list[Tensor]) -> None:
    """Refuse to perturb a parameter another optimizer's SAM step holds at ``w + e``.

    Its backup would be that optimizer's ``w + e``: whichever step finishes last would
    restore the other's perturbed weights and the two runs drift apart silently. The check
    costs nothing while one optimizer steps at a time (the others hold nothing in flight).

    Raises:
        RuntimeError: one of ``params`` is perturbed by another optimizer's step in flight.
    """
    if torch.compiler.is_compiling():
        return  # a traced step reads no Python registry (it would be a constant of the graph)
    for other in list(_STEPS.values()):
        if other is step_state or not other.perturbed:
            continue
        held = set(map(id, other.perturbed))
        if any(id(p) in held for p in params):
            raise RuntimeError(
                "first_step(): a parameter is already perturbed by another FusedSAM whose SAM "
                "step is in flight (two optimizers over the same parameters, their steps "
                "interleaved); each would restore the other's perturbed weights. Finish that "
                "step (second_step()/step()) or abandon it (restore()) first, or give each "
                "optimizer its own parameters"
            )
    _STEPS[id(step_state)] = step_state


#: Per base optimizer (weakly), the group-dict keys a FusedSAM filled from its own defaults:
#: ``{id(group): (group, keys)}``.
_FILLED: weakref.WeakKeyDictionary[Optimizer, dict[int, tuple[dict[str, Any], frozenset[str]]]]
_FILLED = weakref.WeakKeyDictionary()


def take_back_filled_keys(base: Optimizer, keys: tuple[str, ...]) -> list[frozenset[str]]:
    """Before a wrapper fills its defaults into ``base``'s groups: remove the values an earlier
    wrapper filled from ITS defaults (they are not the group's own, so the new wrapper's
    ``rho=`` applies, as a constructor's defaults apply to every group that sets none), and
    say which of ``keys`` each group lacks now (those the new wrapper fills).

    A value the user put in a group (``SGD([{"params": ..., "rho": 0.1}])``) is kept.
    """
    earlier = _FILLED.get(base, {})
    missing = []
    for group in base.param_groups:
        entry = earlier.get(id(group))
        if entry is not None and entry[0] is group:
            for key in entry[1]:
                group.pop(key, None)
        missing.append(frozenset(k for k in keys if k not in group))
    return missing


def record_filled_keys(base: Optimizer, groups: list[dict[str, Any]], filled: list) -> None:
    """Remember which keys of each of ``groups`` (``base``'s) a wrapper filled from defaults."""
    record = _FILLED.setdefault(base, {})
    for group, keys in zip(groups, filled):
        if keys:
            record[id(group)] = (group, frozenset(keys))
