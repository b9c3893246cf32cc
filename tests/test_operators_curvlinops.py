"""Optional conformance with curvlinops (skipped unless it is installed).

Convention map (docs/estimators.md): Hessian and GGN agree exactly; curvlinops' empirical Fisher
under ``reduction="mean"`` is ``(1/(N c)) sum_n s_n s_n^T``, i.e. ``c`` times ours (``c`` = loss
terms per example), and equal under ``"sum"``.
"""

from __future__ import annotations

import pytest
import torch

import curvlab.estimators as est
from curvlab.operators import curvature_operator
from tests.problems import make_problem
from tests.reference import terms_per_example

curvlinops = pytest.importorskip("curvlinops")

CASES = ["mlp-ce-mean-three", "cnn-mse-mean-one", "res-bce-sum-three", "mlp-mse-sum-one"]


def _theirs(cls, p) -> torch.Tensor:
    params = [q for q in p.model.parameters() if q.requires_grad]
    op = cls(p.model, p.loss_fn, params, p.batches, check_deterministic=False)
    dim = sum(q.numel() for q in params)
    return op @ torch.eye(dim, dtype=torch.float64)


@pytest.mark.parametrize("name", CASES)
def test_hessian_ggn_and_ef_agree_with_curvlinops(name: str) -> None:
    p = make_problem(name)
    pairs = [
        ("hessian", curvlinops.HessianLinearOperator, 1.0),
        ("ggn", curvlinops.GGNLinearOperator, 1.0),
        (
            "empirical_fisher",
            curvlinops.EFLinearOperator,
            terms_per_example(p) if p.loss_fn.reduction == "mean" else 1.0,
        ),
    ]
    for matrix, cls, factor in pairs:
        ours = curvature_operator(p.model, p.loss_fn, p.data, matrix=matrix).to_dense()
        torch.testing.assert_close(factor * ours, _theirs(cls, p), rtol=1e-8, atol=1e-10)


def test_traces_agree_with_curvlinops_dense_trace() -> None:
    p = make_problem("res-ce-mean-three")
    theirs = float(torch.trace(_theirs(curvlinops.HessianLinearOperator, p)))
    ours = est.trace(p.model, p.loss_fn, p.data, method="exact")
    assert ours.value == pytest.approx(theirs, rel=1e-8)
