"""One name per matrix: the matrix names work as ``kind=`` everywhere, the old names as aliases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
    return model, nn.CrossEntropyLoss(), data


@pytest.mark.parametrize(
    "alias,kind", [("ggn", "exact"), ("fisher", "mc"), ("empirical_fisher", "empirical")]
)
def test_quantity_kinds_accept_matrix_names(alias: str, kind: str) -> None:
    model, loss_fn, data = _problem()
    a = cl.diag_fisher(model, loss_fn, data, kind=alias, seed=0)
    b = cl.diag_fisher(model, loss_fn, data, kind=kind, seed=0)
    for n in b:
        assert torch.equal(a[n], b[n]), n
    fa = cl.kfac(model, loss_fn, data, kind=alias, seed=0)
    fb = cl.kfac(model, loss_fn, data, kind=kind, seed=0)
    assert all(torch.equal(fa[k].G, fb[k].G) for k in fb)
    na = cl.fisher_norms(model, loss_fn, data, kind=alias, seed=0)
    nb = cl.fisher_norms(model, loss_fn, data, kind=kind, seed=0)
    assert na.frobenius == nb.frobenius


@pytest.mark.parametrize(
    "alias,matrix", [("exact", "ggn"), ("mc", "fisher"), ("empirical", "empirical_fisher")]
)
def test_matrix_arguments_accept_kind_names(alias: str, matrix: str) -> None:
    model, loss_fn, data = _problem()
    a = cl.curvature_operator(model, loss_fn, data, matrix=alias, seed=0)
    assert a.matrix == matrix
    ta = cl.trace(model, loss_fn, data, matrix=alias, method="exact", seed=0).value
    tb = cl.trace(model, loss_fn, data, matrix=matrix, method="exact", seed=0).value
    assert ta == tb


def test_sampler_kinds_accept_matrix_names() -> None:
    assert cl.noise.FullFisherNoise("ggn", scale=1.0).kind == "true"
    assert cl.noise.DiagFisherNoise("ggn", scale=1.0).kind == "exact"
    assert cl.noise.DiagFisherNoise("fisher", scale=1.0).kind == "mc"
    assert cl.noise.KFACNoise("empirical_fisher", scale=1.0).kind == "empirical"


def test_unknown_kind_names_both_vocabularies() -> None:
    model, loss_fn, data = _problem()
    with pytest.raises(ValueError, match=r"'empirical', 'mc', 'exact'.*'ggn'"):
        cl.diag_fisher(model, loss_fn, data, kind="true_fisher")


def test_batched_fallback_is_recorded_in_info() -> None:
    """A batched product that fails falls back to one vector at a time and says so."""
    model, loss_fn, data = _problem()
    op = cl.curvature_operator(model, loss_fn, data, matrix="ggn", batched=True)
    assert op.info == {}

    def broken(*args, **kwargs):
        raise RuntimeError("Batching rule not implemented for aten::something")

    original = op._apply

    def apply(graph, v, batched):
        return broken() if batched else original(graph, v, batched)

    op._apply = apply
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    expected = torch.stack([op.matvec(V[:, j]) for j in range(3)], dim=1)
    torch.testing.assert_close(op @ V, expected)
    assert "aten::something" in op.info["batched"]
