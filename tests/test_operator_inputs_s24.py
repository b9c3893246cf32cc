"""Review s24 (what operators and estimators are handed, and what user operators hand back).

Found in review:

* a NaN or inf in the caller's vector was blamed on the model and the data after the product
  had run (``NonFiniteError``: "the model's output, loss or their derivatives are not finite
  ... use float64"), through ``matvec``, ``matmat``, ``quadratic_forms`` and ``to_scipy()``;
* ``CurvatureOperator.flatten(list)`` zipped the list with the operator's parameters: four
  tensors for an operator on two were cut to the first two (``op @ flatten(list)`` off by 0.14),
  and ``unflatten`` of a wrong-length vector raised torch's raw ``split_with_sizes`` error;
* the estimators did not check a user ``matmat``'s result: one written in place on its input
  gave a Hutchinson trace of 21.7 for 8.0 (Hutch++ -3219, Lanczos 57.2 marked converged), one
  answering a ``(D, 1)`` product that broadcasts gave 0.37, a NumPy result raw torch errors;
* ``TensorOperator`` accepted a non-symmetric matrix (Lanczos top-2 ``[2.12, 1.19]`` marked
  converged for a ``randn`` matrix whose eigenvalues are complex);
* ``params=3`` raised the raw "'int' object is not iterable", ``params=b"0"`` was read byte by
  byte.

Every reference is dense float64, computed here with torch.func.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import curvlab as cl
from curvlab._finite import NonFiniteError
from curvlab.estimators import (
    TensorOperator,
    exact_trace,
    hutchinson,
    hutchpp,
    lanczos_eigenvalues,
    slq,
)

DT = torch.float64
EPS = torch.finfo(DT).eps


def _problem(widths: tuple[int, ...] = (3, 4, 3), n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).double()
    X = torch.randn(n, widths[0], generator=gen, dtype=DT)
    y = torch.randint(0, widths[-1], (n,), generator=gen)
    return model, nn.CrossEntropyLoss(), X, y


def _dense_hessian(model, loss_fn, X, y, names) -> torch.Tensor:
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    others = {n: p.detach() for n, p in params.items() if n not in names}

    def loss(v: torch.Tensor) -> torch.Tensor:
        d = dict(others)
        for n, t, s in zip(names, v.split(sizes), shapes):
            d[n] = t.reshape(s)
        return loss_fn(functional_call(model, d, (X,)), y)

    return hessian(loss)(flat)


def _tol(H: torch.Tensor, v: torch.Tensor) -> float:
    """Rounding of a float64 product: a few hundred ulps of ``|H| |v|`` (two backward passes
    against one dense product, each summing at most a few dozen terms)."""
    return 256 * EPS * float((H.abs() @ v.abs()).max())


# --------------------------------------------------------------------------- 1: NaN in the vector
def test_a_non_finite_vector_is_named_not_the_model() -> None:
    model, loss_fn, X, y = _problem()
    op = cl.curvature_operator(model, loss_fn, (X, y))
    H = _dense_hessian(model, loss_fn, X, y, op.names)
    D = op.shape[0]
    ones = torch.ones(D, dtype=DT)
    assert torch.allclose(op.matvec(ones), H @ ones, rtol=0, atol=_tol(H, ones))
    v = ones.clone()
    v[3] = float("nan")  # row 3: '0.weight' (4 x 3), index (1, 0)
    calls = {
        "matvec": lambda: op.matvec(v),
        "matmat": lambda: op.matmat(v[:, None]),
        "quadratic_forms": lambda: op.quadratic_forms(v[:, None]),
        "to_scipy": lambda: op.to_scipy().matvec(v.numpy()),
        "product_parts": lambda: op.product_parts(list(v.split([s.numel() for s in op.shapes]))),
        "dict": lambda: op.matvec(op.unflatten(v)),
    }
    for call in calls.values():
        with pytest.raises(
            ValueError,
            match=r"vector is not finite: entry 3 \(parameter '0.weight', index \(1, 0\)\) is nan",
        ):
            call()
    V = torch.ones(D, 3, dtype=DT)
    V[20, 2] = float("inf")  # row 20: '2.weight' (3 x 4) starts at 16, index (1, 0)
    with pytest.raises(
        ValueError, match=r"entry \[20, 2\] \(parameter '2.weight', index \(1, 0\)\) is inf"
    ):
        op.matmat(V)
    Vc = torch.ones(D, 2, dtype=torch.complex128)
    Vc[7, 1] = complex(0.0, float("nan"))
    with pytest.raises(ValueError, match=r"entry \[7, 1\]"):
        op.matmat(Vc)
    # the operator still works, and the model is not blamed for a finite vector's product
    assert torch.allclose(op.matvec(ones), H @ ones, rtol=0, atol=_tol(H, ones))


def test_a_vector_beyond_the_operators_dtype_is_named() -> None:
    model, loss_fn, X, y = _problem()
    op = cl.curvature_operator(model.float(), loss_fn, (X.float(), y))
    v = torch.ones(op.shape[0], dtype=DT)
    v[9] = 1e300  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"does not fit the operator's dtype float32: entry 9"):
        op.matvec(v)
    with pytest.raises(ValueError, match=r"does not fit the operator's dtype float32: entry 9"):
        op.matmat(v[:, None])


class _Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().sqrt()  # infinite derivative at 0


def test_a_non_finite_product_of_a_finite_vector_still_blames_the_model() -> None:
    """A unit whose pre-activation is exactly 0: a finite loss, an infinite derivative."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Sqrt(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.0
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=gen)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(NonFiniteError, match="model's output"):
        op.matvec(torch.ones(op.shape[0], dtype=DT))


