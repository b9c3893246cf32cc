"""Curvature operators against dense brute-force matrices on the shared problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.operators import MATRICES, curvature_operator
from tests.problems import EXTRA_PROBLEMS, PROBLEMS, make_problem
from tests.reference import (
    assert_untouched,
    blocks,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    per_example_grads,
    snapshot,
    terms_per_example,
)

REFERENCES = {
    "hessian": dense_hessian,
    "ggn": dense_ggn,
    "empirical_fisher": dense_empirical_fisher,
}


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = float((actual - expected).abs().max() / scale)
    assert err < rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("name", PROBLEMS + EXTRA_PROBLEMS)
def test_matrices_match_dense_reference(name: str) -> None:
    p = make_problem(name)
    for matrix, ref in REFERENCES.items():
        op = curvature_operator(p.model, p.loss_fn, p.data, matrix=matrix)
        _close(op.to_dense(), ref(p))


@pytest.mark.parametrize("name", ["res-ce-mean-three", "mlp-bce-sum-one", "cnn-mse-mean-three"])
def test_residual_is_hessian_minus_ggn(name: str) -> None:
    p = make_problem(name)
    op = curvature_operator(p.model, p.loss_fn, p.data, matrix="residual")
    _close(op.to_dense(), dense_hessian(p) - dense_ggn(p))


def _mc_fisher_reference(p, targets: list[torch.Tensor]) -> torch.Tensor:
    """w * sum_n s_n s_n^T with s_n = grad NLL_n at the given labels (brute force)."""
    sampled = make_problem(p.name)
    sampled.y = torch.cat(targets)
    G = per_example_grads(sampled)  # grads of l_n = NLL_n / c
    S = G * terms_per_example(p)
    n = p.X.shape[0]
    w = 1.0 / (n * terms_per_example(p)) if p.loss_fn.reduction == "mean" else 1.0
    return w * S.T @ S


@pytest.mark.parametrize("name", ["res-ce-mean-three", "cnn-bce-sum-one", "mlp-mse-mean-three"])
def test_mc_fisher_matches_its_sampled_labels(name: str) -> None:
    p = make_problem(name)
    op = curvature_operator(p.model, p.loss_fn, p.data, matrix="fisher", seed=5)
    targets = op.sampled_targets
    assert targets is not None and len(targets) == len(p.batches)
    _close(op.to_dense(), _mc_fisher_reference(p, targets))
    again = curvature_operator(p.model, p.loss_fn, p.data, matrix="fisher", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(targets, again.sampled_targets))


def test_mc_fisher_is_unbiased_for_ggn() -> None:
    p = make_problem("mlp-ce-mean-one")
    ggn = dense_ggn(p)
    draws = torch.stack(
        [
            curvature_operator(p.model, p.loss_fn, p.data, matrix="fisher", seed=s).to_dense()
            for s in range(100)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / 100**0.5
    z = (mean - ggn).abs() / se.clamp_min(1e-12)
    # 5 standard errors per entry (a few hundred entries): fails only if biased
    assert float(z.max()) < 5.5
    assert float((mean - ggn).abs().max()) < 0.2 * float(ggn.abs().max())


def test_products_agree_across_forms() -> None:
    p = make_problem("res-mse-sum-three")
    op = curvature_operator(p.model, p.loss_fn, p.data, matrix="ggn")
    dim = op.shape[0]
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(dim, 4, generator=gen, dtype=torch.float64)
    M = op.matmat(V)
    cols = torch.stack([op.matvec(V[:, j]) for j in range(4)], dim=1)
    _close(M, cols, 1e-12)
    _close(op @ V, M, 1e-12)
    as_dict = op.matvec(op.unflatten(V[:, 0]))
    assert list(as_dict) == op.names
    _close(op.flatten(as_dict), M[:, 0], 1e-12)
    lin = op.to_scipy()
    assert lin.shape == (dim, dim) and lin.dtype == np.float64
    np.testing.assert_allclose(lin.matvec(V[:, 1].numpy()), M[:, 1].numpy(), rtol=1e-10)
    np.testing.assert_allclose(lin.matmat(V.numpy()), M.numpy(), rtol=1e-10)
    assert op.num_matvecs == 4 + 4 + 4 + 1 + 1 + 4


@pytest.mark.parametrize("name", ["cnn-ce-mean-three", "mlp-bce-sum-one", "conv1d-mse-sum-one"])
@pytest.mark.parametrize("matrix", ["hessian", "ggn", "empirical_fisher"])
def test_batched_and_looped_products_agree(name: str, matrix: str) -> None:
    p = make_problem(name)
    ops = {
        b: curvature_operator(p.model, p.loss_fn, p.data, matrix=matrix, batched=b)
        for b in (True, False)
    }
    V = torch.randn(ops[True].shape[0], 5, generator=torch.Generator().manual_seed(1))
    _close(ops[True].matmat(V.double()), ops[False].matmat(V.double()), 1e-12)
    # by default a CPU loops over the vectors of convolutional models (faster there)
    default = curvature_operator(p.model, p.loss_fn, p.data, matrix=matrix)
    assert default.batched is (not name.startswith(("cnn", "conv1d")))


@pytest.mark.parametrize("name", ["cnn-ce-mean-three", "res-ce-mean-three", "mlp-bce-sum-one"])
@pytest.mark.parametrize("matrix", ["hessian", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("batched", [True, False])
def test_quadratic_forms_are_the_dense_diagonal_of_vt_a_v(
    name: str, matrix: str, batched: bool
) -> None:
    """``quadratic_forms(V)`` (the per-parameter reduction Hutchinson uses) equals diag(V^T A V)
    with A the dense brute-force matrix, on one and several (uneven) batches, batched or not."""
    p = make_problem(name)
    op = curvature_operator(p.model, p.loss_fn, p.data, matrix=matrix, batched=batched)
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A = REFERENCES[matrix](p)
    expected = torch.einsum("dk,de,ek->k", V, A, V)
    before = op.num_matvecs
    got = op.quadratic_forms(V)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert op.num_matvecs == before + 3
    _close(got, expected)
    _close(got, (V * op.matmat(V)).sum(0), 1e-12)


def test_quadratic_forms_of_a_bfloat16_model_sum_in_float64() -> None:
    """16-bit models: the forms are float64 sums of the bf16 products (no bf16 accumulation)."""
    p = make_problem("mlp-ce-mean-three")
    model = p.model.to(torch.bfloat16)
    data = [(X.to(torch.bfloat16), y) for X, y in p.data]
    op = curvature_operator(model, p.loss_fn, data, matrix="ggn")
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = op.quadratic_forms(V)
    want = (V.double() * op.matmat(V).double()).sum(0)  # matmat: the same products, float32 sums
    assert got.dtype == torch.float64
    _close(got, want, 1e-6)


@pytest.mark.parametrize("name", ["cnn-ce-mean-three", "res-ce-mean-three", "conv1d-mse-sum-one"])
@pytest.mark.parametrize("matrix", ["hessian", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("keep_graph", [True, False])
def test_product_parts_are_the_dense_product_per_parameter(
    name: str, matrix: str, keep_graph: bool
) -> None:
    """``product_parts`` (SLQ's products, no flat copy): ``scale * raw`` is ``A v`` of the dense
    brute-force matrix, split by parameter, summed over one or several (uneven) batches; the
    parts are new tensors (never the caller's) and count as one product."""
    p = make_problem(name)
    op = curvature_operator(p.model, p.loss_fn, p.data, matrix=matrix, keep_graph=keep_graph)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    parts = list(v.split([s.numel() for s in op.shapes]))
    kept = [t.clone() for t in parts]
    before = op.num_matvecs
    raw, scale = op.product_parts(parts)
    assert op.num_matvecs == before + 1
    assert [r.shape for r in raw] == [torch.Size([s.numel()]) for s in op.shapes]
    _close(scale * torch.cat(raw), REFERENCES[matrix](p) @ v)
    for r in raw:
        r.fill_(7.0)  # the caller owns them: writing into them leaves its vector alone
    assert all(torch.equal(a, b) for a, b in zip(parts, kept))


def test_product_parts_never_hand_back_the_callers_tensors(monkeypatch) -> None:
    """A product that autograd returns as its input itself (an identity block) still comes back
    as a new tensor: the recurrence writes into its products."""
    p = make_problem("mlp-ce-mean-one")
    op = curvature_operator(p.model, p.loss_fn, p.data, matrix="ggn")
    monkeypatch.setattr(op, "_apply", lambda graph, v, batched: tuple(v))
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    parts = list(v.split([s.numel() for s in op.shapes]))
    raw, _ = op.product_parts(parts)
    assert torch.equal(torch.cat(raw), v)
    assert all(r.untyped_storage().data_ptr() != v.untyped_storage().data_ptr() for r in raw)


def test_product_parts_of_a_bfloat16_model_come_back_in_float32() -> None:
    p = make_problem("mlp-ce-mean-three")
    model = p.model.to(torch.bfloat16)
    data = [(X.to(torch.bfloat16), y) for X, y in p.data]
    op = curvature_operator(model, p.loss_fn, data, matrix="ggn")
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(5))
    raw, scale = op.product_parts(list(v.split([s.numel() for s in op.shapes])))
    assert all(r.dtype == torch.float32 for r in raw)
    _close(scale * torch.cat(raw), op.matvec(v.to(torch.bfloat16)).float(), 1e-6)
    with pytest.raises(ValueError, match="parts"):
        op.product_parts([v])


@pytest.mark.parametrize("matrix", ["hessian", "fisher"])
def test_keep_graph_or_not_gives_the_same_matrix(matrix: str) -> None:
    p = make_problem("cnn-ce-sum-three")
    kept = curvature_operator(p.model, p.loss_fn, p.data, matrix=matrix, keep_graph=True, seed=1)
    fresh = curvature_operator(p.model, p.loss_fn, p.data, matrix=matrix, keep_graph=False, seed=1)
    _close(kept.to_dense(), fresh.to_dense(), 1e-12)


def test_params_subset_is_the_diagonal_block() -> None:
    p = make_problem("mlp-ce-mean-three")
    H = dense_hessian(p)
    sl = blocks(p.model)
    op = curvature_operator(p.model, p.loss_fn, p.data, params="2")
    assert op.names == ["2.weight", "2.bias"]
    idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in op.names])
    _close(op.to_dense(), H[idx][:, idx])
    one = curvature_operator(p.model, p.loss_fn, p.data, params=["0.bias"])
    _close(one.to_dense(), H[sl["0.bias"], sl["0.bias"]])
    assert set(op.block_slices()) == {"2"}


