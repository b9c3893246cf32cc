"""``optimal`` against the brute-force reference search of tests/nqm_reference.py (issue #23.6).

A faster search must return the same answers: identical steps to target (integers) and identical
chosen hyperparameters (lr, β, γ), on the paper's model and on a small model with a different
noise and initial variance, across optimizers, batch sizes and preconditioning powers.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlab.nqm import NQM, batch_size_sweep
from tests.nqm_reference import assert_same_or_fewer, reference_optimal


@pytest.fixture(scope="module")
def paper() -> NQM:
    return NQM.paper()


@pytest.fixture(scope="module")
def other() -> NQM:
    h = np.geomspace(2.0, 1e-3, 40)
    return NQM(h, 0.3 * h**0.5, init_var=np.linspace(0.5, 2.0, 40), counts=np.arange(1, 41))


CASES = [
    (1, "sgd", 0.0),
    (256, "sgd", 0.5),
    (32768, "sgd", 1.0),
    (1, "momentum", 0.0),
    (256, "momentum", 0.5),
    (32768, "momentum", 0.0),
    (4096, "momentum", 0.75),
]


@pytest.mark.parametrize(("batch", "optimizer", "power"), CASES)
def test_optimal_equals_reference_on_paper_model(
    paper: NQM, batch: int, optimizer: str, power: float
) -> None:
    new = paper.optimal(batch, 0.01, optimizer, power)
    ref = reference_optimal(paper, batch, 0.01, optimizer, power)
    assert_same_or_fewer(new, ref, paper)  # identical (bit for bit) but past the reference's edges


@pytest.mark.parametrize(
    ("batch", "optimizer", "target"),
    [(1, "sgd", 0.05), (64, "sgd", 0.02), (8, "momentum", 0.05), (2048, "momentum", 0.02)],
)
def test_optimal_equals_reference_on_other_model(
    other: NQM, batch: int, optimizer: str, target: float
) -> None:
    new = other.optimal(batch, target, optimizer, 0.25)
    ref = reference_optimal(other, batch, target, optimizer, 0.25)
    assert_same_or_fewer(new, ref, other)


def test_grid_options_and_ema_equal_reference(paper: NQM) -> None:
    kw = {"lr_points_per_decade": 5, "refine": 1, "decay_points": 6}
    for opt in ("sgd", "momentum", "ema"):
        new = paper.optimal(512, 0.01, opt, 0.25, **kw)
        assert_same_or_fewer(new, reference_optimal(paper, 512, 0.01, opt, 0.25, **kw), paper)


def test_sweep_rows_equal_reference(paper: NQM) -> None:
    bs = [2**k for k in (0, 3, 7, 11, 15)]
    sweep = batch_size_sweep(paper, bs, ("sgd", "momentum"), (0.0, 0.5))
    for row in sweep.rows:
        ref = reference_optimal(paper, row.batch_size, 0.01, row.optimizer, row.precond_power)
        assert_same_or_fewer(row, ref, paper)
