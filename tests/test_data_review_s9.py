"""Data forms (review s9): a batch whose inputs are a tuple of tensors was read as two batches
("forward() missing 1 required positional argument" or "batch 1 of data is a Tensor")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin(a + b)


def test_tuple_inputs_get_the_dict_advice_and_a_dict_works():
    model, loss_fn = _Two(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    for call in (cl.diag_fisher, lambda m, lf, d: cl.trace(m, lf, d, num_probes=2, seed=0)):
        with pytest.raises(TypeError, match=r"tuple of 2 tensors.*as a dict"):
            call(model, loss_fn, ((a, b), y))
    got = cl.diag_fisher(model, loss_fn, ({"a": a, "b": b}, y))
    want = cl.diag_fisher(model.lin, loss_fn, (a + b, y))
    assert torch.allclose(got["lin.weight"], want["weight"])
