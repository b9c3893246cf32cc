"""Every example writes its default output under ``examples/output/`` beside the script, wherever
it is run from (review s23: seven took ``examples/output/...`` relative to the current folder, so
a run from ``examples/`` wrote ``examples/examples/output/``, which git does not ignore)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _out_defaults(path: Path) -> list[ast.expr]:
    """The ``default=`` expressions of the script's ``add_argument("--out", ...)`` calls."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "--out"
        ):
            found += [k.value for k in node.keywords if k.arg == "default"]
    return found


SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if _out_defaults(p))


def test_the_scripts_with_an_out_option_are_found() -> None:
    names = {p.stem for p in SCRIPTS}
    assert {"quickstart", "spectrum", "transformer", "nqm_batch_size_sweep"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_the_default_out_is_no_path_relative_to_the_current_folder(path: Path) -> None:
    for default in _out_defaults(path):
        text = ast.unparse(default)
        assert "examples/output" not in text, f"{path.name}: --out default {text} is cwd-relative"
        assert not (isinstance(default, ast.Constant) and isinstance(default.value, str)), text
