"""Review s18 (operators): complex vectors (cut to their real part before) and products with no
columns (raw IndexError / AssertionError before).

Brute force: the dense float64 GGN from torch.func, written here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl

D = torch.float64
# float64 products of a 31 x 31 matrix of O(1) entries: rounding ~1e-15 relative, different
# summation orders included; a lost imaginary part is an O(1) error
RTOL = 1e-11


def _problem() -> tuple[nn.Module, nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 3, generator=gen, dtype=D)
    y = torch.randint(0, 3, (5,), generator=gen)
    return model, nn.CrossEntropyLoss(), (X, y)


def _dense_ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``J^T H J`` of the mean cross-entropy over all parameters, flat in named_parameters order."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    theta = torch.cat([params[n].reshape(-1) for n in names])

    def out(t: Tensor) -> Tensor:
        parts, i = {}, 0
        for n in names:
            k = params[n].numel()
            parts[n] = t[i : i + k].reshape(params[n].shape)
            i += k
        return functional_call(model, parts, (X,)).reshape(-1)

    o = out(theta)
    J = jacrev(out)(theta)
    H = hessian(lambda f: loss_fn(f.reshape(X.shape[0], -1), y))(o)
    return J.T @ H @ J


def _complex(n: int, k: int | None, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (n, k)
    return torch.complex(
        torch.randn(shape, generator=gen, dtype=D), torch.randn(shape, generator=gen, dtype=D)
    )


# ---------------------------------------------------------------------------- complex vectors
@pytest.mark.parametrize("batched", [True, False])
def test_complex_vectors_give_the_complex_product(batched: bool) -> None:
    model, loss_fn, (X, y) = _problem()
    A = _dense_ggn(model, loss_fn, X, y).to(torch.complex128)
    op = cl.curvature_operator(model, loss_fn, (X, y), matrix="ggn", batched=batched)
    d = op.shape[0]
    v, V = _complex(d, None, 2), _complex(d, 3, 3)
    got = op.matvec(v)
    assert got.dtype == torch.complex128
    torch.testing.assert_close(got, A @ v, rtol=RTOL, atol=0)
    torch.testing.assert_close(op.matmat(V), A @ V, rtol=RTOL, atol=0)
    torch.testing.assert_close(op @ V, A @ V, rtol=RTOL, atol=0)
    as_dict = op.matvec(op.unflatten(v))
    torch.testing.assert_close(op.flatten(as_dict), A @ v, rtol=RTOL, atol=0)


def test_complex_shift_through_scipy() -> None:
    """scipy's A - z I with a complex z passes complex vectors to the operator."""
    model, loss_fn, (X, y) = _problem()
    A = _dense_ggn(model, loss_fn, X, y).numpy()
    op = cl.curvature_operator(model, loss_fn, (X, y), matrix="ggn")
    d = op.shape[0]
    z = 0.1 + 0.5j
    shifted = op.to_scipy() - z * sla.aslinearoperator(np.eye(d))
    x = _complex(d, None, 4).numpy()
    want = (A - z * np.eye(d)) @ x
    np.testing.assert_allclose(shifted.matvec(x), want, rtol=RTOL, atol=0)
    Xc = _complex(d, 2, 5).numpy()
    np.testing.assert_allclose(op.to_scipy().matmat(Xc), A @ Xc, rtol=RTOL, atol=0)
    np.testing.assert_allclose(op.to_scipy().rmatvec(x), A @ x, rtol=RTOL, atol=0)


def test_complex_vector_of_a_float32_model_gives_complex64() -> None:
    model, loss_fn, (X, y) = _problem()
    model = model.float()
    X = X.float()
    A = _dense_ggn(copy.deepcopy(model).double(), loss_fn, X.double(), y)  # same values
    op = cl.curvature_operator(model, loss_fn, (X, y), matrix="ggn")
    v = _complex(op.shape[0], None, 6)
    got = op.matvec(v)
    assert got.dtype == torch.complex64
    want = A.to(torch.complex128) @ v
    # float32 products: relative error ~1e-6 of the product's norm
    assert float((got.to(torch.complex128) - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_complex_refused_where_no_linear_meaning() -> None:
    model, loss_fn, batch = _problem()
    op = cl.curvature_operator(model, loss_fn, batch, matrix="ggn")
    with pytest.raises(TypeError, match=r"quadratic_forms\(V.real\) \+ quadratic_forms\(V.imag\)"):
        op.quadratic_forms(_complex(op.shape[0], 2, 7))
    parts = [
        torch.complex(p.detach().reshape(-1), p.detach().reshape(-1)) for p in model.parameters()
    ]
    with pytest.raises(TypeError, match="matvec"):
        op.product_parts(parts)


# ----------------------------------------------------------------------------- zero columns
@pytest.mark.parametrize("batched", [True, False])
def test_products_with_no_columns_are_empty_and_run_no_pass(
    batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, loss_fn, batch = _problem()
    op = cl.curvature_operator(model, loss_fn, batch, matrix="ggn", batched=batched)
    d = op.shape[0]

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pass ran for zero columns")

    monkeypatch.setattr(op, "_over_batches", no_pass)
    monkeypatch.setattr(op, "_apply", no_pass)
    got = op.matmat(torch.zeros(d, 0, dtype=D))
    assert got.shape == (d, 0) and got.dtype == D
    forms = op.quadratic_forms(torch.zeros(d, 0, dtype=D))
    assert forms.shape == (0,) and forms.dtype == torch.float64
    got = op.to_scipy().matmat(np.zeros((d, 0)))
    assert got.shape == (d, 0)
    assert op.num_matvecs == 0
