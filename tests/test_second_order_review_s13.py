"""A sparse embedding (``nn.Embedding(sparse=True)``) in the second-order entry points, and
``fisher_trace`` on a model that mixes the examples of a batch.

Found in review: curvature operator products, ``trace`` and ``fisher_trace`` crashed inside torch
("reshape is not implemented for sparse tensors"); the flag changes only the layout of the
weight's gradient, so curvlab's passes run with it off (``leave_no_trace``) and put it back.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import curvlab as cl
from tests.bruteforce import Dense


class _Bag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.e = nn.Embedding(7, 3, sparse=sparse)
        self.l = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(torch.tanh(self.e(x)).mean(1))


def _problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], Dense]:
    torch.manual_seed(0)
    model = _Bag(sparse=True).double()
    X = torch.randint(0, 7, (6, 5))
    y = torch.randint(0, 4, (6,))
    dense = _Bag(sparse=False).double()
    dense.load_state_dict(model.state_dict())
    obj = SimpleNamespace(model=dense, loss_fn=nn.CrossEntropyLoss(), batches=[(X, y)])
    return model, (X, y), Dense(obj)


@pytest.mark.parametrize("matrix", ["hessian", "ggn", "empirical_fisher"])
def test_operator_products_of_a_sparse_embedding(matrix: str) -> None:
    model, data, ref = _problem()
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix=matrix)
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), ref.matrix(matrix) @ V, rtol=1e-10, atol=1e-12)
    assert model.e.sparse is True  # put back


def test_trace_and_fisher_trace_of_a_sparse_embedding() -> None:
    model, data, ref = _problem()
    lf = nn.CrossEntropyLoss()
    exact = cl.trace(model, lf, data, method="exact")
    assert abs(float(exact.value) - float(ref.hessian.trace())) < 1e-10
    got = cl.fisher_trace(model, lf, data, seed=0)
    dense = cl.fisher_trace(ref.model, lf, data, seed=0)
    assert float(got.value) == pytest.approx(float(dense.value), rel=1e-12)
    assert model.e.sparse is True


def test_fisher_trace_refuses_a_model_that_mixes_the_examples() -> None:
    """``fisher_trace`` (and the exact Monte-Carlo trace built on it) sums per-example squares:
    it refuses a model that centres its features over the batch, as the one-pass quantities do
    (it answered with a number that is no per-example Fisher's)."""
    from tests.test_coupling_review_s13 import _center

    model = _center()
    data = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
    for call in (
        lambda: cl.fisher_trace(model, nn.CrossEntropyLoss(), data, seed=0),
        lambda: cl.trace(model, nn.CrossEntropyLoss(), data, matrix="fisher", method="exact"),
    ):
        with pytest.raises(ValueError, match="mixes the examples"):
            call()
    # the Hutchinson trace of the Hessian of the whole batch's loss stays available
    cl.trace(model, nn.CrossEntropyLoss(), data, num_probes=2)
