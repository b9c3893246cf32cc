"""What the estimators need from a matrix: the operator protocol and a wrapper for explicit tensors.

Every estimator in :mod:`curvlab.estimators` works on any object with ``shape`` ``(D, D)``, ``dtype``,
``device`` and ``matmat`` (``(D, k) -> (D, k)``) for a symmetric matrix, e.g. a
:class:`curvlab.operators.CurvatureOperator` or a :class:`TensorOperator` around a dense matrix.

Example:
    >>> import torch
    >>> A = TensorOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    >>> A.matmat(torch.ones(3, 1)).squeeze(1)
    tensor([1., 2., 3.])
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["LinearOperatorLike", "TensorOperator", "check_operator"]


@runtime_checkable
class LinearOperatorLike(Protocol):
    """A symmetric ``D x D`` matrix applied to blocks of vectors."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - protocol
        ...


class TensorOperator:
    """An explicit symmetric matrix as an operator (tests, small problems, baselines).

    Attributes:
        num_matvecs: products applied so far.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for a ``(D, k)`` block."""
        self.num_matvecs += V.shape[1]
        return self.matrix @ V

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a vector of length ``D``."""
        return self.matmat(v[:, None])[:, 0]


def check_operator(op: object) -> LinearOperatorLike:
    """Raise a clear error unless ``op`` follows :class:`LinearOperatorLike`."""
    missing = [a for a in ("shape", "dtype", "device", "matmat") if not hasattr(op, a)]
    if missing:
        raise TypeError(
            f"{type(op).__name__} is not an operator: it lacks {missing}; pass a "
            "CurvatureOperator (cl.curvature_operator) or wrap a matrix in TensorOperator"
        )
    shape = tuple(op.shape)  # type: ignore[attr-defined]
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
        raise ValueError(f"operator must be square and non-empty, got shape {shape}")
    return op  # type: ignore[return-value]
