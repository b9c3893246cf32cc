"""The project's promises about itself: set-up commands, CI, public API, examples."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import curvlab as cl

ROOT = Path(__file__).resolve().parent.parent


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- ci:setup -->", 1)[1]
    body = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    return [line for line in body.splitlines() if line.strip()]


def test_readme_has_two_setup_commands_and_ci_reads_them() -> None:
    install, test = _setup_commands()
    assert "pip install" in install and ".[test]" in install
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ci:setup" in ci and "venv" in ci
    assert "ruff check" in ci and "ruff format --check" in ci


def test_public_entry_points_of_design_exist() -> None:
    for name in [
        "diag_fisher",
        "diag_hessian",
        "kfac",
        "gradient_stats",
        "fisher_norms",
        "trace",
        "eigenvalues",
        "spectral_density",
        "curvature_operator",
        "analyze",
        "Diagnostics",
    ]:
        assert callable(getattr(cl, name)), name
        assert name in cl.__all__
    for name in [
        "DiagFisherNoise",
        "FullFisherNoise",
        "KFACNoise",
        "FisherTraceNoise",
        "MultiplicativeNoise",
        "IsotropicNoise",
        "NoisyOptimizer",
    ]:
        assert callable(getattr(cl.noise, name)), name
    assert callable(cl.nqm.NQM)
    assert (ROOT / "curvlab" / "py.typed").exists()


def test_quickstart_example_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "noise scale" in result.stdout
    assert (tmp_path / "fisher_diagonals.png").stat().st_size > 1000


@pytest.mark.slow
def test_transformer_example_runs_quick(tmp_path: Path) -> None:
    """examples/transformer.py --quick: train, Diagnostics, analyze checkpoints, per-block spectra."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "transformer.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "per_block.json").read_text())
    assert set(summary["top_eigenvalues_per_block"]) == {"blocks.0", "blocks.1"}
    assert summary["backend"] == "hooks"  # the tied, position-embedded GPT takes the fast path
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["entries"]) == 2
    assert all(not e["errors"] for e in report["entries"]), [e["errors"] for e in report["entries"]]
