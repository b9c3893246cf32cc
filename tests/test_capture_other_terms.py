"""Captures inside a training step whose loss has other terms, or whose weights are used twice
under autocast: the captured curvature and the folded noise stay those of ``loss_fn`` itself (or
the step measures in a separate pass), never a mixture.

Found in review: a ``FisherPenalty`` on the step's output (``loss = loss_fn(out, y) +
penalty(X, y, output=out)``) ran its inner gradient through the tapped layers, so the captured
empirical diagonal summed that pass and the step's own (1.8-1.9x the true one); under bfloat16
autocast a Linear weight also used functionally went through autocast's one cached cast, so the
parameter-use check counted one use and the capture answered (0.85 relative error).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvlab as cl
from curvlab.noise import DiagFisherNoise, FullFisherNoise, KFACNoise, NoisyOptimizer
from curvlab.regularizers import FisherPenalty
from tests.test_noise_samplers import _one_thread  # noqa: F401 (fixture)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


def _flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("sampler", ["diag", "kfac"])
def test_penalty_in_the_step_leaves_the_captured_curvature_that_of_the_loss(
    sampler: str, every: int
) -> None:
    """``every=1``: the penalty's graph is the step's, so the capture measures in a separate
    pass; ``every > 1``: its own passes are marked, so the step's backward measures it (one
    pass). Exact either way."""
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    model = _mlp()
    made = DiagFisherNoise if sampler == "diag" else KFACNoise
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), made("empirical", scale=0.5), model, lf, seed=0
    )
    penalty = FisherPenalty(model, lf, alpha=0.5, every=every, seed=0)
    noisy.zero_grad()
    with noisy.capture():
        out = model(X)
        (lf(out, y) + penalty(X, y, output=out)).backward()
    one_pass = noisy._pending.result() is not None
    assert one_pass == (every > 1)
    noisy.step()
    if sampler == "diag":
        want = cl.diag_fisher(model, lf, (X, y), kind="empirical")
        for name, value in want.items():
            torch.testing.assert_close(noisy._state[name], value, rtol=1e-10, atol=1e-14)
    else:  # the factors' square roots of curvlab.kfac's
        want = KFACNoise("empirical", scale=0.5).estimate(
            model, lf, X, y, torch.Generator().manual_seed(0)
        )
        assert set(noisy._state) == set(want)
        for layer, parts in want.items():
            for key, value in parts.items():
                torch.testing.assert_close(noisy._state[layer][key], value, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_penalty_in_the_step_gets_the_folded_noise_once_and_keeps_its_own_gradient(
    kind: str, every: int
) -> None:
    """The fold adds the separate pass's noise to the gradient of loss + penalty; the penalty's
    inner gradient (a graph-building backward through the same output with ``every=1``, a plain
    ``autograd.grad`` of its value with ``every > 1``) is left alone, on every step.

    Found in review: with ``every > 1`` the penalty's ``autograd.grad`` took the noise (the hook
    cannot tell it from the step's backward by grad mode), so it went into the penalty's cached
    gradient and came back, on top of the fresh draws, on the next ``every - 1`` steps.
    """
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    grads: dict[str, list[Tensor]] = {}
    for mode in ("capture", "separate", "none"):
        model = _mlp()
        noisy = NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            FullFisherNoise(kind, scale=0.5),
            model,
            lf,
            seed=3,
        )
        penalty = FisherPenalty(model, lf, alpha=0.5, every=every, seed=0)
        grads[mode] = []
        for _ in range(2):
            noisy.zero_grad()
            with noisy.capture() if mode == "capture" else torch.enable_grad():
                out = model(X)
                (lf(out, y) + penalty(X, y, output=out)).backward()
            if mode == "capture":
                noisy.step()
            elif mode == "separate":
                noisy.step(inputs=X, targets=y)
            grads[mode].append(_flat_grad(model))
    for step in range(2):
        noise_captured = grads["capture"][step] - grads["none"][step]
        noise_separate = grads["separate"][step] - grads["none"][step]
        assert noise_separate.norm() > 1e-3
        torch.testing.assert_close(noise_captured, noise_separate, rtol=1e-9, atol=1e-12)


class _Reuse(nn.Module):
    """``l2``'s weight used by its layer and once more functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l1(x))
        return self.l2(h) + F.linear(h, self.l2.weight)[:, :8]


def test_bf16_autocast_weight_used_twice_is_measured_in_a_separate_pass() -> None:
    torch.manual_seed(0)
    model = _Reuse()
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(16, 6, generator=g), torch.randint(0, 8, (16,), generator=g)
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), DiagFisherNoise(scale=0.5), model, lf, seed=0
    )
    noisy.zero_grad()
    with noisy.capture():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lf(model(X), y)
        loss.backward()
        taps = noisy._pending
    assert taps is not None
    assert taps.result() is None  # not exact: the separate pass measures the step
    noisy.step()
    want = cl.diag_fisher(model, lf, (X, y), kind="empirical")
    torch.testing.assert_close(noisy._state["l2.weight"], want["l2.weight"], rtol=1e-5, atol=1e-9)