def test_float32_and_dtype_handling() -> None:
    p = make_problem("mlp-ce-mean-one", dtype=torch.float32)
    op = curvature_operator(p.model, p.loss_fn, p.data)
    assert op.dtype == torch.float32
    out = op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    assert out.dtype == torch.float32
    assert op.to_scipy().dtype == np.float32


def test_leaves_no_trace() -> None:
    p = make_problem("res-ce-mean-three")
    for prm in p.model.parameters():
        prm.grad = torch.ones_like(prm)
    before = snapshot(p.model)
    for matrix in MATRICES:
        op = curvature_operator(p.model, p.loss_fn, p.data, matrix=matrix)
        op.matmat(torch.ones(op.shape[0], 2, dtype=torch.float64))
    assert_untouched(p.model, before)


def test_errors_are_clear() -> None:
    p = make_problem("mlp-ce-mean-one")
    with pytest.raises(ValueError, match="matrix must be one of"):
        curvature_operator(p.model, p.loss_fn, p.data, matrix="hessain")
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        curvature_operator(p.model, p.loss_fn, p.data, params="decoder")
    with pytest.raises(ValueError, match='reduction="none"'):
        curvature_operator(p.model, nn.CrossEntropyLoss(reduction="none"), p.data)
    op = curvature_operator(p.model, p.loss_fn, p.data)
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        op.matvec(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="missing"):
        op.matvec({"0.weight": torch.zeros(5, 4, dtype=torch.float64)})
    with torch.no_grad():
        p.model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="parameters changed"):
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    bn = make_problem("cnnbn-ce-mean-three")
    bn.model.train()
    with pytest.raises(ValueError, match="train mode"):
        curvature_operator(bn.model, bn.loss_fn, bn.data)