# --------------------------------------------------------------------------- 2: flatten / unflatten
def test_flatten_refuses_a_list_of_another_length() -> None:
    model, loss_fn, X, y = _problem((4, 4, 4), n=8)
    op = cl.curvature_operator(model, loss_fn, (X, y), params="2")  # the last layer only
    assert op.names == ["2.weight", "2.bias"]
    tensors = [p.detach() for p in model.parameters()]  # all four: layer 0's come first
    with pytest.raises(ValueError, match=r"2 \(\['2.weight', '2.bias'\]\), got 4"):
        op.flatten(tensors)
    with pytest.raises(ValueError, match="got 1"):
        op.flatten(tensors[:1])
    with pytest.raises(ValueError, match="'2.weight' has shape"):
        op.flatten([tensors[2].T[:, :3], tensors[3]])
    with pytest.raises(TypeError, match="one tensor of shape"):
        op.flatten(torch.ones(op.shape[0], dtype=DT))
    # the right list: the product is the dense Hessian's block
    H = _dense_hessian(model, loss_fn, X, y, op.names)
    v = op.flatten(tensors[2:])
    assert torch.equal(v, torch.cat([tensors[2].reshape(-1), tensors[3]]))
    assert torch.allclose(op @ v, H @ v, rtol=0, atol=_tol(H, v))


def test_unflatten_refuses_a_vector_of_another_length() -> None:
    model, loss_fn, X, y = _problem()
    op = cl.curvature_operator(model, loss_fn, (X, y))
    for bad in (torch.ones(5), torch.ones(op.shape[0] + 1), torch.ones(op.shape[0], 2, 2)):
        with pytest.raises(ValueError, match=rf"shape \({op.shape[0]},\)"):
            op.unflatten(bad)
    parts = op.unflatten(torch.arange(op.shape[0] * 2, dtype=DT).reshape(-1, 2))
    assert parts["0.weight"].shape == (4, 3, 2) and parts["2.bias"].shape == (3, 2)


# --------------------------------------------------------------------------- 3: user operators
D8 = torch.linspace(-1.0, 3.0, 8, dtype=DT)  # diag(D8): trace 8, top eigenvalue 3


class _Diag:
    shape, dtype, device = (8, 8), DT, torch.device("cpu")

    def __init__(self, product) -> None:
        self.product = product

    def matmat(self, V: torch.Tensor):
        return self.product(V)


