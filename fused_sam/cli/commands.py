"""The ``fused-sam`` commands: parse the arguments, run the chosen subcommand, print its table.

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
from typing import Any

import torch

from fused_sam.cli.info import collect_info, format_info
from fused_sam.cli.parser import build_parser

# ---------------------------------------------------------------------------------------------
# demo


def _run_demo(args: argparse.Namespace) -> int:
    from fused_sam.cli import demo

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
    from fused_sam.cli import bench

    preset = args.params or (
        None if args.sizes or args.model else ("tiny" if args.quick else "resnet18")
    )
    return bench.param_shapes(preset, args.sizes, args.model)


def _run_bench(args: argparse.Namespace) -> int:
    from fused_sam.cli import bench

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

    note = None  # what a column counts, printed under the table
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
        note = res["dispatched_ops_meaning"]
    bench.write_results(results, args.out)
    _print_table(title, table, note)
    print(f"wrote {args.out}")
    return 0


def _console() -> Any:
    """A rich console; at least 120 columns wide when writing to a file or pipe.

    Rich falls back to 80 columns off a terminal, which would wrap the tables in logs.
    """
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 120))


def _print_table(
    title: str, table: tuple[list[str], list[list[str]]], note: str | None = None
) -> None:
    """Print ``table`` (rich if installed, else Markdown) under ``title``, ``note`` below it."""
    try:
        from rich.markup import escape
        from rich.table import Table
    except ImportError:  # rich is optional for bench: plain Markdown reads fine too
        from fused_sam.cli.bench import markdown

        print(f"{title}\n\n{markdown(table)}" + (f"\n\n{note}" if note else ""))
        return
    console = _console()
    rich_table = Table(title=escape(title))
    headers, rows = table
    for i, header in enumerate(headers):
        rich_table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        rich_table.add_row(*map(escape, row))  # "FusedSAM[foreach]" is not markup
    console.print(rich_table)
    if note:
        console.print(escape(note))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit status."""
    parser = build_parser()
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
