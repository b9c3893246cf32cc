"""Review s18 (fixer Q): the report, its page and figures, the glossary, the noise scale on
non-finite gradients, the demo's settings and logs, and CURVLAB_PROGRESS.

Every expected number is written here from its definition (dense float64 by torch.func where a
curvature is involved); nothing is imported from the package's own reference code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.func import functional_call, hessian

import curvlab as cl
from curvlab._progress import progress_enabled
from curvlab.analysis import Report, _plotting
from curvlab.analysis._glossary import QUANTITY_INFO, STDERR_KEYS, describe
from curvlab.analysis._page import render_html
from curvlab.demo import DemoConfig, run_demo
from curvlab.demo._logs import remove_earlier_logs
from curvlab.demo._train import RUNS

nan, inf = math.nan, math.inf


def _entry(label: str, values: dict[str, Any], arrays: dict[str, Any] | None = None) -> dict:
    return {
        "label": label,
        "values": values,
        "per_layer": {},
        "arrays": arrays or {},
        "errors": {},
        "seconds": 0.1,
    }


def _cells(page: str) -> dict[str, list[str]]:
    """The page's value table: quantity symbol -> the cells of its row (tags removed)."""
    table = page.split("<table>", 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]:
        cells = [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def saved(monkeypatch) -> list[tuple[Any, list[str], list[str]]]:
    """``(figure, left-out items, remarks)`` of every figure saved."""
    out: list[tuple[Any, list[str], list[str]]] = []
    original = _plotting._save

    def capture(fig: Any, path: Path, left: Any, tight_box: bool = False) -> Path:
        result = original(fig, path, left, tight_box)
        out.append((fig, list(left.items), list(left.remarks)))
        return result

    monkeypatch.setattr(_plotting, "_save", capture)
    return out


# ----------------------------------------------------- 1. a ± that is NaN/inf is said, not hidden
def _stderr_report() -> Report:
    return Report(
        entries=[
            _entry(
                "ck",
                {
                    "loss": 0.5,
                    "trace_hessian": 12.0,
                    "trace_hessian_stderr": nan,
                    "noise_scale_hessian": 3.0,
                    "noise_scale_hessian_stderr": inf,
                    "top_eigenvalues": [4.0, 3.0],
                },
                {"top_eigenvalues": {"residuals": [nan, 0.1]}},
            )
        ]
    )


@pytest.mark.parametrize("reload", [False, True], ids=["as-measured", "from-json"])
def test_a_non_finite_standard_error_is_stated_not_dropped(reload):
    """Tr(H) = 12 with a NaN stderr printed "12" (as if exact), B_noise 3 ± inf "3", and λ_max
    "4 ± nan (then 3)"; after report.json the stderr was the string "nan", hidden too."""
    report = _stderr_report()
    if reload:
        report = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    cells = _cells(render_html(report, []))
    assert cells["trace of the Hessian Tr(H)"] == ["12 (no valid standard error)"]
    assert cells["Hessian-weighted gradient noise scale B_noise"] == ["3 (no valid standard error)"]
    assert cells["largest Hessian eigenvalues λ_max(H)"] == ["4 (no valid residual bound) (then 3)"]
    text = report.summary()
    assert "12 (no valid standard error)" in text and "3 (no valid standard error)" in text
    assert "nan" not in render_html(report, []).split("<h2>")[0]  # never a bare "± nan"


def test_a_finite_standard_error_is_still_shown():
    report = Report(entries=[_entry("ck", {"trace_hessian": 12.0, "trace_hessian_stderr": 0.5})])
    assert _cells(render_html(report, []))["trace of the Hessian Tr(H)"] == ["12 ± 0.5"]
    assert "12±0.5" in report.summary()


# ------------------------------------------ 2. trajectory.png: no zero-width bar for a NaN stderr
def test_trajectory_draws_no_error_bar_for_a_nan_standard_error_and_names_it(tmp_path, saved):
    """Tr(H) 10 ± 1 then 12 ± NaN: the second point got an error bar of width 0, no note."""

    def entry(label: str, v: float, se: float) -> dict:
        return _entry(label, {"trace_hessian": v, "trace_hessian_stderr": se})

    report = {"entries": [entry("a", 10.0, 1.0), entry("b", 12.0, nan)], "meta": {}}
    assert _plotting.plot_trajectory(report, tmp_path / "t.png") is not None
    fig, items, remarks = saved[-1]
    (container,) = fig.axes[0].containers
    half_widths = [
        (seg[1][1] - seg[0][1]) / 2
        for collection in container.lines[2]
        for seg in collection.get_segments()
        if len(seg)
    ]
    assert half_widths == pytest.approx([1.0])  # b draws none (it drew one of width 0)
    assert items == []
    assert len(remarks) == 1 and "b (standard error nan)" in remarks[0]
    assert remarks[0] in [t.get_text() for t in fig.texts]


# ------------------------------------------------- 3. noise_scale on NaN gradients names them
def test_noise_scale_on_nan_gradients_blames_the_gradients_not_zero():
    """sqrt of a negative parameter: NaN gradients read as "every example's gradient is 0"."""

    class Root(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2).double()
            self.a = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * torch.sqrt(self.a)

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (6,), generator=gen)
    model = Root()
    with pytest.raises(cl.analysis.AnalysisError) as failed:  # every quantity failed
        cl.analyze(
            model, torch.nn.CrossEntropyLoss(), (X, y), quantities=["noise_scale"], nqm=False
        )
    (message,) = [r for r in failed.value.reasons if r.startswith("noise_scale")]
    assert "not finite" in message and "gradient is 0" not in message


