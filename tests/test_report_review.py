"""The reporting side after review: non-finite values in figures, per-layer keys, the user's
matplotlib state, map_location and option checks, independent runs in sharpness.png, what
``save(overwrite=True)`` may delete, the NQM command's unreachable targets, and docs true to the
code. Each test failed on the code before the fix."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn

import curvlab as cl
from curvlab.analysis import _plotting as plotting
from curvlab.analysis import _report as report_mod
from curvlab.analysis._page import _CAPTIONS
from curvlab.analysis._report import Report
from curvlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
CE = nn.CrossEntropyLoss()


def _data(n: int = 24, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


class Unreadable:
    """Data that fails when read: an error raised with it came before any data was read."""

    def __iter__(self):  # noqa: ANN204
        raise AssertionError("the data was read before the arguments were checked")


def _entry(label: str, values: dict, per_layer: dict | None = None, arrays: dict | None = None):
    return {
        "label": label,
        "values": values,
        "per_layer": per_layer or {},
        "arrays": arrays or {},
        "errors": {},
        "seconds": 0.0,
    }


@pytest.fixture
def calls(monkeypatch):
    """Records the calls of a few drawing methods (``(method, args, kwargs)``)."""
    seen: list[tuple[str, tuple, dict]] = []
    for cls, method in ((Axes, "barh"), (Axes, "plot"), (Axes, "errorbar"), (Figure, "text")):
        original = getattr(cls, method)

        def wrapper(self, *args, _original=original, _method=method, **kwargs):  # noqa: ANN001, ANN202
            seen.append((_method, args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapper)
    return seen


# ----------------------------------------------------------- 1. non-finite values in figures
def _report_with_non_finite() -> Report:
    inf, nan = math.inf, math.nan
    return Report(
        entries=[
            _entry(
                "ckpt",
                {"loss": inf, "grad_norm": inf},
                {"grad_norm": {"0": inf, "2": 0.5}},
            )
        ],
        meta={"checkpoints_are": "one model", "layer_types": {"0": "Linear", "2": "Linear"}},
        histories={
            "run": {
                "series": {
                    "loss": {"step": [0, 1, 2], "value": [1.0, 5.0, nan]},
                    "critical_sharpness": {"step": [0, 1, 2], "value": [inf, 3.0, 4.0]},
                }
            }
        },
    )


def test_save_draws_finite_values_and_names_the_non_finite_ones(tmp_path, calls):
    """An inf per-layer value or a NaN/inf in a history crashed save() with "TypeError: '>' not
    supported between 'str' and 'int'" (the figures were drawn from to_dict's "inf" strings)."""
    report = _report_with_non_finite()
    out = report.save(tmp_path / "r")
    d = json.loads((out / "report.json").read_text())
    assert d["figures"] == ["training.png", "layers.png", "sharpness.png"]
    assert d["entries"][0]["per_layer"]["grad_norm"] == {"0": "inf", "2": 0.5}  # JSON as before
    bars = [args for method, args, _ in calls if method == "barh"]
    assert [list(b[1]) for b in bars] == [[0.5]]  # the inf layer has no bar
    lines = [(list(a[0]), list(a[1]), k.get("label")) for m, a, k in calls if m == "plot"]
    assert ([0.0, 1.0], [1.0, 5.0], "run") in lines  # training loss without the NaN
    assert ([1.0, 2.0], [3.0, 4.0], "run") in lines  # critical sharpness without the inf
    notes = [a[2] for m, a, _ in calls if m == "text" and "non-finite" in str(a[2])]
    assert len(notes) == 3
    assert any("grad_norm of 0 · Linear at ckpt = inf" in n for n in notes)
    assert "left out of the figures" in (out / "report.html").read_text()
    # a report read back from report.json (non-finite values as strings) saves the same figures
    again = Report.from_dict(d).save(tmp_path / "again")
    assert json.loads((again / "report.json").read_text())["figures"] == d["figures"]


