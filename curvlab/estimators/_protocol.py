"""What the estimators need from a matrix: the operator protocol and a wrapper for explicit tensors.

Every estimator in :mod:`curvlab.estimators` works on any object with ``shape`` ``(D, D)``, ``dtype``,
``device`` and ``matmat`` (``(D, k) -> (D, k)``) for a real symmetric matrix, e.g. a
:class:`curvlab.operators.CurvatureOperator` or a :class:`TensorOperator` around a dense or
sparse matrix.
``dtype`` is a real floating dtype (float64, float32, bfloat16, float16), and ``matmat`` is handed
``(D, k)`` blocks in that dtype on ``device`` by every estimator (a 16-bit operator gets 16-bit
vectors; the estimators keep their own vectors in float32 and accumulate in float64). Every
product is checked (:func:`checked_matmat`): a new ``(D, k)`` torch tensor, its input left as it
was.

Example:
    >>> import torch
    >>> A = TensorOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    >>> A.matmat(torch.ones(3, 1)).squeeze(1)
    tensor([1., 2., 3.])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "LinearOperatorLike",
    "TensorOperator",
    "check_operator",
    "checked_matmat",
    "checks_values_once",
    "values_checked_once",
]

_F = TypeVar("_F", bound=Callable[..., Any])


@runtime_checkable
class LinearOperatorLike(Protocol):
    """A real symmetric ``D x D`` matrix applied to blocks of vectors in its ``dtype``.

    ``matmat(V)`` takes a ``(D, k)`` block ``V`` and returns ``A V``:

    * as a torch tensor of ``V``'s shape ``(D, k)``, one column per column of ``V`` (a NumPy
      array, a ``(D,)`` vector or a ``(D, 1)`` column that broadcasts is refused: a product
      that answered the first column only gave a Hutchinson trace of 0.37 for 8.0, found in
      review s24);
    * without modifying ``V`` (the estimators reuse their probes and Krylov vectors after the
      product) and in new memory, not ``V`` itself or a view of it: write ``d[:, None] * V``,
      not ``V.mul_(d[:, None])`` (found in review s24: on ``diag(linspace(-1, 3, 8))``, trace
      8 and top eigenvalue 3, such a product gave a Hutchinson trace of 21.7, Hutch++ -3219
      and a Lanczos top eigenvalue of 57.2 marked converged), and ``V.clone()`` for the
      identity.

    A product that breaks these rules is refused, naming the operator's class: a
    ``TypeError`` for a result that is not a tensor, a ``ValueError`` otherwise
    (:func:`checked_matmat`). A result that requires grad is taken detached.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - protocol
        ...


