"""``FisherTraceNoise`` in ``NoisyOptimizer`` with a layer the step's forward skips (review s23).

A parameter whose ``.grad`` is ``None`` at step time (a layer the forward did not use, with the
default ``zero_grad(set_to_none=True)``) gets no noise. ``FisherTraceNoise`` spread ``Tr(F)`` over
every trainable parameter's coordinates all the same, so the total variance added was
``scale**2 * Tr(F) * d_receiving / d`` (0.393 for the documented 0.530 here), not the documented
``scale**2 * Tr(F)``, and it depended on ``set_to_none``. ``d`` now counts the coordinates that
receive the draw: the total is ``scale**2 * Tr(F)`` either way.

The trace is checked against dense float64 brute force written here (``torch.func``); the
tolerances are derived from the standard error over the draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from curvlab.noise import FisherTraceNoise, NoisyOptimizer

DT = torch.float64
SCALE = 0.5
STEPS = 600


class _Branch(nn.Module):
    """``b(tanh(a(x)))``, plus ``c(x)`` only where ``use_c`` (conditional computation)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(4, 5).to(DT)
        self.b = nn.Linear(5, 3).to(DT)
        self.c = nn.Linear(4, 3).to(DT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
        self.use_c = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b(torch.tanh(self.a(x)))
        return out + self.c(x) if self.use_c else out


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)


def _brute_trace_and_grad(model: _Branch, X: torch.Tensor, y: torch.Tensor):
    """``Tr(F_emp) = (1/N) sum_n |grad NLL_n|^2`` (mean cross-entropy, one term per example) over
    every parameter, and the batch gradient, for the model as it runs now (``c`` unused: its
    per-example gradients are 0)."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def nll(params, x, t):
        out = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, t.unsqueeze(0))

    per_example = vmap(grad(nll), in_dims=(None, 0, 0))(theta, X, y)
    trace = sum((g**2).sum() for g in per_example.values()) / X.shape[0]
    batch_grad = {n: g.mean(0) for n, g in per_example.items()}
    return float(trace), batch_grad


def _total_noise(set_to_none: bool) -> tuple[list[float], float, dict[str, int]]:
    """``|eps|^2`` of each step's added noise (``lr=0``: the parameters never move), with ``c``
    unused on every step; ``c`` was used on an earlier step, so ``set_to_none=False`` leaves it a
    stale zero ``.grad``."""
    model, loss_fn = _Branch(), nn.CrossEntropyLoss()
    X, y = _batch()
    model.use_c = True
    loss_fn(model(X), y).backward()  # an earlier step that used c
    model.use_c = False
    trace, g = _brute_trace_and_grad(model, X, y)
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        FisherTraceNoise("empirical", scale=SCALE),
        model,
        loss_fn,
        seed=0,
        recompute_every=10**9,  # measured on the first step (captured), reused after
    )

    def closure():
        noisy.zero_grad(set_to_none=set_to_none)
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    totals, receiving = [], {}
    for _ in range(STEPS):
        noisy.step(closure)
        total = 0.0
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            receiving[n] = p.numel()
            total += float(((p.grad - g[n]) ** 2).sum())
        totals.append(total)
    return totals, trace, receiving


@pytest.mark.parametrize("set_to_none", [True, False])
def test_trace_noise_total_variance_over_receiving_coordinates(set_to_none):
    totals, trace, receiving = _total_noise(set_to_none)
    d_r = sum(receiving.values())
    # the rule: a None .grad gets no noise, a stale zero .grad does
    assert ("c.weight" in receiving) is (not set_to_none)
    assert d_r == (43 if set_to_none else 58)
    expected = SCALE**2 * trace  # documented E|eps|^2 = scale^2 Tr(F)
    mean = sum(totals) / len(totals)
    # |eps|^2 is (scale^2 Tr / d_r) * chi^2_{d_r}: variance 2 (scale^2 Tr)^2 / d_r per step
    se = expected * math.sqrt(2.0 / (d_r * len(totals)))
    # before the fix, set_to_none=True gave expected * 43/58 (26% low: 8 standard errors)
    assert abs(mean - expected) < 5 * se, (mean, expected, se)


def test_trace_noise_draw_receives_and_sample_unchanged():
    """``draw(receives=...)`` spreads the total over those coordinates; without it (``sample()``)
    over every trainable parameter, bitwise as before; an unknown name is refused."""
    model = _Branch()
    sampler = FisherTraceNoise("empirical", scale=SCALE)
    state = torch.tensor(0.37, dtype=DT)  # Tr(F) / d, d = 58
    names = [n for n, _ in model.named_parameters()]
    plain = sampler.draw(model, state, torch.Generator().manual_seed(3))
    every = sampler.draw(model, state, torch.Generator().manual_seed(3), receives=names)
    assert all(torch.equal(plain[n], every[n]) for n in names)  # same stream, same std
    part = [n for n in names if not n.startswith("c.")]
    some = sampler.draw(model, state, torch.Generator().manual_seed(3), receives=part)
    factor = math.sqrt(58 / 43)  # same draws, std sqrt(Tr(F) / 43)
    for n in part:
        torch.testing.assert_close(some[n], plain[n] * factor, rtol=4 * torch.finfo(DT).eps, atol=0)
    with pytest.raises(ValueError, match="d.weight"):
        sampler.draw(model, state, torch.Generator(), receives=["a.weight", "d.weight"])
