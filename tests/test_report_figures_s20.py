"""Review s20 of the critical-batch-size and sharpness figures and the page: what they say.

- ``critical_batch_size.png`` said "B_noise < 0: tr(HΣ) < 0" for every negative ``B_noise``,
  also where ``GᵀHG < 0 < tr(HΣ)``.
- The NQM's critical batch size, whose absolute scale is arbitrary (``init_var = 1``), was drawn
  and shown beside ``B_simple`` and ``B_noise`` without a caveat.
- ``B_noise`` without a valid standard error got a zero-width error bar (per checkpoint) or a band
  drawn through it (against the step), without a word.
- The histories panel of ``critical_batch_size.png`` drew its lines through non-finite values.
- ``sharpness.png`` said "(dashed: threshold ...)" over a threshold series of ``None`` only.
- Extras: ``training.png``'s "one point per update" for series measured every k updates, the
  glossary's undefined ``w`` of ``Tr(F)``, ``trajectory.png``'s caption on λ_max's error bar.

Figure data are read back from the matplotlib ``Figure`` objects; expected numbers are the
inputs or computed here (dense float64 brute force with torch.func), never by the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab.analysis import _page, _plotting
from curvlab.analysis._glossary import describe
from curvlab.analysis._report import Report


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


def _entry(label: str, values: dict[str, Any], nqm: dict[str, Any] | None = None) -> dict:
    e: dict[str, Any] = {"label": label, "values": values, "per_layer": {}, "errors": {}}
    if nqm is not None:
        e["nqm"] = nqm
    return e


def _container(ax: Any, label: str) -> Any:
    (c,) = [c for c in ax.containers if c.get_label() == label]
    return c


def _lines(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    return {
        line.get_label(): (
            [float(x) for x in line.get_xdata()],
            [float(y) for y in line.get_ydata()],
        )
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


# ------------------------------------------------ 1: which factor of B_noise < 0 is negative
def _indefinite_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, float, float]:
    """A two-layer linear net (6 parameters) and data where GᵀHG < 0 < tr(HΣ) exactly (the
    reviewer's seed 61), with both, by dense brute force."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)).double()
    g = torch.Generator().manual_seed(61)
    theta = torch.randn(6, generator=g, dtype=torch.float64) * 0.3
    X = torch.randn(8, 2, generator=g, dtype=torch.float64)
    y = torch.randn(8, 1, generator=g, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def unflat(t: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = t[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    def loss(t: torch.Tensor) -> torch.Tensor:
        return ((functional_call(model, unflat(t), (X,)) - y) ** 2).mean()

    def loss1(t: torch.Tensor, x: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return ((functional_call(model, unflat(t), (x[None],)) - yy[None]) ** 2).mean()

    H = torch.autograd.functional.hessian(loss, theta)
    G = vmap(grad(loss1), in_dims=(None, 0, 0))(theta, X, y)
    mean = G.mean(0)
    sigma = (G - mean).T @ (G - mean) / len(X)
    with torch.no_grad():
        for p, v in zip(model.parameters(), unflat(theta).values()):
            p.copy_(v)
    return model, X, y, float(torch.trace(H @ sigma)), float(mean @ H @ mean)


def test_negative_b_noise_note_names_ghg_when_it_is_the_negative_factor(tmp_path, saved):
    """The note said "(B_noise < 0: tr(HΣ) < 0, an indefinite Hessian)" where GᵀHG < 0."""
    torch.manual_seed(0)
    model, X, y, trace_hs, ghg = _indefinite_case()
    assert ghg < 0 < trace_hs  # the brute-force signs the note must report
    report = cl.analyze(
        model,
        nn.MSELoss(),
        (X, y),
        quantities=["noise_scale_hessian"],
        num_probes=200,
        nqm=False,
        progress=False,
    )
    v = report.values
    # GᵀHG is exact (one product with the mean gradient): its sign is the brute force's
    assert v["grad_hessian_grad"] == pytest.approx(ghg, rel=1e-9)
    assert v["noise_scale_hessian"] < 0 < v["trace_hessian_covariance"]
    assert _plotting.plot_critical_batch(report.to_dict(), tmp_path / "c.png")
    fig, _, remarks = saved[-1]
    (remark,) = [r for r in remarks if "symmetric-log" in r]
    assert "GᵀHG < 0" in remark and "tr(HΣ) < 0" not in remark
    assert "differ in sign" in remark
    assert remark in [t.get_text() for t in fig.texts]


@pytest.mark.parametrize(
    ("trace_hs", "ghg", "said", "unsaid"),
    [(-0.3, 0.1, "tr(HΣ) < 0", "GᵀHG < 0"), (0.3, -0.1, "GᵀHG < 0", "tr(HΣ) < 0")],
)
def test_negative_b_noise_note_names_the_negative_factor_per_checkpoint_and_step(
    tmp_path, saved, trace_hs, ghg, said, unsaid
):
    values = {
        "noise_scale_hessian": trace_hs / ghg,
        "noise_scale_hessian_stderr": 0.5,
        "trace_hessian_covariance": trace_hs,
        "grad_hessian_grad": ghg,
    }
    series = {k: {"step": [0, 10], "value": [v, v]} for k, v in values.items()}
    report = {
        "entries": [_entry("a", dict(values))],
        "meta": {},
        "histories": {"run": {"series": series}},
    }
    assert _plotting.plot_critical_batch(report, tmp_path / "c.png")
    _, _, remarks = saved[-1]
    axis_remarks = [r for r in remarks if "symmetric-log" in r]
    assert len(axis_remarks) == 2  # the histories' panel and the per-checkpoint one
    for r in axis_remarks:
        assert said in r and unsaid not in r


def test_negative_b_noise_without_its_factors_names_no_factor(tmp_path, saved):
    entries = [_entry("a", {"noise_scale_hessian": -3.0, "noise_scale_hessian_stderr": 0.5})]
    assert _plotting.plot_critical_batch({"entries": entries, "meta": {}}, tmp_path / "c.png")
    _, _, remarks = saved[-1]
    (remark,) = remarks
    assert "tr(HΣ) and GᵀHG differ in sign" in remark and "indefinite Hessian" in remark
    assert "tr(HΣ) < 0" not in remark and "GᵀHG < 0" not in remark


# ------------------------------------------------ 2: the NQM's arbitrary scale
def _nqm(crit: float) -> dict[str, Any]:
    curve = {"critical_batch_size": crit, "critical_batch_size_examples": crit}
    return {"curves": {"SGD": curve}, "terms_per_example": 1.0, "num_probes": 1}


def _nqm_entries() -> list[dict[str, Any]]:
    return [
        _entry(
            lab,
            {"noise_scale": bs, "noise_scale_hessian": bn, "noise_scale_hessian_stderr": 1.0},
            _nqm(34.95),
        )
        for lab, bs, bn in (("far", 5.3, 5.9), ("near", 9699.0, 12079.0))
    ]


def test_nqm_in_the_critical_batch_figure_says_its_scale_is_arbitrary(tmp_path, saved):
    """34.95 at both checkpoints beside B_simple 5.3 -> 9699, with no word on its scale."""
    assert _plotting.plot_critical_batch(
        {"entries": _nqm_entries(), "meta": {}}, tmp_path / "c.png"
    )
    fig, _, remarks = saved[-1]
    ax = fig.axes[0]
    assert [float(y) for y in _container(ax, "NQM (SGD)").lines[0].get_ydata()] == [34.95, 34.95]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    (nqm_text,) = [t for t in legend if t.startswith("NQM")]
    assert "arbitrary scale" in nqm_text and "init_var = 1" in nqm_text
    (remark,) = [r for r in remarks if r.startswith("NQM")]
    assert "arbitrary" in remark and "init_var" in remark and "ratios" in remark


def test_nqm_on_the_page_says_its_scale_is_arbitrary():
    report = Report(entries=_nqm_entries(), meta={"checkpoints_are": "trajectory"})
    page = _page.render_html(report, [("critical_batch_size.png", "critical batch size")])
    nqm_section = page.split("<h2>NQM prediction</h2>", 1)[1]
    assert "arbitrary" in nqm_section.split("</p>", 1)[0] and "init_var" in nqm_section
    caption = _page._CAPTIONS["critical_batch_size.png"]
    assert "arbitrary" in caption and "init_var = 1" in caption


# ------------------------------------------------ 3: B_noise without a valid standard error
def test_b_noise_without_standard_error_has_no_zero_width_bar_and_a_note(tmp_path, saved):
    entries = [
        _entry(
            "a",
            {"noise_scale": 10.0, "noise_scale_hessian": 12.0, "noise_scale_hessian_stderr": 1.0},
        ),
        _entry(
            "b",
            {
                "noise_scale": 10.0,
                "noise_scale_hessian": 14.0,
                "noise_scale_hessian_stderr": math.nan,
            },
        ),
    ]
    assert _plotting.plot_critical_batch({"entries": entries, "meta": {}}, tmp_path / "c.png")
    fig, items, remarks = saved[-1]
    bars = _container(fig.axes[0], "B_noise").lines[2][0].get_segments()
    # a: 12 ± 1 at x = 0; b: no bar at all (a segment [14, 14] read as an exact value)
    assert [s.tolist() for s in bars if len(s)] == [[[0.0, 11.0], [0.0, 13.0]]]
    assert items == []
    (remark,) = remarks
    assert "no valid standard error" in remark and "b (standard error nan)" in remark
    assert "a (" not in remark
    assert remark in [t.get_text() for t in fig.texts]


def test_b_noise_band_against_the_step_breaks_where_the_standard_error_is_not_valid(
    tmp_path, saved
):
    steps = [0, 10, 20, 30, 40]
    series = {
        "noise_scale_hessian": {"step": steps, "value": [4.0, 5.0, 6.0, 7.0, 8.0]},
        "noise_scale_hessian_stderr": {"step": steps, "value": [1.0, 1.0, math.nan, 1.0, 1.0]},
    }
    report = {"entries": [_entry("m", {})], "meta": {}, "histories": {"run": {"series": series}}}
    assert _plotting.plot_critical_batch(report, tmp_path / "c.png")
    fig, _, remarks = saved[-1]
    ax = fig.axes[0]
    (band,) = [
        c
        for c in ax.collections
        if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")
    ]
    for path in band.get_paths():  # no area reaches over step 20
        xs = path.vertices[:, 0]
        assert not (xs.min() < 20 < xs.max())
    (remark,) = remarks
    assert "no valid standard error" in remark and "run at step 20 (standard error nan)" in remark


# ------------------------------------------------ 4: the histories' lines break at non-finite values
def test_critical_batch_histories_break_at_non_finite_values(tmp_path, saved):
    steps = [0, 10, 20, 30, 40]
    series = {
        "noise_scale": {"step": steps, "value": [5.0, 6.0, math.inf, 8.0, 9.0]},
        "noise_scale_hessian": {"step": steps, "value": [4.0, 5.0, math.nan, 7.0, 8.0]},
        "noise_scale_hessian_stderr": {"step": steps, "value": [1.0] * 5},
    }
    report = {"entries": [_entry("m", {})], "meta": {}, "histories": {"run": {"series": series}}}
    assert _plotting.plot_critical_batch(report, tmp_path / "c.png")
    fig, items, _ = saved[-1]
    lines = _lines(fig.axes[0])
    for label in ("B_simple run", "B_noise run"):
        xs, ys = lines[label]
        assert xs == [0.0, 10.0, 20.0, 30.0, 40.0]
        assert math.isnan(ys[2]) and all(math.isfinite(y) for k, y in enumerate(ys) if k != 2)
    assert sorted(items) == ["B_noise of run at step 20 = nan", "B_simple of run at step 20 = inf"]


# ------------------------------------------------ 5: a threshold of None only is no threshold
def test_sharpness_title_names_no_threshold_when_none_has_a_value(tmp_path, saved):
    steps = [0, 10, 20]
    series = {
        "sharpness": {"step": steps, "value": [1.0, 1.5, 2.0]},
        "sharpness_threshold": {"step": steps, "value": [None, None, None]},
    }
    report = {"entries": [_entry("m", {})], "meta": {}, "histories": {"run": {"series": series}}}
    assert _plotting.plot_sharpness(report, tmp_path / "s.png")
    fig, _, _ = saved[-1]
    (ax,) = fig.axes
    assert "threshold" not in ax.get_title() and not any(
        line.get_linestyle() == "--" for line in ax.get_lines()
    )


def test_sharpness_title_names_a_threshold_with_one_value(tmp_path, saved):
    steps = [0, 10, 20]
    series = {
        "sharpness": {"step": steps, "value": [1.0, 1.5, 2.0]},
        "sharpness_threshold": {"step": steps, "value": [None, 4.0, 4.0]},
    }
    report = {"entries": [_entry("m", {})], "meta": {}, "histories": {"run": {"series": series}}}
    assert _plotting.plot_sharpness(report, tmp_path / "s.png")
    (ax,) = saved[-1][0].axes
    assert "dashed: threshold" in ax.get_title()


# ------------------------------------------------ extras
def test_training_x_label_says_one_point_per_measurement_for_a_series_every_k_updates(
    tmp_path, saved
):
    run = {
        "series": {
            "loss": {"step": [0, 1, 2, 3], "value": [2.0, 1.5, 1.2, 1.0]},
            "trace_fisher": {"step": [0, 2], "value": [3.0, 2.0]},
        },
        "epochs": 1,
        "updates": 4,
    }
    report = {"entries": [_entry("m", {})], "meta": {}, "histories": {"run": run}}
    assert _plotting.plot_histories(report, tmp_path / "h.png")
    labels = {ax.get_title(): ax.get_xlabel() for ax in saved[-1][0].axes}
    assert labels[_plotting._short("loss")] == "epoch (one point per update)"
    assert labels[_plotting._short("trace_fisher")] == "epoch (one point per measurement)"


def test_glossary_defines_the_weight_of_the_fisher_trace():
    text = describe("trace_fisher").definition
    assert "w Σ_n" in text and "w the loss's weight" in text and "1/M" in text


def test_trajectory_caption_names_the_lanczos_residual():
    caption = _page._CAPTIONS["trajectory.png"]
    assert "residual" in caption and "λ_max" in caption
