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


def test_commands_install_from_scratch_and_run_the_main_job_and_the_suite() -> None:
    """The two set-up commands: torch and the build tools first, then the package built
    against that torch (no build isolation), then the demo / the linters (ruff, the layer
    contracts) and the default suite;
    .ci/run executes the second one as written."""
    main, test = _block("main-command").strip(), _block("test-command").strip()
    for cmd in (main, test):
        assert cmd.startswith("pip install torch==")
        assert "pip install --no-build-isolation -e " in cmd
    assert main.endswith("&& fused-sam demo") and '".[demo]"' in main
    assert test.endswith("&& ruff check . && lint-imports && python -m pytest")
    assert '".[test]"' in test
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci


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


def test_lightning_automatic_example_runs() -> None:
    scope: dict = {}
    exec(compile(_block("lightning-automatic"), str(README), "exec"), scope)
    assert scope["trainer"].global_step == 20
    assert "train_loss" in scope["trainer"].progress_bar_metrics


def test_accelerate_accumulation_example_runs() -> None:
    scope: dict = {}
    try:
        exec(compile(_block("accelerate-accumulation"), str(README), "exec"), scope)
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert scope["sam"].state and not scope["sam"].in_flight


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


def test_esam_example_runs() -> None:
    scope: dict = {}
    exec(compile(_block("esam"), str(README), "exec"), scope)
    assert scope["opt"].state_dict()["sam_random_mask"] == {"keep": 0.5, "seed": 0, "draws": 10}


def test_every_k_example_runs() -> None:
    scope: dict = {}
    exec(compile(_block("every-k"), str(README), "exec"), scope)
    opt = scope["opt"]
    assert opt.state_dict()["sam_schedule"]["steps"] == 20 and not opt.in_flight


def test_compile_example_runs_without_recompiles(monkeypatch) -> None:
    """The torch.compile section's loop: both halves one graph each (fullgraph), compiled for
    the first two steps only although lr and rho change every step. Traced with aot_eager to
    keep the test quick (test_compile.py runs inductor)."""
    import functools

    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    torch._dynamo.reset()
    scope: dict = {}
    try:
        exec(compile(_block("compile"), str(README), "exec"), scope)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 4
    assert not scope["opt"].in_flight and scope["opt"].state
    assert float(scope["opt"].param_groups[0]["lr"]) < 0.1
