"""Environment report: versions, devices, backends (and why the unavailable ones are)."""

from __future__ import annotations

import platform

import torch

import fused_sam
from fused_sam.backends.native import build_info as native_build_info
from fused_sam.functional import available_backends


def collect_info() -> dict[str, object]:
    """Everything ``fused-sam info`` prints, as a dict (also stored in benchmark results)."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return {
        "fused_sam": fused_sam.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "native": native_build_info(),
        "backends": {dev: available_backends(dev) for dev in devices},
    }


def format_info() -> str:
    """Human-readable version of :func:`collect_info`."""
    info = collect_info()
    lines = [
        f"fused_sam {info['fused_sam']}",
        f"python    {info['python']} ({info['platform']})",
        f"torch     {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"triton    {info['triton'] or 'not installed'}",
        f"gpus      {', '.join(info['gpus']) or 'none'}",
        f"native    {info['native']}",
    ]
    for device, backends in info["backends"].items():  # type: ignore[union-attr]
        lines.append(f"backends on {device}:")
        for name, reason in backends.items():
            lines.append(f"  {name:<10} {'available' if reason is None else 'no: ' + reason}")
    return "\n".join(lines)
