"""Cost of sparse-SAM masks: refreshes (SSAM-F, SSAM-D) and the perturbation with a mask.

Run from the repository root::

    python benchmarks/bench_masks.py            # prints a table, writes benchmarks/results/
    python benchmarks/bench_masks.py --device cuda --threads 0

Rows:

* ``sam step``: one whole SAM step (two forward/backward passes, batch 128) on a small CIFAR-size
  CNN: the unit in which refresh costs are quoted.
* ``fisher n=...``: one SSAM-F refresh (per-sample gradients of n examples, Fisher diagonal,
  global top-k, packing), per path (``vmap`` in chunks, ``loop``).
* ``dynamic``: one SSAM-D refresh (drop by |g|, grow at random).
* ``first_step + restore`` (best of ``4 * repeat``): norm, perturb and restore over a flat
  parameter set, on the ``foreach`` backend and on the device's native kernels, without a mask,
  with a bit-packed mask and with ESAM's random mask (``RandomMask``), in GB/s of the bytes model
  (fp32: norm reads g, 4 B; perturb reads w, g and writes w, backup, 16 B; restore 8 B; a packed
  mask adds N/8 B to each pass that reads it; a random mask adds nothing, the native kernels
  compute its bits) and in percent of the floor that a measured copy bandwidth sets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused_sam import DynamicMask, FisherMask, FusedSAM, RandomMask
from fused_sam.functional import resolve_backend


def cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.MaxPool2d(2),
        *block(128, 256),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


def timed(fn: Callable[[], object], device: torch.device, repeat: int, best: bool = False) -> float:
    """Median (or, with ``best``, minimum) seconds over ``repeat`` runs after one warm-up run.

    The bandwidth rows use the minimum: on a shared machine it is the run least disturbed by
    other load, and the bytes model is about what the code can reach.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def refresh_rows(device: torch.device, repeat: int) -> list[dict]:
    torch.manual_seed(0)
    model = cnn().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    data = [(x, y)]
    loss_fn = nn.functional.cross_entropy
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)

    def sam_step() -> None:
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    rows = []
    step = timed(sam_step, device, repeat)
    rows.append(dict(row="sam step (batch 128)", params=n_params, ms=step * 1e3, steps=1.0))

    for n in (16, 128):
        for path in ("vmap", "loop"):
            policy = FisherMask(data, model, num_samples=n, chunk_size=16, per_sample=path)
            sparse = FusedSAM(
                model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, mask=policy
            )
            t = timed(sparse.update_mask, device, repeat)
            rows.append(
                dict(row=f"fisher n={n} ({path})", params=n_params, ms=t * 1e3, steps=t / step)
            )

    dyn = FusedSAM(
        model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, mask=DynamicMask(seed=0)
    )
    loss_fn(model(x), y).backward()
    dyn.update_mask()  # the initial (random) mask; later calls are drop/grow refreshes
    t = timed(dyn.update_mask, device, repeat)
    rows.append(
        dict(row="dynamic (|g| drop, random grow)", params=n_params, ms=t * 1e3, steps=t / step)
    )
    model.zero_grad()
    return rows


def first_step_rows(device: torch.device, repeat: int, numel: int) -> list[dict]:
    torch.manual_seed(0)
    sizes = [numel // 8] * 8
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, 4 * repeat, best=True)
    copy_bw = 2 * 4 * numel / copy_s  # read + write

    rows = [dict(row=f"copy {numel / 1e6:.0f}M fp32", ms=copy_s * 1e3, gbps=copy_bw / 1e9)]
    # (label, options, passes that read a packed mask)
    configs = (
        ("no mask", {}, 0),
        ("mask", dict(sparsity=0.5, mask=DynamicMask(seed=0)), 1),
        ("masked norm", dict(sparsity=0.5, mask=DynamicMask(seed=0), mask_norm="masked"), 2),
        ("random mask", dict(mask=RandomMask(keep=0.5, seed=0)), 0),
    )
    for backend in dict.fromkeys(["foreach", resolve_backend(None, device)]):
        for label, kwargs, passes_reading_mask in configs:
            params = [torch.randn(s, device=device, requires_grad=True) for s in sizes]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = FusedSAM(params, torch.optim.SGD, lr=0.1, backend=backend, **kwargs)

            def cycle(opt: FusedSAM = opt) -> None:
                opt.first_step()
                opt.restore()

            t = timed(cycle, device, 4 * repeat, best=True)
            # norm 4 + perturb 16 + restore 8 B/param, plus N/8 per pass reading a packed mask.
            nbytes = 28 * numel + passes_reading_mask * numel / 8
            floor = nbytes / copy_bw
            rows.append(
                dict(
                    row=f"[{backend}] first_step+restore, {label}",
                    backend=backend,
                    ms=t * 1e3,
                    gbps=nbytes / t / 1e9,
                    pct_floor=100 * floor / t,
                    bytes_per_param=nbytes / numel,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--numel", type=int, default=8_000_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    refresh = refresh_rows(device, args.repeat)
    perturb = first_step_rows(device, args.repeat, args.numel)

    print(f"{'refresh':34s} {'params':>9s} {'ms':>9s} {'SAM steps':>10s}")
    for r in refresh:
        print(f"{r['row']:34s} {r['params']:9d} {r['ms']:9.1f} {r['steps']:10.2f}")
    print(f"\n{'optimizer side':44s} {'ms':>9s} {'GB/s':>7s} {'% floor':>8s} {'B/p':>8s}")
    for r in perturb:
        pct = f"{r['pct_floor']:8.1f}" if "pct_floor" in r else f"{'':8s}"
        bpp = f"{r['bytes_per_param']:8.3f}" if "bytes_per_param" in r else ""
        print(f"{r['row']:44s} {r['ms']:9.2f} {r['gbps']:7.2f} {pct} {bpp}")

    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    record = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        # CPU numbers from a shared machine are only comparable within one run.
        load_average=os.getloadavg(),
        torch=torch.__version__,
        git_sha=sha,
        refresh=refresh,
        first_step=perturb,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{record['date'][:10]}-masks-{device.type}.json"
    (out / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten to {out / name}")


if __name__ == "__main__":
    main()
