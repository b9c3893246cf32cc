"""KFACNoise's canonical factor from rows equals the one from their Gram matrix (no d x d eigh)."""

from __future__ import annotations

import pytest
import torch

from curvlab.noise._kfac import _psd_factor, _psd_factor_of_rows


@pytest.mark.parametrize("r,d", [(3, 9), (16, 40), (40, 16), (5, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_of_rows_equals_factor_of_gram(r, d, dtype):
    g = torch.Generator().manual_seed(r * 100 + d)
    rows = torch.randn(r, d, generator=g, dtype=torch.float64).to(dtype)
    w = 1.0 / r
    got = _psd_factor_of_rows(rows, w)
    ref = _psd_factor(w * (rows.t() @ rows))
    assert got.shape == (d, d) and got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(got.double(), ref.double(), rtol=tol, atol=tol)
    # C^T C = w rows^T rows (the factor's defining property)
    torch.testing.assert_close(
        (got.double().t() @ got.double()),
        w * (rows.double().t() @ rows.double()),
        rtol=tol,
        atol=tol,
    )