def _estimates(op) -> dict:
    return {
        "hutchinson": lambda: hutchinson(op, num_probes=30, seed=0),
        "hutchinson one by one": lambda: hutchinson(op, num_probes=4, seed=0, batch_size=1),
        "hutchpp": lambda: hutchpp(op, num_matvecs=30, seed=0),
        "exact_trace": lambda: exact_trace(op),
        "lanczos": lambda: lanczos_eigenvalues(op, k=1, seed=0),
        "slq": lambda: slq(op, num_steps=8, seed=0),
    }


def test_a_correct_user_operator_gives_the_exact_numbers() -> None:
    op = _Diag(lambda V: D8[:, None] * V)
    assert exact_trace(op).value == pytest.approx(8.0, rel=8 * EPS)
    assert hutchpp(op, num_matvecs=30, seed=0).value == pytest.approx(8.0, rel=1e-12)
    top = lanczos_eigenvalues(op, k=1, seed=0, tol=1e-10)
    assert top.converged and top.values[0] == pytest.approx(3.0, rel=1e-9)


def _in_place_through_data(V: torch.Tensor) -> torch.Tensor:
    V.data.mul_(D8[:, None])  # no version bump
    return V


@pytest.mark.parametrize(
    ("product", "error", "match"),
    [
        (lambda V: V.mul_(D8[:, None]), ValueError, "modified its input V in place"),
        (_in_place_through_data, ValueError, "returned V itself or a view of it"),
        (lambda V: V, ValueError, "returned V itself"),
        (lambda V: D8[:, None] * V[:, :1], ValueError, r"shape \(8, 1\) for V of shape \(8, "),
        (lambda V: (D8[:, None] * V).sum(1), ValueError, r"returned a tensor of shape \(8,\)"),
        (lambda V: (D8[:, None] * V).numpy(), TypeError, "_Diag.matmat returned a ndarray"),
    ],
    ids=["in place", "through .data", "identity", "one column", "vector", "numpy"],
)
def test_a_user_operator_that_breaks_the_protocol_is_refused(product, error, match) -> None:
    for name, estimate in _estimates(_Diag(product)).items():
        if match.startswith("shape") and name in ("hutchinson one by one", "lanczos", "slq"):
            continue  # a (D, 1) block: the one-column product is right there
        with pytest.raises(error, match=match):
            estimate()


def test_a_result_that_requires_grad_is_taken_detached() -> None:
    op = _Diag(lambda V: (D8[:, None] * V).requires_grad_())
    assert lanczos_eigenvalues(op, k=1, seed=0, tol=1e-10).values[0] == pytest.approx(3.0, rel=1e-9)
    assert slq(op, num_steps=8, seed=0).nodes.max() == pytest.approx(3.0, rel=1e-9)


def test_curvlab_operators_pass_the_checks() -> None:
    model, loss_fn, X, y = _problem()
    op = cl.curvature_operator(model, loss_fn, (X, y))
    H = _dense_hessian(model, loss_fn, X, y, op.names)
    # D diagonal entries, each within the rounding of one product
    bound = H.shape[0] * _tol(H, torch.ones(H.shape[0], dtype=DT))
    assert exact_trace(op).value == pytest.approx(float(torch.trace(H)), abs=bound)
    top = lanczos_eigenvalues(op, k=1, seed=0, tol=1e-9)
    assert top.values[0] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)


