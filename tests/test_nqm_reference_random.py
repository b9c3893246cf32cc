"""Randomised equality of ``optimal`` with the brute-force reference search (issue #23.6).

Thirty configurations drawn once from a seeded generator (batch size, target, optimizer,
preconditioning power, model) complement the fixed cases of tests/test_nqm_reference.py: any faster
search must pick bit-identical hyperparameters and steps on all of them.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlab.nqm import NQM
from tests.nqm_reference import assert_same_or_fewer, reference_optimal


def _draw_cases(n: int = 30, seed: int = 2023) -> list[tuple[str, float, float, str, float]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        model = str(rng.choice(["paper", "other"]))
        batch = float(2 ** int(rng.integers(0, 16)))
        target = float(rng.choice([0.005, 0.01, 0.02, 0.05]))
        optimizer = str(rng.choice(["sgd", "momentum", "momentum", "ema"]))
        power = float(rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]))
        cases.append((model, batch, target, optimizer, power))
    return cases


CASES = _draw_cases()
# EMA's finest grids are slow to brute-force: a coarser (but still 2-D and refined) grid
EMA_GRID = {"lr_points_per_decade": 5, "decay_points": 8, "refine": 1}


@pytest.fixture(scope="module")
def models() -> dict[str, NQM]:
    h = np.geomspace(2.0, 1e-3, 40)
    other = NQM(h, 0.3 * h**0.5, init_var=np.linspace(0.5, 2.0, 40), counts=np.arange(1, 41))
    return {"paper": NQM.paper(), "other": other}


@pytest.mark.parametrize(("model", "batch", "target", "optimizer", "power"), CASES)
def test_optimal_equals_reference_random(
    models: dict[str, NQM], model: str, batch: float, target: float, optimizer: str, power: float
) -> None:
    nqm = models[model]
    grid = EMA_GRID if optimizer == "ema" else {}
    new = nqm.optimal(batch, target, optimizer, power, **grid)
    ref = reference_optimal(nqm, batch, target, optimizer, power, **grid)
    assert_same_or_fewer(new, ref, nqm)  # identical (bit for bit) but past the reference's edges
