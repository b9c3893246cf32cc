"""Compiled steps to target of a grid of configurations: what the grid searches evaluate.

:func:`grid_crossing` returns ``first_crossing(build_dynamics(...), v0, w, target,
max_log2_steps, only_best=True)`` (:mod:`curvlab.nqm._dynamics`) for the one- and two-state
dynamics of the searches (plain SGD; heavy-ball momentum; EMA of the iterate), compiled with
numba. F and e are built per configuration and bin as ``build_dynamics`` builds them, and every
entry of F^(2^j), Q_j = Q_{j−1} + P Q Pᵀ, the bisection's row r·F^(2^j) and its quadratic form
rᵀQ r is computed with the same floating-point operations in the same order as the numpy code,
so the step counts are the numpy path's. Only a risk's sum over the bins is taken in another
order than numpy's matrix-vector product (which itself rounds differently in the last bit with
the number of rows): a configuration whose risk at a step lies within a few ulps of the target
can cross one step apart from the numpy path (neither is more exact). ``tests/test_nqm_kernel.py``
compares the two on the paper's and on random grids, ``inf`` pattern included. :func:`grid_moments` is ``second_moment`` likewise (the
searches' tie-break).

What makes it fast, besides running without numpy's per-call overhead and temporaries:

* configurations are evaluated one at a time (their levels stay in cache): each stops doubling
  at the earliest level any configuration evaluated before it reached (``only_best``: later
  levels cannot hold the fewest steps), or once its noise part alone is above the target (the
  noise part never decreases with the step count, so it can never reach it), and one that
  reaches it is bisected at once from its own levels;
* a grid of at least ``SUBSET_MIN_CONFIGS`` configurations is walked level by level of its risk
  on the ``SUBSET_BINS`` bins of largest w·v0/a, a lower bound (every bin's term is
  non-negative): a configuration is evaluated at the level its bound first allows a hit, and the
  walk stops once the earliest level found is at or below the bound's level;
* only the configurations at the earliest level count; among them the numpy path's branch and
  bound, run there in lockstep over the bits, reports ``inf`` for those that cannot beat the
  best upper bound. It is replayed from their final counts (it only ever drops configurations),
  so the same cells are finite.

A configuration's hit (its first level at or below the target) and its bisection trials are
also checked for a risk lost to rounding next to momentum's stability limit
(``_dynamics.LOST_TOL``), with the numpy path's operations: such a configuration is never a
hit (``inf``). A check per bin and hit or trial, no work per step.

The first call in a process compiles the kernels (10–15 s on 2 cores for the three optimizers;
numba caches them on disk, so later processes load them in under a second).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from curvlab.nqm._dynamics import LOST_RHO, LOST_SAFETY

__all__ = ["grid_crossing", "grid_moments", "subset_bins"]

# the noise part of a configuration is compared with target·(1 + SLACK): it is summed in another
# order than the full risk, and the slack keeps the test a bound in floating point
SLACK = 1e-9
# a grid of at least SUBSET_MIN_CONFIGS configurations is first doubled on the SUBSET_BINS bins
# of largest w·v0/a: that risk is a lower bound, whose level orders the configurations (the
# likely fastest first) and skips those that cannot reach the target by the earliest level
SUBSET_BINS = 8
SUBSET_MIN_CONFIGS = 100
_INF = math.inf
_NAN = math.nan
_EPS = float(np.finfo(float).eps)


@njit(cache=True, nogil=True, error_model="numpy")
def _relax(mode: int, P: np.ndarray, rl: np.ndarray) -> None:
    """``_dynamics.relax_time`` per bin of level 0 (P = F): 1/(1 − spectral radius), or inf."""
    for b in range(P.shape[1]):
        if mode == 1:
            tau = P[0, b] + P[3, b]
            det = P[0, b] * P[3, b] - P[1, b] * P[2, b]
            disc = tau * tau - 4.0 * det
            root = math.sqrt(max(disc, 0.0))
            rad = math.sqrt(abs(det)) if disc < 0 else 0.5 * (abs(tau) + root)
        else:
            rad = abs(P[0, b])
            if mode == 2:
                rad = max(rad, abs(P[3, b]))
        rl[b] = 1.0 / (1.0 - rad) if rad < 1.0 else _INF


@njit(cache=True, nogil=True, error_model="numpy")
def _weighted_sum(x: np.ndarray, w: np.ndarray) -> float:
    """Σ_b x_b w_b with four running sums (fixed order)."""
    n = x.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    m = n - n % 4
    for b in range(0, m, 4):
        s0 += x[b] * w[b]
        s1 += x[b + 1] * w[b + 1]
        s2 += x[b + 2] * w[b + 2]
        s3 += x[b + 3] * w[b + 3]
    s = (s0 + s1) + (s2 + s3)
    for b in range(m, n):
        s += x[b] * w[b]
    return s


@njit(cache=True, nogil=True, error_model="numpy")
def _start(
    mode: int,
    lr: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    a: np.ndarray,
    sd: np.ndarray,
    c: int,
    P: np.ndarray,
    Q: np.ndarray,
) -> None:
    """Level 0 of configuration ``c``: P = F, Q = e eᵀ (upper triangle, row by row), F and e as
    ``_dynamics.build_dynamics`` builds them (mode 0: plain SGD, 1: momentum, 2: EMA), with its
    operations: q = 1 − α a, e = (−α)·√s; momentum F = [[q, (−α) β], [a, β]], e = (e, √s);
    EMA F = [[q, 0], [(1 − γ) q, γ]], e = (e, (−(1 − γ)) α √s)."""
    lc = lr[c]
    neg = -lc
    if mode == 0:
        for b in range(a.shape[0]):
            P[0, b] = 1.0 - lc * a[b]
            e0 = neg * sd[b]
            Q[0, b] = e0 * e0
        return
    if mode == 1:
        bc = beta[c]
        f01 = neg * bc
        for b in range(a.shape[0]):
            P[0, b] = 1.0 - lc * a[b]
            P[1, b] = f01
            P[2, b] = a[b]
            P[3, b] = bc
            e0 = neg * sd[b]
            e1 = sd[b]
            Q[0, b] = e0 * e0
            Q[1, b] = e0 * e1
            Q[2, b] = e1 * e1
        return
    gc = gamma[c]
    keep = 1.0 - gc
    nk = -keep
    for b in range(a.shape[0]):
        q = 1.0 - lc * a[b]
        P[0, b] = q
        P[1, b] = 0.0
        P[2, b] = keep * q
        P[3, b] = gc
        e0 = neg * sd[b]
        e1 = nk * lc * sd[b]
        Q[0, b] = e0 * e0
        Q[1, b] = e0 * e1
        Q[2, b] = e1 * e1


@njit(cache=True, nogil=True, error_model="numpy")
def _step(
    mode: int,
    P: np.ndarray,
    Q: np.ndarray,
    Pn: np.ndarray,
    Qn: np.ndarray,
    v0: np.ndarray,
    x: np.ndarray,
) -> None:
    """The risk terms x_b = v0 y² + N of level (P, Q) and the next level (Pn, Qn): P², Q + PQPᵀ
    (``mode`` as :func:`_start`; y the observed row of P times the start direction: θ's, or θ̃'s
    summed over both states for EMA).

    The numpy path's operations (``_dynamics._next_level``, ``_level_risk``) entry by entry: a
    sum of products Σ_l a_l b_l is accumulated left to right, PQ first, then (PQ) Pᵀ.
    """
    B = P.shape[1]
    if mode == 0:
        for b in range(B):
            p = P[0, b]
            q = Q[0, b]
            sq = p * p
            x[b] = sq * v0[b] + q
            Pn[0, b] = sq
            Qn[0, b] = q + p * q * p
        return
    for b in range(B):
        p00 = P[0, b]
        p01 = P[1, b]
        p10 = P[2, b]
        p11 = P[3, b]
        q00 = Q[0, b]
        q01 = Q[1, b]
        q11 = Q[2, b]
        if mode == 1:  # θ observed, started alone
            y = p00
            n = q00
        else:  # θ̃ observed, started with θ
            y = p10 + p11
            n = q11
        x[b] = y * y * v0[b] + n
        a00 = p00 * q00 + p01 * q01
        a01 = p00 * q01 + p01 * q11
        a10 = p10 * q00 + p11 * q01
        a11 = p10 * q01 + p11 * q11
        Qn[0, b] = q00 + (a00 * p00 + a01 * p01)
        Qn[1, b] = q01 + (a00 * p10 + a01 * p11)
        Qn[2, b] = q11 + (a10 * p10 + a11 * p11)
        Pn[0, b] = p00 * p00 + p01 * p10
        Pn[1, b] = p00 * p01 + p01 * p11
        Pn[2, b] = p10 * p00 + p11 * p10
        Pn[3, b] = p10 * p01 + p11 * p11


@njit(cache=True, nogil=True, error_model="numpy")
def _level_error(
    mode: int, P: np.ndarray, Q: np.ndarray, v0: np.ndarray, e: np.ndarray, rl: np.ndarray, t: float
) -> None:
    """The estimated rounding error per bin of the next level's E[θ²] (after ``t`` steps) into
    ``e``: ``_dynamics._level_error`` with the numpy path's operations (the next level's
    observed E[θ²] against the magnitude of its terms; ``_dynamics._error`` without branches).
    Momentum or EMA only (plain SGD never cancels)."""
    k = _EPS * LOST_SAFETY
    for b in range(P.shape[1]):
        p00 = P[0, b]
        p01 = P[1, b]
        p10 = P[2, b]
        p11 = P[3, b]
        q00 = Q[0, b]
        q01 = Q[1, b]
        q11 = Q[2, b]
        if mode == 1:  # θ observed, started alone
            n = q00
            r0, r1 = p00, p01
        else:  # θ̃ observed, started with θ
            n = q11
            r0, r1 = p10, p11
        vb = v0[b]
        z0 = r0 * p00 + r1 * p10
        yn = z0 if mode == 1 else z0 + (r0 * p01 + r1 * p11)
        nn = n + (r0 * (q00 * r0 + q01 * r1) + r1 * (q01 * r0 + q11 * r1))
        a0 = abs(r0)
        a1 = abs(r1)
        m0 = a0 * abs(p00) + a1 * abs(p10)
        ym = m0 if mode == 1 else m0 + (a0 * abs(p01) + a1 * abs(p11))
        b00 = abs(q00)
        b01 = abs(q01)
        b11 = abs(q11)
        nm = abs(n) + (a0 * (b00 * a0 + b01 * a1) + a1 * (b01 * a0 + b11 * a1))
        val = yn * yn * vb + nn
        mag = ym * ym * vb + nm
        eb = mag * (min(t, rl[b]) * k) if mag > LOST_RHO * val else 0.0
        eb = _INF if val < 0 else eb
        e[b] = eb if abs(val) < _INF else 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def _noise(mode: int, Q: np.ndarray, w: np.ndarray) -> float:
    """The noise part Σ_b w_b Q_b[obs][obs] of a level's risk (θ̃'s for EMA, else θ's)."""
    return _weighted_sum(Q[2 if mode == 2 else 0], w)


