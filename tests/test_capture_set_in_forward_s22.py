"""Proposed test (needs the curvlab/backends/_layers.py patch CS_proposed_layers.patch): the
one-pass capture of DiagFisherNoise/KFACNoise on a fresh model whose Linear's weight is deleted and
set in the forward raised a raw AttributeError (tappable_layers read module.weight)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.noise import DiagFisherNoise, KFACNoise, NoisyOptimizer

DT = torch.float64


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.randn(6, 4, dtype=DT))


class _SetInForwardFirst(nn.Module):
    """``lin`` (weight deleted, set in the forward from ``h.big``) comes before the module holding
    ``big`` in ``named_modules()``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).to(DT)
        del self.lin.weight
        self.h = _Holder()
        self.l2 = nn.Linear(3, 3).to(DT)

    def forward(self, x: Tensor) -> Tensor:
        self.lin.weight = self.h.big[:3]
        return self.l2(torch.tanh(self.lin(x))) + F.linear(x, self.h.big[3:])


@pytest.mark.parametrize("make", [DiagFisherNoise, KFACNoise])
def test_a_noisy_step_on_a_fresh_model_with_a_weight_set_in_forward(make) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = _SetInForwardFirst()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(5, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=g)
    ce = nn.CrossEntropyLoss()
    sampler = make(scale=1.0)
    reference = copy.deepcopy(model)  # before any forward: lin.weight absent
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), sampler, model, ce)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    noisy.zero_grad()
    with noisy.capture():  # a raw AttributeError here before (fresh model)
        ce(model(X), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    noisy.step()  # the capture cannot tap lin: the separate pass, the sampler's own draw
    want = sampler.sample(reference, ce, X, y, seed=0)
    assert all(bool(w.ne(0).any()) for w in want.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            before[n] - p.detach() - grads[n], want[n], rtol=1e-12, atol=1e-14
        )
