"""Per-example gradient rules of the layers curvlab's own hooks handle.

A rule turns what a forward hook saw (the layer's input ``a``) and what the backward pass brought to
the layer's output (its gradient ``g``, summed over the chunk's examples' NLLs) into each parameter's
per-example gradients, or straight into their sums of squares where that is cheaper:

* ``Linear``, ``Conv1d``/``Conv2d`` (groups 1, zero padding): ``grad_n W = sum_t g_nt a_nt^T``
  (:func:`~curvlab.backends._layers.sum_sq_grads` for the squares), any extra (sequence) dimensions;
* HuggingFace's ``Conv1D`` (a Linear layer stored as ``(in, out)``);
* ``Embedding``: ``grad_n E[v] = sum_{t: idx_nt = v} g_nt`` (``padding_idx`` rows stay zero; the
  gradient of the loss also under ``scale_grad_by_freq``, which rescales only autograd's);
* ``LayerNorm`` / ``RMSNorm`` / ``BatchNorm`` in eval mode with running statistics:
  ``grad_n w = sum_t g_nt * xhat_nt``, ``grad_n b = sum_t g_nt``, with ``xhat`` the normalised input
  recomputed from ``a``.

:func:`rule_for` returns ``None`` for any other module (the hooks backend then declines the model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvlab._precision import accumulation_dtype, common
from curvlab.backends._layers import (
    PER_EXAMPLE_PRODUCTS,
    example_blocks,
    input_columns,
    is_tappable,
    output_columns,
    overridden,
    squares_by_example,
    sum_sq_grads,
)

__all__ = ["Rule", "rule_for", "is_hf_conv1d", "PARAM_ATTRS"]

PARAM_ATTRS = ("weight", "bias")

PerExample = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]


class Rule:
    """How to get one module kind's per-example gradients.

    Attributes:
        per_example: ``fn(module, a, g) -> {attr: (n, *param.shape)}``.
        squares: ``fn(module, a, g, with_grad) -> ({attr: sum_n grad_n^2}, {attr: sum_n grad_n})``
            (a faster route for single-use parameters), or ``None`` to square ``per_example``.
        add_into: ``fn(module, a, g, out)`` adding the per-example gradients into the tensors
            ``out = {attr: (n, *param.shape)}`` in place, or ``None``: for a sparse rule (an
            embedding) whose parameter is also used by a dense one (a tied output head), so the
            sum of the uses needs no zero-filled buffer of its own.
        write_into: ``fn(module, a, g, out)`` writing (overwriting) the per-example gradients
            into given tensors ``out = {attr: (n, *param.shape)}`` and returning them, or
            ``None``: lets blocks of examples reuse one buffer (a fresh parameter-sized tensor per
            block costs its page faults: GPT-2's tied head, 76 ms instead of 35 ms a block).
    """

    def __init__(
        self,
        per_example: PerExample,
        squares: Callable | None = None,
        add_into: Callable | None = None,
        write_into: Callable | None = None,
    ) -> None:
        self.per_example = per_example
        self.squares = squares
        self.add_into = add_into
        self.write_into = write_into


def _linear_like(
    module: nn.Module, a: Tensor, g: Tensor, out: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Per-example gradients, new tensors or written into ``out`` (contiguous ``(n, *shape)``)."""
    cols = input_columns(module, a)  # (n, in', T)
    gcols = output_columns(module, g)  # (n, out, T)
    n = a.shape[0]
    into = None if out is None else out["weight"].view(n, gcols.shape[1], cols.shape[1])
    res = {
        "weight": torch.bmm(gcols, cols.transpose(1, 2), out=into).reshape(n, *module.weight.shape)
    }
    if module.bias is not None:
        res["bias"] = torch.sum(gcols, 2, out=None if out is None else out["bias"])
    return res


def _linear_squares(
    module: nn.Module, a: Tensor, g: Tensor, with_grad: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    parts = sum_sq_grads(module, a, g, with_grad=with_grad)
    sq = {"weight": parts[0]}
    grad: dict[str, Tensor] = {}
    if module.bias is not None:
        sq["bias"] = parts[1]
    if with_grad:
        grad["weight"] = parts[2]
        if module.bias is not None:
            grad["bias"] = parts[3]
    return sq, grad


def _hf_conv1d_squares(
    module: nn.Module, a: Tensor, g: Tensor, with_grad: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """HF ``Conv1D`` (``y = x W + b``, ``W`` stored ``(in, out)``): squares without the
    ``(n, in, out)`` per-example tensor for large weights (:func:`squares_by_example`), for
    blocks of examples whose products fit :func:`~curvlab.backends._layers.example_blocks`
    otherwise."""
    a, g = common(a, g)
    n = a.shape[0]
    A = a.reshape(n, -1, a.shape[-1])  # (n, T, in)
    G = g.reshape(n, -1, g.shape[-1])  # (n, T, out)
    grad: dict[str, Tensor] = {}
    if module.weight.numel() >= PER_EXAMPLE_PRODUCTS:
        sq_w, grad_w = squares_by_example(G, A, with_grad, in_out=True)  # (in, out)
        sq = {"weight": sq_w}
        if with_grad:
            grad["weight"] = grad_w
    else:  # blocks of examples whose (n, in, out) products fit (all at once: 1 GB, review)
        sq_w = grad_w = None
        size = accumulation_dtype(A.dtype).itemsize
        for lo, hi in example_blocks(n, A.shape[2], G.shape[2], A.shape[1], size, A.device):
            P = torch.bmm(A[lo:hi].transpose(1, 2), G[lo:hi])  # (n, in, out)
            if with_grad:
                grad_w = P.sum(0) if grad_w is None else grad_w.add_(P.sum(0))
            sq_w = P.square_().sum(0) if sq_w is None else sq_w.add_(P.square_().sum(0))
        sq = {"weight": sq_w}
        if with_grad:
            grad["weight"] = grad_w
    if module.bias is not None:
        gb = G.sum(1)
        sq["bias"] = (gb * gb).sum(0)
        if with_grad:
            grad["bias"] = gb.sum(0)
    return sq, grad


def _hf_conv1d(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    n = a.shape[0]
    A = a.reshape(n, -1, a.shape[-1])  # (n, T, in)
    G = g.reshape(n, -1, g.shape[-1])  # (n, T, out)
    out = {"weight": torch.bmm(A.transpose(1, 2), G)}
    if module.bias is not None:
        out["bias"] = G.sum(1)
    return out


def _embedding(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    out = g.new_zeros(a.shape[0], *module.weight.shape)
    _embedding_add_into(module, a, g, {"weight": out})
    return {"weight": out}


def _embedding_add_into(module: nn.Module, a: Tensor, g: Tensor, out: dict[str, Tensor]) -> None:
    n, d = a.shape[0], module.weight.shape[1]
    idx = a.reshape(n, -1)
    grads = g.reshape(n, -1, d)
    if module.padding_idx is not None:  # the padding row gets no gradient from the embedding
        grads = grads * (idx != module.padding_idx).unsqueeze(-1).to(grads.dtype)
    target = out["weight"]
    target.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), grads.to(target.dtype))


def _affine(
    xhat: Tensor, g: Tensor, n: int, shape: tuple[int, ...], bias: bool
) -> dict[str, Tensor]:
    out = {"weight": (g * xhat).reshape(n, -1, *shape).sum(1)}
    if bias:
        out["bias"] = g.reshape(n, -1, *shape).sum(1)
    return out


def _layer_norm(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    shape = tuple(module.normalized_shape)
    xhat = F.layer_norm(a, shape, None, None, module.eps)
    return _affine(xhat, g, a.shape[0], shape, module.bias is not None)


def _rms_norm(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    shape = tuple(module.normalized_shape)
    xhat = F.rms_norm(a, shape, None, module.eps)
    return _affine(xhat, g, a.shape[0], shape, False)


def _batch_norm(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    view = (1, -1) + (1,) * (a.ndim - 2)
    xhat = (a - module.running_mean.view(view)) * torch.rsqrt(
        module.running_var.view(view) + module.eps
    )
    n, c = a.shape[0], a.shape[1]
    out = {"weight": (g * xhat).reshape(n, c, -1).sum(2)}
    if module.bias is not None:
        out["bias"] = g.reshape(n, c, -1).sum(2)
    return out


_LINEAR = Rule(_linear_like, _linear_squares, write_into=_linear_like)
_HF_CONV1D = Rule(_hf_conv1d, _hf_conv1d_squares)
_EMBEDDING = Rule(_embedding, add_into=_embedding_add_into)
_LAYER_NORM = Rule(_layer_norm)
_RMS_NORM = Rule(_rms_norm)
_BATCH_NORM = Rule(_batch_norm)


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``, or ``None`` if the hooks cannot compute its per-example gradients."""
    if is_tappable(module):
        return _LINEAR
    if overridden(module) is not None:  # a subclass computing something else: the general engine
        return None
    if isinstance(module, nn.Embedding):
        # scale_grad_by_freq rescales autograd's gradient of the weight only, which the rule never
        # reads (it sums the output gradients); curvlab's passes run with it off (leave_no_trace).
        # sparse=True changes only the layout of that gradient, not the values the rule builds
        if module.max_norm is not None:
            return None  # max_norm renormalises the weight in place
        return _EMBEDDING
    if isinstance(module, nn.LayerNorm):
        return _LAYER_NORM if module.elementwise_affine else None
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return _RMS_NORM if module.elementwise_affine else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None or not module.affine:
            return None
        return _BATCH_NORM
    if is_hf_conv1d(module):
        return _HF_CONV1D
    return None


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is HuggingFace's ``transformers.pytorch_utils.Conv1D`` (GPT-2's layers).

    It is a Linear layer stored transposed: ``y = x @ W + b`` with ``W`` of shape ``(in, out)``
    (``nf = out``). Recognised by name and attributes, so transformers need not be imported.
    """
    # the name first: reading ``module.weight`` of a parametrized layer (torch names its class
    # ``Parametrized...``, never "Conv1D") runs the parametrization, one power iteration of a
    # spectral_norm'd layer that moves its vectors (found in review s19)
    if type(module).__name__ != "Conv1D":
        return False
    weight = getattr(module, "weight", None)
    return hasattr(module, "nf") and isinstance(weight, Tensor) and weight.ndim == 2
