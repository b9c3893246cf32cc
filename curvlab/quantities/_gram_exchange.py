"""Gram blocks across ranks for :func:`~curvlab.fisher_norms` under ``torch.distributed``.

With ``F = w V^T V`` and the rows ``V`` split over ranks (``V_r`` on rank ``r``),

    ``||F||_F^2 = w^2 sum_{r, s} ||V_r V_s^T||_F^2``,

so each rank needs the Gram blocks of its own rows with every other rank's rows. Rank ``s``
broadcasts its rows one chunk at a time (the same bounded chunks, at most 256 MiB each, that
:func:`~curvlab.fisher_norms` already uses; Linear layers travel as their factors ``a_n, g_n``, see
:mod:`curvlab.quantities._gram`), and every other rank ``r`` adds ``sum_i ||V_{r,i} V_{s,j}^T||_F^2``
over its own chunks ``i``. Summed over ranks (by the caller's final all-reduce) this is the sum over
all ordered pairs ``r != s``; the pairs ``r = s`` are each rank's local sum. Cost: every row crosses
the network once (``O(N d)`` bytes for ``N`` examples, less for Linear layers) and the Gram work is
that of one process, spread over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvlab.distributed import Comm
from curvlab.quantities._gram import DenseRows, LayerRows, OuterRows

__all__ = ["cross_rank_frob_sq", "pack_rows", "unpack_rows"]


def pack_rows(rows: LayerRows) -> tuple[list[tuple], Tensor]:
    """A chunk's rows as (layout, one flat tensor)."""
    layout: list[tuple] = []
    tensors: list[Tensor] = []
    for part in rows.parts:
        if isinstance(part, OuterRows):
            layout.append(("outer", tuple(part.A.shape), tuple(part.G.shape), part.bias))
            tensors += [part.A, part.G]
        else:
            layout.append(("dense", tuple(part.P.shape)))
            tensors.append(part.P)
    return layout, torch.cat([t.detach().reshape(-1) for t in tensors])


def unpack_rows(layout: list[tuple], flat: Tensor) -> LayerRows:
    """The inverse of :func:`pack_rows`."""
    parts: list[OuterRows | DenseRows] = []
    start = 0

    def take(shape: tuple) -> Tensor:
        nonlocal start
        size = 1
        for s in shape:
            size *= s
        out = flat[start : start + size].view(shape)
        start += size
        return out

    for entry in layout:
        if entry[0] == "outer":
            a = take(entry[1])
            g = take(entry[2])
            parts.append(OuterRows(a, g, entry[3]))
        else:
            parts.append(DenseRows(take(entry[1])))
    return LayerRows(parts)


def cross_rank_frob_sq(
    comm: Comm,
    num_chunks: int,
    factor: Callable[[int], LayerRows],
    backend: str,
    frob_sq: Callable[[LayerRows, LayerRows], Tensor] | None = None,
) -> Tensor:
    """``sum_{s != r} sum_{i, j} ||V_{r,i} V_{s,j}^T||_F^2`` on this rank ``r`` (float64, 0-dim).

    Args:
        comm: the group; every rank must call this together.
        num_chunks: this rank's number of chunks of rows.
        factor: ``factor(i)`` gives this rank's chunk ``i`` of rows.
        backend: the name of the backend that computed this rank's rows (named in the error
            when the ranks' rows cannot be paired).
        frob_sq: ``||V_i V_j^T||_F^2`` (float64, 0-dim) of two chunks of rows, in Gram blocks
            within the caller's memory budget (``None``: the whole block at once).

    Returns:
        This rank's part of the cross-rank sum.

    Raises:
        ValueError: on every rank, when the ranks' rows come from other layers or backends.
    """
    first = factor(0)  # every rank has at least one chunk
    gathered = comm.all_gather_object((num_chunks, first.layers, backend))
    counts = [c for c, _, _ in gathered]
    layers = [names for _, names, _ in gathered]
    if any(names != layers[0] for names in layers):  # every rank sees the same and raises
        other = next(r for r, names in enumerate(layers) if names != layers[0])
        raise ValueError(_unpaired(0, other, gathered))
    _, flat0 = pack_rows(first)
    dtype, device = flat0.dtype, flat0.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for src in range(comm.size):
        for j in range(counts[src]):
            if src == comm.rank:
                layout, flat = pack_rows(factor(j))
                meta = [layout, flat.numel()]
            else:
                meta = [None, None]
            _broadcast_object(comm, meta, src)
            layout, numel = meta
            if src != comm.rank:
                flat = torch.empty(numel, dtype=dtype, device=device)
            comm.broadcast_(flat, src)
            if src == comm.rank:
                continue
            Vj = unpack_rows(layout, flat)
            for i in range(num_chunks):
                if frob_sq is not None:  # within the caller's Gram budget (found in review:
                    # one example's rows past it formed the whole block between ranks)
                    total += frob_sq(factor(i), Vj)
                else:
                    total += (factor(i).gram(Vj).double() ** 2).sum()  # no float32 overflow
    return total


def _unpaired(rank: int, other: int, gathered: list[tuple]) -> str:
    """Why rows of ``rank`` and ``other`` cannot be paired: other layers, or other backends."""
    backends = [be for _, _, be in gathered]

    def rows(r: int) -> str:
        names = gathered[r][1]
        if names:
            return f"layers {list(names)}"
        return "rows of all parameters at once, no per-layer rows"

    where = ", ".join(f"rank {r} ({backends[r]} backend): {rows(r)}" for r in (rank, other))
    if backends[rank] != backends[other]:
        # found in review: a forward that branches on its batch made the hooks backend hand over
        # to func on one rank only, and the message read "rank 1: []" as if no layer ran there
        return (
            "fisher_norms under torch.distributed: the ranks computed their rows with different "
            f"backends ({where}): a backend handed over on some ranks' data only (e.g. a forward "
            "that branches on its batch, running a layer twice for some inputs), and the Gram "
            "blocks pair the ranks' rows part by part; pass the same backend on every rank, "
            "backend='func' (any model)"
        )
    return (
        f"fisher_norms under torch.distributed: the ranks ran different layers ({where}), e.g. "
        "a multi-task model with another head on each rank, and the Gram blocks pair the ranks' "
        "rows layer by layer; measure each task's data on all ranks, or pass backend='func'"
    )


def _broadcast_object(comm: Comm, obj: list, src: int) -> None:
    group = comm.group
    global_src = src if group is None else torch.distributed.get_global_rank(group, src)
    torch.distributed.broadcast_object_list(obj, global_src, group=group)
