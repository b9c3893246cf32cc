"""16-bit models (found in review, round 13): squares and Gram entries of per-example gradients and
GGN factors are float32 on every backend.

A float16 square is 0 below ``6e-8`` and inf above ``65504``: the Gram matrix of
:func:`~curvlab.fisher_norms` was built and squared in float16 (NonFiniteError for an ordinary
classifier, ``||F||_F = 0`` for a regression that fits its batch), and BackPACK's and torch.func's
squares of per-example gradients and GGN factors were float16 (spurious zeros, false
NonFiniteErrors). Every value is compared with a float64 reference: per-example gradients of the
float16 model's own backward, squared and summed in float64 (empirical quantities), or the float64
copy of the same 16-bit parameters (GGN and Hessian diagonals).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvlab as cl
from curvlab.quantities._gram import DenseRows, LayerRows, OuterRows

TOL = 1e-2  # 16-bit inputs and backward passes; float32 sums


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _mlp(seed: int = 0, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, out))


def _per_example_grads(model: nn.Module, loss_sum: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``(N, D)`` gradients of each example's share of the sum-loss, from the 16-bit model's own
    backward (the loss in float32), in float64."""
    rows = []
    for i in range(X.shape[0]):
        model.zero_grad()
        t = y[i : i + 1]
        loss_sum(model(X[i : i + 1]).float(), t.float() if t.is_floating_point() else t).backward()
        rows.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def _brute_norms(V: Tensor, w: float) -> tuple[float, float]:
    F = w * V.T @ V
    return float(F.norm()), float(F.diagonal().norm())


def _ggn_diag64(m16: nn.Module, X: Tensor, kind: str) -> dict[str, Tensor]:
    """The exact GGN diagonal of the mean loss, on the float64 copy of the 16-bit model."""
    m64 = copy.deepcopy(m16).double()
    P = {k: v.detach() for k, v in m64.named_parameters()}
    X64 = X.double()
    J = jacrev(lambda P: functional_call(m64, P, (X64,)))(P)
    f = functional_call(m64, P, (X64,))
    n = X.shape[0]
    if kind == "ce":
        p = f.softmax(-1)
        H = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / n
    else:  # BCE, one logit
        H = torch.diag_embed(torch.sigmoid(f) * torch.sigmoid(-f)) / n
    return {k: torch.einsum("nc...,ncd,nd...->...", J[k], H, J[k]) for k in P}


# ------------------------------------------------------------------ fisher_norms (finding 1)


def _classifier16() -> tuple[nn.Module, Tensor, Tensor]:
    """A float16 classifier with per-example gradient norms ~20: Gram entries above 256."""
    m = _mlp().double()
    with torch.no_grad():
        m[2].weight.mul_(30)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 5, generator=g, dtype=torch.float64).half()
    m16 = m.half()
    with torch.no_grad():
        y = m16(X).argmax(-1)
    return m16, X, y


def _fitted_regression16() -> tuple[nn.Module, Tensor, Tensor]:
    """A float16 regression fitting its batch (residuals ~3e-4): Gram entries below 6e-8."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 5, generator=g, dtype=torch.float64).half()
    m16 = _mlp().double().half()
    with torch.no_grad():
        f = m16(X)
    y = (f.double() + 3e-4 * torch.randn(12, 3, generator=g, dtype=torch.float64)).half()
    return m16, X, y


@pytest.mark.parametrize("backend", ["auto", "hooks", "backpack", "func"])
def test_fisher_norms_float16_gram_does_not_overflow(backend):
    torch.set_num_threads(1)
    m16, X, y = _classifier16()
    V = _per_example_grads(m16, nn.CrossEntropyLoss(reduction="sum"), X, y)
    frob, diag = _brute_norms(V, 1 / X.shape[0])
    r = cl.fisher_norms(m16, nn.CrossEntropyLoss(), (X, y), backend=backend)
    assert abs(r.frobenius - frob) <= TOL * frob, (r.frobenius, frob)  # was NonFiniteError
    assert abs(r.diag_frobenius - diag) <= TOL * diag, (r.diag_frobenius, diag)


@pytest.mark.parametrize("backend", ["auto", "hooks", "backpack"])
def test_fisher_norms_float16_small_gram_is_not_zero(backend):
    torch.set_num_threads(1)
    m16, X, y = _fitted_regression16()
    lf = nn.MSELoss(reduction="sum")
    frob, diag = _brute_norms(_per_example_grads(m16, lf, X, y), 1.0)
    r = cl.fisher_norms(m16, lf, (X, y), backend=backend)
    assert r.frobenius > 0  # was exactly 0.0
    assert abs(r.frobenius - frob) <= TOL * frob, (r.frobenius, frob)
    assert abs(r.diag_frobenius - diag) <= TOL * diag, (r.diag_frobenius, diag)


def test_fisher_norms_float16_dense_rows_squared_in_float32():
    """A LayerNorm's rows are dense on the hooks backend: their squares of per-example gradients
    of ~3000 overflowed float16 (NonFiniteError)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m16 = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)).half()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 5, generator=g).half()
    with torch.no_grad():
        y = (m16(X).float() + 300 * torch.randn(12, 3, generator=g)).half()
    lf = nn.MSELoss(reduction="sum")
    V = _per_example_grads(m16, lf, X, y)
    assert float(V.abs().max()) > 256
    frob, diag = _brute_norms(V, 1.0)
    r = cl.fisher_norms(m16, lf, (X, y), backend="hooks")
    assert abs(r.frobenius - frob) <= TOL * frob, (r.frobenius, frob)
    assert abs(r.diag_frobenius - diag) <= TOL * diag, (r.diag_frobenius, diag)


