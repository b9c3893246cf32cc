"""Brute-force references via torch.func on tiny problems (tests only, never the package).

Everything here builds dense d x d matrices of the objective L = loss_fn(model(X), y) on all the
data at once, independently of curvlab's conventions module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from tests.problems import Problem


def param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def param_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}


def flat(model: nn.Module) -> Tensor:
    return torch.cat(
        [p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad]
    )


def unflatten(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, shape in param_shapes(model).items():
        k = shape.numel()
        out[n] = theta[i : i + k].reshape(shape)
        i += k
    return out


def split_diag(model: nn.Module, diag: Tensor) -> dict[str, Tensor]:
    """A flat vector (e.g. a matrix diagonal) as a dict keyed like the parameters."""
    return unflatten(model, diag)


def blocks(model: nn.Module) -> dict[str, slice]:
    out, i = {}, 0
    for n, shape in param_shapes(model).items():
        out[n] = slice(i, i + shape.numel())
        i += shape.numel()
    return out


def _out(model: nn.Module, theta: Tensor, X: Tensor) -> Tensor:
    return functional_call(model, unflatten(model, theta), (X,))


def objective(p: Problem, theta: Tensor | None = None) -> Tensor:
    theta = flat(p.model) if theta is None else theta
    return p.loss_fn(_out(p.model, theta, p.X), p.y)


def dense_hessian(p: Problem) -> Tensor:
    return hessian(lambda t: objective(p, t))(flat(p.model))


def dense_ggn(p: Problem) -> Tensor:
    """J^T (d^2 L / d f^2) J with J the Jacobian of all outputs."""
    theta = flat(p.model)
    f = _out(p.model, theta, p.X)
    J = jacrev(lambda t: _out(p.model, t, p.X))(theta).reshape(f.numel(), -1)
    H_f = hessian(lambda out: p.loss_fn(out, p.y))(f.detach()).reshape(f.numel(), f.numel())
    return J.T @ H_f @ J


def terms_per_example(p: Problem) -> int:
    f = p.model(p.X[:1])
    return 1 if isinstance(p.loss_fn, nn.CrossEntropyLoss) else f[0].numel()


def per_example_grads(p: Problem) -> Tensor:
    """g_n = grad of example n's mean-convention loss l_n, shape (N, d)."""
    theta = flat(p.model)
    loss_mean = type(p.loss_fn)(reduction="mean")
    rows = []
    for n in range(p.X.shape[0]):
        rows.append(
            torch.func.grad(
                lambda t, n=n: loss_mean(_out(p.model, t, p.X[n : n + 1]), p.y[n : n + 1])
            )(theta)
        )
    return torch.stack(rows)


def dense_empirical_fisher(p: Problem) -> Tensor:
    """(1/N) sum g_n g_n^T under mean; sum_n s_n s_n^T with s_n = c g_n under sum."""
    G = per_example_grads(p)
    if p.loss_fn.reduction == "mean":
        return G.T @ G / G.shape[0]
    S = G * terms_per_example(p)
    return S.T @ S


def as_dict(model: nn.Module, mat: Tensor) -> dict[str, Tensor]:
    """The diagonal of a dense matrix, keyed like the parameters."""
    return split_diag(model, torch.diagonal(mat))


def assert_dicts_close(
    actual: dict, expected: dict, rtol: float = 1e-6, atol: float = 1e-10
) -> None:
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=rtol, atol=atol, msg=k)


def snapshot(model: nn.Module) -> dict:
    """Everything 'leave no trace' promises to keep."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()
        },
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        # the Parameter objects themselves, under every name a module has (a module registered
        # twice lost its Parameter to a torch.func stand-in until review s22)
        "param_ids": {
            (mn, pn): id(p)
            for mn, m in model.named_modules(remove_duplicate=False)
            for pn, p in m._parameters.items()
        },
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for n, m in model.named_modules()
        },
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "param_attrs": {n: sorted(vars(p)) for n, p in model.named_parameters()},
        "inplace": {n: getattr(m, "inplace", None) for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for n in before["params"]:
        assert torch.equal(before["params"][n], after["params"][n]), f"parameter {n} changed"
        assert before["grad_ids"][n] == after["grad_ids"][n], f".grad of {n} replaced"
        b, a = before["grads"][n], after["grads"][n]
        assert (b is None and a is None) or torch.equal(b, a), f".grad of {n} changed"
    assert before["param_ids"] == after["param_ids"], "a parameter was replaced by another object"
    assert before["modes"] == after["modes"], "train/eval mode changed"
    assert before["hooks"] == after["hooks"], "hooks left behind"
    assert before["attrs"] == after["attrs"], "module attributes left behind"
    assert before["param_attrs"] == after["param_attrs"], "parameter attributes left behind"
    assert before["inplace"] == after["inplace"], "inplace flags changed"
    assert torch.equal(before["rng"], after["rng"]), "global RNG state changed"
