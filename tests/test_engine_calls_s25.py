"""Review s25, RX3-1 and RX3-3: which calls inside a forward pass make the per-example quantities
refuse a model (:class:`curvlab._notrace.EngineCalls`), checked against dense float64 brute force
(per-example gradients by a loop over the examples with plain autograd).

- A forward that differentiates with **forward-mode** AD (``torch.autograd.forward_ad``'s
  ``dual_level``/``make_dual``/``unpack_dual``: a physics-informed network's directional
  derivative ``du/dx``) puts its parameters into the loss through the tangent's graph as the
  reverse-mode case does; it was not seen, and the hooks gave wrong numbers without a word
  (``diag_fisher`` 0.29210 for 0.14521, ``trace(matrix="empirical_fisher", method="exact")``
  2.10763 for 1.83246). It is refused by name now, the whole-batch quantities exact.
  ``torch.func.jvp``/``jacfwd`` in a forward stay exact (or are handed over / refused by the
  backends' own checks, as before).
- A forward that takes a derivative **without** ``create_graph`` (a trainable head on the input
  gradient of a frozen potential) builds no graph the loss depends on: its per-example
  quantities are exact, and were refused by the first EngineCalls (review s25's working tree).
  With ``create_graph=True``, by keyword or by position, it is still refused.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

import curvlab as cl
from curvlab._differentiating_forward import DifferentiatingForwardError
from tests.test_input_grad_models_s25 import REFUSED

DT = torch.float64
EPS = torch.finfo(DT).eps
MSE = nn.MSELoss()
N = 6


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))


class _DualPINN(_Net):
    """``u(x)`` and its directional derivative along ``1`` by dual numbers."""

    def forward(self, x: Tensor) -> Tensor:
        with fwAD.dual_level():
            out = fwAD.unpack_dual(self.net(fwAD.make_dual(x, torch.ones_like(x))))
            return torch.cat([out.primal, out.tangent], 1)


class _FuncJVP(_Net):
    def forward(self, x: Tensor) -> Tensor:
        u, du = torch.func.jvp(self.net, (x,), (torch.ones_like(x),))
        return torch.cat([u, du], 1)


class _FuncJacfwd(_Net):
    def forward(self, x: Tensor) -> Tensor:
        jac = torch.func.vmap(torch.func.jacfwd(self.net))(x)
        return torch.cat([self.net(x), jac.reshape(x.shape[0], -1)], 1)


class _Saliency(nn.Module):
    """A trainable head on the input gradient of a frozen potential (no ``create_graph``)."""

    def __init__(self, how: str = "grad") -> None:
        super().__init__()
        self.how = how
        self.pot = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).requires_grad_(False)
        self.head = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            energy = self.pot(xx).sum()
            if self.how == "grad":
                (f,) = torch.autograd.grad(energy, xx)
            elif self.how == "grad_positional_false":
                (f,) = torch.autograd.grad(energy, xx, None, None, False)
            elif self.how == "backward":
                energy.backward()
                f = xx.grad
            else:  # "autograd_backward"
                torch.autograd.backward(energy, None, None, False)
                f = xx.grad
        return self.head(f)


class _GraphHead(_Saliency):
    """The same with ``create_graph=True`` passed by position: refused."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.pot.requires_grad_(True)

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            energy = self.pot(xx).sum()
            if self.how == "grad":
                (f,) = torch.autograd.grad(energy, xx, None, None, True)
            elif self.how == "backward":
                energy.backward(None, None, True)
                f = xx.grad
            else:
                torch.autograd.backward(energy, None, None, True)
                f = xx.grad
        return self.head(f)


def _data(outputs: int, n: int = N) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g, dtype=DT), torch.randn(n, outputs, generator=g, dtype=DT)


def _per_example(model: nn.Module, X: Tensor, y: Tensor) -> tuple[list[str], Tensor]:
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    ps = [p for _, p in named]
    rows = []
    for i in range(X.shape[0]):
        loss = F.mse_loss(model(X[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)]))
    return [k for k, _ in named], torch.stack(rows)


def _flat(d: Any, names: list[str]) -> Tensor:
    return torch.cat([d[k].reshape(-1) for k in names])


def _close(got: Tensor, want: Tensor) -> None:
    assert torch.allclose(got, want, rtol=1e3 * EPS, atol=1e3 * EPS), (got - want).abs().max()


