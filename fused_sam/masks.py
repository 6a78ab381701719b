r"""Sparse SAM masks: bit packing, deterministic global top-k, and the SSAM-F / SSAM-D policies.

Sparse SAM (SSAM, Mi et al. 2022) perturbs only a fraction ``1 - sparsity`` of all parameter
entries:

.. math::
    e = \frac{\rho\, g}{\lVert g \rVert_2 + \epsilon} \odot m, \qquad m \in \{0, 1\}^N,
    \qquad \textstyle\sum_j m_j = K = \lfloor N (1 - s) \rfloor

where :math:`N` counts the entries of every parameter of the optimizer and :math:`s` is the
sparsity. The mask is chosen by ONE global top-k over all parameters of a score, and refreshed
on a schedule:

* SSAM-F (:class:`FisherMask`): the score is the empirical Fisher diagonal
  :math:`F_j = \sum_{i=1}^{n} (\partial \ell_i / \partial w_j)^2` over ``n`` single examples.
* SSAM-D (:class:`DynamicMask`): a random initial mask; each refresh drops the
  :math:`d = \min(\lfloor K\,dr(t) \rfloor, N - K)` live entries with the lowest score (``|g|``
  by default) and grows ``d`` entries that were dead (at random by default), with the death rate
  :math:`dr(t) = dr_0 (1 + \cos(\pi t / T)) / 2`.

Storage: a mask is kept as ``ceil(numel / 8)`` bytes per parameter: element ``k`` of the
parameter *in memory order* is bit ``k % 8`` (least significant first) of byte ``k // 8``.
Memory order is what a flat kernel walks, so a ``channels_last`` parameter's mask follows its
storage, not its logical index order. Selection, on the other hand, speaks of the *flat global
index*: parameters in param-group order, each flattened in logical (row-major) order; ties in a
score are broken in favour of the lower flat global index, so masks never depend on the layout,
the device or the sorting algorithm.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DynamicMask",
    "FisherMask",
    "MaskPolicy",
    "MaskRequest",
    "RandomBits",
    "RandomMask",
    "element_hash",
    "fisher_diagonal",
    "global_topk",
    "num_kept",
    "pack_bits",
    "pack_mask",
    "packed_numel",
    "random_mask",
    "tensor_salt",
    "topk_mask",
    "unpack_bits",
]

# ---------------------------------------------------------------------------------------------
# Bit packing (the layout every kernel reads; do not change it)

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def packed_numel(numel: int) -> int:
    """Bytes needed to hold ``numel`` mask bits."""
    return (numel + 7) // 8


def _memory_order_perm(like: Tensor) -> list[int]:
    # Sorting dims by decreasing stride gives the order in which a dense tensor's storage walks
    # them (channels_last: N, H, W, C). Size-1 dims do not affect the element order.
    return sorted(range(like.dim()), key=lambda d: -like.stride(d))


def _flat_memory_order(t: Tensor) -> Tensor:
    if t.is_contiguous():
        return t.reshape(-1)
    return t.permute(_memory_order_perm(t)).reshape(-1)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean mask into little-endian bits in the mask's memory order.

    Args:
        mask: bool tensor laid out like its parameter (``torch.zeros_like(p, dtype=torch.bool)``
            keeps a ``channels_last`` layout).

    Returns:
        A 1-D ``uint8`` tensor of ``ceil(mask.numel() / 8)`` bytes on the mask's device.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool mask, got {mask.dtype}")
    flat = _flat_memory_order(mask).to(torch.uint8)
    pad = packed_numel(flat.numel()) * 8 - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor with ``like``'s shape and memory layout.

    Args:
        packed: ``uint8`` tensor of at least ``ceil(like.numel() / 8)`` bytes.
        like: the parameter the mask belongs to.
    """
    n = like.numel()
    if packed.dtype != torch.uint8 or packed.numel() < packed_numel(n):
        raise ValueError(
            f"mask for a tensor of {n} elements must be uint8 with >= {packed_numel(n)} bytes, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    flat = ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()
    return _laid_out_like(flat, like)


def _laid_out_like(flat: Tensor, like: Tensor) -> Tensor:
    """A bool tensor with ``like``'s shape and layout whose memory order holds ``flat``."""
    out = torch.empty_like(like, dtype=torch.bool)
    if out.is_contiguous():
        return flat.view(like.shape)
    perm = _memory_order_perm(out)
    out.permute(perm).copy_(flat.view([like.shape[d] for d in perm]))
    return out


def pack_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Pack a logical bool mask for parameter ``like`` (bits follow ``like``'s memory order).

    Args:
        mask: bool tensor with ``like``'s shape, any layout (values are read by logical index).
        like: the parameter.

    Returns:
        ``ceil(like.numel() / 8)`` bytes on ``like``'s device.
    """
    laid_out = torch.empty_like(like, dtype=torch.bool)  # keeps a dense parameter's strides
    laid_out.copy_(mask.reshape(like.shape))
    return pack_bits(laid_out)


# ---------------------------------------------------------------------------------------------
# Deterministic selection


def num_kept(numel: int, sparsity: float) -> int:
    r"""Entries a mask keeps: :math:`K = \lfloor N (1 - s) \rfloor`.

    Computed in exact decimal arithmetic on ``sparsity`` as written (``0.3`` is 3/10, not the
    binary float just above it), so ``num_kept(10, 0.3) == 7`` on every platform. This is the
    official ``int(N * (1 - sparsity))`` without its floating-point off-by-one cases.
    """
    keep = 1 - Fraction(repr(float(sparsity)))
    return math.floor(numel * keep)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of a 1-D tensor, deterministic under ties.

    Entries strictly above the ``k``-th largest value are kept; among the entries equal to it,
    the ones with the lowest indices fill the remaining places. NaN ranks below every number.
    One ``kthvalue`` and one ``cumsum``: O(n), no host synchronisation.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    s = torch.where(torch.isnan(scores), float("-inf"), scores)
    threshold = torch.kthvalue(s, n - k + 1).values  # the (n-k+1)-th smallest = k-th largest
    above = s > threshold
    tie = s == threshold
    room = k - above.sum()
    return above | (tie & (torch.cumsum(tie, 0) <= room))


def _flat(scores: Sequence[Tensor]) -> Tensor:
    device = scores[0].device
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores) else torch.float32
    return torch.cat([s.reshape(-1).to(device, dtype) for s in scores])


def _split(flat: Tensor, likes: Sequence[Tensor]) -> list[Tensor]:
    parts = flat.split([t.numel() for t in likes])
    return [m.view(t.shape).to(t.device) for m, t in zip(parts, likes)]


def global_topk(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """ONE top-``k`` over the entries of all ``scores`` together.

    Args:
        scores: one tensor per parameter (any real dtype; compared in float32, or float64 when
            any score is float64).
        k: entries to keep in total.

    Returns:
        One bool tensor per score, with its shape and device, holding ``k`` ``True`` entries in
        all. Ties go to the lower flat global index (see the module docstring).
    """
    return _split(topk_mask(_flat(scores), k), scores)


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


LossFn = Callable[[Tensor, Tensor], Tensor]

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
            return _flat([p.detach().abs() for p in request.params]).to(device)
        grads = [
            torch.zeros_like(p) if g is None else g.detach().abs()
            for p, g in zip(request.params, request.grads)
        ]
        return _flat(grads).to(device)

    def initial(self, request: MaskRequest) -> list[Tensor]:
        n = sum(p.numel() for p in request.params)
        device = request.params[0].device
        return _split(topk_mask(self._random(n, device), request.num_keep), request.params)

    def select(self, request: MaskRequest) -> list[Tensor]:
        if request.masks is None:
            return self.initial(request)
        live = _flat(request.masks).bool()
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
        return _split(new, request.params)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())


# ---------------------------------------------------------------------------------------------
# Per-sample gradients and the empirical Fisher diagonal


def _take(data: Iterable[tuple[Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor]:
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    have = 0
    for x, y in data:
        xs.append(x[: n - have])
        ys.append(y[: n - have])
        have += xs[-1].shape[0]
        if have >= n:
            break
    if have == 0:
        raise ValueError("the data to score the Fisher diagonal on yielded no examples")
    return torch.cat(xs), torch.cat(ys)


class _EvalMode:
    """Put a module in eval mode and restore every submodule's own training flag on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def fisher_diagonal(
    params: Sequence[Tensor],
    *,
    model: nn.Module | None = None,
    data: Iterable[tuple[Tensor, Tensor]] | None = None,
    loss_fn: LossFn = nn.functional.cross_entropy,
    loss: Callable[[], Tensor] | None = None,
    num_samples: int = 16,
    chunk_size: int = 16,
    per_sample: str = "auto",
) -> list[Tensor]:
    r"""Empirical Fisher diagonal :math:`\sum_i g_i^2` of single-example gradients.

    See :class:`FisherMask` for the arguments. Parameters the loss does not reach (or that
    ``model`` does not own) score 0. Accumulates in float32 (float64 for float64 parameters).
    The sum over examples runs in example order within a chunk and chunk after chunk, so the
    ``vmap`` and ``loop`` paths agree to rounding, not bit for bit.
    """
    acc = [
        torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
        for p in params
    ]
    with torch.enable_grad():
        if loss is not None:
            _fisher_from_losses(params, loss, acc)
            return acc
        if model is None or data is None:
            raise ValueError("fisher_diagonal needs model and data, or loss")
        device = params[0].device if params else torch.device("cpu")
        xs, ys = _take(data, num_samples)
        xs, ys = xs.to(device), ys.to(device)
        with _EvalMode(model):
            if per_sample != "loop":
                try:
                    _fisher_vmap(params, model, xs, ys, loss_fn, chunk_size, acc)
                    return acc
                except (RuntimeError, NotImplementedError):
                    if per_sample == "vmap":
                        raise
                    for a in acc:
                        a.zero_()
            _fisher_loop(params, model, xs, ys, loss_fn, acc)
    return acc


def _fisher_vmap(params, model, xs, ys, loss_fn, chunk_size, acc) -> None:
    from torch.func import functional_call, grad, vmap

    index = {id(p): i for i, p in enumerate(params)}
    names = [(n, index[id(p)]) for n, p in model.named_parameters() if id(p) in index]
    frozen = {n: p.detach() for n, p in model.named_parameters() if id(p) not in index}
    frozen.update(dict(model.named_buffers()))

    def one(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **weights}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample_grad = vmap(grad(one), in_dims=(None, 0, 0))
    weights = {n: params[i].detach() for n, i in names}
    for start in range(0, xs.shape[0], chunk_size):
        g = per_sample_grad(weights, xs[start : start + chunk_size], ys[start : start + chunk_size])
        for n, i in names:
            acc[i].add_(g[n].to(acc[i].dtype).square().sum(0))


def _fisher_loop(params, model, xs, ys, loss_fn, acc) -> None:
    owned = {id(p) for p in model.parameters()}
    live = [i for i, p in enumerate(params) if p.requires_grad and id(p) in owned]
    for j in range(xs.shape[0]):
        value = loss_fn(model(xs[j : j + 1]), ys[j : j + 1])
        _accumulate(value, params, live, acc, retain=False)


def _fisher_from_losses(params, loss: Callable[[], Tensor], acc) -> None:
    losses = loss()
    if losses.dim() != 1:
        raise ValueError(f"loss() must return a 1-D tensor of per-example losses: {losses.shape}")
    live = [i for i, p in enumerate(params) if p.requires_grad]
    for j in range(losses.shape[0]):
        _accumulate(losses[j], params, live, acc, retain=j + 1 < losses.shape[0])


def _accumulate(value: Tensor, params, live: list[int], acc, retain: bool) -> None:
    grads = torch.autograd.grad(
        value, [params[i] for i in live], retain_graph=retain, allow_unused=True
    )
    for i, g in zip(live, grads):
        if g is not None:
            acc[i].add_(g.to(acc[i].dtype).square())


# ---------------------------------------------------------------------------------------------
# The mask state FusedSAM keeps


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
        _broadcast_from_rank0(packed)
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
            if _all_finite([p.grad for p in params if p.grad is not None]):
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


def _all_finite(grads: list[Tensor]) -> bool:
    """Whether every gradient is finite, on every rank (so that all ranks refresh together)."""
    import torch.distributed as dist

    if not grads:
        return True
    bad = torch.stack([torch.isfinite(g).all().logical_not() for g in grads]).any()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = bad.float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag.item())
    return not bool(bad)


