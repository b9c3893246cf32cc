"""The examples' command lines (review s27, EX-1, EX-2): every option of every example script has
a help text, and ``edge_of_stability.py --quick`` writes into its own folder, never over a full
run's outputs (both wrote ``examples/output/edge_of_stability/``)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _options_without_help(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            and not any(k.arg == "help" for k in node.keywords)
        ):
            names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            out.append(f"{path.name}:{node.lineno} {names}")
    return out


def test_every_example_option_has_help() -> None:
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert len(scripts) > 10
    missing = [m for p in scripts for m in _options_without_help(p)]
    assert missing == []


def _edge_args(monkeypatch: pytest.MonkeyPatch, *argv: str):  # noqa: ANN202
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["edge_of_stability.py", *argv])
    import edge_of_stability

    return edge_of_stability.parse()


def test_edge_of_stability_quick_has_its_own_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    full = _edge_args(monkeypatch)
    quick = _edge_args(monkeypatch, "--quick")
    assert quick.out == full.out / "quick"
    assert quick.steps == 30 and full.steps == 800
    given = _edge_args(monkeypatch, "--quick", "--out", "/tmp/somewhere")
    assert given.out == Path("/tmp/somewhere")
