"""Lanczos' inner products: float64 sums over chunks, exact on both routes (a copy and dot per
vector on a CPU, stacked chunks elsewhere), and a float32 run whose eigenvectors sit on a few
coordinates keeps its residual guarantee (float32 sums within a chunk lost it: review s16)."""

from __future__ import annotations

import pytest
import torch

import curvlab.estimators as est
from curvlab.estimators import _krylov


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1, 7, _krylov.REDUCE_ROWS, 3 * _krylov.REDUCE_ROWS + 123])
def test_chunk_sums_are_exact_on_both_routes(stacked: bool, dtype: torch.dtype, D: int) -> None:
    g = torch.Generator().manual_seed(D)
    basis = [torch.randn(D, generator=g, dtype=dtype) for _ in range(3)]
    w = torch.randn(D, generator=g, dtype=dtype)
    exact = torch.stack([b.double() @ w.double() for b in basis])
    scale = torch.stack([b.double().norm() * w.double().norm() for b in basis])
    got = _krylov._chunk_dots(basis, w, stacked=stacked)
    assert got.dtype == torch.float64
    assert ((got - exact).abs() / scale).max() < 1e-14


@pytest.mark.parametrize("stacked", [False, True])
def test_chunk_sums_keep_the_small_parts_of_positive_data(stacked: bool) -> None:
    # 2^21 entries of 1 + 0.99 * 2^-13: float32 sums within a chunk were 6e-5 off (review s16)
    D = 2**21
    x = torch.full((D,), 1 + 0.99 * 2**-13)
    got = float(_krylov._chunk_dots([x, torch.ones(D)], torch.ones(D), stacked=stacked)[0])
    assert got == pytest.approx(D * float(x[0]), rel=1e-12)


def test_float32_lanczos_keeps_its_residual_guarantee_on_localised_vectors() -> None:
    # A = H diag(d) H with a Householder H: eigenvalues exactly d, eigenvectors concentrated on
    # a few coordinates; at the float32 floor tol=6e-7, float32 sums within a chunk gave
    # converged=True with a true residual of 8.6e-6 against tol * ||A|| = 6e-6 (now 1.8e-6)
    D = 3 * _krylov.REDUCE_ROWS + 11
    g = torch.Generator().manual_seed(0)
    u = torch.randn(D, generator=g, dtype=torch.float64)
    u = (u / u.norm()).float()
    d = torch.randn(D, generator=g, dtype=torch.float64) * 0.3
    d[:6] = torch.tensor([10.0, 9.5, 9.49, 7.0, 6.0, 5.5], dtype=torch.float64)
    d[6:9] = torch.tensor([-4.0, -3.0, -2.9], dtype=torch.float64)
    d = d.float()

    class Householder:
        def __init__(self, dtype: torch.dtype) -> None:
            self.shape, self.dtype, self.device = (D, D), dtype, torch.device("cpu")
            self.u, self.d = u.to(dtype), d.to(dtype)
            self.c = 2 / (self.u @ self.u)

        def matmat(self, V: torch.Tensor) -> torch.Tensor:
            V = V - self.c * self.u[:, None] * (self.u @ V)[None]
            V = self.d[:, None] * V
            return V - self.c * self.u[:, None] * (self.u @ V)[None]

    tol = 6e-7
    res = est.lanczos_eigenvalues(
        Householder(torch.float32), k=3, tol=tol, seed=0, return_vectors=True
    )
    assert res.converged
    Y = res.vectors.double()
    Y = Y / Y.norm(dim=0)
    true = (Householder(torch.float64).matmat(Y) - Y * res.values.double()[None]).norm(dim=0)
    assert (true <= tol * res.norm).all(), true
    top = torch.sort(d.double(), descending=True).values[:3]
    assert ((res.values - top).abs() <= true + 1e-7).all()
