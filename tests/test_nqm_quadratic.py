"""Wen et al. Theorem 4.1 tools, Mandt et al.'s stationary covariance, Smith et al.'s regulariser,
and the EMA recursion (eq. 38) typo check."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import solve_discrete_lyapunov

from curvlab.nqm import (
    NQM,
    implicit_regularizer,
    noise_trace_term,
    sgd_stationary_covariance,
    sqrt_noise_comparison,
    wen_bound,
    wen_expected_loss,
    wen_simulate,
)
from curvlab.nqm._quadratic import _sqrtm_psd
from tests.nqm_closed_forms import ema_transition, transition_second_moment

A = np.array([[2.0, 1.4, 0.2], [1.4, 1.5, 0.3], [0.2, 0.3, 0.5]])


def test_table1_frobenius_norms() -> None:
    cmp = sqrt_noise_comparison(A)
    assert cmp["full"] == pytest.approx(np.sum(A * A))  # ‖A‖_F²
    assert cmp["diag"] == pytest.approx(np.sum(np.diag(A) ** 2))  # ‖diag A‖_F²
    assert cmp["diag"] < cmp["full"]
    # same second moment E‖Cξ‖² = Tr(CᵀC) = Tr(A) for both
    for C in (_sqrtm_psd(A), np.diag(np.sqrt(np.diag(A)))):
        assert np.trace(C.T @ C) == pytest.approx(cmp["second_moment"])
    assert noise_trace_term(A, np.eye(3)) == pytest.approx(np.trace(A))


def test_theorem_41_bound_holds_and_orders_the_noises() -> None:
    th0 = 0.1 * np.ones(3)  # small start: ν is set by the noise term 2 Tr(CᵀAC)/λ_min²
    bounds = {}
    for name, C in (("full", _sqrtm_psd(A)), ("diag", np.diag(np.sqrt(np.diag(A))))):
        b = wen_bound(A, C, th0, 1e-2)
        assert b.nu == pytest.approx(2 * noise_trace_term(A, C) / np.linalg.eigvalsh(A)[0] ** 2)
        loss = wen_expected_loss(A, C, th0, 2000)
        k = np.arange(loss.size)
        assert np.all(loss <= b.nu / (k + b.gamma) * (1 + 1e-12))
        bounds[name] = b
    assert bounds["diag"].steps < bounds["full"].steps


def test_wen_simulation_matches_exact_expected_loss() -> None:
    C = 0.3 * _sqrtm_psd(A)
    mean, err = wen_simulate(A, C, np.ones(3), 200, num_runs=3000, seed=1)
    exact = wen_expected_loss(A, C, np.ones(3), 200)
    for k in (1, 20, 200):
        assert abs(mean[k] - exact[k]) < 3 * err[k]
    with pytest.raises(ValueError, match="gamma"):
        wen_bound(A, C, np.ones(3), 0.1, gamma=1.0)


def test_mandt_stationary_covariance() -> None:
    H = A
    C = np.array([[1.0, 0.2, 0.0], [0.2, 0.8, 0.1], [0.0, 0.1, 0.3]])
    lr, B = 1e-3, 8
    S = sgd_stationary_covariance(H, C, lr, B)
    np.testing.assert_allclose(S @ H + H @ S, lr / B * C, atol=1e-15)
    # the exact stationary covariance of discrete SGD, Σ = MΣMᵀ + α²C/B, agrees to O(α)
    M = np.eye(3) - lr * H
    exact = solve_discrete_lyapunov(M, lr * lr * C / B)
    np.testing.assert_allclose(S, exact, rtol=5 * lr * np.linalg.eigvalsh(H).max())
    # commuting H, C: Σ = α/(2B) H⁻¹ C
    Hd, Cd = np.diag([2.0, 0.5]), np.diag([1.0, 3.0])
    np.testing.assert_allclose(
        sgd_stationary_covariance(Hd, Cd, 0.1, 4), 0.1 / 8 * np.linalg.inv(Hd) @ Cd
    )


def test_smith_implicit_regularizer() -> None:
    g = np.array([3.0, 4.0])
    C = np.diag([2.0, 6.0])
    val = implicit_regularizer(g, C, lr=0.1, batch_size=10, dataset_size=101)
    assert val == pytest.approx(0.1 / 4 * 25 + (91 / 100) * 0.1 / 40 * 8)
    assert implicit_regularizer(25.0, 8.0, 0.1, 101, 101) == pytest.approx(0.1 / 4 * 25)
    with pytest.raises(ValueError, match="batch_size"):
        implicit_regularizer(g, C, 0.1, 0, 10)


def test_eq38_as_printed_disagrees_with_simulation() -> None:
    """The paper's T[1,2] = 2γ(1−γ)q is a typo; our 2γq matches the Monte-Carlo, it does not."""
    nqm = NQM([1.0], [1.0])
    lr, gamma, B, t = 0.5, 0.5, 1.0, 30
    a, s = nqm.effective(B)
    T, n = ema_transition(lr, a, s, gamma)
    v0 = nqm.init_var
    ours = (1 - gamma) ** 2 * transition_second_moment(T, n, [v0, v0 / 0.25, v0 / 0.5], 1, t)
    T[1][2] = T[1][2] * (1 - gamma)
    printed = (1 - gamma) ** 2 * transition_second_moment(T, n, [v0, v0 / 0.25, v0 / 0.5], 1, t)
    sim = nqm.simulate(t, lr, B, ema=gamma, num_runs=20000, seed=2, record=[t])
    z_ours = (sim.risk[0] - 0.5 * ours[0]) / sim.stderr[0]
    z_printed = (sim.risk[0] - 0.5 * printed[0]) / sim.stderr[0]
    assert abs(z_ours) < 3 < abs(z_printed)
