"""The examples' command lines (review s27, EX-1, EX-2): every option of every example script has
a help text, and ``edge_of_stability.py --quick`` writes into its own folder, never over a full
run's outputs (both wrote ``examples/output/edge_of_stability/``)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
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


# Runs every example script as ``python examples/NAME.py --help`` would, in ONE subprocess (one
# torch import, ~10 s instead of ~10 s per script), records the parser each script parses with, and
# prints per script the exit code and the options whose help is empty or, for an option with a
# default, does not state it ("default" in the text).
_PROBE = r"""
import argparse, contextlib, io, json, runpy, sys
from pathlib import Path
examples = Path(sys.argv[1])
sys.path.insert(0, str(examples))
seen = []
parse_known_args = argparse.ArgumentParser.parse_known_args
def record(self, *args, **kwargs):
    seen.append(self)
    return parse_known_args(self, *args, **kwargs)
argparse.ArgumentParser.parse_known_args = record
report = {}
for path in sorted(examples.glob("*.py")):
    if 'if __name__ == "__main__":' not in path.read_text():
        continue  # a helper module (example_args, mnist1d_common), not a script
    seen.clear()
    sys.argv = [str(path), "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(path), run_name="__main__")
        code = "returned without exiting"
    except SystemExit as stop:
        code = stop.code
    bad = []
    for action in seen[0]._actions if seen else []:
        if isinstance(action, argparse._HelpAction):
            continue
        text = (action.help or "").strip()
        if not text:
            bad.append(f"{action.option_strings}: no help")
        elif action.default not in (None, False) and "default" not in text:
            bad.append(f"{action.option_strings}: default {action.default!r} not stated")
    report[path.name] = {"code": code, "parsed": bool(seen), "usage": "usage:" in out.getvalue(),
                         "bad": bad}
print(json.dumps(report))
"""


def test_every_example_help_exits_zero_and_documents_each_option() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) >= 14  # every script, not just a few
    problems = {
        name: r
        for name, r in report.items()
        if r["code"] != 0 or not r["parsed"] or not r["usage"] or r["bad"]
    }
    assert problems == {}


def test_wen_fig23_logs_the_final_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """EX2-2: with --steps not a multiple of 10 the losses stopped at update 50 of 55."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import torch
    import wen_fig23_classifier as wen

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    steps, _ = wen.train("SB", x, y, steps=15, log_every=10)
    assert steps == [0, 10, 15]


def test_nqm_schedules_refuses_a_target_above_the_initial_risk(tmp_path: Path) -> None:
    """EX2-1: a target at or above the initial risk 4.894 crashed with an IndexError after
    the work; it is refused before any folder is made."""
    out = tmp_path / "nqm"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "nqm_schedules.py"), "--target", "5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 2
    assert "at or above the NQM's initial risk 4.894" in done.stderr
    assert not out.exists()
