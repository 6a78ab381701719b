"""``benchmarks/gpu_session.sh``, the one-call script of a lent GPU session, checked on the CPU.

A GPU is lent rarely and for minutes, so the script must not rot in between: its ``--dry-run``
runs every step on the CPU at tiny sizes (Triton interpreted, the gpu tests collected, the
CUDA-only steps skipped with the reason printed), and the result files, the git sha passed in,
the file count the GPU machine returns (8 at most) and the deadline clamping are checked here.
The results files' row-by-row writing is checked in ``test_cli.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
SHA = "0123456789abcdef0123456789abcdef01234567"
#: What a session returns; the GPU machine brings back at most 8 files.
FILES = {
    "session.log",
    "pytest.log",
    "bench.log",
    "bench-resnet50.json",
    "cuda-graphs.json",
    "variants-resnet50.json",
    "bench-full.json",
}

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="the session script needs bash and coreutils' timeout",
)


def _run(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("FUSED_SAM_GIT_SHA", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args, str(out)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("session")
    return _run(out, "--dry-run", "--sha", SHA), out


def test_dry_run_runs_every_step(dry_run) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "session.log").read_text()
    for name in ("facts", "info", "tests", "timm", "resnet50", "variants", "full"):
        assert f"[{name}] rc=0" in log, (name, log[-3000:])
    # The CUDA-only steps say why they did not run.
    assert "[build] skipped: dry run: the CUDA build needs nvcc" in log
    assert "[graphs] skipped: dry run: CUDA graph capture needs a CUDA device" in log
    # The gpu tests were collected with the session's pytest command line (xdist included).
    pytest_log = (out / "pytest.log").read_text()
    assert "-m gpu -n 8" in pytest_log and "--durations=30" in pytest_log
    assert "tests collected" in pytest_log and "ERROR" not in pytest_log
    # The summary comes last, so the end of the GPU call's output says what happened.
    assert proc.stdout.rstrip().splitlines()[-1].lstrip().startswith("files:")


def test_dry_run_results_carry_the_sha_and_rows(dry_run) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    for name in ("bench-resnet50.json", "bench-full.json"):
        record = json.loads((out / name).read_text())
        assert record["git_sha"] == SHA and record["device"] == "cpu", name
        assert record["optimizer"] and all(r["rows"] for r in record["optimizer"]), name
    full = json.loads((out / "bench-full.json").read_text())
    assert {r["base"] for r in full["optimizer"] for r in r["rows"]} >= {"sgd", "adamw"}
    assert full["e2e"]["rows"]
    variants = json.loads((out / "variants-resnet50.json").read_text())
    assert variants["git_sha"] == SHA
    providers = {r["provider"] for r in variants["variants"]["rows"]}
    assert "triton" in providers  # the interpreted Triton kernels ran
    assert f"git sha: {SHA}" in (out / "session.log").read_text()


def test_dry_run_returns_at_most_eight_files(dry_run) -> None:
    _, out = dry_run
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert files <= FILES and len(FILES) <= 8, files - FILES
    assert files == FILES - {"cuda-graphs.json"}  # the one CUDA-only result


def test_steps_are_clamped_to_the_budget(tmp_path) -> None:
    """With 19 s of budget, a step gets only what is left (its own limit is 30 s or more) and
    the steps after it are skipped with the reason, instead of running past the deadline."""
    proc = _run(tmp_path, "--dry-run", "--budget", "19", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "session.log").read_text()
    started = re.findall(r"^\[(\w+)\] \$ .* \(limit (\d+)s, (\d+)s left\)$", log, re.M)
    assert started and started[0][0] == "facts", log
    assert all(limit == left and int(left) <= 11 for _, limit, left in started), started
    for name in ("resnet50", "variants", "full"):
        assert f"[{name}] skipped: " in log, (name, log)
    assert "s left of the 19s budget" in log
    used = re.search(r"summary \(git sha \S+, (\d+) s of 19s\)", log)
    assert used and int(used.group(1)) <= 19, log
    # Without --sha or FUSED_SAM_GIT_SHA the sha comes from git (a checkout here).
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if git.returncode == 0:
        assert f"git sha: {git.stdout.strip()}" in log


def test_without_a_gpu_the_real_run_stops_at_once(tmp_path) -> None:
    """Not a dry run and no CUDA device: the environment check fails and nothing else runs."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run would start")
    proc = _run(tmp_path, "--sha", SHA, timeout=120)
    assert proc.returncode == 1
    log = (tmp_path / "session.log").read_text()
    assert "no CUDA device visible: on a machine without one, run with --dry-run" in log
    assert "[build]" not in log and "[tests]" not in log


def test_bad_arguments_are_refused(tmp_path) -> None:
    assert _run(tmp_path, "--budget", "soon").returncode == 2
    assert _run(tmp_path, "--frobnicate").returncode == 2
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "OUT_DIR" in proc.stderr
