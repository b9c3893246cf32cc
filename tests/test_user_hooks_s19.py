"""The user's module hooks in curvlab's passes (review s19, reviewer G).

* A forward hook of the user's on ``nn.Hardsigmoid`` or on the ``weight_norm`` parametrization
  module is part of the model: the Hessian keeps it (the twice-differentiable substitutes run
  first, the user's hook acts on their output).
* A forward hook of the user's that changes a Linear layer's output (per module, with keywords,
  or global) is downstream of the layer: kfac, the hooks backend and the noise samplers' capture
  read the layer's own output, and the gradient there goes through the hook.
* A module backward (pre-)hook of the user's changes the gradient, not the loss: it is off in
  every curvlab pass (as the parameters' gradient hooks are), put back after.

Every reference is dense float64 brute force with ``torch.func``, on the function written out.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap
from torch.nn.utils import parametrizations

import curvlab as cl

# float64 sums of a few dozen terms of size O(1): a relative error above this is a wrong number
TOL = 1e-10


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _flat(d: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def _split(theta: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    sizes = [s.numel() for s in shapes]
    return [t.view(s) for t, s in zip(torch.split(theta, sizes), shapes)]


def _theta(model: nn.Module) -> tuple[Tensor, list[str], list[torch.Size]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    return theta, [n for n, _ in named], [p.shape for _, p in named]


def _mlp(act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).double().eval()


def _data(n: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 2, (n,), generator=g)


def _ggn(out: Callable[[Tensor], Tensor], theta: Tensor, y: Tensor) -> Tensor:
    """``J^T H_out J`` of the mean cross-entropy."""
    o = out(theta)
    jac = jacrev(lambda t: out(t).reshape(-1))(theta)
    h = hessian(lambda z: F.cross_entropy(z.view_as(o), y))(o.detach().reshape(-1))
    return jac.T @ h @ jac


def _empirical_fisher_diag(out: Callable[[Tensor, Tensor], Tensor], theta: Tensor, x, y) -> Tensor:
    """``(1/N) sum_n g_n^2``, ``g_n`` the gradient of example ``n``'s loss."""

    def one(xn: Tensor, yn: Tensor) -> Tensor:
        return jacrev(lambda t: F.cross_entropy(out(t, xn[None]), yn[None]))(theta)

    g = vmap(one)(x, y)
    return (g**2).mean(0)


# ---------------------------------------------------------------- 1. Hessian substitutes


@pytest.mark.parametrize("kind", ["module", "global"])
def test_hessian_keeps_a_forward_hook_on_hardsigmoid(kind):
    torch.manual_seed(0)
    model = _mlp(nn.Hardsigmoid())
    act = model[1]
    if kind == "module":  # activation steering
        handle = act.register_forward_hook(lambda m, i, o: 3.0 * o)
    else:  # torch runs global forward hooks before the module's own
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: 3.0 * o if m is act else None
        )
    x, y = _data(6)
    loss_fn = nn.CrossEntropyLoss()
    theta, _, shapes = _theta(model)

    def loss(t: Tensor) -> Tensor:
        w0, b0, w2, b2 = _split(t, shapes)
        h = 3.0 * (F.linear(x, w0, b0) + 3).clamp(0, 6) / 6
        return F.cross_entropy(F.linear(h, w2, b2), y)

    try:
        with torch.no_grad():
            assert float(loss_fn(model(x), y)) == pytest.approx(float(loss(theta)), rel=1e-14)
        h_ref = hessian(loss)(theta)
        v = torch.randn(theta.numel(), dtype=torch.float64)
        op = cl.curvature_operator(model, loss_fn, (x, y))
        assert _rel(op.matvec(v), h_ref @ v) < TOL  # was 0.61 (the hook's 3x dropped)
        got = cl.trace(model, loss_fn, (x, y), method="exact").value
        assert got == pytest.approx(float(h_ref.trace()), rel=TOL)  # was 0.8668 for 2.6988
        assert len(act._forward_hooks) == (kind == "module")  # the user's hook alone, as before
    finally:
        handle.remove()


