"""Dense float64 references for any model, from the definitions only (tests only, never curvlab).

Works for anything with ``.model``, ``.loss_fn`` and ``.batches`` (a list of ``(inputs, targets)``):
the cases of tests/zoo.py and the problems of tests/problems.py. Inputs may be Tensors or dicts of
tensors (``model(**inputs)``); an output that is not a Tensor gives its ``.logits``.

The objective is ``L(theta) = loss_fn(f(theta), y)`` on all batches concatenated, with the GPT
layout (``(B, T, C)`` logits, ``(B, T)`` targets) flattened to ``(B*T, C)`` first. Everything else
follows from L and the per-example outputs ``f_n`` (example n = index n of the batch dimension):

* ``hessian`` = d^2 L / d theta^2, by autograd's double backward through ``functional_call``:
  torch.func's own ``hessian`` (and ``jacrev(jacrev)``) gets the mixed (LayerNorm weight, LayerNorm
  input) block wrong in torch 2.14.1 (e.g. ``Linear -> LayerNorm``: entries off by O(1)), while
  autograd agrees with central differences of the gradient (tests/test_any_model.py checks);
* ``ggn`` = J^T (d^2 L / d f^2) J with J = d f / d theta over the whole concatenated output;
* contributions ``S[n] = grad c_n = J_n^T dL/df_n`` where ``L = sum_n c_n``; under "mean" with
  ``ignore_index`` this is example n's summed token losses over the total token count M;
* empirical Fisher: ``N S^T S`` under "mean" (``(1/N) sum g_n g_n^T``, ``g_n = N grad c_n``),
  ``S^T S`` under "sum";
* gradient statistics of ``g_n = N grad c_n^{mean}`` (the mean-convention objective).

Parameters: the unique trainable parameters in ``model.named_parameters()`` order (a tied weight
appears once, under its first name); ``functional_call`` gets a dict with exactly those names and
keeps tied weights tied (its default ``tie_weights=True``), which tests/test_any_model.py checks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

# ------------------------------------------------------------------------------------ parameters


def param_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat(
        [p.detach().reshape(-1) for _, p in model.named_parameters() if p.requires_grad]
    )


def unflatten(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, shape in param_shapes(model).items():
        k = shape.numel()
        out[n] = theta[i : i + k].reshape(shape)
        i += k
    assert i == theta.numel()
    return out


def split_diag(model: nn.Module, diag: Tensor) -> dict[str, Tensor]:
    """A flat vector (e.g. a matrix diagonal) as a dict keyed like the trainable parameters."""
    return unflatten(model, diag)


def diag_dict(model: nn.Module, mat: Tensor) -> dict[str, Tensor]:
    """The diagonal of a dense ``(D, D)`` matrix, keyed like the trainable parameters."""
    return split_diag(model, torch.diagonal(mat))


# ------------------------------------------------------------------------------------- the data


def concat_inputs(batches: list[tuple[Any, Tensor]]) -> Any:
    first = batches[0][0]
    if isinstance(first, Mapping):
        return {k: torch.cat([b[0][k] for b in batches]) for k in first}
    return torch.cat([b[0] for b in batches])


def concat_targets(batches: list[tuple[Any, Tensor]]) -> Tensor:
    return torch.cat([b[1] for b in batches])


def num_examples(batches: list[tuple[Any, Tensor]]) -> int:
    return int(concat_targets(batches).shape[0])


def forward(model: nn.Module, theta: Tensor, inputs: Any) -> Tensor:
    """The model's output (``.logits`` of a non-Tensor) with the flat parameters ``theta``."""
    params = unflatten(model, theta)
    # the math attention kernel: same values, and it has forward-mode and double-backward rules
    with sdpa_kernel(SDPBackend.MATH):
        if isinstance(inputs, Mapping):
            out = functional_call(model, params, (), dict(inputs))
        else:
            out = functional_call(model, params, (inputs,))
    return out if isinstance(out, Tensor) else out.logits


# ------------------------------------------------------------------------------------- the loss


