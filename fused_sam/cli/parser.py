"""The ``fused-sam`` argument parser: every subcommand, option, default and help text."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_parser"]


def _csv(kind: type) -> Callable[[str], list[Any]]:
    """An argparse ``type=`` that parses ``"a,b,c"`` into a list of ``kind``."""

    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    """The ``fused-sam`` parser: the ``demo``, ``bench`` and ``info`` subcommands, every option."""
    from fused_sam.cli import demo as demo_mod
    from fused_sam.cli.bench.params import PARAM_SETS
    from fused_sam.cli.data import DATASETS
    from fused_sam.cli.demo import DEFAULT_METHODS, METHODS, DemoConfig

    parser = argparse.ArgumentParser(
        prog="fused-sam",
        description="Sharpness-Aware Minimization in a few fused launches: demo, bench, info.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    defaults = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="SGD vs SAM vs ASAM under label noise (scikit-learn digits, no download)",
        description=(
            "Reproduce SAM's robustness to label noise: symmetric noise on the training labels, "
            "a small CNN with BatchNorm, every method with the same schedule over several seeds. "
            "Prints a table and writes results.json and demo.png."
        ),
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"{demo_mod.QUICK_OVERRIDES['epochs']} epochs and seeds 0,1 "
            "(under 2 min on 2 CPU cores)"
        ),
    )
    demo.add_argument(
        "--data", choices=DATASETS, default=defaults.data, help="data set (default: digits)"
    )
    demo.add_argument(
        "--data-dir", help="folder with the CIFAR python batches (--data cifar10/cifar100)"
    )
    demo.add_argument(
        "--noise",
        type=float,
        default=defaults.noise,
        help="fraction of training labels made wrong (default: 0.4)",
    )
    demo.add_argument(
        "--seeds",
        type=_csv(int),
        help="comma-separated seeds (default: 0,1,2; --quick: 0,1)",
    )
    demo.add_argument(
        "--epochs",
        type=int,
        help=f"epochs (default: {defaults.epochs}; --quick: {demo_mod.QUICK_OVERRIDES['epochs']})",
    )
    demo.add_argument(
        "--methods",
        type=_csv(str),
        default=list(DEFAULT_METHODS),
        help=f"comma-separated, from: {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    demo.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="mini-batch size (default: 32)"
    )
    demo.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help=f"peak learning rate, cosine to 0 (default: {defaults.lr})",
    )
    demo.add_argument(
        "--rho-sam",
        type=float,
        default=defaults.rho_sam,
        help=f"SAM's rho (default: {defaults.rho_sam})",
    )
    demo.add_argument(
        "--rho-asam",
        type=float,
        default=defaults.rho_asam,
        help=f"ASAM's rho (default: {defaults.rho_asam})",
    )
    demo.add_argument(
        "--rho-msam",
        type=float,
        default=defaults.rho_msam,
        help=f"Momentum-SAM's rho (default: {defaults.rho_msam})",
    )
    demo.add_argument(
        "--keep-esam",
        type=float,
        default=defaults.keep_esam,
        help=f"ESAM's probability of perturbing an entry (default: {defaults.keep_esam})",
    )
    demo.add_argument("--subset", type=int, help="train on the first N training examples only")
    demo.add_argument(
        "--validation",
        action="store_true",
        help=(
            "evaluate on 20%% of the noisy training split instead of the test split "
            "(how to choose hyperparameters)"
        ),
    )
    demo.add_argument(
        "--device",
        default=_default_device(),
        help="torch device (default: cuda if available, else cpu)",
    )
    demo.add_argument("--backend", help="FusedSAM backend (default: the fastest available)")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1: the model is too small for intra-op threads to pay)",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("fused_sam_out"),
        help="output folder (default: fused_sam_out)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    bench = sub.add_parser(
        "bench",
        help="optimizer-side cost of SAM vs SGD/AdamW per backend (or --e2e training steps)",
        description=(
            "Time one SAM step (first_step + second_step, gradients pre-filled) for the "
            "per-tensor-loop SAM, FusedSAM on every usable backend, and plain SGD/AdamW, on the "
            "same parameters; or, with --e2e, whole training steps of a small CNN: SGD, SAM and "
            "each variant (every 5, LookSAM, F-SAM, GSAM, Momentum-SAM) with its ratio to SGD; "
            "or, with --variants, the gradient math of LookSAM, F-SAM and GSAM per backend."
        ),
    )
    what = bench.add_mutually_exclusive_group()
    what.add_argument(
        "--params", choices=list(PARAM_SETS), help="synthesised parameter set (default: resnet18)"
    )
    what.add_argument(
        "--sizes", type=_csv(int), help="custom tensor sizes (numels), comma-separated"
    )
    what.add_argument("--model", help="a user model as module:factory (called with no arguments)")
    bench.add_argument(
        "--base",
        choices=["sgd", "adamw"],
        default="sgd",
        help="base optimizer of SAM (default: sgd, momentum 0.9)",
    )
    bench.add_argument(
        "--device", default=_default_device(), help="torch device (default: cuda if available)"
    )
    bench.add_argument(
        "--repeat",
        type=int,
        help="timed steps per provider (default: 50 GPU, 20 CPU; --e2e: samples of 5 steps)",
    )
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    bench.add_argument(
        "--reference", action="store_true", help="also time the slow float64 reference backend"
    )
    bench.add_argument(
        "--sparsity",
        type=float,
        default=0.0,
        help="also time each backend with a Sparse SAM mask of this sparsity (e.g. 0.5)",
    )
    bench.add_argument(
        "--e2e",
        action="store_true",
        help="time whole training steps (forward+backward) of SGD, SAM and the variants instead",
    )
    bench.add_argument(
        "--variants",
        action="store_true",
        help="time the gradient math of LookSAM, F-SAM and GSAM per backend instead",
    )
    bench.add_argument(
        "--batch-size", type=int, default=128, help="--e2e batch size (default: 128)"
    )
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.add_argument(
        "--quick", action="store_true", help="tiny parameter set and few repeats (for tests)"
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("fused_sam_out/bench.json"),
        help="results file, .json or .csv (default: fused_sam_out/bench.json)",
    )

    info = sub.add_parser(
        "info", help="versions, devices, available backends and why not the others"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser
