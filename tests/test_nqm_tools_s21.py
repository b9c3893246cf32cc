"""Review s21 (NQ): NQM tools: schedule search start, the number rule, overflowed noise, paper's d.

Every reference is computed here, independently of the package: step-by-step recursions of the
second moments (float64), the formulas written out, the old binning of ``NQM.paper``.
"""

from __future__ import annotations

import math
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

from curvlab.nqm import (
    NQM,
    critical_batch_from_steps,
    critical_batch_size,
    implicit_regularizer,
    schedule_risk,
    wen_bound,
)
from curvlab.nqm._sweep import SweepResult
from curvlab.nqm._tuning import OptimalResult


def _sgd_risk_by_steps(nqm, lrs, lengths, batch_size):
    """Exact risk of a piecewise-constant SGD schedule, one step at a time (E[θ²] recursion)."""
    a, s = nqm.h, nqm.c / batch_size
    v = nqm.init_var.copy()
    for lr, n in zip(lrs, lengths):
        for _ in range(int(n)):
            v = (1.0 - lr * a) ** 2 * v + lr * lr * s
    return float(np.sum(0.5 * nqm.h * nqm.counts * v))


# ---------------------------------------------------------------- 1. schedule search start
def test_optimize_schedule_searches_below_the_constant_lr_when_the_bound_is_above_it():
    # lower_bound/4 = 38.6 steps >= the constant lr's 18: the search was skipped and the
    # constant schedule returned (18 steps) while this 10-piece decaying schedule reaches the
    # target in 14 (checked step by step below)
    nqm = NQM(
        [1.0, 0.9248813, 0.00353859, 0.7745642],
        [1598.33623947, 77.82658719, 6.35281533, 199.73447912],
        init_var=[41.7334469, 451.609481, 0.182423870, 218.752395],
        counts=[5.80269254, 4.47807365, 97.28671573, 36.5074084],
    )
    B, target = 1, 627.6433625028106
    lrs14 = [0.4134, 0.2675, 0.2009, 0.1578, 0.131, 0.1172, 0.1009, 0.0889, 0.0792, 0.0716]
    lens14 = np.diff(np.round(np.linspace(0, 14, 11)).astype(int))
    assert _sgd_risk_by_steps(nqm, lrs14, lens14, B) <= target  # the witness
    assert nqm.lower_bound(target, B) / 4 >= 18

    res = nqm.optimize_schedule(B, target, pieces=10)
    assert res.constant.steps == 18
    assert res.steps <= 14
    lengths = np.diff(res.boundaries)
    assert lengths.sum() == res.steps
    exact = _sgd_risk_by_steps(nqm, res.lrs, lengths, B)
    assert exact <= target
    # the reported risk is the schedule's (rounding of ~100 float64 operations)
    assert res.risk == pytest.approx(exact, rel=1e-12)


def test_optimize_schedule_three_bins_bound_far_above():
    # lower bound 34183 steps, constant lr 194 steps: the schedule found 190 only after the fix
    nqm = NQM([1.0, 0.1, 0.01], [50.0, 50.0, 50.0], init_var=[4.0, 4.0, 4.0], counts=[1, 5, 20])
    res = nqm.optimize_schedule(1, 1.5, pieces=10)
    assert res.constant.steps == 194
    assert res.steps < 194
    assert _sgd_risk_by_steps(nqm, res.lrs, np.diff(res.boundaries), 1) <= 1.5


# ---------------------------------------------------------------- 2. complex step counts
@pytest.mark.parametrize(
    "steps",
    [3 + 1j, np.complex128(3 + 5j), torch.tensor(3 + 2j), np.array([2 + 7j, 3 + 0j]), 3 + 0j],
    ids=["complex", "np.complex128", "torch-complex", "array-complex", "complex-real"],
)
def test_risk_refuses_complex_steps(steps):
    nqm = NQM.paper(100, 10)
    with pytest.raises(ValueError, match="steps"):
        nqm.risk(steps, 0.1, 4)


