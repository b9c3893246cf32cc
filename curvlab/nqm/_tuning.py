"""NQM hyperparameter tuning: the fewest steps to a target risk and the hyperparameters that give them.

``optimal`` minimises the exact steps to target (:func:`curvlab.nqm._dynamics.first_crossing`) over
fine grids, as the paper does (Section 3.7.1):

* the learning rate on a log grid from 10^-``lr_decades`` times α_ss (the lr whose steady-state
  risk equals the target) up to the stability limit, then ``refine`` zoom rounds around the best;
* for ``"momentum"`` jointly over β and the effective lr α/(1−β) (β = 0 included, 1−β log-spaced
  down to 10^-4), for ``"ema"`` over γ and α (γ = 0 included), each followed by 2-D zoom rounds.

All grid points of a round are evaluated at once (vectorised over configurations × bins), and
doubling stops at the first power of two any configuration reaches, so only the fastest
configurations are bisected. Ties in steps are broken by the lowest risk at that step.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from curvlab.nqm._dynamics import build_dynamics, first_crossing, second_moment
from curvlab.nqm._pruned import pruned_crossing, subset_bins
from curvlab.nqm._validate import _positive, _power

if TYPE_CHECKING:
    from curvlab.nqm._model import NQM

__all__ = [
    "OptimalResult",
    "grid_options",
    "optimal",
]

OPTIMIZERS = ("sgd", "momentum", "ema")
# smallest 1 - β (momentum) and 1 - γ (EMA) on the first grid. Momentum stops at 1e-4: closer to
# 1 the slowest modes are strongly under-damped and the risk oscillates, dipping below the target
# transiently in phase across bins (an artefact of "first step with risk <= target"); EMA has no
# such oscillation and profits from long averaging windows at small batch sizes.
DECAY_MIN = {"momentum": 1e-4, "ema": 1e-6}


@dataclass(frozen=True)
class OptimalResult:
    """Fewest steps to target and the hyperparameters achieving them.

    Attributes:
        steps: optimal number of steps (an integer as float), ``inf`` if no setting reaches target.
        lr: learning rate α (``nan`` if unreachable).
        momentum: heavy-ball β (0 unless optimizer is "momentum").
        ema: EMA decay γ (0 unless optimizer is "ema").
        optimizer, batch_size, precond_power, target: the problem solved.
    """

    steps: float
    lr: float
    momentum: float
    ema: float
    optimizer: str
    batch_size: float
    precond_power: float
    target: float

    @property
    def effective_lr(self) -> float:
        """α / (1 − β), the learning rate comparable to plain SGD's."""
        return self.lr / (1.0 - self.momentum)


def _steady_state_lr(
    a: np.ndarray, s: np.ndarray, w: np.ndarray, target: float, hi: float
) -> float:
    """The lr at which plain SGD's steady-state risk Σ w α s / (a(2 − α a)) equals target."""

    def ss(lr: float) -> float:  # (the method .sum(): np.sum's same reduction, less overhead)
        return float((w * lr * s / (a * (2.0 - lr * a))).sum())

    if ss(hi) <= target:
        return hi
    lo = hi
    while ss(lo) > target and lo > 1e-300:
        lo /= 16.0
    for _ in range(200):  # bisection in log space
        mid = math.sqrt(lo * hi)
        if not lo < mid:  # lo * hi underflowed (a target near the smallest floats): lo > 0 stays
            mid = math.sqrt(lo) * math.sqrt(hi)
        lo, hi = (mid, hi) if ss(mid) <= target else (lo, mid)
        if hi / lo < 1 + 1e-12:
            break
    return lo