def test_an_overflowing_checkpoint_saves(tmp_path):
    """The reviewer's case: a float32 overflow gives grad_norm = inf at layer "0"."""
    model = _mlp()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["2.weight"] = sd["2.weight"] * 1e38
    r = cl.analyze(model, CE, _data(32), checkpoint=sd, quantities=["loss", "grad_norm"], nqm=False)
    assert r.per_layer["grad_norm"]["0"] == math.inf
    out = r.save(tmp_path / "out")
    assert "layers.png" in json.loads((out / "report.json").read_text())["figures"]


def test_a_failed_save_removes_the_folder_it_created(tmp_path, monkeypatch):
    """A save that failed left an empty --out folder behind, and re-running was refused."""

    def broken(d, path):  # noqa: ANN001, ANN202
        raise RuntimeError("matplotlib exploded")

    name, _, title = report_mod._FIGURES[0]
    monkeypatch.setattr(report_mod, "_FIGURES", [(name, broken, title), *report_mod._FIGURES[1:]])
    report = Report(entries=[_entry("model", {"loss": 1.0})])
    with pytest.raises(RuntimeError, match="exploded"):
        report.save(tmp_path / "new" / "deeper")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="exploded"):
        report.save(kept, overwrite=True)
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]  # a folder it did not create stays


# ----------------------------------------------------------- 2. per-layer keys
def test_parameters_of_the_root_module_are_keyed_by_its_module_name():
    """nn.Linear as the whole model: grad_norm/trace_fisher were keyed 'weight'/'bias' while
    trace_hessian used '' (the module name)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    q = ["grad_norm", "trace_fisher", "trace_empirical_fisher", "trace_hessian"]
    torch.manual_seed(0)
    for model, keys in ((nn.Linear(4, 3).double(), {""}), (Scaled().double(), {"", "fc"})):
        r = cl.analyze(model, CE, _data(16, torch.float64), quantities=q, nqm=False, num_probes=5)
        for name in q:
            assert set(r.per_layer[name]) == keys, name
        assert set(r.meta["layer_types"]) == keys
        layers = r.per_layer["grad_norm"]
        assert math.sqrt(sum(v**2 for v in layers.values())) == pytest.approx(
            r["grad_norm"], rel=1e-12
        )
        assert sum(r.per_layer["trace_fisher"].values()) == pytest.approx(
            r["trace_fisher"], rel=1e-12
        )
    assert plotting.layer_label("", {"": "Linear"}) == "(model) · Linear"


# ----------------------------------------------------------- 3. the user's matplotlib state
def test_save_and_nqm_plots_leave_the_backend_and_pyplot_figures(tmp_path):
    """save() and plot_sweep() switched the user's backend to Agg (closing their figures)."""
    import matplotlib.pyplot as plt

    from curvlab.nqm import NQM, batch_size_sweep
    from curvlab.nqm._plotting import plot_optimal_lr, plot_sweep

    before = matplotlib.get_backend()
    plt.switch_backend("svg")
    try:
        mine = plt.figure()
        r = cl.analyze(_mlp(), CE, _data(), quantities=["loss", "grad_norm"], nqm=False)
        r.save(tmp_path / "r")
        sweep = batch_size_sweep(NQM.paper(d=50, bins=5), [1, 4], ("sgd",), target=0.1)
        plot_sweep(sweep, tmp_path / "s.png", solid="sgd", dashed=None)
        plot_optimal_lr(sweep, tmp_path / "lr.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [mine.number]
        assert (tmp_path / "r" / "layers.png").read_bytes()[:4] == b"\x89PNG"
        plt.close(mine)
    finally:
        plt.switch_backend(before)


# ----------------------------------------------------------- 4. map_location
def test_a_bad_map_location_is_named_before_anything_is_read(tmp_path, capsys):
    """map_location='banana' (or CUDA without CUDA) was reported as a corrupt checkpoint."""
    model = nn.Linear(4, 3)
    path = tmp_path / "good ckpt.pt"
    torch.save(model.state_dict(), path)
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 without CUDA)
    for location, why in (("banana", "is not a device"), (missing, "no cuda device|has \\d")):
        with pytest.raises(ValueError, match=f"map_location '{location}'.*({why})"):
            cl.analyze(model, CE, Unreadable(), checkpoint=str(path), map_location=location)
    for location, why in (("meta", "hold no values"), ("cpu:1", "one CPU device")):
        with pytest.raises(ValueError, match=f"map_location '{location}'.*{why}"):
            cl.analyze(model, CE, Unreadable(), checkpoint=str(path), map_location=location)
    # these still load ("cpu:0", which torch.load itself refuses, as "cpu")
    for ok in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, "cpu:0", torch.device("cpu", 0)):
        r = cl.analyze(
            model,
            CE,
            _data(),
            checkpoint=str(path),
            map_location=ok,
            nqm=False,
            quantities=["loss"],
        )
        with torch.no_grad():
            loss = float(CE(model(_data()[0]), _data()[1]))
        assert r["loss"] == pytest.approx(loss, rel=1e-6)
    module = tmp_path / "m.py"
    module.write_text("from torch import nn\ndef model():\n    return nn.Linear(4, 3)\n")
    out = tmp_path / "out"
    code = main(
        [
            "analyze",
            "--model",
            f"{module}:model",
            "--checkpoint",
            str(path),
            "--map-location",
            "banana",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "--map-location 'banana' is not a device" in err and "corrupt" not in err


# ----------------------------------------------------------- 5. estimator options
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("num_probes", 0),
        ("num_steps", 0),
        ("density_probes", 0),
        ("k", 0),
        ("chunk_size", 0),
        ("num_probes", 2.5),
        ("density_probes", True),
        ("nqm_target", 1.5),
        ("precond_power", 2.0),
    ],
)
def test_invalid_options_are_refused_before_the_data_is_read(option, value):
    """num_probes=0 and friends became per-quantity failures of a report that looked written;
    density_probes=0 was blamed on 'num_probes'."""
    with pytest.raises(ValueError, match=f"^{option} .*got {value!r}"):
        cl.analyze(_mlp(), CE, Unreadable(), **{option: value})