@njit(cache=True, nogil=True, error_model="numpy")
def _advance(
    mode: int,
    P: np.ndarray,
    Q: np.ndarray,
    r: np.ndarray,
    N: np.ndarray,
    rn: np.ndarray,
    Nn: np.ndarray,
    v0: np.ndarray,
    x: np.ndarray,
    e: np.ndarray,
    w: np.ndarray,
    rl: np.ndarray,
    t: float,
) -> float:
    """One bisection trial: rn = r·P, Nn = N + rᵀQr and the risk terms x of (rn, Nn); returns
    the estimated rounding error of the trial's risk after ``t`` steps (``_dynamics._error``
    per bin into ``e``, weighted by ``w``; ``rl``: relaxation times, none if empty: no check,
    0).

    As ``_dynamics._bisect`` (``_row_times``, ``_quad``, ``_pick``, ``_risk``) entry by entry.
    """
    B = P.shape[1]
    err = 0.0
    if mode == 0:  # (no cancellation: never lost)
        for b in range(B):
            a = r[0, b]
            y = a * P[0, b]
            nn = N[b] + a * (Q[0, b] * a)
            rn[0, b] = y
            Nn[b] = nn
            x[b] = y * y * v0[b] + nn
        return err
    for b in range(B):
        a0 = r[0, b]
        a1 = r[1, b]
        q01 = Q[1, b]
        y0 = a0 * P[0, b] + a1 * P[2, b]
        y1 = a0 * P[1, b] + a1 * P[3, b]
        nn = N[b] + (a0 * (Q[0, b] * a0 + q01 * a1) + a1 * (q01 * a0 + Q[2, b] * a1))
        rn[0, b] = y0
        rn[1, b] = y1
        Nn[b] = nn
        y = y0 + y1 if mode == 2 else y0  # (the start direction, as in _step)
        x[b] = y * y * v0[b] + nn
    if rl.shape[0] == 0:
        return err
    # the trial against its terms' magnitude (_dynamics._bisect; _error without branches)
    k = _EPS * LOST_SAFETY
    for b in range(B):
        c0 = abs(r[0, b])
        c1 = abs(r[1, b])
        m0 = c0 * abs(P[0, b]) + c1 * abs(P[2, b])
        m1 = c0 * abs(P[1, b]) + c1 * abs(P[3, b])
        ym = m0 + m1 if mode == 2 else m0
        b01 = abs(Q[1, b])
        nm = abs(N[b]) + (c0 * (abs(Q[0, b]) * c0 + b01 * c1) + c1 * (b01 * c0 + abs(Q[2, b]) * c1))
        val = x[b]
        mag = ym * ym * v0[b] + nm
        eb = mag * (min(t, rl[b]) * k) if mag > LOST_RHO * val else 0.0
        eb = _INF if val < 0 else eb
        e[b] = eb if abs(val) < _INF else 0.0
    return _weighted_sum(e, w)


