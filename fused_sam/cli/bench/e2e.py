"""``fused-sam bench --e2e``: whole training steps of SGD, SAM and its variants on a small CNN."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fused_sam.bn import frozen_bn_stats
from fused_sam.cli.bench import timing
from fused_sam.cli.models import e2e_model
from fused_sam.functional import available_backends
from fused_sam.optimizer import FusedSAM

__all__ = ["E2E_CYCLE", "bench_e2e"]


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

        times = [t / E2E_CYCLE for t in timing.time_step(cycle, device, repeat, warmup)]
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