@pytest.mark.parametrize("flag", ["--num-probes", "--lanczos-steps", "--density-probes"])
def test_the_command_refuses_non_positive_estimator_options(tmp_path, capsys, flag):
    module = tmp_path / "m.py"
    module.write_text("from torch import nn\ndef model():\n    return nn.Linear(4, 3)\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--model", f"{module}:model", "--out", str(out), flag, "0"])
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a positive integer (>= 1), got '0'" in err


# ----------------------------------------------------------- 6. independent runs
def test_independent_runs_are_separate_labelled_points_in_sharpness_png(tmp_path, calls):
    """independent=True runs were drawn as one connected line labelled 'checkpoints'."""
    d = {
        "meta": {"checkpoints_are": "independent runs"},
        "entries": [_entry("bs64", {"sharpness": 0.62}), _entry("bs512", {"sharpness": 0.74})],
    }
    assert plotting.plot_sharpness(d, tmp_path / "s.png") is not None
    lines = [(list(a[0]), list(a[1]), k) for m, a, k in calls if m == "plot"]
    assert [(x, y, k["label"], k["ls"]) for x, y, k in lines] == [
        ([0.0], [0.62], "bs64", "none"),
        ([1.0], [0.74], "bs512", "none"),
    ]
    calls.clear()
    d["meta"]["checkpoints_are"] = "trajectory"  # a trajectory stays one connected line
    plotting.plot_sharpness(d, tmp_path / "t.png")
    lines = [(list(a[0]), list(a[1]), k) for m, a, k in calls if m == "plot"]
    assert [(x, y, k["label"]) for x, y, k in lines] == [([0.0, 1.0], [0.62, 0.74], "checkpoints")]


