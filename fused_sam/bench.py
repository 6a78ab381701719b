"""``fused-sam bench``: the optimizer-side cost of a SAM step against plain SGD and AdamW.

Three modes:

* optimizer side (default): a parameter set (synthesised from a known architecture, custom
  sizes, or a user model given as ``module:factory``) with gradients already filled in; one SAM
  step is ``first_step()`` + ``second_step()``, no forward or backward. Every provider runs in the
  same process, side by side: the per-tensor-loop SAM (the algorithm of the widely used
  community implementation, re-implemented here as the baseline), ``FusedSAM`` on the
  ``foreach`` backend, and every other backend that :func:`fused_sam.available_backends` reports
  usable on the device, plus plain SGD and AdamW steps as the denominators of the SAM/SGD ratio.
* end to end (``e2e``): whole training steps (forward, backward and optimizer) of a small CNN
  with BatchNorm at a given batch size: SGD against SAM and its variants (SAM every 5 steps,
  LookSAM, F-SAM, GSAM, Momentum-SAM), each driven the way its users drive it.
* variants (``variants``): the gradient math of LookSAM, F-SAM and GSAM (their optimizer hooks)
  on a parameter set, per backend and tensor by tensor (:func:`bench_variants`).

Timing: on CUDA each step is timed with CUDA events, on CPU with ``time.perf_counter``; the
median of the repetitions is reported. The copy bandwidth is measured in the same run with a
large ``copy_``; "% of floor" is the time the step's minimum memory traffic would take at that
bandwidth (40 B/param for SAM on SGD with momentum, 48 on AdamW, 20 for SGD alone, 28 for
AdamW alone) divided by the measured time.

The functions here are shared with the pytest-benchmark suites in ``benchmarks/``.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import importlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fused_sam.bn import frozen_bn_stats
from fused_sam.functional import available_backends
from fused_sam.optimizer import FusedSAM

__all__ = [
    "PARAM_SETS",
    "Provider",
    "bench_e2e",
    "bench_optimizer",
    "bench_variants",
    "copy_bandwidth",
    "e2e_model",
    "make_params",
    "param_shapes",
    "providers_for",
]

Shape = tuple[int, ...]

# ---------------------------------------------------------------------------------------------
# Parameter sets


def _resnet_shapes(blocks: Sequence[int], bottleneck: bool, classes: int = 1000) -> list[Shape]:
    """Parameter shapes of torchvision's ResNet in ``named_parameters()`` order."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    expansion = 4 if bottleneck else 1
    for stage, n_blocks in enumerate(blocks):
        width = 64 * 2**stage
        out_ch = width * expansion
        for b in range(n_blocks):
            if bottleneck:
                convs = [(width, in_ch, 1, 1), (width, width, 3, 3), (out_ch, width, 1, 1)]
            else:
                convs = [(width, in_ch, 3, 3), (width, width, 3, 3)]
            for conv in convs:
                shapes += [conv, (conv[0],), (conv[0],)]  # conv weight, BN weight, BN bias
            if b == 0 and (stage > 0 or in_ch != out_ch):
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]  # downsample
            in_ch = out_ch
    return [*shapes, (classes, in_ch), (classes,)]