@njit(cache=True, nogil=True, error_model="numpy")
def _evaluate(
    mode: int,
    lr: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    a: np.ndarray,
    sd: np.ndarray,
    c: int,
    v0: np.ndarray,
    w: np.ndarray,
    target: float,
    jbest: int,
    noise_cap: float,
    lev: np.ndarray,
    scratch: tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray
    ],
) -> tuple[int, float]:
    """Configuration ``c``: the first level j ≤ ``jbest`` with risk(2^j) ≤ target and the steps
    its bisection gives; (-1, inf) if it has none (or its noise part alone passes the target)
    or if the risk of its first level at or below the target is lost to rounding (its
    estimated error, weighted ``_dynamics._error``, above its distance to the target: no hit);
    (j, nan) if a risk its bisection tried is lost (j still counts as a level reached, as in
    ``_dynamics._doubling``)."""
    r, rn, N, Nn, x, rl, eb = scratch
    k = 1 if mode == 0 else 2
    obs = 1 if mode == 2 else 0  # the observed state: θ̃ for EMA, else θ
    _start(mode, lr, beta, gamma, a, sd, c, lev[0, : k * k], lev[0, k * k :])
    if mode != 0:  # (plain SGD never cancels: no check)
        _relax(mode, lev[0, : k * k], rl)
    j = 0
    while True:
        cur = lev[j]
        nxt = lev[j + 1]
        _step(mode, cur[: k * k], cur[k * k :], nxt[: k * k], nxt[k * k :], v0, x)
        risk = _weighted_sum(x, w)
        if risk <= target:
            if mode != 0 and j > 0:  # a hit lost to rounding is none (_dynamics._doubling)
                prev = lev[j - 1]
                _level_error(mode, prev[: k * k], prev[k * k :], v0, eb, rl, float(1 << j))
                if _weighted_sum(eb, w) > abs(risk - target):
                    return -1, _INF
            break
        if j >= jbest or _noise(mode, cur[k * k :], w) > noise_cap:
            return -1, _INF
        j += 1
    if j == 0:
        return 0, 1.0
    # the bits of t − 1 in [2^(j−1), 2^j) set greedily from the top (``_dynamics._bisect``)
    r[:] = 0.0
    r[obs] = 1.0
    N[:] = 0.0
    t = 0
    for i in range(j - 1, -1, -1):
        lv = lev[i]
        err = _advance(
            mode, lv[: k * k], lv[k * k :], r, N, rn, Nn, v0, x, eb, w, rl, float(t + (1 << i))
        )
        risk = _weighted_sum(x, w)
        if err > abs(risk - target):
            return j, _NAN
        if i == j - 1 or not (risk <= target):
            t += 1 << i
            r[:] = rn
            N[:] = Nn
    return j, float(t + 1)


