"""The objective's gradient on whole batches: the one loop the whole-batch measurements share.

``critical_sharpness`` takes its update direction from a fresh gradient of the measured data, and
the whole-batch fallback of ``loss``/``grad_norm`` (a model that mixes the examples) reads the loss
and its gradient batch by batch, never chunked. Both sum the batches' NLL-sum gradients, 16-bit
ones in float32 (a running 16-bit sum rounds the whole sum again on every batch: 1.6% off over
256 bfloat16 batches), and count the loss terms for the mean's scale (docs/conventions.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab._losses import LossSpec
from curvlab._precision import accumulation_dtype

__all__ = ["GradientSums", "gradient_sums"]


@dataclass
class GradientSums:
    """Sums over the batches.

    Attributes:
        grads: per tensor differentiated, ``sum_b grad NLL_b`` (float32 for 16-bit tensors), or
            ``None`` where the loss does not reach it.
        count: the number of loss terms ``M`` (non-ignored targets).
        nll: ``sum_b NLL_b`` in float64, on the model's device.
    """

    grads: list[Tensor | None]
    count: Tensor | float
    nll: Tensor | None

    def weight(self, spec: LossSpec) -> float:
        """``w`` of the objective ``L = w * sum NLL``: 1 under "sum", ``1/M`` under "mean".

        Raises:
            ValueError: for a mean over no loss term (every target ignored).
        """
        m = float(self.count)
        if spec.reduction == "sum":
            return 1.0
        if m == 0:
            raise ValueError("every target of the data is ignore_index: the mean loss is undefined")
        return 1.0 / m


def gradient_sums(
    spec: LossSpec,
    batches: Iterable[tuple[Any, Tensor]],
    wrt: Sequence[Tensor],
    forward: Callable[[Any], Tensor],
) -> GradientSums:
    """Sum each batch's NLL-sum gradient with respect to ``wrt`` (the module's raw output of
    ``forward(inputs)``, prepared by ``spec``), its loss terms and its NLL.

    Args:
        spec: the loss.
        batches: ``(inputs, targets)`` on the model's device.
        wrt: the tensors to differentiate (requiring a gradient).
        forward: the model's call on a batch's inputs (its raw output).

    Raises:
        ValueError: for a class index out of range (before its batch's backward pass).
    """
    total: list[Tensor | None] = [None] * len(wrt)
    count: Tensor | float = 0.0
    nll: Tensor | None = None
    for inputs, targets in batches:
        output = spec.prepare(forward(inputs), targets)
        spec.check_classes(output, targets)
        count = count + spec.count(output, targets)
        value = spec.nll_sum(output, targets)
        nll = value.detach().double() if nll is None else nll + value.detach().double()
        for i, g in enumerate(torch.autograd.grad(value, list(wrt), allow_unused=True)):
            if g is not None:
                if total[i] is None:
                    total[i] = torch.zeros_like(g, dtype=accumulation_dtype(g.dtype))
                total[i].add_(g)
    return GradientSums(total, count, nll)