def _vit_shapes(
    depth: int = 12, dim: int = 768, mlp: int = 3072, patch: int = 16, tokens: int = 197
) -> list[Shape]:
    """Parameter shapes of ViT-B/16 (timm / torchvision layout)."""
    shapes: list[Shape] = [(1, 1, dim), (1, tokens, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,)]
        shapes += [(dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return [*shapes, (dim,), (dim,), (1000, dim), (1000,)]


#: Named parameter sets: name -> (description, shapes factory).
PARAM_SETS: dict[str, tuple[str, Callable[[], list[Shape]]]] = {
    "resnet18": (
        "ResNet-18 (11.7M params, 62 tensors)",
        lambda: _resnet_shapes([2, 2, 2, 2], False),
    ),
    "resnet50": (
        "ResNet-50 (25.6M params, 161 tensors)",
        lambda: _resnet_shapes([3, 4, 6, 3], True),
    ),
    "vit_b": ("ViT-B/16 (86.6M params, 152 tensors)", _vit_shapes),
    "small1000": ("1000 tensors of 1000 params (1M params)", lambda: [(1000,)] * 1000),
    "tiny": ("8 tensors, 38k params (tests)", lambda: [(64, 32, 3, 3), (64,), (64,), (10, 64)] * 2),
}


def _load_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"a model is given as module:factory (e.g. torchvision.models:resnet18), got {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for --model {spec}: {exc}") from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (--model {spec})")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def param_shapes(
    preset: str | None = None, sizes: Sequence[int] | None = None, model: str | None = None
) -> tuple[str, list[Shape]]:
    """Resolve exactly one of ``preset`` / ``sizes`` / ``model`` to ``(description, shapes)``.

    Args:
        preset: a key of :data:`PARAM_SETS`.
        sizes: custom tensor sizes (numels), one 1-D tensor each.
        model: ``module:factory``; the factory is called with no arguments and must return an
            ``nn.Module`` whose trainable parameter shapes are used.
    """
    given = [x is not None for x in (preset, sizes, model)]
    if sum(given) != 1:
        raise ValueError("give exactly one of a parameter set, --sizes or --model")
    if preset is not None:
        if preset not in PARAM_SETS:
            raise ValueError(
                f"unknown parameter set {preset!r}; choose from {', '.join(PARAM_SETS)}"
            )
        desc, make = PARAM_SETS[preset]
        return desc, make()
    if sizes is not None:
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"--sizes must be positive integers, got {list(sizes)}")
        return f"custom ({len(sizes)} tensors)", [(int(s),) for s in sizes]
    assert model is not None
    shapes = [tuple(p.shape) for p in _load_factory(model).parameters() if p.requires_grad]
    if not shapes:
        raise ValueError(f"{model}() has no trainable parameters")
    return model, shapes


def make_params(shapes: Sequence[Shape], device: torch.device | str, seed: int = 0) -> list[Tensor]:
    """Leaf fp32 parameters of the given shapes with random gradients filled in."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


# ---------------------------------------------------------------------------------------------
# Providers: one optimizer step each, over the same parameters


class LoopSAM:
    """Baseline: the per-tensor-loop SAM algorithm of the community implementation davda54/sam.

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
            lambda ps: _sam_step(LoopSAM(ps, cls, 0.05, **kw)),
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


