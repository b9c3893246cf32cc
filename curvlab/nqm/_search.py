"""The grid searches behind :func:`curvlab.nqm.optimal` (:mod:`curvlab.nqm._tuning` describes
them and their resolution): the steps-to-target evaluator of a batch of configurations, plain
SGD's learning-rate search (with its search of the gap to the stability limit) and the joint
search over momentum β or EMA γ and the learning rate (with its extension past the decay grid's
edge).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from curvlab.nqm._dynamics import (
    MAX_LOG2_STEPS,
    build_dynamics,
    first_crossing,
    second_moment,
)

if TYPE_CHECKING:
    from curvlab.nqm._model import NQM

# While the best 1 - β (1 - γ) is the smallest searched, the decay grid is extended by DECAY_EXTEND
# decades at a time, down to the hard floor DECAY_FLOOR: below it 1 - κ keeps fewer than four
# significant digits of κ, and the step counts reached there (~1/κ, > 1e12) carry the engine's
# rounding (NQM.risk)
DECAY_FLOOR = 1e-12
DECAY_EXTEND = 2.0
# the gap 1 - α a_max / 2 of the top point of the lr grid (the stability limit, made strict)
LIMIT_GAP = 1e-9
# decades of the gap to the stability limit per grid of plain SGD's search next to the limit
GAP_DECADES = 3.0
# the momentum and EMA search next to the stability limit zooms around this many distinct cells of
# its first (κ, gap) grid: the best alone missed bands of fewer steps beside it (review s17)
GAP_STARTS = 3


def _steady_state_lr(
    a: np.ndarray, s: np.ndarray, w: np.ndarray, target: float, hi: float
) -> float:
    """The lr at which plain SGD's steady-state risk Σ w α s / (a(2 − α a)) equals target
    (:func:`curvlab.nqm._stationary.steady_state_lr`)."""
    from curvlab.nqm._stationary import steady_state_lr  # (numba: imported on first use)

    return steady_state_lr(a, s, w, target, hi)


def _stationary_lr(prob: _Problem, optimizer: str, kappa: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per κ, the (effective) lr whose stationary risk equals the target (``hi`` if below it;
    :func:`curvlab.nqm._stationary.stationary_lr`)."""
    from curvlab.nqm._stationary import stationary_lr

    return stationary_lr(optimizer, prob.a, prob.s, prob.w, kappa, hi, prob.target)


class _Problem:
    """Evaluates steps to target for a batch of (lr, β, γ) configurations."""

    def __init__(self, nqm: NQM, batch_size: float, precond_power: float, target: float) -> None:
        self.a, self.s = nqm.effective(batch_size, precond_power)
        self.w, self.v0 = nqm.weights, nqm.init_var
        self.target = target
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
        v0 = np.broadcast_to(self.v0, self.w.shape)
        if not all(states):  # the compiled kernel (plain SGD, momentum, EMA): the same steps
            from curvlab.nqm._kernel import grid_crossing  # (numba: imported on first use)

            steps = grid_crossing(
                lr, beta, gamma, states, self.a, self.s, v0, self.w, self.target, MAX_LOG2_STEPS
            )
        else:  # momentum and EMA together (no search asks for it)
            dyn = build_dynamics(
                lr[:, None], self.a[None, :], self.s[None, :], beta[:, None], gamma[:, None]
            )
            steps = first_crossing(
                dyn, v0[None, :], self.w[None, :], self.target, MAX_LOG2_STEPS, True
            )
        # a configuration whose risk is lost to rounding (nan: momentum at its stability
        # limit, see curvlab.nqm._dynamics.LOST_TOL) cannot be certified: never the best
        steps = np.where(np.isnan(steps), np.inf, steps)
        self.evaluated.append((lr, beta, gamma, steps))
        return steps

    def best_steps(self) -> float:
        """The fewest steps evaluated so far."""
        return min(float(steps.min()) for *_, steps in self.evaluated)

    def best(self) -> tuple[float, float, float, float]:
        lr, beta, gamma, steps = (np.concatenate(x) for x in zip(*self.evaluated))
        smin = steps.min()
        if not math.isfinite(smin):
            return math.inf, math.nan, 0.0, 0.0
        tie = np.flatnonzero(steps == smin)
        if tie.size > 1:  # break ties by the largest margin below the target
            lr_t, beta_t, gamma_t = lr[tie], beta[tie], gamma[tie]
            states = (bool(np.any(beta_t != 0)), bool(np.any(gamma_t != 0)))
            t = np.full(tie.size, int(smin))
            if not all(states):
                from curvlab.nqm._kernel import grid_moments

                v0 = np.broadcast_to(self.v0, self.w.shape)
                m2 = grid_moments(lr_t, beta_t, gamma_t, states, self.a, self.s, v0, t)
            else:
                m2 = second_moment(self.dyn(lr_t, beta_t, gamma_t), self.v0[None, :], t[:, None])
            tie = tie[[int(np.argmin(np.sum(self.w * m2, axis=-1)))]]
        i = int(tie[0])
        return float(smin), float(lr[i]), float(beta[i]), float(gamma[i])


