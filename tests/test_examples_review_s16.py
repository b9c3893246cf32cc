"""Review s16, examples: ``--replot`` never replaces a saved run silently (mnist1d_wen_table2,
mnist1d_critical_batch), ``--quick`` keeps options given explicitly (fisher_explosion,
transformer), and a re-run never appends to an earlier run's Diagnostics log (ddp_diagnostics,
transformer). Refusals are run as subprocesses (they stop before any work); the rest calls the
scripts' own functions or runs them at their tiniest settings."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def examples(monkeypatch) -> None:
    """``examples/`` importable (its scripts import their helpers by module name)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _import(name: str) -> ModuleType:
    return importlib.import_module(name)


def _script(name: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=ENV,
    )


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ 1: --replot never overwrites
def _wen_runs(tmp_path: Path) -> tuple[Path, Path]:
    """A folder with a saved run ``mnist1d_wen_table2.json`` and another, renamed, to replot."""
    saved = json.loads((ROOT / "docs" / "results" / "mnist1d_wen_table2.json").read_text())
    other = dict(saved, settings=dict(saved["settings"], epochs=3))  # a different (quick) run
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "mnist1d_wen_table2.json").write_text(json.dumps(other))
    (folder / "full_run_copy.json").write_text(json.dumps(saved))
    return folder / "mnist1d_wen_table2.json", folder / "full_run_copy.json"


def test_wen_replot_refuses_to_replace_another_saved_run(tmp_path):
    kept, src = _wen_runs(tmp_path)
    before = _md5(kept)
    result = _script("mnist1d_wen_table2.py", "--replot", str(src), timeout=60)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "--overwrite" in result.stderr and str(kept) in result.stderr
    assert _md5(kept) == before  # the quick run is still there
    assert sorted(p.name for p in kept.parent.iterdir()) == sorted([kept.name, src.name])


def test_wen_replot_of_a_file_onto_itself_needs_overwrite(tmp_path, examples, monkeypatch):
    kept, _ = _wen_runs(tmp_path)
    wen = _import("mnist1d_wen_table2")
    problem = wen.replot_problem(kept, kept.parent, overwrite=False)
    assert f"{kept} (the file being replotted)" in problem and "--overwrite" in problem
    # with --overwrite it is replaced by its replot, which keeps the runs and settings
    assert wen.replot_problem(kept, kept.parent, overwrite=True) is None
    monkeypatch.setattr(wen, "plot", lambda *args, **kwargs: None)
    old = json.loads(kept.read_text())
    wen.replot(kept, kept.parent)
    new = json.loads(kept.read_text())
    assert new["runs"] == old["runs"] and new["settings"] == old["settings"]
    assert "replotted" in new


def test_wen_replot_problem_lists_every_existing_output(tmp_path, examples):
    wen = _import("mnist1d_wen_table2")
    src = tmp_path / "a.json"
    src.write_text("{}")
    out = tmp_path / "out"
    assert wen.replot_problem(src, out, overwrite=False) is None  # nothing there yet
    assert "no such file" in wen.replot_problem(tmp_path / "missing.json", out, False)
    out.mkdir()
    (out / "mnist1d_wen_fig5.png").write_bytes(b"x")
    (out / "mnist1d_wen_table2.md").write_text("table")
    problem = wen.replot_problem(src, out, overwrite=False)
    assert "mnist1d_wen_fig5.png" in problem and "mnist1d_wen_table2.md" in problem
    assert wen.replot_problem(src, out, overwrite=True) is None


def test_critical_batch_replot_refuses_to_replace_another_saved_run(tmp_path, examples):
    folder = tmp_path / "runs"
    folder.mkdir()
    kept = folder / "mnist1d_critical_batch.json"
    kept.write_text('{"a quick run": true}')
    src = folder / "full_run_copy.json"
    src.write_text((ROOT / "docs" / "results" / "mnist1d_critical_batch.json").read_text())
    result = _script("mnist1d_critical_batch.py", "--replot", str(src), timeout=60)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "--overwrite" in result.stderr and str(kept) in result.stderr
    assert kept.read_text() == '{"a quick run": true}'
    assert not (folder / "mnist1d_critical_batch.png").exists()
    cb = _import("mnist1d_critical_batch")
    assert "the file being replotted" in cb.replot_problem(kept, folder, overwrite=False)
    assert cb.replot_problem(src, folder, overwrite=True) is None
    assert cb.replot_problem(src, tmp_path / "elsewhere", overwrite=False) is None


