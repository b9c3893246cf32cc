"""Probe vectors for the stochastic trace estimators, and how many go through an operator at once.

Probes have ``E[z z^T] = I`` (Rademacher or Gaussian). Probe ``j`` is always the ``j``-th draw from
the generator, so a run's probes are the same however memory splits them into batches.
:func:`probe_batch` sizes those batches from a memory budget (:data:`PROBE_VECTORS` parameter-vectors
per probe) and agrees on one size across ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.estimators._memory import (
    EstimatorMemoryError,
    agree,
    available_bytes,
    budget_limit,
    default_budget,
    require,
    storage_dtype,
    vector_bytes,
)

__all__ = [
    "PROBE_VECTORS",
    "PROBE_BLOCK_BYTES",
    "probe_rows",
    "draw_probes",
    "probe_batch",
    "batch_plan",
]


PROBE_VECTORS = 4
"""Parameter-vectors one probe of a batch costs at most: the probe, its product and the operator's
two buffers of a batched product (the per-parameter gradients and their concatenation)."""


def probe_rows(
    dim: int,
    k: int,
    generator: torch.Generator,
    distribution: str = "rademacher",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``k`` probes as the rows of a ``(k, dim)`` tensor with ``E[z z^T] = I``.

    Probe ``j`` is the ``j``-th draw of ``dim`` values from ``generator``, so a sequence of probes
    is the same however it is split into batches (and hence whatever memory allows).
    """
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    out = torch.empty(k, dim, device=device, dtype=dtype)
    if distribution == "gaussian":
        for row in out:
            torch.randn((dim,), generator=generator, out=row)
        return out
    # Rademacher: one random byte gives eight signs (its bits, lowest first), looked up in a
    # (256, 8) table: a quarter of the time of drawing each sign on its own (GPT-2 small: 0.14 s
    # instead of 0.54 s a probe)
    table = _sign_table(dtype, out.device)
    whole = dim // 8
    for row in out:
        drawn = torch.randint(
            0, 256, ((dim + 7) // 8,), dtype=torch.uint8, generator=generator, device=out.device
        ).long()
        torch.index_select(table, 0, drawn[:whole], out=row[: whole * 8].view(whole, 8))
        if dim > whole * 8:
            row[whole * 8 :] = table[drawn[whole]][: dim - whole * 8]
    return out


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(256, 8)``: row ``b`` holds the bits of byte ``b`` (lowest first) as -1/+1."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return (bits * 2 - 1).to(dtype)


def draw_probes(
    dim: int,
    k: int,
    generator: torch.Generator,
    distribution: str = "rademacher",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``k`` probe vectors as a ``(dim, k)`` tensor with ``E[z z^T] = I`` (the columns are the
    rows of :func:`probe_rows`: each probe one draw, in order)."""
    return probe_rows(dim, k, generator, distribution, device, dtype).T


PROBE_BLOCK_BYTES = 2**30
"""Default memory for one block of probes (without ``memory_budget=``): on GPT-2 small a probe and
its product take 1 GB, so probes go one at a time there; a W2-sized model still batches ten."""


def probe_batch(
    op,
    wanted: int,
    batch_size: int | None,
    memory_budget: float | None,
    what: str,
    default: int = 10,
    dtype: torch.dtype | None = None,
) -> int:
    """How many probes go through the operator at once.

    ``batch_size`` if given (refused with the numbers if its probes and products do not fit);
    else ``min(wanted, default)``, cut to what :data:`PROBE_VECTORS` vectors per probe allow
    within ``memory_budget`` (default: :data:`PROBE_BLOCK_BYTES`, or half the memory available on
    the operator's device if that is less), at least one. Under ``torch.distributed`` all ranks take the smallest batch
    (:func:`~curvlab.estimators._memory.agree`).

    Args:
        op: the operator (its ``shape``, ``device``, ``dtype`` and process group).
        wanted: probes still to apply.
        batch_size: the caller's batch size, if any.
        memory_budget: the caller's budget in bytes, if any.
        what: the estimator, named in a refusal.
        default: the batch size when memory allows.
        dtype: the probes' dtype (default: :func:`storage_dtype` of the operator's).
    """
    dtype = storage_dtype(op.dtype) if dtype is None else dtype
    try:
        k = batch_plan(
            op.shape[0], dtype, op.device, wanted, batch_size, memory_budget, what, default
        )
        refusal = None
    except EstimatorMemoryError as exc:
        k, refusal = 0, exc
    return agree(getattr(op, "_comm", None), k, refusal)


def batch_plan(
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    wanted: int,
    batch_size: int | None,
    memory_budget: float | None,
    what: str,
    default: int = 10,
    *,
    available: bool = True,
) -> int:
    """The batch of :func:`probe_batch` for ``dim`` entries of ``dtype`` on ``device``, on
    this rank, refused with the numbers where it cannot fit.

    Args:
        dim, dtype, device: the probes' size, dtype and device.
        wanted, batch_size, memory_budget, what, default: as in :func:`probe_batch`.
        available: also consult the memory available on ``device`` (``False``: only what the
            arguments decide, the caller's ``memory_budget``; :func:`curvlab.trace` checks that
            before it reads the data, and the batch it returns is then only an upper bound).

    Raises:
        EstimatorMemoryError: ``batch_size`` probes, or a single one, do not fit.
    """
    vec = vector_bytes(dim, dtype)
    entries = f"{dim:,} {str(dtype).removeprefix('torch.')} entries"
    budget_arg = budget_limit(memory_budget)
    where = device if available else None
    if batch_size is not None:
        k = min(int(batch_size), wanted)
        require(
            f"{what}: a batch of {k} probes, their products and the operator's buffers "
            f"({PROBE_VECTORS * k} vectors of {entries})",
            PROBE_VECTORS * k * vec,
            where,
            "pass a smaller batch_size, or batch_size=None to size batches from the memory "
            "available",
            budget=budget_arg,
        )
        return k
    k = min(wanted, default)
    budget: float | None = budget_arg
    if available and memory_budget is None:  # batching saves little and holds k products
        free = default_budget(device)
        budget = PROBE_BLOCK_BYTES if free is None else min(free, PROBE_BLOCK_BYTES)
    elif available and budget_arg is None:  # inf: no budget of the caller's, only what is there
        budget = available_bytes(device)
    if budget is not None:
        k = min(k, int(budget // (PROBE_VECTORS * vec)))
    if k < 1:
        require(
            f"{what}: one probe, its product and the operator's buffers "
            f"({PROBE_VECTORS} vectors of {entries})",
            PROBE_VECTORS * vec,
            where,
            "raise memory_budget" if memory_budget is not None else "free memory on the device",
            budget=budget_arg,
        )
        k = 1
    return k
