"""Review s23: memory the estimators did not count, and budgets they could not read.

* The Krylov projection was ``max_basis x max_basis`` float64 from the start: ``max_basis = D``
  asked for ``8 D^2`` bytes of host memory whatever the products allowed.
* SLQ's ``m x m`` tridiagonal eigenproblem was neither counted nor checked before the products.
* A budget beyond float's range raised a raw ``OverflowError``, a ``Fraction`` broke the
  refusals' formatting, and a fractional budget was quoted truncated.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._numbers import is_budget, is_real
from curvlab.estimators import _memory
from curvlab.estimators._krylov import KrylovBasis
from curvlab.estimators._memory import EstimatorMemoryError, check_memory_budget


class Diag:
    """``diag(d)`` as an operator, counting its products."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d = d
        self.shape = (d.numel(), d.numel())
        self.dtype = d.dtype
        self.device = d.device
        self.products = 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.products += V.shape[1]
        return self.d[:, None] * V


def _spectrum(dim: int) -> torch.Tensor:
    """``[10, 0 .. 1]``: a top eigenvalue well separated from a bulk."""
    d = torch.linspace(0.0, 1.0, dim, dtype=torch.float64)
    d[0] = 10.0
    return d


def test_lanczos_projection_sized_by_the_products_not_max_basis():
    # max_basis = D = 400,000 with 20 products: the old projection was 400,000^2 float64
    # (1.28 TB), a raw allocation error before the first product; the basis the run can reach
    # is 21 vectors (67 MB), all it needs
    dim = 400_000
    op = Diag(_spectrum(dim))
    r = cl.estimators.lanczos_eigenvalues(
        op, k=1, max_basis=dim, max_matvecs=20, memory_budget=2**30
    )
    assert op.products <= 20 and r.max_basis == dim
    # a Ritz value is within its residual norm of an eigenvalue (symmetric A)
    assert abs(float(r.values[0]) - 10.0) <= float(r.residuals[0]) + 1e-12 * 10.0
    assert r.converged


def test_projection_grows_with_the_basis_and_stays_exact():
    torch.manual_seed(0)
    dim = 300
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-1.0, 3.0, dim, dtype=torch.float64)) @ Q.T

    class Dense:
        shape, dtype, device = (dim, dim), torch.float64, torch.device("cpu")

        def matmat(self, V):
            return A @ V

    kry = KrylovBasis(Dense(), torch.randn(dim, dtype=torch.float64), max_basis=dim)
    for _ in range(5):
        kry.step()
    assert kry.H.shape[0] <= 128  # not max_basis x max_basis (the first 128 x 128)
    for _ in range(95):
        kry.step()
    kry.renew()  # a coupling to a discarded vector, in leak row 99
    beta = kry.leak[99, -1].item()
    for _ in range(100):
        kry.step()  # H (and leak) grow past 128 rows
    assert kry.m == 200 and kry.H.shape[0] >= 200 and kry.leak.shape[0] == kry.H.shape[0]
    assert kry.leak[99, -1].item() == beta and kry.leak[:, -1].count_nonzero() == 1
    # the projection is V^T A V (dense brute force), to the rounding of 200 orthogonalised
    # products: ||A|| = 3, a few hundred eps per entry
    V = torch.stack(kry.V[:200], 1)
    err = (kry.projected() - V.T @ A @ V).abs().max().item()
    assert err <= 200 * 3.0 * torch.finfo(torch.float64).eps * 10


def test_lanczos_refuses_a_projection_over_the_host_memory(monkeypatch):
    dim = 500
    op = Diag(_spectrum(dim))
    # the 500 x 500 projection and four arrays of that size for the Ritz pairs: 10 MB of
    # float64 on the host (the basis: 501 vectors, 2 MB)
    need = 8 * 5 * dim * dim
    monkeypatch.setattr(_memory, "_host_available", lambda: need - 1)
    with pytest.raises(EstimatorMemoryError, match="projected problem of a basis of up to 500"):
        cl.estimators.lanczos_eigenvalues(
            op, k=1, max_basis=dim, max_matvecs=dim, memory_budget=2**30
        )
    assert op.products == 0


def test_slq_checks_its_tridiagonal_before_the_first_product(monkeypatch):
    # num_steps = D = 1000: the old code built a dense 1000 x 1000 T (and three more arrays of
    # that size) after all 1000 products, never checked; the need is 32 m^2 = 32 MB
    dim = 1000
    op = Diag(torch.linspace(1.0, 2.0, dim, dtype=torch.float64))
    need = 32 * dim * dim  # T, its eigenvectors and LAPACK's 2 m^2 workspace, in float64
    monkeypatch.setattr(_memory, "_host_available", lambda: need - 1)
    with pytest.raises(EstimatorMemoryError, match="num_steps=1,000"):
        cl.estimators.slq(op, num_steps=dim, memory_budget=2**20)
    assert op.products == 0


def test_slq_tridiagonal_matches_dense_brute_force():
    # the three-term tridiagonal built in place: for m = D steps its eigenvalues are those of A
    # (brute force: the diagonal itself) and its weights the squared first components of its
    # eigenvectors; a Rademacher probe has equal squared components on every eigenvector e_i,
    # so every weight is 1/D. Six eigenvalues 0.2 apart: the recurrence's loss of
    # orthogonality stays near eps ||A|| / gap per step, far below the 1e-12 allowed.
    dim = 6
    d = torch.linspace(1.0, 2.0, dim, dtype=torch.float64)
    r = cl.estimators.slq(Diag(d), num_steps=dim, seed=3)
    nodes, weights = r.nodes[0], r.weights[0]
    order = nodes.argsort()
    assert torch.allclose(nodes[order], d, atol=1e-12, rtol=0)
    assert torch.allclose(weights[order], torch.full((dim,), 1.0 / dim, dtype=torch.float64))


def test_budget_beyond_float_range_is_refused_with_a_message():
    assert not is_real(10**400) and not is_budget(10**400)
    with pytest.raises(ValueError, match=r"beyond float's range: pass float\('inf'\)"):
        check_memory_budget(10**400)


def test_fraction_budget_is_refused_before_any_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    assert not is_budget(Fraction(1000, 3))
    with pytest.raises(ValueError, match="memory_budget"):
        cl.kfac(model, nn.CrossEntropyLoss(), (X, y), memory_budget=Fraction(1000, 3))
    with pytest.raises(ValueError, match="memory_budget"):
        cl.estimators.hutchinson(
            Diag(torch.ones(3, dtype=torch.float64)), memory_budget=Fraction(1)
        )


def test_fractional_budget_is_quoted_as_given():
    op = Diag(torch.ones(43, dtype=torch.float64))
    with pytest.raises(EstimatorMemoryError, match=r"memory_budget=0\.5 \(0\.5 bytes\)"):
        cl.estimators.hutchinson(op, memory_budget=0.5)
    assert op.products == 0
