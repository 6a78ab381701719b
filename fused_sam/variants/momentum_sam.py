r"""Momentum-SAM (Becker et al., 2024): SAM at the cost of one forward/backward per step.

Instead of an ascent step computed from an extra gradient, the perturbation follows the
optimizer's momentum :math:`v` (SGD's ``momentum_buffer``; Adam/AdamW's first moment
``exp_avg``). Between steps the weights sit at the perturbed point

.. math:: \tilde w = w - \rho\, \frac{v}{\lVert v \rVert}

and one step is: the gradient at :math:`\tilde w` (the user's one backward), :math:`w` restored
exactly (a copy of the stored weights, not :math:`\tilde w + \rho v / \lVert v \rVert`), the base
optimizer's update of :math:`w` with that gradient, then the perturbation again with the new
:math:`v`. The first step has no momentum yet and starts unperturbed. The norm is global over
every parameter, float64, on the device.

The perturbation and the restore run on FusedSAM's ops (``backend=``): the norm of :math:`v`,
then one launch that writes the backup :math:`w` and :math:`\tilde w` (the SAM perturbation op
with :math:`v` for the gradient and :math:`-\rho` for the radius), and one exact copy back; the
update between them is the base optimizer's own ``step()``.

Because it needs only ``backward(); step()``, it fits any trainer's optimizer slot with no glue.
Evaluate (and save the model) at :math:`w` inside ``with opt.unperturbed():``; the optimizer's
``state_dict()`` keeps :math:`w` too, so a resume is exact whichever weights the model checkpoint
holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer

from fused_sam import functional as F
from fused_sam.values import as_real
from fused_sam.variants._state import load_per_param

__all__ = ["MomentumSAM"]

#: Top-level ``state_dict()`` key: the unperturbed weights and whether they are in use.
MSAM_KEY = "momentum_sam"
_MOMENT = {SGD: "momentum_buffer", Adam: "exp_avg", AdamW: "exp_avg"}


class MomentumSAM(Optimizer):
    """Momentum-SAM around SGD (with momentum), Adam or AdamW; see the module docstring.

    Args:
        params: parameters or param groups, or an optimizer instance (SGD with momentum, Adam,
            AdamW).
        base_optimizer: the optimizer class when ``params`` are parameters.
        rho: the radius (the paper uses 3.0 on CIFAR and ImageNet, against SAM's 0.2 there).
        backend: the backend of the perturbation and restore ops, as ``FusedSAM``'s
            (``None``: the fastest available; a named one must be able to run or it raises).
        **base_kwargs: keyword arguments for ``base_optimizer``.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer] | None = SGD,
        rho: float = 3.0,
        *,
        backend: str | None = None,
        **base_kwargs: Any,
    ) -> None:
        is_optimizer = isinstance(params, Optimizer)
        base = params if is_optimizer else base_optimizer(params, **base_kwargs)  # type: ignore
        key = _MOMENT.get(type(base))
        if key is None:
            raise ValueError(
                f"MomentumSAM perturbs along the momentum of SGD, Adam or AdamW, not "
                f"{type(base).__name__}"
            )
        if isinstance(base, SGD) and any(g["momentum"] == 0 for g in base.param_groups):
            raise ValueError("MomentumSAM needs SGD with momentum > 0 (it perturbs along it)")
        real = as_real(rho)  # any real type torch's optimizers take (numpy scalars included)
        if real is None or not real >= 0:
            raise ValueError(f"rho must be a number >= 0, got {rho!r}")
        self.base_optimizer, self.rho, self._moment = base, real, key
        self.backend = backend
        for device in {p.device for g in base.param_groups for p in g["params"]}:
            F.resolve_backend(backend, device)  # a named backend that cannot run fails now
        super().__init__(base.param_groups, {})
        self.param_groups, self.state = base.param_groups, base.state
        # The unperturbed weights; mutated in place (never rebound), shared by wrappers.
        self._w: dict[Tensor, Tensor] = {}
        self._flags = {"perturbed": False, "resumes_perturbed": False}
        # Per perturbed parameter, its version counter and storage address right after the
        # perturbation: a parameter whose pair has changed by the next restore was written by
        # the user in between (a rollback, a clamp, a pruning mask), and keeps what was written.
        self._mark: dict[Tensor, tuple[int, int]] = {}

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def _restore(self) -> None:
        """Put ``w`` back, except into parameters written since the perturbation: their
        written values are the new unperturbed point (see :meth:`step`)."""
        if self._flags["perturbed"]:
            mark = self._mark
            ps = [p for p in self._params() if p in self._w and mark.get(p) == _mark(p)]
            if ps:
                F.restore_(ps, [self._w[p] for p in ps], self.backend)
            self._flags["perturbed"] = False
            mark.clear()

    @torch.no_grad()
    def _perturb(self) -> None:
        pairs = [(p, self.state[p][self._moment]) for p in self._params()
                 if self._moment in self.state.get(p, {})]  # fmt: skip
        if not pairs or self.rho == 0:
            return
        ps, vs = [p for p, _ in pairs], [v for _, v in pairs]
        ws = []
        for p in ps:
            w = self._w.get(p)
            if w is None or w.shape != p.shape or w.dtype != p.dtype or w.stride() != p.stride():
                w = self._w[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            ws.append(w)
        n = len(ps)
        flat, zero = [False] * n, [0.0] * n
        # e = -rho v / (|v| + 1e-12): zero for v = 0, and nothing moves when |v| is not finite.
        sumsq = F.norm_sq(vs, ps, flat, zero, self.backend)
        F.perturb_(ps, vs, ws, sumsq, [-self.rho] * n, 1e-12, flat, zero, None, self.backend)
        self._flags["perturbed"] = True
        self._mark.clear()
        self._mark.update(zip(ps, map(_mark, ps)))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Momentum-SAM step on the gradients taken at the perturbed weights.

        A parameter written between two steps (``model.load_state_dict(...)``, an in-place op
        under ``torch.no_grad()``, ``p.data = ...``) keeps the written values as its new
        unperturbed point: the step restores the stored ``w`` only into the parameters left
        as the perturbation put them. A write the version counter does not see
        (``p.data.clamp_()``) cannot be told apart from the perturbation and is undone; make
        such writes inside ``with opt.unperturbed():``.

        Args:
            closure: re-evaluates the model and returns the loss (called once).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._restore()
        self.base_optimizer.step()
        self._perturb()
        return loss

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """The weights at ``w`` inside (evaluation, checkpoints); perturbed again on exit.

        The perturbation on exit is computed from the same ``w`` and momentum, so the weights
        come back bit-identical.
        """
        was = self._flags["perturbed"]
        self._restore()
        # A checkpoint taken in here (the documented place) must say that the run goes on
        # perturbed, or its resume would drop the perturbation of the next step.
        self._flags["resumes_perturbed"] = was
        try:
            yield
        finally:
            self._flags["resumes_perturbed"] = False
            if was:
                self._perturb()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, plus the unperturbed weights (key
        ``"momentum_sam"``), so that a resume is exact whichever weights the model saved."""
        state = super().state_dict()
        params = self._params()
        flags = self._flags
        state[MSAM_KEY] = {
            "perturbed": flags["perturbed"] or flags["resumes_perturbed"],
            "weights": {i: self._w[p].clone() for i, p in enumerate(params) if p in self._w},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        msam = state_dict.pop(MSAM_KEY, None)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.base_optimizer.param_groups, self.base_optimizer.state
        self._w.clear()
        self._flags["perturbed"] = False
        if msam is None:
            return
        params = self._params()
        self._w.update(load_per_param(msam["weights"], params, "momentum_sam weights"))
        self._flags["perturbed"] = bool(msam["perturbed"])
        if self._flags["perturbed"]:
            # The model may hold w~ or w (saved inside unperturbed()): put w~ back from w.
            with torch.no_grad():
                ps = [p for p in params if p in self._w]
                torch._foreach_copy_(ps, [self._w[p] for p in ps])
            self._flags["perturbed"] = False
            self._perturb()

    def __repr__(self) -> str:
        return f"MomentumSAM(rho={self.rho})\n{self.base_optimizer!r}"


def _mark(p: Tensor) -> tuple[int, int]:
    """What changes when a parameter is written through it: its version counter (in-place ops,
    ``copy_``, ``load_state_dict``) and its storage address (``p.data = ...``)."""
    return p._version, p.data_ptr()