def test_gram_blocks_of_16bit_rows_are_float32():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        A = (20 * torch.randn(6, 4, generator=g)).to(dtype)
        G = (20 * torch.randn(6, 3, generator=g)).to(dtype)
        P = (1e-5 * torch.randn(6, 9, generator=g)).to(dtype)
        rows = LayerRows([OuterRows(A, G, bias=True), DenseRows(P)])
        V = torch.cat(
            [
                torch.einsum("no,ni->noi", G.double(), A.double()).flatten(1),
                G.double(),
                P.double(),
            ],
            1,
        )
        gram, col = rows.gram(rows), rows.col_sq_sums()
        assert gram.dtype == torch.float32 and col.dtype == torch.float32
        assert _rel(gram, V @ V.T) < 1e-5  # float16: inf before
        assert _rel(col, (V * V).sum(0)) < 1e-5
        assert bool((col[-9:] > 0).all())  # float16: squares of 1e-5 were 0


def test_gram_blocks_of_float32_rows_unchanged():
    g = torch.Generator().manual_seed(0)
    A, G, P = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, 7)
    outer, dense = OuterRows(A, G, bias=True), DenseRows(P)
    assert torch.equal(outer.gram(outer), (G @ G.T).mul_(A @ A.T + 1))
    assert torch.equal(dense.gram(dense), P @ P.T)
    assert torch.equal(dense.col_sq_sums(), (P * P).sum(0))


# ------------------------------------------------------------ BackPACK's squares (finding 2)


