"""Review s17 of curvlab.nqm's searches: momentum and EMA next to the stability limit at large
batch sizes, ``steps_to_target``'s horizon against ``optimal``'s, and the checks of
``precond_power``.

Step counts are checked against a step-by-step float64 recursion of the per-bin second moments
written here (torch), never against the library's engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curvlab.analysis import nqm_prediction
from curvlab.nqm import NQM

TARGET = 0.01
# float64 recursion of <= 100 steps over 100 bins: each risk carries a relative rounding error
# below steps · bins · eps ≈ 1e4 · 1.1e-16 ≈ 1e-12; a crossing is decided only outside 1e-10
RTOL = 1e-10


@pytest.fixture(scope="module")
def paper() -> NQM:
    return NQM.paper()


def risks(nqm: NQM, lr: float, batch: float, p: float, T: int, beta=0.0, gamma=0.0):
    """Risks at steps 0..T of heavy-ball momentum (β) with an EMA of the iterate (γ), from the
    2×2 (θ, v) or (θ, θ̃) second-moment recursion per bin: θ' = θ − α(βv + aθ + √s ξ),
    v' = βv + aθ + √s ξ; θ̃' = γθ̃ + (1 − γ)θ'; risk = Σ ½ h n E[θ_obs²]."""
    f64 = torch.float64
    h = torch.tensor(nqm.h, dtype=f64)
    c = torch.tensor(nqm.c, dtype=f64)
    n = torch.tensor(nqm.counts, dtype=f64)
    a = h ** (1.0 - p)
    sd = torch.sqrt(c * h ** (-2.0 * p) / batch)
    w = 0.5 * h * n
    q = 1.0 - lr * a
    if gamma == 0.0:  # state (θ, v), observe θ
        F = [[q, -lr * beta * torch.ones_like(a)], [a, beta * torch.ones_like(a)]]
        e = [-lr * sd, sd]
        u = [1.0, 0.0]
        obs = 0
    else:  # plain SGD with EMA: state (θ, θ̃), observe θ̃ (θ̃_0 = θ_0)
        assert beta == 0.0
        k = 1.0 - gamma
        F = [[q, torch.zeros_like(a)], [k * q, gamma * torch.ones_like(a)]]
        e = [-lr * sd, -k * lr * sd]
        u = [1.0, 1.0]
        obs = 1
    v0 = torch.tensor(nqm.init_var, dtype=f64) * torch.ones_like(a)
    S = [[v0 * u[i] * u[j] for j in range(2)] for i in range(2)]
    out = [float((w * S[obs][obs]).sum())]
    for _ in range(T):
        FS = [[F[i][0] * S[0][j] + F[i][1] * S[1][j] for j in range(2)] for i in range(2)]
        S = [
            [FS[i][0] * F[j][0] + FS[i][1] * F[j][1] + e[i] * e[j] for j in range(2)]
            for i in range(2)
        ]
        out.append(float((w * S[obs][obs]).sum()))
    return out


def first_step(r: list[float]) -> int:
    """The first step whose risk is at most the target, decided outside the rounding (RTOL)."""
    for t, x in enumerate(r):
        assert abs(x - TARGET) > RTOL * TARGET, (t, x)  # not within the recursion's rounding
        if x <= TARGET:
            return t
    raise AssertionError("target not reached")


@pytest.mark.parametrize(
    ("log2_b", "p", "beta", "lr"),
    [  # settings inside the searched range (1 − β in [1e-4, 0.9], α < 2(1 + β)/a_max)
        (16, 0.5, 0.69102, 2.562),  # 21 steps; optimal() returned 23
        (18, 0.5, 0.64, 3.131619044487429),  # 17; optimal() returned 20
        (20, 0.5, 0.66, 3.1698095206397143),  # 16; optimal() returned 19
        (18, 0.75, 0.35125, 2.0472),  # 6; optimal() returned 7
    ],
)
def test_momentum_search_reaches_the_settings_next_to_the_stability_limit(
    paper: NQM, log2_b: int, p: float, beta: float, lr: float
) -> None:
    B = 2.0**log2_b
    assert lr < paper.max_stable_lr(p, beta) and 1e-4 <= 1.0 - beta <= 0.9
    better = first_step(risks(paper, lr, B, p, 60, beta=beta))
    res = paper.optimal(B, TARGET, "momentum", p)
    # the returned count is true at the returned setting (first crossing, step by step) ...
    assert first_step(risks(paper, res.lr, B, p, int(res.steps) + 1, beta=res.momentum)) == (
        res.steps
    )
    # ... and no more than the searched range's known setting needs (was 23, 20, 19, 7)
    assert res.steps <= better


def test_ema_search_reaches_the_settings_next_to_the_stability_limit(paper: NQM) -> None:
    B, p = 2.0**20, 0.5
    gamma, lr = 0.8038176157143484, 1.9773322891755047  # inside the searched range: 85 steps
    assert lr < paper.max_stable_lr(p)
    better = first_step(risks(paper, lr, B, p, 120, gamma=gamma))
    res = paper.optimal(B, TARGET, "ema", p)
    assert first_step(risks(paper, res.lr, B, p, int(res.steps) + 1, gamma=res.ema)) == res.steps
    assert res.steps <= better  # was 86


def test_steps_to_target_default_horizon_is_that_of_optimal() -> None:
    nqm = NQM.paper(d=100, bins=10)
    res = nqm.optimal(1, target=1e-9)
    assert 2**40 < res.steps < 2**48  # past the old default horizon of steps_to_target
    assert nqm.steps_to_target(1e-9, res.lr, 1) == res.steps  # was inf


@pytest.mark.parametrize("power", ["0.5", True, None])
def test_nqm_prediction_refuses_a_power_that_is_not_a_number(power) -> None:
    with pytest.raises(ValueError, match=r"precond_power must be a number in \[0, 1\]"):
        nqm_prediction([1.0, 0.5, 0.1], [0.3, 0.3, 0.4], dim=100, precond_power=power)


@pytest.mark.parametrize("power", ["0.5", True])
def test_optimal_refuses_a_power_that_is_not_a_number(paper: NQM, power) -> None:
    with pytest.raises(ValueError, match="precond_power"):
        paper.optimal(64, TARGET, "sgd", power)


def test_a_number_power_is_still_taken(paper: NQM) -> None:
    a = paper.optimal(64, TARGET, "sgd", np.float64(0.5))
    b = paper.optimal(64, TARGET, "sgd", 0.5)
    assert a == b and math.isfinite(a.steps)