def _grid(lo: float, hi: float, per_decade: int) -> np.ndarray:
    n = max(3, int(math.ceil(math.log10(hi / lo) * per_decade)) + 1)
    return np.geomspace(lo, hi, n)


def _search_sgd(prob: _Problem, lo: float, limit: float, per_decade: int, refine: int) -> None:
    """Plain SGD: the lr grid (extended downwards while its best is its lowest point), its
    zoom rounds, and, when the best cell touches the stability limit ``limit`` = 2/a_max, a
    log grid of the gap to the limit (:func:`_search_gap`)."""
    zero = np.zeros(1)
    hi = limit * (1.0 - LIMIT_GAP)
    for _ in range(4):  # extend downwards while the best lr sits on the lower edge
        grid = _grid(lo, hi, per_decade)
        steps = prob.run(grid, zero, zero)
        i = int(np.argmin(steps))
        if not math.isfinite(steps[i]) or i > 0:
            break
        hi, lo = grid[1], lo * 10.0**-3
    if not math.isfinite(steps[i]):
        return
    # the top point is the limit itself (always the slowest): a best point next to it means the
    # optimum may lie anywhere in (grid[-2], limit), where a log grid of the lr cannot reach
    near = i >= grid.size - 2 and hi == limit * (1.0 - LIMIT_GAP)
    left = float(grid[max(i - 1, 0)])
    for _ in range(refine):
        left_, right = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        grid = np.geomspace(left_, right, 9)
        steps = prob.run(grid, zero, zero)
        i = int(np.argmin(steps))
    if near:
        _search_gap(prob, left, limit, per_decade, refine)


