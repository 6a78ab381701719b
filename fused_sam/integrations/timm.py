"""timm's optimizer factory with FusedSAM: :func:`register`.

``timm.optim.create_optimizer_v2(model, opt=name, ...)`` looks ``name`` up in timm's registry
by the part after the last ``_`` (a ``lookahead_`` prefix wraps the result), so a registered
name must not contain ``_``. Registering once makes every timm entry point that takes an
optimizer name (``create_optimizer_v2``, ``train.py --opt``) build a FusedSAM; the training
loop must still run both passes (``first_step`` / ``second_step``), since timm's own loop runs
one backward per step.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch.optim import SGD, Optimizer

from fused_sam.optimizer import FusedSAM

__all__ = ["optim_info_fields", "register"]


class _FusedSAMFactory:
    """``opt_class`` for timm: called as ``factory(params, **opt_args)`` like an optimizer class
    (``lr``, ``weight_decay``, ``momentum``/``betas``/``eps`` as the base takes them, and any
    extra keyword given to ``create_optimizer_v2``, e.g. ``rho=0.1``)."""

    def __init__(self, base: type[Optimizer], sam_kwargs: dict[str, Any]) -> None:
        self.base = base
        self.sam_kwargs = sam_kwargs
        self.__name__ = f"FusedSAM[{base.__name__}]"

    def __call__(self, params: Any, **kwargs: Any) -> FusedSAM:
        return FusedSAM(params, self.base, **{**self.sam_kwargs, **kwargs})


def optim_info_fields(
    name: str = "samsgd", base: type[Optimizer] = SGD, **sam_kwargs: Any
) -> dict[str, Any]:
    """The fields of timm's ``OptimInfo`` for FusedSAM on ``base`` (no timm import needed).

    Args:
        name: the registry name; letters and digits, no ``_`` (timm would never find it).
        base: the base optimizer class.
        **sam_kwargs: FusedSAM defaults (``rho``, ``adaptive``, ``backend``, ...); keywords
            given to ``create_optimizer_v2`` override them.
    """
    if not name or "_" in name or not name.isalnum():
        raise ValueError(
            f"timm optimizer name {name!r} must be letters and digits only: timm splits names "
            "on '_' and looks up only the last part (e.g. 'samsgd', 'samadamw')"
        )
    accepted = inspect.signature(base.__init__).parameters
    return {
        "name": name.lower(),
        "opt_class": _FusedSAMFactory(base, dict(sam_kwargs)),
        "description": f"fused_sam.FusedSAM (Sharpness-Aware Minimization) on {base.__name__}",
        "has_eps": "eps" in accepted,
        "has_momentum": "momentum" in accepted,
        "has_betas": "betas" in accepted,
    }


def register(name: str = "samsgd", base: type[Optimizer] = SGD, **sam_kwargs: Any) -> str:
    """Register FusedSAM on ``base`` in timm's optimizer registry under ``name``.

    Example::

        from fused_sam.integrations.timm import register
        register("samsgd", torch.optim.SGD, rho=0.05)
        opt = timm.optim.create_optimizer_v2(model, opt="samsgd", lr=0.1, weight_decay=5e-4)

    Returns:
        The registered name.
    """
    from timm.optim._optim_factory import OptimInfo, default_registry

    fields = optim_info_fields(name, base, **sam_kwargs)
    default_registry.register(OptimInfo(**fields))
    return fields["name"]
