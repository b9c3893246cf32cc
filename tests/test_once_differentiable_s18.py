"""Second-order products through a custom ``autograd.Function`` whose backward is marked
``@once_differentiable`` (review s18).

torch computes such a backward under ``no_grad`` and hangs a ``DelayedError`` off a detached copy
of its result; ``torch.autograd.grad(..., inputs=params)`` prunes that node, so a double backward
through it raised nothing and dropped its part: the Hessian's eigenvalues came out 0.0666, 0.0525
for 0.3986, 0.3428, and the GGN's ``J v`` raised torch's "appears to not have been used in the
graph" (or came out wrong where part of the output bypasses the Function). Now the Hessian and
the residual are refused naming the Function; the GGN (and the Fishers) take ``J v`` in forward
mode where the Function defines ``jvp`` (exact: the backward itself gives ``J^T`` exactly), and
are refused naming it where it does not. A custom Function with a differentiable backward is
accepted and exact, as before. Brute force: ``torch.func`` on the same function written with
torch operations, float64.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import curvlab as cl

CE = nn.CrossEntropyLoss()
TOL = 1e-12
"""Float64 products of O(1) entries summed over 32 examples x 3 classes: rounding about 1e-15;
the wrong products differed by O(0.1)."""


class _OnceIdentity(torch.autograd.Function):
    """The identity, its backward marked ``@once_differentiable`` (old style: ``ctx`` in
    ``forward``, no ``jvp``)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g


class _OnceTanh(torch.autograd.Function):
    """``tanh``, its backward marked ``@once_differentiable``, with ``jvp`` and
    ``setup_context`` (what ``torch.func.jvp`` needs)."""

    @staticmethod
    def forward(x):  # noqa: ANN001, ANN205
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: ANN001, ANN205
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):  # noqa: ANN001, ANN205
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


_times_three = once_differentiable(lambda ctx, g: 3 * g)


class _HelperOnce(torch.autograd.Function):
    """``3 x``: its backward is not marked, but calls a ``@once_differentiable`` helper (found
    only by the ``DelayedError`` the helper leaves in the kept gradient)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return 3 * x

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return _times_three(ctx, g)


class _Tanh(torch.autograd.Function):
    """``tanh`` with an ordinary backward that torch differentiates again."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def _wrapped(fn):  # noqa: ANN001, ANN202
    """A decorator above ``@once_differentiable`` (as ``torch.amp.custom_bwd`` is)."""

    @functools.wraps(fn)
    def inner(*args):  # noqa: ANN002, ANN202
        return fn(*args)

    return inner


class _WrappedOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    @_wrapped
    @once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g


class Net(nn.Module):
    """``f(tanh(lin(x)))`` (``f`` a custom Function; ``"tanh"``: ``f(lin(x))``, ``f`` a tanh),
    plus ``lin2(x)`` where ``bypass``: part of the output that does not pass through ``f``."""

    def __init__(self, fn: type, tanh: bool = False, bypass: bool = False) -> None:
        super().__init__()
        self.fn, self.tanh = fn, tanh
        self.lin = nn.Linear(4, 3)
        self.lin2 = nn.Linear(4, 3) if bypass else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        out = self.fn.apply(h if self.tanh else torch.tanh(h))
        return out if self.lin2 is None else out + self.lin2(x)


def _setup(fn: type, tanh: bool = False, bypass: bool = False, n: int = 32):
    torch.manual_seed(0)
    model = Net(fn, tanh, bypass).double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, X, y


def _outputs(model: Net, X: torch.Tensor):  # noqa: ANN202
    """The model's output as a function of its flat parameters, in torch operations."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def out(flat: torch.Tensor) -> torch.Tensor:
        p, i = {}, 0
        for name, shape in zip(names, shapes):
            p[name] = flat[i : i + shape.numel()].view(shape)
            i += shape.numel()
        z = torch.tanh(X @ p["lin.weight"].T + p["lin.bias"])
        if model.lin2 is not None:
            z = z + X @ p["lin2.weight"].T + p["lin2.bias"]
        return z

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out, flat


def _dense_hessian(model: Net, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out, flat = _outputs(model, X)
    return torch.func.hessian(lambda v: CE(out(v), y))(flat)


def _dense_ggn(model: Net, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out, flat = _outputs(model, X)
    J = torch.func.jacrev(out)(flat).reshape(-1, flat.numel())
    z = out(flat).detach().reshape(-1)
    L = torch.func.hessian(lambda t: CE(t.view(-1, 3), y))(z)
    return J.T @ L @ J


# ---------------------------------------------------------------- refused: Hessian and residual
@pytest.mark.parametrize("matrix", ["hessian", "residual"])
def test_hessian_and_residual_refused_naming_the_function(matrix):
    """They were silently wrong (eigenvalues 0.0666, 0.0525 for 0.3986, 0.3428): refused at
    construction, before any product, naming the Function and the way out."""
    model, X, y = _setup(_OnceIdentity)
    with pytest.raises(NotImplementedError, match=r"'_OnceIdentity'.*@once_differentiable") as e:
        cl.curvature_operator(model, CE, (X, y), matrix=matrix)
    assert "jvp and setup_context" in str(e.value) and "method='exact'" in str(e.value)


def test_hessian_refused_at_the_first_product_of_several_batches():
    """Graphs not kept (several batches): refused at the first product, never a number."""
    model, X, y = _setup(_OnceTanh, tanh=True)
    op = cl.curvature_operator(model, CE, [(X[:16], y[:16]), (X[16:], y[16:])])
    with pytest.raises(NotImplementedError, match=r"'_OnceTanh'.*@once_differentiable"):
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))


def test_eigenvalues_refused_where_they_were_wrong():
    """The lead's case: the top Hessian eigenvalues came out 0.0666, 0.0525; exact 0.3986..."""
    model, X, y = _setup(_OnceIdentity)
    exact = torch.linalg.eigvalsh(_dense_hessian(model, X, y)).flip(0)[:2]
    assert exact[0] > 0.3  # (the brute force is the function the refused numbers missed)
    with pytest.raises(NotImplementedError, match="'_OnceIdentity'"):
        cl.eigenvalues(model, CE, (X, y), k=2)


