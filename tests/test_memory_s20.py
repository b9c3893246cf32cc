"""Memory promises found broken in review s20.

* ``KFACNoise(memory_budget=)`` was ignored on NoisyOptimizer's one-pass (capture) path: a budget
  of 1,000 bytes was refused by the separate pass and accepted by ``noisy.step(closure)``, which
  then held 1,080,036 bytes of factors. Now the capture refuses it, with the separate path's
  error, before the step's forward pass.
* SLQ's Gaussian broadening made ``(num_probes, num_steps, grid_size)`` float64 temporaries that
  no check covered (572 MB for ``grid_size=2e5``; a raw "can't allocate" for ``1e8``, after every
  product). Now it is a running sum over the nodes, ``O(num_probes * grid_size)``, and a grid
  whose arrays cannot fit the host memory is refused before the first product.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import curvlab as cl
from curvlab.estimators import EstimatorMemoryError
from curvlab.estimators._memory import available_bytes
from curvlab.estimators._protocol import TensorOperator
from curvlab.noise import KFACNoise, NoisyOptimizer

# --------------------------------------------------------------------------- KFACNoise budget


class _Counted(nn.Module):
    """An MLP of two Linear layers (float64) counting its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.net(x)


def _factor_bytes(model: nn.Module) -> int:
    """``(in'^2 + out^2) * 8`` per float64 Linear layer (its ``A`` and ``G``), from the shapes."""
    return sum(
        (m.in_features**2 + m.out_features**2) * 8
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )


def _capture_step(budget: int) -> tuple[_Counted, NoisyOptimizer, list[int], Exception | None]:
    torch.manual_seed(0)
    model = _Counted()
    X, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    sampler = KFACNoise(scale=0.1, memory_budget=budget)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sampler, model, loss_fn)
    calls = [0, 0]  # the closure's, the separate pass's (estimate)
    separate = sampler.estimate

    def estimate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls[1] += 1
        return separate(*args, **kwargs)

    sampler.estimate = estimate

    def closure() -> torch.Tensor:
        calls[0] += 1
        noisy.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    try:
        noisy.step(closure)
    except ValueError as exc:
        return model, noisy, calls, exc
    return model, noisy, calls, None


def test_kfac_noise_budget_is_checked_on_the_capture_path_before_the_step() -> None:
    """A budget one byte under the factors (6^2 + 5^2 + 5^2 + 3^2 float64 numbers = 760 bytes)
    is refused by ``noisy.step(closure)`` before the closure runs, with the separate path's
    error, and the step leaves no trace (before review s20 it was accepted)."""
    total = _factor_bytes(_Counted())
    assert total == (36 + 25 + 25 + 9) * 8
    model, noisy, calls, exc = _capture_step(total - 1)
    assert exc is not None, "a budget under the factors' size was accepted on the capture path"
    assert "memory_budget" in str(exc)
    assert calls == [0, 0] and model.forwards == 0  # refused before the step's forward pass
    assert noisy.steps_taken == 0
    for m in model.modules():  # no hook left behind
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    # the separate path (kfac's own check) refuses the same budget with the same words
    torch.manual_seed(0)
    X, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError) as separate:
        KFACNoise(scale=0.1, memory_budget=total - 1).sample(
            model, nn.CrossEntropyLoss(), X, y, generator=torch.Generator().manual_seed(0)
        )
    assert str(separate.value) == str(exc)


def test_kfac_noise_budget_under_every_layer_names_the_smallest_on_the_capture_path() -> None:
    """Under the smallest layer's own factors (5^2 + 3^2 numbers = 272 bytes), kfac's refusal
    that no selection of layers can help, naming that layer."""
    _, _, calls, exc = _capture_step(5**2 * 8 + 3**2 * 8 - 1)
    assert exc is not None and calls == [0, 0]
    assert "net.2" in str(exc) and "272 bytes" in str(exc)


