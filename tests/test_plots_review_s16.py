"""Review s16 of the plots: what a figure shows and where it is written.

- ``plot_sweep`` / ``plot_optimal_lr`` with a path without suffix checked ``fig`` but matplotlib
  wrote ``fig.png``, replacing a saved file and returning a path that does not exist; an
  unwritable suffix (or a failed write) left the folders it created behind.
- ``curvlab nqm`` without matplotlib ran the whole sweep and wrote its CSV before failing.
- ``plot_layers`` chose a log axis from the values alone, cutting an error bar that reaches 0.
- ``plot_histories`` drew one run in epochs and another in updates on one axis.
- ``plot_sharpness`` named a checkpoint "at step 1" (its index) instead of its label.
- ``plot_trajectory`` bridged a failed checkpoint with the line, without a word.

Expected numbers (x positions, error-bar ends) are computed here from the inputs, not by the code
under test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import curvlab.nqm._cli as nqm_cli
from curvlab.analysis import _plotting
from curvlab.cli import main
from curvlab.nqm import NQM, batch_size_sweep, plot_optimal_lr, plot_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep() -> Any:
    torch.set_num_threads(1)
    return batch_size_sweep(NQM.paper(d=20, bins=5), [1, 4], ("sgd",), target=0.1)


@pytest.fixture
def saved(monkeypatch) -> list[tuple[Any, list[str], list[str]]]:
    """``(figure, left-out items, remarks)`` of every figure the analysis plots save."""
    out: list[tuple[Any, list[str], list[str]]] = []
    original = _plotting._save

    def capture(fig: Any, path: Path, left: Any, tight_box: bool = False) -> Path:
        result = original(fig, path, left, tight_box)
        out.append((fig, list(left.items), list(left.remarks)))
        return result

    monkeypatch.setattr(_plotting, "_save", capture)
    return out


# ------------------------------------------------ F1: a path without suffix (nqm plots)
@pytest.mark.parametrize("which", ["sweep", "optimal_lr"])
def test_nqm_plot_without_suffix_refuses_to_replace_the_png(tmp_path, sweep, which):
    """plot_sweep(sweep, d/"fig") replaced an existing d/fig.png and returned d/fig."""
    draw = plot_sweep if which == "sweep" else plot_optimal_lr
    kwargs: dict[str, Any] = {"solid": "sgd", "dashed": None} if which == "sweep" else {}
    (tmp_path / "fig.png").write_bytes(b"USER DATA")
    with pytest.raises(FileExistsError, match=r"fig\.png"):
        draw(sweep, tmp_path / "fig", **kwargs)
    assert (tmp_path / "fig.png").read_bytes() == b"USER DATA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]
    written = draw(sweep, tmp_path / "fig", overwrite=True, **kwargs)
    assert written == tmp_path / "fig.png"
    assert written.read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / "fig").exists()


def test_nqm_plot_without_suffix_returns_the_file_written(tmp_path, sweep):
    written = plot_sweep(sweep, tmp_path / "new", solid="sgd", dashed=None)
    assert written == tmp_path / "new.png" and written.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.png"]
    pdf = plot_optimal_lr(sweep, tmp_path / "lr.pdf")  # a suffix matplotlib writes is kept
    assert pdf == tmp_path / "lr.pdf" and pdf.read_bytes().startswith(b"%PDF")


# ------------------------------------------------ F5: no folder left by a failed call
def test_nqm_plot_unwritable_suffix_creates_no_folder(tmp_path, sweep):
    """sub/fig.xyz raised matplotlib's ValueError but left sub/ behind."""
    with pytest.raises(ValueError, match=r"\.xyz"):
        plot_sweep(sweep, tmp_path / "sub" / "deeper" / "fig.xyz", solid="sgd", dashed=None)
    assert list(tmp_path.iterdir()) == []


def test_nqm_plot_failed_write_removes_the_folders_it_made(tmp_path, sweep, monkeypatch):
    from matplotlib.figure import Figure

    (tmp_path / "mine").mkdir()

    def broken(self: Any, *args: Any, **kwargs: Any) -> None:
        Path(args[0]).write_bytes(b"half")  # a partly written file
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot_optimal_lr(sweep, tmp_path / "mine" / "a" / "b" / "lr.png")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert list((tmp_path / "mine").iterdir()) == []


