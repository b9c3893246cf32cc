"""The penalties compute alpha * ||grad_theta L||^2 of the loss itself, with the user's hooks on
parameters and module backward hooks off in their passes (docs/conventions.md), and the user's
own backward still applies them once (review s20: the value 0.5667 / 0.5954 / 2.1220 for
0.235782 under x3 hooks, and with ``every > 1`` a parameter hook applied twice to the gradient)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab.regularizers as R

ALPHA = 0.7
# float64 on a 31-parameter model: the value and gradient are sums of a few hundred rounded
# products of entries of order 1 (unit roundoff 1.1e-16); 1e-10 is far above that and far below
# the smallest hooked error (a factor 3 on some entries)
TOL = 1e-10


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    return X, torch.tensor([0, 2, 1, 1, 0])


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _brute(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """alpha * ||grad L||^2 and its gradient, by torch.func on detached copies (no hooks)."""
    X, y = _data()
    names = [n for n, _ in model.named_parameters()]
    flat = tuple(p.detach().clone() for p in model.parameters())
    ce = nn.CrossEntropyLoss()

    def loss(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(names, ps)), (X,))
        return ce(out, y)

    def penalty(*ps: torch.Tensor) -> torch.Tensor:
        g = torch.func.grad(loss, argnums=tuple(range(len(ps))))(*ps)
        return ALPHA * sum((gi**2).sum() for gi in g)

    value = penalty(*flat)
    grads = torch.func.grad(penalty, argnums=tuple(range(len(flat))))(*flat)
    return value, list(grads)


def _param_hook(m: nn.Sequential) -> list:
    return [m[0].weight.register_hook(lambda g: 3 * g)]


def _full_backward_hook(m: nn.Sequential) -> list:
    return [m[1].register_full_backward_hook(lambda mod, gi, go: (3 * gi[0],))]


def _backward_pre_hook(m: nn.Sequential) -> list:
    return [m[2].register_full_backward_pre_hook(lambda mod, go: (3 * go[0],))]


def _global_backward_hook(m: nn.Sequential) -> list:
    def hook(mod, gi, go):
        return (3 * gi[0],) if isinstance(mod, nn.Tanh) else None

    return [nn.modules.module.register_module_full_backward_hook(hook)]


HOOKS = {
    "param": _param_hook,
    "full_backward": _full_backward_hook,
    "backward_pre": _backward_pre_hook,
    "global_backward": _global_backward_hook,
}


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_penalty_value_and_gradient_ignore_user_hooks(hook: str, given: bool, every: int) -> None:
    X, y = _data()
    model = _model()
    value, grads = _brute(model)
    handles = HOOKS[hook](model)
    try:
        pen = R.GradientNormPenalty(model, nn.CrossEntropyLoss(), "gradient", ALPHA, every)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on full backward hooks of no input
            out = model(X) if given else None
            for _ in range(2):  # a recomputation, then (every=3) a cached surrogate
                model.zero_grad(set_to_none=True)
                term = pen(X, y, output=out if given else None)
                term.backward()  # the user's backward of the penalty term alone
                torch.testing.assert_close(term.detach(), value, rtol=TOL, atol=0)
                for (name, p), g in zip(model.named_parameters(), grads):
                    # the user's parameter hook acts once, in the user's own backward
                    want = 3 * g if hook == "param" and name == "0.weight" else g
                    torch.testing.assert_close(p.grad, want, rtol=TOL, atol=TOL * 1e-2)
                if given:
                    out = model(X)
    finally:
        for h in handles:
            h.remove()


def test_tensor_hook_registered_in_forward_is_off_in_own_forward() -> None:
    """A gradient-reversal tensor hook of the model's forward: output=None is the loss's."""

    class Scale(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            if h.requires_grad:
                h.register_hook(lambda g: -3 * g)
            return h

    X, y = _data()
    model = _model()
    value, grads = _brute(model)
    hooked = nn.Sequential(model[0], model[1], Scale(), model[2])
    for every in (1, 3):
        pen = R.GradientNormPenalty(hooked, nn.CrossEntropyLoss(), "gradient", ALPHA, every)
        hooked.zero_grad(set_to_none=True)
        term = pen(X, y)
        term.backward()
        torch.testing.assert_close(term.detach(), value, rtol=TOL, atol=0)
        for p, g in zip(hooked.parameters(), grads):
            torch.testing.assert_close(p.grad, g, rtol=TOL, atol=TOL * 1e-2)


def test_user_step_applies_parameter_hook_once() -> None:
    """(loss + penalty).backward(): the hooked weight's .grad is 3 * (grad L + grad P)."""
    X, y = _data()
    model = _model()
    ce = nn.CrossEntropyLoss()
    _, grads = _brute(model)
    plain = [g.detach() for g in torch.autograd.grad(ce(model(X), y), list(model.parameters()))]
    _param_hook(model)
    for every in (1, 3):
        pen = R.GradientNormPenalty(model, ce, "gradient", ALPHA, every)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            out = model(X)
            (ce(out, y) + pen(X, y, output=out)).backward()
            torch.testing.assert_close(
                model[0].weight.grad, 3 * (plain[0] + grads[0]), rtol=TOL, atol=0
            )
            torch.testing.assert_close(model[2].bias.grad, plain[3] + grads[3], rtol=TOL, atol=0)


@pytest.mark.parametrize("hook", ["full_backward", "backward_pre", "global_backward"])
def test_input_gradient_penalty_ignores_module_backward_hooks(hook: str) -> None:
    X, y = _data()
    model = _model()
    ce = nn.CrossEntropyLoss()

    def gpx(x: torch.Tensor) -> torch.Tensor:  # alpha * (1/B) sum_i ||d l_i / d x_i||^2
        gx = torch.func.grad(
            lambda z: (
                ce(torch.func.functional_call(model, dict(model.named_parameters()), (z,)), y)
                * len(z)
            )
        )(x)
        return ALPHA * (gx**2).sum() / len(x)

    want = gpx(X).detach()
    handles = HOOKS[hook](model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = R.input_gradient_penalty(model, ce, X, y, alpha=ALPHA)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got.detach(), want, rtol=TOL, atol=0)


def test_hooked_output_that_is_not_the_models_is_refused_naming_the_hook() -> None:
    """output= of a hooked model is recomputed; a transformed one is refused, naming the hook."""
    X, y = _data()
    model = _model()
    handles = _full_backward_hook(model)
    try:
        with pytest.raises(ValueError, match="backward hook on module '1'"):
            R.gradient_penalty(model, nn.CrossEntropyLoss(), X, y, output=model(X) / 2)
    finally:
        for h in handles:
            h.remove()
