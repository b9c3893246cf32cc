"""BackPACK's rules meeting a shape they do not expect hand over (review s17): a model that adds
a slice of a hidden layer to another layer's output made ``backend="backpack"`` raise torch's
raw shape error from BackPACK's own code; it now gives curvlab's refusal, and ``auto`` is exact."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvlab as cl

DT = torch.float64


class _SliceAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.l1(x))
        return self.l2(h) + h[:, :3]


def _problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(5, 3, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    return _SliceAdd().to(DT), X, y


def _ggn_diagonal(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Dense GGN diagonal of the mean cross-entropy: (1/N) Σ_n diag(J_nᵀ H_n J_n)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(X)):
        x = X[i : i + 1]
        jac = jacrev(lambda p, x=x: functional_call(model, p, (x,))[0])(params)
        prob = torch.softmax(model(x)[0], -1).detach()
        hess = torch.diag(prob) - torch.outer(prob, prob)
        for n in params:
            J = jac[n].reshape(3, -1)
            out[n] += torch.einsum("ci,cd,di->i", J, hess, J).reshape(params[n].shape) / len(X)
    return out


def test_a_shape_the_rules_do_not_expect_is_refused_clearly() -> None:
    model, X, y = _problem()
    with pytest.raises(ValueError, match="shape they do not expect") as err:
        cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="exact", backend="backpack")
    assert "must match the size" in str(err.value)  # torch's own words, quoted


def test_auto_computes_it_exactly() -> None:
    model, X, y = _problem()
    got = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    want = _ggn_diagonal(model, X, y)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-14)