def test_hessian_keeps_a_forward_hook_on_the_weight_norm_parametrization():
    torch.manual_seed(0)
    model = _mlp(nn.Tanh())
    parametrizations.weight_norm(model[0])
    wn = model[0].parametrizations.weight[0]
    handle = wn.register_forward_hook(lambda m, args, out: 0.5 * out)
    x, y = _data(6)
    loss_fn = nn.CrossEntropyLoss()
    theta, names, shapes = _theta(model)

    def loss(t: Tensor) -> Tensor:
        p = dict(zip(names, _split(t, shapes)))
        g, v = p["0.parametrizations.weight.original0"], p["0.parametrizations.weight.original1"]
        w = 0.5 * g * v / v.norm(dim=1, keepdim=True)
        h = torch.tanh(F.linear(x, w, p["0.bias"]))
        return F.cross_entropy(F.linear(h, p["2.weight"], p["2.bias"]), y)

    try:
        with torch.no_grad():
            assert float(loss_fn(model(x), y)) == pytest.approx(float(loss(theta)), rel=1e-14)
        h_ref = hessian(loss)(theta)
        got = cl.trace(model, loss_fn, (x, y), method="exact").value
        assert got == pytest.approx(float(h_ref.trace()), rel=TOL)  # was 0.1947 for 0.6458
        diag = _flat(cl.diag_hessian(model, loss_fn, (x, y)), names)
        assert _rel(diag, h_ref.diag()) < TOL
    finally:
        handle.remove()


# ---------------------------------------------------------------- 2. layer taps


def _hooked(kind: str, layer: nn.Module) -> object:
    """Register the user's hook ``z -> 2 z + 0.1`` on ``layer``'s output; its handle."""
    if kind == "module":
        return layer.register_forward_hook(lambda m, i, o: 2 * o + 0.1)
    if kind == "kwargs":
        return layer.register_forward_hook(lambda m, a, k, o: 2 * o + 0.1, with_kwargs=True)
    assert kind == "global"
    return nn.modules.module.register_module_forward_hook(
        lambda m, i, o: 2 * o + 0.1 if m is layer else None
    )


def _hooked_out(shapes: list[torch.Size]) -> Callable[[Tensor, Tensor], Tensor]:
    """The hooked model written out: ``Linear -> (2 z + 0.1) -> tanh -> Linear``."""

    def out(t: Tensor, x: Tensor) -> Tensor:
        w0, b0, w2, b2 = _split(t, shapes)
        return F.linear(torch.tanh(2 * F.linear(x, w0, b0) + 0.1), w2, b2)

    return out


HOOK_KINDS = ["module", "kwargs", "global"]


def _tables(model: nn.Module) -> list[tuple[int, ...]]:
    """The keys of the model's forward hook tables and of the global ones (left as they were)."""
    glob = nn.modules.module
    keys = [tuple(m._forward_hooks) for m in model.modules()]
    return keys + [tuple(glob._global_forward_hooks), tuple(glob._global_forward_hooks_with_kwargs)]


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_kfac_reads_the_layer_output_before_a_forward_hook(kind):
    torch.manual_seed(0)
    model = _mlp(nn.Tanh())
    x, y = _data(1)  # one example: K-FAC's exact block is the GGN block
    theta, _, shapes = _theta(model)
    out = _hooked_out(shapes)
    ggn = _ggn(lambda t: out(t, x), theta, y)[:12, :12]  # 0.weight (4 x 3, row-major)
    handle = _hooked(kind, model[0])
    try:
        with torch.no_grad():
            assert torch.allclose(model(x), out(theta, x), rtol=1e-14, atol=0)
        tables = _tables(model)
        f = cl.kfac(model, nn.CrossEntropyLoss(), (x, y), kind="exact")["0"]
        assert _rel(torch.kron(f.G, f.A), ggn) < TOL  # was 0.75 (G of the hooked output)
        assert _tables(model) == tables
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_hooks_backend_reads_the_layer_output_before_a_forward_hook(kind):
    torch.manual_seed(0)
    model = _mlp(nn.Tanh())
    x, y = _data(6)
    theta, names, shapes = _theta(model)
    want = _empirical_fisher_diag(_hooked_out(shapes), theta, x, y)
    handle = _hooked(kind, model[0])
    try:
        tables = _tables(model)
        got = cl.diag_fisher(model, nn.CrossEntropyLoss(), (x, y), backend="hooks")
        assert _rel(_flat(got, names), want) < TOL  # 0.weight was 0.25x
        assert _tables(model) == tables
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_noise_capture_reads_the_layer_output_before_a_forward_hook(kind):
    torch.manual_seed(0)
    model = _mlp(nn.Tanh())
    x, y = _data(6)
    loss_fn = nn.CrossEntropyLoss()
    theta, names, shapes = _theta(model)
    want = _empirical_fisher_diag(_hooked_out(shapes), theta, x, y)
    handle = _hooked(kind, model[0])
    try:
        sampler = cl.noise.DiagFisherNoise(kind="empirical", scale=1.0)
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)
        noisy = cl.noise.NoisyOptimizer(sgd, sampler, model, loss_fn, seed=0)

        def closure() -> Tensor:
            noisy.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        tables = _tables(model)
        noisy.step(closure)
        state = noisy.state_dict()["sampler_state"]
        assert _rel(_flat(state, names), want) < TOL  # 0.weight was 0.25x
        assert _tables(model) == tables
    finally:
        handle.remove()


