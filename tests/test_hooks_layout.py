"""The hooks backend's layout (which modules hold the examples in their first dimension) is
never learned from sizes that cannot tell: a first chunk of one example, or a plain
``nn.Sequential`` whose leading size happens to equal the number of examples. Against the
``func`` backend (dense per-example gradients)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.backends._choice import CHOICES
from tests.zoo import TinyGPT


def _close(got: dict, ref: dict) -> None:
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-14, msg=k)


class _GPT2Positions(TinyGPT):
    """Positions as HF GPT-2 embeds them: ``wpe(position_ids)`` of shape ``(1, T, d)``, whose
    leading size 1 equals the number of examples of a one-example chunk."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device)[None])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("sizes", [(1, 3), (3, 1), (1, 1, 4)])
def test_a_first_chunk_of_one_example_does_not_fix_the_layout(sizes):
    torch.manual_seed(0)
    model = _GPT2Positions().double()
    g = torch.Generator().manual_seed(1)
    batches = []
    for n in sizes:
        idx = torch.randint(0, 11, (n, 6), generator=g)
        batches.append((idx[:, :-1].contiguous(), idx[:, 1:].contiguous()))
    loss_fn = nn.CrossEntropyLoss()
    CHOICES.clear()
    for fn in (
        lambda **kw: cl.diag_fisher(model, loss_fn, batches, **kw),
        lambda **kw: cl.gradient_stats(model, loss_fn, batches, **kw).variance,
    ):
        ref = fn(backend="func")
        got = fn(backend="hooks")
        _close(got, ref)
        again = fn()  # after the memo: the same numbers
        _close(again, ref)


class _SwapBT(nn.Module):  # (B, T, E) <-> (T, B, E)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)


@pytest.mark.parametrize("B", [4, 3])
def test_a_sequential_that_moves_the_batch_axis_is_not_taken_as_batch_major(B):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(5, 4), _SwapBT(), nn.Linear(4, 4), nn.Tanh(), _SwapBT(), nn.Linear(4, 5)
    ).double()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randint(0, 5, (B, 4), generator=g), torch.randint(0, 5, (B, 4), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    CHOICES.clear()
    ref = cl.diag_fisher(model, loss_fn, (X, y), backend="func")
    _close(cl.diag_fisher(model, loss_fn, (X, y)), ref)  # T == B = 4: the sizes coincide
