"""Every check of FusedSAM's input, with its error text: constructor values, param groups,
parameters, base optimizers and checkpoints.

Each check raises before anything changes, so a refused value leaves the optimizer (and the base
optimizer it wraps) as it was.
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fused_sam import distributed
from fused_sam import functional as F
from fused_sam.values import as_real

#: Keys FusedSAM keeps in every param group (next to the base optimizer's own keys).
SAM_KEYS = ("rho", "adaptive", "eta")
ADAPTIVE_CHOICES = (False, True, "weights")


def check_nonneg(name: str, value: Any, *, positive: bool = False) -> float:
    real = as_real(value)  # any real type torch's optimizers take (numpy scalars included)
    if real is None:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = real
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def check_rho(value: Any) -> None:
    """``rho``: a real number, or a one-element float tensor (so that torch.compile does not
    guard on its value, and a CUDA graph reads its current value); its value is checked too
    except while the step is recorded (no host reads there)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.requires_grad:
            raise ValueError(
                "rho as a tensor must be a one-element float tensor without grad, e.g. "
                f"torch.tensor(0.05), got {value!r}"
            )
        if F.building_graph():
            return
        value = float(value)
    check_nonneg("rho", value)


def validate_group(group: dict[str, Any]) -> None:
    check_rho(group["rho"])
    check_nonneg("eta", group["eta"])
    if group["adaptive"] not in ADAPTIVE_CHOICES or (
        isinstance(group["adaptive"], int) and not (isinstance(group["adaptive"], bool))
    ):
        raise ValueError(
            f"adaptive must be False (SAM), True (ASAM on every tensor) or 'weights' (ASAM on "
            f"tensors with 2+ dims only, as official ASAM), got {group['adaptive']!r}"
        )


def check_base_kwargs(cls: type[Optimizer], kwargs: dict[str, Any]) -> None:
    sig = inspect.signature(cls.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [n for n in sig.parameters if n not in ("self", "params")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for {cls.__name__}; FusedSAM takes rho, adaptive, "
            f"eta, norm_eps, backend, skip_nonfinite, sparsity, mask, mask_update_every, "
            f"mask_norm, freeze_bn_stats and passes the rest to {cls.__name__}, which accepts "
            f"{accepted}"
        )


def check_drivable(base: Optimizer) -> None:
    """Reject base optimizers whose ``step()`` FusedSAM cannot call as it does."""
    if isinstance(base, torch.optim.SparseAdam):
        raise ValueError(
            "SparseAdam needs sparse gradients, which SAM cannot use (the perturbation needs "
            "the whole gradient); use Adam or AdamW"
        )
    closure = inspect.signature(type(base).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{type(base).__name__}.step() requires a closure (it re-evaluates the model "
            "itself), so FusedSAM cannot take its base step after the second pass; use a "
            "first-order optimizer such as SGD, Adam or AdamW"
        )


def check_distinct(params: list[Tensor]) -> None:
    """Reject a parameter listed twice, or parameters that share memory.

    Each perturbed parameter has its own backup and is restored from it; two parameters over
    the same elements would be perturbed twice and restored from different copies.
    """
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) appears more than once in the "
                "optimizer; list each parameter once (tied weights are one parameter)"
            )
        seen.add(id(p))
    # Byte extents per storage; sorted, each must end before the next begins. (Interleaved
    # views whose extents overlap but whose elements do not are rejected too.)
    spans: dict[tuple[torch.device, int], list[tuple[int, int, int]]] = {}
    for i, p in enumerate(params):
        if p.numel() == 0 or p.is_meta:  # meta tensors have no memory (every address is 0)
            continue
        size = p.element_size()
        start = p.storage_offset() * size
        extent = 1 + sum((n - 1) * abs(st) for n, st in zip(p.shape, p.stride()))
        key = (p.device, p.untyped_storage().data_ptr())
        spans.setdefault(key, []).append((start, start + extent * size, i))
    for spans_of in spans.values():
        spans_of.sort()
        for (_, end, i), (start, _, j) in itertools.pairwise(spans_of):
            if start < end:
                raise ValueError(
                    f"parameters {min(i, j)} and {max(i, j)} share memory (views of one "
                    "tensor); each parameter must have its own storage so that it can be "
                    "perturbed and restored exactly"
                )


#: Per-element optimizer state that must have its parameter's shape (torch's names).


_PER_ELEMENT_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_state_shapes(base: Optimizer) -> None:
    """Every per-element state tensor of ``base`` has its parameter's shape."""
    index = {id(p): i for i, p in enumerate(p for g in base.param_groups for p in g["params"])}
    for p, st in base.state.items():
        for key in _PER_ELEMENT_STATE:
            value = st.get(key)
            if isinstance(value, Tensor) and value.shape != p.shape:
                raise ValueError(
                    f"checkpoint state {key!r} of parameter {index.get(id(p), '?')} has shape "
                    f"{tuple(value.shape)}, but the parameter has shape {tuple(p.shape)}: the "
                    "checkpoint is of another model"
                )


