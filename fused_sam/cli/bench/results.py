"""Result files and tables of ``fused-sam bench``: metadata (date, device, versions, git sha),
JSON/CSV writing, and the tables printed after a run.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fused_sam.cli.bench.params import Shape

__all__ = ["GIT_SHA_ENV", "git_sha", "markdown", "metadata", "write_results"]


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
    from fused_sam.cli.info import collect_info

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "git_sha": git_sha(),
        "environment": collect_info(),
    }


def summary(
    shapes: Sequence[Shape],
    device: torch.device,
    bandwidth: float,
    rows: list[dict[str, Any]],
    **meanings: str,
) -> dict[str, Any]:
    """The result of an optimizer-side or variants run: its rows and what they were measured
    against; ``meanings`` adds keys that say what further columns count."""
    return {
        "numel": sum(math.prod(s) for s in shapes),
        "tensors": len(shapes),
        "copy_bandwidth_gbps": bandwidth,
        "ops_meaning": "CUDA kernel launches"
        if device.type == "cuda"
        else "top-level ATen ops (CPU)",
        **meanings,
        "rows": rows,
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
    headers += [f"{res['ops_meaning']} / step"]
    # Results recorded before the dispatched-op count existed have no such column.
    dispatched = all("dispatched_ops_per_step" in r for r in res["rows"])
    headers += ["dispatched ops / step"] if dispatched else []
    headers += ["ratio to base"]
    rows = []
    for r in res["rows"]:
        ratio = "-" if r["ratio_to_base"] is None else f"{r['ratio_to_base']:.2f}x"
        row = [
            r["provider"],
            f"{r['median_ms']:.3f}",
            f"{r['gbps_at_floor_bytes']:.1f}",
            f"{r['pct_of_floor']:.1f}",
            str(r["ops_per_step"]),
        ]
        row += [str(r["dispatched_ops_per_step"])] if dispatched else []
        rows.append([*row, ratio])
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
