"""What CUDA graph replay saves per SAM step on a small, launch-bound model (GPU only).

Run from the repository root::

    python benchmarks/cuda_graphs.py --out cuda-graphs.json

Rows, each a whole training step (forward, backward, optimizer) of an 8-layer MLP (width 256,
batch 32), timed with CUDA events (median of ``--repeat`` samples of 20 steps):

* ``SGD eager`` / ``SGD graph``: plain ``torch.optim.SGD`` (momentum), eagerly and replayed.
* ``SAM eager [cuda]``: FusedSAM on the native CUDA kernels (floats), eagerly.
* ``SAM eager [triton]`` / ``SAM graph [triton]``: FusedSAM on the Triton kernels with ``lr``
  and ``rho`` as device tensors, eagerly and replayed (the capturable configuration).

The JSON is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused_sam import FusedSAM
from fused_sam.cli.bench import git_sha

STEPS_PER_SAMPLE = 20


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10)).cuda()


def sam_step(model: nn.Module, opt: FusedSAM, x: torch.Tensor, y: torch.Tensor) -> None:
    nnf.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nnf.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    nnf.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(step: Callable[[], None], repeat: int) -> float:
    """Median milliseconds per step over ``repeat`` samples."""
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(STEPS_PER_SAMPLE):
            step()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / STEPS_PER_SAMPLE)
    return statistics.median(samples)


def captured(step: Callable[[], None]) -> Callable[[], None]:
    """Warm ``step`` up on a side stream, capture one call, return the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default="cuda-graphs.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    x = torch.randn(32, 256, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    record: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "model": "MLP 8x256, batch 32",
        "rows": [],
    }

    def dev(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64, device="cuda")

    def build(name: str) -> Callable[[], None]:
        model = mlp()
        if name.startswith("SGD"):
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            return lambda: sgd_step(model, opt, x, y)
        if name == "SAM eager [cuda]":
            sam = FusedSAM(
                model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="cuda"
            )
        else:
            sam = FusedSAM(
                model.parameters(), torch.optim.SGD, rho=dev(0.05), lr=dev(0.1), momentum=0.9,
                backend="triton",
            )  # fmt: skip
        return lambda: sam_step(model, sam, x, y)

    for name in ("SGD eager", "SGD graph", "SAM eager [cuda]", "SAM eager [triton]",
                 "SAM graph [triton]"):  # fmt: skip
        try:
            step = build(name)
            if name.endswith("graph") or name.endswith("graph [triton]"):
                step = captured(step)
            for _ in range(3):
                step()
            ms = timed(step, args.repeat)
            row = {"row": name, "ms_per_step": ms}
        except Exception as exc:  # a row that fails is recorded as such, the others still run
            row = {"row": name, "error": f"{type(exc).__name__}: {exc}"}
        record["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
