"""kfac(kind="exact") on a confident float16 classifier: the square-root columns are scaled
before the 16-bit backward pass (review s19).

The loss Hessian's square-root columns ``s_k = sqrt(p_k) (e_k - p)`` were cast to float16 as they
were: at a margin of 32 the unlikely class's ``sqrt(p) ~ 1e-7`` is subnormal (spacing ``6e-8``), and
the last layer's ``G`` came out 8% low.
"""

from __future__ import annotations

import torch
from torch import nn

import curvlab as cl


def _classifier() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]) * 20.0)
        model[2].bias.zero_()
    X = torch.rand(8, 3) + 1.0  # margins 30 to 39: p of the other class 1e-13 to 1e-17
    y = torch.zeros(8, dtype=torch.long)
    return model.half(), X.half(), y


def _nll(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(z.unsqueeze(0), t.unsqueeze(0), reduction="sum")


def test_kfac_exact_last_layer_G_of_a_confident_float16_classifier():
    model, X, y = _classifier()
    f = model(X).detach().double()  # the float16 model's own logits, exactly
    assert (f[:, 0] - f[:, 1]).min() > 29

    # G of the last layer = (1/N) sum_n d^2 NLL_n / d f_n^2 (its output is the model's): for two
    # classes a_n [[1, -1], [-1, 1]], a_n = sigmoid(m_n) sigmoid(-m_n) at the margin m_n, taken in
    # float64 without forming 1 - p (autograd's Hessian of cross_entropy forms p0 - p0^2 and
    # loses 1% of a_n ~ 1e-14 to float64's rounding of p0 ~ 1)
    m = f[:, 0] - f[:, 1]
    a = torch.exp(nn.functional.logsigmoid(m) + nn.functional.logsigmoid(-m))
    expected = a.mean() * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    # ... and the off-diagonal entries, -p0 p1, by torch.func (no cancellation there)
    hess = torch.func.vmap(torch.func.hessian(_nll))(f, y)
    assert torch.allclose(hess[:, 0, 1], -a, rtol=1e-12, atol=0)
    got = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")["2"].G.double()
    # the columns reach the backward pass rounded to float16 once (relative 2^-11) after their
    # scaling: G, a sum of their products, within 2 * 2^-11 of each entry's magnitude, times 2
    tol = 4 * 2.0**-11
    assert torch.allclose(got, expected, rtol=tol, atol=0), (got, expected)
    assert abs(got.trace() / expected.trace() - 1) < tol
