"""Review s10 of curvlab.nqm: the grid edges of ``optimal`` (decay grids, the stability limit),
the units of the NQM prediction, argument checks, overwriting files, empty schedules.

Every step count is confirmed by a recursion written here, independent of the engine: the affine
second-moment recursions of momentum and EMA powered with ``numpy.linalg.matrix_power``, and the
closed form of plain SGD (eq. 4).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import curvlab.nqm._search as search
from curvlab.analysis import nqm_prediction
from curvlab.nqm import NQM, batch_size_sweep, plot_optimal_lr, plot_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper() -> NQM:
    return NQM.paper()


# ---------------------------------------------------------------- independent recursions
def ema_risk(nqm: NQM, t: int, lr: float, gamma: float, batch: float) -> float:
    """E[L(θ̃_t)] of SGD + EMA, p = 0: state (E θ², E θ̃², E θθ̃, 1) powered t times."""
    total = 0.0
    for h, c, n, v0 in zip(nqm.h, nqm.c, nqm.counts, nqm.init_var):
        q, ns, g = 1 - lr * h, lr * lr * c / batch, gamma
        M = np.array(
            [
                [q * q, 0, 0, ns],
                [(1 - g) ** 2 * q * q, g * g, 2 * g * (1 - g) * q, (1 - g) ** 2 * ns],
                [(1 - g) * q * q, 0, g * q, (1 - g) * ns],
                [0, 0, 0, 1.0],
            ]
        )
        total += n * 0.5 * h * (np.linalg.matrix_power(M, int(t)) @ [v0, v0, v0, 1.0])[1]
    return float(total)


def momentum_risk(nqm: NQM, t: int, lr: float, beta: float, batch: float) -> float:
    """E[L(θ_t)] of heavy-ball momentum, p = 0: state (E θ², E m², E θm, 1) powered t times."""
    total = 0.0
    for h, c, n, v0 in zip(nqm.h, nqm.c, nqm.counts, nqm.init_var):
        q, s, b = 1 - lr * h, c / batch, beta
        M = np.array(
            [
                [q * q, lr * lr * b * b, -2 * q * lr * b, lr * lr * s],
                [h * h, b * b, 2 * h * b, s],
                [q * h, -lr * b * b, b * (q - lr * h), -lr * s],
                [0, 0, 0, 1.0],
            ]
        )
        total += n * 0.5 * h * (np.linalg.matrix_power(M, int(t)) @ [v0, 0.0, 0.0, 1.0])[0]
    return float(total)


def sgd_steps(nqm: NQM, lr: float, batch: float, target: float) -> float:
    """Smallest t with risk ≤ target for plain SGD, p = 0 (eq. 4 per bin, risk non-increasing;
    ``inf`` beyond 2^48 steps)."""
    h, c, n, v0 = nqm.h, nqm.c, nqm.counts, nqm.init_var

    def risk(t: int) -> float:
        r2t = np.exp(2 * t * np.log(np.abs(1 - lr * h)))
        noise = lr * c / (2 * batch * (2 - lr * h))
        return float(np.sum(n * (r2t * 0.5 * h * v0 + (1 - r2t) * noise)))

    hi = 1
    while risk(hi) > target:
        hi *= 2
        if hi > 2**48:
            return float("inf")
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if risk(mid) <= target else (mid + 1, hi)
    return lo


# ---------------------------------------------------------------- 1. decay grids grow
def test_ema_grid_extends_below_its_edge(paper: NQM) -> None:
    """B = 1, target 1e-3: was 17,019,822 steps at 1 − γ = 1e-6 (the edge), 54% more than a
    grid reaching 1e-8 finds."""
    res = paper.optimal(1, 1e-3, "ema")
    wide = paper.optimal(1, 1e-3, "ema", decay_min=1e-8)
    assert 1 - res.ema < 0.99e-6 and not res.at_decay_floor
    assert res.steps <= wide.steps * 1.001  # the default grid finds what the wide grid finds
    t = int(res.steps)
    assert (
        ema_risk(paper, t - 1, res.lr, res.ema, 1) > 1e-3 >= ema_risk(paper, t, res.lr, res.ema, 1)
    )


def test_momentum_grid_extends_below_its_edge(paper: NQM) -> None:
    """B = 1, target 0.01: was 6,001,755 steps at 1 − β = 1e-4 (the edge); 1 − β ≈ 1.9e-6 takes
    14% fewer, a crossing that stays crossed."""
    res = paper.optimal(1, 0.01, "momentum")
    wide = paper.optimal(1, 0.01, "momentum", decay_min=1e-6)
    assert 1 - res.momentum < 0.99e-4 and not res.at_decay_floor
    assert res.steps <= wide.steps * 1.001 and res.steps < 0.9 * 6_001_755
    t, lr, b = int(res.steps), res.lr, res.momentum
    assert momentum_risk(paper, t - 1, lr, b, 1) > 0.01 >= momentum_risk(paper, t, lr, b, 1)
    for later in (t + 1000, int(1.5 * t), 2 * t, 10 * t):  # not a transient dip
        assert momentum_risk(paper, later, lr, b, 1) <= 0.01


def test_decay_floor_is_flagged_and_warned(paper: NQM, monkeypatch) -> None:
    """A best γ on the floor of the extension says so (flag and warning)."""
    monkeypatch.setattr(search, "DECAY_FLOOR", 1e-6)  # the floor at the first grid's edge
    with pytest.warns(RuntimeWarning, match="floor of the search"):
        res = paper.optimal(1, 1e-3, "ema")
    assert res.at_decay_floor and 1 - res.ema == pytest.approx(1e-6, rel=1e-6)


def test_interior_decays_are_not_flagged(paper: NQM, recwarn) -> None:
    for opt in ("momentum", "ema"):
        res = paper.optimal(256, 0.01, opt)
        assert not res.at_decay_floor
    assert not [w for w in recwarn if "floor" in str(w.message)]


# ---------------------------------------------------------------- 2. SGD at the stability limit
def test_sgd_reaches_the_fewest_steps_next_to_the_stability_limit(paper: NQM) -> None:
    """p = 0, B = 2^26: was 6780 steps at lr 1.9664 (1.7% below 2/h_1), where 6672 suffice."""
    B = 2.0**26
    res = paper.optimal(B, 0.01)
    assert res.steps == sgd_steps(paper, res.lr, B, 0.01)
    gaps = np.geomspace(1e-6, 0.05, 150)  # brute force: a dense scan up to the limit
    brute = min(sgd_steps(paper, 2.0 * (1 - g), B, 0.01) for g in gaps)
    assert brute == 6672 and res.steps <= brute
    assert 2.0 * (1 - 1e-3) < res.lr < 2.0


def test_sgd_on_a_rugged_landscape_next_to_the_limit() -> None:
    """A random spectrum, B = 16: was 13 steps where 12 is reachable."""
    rng = np.random.default_rng(1)
    h = np.sort(rng.lognormal(0, 2, 40))[::-1]
    m = NQM(
        h, rng.lognormal(0, 1, 40), init_var=rng.uniform(0.1, 3, 40), counts=rng.integers(1, 50, 40)
    )
    target = 0.05 * m.initial_risk()
    res = m.optimal(16, target)
    limit = 2 / h.max()
    brute = min(sgd_steps(m, limit * (1 - g), 16, target) for g in np.geomspace(1e-6, 0.6, 800))
    assert brute == 12 and res.steps == 12 == sgd_steps(m, res.lr, 16, target)


def test_search_next_to_the_limit_only_where_needed(paper: NQM, monkeypatch) -> None:
    """Far from the limit (B = 256) the search is the lr grid and its two zoom rounds, as before."""
    rounds: list[int] = []
    real = search._Problem.run

    def counting(self, lr, beta, gamma):  # type: ignore[no-untyped-def]
        rounds.append(np.size(lr))
        return real(self, lr, beta, gamma)

    monkeypatch.setattr(search._Problem, "run", counting)
    paper.optimal(256, 0.01)
    assert len(rounds) == 3
    rounds.clear()
    paper.optimal(2.0**20, 0.01)
    assert len(rounds) > 3


# ---------------------------------------------------------------- 3. units of the prediction
def test_prediction_states_its_batch_units_and_converts_to_examples() -> None:
    nodes, weights = [1.0, 0.1, 0.01], [0.2, 0.3, 0.5]
    plain = nqm_prediction(nodes, weights, 100, [1, 4, 16, 64, 256])
    assert plain["batch_size_unit"] == "loss terms" and plain["terms_per_example"] is None
    assert "tokens" in plain["note"] and "tokens" in (nqm_prediction.__doc__ or "")
    per = nqm_prediction(nodes, weights, 100, [1, 4, 16, 64, 256], terms_per_example=np.int64(8))
    assert per["terms_per_example"] == 8.0
    for label, curve in per["curves"].items():
        assert curve["critical_batch_size"] == plain["curves"][label]["critical_batch_size"]
        assert curve["critical_batch_size_examples"] == curve["critical_batch_size"] / 8
    with pytest.raises(ValueError, match="terms_per_example"):
        nqm_prediction(nodes, weights, 100, [1, 4], terms_per_example=0)


def test_one_sequence_gradient_covariance_is_h_over_tokens() -> None:
    """Why B counts tokens: the true-Fisher covariance of one sequence's gradient (its mean over T
    tokens, labels drawn from the model) has trace tr(GGN of the mean loss) / T, exactly."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    N, T, V, E = 3, 4, 3, 2
    params = torch.randn(2 * V * E, dtype=torch.float64, generator=gen)
    x = torch.randint(0, V, (N, T), generator=gen)

    def logits(p, xn):  # (T, V)
        return torch.tanh(p[: V * E].view(V, E)[xn]) @ p[V * E :].view(V, E).T

    ggn, cov = 0.0, 0.0
    for n in range(N):
        J = torch.autograd.functional.jacobian(lambda p, xn=x[n]: logits(p, xn), params)
        pr = torch.softmax(logits(params, x[n]), -1)
        for t in range(T):
            M = torch.diag(pr[t]) - torch.outer(pr[t], pr[t])  # Cov of the label score
            term = float(torch.trace(J[t].T @ M @ J[t]))
            ggn += term / (N * T)
            cov += term / T**2 / N  # positions independent: Cov of (1/T) Σ_t score_t
    assert cov == pytest.approx(ggn / T, rel=1e-12)


