"""Products that need no second derivative of the model work where torch has none.

torch implements no derivative of ``aten::hardsigmoid_backward``, so the double-backward trick for
Jacobian products (and Pearlmutter's Hessian product) fails on any model with ``nn.Hardsigmoid``
(torchvision's MobileNetV3 uses it in every squeeze-excitation block). The GGN, the Monte-Carlo and
the empirical Fisher need only first derivatives of the model: their products, traces and
eigenvalues must equal dense float64 brute force. The Hessian is computed with Hardsigmoid as
``clamp(x + 3, 0, 6) / 6`` (the same function; its second derivative vanishes away from the kinks)
and checked against brute force of the model with that module swapped in.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvlab as cl
from tests.bruteforce import autograd_hessian

DT = torch.float64


class ClampHardsigmoid(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return (x + 3).clamp(0, 6) / 6


def _swapped(model: nn.Module) -> nn.Module:
    """A copy with every nn.Hardsigmoid replaced by its twice-differentiable formula."""
    other = copy.deepcopy(model)
    for name, m in list(other.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.Hardsigmoid):
                setattr(m, child_name, ClampHardsigmoid())
        del name
    return other


def _hard_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Hardswish(), nn.Linear(6, 5), nn.Hardsigmoid(), nn.Linear(5, 3)
    ).to(DT)


def _hard_data() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    X = 2.5 * torch.randn(9, 4, generator=g, dtype=DT)  # both kinks and both flat parts in use
    y = torch.randint(0, 3, (9,), generator=g)
    return [(X[:4], y[:4]), (X[4:5], y[4:5]), (X[5:], y[5:])]


class Brute:
    """Dense references over the parameters ``names`` of ``model`` (the rest held fixed)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, batches: list, names: list[str]):
        self.model, self.loss_fn, self.names = model, loss_fn, names
        self.X = torch.cat([b[0] for b in batches])
        self.y = torch.cat([b[1] for b in batches])
        params = dict(model.named_parameters())
        self.shapes = [params[n].shape for n in names]
        self.theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def out(self, theta: Tensor, model: nn.Module | None = None) -> Tensor:
        parts, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            parts[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(self.model if model is None else model, parts, (self.X,))

    def ggn(self) -> Tensor:
        out = self.out(self.theta).detach()
        J = jacrev(self.out)(self.theta).reshape(out.numel(), -1)
        H = autograd_hessian(lambda f: self.loss_fn(f.reshape(out.shape), self.y), out.reshape(-1))
        return J.T @ H @ J

    def empirical_fisher(self, y: Tensor | None = None) -> Tensor:
        """``(1/N) sum_n g_n g_n^T`` with ``g_n`` the gradient of example n's loss."""
        y = self.y if y is None else y
        none = nn.CrossEntropyLoss(reduction="none")
        N = self.X.shape[0]
        rows = jacrev(lambda t: none(self.out(t), y))(self.theta)  # (N, D)
        return rows.T @ rows / N

    def hessian(self) -> Tensor:
        swapped = _swapped(self.model)
        return autograd_hessian(lambda t: self.loss_fn(self.out(t, swapped), self.y), self.theta)

    def hessian_times(self, V: Tensor) -> Tensor:
        """``H V`` by double backward through the swapped model (a few columns)."""
        swapped = _swapped(self.model)
        t = self.theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(
            self.loss_fn(self.out(t, swapped), self.y), t, create_graph=True
        )
        cols = [torch.autograd.grad(grad, t, v, retain_graph=True)[0] for v in V.T]
        return torch.stack(cols, dim=1)


def _check(op: cl.CurvatureOperator, expected: Tensor) -> None:
    expected = expected.detach()
    scale = float(expected.abs().max())
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-6, atol=1e-10 * scale)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("batching", ["one", "three"])
def test_hardsigmoid_products_equal_bruteforce(batching: str, batched: bool) -> None:
    model, loss_fn, batches = _hard_net(), nn.CrossEntropyLoss(), _hard_data()
    if batching == "one":
        batches = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    data: Any = batches[0] if len(batches) == 1 else batches
    names = [n for n, _ in model.named_parameters()]
    brute = Brute(model, loss_fn, batches, names)
    ggn = cl.curvature_operator(model, loss_fn, data, matrix="ggn", batched=batched)
    _check(ggn, brute.ggn())
    assert "jacobian" in ggn.info and "hardsigmoid_backward" in ggn.info["jacobian"]
    _check(
        cl.curvature_operator(model, loss_fn, data, "empirical_fisher"), brute.empirical_fisher()
    )
    fisher = cl.curvature_operator(model, loss_fn, data, matrix="fisher", seed=3)
    drawn = torch.cat(fisher.sampled_targets)
    _check(fisher, brute.empirical_fisher(drawn))  # one label per example: w = e here
    hessian = cl.curvature_operator(model, loss_fn, data, matrix="hessian", batched=batched)
    _check(hessian, brute.hessian())
    assert "Hardsigmoid" in hessian.info["hessian"]