def _quiet(fn: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# --------------------------------------------------------------------- forward-mode AD (RX3-1)


@pytest.mark.parametrize("name", list(REFUSED))
def test_forward_mode_ad_refused_by_name(name: str) -> None:
    torch.manual_seed(0)
    model = _DualPINN().to(DT)
    X, y = _data(2)
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    # was: diag_fisher entry 0.29210 for 0.14521, gradient_stats mean off by 0.0141, kfac
    # factors, BackPACK's raw NotImplementedError
    with pytest.raises(DifferentiatingForwardError, match="forward_ad.make_dual") as err:
        _quiet(lambda: REFUSED[name](model, X, y))
    assert "matrix='hessian'" in str(err.value) and "forward-mode" in str(err.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_forward_mode_ad_whole_batch_trace_exact() -> None:
    torch.manual_seed(0)
    model = _DualPINN().to(DT)
    X, y = _data(2)
    _, G = _per_example(model, X, y)
    want = float(G.square().mean(0).sum())  # 1.83246; was 2.10763 (the hooks' one-pass diagonal)
    res = _quiet(lambda: cl.trace(model, MSE, (X, y), matrix="empirical_fisher", method="exact"))
    assert abs(res.value - want) <= 1e3 * EPS * want


@pytest.mark.parametrize(("kind", "outputs"), [(_FuncJVP, 2), (_FuncJacfwd, 3)])
def test_torch_func_forward_mode_stays_exact(kind: type[nn.Module], outputs: int) -> None:
    """``torch.func.jvp``/``jacfwd`` in a forward: not refused by the engine watch; ``auto``
    computes them exactly (the hooks hand them over), as before."""
    torch.manual_seed(0)
    model = kind().to(DT)
    X, y = _data(outputs)
    names, G = _per_example(model, X, y)
    d = _quiet(lambda: cl.diag_fisher(model, MSE, (X, y)))
    _close(_flat(d, names), G.square().mean(0))
    s = _quiet(lambda: cl.gradient_stats(model, MSE, (X, y)))
    _close(_flat(s.mean, names), G.mean(0))


# --------------------------------------------------------------------- no graph built (RX3-3)


@pytest.mark.parametrize("how", ["grad", "grad_positional_false", "backward", "autograd_backward"])
def test_derivative_without_graph_is_exact(how: str) -> None:
    torch.manual_seed(0)
    model = _Saliency(how).to(DT)
    X, y = _data(3)
    names, G = _per_example(model, X, y)
    # was (s25 working tree): DifferentiatingForwardError; HEAD and now exact
    for backend in ("auto", "hooks", "backpack", "func"):
        d = _quiet(lambda backend=backend: cl.diag_fisher(model, MSE, (X, y), backend=backend))
        _close(_flat(d, names), G.square().mean(0))
    s = _quiet(lambda: cl.gradient_stats(model, MSE, (X, y)))
    _close(_flat(s.mean, names), G.mean(0))
    k = _quiet(lambda: cl.kfac(model, MSE, (X, y), kind="empirical"))
    assert set(k) == {"head"}
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("how", ["grad", "backward", "autograd_backward"])
def test_create_graph_by_position_refused(how: str) -> None:
    torch.manual_seed(0)
    model = _GraphHead(how).to(DT)
    X, y = _data(3)
    with pytest.raises(DifferentiatingForwardError, match="forward pass differentiates"):
        _quiet(lambda: cl.diag_fisher(model, MSE, (X, y)))
    assert all(p.grad is None for p in model.parameters())


def test_forward_mode_ad_noisy_optimizer_refused() -> None:
    """``NoisyOptimizer`` with a per-example sampler on a dual-number forward: refused by name,
    the parameters untouched (was: the hooks' per-example noise, without a word)."""
    torch.manual_seed(0)
    model = _DualPINN().to(DT)
    X, y = _data(2)
    before = [p.detach().clone() for p in model.parameters()]
    for sampler in (
        cl.noise.DiagFisherNoise(kind="empirical", scale=1.0),
        cl.noise.FisherTraceNoise(kind="mc", scale=1.0),
        cl.noise.KFACNoise(kind="empirical", scale=1.0),
    ):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        noisy = cl.noise.NoisyOptimizer(opt, sampler, model, MSE, seed=0)

        def closure(noisy: cl.noise.NoisyOptimizer = noisy) -> Tensor:
            noisy.zero_grad()
            loss = MSE(model(X), y)
            loss.backward()
            return loss

        with pytest.raises(DifferentiatingForwardError, match="forward_ad.make_dual"):
            _quiet(lambda noisy=noisy, closure=closure: noisy.step(closure))
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        model.zero_grad(set_to_none=True)