# ----------------------------------------------------------- 7. what overwrite may delete
def test_overwrite_removes_only_the_earlier_reports_own_figures(tmp_path):
    """save(dir, overwrite=True) deleted the user's own training.png and sharpness.png."""
    run = tmp_path / "my run"
    run.mkdir()
    mine = {"training.png": b"my curve", "sharpness.png": b"my plot", "model.pt": b"ckpt"}
    for name, data in mine.items():
        (run / name).write_bytes(data)
    plain = Report(entries=[_entry("m", {"loss": 1.0}, {"grad_norm": {"0": 1.0}})])
    plain.save(run, overwrite=True)
    for name, data in mine.items():
        assert (run / name).read_bytes() == data, name
    # an earlier curvlab report's figure that the new report does not draw is removed
    spectral = Report(entries=[_entry("m", {"top_eigenvalues": [2.0, 1.0]})])
    spectral.save(run, overwrite=True)
    assert json.loads((run / "report.json").read_text())["figures"] == ["spectrum.png"]
    assert not (run / "layers.png").exists()  # the first report's, not written by the second
    for name, data in mine.items():
        assert (run / name).read_bytes() == data, name
    plain.save(run, overwrite=True)
    assert not (run / "spectrum.png").exists()
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [*mine, "layers.png", "report.html", "report.json"]
    )