def _broadcast_from_rank0(packed: list[Tensor]) -> None:
    """Give every rank rank 0's masks (one broadcast per device holding masks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    by_device: dict[torch.device, list[Tensor]] = {}
    for m in packed:
        by_device.setdefault(m.device, []).append(m)
    for ms in by_device.values():
        flat = torch.cat(ms)
        dist.broadcast(flat, src=0)
        for m, part in zip(ms, flat.split([m.numel() for m in ms])):
            m.copy_(part)


# ---------------------------------------------------------------------------------------------
# Random masks (ESAM's stochastic weight perturbation), drawn inside the perturbation kernels

_M32 = 0xFFFFFFFF
#: Odd 32-bit constants: the golden-ratio step of the element counter and murmur3's finaliser.
_GOLDEN = 0x9E3779B9
_FMIX1 = 0x85EBCA6B
_FMIX2 = 0xC2B2AE35


def _fmix32(x: int) -> int:
    """murmur3's 32-bit finaliser (a bijection of ``[0, 2^32)`` with full avalanche)."""
    x ^= x >> 16
    x = (x * _FMIX1) & _M32
    x ^= x >> 13
    x = (x * _FMIX2) & _M32
    return x ^ (x >> 16)


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2^32 for int64 0 <= x < 2^32 with no int64 overflow: c in 16-bit halves.
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _M32


