"""The critical batch size: where more examples per step stop buying fewer steps (Zhang et al.)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from curvlab.nqm._sweep import SweepResult

__all__ = ["critical_batch_size", "critical_batch_from_steps"]


def critical_batch_size(
    sweep: SweepResult,
    optimizer: str = "sgd",
    precond_power: float = 0.0,
    threshold: float = 2.0,
) -> float:
    """Batch size at which the examples needed B·S(B) reach ``threshold`` × their sweep minimum.

    The rule of :func:`critical_batch_from_steps` on the sweep's rows for ``optimizer`` and
    ``precond_power``.
    """
    rows = sweep.select(optimizer, precond_power)
    return critical_batch_from_steps(
        [r.batch_size for r in rows], [r.steps for r in rows], threshold
    )


def critical_batch_from_steps(
    batch_sizes: Sequence[float], steps: Sequence[float], threshold: float = 2.0
) -> float:
    """The critical batch size of measured (or predicted) steps-to-target against batch size.

    Perfect scaling (doubling B halves the steps) keeps B·S(B) constant; the critical batch size
    is where it has grown by ``threshold`` over its minimum (linear interpolation in log B,
    log(B·S)). For S(B) = S_min(1 + B*/B) and threshold 2 this is exactly B*. Batch sizes whose
    steps are not finite (the target was not reached) are left out. Returns ``inf`` if B·S never
    gets there (all batch sizes are below critical), ``nan`` if no batch size reached the target
    or every one met it at step 0 (the target at or above the initial risk: no scaling to read).

    Example:
        >>> # S(B) = 10 (1 + 100 / B), so B* = 100; interpolated between the measured sizes:
        >>> round(critical_batch_from_steps([1, 10, 100, 1000], [1010, 110, 20, 11]))
        101
    """
    if not threshold > 1:
        raise ValueError(f"threshold must be > 1, got {threshold!r}")
    rows = [(b, s) for b, s in zip(batch_sizes, steps) if math.isfinite(s)]
    if not rows or not any(s > 0 for _, s in rows):  # none reached it, or met at the start
        return math.nan
    b = np.array([r[0] for r in rows], dtype=float)
    e = b * np.array([r[1] for r in rows], dtype=float)
    level = threshold * e.min()
    above = np.flatnonzero(e >= level)
    above = above[above > int(np.argmin(e))]
    if above.size == 0:
        return math.inf
    k = int(above[0])
    x0, x1 = np.log(b[k - 1]), np.log(b[k])
    y0, y1 = np.log(e[k - 1]), np.log(e[k])
    frac = 1.0 if y1 == y0 else (np.log(level) - y0) / (y1 - y0)
    return float(np.exp(x0 + frac * (x1 - x0)))
