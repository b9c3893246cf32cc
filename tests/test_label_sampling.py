"""Labels drawn from the model's predictive distribution (``LossSpec.sample_targets``).

On the CPU the draws use inverse transform sampling (one uniform per position): they must follow
the categorical distribution (a statistical test with a tolerance from its standard error), never
draw a class of probability 0, repeat with the same generator, and fail clearly on NaN logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvlab import NonFiniteError
from curvlab._losses import loss_spec


def _probs() -> torch.Tensor:
    return torch.tensor([0.05, 0.0, 0.55, 0.25, 0.15], dtype=torch.float64)


def test_frequencies_follow_the_distribution_within_their_standard_error() -> None:
    spec = loss_spec(nn.CrossEntropyLoss())
    p = _probs()
    n = 200_000
    logits = p.clamp_min(1e-300).log().expand(n, -1).clone()
    logits[:, 1] = -math.inf  # probability exactly 0
    gen = torch.Generator().manual_seed(7)
    draws = spec.sample_targets(logits, gen)
    freq = torch.bincount(draws, minlength=p.numel()).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert int((draws == 1).sum()) == 0  # a class of probability 0 is never drawn
    assert torch.all((freq - p).abs() <= 5 * se + 1e-12), (freq, p)


def test_same_generator_same_draws_and_ignored_positions_kept() -> None:
    spec = loss_spec(nn.CrossEntropyLoss(ignore_index=0))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, 4, generator=gen)  # (N, C, T): the classes in axis 1
    targets = torch.randint(0, 9, (6, 4), generator=gen)
    a = spec.sample_targets(logits, torch.Generator().manual_seed(3), targets)
    b = spec.sample_targets(logits, torch.Generator().manual_seed(3), targets)
    assert torch.equal(a, b) and a.shape == targets.shape
    drawn = a[targets != 0]
    assert bool(((drawn >= 0) & (drawn < 9)).all())  # every drawn label is a class


def test_nan_logits_are_a_clear_error() -> None:
    spec = loss_spec(nn.CrossEntropyLoss())
    logits = torch.zeros(3, 4)
    logits[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="no label can be sampled"):
        spec.sample_targets(logits, torch.Generator().manual_seed(0))
