"""Review s22 of what the command line and the demo write: each test failed before its fix.

* ``curvlab demo --overwrite`` removed the earlier demo's training logs before it trained: an
  interrupted or failed run left the earlier report beside this run's partial logs, the earlier
  logs lost. The logs are now staged and swapped in together with the report; a file where a
  run's log folder goes is refused before training (it was refused only when that run's
  Diagnostics opened, after the earlier logs were gone).
* ``analyze --overwrite`` into an ``--out`` holding a folder named like an output file failed
  after all the measuring, with a raw ``IsADirectoryError`` naming a hidden staging path.
* ``curvlab analyze`` / ``demo`` / ``Report.save`` reported the clash with an existing ``--out``
  before the other options, and said "pass --overwrite" for a file, which it then refused.
* ``SweepResult.to_csv`` into a missing folder failed with a raw ``FileNotFoundError`` naming a
  hidden temporary file; ``plot_sweep`` creates missing folders.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import curvlab.analysis._report as report_module
import curvlab.demo._train as train
import curvlab.nqm._sweep as sweep_module
from curvlab.analysis._report import Report
from curvlab.cli import main
from curvlab.nqm._sweep import SweepResult
from curvlab.nqm._tuning import OptimalResult

_CFG = train.DemoConfig.quick()  # runs SB, LB, LB+diag-Fisher; training is replaced below
_CFG2 = dataclasses.replace(_CFG, seeds=2)  # logs in diagnostics/ and diagnostics/seed1/


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``, hidden ones included (``None`` for a folder)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _earlier_demo(out: Path) -> dict[str, bytes | None]:
    """An earlier demo's folder (its marker, logs of two seeds and report) with a user's files."""
    files = {
        "report.json": json.dumps({"meta": {"demo_config": "{}"}, "figures": ["training.png"]}),
        "training.png": "earlier figure",
        "report.html": "earlier page",
        "notes.txt": "the user's",
        "diagnostics/.curvlab-demo": "marker",
        "diagnostics/SB/metrics.jsonl": '{"earlier": "SB"}\n',
        "diagnostics/SB/notes.txt": "the user's",
        "diagnostics/LB/metrics.jsonl": '{"earlier": "LB"}\n',
        "diagnostics/LB_diag-Fisher/metrics.jsonl": '{"earlier": "noise"}\n',
        "diagnostics/seed1/SB/metrics.jsonl": '{"earlier": "SB seed 1"}\n',
    }
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return _snapshot(out)


@pytest.fixture
def fast_demo(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The demo with tiny data and no training: each run writes one log line into the log
    folder it is given and returns a linear model. Returns the log folders, in order."""
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 40, generator=g), torch.randint(0, 10, (8,), generator=g))
    monkeypatch.setattr(train, "load_mnist1d", lambda *a, **k: (data, data))
    log_dirs: list[Path] = []

    def run(name: str, cfg: Any, data: Any, log_dir: Path, show: bool) -> Any:
        log_dirs.append(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "metrics.jsonl", "a") as f:  # as Diagnostics appends
            f.write(json.dumps({"new": name}) + "\n")
        history = {"series": {"loss": {"step": [0, 1], "value": [2.0, 1.0]}}}
        return nn.Linear(40, 10), history

    def analyze(*args: Any, labels: list[str], **kwargs: Any) -> Report:
        entries = [{"label": label, "values": {"loss": 1.0}} for label in labels]
        return Report(entries=[{**e, "per_layer": {}, "arrays": {}, "errors": {}} for e in entries])

    monkeypatch.setattr(train, "_train_run", run)
    monkeypatch.setattr(train, "analyze", analyze)
    return log_dirs


