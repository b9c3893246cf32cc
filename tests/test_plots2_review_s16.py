"""Review s16, follow-ups of the plotting fix.

- ``plot_layers`` drew a NaN (or missing) standard error as an error bar of 0, without a note.
- ``curvlab analyze`` / ``curvlab demo`` without matplotlib measured (trained) everything before
  ``Report.save`` failed on a bare ``ModuleNotFoundError``; the demo left its folder behind.
- ``docs/nqm.md`` did not say that a plot path without suffix gets ``.png`` and that an
  unwritable suffix is refused before any folder is created.
- ``curvlab/analysis/_plotting.py`` (832 lines) is split: the figures against the step live in
  ``_plot_series`` and are re-exported.

Expected error-bar ends are computed here from the inputs, not by the code under test.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import curvlab.demo._train as demo_train
from curvlab.analysis import Report, _plotting
from curvlab.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def _error_bars(ax: Any) -> list[float]:
    """``[y, left end, right end, ...]`` of each error bar drawn on ``ax``, by bar centre y."""
    ends = []
    for container in ax.containers:
        errorbar = getattr(container, "errorbar", None)
        if errorbar is None:
            continue
        for collection in errorbar.lines[2]:
            for seg in collection.get_segments():
                if len(seg):
                    (x0, y0), (x1, _) = seg.tolist()
                    ends.append((y0, x0, x1))
    return [v for bar in sorted(ends) for v in bar]


# ------------------------------------------------ 1. a NaN standard error in layers.png
@pytest.mark.parametrize("stderr_of_a", [math.nan, "nan", None], ids=["nan", "json-nan", "none"])
def test_layers_bar_without_standard_error_has_no_error_bar_and_a_note(
    tmp_path, saved, stderr_of_a
):
    """Tr(H) per layer {a: 1, b: 2} ± {a: NaN, b: 0.1}: a's error bar was drawn with width 0."""
    values = {"a": 1.0, "b": 2.0}
    errors: dict[str, Any] = {"b": 0.1}
    if stderr_of_a is not None:
        errors["a"] = stderr_of_a
    per_layer = {"trace_hessian": values, "trace_hessian_stderr": errors}
    report = {"entries": [{"label": "m", "values": {}, "per_layer": per_layer}], "meta": {}}
    assert _plotting.plot_layers(report, tmp_path / "l.png") is not None
    fig, items, remarks = saved[-1]
    ax = fig.axes[0]
    # one bar per layer, one checkpoint: bar centres at the layers' indices 0 (a) and 1 (b)
    assert _error_bars(ax) == pytest.approx([1.0, 2.0 - 0.1, 2.0 + 0.1])
    assert items == []
    assert len(remarks) == 1
    assert "no standard error" in remarks[0] and "trace_hessian of a at m" in remarks[0]
    assert "of b" not in remarks[0]
    assert remarks[0] in [t.get_text() for t in fig.texts]
    assert (tmp_path / "l.png").read_bytes().startswith(b"\x89PNG")


def test_layers_checkpoint_without_standard_errors_is_named(tmp_path, saved):
    """Two checkpoints, only the second with standard errors: the first's bars are named."""
    entries = [
        {"label": "c0", "values": {}, "per_layer": {"trace_hessian": {"a": 1.0}}},
        {
            "label": "c1",
            "values": {},
            "per_layer": {"trace_hessian": {"a": 3.0}, "trace_hessian_stderr": {"a": 0.5}},
        },
    ]
    assert _plotting.plot_layers({"entries": entries, "meta": {}}, tmp_path / "l.png")
    fig, _, remarks = saved[-1]
    bar = 0.8 / 2  # two checkpoints share a layer's row: c1's bar sits half a bar below
    assert _error_bars(fig.axes[0]) == pytest.approx([bar / 2, 3.0 - 0.5, 3.0 + 0.5])
    assert len(remarks) == 1 and "trace_hessian of a at c0" in remarks[0]
    assert "at c1" not in remarks[0]


def test_layers_with_every_standard_error_have_no_note(tmp_path, saved):
    values, errors = {"a": 1.0, "b": 2.0}, {"a": 0.2, "b": 0.1}
    per_layer = {"trace_hessian": values, "trace_hessian_stderr": errors}
    report = {"entries": [{"label": "m", "values": {}, "per_layer": per_layer}], "meta": {}}
    assert _plotting.plot_layers(report, tmp_path / "l.png")
    fig, items, remarks = saved[-1]
    expected = [
        v for i, k in enumerate("ab") for v in (i, values[k] - errors[k], values[k] + errors[k])
    ]
    assert _error_bars(fig.axes[0]) == pytest.approx(expected)
    assert items == [] and remarks == []


