"""Review s13 of curvlab.nqm: Wen et al.'s tools refuse a gamma, steps, num_runs, C or theta0
they cannot use; seeds follow curvlab's rule (None means 0); ``nqm_prediction`` refuses the
nodes and weights ``NQM.from_spectrum`` refuses; ``optimal`` has no learning rate for a target
met at step 0 (and the sweep's CSV, plots and critical batch size cope); ``batch_size_sweep``
refuses empty optimizers and powers; the lower bound is documented as tr(H⁻¹C)/(2·target·B).

Numbers are checked against formulas written here (Theorem 4.1's ν, the lower bound's trace, the
risk at step 0), not against the code under test.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib.axes
import numpy as np
import pytest
import torch

import curvlab.nqm._plotting as plotting
from curvlab._rng import SEED_RANGE
from curvlab.analysis import nqm_prediction
from curvlab.nqm import (
    NQM,
    SweepResult,
    batch_size_sweep,
    critical_batch_size,
    plot_optimal_lr,
    plot_sweep,
    wen_bound,
    wen_expected_loss,
    wen_simulate,
)

A = np.array([[2.0, 1.4], [1.4, 1.0]])
C = 0.3 * np.eye(2)
TH0 = np.array([1.0, 1.0])


@pytest.fixture(scope="module")
def small() -> NQM:
    return NQM.paper(d=100, bins=10)


# ---------------------------------------------------------------- F1: wen gamma
@pytest.mark.parametrize("gamma", [math.nan, math.inf, -math.inf, True, "500"])
@pytest.mark.parametrize(
    "call",
    [
        lambda g: wen_bound(A, C, TH0, 0.01, gamma=g),
        lambda g: wen_expected_loss(A, C, TH0, 3, gamma=g),
        lambda g: wen_simulate(A, C, TH0, 3, num_runs=10, gamma=g),
    ],
    ids=["wen_bound", "wen_expected_loss", "wen_simulate"],
)
def test_wen_gamma_not_finite_is_refused(call: Any, gamma: object) -> None:
    """nan passed `g < g_min` and inf gave ν = inf: both returned steps 0.0, silently."""
    with pytest.raises(ValueError, match="gamma"):
        call(gamma)


@pytest.mark.parametrize("gamma", [None, 500.0, np.float64(1e4)])
def test_wen_bound_matches_theorem(gamma: float | None) -> None:
    lam = np.linalg.eigvalsh(A)
    g = 2 * lam[-1] / lam[0] if gamma is None else float(gamma)
    nu = max(2 * np.trace(C.T @ A @ C) / lam[0] ** 2, g * 0.5 * TH0 @ A @ TH0)
    got = wen_bound(A, C, TH0, 0.01, gamma=gamma)
    assert got.gamma == pytest.approx(g, rel=1e-12)
    assert got.nu == pytest.approx(nu, rel=1e-12)
    assert got.steps == pytest.approx(nu / 0.01 - g, rel=1e-12)


# ---------------------------------------------------------------- F4: wen steps / runs / shapes
@pytest.mark.parametrize("steps", [-1, 2.7, math.nan, math.inf, True, "3"])
def test_wen_steps_must_be_an_integer(steps: object) -> None:
    """-1 returned [L(θ_0)] and 2.7 ran 2 steps, silently."""
    with pytest.raises(ValueError, match="steps"):
        wen_expected_loss(A, C, TH0, steps)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        wen_simulate(A, C, TH0, steps, num_runs=10)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_runs", [1, 0, 2.5, True])
def test_wen_num_runs_must_be_an_integer_of_at_least_two(num_runs: object) -> None:
    """num_runs=1 gave a nan standard error with numpy's 'Degrees of freedom' warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="num_runs"):
            wen_simulate(A, C, TH0, 2, num_runs=num_runs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(theta0=np.ones(3)), "theta0"),
        (dict(theta0=np.array([1.0, math.nan])), "theta0"),
        (dict(C=np.eye(3)), "C"),
        (dict(C=np.array([[math.nan, 0.0], [0.0, 1.0]])), "C"),
    ],
)
def test_wen_theta0_and_c_must_fit_a(kwargs: dict[str, Any], name: str) -> None:
    """A theta0 of the wrong length was a raw matmul error naming nothing."""
    args = dict(A=A, C=C, theta0=TH0) | kwargs
    for call in (
        lambda: wen_bound(args["A"], args["C"], args["theta0"], 0.01),
        lambda: wen_expected_loss(args["A"], args["C"], args["theta0"], 2),
        lambda: wen_simulate(args["A"], args["C"], args["theta0"], 2, num_runs=5),
    ):
        with pytest.raises(ValueError, match=rf"^{name} must"):
            call()


