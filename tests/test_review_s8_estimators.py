"""Review of the operators and estimators (eighth sweep). Each case was wrong before:

* with Dropout in train mode, an operator whose products run forward passes (forward-mode Jacobian
  products, for ``nn.Hardsigmoid``; graphs rebuilt per product for several batches) drew other
  masks than its graph: ``J_A^T Lambda J_B``, 23-43% asymmetric, traces and eigenvalues off; and a
  draw from the global RNG between two products changed the matrix;
* a parameter replaced by another ``Parameter`` gave silent zero rows;
* ``fisher_trace`` with Dropout in train mode drew labels and gradients under different masks
  (10.97 against 0 in expectation);
* a bad ``distribution=`` or ``seed=`` of ``trace`` was refused only after the data was read.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl

DT = torch.float64


class ClampHardsigmoid(nn.Module):
    """``Hardsigmoid`` written with ``clamp`` (double backward works: no forward-mode route)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + 3, 0, 6) / 6


def _net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), act, nn.Dropout(0.4), nn.Linear(8, 3)).to(DT).train()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for n in (5, 3)
    ]


@pytest.mark.parametrize("matrix", ["ggn", "empirical_fisher", "fisher"])
@pytest.mark.parametrize("keep_graph", [None, False])
def test_forward_mode_products_use_the_graphs_dropout_masks(matrix: str, keep_graph) -> None:  # noqa: ANN001
    data = _batches()
    torch.manual_seed(7)  # the global RNG state the masks come from
    op = cl.curvature_operator(
        _net(nn.Hardsigmoid()), nn.CrossEntropyLoss(), data, matrix=matrix, keep_graph=keep_graph
    )
    A = op.to_dense()
    assert "jacobian" in op.info  # the forward-mode route
    torch.testing.assert_close(A, A.T, rtol=1e-12, atol=1e-14)
    # the same function written with clamp (double-backward route) draws the same masks: the
    # same matrix
    torch.manual_seed(7)
    twin = cl.curvature_operator(
        _net(ClampHardsigmoid()), nn.CrossEntropyLoss(), data, matrix=matrix, keep_graph=keep_graph
    )
    # (torch's hardsigmoid rounds its 1/6 in single precision: 6e-8 relative; other masks
    # would differ by O(1))
    torch.testing.assert_close(A, twin.to_dense(), rtol=1e-6, atol=1e-9)
    assert "jacobian" not in twin.info


@pytest.mark.parametrize("matrix", ["hessian", "ggn", "fisher", "empirical_fisher"])
def test_operator_is_one_matrix_whatever_the_caller_draws(matrix: str) -> None:
    op = cl.curvature_operator(
        _net(nn.Tanh()), nn.CrossEntropyLoss(), _batches(), matrix=matrix, keep_graph=False
    )
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2), dtype=DT)
    before = op @ v
    torch.randn(100)  # the caller's own draws between two products
    torch.testing.assert_close(op @ v, before, rtol=0, atol=0)


def test_a_replaced_parameter_is_seen() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches(), matrix="ggn")
    model[0].weight = nn.Parameter(model[0].weight.detach() * 2)
    with pytest.raises(RuntimeError, match="parameters changed since this operator was built"):
        op @ torch.ones(op.shape[0], dtype=DT)


def test_fisher_trace_refuses_dropout_in_train_mode() -> None:
    with pytest.raises(ValueError, match=r"Dropout at '2' is in train mode"):
        cl.fisher_trace(_net(nn.Tanh()), nn.CrossEntropyLoss(), _batches())
    with pytest.raises(ValueError, match="in train mode"):
        cl.trace(
            _net(nn.Tanh()), nn.CrossEntropyLoss(), _batches(), matrix="fisher", method="exact"
        )


@pytest.mark.parametrize("bad", [{"distribution": "normal"}, {"seed": 1.5}])
def test_trace_arguments_are_checked_before_the_data_is_read(bad: dict) -> None:
    read = []

    def data():  # noqa: ANN202
        read.append(1)
        yield from _batches()

    with pytest.raises(ValueError, match="distribution|seed"):
        cl.trace(_net(nn.Tanh()).eval(), nn.CrossEntropyLoss(), data(), num_probes=2, **bad)
    assert not read