# ----------------------------------------------------------- 8. curvlab nqm, unreachable
@pytest.mark.parametrize("target", ["1e-20", "1e-300"])
def test_nqm_unreachable_target_is_named_before_anything_is_written(tmp_path, capsys, target):
    """--target 1e-20 wrote an all-inf CSV and a figure, then failed with "Data cannot be
    log-scaled"; --target 1e-300 raised ZeroDivisionError."""
    out = tmp_path / "nqm"
    args = ["nqm", "--out", str(out), "--batch-sizes", "1,4", "--powers", "0", "--dim", "100"]
    code = main([*args, "--bins", "10", "--target", target, "--no-ema"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"curvlab: error: --target {float(target):g}: no batch size" in err
    assert "raise --target" in err


def _old_steady_state_lr(a, s, w, target, hi):  # noqa: ANN001, ANN202 - the code before the fix
    def ss(lr):  # noqa: ANN001, ANN202
        return float((w * lr * s / (a * (2.0 - lr * a))).sum())

    if ss(hi) <= target:
        return hi
    lo = hi
    while ss(lo) > target and lo > 1e-300:
        lo /= 16.0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ss(mid) <= target else (lo, mid)
        if hi / lo < 1 + 1e-12:
            break
    return lo


def test_steady_state_lr_guard_keeps_reachable_targets_bit_for_bit():
    from curvlab.nqm import NQM
    from curvlab.nqm._tuning import _Problem, _steady_state_lr

    nqm = NQM.paper(d=100, bins=10)
    for batch, power in ((1.0, 0.0), (64.0, 0.5), (4096.0, 1.0)):
        for target in (0.5, 0.01, 1e-4, 1e-12, 1e-100):
            prob = _Problem(nqm, batch, power, target)
            hi = 2.0 / float(prob.a.max()) * (1.0 - 1e-9)
            args = (prob.a, prob.s, prob.w, target, hi)
            assert _steady_state_lr(*args) == _old_steady_state_lr(*args)
    prob = _Problem(nqm, 1.0, 0.0, 1e-300)
    hi = 2.0 / float(prob.a.max()) * (1.0 - 1e-9)
    with pytest.raises(ZeroDivisionError):
        _old_steady_state_lr(prob.a, prob.s, prob.w, 1e-300, hi)
    lr = _steady_state_lr(prob.a, prob.s, prob.w, 1e-300, hi)
    steady = float((prob.w * lr * prob.s / (prob.a * (2.0 - lr * prob.a))).sum())
    assert lr > 0 and steady <= 1e-300


# ----------------------------------------------------------- 9. docs and terminal
def test_summary_columns_keep_the_full_labels():
    """Labels were cut to 14 characters: run_lr0.1_step_1000.pt and ..._2000.pt printed alike."""
    labels = ["run_lr0.1_step_1000.pt", "run_lr0.1_step_2000.pt"]
    r = Report(entries=[_entry(labels[0], {"loss": 1.143}), _entry(labels[1], {"loss": 1.235})])
    header, row = r.summary().splitlines()[:2]
    assert header.split() == labels
    assert row.split() == ["loss", "1.143", "1.235"]
    assert header.index(labels[1]) + len(labels[1]) == len(row)  # the columns line up


def test_nqm_caption_matches_the_line_styles(tmp_path, calls, monkeypatch):
    """The caption said "dashed vertical lines" though the SGD line is solid."""
    vlines: list[str] = []
    original = Axes.axvline

    def axvline(self, x, **kwargs):  # noqa: ANN001, ANN202
        vlines.append(kwargs["ls"])
        return original(self, x, **kwargs)

    monkeypatch.setattr(Axes, "axvline", axvline)
    curves = {
        name: {"batch_size": [1, 2, 4], "steps": [100.0, 50.0, 30.0], "critical_batch_size": 2.0}
        for name in ("SGD", "preconditioned SGD (P = H^0.5)")
    }
    d = {"entries": [_entry("m", {})], "nqm": {"checkpoint": "m", "curves": curves}}
    plotting.plot_nqm(d, tmp_path / "n.png")
    assert vlines == ["-", "--"]
    caption = _CAPTIONS["nqm.png"]
    assert "dashed vertical lines" not in caption and "SGD solid" in caption


def test_metrics_jsonl_keys_and_csv_columns_are_documented_as_written(tmp_path):
    """docs/analysis.md left "arrays" out of the record keys; DiagnosticsConfig.csv said the
    columns were fixed by the first record (the file is rewritten with their union)."""
    from curvlab.analysis import DiagnosticsConfig

    model = _mlp()
    X, y = _data()
    with cl.Diagnostics(
        model,
        CE,
        quantities=["loss", "top_eigenvalues"],
        every=1,
        log_dir=tmp_path,
        options={"k": 2},
    ) as diag:
        diag.step(0, X, y)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    docs = (ROOT / "docs" / "analysis.md").read_text()
    sentence = re.search(r"one JSON line per measurement.*?optional `csv=True`", docs, re.S)
    assert sentence is not None
    documented = set(re.findall(r'"(\w+)"', sentence.group(0)))
    assert set(record) <= documented, set(record) - documented
    assert "arrays" in record
    text = " ".join(DiagnosticsConfig.__doc__.split())
    assert "columns fixed by the first record" not in text
    assert "union of the columns" in text


# ----------------------------------------------------------- 10. per-layer Tr(H) stderr
def test_per_layer_trace_hessian_has_its_standard_error_and_error_bars(tmp_path, calls):
    """analyze reported per-layer Tr(H) estimates without their standard errors."""
    model = _mlp().double()
    data = _data(24, torch.float64)
    r = cl.analyze(model, CE, data, quantities=["trace_hessian"], nqm=False, num_probes=7)
    direct = cl.trace(model, CE, data, num_probes=7, seed=0, by_layer=True)
    assert r.per_layer["trace_hessian"] == {k: float(v) for k, v in direct.by_layer.items()}
    assert r.per_layer["trace_hessian_stderr"] == {
        k: float(v) for k, v in direct.by_layer_stderr.items()
    }
    assert set(r.per_layer["trace_hessian_stderr"]) == {"0", "2"}
    r.save(tmp_path / "r")
    bars = [k for m, _, k in calls if m == "barh"]
    assert len(bars) == 1  # one panel: the standard errors are no quantity of their own
    assert list(bars[0]["xerr"]) == [r.per_layer["trace_hessian_stderr"][k] for k in ("0", "2")]
    assert np.isfinite(bars[0]["xerr"]).all()
    assert "± one standard error" in _CAPTIONS["layers.png"]
    doc = " ".join((ROOT / "docs" / "analysis.md").read_text().split())
    assert 'per_layer["trace_hessian_stderr"]' in doc


def test_a_numpy_seed_is_an_int_to_analyze():
    """``seed=np.int64(3)`` passed the option check but reached the generator unconverted
    (``TypeError: an integer is required``, after the data was read)."""
    model = _mlp()
    got = cl.analyze(model, CE, _data(), seed=np.int64(3), nqm=False, quantities=["trace_hessian"])
    want = cl.analyze(model, CE, _data(), seed=3, nqm=False, quantities=["trace_hessian"])
    assert got["trace_hessian"] == want["trace_hessian"]
    other = cl.analyze(model, CE, _data(), seed=4, nqm=False, quantities=["trace_hessian"])
    assert other["trace_hessian"] != want["trace_hessian"]  # the seed is used