# ---------------------------------------- 4. the single-probe range counts the probes without one
def _nqm_report(per_probe: list[float], spread: list[float] | None) -> Report:
    curve = {
        "batch_size": [1.0, 2.0],
        "steps": [10.0, 5.0],
        "critical_batch_size": 1024.0,
        "critical_batch_size_per_probe": per_probe,
        "critical_batch_size_range": spread,
    }
    nqm = {"curves": {"SGD": curve}, "num_probes": len(per_probe), "terms_per_example": None}
    entry = _entry("model", {"loss": 1.0})
    entry["nqm"] = nqm
    return Report(entries=[entry])


def _nqm_row(report: Report) -> str:
    row = re.search(r"<tr><td>model</td><td>SGD.*?</tr>", render_html(report, [])).group(0)
    return re.sub("<[^>]+>", "|", row)


def test_the_single_probe_range_says_how_many_probes_give_a_prediction():
    """Per probe [nan, nan, 1024, nan] read "each probe alone predicts 1024 to 1024" and
    "1024 – 1024 (4 probes)", as if all four agreed."""
    report = _nqm_report([nan, nan, 1024.0, nan], [1024.0, 1024.0])
    assert "1 of 4 probes gives a prediction" in _nqm_row(report)
    assert "1024 – 1024 (4 probes)" not in _nqm_row(report)
    line = next(x for x in report.summary().splitlines() if x.startswith("NQM"))
    assert "1 of 4 probes gives a prediction" in line and "1024 to 1024" not in line


def test_no_single_probe_prediction_is_not_one_probe():
    """Range None with 4 probes read "(one SLQ probe)"."""
    report = _nqm_report([nan] * 4, None)
    assert "no single probe gives a prediction" in _nqm_row(report)
    assert "one SLQ probe" not in _nqm_row(report)
    line = next(x for x in report.summary().splitlines() if x.startswith("NQM"))
    assert "no single probe gives a prediction" in line