def _tiny_inputs16(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """A float16 MLP on inputs ~1e-3: first-layer squares below float16's subnormals."""
    g = torch.Generator().manual_seed(1)
    X = (1e-3 * torch.randn(12, 5, generator=g, dtype=torch.float64)).half()
    y = torch.randint(0, 3, (12,), generator=g)
    return _mlp(seed).double().half(), X, y


def test_backpack_exact_diag_fisher_float16_has_no_spurious_zeros():
    torch.set_num_threads(1)
    m16, X, y = _tiny_inputs16()
    ref = _ggn_diag64(m16, X, "ce")
    r = cl.diag_fisher(m16, nn.CrossEntropyLoss(), (X, y), kind="exact", backend="backpack")
    for k, v in ref.items():
        assert int((r[k] == 0).sum()) == 0, k  # 13 of 35 first-layer entries were 0
        assert float(((r[k].double() - v).abs() / v.abs()).max()) < TOL, k


def test_backpack_empirical_diag_fisher_float16_small_and_large():
    torch.set_num_threads(1)
    m16, X, y = _tiny_inputs16()
    V = _per_example_grads(m16, nn.CrossEntropyLoss(reduction="sum"), X, y)
    ref = (V * V).sum(0) / X.shape[0]
    r = cl.diag_fisher(m16, nn.CrossEntropyLoss(), (X, y), backend="backpack")
    flat = torch.cat([v.flatten() for v in r.values()])
    assert int((flat == 0).sum()) == 0  # 12 zeros
    assert float(((flat.double() - ref).abs() / ref).max()) < TOL
    # per-example gradients up to ~1900: squares above float16's 65504 (NonFiniteError before)
    g = torch.Generator().manual_seed(1)
    Xl = (30 * torch.randn(12, 5, generator=g, dtype=torch.float64)).half()
    yl = (100 * torch.randn(12, 3, generator=g, dtype=torch.float64)).half()
    lf = nn.MSELoss(reduction="sum")
    Vl = _per_example_grads(m16, lf, Xl, yl)
    assert float(Vl.abs().max()) > 256  # its square overflows float16
    r = cl.diag_fisher(m16, lf, (Xl, yl), backend="backpack")
    flat = torch.cat([v.flatten() for v in r.values()])
    assert _rel(flat, (Vl * Vl).sum(0)) < TOL


def test_backpack_diag_hessian_float16_has_no_spurious_zeros():
    torch.set_num_threads(1)
    m16, X, y = _tiny_inputs16()
    r = cl.diag_hessian(m16, nn.CrossEntropyLoss(), (X, y), backend="backpack")
    ref = cl.diag_hessian(copy.deepcopy(m16).double(), nn.CrossEntropyLoss(), (X.double(), y))
    for k in ref:
        assert int((r[k] == 0).sum()) == 0, k  # 6 of 35 were 0, the rest multiples of 5e-9
        assert _rel(r[k], ref[k]) < TOL, k
        assert float(((r[k].double() - ref[k]).abs() / ref[k].abs()).max()) < 0.1, k


@pytest.mark.parametrize("bias", [16.0, 30.0])
def test_backpack_bce_exact_diag_fisher_of_fitted_float16_classifier(bias):
    """Logits 15-19 (``sigmoid(z) sigmoid(-z) ~ 1e-7``: the squares were float16, 7% off) and
    29-33 (square-root factors ``~3e-7``, subnormal in float16: 5% off once squared in float32,
    now scaled by a power of two before their cast to float16)."""
    torch.set_num_threads(1)
    m = _mlp(out=1).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 5, generator=g, dtype=torch.float64).half()
    with torch.no_grad():
        m[2].weight.mul_(8)
        m[2].bias.fill_(bias)
    m16 = m.half()
    ref = _ggn_diag64(m16, X, "bce")
    y = torch.ones(12, 1).half()
    r = cl.diag_fisher(m16, nn.BCEWithLogitsLoss(), (X, y), kind="exact", backend="backpack")
    for k, v in ref.items():
        assert _rel(r[k], v) < TOL, k  # 2.weight was 7% off


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backpack_conv_float16_exact_and_hessian_diagonals(dtype):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    g = torch.Generator().manual_seed(1)
    X = (1e-3 * torch.randn(8, 2, 6, 6, generator=g)).to(dtype)
    y = torch.randint(0, 3, (8,), generator=g)
    m16 = m.to(dtype)
    m64 = copy.deepcopy(m16).double()
    lf = nn.CrossEntropyLoss()
    for f in (
        lambda m, X: cl.diag_fisher(m, lf, (X, y), kind="exact", backend="backpack"),
        lambda m, X: cl.diag_hessian(m, lf, (X, y), backend="backpack"),
    ):
        r, ref = f(m16, X), f(m64, X.double())
        for k in ref:
            assert r[k].dtype == torch.float32
            assert int((r[k] == 0).sum()) == int((ref[k] == 0).sum()), k
            assert _rel(r[k], ref[k]) < (TOL if dtype == torch.float16 else 5e-2), k


def test_backpack_float32_model_keeps_backpacks_own_numbers():
    """A float32 model's squares are BackPACK's own (no copies), up to the rounding of the loss
    gradient (curvlab's is written around the most probable class: curvlab._stable_nll)."""
    from backpack import backpack, extend
    from backpack import extensions as bext

    torch.set_num_threads(1)
    m = _mlp()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    r = cl.diag_fisher(m, nn.CrossEntropyLoss(reduction="sum"), (X, y), backend="backpack")
    e = extend(copy.deepcopy(m))
    with backpack(bext.SumGradSquared()):
        nn.CrossEntropyLoss(reduction="sum")(e(X), y).backward()
    for k, p in e.named_parameters():
        torch.testing.assert_close(r[k], p.sum_grad_squared, rtol=1e-6, atol=1e-7, msg=k)


