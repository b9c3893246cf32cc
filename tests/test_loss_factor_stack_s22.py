"""FullFisherNoise reads the factor of a loss stacked with other terms and summed or averaged
(``torch.stack([loss, aux]).mean()`` carries 1/2; it was trusted as stated: review s22 R1)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from curvlab.noise import FullFisherNoise, NoisyOptimizer


def _model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    return m


def _step(combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], factor: float | None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noisy = NoisyOptimizer(opt, FullFisherNoise("empirical", scale=0.5), model, loss_fn, seed=3)
    noisy.zero_grad()
    with noisy.capture(loss_factor=factor):
        out = model(x)
        loss = loss_fn(out, y)
        aux = 0.01 * out.pow(2).mean()
        combine(loss, aux).backward()
    folded = noisy._pending is not None and noisy._pending.noise_added
    noisy.step()
    return [p.detach().clone() for p in model.parameters()], folded


def test_stacked_and_averaged_loss_folds_as_the_plain_average() -> None:
    got, folded = _step(lambda loss, aux: torch.stack([loss, aux]).mean(), 0.5)
    want, folded_want = _step(lambda loss, aux: (loss + aux) / 2, 0.5)
    assert folded and folded_want
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_stacked_and_summed_loss_folds_as_the_plain_sum() -> None:
    got, folded = _step(lambda loss, aux: torch.stack([loss, aux]).sum(), None)
    want, folded_want = _step(lambda loss, aux: loss + aux, None)
    assert folded and folded_want
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_stacked_mean_with_a_contradicting_factor_is_refused() -> None:
    with pytest.raises(ValueError, match="loss_factor=1"):
        _step(lambda loss, aux: torch.stack([loss, aux]).mean(), 1.0)
