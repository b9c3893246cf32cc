"""Operators on batches of sequences of different lengths (MSE, BCE, cross-entropy with
probabilities): every batch is counted from its own targets, against dense brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl

DT = torch.float64


def _batches(loss: str):
    g = torch.Generator().manual_seed(0)
    out = []
    for n, t in ((2, 3), (3, 6)):
        x = torch.randn(n, t, 3, generator=g, dtype=DT)
        if loss == "mse":
            y = torch.randn(n, t, 2, generator=g, dtype=DT)
        elif loss == "bce":
            y = torch.rand(n, t, 2, generator=g, dtype=DT).round()
        else:  # cross-entropy with class probabilities over axis 1 (t "classes", 2 positions)
            y = torch.softmax(torch.randn(n, t, 2, generator=g, dtype=DT), dim=1)
        out.append((x, y))
    return out


LOSSES = {"mse": nn.MSELoss(), "bce": nn.BCEWithLogitsLoss(), "ce_probs": nn.CrossEntropyLoss()}


def _dense_hessian(model: nn.Module, loss_fn: nn.Module, batches) -> torch.Tensor:
    """The Hessian of the mean over every loss term of all batches, as torch defines the terms
    (cross-entropy with probabilities: classes in axis 1)."""
    w0, b0 = model.weight.detach(), model.bias.detach()
    ce = isinstance(loss_fn, nn.CrossEntropyLoss)
    terms = sum(y.numel() // (y.shape[1] if ce else 1) for _, y in batches)
    total = type(loss_fn)(reduction="sum")

    def objective(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[: w0.numel()].view_as(w0), theta[w0.numel() :]
        return sum(total(nn.functional.linear(x, w, b), y) for x, y in batches) / terms

    return torch.func.hessian(objective)(torch.cat([w0.reshape(-1), b0]))


@pytest.mark.parametrize("loss", list(LOSSES))
def test_operator_counts_each_batch_from_its_own_targets(loss):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    loss_fn, batches = LOSSES[loss], _batches(loss)
    H = _dense_hessian(model, loss_fn, batches)
    for keep_graph in (False, True):
        op = cl.curvature_operator(model, loss_fn, batches, keep_graph=keep_graph)
        torch.testing.assert_close(op.to_dense(), H, rtol=1e-10, atol=1e-12)
    got = cl.trace(model, loss_fn, batches, method="exact").value
    assert float(got) == pytest.approx(float(torch.trace(H)), rel=1e-10)
    diag = cl.diag_hessian(model, loss_fn, batches)
    flat = torch.cat([diag["weight"].reshape(-1), diag["bias"]])
    torch.testing.assert_close(flat, torch.diagonal(H), rtol=1e-10, atol=1e-12)