# ------------------------------------ 5. a non-last run's prediction is not "the last" checkpoint
def test_the_page_names_the_run_of_a_single_prediction_among_independent_runs():
    entries = [_entry("runA", {"loss": 1.0}), _entry("runB", {"loss": nan})]
    entries[0]["nqm"] = {"curves": {}, "num_probes": 1}
    report = Report(entries=entries, meta={"checkpoints_are": "independent runs"})
    scope = re.search(r"<h2>NQM prediction</h2><p>(.*?)</p>", render_html(report, [])).group(1)
    assert "the last of" not in scope
    assert "run <b>runA</b>" in scope and "independent runs" in scope


# ------------------------------------------------------------- 6. from_dict restores the floats
def test_from_dict_gives_floats_back_and_copies_its_input():
    """report["noise_scale"] was the string "inf" after to_dict/from_dict."""
    entry = _entry(
        "nan",  # a label stays text
        {"noise_scale": inf, "trace_hessian": 2.0, "trace_hessian_stderr": nan},
        {"top_eigenvalues": {"residuals": [nan, 0.1]}},
    )
    entry["errors"] = {"x": "nan"}
    report = Report(entries=[entry], histories={"r": {"series": {}, "noise": "nan", "lr": inf}})
    d = json.loads(json.dumps(report.to_dict()))
    again = Report.from_dict(d)
    assert again["noise_scale"] == inf and isinstance(again["noise_scale"], float)
    assert math.isnan(again["trace_hessian_stderr"])
    assert math.isnan(again.entries[0]["arrays"]["top_eigenvalues"]["residuals"][0])
    assert again.entries[0]["label"] == "nan" and again.entries[0]["errors"] == {"x": "nan"}
    assert again.histories["r"]["noise"] == "nan" and again.histories["r"]["lr"] == inf
    again.entries[0]["values"]["loss"] = 1.0
    assert "loss" not in d["entries"][0]["values"]  # the input is not aliased


# --------------------------------------------------------- 7. training.png: short series visible
def test_training_history_of_one_point_is_drawn_and_nan_breaks_the_line(tmp_path, saved):
    report = {
        "entries": [_entry("m", {})],
        "meta": {},
        "histories": {
            "A": {
                "series": {
                    "loss": {"step": [0, 1, 2, 3], "value": [2.0, 1.5, nan, 1.0]},
                    "trace_fisher": {"step": [3], "value": [7.0]},
                },
                "epochs": 1,
                "updates": 4,
            }
        },
    }
    assert _plotting.plot_histories(report, tmp_path / "h.png") is not None
    fig, items, _ = saved[-1]
    loss_ax, fisher_ax = fig.axes
    (loss,) = loss_ax.get_lines()
    assert math.isnan(float(loss.get_ydata()[2]))  # the NaN breaks the line, never bridged
    (single,) = fisher_ax.get_lines()
    assert single.get_marker() not in (None, "None", "", " ")  # one point, visible
    assert items == ["loss of A at step 2 = nan"]


# ----------------------------------------------- 8. every row defined; sharpness and tr(HΣ) with ±
def test_every_companion_value_is_defined_and_sharpness_carries_its_residual():
    for name in ("sharpness_residual", "sharpness_hvps", "noise_scale_hessian_hvps"):
        assert describe(name).definition != "(no description)", name
    assert STDERR_KEYS["sharpness"] == "sharpness_residual"
    assert STDERR_KEYS["trace_hessian_covariance"] == "trace_hessian_covariance_stderr"
    values = {"sharpness": 5.0, "sharpness_residual": 0.002, "sharpness_hvps": 30}
    page = render_html(Report(entries=[_entry("ck", values)]), [])
    assert "(no description)" not in page
    assert _cells(page)[f"sharpness {QUANTITY_INFO['sharpness'].symbol}"] == ["5 ± 0.002"]