def test_wen_a_with_nan_is_named_not_called_asymmetric() -> None:
    bad = np.array([[2.0, math.nan], [math.nan, 1.0]])
    with pytest.raises(ValueError, match="A must be finite"):
        wen_bound(bad, C, TH0, 0.01)


def test_wen_integral_steps_still_accepted() -> None:
    ref = wen_expected_loss(A, C, TH0, 3)
    assert ref.shape == (4,) and ref[0] == pytest.approx(0.5 * TH0 @ A @ TH0, rel=1e-15)
    for steps in (3.0, np.int64(3), np.float64(3.0)):
        np.testing.assert_array_equal(wen_expected_loss(A, C, TH0, steps), ref)  # type: ignore[arg-type]
    np.testing.assert_array_equal(wen_expected_loss(A, C, TH0, 0), ref[:1])


# ---------------------------------------------------------------- F3 (report item 3): seeds
def test_seed_range_is_curvlabs() -> None:
    from curvlab.nqm._validate import _SEED_RANGE  # (the NQM's copy, kept free of torch)

    assert _SEED_RANGE == SEED_RANGE


def test_simulate_seed_none_means_zero(small: NQM) -> None:
    """seed=None drew OS entropy: two identical calls differed."""
    a = small.simulate(5, 0.5, 4, num_runs=50, seed=None)
    b = small.simulate(5, 0.5, 4, num_runs=50, seed=0)
    np.testing.assert_array_equal(a.risk, b.risk)
    np.testing.assert_array_equal(a.stderr, b.stderr)


def test_wen_simulate_seed_none_means_zero_and_is_unbiased() -> None:
    mean, err = wen_simulate(A, C, TH0, 20, num_runs=4000, seed=None)
    mean0, _ = wen_simulate(A, C, TH0, 20, num_runs=4000, seed=0)
    np.testing.assert_array_equal(mean, mean0)
    exact = wen_expected_loss(A, C, TH0, 20)
    assert np.all(np.abs(mean[1:] - exact[1:]) <= 5 * err[1:])


@pytest.mark.parametrize("seed", [True, False, 1.5, "1", 2**64, -(2**63) - 1, torch.Generator()])
def test_bad_seeds_are_refused_naming_seed(small: NQM, seed: object) -> None:
    """True was taken as seed 1; 1.5 and -1 gave numpy's own errors, naming nothing."""
    with pytest.raises(ValueError, match="seed"):
        small.simulate(2, 0.5, 4, num_runs=5, seed=seed)
    with pytest.raises(ValueError, match="seed"):
        wen_simulate(A, C, TH0, 2, num_runs=5, seed=seed)  # type: ignore[arg-type]


def test_seeds_curvlab_takes_are_taken(small: NQM) -> None:
    """A negative seed is taken modulo 2**64 (as torch's manual_seed); numpy integers and a
    numpy Generator are accepted as before."""
    run = lambda s: small.simulate(3, 0.5, 4, num_runs=20, seed=s).risk  # noqa: E731
    np.testing.assert_array_equal(run(-1), run(2**64 - 1))
    np.testing.assert_array_equal(run(np.int64(7)), run(7))
    np.testing.assert_array_equal(run(np.random.default_rng(7)), run(7))
    w = lambda s: wen_simulate(A, C, TH0, 3, num_runs=20, seed=s)[0]  # noqa: E731
    np.testing.assert_array_equal(w(-(2**63)), w(2**63))


