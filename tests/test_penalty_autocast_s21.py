"""A penalty recomputed every k > 1 steps takes its cached gradient outside autocast (review s21).

docs/training-loops.md ("Precision", penalties): with a forward of its own (``output=None``) "that
forward and the penalty computed from it run outside autocast". With ``every > 1`` the cached
gradient grad P was taken after that block closed, under the caller's bfloat16 region: 3e-3
relative off the ``every=1`` gradient (which the user's own backward takes outside autocast).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.regularizers import FisherPenalty, GradientNormPenalty


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _grad(penalty_of, every: int, autocast: bool) -> list[torch.Tensor]:
    model = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    penalty = penalty_of(model, every)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = penalty(x, y)
    value.backward()
    return [p.grad.clone() for p in model.parameters()]


KINDS = {
    "gradient": lambda m, k: GradientNormPenalty(m, nn.CrossEntropyLoss(), alpha=0.5, every=k),
    "input": lambda m, k: GradientNormPenalty(
        m, nn.CrossEntropyLoss(), alpha=0.5, every=k, kind="input"
    ),
    "fisher": lambda m, k: FisherPenalty(m, nn.CrossEntropyLoss(), alpha=0.5, every=k, seed=0),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cached_penalty_gradient_is_taken_outside_autocast(kind: str) -> None:
    want = _grad(KINDS[kind], 1, autocast=True)  # every=1: the user's backward, outside autocast
    assert all(torch.equal(a, b) for a, b in zip(want, _grad(KINDS[kind], 1, autocast=False)))
    got = _grad(KINDS[kind], 3, autocast=True)
    for a, b in zip(got, want):
        # float32 arithmetic in another order (the surrogate's product), never bfloat16's 4e-3
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