def test_risk_float16_steps_no_overflow_warning():
    nqm = NQM.paper(100, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = nqm.risk(np.float16(3), 0.1, 4)
    assert got == nqm.risk(3, 0.1, 4)


@pytest.mark.parametrize("steps", [True, [1, True], torch.tensor(True), "3"])
def test_risk_refuses_bool_and_string_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        NQM.paper(100, 10).risk(steps, 0.1, 4)


# ---------------------------------------------------------------- 3. implicit_regularizer
def _reg(g2, tr, lr, B, N):
    return lr / 4 * g2 + (N - B) / (N - 1) * lr / (4 * B) * tr


def test_implicit_regularizer_values():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(5)
    G = rng.standard_normal((7, 5))
    C = G.T @ G / 7
    want = _reg(float(g @ g), float(np.trace(C)), 0.1, 4, 100)
    assert implicit_regularizer(g, C, 0.1, 4, 100) == pytest.approx(want, rel=1e-14)
    assert implicit_regularizer(float(g @ g), float(np.trace(C)), 0.1, 4, 100) == pytest.approx(
        want, rel=1e-14
    )
    # numbers as everywhere: numpy numbers, 0-d arrays and tensors, integral floats for B, N
    got = implicit_regularizer(
        torch.tensor(float(g @ g)), np.array(float(np.trace(C))), np.float32(0.1), 4.0, 100.0
    )
    assert got == pytest.approx(
        _reg(float(g @ g), float(np.trace(C)), float(np.float32(0.1)), 4, 100)
    )


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-5.0, 1.0, 0.1, 2, 10), "grad"),  # a negative squared norm
        ((1.0, -5.0, 0.1, 2, 10), "noise"),  # a negative trace
        ((1.0, np.ones((2, 3)), 0.1, 2, 10), "noise"),  # not square
        ((1.0, np.ones((2, 2, 2)), 0.1, 2, 10), "noise"),  # 3-D
        ((1.0, np.array([[1.0, 2.0], [2.0, 1.0]]), 0.1, 2, 10), "noise"),  # indefinite
        ((1.0, math.nan, 0.1, 2, 10), "noise"),
        ((np.array([math.nan, 1.0]), 1.0, 0.1, 2, 10), "grad"),
        (("3", 1.0, 0.1, 2, 10), "grad"),
        ((1.0, "3", 0.1, 2, 10), "noise"),
        ((1.0, 1.0, "0.1", 2, 10), "lr"),
        ((1.0, 1.0, True, 2, 10), "lr"),
        ((1.0, 1.0, math.inf, 2, 10), "lr"),
        ((1.0, 1.0, 0.1, True, 10), "batch_size"),
        ((1.0, 1.0, 0.1, "2", 10), "batch_size"),
        ((1.0, 1.0, 0.1, 11, 10), "batch_size"),
        ((1.0, 1.0, 0.1, 2, math.inf), "dataset_size"),
        ((1.0, 1.0, 0.1, 2, math.nan), "dataset_size"),
        ((1.0, 1.0, 0.1, 2, True), "dataset_size"),
    ],
)
def test_implicit_regularizer_refuses(args, name):
    with pytest.raises(ValueError, match=name):
        implicit_regularizer(*args)


# ---------------------------------------------------------------- 4. the number rule
def _sweep():
    rows = [
        OptimalResult(float(s), 0.1, 0.0, 0.0, "sgd", float(b), p, 0.01)
        for p in (0.0, 1.0)
        for b, s in ((1, 1000), (2, 520), (4, 300), (8, 260))
    ]
    return SweepResult(rows, [1.0, 2.0, 4.0, 8.0], 0.01)


def test_critical_batch_size_takes_0d_arrays_and_tensors():
    sweep = _sweep()
    want = critical_batch_size(sweep, "sgd", 0.0, 2.0)
    assert math.isfinite(want)
    assert critical_batch_size(sweep, "sgd", 0.0, np.array(2.0)) == want
    assert critical_batch_size(sweep, "sgd", 0.0, torch.tensor(2.0)) == want
    assert critical_batch_size(sweep, "sgd", np.array(0.0), 2.0) == want


@pytest.mark.parametrize("power", ["0.5", True, "1"])
def test_critical_batch_size_refuses_non_number_power(power):
    # "0.5" gave a raw TypeError from math.isclose; True matched the rows of power 1.0
    with pytest.raises(ValueError, match="precond_power"):
        critical_batch_size(_sweep(), "sgd", power)
    with pytest.raises(ValueError, match="precond_power"):
        _sweep().select("sgd", power)


@pytest.mark.parametrize(
    ("bs", "st", "name"),
    [
        (["1", "2"], [10, 5], "batch_sizes"),
        ([1, 2], ["10", "5"], "steps"),
        ([1, 2], [True, 5], "steps"),
        ([True, 2], [10, 5], "batch_sizes"),
        ([1, 2], [10, 5 + 1j], "steps"),
    ],
)
def test_critical_batch_from_steps_refuses_non_numbers(bs, st, name):
    with pytest.raises(ValueError, match=name):
        critical_batch_from_steps(bs, st)


