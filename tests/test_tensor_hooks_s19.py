"""Tensor hooks of the user's registered inside the model's forward pass (review s19, reviewer R).

A gradient-reversal or gradient-scaling layer written as ``h.register_hook(lambda g: -g)`` in
``forward`` changes the gradient, not the loss. curvlab computes the curvature of the loss: such a
hook is off in every curvlab pass (as the user's hooks on parameters and module backward hooks
are), stays on in the user's own backward passes, and sends the noise capture of a training step
to its separate pass. ``torch.Tensor``'s methods are put back after every call.

Every reference is dense float64 brute force with ``torch.func``, on the function written out
without the hook.
"""

from __future__ import annotations

import functools
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap

import curvlab as cl

# float64 sums of a few dozen terms of size O(1): a relative error above this is a wrong number
TOL = 1e-10

REGISTER = torch.Tensor.register_hook
POST = torch.Tensor.register_post_accumulate_grad_hook


class _Grl(nn.Module):
    """``Linear(3, 4) -> tanh -> Linear(4, 2)`` whose forward registers a gradient hook of the
    user's: on the hidden activation (``"reverse"``: ``-2 g``, a gradient-reversal layer of coefficient 2; ``"partial"``: ``torch.mul(g,
    3.0)`` through ``functools.partial``) or on the first weight (``"parameter"``: ``3 * g``,
    the one of the last forward pass with gradients). ``calls`` counts the hook's calls."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.kind = kind
        self.calls: list[int] = []
        self.handles: list[object] = []

    def _count(self, g: Tensor, factor: float) -> Tensor:
        self.calls.append(1)
        return factor * g

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l1(x))
        if self.kind == "reverse" and h.requires_grad:
            h.register_hook(lambda g: self._count(g, -2.0))
        elif self.kind == "partial" and h.requires_grad:
            self.calls.append(1)  # (counted when registered: torch.mul cannot count)
            h.register_hook(functools.partial(torch.mul, other=3.0))
        elif self.kind == "parameter" and torch.is_grad_enabled():  # this forward's alone
            for handle in self.handles:
                handle.remove()
            self.handles = [self.l1.weight.register_hook(lambda g: self._count(g, 3.0))]
        return self.l2(h)


def _model(kind: str) -> _Grl:
    torch.manual_seed(0)
    return _Grl(kind).double().eval()


def _data(n: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 2, (n,), generator=g)


def _theta(model: nn.Module) -> tuple[Tensor, list[str], list[torch.Size]]:
    named = list(model.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    return theta, [n for n, _ in named], [p.shape for _, p in named]


def _out(shapes: list[torch.Size]):
    """The model's function of the flat parameters, written out (no hook)."""

    def out(t: Tensor, x: Tensor) -> Tensor:
        w1, b1, w2, b2 = (
            v.view(s) for v, s in zip(torch.split(t, [s.numel() for s in shapes]), shapes)
        )
        return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)

    return out


