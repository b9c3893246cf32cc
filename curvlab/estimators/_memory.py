"""Memory of the estimators: parameter-vectors, budgets and clear refusals before large allocations.

The estimators' own memory is counted in *parameter-vectors*: tensors of ``D`` entries (``D`` the
operator's size, the number of selected parameters) in the dtype they are stored in, which is the
model's dtype except for 16-bit models, whose vectors are kept in float32
(:func:`storage_dtype`). At GPT-2-small scale (``D = 124M``) one float32 vector is 0.5 GB, so an
estimator that holds ``O(steps)`` of them (a Krylov basis) or ``O(probes)`` of them (a block of
probes) must bound that count from a budget. Before it allocates, an estimator compares what it
will need with its budget and with the memory available on the device (:func:`available_bytes`),
and a computation that cannot fit raises :class:`EstimatorMemoryError` with the numbers and the
option to change, instead of torch's raw allocation error.

Example:
    >>> import torch
    >>> vector_bytes(1000, storage_dtype(torch.bfloat16))
    4000
    >>> format_bytes(30_195_409_920)
    '28.1 GiB (30,195,409,920 bytes)'
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from curvlab._numbers import is_budget, is_int
from curvlab._precision import accumulation_dtype

__all__ = [
    "DEFAULT_BASIS_BYTES",
    "PROJECTION_START",
    "SIXTEEN_AIM",
    "agree",
    "lanczos_basis_size",
    "lanczos_held",
    "DEFAULT_FRACTION",
    "EstimatorMemoryError",
    "available_bytes",
    "budget_limit",
    "check_basis_device",
    "check_memory_budget",
    "default_budget",
    "format_budget",
    "format_bytes",
    "guard_allocation",
    "projection_bytes",
    "require",
    "sixteen_bit",
    "storage_dtype",
    "vector_bytes",
]

DEFAULT_BASIS_BYTES = 4 * 2**30
"""Bytes a Lanczos basis may take by default before it is made smaller than ``max(120, 3k)``
vectors (never below ``max(10, 2k + 2)``): 4 GiB, i.e. the full default basis (121 vectors with
the next one) for models up to about 8.9M float32 (4.4M float64) parameters (until review s23
this read 17M and 8M, twice the sizes that fit)."""

DEFAULT_FRACTION = 0.5
"""The share of the memory available on a device that an estimator's blocks (probes, a basis) may
take by default; the rest is left to the curvature products."""

CHUNK_ELEMENTS = 2**22
"""Entries of the temporaries of row-chunked reductions and basis rotations (16 MiB in float32).
The budgets count parameter-vectors, not these temporaries: a rotation or a small float64 basis
stacked for one product (:func:`curvlab.estimators._krylov.project_out`) takes up to
``min(CHUNK_ELEMENTS, (m + 1) D)`` entries more (32 MiB in float64) for a moment."""

PROJECTION_START = 128
"""Rows of a new Krylov basis' projection (:class:`curvlab.estimators._krylov.KrylovBasis`),
doubled as the basis grows past them (128 KiB in float64)."""


class EstimatorMemoryError(MemoryError):
    """A computation that cannot fit in its budget or in the memory available, raised before it
    allocates; the message gives the bytes needed, the bytes allowed and the option to change.

    Attributes:
        needed: bytes the computation needs.
        allowed: the bytes it may use (the budget or the memory available).
    """

    def __init__(self, message: str, needed: int, allowed: int | None) -> None:
        super().__init__(message)
        self.needed = needed
        self.allowed = allowed


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype estimators keep parameter-vectors in: float32 for 16-bit floats, else ``dtype``
    (the accumulation dtype of :mod:`curvlab._precision`)."""
    return accumulation_dtype(dtype)


SIXTEEN_AIM = 4
"""For a 16-bit operator a Krylov recurrence aims at ``tol / SIXTEEN_AIM`` before its residuals
are measured with products: the measurement adds the products' rounding, and a pair that met
``tol`` itself missed it by a hair and the message blamed the rounding (review s27); a measured
residual over ``SIXTEEN_AIM`` times the recurrence's is the rounding's doing."""


def sixteen_bit(dtype: torch.dtype) -> bool:
    """Whether an operator of ``dtype`` computes its products in 16 bits (float16, bfloat16)
    while its vectors are kept in float32 (:func:`storage_dtype`): the residuals a Krylov
    recurrence reads off then claim an accuracy far below the products' rounding, so the
    estimators measure them with products instead (review s27)."""
    return storage_dtype(dtype) != dtype


