"""16-bit models (review s18): curvature products in float16 under a mean loss over many
examples, of a confident float16 classifier, of mixed-dtype models, and gradient_stats' bound.

The reference is the float64 model built from the upcast 16-bit weights, on the upcast data
(docs/training-loops.md). The inputs and weights are chosen so that the 16-bit forward pass is
exact (small integers, powers of two) where the tolerance is to cover the products alone: then
each product entry is off by at most ``c u`` times the same product taken with absolute values
(``|J|^T |Lambda| |J| |v|``), ``u`` the unit roundoff (``2^-11`` float16, ``2^-8`` bfloat16) and
``c`` the roundings on the way (stated per test).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl

U16 = 2.0**-11  # float16 unit roundoff
U_BF16 = 2.0**-8  # bfloat16 unit roundoff


def _flat_params(model: nn.Module) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    named = list(model.named_parameters())
    theta = torch.cat([p.detach().double().reshape(-1) for _, p in named])
    return [n for n, _ in named], [p.shape for _, p in named], theta


def _unflat(theta: torch.Tensor, names: list[str], shapes: list[torch.Size]) -> dict:
    out, i = {}, 0
    for n, s in zip(names, shapes):
        k = s.numel()
        out[n] = theta[i : i + k].view(s)
        i += k
    return out


def _reference(model16: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """Float64 ``H`` of the upcast model, and ``|J|^T |Lambda| |J|`` (the scale of rounding)."""
    m64 = copy.deepcopy(model16).double()
    names, shapes, theta = _flat_params(m64)
    X64 = X.double() if X.is_floating_point() else X
    y64 = y.double() if y.is_floating_point() else y

    def out(th: torch.Tensor) -> torch.Tensor:
        return functional_call(m64, _unflat(th, names, shapes), (X64,))

    f = out(theta).detach()
    J = jacrev(out)(theta).reshape(f.numel(), -1)
    if isinstance(loss_fn, nn.MSELoss):  # Lambda = 2 w I (a dense 8192^2 Hessian: 0.5 GB)
        w = 1.0 / f.numel() if loss_fn.reduction == "mean" else 1.0
        H = hessian(lambda th: loss_fn(out(th), y64))(theta)
        return H, 2 * w * J.abs().T @ J.abs()
    H = hessian(lambda th: loss_fn(out(th), y64))(theta)
    Lam = hessian(lambda o: loss_fn(o.reshape(f.shape), y64))(f.reshape(-1))
    return H, J.abs().T @ Lam.abs() @ J.abs()


def _mean_mse_case() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """float16 Linear(4, 2), MSELoss(mean) over 4096 examples with integer inputs up to 8: the
    mean-loss Hessian's largest eigenvalue is about 25, the raw NLL-sum products 4096 times
    that (beyond float16's 65504). Weights multiples of 1/8, inputs integers: forward exact."""
    g = torch.Generator().manual_seed(1)
    m = nn.Linear(4, 2).half()
    with torch.no_grad():
        m.weight.copy_(torch.randint(-4, 5, (2, 4), generator=g) / 8)
        m.bias.copy_(torch.randint(-4, 5, (2,), generator=g) / 8)
    X = torch.randint(-8, 9, (4096, 4), generator=g).half()
    y = torch.randint(-4, 5, (4096, 2), generator=g).half()
    return m, nn.MSELoss(), X, y


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_fp16_mean_loss_products_over_many_examples_do_not_overflow(matrix: str) -> None:
    """Raised NonFiniteError before (the raw NLL-sum product formed in the float16 backward).
    ``c = 8``: the vector's cast, ``J v`` (4 products and a bias: exact here), ``Lambda J v``'s
    cast, the product's cast, and float32 accumulation over the examples, with a factor 2."""
    torch.manual_seed(0)
    m, lf, X, y = _mean_mse_case()
    H, Habs = _reference(m, lf, X, y)
    assert torch.linalg.eigvalsh(H)[-1] * 4096 > 65504  # the raw sum's products overflow
    op = cl.curvature_operator(m, lf, (X, y), matrix=matrix)
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = op.matvec(v.float()).double()
    assert torch.isfinite(got).all()
    bound = 8 * U16 * (Habs @ v.abs()) + 1e-7 * (Habs @ v.abs()).max()  # (+ float32's eps)
    assert ((got - H @ v).abs() <= bound).all(), ((got - H @ v).abs() / bound).max()


def test_fp16_mean_loss_trace_and_eigenvalue_over_many_examples() -> None:
    """The estimators on top (trace, eigenvalues) gave NonFiniteError; now within 8u of the
    float64 values (trace: a sum of positive diagonal entries, each within 8u)."""
    torch.manual_seed(0)
    m, lf, X, y = _mean_mse_case()
    H, _ = _reference(m, lf, X, y)
    tr = cl.trace(m, lf, (X, y), method="exact").value
    assert abs(tr - float(H.trace())) <= 8 * U16 * float(H.trace())
    top = float(cl.eigenvalues(m, lf, (X, y), k=1).values[0])
    ref = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(top - ref) <= 8 * U16 * ref


def _confident_case() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """float16 linear classifier with rows ``0, s (1, 2, 4, 8), -s (1, 2, 4, 8)``, ``s = 20``,
    and inputs in ``{-1, 1}``: logits are integers up to 300 (exact in float16) whose
    differences are odd multiples of 20 (never 0), so ``p (1 - p) <= e^-20 = 2e-9``: the
    Hessian's entries are below float16's smallest subnormal (6e-8); some examples are
    misclassified (``r ~ 1``). ``H = GGN`` (a linear model)."""
    g = torch.Generator().manual_seed(3)
    m = nn.Linear(4, 3).half()
    row = torch.tensor([1.0, 2.0, 4.0, 8.0]) * 20
    with torch.no_grad():
        m.weight.copy_(torch.stack([0 * row, row, -row]))
        m.bias.zero_()
    X = (2 * torch.randint(0, 2, (16, 4), generator=g) - 1).half()
    y = torch.randint(0, 3, (16,), generator=g)
    return m, nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_fp16_confident_classifier_products_are_not_flushed_to_zero(matrix: str) -> None:
    """Gave 0 (the float32 loss-Hessian product ~1e-9 cast to float16 before the backward).
    ``c = 8`` as above (the sums here are over 16 examples)."""
    torch.manual_seed(0)
    m, lf, X, y = _confident_case()
    H, Habs = _reference(m, lf, X, y)
    assert 0 < float(H.diagonal().max()) < 6e-8  # below float16's smallest subnormal
    op = cl.curvature_operator(m, lf, (X, y), matrix=matrix)
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = op.matvec(v.float()).double()
    ref = H @ v
    bound = 8 * U16 * (Habs @ v.abs()) + 1e-6 * (Habs @ v.abs()).max()  # (+ float32's)
    assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() / bound).max()
    assert got.norm() > 0.5 * ref.norm()


