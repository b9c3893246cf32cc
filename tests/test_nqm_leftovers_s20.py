"""Review s20: inputs of the NQM's quadratic helpers that are not what they claim to be."""

from __future__ import annotations

import numpy as np
import pytest

from curvlab.nqm import sgd_stationary_covariance


def test_stationary_covariance_refuses_an_indefinite_c() -> None:
    # C = [[1, 2], [2, 1]] has eigenvalues 3 and -1: not a covariance. Before s20 it was accepted
    # and Σ came back indefinite (a "covariance" with a negative variance along some direction).
    H, C = np.diag([2.0, 0.5]), np.array([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match=r"^C must be positive semi-definite .* -1"):
        sgd_stationary_covariance(H, C, 0.1, 4)


def test_stationary_covariance_accepts_a_rank_deficient_c_with_rounding() -> None:
    # G.T @ G / n for a wide G is singular; its zero eigenvalues come out as ±1e-17 from
    # rounding, which is not indefiniteness
    rng = np.random.default_rng(0)
    G = rng.standard_normal((2, 5))
    C = G.T @ G / 2
    assert np.linalg.eigvalsh(C).min() < 0  # rounding made one slightly negative
    H = np.diag(np.linspace(0.5, 2.0, 5))
    S = sgd_stationary_covariance(H, C, 0.1, 4)
    np.testing.assert_allclose(S @ H + H @ S, (0.1 / 4) * C, atol=1e-14)
