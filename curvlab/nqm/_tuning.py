"""NQM hyperparameter tuning: the fewest steps to a target risk and the hyperparameters that give them.

``optimal`` minimises the exact steps to target (:func:`curvlab.nqm._dynamics.first_crossing`) over
fine grids, as the paper does (Section 3.7.1):

* the learning rate on a log grid from 10^-``lr_decades`` times α_ss (the lr whose steady-state
  risk equals the target) up to the stability limit, then ``refine`` zoom rounds around the best;
  when the best point of that grid is next to the stability limit 2/a_max, also a log grid of the
  gap 1 − α a_max/2 over the best cell, three decades at a time down to 1e-9 while its best is
  its smallest gap, zoomed the same way (the optimum of a large batch lies a gap of ~1e-3 below
  the limit, out of reach of the learning-rate zoom);
* for ``"momentum"`` jointly over β and the effective lr α/(1−β) (β = 0 included, 1−β log-spaced
  down to ``decay_min``, 1e-4), for ``"ema"`` over γ and α (γ = 0 included, down to 1e-6), each
  followed by 2-D zoom rounds; while the best β (γ) sits on the lower edge 1−β = ``decay_min``
  of what was searched, the grid is extended two decades further (same spacing, same zoom) down
  to the floor ``DECAY_FLOOR`` = 1e-12, and a best setting on the floor is flagged
  (``OptimalResult.at_decay_floor``) with a ``RuntimeWarning``;
* for ``"momentum"`` and ``"ema"``, when the best cell of a first 2-D grid is next to the
  stability limit (large batch sizes), also the gap to the limit, u = limit(κ)·(1 − g) with
  κ = 1 − β (1 − γ) and limit(κ) = 2(2 − κ)/(κ a_max) for momentum's effective lr (2/a_max for
  EMA): 9 κ over the cell's range × a log grid of g as for plain SGD, then zoom rounds around its
  3 best distinct cells. The zoom of the lr grid cannot get there: its box of learning rates is
  the best cell's row, while momentum's limit moves with κ; and there the step count is a rugged
  integer landscape with thin bands of one step fewer beside the best cell (on the paper's NQM,
  p = 0.5, B = 2^18: 17 steps where the zoom alone returned 20).

The searches themselves are :mod:`curvlab.nqm._search` (with ``DECAY_FLOOR``); this module
checks the options and returns the result.

Resolution: the first lr grid has ``lr_points_per_decade`` points per decade (ratio
r = 10^(1/lr_points_per_decade)) and every zoom round spans the two cells around the best with 9
points, so after ``refine`` rounds neighbouring learning rates differ by a factor r^(4^−refine)
(1.8% with the defaults); next to the stability limit the same relative spacing applies to the
gap to the limit. The steps returned are the fewest over every point evaluated; a landscape
rugged on a finer scale (a few steps, integer counts) can hold a lower count between them.

The grid points of a round are evaluated by a compiled kernel (:mod:`curvlab.nqm._kernel`,
numba; the first call in a process compiles it, later processes load it from numba's cache):
each configuration stops doubling at the earliest power of two any configuration has reached, so
only the fastest configurations are bisected. Ties in steps are broken by the lowest risk at
that step.

Sweeps over batch sizes are :mod:`curvlab.nqm._sweep`, the critical batch size of a sweep
:mod:`curvlab.nqm._critical`.

Example:
    >>> from curvlab.nqm import NQM
    >>> res = NQM.paper(d=1000, bins=30).optimal(64, target=0.05)
    >>> res.steps > 0 and res.lr > 0
    True
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from curvlab._warn import user_stacklevel
from curvlab.nqm._search import (
    LIMIT_GAP,
    _Problem,
    _search_2d,
    _search_sgd,
    _steady_state_lr,
)
from curvlab.nqm._validate import _positive, _power, _real

if TYPE_CHECKING:
    from curvlab.nqm._model import NQM

__all__ = [
    "OptimalResult",
    "grid_options",
    "optimal",
]

OPTIMIZERS = ("sgd", "momentum", "ema")
# smallest 1 - β (momentum) and 1 - γ (EMA) of the first grid. It is only where the search starts:
# while the best setting sits on the lower edge of what was searched, the grid is extended by
# DECAY_EXTEND decades at a time down to DECAY_FLOOR (both in _search). E.g. on the paper's NQM,
# EMA at B = 1, target 1e-3 is best at 1 - γ = 5.4e-7, with 35% fewer steps than at the 1e-6 edge;
# momentum at B = 1, target 0.01 at 1 - β = 1.85e-6, 14% fewer than at the 1e-4 edge.
DECAY_MIN = {"momentum": 1e-4, "ema": 1e-6}


@dataclass(frozen=True)
class OptimalResult:
    """Fewest steps to target and the hyperparameters achieving them.

    Attributes:
        steps: optimal number of steps (an integer as float), ``inf`` if no setting reaches
            target, 0 if the initial risk meets it (a target at or above ``nqm.initial_risk()``).
        lr: learning rate α; ``nan`` if unreachable, and ``nan`` when ``steps`` is 0: every
            learning rate meets the target at step 0, so there is none to tune (as
            ``optimize_schedule`` returns no piece then).
        momentum: heavy-ball β (0 unless optimizer is "momentum"; ``nan`` for "momentum" when
            ``steps`` is 0 or ``inf``).
        ema: EMA decay γ (0 unless optimizer is "ema"; ``nan`` for "ema" when ``steps`` is 0 or
            ``inf``).
        optimizer, batch_size, precond_power, target: the problem solved.
        at_decay_floor: True when the best β (γ) lies on the floor of the decay search,
            1 − β (1 − γ) = ``DECAY_FLOOR`` (1e-12; :mod:`curvlab.nqm._search`), with the default
            ``decay_min``:
            the optimum may lie beyond it, so ``steps`` is then an upper bound of the fewest
            steps (``optimal`` also warns). Always False for "sgd".
    """

    steps: float
    lr: float
    momentum: float
    ema: float
    optimizer: str
    batch_size: float
    precond_power: float
    target: float
    at_decay_floor: bool = False

    @property
    def effective_lr(self) -> float:
        """α / (1 − β), the learning rate comparable to plain SGD's (``nan`` with ``lr``)."""
        return self.lr / (1.0 - self.momentum)