def vector_bytes(dim: int, dtype: torch.dtype) -> int:
    """Bytes of one parameter-vector of ``dim`` entries of ``dtype``."""
    return dim * torch.empty((), dtype=dtype).element_size()


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with the exact count, e.g. ``'1.5 GiB (1,610,612,736 bytes)'``."""
    value, unit = float(n), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, name
    if unit == "bytes":
        return f"{int(n):,} bytes" if float(n).is_integer() else f"{float(n):g} bytes"
    return f"{value:.1f} {unit} ({int(n):,} bytes)"


def available_bytes(device: torch.device | str) -> int | None:
    """Memory an allocation on ``device`` can use now, or ``None`` where it cannot be told.

    CUDA: the driver's free memory plus what torch's caching allocator holds unused. CPU: the
    kernel's ``MemAvailable`` (``/proc/meminfo``), else ``psutil`` where installed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(cached, 0))
    if device.type == "cpu":
        return _host_available()
    return None


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_memory_budget(memory_budget: object, name: str = "memory_budget") -> None:
    """Refuse a ``memory_budget=`` that is not a number of bytes, before any work.

    Accepted: ``None`` (the estimator's default: half the memory available, and at most
    1 GiB for probe blocks), a real number
    ``> 0`` (numpy scalars too), or ``float("inf")``: no budget of the caller's, so only the
    memory available limits the estimator (its default caps, half the memory available and
    1 GiB of probes, do not apply). A ``bool``, NaN, zero, a negative number or a string is
    refused (found in review: ``trace`` read NaN and ``"x"`` as budgets after its forward pass,
    and ``-1`` as a real budget).

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if is_budget(memory_budget):
        return
    why = ""
    if is_int(memory_budget) and int(memory_budget) > 0:  # type: ignore[call-overload]
        why = " (an int beyond float's range: pass float('inf') for no budget)"
    raise ValueError(
        f"{name} must be a number of bytes > 0 (an int, a float or a numpy scalar), "
        f"float('inf') (no budget) or None (the default), got {memory_budget!r}{why}"
    )


def check_basis_device(basis_device: object) -> torch.device | None:
    """``basis_device=`` as a ``torch.device`` (``None`` stays ``None``: the operator's
    device), refused before any work when torch does not know it or this machine lacks it.

    Found in review: ``"bogus"``, and ``"cuda"`` on a machine without a GPU, were refused by
    ``spectral_density`` and ``eigenvalues`` with torch's raw message after the data was read.

    Raises:
        ValueError: naming the value and what to pass instead.
    """
    if basis_device is None:
        return None
    hint = "pass 'cpu', 'cuda', 'cuda:<index>', a torch.device, or None (the operator's device)"
    if not isinstance(basis_device, (str, torch.device)):
        raise ValueError(
            f"basis_device must be a device name or a torch.device; {hint}, got {basis_device!r}"
        )
    try:
        device = torch.device(basis_device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"basis_device={basis_device!r} is not a device torch knows; {hint}"
        ) from None
    if device.type == "cpu":
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    count = getattr(torch, device.type, None)
    count = getattr(count, "device_count", None)
    if not (callable(available) and available()):
        raise ValueError(
            f"basis_device={basis_device!r}: no {device.type} device is available on this "
            "machine; pass 'cpu' (host memory) or None (the operator's device)"
        )
    if device.index is not None and callable(count) and device.index >= count():
        raise ValueError(
            f"basis_device={basis_device!r}: this machine has {count()} {device.type} "
            f"device(s) (indices 0..{count() - 1}); pass one of them, 'cpu' or None"
        )
    return device


def budget_limit(memory_budget: float | None) -> int | float | None:
    """A checked budget (:func:`check_memory_budget`) for :func:`require`: an ``int`` for whole
    bytes, else the ``float`` as given (``0.5`` read "memory_budget=0" in the refusals until
    review s23); ``None`` for no budget (``None`` or ``inf``)."""
    if memory_budget is None or math.isinf(memory_budget):
        return None
    value = float(memory_budget)
    return int(value) if value.is_integer() else value


def format_budget(budget: float) -> str:
    """A budget as the caller gave it: ``'1,048,576'``, ``'0.5'``, ``'1,000.25'``."""
    value = float(budget)
    return f"{int(value):,}" if value.is_integer() else f"{value:,.15g}"


def require(
    what: str,
    needed: int,
    device: torch.device | str | None,
    hint: str,
    budget: float | None = None,
    budget_name: str = "memory_budget",
) -> None:
    """Raise :class:`EstimatorMemoryError` unless ``needed`` bytes fit the budget and the device.

    Args:
        what: the computation and its blocks, e.g. ``"a Lanczos basis of 31 vectors of 124,439,808
            float32 entries"``.
        needed: bytes it needs.
        device: where they would be allocated (``None``: the budget only, not the memory
            available).
        hint: the options that change the need (named in the message).
        budget: the caller's budget in bytes, if any (:func:`budget_limit`).
        budget_name: the option that set the budget.
    """
    if budget is not None and needed > budget:
        raise EstimatorMemoryError(
            f"{what} needs {format_bytes(needed)}, more than {budget_name}="
            f"{format_budget(budget)} ({format_bytes(budget)}); {hint}",
            needed,
            int(budget),
        )
    avail = None if device is None else available_bytes(device)
    if avail is not None and needed > avail:
        raise EstimatorMemoryError(
            f"{what} needs {format_bytes(needed)} on {torch.device(device)}, but only "
            f"{format_bytes(avail)} are available there; {hint}",
            needed,
            avail,
        )


def default_budget(device: torch.device | str) -> int | None:
    """The default budget of an estimator's blocks on ``device``: :data:`DEFAULT_FRACTION` of the
    memory available now (``None`` where that cannot be told)."""
    avail = available_bytes(device)
    return None if avail is None else int(DEFAULT_FRACTION * avail)


def lanczos_basis_size(
    dim: int,
    dtype: torch.dtype,
    k: int,
    max_basis: int | None,
    memory_budget: float | None,
    limit: int,
    return_vectors: bool,
    device: torch.device,
    *,
    available: bool = True,
) -> int:
    """The basis size ``m_max`` of :func:`~curvlab.estimators.lanczos_eigenvalues`, refused
    with the numbers before anything is allocated.

    ``max_basis`` if given (at least ``min(k + 2, D)``); else what ``memory_budget`` holds, at
    most ``max(120, 3k)`` (``inf``: ``max(120, 3k)`` cut to what the memory available holds);
    else ``max(120, 3k)`` while it takes at most
    :data:`DEFAULT_BASIS_BYTES`, else as many as fit there but at least ``max(10, 2k + 2)``,
    and at most half the memory available (:func:`default_budget`). Never more than ``D``.
    With ``available``, the projected problem's float64 host arrays (:func:`projection_bytes`,
    sized by the basis the run can reach, ``min(m_max, limit, D)`` vectors, not by ``m_max``)
    are checked against the host memory available as well; ``memory_budget`` does not cover
    them.

    Args:
        dim: the operator's size ``D``.
        dtype: the dtype the vectors are stored in (:func:`storage_dtype`).
        k: the eigenvalues wanted.
        max_basis, memory_budget, return_vectors: as in ``lanczos_eigenvalues``.
        limit: the most products the run may take (no basis grows past it).
        device: where the basis is kept.
        available: also consult the memory available on ``device`` (``False``: only what the
            arguments decide, the same on every rank; :func:`curvlab.eigenvalues` checks that
            before it reads the data).

    Raises:
        ValueError: ``max_basis`` below ``min(k + 2, D)``.
        EstimatorMemoryError: the basis does not fit ``memory_budget`` (or, with ``available``,
            the memory available).
    """
    vec = vector_bytes(dim, dtype)
    entries = f"{dim:,} {str(dtype).removeprefix('torch.')} entries"
    preferred = max(120, 3 * k)
    floor = min(dim, k + 2)
    rule = f"min(k + 2, D) = {floor}" if floor < k + 2 else f"k + 2 = {k + 2}"
    host = "" if device.type == "cpu" else ", or basis_device='cpu' to keep it in host memory"
    if max_basis is not None:
        if min(dim, max_basis) < floor:
            raise ValueError(f"max_basis must be at least {rule}, got {max_basis!r}")
        cap = max_basis
    elif memory_budget is not None and math.isinf(memory_budget):  # no budget: what is there
        cap = preferred
        avail = available_bytes(device) if available else None
        if avail is not None and lanczos_held(cap, limit, dim, k, return_vectors) * vec > avail:
            cap = max(floor, min(cap, avail // vec - 1))  # what fits (require() checks it)
    elif memory_budget is not None:
        cap = min(preferred, int(memory_budget // vec) - 1)
        if min(dim, cap) < floor:
            raise EstimatorMemoryError(
                f"lanczos_eigenvalues: memory_budget={format_budget(memory_budget)} "
                f"({format_bytes(memory_budget)}) holds {int(memory_budget // vec)} vectors of "
                f"{entries} ({format_bytes(vec)} each), but top-{k} Lanczos needs at least "
                f"{floor + 1} (max_basis >= {rule}, and the next vector); raise "
                f"memory_budget{host}",
                (floor + 1) * vec,
                int(memory_budget),
            )
    else:
        cap = max(min(preferred, DEFAULT_BASIS_BYTES // vec - 1), max(10, 2 * k + 2))
        budget = default_budget(device) if available else None
        if budget is not None and lanczos_held(cap, limit, dim, k, return_vectors) * vec > budget:
            cap = max(floor, min(cap, budget // vec - 1))  # what fits (require() checks it)
    cap = min(dim, cap)
    held = lanczos_held(cap, limit, dim, k, return_vectors)
    least = lanczos_held(floor, limit, dim, k, return_vectors)
    if least < held:
        extra = f", which needs {least} vectors" if return_vectors and least == 2 * k else ""
        hint = (
            f"pass a smaller max_basis (at least {rule}{extra}; a smaller basis restarts more "
            f"often) or memory_budget=<bytes> to size it{host}"
        )
    else:
        why = (
            f"return_vectors=True hands over the {k} Ritz vectors: {least} vectors"
            if return_vectors and least == 2 * k
            else f"the smallest basis, max_basis = {rule}, and the next vector: {least} vectors"
        )
        hint = (
            f"no basis size needs less ({why}); pass a smaller k"
            + (" or return_vectors=False" if return_vectors and least == 2 * k else "")
            + f", or raise memory_budget or free memory{host}"
        )
    require(
        f"lanczos_eigenvalues: a basis of up to {held} vectors of {entries}",
        held * vec,
        device if available else None,
        hint,
        budget=budget_limit(memory_budget),
    )
    if available:  # the projection, on the host whatever the basis' device (not the budget's)
        reach = min(cap, limit, dim)
        require(
            f"lanczos_eigenvalues: the projected problem of a basis of up to {reach} vectors "
            "(float64 arrays on the host)",
            projection_bytes(cap, reach, dim),
            torch.device("cpu"),
            "pass a smaller max_basis or max_matvecs, or free host memory",
        )
    return cap


def lanczos_held(cap: int, limit: int, dim: int, k: int, return_vectors: bool) -> int:
    """Parameter-vectors Lanczos can hold at once: the basis it can reach (``m + 1`` vectors
    with the next one; the newest product is the next vector), and ``2k`` while the Ritz
    vectors are handed over."""
    held = min(cap, limit, dim) + 1
    return max(held, 2 * k) if return_vectors else held


def projection_bytes(capacity: int, reach: int, dim: int) -> int:
    """Host bytes of a Krylov basis' projected problem at its peak (float64): the projection
    ``H``, ``n x n`` with ``n`` at most ``min(capacity, D, max(128, 2 reach))``
    (:data:`PROJECTION_START`, doubled as the basis grows), two of them while it grows, or
    ``H`` with four ``reach x reach`` arrays while the Ritz pairs are computed (the symmetric
    projection's temporaries, then the projection, its eigenvectors and LAPACK's ``2 m^2``
    workspace). ``reach``: the most vectors with a product that the basis can hold (at most
    the products of the run).

    Example:
        >>> projection_bytes(303_601, 21, 303_601)  # 20 products: 128 x 128 and 4 x 21 x 21
        145184
    """
    reach = min(reach, capacity, dim)
    start = min(capacity, dim, PROJECTION_START)
    n = min(capacity, dim, max(start, 2 * reach))
    growing = 2 * n * n if reach > start else 0
    return 8 * max(growing, n * n + 4 * reach * reach)


def agree(comm: Any, value: int, error: EstimatorMemoryError | None) -> int:
    """One memory-dependent decision for all ranks of an operator's process group.

    Under ``torch.distributed`` every product of a :class:`~curvlab.CurvatureOperator` is a
    collective (``comm`` is its group, ``None`` for a local operator), so every rank must take the
    same number and shape of products: a batch size or basis size derived from the memory
    available on one rank is replaced by the smallest over the ranks, and a refusal on any rank
    is raised on all of them (one ``all_gather_object`` of two numbers per call).

    Args:
        comm: the operator's group (:class:`curvlab.distributed.Comm`) or ``None``.
        value: this rank's decision.
        error: this rank's refusal, if any.

    Returns:
        The decision all ranks take.
    """
    if comm is None:
        if error is not None:
            raise error
        return value
    mine = None if error is None else (str(error), error.needed, error.allowed)
    gathered = comm.all_gather_object((value, mine))
    for rank, (_, refusal) in enumerate(gathered):
        if refusal is not None:
            message, needed, allowed = refusal
            raise EstimatorMemoryError(f"on rank {rank}: {message}", needed, allowed)
    return min(v for v, _ in gathered)


@contextlib.contextmanager
def guard_allocation(
    what: str, needed: int, device: torch.device | str, hint: str
) -> Iterator[None]:
    """Turn an allocation failure inside the block into :class:`EstimatorMemoryError` with the
    numbers (for allocations that passed :func:`require` but lost memory to something else)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise _as_memory_error(what, needed, device, hint) from exc
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc):
            raise
        raise _as_memory_error(what, needed, device, hint) from exc


def _as_memory_error(
    what: str, needed: int, device: torch.device | str, hint: str
) -> EstimatorMemoryError:
    avail = available_bytes(device)
    have = f"{format_bytes(avail)} are available now" if avail is not None else "memory ran out"
    return EstimatorMemoryError(
        f"{what} needs {format_bytes(needed)} on {torch.device(device)} and the allocation failed "
        f"({have}); {hint}",
        needed,
        avail,
    )
