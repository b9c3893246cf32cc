"""Operator products on 16-bit models scale each vector before casting it to 16 bits.

Found in review: a product cast the vector to float16 as given, so ``A (c v) != c A v``:
``c = 1e-7`` gave products 31-40% off (entries flushed to zero), ``c = 1e4`` raised
``NonFiniteError`` for a product that fits; ``to_scipy`` raised a raw ``TypeError`` on bfloat16
and rounded float16 inputs. Now every column is scaled by a power of two (its largest entry in
``[0.5, 1)``) and the product scaled back, exactly.

The reference is the float64 GGN of a float64 copy of the same (exactly representable) 16-bit
parameters; the 16-bit forward and backward passes leave about 1e-2 relative between them.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import curvlab as cl
from tests.bruteforce import Dense


def _problem(
    dtype: torch.dtype,
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    X = torch.randn(8, 4, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    low = copy.deepcopy(model).to(dtype)
    ref = copy.deepcopy(low).double()  # the 16-bit values, exactly
    obj = SimpleNamespace(
        model=ref, loss_fn=nn.CrossEntropyLoss(), batches=[(X.to(dtype).double(), y)]
    )
    return low, (X.to(dtype), y), Dense(obj).ggn.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [1e-7, 1e-6, 1.0, 1e4])
def test_products_follow_the_vectors_scale(dtype: torch.dtype, c: float) -> None:
    model, data, G = _problem(dtype)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix="ggn")
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    out = op.matvec(c * v)
    assert out.dtype == torch.float32
    assert _rel(out / c, G @ v) < tol
    V = torch.stack([c * v, v, -v / c], dim=1)
    M = op.matmat(V)
    for j, scale in enumerate([c, 1.0, -1 / c]):
        assert _rel(M[:, j] / scale, G @ v) < tol
    forms = op.quadratic_forms(V)
    exact = float(v @ G @ v)
    for j, scale in enumerate([c, 1.0, -1 / c]):
        assert abs(float(forms[j]) / scale**2 - exact) < tol * abs(exact)
    raw, w = op.product_parts([t * c for t in op.unflatten(v).values()])
    assert _rel(torch.cat(raw) * w / c, G @ v) < tol
    as_dict = op.matvec({k: t * c for k, t in op.unflatten(v).items()})
    assert _rel(op.flatten(as_dict) / c, G @ v) < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_scipy_of_a_16_bit_model(dtype: torch.dtype) -> None:
    model, data, G = _problem(dtype)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix="ggn")
    S = op.to_scipy()  # bfloat16: a raw TypeError before
    assert S.dtype == np.float32
    v = np.random.default_rng(2).standard_normal(op.shape[0])
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    out = torch.as_tensor(S.matvec(v * 1e-6) / 1e-6)
    assert _rel(out, G @ torch.as_tensor(v, dtype=torch.float32)) < tol


def test_float32_models_are_unchanged() -> None:
    """No scaling where the model is not 16-bit: the vectors reach the products as given."""
    model, data, _ = _problem(torch.float32)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix="ggn")
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
    assert torch.equal(op.matvec(v), op.matmat(v[:, None])[:, 0])
    assert op.flatten(op.unflatten(v)).dtype == torch.float32


@pytest.mark.parametrize("c", [1e-5, 1e-7])
def test_small_float16_vectors(c: float) -> None:
    """A float16 vector with every entry below 2^-16: its scale factor does not fit float16
    (inf), so the scaling runs in float32 (found in the session's own review: a NonFiniteError
    for a product that the same vector in float32 gives)."""
    model, data, G = _problem(torch.float16)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix="ggn")
    v = (torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1)) * c).half()
    want = op.matvec(v.float())
    torch.testing.assert_close(op.matvec(v), want, rtol=0, atol=0)
    torch.testing.assert_close(op.matmat(v[:, None])[:, 0], want, rtol=0, atol=0)
    raw, w = op.product_parts(list(op.unflatten(v).values()))
    torch.testing.assert_close(torch.cat(raw) * w, want, rtol=1e-6, atol=0)
