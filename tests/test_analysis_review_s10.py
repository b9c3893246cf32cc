"""The analysis layer after review sweep 10: negative ``B_noise`` in critical_batch_size.png, one
probe refused up front, numeric labels, unconverged top eigenvalues, param groups at ``lr = 0``, a
missing checkpoint found before the data is read, the glossary true to the code, data that can be
read only once, and the NQM's batch-size unit. Each test failed on the code before the fix; the
numbers are checked against dense brute force (torch.func on tiny float64 problems)."""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab.analysis import _estimator_measures, _plotting
from curvlab.analysis._analyze import AnalysisWarning
from curvlab.analysis._checkpoint import _PREFIXES
from curvlab.analysis._diagnostics import MeasurementFailedWarning
from curvlab.analysis._glossary import describe
from curvlab.analysis._measures import measure
from curvlab.analysis._report import Report
from curvlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64
CE = nn.CrossEntropyLoss()


# ---------------------------------------------------------------------- helpers
def _mlp(seed: int = 0, sizes: tuple[int, ...] = (3, 4, 3)) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _classes(n: int = 12, d: int = 3, k: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, k, (n,), generator=g)


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _unflat(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _hessian(model: nn.Module, loss_fn: nn.Module, X, y) -> torch.Tensor:
    def f(theta):
        return loss_fn(functional_call(model, _unflat(model, theta), (X,)), y)

    return torch.func.hessian(f)(_flat(list(model.parameters())))


class Counted:
    """A re-iterable list of batches that counts how often it was read."""

    def __init__(self, batches) -> None:
        self.batches = list(batches)
        self.reads = 0

    def __iter__(self):  # noqa: ANN204
        self.reads += 1
        return iter(self.batches)


@pytest.fixture
def drawn(monkeypatch):
    """Every Figure the plotting module makes (to read what was drawn on it)."""
    figures: list[Figure] = []
    original = _plotting._figure

    def capture(width: float, height: float) -> Figure:
        fig = original(width, height)
        figures.append(fig)
        return fig

    monkeypatch.setattr(_plotting, "_figure", capture)
    return figures


def _errorbar_points(ax: Axes) -> dict[str, list[float]]:
    """label -> the y values of each errorbar series of ``ax``."""
    out = {}
    for container in ax.containers:
        line = container.lines[0]
        out[container.get_label()] = [float(v) for v in line.get_ydata()]
    return out


def _note(fig: Figure) -> str:
    return " ".join(t.get_text() for t in fig.texts)


# ------------------------------------------------------------- 1. B_noise <= 0 in the figure
def _seed57():
    """The reviewer's MLP (seed 57) whose exact B_noise is negative (an indefinite Hessian)."""
    with torch.random.fork_rng():
        torch.manual_seed(57)
        model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3)
        X = torch.randn(8, 2, dtype=DT)
        y = 3 * torch.randn(8, 1, dtype=DT)
    return model, X, y


def _b_noise_brute(model: nn.Module, X, y) -> tuple[float, float]:
    """Exact ``B_noise = tr(HΣ)/(GᵀHG)`` and ``B_simple = tr(Σ)/|G|²`` (MSE, one output)."""
    theta = _flat(list(model.parameters()))

    def loss(t, x, yy):
        return nn.functional.mse_loss(functional_call(model, _unflat(model, t), (x,)), yy)

    H = torch.func.hessian(lambda t: loss(t, X, y))(theta)
    g = vmap(grad(lambda t, x, yy: loss(t, x[None], yy[None])), in_dims=(None, 0, 0))(theta, X, y)
    G = g.mean(0)
    C = (g - G).T @ (g - G) / len(X)
    return float(torch.trace(H @ C) / (G @ H @ G)), float(torch.trace(C) / (G @ G))


