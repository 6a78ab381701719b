"""Providers of ``fused-sam bench``: one optimizer step each, over the same parameters.

The per-tensor baseline (:class:`PerTensorSAM`, the "loop SAM" row), ``FusedSAM`` on every
backend usable on the device (with a Sparse SAM mask on request), and plain SGD and AdamW steps
as the denominators of the SAM/base ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fused_sam.functional import available_backends
from fused_sam.optimizer import FusedSAM

__all__ = ["PerTensorSAM", "Provider", "providers_for"]


class PerTensorSAM:
    """Baseline (the "loop SAM" row): the per-tensor-loop SAM algorithm of the community
    implementation davda54/sam.

    Re-implemented here so that the benchmark compares algorithms, not packaging: one norm per
    tensor, ``torch.stack`` of the norms, ``e = rho * g / norm`` computed and added tensor by
    tensor, a fresh copy of every weight kept in a dict, and the restore by rebinding
    ``p.data`` before the base optimizer's ``step()``. The base optimizer is built with torch's
    default implementation choice, as the community code does (no ``foreach`` flag).
    """

    def __init__(
        self, params: list[Tensor], base: type[torch.optim.Optimizer], rho: float, **kw: Any
    ):
        self.params = params
        self.rho = rho
        self.base = base(params, **kw)
        self.old: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def first_step(self) -> None:
        """Perturb ``w -> w + e`` tensor by tensor."""
        norm = torch.norm(
            torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2
        )
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.old[p] = p.data.clone()
            p.add_(p.grad * scale.to(p))

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore by rebinding ``p.data``, then the base step."""
        for p in self.params:
            if p.grad is None:
                continue
            p.data = self.old[p]
        self.base.step()


@dataclass
class Provider:
    """One timed step over a parameter list.

    Attributes:
        name: row name in the results.
        kind: ``"sam"`` or ``"base"`` (a plain optimizer step).
        base: ``"sgd"`` or ``"adamw"``.
        floor_bytes: minimum bytes per parameter the step must move (fp32; a bit-packed mask
            adds 1/8 byte per parameter to the perturbation's read).
        make: ``make(params) -> step``, where ``step()`` runs one whole step.
        note: what the row is.
    """

    name: str
    kind: str
    base: str
    floor_bytes: float
    make: Callable[[list[Tensor]], Callable[[], None]]
    note: str = ""


_BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], int, int]] = {
    # name: (class, kwargs, base-only floor bytes/param, SAM floor bytes/param)
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}, 20, 40),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}, 28, 48),
}


def _sam_step(opt: Any) -> Callable[[], None]:
    def step() -> None:
        opt.first_step()
        opt.second_step()

    return step


def providers_for(
    device: torch.device | str,
    base: str = "sgd",
    include_reference: bool = False,
    sparsity: float = 0.0,
) -> list[Provider]:
    """Every provider that can run on ``device``: baselines, loop SAM, and each usable backend.

    With ``sparsity > 0`` every backend also gets a Sparse SAM row (a bit-packed mask made once
    at the first step by ``DynamicMask``, then read by every perturbation).
    """
    device = torch.device(device)
    if base not in _BASES:
        raise ValueError(f"unknown base optimizer {base!r}; choose sgd or adamw")
    cls, kw, _, sam_floor = _BASES[base]
    out: list[Provider] = []
    for name, (b_cls, b_kw, b_floor, _) in _BASES.items():
        out.append(
            Provider(
                f"{name} (foreach)",
                "base",
                name,
                b_floor,
                lambda ps, c=b_cls, k=b_kw: c(ps, foreach=True, **k).step,
                f"plain torch.optim.{b_cls.__name__}, foreach=True",
            )
        )
    out.append(
        Provider(
            "loop SAM",
            "sam",
            base,
            sam_floor,
            lambda ps: _sam_step(PerTensorSAM(ps, cls, 0.05, **kw)),
            "per-tensor loops, the community implementation's algorithm",
        )
    )
    for backend, reason in available_backends(device).items():
        if reason is not None or (backend == "reference" and not include_reference):
            continue
        out.append(
            Provider(
                f"FusedSAM[{backend}]",
                "sam",
                base,
                sam_floor,
                # foreach=True: the same base step as the baseline row, so the ratio is SAM's
                # own cost (backends that fuse restore + step do not call it at all).
                lambda ps, b=backend: _sam_step(
                    FusedSAM(ps, cls, rho=0.05, backend=b, foreach=True, **kw)
                ),
                f"fused_sam, backend={backend!r}",
            )
        )
        if sparsity > 0:
            out.append(
                Provider(
                    f"FusedSAM[{backend}] mask {sparsity:g}",
                    "sam",
                    base,
                    sam_floor + 1 / 8,
                    lambda ps, b=backend: _sam_step(
                        FusedSAM(
                            ps,
                            cls,
                            rho=0.05,
                            backend=b,
                            sparsity=sparsity,
                            mask="dynamic",
                            foreach=True,
                            **kw,
                        )
                    ),
                    f"fused_sam, backend={backend!r}, bit-packed mask, sparsity {sparsity:g}",
                )
            )
    return out
