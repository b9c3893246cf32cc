"""Review s14: the check that a model keeps the examples apart no longer depends on ``chunk_size``.

With ``chunk_size=1`` every chunk holds one example, and the check (which compares two examples
computed together with each alone) had nothing to compare: a model that centres its features over
the batch got per-example gradients of each example run alone, a number that depends on how curvlab
chunked the batch. Every per-example entry point now checks two examples of the first batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from tests.test_coupling_review_s13 import Center  # feature centering over the batch

LOSS = nn.CrossEntropyLoss()


class DictCenter(Center):
    def forward(self, x: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)


CALLS = {
    "diag_fisher_empirical": lambda m, d: cl.diag_fisher(
        m, LOSS, d, kind="empirical", chunk_size=1
    ),
    "diag_fisher_exact": lambda m, d: cl.diag_fisher(m, LOSS, d, kind="exact", chunk_size=1),
    "diag_fisher_mc": lambda m, d: cl.diag_fisher(m, LOSS, d, kind="mc", chunk_size=1, seed=0),
    "gradient_stats": lambda m, d: cl.gradient_stats(m, LOSS, d, chunk_size=1),
    "fisher_norms": lambda m, d: cl.fisher_norms(m, LOSS, d, chunk_size=1),
    "kfac": lambda m, d: cl.kfac(m, LOSS, d, chunk_size=1),
    "fisher_trace": lambda m, d: cl.fisher_trace(m, LOSS, d, chunk_size=1, seed=0),
}


def _data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (n,), generator=g
    )


@pytest.mark.parametrize("name", sorted(CALLS))
def test_chunk_size_one_refuses_a_model_that_mixes_the_examples(name: str) -> None:
    torch.manual_seed(0)
    model = Center().double()
    with pytest.raises(ValueError, match="mixes the examples"):
        CALLS[name](model, _data())


@pytest.mark.parametrize("name", ["diag_fisher_empirical", "kfac", "fisher_norms"])
def test_chunk_size_one_refuses_on_a_list_of_batches(name: str) -> None:
    torch.manual_seed(0)
    model = Center().double()
    X, y = _data(7)
    with pytest.raises(ValueError, match="mixes the examples"):
        CALLS[name](model, [(X[:4], y[:4]), (X[4:], y[4:])])


def test_chunk_size_one_keeps_answering_for_a_model_that_keeps_them_apart() -> None:
    """No false refusal: the chunked answer equals the whole batch's (and brute force)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = _data()
    one = cl.diag_fisher(model, LOSS, (X, y), kind="empirical", chunk_size=1)
    params = dict(model.named_parameters())

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return LOSS(torch.func.functional_call(model, p, (x[None],)), t[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, X, y)
    for n, g in grads.items():
        torch.testing.assert_close(one[n], (g**2).mean(0), rtol=1e-10, atol=1e-12)
    for name in ("kfac", "fisher_norms", "gradient_stats"):
        CALLS[name](model, (X, y))  # answers


def test_chunk_size_one_refuses_with_dict_inputs() -> None:
    torch.manual_seed(0)
    model = DictCenter().double()
    X, y = _data()
    with pytest.raises(ValueError, match="mixes the examples"):
        cl.diag_fisher(model, LOSS, ({"x": X}, y), kind="empirical", chunk_size=1)
