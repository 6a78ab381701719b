"""The hyperparameters of each base-optimizer family, as one typed record (a leaf module).

A fused restore-and-step op takes one record, from the base step (:mod:`fused_sam.step`)
through :mod:`fused_sam.functional` to every backend, which unpacks it only where it calls its
kernel. The fields are in the order of the ops' schemas (``csrc/bindings.cpp``), so a backend
may splat a record into the positional arguments of an op.

They are ``NamedTuple``\\ s rather than dataclasses: ``torch.compile`` traces a tuple of
constants without guarding on the record object itself (a frozen dataclass recompiled the
step every time it was rebuilt).
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

from torch import Tensor

__all__ = ["AdamHyper", "SGDHyper", "as_kwargs", "with_lr"]


class SGDHyper(NamedTuple):
    """``torch.optim.SGD``'s options for :func:`fused_sam.functional.restore_sgd_step_`.

    ``lr`` may be a one-element tensor (see the README, torch.compile and CUDA graphs).
    """

    lr: float | Tensor
    weight_decay: float
    momentum: float
    dampening: float
    nesterov: bool
    maximize: bool


class AdamHyper(NamedTuple):
    """``torch.optim.Adam``'s / ``AdamW``'s options for
    :func:`fused_sam.functional.restore_adam_step_`.

    ``decoupled_weight_decay`` is AdamW's decay of the weights instead of L2 in the gradient;
    ``lr`` may be a one-element tensor.
    """

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool


Hyper = TypeVar("Hyper", SGDHyper, AdamHyper)


def with_lr(hyper: Hyper, lr: float | Tensor) -> Hyper:
    """``hyper`` with another ``lr`` (the same record when it is the same value)."""
    if lr is hyper.lr:
        return hyper
    return type(hyper)(lr, *hyper[1:])


def as_kwargs(hyper: SGDHyper | AdamHyper) -> dict[str, Any]:
    """The record as the keyword arguments of an op whose schema makes them keyword-only."""
    return dict(zip(type(hyper)._fields, hyper))
