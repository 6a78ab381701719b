"""Mask policies: what a sparse-SAM mask keeps (SSAM-F, SSAM-D, your own) and ESAM's random
subset."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fused_sam.masks.bits import RandomBits, draw_key, keep_threshold
from fused_sam.masks.fisher import LossFn, fisher_diagonal
from fused_sam.masks.select import flatten, global_topk, split_like, topk_mask

# ---------------------------------------------------------------------------------------------
# Policies


@dataclass
class MaskRequest:
    """Everything a :class:`MaskPolicy` may use to choose a mask.

    Attributes:
        params: every parameter of the optimizer, in param-group order (the flat global index
            walks them in this order).
        grads: their current ``.grad`` (``None`` where a parameter has none). Inside
            ``first_step`` these are the first-pass gradients at ``w``.
        masks: the current masks as logical bool tensors, or ``None`` before the first one.
        num_keep: entries the new mask must keep in total (:func:`num_kept`).
        step: SAM steps taken so far (``first_step`` calls before this refresh).
        inputs: keyword arguments given to ``FusedSAM.update_mask`` (``data``, ``model``,
            ``loss``), empty for an automatic refresh.
    """

    params: list[Tensor]
    grads: list[Tensor | None]
    masks: list[Tensor] | None
    num_keep: int
    step: int
    inputs: dict[str, Any] = field(default_factory=dict)


class MaskPolicy(abc.ABC):
    """How a sparse-SAM mask is chosen and refreshed.

    Subclasses implement :meth:`select`; they may override :meth:`initial` (the first mask),
    :meth:`ready` (whether an automatic refresh has what it needs) and the state methods (what a
    resume needs to continue bit-identically, e.g. a random generator's state).
    """

    def ready(self) -> bool:
        """Whether :meth:`select` can run with no ``inputs`` (an automatic refresh)."""
        return True

    def initial(self, request: MaskRequest) -> list[Tensor]:
        """The first mask (``request.masks`` is ``None``); by default the same as a refresh."""
        return self.select(request)

    @abc.abstractmethod
    def select(self, request: MaskRequest) -> list[Tensor]:
        """Choose a mask: one bool tensor per ``request.params`` entry (its shape and device),
        with exactly ``request.num_keep`` ``True`` entries in total."""

    def state_dict(self) -> dict[str, Any]:
        """State a resume needs (plain Python values and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state_dict` returned."""


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


_PER_SAMPLE = ("auto", "vmap", "loop")


class FisherMask(MaskPolicy):
    r"""SSAM-F: keep the entries with the largest empirical Fisher diagonal.

    .. math:: F_j = \sum_{i=1}^{n} \Big(\frac{\partial \ell(x_i, y_i)}{\partial w_j}\Big)^2

    over ``n = num_samples`` single examples, then one global top-k (:func:`global_topk`).

    The examples come from either

    * ``data`` (an iterable of ``(x, y)`` batches with a leading batch dimension, e.g. a
      shuffled ``DataLoader``: each refresh starts a fresh iteration and takes the first
      ``num_samples`` examples) with ``model`` and ``loss_fn(model(x_i[None]), y_i[None])``; or
    * ``loss``, a callable returning a 1-D tensor of per-example losses (one per example) that
      depend on the optimizer's parameters through autograd; every entry is one example.

    Per-sample gradients: ``torch.func`` (``functional_call`` + ``vmap(grad)``) over chunks of
    ``chunk_size`` examples, or one ``autograd.grad`` per example (``per_sample="loop"``, the
    fallback that ``"auto"`` takes when ``vmap`` cannot handle the model). The ``loss`` callable
    always takes the loop. ``.grad`` is never touched, so a refresh inside ``first_step`` keeps
    the first-pass gradients.

    Give the plain module, not a ``DistributedDataParallel`` wrapper (``ddp.module``): scoring
    runs its own forward and backward passes outside the wrapper's gradient synchronisation.

    The model is scored in eval mode (restored afterwards): BatchNorm uses its running
    statistics, which stay untouched, and dropout is off. The official code scores in train
    mode, which updates the running statistics with single-example batches as a side effect
    (and cannot run a ``BatchNorm1d`` on one example at all).

    Args:
        data: ``(x, y)`` batches to score on.
        model: the module whose parameters the optimizer holds (needed with ``data``).
        loss_fn: per-example loss ``loss_fn(output, target)`` (default cross-entropy).
        loss: alternative to ``data``/``model``: returns per-example losses.
        num_samples: ``n`` (the official CIFAR runs use 16, ImageNet 128).
        chunk_size: examples per ``vmap`` call (memory: ``chunk_size`` copies of the gradients).
        per_sample: ``"auto"``, ``"vmap"`` or ``"loop"``.
    """

    def __init__(
        self,
        data: Iterable[tuple[Tensor, Tensor]] | None = None,
        model: nn.Module | None = None,
        loss_fn: LossFn = nn.functional.cross_entropy,
        *,
        loss: Callable[[], Tensor] | None = None,
        num_samples: int = 16,
        chunk_size: int = 16,
        per_sample: str = "auto",
    ) -> None:
        self.data = data
        self.model = model
        self.loss_fn = loss_fn
        self.loss = loss
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.chunk_size = _check_int("chunk_size", chunk_size, 1)
        if per_sample not in _PER_SAMPLE:
            raise ValueError(f"per_sample must be one of {_PER_SAMPLE}, got {per_sample!r}")
        self.per_sample = per_sample

    def ready(self) -> bool:
        return self.loss is not None or (self.data is not None and self.model is not None)

    def scores(self, params: Sequence[Tensor], **inputs: Any) -> list[Tensor]:
        """The Fisher diagonal for ``params`` (float32, float64 for float64 parameters).

        ``inputs`` (``data``, ``model``, ``loss``) override the ones given at construction.
        """
        unknown = set(inputs) - {"data", "model", "loss"}
        if unknown:
            raise TypeError(f"FisherMask takes data, model and loss; got {sorted(unknown)}")
        loss = inputs.get("loss", None if "data" in inputs else self.loss)
        if loss is not None:
            return fisher_diagonal(params, loss=loss)
        data = inputs.get("data", self.data)
        model = inputs.get("model", self.model)
        if data is None or model is None:
            raise RuntimeError(
                "SSAM-F needs examples to score: give FisherMask(data=..., model=...) or "
                "FisherMask(loss=...), or call opt.update_mask(data, model=model)"
            )
        return fisher_diagonal(
            params,
            model=model,
            data=data,
            loss_fn=self.loss_fn,
            num_samples=self.num_samples,
            chunk_size=self.chunk_size,
            per_sample=self.per_sample,
        )

    def select(self, request: MaskRequest) -> list[Tensor]:
        return global_topk(self.scores(request.params, **request.inputs), request.num_keep)


_STRATEGIES = ("gradient", "weight", "random")


class DynamicMask(MaskPolicy):
    r"""SSAM-D: random initial mask, then drop the weakest live entries and grow dead ones.

    At a refresh at step :math:`t`, with :math:`K` kept of :math:`N` entries:

    .. math::
        dr(t) = dr_0\,\frac{1 + \cos(\pi \min(t, T) / T)}{2}, \qquad
        d = \min(\lfloor K\, dr(t) \rfloor,\ N - K)

    the :math:`K - d` live entries with the highest ``drop`` score stay (so the :math:`d` lowest
    die), and the :math:`d` entries with the highest ``grow`` score among those dead *before*
    the refresh come alive: the mask keeps exactly :math:`K` entries. Each selection is a
    deterministic top-k (ties to the lower flat global index).

    Scores: ``"gradient"`` is :math:`|g|` (the first-pass gradient; 0 where a parameter has no
    gradient), ``"weight"`` is :math:`|w|`, ``"random"`` is uniform noise from this policy's own
    generator: one ``torch.rand(N, dtype=float64)`` over the flat global index per random score,
    drawn on the CPU in the order initial, drop, grow (so a run is reproducible whatever the
    device, and a resume continues the same stream).

    Args:
        drop_rate: :math:`dr_0` (official default 0.5).
        total_steps: :math:`T`, the run length in optimizer steps (the unit of ``t``); ``None``
            keeps the death rate constant at ``drop_rate``.
        drop: score whose lowest live entries die (official default ``"gradient"``).
        grow: score whose highest dead entries come alive (official default ``"random"``).
        seed: seed of the policy's generator; ``None`` draws one from torch's global generator
            (so ``torch.manual_seed`` makes runs reproducible).
    """

    def __init__(
        self,
        drop_rate: float = 0.5,
        total_steps: int | None = None,
        *,
        drop: str = "gradient",
        grow: str = "random",
        seed: int | None = None,
    ) -> None:
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)):
            raise ValueError(f"drop_rate must be a number in [0, 1], got {drop_rate!r}")
        if not 0.0 <= float(drop_rate) <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        if total_steps is not None:
            _check_int("total_steps", total_steps, 1)
        for name, value in (("drop", drop), ("grow", grow)):
            if value not in _STRATEGIES:
                raise ValueError(f"{name} must be one of {_STRATEGIES}, got {value!r}")
        self.drop_rate = float(drop_rate)
        self.total_steps = total_steps
        self.drop = drop
        self.grow = grow
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

    def death_rate(self, step: int) -> float:
        """:math:`dr(t)` at step ``t`` (constant ``drop_rate`` without ``total_steps``)."""
        if self.total_steps is None:
            return self.drop_rate
        t = min(step, self.total_steps)
        return self.drop_rate * (1 + math.cos(math.pi * t / self.total_steps)) / 2

    def _random(self, n: int, device: torch.device) -> Tensor:
        return torch.rand(n, dtype=torch.float64, generator=self.generator).to(device)

    def _score(self, kind: str, request: MaskRequest, n: int, device: torch.device) -> Tensor:
        if kind == "random":
            return self._random(n, device)
        if kind == "weight":
            return flatten([p.detach().abs() for p in request.params]).to(device)
        grads = [
            torch.zeros_like(p) if g is None else g.detach().abs()
            for p, g in zip(request.params, request.grads)
        ]
        return flatten(grads).to(device)

    def initial(self, request: MaskRequest) -> list[Tensor]:
        n = sum(p.numel() for p in request.params)
        device = request.params[0].device
        return split_like(topk_mask(self._random(n, device), request.num_keep), request.params)

    def select(self, request: MaskRequest) -> list[Tensor]:
        if request.masks is None:
            return self.initial(request)
        live = flatten(request.masks).bool()
        n = live.numel()
        k = request.num_keep
        d = min(math.floor(k * self.death_rate(request.step)), n - k)
        drop_score = self._score(self.drop, request, n, live.device)
        grow_score = self._score(self.grow, request, n, live.device)
        # Positions come out of nonzero() in increasing order, so a top-k within a subset
        # still breaks ties towards the lower flat global index.
        live_idx = live.nonzero().squeeze(1)
        dead_idx = (~live).nonzero().squeeze(1)
        new = torch.zeros_like(live)
        new[live_idx[topk_mask(drop_score[live_idx], live_idx.numel() - d)]] = True
        new[dead_idx[topk_mask(grow_score[dead_idx], d)]] = True
        return split_like(new, request.params)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())


class RandomMask:
    r"""ESAM's stochastic weight perturbation (Du et al., ICLR 2022): a fresh random subset.

    Each SAM step perturbs every entry independently with probability ``keep`` and divides the
    kept entries' perturbation by ``keep``:

    .. math:: e_j = \frac{m_j}{\text{keep}} \cdot \frac{\rho\, g_j}{\lVert g \rVert + \epsilon},
        \qquad m_j = [\, h(k_i, j) < \mathrm{round}(\text{keep} \cdot 2^{32}) \,]

    where :math:`h` is :func:`element_hash` (a counter-based hash, not a stateful generator)
    and :math:`k_i` mixes the seed, the number of masks drawn so far and the parameter's
    position. The kernels compute each bit where they compute ``e``: no mask is stored or read.
    The same seed gives the same masks on every rank and after a resume (the draw count is in
    ``state_dict()``). The norm is that of the whole gradient, as in ESAM.

    Args:
        keep: probability of perturbing an entry, in ``(0, 1]`` (ESAM's beta; 0.5 in the
            paper). ``1`` is plain SAM.
        seed: an integer in ``[0, 2^64)``; the masks depend on nothing else.
    """

    def __init__(self, keep: float = 0.5, seed: int = 0) -> None:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"keep must be a probability in (0, 1], got {keep!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self.keep = float(keep)
        self.seed = seed
        #: masks drawn so far (one per SAM step that perturbed); part of ``state_dict()``.
        self.draws = 0

    def __repr__(self) -> str:
        return f"RandomMask(keep={self.keep}, seed={self.seed})"

    @property
    def threshold(self) -> int:
        """``round(keep * 2^32)``, kept in ``[1, 2^32 - 1]`` (never all or nothing)."""
        return keep_threshold(self.keep)

    def step_key(self) -> int:
        """The 32-bit key of the next draw."""
        return draw_key(self.seed, self.draws)

    def bits(self, salts: Sequence[int]) -> RandomBits | None:
        """The next draw for tensors with ``salts`` (``None`` when ``keep`` is 1: no mask)."""
        if self.keep == 1.0:
            return None
        return RandomBits(tuple(salts), self.step_key(), self.threshold, 1.0 / self.keep)

    def state_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = RandomMask(state["keep"], int(state["seed"]))
        self.keep, self.seed, self.draws = loaded.keep, loaded.seed, int(state["draws"])