@njit(cache=True, nogil=True, error_model="numpy")
def _crossing(
    mode: int,
    lr: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    a: np.ndarray,
    sd: np.ndarray,
    v0: np.ndarray,
    w: np.ndarray,
    target: float,
    top: int,
    noise_cap: float,
    sub: np.ndarray,
) -> np.ndarray:
    """``first_crossing(..., only_best=True)`` of the configurations (lr, β, γ) (see the module).

    With a subset of bins (``sub``, indices; none if empty) the configurations are taken level
    by level of their subset risk, a lower bound: those whose subset first reaches the target at
    level L are evaluated at L, and the walk ends once the earliest level found is ≤ L."""
    C = lr.shape[0]
    B = a.shape[0]
    k = 1 if mode == 0 else 2
    width = k * k + (1 if k == 1 else 3)
    out = np.full(C, _INF)
    first = np.full(C, -1, np.int64)  # the level each configuration reaches the target at
    lev = np.empty((top + 2, width, B))  # levels 0..j of the configuration evaluated
    scratch = (
        np.empty((k, B)),
        np.empty((k, B)),
        np.empty(B),
        np.empty(B),
        np.empty(B),
        np.empty(B),
        np.empty(B),
    )
    jbest = top
    # without a subset (no bins: a bound of 0) every configuration is evaluated at level 0, in
    # order, and the walk ends there
    a_s, sd_s, v0s, ws = a[sub], sd[sub], v0[sub], w[sub]
    cur = np.empty((C, width, sub.size))
    nxt = np.empty((C, width, sub.size))
    xs = np.empty(sub.size)
    live = np.arange(C)
    nl = C
    for c in range(C):
        _start(mode, lr, beta, gamma, a_s, sd_s, c, cur[c, : k * k], cur[c, k * k :])
    for level in range(top + 1):
        m = 0
        for i in range(nl):
            c = live[i]
            P, Q = cur[c, : k * k], cur[c, k * k :]
            _step(mode, P, Q, nxt[c, : k * k], nxt[c, k * k :], v0s, xs)
            if _weighted_sum(xs, ws) <= noise_cap:  # the bound allows a hit from here on
                j, st = _evaluate(
                    mode, lr, beta, gamma, a, sd, c, v0, w, target, jbest, noise_cap, lev, scratch
                )
                first[c], out[c] = j, st
                if j >= 0:
                    jbest = j
            elif not (_noise(mode, Q, ws) > noise_cap):  # (else it can never reach it)
                live[m] = c
                m += 1
        nl = m
        if jbest <= level or nl == 0:
            break
        cur, nxt = nxt, cur
    if not (first == jbest).any():
        return np.full(C, _INF)
    # only the configurations at the earliest level count (only_best); among them, the numpy
    # path's branch and bound (run in lockstep over the bits) reports inf for those that cannot
    # beat the best upper bound: replayed here from the final counts, which it does not change
    # (those lost to rounding in their bisection take no part and are inf, as the others)
    alive = np.flatnonzero((first == jbest) & ~np.isnan(out))
    for c in range(C):
        if first[c] != jbest or math.isnan(out[c]):
            out[c] = _INF
    na = alive.size
    for i in range(jbest - 1, 0, -1):
        low = np.int64(0)
        for m in range(na):
            ti = ((np.int64(out[alive[m]]) - 1) >> i) << i
            if m == 0 or ti + (1 << i) < low:
                low = ti + (1 << i)
        keep = 0
        for m in range(na):
            if (((np.int64(out[alive[m]]) - 1) >> i) << i) + 1 <= low:
                keep += 1
        if keep <= na // 2:
            n2 = 0
            for m in range(na):
                c = alive[m]
                if (((np.int64(out[c]) - 1) >> i) << i) + 1 <= low:
                    alive[n2] = c
                    n2 += 1
                else:
                    out[c] = _INF
            na = n2
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _moments(
    mode: int,
    lr: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    a: np.ndarray,
    sd: np.ndarray,
    v0: np.ndarray,
    steps: np.ndarray,
) -> np.ndarray:
    """E[(oᵀ x_t)²] per configuration and bin at t = ``steps[c]``, as
    ``_dynamics.second_moment``: the bits of t from the lowest, r ← r·F^(2^j) and
    N ← N + rᵀQ_j r for each set bit."""
    C = lr.shape[0]
    B = a.shape[0]
    k = 1 if mode == 0 else 2
    obs = 1 if mode == 2 else 0
    width = k * k + (1 if k == 1 else 3)
    out = np.empty((C, B))
    cur = np.empty((width, B))
    nxt = np.empty((width, B))
    r = np.empty((k, B))
    rn = np.empty((k, B))
    N = np.empty(B)
    Nn = np.empty(B)
    x = np.empty(B)
    for c in range(C):
        _start(mode, lr, beta, gamma, a, sd, c, cur[: k * k], cur[k * k :])
        r[:] = 0.0
        r[obs] = 1.0
        N[:] = 0.0
        t = steps[c]
        j = 0
        while (t >> j) > 0:
            if (t >> j) & 1:
                _advance(mode, cur[: k * k], cur[k * k :], r, N, rn, Nn, v0, x, x, x, x[:0], 0.0)
                r[:] = rn
                N[:] = Nn
            _step(mode, cur[: k * k], cur[k * k :], nxt[: k * k], nxt[k * k :], v0, x)
            cur, nxt = nxt, cur
            j += 1
        for b in range(B):
            y = r[0, b] + r[1, b] if mode == 2 else r[0, b]
            out[c, b] = v0[b] * y * y + N[b]
    return out


