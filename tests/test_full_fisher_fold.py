"""FullFisherNoise folded into the training step's own backward pass, in the loops people write:
the noise added equals that of the same loop written another way (same seed, same signs), and the
loop's order of ``zero_grad`` does not matter.

Found in review of the additive fold: a check for gradient accumulation at the loss call refused
the tutorial order forward -> zero_grad -> backward (and ``zero_grad(set_to_none=False)``); an
output changed in place before the loss (``z.mul_(0.5)``) got twice the noise; a tuple output with
selected tokens got signs on blocks of tokens that straddled sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from curvlab.noise import FullFisherNoise, NoisyOptimizer
from tests.test_noise_samplers import _one_thread  # noqa: F401 (fixture)


class _Seq(nn.Module):
    """``(B, T, 3) -> (B, T, C)``; ``wrap``: ``"tensor"``, ``"tuple"`` or ``"inplace"`` (the
    loop halves the output in place, see :func:`_noise`)."""

    def __init__(self, classes: int = 4, wrap: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, classes)
        self.wrap = wrap

    def forward(self, x: Tensor) -> Any:
        out = self.l2(torch.tanh(self.l1(x)))
        return (out, out.detach().sum()) if self.wrap == "tuple" else out


def _batch(B: int = 3, T: int = 5, C: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(B, T, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B, T), generator=g)
    y[0, :2] = -100
    y[2, 4] = -100
    return X, y, y != -100  # 12 selected tokens: a multiple of the 3 sequences


def _noise(model: nn.Module, kind: str, loss_of: Callable[[], Tensor], steps: int = 3) -> Tensor:
    """The noise each of ``steps`` closure steps added (SGD with lr 0: the parameters stay)."""
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        FullFisherNoise(kind, scale=0.5),
        model,
        lf,
        seed=0,
    )
    model.zero_grad()
    loss_of(lf).backward()
    clean = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    rows = []
    for _ in range(steps):

        def closure() -> Tensor:
            noisy.zero_grad()
            loss = loss_of(lf)
            loss.backward()
            return loss

        noisy.step(closure)
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]) - clean)
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_forward_and_backward(kind: str, set_to_none: bool) -> None:
    model = _Seq().double()
    X, y, _ = _batch()
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        FullFisherNoise(kind, scale=0.5),
        model,
        lf,
        seed=0,
    )
    for _ in range(3):  # from the second step on .grad holds the last step's gradient
        with noisy.capture():
            loss = lf(model(X).reshape(-1, 4), y.reshape(-1))
            noisy.zero_grad(set_to_none=set_to_none)
            loss.backward()
        noisy.step()
        assert noisy._pending is None


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_output_changed_in_place_before_the_loss(kind: str) -> None:
    """``z.mul_(0.5)`` before the loss adds the noise of ``z * 0.5`` (it added twice that)."""
    X, y, _ = _batch()
    m1 = _Seq().double()
    in_place = _noise(m1, kind, lambda lf: lf(m1(X).mul_(0.5).reshape(-1, 4), y.reshape(-1)))
    m2 = _Seq().double()
    out_of_place = _noise(m2, kind, lambda lf: lf((m2(X) * 0.5).reshape(-1, 4), y.reshape(-1)))
    assert out_of_place.norm() > 1e-3
    torch.testing.assert_close(in_place, out_of_place, rtol=1e-9, atol=1e-12)


def test_tuple_output_with_selected_tokens_gets_one_sign_per_sequence() -> None:
    """A model returning ``(logits, aux)``, the loss on ``logits[mask]`` (12 tokens of 3
    sequences): the noise equals that of the Tensor-returning twin (signs per sequence, not per
    block of 4 selected tokens)."""
    X, y, mask = _batch()
    m1 = _Seq(wrap="tuple").double()
    got = _noise(m1, "empirical", lambda lf: lf(m1(X)[0][mask], y[mask]))
    m2 = _Seq().double()
    want = _noise(m2, "empirical", lambda lf: lf(m2(X).reshape(-1, 4), y.reshape(-1)))
    assert want.norm() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