# ------------------------------------------------ 2. matplotlib checked before measuring
_MODEL = """
from pathlib import Path
import torch

def model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)

def data():
    (Path(__file__).parent / "data_was_read").write_text("")
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
"""


def _no_matplotlib(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed


_BLOCKED_RUN = """
import sys
import torch

torch.set_num_threads(1)


class NoMatplotlib:  # a broken install: every matplotlib module fails to import
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, NoMatplotlib())
from curvlab.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_cli_analyze_without_matplotlib_fails_before_measuring(tmp_path):
    """In a fresh process without matplotlib, the data was read and Tr(H) measured before
    Report.save's bare ModuleNotFoundError."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "plots2_model.py").write_text(_MODEL)
    out = tmp_path / "out"
    argv = ["analyze", "--model", f"{user / 'plots2_model.py'}:model", "--out", str(out)]
    argv += ["--quantities", "loss,trace_hessian", "--no-nqm", "--no-progress"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("CURVLAB_DEBUG", None)
    run = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "python -m pip install 'matplotlib>=3.7'" in run.stderr
    assert "NQM" not in run.stderr  # the report's figures, not the NQM plots, need it here
    assert not (user / "data_was_read").exists()
    assert not out.exists()


def test_cli_demo_without_matplotlib_fails_before_training(tmp_path, monkeypatch, capsys):
    """The demo trained its runs, then failed in Report.save and left its folder behind."""
    trained: list[Any] = []
    monkeypatch.setattr(demo_train, "run_demo", lambda *a, **k: trained.append(a))
    _no_matplotlib(monkeypatch)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err
    assert trained == [] and not out.exists()


def test_report_save_without_matplotlib_names_the_install_command(tmp_path, monkeypatch):
    report = Report(entries=[{"label": "m", "values": {"loss": 1.0}, "per_layer": {}}])
    _no_matplotlib(monkeypatch)
    with pytest.raises(ImportError, match=r"pip install 'matplotlib>=3\.7'"):
        report.save(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------ 3. docs/nqm.md
def test_nqm_docs_say_suffixless_paths_get_png_and_bad_suffixes_are_refused_first():
    text = " ".join((ROOT / "docs" / "nqm.md").read_text(encoding="utf-8").split())
    assert "without a suffix gets `.png`" in text
    assert "cannot write (`fig.xyz`) is refused with a `ValueError`" in text
    assert "before any folder is created" in text


# ------------------------------------------------ 4. the split of _plotting
def test_plotting_reexports_the_series_figures_and_draws_them_through_its_helpers(
    tmp_path, monkeypatch
):
    """The figures against the step moved to _plot_series; _plotting still names them, and
    capturing _plotting._figure / _save (as the tests do) still catches them."""
    _plot_series = importlib.import_module("curvlab.analysis._plot_series")
    for name in ("plot_histories", "plot_sharpness", "plot_critical_batch"):
        assert getattr(_plotting, name) is getattr(_plot_series, name)
        assert name in _plotting.__all__
    for name in _plotting.__all__:
        assert callable(getattr(_plotting, name))
    made: list[Any] = []
    original = _plotting._figure
    monkeypatch.setattr(_plotting, "_figure", lambda w, h: made.append(original(w, h)) or made[-1])
    history = {"series": {"loss": {"step": [0, 1, 2], "value": [3.0, 2.0, 1.0]}}}
    report = {"entries": [{"label": "m", "values": {}}], "meta": {}, "histories": {"A": history}}
    assert _plotting.plot_histories(report, tmp_path / "h.png") == tmp_path / "h.png"
    assert len(made) == 1
    (line,) = made[0].axes[0].get_lines()
    assert list(line.get_xdata()) == [0, 1, 2] and list(line.get_ydata()) == [3.0, 2.0, 1.0]
    for module in (_plotting, _plot_series):
        assert len(Path(module.__file__).read_text(encoding="utf-8").splitlines()) < 600


def test_run_demo_without_matplotlib_fails_before_training(tmp_path, monkeypatch):
    """The Python API ``run_demo`` (not only the CLI) checks matplotlib before it trains."""
    loaded: list[Any] = []
    monkeypatch.setattr(demo_train, "load_mnist1d", lambda *a, **k: loaded.append(a))
    _no_matplotlib(monkeypatch)
    out = tmp_path / "demo"
    with pytest.raises(ImportError, match=r"the report's figures need matplotlib.*pip install"):
        demo_train.run_demo(out, progress=False)
    assert loaded == [] and not out.exists()
