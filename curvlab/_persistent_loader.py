"""Reading a ``persistent_workers=True`` DataLoader without touching the caller's epoch.

Such a loader keeps one iterator: ``iter(loader)`` resets and returns it, so a reading by curvlab
inside the caller's loop over the same loader restarted the iterator that loop was consuming and
ran it out: the loop's epoch ended after its current batch, without a word (found in review s25).
Its workers also keep their RNG states across epochs in other processes, which curvlab cannot put
back: each reading advanced them, and a random augmentation differed between readings.

:func:`readable` gives what a reading iterates: for such a loader, a shallow copy that is not
persistent (no iterator of its own yet): the copy starts workers of its own for the reading and
shuts them down after it, seeded from the RNG state the reading runs on (as the first epoch of a
loader is), and the caller's iterator and workers are left as they were. The copy shares the
dataset, sampler and generators (nothing copied but the loader object). A loader held by a
wrapper (a ``DeviceLoader`` whose ``__iter__`` reads ``self.loader``) cannot be swapped for a
copy: one in the middle of its epoch is refused by name, before anything is read.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from curvlab._persistent_loader import readable
    >>> data = [(torch.zeros(2, 3), torch.zeros(2))]
    >>> readable(data) is data  # anything but a persistent loader is read as it is
    True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["readable"]


def readable(data: Any) -> Any:
    """What a reading of ``data`` iterates: ``data``, or a non-persistent copy of a
    ``persistent_workers=True`` DataLoader (see the module docstring).

    Raises:
        ValueError: for a wrapper holding a persistent loader in the middle of its epoch (the
            caller's loop), naming the wrapper, the loader and the ways out.
    """
    if isinstance(data, (Tensor, tuple, list, Mapping, str, bytes)):
        return data
    if isinstance(data, DataLoader):
        return _fresh_copy(data) if data.persistent_workers else data
    for name, value in getattr(data, "__dict__", {}).items():
        if isinstance(value, DataLoader) and value.persistent_workers and _mid_epoch(value):
            raise ValueError(
                f"data ({type(data).__name__}) reads a DataLoader with persistent_workers=True "
                f"(its .{name}) that is in the middle of an epoch: such a loader keeps one "
                "iterator, and reading it restarts the iterator your loop is consuming (the "
                "loop's epoch would end after its current batch); pass that DataLoader itself "
                "(curvlab reads a copy of it), another DataLoader over the same dataset, or a "
                "list of batches, or call curvlab between epochs"
            )
    return data


def _fresh_copy(loader: DataLoader) -> DataLoader:
    """A shallow copy of ``loader`` that is not persistent and has no iterator yet (the
    attributes set with ``object.__setattr__``: a DataLoader refuses to change
    ``persistent_workers`` after it is made)."""
    fresh = copy.copy(loader)
    object.__setattr__(fresh, "persistent_workers", False)
    object.__setattr__(fresh, "_iterator", None)
    return fresh


def _mid_epoch(loader: DataLoader) -> bool:
    """Whether ``loader``'s own iterator has yielded some but not all of its epoch's batches
    (of a length it cannot tell: some)."""
    it = getattr(loader, "_iterator", None)
    done = getattr(it, "_num_yielded", 0)
    if it is None or done == 0:
        return False
    try:
        return done < len(it)
    except TypeError:  # an IterableDataset without a length: its workers tell
        return any(getattr(it, "_workers_status", [True]))