def _flat(d: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _empirical_fisher(out, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``(1/N) sum_n g_n g_n^T``, ``g_n`` the gradient of example ``n``'s loss."""

    def one(xn: Tensor, yn: Tensor) -> Tensor:
        return jacrev(lambda t: F.cross_entropy(out(t, xn[None]), yn[None]))(theta)

    g = vmap(one)(x, y)
    return g.T @ g / len(x)


@pytest.mark.parametrize("kind", ["reverse", "partial", "parameter"])
def test_a_gradient_hook_made_in_forward_is_off_in_curvlab_passes(kind):
    model = _model(kind)
    x, y = _data(6)
    loss_fn = nn.CrossEntropyLoss()
    theta, names, shapes = _theta(model)
    out = _out(shapes)

    def loss(t: Tensor) -> Tensor:
        return F.cross_entropy(out(t, x), y)

    h = hessian(loss)(theta)
    grad = jacrev(loss)(theta)
    ef = _empirical_fisher(out, theta, x, y)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    try:
        tr = cl.trace(model, loss_fn, (x, y), matrix="hessian", method="exact").value
        assert float(tr) == pytest.approx(float(h.trace()), rel=TOL)  # 9.27 for 1.94 (x3)
        stats = cl.gradient_stats(model, loss_fn, (x, y))
        assert _rel(_flat(stats.mean, names), grad) < TOL  # -2x / 3x below the hook
        diag = cl.diag_fisher(model, loss_fn, (x, y), kind="empirical")
        assert _rel(_flat(diag, names), ef.diag()) < TOL
        op = cl.curvature_operator(model, loss_fn, (x, y), matrix="hessian")
        assert _rel(op.matvec(v), h @ v) < TOL
        top = cl.eigenvalues(model, loss_fn, (x, y), tol=1e-10).values[0]
        assert float(top) == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-8)
        if kind != "partial":
            assert not model.calls  # never called in curvlab's passes
        # the user's own backward pass keeps the hook
        model.calls.clear()
        model.zero_grad()
        loss_fn(model(x), y).backward()
        assert model.calls
        factor = {"reverse": -2.0, "partial": 3.0, "parameter": 3.0}[kind]
        assert _rel(model.l1.weight.grad.reshape(-1), factor * grad[:12]) < TOL
    finally:
        for handle in model.handles:
            handle.remove()
    assert torch.Tensor.register_hook is REGISTER
    assert torch.Tensor.register_post_accumulate_grad_hook is POST


def test_the_methods_are_put_back_when_the_forward_raises():
    class Raises(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.l(x)
            h.register_hook(lambda g: 2 * g)
            raise RuntimeError("the model's own error")

    x, y = _data(4)
    with pytest.raises(RuntimeError, match="the model's own error"):
        cl.gradient_stats(Raises().double(), nn.CrossEntropyLoss(), (x, y))
    assert torch.Tensor.register_hook is REGISTER
    assert torch.Tensor.register_post_accumulate_grad_hook is POST


def test_watches_nest_and_leave_other_threads_and_torch_alone():
    from curvlab._notrace import TensorHookWatch, tensor_hooks_off

    x = torch.ones(2, requires_grad=True)
    fired: list[str] = []
    with tensor_hooks_off() as outer:
        with tensor_hooks_off() as inner:
            x.register_hook(lambda g: fired.append("inner") or g)
        record = TensorHookWatch(off=False).start()
        x.register_hook(lambda g: fired.append("recorded") or g)
        record.stop()
        handles = []  # another thread registers its own hook meanwhile: kept
        t = threading.Thread(target=lambda: handles.append(x.register_hook(lambda g: g * 1.0)))
        t.start()
        t.join()
        # torch's own machinery keeps its hooks (register_multi_grad_hook: torch.autograd.graph)
        multi = torch.autograd.graph.register_multi_grad_hook([x], lambda g: fired.append("torch"))
        x.register_hook(lambda g: fired.append("outer") or g)
    assert torch.Tensor.register_hook is REGISTER
    assert len(inner.seen) == 1 and len(record.seen) == 1 and len(outer.seen) == 1
    assert "test_tensor_hooks_s19" in outer.seen[0]
    (2 * x).sum().backward()
    assert sorted(fired) == ["recorded", "torch"]
    assert x.grad.tolist() == [2.0, 2.0]
    multi.remove()
    for handle in handles:
        handle.remove()


def _closure(noisy, model, loss_fn, x, y):
    def closure() -> Tensor:
        noisy.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("kind", ["reverse", "partial"])
def test_noise_capture_measures_the_loss_under_a_gradient_hook_made_in_forward(kind):
    # the step's own backward runs the user's hook (their gradients, their business); the
    # sampler's curvature is the loss's: the capture hands the step to the separate pass
    model = _model(kind)
    x, y = _data(6)
    loss_fn = nn.CrossEntropyLoss()
    theta, names, shapes = _theta(model)
    want = _empirical_fisher(_out(shapes), theta, x, y).diag()
    sampler = cl.noise.DiagFisherNoise(kind="empirical", scale=1.0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    noisy = cl.noise.NoisyOptimizer(sgd, sampler, model, loss_fn, seed=0)
    noisy.step(_closure(noisy, model, loss_fn, x, y))
    assert model.calls  # the user's step ran it
    state = noisy.state_dict()["sampler_state"]
    assert _rel(_flat(state, names), want) < TOL  # l1's entries were 4x / 9x
    assert torch.Tensor.register_hook is REGISTER


def test_full_fisher_fold_noise_is_the_loss_fisher_under_a_gradient_hook_made_in_forward():
    model = _model("partial")
    x, y = _data(6)
    loss_fn = nn.CrossEntropyLoss()
    theta, _, shapes = _theta(model)
    fisher = _empirical_fisher(_out(shapes), theta, x, y)
    model.zero_grad()
    loss_fn(model(x), y).backward()  # the user's own gradient, under the hook
    user = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    noisy = cl.noise.NoisyOptimizer(
        sgd, cl.noise.FullFisherNoise("empirical", scale=1.0), model, loss_fn, seed=0
    )
    closure = _closure(noisy, model, loss_fn, x, y)
    k = 100
    squares = torch.empty(k, dtype=torch.float64)
    for i in range(k):
        noisy.step(closure)
        eps = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) - user
        squares[i] = eps @ eps
    # E|eps|^2 = Tr(F) (scale 1): the noise's, not the hooked gradient's
    mean, se = squares.mean(), squares.std() / k**0.5
    assert abs(float(mean - fisher.trace())) < 5 * float(se), (
        float(mean),
        float(fisher.trace()),
    )


class _Scaled(nn.Module):
    """``Linear -> Tanh -> (a hook 3 * g made in forward) -> Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.hook = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if h.requires_grad and self.hook:
            h.register_hook(lambda g: 3 * g)
        return self.l2(h)


def test_a_gradient_hook_made_in_forward_is_off_under_a_forced_backpack():
    """BackPACK's session called the module itself, not call_model: its empirical Fisher was 9x
    under a hook 3 * g (found in review s19). Against per-example torch.func gradients."""
    torch.manual_seed(0)
    model = _Scaled().double().eval()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    loss = nn.CrossEntropyLoss()
    params = {k: v.detach() for k, v in model.named_parameters()}
    model.hook = False
    g = torch.func.vmap(
        torch.func.grad(
            lambda p, x, t: loss(torch.func.functional_call(model, p, (x[None],)), t[None])
        ),
        in_dims=(None, 0, 0),
    )(params, X, y)
    model.hook = True
    got = cl.diag_fisher(model, loss, (X, y), kind="empirical", backend="backpack")
    assert got.backend == "backpack"
    for name, value in got.items():
        want = (g[name] ** 2).mean(0)
        assert torch.allclose(value, want, rtol=1e-10, atol=1e-16), name
