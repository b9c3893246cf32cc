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
copy: one in the middle of its epoch is refused by name, before anything is read (found
however deep the wrapper holds it, :func:`held_persistent`); one between epochs is read through
its workers, and where a reading of curvlab's own stopped early is not taken for the caller's
epoch (:func:`mark_left`).

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
import weakref
from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["held_persistent", "mark_left", "readable"]


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
    for name, value in held_persistent(data):
        if _mid_epoch(value):
            raise ValueError(
                f"data ({type(data).__name__}) reads a DataLoader with persistent_workers=True "
                f"(its {name}) that is in the middle of an epoch: such a loader keeps one "
                "iterator, and reading it restarts the iterator your loop is consuming (the "
                "loop's epoch would end after its current batch); pass that DataLoader itself "
                "(curvlab reads a copy of it), another DataLoader over the same dataset, or a "
                "list of batches, or call curvlab between epochs"
            )
    return data


_DEPTH = 4  # wrappers of wrappers: DeviceLoader(Prefetch(loader)), {"train": loader}


def held_persistent(data: Any) -> list[tuple[str, DataLoader]]:
    """The ``persistent_workers=True`` DataLoaders a wrapper ``data`` holds, with where (as
    ``.loader.inner`` or ``.loaders['train']``): found in its instance attributes and, down to
    four levels, theirs, and in the lists, tuples and dict values they hold (each object once;
    found in review s25: two levels down or in a dict, one was read through and the caller's
    epoch ended). None for ``data`` itself a DataLoader (read through a copy) or a container."""
    if isinstance(data, (DataLoader, Tensor, tuple, list, Mapping, str, bytes)):
        return []
    found: list[tuple[str, DataLoader]] = []
    seen: set[int] = {id(data)}

    def walk(value: Any, where: str, depth: int) -> None:
        if id(value) in seen or isinstance(value, (Tensor, str, bytes, type)):
            return
        seen.add(id(value))
        if isinstance(value, DataLoader):
            if value.persistent_workers:
                found.append((where, value))
            return
        if depth >= _DEPTH:
            return
        if isinstance(value, Mapping):
            items = [(f"{where}[{k!r}]", v) for k, v in list(value.items())[:64]]
        elif isinstance(value, (list, tuple)):
            items = [(f"{where}[{i}]", v) for i, v in enumerate(value[:64])]
        else:
            fields = getattr(value, "__dict__", None)
            if not isinstance(fields, dict):
                return
            items = [(f"{where}.{k}", v) for k, v in fields.items()]
        for key, v in items:
            walk(v, key, depth + 1)

    fields = getattr(data, "__dict__", None)
    for name, value in fields.items() if isinstance(fields, dict) else []:
        walk(value, f".{name}", 1)
    return found


_LEFT: weakref.WeakKeyDictionary[DataLoader, tuple[Any, Any, int]] = weakref.WeakKeyDictionary()


def mark_left(loaders: list[tuple[str, DataLoader]]) -> None:
    """Record where a reading by curvlab left each loader's iterator: a reading through a wrapper
    that stops early (``analyze``'s check that the data reads again, an exact Fisher trace's
    first chunk) leaves it with some of its batches yielded, which is not the caller's epoch
    (review s25: the next call refused the wrapper as "in the middle of an epoch")."""
    for _, loader in loaders:
        it = getattr(loader, "_iterator", None)
        if it is not None:
            _LEFT[loader] = (it, getattr(it, "_sampler_iter", None), it._num_yielded)


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
    left = _LEFT.get(loader)
    if left is not None and left == (it, getattr(it, "_sampler_iter", None), done):
        return False  # where curvlab's own reading left it: the caller's epoch had ended
    try:
        return done < len(it)
    except TypeError:  # an IterableDataset without a length: its workers tell
        return any(getattr(it, "_workers_status", [True]))
