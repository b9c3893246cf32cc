"""Negative log-likelihood terms whose derivatives keep their relative accuracy at confident outputs.

torch's ``cross_entropy`` and ``binary_cross_entropy_with_logits`` give the gradient with respect
to the logits as ``p − onehot(c)`` and ``sigmoid(z) − y``. At a confident, correct output the
true value ``p_c − 1 = −Σ_{k≠c} p_k`` is tiny (a mean loss of 1e-9 makes it about −1e-9) but it
is computed as a difference of two numbers near 1, so in float32 it rounds to 0 or to a multiple
of 6e-8. Every per-example gradient (empirical and Monte-Carlo Fishers, gradient statistics, the
noise samplers) and every Hessian product (double backward through the same formula) inherits
that error: on a classifier that fits its data in float32 the empirical Fisher was 71% off at a
mean loss of 7e-11, the top Hessian eigenvalue 32% (found in review).

The terms here have the same values, written so that no derivative subtracts numbers near 1:

* cross-entropy with class indices, around each position's most probable class ``j`` (a
  constant index, taken without gradient): ``NLL = log1p(Σ_{k≠j} exp(z_k − z_j)) + (z_j − z_c)``,
  the last term exactly 0 where ``c = j``. Its gradient is ``p_k`` for ``k ≠ j`` and
  ``−Σ_{k≠j} p_k`` (plus ``1`` where ``c ≠ j``) at ``j``, and its second derivative, taken by
  autograd, is ``p ⊙ (w − pᵀw)`` with ``w = u − u_j`` (``w_j = 0`` exactly), the form curvlab
  already uses for the GGN (docs/conventions.md, "Precision of the loss");
* binary cross-entropy with logits: ``y · softplus(−z) + (1 − y) · softplus(z)``, with a
  softplus whose derivatives are ``sigmoid(±z)`` computed from ``exp(−|z|)`` (no threshold: torch's
  ``softplus`` is linear beyond 20, where its second derivative becomes 0).

Soft targets (class probabilities for cross-entropy, fractional BCE labels) have a gradient
``p − t`` whose smallness near a fit is that of the data, not of rounding: class probabilities are
scored by torch, fractional BCE labels by the form above (it equals torch's to rounding).
The first-order cross-entropy gradient, which every per-example pass takes, comes from a backward
of its own at about torch's cost; where the terms are differentiated twice (the Hessian operator,
the gradient penalties) or inside ``torch.func`` transforms, from the plain-autograd form above.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from curvlab._precision import accumulation_dtype, upcast

__all__ = ["stable_bce_with_logits", "stable_cross_entropy"]


def stable_cross_entropy(
    z: Tensor, targets: Tensor, ignore_index: int, reduction: str, twice: bool = False
) -> Tensor:
    """Cross-entropy terms of logits ``z`` (classes in axis 1) at class indices ``targets``.

    Args:
        z: logits ``(N, C)`` or ``(N, C, d1, ...)``.
        targets: class indices ``(N,)`` or ``(N, d1, ...)``; positions equal to ``ignore_index``
            contribute 0 (value and gradient).
        ignore_index: the label left out.
        reduction: ``"sum"`` or ``"none"``.
        twice: the result will be differentiated twice (Hessian products, gradient penalties).
            Otherwise, outside ``torch.func`` transforms, the gradient comes from a backward of
            its own at about torch's cost (:class:`_FirstOrder`: once differentiable); the
            twice-differentiable form costs about 2.5× torch's loss at GPT-2's vocabulary.

    Returns:
        The sum of the terms, or the terms shaped like ``targets`` (``z``'s dtype, float32 for
        16-bit logits).

    Raises:
        RuntimeError: from ``gather``, for a class index outside ``[0, C)`` that is not
            ``ignore_index`` (curvlab names it: :func:`curvlab._losses.name_invalid_labels`; on
            CUDA the gather asserts, as torch's own ``cross_entropy`` does).
    """
    valid = targets != ignore_index
    top = z.detach().argmax(dim=1, keepdim=True)  # the most probable class: a constant index
    safe = torch.where(valid, targets, top.squeeze(1))  # ignored positions: any valid index
    if twice or _transformed():
        terms = _twice_differentiable(upcast(z), safe, valid, top)
    else:  # 16-bit logits: float32 log-probabilities from a fused cast, a 16-bit gradient
        terms, _ = _FirstOrder.apply(z, safe, valid, top)  # (terms, log-probabilities kept)
    return terms.sum() if reduction == "sum" else terms


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``) is running."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is None or peek() is not None


def _twice_differentiable(z: Tensor, safe: Tensor, valid: Tensor, top: Tensor) -> Tensor:
    """``log1p(Σ_{k≠j} exp(z_k − z_j)) + (z_j − z_c)`` in plain autograd (module docstring)."""
    shape = [1] * z.ndim
    shape[1] = z.shape[1]
    classes = torch.arange(z.shape[1], device=z.device).view(shape)
    z_top = z.gather(1, top)
    rest = (z - z_top).masked_fill(classes == top, float("-inf")).exp().sum(1)  # Σ_{k≠j} p_k/p_j
    z_c = z.gather(1, safe.unsqueeze(1)).squeeze(1)
    lead = z_top.squeeze(1) - z_c
    lead = torch.where(safe == top.squeeze(1), torch.zeros_like(lead), lead)
    return torch.where(valid, torch.log1p(rest) + lead, torch.zeros_like(lead))


class _FirstOrder(torch.autograd.Function):
    """Cross-entropy terms ``−log p_c`` with the gradient ``p − onehot(c)`` written around the
    most probable class ``j``: ``−Σ_{k≠j} p_k`` at ``j = c``, never ``p_c − 1``.

    Forward and backward cost about what torch's ``cross_entropy`` costs (one ``log_softmax``,
    its output kept for the backward pass: float32 for 16-bit logits, from a cast that CUDA
    fuses into it; the gradient is returned in the logits' dtype). Once differentiable: a
    double backward raises.
    """

    @staticmethod
    def forward(z: Tensor, safe: Tensor, valid: Tensor, top: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax(z, 1, dtype=accumulation_dtype(z.dtype))
        terms = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        return torch.where(valid, terms, torch.zeros_like(terms)), logp

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        z, safe, valid, top = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], safe, valid, top)
        ctx.dtype = z.dtype

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        logp, safe, valid, top = ctx.saved_tensors
        g = logp.exp()
        p_top = g.gather(1, top)
        g.scatter_(1, top, 0.0)
        rest = g.sum(1, keepdim=True)  # Σ_{k≠j} p_k, a sum of small numbers
        other = safe.unsqueeze(1) != top  # the label is not the most probable class
        g.scatter_add_(1, safe.unsqueeze(1), -other.to(g.dtype))  # p_c − 1 at c ≠ j
        g.scatter_(1, top, torch.where(other, p_top, -rest))
        g.mul_(torch.where(valid, grad, torch.zeros_like(grad)).unsqueeze(1).to(g.dtype))
        return g.to(ctx.dtype), None, None, None


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` with derivative ``sigmoid(x)`` (at 0: 1/2) from ``exp(−|x|)``."""
    up = x >= 0
    e = torch.exp(-torch.where(up, x, -x))  # exp(−|x|) ≤ 1, derivative sign(x) with sign(0) = +1
    return torch.where(up, x, torch.zeros_like(x)) + torch.log1p(e)


def stable_bce_with_logits(z: Tensor, y: Tensor, reduction: str) -> Tensor:
    """Binary cross-entropy terms ``y · softplus(−z) + (1 − y) · softplus(z)`` of logits ``z``.

    Args:
        z: logits, any shape.
        y: targets in ``[0, 1]``, ``z``'s shape.
        reduction: ``"sum"`` or ``"none"``.

    Returns:
        The sum of the terms, or the terms (``z``'s shape and dtype).
    """
    terms = y * _softplus(-z) + (1 - y) * _softplus(z)
    return terms.sum() if reduction == "sum" else terms
