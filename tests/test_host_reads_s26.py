"""Host reads of the Fisher penalty's label draws and of one-pass ``FullFisherNoise`` steps
(review s26, GP 2 and 3), counted on the CPU with ``tests/test_host_reads_s20.py``'s recorder.

* GP 2: on an accelerator ``fisher_penalty``/``FisherPenalty`` drew its labels with
  ``torch.multinomial``, which checks the probabilities with two host reads per call. It now
  draws them by the exponential race (``curvlab._losses._race_draws``), with no host read;
  logits holding NaN or inf make the penalty NaN instead of an error. The accelerator's branch is
  forced on the CPU (``_on_host`` patched); the CPU's own draws are unchanged.
* GP 3: a one-pass ``FullFisherNoise`` step after ``zero_grad(set_to_none=False)`` reads one
  value (whether the kept ``.grad`` tensors hold earlier backward passes); docs/noise.md ("Host
  reads in a step") and docs/training-loops.md now say so, with ``loss_factor=`` as the way out.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab._losses as losses_module
import curvlab.regularizers._penalties as penalties_module
from curvlab._losses import _race_draws, loss_spec
from curvlab.noise import FullFisherNoise, NoisyOptimizer
from curvlab.regularizers import FisherPenalty, fisher_penalty
from tests.test_host_reads_s20 import _record

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture
def accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The branches an accelerator takes, on the CPU: the label draw and the void-label count."""
    monkeypatch.setattr(losses_module, "_on_host", lambda t: False)
    monkeypatch.setattr(penalties_module, "_readable_for_free", lambda t: False)


def _classifier() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5))
    return model, torch.randn(16, 4), torch.randint(0, 5, (16,))


# ------------------------------------------------------------------------ GP 2: FP's draws


@pytest.mark.usefixtures("accelerator")
def test_fisher_penalty_reads_nothing_on_the_accelerator_branch() -> None:
    """No ``torch.multinomial`` (two host checks per call on a device), no other read."""
    model, X, y = _classifier()
    loss_fn = nn.CrossEntropyLoss()
    for targets in (None, y):
        out = model(X)
        with _record() as hits:
            value = fisher_penalty(model, loss_fn, X, output=out, seed=0, targets=targets)
        assert hits == []
        assert math.isfinite(float(value.detach())) and float(value.detach()) > 0
    penalty = FisherPenalty(model, loss_fn, alpha=0.1, every=1, seed=0)
    penalty(X, output=model(X), targets=y)  # the first call may check the loss once
    with _record() as hits:
        value = penalty(X, output=model(X), targets=y)
    assert hits == []
    assert math.isfinite(float(value.detach()))