def test_negative_b_noise_is_drawn_in_critical_batch_size_png(tmp_path, drawn):
    """B_noise <= 0 (tr(HΣ) < 0 with an indefinite Hessian) was dropped from the log axis without
    a word: the figure showed B_simple alone."""
    model, X, y = _seed57()
    exact, simple = _b_noise_brute(model, X, y)
    assert exact < 0  # a genuinely negative B_noise
    report = cl.analyze(
        model, nn.MSELoss(), (X, y), quantities=["noise_scale", "noise_scale_hessian"], nqm=False
    )
    v = report.values
    assert v["noise_scale"] == pytest.approx(simple, rel=1e-10)
    # 8 examples <= 30 probes: tr(HΣ) computed exactly (review s21), its stderr 0
    assert v["noise_scale_hessian"] == pytest.approx(exact, rel=1e-9)
    assert v["noise_scale_hessian_stderr"] == 0.0
    assert v["noise_scale_hessian"] < 0
    report.save(tmp_path / "r")
    (fig,) = [f for f in drawn if "critical batch size" in " ".join(a.get_title() for a in f.axes)]
    points = _errorbar_points(fig.axes[0])
    assert points["B_noise"] == pytest.approx([v["noise_scale_hessian"]], rel=1e-12)
    assert points["B_simple"] == pytest.approx([v["noise_scale"]], rel=1e-12)
    assert fig.axes[0].get_yscale() == "symlog"
    assert "B_noise at model = -0.089" in _note(fig)  # the exact value (review s21)


def test_zero_b_simple_non_finite_nqm_and_negative_history_values_are_drawn_or_named(
    tmp_path, drawn
):
    """B_simple = 0 and a non-finite NQM critical batch size were dropped silently (per
    checkpoint), and so were B_noise <= 0 and B_simple = 0 in the histories' panel."""
    entries = [
        {
            "label": lab,
            "values": {
                "noise_scale": bs,
                "noise_scale_hessian": bn,
                "noise_scale_hessian_stderr": 0.1,
            },
            "per_layer": {},
            "arrays": {},
            "errors": {},
            "seconds": 0.0,
        }
        for lab, bs, bn in (("a", 0.0, 2.0), ("b", 3.0, -0.5))
    ]
    nqm = {
        "curves": {
            "SGD": {"batch_size": [1.0, 2.0], "steps": [4.0, 2.0], "critical_batch_size": math.inf}
        }
    }
    histories = {
        "run": {
            "series": {
                "noise_scale_hessian": {"step": [0, 1, 2], "value": [1.5, -0.25, 0.0]},
                "noise_scale": {"step": [0, 1, 2], "value": [0.0, 2.0, 4.0]},
            }
        }
    }
    report = Report(entries=entries, meta={}, nqm=nqm, histories=histories)
    path = _plotting.plot_critical_batch(report.to_dict(), tmp_path / "c.png")
    assert path is not None
    fig = drawn[-1]
    hist_ax, ckpt_ax = fig.axes[:2]
    lines = {ln.get_label(): [float(v) for v in ln.get_ydata()] for ln in hist_ax.get_lines()}
    assert lines["B_noise run"] == [1.5, -0.25, 0.0]
    assert lines["B_simple run"] == [0.0, 2.0, 4.0]
    points = _errorbar_points(ckpt_ax)
    assert points["B_simple"] == [0.0, 3.0] and points["B_noise"] == [2.0, -0.5]
    note = _note(fig)
    assert "NQM at b = inf" in note  # the last checkpoint's prediction, named
    assert "B_noise at b = -0.5" in note and "B_simple at a = 0" in note


# ------------------------------------------------------------- 2. num_probes = 1
def test_analyze_refuses_one_probe_before_reading_the_data():
    """num_probes=1 was accepted; noise_scale_hessian then failed ("needs num_probes >= 2") and
    Tr(H)'s NaN standard error was blamed on an overflow, after the other quantities."""
    data = Counted([_classes()])
    with pytest.raises(ValueError, match=r"^num_probes .*>= 2.*got 1"):
        cl.analyze(
            _mlp(), CE, data, quantities=["trace_hessian", "noise_scale_hessian"], num_probes=1
        )
    assert data.reads == 0


def test_diagnostics_refuses_one_probe_when_made():
    with pytest.raises(ValueError, match=r"options\['num_probes'\] must be a positive int >= 2"):
        cl.Diagnostics(_mlp(), CE, ["trace_hessian"], every=1, options={"num_probes": 1})


def test_measure_with_one_probe_names_the_cause_not_an_overflow():
    with pytest.raises(ValueError, match="trace_hessian needs num_probes >= 2"):
        measure(_mlp(), CE, _classes(), ["trace_hessian"], options={"num_probes": 1})


def test_two_probes_give_tr_h_with_its_standard_error():
    """The smallest accepted count gives the Hutchinson mean and standard error (brute force:
    the same Rademacher probes' z^T H z, from cl.trace with the same seed)."""
    model, (X, y) = _mlp(), _classes()
    report = cl.analyze(model, CE, (X, y), quantities=["trace_hessian"], num_probes=2, nqm=False)
    direct = cl.trace(model, CE, (X, y), num_probes=2, seed=0)
    assert report.values["trace_hessian"] == pytest.approx(float(direct.value), rel=1e-10)
    assert math.isfinite(report.values["trace_hessian_stderr"])
    assert report.values["trace_hessian_stderr"] == pytest.approx(float(direct.stderr), rel=1e-10)