def _mode(states: tuple[bool, bool]) -> int:
    """The kernel's dynamics: 0 plain SGD, 1 momentum, 2 EMA (``build_dynamics``' states)."""
    use_m, use_e = states
    if use_m and use_e:
        raise ValueError("the compiled NQM kernel takes momentum or EMA, not both")
    return 1 if use_m else 2 if use_e else 0


def _inputs(
    lr: np.ndarray, beta: np.ndarray, gamma: np.ndarray, a: np.ndarray, s: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The kernels' inputs: contiguous float64, configurations flat, √s for s."""
    f = np.ascontiguousarray
    out = (
        f(lr, dtype=float).reshape(-1),
        f(beta, dtype=float).reshape(-1),
        f(gamma, dtype=float).reshape(-1),
        f(a, dtype=float).reshape(-1),
        np.sqrt(f(s, dtype=float)).reshape(-1),
    )
    # the kernels index without bounds checks: mismatched lengths would read past an array
    if not out[0].size == out[1].size == out[2].size or out[3].size != out[4].size:
        raise ValueError(
            f"lr, beta, gamma need one entry per configuration and a, s one per bin; got sizes "
            f"{[x.size for x in out]}"
        )
    return out


def grid_moments(
    lr: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    states: tuple[bool, bool],
    a: np.ndarray,
    s: np.ndarray,
    v0: np.ndarray,
    steps: np.ndarray,
) -> np.ndarray:
    """``second_moment(build_dynamics(lr, a, s, beta, gamma, states), v0, steps)``
    (:mod:`curvlab.nqm._dynamics`, arguments as columns and rows) for one or two states:
    E[(oᵀ x_t)²] per configuration and bin, shape (configs, bins), at the integer step counts
    ``steps`` (shape (configs,)); lr, beta, gamma of shape (configs,), a, s, v0 (bins,)."""
    mode = _mode(states)
    t = np.ascontiguousarray(steps, dtype=np.int64).reshape(-1)
    args = _inputs(lr, beta, gamma, a, s)
    v0 = np.ascontiguousarray(v0, dtype=float).reshape(-1)
    if t.size != args[0].size or v0.size != args[3].size:
        raise ValueError(
            f"steps need one entry per configuration ({args[0].size}) and v0 one per bin "
            f"({args[3].size}); got {t.size} and {v0.size}"
        )
    with np.errstate(all="ignore"):
        return _moments(mode, *args, v0, t)


def subset_bins(a: np.ndarray, w: np.ndarray, v0: np.ndarray, k: int = SUBSET_BINS) -> np.ndarray:
    """Indices (sorted) of the ``k`` bins with the largest w·v0/a (initial risk times relaxation
    time): the ones still far from converged when the target is near."""
    score = w * np.broadcast_to(v0, w.shape) / a
    return np.sort(np.argsort(-score, kind="stable")[:k])


def grid_crossing(
    lr: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    states: tuple[bool, bool],
    a: np.ndarray,
    s: np.ndarray,
    v0: np.ndarray,
    w: np.ndarray,
    target: float,
    max_log2_steps: int,
) -> np.ndarray:
    """Steps to target of every configuration, ``inf`` for those certainly slower than the best.

    Equal to ``first_crossing(build_dynamics(lr[:, None], a[None, :], s[None, :], beta[:, None],
    gamma[:, None], states), v0[None, :], w[None, :], target, max_log2_steps, only_best=True)``
    (:mod:`curvlab.nqm._dynamics`) for one or two states (plain SGD, momentum or EMA).

    Args:
        lr, beta, gamma: learning rate, momentum β and EMA decay γ per configuration, (configs,).
        states: (momentum state, EMA state) as ``build_dynamics``; not both.
        a, s: effective curvature and per-step noise variance per bin, shape (bins,).
        v0: initial second moment per bin, shape (bins,).
        w: risk weight per bin, shape (bins,).
        target: the risk to reach.
        max_log2_steps: configurations not at the target by 2^max_log2_steps steps are ``inf``.

    Returns:
        float array of shape (configs,); ``inf`` too for a configuration whose risk at its
        first level at or below the target, or at a bisection trial, is lost to rounding
        (``_dynamics.LOST_TOL``: momentum at its stability limit), which never counts as a hit (the numpy path's branch and bound counts
        a configuration lost in its bisection until it is lost: a rare difference).
    """
    mode = _mode(states)
    n = np.size(lr)
    if float(np.sum(w * v0)) <= target:  # met at step 0 (the numpy path's test)
        return np.zeros(n)
    if max_log2_steps < 0:
        return np.full(n, np.inf)
    lr, beta, gamma, a, sd = _inputs(lr, beta, gamma, a, s)
    v0 = np.ascontiguousarray(v0, dtype=float).reshape(-1)
    w = np.ascontiguousarray(w, dtype=float).reshape(-1)
    if not v0.size == w.size == a.size:
        raise ValueError(f"v0 and w need one entry per bin ({a.size}); got {v0.size} and {w.size}")
    target, top, cap = float(target), int(max_log2_steps), float(target) * (1.0 + SLACK)
    big = n >= SUBSET_MIN_CONFIGS and w.size > 2 * SUBSET_BINS
    sub = subset_bins(a, w, v0) if big else np.zeros(0, dtype=np.int64)
    with np.errstate(all="ignore"):
        return _crossing(mode, lr, beta, gamma, a, sd, v0, w, target, top, cap, sub)