def _search_gap(prob: _Problem, left: float, limit: float, per_decade: int, refine: int) -> None:
    """The lr = limit·(1 − g) on a log grid of the gap g, from that of ``left`` down
    ``GAP_DECADES`` decades and further (``GAP_DECADES`` at a time, down to ``LIMIT_GAP``) while
    the best is its smallest gap, then ``refine`` zoom rounds in g around the best (skipped when
    the grids hold nothing better than the lr zoom found)."""
    zero = np.zeros(1)
    hi = 1.0 - left / limit
    while True:
        lo = max(hi * 10.0**-GAP_DECADES, LIMIT_GAP)
        gaps = _grid(lo, hi, per_decade)[::-1]  # decreasing: the lr increases to the limit
        steps = prob.run(limit * (1.0 - gaps), zero, zero)
        i = int(np.argmin(steps))
        if i < gaps.size - 1 or lo <= LIMIT_GAP:
            break
        hi = float(gaps[-2])
    if not steps[i] <= prob.best_steps():
        return
    for _ in range(refine):
        gaps = np.geomspace(gaps[max(i - 1, 0)], gaps[min(i + 1, gaps.size - 1)], 9)
        steps = prob.run(limit * (1.0 - gaps), zero, zero)
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
    bounded: bool = False,
) -> float | None:
    """Joint search over κ = 1 − β (or 1 − γ) and the (effective) learning rate: the first
    grid with its zoom rounds, then (unless ``bounded``: ``decay_min`` is the caller's bound)
    the extensions below ``decay_min`` while the best κ is the smallest searched. Returns the
    floor of the extensions if the best κ lies on it, else None."""
    kappa = np.concatenate([[1.0], np.geomspace(0.9, decay_min, decay_points - 1)])
    _grid_2d(prob, optimizer, lr_lo, a_max, per_decade, refine, kappa)
    ratio = (0.9 / decay_min) ** (1.0 / max(1, decay_points - 2))  # the first grid's spacing
    floor, k_min = min(DECAY_FLOOR, decay_min), decay_min
    while not bounded:
        steps, _, beta, gamma = prob.best()
        if not math.isfinite(steps) or (beta if optimizer == "momentum" else gamma) < 1.0 - k_min:
            return None  # unreachable, or the best κ lies inside the searched range
        if k_min <= floor:
            return floor
        lower = max(k_min * 10.0**-DECAY_EXTEND, floor)
        n = max(3, int(math.ceil(math.log(k_min / lower) / math.log(ratio))) + 1)
        # from the old edge (again: the zoom may then span it) down to the new one
        _grid_2d(prob, optimizer, lr_lo, a_max, per_decade, refine, np.geomspace(k_min, lower, n))
        k_min = lower
    return None


def _grid_2d(
    prob: _Problem,
    optimizer: str,
    lr_lo: float,
    a_max: float,
    per_decade: int,
    refine: int,
    kappa: np.ndarray,
) -> None:
    """One grid of κ (decreasing) × a per-κ log grid of the (effective) lr, then ``refine``
    zoom rounds around its best cell; when that cell is next to the stability limit, also the
    search of the gap to the limit over the cell's κ range (:func:`_search_gap_2d`)."""

    def lr_max(k: np.ndarray) -> np.ndarray:  # upper end of the (effective) lr per κ
        return _limit_2d(optimizer, k, a_max) * (1.0 - LIMIT_GAP)

    def run(k: np.ndarray, u: np.ndarray) -> np.ndarray:  # u: (effective) lr
        return _run_2d(prob, optimizer, k, u)

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
    # the top point of a row at the stability limit is always the slowest: a best cell next to
    # it may hold the optimum anywhere up to the limit, which moves with κ (momentum: 2(2 − κ)
    # /(κ a_max) in the effective lr) where the zoom's box of lrs (row i's) does not follow it.
    # Two points below the top count too: their zoom box does not reach the limit either, and
    # the paper's model with p = 0.75 at B = 2^25 had its best cell there (9 steps) while the
    # near-limit region between its rows held 5 (7 was returned until review s23)
    near = j >= n_lr - 3 and bool(hi[i] == lr_max(kappa[i : i + 1])[0])
    gap = 1.0 - float(u_lo) / float(_limit_2d(optimizer, kappa[i : i + 1], a_max)[0])
    box = (float(k_lo), float(k_hi))
    for _ in range(refine):
        ks = np.geomspace(k_lo, k_hi, 9)
        us = np.geomspace(u_lo, u_hi, 9)
        KK, UU = np.meshgrid(ks, us, indexing="ij")
        UU = np.minimum(UU, lr_max(KK))
        st = run(KK.ravel(), UU.ravel()).reshape(KK.shape)
        i, j = np.unravel_index(int(np.argmin(st)), st.shape)
        k_lo, k_hi = ks[max(i - 1, 0)], ks[min(i + 1, ks.size - 1)]
        u_lo, u_hi = us[max(j - 1, 0)], us[min(j + 1, us.size - 1)]
    if near and gap > LIMIT_GAP:
        _search_gap_2d(prob, optimizer, a_max, box, gap, per_decade, refine)