# ------------------------------------------------------------ 2: --quick keeps explicit options
def test_fisher_explosion_quick_keeps_epochs_and_n_train(tmp_path):
    out = tmp_path / "fe"
    result = _script(
        "fisher_explosion.py",
        *("--quick", "--epochs", "1", "--n-train", "64", "--lrs", "0.1", "--alphas", "0.01"),
        *("--out", str(out)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads((out / "fisher_explosion.json").read_text())
    # brute force: 1 epoch of 64 examples in batches of 32 is 2 updates (--quick alone: 24)
    assert [r["updates"] for r in runs.values()] == [2, 2, 2]


def test_fisher_explosion_parse_args(examples):
    fe = _import("fisher_explosion")
    a = fe.parse_args(["--quick", "--epochs", "60"])  # at its full-run default: still kept
    assert (a.epochs, a.n_train) == (60, 256)
    a = fe.parse_args([])
    assert (a.epochs, a.n_train) == (60, 512)
    with pytest.raises(SystemExit):
        fe.parse_args(["--n-train", "16"])  # fewer examples than one batch: no update at all


def test_transformer_quick_keeps_explicit_options(examples):
    tr = _import("transformer")
    a = tr.parse_args(["--quick", "--steps", "4", "--every", "2", "--save-every", "2"])
    assert (a.steps, a.train, a.every, a.save_every) == (4, 256, 2, 2)
    a = tr.parse_args(["--quick", "--train", "2048"])  # at its full-run default: still kept
    assert (a.steps, a.train, a.every, a.save_every) == (20, 2048, 10, 10)
    a = tr.parse_args([])
    assert (a.steps, a.train, a.every, a.save_every) == (300, 2048, 25, 100)
    with pytest.raises(SystemExit):
        tr.parse_args(["--every", "0"])


# ------------------------------------------------------- 3: a re-run never appends to a log
def _steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines()]


def test_ddp_rerun_refuses_then_overwrite_starts_a_fresh_log(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    log = out / "metrics.jsonl"  # an earlier run's log (as Diagnostics writes it)
    log.write_text('{"step": 0, "values": {}}\n{"step": 5, "values": {}}\n')
    before = _md5(log)
    again = _script("ddp_diagnostics.py", "--steps", "6", "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _md5(log) == before  # the earlier run's log is kept as it was
    (out / "notes.txt").write_text("mine")
    fresh = _script("ddp_diagnostics.py", "--steps", "6", "--out", str(out), "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert _steps(log) == [0, 5]  # one run's records, not [0, 5, 0, 5]
    assert (out / "notes.txt").read_text() == "mine"  # nothing else is touched


def test_transformer_rerun_refuses_before_any_work(tmp_path):
    out = tmp_path / "tr"
    (out / "diagnostics").mkdir(parents=True)
    (out / "diagnostics" / "metrics.jsonl").write_text('{"step": 0}\n')
    result = _script("transformer.py", "--steps", "1", "--out", str(out), timeout=60)
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert "trained" not in result.stdout
    assert (out / "diagnostics" / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert sorted(p.name for p in out.iterdir()) == ["diagnostics"]


def test_transformer_fresh_out_deletes_only_its_own_outputs(tmp_path, examples):
    tr = _import("transformer")
    out = tmp_path / "tr"
    tr.fresh_out(out, overwrite=False)  # a new folder is made
    assert out.is_dir()
    for sub in ("diagnostics", "checkpoints", "report"):
        (out / sub).mkdir()
        (out / sub / "f").write_text("old")
    (out / "per_block.json").write_text("{}")
    (out / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        tr.fresh_out(out, overwrite=False)
    assert len(tr.earlier_outputs(out)) == 4
    tr.fresh_out(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("spectrum.py", ("--probes", "0")),
        ("spectrum.py", ("--steps", "-1")),
        ("nqm_batch_size_sweep.py", ("--max-log2-batch", "-1")),
        ("nqm_batch_size_sweep.py", ("--target", "0")),
    ],
)
def test_bad_counts_are_refused_before_the_folder_or_any_work(tmp_path, script, args) -> None:
    """spectrum.py trained its model before refusing --probes 0; both made their folder first."""
    out = tmp_path / "out"
    run = _script(script, "--out", str(out), *args)
    assert run.returncode == 2 and "expected a" in run.stderr
    assert not out.exists()