def test_hardsigmoid_traces_and_eigenvalues_equal_bruteforce() -> None:
    model, loss_fn, batches = _hard_net(), nn.CrossEntropyLoss(), _hard_data()
    names = [n for n, _ in model.named_parameters()]
    G = Brute(model, loss_fn, batches, names).ggn()
    tr = cl.trace(model, loss_fn, batches, matrix="ggn", method="exact")
    assert abs(tr.value - float(G.trace())) <= 1e-8 * float(G.trace())
    top = cl.eigenvalues(model, loss_fn, batches, matrix="ggn", k=2, tol=1e-10)
    expected = torch.linalg.eigvalsh(G).flip(0)[:2]
    torch.testing.assert_close(torch.as_tensor(top.values, dtype=DT), expected, rtol=1e-6, atol=0)
    H = Brute(model, loss_fn, batches, names).hessian()
    top_h = cl.eigenvalues(model, loss_fn, batches, matrix="hessian", k=1, tol=1e-10)
    assert abs(top_h.values[0] - float(torch.linalg.eigvalsh(H)[-1])) <= 1e-6 * float(H.abs().max())


def test_functional_hardsigmoid_hessian_is_a_clear_error() -> None:
    """Hardsigmoid called as a function cannot be swapped: the Hessian names the op and the fix."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(nn.functional.hardsigmoid(self.a(x)))

    torch.manual_seed(0)
    model = Net().to(DT)
    data = (torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,)))
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix="hessian")
    with pytest.raises(NotImplementedError, match=r"aten::hardsigmoid_backward.*matrix='ggn'"):
        op.matvec(torch.ones(op.shape[0], dtype=DT))


def test_mobilenet_v3_small_products_equal_bruteforce() -> None:
    """torchvision's MobileNetV3 (Hardswish, and Hardsigmoid in squeeze-excitation): the GGN,
    empirical Fisher and Hessian blocks of a squeeze-excitation layer against brute force."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 3, 32, 32, generator=g, dtype=DT)
    y = torch.tensor([0, 3, 1])
    loss_fn = nn.CrossEntropyLoss()
    prefix = "features.1.block.1"  # the first squeeze-excitation block (fc1, fc2)
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    brute = Brute(model, loss_fn, [(X, y)], names)
    V = torch.randn(brute.theta.numel(), 3, generator=g, dtype=DT)
    for matrix, expected in (
        ("ggn", brute.ggn() @ V),
        ("empirical_fisher", brute.empirical_fisher() @ V),
        ("hessian", brute.hessian_times(V)),
    ):
        op = cl.curvature_operator(model, loss_fn, (X, y), matrix=matrix, params=[prefix])
        assert op.names == names
        expected = expected.detach()
        scale = float(expected.abs().max())
        torch.testing.assert_close(op @ V, expected, rtol=1e-6, atol=1e-10 * scale)