@pytest.mark.parametrize("steps", [math.nan, True, -1, 1.5])
def test_simulate_steps_named(small: NQM, steps: object) -> None:
    """nan gave Python's 'cannot convert float NaN to integer', naming nothing."""
    with pytest.raises(ValueError, match="steps"):
        small.simulate(steps, 0.5, 4, num_runs=5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- F2 (report item 2): nqm_prediction
NODES = np.geomspace(1e-2, 1, 6)
WEIGHTS = np.full(6, 1 / 6)
BS = [1, 4, 16, 64]


@pytest.mark.parametrize(
    "node, weight, name",
    [
        (math.nan, 0.2, r"nodes\[6\]"),
        (math.inf, 0.2, r"nodes\[6\]"),
        (5.0, -0.5, r"weights\[6\]"),
        (5.0, math.nan, r"weights\[6\]"),
        (5.0, math.inf, r"weights\[6\]"),
    ],
)
def test_prediction_refuses_what_from_spectrum_refuses(
    node: float, weight: float, name: str
) -> None:
    """They were dropped silently, positive_mass reported 1.0."""
    nodes, weights = np.r_[NODES, node], np.r_[WEIGHTS, weight]
    with pytest.raises(ValueError, match=name):
        nqm_prediction(nodes, weights, dim=100, batch_sizes=BS)
    with pytest.raises(ValueError):  # the same input, refused by the NQM itself
        NQM.from_spectrum(nodes, weights)


@pytest.mark.parametrize("pad", [0.0, math.nan, math.inf])
def test_prediction_drops_zero_weight_nodes_whatever_their_value(pad: float) -> None:
    """SLQ's padding (weight exactly 0) is dropped, as documented: same prediction."""
    clean = nqm_prediction(NODES, WEIGHTS, dim=100, batch_sizes=BS)
    padded = nqm_prediction(np.r_[NODES, pad], np.r_[WEIGHTS, 0.0], dim=100, batch_sizes=BS)
    assert padded["positive_mass"] == clean["positive_mass"]
    assert padded["curves"] == clean["curves"]


# ---------------------------------------------------------------- F5 (report item 5): step 0
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "ema"])
def test_optimal_met_at_step_zero_has_no_lr(small: NQM, optimizer: str) -> None:
    """The grid's first point (lr ~ 0.019, β = γ = 0) was returned as 'optimal'."""
    target = small.initial_risk() * 1.01
    for lr in (1e-3, 0.5, 1.9):  # every learning rate meets it at step 0
        assert small.risk(0, lr, 4) == pytest.approx(0.5 * np.sum(small.counts * small.h))
        assert small.risk(0, lr, 4) <= target
    res = small.optimal(4, target, optimizer)
    assert res.steps == 0
    assert math.isnan(res.lr) and math.isnan(res.effective_lr)
    assert math.isnan(res.momentum) == (optimizer == "momentum")
    assert math.isnan(res.ema) == (optimizer == "ema")
    assert (res.momentum if optimizer != "momentum" else 0.0) == 0.0
    assert (res.ema if optimizer != "ema" else 0.0) == 0.0


def test_optimal_just_below_initial_risk_still_has_an_lr(small: NQM) -> None:
    target = small.initial_risk() * 0.99
    res = small.optimal(4, target, "sgd")
    assert res.steps >= 1 and 0 < res.lr < 2 / small.h.max()
    assert small.risk(int(res.steps), res.lr, 4) <= target
    assert small.risk(int(res.steps) - 1, res.lr, 4) > target


@pytest.fixture(scope="module")
def step0_sweep(small: NQM) -> SweepResult:
    return batch_size_sweep(small, [1, 4, 16], ("sgd", "momentum"), target=2 * small.initial_risk())