# ---------------------------------------------------------------- 4. argument checks
def test_init_var_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="init_var"):  # was mapped onto the kept nodes
        NQM.from_spectrum([1.0, 2.0, 3.0], [1.0, 0.0, 1.0], init_var=[5.0, 7.0])
    with pytest.raises(ValueError, match="init_var"):  # was a raw numpy broadcast error
        NQM([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], init_var=[5.0, 7.0])
    m = NQM.from_spectrum([1.0, 2.0, 3.0], [1.0, 0.0, 1.0], init_var=[5.0, 6.0, 7.0])
    assert m.init_var.tolist() == [5.0, 7.0]
    assert NQM([1.0, 2.0], [1.0, 1.0], init_var=[3.0]).init_var.tolist() == [3.0, 3.0]


def test_simulate_refuses_fractional_record_steps() -> None:
    n = NQM.paper(d=100, bins=10)
    with pytest.raises(ValueError, match="record"):  # was recorded at steps [1, 2]
        n.simulate(5, 0.1, 1, record=[1.7, 2.9], num_runs=3)
    res = n.simulate(5, 0.1, 1, record=np.array([1.0, 3.0]), num_runs=3)
    assert res.steps.tolist() == [1, 3]


@pytest.mark.parametrize("max_steps", [2**62, 2**66])
def test_steps_to_target_refuses_max_steps_beyond_risk(max_steps: int) -> None:
    with pytest.raises(ValueError, match="max_steps"):  # 2**66 gave a raw OverflowError
        NQM([1.0], [0.0]).steps_to_target(0.05, 1e-31, 1, momentum=1 - 1e-12, max_steps=max_steps)
    assert NQM([1.0], [0.0]).steps_to_target(0.05, 0.1, 1, max_steps=2**62 - 1) == 11


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": 1.5}, r"target .* got 1\.5"),  # was NaN critical batch sizes
        ({"target": 1.0}, "target"),
        ({"target": -0.1}, r"got -0\.1"),  # was the scaled value -1.175
        ({"dim": 0}, "dim"),  # was "weights are all zero"
        ({"num_probes": 1.5}, "num_probes must be an integer"),
        ({"num_probes": np.int64(2)}, "does not divide"),
    ],
)
def test_prediction_refuses_bad_arguments_naming_them(kwargs, match) -> None:
    args = {
        "nodes": [1.0, 0.1, 0.01],
        "weights": [0.2, 0.3, 0.5],
        "dim": 100,
        "batch_sizes": [1, 4],
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        nqm_prediction(**args)


def test_prediction_accepts_numpy_integer_probes() -> None:
    res = nqm_prediction([1.0, 0.1, 0.01], [0.2, 0.3, 0.5], 100, [1, 4], num_probes=np.int64(1))
    assert res["num_probes"] == 1  # was refused, "does not divide the 3 nodes"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"refine": 1.5}, "refine"),
        ({"decay_points": 3.5, "optimizer": "ema"}, "decay_points"),
        ({"lr_points_per_decade": 2.5}, "lr_points_per_decade"),
        ({"lr_decades": float("inf")}, "lr_decades"),
    ],
)
def test_grid_options_of_the_wrong_type_are_named(kwargs, match) -> None:
    n = NQM.paper(d=100, bins=10)
    with pytest.raises(ValueError, match=match):  # were raw TypeErrors
        n.optimal(4, 0.1, **kwargs)
    with pytest.raises(ValueError, match=match):  # before the first curve of a sweep
        batch_size_sweep(
            n,
            [1, 4],
            (kwargs.get("optimizer", "sgd"),),
            (0.0,),
            0.1,
            **{k: v for k, v in kwargs.items() if k != "optimizer"},
        )


