"""Argument types shared by the example scripts (``type=`` of ``argparse``): a bad value is a clear
usage error when the arguments are parsed, before any folder is made or any work is done.

Every numeric option of every example uses one of these: a count is a :func:`positive_int` (or a
:func:`non_negative_int` where 0 means none), a learning rate, epoch count or target a
:func:`positive_float`, a penalty coefficient a :func:`non_negative_float`, a momentum or a
fraction of flipped labels a :func:`unit_interval`, and a comma-separated grid a
:func:`grid_of` one of them (``--lrs 0.05,0.1``). Non-finite numbers (``nan``, ``inf``) are
refused by every float type.

The examples run as scripts (``python examples/NAME.py``), so their own folder is on
``sys.path`` and they import this module by name.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "grid_of",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_floats",
    "positive_int",
    "positive_ints",
    "unit_interval",
]

T = TypeVar("T")


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0)


def _real(text: str, what: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _real(text, "a positive number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _real(text, "a finite number >= 0", lambda v: v >= 0)


def unit_interval(text: str) -> float:
    """A number in [0, 1) (a momentum, a fraction of flipped labels)."""
    return _real(text, "a number in [0, 1)", lambda v: 0 <= v < 1)


def grid_of(item: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse type: a comma-separated list of values each of type ``item`` (``"0.1,0.2"``).

    An empty entry (``"0.1,,0.2"``, ``""``) or a bad one is a usage error that names it.
    """

    def parse(text: str) -> list[T]:
        parts = [t.strip() for t in text.split(",")]
        if any(not t for t in parts):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated values like 0.1,0.2 (no empty entry), got {text!r}"
            )
        values = []
        for t in parts:
            try:
                values.append(item(t))
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(f"in {text!r}: {err}") from None
        return values

    parse.__name__ = f"grid of {getattr(item, '__name__', 'values')}"
    parse.__doc__ = f"A comma-separated list, each entry {getattr(item, '__name__', 'a value')}."
    return parse


positive_ints = grid_of(positive_int)
"""A comma-separated list of integers >= 1."""
positive_floats = grid_of(positive_float)
"""A comma-separated list of finite numbers > 0."""
