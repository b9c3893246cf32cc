"""A model whose layers run under ``torch.utils.checkpoint(..., use_reentrant=True)`` (HF's
``gradient_checkpointing_enable`` with that option): the checkpointed forward runs without autograd,
so the hooks backend cannot see those layers. It hands over naming the cause (it said "the model
runs different layers on 2 examples than on the batch", found in review); forced, its error says
what to do. Non-reentrant checkpointing is computed exactly, against the func backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import curvlab as cl


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
        self.head = nn.Linear(5, 2)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (6,), generator=g
    )


def test_reentrant_checkpointing_is_named_when_the_hooks_are_forced():
    torch.manual_seed(0)
    model = _Checkpointed(reentrant=True).double()
    with pytest.raises(ValueError, match="use_reentrant=False") as err:
        cl.diag_fisher(model, nn.CrossEntropyLoss(), _data(), backend="hooks")
    assert "'block.0'" in str(err.value) and "without autograd" in str(err.value)
    assert all(p.grad is None for p in model.parameters())


def test_non_reentrant_checkpointing_is_exact():
    torch.manual_seed(0)
    model = _Checkpointed(reentrant=False).double()
    data = _data()
    ref = cl.diag_fisher(model, nn.CrossEntropyLoss(), data, backend="func")
    got = cl.diag_fisher(model, nn.CrossEntropyLoss(), data, backend="hooks")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-15, msg=k)