def test_grid_options_accept_numpy_integers() -> None:
    n = NQM.paper(d=100, bins=10)
    assert n.optimal(4, 0.1, refine=np.int64(1)) == n.optimal(4, 0.1, refine=1)


# ---------------------------------------------------------------- 5. files are not replaced
def test_plots_and_csv_refuse_to_replace_files(tmp_path) -> None:
    sweep = batch_size_sweep(NQM.paper(d=100, bins=10), [1, 4], ("sgd",), (0.0,), 0.1)
    writers = {
        "s.png": lambda p, **kw: plot_sweep(sweep, p, solid="sgd", dashed=None, **kw),
        "lr.png": lambda p, **kw: plot_optimal_lr(sweep, p, **kw),
        "s.csv": lambda p, **kw: sweep.to_csv(p, **kw),
    }
    for name, write in writers.items():
        path = tmp_path / name
        path.write_text("precious")
        with pytest.raises(FileExistsError, match="overwrite=True"):
            write(path)
        assert path.read_text() == "precious"
        assert write(path, overwrite=True) == path and path.read_bytes() != b"precious"


def test_sweep_example_runs_twice_in_one_folder(tmp_path, monkeypatch) -> None:
    script = ROOT / "examples" / "nqm_batch_size_sweep.py"
    argv = [str(script), "--out", str(tmp_path), "--max-log2-batch", "1", "--target", "0.1"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.syspath_prepend(str(script.parent))  # as `python examples/...` puts it first
    for _ in range(2):  # the second run replaces the example's own outputs
        runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "nqm_sweep.csv").stat().st_size > 0