def test_a_once_differentiable_helper_inside_a_backward_is_refused_too():
    """A backward not marked itself, calling a marked helper: the DelayedError it leaves in
    the kept gradient refuses the Hessian (it was silently wrong)."""
    model, X, y = _setup(_HelperOnce)
    with pytest.raises(
        NotImplementedError, match="backward calls a function marked @once_differentiable"
    ):
        cl.curvature_operator(model, CE, (X, y))


# ---------------------------------------------------------------- GGN: exact or refused
@pytest.mark.parametrize("matrix", ["ggn", "fisher", "empirical_fisher"])
def test_ggn_refused_without_jvp_naming_the_function(matrix):
    """No jvp: no exact J v (torch's 'appears to not have been used in the graph' before, or
    a wrong J v where part of the output bypasses the Function)."""
    model, X, y = _setup(_OnceIdentity, bypass=True)
    with pytest.raises(NotImplementedError, match=r"'_OnceIdentity'.*jvp and setup_context"):
        cl.curvature_operator(model, CE, (X, y), matrix=matrix)


@pytest.mark.parametrize("bypass", [False, True])
def test_ggn_exact_in_forward_mode_where_the_function_has_jvp(bypass):
    model, X, y = _setup(_OnceTanh, tanh=True, bypass=bypass)
    op = cl.curvature_operator(model, CE, (X, y), matrix="ggn")
    torch.testing.assert_close(op.to_dense(), _dense_ggn(model, X, y), rtol=0, atol=TOL)
    assert "@once_differentiable" in op.info["jacobian"]  # (J v in forward mode, said)
    with pytest.raises(NotImplementedError, match="'_OnceTanh'"):  # the Hessian is not
        cl.curvature_operator(model, CE, (X, y), matrix="hessian")


# ---------------------------------------------------------------- an ordinary Function
@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_a_differentiable_custom_function_stays_accepted_and_exact(matrix):
    model, X, y = _setup(_Tanh, tanh=True, bypass=True)
    op = cl.curvature_operator(model, CE, (X, y), matrix=matrix)
    assert "jacobian" not in op.info  # the double-backward trick, as before
    want = _dense_hessian(model, X, y) if matrix == "hessian" else _dense_ggn(model, X, y)
    torch.testing.assert_close(op.to_dense(), want, rtol=0, atol=TOL)


# ---------------------------------------------------------------- the graph walk
def test_the_walk_finds_marked_backwards_only():
    from curvlab._graph import has_delayed_error, once_differentiable_functions

    x = torch.ones(3, 3, dtype=torch.float64, requires_grad=True)
    marked = _WrappedOnce.apply(_Tanh.apply(_OnceIdentity.apply(x))).sum()
    assert once_differentiable_functions(marked) == [_WrappedOnce, _OnceIdentity]
    assert once_differentiable_functions(_Tanh.apply(x).sum()) == []
    (g,) = torch.autograd.grad((_OnceIdentity.apply(x) ** 2).sum(), x, create_graph=True)
    assert has_delayed_error(g)
    (g,) = torch.autograd.grad((_Tanh.apply(x) ** 2).sum(), x, create_graph=True)
    assert not has_delayed_error(g)


def test_ggn_refused_where_a_backward_calls_a_marked_helper():
    """Found by the kept J^T u's DelayedError; forward mode needs the Function's jvp."""
    model, X, y = _setup(_HelperOnce)
    with pytest.raises(NotImplementedError, match=r"calls a function marked.*'_HelperOnce'"):
        cl.curvature_operator(model, CE, (X, y), matrix="ggn")


class _Backbone(nn.Module):
    """``head(f(tanh(body(x))))``, ``f`` marked ``@once_differentiable``: the head's block of
    the Hessian never runs ``f``'s backward."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_OnceIdentity.apply(torch.tanh(self.body(x))))


def test_a_function_before_no_selected_parameter_is_accepted():
    """``params="head"``: the Hessian block of the head is exact (autograd prunes the
    Function's backward), so it is not refused; the whole Hessian is."""
    torch.manual_seed(0)
    model = _Backbone().double()
    _, X, y = _setup(_OnceIdentity)
    with pytest.raises(NotImplementedError, match="'_OnceIdentity'"):
        cl.curvature_operator(model, CE, (X, y))
    op = cl.curvature_operator(model, CE, (X, y), params="head")
    z = torch.tanh(model.body(X)).detach()
    w0 = torch.cat([model.head.weight.detach().reshape(-1), model.head.bias.detach()])

    def loss(w: torch.Tensor) -> torch.Tensor:
        return CE(z @ w[:9].view(3, 3).T + w[9:], y)

    torch.testing.assert_close(op.to_dense(), torch.func.hessian(loss)(w0), rtol=0, atol=TOL)
