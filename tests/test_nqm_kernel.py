"""The compiled NQM evaluators (curvlab.nqm._kernel, curvlab.nqm._stationary) against numpy.

``grid_crossing`` must return what ``first_crossing(..., only_best=True)`` returns, entry by entry
and ``inf`` pattern included (the searches read both: the fewest steps, and which cells are
finite, ``_search._distinct_best``); ``grid_moments`` what ``second_moment`` returns; the
stationary learning rates what the verbatim numpy reference (tests/nqm_reference.py) returns; and
``_pairwise_sum`` what ``np.sum`` returns. All bit for bit, on the kinds of grids the searches
build (plain SGD, momentum, EMA; small and large batches; preconditioned), random models, ties,
unstable settings, unreachable targets and few levels.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlab.nqm import NQM
from curvlab.nqm._dynamics import build_dynamics, first_crossing, second_moment
from curvlab.nqm._kernel import SUBSET_MIN_CONFIGS, grid_crossing, grid_moments
from curvlab.nqm._stationary import _pairwise_sum, stationary_lr, steady_state_lr
from tests import nqm_reference as ref


def _configs(rng: np.random.Generator, n: int, optimizer: str, lr_max: float):
    """n (lr, β, γ) settings: log-uniform lrs up to 1.1× the stability limit (some unstable),
    1 − β (1 − γ) log-uniform in [1e-5, 1], with a third of them repeated (exact ties)."""
    lr = np.exp(rng.uniform(np.log(lr_max * 1e-5), np.log(lr_max * 1.1), n))
    decay = 1.0 - np.exp(rng.uniform(np.log(1e-5), 0.0, n))
    if optimizer == "momentum":
        lr = lr * (1.0 - decay)  # the effective lr α/(1 − β) spans the same range
    lr, decay = np.concatenate([lr, lr[: n // 3]]), np.concatenate([decay, decay[: n // 3]])
    zero = np.zeros_like(lr)
    if optimizer == "sgd":
        return lr, zero, zero
    return (lr, decay, zero) if optimizer == "momentum" else (lr, zero, decay)


def _dyn(a, s, lr, beta, gamma):
    return build_dynamics(lr[:, None], a[None, :], s[None, :], beta[:, None], gamma[:, None])


def _states(beta, gamma):
    return bool(np.any(beta != 0)), bool(np.any(gamma != 0))


def _compare(
    nqm: NQM, batch: float, power: float, target: float, optimizer: str, n: int, seed: int
):
    a, s = nqm.effective(batch, power)
    w, v0 = nqm.weights, np.broadcast_to(nqm.init_var, nqm.weights.shape).astype(float)
    rng = np.random.default_rng(seed)
    lr, beta, gamma = _configs(rng, n, optimizer, 2.0 / float(a.max()))
    dyn = _dyn(a, s, lr, beta, gamma)
    out = []
    for top in (48, int(rng.integers(-1, 4))):  # and few levels
        with np.errstate(all="ignore"):
            want = first_crossing(dyn, v0[None, :], w[None, :], target, top, True)
        got = grid_crossing(lr, beta, gamma, _states(beta, gamma), a, s, v0, w, target, top)
        np.testing.assert_array_equal(got, want)
        out.append(want)
    return out[0]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "ema"])
@pytest.mark.parametrize(
    ("batch", "power", "target"),
    [(1, 0.0, 0.01), (256, 0.5, 0.02), (32768, 1.0, 0.01), (16, 0.25, 0.005)],
)
@pytest.mark.parametrize("n", [30, SUBSET_MIN_CONFIGS + 20])  # without and with the subset bound
def test_grid_crossing_equals_numpy_on_paper_model(optimizer, batch, power, target, n) -> None:
    want = _compare(NQM.paper(d=2000, bins=40), batch, power, target, optimizer, n, seed=batch + n)
    assert np.isfinite(want).any()  # not only the trivial case


@pytest.mark.parametrize("seed", range(10))
def test_grid_crossing_equals_numpy_random_models(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    h = np.geomspace(rng.uniform(0.5, 3.0), 10.0 ** -rng.uniform(2, 4), int(rng.integers(5, 140)))
    nqm = NQM(
        h, rng.uniform(0.1, 1.0) * h ** rng.uniform(0, 1), init_var=rng.uniform(0.5, 2.0, h.size)
    )
    batch = float(2 ** rng.integers(0, 12))
    power = float(rng.choice([0.0, 0.5, 1.0]))
    target = float(rng.uniform(0.002, 0.05)) * nqm.initial_risk()
    optimizer = str(rng.choice(["sgd", "momentum", "ema"]))
    n = int(rng.integers(5, 200))
    _compare(nqm, batch, power, target, optimizer, n, seed)


def test_grid_crossing_trivial_targets() -> None:
    """A target at or above the initial risk: 0 steps; a target below every stationary risk:
    ``inf`` everywhere (as the numpy path)."""
    nqm = NQM.paper(d=500, bins=20)
    for optimizer in ("sgd", "momentum", "ema"):
        for target in (nqm.initial_risk(), 2 * nqm.initial_risk(), 1e-12):
            want = _compare(nqm, 4.0, 0.0, target, optimizer, 40, seed=3)
            assert (want == 0).all() if target >= nqm.initial_risk() else np.isinf(want).all()


def test_grid_crossing_refuses_three_states() -> None:
    nqm = NQM.paper(d=200, bins=10)
    a, s = nqm.effective(1.0, 0.0)
    one = np.full(3, 0.5)
    with pytest.raises(ValueError, match="momentum or EMA, not both"):
        grid_crossing(one * 0.01, one, one, (True, True), a, s, nqm.init_var, nqm.weights, 0.1, 10)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "ema"])
def test_grid_moments_equal_second_moment(optimizer: str) -> None:
    rng = np.random.default_rng({"sgd": 1, "momentum": 2, "ema": 3}[optimizer])
    nqm = NQM.paper(d=1000, bins=37)
    a, s = nqm.effective(64.0, 0.5)
    lr, beta, gamma = _configs(rng, 25, optimizer, 2.0 / float(a.max()))
    dyn = _dyn(a, s, lr, beta, gamma)
    n = lr.size
    steps = rng.integers(0, 2**30, n)
    steps[:3] = (0, 1, 2)
    v0 = np.broadcast_to(nqm.init_var, nqm.weights.shape).astype(float)
    with np.errstate(all="ignore"):
        want = second_moment(dyn, v0[None, :], steps[:, None])
    got = grid_moments(lr, beta, gamma, _states(beta, gamma), a, s, v0, steps)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(6))
def test_stationary_lrs_equal_numpy_reference(seed: int) -> None:
    rng = np.random.default_rng(700 + seed)
    nqm = NQM.paper(d=1000, bins=int(rng.integers(3, 300)))
    batch, power = float(2 ** rng.integers(0, 16)), float(rng.choice([0.0, 0.25, 1.0]))
    target = float(rng.uniform(0.001, 0.5)) * nqm.initial_risk()
    a, s = nqm.effective(batch, power)
    w = nqm.weights
    limit = 2.0 / float(a.max())
    with np.errstate(all="ignore"):  # (the reference divides by zero at the limit: inf)
        want = ref._steady_state_lr(a, s, w, target, limit)
    assert steady_state_lr(a, s, w, target, limit) == want
    prob = ref._Problem(nqm, batch, power, target)
    kappa = np.concatenate([[1.0], np.geomspace(0.9, 1e-6, 40)])
    for optimizer in ("momentum", "ema"):
        hi = (
            2.0 * (2.0 - kappa) / (kappa * float(a.max()))
            if optimizer == "momentum"
            else 0 * kappa + limit
        )
        with np.errstate(all="ignore"):
            want = ref._stationary_lr(prob, optimizer, kappa, hi)
        np.testing.assert_array_equal(stationary_lr(optimizer, a, s, w, kappa, hi, target), want)


def test_pairwise_sum_is_numpys() -> None:
    rng = np.random.default_rng(0)
    for n in [*range(1, 300), 511, 1000, 1025, 4097, 70001]:
        x = rng.standard_normal(n) * np.exp(3 * rng.standard_normal(n))
        assert _pairwise_sum(x, 0, n) == np.sum(x), n
        assert _pairwise_sum(x, n // 3, n - n // 3) == np.sum(x[n // 3 :]), n


def test_searches_use_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """optimal() evaluates its grids with the compiled kernel (a regression to the numpy path
    would pass the equality tests above and only show in bench_nqm)."""
    from curvlab.nqm import _kernel

    calls = []
    real = _kernel.grid_crossing
    monkeypatch.setattr(_kernel, "grid_crossing", lambda *a: calls.append(1) or real(*a))
    nqm = NQM.paper(d=500, bins=20)
    for optimizer in ("sgd", "momentum", "ema"):
        calls.clear()
        assert np.isfinite(nqm.optimal(64, optimizer=optimizer).steps)
        assert calls


def test_kernels_refuse_mismatched_lengths() -> None:
    """The kernels index without bounds checks: lengths that do not match are refused."""
    nqm = NQM.paper(d=200, bins=10)
    a, s = nqm.effective(1.0, 0.0)
    v0, w = np.broadcast_to(nqm.init_var, a.shape), nqm.weights
    lr, zero = np.full(3, 0.01), np.zeros(3)
    with pytest.raises(ValueError, match="one entry per configuration"):
        grid_crossing(lr, zero[:2], zero, (False, False), a, s, v0, w, 0.1, 10)
    with pytest.raises(ValueError, match="one per bin"):
        grid_crossing(lr, zero, zero, (False, False), a, s[:-1], v0, w, 0.1, 10)
    with pytest.raises(ValueError, match="one entry per bin"):
        grid_crossing(lr, zero, zero, (False, False), a, s, v0[:-1], w[:-1], 0.1, 10)
    with pytest.raises(ValueError, match="one entry per configuration"):
        grid_moments(lr, zero, zero, (False, False), a, s, v0, np.ones(2, dtype=np.int64))
