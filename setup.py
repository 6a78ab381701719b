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
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# Sources compiled with their own instruction-set flags: name suffix -> (flags, macro). Each is
# compiled alone and linked after every other object (see _build_ext_class).
_ISA_SOURCES = {"_avx2.cpp": (["-mavx2", "-mfma", "-mf16c"], "FUSED_SAM_CPU_AVX2")}


def _isa_builds() -> bool:
    """Whether to compile the x86-64 AVX2 kernels (x86-64 with a GCC-compatible compiler)."""
    if _flag("FUSED_SAM_NO_AVX2") in ("1", "true", "yes", "on"):
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and os.name == "posix"


def _openmp(torch: object) -> bool:
    """Whether torch runs at::parallel_for on OpenMP here and the compiler takes -fopenmp."""
    if _flag("FUSED_SAM_NO_OPENMP") in ("1", "true", "yes", "on"):
        return False
    info = torch._C._parallel_info()  # type: ignore[attr-defined]
    return "parallel backend: OpenMP" in info and sys.platform.startswith("linux")


def _build_ext_class(base: type) -> type:
    """``base`` (torch's BuildExtension) that also compiles each extension's ``isa_sources``.

    An ISA source is compiled with the extension's own flags plus its instruction-set flags, and
    its object is appended to ``extra_objects``, which the linker reads after the regular objects.
    That order matters: an inline function that the ISA object shares with the portable objects
    (a c10 header function, say) is kept from the first object that defines it, so the copy that
    may hold AVX2 instructions is never the one that portable code calls.
    """

    class BuildExt(base):  # type: ignore[misc, valid-type]
        def build_extension(self, ext: Any) -> None:
            for source, flags in getattr(ext, "isa_sources", []):
                args = ext.extra_compile_args
                cxx = list(args.get("cxx", []) if isinstance(args, dict) else args)
                objects = self.compiler.compile(
                    [source],
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    extra_postargs=cxx + flags,
                    depends=ext.depends,
                )
                ext.extra_objects = [*ext.extra_objects, *objects]
            super().build_extension(ext)

    return BuildExt


def _extensions() -> tuple[list, dict]:
    if _flag("FUSED_SAM_NO_NATIVE") in ("1", "true", "yes", "on"):
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    if not sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp = [s for s in sources if not s.endswith(tuple(_ISA_SOURCES))]
    isa = [
        (s, _ISA_SOURCES[suffix])
        for s in sources
        for suffix in _ISA_SOURCES
        if s.endswith(suffix) and _isa_builds()
    ]
    macros = [(macro, "1") for _, (_, macro) in isa]
    # No FMA contraction: results must not depend on the compiler or the -march of a build.
    cxx = ["-O3", "-ffp-contract=off"]
    link: list[str] = []
    if _openmp(torch):
        # at::parallel_for is a header template that runs `#pragma omp parallel` in the caller's
        # object: without -fopenmp the pragma is ignored and every CPU op runs on one thread.
        # The libgomp this links resolves to the one torch has already loaded (same soname).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
    if cuda_sources and _want_cuda(torch.version.cuda, torch.cuda.is_available()):
        ext = CUDAExtension(
            "fused_sam._C",
            cpp + cuda_sources,
            include_dirs=[str(CSRC)],
            define_macros=[("FUSED_SAM_WITH_CUDA", "1"), *macros],
            # --fmad=false: no contracted multiply-adds, like -ffp-contract=off for the C++.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "fused_sam._C",
            cpp,
            include_dirs=[str(CSRC)],
            define_macros=macros,
            extra_compile_args=cxx,
            extra_link_args=link,
        )
    ext.isa_sources = [(s, flags) for s, (flags, _) in isa]
    ext.depends = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.[hi]*"))
    build_ext = _build_ext_class(BuildExtension.with_options(use_ninja=True))
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
