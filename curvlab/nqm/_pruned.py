"""Steps to target for a grid of configurations, pruned by a lower bound from a few bins.

The grid searches of :mod:`curvlab.nqm._tuning` only need the configurations that can be the
fastest: :func:`curvlab.nqm._dynamics.first_crossing` with ``only_best`` reports ``inf`` for every
configuration whose first power of two 2^J with risk ≤ target comes after the earliest one, J*,
and bisects the others. Carrying every configuration's doubling up to level J* is what costs.

Two exact bounds let most configurations skip it:

* every bin's term of the risk is non-negative, so the risk of a subset of bins is a lower bound
  on the risk at every step. The doubling on a few bins (cheap) gives each configuration the
  first level J_sub ≤ J at which its subset risk reaches the target; below J_sub it cannot hit,
  so its exact doubling starts (is *admitted*) only at level J_sub, brought up to it on its own;
* the noise part of the risk never decreases with t, so a configuration whose noise part alone
  is above the target at some level cannot reach it later and is dropped.

Level by level the admitted configurations are checked exactly (entry by entry the same
arithmetic as an unpruned call); the first level with a hit is J*, all configurations hitting
there are exactly those the unpruned call bisects, and they are bisected the same way (their
levels recomputed into one buffer). The result equals the unpruned one on every configuration
attaining the fewest steps and is ``inf`` or the same steps elsewhere, so every decision of the
searches is unchanged (``tests/test_nqm_pruned.py``, and the searches against the verbatim
reference in ``tests/test_nqm_reference*.py``). One caveat, measured: a risk's sum over the bins
is a BLAS matrix-vector product, whose last bit can depend on how many configurations share the
call (in about half of random trials some row differs by an ulp), so a configuration whose risk
lies within a few ulps of the target could be decided differently from the unpruned call; the
tests have never met one, and the step counts would then differ by that one crossing.

The subset: the bins with the largest w·v0/a (initial risk times relaxation time), the ones still
far from converged when the target is near.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from curvlab.nqm._dynamics import (
    Dynamics,
    _bisect,
    _level_risk,
    _levels,
    _next_level,
    first_crossing,
)

__all__ = ["pruned_crossing"]

SUBSET_BINS = 8
# below this many configurations the bound does not pay for its own doubling: the refinement
# rounds' 81 (9 × 9) configurations are nearly all admitted, and admitted configurations have
# their levels computed twice (on admission and for the bisection); unpruned, once
MIN_CONFIGS = 100
# the subset's risk is summed in another order than the full risk: a relative slack keeps it a
# lower bound in floating point (sums of non-negative terms, rounding error << 1e-9)
SLACK = 1e-9
NEVER = np.iinfo(np.int64).max


def subset_bins(a: np.ndarray, w: np.ndarray, v0: np.ndarray, k: int = SUBSET_BINS) -> np.ndarray:
    """Indices (sorted) of the ``k`` bins with the largest w·v0/a."""
    score = w * np.broadcast_to(v0, w.shape) / a
    return np.sort(np.argsort(-score, kind="stable")[:k])


class _SubsetScan:
    """The doubling on a subset of bins, advanced level by level on demand.

    ``first[c]`` is the first level j with subset risk(2^j) ≤ target (``NEVER`` if none up to the
    current level), known for all levels up to ``level``.
    """

    def __init__(self, dyn: Dynamics, w: np.ndarray, v0: np.ndarray, target: float, top: int):
        self.dyn, self.w, self.v0 = dyn, w, v0
        self.target = target * (1.0 + SLACK)
        self.top = top
        self.P, self.Q = _levels(dyn)
        self.first = np.full(dyn.F[0][0].shape[0], NEVER, dtype=np.int64)
        self.level = -1
        self._step()

    def _step(self) -> None:
        if self.level >= 0:
            self.P, self.Q = _next_level(self.P, self.Q)
        self.level += 1
        dyn = self.dyn
        with np.errstate(all="ignore"):
            risk = _level_risk(self.P, self.Q, dyn.u, dyn.obs, self.w, self.v0, True)
            hit = risk <= self.target
        self.first[hit & (self.first == NEVER)] = self.level

    def advance(self, level: int) -> None:
        """Know ``first`` up to ``level`` (capped at ``top``)."""
        while self.level < min(level, self.top):
            self._step()

    def next_hit(self, after: int, skip: np.ndarray) -> int | None:
        """The first level > ``after`` at which a configuration outside ``skip`` reaches the
        target on the subset (``None`` if none does up to ``top``)."""
        while True:
            fresh = (self.first > after) & (self.first <= self.level) & ~skip
            if fresh.any():
                return int(self.first[fresh].min())
            if self.level >= self.top:
                return None
            self._step()


class _Chains:
    """The exact doubling (all bins) of the configurations admitted so far, level by level.

    Only the current level is kept. Configurations admitted at level j (those whose subset bound
    first allows a hit there) are brought up to j on their own and joined to the batch;
    configurations whose noise part alone is above the target are dropped (the noise part of the
    risk never decreases, so they cannot reach the target at a later level).
    """

    def __init__(self, w: np.ndarray, v0: np.ndarray, target: float) -> None:
        self.w, self.v0, self.target = w, v0, target
        self.cur: tuple[Any, Any, np.ndarray] | None = None  # (F^(2^j), Q_j, configuration ids)
        self.u: list[float] = []  # the dynamics' start direction and observed index (admit)
        self.obs = 0

    def admit(self, dyn: Dynamics, ids: np.ndarray, level: int) -> None:
        """Add configurations ``ids`` (dynamics ``dyn``) at ``level``."""
        self.u, self.obs = dyn.u, dyn.obs
        P, Q = _levels(dyn)
        for _ in range(level):
            P, Q = _next_level(P, Q)
        if self.cur is not None:
            P0, Q0, ids0 = self.cur
            P = [[np.concatenate([x, y]) for x, y in zip(r0, r1)] for r0, r1 in zip(P0, P)]
            Q = [[np.concatenate([x, y]) for x, y in zip(r0, r1)] for r0, r1 in zip(Q0, Q)]
            ids = np.concatenate([ids0, ids])
        self.cur = (P, Q, ids)

    def hits(self) -> np.ndarray:
        """Ids of the current batch whose risk at the current level is ≤ target."""
        if self.cur is None:
            return np.zeros(0, dtype=np.int64)
        P, Q, ids = self.cur
        return ids[_level_risk(P, Q, self.u, self.obs, self.w, self.v0, True) <= self.target]

    def advance(self) -> None:
        """Drop the configurations that can no longer reach the target; go one level up."""
        assert self.cur is not None
        P, Q, ids = self.cur
        noise = Q[self.obs][self.obs] @ self.w
        keep = ~(noise > self.target * (1.0 + SLACK))
        if not keep.all():
            P = [[x[keep] for x in row] for row in P]
            Q = [[x[keep] for x in row] for row in Q]
            ids = ids[keep]
        if ids.size == 0:
            self.cur = None
        else:
            P, Q = _next_level(P, Q)
            self.cur = (P, Q, ids)


def _stored_levels(dyn: Dynamics, levels: int) -> list:
    """[(F^(2^l), Q_l) for l < levels], computed by :func:`_next_level` (same arithmetic) into
    one buffer: one allocation, which the allocator hands back on the next call, where a
    fresh array per level and entry would touch fresh pages every time."""
    k = dyn.k
    tri = [(i, j) for i in range(k) for j in range(i, k)]
    buf = np.empty((levels, k * k + len(tri)) + dyn.F[0][0].shape)
    out = []
    for lev in range(levels):
        b = buf[lev]
        P = [[b[i * k + j] for j in range(k)] for i in range(k)]
        Q: list[list[Any]] = [[None] * k for _ in range(k)]
        for t, (i, j) in enumerate(tri):
            Q[i][j] = Q[j][i] = b[k * k + t]
        if lev == 0:  # as _levels: P = F, Q = e eᵀ
            for i in range(k):
                for j in range(k):
                    P[i][j][...] = dyn.F[i][j]
            for i, j in tri:
                np.multiply(dyn.e[i], dyn.e[j], out=Q[i][j])
        else:
            _next_level(*out[-1], out=(P, Q))
        out.append((P, Q))
    return out


def pruned_crossing(
    build: Callable[[np.ndarray | slice, np.ndarray | slice], Dynamics],
    n: int,
    v0: np.ndarray,
    w: np.ndarray,
    target: float,
    sub: np.ndarray,
    max_log2_steps: int,
) -> np.ndarray:
    """``first_crossing(build(all, all), v0, w, target, max_log2_steps, only_best=True)``, pruned.

    Args:
        build: ``build(configs, bins)`` returns the dynamics of those configurations on those bins
            (index arrays, or ``slice(None)`` for all).
        n: number of configurations.
        v0, w: initial second moments and risk weights per bin, shape (bins,).
        target: the risk to reach.
        sub: the subset of bins of the bound (:func:`subset_bins`).
        max_log2_steps: as in :func:`first_crossing`.

    Returns:
        The same steps as the unpruned call: the configurations whose first level is the earliest
        one bisected exactly, the others ``inf``.
    """
    every = slice(None)
    if n < MIN_CONFIGS or float(np.sum(w * v0)) <= target:
        return first_crossing(
            build(every, every), v0[None, :], w[None, :], target, max_log2_steps, True
        )
    out = np.full(n, np.inf)
    admitted = np.zeros(n, dtype=bool)
    with np.errstate(all="ignore"):
        chains = _Chains(w, v0, target)
        scan = _SubsetScan(build(every, sub), w[sub], v0[sub], target, max_log2_steps)
        level = scan.next_hit(-1, admitted)
        if level is None:
            return out
        while True:
            scan.advance(level)
            new = np.flatnonzero((scan.first <= level) & ~admitted)
            if new.size:
                chains.admit(build(new, every), new, level)
                admitted[new] = True
            hit = chains.hits()
            if hit.size:
                break
            if level >= max_log2_steps:
                return out
            if chains.cur is None:  # nobody left: jump to the next admission
                nxt = scan.next_hit(level, admitted)
                if nxt is None:
                    return out
                level = nxt
                continue
            chains.advance()
            level += 1
        hit = np.sort(hit)
        if level == 0:  # reached at the first step
            out[hit] = 1.0
            return out
        levels = _stored_levels(build(hit, every), level)
        J = np.full(hit.size, level, dtype=np.int64)
        out[hit] = _bisect(
            levels, None, J, chains.u, chains.obs, w[None, :], v0[None, :], target, True
        )
    return out
