"""The reorthogonalisation passes of Lanczos sum float32 dot products over short chunks
(``inner(exact=False)``); the three-term part stays exact (float64 accumulation)."""

from __future__ import annotations

import torch

import curvlab.estimators as est
from curvlab.estimators import _krylov


def test_short_chunk_sums_stay_within_their_documented_error() -> None:
    g = torch.Generator().manual_seed(0)
    D = 3 * _krylov.REDUCE_ROWS + 123  # several chunks and a ragged last one
    basis = [torch.randn(D, generator=g) for _ in range(5)]
    w = torch.randn(D, generator=g)
    exact = torch.stack([b.double() @ w.double() for b in basis])
    scale = torch.stack([b.double().norm() * w.double().norm() for b in basis])
    short = _krylov.inner(basis, w, exact=False)
    assert short.dtype == torch.float64
    assert ((short - exact).abs() / scale).max() < 1e-8
    stacked = _krylov._chunk_dots(basis, w, torch.float32, stacked=True)  # off a CPU
    assert ((stacked - exact).abs() / scale).max() < 1e-8
    assert ((_krylov.inner(basis, w) - exact).abs() / scale).max() < 1e-14
    exact_stacked = _krylov._chunk_dots(basis, w, torch.float64, stacked=True)
    assert ((exact_stacked - exact).abs() / scale).max() < 1e-14
    # adversarial: all-positive entries whose small parts a float32 sum drops (documented 1e-6)
    D = 2**22
    diag = torch.full((D,), 1 + 2**-20)
    h = _krylov.inner([diag], torch.ones(D), exact=False)
    assert abs(float(h[0]) - D * (1 + 2**-20)) / D < 2e-6
    h = _krylov._chunk_dots([diag], torch.ones(D), torch.float32, stacked=True)
    assert abs(float(h[0]) - D * (1 + 2**-20)) / D < 2e-6
    assert float(_krylov.inner([diag], torch.ones(D))[0]) == D * (1 + 2**-20)
    stacked = _krylov._chunk_dots([diag], torch.ones(D), torch.float64, stacked=True)
    assert float(stacked[0]) == D * (1 + 2**-20)


def test_float32_lanczos_matches_float64_with_short_sums() -> None:
    # a float32 operator longer than one chunk: the Ritz values agree with float64 Lanczos on
    # the same matrix to float32's accuracy (the passes' short sums add nothing visible)
    g = torch.Generator().manual_seed(1)
    D = 2 * _krylov.REDUCE_ROWS + 7
    TOP = torch.tensor([9.0, 8.8, 8.6, 8.4, 8.2], dtype=torch.float64)
    diag64 = 4 * torch.rand(D, generator=g, dtype=torch.float64)
    diag64[:5] = TOP
    diag64[5] = 7.0  # the next value stands apart: the restarted run's verification is short

    class Diagonal:
        def __init__(self, d: torch.Tensor) -> None:
            self.d, self.shape, self.dtype, self.device = d, (D, D), d.dtype, d.device

        def matmat(self, V: torch.Tensor) -> torch.Tensor:
            return self.d[:, None] * V

    r32 = est.lanczos_eigenvalues(Diagonal(diag64.float()), k=5, tol=1e-5, seed=0, max_basis=12)
    r64 = est.lanczos_eigenvalues(Diagonal(diag64), k=5, tol=1e-10, seed=0)
    assert r32.converged and r64.converged and r32.num_restarts > 0
    assert torch.allclose(r64.values, TOP)
    assert torch.allclose(r32.values, r64.values, rtol=2e-6, atol=0)
