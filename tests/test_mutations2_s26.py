"""Tests that kill the mutations which survived the s26 fourth mutation round (review s26, MV):
the float32 (and 16-bit) examples-apart tolerance is checked on each side of its boundary (1);
``NoisyOptimizer`` reads the factor of ``torch.add(x, loss, alpha=a)`` (2);
``NQM.steps_to_target`` finds a target reached exactly at ``max_steps`` and not one step
later (3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import curvlab as cl
from curvlab._layout import MixedExamplesError, examples_mixed
from curvlab.noise import NoisyOptimizer
from curvlab.nqm import NQM
from tests.test_loss_factor_s22 import CE, _batches, _flat, _model, _noisy, _signs

pytestmark = pytest.mark.filterwarnings("ignore")


# ------------------------------------------------------------------ 1. the coupling tolerance
class _WeaklyCoupled(nn.Module):
    """``h + c * mean_batch(h)`` with ``h = x [1, 1]``: example ``i``'s output is ``x_i + c *
    mean(x)`` in both columns, so the batch pass's rows and the same rows run alone differ by
    exactly ``c * (mean(batch) - mean(rows))``."""

    def __init__(self, c: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.c = c
        self.lin = nn.Linear(1, 2, bias=False).to(dtype)
        with torch.no_grad():
            self.lin.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return h + self.c * h.mean(0, keepdim=True)


def _coupled_batch(far: float, dtype: torch.dtype) -> Tensor:
    """Eight examples: the probed ones (0, 7 and 1, 6) are 1, the middle four ``1 + far``."""
    x = torch.ones(8, 1, dtype=dtype)
    x[2:6] += far
    return x


def _relative(c: float, far: float) -> float:
    """The check's relative difference, float64: ``c * far / 2`` over the probed rows' largest
    magnitude in the batch pass, ``1 + c * (1 + far / 2)``."""
    return (c * far / 2) / (1 + c * (1 + far / 2))


@pytest.mark.parametrize(
    ("far", "refused"),
    [(6.0, True), (3.0, False)],
    ids=["2.9e-2-refused", "1.5e-2-passes"],
)
def test_float32_coupling_is_refused_above_2e_2_and_passes_below(far: float, refused: bool) -> None:
    """float32 allows 2e-2 (COUPLING_TOLERANCE): a coupling of 2.9e-2 is refused with its
    size, one of 1.5e-2 passes (a 2e-1 tolerance let 2.9e-2, and anything up to 20%, through
    silently)."""
    c = 0.01
    rel = _relative(c, far)
    assert (rel > 2e-2) == refused and abs(rel - 2e-2) > 4e-3  # well clear of float32 rounding
    model = _WeaklyCoupled(c, torch.float32)
    x = _coupled_batch(far, torch.float32)
    y = torch.zeros(8, dtype=torch.long)
    if refused:
        with pytest.raises(MixedExamplesError) as err:
            cl.gradient_stats(model, nn.CrossEntropyLoss(), (x, y))
        assert f"in the batch pass by {rel:.2g} (relative; rounding allows 2e-02)" in str(err.value)
    else:
        stats = cl.gradient_stats(model, nn.CrossEntropyLoss(), (x, y))
        assert math.isfinite(float(stats.trace_covariance))


@pytest.mark.parametrize(
    ("far", "refused"),
    [(6.0, True), (2.0, False)],
    ids=["8.3e-2-refused", "2.9e-2-passes"],
)
def test_float16_coupling_is_refused_above_5e_2_and_passes_below(far: float, refused: bool) -> None:
    """16-bit outputs allow 5e-2 (COUPLING_TOLERANCE_16); every value here is exact in float16
    (c = 2^-5, means of small integers), so the relative differences are exactly 0.0833 and
    0.0294."""
    c = 2.0**-5
    rel = _relative(c, far)
    assert (rel > 5e-2) == refused and abs(rel - 5e-2) > 2e-2
    model = _WeaklyCoupled(c, torch.float16)
    why = examples_mixed(model, _coupled_batch(far, torch.float16))
    if refused:
        assert why is not None
        assert f"in the batch pass by {rel:.2g} (relative; rounding allows 5e-02)" in why
    else:
        assert why is None


# ------------------------------------------------------------ 2. the loss factor of add(alpha=)
def _add_alpha_step(stated: float) -> tuple[nn.Module, NoisyOptimizer]:
    model, (x, y) = _model(), _batches()[-1]
    noisy = _noisy(model)
    noisy.zero_grad()
    with noisy.capture(loss_factor=stated):
        loss = CE(model(x), y)
        torch.zeros((), dtype=loss.dtype).add(loss, alpha=0.25).backward()
    return model, noisy


@pytest.mark.parametrize("stated", [1.0, 0.5])
def test_full_fisher_reads_the_factor_of_add_alpha_and_refuses_a_contradiction(
    stated: float,
) -> None:
    """``reg.add(loss, alpha=0.25)`` carries 0.25: a stated 1 or 0.5 is refused naming both (a
    reading of 1 folded the stated-1 noise 4x too small: |r| 0.25 for 1)."""
    with pytest.raises(ValueError, match="loss_factor=") as err:
        _add_alpha_step(stated)
    message = str(err.value)
    assert f"loss_factor={stated:.6g}" in message and "loss_factor=0.25" in message


def test_full_fisher_folds_the_documented_noise_through_add_alpha() -> None:
    """The stated 0.25 agrees: folded, and the noise is ``scale * sqrt(1/N) * sum_n r_n grad
    NLL_n`` with ``|r_n| = 1`` exactly (float64 brute force per-example gradients)."""
    model, noisy = _add_alpha_step(0.25)
    assert noisy._pending is not None and noisy._pending.noise_added
    noisy.step()
    x, y = _batches()[-1]
    clean = _model()
    clean.zero_grad()
    (0.25 * CE(clean(x), y)).backward()
    r = _signs(model, _flat(model) - _flat(clean), x, y)
    torch.testing.assert_close(r.abs(), torch.ones_like(r), rtol=0, atol=1e-9)


# ------------------------------------------------------------- 3. steps_to_target at max_steps
@pytest.fixture(scope="module")
def small() -> NQM:
    return NQM.paper(d=200, bins=12)


def test_steps_to_target_counts_a_target_reached_exactly_at_max_steps(small: NQM) -> None:
    """The first step at the target, ``t`` (float64 brute force over every step): found with
    ``max_steps=t`` (``t >= max_steps`` gave inf), ``inf`` with ``max_steps=t - 1``."""
    target, checked = 0.4, 0
    for lr in np.geomspace(0.01, 1.0, 7):
        r = small.risk(np.arange(3000), lr, 128.0)
        hit = np.flatnonzero(r <= target)
        if not hit.size or hit[0] < 2:
            continue
        t = int(hit[0])
        assert small.steps_to_target(target, lr, 128.0, max_steps=t) == t
        assert small.steps_to_target(target, lr, 128.0, max_steps=t - 1) == math.inf
        checked += 1
    assert checked >= 4
    # the reproducer's case: 351 at lr 0.1
    assert small.steps_to_target(0.4, 0.1, 128.0, max_steps=351) == 351
    assert small.steps_to_target(0.4, 0.1, 128.0, max_steps=350) == math.inf
