"""Environment report: versions, devices, backends (and why the unavailable ones are)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path

import torch

import fused_sam
from fused_sam.backends.native import build_info as native_build_info
from fused_sam.functional import available_backends

#: Optional distributions worth reporting: the demo extra and the benchmark plugin.
_OPTIONAL = ("numpy", "scikit-learn", "matplotlib", "rich", "pytest-benchmark")


def _version(dist: str) -> str | None:
    # Package metadata, not an import: cheap, and a broken optional package cannot crash info.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _build() -> dict[str, object]:
    """Where the package lives and what was compiled into it."""
    spec = importlib.util.find_spec("fused_sam._C")
    package_dir = Path(fused_sam.__file__).resolve().parent
    git_dir = package_dir.parent / ".git"
    return {
        "package_dir": str(package_dir),
        "source_checkout": git_dir.exists(),  # an editable install from a git clone
        "native_extension": spec.origin if spec is not None else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_cuda_arch_list": torch.cuda.get_arch_list() if torch.cuda.is_available() else [],
        "env": {
            k: os.environ[k]
            for k in ("FUSED_SAM_NO_NATIVE", "FUSED_SAM_CUDA", "TORCH_CUDA_ARCH_LIST")
            if k in os.environ
        },
    }


def collect_info() -> dict[str, object]:
    """Everything ``fused-sam info`` prints, as a dict (also stored in benchmark results)."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return {
        "fused_sam": fused_sam.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "native": native_build_info(),
        "backends": {dev: available_backends(dev) for dev in devices},
        "build": _build(),
        "optional": {name: _version(name) for name in _OPTIONAL},
    }


def format_info() -> str:
    """Human-readable version of :func:`collect_info`."""
    info = collect_info()
    build: dict = info["build"]  # type: ignore[assignment]
    optional: dict = info["optional"]  # type: ignore[assignment]
    lines = [
        f"fused_sam {info['fused_sam']} ({build['package_dir']})",
        f"python    {info['python']} ({info['platform']})",
        f"torch     {info['torch']} (CUDA {info['torch_cuda'] or 'none'}, "
        f"CPU capability {build['torch_cpu_capability']})",
        f"triton    {info['triton'] or 'not installed'}",
        f"cpus      {info['cpu_count']} logical, torch uses {info['torch_threads']} threads",
        f"gpus      {', '.join(info['gpus']) or 'none'}",
        f"native    {info['native']} ({build['native_extension'] or 'no extension file'})",
    ]
    if build["torch_cuda_arch_list"]:
        lines.append(f"cuda arch {' '.join(build['torch_cuda_arch_list'])}")
    if build["env"]:
        lines.append("build env " + " ".join(f"{k}={v}" for k, v in build["env"].items()))
    lines.append("optional  " + ", ".join(f"{k} {v or 'missing'}" for k, v in optional.items()))
    for device, backends in info["backends"].items():  # type: ignore[union-attr]
        lines.append(f"backends on {device}:")
        for name, reason in backends.items():
            lines.append(f"  {name:<10} {'available' if reason is None else 'no: ' + reason}")
    return "\n".join(lines)