# ---------------------------------------------------------------------------------------------
# Measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    step: Callable[[], None], device: torch.device, repeat: int, warmup: int
) -> list[float]:
    """Seconds per call of ``step``: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device | str, numel: int, repeat: int = 10) -> float:
    """Copy bandwidth in GB/s (read + write) of ``dst.copy_(src)`` over ``numel`` fp32 values."""
    device = torch.device(device)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = statistics.median(time_step(lambda: dst.copy_(src), device, repeat, warmup=2))
    return 2 * 4 * numel / t / 1e9


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for the block.

    The profiler's C++ side logs a start/stop line per session straight to fd 2, which would
    interleave with the results table; Python-level redirection cannot catch it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_ops(step: Callable[[], None], device: torch.device) -> int:
    """Work items one ``step`` dispatches: CUDA kernels on a GPU, top-level ATen ops on a CPU.

    On a GPU this is the number of kernel launches. On a CPU there are no launches; the number
    of top-level ATen operator calls is the closest analogue (a ``_foreach_*`` op over many
    tensors counts once, a per-tensor loop counts once per tensor).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    step()  # warm caches so the profile shows a steady-state step
    _sync(device)
    with _quiet_stderr(), profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def _summary(
    shapes: Sequence[Shape], device: torch.device, bandwidth: float, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The result of an optimizer-side run: its rows and what they were measured against."""
    return {
        "numel": sum(math.prod(s) for s in shapes),
        "tensors": len(shapes),
        "copy_bandwidth_gbps": bandwidth,
        "ops_meaning": "CUDA kernel launches"
        if device.type == "cuda"
        else "top-level ATen ops (CPU)",
        "rows": rows,
    }


def bench_optimizer(
    shapes: Sequence[Shape],
    device: torch.device | str = "cpu",
    base: str = "sgd",
    repeat: int = 20,
    warmup: int = 3,
    include_reference: bool = False,
    only: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    sparsity: float = 0.0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time every provider on the same parameter set; returns rows plus the copy bandwidth.

    Args:
        shapes: parameter shapes.
        device: where the parameters live.
        base: base optimizer of the SAM providers (``sgd`` with momentum 0.9, or ``adamw``).
        repeat: timed steps per provider (the median is reported).
        warmup: untimed steps before timing.
        include_reference: also time the float64 reference backend (slow; off by default).
        only: restrict to providers whose name contains one of these strings.
        progress: called with each provider's name before it runs.
        sparsity: also time each backend with a Sparse SAM mask of this sparsity.
        on_row: called after each row with the result so far (the rows measured, no ratios
            yet), so a caller can rewrite its results file and a run cut off keeps its rows.
    """
    device = torch.device(device)
    numel = sum(math.prod(s) for s in shapes)
    # Source and destination together span 4 * numel floats, the arrays an SGD-momentum SAM
    # step touches (w, g, momentum, backup): the same cache level as the step itself.
    bandwidth = copy_bandwidth(device, 2 * numel)
    rows = []
    for prov in providers_for(device, base, include_reference, sparsity):
        if only and not any(o in prov.name for o in only):
            continue
        if progress is not None:
            progress(prov.name)
        params = make_params(shapes, device)
        step = prov.make(params)
        times = time_step(step, device, repeat, warmup)
        median = statistics.median(times)
        floor = prov.floor_bytes * numel / (bandwidth * 1e9)
        rows.append(
            {
                "provider": prov.name,
                "kind": prov.kind,
                "base": prov.base,
                "note": prov.note,
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(times),
                "floor_bytes_per_param": prov.floor_bytes,
                "gbps_at_floor_bytes": prov.floor_bytes * numel / median / 1e9,
                "pct_of_floor": 100.0 * floor / median,
                "ops_per_step": count_ops(step, device),
            }
        )
        del params, step
        if on_row is not None:
            on_row(_summary(shapes, device, bandwidth, rows))
    base_ms = {r["base"]: r["median_ms"] for r in rows if r["kind"] == "base"}
    for r in rows:
        denom = base_ms.get(r["base"])
        r["ratio_to_base"] = r["median_ms"] / denom if denom else None
    return _summary(shapes, device, bandwidth, rows)


#: Bytes per fp32 parameter of each variant hook set timed by :func:`bench_variants`.
VARIANT_BYTES: dict[str, int] = {
    # plain_pass: |g|^2 4, |g_v|^2 4, g += s g_v 12
    "LookSAM reuse step": 20,
    # first_pass + second_pass: copy of g 8, g_s . g 8, |g|^2 4, g_v = g_s - c g 12
    "LookSAM SAM step": 32,
    # ascent + update: copy of g 8, g -= sigma m 12, m = lam m + (1 - lam) g 12
    "F-SAM": 32,
    # ascent + update: copy of g 8, g . g_s 8, |g_s|^2 4, g_s = a g_s + b g 12
    "GSAM": 32,
}


def _loop_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=a[0].device)
    for x, y in zip(a, b):
        total = total + torch.vdot(x.reshape(-1).double(), y.reshape(-1).double())
    return total


def _variant_hooks_by_tensor(
    name: str, gs: list[Tensor], state: list[Tensor]
) -> Callable[[], None]:
    """The math of hook set ``name`` tensor by tensor (one ``vdot`` and one float64 expression
    per tensor), as peer implementations write it; ``state`` is LookSAM's g_v or F-SAM's m."""
    alpha, sigma, lam = 0.05, 1.0, 0.9

    def looksam_reuse() -> None:
        scale = alpha * _loop_dot(gs, gs).sqrt() / _loop_dot(state, state).sqrt()
        for g, v in zip(gs, state):
            g.copy_((g.double() + scale * v.double()).to(g.dtype))

    def looksam_sam() -> None:
        g1 = [g.clone() for g in gs]
        coef = _loop_dot(gs, g1) / _loop_dot(g1, g1)
        for v, g, h in zip(state, gs, g1):
            v.copy_((g.double() - coef * h.double()).to(v.dtype))

    def fsam() -> None:
        g1 = [g.clone() for g in gs]
        for g, m in zip(gs, state):
            g.sub_(m * sigma)
        for m, g in zip(state, g1):
            m.copy_(m * lam + g * (1 - lam))

    def gsam() -> None:
        g1 = [g.clone() for g in gs]
        coef = _loop_dot(g1, gs) / _loop_dot(gs, gs)
        for g, h in zip(gs, g1):
            g.copy_((g.double() - alpha * (h.double() - coef * g.double())).to(g.dtype))

    hooks = {"LookSAM reuse step": looksam_reuse, "LookSAM SAM step": looksam_sam}
    return {**hooks, "F-SAM": fsam, "GSAM": gsam}[name]


