"""The supported losses, their scaling and the likelihood behind them.

curvlab supports ``CrossEntropyLoss``, ``MSELoss`` and ``BCEWithLogitsLoss`` with ``reduction="mean"``
or ``"sum"``. Each is, up to a constant, a sum of per-example negative log-likelihoods
``NLL_n(f_n, y_n)`` of the model output ``f_n``:

* ``CrossEntropyLoss``: categorical likelihood with logits ``f_n`` (class dimension 1),
  ``NLL_n = sum over positions of -log softmax(f_n)[y]``;
* ``MSELoss``: Gaussian likelihood with variance 1/2, ``NLL_n = sum_k (f_nk - y_nk)^2`` (+ const);
* ``BCEWithLogitsLoss``: independent Bernoulli likelihoods with logits ``f_n``.

With ``c`` the number of loss terms per example (positions for cross-entropy, output entries for
MSE/BCE) the objective is ``L = w * sum_n NLL_n`` with ``w = 1/(N c)`` under ``"mean"`` and ``w = 1``
under ``"sum"``. Example ``n``'s share under the mean convention is ``l_n = NLL_n / c``. The
Monte-Carlo Fisher samples ``y_hat ~ p(y | f_n)`` and uses ``w * grad NLL_n(y_hat) grad NLL_n(y_hat)^T``,
whose expectation is the generalised Gauss-Newton matrix of ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LossSpec", "loss_spec"]

_SUPPORTED = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


@dataclass(frozen=True)
class LossSpec:
    """What curvlab needs to know about a validated loss function.

    Attributes:
        loss_fn: the user's loss module (unchanged).
        kind: ``"cross_entropy"``, ``"mse"`` or ``"bce"``.
        reduction: ``"mean"`` or ``"sum"``.
    """

    loss_fn: nn.Module
    kind: str
    reduction: str

    def terms_per_example(self, output: Tensor) -> int:
        """Number ``c`` of loss terms one example contributes (see the module docstring)."""
        per_example = output[0].numel()
        if self.kind == "cross_entropy":
            return per_example // output.shape[1]
        return per_example

    def ggn_weight(self, num_examples: int, terms: int) -> float:
        """``w`` with ``L = w * sum_n NLL_n``: ``1/(N c)`` under "mean", 1 under "sum".

        It scales NLL-sum Hessians, GGNs and Monte-Carlo Fishers to those of ``L``.
        """
        return 1.0 if self.reduction == "sum" else 1.0 / (num_examples * terms)

    def empirical_weight(self, num_examples: int, terms: int) -> float:
        """Scales ``sum_n grad NLL_n grad NLL_n^T`` to the empirical Fisher: ``1/(N c^2)`` or 1."""
        return 1.0 if self.reduction == "sum" else 1.0 / (num_examples * terms**2)

    def nll_weight(self, output: Tensor, num_examples: int) -> float:
        """``w`` with ``L = w * sum_n NLL_n`` for ``num_examples`` examples of this ``output`` shape."""
        return self.ggn_weight(num_examples, self.terms_per_example(output))

    def nll_sum(self, output: Tensor, targets: Tensor) -> Tensor:
        """``sum_n NLL_n(output_n, targets_n)`` (the loss with sum reduction, up to constants)."""
        if self.kind == "cross_entropy":
            return nn.functional.cross_entropy(output, targets, reduction="sum")
        if self.kind == "mse":
            return nn.functional.mse_loss(output, targets, reduction="sum")
        return nn.functional.binary_cross_entropy_with_logits(output, targets, reduction="sum")

    @torch.no_grad()
    def sample_targets(self, output: Tensor, generator: torch.Generator | None) -> Tensor:
        """Draw labels ``y_hat ~ p(y | output)`` from the model's predictive distribution.

        Draws on ``output``'s device from ``generator`` (never the global RNG when one is given).
        """
        output = output.detach()
        if self.kind == "cross_entropy":
            probs = torch.softmax(output, dim=1).movedim(1, -1)
            flat = probs.reshape(-1, probs.shape[-1])
            draws = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
            return draws
        if self.kind == "mse":
            noise = torch.randn(
                output.shape, generator=generator, device=output.device, dtype=output.dtype
            )
            return output + noise * (0.5**0.5)
        probs = torch.sigmoid(output)
        uniform = torch.rand(
            output.shape, generator=generator, device=output.device, dtype=probs.dtype
        )
        return (uniform < probs).to(output.dtype)


def loss_spec(loss_fn: object) -> LossSpec:
    """Validate ``loss_fn`` and describe it.

    Raises:
        TypeError: for a loss curvlab does not support.
        ValueError: for ``reduction="none"`` or options that change the likelihood
            (class weights, label smoothing, ``pos_weight``, ``ignore_index`` in use).
    """
    if not isinstance(loss_fn, _SUPPORTED):
        raise TypeError(
            f"unsupported loss {type(loss_fn).__name__}: curvlab supports nn.CrossEntropyLoss, "
            "nn.MSELoss and nn.BCEWithLogitsLoss (pass one of these modules, not a function)"
        )
    name = type(loss_fn).__name__
    reduction = loss_fn.reduction
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f'{name}(reduction="{reduction}") is not supported: curvature is defined for a scalar '
            f'objective; use reduction="mean" or reduction="sum"'
        )
    if getattr(loss_fn, "weight", None) is not None:
        raise ValueError(
            f"{name} with class weights is not supported; construct it without weight="
        )
    if getattr(loss_fn, "pos_weight", None) is not None:
        raise ValueError(
            f"{name} with pos_weight is not supported; construct it without pos_weight="
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.label_smoothing != 0.0:
            raise ValueError(
                "CrossEntropyLoss with label_smoothing is not supported; use label_smoothing=0.0"
            )
        kind = "cross_entropy"
    elif isinstance(loss_fn, nn.MSELoss):
        kind = "mse"
    else:
        kind = "bce"
    return LossSpec(loss_fn=loss_fn, kind=kind, reduction=reduction)