# ------------------------------------------------ F7: matplotlib checked before the sweep
def test_cli_nqm_without_matplotlib_fails_before_the_sweep(tmp_path, monkeypatch, capsys):
    """The whole sweep ran and nqm_sweep.csv was written before a bare ModuleNotFoundError."""
    swept: list[Any] = []
    monkeypatch.setattr(nqm_cli, "batch_size_sweep", lambda *a, **k: swept.append(a))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    out = tmp_path / "o"
    argv = ["nqm", "--out", str(out), "--batch-sizes", "1,4", "--powers", "0", "--dim", "20"]
    assert main([*argv, "--bins", "5", "--no-ema"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err
    assert swept == [] and not out.exists()


def test_nqm_plot_without_matplotlib_names_the_install_command(tmp_path, sweep, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install"):
        plot_sweep(sweep, tmp_path / "f.png", solid="sgd", dashed=None)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------ F2: per-layer log axis and error bars
def _layers_report(values: dict[str, float], errors: dict[str, float]) -> dict[str, Any]:
    per_layer = {"trace_hessian": values, "trace_hessian_stderr": errors}
    return {"entries": [{"label": "m", "values": {}, "per_layer": per_layer}], "meta": {}}


def test_layers_error_bar_reaching_zero_is_not_cut_by_a_log_axis(tmp_path, saved):
    """Tr(H) per layer {100, 0.5, 3} ± {5, 0.9, 0.2}: a log axis cut 0.5 ± 0.9 at its edge."""
    values, errors = {"a": 100.0, "b": 0.5, "c": 3.0}, {"a": 5.0, "b": 0.9, "c": 0.2}
    assert _plotting.plot_layers(_layers_report(values, errors), tmp_path / "l.png")
    fig, items, remarks = saved[-1]
    ax = fig.axes[0]
    lowest = min(values[k] - errors[k] for k in values)  # -0.4
    highest = max(values[k] + errors[k] for k in values)
    assert ax.get_xscale() != "log"
    lo, hi = ax.get_xlim()
    assert lo <= lowest and hi >= highest  # every error bar drawn whole
    assert items == [] and len(remarks) == 1 and "0.5 ± 0.9" in remarks[0]
    assert remarks[0] in [t.get_text() for t in fig.texts]


def test_layers_keep_a_log_axis_when_every_error_bar_stays_above_zero(tmp_path, saved):
    values, errors = {"a": 100.0, "b": 0.5, "c": 3.0}, {"a": 5.0, "b": 0.1, "c": 0.2}
    assert _plotting.plot_layers(_layers_report(values, errors), tmp_path / "l.png")
    fig, items, remarks = saved[-1]
    assert fig.axes[0].get_xscale() == "log" and remarks == [] and items == []


# ------------------------------------------------ F3: one x unit for every run
def _histories(**runs: dict[str, Any]) -> dict[str, Any]:
    return {
        "entries": [{"label": "m", "values": {}, "per_layer": {}}],
        "meta": {},
        "histories": runs,
    }


def _lines(ax: Any) -> dict[str, list[float]]:
    return {line.get_label(): [float(x) for x in line.get_xdata()] for line in ax.get_lines()}


STEPS = [0, 50, 100]


@pytest.mark.parametrize("b_extra", [{}, {"epochs": 2}], ids=["no-epochs", "no-updates"])
def test_histories_draw_every_run_in_one_unit(tmp_path, saved, b_extra):
    """Run A (epochs 2, updates 100) was drawn at 0, 1, 2 beside B at 0, 50, 100."""
    a = {"series": {"loss": {"step": STEPS, "value": [2.0, 1.0, 0.5]}}, "epochs": 2, "updates": 100}
    b = {"series": {"loss": {"step": STEPS, "value": [2.0, 1.5, 1.2]}}, **b_extra}
    assert _plotting.plot_histories(_histories(A=a, B=b), tmp_path / "h.png")
    fig, _, remarks = saved[-1]
    ax = fig.axes[0]
    assert ax.get_xlabel() == "update"
    assert _lines(ax) == {"A": [float(t) for t in STEPS], "B": [float(t) for t in STEPS]}
    assert len(remarks) == 1 and "B gives no epochs" in remarks[0]


def test_histories_with_epochs_for_every_run_share_the_epoch_axis(tmp_path, saved):
    a = {"series": {"loss": {"step": STEPS, "value": [2.0, 1.0, 0.5]}}, "epochs": 2, "updates": 100}
    b = {"series": {"loss": {"step": STEPS, "value": [2.0, 1.5, 1.2]}}, "epochs": 1, "updates": 50}
    assert _plotting.plot_histories(_histories(A=a, B=b), tmp_path / "h.png")
    fig, _, remarks = saved[-1]
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("epoch")
    assert _lines(ax) == {"A": [t * 2 / 100 for t in STEPS], "B": [t * 1 / 50 for t in STEPS]}
    assert remarks == []


# ------------------------------------------------ F4: checkpoints named by their label
def test_sharpness_note_names_the_checkpoint_by_its_label(tmp_path, saved):
    """'critical_sharpness of checkpoints at step 1 = inf' for the checkpoint labelled 2000."""
    entries = [
        {"label": str(s), "values": {"critical_sharpness": v}, "per_layer": {}, "errors": {}}
        for s, v in [(1000, 4.0), (2000, math.inf), (3000, 6.0)]
    ]
    assert _plotting.plot_sharpness({"entries": entries, "meta": {}}, tmp_path / "s.png")
    _, items, _ = saved[-1]
    assert items == ["critical_sharpness of checkpoints at 2000 = inf"]


def test_sharpness_note_of_a_history_still_names_the_step(tmp_path, saved):
    series = {"sharpness": {"step": [3, 7, 9], "value": [1.0, math.inf, 2.0]}}
    report = _histories(run={"series": series})
    assert _plotting.plot_sharpness(report, tmp_path / "s.png")
    _, items, _ = saved[-1]
    assert items == ["sharpness of run at step 7 = inf"]


# ------------------------------------------------ F6: the line breaks at a failed checkpoint
def test_trajectory_line_breaks_at_a_failed_checkpoint(tmp_path, saved):
    """Tr(H) failed at c1: the line was drawn c0 -> c2 with no note."""
    entries = [
        {"label": "c0", "values": {"loss": 1.0, "trace_hessian": 5.0}, "errors": {}},
        {"label": "c1", "values": {"loss": 0.8}, "errors": {"trace_hessian": "RuntimeError: x"}},
        {"label": "c2", "values": {"loss": 0.6, "trace_hessian": 9.0}, "errors": {}},
    ]
    report = {"entries": entries, "meta": {"checkpoints_are": "trajectory"}}
    assert _plotting.plot_trajectory(report, tmp_path / "t.png")
    fig, items, remarks = saved[-1]
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    line = panels["Tr(H)"].containers[0].lines[0]
    assert [float(x) for x in line.get_xdata()] == [0.0, 1.0, 2.0]
    ys = [float(y) for y in line.get_ydata()]
    assert ys[0] == 5.0 and math.isnan(ys[1]) and ys[2] == 9.0  # NaN breaks the line
    loss = [float(y) for y in panels["L"].containers[0].lines[0].get_ydata()]
    assert loss == [1.0, 0.8, 0.6]
    assert items == [] and remarks == ["Tr(H): no value at c1 (failed); the line is broken there"]


def test_trajectory_missing_first_value_adds_no_break(tmp_path, saved):
    entries = [
        {"label": "c0", "values": {"loss": 1.0}, "errors": {}},
        {"label": "c1", "values": {"loss": 0.8, "trace_hessian": 5.0}, "errors": {}},
        {"label": "c2", "values": {"loss": 0.6, "trace_hessian": 9.0}, "errors": {}},
    ]
    report = {"entries": entries, "meta": {"checkpoints_are": "trajectory"}}
    assert _plotting.plot_trajectory(report, tmp_path / "t.png")
    fig, _, remarks = saved[-1]
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    line = panels["Tr(H)"].containers[0].lines[0]
    assert [float(x) for x in line.get_xdata()] == [1.0, 2.0] and remarks == []