def test_trace_hessian_covariance_stores_its_standard_error():
    """tr(HΣ)'s standard error (stderr · to_mean) was computed, never stored: shown as exact.
    Checked against dense float64 H and Σ: tr(HΣ) within a few of its standard errors."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    X = torch.randn(12, 3, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (12,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def unflat(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, unflat(flat), (X,)), y)

    H = hessian(mean_loss)(flat0)
    grads = torch.stack(
        [
            torch.func.grad(
                lambda f, i=i: loss_fn(
                    functional_call(model, unflat(f), (X[i : i + 1],)), y[i : i + 1]
                )
            )(flat0)
            for i in range(12)
        ]
    )
    centred = grads - grads.mean(0)
    sigma = centred.T @ centred / 12
    exact = float(torch.trace(H @ sigma))
    report = cl.analyze(
        model, loss_fn, (X, y), quantities=["noise_scale_hessian"], nqm=False, num_probes=8
    )  # 12 examples > 8 probes: probed (N <= num_probes is exact, its stderr 0; review s21)
    se = report["trace_hessian_covariance_stderr"]
    assert isinstance(se, float) and 0 < se < math.inf
    assert abs(report["trace_hessian_covariance"] - exact) < 5 * se
    cell = _cells(render_html(report, []))["Hessian-weighted gradient covariance tr(HΣ)"][0]
    assert " ± " in cell


# ---------------------------------------------------------------- 9. DemoConfig checks its settings
@pytest.mark.parametrize(
    "bad",
    [
        {"n_train": 8000},
        {"n_train": 0},
        {"n_train": -3000},
        {"n_test": 0},
        {"large_batch": -5},
        {"small_batch": 0},
        {"small_batch": 256, "large_batch": 128},
        {"epochs": 0},
        {"num_probes": 1},
        {"noise_stop_fraction": 1.5},
        {"seeds": 0},
        {"lr": 0.0},
        {"momentum": 1.0},
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_demo_config_refuses_invalid_settings_before_any_folder(tmp_path, bad):
    from dataclasses import replace

    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        replace(DemoConfig.quick(), **bad)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_demo_removes_the_folder_it_made(tmp_path, monkeypatch):
    import curvlab.demo._train as train

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("training failed")

    monkeypatch.setattr(
        train,
        "load_mnist1d",
        lambda *a, **k: ((torch.zeros(8, 40), torch.zeros(8, dtype=torch.long)),) * 2,
    )
    monkeypatch.setattr(train, "_train_all", fail)
    out = tmp_path / "new" / "demo"
    with pytest.raises(RuntimeError, match="training failed"):
        run_demo(out, DemoConfig.quick(), progress=False)
    assert not (tmp_path / "new").exists()


# --------------------------------------------------- 10. --overwrite keeps the user's own logs
def test_overwrite_refuses_logs_no_demo_wrote(tmp_path):
    out = tmp_path / "mine"
    mine = [out / "diagnostics/LB/metrics.jsonl", out / "diagnostics/seed3/SB/metrics.csv"]
    for path in mine:
        path.parent.mkdir(parents=True)
        path.write_text('{"step": 0}\n')
    with pytest.raises(FileExistsError, match="diagnostics/LB/metrics.jsonl"):
        remove_earlier_logs(out, RUNS)
    with pytest.raises(FileExistsError, match="no curvlab demo wrote"):
        run_demo(out, DemoConfig.quick(), overwrite=True, progress=False)
    assert all(p.is_file() for p in mine)
    from curvlab.demo._logs import MARKER

    (out / "diagnostics" / MARKER).write_text("")  # a demo's: replaced
    remove_earlier_logs(out, RUNS)
    assert not any(p.exists() for p in mine)


# ------------------------------------------------------------- 11. CURVLAB_PROGRESS in any case
@pytest.mark.parametrize("value", ["False", "OFF", "No", " 0 "])
def test_curvlab_progress_off_in_any_case(monkeypatch, value):
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("CURVLAB_PROGRESS", value)
    assert progress_enabled(None, Terminal()) is False  # type: ignore[arg-type]
    monkeypatch.setenv("CURVLAB_PROGRESS", "1")
    assert progress_enabled(None, Terminal()) is True  # type: ignore[arg-type]