# --------------------------------------------------------------------------- 4: TensorOperator
def test_tensor_operator_refuses_a_non_symmetric_matrix() -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=gen, dtype=DT)
    with pytest.raises(ValueError, match=r"not symmetric.*\(A \+ A.T\) / 2"):
        TensorOperator(A)
    TensorOperator((A + A.T) / 2)  # exactly symmetric


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensor_operator_takes_the_rounding_of_symmetric_products(dtype) -> None:
    """Products whose exact value is symmetric (B B^T, Q diag(l) Q^T, a Gram matrix of many
    samples) round their (i, j) and (j, i) entries apart by up to about max(D, sqrt(n)) eps ||A||
    (n the inner dimension); they are accepted, a gap ten times the tolerance above is not."""
    gen = torch.Generator().manual_seed(1)
    D = 64
    B = torch.randn(D, 3 * D, generator=gen, dtype=dtype)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=dtype))
    lam = torch.linspace(-2.0, 5.0, D, dtype=dtype)
    samples = torch.randn(2**16, 3, generator=gen, dtype=dtype) + 0.5
    for A in (B @ B.T, (Q * lam) @ Q.T, Q @ torch.diag(lam) @ Q.T, samples.T @ samples):
        TensorOperator(A)
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    tol = 2 * max(D, 256) * torch.finfo(dtype).eps * float(torch.linalg.matrix_norm(A.double()))
    E = torch.zeros_like(A)
    E[0, 1] = 10 * tol
    with pytest.raises(ValueError, match="not symmetric"):
        TensorOperator(A + E)
    E[0, 1] = tol / 10
    TensorOperator(A + E)


def test_tensor_operator_leaves_a_non_finite_matrix_to_its_products() -> None:
    A = torch.eye(4, dtype=DT)
    A[1, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        exact_trace(TensorOperator(A))


# --------------------------------------------------------------------------- 5: params=
@pytest.mark.parametrize(("params", "name"), [(3, "int"), (3.0, "float"), (b"0", "bytes")])
def test_params_of_a_non_iterable_or_bytes_is_refused(params, name) -> None:
    model, loss_fn, X, y = _problem()
    with pytest.raises(TypeError, match=rf"params entries must be names .*got {name}"):
        cl.curvature_operator(model, loss_fn, (X, y), params=params)
    assert cl.curvature_operator(model, loss_fn, (X, y), params="0").names == ["0.weight", "0.bias"]


def test_a_subclass_matmat_of_complex_vectors_runs_once() -> None:
    """``matmat`` of a complex ``V`` splits it into real columns without going through the
    subclass's ``matmat`` again (a damping ``A + I/2`` was added twice to the real parts)."""
    model, loss_fn, X, y = _problem()
    base = type(cl.curvature_operator(model, loss_fn, (X, y)))

    class Damped(base):  # type: ignore[misc, valid-type]
        def matmat(self, V: torch.Tensor) -> torch.Tensor:
            return super().matmat(V) + 0.5 * V

    op = cl.curvature_operator(model, loss_fn, (X, y))
    op.__class__ = Damped
    H = _dense_hessian(model, loss_fn, X, y, op.names) + 0.5 * torch.eye(op.shape[0], dtype=DT)
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(op.shape[0], 2, generator=gen, dtype=torch.complex128)
    tol = _tol(H, V.real.abs() + V.imag.abs())
    assert torch.allclose(op.matmat(V), H.to(V.dtype) @ V, rtol=0, atol=tol)


class _Buffered:
    """A user operator writing every product into one buffer of its own (``out=``), as a
    preallocating operator does: the estimators must own what they keep."""

    def __init__(self) -> None:
        self.A = torch.diag(D8)
        self.shape = self.A.shape
        self.dtype, self.device = DT, torch.device("cpu")
        self.buf: torch.Tensor | None = None

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.buf is None or self.buf.shape != V.shape:
            self.buf = torch.empty_like(V)
        return torch.matmul(self.A, V, out=self.buf)


def test_an_operator_writing_into_its_own_buffer_gives_the_exact_numbers() -> None:
    # review s24 regressions: Lanczos adopted the buffer as a basis vector and the next product
    # overwrote it (21.6 for 3.0 before the checks; a wrong-culprit refusal after them)
    top = lanczos_eigenvalues(_Buffered(), k=2, seed=0, tol=1e-10)
    assert top.converged
    torch.testing.assert_close(top.values, torch.tensor([3.0, D8.sort().values[-2]], dtype=DT))
    assert slq(_Buffered(), num_steps=8, seed=0).nodes.max() == pytest.approx(3.0, rel=1e-9)
    assert hutchpp(_Buffered(), num_matvecs=30, seed=0).value == pytest.approx(8.0, rel=1e-12)
