"""What counts as a number in an argument check: Python's and numpy's alike, never a bool.

Example:
    >>> import numpy as np
    >>> is_count(np.int64(3)), is_count(True), is_count(0, least=0)
    (True, False, True)
    >>> is_positive(np.float32(1e-4)), is_positive(float("inf")), is_positive(0)
    (True, False, False)
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["is_budget", "is_count", "is_int", "is_positive", "is_real"]


def is_int(x: object) -> bool:
    """Whether ``x`` is an integer (``int``, numpy integer; not ``bool``)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_count(x: object, least: int = 1) -> bool:
    """Whether ``x`` is an integer (:func:`is_int`) of at least ``least``."""
    return is_int(x) and int(x) >= least  # type: ignore[call-overload]


def is_real(x: object) -> bool:
    """Whether ``x`` is a finite real number (``int``, ``float``, numpy scalar; not ``bool``)
    that a float holds: an ``int`` beyond float's range (``10**400``) is not one (it raised a
    raw ``OverflowError`` in every argument check until review s23)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def is_positive(x: object) -> bool:
    """Whether ``x`` is a finite real number ``> 0``."""
    return is_real(x) and float(x) > 0  # type: ignore[arg-type]


def is_budget(x: object) -> bool:
    """Whether ``x`` is a ``memory_budget=``: ``None``, an ``int`` or ``float`` ``> 0`` (numpy
    scalars too) that a float holds, or ``float("inf")``; never a ``bool``, NaN, zero, a
    negative number, a string, a tensor, an ``int`` beyond float's range (``10**400``: pass
    ``float("inf")`` for no budget) or another kind of number (a ``Fraction`` passed until
    review s23, then broke the refusal messages, whose ``{:,}`` formats take ints and floats
    only)."""
    if x is None:
        return True
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        return False
    return is_positive(x) or (not is_int(x) and float(x) == math.inf)  # type: ignore[arg-type]
