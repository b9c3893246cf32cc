"""The check that every reading of the data within a call gives the batches of the first.

``analyze`` reads its data once per quantity and checkpoint (and ``noise_scale_hessian``'s
quantities come from one reading). Each reading runs on the random states the call found
(:mod:`curvlab._reading_rngs`), so a loader whose shuffling and augmentation draw from them reads
alike every time. One that draws from a generator curvlab cannot reach (held by a transform, a
closure, a ``Subset``'s dataset; a streaming source; a file changing on disk) gives other
batches at each reading, and the quantities of one report were those of other data: three
identical checkpoints gave losses 1.105 / 1.098 / 1.141 (found in review s25).

Within :func:`same_readings`, :func:`curvlab._data.iter_batches` hands every batch of ``data``
to :meth:`Readings.batch`: the first reading's batches are kept as fingerprints (the sum and 64
entries of each tensor, :func:`curvlab._fingerprint.fingerprint`; no copy of the data), and a
later reading that gives another batch, or more or fewer batches, raises
:class:`ReadingsDifferError` naming the cause and the ways out. A list of batches or one batch
gives the same tensors at every reading and is not checked. Costs a sum over each batch (as its
finiteness check does) and, for batches on a GPU, one synchronisation per tensor of a later
reading.

Example:
    >>> import torch
    >>> from curvlab._same_readings import ReadingsDifferError, same_readings
    >>> class Noisy:
    ...     def __iter__(self):
    ...         yield torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    >>> data = Noisy()
    >>> with same_readings(data) as readings:
    ...     readings.batch(0, next(iter(data)))
    ...     try:
    ...         readings.batch(0, next(iter(data)))
    ...     except ReadingsDifferError:
    ...         print("refused")
    refused
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torch import Tensor

from curvlab._fingerprint import fingerprint, same_fingerprint
from curvlab._persistent_loader import held_persistent

__all__ = ["Readings", "ReadingsDifferError", "reading_check", "same_readings"]


class ReadingsDifferError(ValueError):
    """The data gave other batches when read again within one call (a ``ValueError``; its own
    class so that ``analyze`` raises it whatever ``on_error`` says: every quantity would fail
    alike)."""


_Print = list[tuple[str, tuple[int, ...], Any, tuple[Tensor, Tensor]]]

_WATCHED: ContextVar[Readings | None] = ContextVar("curvlab_same_readings", default=None)


class Readings:
    """The fingerprints of the first reading of ``data``, and the check of every later one."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self._first: list[_Print] = []
        self._length: int | None = None  # the number of batches once a reading has ended
        self.failure: str | None = None  # the message, once a reading differed

    def batch(self, index: int, batch: tuple[Any, Tensor]) -> None:
        """Batch ``index`` of a reading: kept if no reading has gone this far, else compared.

        Raises:
            ReadingsDifferError: if it differs from batch ``index`` of the first reading, or a
                reading before had ended before it.
        """
        if self._length is not None and index >= self._length:
            self._fail(f"{index + 1} batches or more, where it gave {self._length} before")
        this = _print(batch)
        if index >= len(self._first):
            self._first.append(this)
        elif not _same(this, self._first[index]):
            self._fail(f"another batch {index}")

    def end(self, count: int) -> None:
        """A reading ended after ``count`` batches.

        Raises:
            ReadingsDifferError: if a reading before gave more, or ended after another count.
        """
        if (self._length is not None and count != self._length) or count < len(self._first):
            before = self._length if self._length is not None else len(self._first)
            self._fail(f"{count} batches, where it gave {before} before")
        self._length = count

    def raise_if_failed(self) -> None:
        """Raise the failure of a reading again (one a computation caught and recorded)."""
        if self.failure is not None:
            raise ReadingsDifferError(self.failure)

    def _fail(self, what: str) -> None:
        held = held_persistent(self.data)
        if held:  # its workers' RNGs live in other processes (review s25: the message blamed
            # an unreachable generator and told to draw from torch's global RNG, which it did)
            name = held[0][0]
            self.failure = (
                f"data ({type(self.data).__name__}) gave other batches when read again ({what}): "
                "this call reads the data several times (analyze once per quantity and "
                "checkpoint) and needs the same batches at every reading. data reads a "
                f"DataLoader with persistent_workers=True (its {name}) through its workers, "
                "whose random states live in other processes and move on at every reading "
                "(curvlab cannot put them back), so a random augmentation or shuffle in them "
                "reads otherwise each time. Pass that DataLoader itself (curvlab reads a "
                "non-persistent copy of it, its workers seeded alike at every reading), use "
                "persistent_workers=False, or pass a list of batches (e.g. list(loader))"
            )
            raise ReadingsDifferError(self.failure)
        self.failure = (
            f"data ({type(self.data).__name__}) gave other batches when read again ({what}): "
            "this call reads the data several times (analyze once per quantity and checkpoint) "
            "and needs the same batches at every reading, or its quantities would mix other "
            "data. curvlab runs every reading from the random state it found (torch's, numpy's "
            "and Python's global RNGs, and the generators of the loader, its sampler, its "
            "dataset and its collate_fn) and puts it back; a random augmentation or shuffle "
            "that draws from a generator it cannot reach (one a transform or a closure keeps, "
            "or a Subset's or ConcatDataset's inner dataset), a streaming "
            "source or changing files read otherwise each time. Pass a list of batches (e.g. "
            "list(loader), read once), or seed the augmentation inside the dataset (draw from "
            "torch's global RNG, or from a generator seeded from the index in __getitem__)"
        )
        raise ReadingsDifferError(self.failure)


@contextmanager
def same_readings(data: Any) -> Iterator[Readings]:
    """Every reading of ``data`` (by :func:`curvlab._data.iter_batches`) in the block checked
    against the first one read in it (a list of batches or one batch is not checked: it gives
    the same tensors every time). Yields the :class:`Readings`."""
    readings = Readings(data)
    token = _WATCHED.set(None if isinstance(data, (list, tuple)) else readings)
    try:
        yield readings
    finally:
        _WATCHED.reset(token)


def reading_check(data: Any) -> Readings | None:
    """The :class:`Readings` that checks the readings of ``data`` now, if any."""
    readings = _WATCHED.get()
    return readings if readings is not None and readings.data is data else None


def _print(batch: tuple[Any, Tensor]) -> _Print:
    """The fingerprint of each tensor of a batch, with its name, shape and dtype."""
    inputs, targets = batch
    named = sorted(inputs.items()) if isinstance(inputs, Mapping) else [("inputs", inputs)]
    return [
        (name, tuple(t.shape), t.dtype, fingerprint(t))
        for name, t in [*named, ("targets", targets)]
        if isinstance(t, Tensor)
    ]


def _same(a: _Print, b: _Print) -> bool:
    """Whether two batches' fingerprints agree (names, shapes, dtypes and
    :func:`~curvlab._fingerprint.same_fingerprint`)."""
    return len(a) == len(b) and all(
        x[:3] == y[:3] and same_fingerprint(x[3], y[3]) for x, y in zip(a, b)
    )