@pytest.mark.parametrize(
    ("lrs", "lengths", "name"),
    [
        ([True], [3], "lrs"),
        (["0.1"], [3], "lrs"),
        ([0.1], ["3"], "lengths"),
        ([0.1], [True], "lengths"),
    ],
)
def test_schedule_risk_refuses_non_numbers(lrs, lengths, name):
    with pytest.raises(ValueError, match=name):
        schedule_risk(NQM.paper(100, 10), lrs, lengths, 1)


def test_schedule_risk_takes_tensors():
    nqm = NQM.paper(100, 10)
    want = _sgd_risk_by_steps(nqm, [0.1, 0.05], [3, 2], 4)
    got, _ = schedule_risk(
        nqm, torch.tensor([0.1, 0.05], dtype=torch.float64), torch.tensor([3, 2]), 4
    )
    assert got == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"h": ["1", "2"], "c": ["1", "1"]},
        {"h": [True], "c": [True]},
        {"h": [1.0, 2.0], "c": [1.0, True]},
        {"h": [1.0], "c": [1.0], "counts": ["2"]},
        {"h": [1.0], "c": [1.0], "init_var": "2"},
        {"h": [1.0 + 1j], "c": [1.0]},
    ],
)
def test_nqm_refuses_non_numbers(kwargs):
    with pytest.raises(ValueError, match="|".join(kwargs)):
        NQM(**kwargs)


def test_from_spectrum_refuses_strings():
    with pytest.raises(ValueError, match="eigenvalues"):
        NQM.from_spectrum(["1", "2"], [1, 1])


@pytest.mark.parametrize("eps", ["0.1", True, None])
def test_wen_bound_refuses_non_number_epsilon(eps):
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    with pytest.raises(ValueError, match="epsilon"):
        wen_bound(A, np.eye(2), np.ones(2), eps)


def test_wen_bound_takes_0d_epsilon():
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    want = wen_bound(A, np.eye(2), np.ones(2), 0.1)
    assert wen_bound(A, np.eye(2), np.ones(2), np.array(0.1)) == want
    assert wen_bound(A, np.eye(2), np.ones(2), torch.tensor(0.1, dtype=torch.float64)) == want


