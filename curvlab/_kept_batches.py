"""Batches kept for several passes over the data, and the check that nothing overwrote them.

Operators, ``fisher_trace``, ``fisher_norms`` and the sharpness measurements read the data once
and keep its batches, because they pass over them many times. A loader that refills the same
tensors for every batch (in place, or through NumPy or ``.data`` behind the version counter) would
leave every kept batch holding the last one: :func:`read_batches` notices and raises.

Example:
    >>> import torch
    >>> from curvlab._kept_batches import read_batches
    >>> b = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    >>> len(read_batches([b, b, b]))  # the same unchanged batch three times counts three times
    3
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab._data import Batch, batch_tensors, iter_batches, iter_chunks
from curvlab._fingerprint import fingerprint, same_fingerprint

__all__ = ["ordinary", "read_batches", "read_chunks", "fingerprint", "same_fingerprint"]


def ordinary(batch: Batch) -> Batch:
    """``batch`` with each tensor made under ``torch.inference_mode()`` replaced by a clone made
    outside it (an ordinary tensor, with a version counter, that autograd can save); the batch
    itself where it holds none.

    Data made inside ``inference_mode`` is computed like data made outside it
    (docs/conventions.md). Before review s26 the operators, ``fisher_norms`` and the sharpness
    measurements raised torch's raw "Inference tensors do not track version counter" where they
    keep the batches, and ``diag_hessian`` refused such targets, while ``diag_fisher`` computed.
    """
    inputs, targets = batch
    if not any(t.is_inference() for t in batch_tensors(batch)):
        return batch
    with torch.inference_mode(False):

        def plain(t: Any) -> Any:
            return t.clone() if isinstance(t, Tensor) and t.is_inference() else t

        if isinstance(inputs, Mapping):
            inputs = {k: plain(v) for k, v in inputs.items()}
        return plain(inputs), plain(targets)


def read_batches(data: Any, finite: bool = True) -> list[Batch]:
    """All batches of ``data`` in a list (for computations that pass over them several times).

    A batch whose tensors share memory with a batch read earlier is checked against it: the
    earlier tensors' version counters, and for memory read again from the same start (a refilled
    buffer, yielded whole or cut to another batch size, ``buf[:n]``, ``buf[:, :T]``; or an
    unchanged batch listed twice) a fingerprint of the contents taken when they were read (a few
    entries and the sum, computed on the tensor's device without a host synchronisation;
    compared with one synchronisation). Only tensors of one storage are compared, so windows
    into one big tensor at other offsets cost no synchronisation and the check stays cheap for
    thousands of batches. Writes that bypass the version counter (a buffer from
    ``torch.from_numpy`` refilled through NumPy, ``.data.copy_``, a C or CUDA writer) are
    caught by the fingerprint (found in review: an operator's trace 2.0432 for 2.1744). The
    same unchanged tensors read again (``[batch] * 3``) are fine: they count each time.

    Each batch is kept as a new ``(inputs, targets)`` tuple, and a mapping of inputs as a new
    ``dict`` of the same tensors: replacing an entry of the caller's dict afterwards changes no
    kept batch (the tensors themselves are not copied; their in-place changes are checked by
    the computations that keep them).

    Raises:
        ValueError: when a batch read earlier was overwritten in place by a later one (a loader
            that refills the same tensors): the kept batches would all hold the last.
    """
    batches: list[Batch] = []
    kept: dict[tuple[str, int], list[_Kept]] = {}  # by storage: other storages cannot overlap
    for index, read in enumerate(iter_batches(data, finite)):
        batch = ordinary(read)  # inference tensors: ordinary clones (they have no version)
        for t in batch_tensors(batch):
            span, key, view = _span(t), _storage(t), _view(t)
            group = kept.setdefault(key, [])
            seen = False
            for entry in group:
                if not _overlap(entry.span, span):
                    continue
                # memory read again from the same start (a refilled buffer yielded whole or cut,
                # buf[:n] or buf[:, :T], or an unchanged batch listed twice): its contents now
                # against the fingerprint taken when it was read (one synchronisation); other
                # overlaps (windows into one tensor at other offsets): the version only
                same_view = entry.view == view
                same_start = entry.view[0] == view[0]
                changed = entry.tensor._version != entry.version or (
                    same_start
                    and not same_fingerprint(fingerprint(entry.tensor), entry.fingerprint)
                )
                if changed:
                    raise ValueError(
                        f"batch {entry.index} of data was overwritten in place by batch {index} "
                        "(a loader that refills the same tensors each time?); this computation "
                        "passes over the batches several times, so it keeps them: yield new "
                        "tensors per batch (e.g. clone them) or pass a list of batches"
                    )
                seen = seen or same_view
            if not seen:  # a view read before is checked through its first entry ([b] * 3)
                group.append(_Kept(index, t, t._version, span, view, fingerprint(t)))
        inputs, targets = batch
        if isinstance(inputs, Mapping):
            # the caller's dict of inputs is not kept: an entry replaced after the reading
            # (inputs["x"] = new, no in-place write) gave the products of a held operator over
            # several batches the new inputs with the old targets (found in review: off by 2.5)
            batch = (dict(inputs), targets)
        batches.append(batch)
    return batches


def read_chunks(
    data: Any, chunk_size: int | None, device: torch.device | None = None, finite: bool = True
) -> list[Batch]:
    """:func:`read_batches` split into chunks (:func:`iter_chunks`): all chunks in a list, for
    computations that pass over them several times, with the overwrite check of
    :func:`read_batches`; the list's ``pair`` is the iterator's :attr:`~curvlab._data.Chunks.pair`
    (two examples of the first batch that has two, for the examples-apart check)."""
    it = iter_chunks(read_batches(data, finite), chunk_size, device, finite=False)
    chunks = ChunkList(it)
    chunks.pair = it.pair
    return chunks


class ChunkList(list):
    """The chunks :func:`read_chunks` read, with the :attr:`~curvlab._data.Chunks.pair` of their
    iterator."""

    pair: Any = None


@dataclass
class _Kept:
    """A tensor of a batch :func:`read_batches` keeps, as it was when read."""

    index: int
    tensor: Tensor
    version: int
    span: tuple[int, int]
    view: tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]
    fingerprint: tuple[Tensor, Tensor]


def _storage(t: Tensor) -> tuple[str, int]:
    """The device and storage a tensor's elements live in (tensors of other storages or devices
    cannot overlap it)."""
    if t.device.type == "meta":
        return ("meta", id(t))
    return (str(t.device), t.untyped_storage().data_ptr())


def _view(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    """Where and how a tensor reads its memory: the same view means the same elements."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _span(t: Tensor) -> tuple[int, int]:
    """The byte range ``[start, end)`` a tensor's elements occupy."""
    if t.numel() == 0:
        return (0, 0)
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size())


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]