def element_hash(key: int, index: Tensor) -> Tensor:
    r"""The 32-bit hash every kernel computes for element ``index`` of a tensor with ``key``.

    .. math:: h(k, j) = \mathrm{fmix32}\big((k + j \cdot \mathtt{0x9E3779B9}) \bmod 2^{32}\big)

    with :math:`j` the element's position in memory order, taken modulo :math:`2^{32}`. Written
    with int64 tensor ops whose products stay below :math:`2^{63}` (exact on every device).

    Args:
        key: the tensor's 32-bit key for this step (:meth:`RandomBits.key`).
        index: int64 element positions (non-negative).
    """
    x = (_mul32(index & _M32, _GOLDEN) + key) & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX2)
    return x ^ (x >> 16)


@dataclass(frozen=True)
class RandomBits:
    """One step's random mask, as the perturbation ops take it (nothing is materialised).

    Element ``j`` (memory order) of tensor ``i`` is perturbed iff
    ``element_hash(salts[i] ^ step_key, j) < threshold``, and its ``e`` is multiplied by
    ``scale``.

    Attributes:
        salts: one fixed 32-bit value per tensor (from the parameter's position).
        step_key: the 32-bit key of this step (from the seed and the draw count).
        threshold: keep iff the hash is below it; ``round(keep * 2^32)`` in ``[1, 2^32)``.
        scale: ``1 / keep`` (ESAM rescales the kept entries so that ``E[e]`` is SAM's ``e``).
    """

    salts: tuple[int, ...]
    step_key: int
    threshold: int
    scale: float

    def key(self, i: int) -> int:
        """The 32-bit key of tensor ``i``."""
        return self.salts[i] ^ self.step_key

    def pick(self, idx: Sequence[int]) -> RandomBits:
        """The same mask for the tensors ``idx`` of the call (a backend bucket)."""
        salts = tuple(self.salts[i] for i in idx)
        return RandomBits(salts, self.step_key, self.threshold, self.scale)


def random_mask(bits: RandomBits, i: int, like: Tensor) -> Tensor:
    """Materialise tensor ``i``'s mask of ``bits`` as a bool tensor laid out like ``like``.

    What the fused kernels compute on the fly; the reference and ``foreach`` backends use it.
    """
    j = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    return _laid_out_like(element_hash(bits.key(i), j) < bits.threshold, like)


def tensor_salt(position: int) -> int:
    """The fixed salt of the parameter at ``position`` (param-group order, from 0)."""
    return _fmix32((position * _GOLDEN + 0x632BE5AB) & _M32)


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
        return min(max(round(self.keep * 2.0**32), 1), _M32)

    def step_key(self) -> int:
        """The 32-bit key of the next draw."""
        x = 0x243F6A88
        for value in (self.seed, self.draws):
            for word in (value & _M32, (value >> 32) & _M32):
                x = _fmix32(((x ^ word) + _GOLDEN) & _M32)
        return x

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
