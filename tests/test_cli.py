"""The ``fused-sam`` command line: every subcommand in a quick mode, the CIFAR loader, errors.

Subcommands run in-process through ``main(argv)`` (one torch import for the whole file); one
test runs ``python -m fused_sam`` as a subprocess to cover the entry point itself.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fused_sam import available_backends
from fused_sam.cli import main
from fused_sam.cli.data import DataError, add_symmetric_noise, load_cifar
from fused_sam.cli.demo import DEFAULT_METHODS, METHODS, DemoConfig

ROOT = Path(__file__).resolve().parents[1]


def _numbers(obj: object) -> list[float]:
    """Every int/float inside a JSON value (bools excluded)."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def _assert_finite(obj: object) -> None:
    values = _numbers(obj)
    assert values, "no numbers found"
    assert all(math.isfinite(v) for v in values)


def _write_pickle(path: Path, obj: object) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh)


def _batch(n: int, label_key: bytes, classes: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, classes, size=n)],
    }


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 in the python-pickle layout (5 train batches of 8, a test batch of 6)."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        _write_pickle(root / f"data_batch_{i}", _batch(8, b"labels", 10, i))
    _write_pickle(root / "test_batch", _batch(6, b"labels", 10, 0))
    _write_pickle(root / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    return root


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    """A tiny CIFAR-100 in the python-pickle layout."""
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _write_pickle(root / "train", _batch(12, b"fine_labels", 100, 1))
    _write_pickle(root / "test", _batch(5, b"fine_labels", 100, 2))
    _write_pickle(root / "meta", {b"fine_label_names": [b"c%d" % i for i in range(100)]})
    return root


# ---------------------------------------------------------------------------------------------
# info


def test_info_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "backends on cpu:" in text and "foreach" in text
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["backends"]["cpu"]["foreach"] is None  # available
    assert info["backends"]["cpu"]["cuda"]  # a reason why not
    assert "native_extension" in info["build"] and "torch_cpu_capability" in info["build"]
    assert info["optional"]["matplotlib"]  # a version string


def test_entry_point_subprocess() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fused_sam", "info"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "backends on cpu:" in out.stdout


# ---------------------------------------------------------------------------------------------
# demo


def test_demo_quick_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--epochs", "2", "--seeds", "0,1", "--subset", "256", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == set(DEFAULT_METHODS)
    for name, entry in results["summary"].items():
        assert entry["label"] in printed
        assert 0.0 <= entry["acc_mean"] <= 100.0
        assert entry["step_ms"] > 0
        assert len(entry["accs"]) == 2, name
    assert results["summary"]["sgd"]["time_ratio"] == pytest.approx(1.0)
    assert len(results["runs"]) == 2 * len(DEFAULT_METHODS)
    for run in results["runs"]:
        assert len(run["eval_acc"]) == 2
    _assert_finite(results["summary"])
    _assert_finite([r["eval_acc"] for r in results["runs"]])
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_on_cifar_folder(cifar10_dir: Path, tmp_path: Path) -> None:
    argv = ["demo", "--data", "cifar10", "--data-dir", str(cifar10_dir.parent), "--epochs", "1"]
    argv += ["--seeds", "0", "--methods", "sgd,sam", "--batch-size", "8", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert list(results["summary"]) == ["sgd", "sam"]
    assert results["train_size"] == 40 and results["test_size"] == 6


def test_symmetric_noise_flips_exactly_the_rate() -> None:
    labels = torch.arange(1000) % 10
    noisy, corrupted = add_symmetric_noise(labels, 0.4, 10, torch.Generator().manual_seed(0))
    assert int(corrupted.sum()) == 400
    assert bool((noisy[corrupted] != labels[corrupted]).all())
    assert bool((noisy[~corrupted] == labels[~corrupted]).all())
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9


# ---------------------------------------------------------------------------------------------
# CIFAR loader


def test_cifar10_loader(cifar10_dir: Path) -> None:
    for where in (cifar10_dir, cifar10_dir.parent):  # the folder itself or its parent
        data = load_cifar("cifar10", where)
        assert data.x_train.shape == (40, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
        assert data.y_train.dtype == torch.int64 and data.num_classes == 10
    raw = pickle.loads((cifar10_dir / "data_batch_1").read_bytes())
    assert data.y_train[:8].tolist() == raw[b"labels"]
    # standardised with the training statistics
    assert data.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-5


def test_cifar100_loader(cifar100_dir: Path) -> None:
    data = load_cifar("cifar100", cifar100_dir)
    assert data.x_train.shape == (12, 3, 32, 32) and data.y_test.shape == (5,)
    assert data.num_classes == 100


def test_cifar_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_cifar("cifar10", tmp_path / "nope")
    with pytest.raises(DataError, match="does not look like a cifar10"):
        load_cifar("cifar10", tmp_path)


def test_cifar_malformed(cifar10_dir: Path) -> None:
    (cifar10_dir / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing file .*data_batch_3"):
        load_cifar("cifar10", cifar10_dir)
    (cifar10_dir / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a python-pickle CIFAR batch"):
        load_cifar("cifar10", cifar10_dir)
    _write_pickle(cifar10_dir / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DataError, match=r"malformed.*b'labels'"):
        load_cifar("cifar10", cifar10_dir)
    _write_pickle(
        cifar10_dir / "data_batch_3", {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}
    )
    with pytest.raises(DataError, match="uint8 of shape N x 3072"):
        load_cifar("cifar10", cifar10_dir)


# ---------------------------------------------------------------------------------------------
# bench


def test_bench_quick_optimizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--threads", "1", "--out", str(path)]) == 0
    results = json.loads(path.read_text())
    for key in ("date", "device", "device_name", "git_sha", "environment"):
        assert key in results
    res = results["optimizer"]
    names = [r["provider"] for r in res["rows"]]
    assert {"sgd (foreach)", "adamw (foreach)", "loop SAM", "FusedSAM[foreach]"} <= set(names)
    for row in res["rows"]:
        assert row["median_ms"] > 0 and row["ops_per_step"] > 0
        assert row["ratio_to_base"] is not None
        _assert_finite(row)
    assert res["copy_bandwidth_gbps"] > 0
    assert "loop SAM" in capsys.readouterr().out


def test_bench_counts_dispatched_ops_per_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every optimizer-side row reports the ops one steady-state step dispatches, counted with a
    TorchDispatchMode, and the output says what is counted. The native backend's fused ops are
    counted although its eager CPU calls skip the dispatcher: it dispatches more than nothing
    and fewer ops than the foreach backend, whose step is a chain of ``_foreach_*`` ops."""
    from fused_sam.cli.bench import dispatched_ops, make_params, optimizer_table, providers_for

    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--threads", "1", "--out", str(path)]) == 0
    res = json.loads(path.read_text())["optimizer"]
    assert "TorchDispatchMode" in res["dispatched_ops_meaning"]
    counts = {r["provider"]: r["dispatched_ops_per_step"] for r in res["rows"]}
    assert all(isinstance(n, int) and n > 0 for n in counts.values()), counts
    assert 0 < counts["FusedSAM[cpu]"] < counts["FusedSAM[foreach]"], counts
    # The per-tensor baseline dispatches per tensor: more than the foreach step on 8 tensors.
    assert counts["loop SAM"] > counts["FusedSAM[foreach]"], counts
    out = capsys.readouterr().out  # the table wraps its headers; the note follows it
    assert "dispatched ops" in out and "TorchDispatchMode" in out
    assert "dispatched ops / step" in optimizer_table(res)[0]
    # The count is the fused ops themselves, one each per step, not the aten ops around them.
    (native,) = [p for p in providers_for("cpu", "sgd") if p.name == "FusedSAM[cpu]"]
    step = native.make(make_params([(64, 32, 3, 3), (64,), (10, 64)], "cpu"))
    ops = dispatched_ops(step, "cpu")
    assert ops["fused_sam.perturb_"] == ops["fused_sam.restore_sgd_step_"] == 1, ops
    assert ops["fused_sam.norm_sq_partials"] == 2 and sum(ops.values()) == counts["FusedSAM[cpu]"]


def test_bench_quick_csv_sizes_and_model(tmp_path: Path) -> None:
    path = tmp_path / "bench.csv"
    argv = [
        "bench",
        "--quick",
        "--threads",
        "1",
        "--sizes",
        "4097,3,1",
        "--base",
        "adamw",
        "--out",
        str(path),
    ]
    assert main(argv) == 0
    lines = path.read_text().splitlines()
    # sgd and adamw baselines, loop SAM, then one FusedSAM row per backend usable on the CPU
    extra = [n for n, why in available_backends("cpu").items() if why is None and n != "reference"]
    assert lines[0].startswith("mode,provider,") and len(lines) == 1 + 3 + len(extra)
    # AdamW rows are measured against its floor: 48 B/param for SAM, 28 for AdamW alone.
    rows = list(csv.DictReader(lines))
    floors = {r["provider"]: float(r["floor_bytes_per_param"]) for r in rows}
    assert floors["adamw (foreach)"] == 28 and floors["loop SAM"] == 48
    assert all(v == 48 for k, v in floors.items() if k.startswith("FusedSAM"))

    model_json = tmp_path / "model.json"
    argv = ["bench", "--quick", "--model", "fused_sam.cli.models:e2e_model"]
    argv += ["--out", str(model_json)]
    assert main(argv) == 0
    from fused_sam.cli.models import e2e_model

    numel = sum(p.numel() for p in e2e_model().parameters())
    result = json.loads(model_json.read_text())["optimizer"]
    assert result["numel"] == numel and result["rows"]


def test_bench_quick_e2e(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SGD, SAM on every usable backend and a row per variant, each with the passes it took
    per step and its time ratio to SGD (timings are not asserted, only their shape)."""
    from fused_sam.functional import resolve_backend

    path = tmp_path / "e2e.json"
    assert main(["bench", "--quick", "--e2e", "--threads", "1", "--out", str(path)]) == 0
    res = json.loads(path.read_text())["e2e"]
    rows = res["rows"]
    backends = [n for n, why in available_backends("cpu").items() if why is None]
    sam_rows = [f"FusedSAM[{b}]" for b in backends if b != "reference"]
    tag = f"[{resolve_backend(None, torch.device('cpu'))}]"
    variant_rows = [f"SAM every 5 {tag}", f"LookSAM k=5 {tag}", f"F-SAM {tag}", f"GSAM {tag}",
                    f"ESAM keep 0.5 {tag}", f"Momentum-SAM {tag}"]  # fmt: skip
    assert [r["provider"] for r in rows] == ["SGD (foreach)", *sam_rows, *variant_rows]
    # Passes per step: one for the one-pass optimizers, two for SAM and the directions, one
    # SAM step in five for the schedules (step(closure) took one pass on the others).
    passes = {r["provider"]: r["passes_per_step"] for r in rows}
    assert passes["SGD (foreach)"] == passes[f"Momentum-SAM {tag}"] == 1.0
    two = [*sam_rows, f"F-SAM {tag}", f"GSAM {tag}", f"ESAM keep 0.5 {tag}"]
    assert all(passes[n] == 2.0 for n in two)
    assert passes[f"SAM every 5 {tag}"] == passes[f"LookSAM k=5 {tag}"] == pytest.approx(1.2)
    assert rows[0]["ratio_to_sgd"] == pytest.approx(1.0)
    for r in rows:
        assert r["ratio_to_sgd"] == pytest.approx(r["median_ms"] / rows[0]["median_ms"])
        assert r["ratio_to_sgd"] > 0
    _assert_finite(rows)
    out = capsys.readouterr().out
    assert "ratio to SGD" in out and "passes / step" in out
    assert all(name in out for name in variant_rows)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--methods", "sgd,nope"], "unknown method"),
        (["demo", "--noise", "1.5"], "noise rate must be in"),
        (["demo", "--epochs", "0"], "epochs must be >= 1"),
        (["demo", "--seeds", "a,b"], "comma-separated list of int"),
        (["demo", "--data", "cifar10"], "needs --data-dir"),
        (["demo", "--data", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist"),
        (["demo", "--data", "mnist"], "invalid choice"),
        (["demo", "--backend", "nope", "--epochs", "1", "--subset", "64"], "unknown backend"),
        (["demo", "--lr", "x"], "invalid float"),
        (["demo", "--backend", "cuda", "--device", "cpu"], "backend 'cuda' cannot run on cpu"),
        (["bench", "--params", "resnet9"], "invalid choice"),
        (["bench", "--repeat", "0", "--params", "tiny"], "--repeat must be >= 1"),
        (["bench", "--sizes", "0,5"], "positive integers"),
        (["bench", "--model", "no_such_module_xyz:f"], "cannot import"),
        (["bench", "--model", "torch"], "module:factory"),
        (["bench", "--params", "tiny", "--sizes", "3"], "not allowed with"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / ("out" if argv[0] == "demo" else "out.json")
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)] if argv[0] != "frobnicate" else argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists(), "an invalid run must not write results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_requested_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("demo", "bench"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--device", "cuda", "--out", str(tmp_path / cmd)])
        assert exc.value.code == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "tensors", "numel"),
    [("resnet18", 62, 11_689_512), ("resnet50", 161, 25_557_032), ("vit_b", 152, 86_567_656)],
)
def test_param_sets_match_the_architectures(name: str, tensors: int, numel: int) -> None:
    from fused_sam.cli.bench import param_shapes

    _, shapes = param_shapes(name)
    assert len(shapes) == tensors
    assert sum(math.prod(s) for s in shapes) == numel  # torchvision's parameter counts


def test_bench_sparsity_rows(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--threads", "1", "--sparsity", "0.5", "--out", str(path)]
    assert main(argv) == 0
    rows = json.loads(path.read_text())["optimizer"]["rows"]
    masked = [r for r in rows if r["provider"].endswith("mask 0.5")]
    usable = [n for n, why in available_backends("cpu").items() if why is None and n != "reference"]
    assert len(masked) == len(usable)
    for r in masked:
        assert r["floor_bytes_per_param"] == 40.125 and math.isfinite(r["median_ms"])
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--sparsity", "1.0", "--out", str(path)])
    assert exc.value.code == 2


@pytest.mark.parametrize("command", ["demo", "bench", "info"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and f"fused-sam {command}" in text.splitlines()[0]
    assert "--" in text  # its options are listed


def test_info_names_the_cpu_kernel_build_and_threads(capsys: pytest.CaptureFixture[str]) -> None:
    from fused_sam.backends import native

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    build = native._C.cpu_kernels()
    threads = native._C.cpu_parallel_threads()
    assert (
        f"CPU kernels {build}" in text and f"{threads} of {torch.get_num_threads()} threads" in text
    )


def test_demo_validation_split_and_noisy_fit(tmp_path: Path) -> None:
    """--validation evaluates on 20% of the noisy training split, never on the test split; the
    share of corrupted examples fitted is reported per run and per method."""
    out = tmp_path / "v"
    argv = ["demo", "--validation", "--epochs", "1", "--seeds", "0", "--methods", "sgd,sam"]
    assert main([*argv, "--subset", "200", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["eval_split"] == "validation (noisy labels)" and results["config"]["validation"]
    for run in results["runs"]:
        assert 0.0 <= run["noisy_fit"] <= 100.0
    assert all(0.0 <= e["noisy_fit_mean"] <= 100.0 for e in results["summary"].values())


def test_demo_on_cifar100_folder(cifar100_dir: Path, tmp_path: Path) -> None:
    argv = ["demo", "--data", "cifar100", "--data-dir", str(cifar100_dir), "--epochs", "1"]
    argv += ["--seeds", "0", "--methods", "sgd", "--batch-size", "8", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["config"]["data"] == "cifar100" and list(results["summary"]) == ["sgd"]
    assert results["train_size"] == 12 and results["test_size"] == 5


def test_bench_masks_script(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_masks.py", "--repeat", "1", "--numel", "20000",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    (written,) = tmp_path.glob("*.json")
    result = json.loads(written.read_text())
    names = [r["row"] for r in result["refresh"]]
    assert names[0].startswith("sam step") and any(n.startswith("fisher") for n in names)
    assert any(n.startswith("dynamic") for n in names), names
    assert all(r["ms"] > 0 for r in result["refresh"]) and result["first_step"] and out.stdout
    # Both the foreach backend and the native kernels, each with every kind of mask.
    rows = [r["row"] for r in result["first_step"][1:]]
    for backend in ("foreach", "cpu"):
        for label in ("no mask", "mask", "masked norm", "random mask"):
            assert f"[{backend}] first_step+restore, {label}" in rows, rows


def test_demo_variant_rows(tmp_path: Path) -> None:
    """The variants run on request (the default run keeps the four original methods)."""
    out = tmp_path / "v"
    argv = ["demo", "--epochs", "1", "--seeds", "0", "--subset", "320", "--no-progress"]
    argv += ["--methods", ",".join(m for m in METHODS if m not in DEFAULT_METHODS) + ",sgd"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == set(METHODS) - set(DEFAULT_METHODS) | {"sgd"}
    for entry in summary.values():
        assert 0.0 <= entry["acc_mean"] <= 100.0 and entry["step_ms"] > 0


def test_demo_evaluates_momentum_sam_at_w(monkeypatch) -> None:
    """Momentum-SAM's weights sit at a perturbed point between steps: the demo must evaluate
    (accuracy, noisy-label fit) inside ``unperturbed()``, at ``w``."""
    from fused_sam.cli import demo as demo_module

    cfg = DemoConfig(methods=["msam"], epochs=1, seeds=[0], subset=320)
    run = demo_module.Run("msam", 0, demo_module.load_dataset(cfg.data, cfg.data_dir), cfg)
    seen: list[bool] = []
    real = demo_module.accuracy

    def spy(model, x, y, batch_size=1024):
        stored = run.opt._w  # the weights w that MomentumSAM restores
        seen.append(all(torch.equal(p, stored[p]) for p in model.parameters() if p in stored))
        return real(model, x, y, batch_size)

    monkeypatch.setattr(demo_module, "accuracy", spy)
    run.epoch()
    run.result()
    assert seen == [True, True]
    # ... and the training itself runs at the perturbed point again afterwards.
    assert any(not torch.equal(p, run.opt._w[p]) for p in run.model.parameters())


def test_bench_variants(tmp_path: Path) -> None:
    out = tmp_path / "variants.json"
    assert main(["bench", "--variants", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["git_sha"] and result["device_name"] and "--variants" in result["command"]
    rows = result["variants"]["rows"]
    # Every hook set on the per-tensor loop, foreach and the native CPU kernels.
    for hooks in ("LookSAM reuse step", "LookSAM SAM step", "F-SAM", "GSAM"):
        for provider in ("loop", "foreach", "cpu"):
            (r,) = [r for r in rows if r["hooks"] == hooks and r["provider"] == provider]
            assert r["median_ms"] > 0 and r["ops_per_step"] > 0 and r["pct_of_floor"] > 0, r
            assert r["ratio_to_loop"] == 1.0 if provider == "loop" else r["ratio_to_loop"] > 0
    csv_out = tmp_path / "variants.csv"
    assert main(["bench", "--variants", "--quick", "--device", "cpu", "--out", str(csv_out)]) == 0
    assert csv_out.read_text().count("variants,") == len(rows)


def test_bench_refuses_two_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--variants", "--e2e", "--quick", "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2 and "two modes" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


class _DeadlineError(Exception):
    """Stands in for the signal that ends a benchmark step at its deadline."""


def _stop_after(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Let ``rows`` rows be timed, then stop the run in the middle of the next one."""
    from fused_sam.cli.bench import timing

    real = getattr(timing.time_step, "__wrapped__", timing.time_step)
    calls = [0]

    def time_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] > rows:
            raise _DeadlineError
        return real(*args, **kwargs)

    time_step.__wrapped__ = real
    monkeypatch.setattr(timing, "time_step", time_step)
    monkeypatch.setattr(timing, "copy_bandwidth", lambda *args, **kwargs: 1.0)  # times no row


@pytest.mark.parametrize("mode", ["optimizer", "variants", "e2e"])
def test_bench_rewrites_its_file_after_every_row(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``fused-sam bench`` run stopped by a deadline (the lent GPU's session script) keeps the
    rows it measured in its results file."""
    _stop_after(monkeypatch, 2)
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--device", "cpu", "--repeat", "1", "--out", str(out)]
    with pytest.raises(_DeadlineError):
        main([*argv, *({"optimizer": [], "variants": ["--variants"], "e2e": ["--e2e"]}[mode])])
    record = json.loads(out.read_text())
    assert len(record[mode]["rows"]) == 2
    assert record["command"].startswith("fused-sam bench --quick")


def test_record_script_rewrites_its_file_after_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``benchmarks/record.py`` likewise, within a parameter set and within the end-to-end rows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "record", Path(__file__).resolve().parents[1] / "benchmarks" / "record.py"
    )
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--sets", "tiny", "--bases", "sgd", "--sparsity", "0"]
    argv += ["--repeat", "1", "--warmup", "0", "--batch-size", "4", "--width", "8"]
    monkeypatch.setenv("FUSED_SAM_GIT_SHA", "feedface")
    _stop_after(monkeypatch, 2)
    with pytest.raises(_DeadlineError):
        record.main([*argv, "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["git_sha"] == "feedface"
    assert [len(r["rows"]) for r in got["optimizer"]] == [2] and got["optimizer"][0]["param_set"]
    # Past the optimizer rows (one per provider): two end-to-end rows, then the deadline.
    from fused_sam.cli.bench import providers_for

    _stop_after(monkeypatch, len(providers_for(torch.device("cpu"), "sgd")) + 2)
    with pytest.raises(_DeadlineError):
        record.main([*argv, "--out", str(out)])
    got = json.loads(out.read_text())
    assert len(got["e2e"]["rows"]) == 2 and "ratio_to_base" in got["optimizer"][0]["rows"][0]
