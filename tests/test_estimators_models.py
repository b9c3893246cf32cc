"""cl.trace / cl.eigenvalues / cl.spectral_density / fisher_trace on the shared model problems."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab.estimators as est
from curvlab.operators import curvature_operator
from tests.problems import make_problem
from tests.reference import (
    assert_untouched,
    blocks,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    snapshot,
)

PROBLEMS = ["mlp-ce-mean-one", "cnn-mse-sum-one", "res-bce-mean-three", "res-ce-sum-one"]


def _layer_traces(p, mat: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    diag = torch.diagonal(mat)
    for name, sl in blocks(p.model).items():
        key = name.rpartition(".")[0]
        out[key] = out.get(key, 0.0) + float(diag[sl].sum())
    return out


@pytest.mark.parametrize("name", PROBLEMS)
def test_exact_traces_match_dense(name: str) -> None:
    p = make_problem(name)
    refs = {
        "hessian": dense_hessian(p),
        "ggn": dense_ggn(p),
        "empirical_fisher": dense_empirical_fisher(p),
    }
    for matrix, ref in refs.items():
        res = est.trace(p.model, p.loss_fn, p.data, matrix=matrix, method="exact", by_layer=True)
        truth = float(torch.trace(ref))
        assert res.value == pytest.approx(truth, rel=1e-6, abs=1e-10), matrix
        layers = _layer_traces(p, ref)
        assert set(res.by_layer) == set(layers)
        for key, val in layers.items():
            assert res.by_layer[key] == pytest.approx(val, rel=1e-6, abs=1e-10)
    fisher = curvature_operator(p.model, p.loss_fn, p.data, matrix="fisher", seed=3)
    res = est.trace(p.model, p.loss_fn, p.data, matrix="fisher", method="exact", seed=3)
    assert res.value == pytest.approx(float(torch.trace(fisher.to_dense())), rel=1e-6)


@pytest.mark.parametrize("name", PROBLEMS)
def test_top_eigenvalues_match_dense(name: str) -> None:
    p = make_problem(name)
    H = dense_hessian(p)
    ev = torch.linalg.eigvalsh(H)
    top = est.eigenvalues(p.model, p.loss_fn, p.data, k=3, tol=1e-9, return_vectors=True)
    assert top.converged and top.seed == 0
    torch.testing.assert_close(top.values, ev.flip(0)[:3], rtol=1e-5, atol=1e-10)
    resid = H @ top.vectors - top.vectors * top.values
    assert float(resid.norm(dim=0).max()) <= 2e-9 * float(ev.abs().max())
    low = est.eigenvalues(
        p.model,
        p.loss_fn,
        p.data,
        k=2,
        tol=1e-9,
        which="smallest",
        return_vectors=True,
        vectors_as="dict",
    )
    torch.testing.assert_close(low.values, ev[:2], rtol=1e-5, atol=1e-9)
    assert set(low.vectors) == set(blocks(p.model))
    ggn_top = est.eigenvalues(p.model, p.loss_fn, p.data, matrix="ggn", k=2, tol=1e-9)
    torch.testing.assert_close(
        ggn_top.values, torch.linalg.eigvalsh(dense_ggn(p)).flip(0)[:2], rtol=1e-5, atol=1e-10
    )


def test_eigenvalue_criterion_stops_earlier_with_accurate_values() -> None:
    p = make_problem("res-ce-mean-three")
    ev = torch.linalg.eigvalsh(dense_hessian(p)).flip(0)
    strict = est.eigenvalues(p.model, p.loss_fn, p.data, k=2, tol=1e-6)
    loose = est.eigenvalues(p.model, p.loss_fn, p.data, k=2, tol=1e-6, criterion="eigenvalue")
    assert loose.converged and loose.num_matvecs <= strict.num_matvecs
    assert float(((loose.values - ev[:2]).abs() / ev[:2].abs()).max()) < 1e-5


@pytest.mark.parametrize("name", ["mlp-ce-mean-one", "cnn-mse-sum-three"])
def test_density_moments_match_dense(name: str) -> None:
    p = make_problem(name)
    H = dense_hessian(p)
    D = H.shape[0]
    res = est.spectral_density(
        p.model, p.loss_fn, p.data, num_steps=4, num_probes=20, seed=1, keep_graph=True
    )
    assert float(torch.trapezoid(res.density, res.grid)) == pytest.approx(1.0, abs=1e-9)
    assert res.num_matvecs == 80
    for j in (1, 2):
        per_probe = (res.weights * res.nodes**j).sum(1)
        se = float(per_probe.std() / math.sqrt(per_probe.numel()))
        truth = float(torch.trace(torch.linalg.matrix_power(H, j))) / D
        assert abs(res.moment(j) - truth) < 4 * se + 1e-9 * abs(truth)


def test_stochastic_traces_are_within_their_standard_errors() -> None:
    p = make_problem("res-ce-mean-three")
    truth = float(torch.trace(dense_hessian(p)))
    for method, probes in (("hutchinson", 200), ("hutch++", 150), ("block", 50), ("ggn_cv", 50)):
        res = est.trace(
            p.model, p.loss_fn, p.data, method=method, num_probes=probes, seed=2, keep_graph=True
        )
        assert abs(res.value - truth) < 4.5 * res.stderr + 1e-9, method
        assert res.stderr > 0
    cv = est.trace(p.model, p.loss_fn, p.data, method="ggn_cv", num_probes=5)
    assert cv.extra["ggn_trace"] == pytest.approx(float(torch.trace(dense_ggn(p))), rel=1e-6)


def test_ggn_cv_is_exact_for_piecewise_linear_nets() -> None:
    # conv + ReLU + max-pool + linear: the residual H - G vanishes inside every layer block
    p = make_problem("cnn-ce-mean-three")
    res = est.trace(p.model, p.loss_fn, p.data, method="ggn_cv", num_probes=5, by_layer=True)
    H = dense_hessian(p)
    assert res.value == pytest.approx(float(torch.trace(H)), rel=1e-9)
    assert res.stderr == pytest.approx(0.0, abs=1e-12)
    for key, val in _layer_traces(p, H).items():
        assert res.by_layer[key] == pytest.approx(val, rel=1e-9, abs=1e-12)


def test_fisher_trace_and_minibatch_proxy() -> None:
    p = make_problem("res-ce-mean-three")
    res = est.fisher_trace(p.model, p.loss_fn, p.data, seed=4)
    op = curvature_operator(p.model, p.loss_fn, p.data, matrix="fisher", seed=4)
    assert res.value == pytest.approx(float(torch.trace(op.to_dense())), rel=1e-9)
    assert res.num_examples == 9 and res.seed == 4 and res.stderr > 0
    assert sum(res.by_layer.values()) == pytest.approx(res.value, rel=1e-9)
    # Tr(F^B): squared norm of each batch's mean-loss gradient at the sampled labels
    expected = []
    for (X, _), y_hat in zip(p.batches, op.sampled_targets):
        loss = nn.CrossEntropyLoss()(p.model(X), y_hat)
        grads = torch.autograd.grad(loss, list(p.model.parameters()))
        expected.append(float(sum((g**2).sum() for g in grads)))
    assert res.per_batch == pytest.approx(expected, rel=1e-9)
    assert res.batch_value == pytest.approx(sum(expected) / 3, rel=1e-9)


def test_fisher_trace_statistics_over_labels() -> None:
    """E over label draws of Tr(F) is Tr(G); the reported stderr is the right size."""
    p = make_problem("mlp-ce-mean-one")
    truth = float(torch.trace(dense_ggn(p)))
    draws = torch.tensor(
        [est.fisher_trace(p.model, p.loss_fn, p.data, seed=s).value for s in range(200)]
    )
    se = float(draws.std() / math.sqrt(200))
    assert abs(float(draws.mean()) - truth) < 4 * se


def test_model_level_calls_leave_no_trace() -> None:
    p = make_problem("res-mse-mean-three")
    for prm in p.model.parameters():
        prm.grad = torch.full_like(prm, 0.5)
    before = snapshot(p.model)
    est.trace(p.model, p.loss_fn, p.data, num_probes=3)
    est.trace(p.model, p.loss_fn, p.data, method="ggn_cv", num_probes=2)
    est.eigenvalues(p.model, p.loss_fn, p.data, k=2)
    est.spectral_density(p.model, p.loss_fn, p.data, num_steps=5)
    est.fisher_trace(p.model, p.loss_fn, p.data)
    assert_untouched(p.model, before)


def test_model_level_errors() -> None:
    p = make_problem("mlp-ce-mean-one")
    with pytest.raises(ValueError, match="method must be one of"):
        est.trace(p.model, p.loss_fn, p.data, method="hutch")
    with pytest.raises(ValueError, match="ggn_cv"):
        est.trace(p.model, p.loss_fn, p.data, matrix="ggn", method="ggn_cv")
    with pytest.raises(ValueError, match="vectors_as"):
        est.eigenvalues(p.model, p.loss_fn, p.data, vectors_as="list")
    with pytest.raises(ValueError, match="criterion"):
        est.eigenvalues(p.model, p.loss_fn, p.data, criterion="ritz")


def test_ggn_cv_trace_takes_a_generator_of_batches():
    """``method="ggn_cv"`` reads the data twice (the exact GGN pass, then the residual operator):
    a generator of batches ran out after the first ("data is empty")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=g)
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    lf = torch.nn.CrossEntropyLoss()
    want = est.trace(model, lf, batches, method="ggn_cv", num_probes=4, seed=0)
    got = est.trace(model, lf, (b for b in batches), method="ggn_cv", num_probes=4, seed=0)
    assert got.value == want.value and got.stderr == want.stderr
