"""FullFisherNoise refuses a void label that is not the loss's ignore_index, as every sibling does.

Found in review: ``FullFisherNoise("true")``'s separate pass never checked the class indices, so a
void label 255 under the default ``ignore_index=-100`` was counted as a token and a class was drawn
for it (``E|eps|^2 = 69.06`` against the GGN trace 20.93), where ``DiagFisherNoise("mc")``,
``KFACNoise("mc")`` and ``FullFisherNoise("empirical")`` refuse the same batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from curvlab.noise import DiagFisherNoise, FullFisherNoise, NoisyOptimizer
from tests.test_noise_samplers import _one_thread  # noqa: F401 (fixture)

_CLASSES = 4


def _problem(void: int = 255) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 sequence model ``(B, T, 3) -> (B, C, T)`` and labels with 3 void positions."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, _CLASSES)).double()
    X = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, _CLASSES, (2, 3), generator=g)
    y[0, :2] = void
    y[1, 0] = void
    return _Transposed(model), X, y


class _Transposed(nn.Module):
    """The classes on axis 1, as ``nn.CrossEntropyLoss`` reads a sequence: ``(B, C, T)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).transpose(1, 2)


_MESSAGE = r"3 target\(s\) are neither a class index in \[0, 4\) nor ignore_index=-100"


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sample_refuses_a_void_label(kind: str, reduction: str) -> None:
    model, X, y = _problem()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    # the sibling's refusal, for the same batch: the same message
    with pytest.raises(ValueError, match=_MESSAGE):
        DiagFisherNoise("mc", scale=1.0).sample(model, loss_fn, X, y, seed=0)
    with pytest.raises(ValueError, match=_MESSAGE):
        FullFisherNoise(kind, scale=1.0).sample(model, loss_fn, X, y, seed=0)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_noisy_step_refuses_a_void_label(kind: str) -> None:
    model, X, y = _problem()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        FullFisherNoise(kind, scale=1.0),
        model,
        loss_fn,
        seed=0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    noisy.zero_grad()
    y_ok = torch.where(y == 255, torch.full_like(y, -100), y)  # torch's loss refuses 255 itself
    loss_fn(model(X), y_ok).backward()
    with pytest.raises(ValueError, match=_MESSAGE):
        noisy.step(inputs=X, targets=y)
    for p, q in zip(model.parameters(), before):  # refused before the update
        assert torch.equal(p.detach(), q)


def test_void_label_marked_ignore_index_is_ignored() -> None:
    """The same batch with the void label as the loss's ``ignore_index`` is accepted, and the void
    positions add nothing: every sample lies in the span of the counted positions' output
    Jacobians (dense float64 brute force), and equals the sample with ``-100`` in their place."""
    model, X, y = _problem(void=255)
    loss_fn = nn.CrossEntropyLoss(reduction="sum", ignore_index=255)
    sample = FullFisherNoise("true", scale=1.0).sample(model, loss_fn, X, y, seed=3)
    y_default = torch.where(y == 255, torch.full_like(y, -100), y)
    same = FullFisherNoise("true", scale=1.0).sample(
        model, nn.CrossEntropyLoss(reduction="sum"), X, y_default, seed=3
    )
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([sample[n].reshape(-1) for n in names])
    torch.testing.assert_close(flat, torch.cat([same[n].reshape(-1) for n in names]))

    # eps = J_counted^T r for some r: its component outside the span of the counted positions'
    # Jacobian rows (3 of 6 positions, C = 4 logits each) is zero
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (X,)))(params)  # (B, C, T, *param)
    J = torch.cat([jac[n].reshape(2, _CLASSES, 3, -1) for n in names], dim=-1)
    J = J.permute(0, 2, 1, 3)[y != 255].reshape(-1, flat.numel())  # counted rows (3*C, P)
    coef = torch.linalg.lstsq(J.T, flat.unsqueeze(1)).solution
    residual = flat - (J.T @ coef).squeeze(1)
    assert flat.norm() > 0.1
    # a void position counted would leave the span: all 6 positions' rows have rank 24, not 12
    # (the leakage would be of order |eps|); backward-stable least squares in float64 leaves a
    # residual of order unit roundoff * cond(J) * |eps| (cond(J) about 7 here), 100x margin
    sv = torch.linalg.svdvals(J)
    tol = 100 * torch.finfo(torch.float64).eps * float(sv[0] / sv[-1]) * float(flat.norm())
    assert residual.norm() <= tol