# ---------------------------------------------------------------- 3. module backward hooks


def _backward_hook(kind: str, model: nn.Sequential) -> tuple[object, list[int]]:
    """A gradient-scaling module backward hook of the user's on the last Linear; its handle and
    the list each of its calls appends to."""
    calls: list[int] = []
    if kind == "pre":

        def pre(m: nn.Module, gout: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            calls.append(1)
            return (2 * gout[0],)

        return model[2].register_full_backward_pre_hook(pre), calls

    def post(m: nn.Module, gin: tuple[Tensor, ...], gout: tuple[Tensor, ...]) -> tuple:
        calls.append(1)
        return (3 * gin[0],)

    return model[2].register_full_backward_hook(post), calls


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_module_backward_hooks_are_off_in_curvlab_passes(kind):
    torch.manual_seed(0)
    model = _mlp(nn.Tanh())
    x, y = _data(6)
    loss_fn = nn.CrossEntropyLoss()
    theta, names, shapes = _theta(model)

    def out(t: Tensor, xs: Tensor) -> Tensor:
        w0, b0, w2, b2 = _split(t, shapes)
        return F.linear(torch.tanh(F.linear(xs, w0, b0)), w2, b2)

    def loss(t: Tensor) -> Tensor:
        return F.cross_entropy(out(t, x), y)

    h_ref = hessian(loss)(theta)
    ggn = _ggn(lambda t: out(t, x), theta, y)
    ef = _empirical_fisher_diag(out, theta, x, y)
    grad = jacrev(loss)(theta)
    v = torch.randn(theta.numel(), dtype=torch.float64)
    handle, calls = _backward_hook(kind, model)
    try:
        op = cl.curvature_operator(model, loss_fn, (x, y), matrix="ggn")
        assert _rel(op.matvec(v), ggn @ v) < TOL  # was 3.0 off
        got = cl.diag_fisher(model, loss_fn, (x, y))  # empirical: was 3.0 off
        assert _rel(_flat(got, names), ef) < TOL
        assert _rel(_flat(cl.diag_hessian(model, loss_fn, (x, y)), names), h_ref.diag()) < TOL
        stats = cl.gradient_stats(model, loss_fn, (x, y))
        assert _rel(_flat(stats.mean, names), grad) < TOL  # was 1.0 off
        top = cl.eigenvalues(model, loss_fn, (x, y), tol=1e-10).values[0]
        assert float(top) == pytest.approx(float(torch.linalg.eigvalsh(h_ref)[-1]), rel=1e-8)
        assert not calls  # never called in curvlab's passes
        loss_fn(model(x), y).backward()  # the user's own backward: the hook is back
        assert calls
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_noise_capture_measures_the_loss_under_a_module_backward_hook(kind):
    # the step's own backward runs the user's hook (their gradients, their business); the
    # sampler's curvature is the loss's: the capture hands the step to the separate pass
    torch.manual_seed(0)
    model = _mlp(nn.Tanh())
    x, y = _data(6)
    loss_fn = nn.CrossEntropyLoss()
    theta, names, shapes = _theta(model)

    def out(t: Tensor, xs: Tensor) -> Tensor:
        w0, b0, w2, b2 = _split(t, shapes)
        return F.linear(torch.tanh(F.linear(xs, w0, b0)), w2, b2)

    want = _empirical_fisher_diag(out, theta, x, y)
    handle, calls = _backward_hook(kind, model)
    try:
        sampler = cl.noise.DiagFisherNoise(kind="empirical", scale=1.0)
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)
        noisy = cl.noise.NoisyOptimizer(sgd, sampler, model, loss_fn, seed=0)

        def closure() -> Tensor:
            noisy.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        noisy.step(closure)
        assert calls  # the user's step ran it
        state = noisy.state_dict()["sampler_state"]
        assert _rel(_flat(state, names), want) < TOL  # was 4x ("pre") under the hook
    finally:
        handle.remove()
