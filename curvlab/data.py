"""Normalising ``data`` arguments and the example-weighted accumulation over batches.

Every entry point of curvlab takes ``data`` as either one batch or an iterable of batches:

* one batch is a ``tuple`` or ``list`` of length two whose first element is a Tensor,
  ``(inputs, targets)``;
* anything else (a ``DataLoader``, a list of batches, a generator) is iterated as batches.

An *example* is one index of the leading (batch) dimension of ``inputs``. Over several batches each
quantity is exactly the one of the objective on all the data together: an example-weighted mean under
``reduction="mean"``, the total under ``reduction="sum"``. curvlab achieves this by summing raw
negative-log-likelihood quantities over batches and scaling once at the end (:mod:`curvlab.losses`),
so ``data`` may be a one-shot iterator.

Example:
    >>> import torch
    >>> from curvlab.data import iter_batches
    >>> X, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    >>> [b[0].shape[0] for b in iter_batches((X, y))]
    [5]
    >>> [b[0].shape[0] for b in iter_batches([(X[:2], y[:2]), (X[2:], y[2:])])]
    [2, 3]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch", "is_single_batch", "iter_batches", "iter_chunks", "first_batch", "to_device"]

Batch = tuple[Tensor, Tensor]


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` batch rather than an iterable of batches."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def _check_batch(batch: Any, index: int) -> Batch:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            f"batch {index} of data is a {type(batch).__name__}, expected an (inputs, targets) pair; "
            "pass one batch as a tuple (X, y) or an iterable of such tuples (e.g. a DataLoader)"
        )
    inputs, targets = batch
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            f"batch {index} of data holds ({type(inputs).__name__}, {type(targets).__name__}); "
            "both inputs and targets must be torch Tensors"
        )
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"batch {index} of data has no examples (inputs of shape {tuple(inputs.shape)}); "
            "drop empty batches before passing the data"
        )
    if targets.ndim == 0 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"batch {index} of data has {inputs.shape[0]} inputs but targets of shape "
            f"{tuple(targets.shape)}; the leading dimensions must match"
        )
    return inputs, targets


def iter_batches(data: Any) -> Iterator[Batch]:
    """Yield validated ``(inputs, targets)`` batches from one batch or an iterable of batches.

    Raises:
        ValueError: if ``data`` holds no batch at all, or a batch has no examples.
        TypeError: if a batch is not a pair of Tensors.
    """
    if is_single_batch(data):
        yield _check_batch(data, 0)
        return
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data is a {type(data).__name__}; pass one batch as a tuple (inputs, targets) "
            "or an iterable of such tuples (e.g. a DataLoader)"
        )
    count = 0
    for index, batch in enumerate(data):
        count += 1
        yield _check_batch(batch, index)
    if count == 0:
        raise ValueError("data is empty: it yielded no batch; pass at least one (inputs, targets)")


def first_batch(data: Any) -> Batch:
    """The first batch of ``data`` (used for cheap up-front validation)."""
    if is_single_batch(data):
        return _check_batch(data, 0)
    if isinstance(data, Iterator):
        raise TypeError(
            "this function needs to look at the data twice; pass a list of batches or a DataLoader, "
            "not a one-shot iterator or generator"
        )
    return next(iter(iter_batches(data)))


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move a batch to ``device`` without blocking the host (no-op when already there)."""
    inputs, targets = batch
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def iter_chunks(
    data: Any, chunk_size: int | None, device: torch.device | None = None
) -> Iterator[Batch]:
    """Yield the batches of ``data`` split into chunks of at most ``chunk_size`` examples.

    ``chunk_size=None`` keeps the batches as they are. Chunks are moved to ``device`` if given.
    Splitting is exact for every curvlab quantity, since all of them are sums over examples.
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    for inputs, targets in iter_batches(data):
        n = inputs.shape[0]
        step = n if chunk_size is None else chunk_size
        for start in range(0, n, step):
            chunk = inputs[start : start + step], targets[start : start + step]
            yield chunk if device is None else to_device(chunk, device)
