"""Run the curated mutants (``mutation/mutants.py``) against the tests, one at a time.

Each mutant is applied to a copy of the working tree (never to the checkout itself), the
tests it names run against that copy with ``-x`` (the first failure kills it), and the file
is put back. A mutant that no test kills *survived*: a bug of that kind would pass the
suite, so a test is missing. Before any mutant, the same tests run once on the unmutated copy
and must pass.

    python mutation/run.py                         # every mutant this machine can run
    python mutation/run.py --kinds python,triton,cuda_host   # no rebuild (what CI runs)
    python mutation/run.py --ids cpp-perturb-sign  # one mutant
    python mutation/run.py --check                 # only check that every mutant applies

``cpp`` mutants rebuild the CPU extension in the copy (the first one builds it whole, later
ones incrementally); ``cuda`` mutants need a CUDA GPU and a CUDA build and are reported as not
run elsewhere; ``cuda_host`` mutants (the CUDA kernels' shared math and indexing) are killed on
the CPU by tests/test_cuda_host.py, which compiles the host build from the copy itself. Exit
status: 0 when every mutant that ran was killed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("python", "triton", "cpp", "cuda", "cuda_host")


def _apply(text: str, m: Mutant) -> str:
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutant {m.id}: expected 1 occurrence in {m.path}, found {count}")
    return text.replace(m.old, m.new)


def _copy_tree(dest: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files, plus the built extension."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for so in (ROOT / "fused_sam").glob("_C*.so"):
        shutil.copy2(so, dest / "fused_sam" / so.name)


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _pytest(tree: Path, tests: tuple[str, ...], timeout: float, extra: list[str]) -> str:
    """``"passed"``, ``"failed"`` (a test failed or the run crashed) or ``"timeout"``."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *tests]
    try:
        res = subprocess.run(
            cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    return "passed" if res.returncode == 0 else "failed"


def _build(tree: Path) -> None:
    res = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tree, env=_env(tree), capture_output=True, text=True,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(res.stdout[-2000:] + res.stderr[-2000:])


def _gpu_ready() -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated mutant kinds")
    parser.add_argument("--ids", default="", help="comma-separated mutant ids (default: all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    parser.add_argument("--check", action="store_true", help="only check that mutants apply")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    kinds = set(args.kinds.split(","))
    ids = set(filter(None, args.ids.split(",")))
    chosen = [m for m in MUTANTS if m.kind in kinds and (not ids or m.id in ids)]
    for m in MUTANTS:
        _apply((ROOT / m.path).read_text(), m)  # every mutant must still apply
    if args.check:
        print(f"{len(MUTANTS)} mutants apply")
        return 0
    gpu = _gpu_ready()
    results: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="fused_sam_mutation_") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        probe = subprocess.run(
            [sys.executable, "-c", "import fused_sam; print(fused_sam.__file__)"],
            cwd=tree, env=_env(tree), capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        if not probe.startswith(str(tree)):
            raise SystemExit(f"the copy does not shadow the installed package: {probe}")
        if any(m.kind == "cpp" for m in chosen):
            _build(tree)
        # The unmutated copy must pass every test the mutants use (one run over them all).
        cpu_tests = tuple(sorted({t for m in chosen if m.kind != "cuda" for t in m.tests}))
        print(f"baseline: {len(cpu_tests)} test files on the unmutated copy", flush=True)
        baseline = _pytest(tree, cpu_tests, args.timeout, []) if cpu_tests else "passed"
        if baseline == "timeout":
            raise SystemExit(
                f"the unmutated tree ran past --timeout {args.timeout:.0f} s on "
                f"{' '.join(cpu_tests)}: raise --timeout (a loaded machine is slower)"
            )
        if baseline != "passed":
            raise SystemExit(f"the unmutated tree fails {' '.join(cpu_tests)}: fix that first")
        gpu_tests = tuple(sorted({t for m in chosen if m.kind == "cuda" for t in m.tests}))
        if gpu and gpu_tests and _pytest(tree, gpu_tests, args.timeout, ["-m", "gpu"]) != "passed":
            raise SystemExit(f"the unmutated tree fails -m gpu {' '.join(gpu_tests)}")
        for m in chosen:
            if m.kind == "cuda" and not gpu:
                results.append({"id": m.id, "kind": m.kind, "result": "not run (no GPU)"})
                print(f"{m.id:36s} not run (no GPU)", flush=True)
                continue
            path = tree / m.path
            original = path.read_text()
            path.write_text(_apply(original, m))
            start = time.monotonic()
            try:
                if m.kind in ("cpp", "cuda"):
                    _build(tree)
                extra = ["-m", "gpu"] if m.kind == "cuda" else []
                outcome = _pytest(tree, m.tests, args.timeout, extra)
            except RuntimeError:
                outcome = "failed"  # does not build: the compiler kills it
            finally:
                path.write_text(original)
                if m.kind in ("cpp", "cuda"):
                    _build(tree)
            result = "survived" if outcome == "passed" else f"killed ({outcome})"
            secs = time.monotonic() - start
            results.append({"id": m.id, "kind": m.kind, "result": result, "why": m.why})
            print(f"{m.id:36s} {result:18s} {secs:6.1f} s  {m.why}", flush=True)
    survived = [r for r in results if r["result"] == "survived"]
    ran = [r for r in results if not r["result"].startswith("not run")]
    print(f"\n{len(ran) - len(survived)} of {len(ran)} mutants killed; survived: "
          f"{', '.join(r['id'] for r in survived) or 'none'}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
