"""What the estimators need from a matrix: the operator protocol and a wrapper for explicit tensors.

Every estimator in :mod:`curvlab.estimators` works on any object with ``shape`` ``(D, D)``, ``dtype``,
``device`` and ``matmat`` (``(D, k) -> (D, k)``) for a real symmetric matrix, e.g. a
:class:`curvlab.operators.CurvatureOperator` or a :class:`TensorOperator` around a dense matrix.
``dtype`` is a real floating dtype (float64, float32, bfloat16, float16), and ``matmat`` is handed
``(D, k)`` blocks in that dtype on ``device`` by every estimator (a 16-bit operator gets 16-bit
vectors; the estimators keep their own vectors in float32 and accumulate in float64).

Example:
    >>> import torch
    >>> A = TensorOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    >>> A.matmat(torch.ones(3, 1)).squeeze(1)
    tensor([1., 2., 3.])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "LinearOperatorLike",
    "TensorOperator",
    "check_operator",
    "checks_values_once",
    "values_checked_once",
]

_F = TypeVar("_F", bound=Callable[..., Any])


@runtime_checkable
class LinearOperatorLike(Protocol):
    """A real symmetric ``D x D`` matrix applied to blocks of vectors in its ``dtype``."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - protocol
        ...


class TensorOperator:
    """An explicit real symmetric matrix as an operator (tests, small problems, baselines).

    Attributes:
        num_matvecs: products applied so far.

    Raises:
        ValueError: for a matrix that is not square.
        TypeError: for a matrix whose dtype is not a real floating dtype (complex, integer,
            bool: see :func:`check_operator`).
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        _check_dtype(matrix.dtype, "TensorOperator")
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


def _check_dtype(dtype: object, what: str) -> None:
    """Refuse a ``dtype`` that is not a real floating torch dtype, naming it."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return
    name = str(dtype).removeprefix("torch.")
    if isinstance(dtype, torch.dtype) and dtype.is_complex:
        why = (
            "the estimators are for real symmetric matrices: their float64 inner products "
            "would drop the imaginary parts (a Hermitian matrix with eigenvalues 0.5, 1, 3 "
            "gave 6.38 as its largest, marked converged); for a Hermitian H = B + iC use the "
            "real symmetric [[B, -C], [C, B]] of size 2D, whose eigenvalues are H's, each twice"
        )
    else:
        why = "the estimators' vectors and products are real floating point"
    raise TypeError(
        f"{what} has dtype {name}; it must be a real floating dtype (float64, float32, "
        f"bfloat16 or float16): {why}"
    )


def check_operator(op: object) -> LinearOperatorLike:
    """Raise a clear error unless ``op`` follows :class:`LinearOperatorLike`.

    Raises:
        TypeError: for an object that lacks ``shape``, ``dtype``, ``device`` or ``matmat``, or
            whose ``dtype`` is not a real floating torch dtype (found in review s19: a complex
            Hermitian operator had the imaginary parts of its inner products dropped, Lanczos
            giving 6.38 for eigenvalues 0.5, 1, 3 with ``converged=True``; an integer one raised
            raw torch errors). A :class:`~curvlab.operators.CurvatureOperator` takes complex
            vectors (``A Re v + i A Im v``), but its ``dtype`` is real.
        ValueError: for a shape that is not ``(D, D)`` with ``D >= 1``.
    """
    missing = [a for a in ("shape", "dtype", "device", "matmat") if not hasattr(op, a)]
    if missing:
        raise TypeError(
            f"{type(op).__name__} is not an operator: it lacks {missing}; pass a "
            "CurvatureOperator (cl.curvature_operator) or wrap a matrix in TensorOperator"
        )
    _check_dtype(op.dtype, f"operator {type(op).__name__}")  # type: ignore[attr-defined]
    shape = tuple(op.shape)  # type: ignore[attr-defined]
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
        raise ValueError(f"operator must be square and non-empty, got shape {shape}")
    return op  # type: ignore[return-value]


def values_checked_once(op: object, caller: str) -> AbstractContextManager[None]:
    """A run of products of ``op`` with no code of the user's between them (an estimator,
    ``caller`` its name): a :class:`~curvlab.operators.CurvatureOperator` compares the values of
    the model's parameters and buffers (changes through ``.data``) before the run's first
    product and after its last rather than before every product (its
    ``_values_checked_once``); any other operator is left as it is (looked up on the class: an
    instance's ``__getattr__`` is not run)."""
    enter = getattr(type(op), "_values_checked_once", None)
    return enter(op, caller) if callable(enter) else nullcontext()


def checks_values_once(fn: _F) -> _F:
    """Run the estimator ``fn`` (its first argument the operator, positional or ``op=``) inside
    :func:`values_checked_once`: on GPT-2 small a fingerprint of the model's values costs about
    2% of a Hessian product on a CPU, two per run instead of one per product."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        op = args[0] if args else kwargs.get("op")
        with values_checked_once(op, f"{fn.__name__}(...)"):
            return fn(*args, **kwargs)

    return cast(_F, wrapper)
