"""The pruned grid evaluation (curvlab.nqm._pruned) against the unpruned one.

``pruned_crossing`` must give every configuration attaining the fewest steps exactly the steps of
``first_crossing(..., only_best=True)`` on the whole grid (entry by entry the same arithmetic;
the BLAS sums over bins may differ in the last bit with the number of rows, see
curvlab/nqm/_pruned.py), and ``inf`` or those same steps to the others; the grids here are the kind the searches build
(momentum and EMA, large and small batches, preconditioned) plus random ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlab.nqm import NQM
from curvlab.nqm._dynamics import build_dynamics, first_crossing
from curvlab.nqm._pruned import pruned_crossing, subset_bins


def _grid(rng: np.random.Generator, n: int, optimizer: str, lr_max: float):
    lr = np.exp(rng.uniform(np.log(lr_max * 1e-4), np.log(lr_max), n))
    decay = 1.0 - np.exp(rng.uniform(np.log(1e-4), np.log(1.0), n))
    zero = np.zeros(n)
    return (lr, decay, zero) if optimizer == "momentum" else (lr, zero, decay)


def _check(nqm: NQM, batch: float, power: float, target: float, optimizer: str, seed: int) -> None:
    a, s = nqm.effective(batch, power)
    w, v0 = nqm.weights, np.broadcast_to(nqm.init_var, nqm.weights.shape)
    rng = np.random.default_rng(seed)
    lr, beta, gamma = _grid(rng, 120, optimizer, 1.9 / float(a.max()))
    states = (bool(np.any(beta != 0)), bool(np.any(gamma != 0)))

    def build(configs, bins):
        return build_dynamics(
            lr[configs][:, None],
            a[bins][None, :],
            s[bins][None, :],
            beta[configs][:, None],
            gamma[configs][:, None],
            states,
        )

    every = slice(None)
    ref = first_crossing(build(every, every), v0[None, :], w[None, :], target, 48, True)
    got = pruned_crossing(build, lr.size, v0, w, target, subset_bins(a, w, v0), 48)
    assert np.isfinite(ref).any() == np.isfinite(got).any()
    if not np.isfinite(ref).any():
        return
    best = ref.min()
    assert got.min() == best
    assert np.array_equal(np.flatnonzero(got == best), np.flatnonzero(ref == best))
    finite = np.isfinite(got)
    assert np.array_equal(got[finite], ref[finite])  # the others: inf or the same steps


@pytest.mark.parametrize("optimizer", ["momentum", "ema"])
@pytest.mark.parametrize(
    ("batch", "power", "target"),
    [(1, 0.0, 0.01), (256, 0.5, 0.02), (32768, 1.0, 0.01), (16, 0.25, 0.005)],
)
def test_pruned_equals_unpruned_on_paper_model(optimizer, batch, power, target) -> None:
    _check(NQM.paper(d=2000, bins=40), batch, power, target, optimizer, seed=batch)


@pytest.mark.parametrize("seed", range(6))
def test_pruned_equals_unpruned_random_models(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    h = np.geomspace(rng.uniform(0.5, 3.0), 10.0 ** -rng.uniform(2, 4), int(rng.integers(12, 40)))
    nqm = NQM(
        h, rng.uniform(0.1, 1.0) * h ** rng.uniform(0, 1), init_var=rng.uniform(0.5, 2.0, h.size)
    )
    batch = float(2 ** rng.integers(0, 12))
    power = float(rng.choice([0.0, 0.5, 1.0]))
    target = float(rng.uniform(0.002, 0.05)) * nqm.initial_risk()
    _check(nqm, batch, power, target, str(rng.choice(["momentum", "ema"])), seed)


@pytest.mark.parametrize("seed", range(8))
def test_scalar_crossing_equals_general_path(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain SGD's lean crossing (one state) gives the general path's steps bit for bit."""
    from curvlab.nqm import _dynamics
    from curvlab.nqm._dynamics import _general_crossing

    lean = _dynamics._scalar_crossing
    calls = []
    monkeypatch.setattr(
        _dynamics, "_scalar_crossing", lambda *a: calls.append(1) or lean(*a)
    )  # the dispatch is checked too: first_crossing must take the lean path

    rng = np.random.default_rng(500 + seed)
    nqm = (
        NQM.paper(d=2000, bins=40)
        if seed < 4
        else NQM(
            np.geomspace(2.0, 10.0 ** -rng.uniform(2, 4), 30), rng.uniform(0.1, 1.0) * np.ones(30)
        )
    )
    cases = 0
    for _ in range(25):
        a, s = nqm.effective(float(2 ** rng.integers(0, 16)), float(rng.choice([0.0, 0.5, 1.0])))
        w, v0 = nqm.weights, np.broadcast_to(nqm.init_var, nqm.weights.shape)
        n = int(rng.integers(1, 40))
        lr = np.exp(rng.uniform(np.log(1e-5), np.log(2.2), n)) / float(a.max())
        lr = np.concatenate([lr, lr[: n // 3]])  # exact ties: all of them must be kept
        n = lr.size
        target = float(rng.uniform(0.001, 1.2)) * nqm.initial_risk()
        zero = np.zeros((n, 1))
        dyn = build_dynamics(lr[:, None], a[None, :], s[None, :], zero, zero)
        assert dyn.k == 1
        got = first_crossing(dyn, v0[None, :], w[None, :], target, 30, True)
        ref = _general_crossing(dyn, v0[None, :], w[None, :], target, 30, True)
        assert np.array_equal(got, ref)
        top = int(rng.integers(-1, 4))  # 1-D weights, a scalar initial variance, few levels
        got = first_crossing(dyn, 1.5, w, target, top, True)
        ref = _general_crossing(dyn, np.asarray(1.5), w, target, top, True)
        assert np.array_equal(got, ref)
        cases += bool(np.isfinite(got).any() and got.max() > 1)
    assert cases >= 5  # not only the trivial cases (nothing reaches, or at once)
    assert len(calls) == 50