def test_fp16_confident_classifier_eigenvalue_and_trace() -> None:
    """eigenvalues gave 0.0 and trace 0 or 1.6x the float64 value; within 8u now."""
    torch.manual_seed(0)
    m, lf, X, y = _confident_case()
    H, _ = _reference(m, lf, X, y)
    ref_top = float(torch.linalg.eigvalsh(H)[-1])
    for matrix in ("hessian", "ggn"):
        top = float(cl.eigenvalues(m, lf, (X, y), matrix=matrix, k=1).values[0])
        assert abs(top - ref_top) <= 8 * U16 * ref_top, (matrix, top, ref_top)
        tr = cl.trace(m, lf, (X, y), matrix=matrix, method="exact").value
        assert abs(tr - float(H.trace())) <= 8 * U16 * float(H.trace()), (matrix, tr)


def test_fp16_confident_classifier_residual_is_zero() -> None:
    """A linear model's residual ``H - G`` is 0: the 16-bit residual graph stays exact."""
    m, lf, X, y = _confident_case()
    op = cl.curvature_operator(m, lf, (X, y), matrix="residual")
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(5))
    assert op.matvec(v).abs().max() == 0


class _Mixed(nn.Module):
    """A float32 layer, then a float16 one (or the other way round); a float32 output."""

    def __init__(self, first16: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        (self.a if first16 else self.b).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x.to(self.a.weight.dtype)))
        out = self.b(h.to(self.b.weight.dtype))  # float32 (float64 in the float64 copy)
        return out.to(torch.promote_types(self.a.weight.dtype, torch.float32))


