"""Record a benchmark run into ``benchmarks/results/``.

Runs the optimizer-side benchmark of ``fused-sam bench`` on several parameter sets with SGD and
AdamW bases, plus the end-to-end benchmark, and writes one JSON file named
``<date>_<device>_<sha>.json`` holding the date, device, torch/triton/CUDA versions, git sha and
every number. On a GPU (the default when one is visible) steps are timed with CUDA events and
"ops" are CUDA kernel launches counted by ``torch.profiler``::

    python benchmarks/record.py                       # GPU: resnet18, resnet50, vit_b
    python benchmarks/record.py --device cpu --threads 1 --sets small1000,resnet18

``benchmarks/gpu.sh`` wraps the GPU case.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from fused_sam.cli import bench

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the results file; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", default=None, help="comma-separated parameter sets")
    parser.add_argument("--bases", default="sgd,adamw", help="comma-separated base optimizers")
    parser.add_argument("--repeat", type=int, default=None, help="timed steps per provider")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 5; e2e 3)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="end-to-end batch size")
    parser.add_argument("--width", type=int, default=64, help="end-to-end CNN width")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--sparsity", type=float, default=0.5, help="Sparse SAM rows at this sparsity (0: none)"
    )
    parser.add_argument("--note", default="", help="free text stored with the run (the machine)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/)")
    parser.add_argument(
        "--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end benchmark"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    sets = (args.sets or ("resnet18,resnet50,vit_b" if cuda else "small1000,resnet18")).split(",")
    repeat = args.repeat or (100 if cuda else 20)

    record = bench.metadata(device)
    record["note"] = args.note
    record["command"] = "python benchmarks/record.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    record["optimizer"] = []
    slug = re.sub(r"[^A-Za-z0-9]+", "-", record["device_name"].split(",")[0]).strip("-").lower()
    stamp = record["date"][:16].replace(":", "")
    out = args.out or RESULTS / f"{stamp}_{slug}_{(record['git_sha'] or 'nogit')[:8]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        # After every row: a run cut off by a deadline still leaves what it measured.
        out.write_text(json.dumps(record, indent=1) + "\n")

    write()
    for name in sets:
        desc, shapes = bench.param_shapes(name)
        for base in args.bases.split(","):
            print(f"optimizer side: {desc}, base {base}", file=sys.stderr)
            slot = len(record["optimizer"])

            def keep(res: dict, slot: int = slot, name: str = name, desc: str = desc) -> None:
                res.update(param_set=name, description=desc)
                del record["optimizer"][slot:]
                record["optimizer"].append(res)
                write()

            res = bench.bench_optimizer(
                shapes,
                device,
                base,
                repeat=repeat,
                warmup=5 if args.warmup is None else args.warmup,
                sparsity=args.sparsity,
                on_row=keep,
            )
            keep(res)
            print(bench.markdown(bench.optimizer_table(res)) + "\n", flush=True)
    if args.e2e:
        print(f"end to end, batch {args.batch_size}", file=sys.stderr)

        def keep_e2e(res: dict) -> None:
            record["e2e"] = res
            write()

        keep_e2e(
            bench.bench_e2e(
                device,
                batch_size=args.batch_size,
                width=args.width,
                repeat=repeat // 2 or 1,
                warmup=3 if args.warmup is None else args.warmup,
                on_row=keep_e2e,
            )
        )
        print(bench.markdown(bench.e2e_table(record["e2e"])), flush=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