def gpt_layout(loss_fn: nn.Module, out: Tensor, y: Tensor) -> bool:
    """Cross-entropy with logits ``(B, T, C)`` and integer targets ``(B, T)`` (classes last)."""
    if not isinstance(loss_fn, nn.CrossEntropyLoss) or y.is_floating_point():
        return False
    torch_fits = out.dim() >= 2 and tuple(y.shape) == (out.shape[0], *out.shape[2:])
    gpt_fits = out.dim() >= 3 and tuple(y.shape) == tuple(out.shape[:-1])
    assert not (torch_fits and gpt_fits), "ambiguous cross-entropy layout in a test problem"
    return gpt_fits


def loss_value(loss_fn: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """What ``loss_fn`` computes on the output ``out`` (GPT layout flattened first)."""
    if gpt_layout(loss_fn, out, y):
        return loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return loss_fn(out, y)


def with_reduction(loss_fn: nn.Module, reduction: str) -> nn.Module:
    """The same loss (same ``ignore_index``) with another reduction."""
    other = copy.copy(loss_fn)
    other.reduction = reduction
    return other


def objective(obj: Any, theta: Tensor | None = None, loss_fn: nn.Module | None = None) -> Tensor:
    """``L(theta)`` on all batches at once."""
    theta = flat_params(obj.model) if theta is None else theta
    loss_fn = obj.loss_fn if loss_fn is None else loss_fn
    out = forward(obj.model, theta, concat_inputs(obj.batches))
    return loss_value(loss_fn, out, concat_targets(obj.batches))


def contributions_by_definition(obj: Any, loss_fn: nn.Module | None = None) -> Tensor:
    """``(N, D)`` gradients of ``c_n``, one example at a time from the loss's reduction="none".

    ``c_n`` = example n's summed per-term losses (ignored tokens contribute 0), divided under
    "mean" by the total number ``M`` of counted terms of all data. An independent second route to
    :attr:`Dense.contributions`.
    """
    loss_fn = obj.loss_fn if loss_fn is None else loss_fn
    X, y = concat_inputs(obj.batches), concat_targets(obj.batches)
    theta = flat_params(obj.model)
    none = with_reduction(loss_fn, "none")
    if loss_fn.reduction == "mean":
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            M = int((y != loss_fn.ignore_index).sum())
        else:
            M = y.numel()
    else:
        M = 1
    rows = []
    for n in range(y.shape[0]):
        Xn = {k: v[n : n + 1] for k, v in X.items()} if isinstance(X, Mapping) else X[n : n + 1]

        def c_n(t: Tensor, Xn: Any = Xn, yn: Tensor = y[n : n + 1]) -> Tensor:
            return loss_value(none, forward(obj.model, t, Xn), yn).sum() / M

        rows.append(torch.func.grad(c_n)(theta))
    return torch.stack(rows)


# ------------------------------------------------------------------------------ dense references


def autograd_hessian(fn: Any, x: Tensor) -> Tensor:
    """``d^2 fn / dx^2`` (x flat) by double backward: one batched backward of all unit vectors."""
    t = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(t), t, create_graph=True)
    eye = torch.eye(t.numel(), dtype=t.dtype)
    try:
        (H,) = torch.autograd.grad(g, t, eye, is_grads_batched=True)
    except RuntimeError:  # no batching rule somewhere: one column at a time
        H = torch.stack([torch.autograd.grad(g, t, e, retain_graph=True)[0] for e in eye])
    return H.detach()


