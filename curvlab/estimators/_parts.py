"""A parameter-vector held in parts (one flat tensor per parameter): products and fused passes.

The plain Lanczos recurrence of :func:`curvlab.estimators.slq` touches its three vectors a few
times per step. On GPT-2 small (124M entries, 2 CPU cores) concatenating each product into one
flat vector costs about a tenth of the product, and every further pass over a vector about a
hundredth. Keeping the vectors in the operator's per-parameter parts
(:meth:`curvlab.operators.CurvatureOperator.product_parts`) avoids the flat copy and the weight
scaling of every product; the fused passes below update a vector and reduce it in float64 in one
sweep over chunks that stay in cache. Any other operator is one part: the flat vector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvlab.estimators._lanczos import apply_to_vector

__all__ = ["CHUNK", "PartProducts", "axpy_dot", "part_products", "split"]

CHUNK = 2**17
"""Entries per chunk of a fused pass (1 MiB of float64 buffer each for the two operands)."""

PartProducts = Callable[[list[Tensor]], tuple[list[Tensor], float]]
"""``parts -> (raw, scale)`` with ``A v = scale * raw``, ``raw`` new tensors the caller owns."""


def part_products(
    op: object, device: torch.device, dtype: torch.dtype
) -> tuple[list[int], PartProducts]:
    """The part sizes of ``op``'s vectors and its product of a vector in parts.

    The operator's own parts where it has them (``product_parts``), else one part (the flat
    vector, through ``matmat``). Products come back on ``device`` in ``dtype`` (the storage of
    the estimator's vectors).
    """
    own = getattr(op, "product_parts", None)
    sizes = getattr(op, "_sizes", None)
    if own is None or sizes is None:
        dim = op.shape[0]  # type: ignore[attr-defined]

        def flat(parts: list[Tensor]) -> tuple[list[Tensor], float]:
            return [apply_to_vector(op, parts[0], device, dtype)], 1.0

        return [dim], flat

    def per_parameter(parts: list[Tensor]) -> tuple[list[Tensor], float]:
        raw, scale = own(parts)
        return [r.to(device, dtype) for r in raw], scale

    return list(sizes), per_parameter


def split(v: Tensor, sizes: list[int]) -> list[Tensor]:
    """A flat vector as views of its parts."""
    return list(v.split(sizes))


def axpy_dot(
    u: list[Tensor], coef: float, x: list[Tensor] | None, y: list[Tensor] | None
) -> Tensor:
    """``u <- u - coef * x`` in place (skipped for ``x=None``), then ``y^T u`` in float64.

    ``y=None`` means ``u`` itself (the squared norm). One sweep over chunks of :data:`CHUNK`
    entries: each chunk is updated in ``u``'s dtype and its entries copied into float64 buffers,
    where the products are exact and summed (a float32 dot of ``10^8`` entries loses three or
    four digits).
    """
    device = u[0].device
    a = torch.empty(min(CHUNK, max(t.numel() for t in u)), dtype=torch.float64, device=device)
    b = torch.empty_like(a) if y is not None else a
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, ui in enumerate(u):
        for r in range(0, ui.numel(), CHUNK):
            uc = ui[r : r + CHUNK]
            if x is not None:
                uc.add_(x[i][r : r + CHUNK], alpha=-coef)
            n = uc.numel()
            a[:n].copy_(uc)
            if y is not None:
                b[:n].copy_(y[i][r : r + CHUNK])
            total += torch.dot(a[:n], b[:n])
    return total