def _limit_2d(optimizer: str, k: np.ndarray, a_max: float) -> np.ndarray:
    """The stability limit of the (effective) lr per κ: momentum's α < 2(1 + β)/a_max is
    α/κ < 2(2 − κ)/(κ a_max); EMA's is plain SGD's, 2/a_max."""
    if optimizer == "momentum":
        return 2.0 * (2.0 - k) / (k * a_max)
    return np.full_like(k, 2.0 / a_max)


def _run_2d(prob: _Problem, optimizer: str, k: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Steps to target at κ = 1 − β (1 − γ) and (effective) lr ``u``."""
    lr = u * k if optimizer == "momentum" else u
    decay = 1.0 - k
    zero = np.zeros_like(k)
    if optimizer == "momentum":
        return prob.run(lr, decay, zero)
    return prob.run(lr, zero, decay)


def _search_gap_2d(
    prob: _Problem,
    optimizer: str,
    a_max: float,
    box: tuple[float, float],
    gap: float,
    per_decade: int,
    refine: int,
) -> None:
    """The joint search next to the stability limit: u = limit(κ)·(1 − g) on 9 log-spaced κ in
    ``box`` × a log grid of the gap g from ``gap`` down ``GAP_DECADES`` decades (further, that
    many at a time down to ``LIMIT_GAP``, while the best is the smallest gap), then ``refine``
    zoom rounds (9 × 9) around each of its ``GAP_STARTS`` best distinct cells: there the step
    count is a rugged integer landscape in which thin bands of one step fewer lie beside the
    best cell (:mod:`curvlab.nqm._tuning`)."""
    k_lo, k_hi = box

    def run(k: np.ndarray, g: np.ndarray) -> np.ndarray:
        return _run_2d(prob, optimizer, k, _limit_2d(optimizer, k, a_max) * (1.0 - g))

    ks = np.geomspace(k_lo, k_hi, 9)
    hi = gap
    while True:
        lo = max(hi * 10.0**-GAP_DECADES, LIMIT_GAP)
        gaps = _grid(lo, hi, per_decade)[::-1]  # decreasing: the lr increases to the limit
        KK, GG = np.meshgrid(ks, gaps, indexing="ij")
        steps = run(KK.ravel(), GG.ravel()).reshape(KK.shape)
        j = int(np.argmin(steps)) % gaps.size
        if j < gaps.size - 1 or lo <= LIMIT_GAP:
            break
        hi = float(gaps[-2])
    for i, j in _distinct_best(steps, GAP_STARTS):
        k_grid, g_grid = ks, gaps
        for _ in range(refine):
            k_grid = np.geomspace(k_grid[max(i - 1, 0)], k_grid[min(i + 1, k_grid.size - 1)], 9)
            g_grid = np.geomspace(g_grid[max(j - 1, 0)], g_grid[min(j + 1, g_grid.size - 1)], 9)
            KK, GG = np.meshgrid(k_grid, g_grid, indexing="ij")
            st = run(KK.ravel(), GG.ravel()).reshape(KK.shape)
            if not np.isfinite(st.min()):  # all slower than the best so far (pruned): done
                break
            i, j = np.unravel_index(int(np.argmin(st)), st.shape)


def _distinct_best(steps: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` cells of a 2-D grid in increasing steps (finite only), each outside the
    3 × 3 neighbourhoods of those before it (whose zoom boxes already cover them)."""
    cells: list[tuple[int, int]] = []
    for flat in np.argsort(steps.ravel(), kind="stable"):
        if len(cells) == count or not math.isfinite(float(steps.flat[flat])):
            break
        i, j = (int(x) for x in np.unravel_index(int(flat), steps.shape))
        if all(abs(i - a) > 1 or abs(j - b) > 1 for a, b in cells):
            cells.append((i, j))
    return cells
