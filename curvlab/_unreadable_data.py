"""Data sources refused before anything is read: an endless ``itertools`` iterator and
Lightning's ``CombinedLoader``.

``itertools.cycle(loader)`` (a step-based loop's ``train_iter``), ``itertools.count()`` and
``itertools.repeat(batch)`` without ``times`` never end: a reading never stopped, and the
estimators that keep a one-shot iterator's batches filled memory until the process died
(review s26). A ``CombinedLoader`` yields ``(batch, batch_idx, dataloader_idx)`` triples whose
``batch`` holds one ``(inputs, targets)`` pair per loader it combines: curvlab refused its first
batch after reading it, with a hint (``(b[0], b[1])``) that does not work for it, and that
reading had moved its loaders' ``generator=`` (review s26: the next epoch's order changed).
Both are refused by :func:`refuse_unreadable` before the first batch is read.

Example:
    >>> import itertools
    >>> refuse_unreadable(itertools.islice(itertools.cycle([0]), 3))  # finite: accepted
    >>> refuse_unreadable(itertools.cycle([0]))
    Traceback (most recent call last):
    ...
    TypeError: data is an endless itertools.cycle ...
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

__all__ = ["refuse_unreadable"]


def _endless(data: Any) -> bool:
    """Whether ``data`` is an ``itertools`` iterator that never ends: a ``cycle``, a
    ``count``, or a ``repeat`` without ``times`` (whose ``__length_hint__`` raises
    ``TypeError``)."""
    if isinstance(data, (itertools.cycle, itertools.count)):
        return True
    if isinstance(data, itertools.repeat):
        try:  # not operator.length_hint, which turns the TypeError into 0
            data.__length_hint__()
        except TypeError:
            return True
    return False


def _is_combined_loader(data: Any) -> bool:
    """Whether ``data`` is Lightning's ``CombinedLoader`` (``lightning.pytorch.utilities`` or
    ``pytorch_lightning``): by its class name and its ``iterables``."""
    return any(c.__name__ == "CombinedLoader" for c in type(data).__mro__) and hasattr(
        type(data), "iterables"
    )


def _combined_hint(data: Any) -> tuple[str, str]:
    """How to name one loader of a ``CombinedLoader``: as ``data=`` (``combined.iterables['a']``)
    and within an item ``b`` of a loop over it (``b[0]['a']``)."""
    iterables = getattr(data, "iterables", None)
    if isinstance(iterables, Mapping) and iterables:
        key = repr(next(iter(iterables)))
        return f"combined.iterables[{key}]", f"b[0][{key}]"
    if isinstance(iterables, (list, tuple)) and iterables:
        return "combined.iterables[0]", "b[0][0]"
    return "combined.iterables", "b[0]"


def refuse_unreadable(data: Any) -> None:
    """Refuse, before anything is read, a source curvlab cannot read as a finite iterable of
    ``(inputs, targets)`` batches (see the module's docstring).

    Raises:
        TypeError: for an endless ``itertools.cycle``, ``count`` or ``repeat`` (pointing to
            ``itertools.islice(data, n)``), and for a Lightning ``CombinedLoader`` (naming one
            of its loaders: ``combined.iterables['a']``, or ``b[0]['a']`` of its items).
    """
    if _endless(data):
        name = type(data).__name__
        raise TypeError(
            f"data is an endless itertools.{name} iterator: it never stops yielding, so curvlab "
            "would read it forever (and keep its batches in memory); pass a finite number of "
            "batches, e.g. itertools.islice(data, n) for the first n batches, or the loader "
            "itself for one epoch"
        )
    if _is_combined_loader(data):
        loader, item = _combined_hint(data)
        keys = getattr(data, "iterables", None)
        held = f" (its loaders: {list(keys)})" if isinstance(keys, Mapping) else ""
        raise TypeError(
            f"data is a Lightning {type(data).__name__}, whose items are (batch, batch_idx, "
            "dataloader_idx) triples holding one (inputs, targets) batch per loader it "
            "combines; curvlab measures one source of (inputs, targets) batches: pass one of "
            f"its loaders itself, e.g. data={loader}{held} (an item b of a loop over the "
            f"combined loader holds that loader's pair as {item}; a list of such pairs works "
            "too)"
        )