def test_kfac_noise_budget_that_fits_is_accepted_on_the_capture_path() -> None:
    """The budget equal to the factors' size: the step runs, its factors measured in the one
    pass (no separate pass)."""
    total = _factor_bytes(_Counted())
    model, noisy, calls, exc = _capture_step(total)
    assert exc is None and calls == [1, 0]
    assert noisy.steps_taken == 1


# --------------------------------------------------------------------------- SLQ broadening


class _Largest(TorchDispatchMode):
    """The most bytes of any tensor an op returns while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel() * t.element_size())
        return out


def _operator(dim: int = 40) -> TensorOperator:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    evals = torch.linspace(-1.0, 3.0, dim, dtype=torch.float64)
    return TensorOperator(Q @ torch.diag(evals) @ Q.T)


def test_slq_broadening_holds_no_array_larger_than_the_densities() -> None:
    """No tensor larger than the ``(num_probes, grid_size)`` densities (2 x 20,000 float64 =
    320 kB); before review s20 each op of the broadening made a ``(2, 30, 20000)`` array
    (9.6 MB), 30 times that."""
    P, m, G = 2, 30, 20_000
    with _Largest() as seen:
        cl.estimators.slq(_operator(), num_steps=m, num_probes=P, grid_size=G, seed=0)
    assert seen.most <= P * G * 8, f"an array of {seen.most:,} bytes > {P * G * 8:,}"


def test_slq_density_is_the_normalised_gaussian_mixture() -> None:
    """The densities against the mixture summed exactly (``math.fsum``) at each grid point and
    divided by its trapezoid sum. Each term differs from the exact-sum side's by a few ulps (the
    same ``z``; ``exp`` to 1 ulp; the product and quotient in another order): ``4 eps``; a sum
    of ``m`` positive terms adds ``(m - 1) eps``; the normaliser, the trapezoid sum of those
    values, differs by that much again plus its own rounding (``G eps`` at worst); the division
    and the mean over probes ``2 eps``: ``rtol = (2 (m + 3) + G + 2) eps`` (7e-14 here)."""
    P, m, G = 3, 12, 301
    res = cl.estimators.slq(_operator(), num_steps=m, num_probes=P, grid_size=G, seed=1)
    s = res.sigma
    per_probe = []
    for theta, tau in zip(res.nodes.tolist(), res.weights.tolist()):
        row = torch.tensor(
            [
                math.fsum(
                    w * math.exp(-0.5 * ((t - c) / s) ** 2) / (s * math.sqrt(2 * math.pi))
                    for c, w in zip(theta, tau)
                )
                for t in res.grid.tolist()
            ],
            dtype=torch.float64,
        )
        per_probe.append(row / torch.trapezoid(row, res.grid))  # sigma >= spacing here
    assert res.sigma >= float(res.grid[1] - res.grid[0])
    want = torch.stack(per_probe).mean(0)
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(res.density, want, rtol=(2 * (m + 3) + G + 2) * eps, atol=0.0)


def _available_or_skip() -> int:
    avail = available_bytes("cpu")
    if avail is None:
        pytest.skip("the host memory available cannot be told here")
    return avail


def test_slq_refuses_a_grid_that_cannot_fit_before_any_product() -> None:
    """``grid_size=10**13`` (3 arrays of 8e13 bytes): refused naming grid_size, before any
    product (before review s20: a raw "can't allocate" after every product)."""
    avail = _available_or_skip()
    G = 10**13
    assert avail < 8 * G
    op = _operator()
    with pytest.raises(EstimatorMemoryError, match="grid_size=10,000,000,000,000") as exc:
        cl.estimators.slq(op, num_steps=5, grid_size=G, seed=0)
    assert op.num_matvecs == 0
    assert exc.value.needed >= 8 * G


def test_spectral_density_refuses_such_a_grid_before_the_data_is_read() -> None:
    _available_or_skip()
    model = _Counted()
    X, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(EstimatorMemoryError, match="grid_size="):
        cl.spectral_density(model, nn.CrossEntropyLoss(), (X, y), num_steps=5, grid_size=10**13)
    assert model.forwards == 0
