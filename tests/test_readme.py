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
