"""``python -m fused_sam`` / ``fused-sam``: command-line entry point.

Subcommands:

* ``demo``: SGD vs SAM vs ASAM under label noise on scikit-learn's digits (or a local CIFAR).
* ``bench``: optimizer-side cost of SAM against SGD/AdamW per backend, or whole training steps.
* ``info``: versions, devices, available backends and why not the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fused_sam.info import collect_info, format_info


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


def _build_parser() -> argparse.ArgumentParser:
    from fused_sam import demo as demo_mod
    from fused_sam.bench import PARAM_SETS
    from fused_sam.data import DATASETS
    from fused_sam.demo import DEFAULT_METHODS, METHODS, DemoConfig

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


# ---------------------------------------------------------------------------------------------
# demo


def _run_demo(args: argparse.Namespace) -> int:
    from fused_sam import demo

    demo.require("matplotlib")  # fail before training, not after, when an extra is missing
    progress_mod = demo.require("rich.progress")
    base = demo.QUICK_OVERRIDES if args.quick else {}
    defaults = demo.DemoConfig(**base)
    epochs = args.epochs if args.epochs is not None else defaults.epochs
    seeds = args.seeds if args.seeds is not None else defaults.seeds
    cfg = demo.DemoConfig(
        data=args.data,
        data_dir=args.data_dir,
        noise=args.noise,
        methods=args.methods,
        seeds=seeds,
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        rho_sam=args.rho_sam,
        rho_asam=args.rho_asam,
        rho_msam=args.rho_msam,
        keep_esam=args.keep_esam,
        subset=args.subset,
        validation=args.validation,
        device=args.device,
        backend=args.backend,
    )
    demo.validate_config(cfg)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    console = _console()
    total = len(cfg.methods) * len(cfg.seeds) * cfg.epochs
    start = time.perf_counter()
    with progress_mod.Progress(
        progress_mod.TextColumn("{task.description}"),
        progress_mod.BarColumn(),
        progress_mod.MofNCompleteColumn(),
        progress_mod.TimeElapsedColumn(),
        progress_mod.TimeRemainingColumn(),
        console=console,
        disable=args.no_progress,
    ) as bar:
        task = bar.add_task("training", total=total)

        latest: dict[str, float] = {}

        def progress(method: str, seed: int, epoch: int, acc: float) -> None:
            latest[demo.METHODS[method].label] = acc
            accs = "  ".join(f"{label} {a:5.1f}" for label, a in latest.items())
            desc = f"seed {seed} epoch {epoch + 1:>3}/{cfg.epochs}  acc %: {accs}"
            bar.update(task, advance=1, description=desc)

        results = demo.run_demo(cfg, progress)
    results["wall_seconds"] = time.perf_counter() - start
    paths = demo.write_outputs(results, args.out)
    console.print(demo.format_table(results))
    console.print(
        f"wall time {results['wall_seconds']:.0f} s; wrote {paths['json']} and {paths['plot']}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# bench


def _bench_shapes(args: argparse.Namespace) -> tuple[str, list[tuple[int, ...]]]:
    from fused_sam import bench

    preset = args.params or (
        None if args.sizes or args.model else ("tiny" if args.quick else "resnet18")
    )
    return bench.param_shapes(preset, args.sizes, args.model)


def _run_bench(args: argparse.Namespace) -> int:
    from fused_sam import bench

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA device")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    repeat = args.repeat
    if repeat is None:
        repeat = 3 if args.quick else 50 if device.type == "cuda" else 20
    warmup = 1 if args.quick else args.warmup
    if repeat < 1 or warmup < 0:
        raise ValueError("--repeat must be >= 1 and --warmup >= 0")
    if not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    results = bench.metadata(device)
    say = (
        (lambda name: print(f"  timing {name} ...", file=sys.stderr))
        if sys.stderr.isatty()
        else None
    )
    if args.e2e and args.variants:
        raise ValueError("--e2e and --variants are two modes: give one")
    results["command"] = "fused-sam " + " ".join(args.argv)
    mode = "e2e" if args.e2e else "variants" if args.variants else "optimizer"

    def on_row(partial: dict) -> None:
        # The file is rewritten after every row: a run stopped by a deadline keeps its rows.
        results[mode] = partial
        bench.write_results(results, args.out)

    if args.e2e:
        if args.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 (BatchNorm), got {args.batch_size}")
        size = (8, 16) if args.quick else (args.batch_size, 64)
        res = bench.bench_e2e(
            device,
            batch_size=size[0],
            width=size[1],
            repeat=repeat,
            warmup=warmup,
            progress=say,
            on_row=on_row,
        )
        results["e2e"] = res
        title = (
            f"end to end: {res['model']}, batch {res['batch_size']}, on {results['device_name']}"
        )
        table = bench.e2e_table(res)
    elif args.variants:
        desc, shapes = _bench_shapes(args)
        res = bench.bench_variants(shapes, device, repeat, warmup, progress=say, on_row=on_row)
        res["param_set"] = desc
        results["variants"] = res
        title = (
            f"variant hooks, {desc}: {res['numel']:,} params in {res['tensors']} tensors, on "
            f"{results['device_name']}; copy bandwidth {res['copy_bandwidth_gbps']:.1f} GB/s"
        )
        table = bench.variants_table(res)
    else:
        desc, shapes = _bench_shapes(args)
        res = bench.bench_optimizer(
            shapes,
            device,
            args.base,
            repeat,
            warmup,
            include_reference=args.reference,
            progress=say,
            sparsity=args.sparsity,
            on_row=on_row,
        )
        res["param_set"] = desc
        results["optimizer"] = res
        title = (
            f"optimizer side, {desc}: {res['numel']:,} params in {res['tensors']} tensors, base "
            f"{args.base}, on {results['device_name']}; copy bandwidth "
            f"{res['copy_bandwidth_gbps']:.1f} GB/s"
        )
        table = bench.optimizer_table(res)
    bench.write_results(results, args.out)
    _print_table(title, table)
    print(f"wrote {args.out}")
    return 0


def _console() -> Any:
    """A rich console; at least 120 columns wide when writing to a file or pipe.

    Rich falls back to 80 columns off a terminal, which would wrap the tables in logs.
    """
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 120))


def _print_table(title: str, table: tuple[list[str], list[list[str]]]) -> None:
    try:
        from rich.markup import escape
        from rich.table import Table
    except ImportError:  # rich is optional for bench: plain Markdown reads fine too
        from fused_sam.bench import markdown

        print(f"{title}\n\n{markdown(table)}")
        return
    console = _console()
    rich_table = Table(title=escape(title))
    headers, rows = table
    for i, header in enumerate(headers):
        rich_table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        rich_table.add_row(*map(escape, row))  # "FusedSAM[foreach]" is not markup
    console.print(rich_table)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        if args.command == "info":
            print(json.dumps(collect_info(), indent=1) if args.json else format_info())
            return 0
        if args.command == "demo":
            return _run_demo(args)
        return _run_bench(args)
    except (ValueError, ImportError, RuntimeError) as exc:
        # Bad arguments, missing optional dependencies and unreadable data end with one
        # readable line and exit status 2 (argparse's own code for usage errors).
        parser.exit(2, f"fused-sam {args.command}: error: {exc}\n")
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


if __name__ == "__main__":
    sys.exit(main())