class Dense:
    """Every dense reference of one problem, each computed once on first use."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.model = obj.model
        self.loss_fn = obj.loss_fn
        self.inputs = concat_inputs(obj.batches)
        self.targets = concat_targets(obj.batches)
        self.N = int(self.targets.shape[0])
        self.theta = flat_params(self.model)
        self.D = self.theta.numel()

    def _f(self, theta: Tensor) -> Tensor:
        return forward(self.model, theta, self.inputs)

    def _loss_of_output(self, loss_fn: nn.Module) -> Any:
        return lambda out: loss_value(loss_fn, out, self.targets)

    @cached_property
    def output(self) -> Tensor:
        return self._f(self.theta).detach()

    @cached_property
    def value(self) -> float:
        return float(objective(self.obj, self.theta))

    @cached_property
    def gradient(self) -> Tensor:
        return torch.func.grad(lambda t: objective(self.obj, t))(self.theta)

    @cached_property
    def jacobian(self) -> Tensor:
        """``(N, F/N, D)``: d output / d theta, output entries of example n in row block n."""
        J = jacrev(self._f)(self.theta)
        return J.reshape(self.N, -1, self.D)

    @cached_property
    def hessian(self) -> Tensor:
        return autograd_hessian(lambda t: objective(self.obj, t), self.theta)

    @cached_property
    def output_hessian(self) -> Tensor:
        """d^2 L / d f^2 over the whole concatenated output, ``(F, F)``."""
        shape, loss = self.output.shape, self._loss_of_output(self.loss_fn)
        return autograd_hessian(lambda f: loss(f.reshape(shape)), self.output.reshape(-1))

    @cached_property
    def ggn(self) -> Tensor:
        J = self.jacobian.reshape(-1, self.D)
        return J.T @ self.output_hessian @ J

    def _contributions(self, loss_fn: nn.Module) -> Tensor:
        dL_df = torch.func.grad(self._loss_of_output(loss_fn))(self.output)
        return torch.einsum("nfd,nf->nd", self.jacobian, dL_df.reshape(self.N, -1))

    @cached_property
    def contributions(self) -> Tensor:
        """``(N, D)``: ``grad c_n`` with ``L = sum_n c_n`` (rows sum to the gradient of L)."""
        return self._contributions(self.loss_fn)

    @cached_property
    def mean_grads(self) -> Tensor:
        """``(N, D)``: ``g_n = N grad c_n`` of the mean-convention objective, any reduction."""
        return self.N * self._contributions(with_reduction(self.loss_fn, "mean"))

    @cached_property
    def empirical_fisher(self) -> Tensor:
        S = self.contributions
        if self.loss_fn.reduction == "mean":
            G = self.N * S  # g_n
            return G.T @ G / self.N
        return S.T @ S

    @cached_property
    def grad_mean(self) -> Tensor:
        return self.mean_grads.mean(0)

    @cached_property
    def grad_variance(self) -> Tensor:
        return ((self.mean_grads - self.grad_mean) ** 2).mean(0)

    @property
    def trace_covariance(self) -> float:
        return float(self.grad_variance.sum())

    @property
    def noise_scale(self) -> float:
        return self.trace_covariance / float(self.grad_mean.square().sum())

    def matrix(self, name: str) -> Tensor:
        return {
            "hessian": self.hessian,
            "ggn": self.ggn,
            "empirical_fisher": self.empirical_fisher,
        }[name]

    def diag(self, name: str) -> dict[str, Tensor]:
        return diag_dict(self.model, self.matrix(name))

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        return split_diag(self.model, flat)


# ------------------------------------------------------------------------------------ assertions


def scale_of(expected: Tensor | dict[str, Tensor]) -> float:
    if isinstance(expected, dict):
        return max((float(v.abs().max()) for v in expected.values() if v.numel()), default=0.0)
    return float(expected.abs().max()) if expected.numel() else 0.0


def assert_close(actual: Any, expected: Tensor, rtol: float = 1e-6, what: str = "") -> None:
    """``assert_close`` with ``atol = 1e-10 * max|expected|``."""
    atol = 1e-10 * max(scale_of(expected), 1e-30)
    actual = torch.as_tensor(actual, dtype=expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=what or None)


def assert_dicts_close(actual: dict, expected: dict[str, Tensor], rtol: float = 1e-6) -> None:
    """Same keys, same shapes, close values (``atol = 1e-10 * max`` over all entries)."""
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    atol = 1e-10 * max(scale_of(expected), 1e-30)
    for k, v in expected.items():
        a = actual[k]
        assert isinstance(a, Tensor), (k, type(a))
        assert a.shape == v.shape, (k, a.shape, v.shape)
        torch.testing.assert_close(a.to(v.dtype), v, rtol=rtol, atol=atol, msg=k)


def assert_float_close(
    actual: float, expected: float, rtol: float = 1e-6, scale: float = 0.0
) -> None:
    tol = rtol * abs(expected) + 1e-10 * max(abs(expected), scale, 1e-30)
    assert abs(float(actual) - expected) <= tol, (float(actual), expected)
