"""Argument checks shared by the NQM modules (model, tuning, simulation): one home, no cycles."""

from __future__ import annotations

import math
import numbers
import sys
from pathlib import Path
from typing import Any

import numpy as np

from curvlab._numbers import is_int

# the seeds curvlab takes everywhere (curvlab._rng.SEED_RANGE, those of torch's manual_seed; a
# negative seed is taken modulo 2**64), repeated here so that the NQM stays free of torch
_SEED_RANGE = (-(2**63), 2**64 - 1)


def _real(value: object) -> float | None:
    """``value`` as a float if it is one real number: an int, a float, a numpy number, a 0-d
    array of an integer or float dtype, or a 0-d torch tensor of one (any dtype of those, on any
    device, with or without gradient: :func:`_tensor_real`); None for anything else. A bool
    (``True`` ran as batch size 1), a string (``"4"`` ran as 4 through ``float``) or an array
    of one entry (a raw TypeError from ``float``) is not a number here."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if _is_tensor(value):
        return _tensor_real(value)
    try:
        arr = np.asarray(value)
    except Exception:  # not array-like
        return None
    return float(arr) if arr.ndim == 0 and arr.dtype.kind in "iuf" else None


def _is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor (torch is not imported here: a tensor's module has
    imported it already)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _tensor_real(t: Any) -> float | None:
    """A 0-d torch tensor of an integer or floating dtype as a float (bfloat16, float16, one
    that requires gradient, one on a GPU: numpy reads none of these, and they were refused as
    "not a number" where ``float`` had taken them, found in review s19); None for a bool or
    complex one, or one of more dimensions (as for numpy arrays)."""
    dtype = t.dtype
    if t.ndim != 0 or dtype.is_complex or dtype is sys.modules["torch"].bool:
        return None
    try:
        return float(t.detach())
    except Exception:  # a quantized or meta tensor: no number to read
        return None


def _what(value: object) -> str:
    """How a refused value is shown: the number (as a float), else its repr with its type, or
    its shape."""
    x = _real(value)
    if x is not None:
        return repr(x)
    try:
        if isinstance(value, (str, bytes)):
            shape = None
        else:
            shape = tuple(value.shape) if _is_tensor(value) else np.shape(value)  # type: ignore[attr-defined]
    except Exception:  # a ragged list
        shape = None
    if shape:
        return f"an array of shape {shape} (pass a single number)"
    return f"{value!r} ({type(value).__name__}, not a number)"


def _positive(name: str, value: object) -> float:
    """A finite real number > 0 (numpy numbers too; never a bool or a string), as a float, or a
    ValueError naming ``name``."""
    x = _real(value)
    if x is None or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {_what(value)}")
    return x


def _unit(name: str, value: object) -> float:
    """A real number in [0, 1) (numpy numbers too; never a bool or a string), as a float, or a
    ValueError naming ``name``."""
    x = _real(value)
    if x is None or not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {_what(value)}")
    return x


def _file_target(path: Path, what: str) -> None:
    """Refuse a ``path`` to be written that exists and is not a regular file (a folder, say),
    naming it and ``what`` it was to hold, before any work: writing there fails, and did so only
    after the sweep or the drawing, with a raw ``IsADirectoryError`` (found in review)."""
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ValueError(
            f"'{path}' (the {what}) exists and is {kind}: it cannot be written or replaced; "
            "remove or rename it, or choose another path"
        )


def _power(value: object) -> float:
    """The preconditioning power p of P = H^p: a real number (numpy numbers, 0-d arrays and 0-d
    tensors too, as :func:`_real`; not a bool or a string, which ``float`` took and later
    formatting broke on with a raw TypeError) in [0, 1]."""
    x = _real(value)
    if x is None:
        raise ValueError(
            f"precond_power must be a number in [0, 1] (P = H^p), got {value!r} "
            f"({type(value).__name__}); pass e.g. precond_power=0.5"
        )
    if not 0.0 <= x <= 1.0:  # nan too
        raise ValueError(f"precond_power must be in [0, 1] (P = H^p), got {value!r}")
    return x


def _integer(name: str, value: object, least: int) -> int:
    """An integer (numpy integers, integral floats such as ``3.0`` and 0-d arrays or tensors of
    an integer or float dtype too, as :func:`_real`; never a bool or a string) of at least
    ``least``, or a ValueError naming ``name`` (2.7 was run as 2, -1 as 0 steps)."""
    if is_int(value):  # exactly, also beyond 2**53
        n = int(value)  # type: ignore[call-overload]
    else:
        x = _real(value)
        n = int(x) if x is not None and math.isfinite(x) and x == int(x) else None
    if n is None or n < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return n


def _real_array(name: str, value: object, as_float: bool = True) -> np.ndarray:
    """``value`` as a float64 array if every entry is a real number: a number, a list or tuple
    (nested too) of ints, floats and numpy numbers, or an array or CPU/GPU tensor of an integer
    or float dtype (bfloat16 too, read exactly); a ValueError naming ``name`` for anything else.
    A bool, a string, a complex number or ``None`` is no number here (``["1", "2"]`` was read as
    [1, 2], ``[True]`` as [1], a complex entry lost its imaginary part: review s21). With
    ``as_float=False`` integer entries stay int64 (exact beyond 2**53; floats become float64)."""
    if _is_tensor(value):
        t: Any = value
        if t.dtype.is_complex or t.dtype is sys.modules["torch"].bool:
            raise ValueError(f"{name} must hold real numbers, got a tensor of dtype {t.dtype}")
        try:
            t = t.detach().cpu()
            value = (t.double() if t.dtype.is_floating_point or as_float else t.long()).numpy()
        except Exception as err:  # a quantized or meta tensor
            raise ValueError(f"{name} must hold real numbers, got {_short(t)}") from err
    try:
        arr = np.asarray(value)
    except Exception as err:  # ragged, or not array-like
        raise ValueError(f"{name} must be an array of real numbers, got {_short(value)}") from err
    if arr.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} must hold real numbers (ints or floats; not bools, strings or complex "
            f"numbers), got dtype {arr.dtype} from {_short(value)}"
        )
    # numpy reads a list holding a bool among numbers ([True, 2]) as integers
    listed = not isinstance(value, np.ndarray) and arr.size
    if listed and any(_boolish(x) for x in np.asarray(value, dtype=object).flat):
        raise ValueError(f"{name} must hold real numbers, not bools, got {_short(value)}")
    if as_float or arr.dtype.kind == "f":
        return arr.astype(float, copy=False)
    return arr


def _boolish(x: object) -> bool:
    """A bool entry of a list: a Python or numpy bool, or a 0-d bool array or tensor (a list of
    ``torch.tensor(True)`` was read as 1: review s21)."""
    if isinstance(x, (bool, np.bool_)):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and (dtype == np.bool_ or str(dtype) == "torch.bool")


def _short(value: object) -> str:
    """``repr(value)``, cut to 80 characters (a long list is shown by its start)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _numpy_rng(seed: object) -> np.random.Generator:
    """The numpy generator of ``seed``: a ``numpy.random.Generator`` itself, else one seeded with
    the integer ``seed``; ``None`` means 0 (curvlab's rule, :func:`curvlab._rng.make_generator`:
    reproducible by default; it drew fresh OS entropy). The seeds are curvlab's
    (``curvlab._rng.SEED_RANGE``, a negative one taken modulo 2**64, as torch does).

    Raises:
        ValueError: naming ``seed`` for anything else (a bool, a float, a seed out of range, a
            ``torch.Generator``), before any draw.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng(0)
    if not (is_int(seed) and _SEED_RANGE[0] <= int(seed) <= _SEED_RANGE[1]):  # type: ignore[call-overload]
        if isinstance(seed, bool):
            why = "a bool is not a seed"
        elif not is_int(seed):
            why = f"a {type(seed).__name__}, not an int"
        else:
            why = "out of range"
        raise ValueError(
            "seed must be an int in [-2**63, 2**64 - 1] (a negative one is taken modulo 2**64), "
            f"None (= 0) or a numpy.random.Generator, got {seed!r} ({why})"
        )
    return np.random.default_rng(int(seed) % 2**64)  # type: ignore[call-overload]