def _stationary_lr(prob: _Problem, optimizer: str, kappa: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per κ, the (effective) lr whose stationary risk equals the target (``hi`` if below it).

    Stationary E[θ²] per coordinate: momentum α s (1+β) / (a (2β + 2 − α a)(1 − β)) (eq. 6),
    EMA α s (1−γ)(1 + qγ) / (a (2 − α a)(1 + γ)(1 − qγ)) with q = 1 − α a (eq. 12).
    """
    a, s, w = prob.a[None, :], prob.s[None, :], prob.w[None, :]
    k = kappa[:, None]
    d = 1.0 - k

    def ss(u: np.ndarray) -> np.ndarray:
        u = u[:, None]
        if optimizer == "momentum":
            lr = u * k
            v = lr * s * (1 + d) / (a * (2 * d + 2 - lr * a) * k)
        else:
            q = 1 - u * a
            v = u * s * k * (1 + q * d) / (a * (2 - u * a) * (1 + d) * (1 - q * d))
        return np.sum(w * v, axis=-1)

    with np.errstate(all="ignore"):
        lo = hi.copy()
        for _ in range(200):
            bad = ss(lo) > prob.target
            if not bad.any():
                break
            lo = np.where(bad, lo / 16.0, lo)
        up = hi.copy()
        top = ss(up) <= prob.target
        for _ in range(60):
            mid = np.sqrt(lo * up)
            ok = ss(mid) <= prob.target
            lo, up = np.where(ok, mid, lo), np.where(ok, up, mid)
    return np.where(top, hi, lo)


class _Problem:
    """Evaluates steps to target for a batch of (lr, β, γ) configurations."""

    def __init__(self, nqm: NQM, batch_size: float, precond_power: float, target: float) -> None:
        self.a, self.s = nqm.effective(batch_size, precond_power)
        self.w, self.v0 = nqm.weights, nqm.init_var
        self.target = target
        self.sub = subset_bins(self.a, self.w, self.v0)
        self.evaluated: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def dyn(self, lr: np.ndarray, beta: np.ndarray, gamma: np.ndarray) -> Any:
        return build_dynamics(
            lr[:, None], self.a[None, :], self.s[None, :], beta[:, None], gamma[:, None]
        )

    def run(self, lr: np.ndarray, beta: np.ndarray, gamma: np.ndarray) -> np.ndarray:
        lr, beta, gamma = np.broadcast_arrays(
            *(np.asarray(x, dtype=float) for x in (lr, beta, gamma))
        )
        lr, beta, gamma = lr.ravel(), beta.ravel(), gamma.ravel()
        states = (bool(np.any(beta != 0)), bool(np.any(gamma != 0)))

        def build(configs: np.ndarray | slice, bins: np.ndarray | slice) -> Any:
            return build_dynamics(
                lr[configs][:, None],
                self.a[bins][None, :],
                self.s[bins][None, :],
                beta[configs][:, None],
                gamma[configs][:, None],
                states,
            )

        v0 = np.broadcast_to(self.v0, self.w.shape)
        if any(states):  # (pruned_crossing itself skips the bound on small grids)
            steps = pruned_crossing(build, lr.size, v0, self.w, self.target, self.sub, 48)
        else:  # SGD (one state): cheap as it is, the bound does not pay for itself
            every = slice(None)
            dyn = build(every, every)
            steps = first_crossing(dyn, v0[None, :], self.w[None, :], self.target, 48, True)
        self.evaluated.append((lr, beta, gamma, steps))
        return steps

    def best(self) -> tuple[float, float, float, float]:
        lr, beta, gamma, steps = (np.concatenate(x) for x in zip(*self.evaluated))
        smin = steps.min()
        if not math.isfinite(smin):
            return math.inf, math.nan, 0.0, 0.0
        tie = np.flatnonzero(steps == smin)
        if tie.size > 1:  # break ties by the largest margin below the target
            t = np.full((tie.size, 1), int(smin))
            m2 = second_moment(self.dyn(lr[tie], beta[tie], gamma[tie]), self.v0[None, :], t)
            tie = tie[[int(np.argmin(np.sum(self.w * m2, axis=-1)))]]
        i = int(tie[0])
        return float(smin), float(lr[i]), float(beta[i]), float(gamma[i])


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

    Args:
        nqm: the model.
        batch_size: B > 0.
        target: risk to reach (the paper uses 0.01).
        optimizer: "sgd" (tune α), "momentum" (tune α and β) or "ema" (tune α and γ).
        precond_power: p of the preconditioner P = H^p (fixed, not tuned).
        lr_points_per_decade: density of the first lr grid.
        lr_decades: how far below α_ss (steady-state risk = target) the lr grid starts.
        decay_points: number of β (or γ) values in the first grid: 0 plus 1−β log-spaced in
            [decay_min, 0.9] (default 14 for momentum, 20 for EMA).
        refine: zoom rounds around the best point (each 9 (×9) points between its neighbours).
        decay_min: smallest 1−β (1−γ) of the grid; default 1e-4 for momentum, 1e-6 for EMA
            (see ``DECAY_MIN``).

    Returns:
        :class:`OptimalResult`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    target = _positive("target", target)
    precond_power = _power(precond_power)
    decay_points, decay_min = grid_options(
        optimizer, lr_points_per_decade, lr_decades, decay_points, refine, decay_min
    )
    prob = _Problem(nqm, batch_size, precond_power, target)
    a_max = float(prob.a.max())
    lr_stable = 2.0 / a_max * (1.0 - 1e-9)
    lr_lo = _steady_state_lr(prob.a, prob.s, prob.w, target, lr_stable) * 10.0**-lr_decades
    if optimizer == "sgd":
        _search_sgd(prob, lr_lo, lr_stable, lr_points_per_decade, refine)
    else:
        _search_2d(
            prob, optimizer, lr_lo, a_max, lr_points_per_decade, decay_points, refine, decay_min
        )
    steps, lr, beta, gamma = prob.best()
    return OptimalResult(
        steps, lr, beta, gamma, optimizer, float(batch_size), precond_power, target
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
        ValueError: for a grid :func:`optimal` cannot search (NaN counts as out of range).
    """
    if decay_points is None:
        decay_points = 20 if optimizer == "ema" else 14
    if decay_min is None:
        decay_min = DECAY_MIN.get(optimizer, 1e-4)
    if not (lr_points_per_decade >= 2 and decay_points >= 3 and refine >= 0 and lr_decades > 0):
        raise ValueError(
            "need lr_points_per_decade >= 2, decay_points >= 3, refine >= 0, lr_decades > 0"
        )
    if not 0 < decay_min < 0.9:
        raise ValueError(f"decay_min must be in (0, 0.9), got {decay_min!r}")
    return decay_points, decay_min


def _grid(lo: float, hi: float, per_decade: int) -> np.ndarray:
    n = max(3, int(math.ceil(math.log10(hi / lo) * per_decade)) + 1)
    return np.geomspace(lo, hi, n)


def _search_sgd(prob: _Problem, lo: float, hi: float, per_decade: int, refine: int) -> None:
    zero = np.zeros(1)
    for _ in range(4):  # extend downwards while the best lr sits on the lower edge
        grid = _grid(lo, hi, per_decade)
        steps = prob.run(grid, zero, zero)
        i = int(np.argmin(steps))
        if not math.isfinite(steps[i]) or i > 0:
            break
        hi, lo = grid[1], lo * 10.0**-3
    if not math.isfinite(steps[i]):
        return
    for _ in range(refine):
        left, right = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        grid = np.geomspace(left, right, 9)
        steps = prob.run(grid, zero, zero)
        i = int(np.argmin(steps))


def _search_2d(
    prob: _Problem,
    optimizer: str,
    lr_lo: float,
    a_max: float,
    per_decade: int,
    decay_points: int,
    refine: int,
    decay_min: float,
) -> None:
    """Joint search over κ = 1 − β (or 1 − γ) and the (effective) learning rate."""
    kappa = np.concatenate([[1.0], np.geomspace(0.9, decay_min, decay_points - 1)])

    def lr_max(k: np.ndarray) -> np.ndarray:  # upper end of the (effective) lr per κ
        if optimizer == "momentum":
            return 2.0 * (2.0 - k) / (k * a_max) * (1.0 - 1e-9)
        return np.full_like(k, 2.0 / a_max * (1.0 - 1e-9))

    def run(k: np.ndarray, u: np.ndarray) -> np.ndarray:  # u: (effective) lr
        lr = u * k if optimizer == "momentum" else u
        decay = 1.0 - k
        zero = np.zeros_like(k)
        if optimizer == "momentum":
            return prob.run(lr, decay, zero)
        return prob.run(lr, zero, decay)

    hi = np.minimum(lr_max(kappa), 2.0 * _stationary_lr(prob, optimizer, kappa, lr_max(kappa)))
    hi = np.maximum(hi, 4.0 * lr_lo)
    n_lr = max(3, int(math.ceil(math.log10(float(hi.max()) / lr_lo) * per_decade)))
    frac = np.linspace(0.0, 1.0, n_lr)
    U = lr_lo * (hi[:, None] / lr_lo) ** frac[None, :]  # per-κ log grid from lr_lo to its limit
    K = np.broadcast_to(kappa[:, None], U.shape)
    steps = run(K.ravel(), U.ravel()).reshape(U.shape)
    if not np.isfinite(steps.min()):
        return
    i, j = np.unravel_index(int(np.argmin(steps)), steps.shape)
    k_lo, k_hi = kappa[min(i + 1, kappa.size - 1)], kappa[max(i - 1, 0)]
    u_lo, u_hi = U[i, max(j - 1, 0)], U[i, min(j + 1, U.shape[1] - 1)]
    for _ in range(refine):
        ks = np.geomspace(k_lo, k_hi, 9)
        us = np.geomspace(u_lo, u_hi, 9)
        KK, UU = np.meshgrid(ks, us, indexing="ij")
        UU = np.minimum(UU, lr_max(KK))
        st = run(KK.ravel(), UU.ravel()).reshape(KK.shape)
        i, j = np.unravel_index(int(np.argmin(st)), st.shape)
        k_lo, k_hi = ks[max(i - 1, 0)], ks[min(i + 1, ks.size - 1)]
        u_lo, u_hi = us[max(j - 1, 0)], us[min(j + 1, us.size - 1)]
