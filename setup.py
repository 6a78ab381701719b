"""Build script for the optional native extension ``fused_sam._C``.

All metadata lives in pyproject.toml; this file only decides which extension to build:

* the C++ CPU kernels whenever ``csrc/`` has sources (skip with ``FUSED_SAM_NO_NATIVE=1`` for a
  pure-Python install: the ``foreach`` and ``reference`` backends need no compiler);
* the CUDA kernels as well when torch has CUDA, ``nvcc`` of the same major version is found and
  a GPU is visible (or ``TORCH_CUDA_ARCH_LIST`` is set), or when forced with ``FUSED_SAM_CUDA=1``
  (set ``TORCH_CUDA_ARCH_LIST``, e.g. ``9.0``, when no GPU is visible); ``FUSED_SAM_CUDA=0``
  disables them.

``MAX_JOBS`` limits ninja's parallel compile jobs. Build with
``pip install --no-build-isolation .`` so the extension links against the installed torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower()


def _nvcc_release() -> str | None:
    """``"13.0"`` from ``nvcc --version``, or None when nvcc is missing or says nothing usable."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else None


def _want_cuda(torch_cuda: str | None, gpu_visible: bool) -> bool:
    forced = _flag("FUSED_SAM_CUDA")
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        if torch_cuda is None:
            raise RuntimeError("FUSED_SAM_CUDA=1 needs a CUDA build of torch; this one has none")
        if not gpu_visible and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            raise RuntimeError("FUSED_SAM_CUDA=1 with no GPU visible: set TORCH_CUDA_ARCH_LIST")
        return True
    # Automatic: only when it can work without further settings, so that a plain install on a
    # machine with a CUDA torch but a mismatched or absent toolkit still gets the CPU kernels.
    nvcc = _nvcc_release()
    if torch_cuda is None or nvcc is None:
        return False
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        print(
            f"fused_sam: skipping the CUDA kernels: nvcc {nvcc} does not match torch's CUDA "
            f"{torch_cuda} (install a matching toolkit, or force with FUSED_SAM_CUDA=1)"
        )
        return False
    return gpu_visible or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))


def _extensions() -> tuple[list, dict]:
    if _flag("FUSED_SAM_NO_NATIVE") in ("1", "true", "yes", "on"):
        return [], {}
    cpp = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No FMA contraction: results must not depend on the compiler or the -march of a build.
    cxx = ["-O3", "-ffp-contract=off"]
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
    if cuda_sources and _want_cuda(torch.version.cuda, torch.cuda.is_available()):
        ext = CUDAExtension(
            "fused_sam._C",
            cpp + cuda_sources,
            include_dirs=[str(CSRC)],
            define_macros=[("FUSED_SAM_WITH_CUDA", "1")],
            # --fmad=false: no contracted multiply-adds, like -ffp-contract=off for the C++.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
        )
    else:
        ext = CppExtension("fused_sam._C", cpp, include_dirs=[str(CSRC)], extra_compile_args=cxx)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