@pytest.mark.parametrize("scale", [1e-8, 1e5])
def test_mixed_model_float16_second_layer_scales_vectors(scale: float) -> None:
    """float32 layer first: the operator took float32 from the first parameter and cast the
    float16 layer's entries without scaling (``A(c v) / c`` 94% off at ``c = 1e-8``,
    NonFiniteError at ``1e5``). Now within ``8u`` (norm-wise) of the float64 ``H v`` (the
    float16 forward pass and the products' roundings; measured 0.7u)."""
    torch.manual_seed(0)
    m = _Mixed(first16=False)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    lf = nn.CrossEntropyLoss()
    H, _ = _reference(m, lf, X, y)
    op = cl.curvature_operator(m, lf, (X, y))
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = op.matvec((v * scale).float()).double() / scale
    assert torch.isfinite(got).all()
    assert (got - H @ v).norm() <= 8 * U16 * (H @ v).norm()
    assert op.dtype == torch.float16  # the least precise selected parameter's


def test_mixed_model_bfloat16_embedding_first_keeps_float32_layers_in_float32() -> None:
    """A bfloat16 embedding first: every vector was rounded to bfloat16 (3.4e-3 off, even over
    the float32 layers alone with params=). Over the float32 layers the products are float32
    now: within ``1e-5`` relative (float32's eps times the depth, here measured 1.6e-7)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4).to(torch.bfloat16)
            self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(torch.tanh(self.l1(self.emb(x).to(self.l1.weight.dtype))))

    torch.manual_seed(0)
    m = Net()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randint(0, 7, (32,), generator=g), torch.randint(0, 3, (32,), generator=g)
    lf = nn.CrossEntropyLoss()
    H, _ = _reference(m, lf, X, y)
    n_emb = 28
    v = torch.randn(H.shape[0] - n_emb, dtype=torch.float64, generator=g)
    op = cl.curvature_operator(m, lf, (X, y), params=["l1", "l2"])
    ref = H[n_emb:, n_emb:] @ v
    assert (op.matvec(v.float()).double() - ref).norm() <= 1e-5 * ref.norm()
    assert op.dtype == torch.float32
    full = cl.curvature_operator(m, lf, (X, y))
    assert full.dtype == torch.bfloat16  # the least precise selected parameter's
    w = torch.cat([torch.zeros(n_emb, dtype=torch.float64), v])
    got = full.matvec(w.float()).double()[n_emb:]
    assert (got - ref).norm() <= 1e-5 * ref.norm()


def test_gradient_stats_bfloat16_warns_where_rounding_reaches_the_variance() -> None:
    """bfloat16 Linear(4, 1), MSE, targets 4: the bias's ``mean^2 / variance`` is 1.7e4 and its
    variance 7% off the float64 one (per-example gradients rounded to bfloat16), with no
    warning before (the bound used float32's eps: 1e5). The bound ``u^2 E[g^2]`` (u = 2^-8)
    flags it now."""
    torch.manual_seed(0)
    m = nn.Linear(4, 1).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 4, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        m.weight.mul_(0.05)
        m.bias.zero_()
    y = torch.full((512, 1), 4.0).to(torch.bfloat16)
    lf = nn.MSELoss()
    m64 = copy.deepcopy(m).double()
    names, shapes, theta = _flat_params(m64)

    def share(th: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return lf(functional_call(m64, _unflat(th, names, shapes), (x[None],)), t[None])

    G = torch.func.vmap(torch.func.grad(share), in_dims=(None, 0, 0))(theta, X.double(), y.double())
    var_bias = float(G[:, -1].var(unbiased=False))
    ratio = float(G[:, -1].mean() ** 2) / var_bias
    assert U_BF16**2 * ratio > 0.01  # the bound exceeds 1% of the variance
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = cl.gradient_stats(m, lf, (X, y))
    got = float(stats.variance["bias"])
    assert abs(got - var_bias) > 0.01 * var_bias  # the rounding did reach the variance
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("cancels in bfloat16" in msg and "'bias'" in msg for msg in messages), messages