def test_race_draws_follow_the_probabilities() -> None:
    """Each class is drawn with its probability: within 5 standard errors of ``p_c`` over
    ``n`` draws (``sqrt(p_c (1 - p_c) / n)``); a class of probability 0 is never drawn."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        draws = _race_draws(probs.to(dtype).expand(n, -1), gen)
        assert draws.shape == (n, 1) and draws.dtype == torch.int64
        freq = torch.bincount(draws[:, 0], minlength=5).double() / n
        stderr = (probs * (1 - probs) / n).sqrt()
        assert freq[4] == 0
        assert bool(((freq - probs).abs() <= 5 * stderr).all()), (freq, probs)


def test_accelerator_branch_draws_the_model_distribution() -> None:
    """Through ``sample_targets(checked=False)`` on the forced branch: the frequency of each
    class at each position matches ``softmax(output)`` within 5 standard errors."""
    torch.manual_seed(0)
    spec = loss_spec(nn.CrossEntropyLoss())
    logits = torch.randn(3, 4, dtype=torch.float64) * 2
    probs = torch.softmax(logits, dim=1)
    n = 40_000
    gen = torch.Generator().manual_seed(2)
    on_host = losses_module._on_host
    try:
        losses_module._on_host = lambda t: False
        draws = spec.sample_targets(logits.repeat(n, 1), gen, checked=False).view(n, 3)
    finally:
        losses_module._on_host = on_host
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=4).double() / n
        stderr = (probs[row] * (1 - probs[row]) / n).sqrt()
        assert bool(((freq - probs[row]).abs() <= 5 * stderr).all()), (row, freq, probs[row])


def test_cpu_draws_are_unchanged() -> None:
    """On the CPU ``checked=False`` draws what the checked draw does (the inverse CDF)."""
    spec = loss_spec(nn.CrossEntropyLoss())
    logits = torch.randn(64, 7)
    a = spec.sample_targets(logits, torch.Generator().manual_seed(3))
    b = spec.sample_targets(logits, torch.Generator().manual_seed(3), checked=False)
    assert torch.equal(a, b)
    model, X, y = _classifier()
    values = [fisher_penalty(model, nn.CrossEntropyLoss(), X, seed=5, targets=y) for _ in range(2)]
    labels = spec.sample_targets(model(X), torch.Generator().manual_seed(5), y)
    ref = nn.functional.cross_entropy(model(X), labels, reduction="mean")
    grads = torch.autograd.grad(ref, list(model.parameters()))
    expected = sum(float(g.double().pow(2).sum()) for g in grads)
    assert float(values[0].detach()) == float(values[1].detach())
    assert float(values[0].detach()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.usefixtures("accelerator")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_logits_make_the_penalty_nan_without_a_read(bad: float) -> None:
    """Logits holding NaN or inf: a NaN penalty (no ``NonFiniteError``, which needed the read)."""
    model, X, y = _classifier()
    with torch.no_grad():
        model[2].bias[1] = bad
    out = model(X)
    with _record() as hits:
        value = fisher_penalty(model, nn.CrossEntropyLoss(), X, output=out, seed=0, targets=y)
    assert hits == []
    assert math.isnan(float(value.detach()))


@pytest.mark.usefixtures("accelerator")
def test_masked_logits_keep_a_finite_penalty() -> None:
    """``-inf`` logits beside finite ones (a masked class) have probability 0: never drawn, and
    the penalty stays finite (only non-finite probabilities make it NaN)."""
    model, X, y = _classifier()
    with torch.no_grad():
        model[2].bias[4] = float("-inf")
    y = y.clamp(max=3)
    values = []
    for seed in range(20):
        spec = loss_spec(nn.CrossEntropyLoss())
        draws = spec.sample_targets(model(X), torch.Generator().manual_seed(seed), checked=False)
        assert bool((draws != 4).all())
        out = model(X)
        values.append(fisher_penalty(model, nn.CrossEntropyLoss(), X, output=out, seed=seed))
    assert all(math.isfinite(float(v.detach())) for v in values)


# ------------------------------------------------------- GP 3: FullFisherNoise's kept .grad


def _full_fisher_reads(set_to_none: bool, loss_factor: float | None) -> list[list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    X, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(opt, FullFisherNoise("empirical", scale=0.1), model, loss_fn, seed=0)
    reads = []
    for it in range(4):
        with _record() as hits:
            opt.zero_grad(set_to_none=set_to_none)
            with noisy.capture(loss_factor=loss_factor):
                loss_fn(model(X), y).backward()
            noisy.step()
        if it >= 2:
            reads.append(hits)
    return reads


def test_full_fisher_kept_grads_read_once_per_step_as_documented() -> None:
    """One read per step after ``zero_grad(set_to_none=False)``; none with ``loss_factor=``
    or after the default ``zero_grad()`` (docs/noise.md and docs/training-loops.md)."""
    kept = _full_fisher_reads(set_to_none=False, loss_factor=None)
    assert [len(h) for h in kept] == [1, 1]
    assert all("_full.py" in h[0] for h in kept)
    assert _full_fisher_reads(set_to_none=False, loss_factor=1.0) == [[], []]
    assert _full_fisher_reads(set_to_none=True, loss_factor=None) == [[], []]
    noise = " ".join((DOCS / "noise.md").read_text().split())
    loops = " ".join((DOCS / "training-loops.md").read_text().split())
    for text in (noise, loops):
        assert "one read per step when `.grad` tensors are kept" in text