# ------------------------------------------------- 1. demo --overwrite: all together or nothing
@pytest.mark.parametrize("where", ["training", "analysis"])
def test_a_failed_demo_overwrite_leaves_the_earlier_demo_as_it_was(
    tmp_path: Path, fast_demo: list[Path], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = tmp_path / "demo"
    before = _earlier_demo(out)
    if where == "training":  # interrupted in the second run (SB's log already written)
        run = train._train_run

        def interrupted(name: str, *args: Any) -> Any:
            if name == "LB":
                raise KeyboardInterrupt
            return run(name, *args)

        monkeypatch.setattr(train, "_train_run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train.run_demo(out, _CFG, overwrite=True, progress=False)
    else:  # every run trained, the analysis fails

        def fails(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("analysis failed")

        monkeypatch.setattr(train, "analyze", fails)
        with pytest.raises(RuntimeError, match="analysis failed"):
            train.run_demo(out, _CFG, overwrite=True, progress=False)
    assert fast_demo  # a run did write its log (into the staging folder)
    # the earlier logs, marker and report as they were; no partial log, no staging folder
    assert _snapshot(out) == before


def test_a_demo_overwrite_swaps_the_logs_in_with_the_report(
    tmp_path: Path, fast_demo: list[Path]
) -> None:
    out = tmp_path / "demo"
    _earlier_demo(out)
    train.run_demo(out, _CFG, overwrite=True, progress=False)
    assert len(fast_demo) == 3 and all(".curvlab-demo-" in str(d) for d in fast_demo)  # staged
    after = _snapshot(out)
    for name, run in (("SB", "SB"), ("LB", "LB"), ("LB_diag-Fisher", "LB+diag-Fisher")):
        # this run's log alone: neither appended to the earlier one nor beside it
        assert (
            after[f"diagnostics/{name}/metrics.jsonl"] == (json.dumps({"new": run}) + "\n").encode()
        )
    assert "diagnostics/seed1" not in after  # the earlier seed's log went, and its folders
    assert after["diagnostics/SB/notes.txt"] == b"the user's"
    assert after["notes.txt"] == b"the user's"
    assert after["diagnostics/.curvlab-demo"] != b"marker"  # this demo's marker
    assert "demo_config" in json.loads(after["report.json"])["meta"]  # this demo's report
    assert not [n for n in after if n.startswith(".")]  # no staging folder left


def test_a_move_that_fails_in_the_demos_swap_puts_every_earlier_file_back(
    tmp_path: Path, fast_demo: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "demo"
    before = _earlier_demo(out)
    replace = report_module.os.replace

    def fails_on_the_report(src: Any, dst: Any) -> None:
        # the new report.json, after every log has moved in (not the earlier one put back)
        if Path(dst) == out / "report.json" and report_module._ASIDE not in Path(src).parts:
            raise OSError("disk full")
        replace(src, dst)

    monkeypatch.setattr(report_module.os, "replace", fails_on_the_report)
    with pytest.raises(OSError, match="disk full"):
        train.run_demo(out, _CFG2, overwrite=True, progress=False)
    # the logs of both seeds moved in are out again, the folders made for them (seed1/LB) gone
    assert len(fast_demo) == 6 and _snapshot(out) == before


@pytest.mark.parametrize(
    "blocker, error",
    [
        ("diagnostics/LB_diag-Fisher", NotADirectoryError),  # a file where a log folder goes
        ("diagnostics/seed1", NotADirectoryError),  # (the second seed's folder)
        ("diagnostics/LB/metrics.jsonl/", ValueError),  # a folder where a log file goes
        ("report.html/", ValueError),  # a folder where a report file goes
    ],
)
def test_a_blocked_log_or_report_name_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocker: str, error: type
) -> None:
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training ran")

    monkeypatch.setattr(train, "_train_run", no_training)
    monkeypatch.setattr(train, "load_mnist1d", no_training)
    out = tmp_path / "demo"
    _earlier_demo(out)
    path = out / blocker.rstrip("/")
    if path.exists():
        for p in sorted(path.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        path.rmdir() if path.is_dir() else path.unlink()
    if blocker.endswith("/"):
        path.mkdir(parents=True)
        (path / "user.txt").write_text("keep")
    else:
        path.write_text("the user's file")
    before = _snapshot(out)
    with pytest.raises(error, match=blocker.rstrip("/").split("/")[-1]):
        train.run_demo(out, _CFG2, overwrite=True, progress=False)
    assert _snapshot(out) == before  # the earlier logs are still there


# ------------------------------------------------- 2. an output name taken by a folder
def _report() -> Report:
    return Report(
        entries=[{"label": "final", "values": {"loss": 1.0}, "per_layer": {}, "arrays": {}}]
    )


@pytest.mark.parametrize("overwrite", [False, True])
def test_report_save_refuses_a_folder_named_like_an_output_before_drawing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    def no_drawing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("drawn")

    monkeypatch.setattr(report_module, "_FIGURES", (("training.png", no_drawing, "t"),))
    out = tmp_path / "rep"
    (out / "report.html").mkdir(parents=True)
    (out / "report.html" / "user.txt").write_text("keep")
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"report\.html' exists and is a folder"):
        _report().save(out, overwrite=overwrite)
    assert _snapshot(out) == before  # and no staging folder


COUNTING_MODULE = textwrap.dedent(
    """
    from pathlib import Path

    import torch
    from torch import nn

    with open(Path(__file__).with_suffix(".count"), "a") as f:
        f.write("executed\\n")

    def model():
        return nn.Linear(4, 5)

    def data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(10, 4, generator=g), torch.randint(0, 5, (10,), generator=g)
    """
)


@pytest.fixture
def counting_module(tmp_path: Path) -> Path:
    path = tmp_path / "countmodel.py"
    path.write_text(COUNTING_MODULE)
    return path


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _analyze(module: Path, out: Path, *extra: str) -> list[str]:
    return ["analyze", "--model", f"{module}:model", "--out", str(out), "--no-progress", *extra]


def test_analyze_refuses_a_folder_named_like_an_output_before_the_model_is_built(
    counting_module: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rep"
    (out / "report.html").mkdir(parents=True)
    args = _analyze(counting_module, out, "--overwrite", "--quantities", "loss", "--no-nqm")
    assert main(args) == 2
    line = _error_line(capsys)
    assert f"'{out / 'report.html'}' exists and is a folder" in line, line
    assert ".curvlab-report-" not in line and "IsADirectoryError" not in line
    assert not counting_module.with_suffix(".count").exists()  # nothing built or measured
    assert [p.name for p in out.iterdir()] == ["report.html"]


# ------------------------------------------------- 3. the other options before the --out clash
@pytest.mark.parametrize(
    "extra, expected",
    [
        (("--num-probes", "1"), "--num-probes must be >= 2"),
        (("--checkpoint", "missing.pt"), "checkpoint file 'missing.pt' does not exist"),
        (("--map-location", "nowhere"), "--map-location"),
        (("--quantities", "loss,,grad_norm"), "has an empty entry"),
    ],
)
def test_analyze_checks_its_options_before_the_clash_with_an_existing_out(
    counting_module: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    expected: str,
) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    assert main(_analyze(counting_module, out, *extra)) == 2
    line = _error_line(capsys)
    assert expected in line and "already exists" not in line, line


def test_a_file_as_out_is_not_told_to_pass_overwrite(
    counting_module: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("user data")
    assert main(_analyze(counting_module, afile)) == 2
    assert "exists and is not a folder" in _error_line(capsys)
    assert main(["demo", "--quick", "--out", str(afile), "--no-progress"]) == 2
    assert "exists and is not a folder" in _error_line(capsys)
    with pytest.raises(NotADirectoryError):
        train.run_demo(afile, _CFG, progress=False)
    with pytest.raises(NotADirectoryError):
        _report().save(afile)
    assert afile.read_text() == "user data"
    assert not counting_module.with_suffix(".count").exists()


def test_demo_names_the_users_logs_before_asking_for_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    (out / "diagnostics" / "LB").mkdir(parents=True)
    (out / "diagnostics" / "LB" / "metrics.jsonl").write_text('{"step": 0}\n')
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    line = _error_line(capsys)  # --overwrite would be refused too: it was told to pass it
    assert "no curvlab demo wrote" in line and "pass --overwrite" not in line, line


# ------------------------------------------------- 4. SweepResult.to_csv into a missing folder
def _sweep() -> SweepResult:
    row = OptimalResult(
        steps=12.0,
        lr=0.5,
        momentum=0.0,
        ema=0.0,
        optimizer="sgd",
        batch_size=4.0,
        precond_power=0.0,
        target=0.01,
    )
    return SweepResult(rows=[row], batch_sizes=[4.0], target=0.01, lower_bound=[3.0])


def test_to_csv_creates_missing_folders_as_plot_sweep_does(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "sweep.csv"
    assert _sweep().to_csv(path) == path
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["steps"], r["lr"], r["lower_bound_steps"]) for r in rows] == [("12.0", "0.5", "3.0")]
    assert sorted(p.name for p in path.parent.iterdir()) == ["sweep.csv"]  # no temporary file


def test_a_failed_to_csv_removes_the_folders_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sweep_module.csv, "DictWriter", broken)
    with pytest.raises(OSError, match="disk full"):
        _sweep().to_csv(tmp_path / "a" / "b" / "sweep.csv")
    assert list(tmp_path.iterdir()) == []