# ---------------------------------------------------------------- 5. overflowed noise
def _moment_by_steps(h, c, v0, lr, B, beta, gamma, t, scale):
    """E[θ̃_t²] of one bin by the covariance recursion of (θ, m, θ̃), inputs divided by ``scale``
    (the second moment is linear in (v0, c) jointly) and multiplied back."""
    x = np.array([1.0, 0.0, 1.0])
    S = np.outer(x, x) * (v0 / scale)
    # θ' = θ − α(βm + hθ + ξ), m' = βm + hθ + ξ, θ̃' = γθ̃ + (1 − γ)θ'
    F = np.array(
        [
            [1 - lr * h, -lr * beta, 0.0],
            [h, beta, 0.0],
            [(1 - gamma) * (1 - lr * h), -(1 - gamma) * lr * beta, gamma],
        ]
    )
    e = np.array([-lr, 1.0, -(1 - gamma) * lr])
    for _ in range(t):
        S = F @ S @ F.T + np.outer(e, e) * (c / B / scale)
    return S[2, 2] * scale


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.5}, {"ema": 0.5}, {"momentum": 0.5, "ema": 0.5}])
def test_risk_subnormal_batch_is_inf_for_every_optimizer(kw):
    # s = c/B = inf: SGD gave inf, momentum and EMA nan
    nqm = NQM([1.0, 0.1], [1.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = nqm.risk([0, 1, 5], 0.1, 1e-320, **kw)
    assert got[0] == nqm.initial_risk()
    assert np.all(np.isposinf(got[1:]))


def test_risk_huge_noise_ema_is_finite_where_it_is():
    # c = 1e308: the EMA iterate's E[θ̃²] is finite (~5.6e307) though θ's overflows; it was nan
    nqm = NQM([1.0, 0.1], [1e308, 1.0])
    scale = 2.0**1000
    for kw in ({"ema": 0.5}, {"momentum": 0.5, "ema": 0.5}):
        beta, gamma = kw.get("momentum", 0.0), kw["ema"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = nqm.risk([1, 2, 10], 1.5, 1.0, **kw)
        want = [
            sum(
                0.5 * h * _moment_by_steps(h, c, 1.0, 1.5, 1.0, beta, gamma, t, scale)
                for h, c in zip(nqm.h, nqm.c)
            )
            for t in (1, 2, 10)
        ]
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-12)


# ---------------------------------------------------------------- 6. NQM.paper's memory
def _paper_by_all_eigenvalues(d, bins):
    """The paper's binning from all d eigenvalues, as NQM.paper did it until review s21."""
    h = 1.0 / np.arange(1, d + 1)
    if bins is None or bins >= d:
        return h, h.copy(), np.ones_like(h)
    edges = np.geomspace(h.min(), h.max(), int(bins) + 1)
    idx = np.clip(np.searchsorted(edges, h, side="right") - 1, 0, int(bins) - 1)
    counts = np.bincount(idx, minlength=int(bins)).astype(float)
    sums = np.bincount(idx, weights=h, minlength=int(bins))
    keep = counts > 0
    hb = sums[keep] / counts[keep]
    order = np.argsort(-hb)
    return hb[order], hb[order].copy(), counts[keep][order]


@pytest.mark.parametrize(
    ("d", "bins"),
    [(10_000, 100), (10_000, None), (1, 100), (7, 3), (1000, 30), (123_457, 100), (2**20, 100)],
)
def test_paper_bit_identical_up_to_the_chunk(d, bins):
    h, c, counts = _paper_by_all_eigenvalues(d, bins)
    m = NQM.paper(d, bins, init_var=0.5)
    assert np.array_equal(m.h, h)
    assert np.array_equal(m.c, c)
    assert np.array_equal(m.counts, counts)
    assert np.array_equal(m.weights, 0.5 * h * counts)
    assert np.array_equal(m.init_var, np.full(h.shape, 0.5))


@pytest.mark.parametrize("bins", [1, 7, 100])
def test_paper_above_the_chunk_same_bins_accurate_means(bins):
    d = 2**22 + 4321
    h, _, counts = _paper_by_all_eigenvalues(d, bins)
    m = NQM.paper(d, bins)
    assert np.array_equal(m.counts, counts)  # the same members in every bin
    # the running sum over up to 4e6 terms carries ~1e-13 relative error; the mean is exact to
    # a few ulps, so the two agree to that
    np.testing.assert_allclose(m.h, h, rtol=1e-12)
    # Tr(H) = Σ 1/i = H_d exactly (math.fsum of the correctly rounded terms: ~d·1.1e-16/2)
    assert float(np.sum(m.h * m.counts)) == pytest.approx(
        math.fsum(1.0 / np.arange(1, d + 1)), rel=1e-13
    )


def test_paper_huge_d_in_bins_memory():
    tracemalloc.start()
    try:
        m = NQM.paper(2**23, 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20  # all eigenvalues took 8 bytes each, several times (> 200 MB)
    assert m.dim == 2**23
    big = NQM.paper(10**13)  # a raw MemoryError ("72.8 TiB")
    assert big.dim == 1e13
    euler = 0.5772156649015329
    harmonic = math.log(1e13) + euler + 0.5e-13  # H_d for d = 1e13, to 1e-27
    assert float(np.sum(big.h * big.counts)) == pytest.approx(harmonic, rel=1e-13)


def test_paper_refusals_before_allocation():
    with pytest.raises(ValueError, match="d="):
        NQM.paper(2**40, None)  # unbinned: a raw MemoryError
    with pytest.raises(ValueError, match="2\\*\\*53"):
        NQM.paper(2**60, 100)


def test_implicit_regularizer_takes_a_float32_covariance_of_few_examples() -> None:
    """Review s21 (R2): only tr C is read; a float32 covariance of N < D examples has
    eigenvalues of -1e-8 of the largest and was refused as not positive semi-definite."""
    import torch

    from curvlab.nqm import implicit_regularizer

    g = torch.Generator().manual_seed(0)
    G = torch.randn(5, 40, generator=g, dtype=torch.float32)  # 5 per-example gradients, D = 40
    C = torch.cov(G.T)
    grad = G.mean(0)
    want = 0.1 / 4 * float(grad.double().pow(2).sum()) + (50 - 8) / 49 * 0.1 / (4 * 8) * float(
        torch.trace(C.double())
    )
    got = implicit_regularizer(grad.numpy(), C.numpy(), 0.1, 8, 50)
    assert abs(got - want) <= 1e-6 * want
    with pytest.raises(ValueError, match="40 x 40"):
        implicit_regularizer(grad.numpy(), C.numpy()[:3, :3], 0.1, 8, 50)


def test_a_bool_tensor_inside_a_list_is_no_number() -> None:
    """Review s21 (R2): a 0-d bool tensor or array inside a list was read as 1."""
    import torch

    from curvlab.nqm import NQM, critical_batch_from_steps

    with pytest.raises(ValueError, match="not bools"):
        NQM([torch.tensor(True), 0.5], [1, 1])
    with pytest.raises(ValueError, match="not bools"):
        critical_batch_from_steps([np.array(True), 2, 4], [100, 60, 50])
