"""The build switches of setup.py, checked on the configuration they produce (no compile).

setup.py is run in a subprocess with ``setuptools.setup`` replaced by a recorder, so each
switch is checked for what it does to the extension: present or not, the AVX2 kernel build,
``-fopenmp``. (CI compiles the default configuration for real.)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

_RECORD = """
import json, runpy, setuptools
seen = {}
def record(**kw):
    exts = kw.get("ext_modules") or []
    seen["exts"] = [
        {"name": e.name, "cxx": e.extra_compile_args if isinstance(e.extra_compile_args, list)
            else e.extra_compile_args.get("cxx", []),
         "macros": [m for m, _ in e.define_macros], "isa": [s for s, _ in e.isa_sources]}
        for e in exts
    ]
setuptools.setup = record
runpy.run_path("setup.py", run_name="__main__")
print(json.dumps(seen))
"""


def _config(**env: str) -> list[dict]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_SAM_")}
    full.update(env)
    out = subprocess.run(
        [sys.executable, "-c", _RECORD], cwd=ROOT, env=full, capture_output=True, text=True,
        timeout=120, check=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])["exts"]


def test_no_native_builds_nothing() -> None:
    assert _config(FUSED_SAM_NO_NATIVE="1") == []


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 build exists on x86-64 only"
)
def test_default_and_switches() -> None:
    (ext,) = _config()
    assert ext["name"] == "fused_sam._C"
    assert any(s.endswith("kernels_avx2.cpp") for s in ext["isa"])
    assert "FUSED_SAM_CPU_AVX2" in ext["macros"]
    openmp = torch.__config__.parallel_info().find("OpenMP") >= 0 and sys.platform == "linux"
    assert ("-fopenmp" in ext["cxx"]) == openmp
    assert "-ffp-contract=off" in ext["cxx"]

    (no_avx2,) = _config(FUSED_SAM_NO_AVX2="1")
    assert no_avx2["isa"] == [] and "FUSED_SAM_CPU_AVX2" not in no_avx2["macros"]
    (no_omp,) = _config(FUSED_SAM_NO_OPENMP="1")
    assert "-fopenmp" not in no_omp["cxx"]
