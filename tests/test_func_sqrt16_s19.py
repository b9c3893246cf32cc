"""The func backend's exact GGN diagonal of a confident float16 classifier: the square-root
columns are scaled before the 16-bit backward pass (review s19: 3.5% low at a margin of 32)."""

from __future__ import annotations

import torch
from torch import nn

import curvlab as cl


def test_func_exact_diagonal_of_a_confident_float16_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]) * 20.0)
        model[2].bias.zero_()
    model = model.half()
    X, y = (torch.rand(8, 3) + 1.0).half(), torch.zeros(8, dtype=torch.long)
    f = model(X).detach().double()  # the float16 model's own logits and hidden layer, exactly
    h = model[:2](X).detach().double()
    assert (f[:, 0] - f[:, 1]).min() > 29
    # last layer, two classes: Lambda_n = a_n [[1, -1], [-1, 1]], a_n = sigmoid(m) sigmoid(-m)
    # at the margin m (float64, without forming 1 - p); the GGN diagonal of W[c, j] is
    # (1/N) sum_n a_n h_nj^2, of b[c] (1/N) sum_n a_n
    m = f[:, 0] - f[:, 1]
    a = torch.exp(nn.functional.logsigmoid(m) + nn.functional.logsigmoid(-m))
    want_w = (a[:, None] * h**2).mean(0).expand(2, 3)
    want_b = a.mean().expand(2)
    got = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="exact", backend="func")
    # the columns enter the backward pass rounded to float16 once (2^-11), the hidden layer's
    # values are exact here (taken from the model): squares within 2 * 2^-11, times 2
    tol = 4 * 2.0**-11
    assert torch.allclose(got["2.bias"].double(), want_b, rtol=tol, atol=0), got["2.bias"]
    assert torch.allclose(got["2.weight"].double(), want_w, rtol=tol, atol=0), got["2.weight"]