CAPTURE = (
    "a CUDA graph can capture a SAM step only where nothing is read on the host: "
    "backend='triton' or backend='cuda' (their kernels read lr and rho from one-element "
    "tensors on the GPU and decide a skip on the device) with SGD, Adam or AdamW, whose update "
    "they fuse with the restore; see the README, CUDA graphs"
)


BARE_STEP = (
    "FusedSAM.step() was called with no closure and no SAM step in flight, so it could only "
    "take a plain base-optimizer step: that would train without SAM. A SAM step needs two "
    "forward/backward passes: call first_step() after the first backward and step() (or "
    "second_step()) after the second, or pass a closure to step(closure). Trainers that run one "
    "backward per step need the integration: HF Trainer -> "
    "fused_sam.integrations.transformers.SAMTrainer; Accelerate / timm loops -> the two-step "
    "loop, reaching first_step() through fused_sam.integrations.unwrap_sam(optimizer); "
    "Lightning -> automatic optimization with a module derived from "
    "fused_sam.integrations.lightning.SAMLightningModule, or the manual recipe in the README. "
    "To take plain steps on purpose, "
    "build FusedSAM(..., allow_plain_steps=True) or call opt.base_optimizer.step()."
)


def check_closure_cleared(before: list[tuple[Tensor, int]]) -> None:
    """Raise if the first closure call accumulated onto gradients it did not clear.

    ``before`` holds the gradients (and their version counters) that existed before the call.
    A closure following torch's convention zeroes them first: it either replaces them
    (``set_to_none``, new tensors) or zeroes them in place and then accumulates (two writes).
    A gradient that is the same tensor written exactly once and not all zeros was accumulated
    onto, as in a trainer that runs backward on earlier micro-batches and then calls
    ``step(closure)`` for the last one: the first pass would see every micro-batch, the second
    only the closure's. (Written once and all zeros: zeroed, and not reached by the pass.)
    """
    # One write is either backward adding onto a gradient left from before (accumulation) or
    # zero_grad(set_to_none=False) zeroing the gradient of a parameter this pass did not reach
    # (LayerDrop, stochastic depth, MoE routing): the first leaves it nonzero, the second all
    # zeros. Only gradients written once are read (one device read each).
    for g, version in before:
        if g._version == version + 1 and bool(g.any()):
            raise RuntimeError(
                "step(closure): the closure added its gradients to gradients that were there "
                "before it ran (gradient accumulation, e.g. Lightning's "
                "accumulate_grad_batches > 1), without zeroing them. SAM's second pass would "
                "see only the closure's own batch, so this step would be wrong. Zero the "
                "gradients inside the closure (torch's convention), or accumulate with "
                "first_step()/second_step() (README: 'Gradient accumulation')."
            )


def raise_sparse() -> None:
    raise RuntimeError(
        "FusedSAM does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
        "use dense gradients"
    )


def base_optimizer(
    params: Any, base_optimizer: type[Optimizer] | None, base_kwargs: dict[str, Any]
) -> Optimizer:
    """The optimizer FusedSAM wraps: ``params`` itself when it is an optimizer instance, else
    ``base_optimizer(params, **base_kwargs)`` after checking the class and its arguments."""
    if isinstance(params, Optimizer):
        if base_optimizer is not None or base_kwargs:
            raise ValueError(
                "pass either an optimizer instance, or parameters plus an optimizer class "
                "and its keyword arguments, not both"
            )
        return params
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
        raise ValueError(
            "base_optimizer must be a torch.optim.Optimizer subclass such as "
            f"torch.optim.SGD, got {base_optimizer!r}"
        )
    check_base_kwargs(base_optimizer, base_kwargs)
    return base_optimizer(params, **base_kwargs)


def check_backend_name(backend: str | None) -> str | None:
    """``backend=``: ``None``, ``"auto"`` or the name of a backend."""
    if backend is not None and backend != "auto" and backend not in F.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(F.BACKENDS)} or None")
    return backend


def plain_step_error(schedule: object, steps: int) -> str:
    """The error of a ``first_step()`` on a step the schedule makes plain."""
    return (
        f"the schedule ({schedule!r}) makes step {steps} a plain step: run one "
        "forward/backward and call step() (opt.next_step says which kind comes next)"
    )


def new_group(
    param_group: dict[str, Any],
    defaults: dict[str, Any],
    params: list[Tensor],
    backend: str | None,
) -> dict[str, Any]:
    """A param group for ``add_param_group``, with the SAM defaults filled in, after checking
    its SAM values, that its parameters are new and share no memory with ``params`` (those
    already in the optimizer), and that the ``backend`` can run on their devices."""
    group = dict(param_group)
    for key in SAM_KEYS:
        group.setdefault(key, defaults[key])
    validate_group(group)
    new = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
    check_distinct([distributed.local(p) for p in params + new])
    check_backend_runs(backend, {p.device for p in new})
    group["params"] = new
    return group


def check_backend_runs(backend: str | None, devices: set[torch.device]) -> None:
    """A forced ``backend`` must be able to run on every device, or fail now with its reason
    (meta parameters of a deferred initialisation are checked at their first step)."""
    for device in devices - {torch.device("meta")}:
        F.resolve_backend(backend, device)