# ---------------------------------------------------- torch.func's squares (finding 2), counts (6)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_func_diag_fisher_float16_has_no_spurious_zeros(kind):
    torch.set_num_threads(1)
    m16, X, y = _tiny_inputs16()
    if kind == "exact":
        ref = torch.cat([v.flatten() for v in _ggn_diag64(m16, X, "ce").values()])
    else:
        V = _per_example_grads(m16, nn.CrossEntropyLoss(reduction="sum"), X, y)
        ref = (V * V).sum(0) / X.shape[0]
    r = cl.diag_fisher(m16, nn.CrossEntropyLoss(), (X, y), kind=kind, backend="func")
    flat = torch.cat([v.flatten() for v in r.values()])
    assert int((flat == 0).sum()) == 0  # 19 (exact) and 16 (empirical) zeros before
    assert _rel(flat, ref) < TOL
    assert float(((flat.double() - ref).abs() / ref).max()) < 0.1


def test_func_diag_fisher_float16_large_gradients_are_finite():
    torch.set_num_threads(1)
    m16 = _mlp().double().half()
    g = torch.Generator().manual_seed(1)
    X = (30 * torch.randn(12, 5, generator=g, dtype=torch.float64)).half()
    y = (100 * torch.randn(12, 3, generator=g, dtype=torch.float64)).half()
    lf = nn.MSELoss(reduction="sum")
    V = _per_example_grads(m16, lf, X, y)
    r = cl.diag_fisher(m16, lf, (X, y), backend="func")  # NonFiniteError before
    assert _rel(torch.cat([v.flatten() for v in r.values()]), (V * V).sum(0)) < TOL


def test_func_chosen_by_default_for_a_free_parameter_float16():
    """A model with a parameter outside any layer gets torch.func by default."""

    class PosMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(1e-3 * torch.randn(5))
            self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.a(x + self.pos)))

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m16 = PosMLP().half()
    g = torch.Generator().manual_seed(1)
    X = (1e-3 * torch.randn(12, 5, generator=g)).half()
    y = torch.randint(0, 3, (12,), generator=g)
    V = _per_example_grads(m16, nn.CrossEntropyLoss(reduction="sum"), X, y)
    ref = (V * V).sum(0) / 12
    r = cl.diag_fisher(m16, nn.CrossEntropyLoss(), (X, y))
    assert r.backend == "func"
    flat = torch.cat([r[k].flatten() for k, _ in m16.named_parameters()])
    assert int((flat == 0).sum()) == 0  # 3 zeros in a.weight, 5.5% off
    assert _rel(flat, ref) < TOL
    stats = cl.gradient_stats(m16, nn.CrossEntropyLoss(), (X, y), backend="func")
    second = torch.cat([stats.second_moment[k].flatten() for k, _ in m16.named_parameters()])
    assert _rel(second, ref) < TOL


def test_func_counts_every_bad_label_of_the_batch():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(7, 6), nn.Linear(6, 7))
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 7, (4, 5), generator=g)
    y = torch.randint(1, 7, (4, 5), generator=g)
    y[0, :2] = -100  # not the ignore_index (0): three bad labels in two examples
    y[2, 4] = -100
    lf = cl.classes_last(nn.CrossEntropyLoss(ignore_index=0, reduction="sum"))
    for call in (
        lambda: cl.diag_fisher(m, lf, (X, y), backend="func"),
        lambda: cl.gradient_stats(m, lf, (X, y), backend="func"),
        lambda: cl.fisher_norms(m, lf, (X, y), backend="func"),
    ):
        with pytest.raises(ValueError, match=r"^3 target\(s\) are neither a class index"):
            call()  # said 2 (the first example's)


@pytest.mark.parametrize("backend", ["hooks", "backpack", "func"])
def test_gradient_stats_float16_variance_at_a_large_mean(backend):
    """``mean^2 / variance = 239`` for the last bias: the variance cancels 2.4 digits, so the
    gradient (the mean) must be a float32 sum (BackPACK's was the 16-bit ``.grad``: 14% off;
    torch.func's squares were 16-bit: 27%)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m16 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).half()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 4, generator=g).half()
    y = (3.0 + 0.05 * torch.randn(64, 1, generator=g)).half()
    V = _per_example_grads(m16, nn.MSELoss(reduction="sum"), X, y)  # g_n = grad of NLL_n
    mean, var = V.mean(0), V.var(0, unbiased=False)
    assert float((mean**2 / var).max()) > 200
    s = cl.gradient_stats(m16, nn.MSELoss(), (X, y), backend=backend)
    got = torch.cat([s.variance[k].flatten() for k, _ in m16.named_parameters()])
    assert float(((got.double() - var).abs() / var).max()) < TOL