def test_step0_sweep_csv_writes_nan_lr(step0_sweep: SweepResult, tmp_path: Path) -> None:
    path = step0_sweep.to_csv(tmp_path / "s.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for row in rows:
        assert float(row["steps"]) == 0
        assert math.isnan(float(row["lr"])) and math.isnan(float(row["effective_lr"]))
    assert math.isnan(critical_batch_size(step0_sweep, "sgd"))
    assert math.isnan(critical_batch_size(step0_sweep, "momentum"))


def _record(monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[float]], list[str]]:
    """Record the y data of every line drawn and every text written by the NQM plots."""
    ys: list[list[float]] = []
    texts: list[str] = []
    plot, text = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.text

    def rec_plot(self: Any, *args: Any, **kw: Any) -> Any:
        ys.append([float(v) for v in args[1]])
        return plot(self, *args, **kw)

    def rec_text(self: Any, x: Any, y: Any, s: str, *args: Any, **kw: Any) -> Any:
        texts.append(s)
        return text(self, x, y, s, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", rec_plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "text", rec_text)
    return ys, texts


def test_step0_optimal_lr_plot_draws_no_lr(
    step0_sweep: SweepResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plot_optimal_lr drew the invented learning rates."""
    ys, texts = _record(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_optimal_lr(step0_sweep, tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 0
    assert all(not y for y in ys)
    assert any("step 0" in t for t in texts)


def test_step0_sweep_plot_draws_no_zero_steps(
    step0_sweep: SweepResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0 steps have no place on the log axis: left out, and the figure says why."""
    ys, texts = _record(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_sweep(step0_sweep, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
    assert all(v > 0 for y in ys for v in y)  # the lower bound only
    assert ys[-1] == pytest.approx(step0_sweep.lower_bound)
    assert any("step 0" in t for t in texts)


def test_reached_sweep_plots_its_points(
    small: NQM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = batch_size_sweep(small, [1, 4], ("sgd",), target=0.1)
    ys, texts = _record(monkeypatch)
    plot_optimal_lr(sweep, tmp_path / "lr.png")
    plot_sweep(sweep, tmp_path / "s.png", solid="sgd", dashed=None)
    assert ys[0] == pytest.approx([r.effective_lr for r in sweep.select("sgd")])
    assert ys[1] == pytest.approx(list(sweep.steps("sgd")))
    assert not texts
    assert plotting._drawable(3.0) and not plotting._drawable(0.0)
    assert not plotting._drawable(math.inf)


# ---------------------------------------------------------------- F6: empty sweeps
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(optimizers=()), "optimizers"),
        (dict(optimizers=[]), "optimizers"),
        (dict(optimizers="sgd"), "optimizers"),
        (dict(precond_powers=()), "precond_powers"),
    ],
)
def test_sweep_refuses_empty_optimizers_and_powers(
    small: NQM, kwargs: dict[str, Any], name: str
) -> None:
    """An empty SweepResult was returned (its readers refused it later)."""
    with pytest.raises(ValueError, match=name):
        batch_size_sweep(small, [1, 2], **({"optimizers": ("sgd",)} | kwargs))


# ---------------------------------------------------------------- F7: the lower bound's doc
def test_lower_bound_is_the_trace_and_documented_so() -> None:
    nqm = NQM([1.0, 2.0], [4.0, 4.0])  # C != H: tr(H^-1 C) = 6, d = 2
    sweep = batch_size_sweep(nqm, [1, 2], ("sgd",), target=0.01)
    assert sweep.lower_bound == pytest.approx([(4 / 1 + 4 / 2) / (2 * 0.01 * b) for b in (1, 2)])
    for doc in (SweepResult.__doc__, plotting.__doc__):
        assert doc is not None and "tr(H⁻¹C)/(2·target·B)" in doc


@pytest.mark.parametrize("optimizer,field", [("momentum", "momentum"), ("ema", "ema")])
def test_optimal_unreachable_has_no_decay(optimizer: str, field: str) -> None:
    """A target no setting reaches: no learning rate and no β / γ either (they were 0.0)."""
    nqm = NQM([1.0, 0.5], [1.0, 1.0])
    res = nqm.optimal(batch_size=1, target=1e-20, optimizer=optimizer)
    assert math.isinf(res.steps)
    assert math.isnan(res.lr) and math.isnan(getattr(res, field))
