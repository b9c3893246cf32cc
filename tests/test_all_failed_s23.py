"""Review s23 (fixer AF): a run where every *requested* quantity failed is a failure, even where a
failed quantity gave values beside it; and ``Report.from_dict`` refuses a history without
``"series"``.

The problem: a linear model that fits its batch exactly, so that every per-example gradient is 0
(checked here by dense float64 ``torch.func``, nothing imported from the package's reference
code). ``noise_scale`` (``tr(Σ)/‖G‖²``) and ``noise_scale_hessian`` (``tr(HΣ)/(GᵀHG)``) are then
0/0 and fail, but they still give ``trace_covariance`` (``tr(Σ) = 0``) and
``trace_hessian_covariance``, ``grad_hessian_grad`` (both 0), ``noise_scale_hessian_hvps``. Until
review s23 those side values made a run that measured none of its requested quantities read as
a (partial) success: ``analyze`` returned a report of ``{'trace_covariance': 0.0}`` and
``Diagnostics`` wrote a record of side values, warning "the other quantities were measured".
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab.analysis import AnalysisError, AnalysisWarning, MeasurementFailedWarning, Report


def _exact_fit() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``Linear(3, 2)`` without bias holding ``W``, targets ``Y = X Wᵀ``: every per-example
    gradient of the squared error is 0 (asserted by brute force)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    w = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    model = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w)
        y = model(x)  # the model's own output: the residual is exactly 0
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
        return nn.functional.mse_loss(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    assert all(bool((g == 0).all()) for g in per_example.values())  # the premise, exactly
    return model, x, y


def _brute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    params = {k: v.detach() for k, v in model.named_parameters()}
    return float(nn.functional.mse_loss(functional_call(model, params, (x,)), y))


# ------------------------------------------------------ 1. analyze: every requested one failed
@pytest.mark.parametrize(
    "quantities",
    [["noise_scale"], ["noise_scale_hessian"], ["noise_scale", "noise_scale_hessian"]],
)
def test_analyze_raises_when_every_requested_quantity_failed(quantities: list[str]) -> None:
    """Was: a report of the side values (``{'trace_covariance': 0.0}``), no AnalysisError."""
    model, x, y = _exact_fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)  # (none is issued: it raises)
        with pytest.raises(AnalysisError) as info:
            cl.analyze(model, nn.MSELoss(), (x, y), quantities=quantities, num_probes=10)
    failed = [r.split(" at ")[0] for r in info.value.reasons]
    assert failed == quantities
    # the values given beside them are kept in the error, as the failures' text promises
    given = info.value.given["model"]
    if "noise_scale" in quantities:
        assert given["trace_covariance"] == 0.0  # tr(Σ) of zero gradients
    if "noise_scale_hessian" in quantities:
        assert given["trace_hessian_covariance"] == 0.0
        assert given["grad_hessian_grad"] == 0.0
    assert "trace_covariance" in str(info.value) or "noise_scale" not in quantities
    assert "noise_scale" not in given and "noise_scale_hessian" not in given


def test_analyze_keeps_the_report_when_another_requested_quantity_was_measured() -> None:
    """``loss`` measured beside the failing ``noise_scale``: a report (the loss equal to the
    brute-force one, ``trace_covariance`` 0 kept) and a warning naming ``noise_scale``."""
    model, x, y = _exact_fit()
    with pytest.warns(AnalysisWarning, match="noise_scale"):
        report = cl.analyze(model, nn.MSELoss(), (x, y), quantities=["loss", "noise_scale"])
    expected = _brute_loss(model, x, y)
    # the same float64 sums in another order: a few ulps of the per-example squares' scale
    tol = 8 * torch.finfo(torch.float64).eps * max(1.0, float(y.pow(2).mean()))
    assert abs(report.values["loss"] - expected) <= tol
    assert report.values["trace_covariance"] == 0.0
    assert "noise_scale" not in report.values
    assert set(report.entries[-1]["errors"]) == {"noise_scale"}


# ------------------------------------------------- 2. Diagnostics: no record, no partial success
def test_diagnostics_writes_no_record_when_the_only_requested_quantity_failed(
    tmp_path: Path,
) -> None:
    """Was: a record of side values only, warned of as "the other quantities were measured"."""
    model, x, y = _exact_fit()
    diag = cl.Diagnostics(
        model, nn.MSELoss(), quantities=["noise_scale_hessian"], every=1, log_dir=tmp_path
    )
    with pytest.warns(MeasurementFailedWarning) as caught:
        assert diag.step(0, x, y) is None
    diag.close()
    messages = [str(w.message) for w in caught]
    assert not any("the other quantities were measured" in m for m in messages)
    assert diag.records == []
    assert diag.history("grad_hessian_grad") == ([], [])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("event") for line in lines] == ["measurement_failed"]
    # the side values are in the event's text, as the failure's message says they are given
    error = lines[0]["error"]
    assert "noise_scale_hessian: ValueError" in error
    for name in ("trace_hessian_covariance = 0", "grad_hessian_grad = 0"):
        assert name in error


def test_diagnostics_keeps_the_record_when_another_requested_quantity_was_measured() -> None:
    model, x, y = _exact_fit()
    diag = cl.Diagnostics(model, nn.MSELoss(), quantities=["loss", "noise_scale"], every=1)
    with pytest.warns(
        MeasurementFailedWarning, match=r"the other quantities were measured \(loss\)"
    ):
        record = diag.step(0, x, y)
    assert record is not None
    expected = _brute_loss(model, x, y)
    tol = 8 * torch.finfo(torch.float64).eps * max(1.0, float(y.pow(2).mean()))
    assert abs(record["values"]["loss"] - expected) <= tol
    assert record["values"]["trace_covariance"] == 0.0
    assert set(record["errors"]) == {"noise_scale"}


# ---------------------------------------------- 3. Report.from_dict: a history needs its series
def _report_dict() -> dict:
    entry = {"label": "model", "values": {"loss": 1.0}, "per_layer": {}, "arrays": {}}
    return {"entries": [entry], "meta": {}, "nqm": None, "histories": {}}


@pytest.mark.parametrize(
    ("history", "what"),
    [
        ({"batch_size": 8}, r"histories\['run'\] has no 'series' key"),
        ([1, 2], r"histories\['run'\] is list, not a dict"),
        ({"series": [1]}, r"histories\['run'\]\['series'\] is list, not a dict"),
        ({"series": {"loss": {"step": [0]}}}, r"'loss'\] has no 'value' key"),
        ({"series": {"loss": [0.5]}}, r"\['series'\]\['loss'\] is list, not a dict"),
        (
            {"series": {"loss": {"step": [0, 1], "value": [0.5]}}},
            r"\['loss'\] has 2 steps but 1 values",
        ),
    ],
)
def test_from_dict_refuses_a_history_without_its_series(
    history: object, what: str, tmp_path: Path
) -> None:
    """Was: accepted, then ``Report.save`` failed in ``plot_histories`` with a raw
    ``KeyError: 'series'`` (or a TypeError) after writing report.json."""
    d = _report_dict()
    d["histories"] = {"run": history}
    with pytest.raises(ValueError, match=what):
        Report.from_dict(d)


def test_from_dict_keeps_a_well_formed_history(tmp_path: Path) -> None:
    d = _report_dict()
    d["histories"] = {
        "run": {"series": {"loss": {"step": [0, 1], "value": [0.5, "nan"]}}, "batch_size": 8}
    }
    report = Report.from_dict(d)
    value = report.histories["run"]["series"]["loss"]["value"]
    assert value[0] == 0.5 and value[1] != value[1]  # "nan" read back as a float NaN
    report.save(tmp_path / "out")
    assert (tmp_path / "out" / "training.png").is_file()
