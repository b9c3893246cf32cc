"""Review of the noise samplers and NoisyOptimizer (eighth sweep). Each case was wrong before:

* ``FullFisherNoise("empirical")`` folded into a step whose model output is sequence-first
  (``(T, N, V)``, flattened for the loss) gave one sign per ``T`` consecutive rows, mixing examples
  (covariance max|z| 675 against the brute force): now a clear error, also for ``T == N``;
* every micro-batch of an accumulation wrapped in ``capture(loss_factor=...)`` folded one noise per
  micro-batch (correlated by the rewinds): now a clear error;
* a ``state_dict()`` saved after a step a GradScaler skipped held the generator advanced by the
  abandoned capture, so a resumed run diverged from the uninterrupted one;
* ``load_state_dict()`` kept a pending capture, whose rewind then overwrote the loaded generator.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl

DT = torch.float64


class SeqFirstOut(nn.Module):
    """Batch-first input ``(N, T, 3)``, sequence-first output ``(T, N, V)``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l1(x))).transpose(0, 1)


@pytest.mark.parametrize("T", [2, 4])  # T == N: the leading size is the batch size
def test_full_fisher_empirical_fold_refuses_a_sequence_first_output(T: int) -> None:
    torch.manual_seed(0)
    model, loss_fn = SeqFirstOut().to(DT), nn.CrossEntropyLoss()
    X, y = torch.randn(2, T, 3, dtype=DT), torch.randint(0, 5, (T, 2))
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        cl.noise.FullFisherNoise("empirical", scale=1.0),
        model,
        loss_fn,
        seed=0,
    )
    with (
        pytest.raises(RuntimeError, match=r"does not hold the examples on its first axis"),
        noisy.capture(),
    ):
        loss_fn(model(X).reshape(-1, 5), y.reshape(-1)).backward()


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _batches(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g))
        for _ in range(k)
    ]


def test_capturing_every_micro_batch_of_an_accumulation_is_refused() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        cl.noise.FullFisherNoise("true", scale=1.0),
        model,
        loss_fn,
        seed=0,
    )
    (X1, y1), (X2, y2) = _batches(2)
    noisy.zero_grad()
    with noisy.capture(loss_factor=0.5):
        (loss_fn(model(X1), y1) * 0.5).backward()
    with (
        pytest.raises(RuntimeError, match="wrap only the LAST micro-batch"),
        noisy.capture(loss_factor=0.5),
    ):
        (loss_fn(model(X2), y2) * 0.5).backward()


def _make(model: nn.Module, sampler: str) -> cl.noise.NoisyOptimizer:
    s = (
        cl.noise.FullFisherNoise("true", scale=0.5)
        if sampler == "full"
        else cl.noise.DiagFisherNoise("empirical", scale=0.5)
    )
    return cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), s, model, nn.CrossEntropyLoss(), seed=3
    )


def _step(noisy: cl.noise.NoisyOptimizer, model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, skip: bool = False) -> None:  # fmt: skip
    noisy.zero_grad()
    with noisy.capture():
        noisy.loss_fn(model(X), y).backward()
    if not skip:  # a GradScaler that found inf/NaN never calls step()
        noisy.step()


@pytest.mark.parametrize("sampler", ["full", "diag"])
def test_state_dict_after_a_skipped_step_resumes_bitwise(sampler: str) -> None:
    batches = _batches(4)
    model = _mlp()
    noisy = _make(model, sampler)
    _step(noisy, model, *batches[0])
    _step(noisy, model, *batches[1], skip=True)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = noisy.state_dict()
    for X, y in batches[2:]:
        _step(noisy, model, X, y)
    uninterrupted = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    resumed_model = _mlp()
    resumed_model.load_state_dict(saved_model)
    resumed = _make(resumed_model, sampler)
    resumed.load_state_dict(saved)
    for X, y in batches[2:]:
        _step(resumed, resumed_model, X, y)
    again = torch.cat([p.detach().reshape(-1) for p in resumed_model.parameters()])
    assert torch.equal(uninterrupted, again)


@pytest.mark.parametrize("sampler", ["full", "diag"])
def test_load_state_dict_drops_a_pending_capture(sampler: str) -> None:
    batches = _batches(4)
    model = _mlp()
    noisy = _make(model, sampler)
    _step(noisy, model, *batches[0])
    checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, noisy.state_dict())
    _step(noisy, model, *batches[1])
    _step(noisy, model, *batches[2], skip=True)  # captured, never stepped: then roll back
    model.load_state_dict(checkpoint[0])
    noisy.load_state_dict(checkpoint[1])
    _step(noisy, model, *batches[3])
    rolled_back = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    fresh_model = _mlp()
    fresh_model.load_state_dict(checkpoint[0])
    fresh = _make(fresh_model, sampler)
    fresh.load_state_dict(checkpoint[1])
    _step(fresh, fresh_model, *batches[3])
    assert torch.equal(
        rolled_back, torch.cat([p.detach().reshape(-1) for p in fresh_model.parameters()])
    )