def _module(tmp_path: Path, marker: Path) -> Path:
    module = tmp_path / "mod_s10.py"
    module.write_text(
        "import torch\nfrom torch import nn\n"
        "def model():\n"
        f"    open({str(marker)!r}, 'a').write('model\\n')\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))\n"
        "def data():\n"
        f"    open({str(marker)!r}, 'a').write('data\\n')\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)\n"
    )
    return module


def test_the_command_refuses_one_probe_before_building_the_model(tmp_path, capsys):
    marker = tmp_path / "calls.txt"
    module = _module(tmp_path, marker)
    out = tmp_path / "out"
    code = main(["analyze", "--model", f"{module}:model", "--out", str(out), "--num-probes", "1"])
    assert code == 2 and not out.exists() and not marker.exists()
    assert "--num-probes must be >= 2" in capsys.readouterr().err


# ------------------------------------------------------------- 3. numeric labels
def test_numeric_labels_are_written_as_strings(tmp_path):
    """labels=[100, 200] crashed Report.save (html.escape of an int) after all the work."""
    model, (X, y) = _mlp(), _classes()
    sds = [{k: v + 0.01 * i for k, v in model.state_dict().items()} for i in range(2)]
    report = cl.analyze(
        model, CE, (X, y), checkpoint=sds, labels=[100, 200], quantities=["loss"], nqm=False
    )
    assert [e["label"] for e in report.entries] == ["100", "200"]
    for sd, entry in zip(sds, report.entries):  # the values belong to their checkpoints
        expected = CE(functional_call(model, sd, (X,)), y).item()
        assert entry["values"]["loss"] == pytest.approx(expected, rel=1e-12)
    report.save(tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [e["label"] for e in saved["entries"]] == ["100", "200"]
    assert "<th>100</th><th>200</th>" in (tmp_path / "r" / "report.html").read_text()


@pytest.mark.parametrize("labels", ["ab", [object(), "b"], [True, "b"]])
def test_labels_that_are_not_names_are_refused_before_the_data_is_read(labels):
    model = _mlp()
    sds = [model.state_dict(), model.state_dict()]
    data = Counted([_classes()])
    with pytest.raises(TypeError, match="labels must be"):
        cl.analyze(model, CE, data, checkpoint=sds, labels=labels, quantities=["loss"], nqm=False)
    assert data.reads == 0


def test_a_page_renders_a_report_with_numeric_labels_built_by_hand(tmp_path):
    entry = {"label": 7, "values": {"loss": 1.0}, "per_layer": {}, "arrays": {}, "errors": {}}
    Report(entries=[entry], meta={}).save(tmp_path / "r")
    assert "<th>7</th>" in (tmp_path / "r" / "report.html").read_text()


# ------------------------------------------------------------- 4. unconverged eigenvalues
def _few_products(monkeypatch, max_matvecs: int) -> None:
    """``top_eigenvalues`` with a cap of Hessian products (Lanczos stops unconverged there)."""
    real = _estimator_measures.eigenvalues
    monkeypatch.setattr(
        _estimator_measures, "eigenvalues", functools.partial(real, max_matvecs=max_matvecs)
    )


def _spread_problem():
    """A linear least-squares problem with Hessian diag(λ), λ spread over [0.1, 1] (D = 60)."""
    D = 60
    lam = torch.linspace(0.1, 1.0, D, dtype=DT)
    X = torch.diag((lam * D / 2).sqrt())  # H = (2/N) XᵀX = diag(λ) for MSE over N = D examples
    y = torch.zeros(D, 1, dtype=DT)
    return nn.Linear(D, 1, bias=False).to(DT), X, y, lam


def test_unconverged_top_eigenvalues_are_a_failure_in_report_page_and_diagnostics(
    tmp_path, monkeypatch
):
    """Lanczos that stopped unconverged was reported as success ("1 ± 1.2e-05 (then 1, 1, 1 …)"),
    with converged=False only in the arrays; sharpness raises in the same situation."""
    model, X, y, _ = _spread_problem()
    _few_products(monkeypatch, 8)
    with pytest.warns(AnalysisWarning, match="top_eigenvalues.*did not converge"):
        report = cl.analyze(
            model, nn.MSELoss(), (X, y), quantities=["loss", "top_eigenvalues"], nqm=False
        )
    entry = report.entries[0]
    assert "top_eigenvalues" not in entry["values"]
    assert "did not converge within 8 Hessian products" in entry["errors"]["top_eigenvalues"]
    assert "top_eigenvalues" in report.summary() and "did not converge" in report.summary()
    report.save(tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Failed quantities" in page and "did not converge" in page
    diag = cl.Diagnostics(model, nn.MSELoss(), ["loss", "top_eigenvalues"], every=1)
    with pytest.warns(MeasurementFailedWarning, match="did not converge"):
        record = diag.step(0, X, y)
    assert "top_eigenvalues" not in record["values"]
    assert "did not converge" in record["errors"]["top_eigenvalues"]


def test_converged_top_eigenvalues_match_eigvalsh(monkeypatch):
    model, X, y, lam = _spread_problem()
    report = cl.analyze(model, nn.MSELoss(), (X, y), quantities=["top_eigenvalues"], nqm=False, k=3)
    exact = torch.sort(lam, descending=True).values[:3].tolist()
    assert report.values["top_eigenvalues"] == pytest.approx(exact, rel=1e-6)
    assert report.entries[0]["arrays"]["top_eigenvalues"]["converged"] == [1.0]


# ------------------------------------------------------------- 5. param groups at lr = 0
def _frozen_backbone(kind: str, **kw):
    """An MLP whose first layer is in a group at lr = 0 (frozen), trained for two steps."""
    model = _mlp(3, (3, 4, 2))
    X, _ = _classes(10, seed=4)
    g = torch.Generator().manual_seed(5)
    Y = torch.randn(10, 2, generator=g, dtype=DT)
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.0},
        {"params": list(model[2].parameters()), "lr": 0.05},
    ]
    make = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
    opt = make(groups, lr=0.05, **kw)
    loss_fn = nn.MSELoss()
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(X), Y).backward()
        opt.step()
    return model, opt, loss_fn, X, Y