def _variant_hooks(
    name: str, ps: list[Tensor], gs: list[Tensor], state: list[Tensor], backend: str
) -> Callable[[], None]:
    """Hook set ``name`` through the variants' own code on ``backend``."""
    from fused_sam.variants import GSAM, FriendlySAM, LookSAM

    if name.startswith("LookSAM"):
        look = LookSAM(k=5, alpha=0.05)
        look.gv = dict(zip(ps, state))
        if name == "LookSAM reuse step":
            return lambda: look.plain_pass(ps, gs, backend=backend)

        def looksam_sam() -> None:
            look.first_pass(ps, gs, backend=backend)
            look.second_pass(ps, gs, None, backend=backend)

        return looksam_sam
    policy: FriendlySAM | GSAM
    if name == "F-SAM":
        policy = FriendlySAM(sigma=1.0, lam=0.9)
        policy.m = dict(zip(ps, state))
    else:
        policy = GSAM(alpha=0.05)

    def direction() -> None:
        policy.ascent(ps, gs, backend=backend)
        policy.update(ps, gs, None, backend=backend)

    return direction


def bench_variants(
    shapes: Sequence[Shape],
    device: torch.device | str = "cpu",
    repeat: int = 20,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time the gradient math of LookSAM, F-SAM and GSAM (their optimizer hooks) per backend.

    Each hook set runs on the same parameter set with gradients filled in, through the
    variants' code on every usable backend but the reference, and as ``loop``: the same math
    tensor by tensor. Bytes per parameter in :data:`VARIANT_BYTES`. The norms and dot products
    only read, and a read-only pass streams faster than a copy, so a row whose bytes are mostly
    reads can exceed 100% of the copy floor.

    Args:
        shapes: parameter shapes.
        device: where the tensors live.
        repeat: timed calls per row (the median is reported, and the minimum).
        warmup: untimed calls first.
        progress: called with each row's name before it runs.
        on_row: called after each row with the result so far (see :func:`bench_optimizer`).
    """
    from fused_sam.functional import available_backends

    device = torch.device(device)
    numel = sum(math.prod(s) for s in shapes)
    bandwidth = copy_bandwidth(device, numel)
    backends = [b for b, why in available_backends(device).items() if why is None]
    providers = ["loop", *dict.fromkeys(b for b in backends if b != "reference")]
    rows = []
    for name, nbytes in VARIANT_BYTES.items():
        loop_ms = None
        for provider in providers:
            if progress is not None:
                progress(f"{name} [{provider}]")
            ps = make_params(shapes, device, seed=0)
            gs = [p.grad for p in ps]
            state = [p.grad for p in make_params(shapes, device, seed=1)]  # g_v or m
            if provider == "loop":
                fn = _variant_hooks_by_tensor(name, gs, state)
            else:
                fn = _variant_hooks(name, ps, gs, state, provider)
            with torch.no_grad():
                times = time_step(fn, device, repeat, warmup)
                ops = count_ops(fn, device)
            median = statistics.median(times)
            loop_ms = 1e3 * median if provider == "loop" else loop_ms
            rows.append(
                {
                    "hooks": name,
                    "provider": provider,
                    "median_ms": 1e3 * median,
                    "min_ms": 1e3 * min(times),
                    "floor_bytes_per_param": nbytes,
                    "gbps_at_floor_bytes": nbytes * numel / median / 1e9,
                    "pct_of_floor": 100.0 * nbytes * numel / (bandwidth * 1e9) / median,
                    "ops_per_step": ops,
                    "ratio_to_loop": 1e3 * median / loop_ms if loop_ms else None,
                }
            )
            if on_row is not None:
                on_row(_summary(shapes, device, bandwidth, rows))
    return _summary(shapes, device, bandwidth, rows)


def e2e_model(width: int = 64, classes: int = 10) -> nn.Module:
    """The end-to-end benchmark's model: the demo's CNN on 3-channel images."""
    from fused_sam.demo import make_model

    return make_model(3, classes, width)


#: Training steps per timed sample of the end-to-end benchmark: one whole period of the
#: k = 5 schedules (four plain or reuse steps and one SAM step), so that every sample of every
#: row holds the same mix of step kinds.
E2E_CYCLE = 5


def _e2e_variants(device: torch.device, kw: dict[str, Any]) -> dict[str, tuple[str, Callable]]:
    """The SAM variants of the end-to-end benchmark: name -> (how users drive it, builder),
    on the fastest usable backend (the one ``FusedSAM`` picks by default)."""
    from fused_sam.functional import resolve_backend
    from fused_sam.masks import RandomMask
    from fused_sam.variants import GSAM, EveryK, FriendlySAM, LookSAM, MomentumSAM

    tag = f"[{resolve_backend(None, device)}]"

    def sam(**variant: Any) -> Callable[[Any], FusedSAM]:
        return lambda ps: FusedSAM(ps, torch.optim.SGD, rho=0.05, foreach=True, **kw, **variant)

    return {
        f"SAM every 5 {tag}": ("closure", sam(schedule=EveryK(5))),
        f"LookSAM k=5 {tag}": ("closure", sam(schedule=LookSAM(k=5, alpha=0.7))),
        f"F-SAM {tag}": ("two-step", sam(direction=FriendlySAM())),
        f"GSAM {tag}": ("two-step", sam(direction=GSAM())),
        f"ESAM keep 0.5 {tag}": ("two-step", sam(mask=RandomMask(keep=0.5))),
        f"Momentum-SAM {tag}": (
            "one-pass",
            lambda ps: MomentumSAM(ps, torch.optim.SGD, rho=0.5, foreach=True, **kw),
        ),
    }


def bench_e2e(
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    image_size: int = 32,
    width: int = 64,
    repeat: int = 10,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Whole training steps (forward, backward, optimizer) of SGD, SAM and its variants on a
    small CNN, side by side in one run.

    The model is the demo's CNN (four conv+BatchNorm blocks) on random CIFAR-shaped inputs; SAM
    runs on the ``foreach`` backend and on every other usable one, with BatchNorm statistics
    frozen in its second pass as in the demo. Each variant runs on the default backend, driven
    the way its users drive it: the schedules (SAM every 5 steps, LookSAM) through
    ``step(closure)``, which takes one pass on their plain/reuse steps; F-SAM and GSAM through
    ``first_step``/``second_step``; Momentum-SAM through ``backward(); step()``.

    Each timed sample is :data:`E2E_CYCLE` consecutive steps; times are per step (the median
    sample over its steps). ``passes_per_step`` counts the forward/backward passes taken.
    ``on_row`` is called after each row with the result so far (see :func:`bench_optimizer`).
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(device)
    loss_fn = nn.CrossEntropyLoss()
    kw = {"lr": 0.01, "momentum": 0.9}
    variants: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "SGD (foreach)": ("one-pass", lambda ps: torch.optim.SGD(ps, foreach=True, **kw))
    }
    for backend, reason in available_backends(device).items():
        if reason is None and backend != "reference":
            variants[f"FusedSAM[{backend}]"] = (
                "two-step",
                lambda ps, b=backend: FusedSAM(
                    ps, torch.optim.SGD, rho=0.05, backend=b, foreach=True, **kw
                ),
            )
    variants.update(_e2e_variants(device, kw))
    rows: list[dict[str, Any]] = []
    params = sum(p.numel() for p in e2e_model(width).parameters())

    def result() -> dict[str, Any]:
        return {
            "model": f"CNN, 4 conv+BN blocks, width {width}, {params} params",
            "batch_size": batch_size,
            "input": [3, image_size, image_size],
            "steps_per_sample": E2E_CYCLE,
            "rows": rows,
        }

    for name, (drive, build) in variants.items():
        if progress is not None:
            progress(name)
        torch.manual_seed(0)
        model = e2e_model(width).to(device)
        opt = build(model.parameters())
        passes = [0]

        def loss(model: nn.Module = model, passes: list[int] = passes) -> Tensor:
            passes[0] += 1
            out = loss_fn(model(x), y)
            out.backward()
            return out

        def cycle(model=model, opt=opt, drive=drive, loss=loss) -> None:
            for _ in range(E2E_CYCLE):
                if drive == "one-pass":  # SGD, Momentum-SAM: the plain loop
                    loss()
                    opt.step()
                    opt.zero_grad()
                elif drive == "two-step":
                    loss()
                    opt.first_step(zero_grad=True)
                    with frozen_bn_stats(model):
                        loss()
                    opt.second_step(zero_grad=True)
                else:

                    def closure(model=model, opt=opt, loss=loss) -> Tensor:
                        opt.zero_grad()
                        # BN statistics from the first pass only, as in the two-step loop.
                        with frozen_bn_stats(model) if opt.in_flight else contextlib.nullcontext():
                            return loss()

                    opt.step(closure)

        times = [t / E2E_CYCLE for t in time_step(cycle, device, repeat, warmup)]
        rows.append(
            {
                "provider": name,
                "median_ms": 1e3 * statistics.median(times),
                "min_ms": 1e3 * min(times),
                "passes_per_step": passes[0] / (E2E_CYCLE * (repeat + warmup)),
            }
        )
        if on_row is not None:
            on_row(result())
    sgd = rows[0]["median_ms"]
    for r in rows:
        r["ratio_to_sgd"] = r["median_ms"] / sgd
    return result()


# ---------------------------------------------------------------------------------------------
# Results


#: Environment variable that names the commit measured, for a copy of the tree without ``.git``
#: (the lent GPU machine gets the working tree only; ``benchmarks/gpu_session.sh`` sets it).
GIT_SHA_ENV = "FUSED_SAM_GIT_SHA"


def git_sha() -> str | None:
    """The commit of the source tree: ``$FUSED_SAM_GIT_SHA`` when set, else ``git rev-parse``."""
    given = os.environ.get(GIT_SHA_ENV, "").strip()
    if given:
        return given
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_name(device: torch.device | str) -> str:
    """A human description of ``device`` (GPU name, or CPU model and core count)."""
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def metadata(device: torch.device | str) -> dict[str, Any]:
    """Date, device, versions and git sha stored with every result file."""
    from fused_sam.info import collect_info

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "git_sha": git_sha(),
        "environment": collect_info(),
    }


def to_csv(results: dict[str, Any]) -> str:
    """The rows of an optimizer (and, when present, end-to-end) run as CSV."""
    buf = io.StringIO()
    rows = [{"mode": "optimizer", **r} for r in results.get("optimizer", {}).get("rows", [])]
    rows += [{"mode": "e2e", **r} for r in results.get("e2e", {}).get("rows", [])]
    rows += [{"mode": "variants", **r} for r in results.get("variants", {}).get("rows", [])]
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_results(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` as JSON, or as CSV when ``path`` ends in ``.csv``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        path.write_text(to_csv(results))
    else:
        path.write_text(json.dumps(results, indent=1) + "\n")


Table = tuple[list[str], list[list[str]]]


def optimizer_table(res: dict[str, Any]) -> Table:
    """The optimizer-side rows as ``(headers, rows)`` of strings."""
    headers = ["provider", "median ms", "GB/s at floor bytes", "% of floor"]
    headers += [f"{res['ops_meaning']} / step", "ratio to base"]
    rows = []
    for r in res["rows"]:
        ratio = "-" if r["ratio_to_base"] is None else f"{r['ratio_to_base']:.2f}x"
        rows.append(
            [
                r["provider"],
                f"{r['median_ms']:.3f}",
                f"{r['gbps_at_floor_bytes']:.1f}",
                f"{r['pct_of_floor']:.1f}",
                str(r["ops_per_step"]),
                ratio,
            ]
        )
    return headers, rows


def e2e_table(res: dict[str, Any]) -> Table:
    """The end-to-end rows as ``(headers, rows)`` of strings."""
    rows = [
        [
            r["provider"],
            f"{r['passes_per_step']:.1f}",
            f"{r['median_ms']:.2f}",
            f"{r['ratio_to_sgd']:.2f}x",
        ]
        for r in res["rows"]
    ]
    return ["training step", "passes / step", "median ms", "ratio to SGD"], rows


def variants_table(res: dict[str, Any]) -> Table:
    """The variant hook rows as ``(headers, rows)`` of strings."""
    headers = ["hooks", "provider", "median ms", "GB/s at floor bytes", "% of floor"]
    headers += [f"{res['ops_meaning']}", "ratio to loop"]
    rows = [
        [
            r["hooks"],
            r["provider"],
            f"{r['median_ms']:.3f}",
            f"{r['gbps_at_floor_bytes']:.1f}",
            f"{r['pct_of_floor']:.1f}",
            str(r["ops_per_step"]),
            "-" if r["ratio_to_loop"] is None else f"{r['ratio_to_loop']:.2f}x",
        ]
        for r in res["rows"]
    ]
    return headers, rows


def markdown(table: Table) -> str:
    """A ``(headers, rows)`` table as Markdown, numbers right-aligned."""
    headers, rows = table
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
