"""Review s10: penalties that could not be differentiated returned 0 or torch's raw errors, and
an operator whose parameter was frozen after it was built raised autograd's raw error."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvlab as cl
from curvlab.regularizers import (
    fisher_penalty,
    gradient_penalty,
    input_gradient_penalty,
    random_label_penalty,
)


def _setup():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def _brute_gp(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    grads = torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))
    return float(sum(g.pow(2).sum() for g in grads))


def test_penalty_of_an_output_from_copied_parameters_is_refused():
    """Found in review: output=functional_call(model, copies of the parameters, X) gave 0.0 where
    0.63 was the value (the gradient with respect to model.parameters() was all None)."""
    model, loss_fn, X, y = _setup()
    copies = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    calls = {
        "gradient": lambda out: gradient_penalty(model, loss_fn, X, y, output=out),
        "fisher": lambda out: fisher_penalty(model, loss_fn, X, output=out, seed=0),
        "random": lambda out: random_label_penalty(model, loss_fn, X, output=out, seed=0),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match="does not reach any trainable parameter"):
            call(functional_call(model, copies, (X,)))
    # the model's own parameters through functional_call: reached, and the value is exact
    own = functional_call(model, dict(model.named_parameters()), (X,))
    value = gradient_penalty(model, loss_fn, X, y, output=own)
    expected = _brute_gp(model, loss_fn, X, y)
    assert expected > 0.1
    assert value.item() == pytest.approx(expected, rel=1e-10)


def _penalties(model, loss_fn, y):
    return {
        "fisher": lambda x: fisher_penalty(model, loss_fn, x, seed=0),
        "gradient": lambda x: gradient_penalty(model, loss_fn, x, y),
        "random": lambda x: random_label_penalty(model, loss_fn, x, seed=0),
        "input": lambda x: input_gradient_penalty(model, loss_fn, x, y),
    }


def test_penalties_inside_torch_func_transforms_are_refused():
    """Found in review: inside torch.func.grad / grad_and_value every penalty's value was 0 and
    its gradient 0 (outside: 0.12 and 0.63, with gradients of norm 0.08 and 0.14)."""
    model, loss_fn, X, y = _setup()
    for f in _penalties(model, loss_fn, y).values():
        for transform in (torch.func.grad, torch.func.grad_and_value):
            with pytest.raises(RuntimeError, match="torch.func transform"):
                transform(f)(X)
    copies = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}

    def total(params):
        out = functional_call(model, params, (X,))
        return loss_fn(out, y) + gradient_penalty(model, loss_fn, X, y, output=out)

    with pytest.raises(RuntimeError, match="torch.func transform"):
        torch.func.grad(total)(copies)
    # outside the transform: the value and its input gradient are the brute-force ones
    x = X.clone().requires_grad_(True)
    value = gradient_penalty(model, loss_fn, x, y)
    assert value.item() == pytest.approx(_brute_gp(model, loss_fn, X, y), rel=1e-10)
    assert torch.autograd.grad(value, x)[0].norm() > 0


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_penalties_with_gradients_disabled_name_the_cause(mode):
    """Found in review: under torch.no_grad(), fisher_penalty(output=None) told the caller to pass
    output=None, and input_gradient_penalty raised autograd's 'element 0 of tensors does not
    require grad'."""
    model, loss_fn, X, y = _setup()
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    out = model(X)  # a differentiable output, passed to a penalty called with grad disabled
    for f in _penalties(model, loss_fn, y).values():
        with context(), pytest.raises(RuntimeError, match="gradients disabled"):
            f(X)
    with context(), pytest.raises(RuntimeError, match="gradients disabled"):
        gradient_penalty(model, loss_fn, X, y, output=out)
    # with gradients enabled again: the brute-force value
    value = gradient_penalty(model, loss_fn, X, y)
    assert value.item() == pytest.approx(_brute_gp(model, loss_fn, X, y), rel=1e-10)


def _brute_hessian(model, loss_fn, X, y):
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss(theta):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(functional_call(model, parts, (X,)), y)

    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("keep_graph", [None, True, False])
def test_operator_refuses_a_parameter_frozen_after_it_was_built(keep_graph):
    """Found in review: the next product raised autograd's 'One of the differentiated Tensors
    does not require grad'."""
    model, loss_fn, X, y = _setup()
    op = cl.curvature_operator(model, loss_fn, (X, y), keep_graph=keep_graph)
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H = _brute_hessian(model, loss_fn, X, y)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-9, atol=1e-11)
    model[0].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="requires_grad changed.*0.weight"):
        op @ v
    model[0].weight.requires_grad_(True)  # as built again: the products are exact again
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-9, atol=1e-11)
