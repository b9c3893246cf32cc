"""Review s20 (U1b): KFACNoise on NaN factors of size <= 2; a tensor hook on a penalty's output=.

* ``torch.linalg.eigh`` of a NaN matrix of size 1 or 2 returns NaN eigenvalues on the CPU
  without raising (from size 3 it raises), so KFACNoise on a model whose factored layers all
  have width <= 2 drew NaN noise and made the parameters NaN under an unseen zero loss factor
  (``torch.where(False, loss, 0.0)``), where docs/noise.md promises a NonFiniteError.
* A tensor hook of the user's on the ``output=`` tensor itself (``out.register_hook(lambda g:
  3 * g)``) was kept in the penalty's gradient: 1.323 for 0.147 (the gradient 3x, the penalty 9x).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import curvlab.regularizers as R
from curvlab import NonFiniteError
from curvlab.noise import KFACNoise, NoisyOptimizer


def _narrow() -> nn.Sequential:
    """Every factored layer of width <= 2: each ``G`` factor is 2 x 2 (``A`` of the last too)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.6)
    return model


@pytest.mark.parametrize("mode", ["capture", "closure"])
def test_kfac_noise_narrow_layers_unseen_zero_loss_factor_is_a_nonfinite_error(mode: str) -> None:
    """Before: no error, NaN noise, every parameter NaN. Now curvlab's NonFiniteError before
    any noise or update: parameters, generator and step count as they were."""
    model, ce = _narrow(), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=gen)
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), KFACNoise(scale=0.3), model, ce, seed=0
    )
    before = [p.detach().clone() for p in model.parameters()]
    rng = noisy.generator.get_state()
    noisy.zero_grad()

    def closure() -> torch.Tensor:
        loss = torch.where(torch.tensor(False), ce(model(x), y), 0.0)
        loss.backward()
        return loss

    with pytest.raises(NonFiniteError, match=r"KFACNoise.*hold NaN or inf.*gradient of 0"):
        if mode == "closure":
            noisy.step(closure)
        else:
            with noisy.capture():
                closure()
            noisy.step()
    assert torch.equal(noisy.generator.get_state(), rng)
    assert noisy.steps_taken == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_gradient_penalty_ignores_a_tensor_hook_on_the_output_given() -> None:
    """``out.register_hook(lambda g: 3 * g)`` then ``gradient_penalty(..., output=out)``: the
    penalty of the loss's own gradient (dense float64 brute force), not 9x it (1.323 for 0.147);
    the user's hook stays on their output."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    ce = nn.CrossEntropyLoss()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_at(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return ce(functional_call(model, p, (x,)), y)

    expected = sum(g.pow(2).sum() for g in grad(loss_at)(params).values())

    out = model(x)
    handle = out.register_hook(lambda g: 3 * g)
    got = R.gradient_penalty(model, ce, x, y, output=out)
    # float64 sums of ~40 products of O(1) terms: rounding ~1e-14 relative; the defect is 9x
    torch.testing.assert_close(got.detach(), expected, rtol=1e-10, atol=0.0)
    assert len(out._backward_hooks) == 1
    handle.remove()
