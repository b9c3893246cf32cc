"""An unconverged Lanczos run says in ``info["unconverged"]`` what was missing and what to change."""

from __future__ import annotations

import torch

from curvlab.estimators._lanczos import lanczos_eigenvalues

TOP = torch.tensor([9.0, 8.8, 8.6, 8.4, 8.2], dtype=torch.float64)


class Diagonal:
    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.shape, self.dtype, self.device = d, (d.numel(),) * 2, d.dtype, d.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * V


def _spectrum() -> torch.Tensor:
    # the top five above a dense bulk in [0, 4): a restarted run's verification must converge
    # the bulk's top Ritz value, which takes long
    d = 4 * torch.rand(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d[:5] = TOP
    return d


def test_each_reason_is_named() -> None:
    op = Diagonal(_spectrum())
    short = lanczos_eigenvalues(op, k=5, tol=1e-12, seed=0, max_matvecs=8)
    assert not short.converged
    assert short.info["unconverged"].startswith("the wanted Ritz values had not met tol=1e-12")
    assert "max_matvecs=8" in short.info["unconverged"]
    no_room = lanczos_eigenvalues(op, k=5, tol=1e-5, seed=0, max_basis=12, max_matvecs=20)
    assert not no_room.converged and "locks" not in no_room.info
    assert "left no room for the verification" in no_room.info["unconverged"]
    pending = lanczos_eigenvalues(op, k=5, tol=1e-5, seed=0, max_basis=12, max_matvecs=60)
    assert not pending.converged and pending.info["locks"] == 1
    assert "the verification" in pending.info["unconverged"]
    assert "dense bulk" in pending.info["unconverged"]
    # the wanted values themselves are right in all three (the residual test passed in two)
    torch.testing.assert_close(pending.values, TOP, atol=1e-4, rtol=0)
    done = lanczos_eigenvalues(op, k=5, tol=1e-5, seed=0, max_basis=12, max_matvecs=300)
    assert done.converged and "unconverged" not in done.info
    torch.testing.assert_close(done.values, TOP, atol=1e-4 * done.norm, rtol=0)