def optimal(
    nqm: NQM,
    batch_size: float,
    target: float = 0.01,
    optimizer: str = "sgd",
    precond_power: float = 0.0,
    lr_points_per_decade: int = 8,
    lr_decades: float = 2.0,
    decay_points: int | None = None,
    refine: int = 2,
    decay_min: float | None = None,
) -> OptimalResult:
    """Fewest steps to ``target`` over the learning rate (and momentum β or EMA decay γ).

    The grids and their resolution are described in :mod:`curvlab.nqm._tuning`.

    Args:
        nqm: the model.
        batch_size: B > 0.
        target: risk to reach (the paper uses 0.01).
        optimizer: "sgd" (tune α), "momentum" (tune α and β) or "ema" (tune α and γ).
        precond_power: p of the preconditioner P = H^p (fixed, not tuned).
        lr_points_per_decade: density of the first lr grid (an integer >= 2).
        lr_decades: how far below α_ss (steady-state risk = target) the lr grid starts.
        decay_points: number of β (or γ) values in the first grid (an integer >= 3): 0 plus 1−β
            log-spaced in [decay_min, 0.9] (default 14 for momentum, 20 for EMA).
        refine: zoom rounds around the best point (an integer >= 0; each 9 (×9) points between
            its neighbours).
        decay_min: smallest 1−β (1−γ) searched. Default (None): 1e-4 for momentum, 1e-6 for
            EMA (see ``DECAY_MIN``), the first grid's edge only: while the best setting lies on
            it the grid is extended below it, two decades at a time, down to ``DECAY_FLOOR``
            (1e-12). Given, it is a bound (``β <= 1 - decay_min``, e.g. 0.1 for β ≤ 0.9): the
            search stays within it, and an optimum on it is the bounded problem's.

    Returns:
        :class:`OptimalResult` (``at_decay_floor`` True, with a ``RuntimeWarning``, when the
        best β or γ lies on that floor). A target at or above the initial risk is met at
        step 0: ``steps`` 0 and ``lr`` ``nan`` (``momentum`` / ``ema`` too for those
        optimizers): every setting meets it, so no learning rate is optimal.

    Raises:
        ValueError: for an unknown optimizer, a target or batch size that is not a finite
            number > 0 (a bool or a string is not a number), or a grid option out of range or
            not an integer where one is needed (naming it).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    target = _positive("target", target)
    batch_size = _positive("batch_size", batch_size)  # True ran at B = 1, "4" at B = 4
    precond_power = _power(precond_power)
    bounded = decay_min is not None  # a bound the caller set (β <= 1 - decay_min): kept
    per_decade, decay_points, refine, decay_min = _grid_settings(
        optimizer, lr_points_per_decade, lr_decades, decay_points, refine, decay_min
    )
    lr_decades = float(lr_decades)  # checked there: a finite number > 0
    prob = _Problem(nqm, batch_size, precond_power, target)
    a_max = float(prob.a.max())
    lr_stable = 2.0 / a_max * (1.0 - LIMIT_GAP)
    lr_lo = _steady_state_lr(prob.a, prob.s, prob.w, target, lr_stable) * 10.0**-lr_decades
    floor = None
    if optimizer == "sgd":
        _search_sgd(prob, lr_lo, 2.0 / a_max, per_decade, refine)
    else:
        floor = _search_2d(
            prob, optimizer, lr_lo, a_max, per_decade, decay_points, refine, decay_min, bounded
        )
    steps, lr, beta, gamma = prob.best()
    if steps == 0 or math.isinf(steps):  # met at step 0 by every setting (was the grid's
        # first point, ~1e-2 α_ss), or by none (β, γ were 0: invented)
        lr = math.nan
        beta = math.nan if optimizer == "momentum" else 0.0
        gamma = math.nan if optimizer == "ema" else 0.0
    if floor is not None:
        name = "β" if optimizer == "momentum" else "γ"
        warnings.warn(
            f"optimal({optimizer!r}, batch_size={batch_size:g}, target={target:g}): the best "
            f"{name} lies on the floor of the search, 1 - {name} = {floor:g}; a {name} closer "
            f"to 1 may need fewer steps, so {steps:.0f} steps is an upper bound "
            "(OptimalResult.at_decay_floor)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return OptimalResult(
        steps,
        lr,
        beta,
        gamma,
        optimizer,
        float(batch_size),
        precond_power,
        target,
        floor is not None,
    )


def grid_options(
    optimizer: str,
    lr_points_per_decade: int,
    lr_decades: float,
    decay_points: int | None,
    refine: int,
    decay_min: float | None,
) -> tuple[int, float]:
    """:func:`optimal`'s grid options checked (also by a sweep, before its first curve), with
    ``decay_points`` and ``decay_min`` resolved for ``optimizer``.

    Raises:
        ValueError: for a grid :func:`optimal` cannot search (NaN counts as out of range), or a
            count (``lr_points_per_decade``, ``decay_points``, ``refine``) that is not an integer.
    """
    _, decay_points, _, decay_min = _grid_settings(
        optimizer, lr_points_per_decade, lr_decades, decay_points, refine, decay_min
    )
    return decay_points, decay_min


def _count(name: str, value: object, least: int) -> int:
    """An integer option (numpy integers included) >= ``least``, or a ValueError naming it."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        n = None
    if n is None or n < least:
        raise ValueError(
            f"need {name} >= {least}, an integer (e.g. {name}={least + 1}); got {value!r}"
        )
    return n


def _grid_settings(
    optimizer: str,
    lr_points_per_decade: int,
    lr_decades: float,
    decay_points: int | None,
    refine: int,
    decay_min: float | None,
) -> tuple[int, int, int, float]:
    """(lr_points_per_decade, decay_points, refine, decay_min) checked and resolved."""
    if decay_points is None:
        decay_points = 20 if optimizer == "ema" else 14
    if decay_min is None:
        decay_min = DECAY_MIN.get(optimizer, 1e-4)
    per_decade = _count("lr_points_per_decade", lr_points_per_decade, 2)
    decay_points = _count("decay_points", decay_points, 3)
    refine = _count("refine", refine, 0)
    lr_decades = _positive("lr_decades", lr_decades)  # (True was taken as 1 decade)
    dmin = _real(decay_min)
    if dmin is None or not 0 < dmin < 0.9:
        raise ValueError(f"decay_min must be in (0, 0.9), got {decay_min!r}")
    return per_decade, decay_points, refine, dmin
