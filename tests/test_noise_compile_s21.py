"""``NoisyOptimizer`` inside a ``torch.compile``d whole training step (found in review s21).

A compiled step holding ``with noisy.capture(): loss.backward()`` and ``noisy.step()`` crashed
dynamo for every sampler that captures curvature in the backward pass (``NameError:
___tuple_iterator_getitem`` in the roots check of ``curvlab/noise/_roots.py``), and
``noisy.step(closure)`` in a compiled step with ``FullFisherNoise`` trained to other parameters
than the eager loop (0.12 apart after 4 steps: the fold drew its labels, its noise was never
added, and the step drew again). The capture's entry and exit and ``step`` now run eagerly, and
so does the capture's block on the steps that capture curvature: the compiled step trains to the
eager loop's parameters, bitwise, for every sampler. A noiseless SGD run written with
``torch.func`` checks that the noise was added at all (a run that dropped it in both would agree).
See docs/training-loops.md.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    MultiplicativeNoise,
    NoisyOptimizer,
)

SAMPLERS: dict[str, Callable[[], object]] = {
    "diag_empirical": lambda: DiagFisherNoise(scale=0.7),
    "diag_mc": lambda: DiagFisherNoise(kind="mc", scale=0.7),
    "diag_exact": lambda: DiagFisherNoise(kind="exact", scale=0.7),
    "trace": lambda: FisherTraceNoise(scale=0.7),
    "kfac": lambda: KFACNoise(scale=0.7),
    "full_true": lambda: FullFisherNoise("true", scale=0.7),
    "full_empirical": lambda: FullFisherNoise("empirical", scale=0.7),
    "isotropic": lambda: IsotropicNoise(std=0.3),
    "multiplicative": lambda: MultiplicativeNoise(std=0.3),
}
STEPS = 4
LR = 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 3, dtype=torch.float64, generator=gen),
            torch.randint(0, 3, (6,), generator=gen),
        )
        for _ in range(STEPS)
    ]


def _train(sampler: str, path: str, compiled: bool) -> list[Tensor]:
    """``STEPS`` noisy SGD steps (curvature measured every other step), the whole step compiled
    or not; ``path``: ``"capture"`` (``with noisy.capture()`` and ``noisy.step()``) or
    ``"closure"`` (``noisy.step(closure)``)."""
    torch._dynamo.reset()
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        SAMPLERS[sampler](),
        model,
        loss_fn,
        seed=0,
        recompute_every=2,
    )

    def capture_step(X: Tensor, Y: Tensor) -> None:
        noisy.zero_grad()
        with noisy.capture():
            loss_fn(model(X), Y).backward()
        noisy.step()

    def closure_step(X: Tensor, Y: Tensor) -> None:
        def closure() -> Tensor:
            noisy.zero_grad()
            loss = loss_fn(model(X), Y)
            loss.backward()
            return loss

        noisy.step(closure)

    step = capture_step if path == "capture" else closure_step
    if compiled:
        step = torch.compile(step, backend="aot_eager")
    for X, Y in _batches():
        step(X, Y)
    torch._dynamo.reset()
    return [p.detach().clone() for p in model.parameters()]


def _noiseless() -> list[Tensor]:
    """The same SGD steps without noise, gradients from ``torch.func``."""
    model = _model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(p: dict[str, Tensor], X: Tensor, Y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (X,)), Y)

    for X, Y in _batches():
        g = grad(loss)(params, X, Y)
        params = {n: params[n] - LR * g[n] for n in params}
    return list(params.values())


@pytest.mark.parametrize("path", ["capture", "closure"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_compiled_whole_step_trains_to_eager_parameters(sampler: str, path: str) -> None:
    eager = _train(sampler, path, compiled=False)
    compiled = _train(sampler, path, compiled=True)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want), (sampler, path, (got - want).abs().max().item())
    # the noise was added (parameters far from the noiseless run's, beyond rounding)
    plain = _noiseless()
    moved = max((a - b).abs().max().item() for a, b in zip(eager, plain))
    assert moved > 1e-6, (sampler, path, moved)


def _train_raising(compiled: bool) -> list[Tensor]:
    """A compiled (or eager) whole step whose capture block raises on one step, caught."""
    torch._dynamo.reset()
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), DiagFisherNoise(scale=0.7), model, loss_fn
    )

    def step(X: Tensor, Y: Tensor, bad: bool) -> None:
        noisy.zero_grad()
        with noisy.capture():
            loss = loss_fn(model(X), Y)
            if bad:
                raise ValueError("a bad batch")
            loss.backward()
        noisy.step()

    fn = torch.compile(step, backend="aot_eager") if compiled else step
    for i, (X, Y) in enumerate(_batches()):
        if i == 1:
            with pytest.raises(ValueError, match="a bad batch"):
                fn(X, Y, True)
        else:
            fn(X, Y, False)
    torch._dynamo.reset()
    return [p.detach().clone() for p in model.parameters()]


def test_compiled_step_whose_capture_raises_goes_on_as_the_eager_one() -> None:
    # the block's exit restores dynamo's frame evaluation and rewinds the noise generator
    eager, compiled = _train_raising(False), _train_raising(True)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want), (got - want).abs().max().item()