# ---------------------------------------------------------------- 6. empty schedules
def test_schedule_for_a_target_met_at_step_zero_has_no_piece() -> None:
    n = NQM.paper(d=100, bins=10)
    res = n.optimize_schedule(4, target=100.0, pieces=5)
    assert res.steps == 0 and res.lrs.size == 0  # was lrs=[1.0], invented
    assert res.boundaries.tolist() == [0] and res.risk == n.initial_risk()


def test_docs_state_the_transient_dip_of_momentum_at_power_one(paper: NQM, monkeypatch) -> None:
    """At p = 1 every effective curvature is 1: all bins oscillate in phase, and the extended β
    grid finds a crossing the risk leaves again (docs/nqm.md)."""
    res = paper.optimal(1, 0.01, "momentum", 1.0)
    t = int(res.steps)
    assert t == 660_349 and 1 - res.momentum == pytest.approx(1e-5, rel=0.01)
    risk = paper.risk(np.array([t - 1, t, 823_739, 10**12]), res.lr, 1, res.momentum, 1.0)
    assert risk[0] > 0.01 >= risk[1] and risk[2] > 0.01  # above the target again at 1.25 t
    assert risk[3] == pytest.approx(0.0094, abs=1e-4)  # ... and settles below it
    monkeypatch.setattr(search, "DECAY_FLOOR", 1e-4)  # the old edge, final
    with pytest.warns(RuntimeWarning, match="floor"):
        assert paper.optimal(1, 0.01, "momentum", 1.0).steps == 1_146_535
    text = " ".join((ROOT / "docs" / "nqm.md").read_text(encoding="utf-8").split())
    assert "the 660,349 steps at B = 1 (1−β = 1e-5; 1,146,535 at 1e-4) are a transient dip" in text


def test_an_explicit_decay_min_is_a_bound_the_search_keeps() -> None:
    # the edge extension went below a decay_min the caller set as a bound (beta <= 0.9 in
    # examples/mnist1d_critical_batch.py got beta = 0.9928; found in the full test run)
    nqm = NQM.paper()
    res = nqm.optimal(1, 0.01, "momentum", decay_min=0.1)
    assert res.momentum <= 0.9 + 1e-12 and not res.at_decay_floor
    free = nqm.optimal(1, 0.01, "momentum")
    assert free.momentum > 0.9 and free.steps < res.steps