def test_critical_sharpness_with_a_frozen_group_matches_the_quadratic_along_the_head():
    """A group at lr = 0 was refused ("the learning rate is 0, so its update is zero") though
    the head moves. With the backbone frozen the MSE loss is quadratic along the update (a
    linear head): λ_c = 2/(s_c η) with s_c = −2 gᵀu/(uᵀHu), exactly."""
    model, opt, loss_fn, X, Y = _frozen_backbone("sgd")
    diag = cl.Diagnostics(
        model, loss_fn, ["critical_sharpness", "sharpness"], every=1, optimizer=opt
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", MeasurementFailedWarning)
        record = diag.step(0, X, Y)
    values = record["values"]
    H = _hessian(model, loss_fn, X, Y)
    params = list(model.parameters())
    G = torch.autograd.grad(loss_fn(model(X), Y), params)
    g = _flat(list(G))
    eta = 0.05
    u = torch.cat([torch.zeros(sum(p.numel() for p in params[:2]), dtype=DT), -eta * g[16:]])
    s_c = float(-2 * (g @ u) / (u @ H @ u))
    assert values["critical_sharpness"] == pytest.approx(2 / (s_c * eta), rel=1e-4)
    assert values["critical_sharpness_threshold"] == pytest.approx(2 / eta, rel=1e-12)
    # sharpness: λ_max of the whole H; no threshold, as for parameters the optimizer does not hold
    assert values["sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-3)
    assert "sharpness_threshold" not in values


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_preconditioned_sharpness_with_a_frozen_group_is_that_of_the_moving_parameters(wd):
    """A group at lr = 0 was refused ("leaves P^-1 H undefined"). It is now left out, like
    parameters the optimizer does not hold: λ_max(P⁻¹(H_hh + wd I)) over the head (brute force
    from the optimizer's state), threshold (2+2β₁)/((1−β₁)η) of the moving group."""
    model, opt, loss_fn, X, Y = _frozen_backbone("adam", weight_decay=wd)
    diag = cl.Diagnostics(
        model, loss_fn, ["preconditioned_sharpness", "critical_sharpness"], every=1, optimizer=opt
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", MeasurementFailedWarning)
        record = diag.step(0, X, Y)
    values = record["values"]
    H = _hessian(model, loss_fn, X, Y)[16:, 16:]  # the head's block (after 12 + 4 backbone entries)
    beta1, beta2 = opt.param_groups[1]["betas"]
    eps = opt.param_groups[1]["eps"]
    parts = []
    for p in model[2].parameters():
        st = opt.state[p]
        t = float(st["step"])
        parts.append((1 - beta1**t) * ((st["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps))
    s = torch.cat([q.reshape(-1) for q in parts]).rsqrt()
    A = s[:, None] * (H + wd * torch.eye(len(s), dtype=DT)) * s[None, :]
    exact = float(torch.linalg.eigvalsh(A)[-1])
    assert values["preconditioned_sharpness"] == pytest.approx(exact, rel=2e-3)
    assert values["preconditioned_sharpness_threshold"] == pytest.approx(
        (2 + 2 * beta1) / ((1 - beta1) * 0.05), rel=1e-12
    )
    assert values["critical_sharpness_threshold"] == pytest.approx(2 / 0.05, rel=1e-12)
    assert math.isfinite(values["critical_sharpness"]) and values["critical_sharpness"] > 0


# ------------------------------------------------------------- 6. a missing checkpoint
def test_a_missing_checkpoint_is_refused_before_the_data_is_read(tmp_path):
    data = Counted([_classes()])
    with pytest.raises(FileNotFoundError, match="tpyo.pt' does not exist"):
        cl.analyze(_mlp(), CE, data, checkpoint=[None, tmp_path / "tpyo.pt"], nqm=False)
    assert data.reads == 0


def test_the_command_refuses_a_missing_checkpoint_before_building_the_model(tmp_path, capsys):
    marker = tmp_path / "calls.txt"
    module = _module(tmp_path, marker)
    out = tmp_path / "out"
    code = main(
        ["analyze", "--model", f"{module}:model", "--out", str(out)]
        + ["--checkpoint", str(tmp_path / "tpyo.pt")]
    )
    assert code == 2 and not out.exists() and not marker.exists()
    assert "tpyo.pt' does not exist" in capsys.readouterr().err


# ------------------------------------------------------------- 7. the glossary
def test_trace_fisher_batch_scales_with_the_loss_terms_squared():
    """The glossary said N² (the examples); it is M², the loss terms: 400 for MSE, N = 10, two
    outputs."""
    model = _mlp(0, (3, 4, 2))
    X, _ = _classes(10)
    Y = torch.randn(10, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    r = {
        red: cl.analyze(
            model, nn.MSELoss(reduction=red), (X, Y), quantities=["trace_fisher_batch"], nqm=False
        ).values["trace_fisher_batch"]
        for red in ("mean", "sum")
    }
    assert r["sum"] / r["mean"] == pytest.approx(20.0**2, rel=1e-10)
    text = describe("trace_fisher_batch").scaling
    assert "M²" in text and "N²" not in text and "loss terms" in text


def test_glossary_thresholds_and_preconditioner_say_what_the_code_does():
    sharp = describe("sharpness_threshold").definition
    for word in ("dampening", "Nesterov", "weight decay", "differ", "lr = 0"):
        assert word in sharp
    pre = describe("preconditioned_sharpness").definition
    assert "H + wd·I" in pre and "lr = 0" in pre
    assert "AdamW" in describe("preconditioned_sharpness_threshold").definition


def test_docs_list_every_checkpoint_key_prefix_the_code_strips():
    text = (ROOT / "docs" / "analysis.md").read_text()
    for prefix in _PREFIXES:
        assert f"`{prefix}`" in text


# ------------------------------------------------------------- 8. data read only once
class SharedIterator:
    """An iterable whose ``__iter__`` returns one shared iterator (a one-shot iterable)."""

    def __init__(self, batches) -> None:
        self.it = iter(batches)

    def __iter__(self):  # noqa: ANN204
        return self.it


class OneShotDataset(torch.utils.data.IterableDataset):
    def __init__(self, batches) -> None:
        self.it = iter(batches)

    def __iter__(self):  # noqa: ANN204
        return self.it


def _batches():
    X, y = _classes(9)
    return [(X[:3], y[:3]), (X[3:7], y[3:7]), (X[7:], y[7:])]


@pytest.mark.parametrize(
    "make",
    [
        SharedIterator,
        lambda b: torch.utils.data.DataLoader(OneShotDataset(b), batch_size=None),
    ],
)
def test_data_that_yields_once_gets_the_clear_error(make):
    """It was reported as "data is empty: it yielded no batch" for every quantity."""
    with pytest.raises(TypeError, match="reads the data several times.*second reading"):
        cl.analyze(_mlp(), CE, make(_batches()), nqm=False)


def test_a_shuffling_loader_is_read_again_with_the_global_rng_kept():
    """The check of a second reading draws nothing from the caller's RNG, and the loss is the
    brute-force one over all examples."""
    X, y = _classes(12)
    loader = torch.utils.data.DataLoader(list(zip(X, y)), batch_size=5, shuffle=True)
    model = _mlp()  # (nn.Linear draws its initial values from the global RNG)
    state = torch.get_rng_state()
    report = cl.analyze(model, CE, loader, quantities=["loss"], nqm=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert report.values["loss"] == pytest.approx(CE(model(X), y).item(), rel=1e-12)


# ------------------------------------------------------------- 9. the NQM's batch-size unit
def test_nqm_axis_and_docs_say_the_batch_counts_loss_terms(tmp_path, drawn):
    nqm = {
        "curves": {
            "SGD": {
                "batch_size": [1.0, 2.0, 4.0],
                "steps": [8.0, 4.0, 3.0],
                "critical_batch_size": 2.0,
            }
        }
    }
    entry = {"label": "m", "values": {}, "per_layer": {}, "arrays": {}, "errors": {}}
    report = Report(entries=[entry], meta={}, nqm=nqm)
    assert _plotting.plot_nqm(report.to_dict(), tmp_path / "n.png") is not None
    assert "loss terms" in drawn[-1].axes[0].get_xlabel()
    assert "tokens for sequence models" in drawn[-1].axes[0].get_xlabel()
    text = " ".join((ROOT / "docs" / "analysis.md").read_text().split())
    assert (
        "B counts loss terms: tokens for sequence models; divide by tokens per sequence to read "
        "sequences" in text
    )


def test_the_nqm_of_a_sequence_model_gives_critical_batch_sizes_in_examples(tmp_path, drawn):
    # the NQM's batch counts loss terms (tokens); B_simple and B_noise count examples: the report
    # now carries the loss terms per example and the figure puts all three in examples
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 7)).double()
    x = torch.randint(0, 7, (6, 5))
    y = torch.randint(0, 7, (6, 5))
    y[:, :2] = -100  # 3 scored tokens per sequence
    report = cl.analyze(
        model,
        nn.CrossEntropyLoss(),
        (x, y),
        quantities=["noise_scale", "noise_scale_hessian", "spectral_density"],
        nqm=True,
        seed=0,
        on_error="raise",
    )
    assert report.nqm["terms_per_example"] == pytest.approx(3.0)
    for curve in report.nqm["curves"].values():
        assert curve["critical_batch_size_examples"] == pytest.approx(
            curve["critical_batch_size"] / 3.0
        )
    assert _plotting.plot_critical_batch(report.to_dict(), tmp_path / "c.png") is not None
    ax = drawn[-1].axes[0]
    assert ax.get_ylabel() == "critical batch size (examples)"
    nqm_points = [line for line in ax.get_lines() if line.get_label() == "NQM (SGD)"] or [
        c for c in ax.containers if c.get_label() == "NQM (SGD)"
    ]
    assert nqm_points


def test_one_probe_is_accepted_where_no_quantity_reads_it_and_numpy_labels_work(tmp_path):
    # self-review s10: num_probes=1 was refused even for ["loss", "top_eigenvalues"], and a
    # NumPy array of labels, accepted before, was refused
    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    report = cl.analyze(
        model, nn.CrossEntropyLoss(), (X, y), quantities=["loss"], num_probes=1, nqm=False
    )
    assert report.entries[0]["values"]["loss"] == pytest.approx(
        nn.CrossEntropyLoss()(model(X), y).item()
    )
    paths = []
    for i in range(2):
        torch.save(model.state_dict(), tmp_path / f"c{i}.pt")
        paths.append(tmp_path / f"c{i}.pt")
    report = cl.analyze(
        model,
        nn.CrossEntropyLoss(),
        (X, y),
        checkpoint=paths,
        labels=np.array([100, 200]),
        quantities=["loss"],
        nqm=False,
    )
    assert [e["label"] for e in report.entries] == ["100", "200"]
    with pytest.raises(ValueError, match=r">= 2 for \['trace_hessian'\]"):
        cl.analyze(model, nn.CrossEntropyLoss(), (X, y), quantities=["trace_hessian"], num_probes=1)
