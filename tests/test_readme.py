"""The README's quick-start snippet runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    match = re.search(
        rf"<!-- {marker} -->\s*```(?:python|bash)\n(.*?)```\s*<!-- /{marker} -->", text, re.S
    )
    assert match, f"README block {marker!r} not found"
    return match.group(1)


def test_quickstart_runs(capsys) -> None:
    exec(compile(_block("quickstart"), str(README), "exec"), {})
    assert "final loss" in capsys.readouterr().out


def test_commands_present() -> None:
    assert "pip install" in _block("main-command")
    assert "pytest" in _block("test-command")


def test_sparse_sam_example_runs() -> None:
    scope: dict = {}
    exec(compile(_block("sparse-sam"), str(README), "exec"), scope)
    opt = scope["opt"]
    assert opt.masks and not opt.in_flight


def test_mixed_precision_example_runs(capsys) -> None:
    scope: dict = {}
    exec(compile(_block("mixed-precision"), str(README), "exec"), scope)
    opt, scaler = scope["opt"], scope["scaler"]
    assert not opt.in_flight and not bool(opt.last_step_skipped)
    assert scaler.get_scale() > 0 and opt.state  # steps were taken: momentum buffers exist
    assert "loss" in capsys.readouterr().out


def test_accumulation_example_runs() -> None:
    scope: dict = {}
    exec(compile(_block("accumulation"), str(README), "exec"), scope)
    assert not scope["opt"].in_flight and scope["opt"].state


def test_lightning_manual_example_runs() -> None:
    scope: dict = {}
    exec(compile(_block("lightning-manual"), str(README), "exec"), scope)
    assert scope["trainer"].global_step == 20


def test_hf_trainer_example_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example's output_dir
    scope: dict = {}
    try:
        exec(compile(_block("hf-trainer"), str(README), "exec"), scope)
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert scope["opt"].state and not scope["opt"].in_flight


def test_accelerate_example_runs() -> None:
    scope: dict = {}
    try:
        exec(compile(_block("accelerate"), str(README), "exec"), scope)
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert scope["sam"].state and not scope["sam"].in_flight