class _WithUnused(nn.Module):
    """An MLP with a registered trainable layer its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.unused, self.l2 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


@pytest.mark.parametrize("matrix", ["ggn", "fisher", "empirical_fisher"])
@pytest.mark.parametrize("batched", [False, True])
def test_products_with_a_parameter_the_forward_never_uses(matrix: str, batched: bool) -> None:
    """Its rows and columns are zero; the rest equals the operator of the model without it.
    Found in review: the Jacobian-based products raised autograd's 'does not require grad'."""
    model = _WithUnused().double()
    lf = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    op = curvature_operator(model, lf, (X, y), matrix=matrix, seed=0, batched=batched)
    dense = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    unused = torch.zeros(op.shape[0], dtype=torch.bool)
    start = 0
    for name, p in model.named_parameters():
        if name.startswith("unused."):
            unused[start : start + p.numel()] = True
        start += p.numel()
    assert dense[unused].abs().max() == 0 and dense[:, unused].abs().max() == 0

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = model.l1, model.l2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(torch.tanh(self.l1(x)))

    ref = curvature_operator(Twin(), lf, (X, y), matrix=matrix, seed=0, batched=batched)
    want = ref.matmat(torch.eye(ref.shape[0], dtype=torch.float64))
    torch.testing.assert_close(dense[~unused][:, ~unused], want, rtol=1e-10, atol=1e-13)
