"""A parameter-vector held in parts (one flat tensor per parameter): products and fused passes.

The plain Lanczos recurrence of :func:`curvlab.estimators.slq` touches its three vectors a few
times per step. On GPT-2 small (124M entries, 2 CPU cores) concatenating each product into one
flat vector costs about a tenth of the product, and every further pass over a vector about a
hundredth. Keeping the vectors in the operator's per-parameter parts
(:meth:`curvlab.operators.CurvatureOperator.product_parts`) avoids the flat copy and the weight
scaling of every product; the fused passes below update a vector and reduce it in float64 in one
sweep over chunks that stay in cache (:func:`curvlab._precision.axpy_dot`). Any other operator
is one part: the flat vector.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from curvlab.estimators._krylov import apply_to_vector

__all__ = [
    "Blocks",
    "BlocksArg",
    "PartProducts",
    "check_blocks",
    "own_products",
    "part_products",
    "split",
]

Blocks = dict[str, list[slice]]
"""Named blocks of a parameter-vector's indices (a layer's parameters): name -> slices."""

BlocksArg = Mapping[str, "slice | Sequence[slice]"]
"""``blocks=`` as callers give it: name -> one slice or a list of slices of indices."""

PartProducts = Callable[[list[Tensor]], tuple[list[Tensor], float]]
"""``parts -> (raw, scale)`` with ``A v = scale * raw`` (``scale > 0``), ``raw`` new tensors the
caller owns."""


def own_products(op: object) -> bool:
    """Whether ``op`` is a :class:`~curvlab.operators.CurvatureOperator` whose products are its
    class's own, so that its shortcuts (``product_parts``, ``quadratic_forms``) compute what its
    ``matmat`` does. A subclass that changes ``matmat`` (a damping, a preconditioner) is a
    different matrix from the one those shortcuts compute: estimators then use its ``matmat``
    (a damped ``H + I/2`` had its Hutchinson trace read as ``Tr(H)``, found in review)."""
    from curvlab.operators._base import CurvatureOperator

    return isinstance(op, CurvatureOperator) and type(op).matmat is CurvatureOperator.matmat


def part_products(
    op: object, device: torch.device, dtype: torch.dtype
) -> tuple[list[int], PartProducts]:
    """The part sizes of ``op``'s vectors and its product of a vector in parts.

    The operator's own parts where it has them (``product_parts``), else one part (the flat
    vector, through ``matmat``). Products come back on ``device`` in ``dtype`` (the storage of
    the estimator's vectors).
    """
    if not own_products(op):  # a subclass that changes matmat gets it, one flat part
        dim = op.shape[0]  # type: ignore[attr-defined]

        def flat(parts: list[Tensor]) -> tuple[list[Tensor], float]:
            return [apply_to_vector(op, parts[0], device, dtype)], 1.0

        return [dim], flat

    def per_parameter(parts: list[Tensor]) -> tuple[list[Tensor], float]:
        raw, scale = op.product_parts(parts)  # type: ignore[union-attr]
        return [r.to(device, dtype) for r in raw], scale

    return [s.numel() for s in op.shapes], per_parameter  # type: ignore[union-attr]


def split(v: Tensor, sizes: list[int]) -> list[Tensor]:
    """A flat vector as views of its parts."""
    return list(v.split(sizes))


def check_blocks(blocks: BlocksArg | None) -> Blocks | None:
    """``blocks=`` as name -> list of slices: a single slice per name is taken as a list of
    one (found in review: the documented "name -> index slices" raised ``TypeError: 'slice'
    object is not iterable`` for one slice).

    Raises:
        TypeError: for a mapping whose values are neither a slice nor a list or tuple of slices.
        ValueError: for a slice whose step is not a positive int (torch cannot index with it).
    """
    if blocks is None:
        return None
    if not isinstance(blocks, Mapping):
        raise TypeError(
            f"blocks must be a dict name -> slice (or list of slices) of indices, got "
            f"{type(blocks).__name__}"
        )
    out: Blocks = {}
    for name, value in blocks.items():
        slices = [value] if isinstance(value, slice) else value
        if not isinstance(slices, (list, tuple)) or not all(isinstance(s, slice) for s in slices):
            raise TypeError(
                f"blocks[{name!r}] must be a slice or a list of slices of indices, got {value!r}"
            )
        for s in slices:
            if s.step is not None and (not isinstance(s.step, int) or s.step < 1):
                raise ValueError(
                    f"blocks[{name!r}] holds {s!r}, whose step is not a positive int; torch "
                    "tensors take positive steps only: give the indices in increasing order"
                )
        out[name] = list(slices)
    return out