class TensorOperator:
    """An explicit real symmetric matrix as an operator (tests, small problems, baselines):
    a dense tensor, or a sparse one (COO, CSR, CSC, BSR, BSC: its products are ``A @ V``).

    Attributes:
        num_matvecs: products applied so far.

    Raises:
        ValueError: for a matrix that is not square, or not symmetric: ``max |A - A^T|`` above
            ``2 max(D, 256) eps ||A||_F`` (``eps`` the machine epsilon of its dtype; see
            :func:`symmetry_tolerance`). The estimators take every matrix as symmetric: a
            ``6 x 6`` ``randn`` matrix, whose eigenvalues are complex, had Lanczos top
            eigenvalues ``[2.12, 1.19]`` marked converged (found in review s24). Pass
            ``(A + A.T) / 2``, the symmetric part, where that is the matrix meant. A matrix
            holding NaN or inf is not refused here: its products are (``NonFiniteError``).
        TypeError: for a matrix whose dtype is not a real floating dtype (complex, integer,
            bool: see :func:`check_operator`), and for a compressed sparse matrix whose
            product torch does not implement for its dtype and device (on the CPU: a bfloat16
            or float16 CSR, CSC or BSR matrix, a BSC one of any dtype); pass
            ``matrix.to_sparse_coo()`` or a float32 copy.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        _check_dtype(matrix.dtype, "TensorOperator")
        _check_product(matrix)
        _check_symmetric(matrix)
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


def symmetry_tolerance(matrix: Tensor) -> float:
    """The largest ``|A_ij - A_ji|`` that rounding leaves in a matrix meant to be symmetric:
    ``2 max(D, 256) eps ||A||_F``, ``eps`` the machine epsilon of its dtype (``nan`` where the
    matrix is not finite).

    Derivation: ``A`` built as a product ``X Y`` whose exact value is symmetric (``B B^T``,
    ``Q diag(l) Q^T``) has entries that are dot products of length ``n``, each computed with an
    error of at most ``gamma_n (|X| |Y|)_ij``, ``gamma_n = n u / (1 - n u)`` and ``u = eps / 2``
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1); ``A_ij`` and ``A_ji`` sum
    the same products in orders that may differ, so they differ by at most
    ``2 gamma_n (|X| |Y|)_ij``, about ``n eps (|X| |Y|)_ij``. For ``B B^T``,
    ``(|B| |B|^T)_ij <= ||b_i|| ||b_j|| <= ||A||_2``; for ``Q diag(l) Q^T`` with orthonormal
    ``Q``, ``(|Q| |diag(l)| |Q|^T)_ij <= max |l| = ||A||_2 <= ||A||_F``. With ``n <= D`` and a
    factor 2 for ``gamma_n``'s denominator and a last rounding to the matrix's dtype (at most
    ``eps |A_ij|`` more) that is ``2 D eps ||A||_F``. A Gram matrix of many samples
    (``n >> D``) rounds like ``sqrt(n) u`` per entry in practice (Higham and Mary, SIAM J. Sci.
    Comput. 41, 2019; blocked BLAS sums less): ``D`` is taken at least 256, which covers
    ``n = 2^16`` terms summed one by one (float64 ``X^T X`` of ``10^6`` samples of ``D = 3``
    left ``12 eps ||A||_F``; autograd Hessians of an MLP with 436 parameters left less than
    ``0.3 eps ||A||_F``). A matrix that is not symmetric (``randn``) is off by about ``||A||``
    itself; what is accepted changes no trace (``z^T A z`` and ``Tr A`` are the symmetric
    part's) and moves eigenvalues by about as much as the tolerance. The norm is computed on
    ``A`` scaled by its largest entry (no overflow of the squares). A sparse matrix (COO, CSR,
    CSC, BSR, BSC) is read through its stored values (its entries that are not stored are 0).
    """
    a = _entries(matrix)
    values = a.values() if a.is_sparse else a
    if values.numel() == 0:
        return 0.0
    top = values.abs().amax()
    if not bool(torch.isfinite(top)):
        return math.nan
    if bool(top == 0):
        return 0.0
    norm = float(torch.linalg.vector_norm(values / top)) * float(top)  # ||A||_F
    return 2.0 * max(matrix.shape[0], 256) * torch.finfo(matrix.dtype).eps * norm


def _entries(matrix: Tensor) -> Tensor:
    """``matrix`` detached, 16-bit in float32 (the norm and the gap in float32); a sparse one as
    a coalesced COO tensor (found in review s25: the symmetry check's ``amax`` raised torch's
    ``NotImplementedError`` on a sparse layout, whose products had been exact)."""
    a = matrix.detach()
    a = a.float() if a.element_size() < 4 else a
    if a.layout == torch.strided:
        return a
    return (a if a.layout == torch.sparse_coo else a.to_sparse_coo()).coalesce()


def _check_symmetric(matrix: Tensor) -> None:
    """Refuse a matrix farther from symmetric than rounding leaves (:func:`symmetry_tolerance`);
    a matrix holding NaN or inf passes (its products are refused, naming the entries)."""
    tol = symmetry_tolerance(matrix)
    if math.isnan(tol):
        return
    a = _entries(matrix)
    diff = (a - a.T).coalesce().values() if a.is_sparse else a - a.T
    gap = float(diff.abs().amax()) if diff.numel() else 0.0
    if gap > tol:
        raise ValueError(
            f"TensorOperator takes a real symmetric matrix; this one is not symmetric: "
            f"max |A - A^T| = {gap:.3g}, above the {tol:.3g} that rounding leaves "
            f"(2 max(D, 256) eps ||A||_F). The estimators take every matrix as symmetric (a non-symmetric "
            f"one gives eigenvalues and densities of no matrix); pass (A + A.T) / 2, the "
            f"symmetric part, where that is the matrix meant"
        )


_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _check_product(matrix: Tensor) -> None:
    """Refuse a compressed sparse matrix (CSR, CSC, BSR, BSC) whose product torch does not
    implement for its dtype and device: one product with a zero column, before any estimator's
    (found in review s25: a bfloat16 or float16 CSR, CSC or BSR matrix on the CPU, and a BSC
    one of any dtype there, raised torch's raw ``NotImplementedError``/``RuntimeError`` at the
    first product). COO products are implemented for every floating dtype."""
    if matrix.layout not in _COMPRESSED:
        return
    try:
        with torch.no_grad():
            matrix @ torch.zeros(matrix.shape[1], 1, dtype=matrix.dtype, device=matrix.device)
    except (NotImplementedError, RuntimeError) as err:
        layout = str(matrix.layout).removeprefix("torch.sparse_").upper()
        name = str(matrix.dtype).removeprefix("torch.")
        cause = str(err).splitlines()[0] if str(err) else ""
        wider = matrix.dtype.itemsize < 4
        raise TypeError(
            f"TensorOperator: torch has no product of a {layout} sparse matrix of dtype {name} "
            f"on {matrix.device.type} with a dense block ({type(err).__name__}: {cause}); pass "
            "matrix.to_sparse_coo() (COO products take every floating dtype)"
            + (", or a float32 copy (matrix.to(torch.float32))" if wider else "")
        ) from err


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


def checked_matmat(op: Any, X: Tensor) -> Tensor:
    """``op.matmat(X)`` for a ``(D, k)`` block ``X``, checked as :class:`LinearOperatorLike`
    asks: a torch tensor of ``X``'s shape, ``X`` unmodified (its version counter, read before
    and after the product: no copy) and not shared with the result (the storage pointers: an
    in-place write through ``.data`` or NumPy does not move the version counter). Three
    comparisons per product: curvlab's own operators pass them at no cost. A block made under
    ``torch.inference_mode()`` is an inference tensor, which has no version counter (found in
    review s25: every estimator inside ``inference_mode`` raised torch's "Inference tensors do
    not track version counter"): the operator gets a copy made outside inference mode, one
    ``(D, k)`` copy per product there, checked the same way.

    Returns:
        The product (detached where it requires grad).

    Raises:
        TypeError: for a result that is not a torch tensor.
        ValueError: for a result of another shape, a product that modified ``X``, or a result
            in ``X``'s memory (``X`` itself, or a view of it), naming the operator's class.
    """
    name = type(op).__name__
    if X.is_inference():
        with torch.inference_mode(False):
            X = X.clone()  # a version counter to read
    version = X._version
    out = op.matmat(X)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{name}.matmat returned a {type(out).__name__}, not a torch.Tensor: it must return "
            f"A V as a tensor of V's shape {tuple(X.shape)} (torch.as_tensor(...) for a NumPy "
            "array)"
        )
    if out.shape != X.shape:
        raise ValueError(
            f"{name}.matmat returned a tensor of shape {tuple(out.shape)} for V of shape "
            f"{tuple(X.shape)}: it must return A V, of V's shape (D, k), one column per "
            "column of V (a product of the first column only, or one that broadcasts, gives "
            "wrong estimates)"
        )
    if X._version != version:
        raise ValueError(
            f"{name}.matmat modified its input V in place: the estimators reuse V after the "
            "product (a diagonal written V.mul_(d[:, None]) gave a Hutchinson trace of 21.7 for "
            "8.0); compute A V out of place (d[:, None] * V) or on a copy (V.clone())"
        )
    if (
        X.numel()
        and out.layout == torch.strided
        and X.layout == torch.strided
        and out.device == X.device
        and out.untyped_storage().data_ptr() == X.untyped_storage().data_ptr()
    ):
        raise ValueError(
            f"{name}.matmat returned V itself or a view of it: the estimators write into "
            "the products and reuse V, and a product written into V (through .data or NumPy, "
            "which do not show as a change) gives wrong estimates; return A V as a new tensor "
            "(V.clone() for the identity)"
        )
    return out.detach() if out.requires_grad else out


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
