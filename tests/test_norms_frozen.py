"""``fisher_norms`` on layers trained in part (a frozen weight or bias): only the trainable
parameters' Fisher, against dense brute force, on every backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl

DT = torch.float64


def _dense_empirical_fisher(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_n g_n g_n^T with g_n example n's gradient under the mean convention."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(X.shape[0]):

        def loss_i(ps: dict, i: int = i) -> torch.Tensor:
            out = torch.func.functional_call(model, ps, (X[i : i + 1],))
            return nn.functional.cross_entropy(
                out.reshape(-1, 3), y[i : i + 1].reshape(-1), reduction="sum"
            )

        g = torch.func.grad(loss_i)(params)
        rows.append(torch.cat([v.reshape(-1) for v in g.values()]))
    g = torch.stack(rows) * (X.shape[0] / y.numel())
    return g.T @ g / X.shape[0]


@pytest.mark.parametrize("frozen", ["weight_2d", "bias_3d", "weight_3d"])
@pytest.mark.parametrize("backend", ["hooks", "func", "auto"])
def test_fisher_norms_leave_frozen_parts_of_a_layer_out(frozen, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    if frozen == "weight_2d":
        X, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    else:
        X = torch.randn(8, 6, 4, generator=g, dtype=DT)
        y = torch.randint(0, 3, (8, 6), generator=g)
    getattr(model[0], frozen.split("_")[0]).requires_grad_(False)
    F = _dense_empirical_fisher(model, X, y)
    for data in ((X, y), [(X[:5], y[:5]), (X[5:], y[5:])]):
        got = cl.fisher_norms(model, nn.CrossEntropyLoss(), data, backend=backend)
        assert got.frobenius == pytest.approx(float(torch.linalg.norm(F)), rel=1e-10)
        want_diag = float(torch.linalg.norm(torch.diagonal(F)))
        assert got.diag_frobenius == pytest.approx(want_diag, rel=1e-10)
