"""A model that casts its floating-point inputs itself is measured, not refused (known item of
review s13): float inputs of another dtype than the parameters were refused up front by every
entry point, though a bfloat16 HuggingFace ViT casts float32 pixels itself. They are now refused
only where the model fails on them (tests/test_data_mismatch.py), with the same clear message.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl


class Casting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.to(self.a.weight.dtype))))


def _problem():  # noqa: ANN202
    torch.manual_seed(0)
    model = Casting().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(7, 4, generator=g)  # float32 inputs, float64 model
    return model, X, torch.randint(0, 3, (7,), generator=g)


LOSS = nn.CrossEntropyLoss()
CALLS = {
    "diag_fisher": lambda m, d: cl.diag_fisher(m, LOSS, d),
    "gradient_stats": lambda m, d: cl.gradient_stats(m, LOSS, d).second_moment,
    "kfac": lambda m, d: cl.kfac(m, LOSS, d),
    "fisher_norms": lambda m, d: cl.fisher_norms(m, LOSS, d),
    "trace": lambda m, d: cl.trace(m, LOSS, d, method="exact"),
    "eigenvalues": lambda m, d: cl.eigenvalues(m, LOSS, d, k=1, seed=0),
    "analyze": lambda m, d: cl.analyze(m, LOSS, d, num_probes=2, num_steps=4, k=1),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_model_that_casts_its_inputs_is_measured(name: str) -> None:
    model, X, y = _problem()
    CALLS[name](model, (X, y))  # no TypeError


def test_its_empirical_fisher_against_brute_force() -> None:
    model, X, y = _problem()
    got = cl.diag_fisher(model, LOSS, (X, y), kind="empirical")
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, t):  # noqa: ANN001, ANN202
        return LOSS(functional_call(model, p, (x[None],)), t[None])

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, X, y)
    for k, v in per.items():
        torch.testing.assert_close(got[k], (v**2).mean(0), rtol=1e-10, atol=1e-14)
