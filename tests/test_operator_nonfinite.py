"""Operator products that come out NaN or inf are curvlab's ``NonFiniteError``.

With finite inputs and parameters a forward can still give NaN for one example (a ``log`` of a
negative feature) or overflow (a float32 ``exp``): every quantity raised ``NonFiniteError``, but
``curvature_operator(...) @ v`` handed back NaN (docs/conventions.md promises the error).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl


class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class _Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


def _nan_on_one_example() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(_Log(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.rand(4, 4, generator=g, dtype=torch.float64) + 0.1,
            torch.randint(0, 3, (4,), generator=g),
        )
        for _ in range(3)
    ]
    X = data[2][0].clone()
    X[1, 2] = -1.0  # log(-1): NaN for one example of the third batch
    data[2] = (X, data[2][1])
    return model, data


def _float32_overflow() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), _Exp(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 4, generator=g)
    X[3] *= 200.0  # exp overflows for that example
    return model, [(X, torch.randint(0, 3, (6,), generator=g))]


@pytest.mark.parametrize("make", [_nan_on_one_example, _float32_overflow], ids=["nan", "overflow"])
@pytest.mark.parametrize("matrix", ["hessian", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("product", ["matvec", "matmat", "quadratic_forms", "product_parts"])
def test_non_finite_products_are_an_error(make, matrix: str, product: str) -> None:  # type: ignore[no-untyped-def]
    model, data = make()
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix=matrix)
    D = op.shape[1]
    V = torch.ones(D, 2, dtype=op.dtype)
    call = {
        "matvec": lambda: op @ V[:, 0],
        "matmat": lambda: op @ V,
        "quadratic_forms": lambda: op.quadratic_forms(V),
        "product_parts": lambda: op.product_parts(
            list(V[:, 0].split([p.numel() for p in model.parameters()]))
        ),
    }[product]
    with pytest.raises(cl.NonFiniteError, match="operator's product is not finite"):
        call()


def test_finite_products_are_unchanged() -> None:
    """The check is a check only: on finite data the product equals the dense Hessian's."""
    model, data = _nan_on_one_example()
    data = data[:2]  # the two finite batches
    loss_fn = nn.CrossEntropyLoss()
    op = cl.curvature_operator(model, loss_fn, data, matrix="hessian")
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def total(flat: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n in names:
            k = params[n].numel()
            ps[n] = flat[i : i + k].reshape(params[n].shape)
            i += k
        X = torch.cat([b[0] for b in data])
        y = torch.cat([b[1] for b in data])
        return loss_fn(torch.func.functional_call(model, ps, (X,)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    H = torch.autograd.functional.hessian(total, flat)
    v = torch.randn(flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
