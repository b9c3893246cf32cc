"""Noise rounded away in a 16-bit ``.grad`` (review s27, MP2-1): ``NoisyOptimizer`` adds its
float32 draw in place to a bfloat16 gradient, and entries below half the gradient's ulp are lost
(a bfloat16 ``Linear(8, 1)`` with gradients of about 10 and ``IsotropicNoise(1e-3)``: no noise at
all in most coordinates). The first noisy step now warns, naming the share; what is added, and so
training, is unchanged bit for bit; float32 models and noise well above the ulp do not warn.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.noise import _optim
from curvlab.noise._sixteen_bit import lost_noise_share


def _run(dtype: torch.dtype, std: float, steps: int = 3) -> tuple[list[torch.Tensor], list[str]]:
    torch.manual_seed(0)
    model = nn.Linear(8, 1, bias=False).to(dtype)
    x = (torch.randn(64, 8) * 4).to(dtype)
    y = (torch.randn(64, 1) + 10).to(dtype)
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-4),
        cl.noise.IsotropicNoise(std),
        model,
        nn.MSELoss(),
        seed=0,
    )
    grads: list[torch.Tensor] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            noisy.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            noisy.step(inputs=x, targets=y)
            grads.append(model.weight.grad.detach().clone())
    grads.append(model.weight.detach().clone())
    return grads, [str(w.message) for w in caught if "below half" in str(w.message)]


def test_lost_noise_warns_once_on_the_first_step() -> None:
    _, messages = _run(torch.bfloat16, 1e-3)
    assert len(messages) == 1
    assert "NoisyOptimizer:" in messages[0] and "float32 parameters" in messages[0]


@pytest.mark.parametrize(("dtype", "std"), [(torch.float32, 1e-3), (torch.bfloat16, 1.0)])
def test_no_warning_where_the_noise_survives(dtype: torch.dtype, std: float) -> None:
    _, messages = _run(dtype, std)
    assert messages == []


def test_training_bitwise_with_and_without_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    checked, _ = _run(torch.bfloat16, 1e-3)
    monkeypatch.setattr(_optim, "warn_if_noise_lost", lambda pairs: None)
    unchecked, _ = _run(torch.bfloat16, 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(checked, unchecked))


def test_lost_share_counts_entries_below_half_an_ulp() -> None:
    g = torch.tensor([10.0, 10.0, 10.0, 1e-3], dtype=torch.bfloat16)
    # bfloat16's ulp at 10 is 0.0625: half of it 0.03125
    eps = torch.tensor([0.01, 0.03, 0.05, 0.01])
    assert lost_noise_share([(g, eps)]) == pytest.approx(2 / 4)
    assert lost_noise_share([(g.float(), eps)]) is None
    # the share, brute force: whether adding eps changes the bfloat16 sum at all
    changed = (g.float() + eps).to(torch.bfloat16) != g
    assert int((~changed).sum()) == 2
