"""Optimizer-side cost of the SAM variants' gradient math: LookSAM, F-SAM and GSAM hooks.

Run from the repository root::

    python benchmarks/bench_variants.py                       # CPU, 1 thread, writes results/
    python benchmarks/bench_variants.py --device cuda --threads 0

The variants' hooks combine gradients with global dot products and ``out = a x + b y`` updates
(``fused_sam/variants``). Each row times one hook set on a parameter set whose gradients are
filled in, per backend (``foreach``, the device's native kernels, Triton where it runs) and for
``loop``: the same math tensor by tensor (one ``vdot`` and a float64 expression per tensor), the
form of the variants' code before the fused ops, and of the peer implementations. Rows:

* ``looksam reuse``: ``plain_pass``, LookSAM's hot path (every step but one in ``k``): two
  norms and ``g += s g_v``. Bytes per fp32 parameter: 4 + 4 + 12 = 20.
* ``looksam sam``: ``first_pass`` + ``second_pass``: copy of ``g``, ``g_s . g``, ``|g|^2``,
  ``g_v = g_s - c g``: 8 + 8 + 4 + 12 = 32.
* ``fsam``: ``ascent`` + ``update``: copy of ``g``, ``g -= sigma m``, ``m = lam m + (1 - lam)
  g``: 8 + 12 + 12 = 32.
* ``gsam``: ``ascent`` + ``update``: copy of ``g``, ``g . g_s``, ``|g_s|^2``, ``g_s = a g_s +
  b g``: 8 + 8 + 4 + 12 = 32.

Columns: milliseconds (the minimum of the runs: the least disturbed on a shared machine),
launches or ATen calls per hook set (``torch.profiler``), GB/s of the bytes model, and percent
of the floor that a copy of the same size sets, measured in the same run. The norms and dot
products only read, and a read-only pass streams faster than a copy (which also writes), so a
row whose bytes are mostly reads can exceed 100%.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused_sam.bench import PARAM_SETS, copy_bandwidth, count_ops, metadata, time_step
from fused_sam.functional import available_backends
from fused_sam.variants import GSAM, FriendlySAM, LookSAM

#: Bytes per fp32 parameter of each row's hook set (see the module docstring).
BYTES = {"looksam reuse": 20, "looksam sam": 32, "fsam": 32, "gsam": 32}


def _tensors(shapes: list[tuple[int, ...]], device: torch.device, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device) for s in shapes]


# ---------------------------------------------------------------------------------------------
# The per-tensor form


def _loop_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=a[0].device)
    for x, y in zip(a, b):
        total = total + torch.vdot(x.reshape(-1).double(), y.reshape(-1).double())
    return total


def _loop_hooks(name: str, ps: list[Tensor], gs: list[Tensor], state: list[Tensor]) -> Callable:
    """The hook set of row ``name`` tensor by tensor; ``state`` is g_v or m."""
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

    return {
        "looksam reuse": looksam_reuse,
        "looksam sam": looksam_sam,
        "fsam": fsam,
        "gsam": gsam,
    }[name]


# ---------------------------------------------------------------------------------------------
# The package's hooks


def _fused_hooks(
    name: str, ps: list[Tensor], gs: list[Tensor], state: list[Tensor], backend: str
) -> Callable:
    """The hook set of row ``name`` through the variants' own code on ``backend``."""
    kw = {"backend": backend}
    if name.startswith("looksam"):
        look = LookSAM(k=5, alpha=0.05)
        look.gv = dict(zip(ps, state))
        if name == "looksam reuse":
            return lambda: look.plain_pass(ps, gs, **kw)

        def looksam_sam() -> None:
            look.first_pass(ps, gs, **kw)
            look.second_pass(ps, gs, None, **kw)

        return looksam_sam
    policy = FriendlySAM(sigma=1.0, lam=0.9) if name == "fsam" else GSAM(alpha=0.05)
    if name == "fsam":
        policy.m = dict(zip(ps, state))

    def direction() -> None:
        policy.ascent(ps, gs, **kw)
        policy.update(ps, gs, None, **kw)

    return direction


def rows_for(device: torch.device, preset: str, repeat: int) -> list[dict]:
    desc, make = PARAM_SETS[preset]
    shapes = make()
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    copy_bw = copy_bandwidth(device, numel) * 1e9
    rows: list[dict] = [dict(row=f"copy {numel / 1e6:.1f}M fp32", gbps=copy_bw / 1e9)]
    backends = ["loop"] + [
        name
        for name, why in available_backends(device).items()
        if why is None and name != "reference"
    ]
    for name in BYTES:
        for backend in dict.fromkeys(backends):
            ps = _tensors(shapes, device, 0)
            gs = _tensors(shapes, device, 1)
            state = _tensors(shapes, device, 2)
            if backend == "loop":
                fn = _loop_hooks(name, ps, gs, state)
            else:
                fn = _fused_hooks(name, ps, gs, state, backend)
            t = min(time_step(fn, device, repeat, warmup=2))
            ops = count_ops(fn, device)
            nbytes = BYTES[name] * numel
            rows.append(
                dict(
                    row=name,
                    params=desc,
                    backend=backend,
                    ms=t * 1e3,
                    ops=ops,
                    gbps=nbytes / t / 1e9,
                    pct_floor=100 * nbytes / copy_bw / t,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--params", default="resnet50,small1000", help="PARAM_SETS names")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta = metadata(device)
    rows: list[dict] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sha = (meta["git_sha"] or "nosha")[:8]
    path = out / f"{meta['date'][:16].replace(':', '')}_variants-{device.type}_{sha}.json"
    print(
        f"{'row':16s} {'backend':8s} {'params':40s} {'ms':>9s} {'ops':>6s} {'GB/s':>7s} {'%':>6s}"
    )
    for preset in args.params.split(","):
        new = rows_for(device, preset, args.repeat)
        for r in new:
            if "ms" in r:
                print(
                    f"{r['row']:16s} {r['backend']:8s} {r['params']:40s} {r['ms']:9.2f} "
                    f"{r['ops']:6d} {r['gbps']:7.2f} {r['pct_floor']:6.1f}"
                )
            else:
                print(f"{r['row']:16s} {'':8s} {'':40s} {'':9s} {'':6s} {r['gbps']:7.2f}")
        rows += new
        # Written after each parameter set, so a run cut off keeps what it measured.
        path.write_text(
            json.dumps(dict(meta, threads=torch.get_num_threads(), rows=rows), indent=1)
        )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
