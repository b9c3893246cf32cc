"""Exact second-moment dynamics of one NQM coordinate, evaluated with matrix powers.

Every coordinate (or eigenvalue bin) of the noisy quadratic model evolves independently. With
preconditioner P = H^p the update of one coordinate with curvature h and gradient-noise variance c
under learning rate α, batch size B, heavy-ball momentum β and EMA decay γ is

    m ← β m + (a θ + √s ξ),   θ ← θ − α m,   θ̃ ← γ θ̃ + (1 − γ) θ,   ξ ~ N(0, 1),

with effective curvature a = h^(1−p) and per-step noise variance s = c·h^(−2p)/B (the
preconditioned gradient P⁻¹g = a θ + h^(−p)√(c/B) ξ). The loss of the coordinate is ½ h θ².
This is a linear system x ← F x + e ξ for x = (θ[, m][, θ̃]), so

    E[(oᵀ x_t)²] = var0·(oᵀ Fᵗ u)² + Σ_{p<t} (oᵀ Fᵖ e)²,

where x_0 = θ_0·u (θ_0 ~ N(0, var0), m_0 = 0, θ̃_0 = θ_0) and o selects θ (or θ̃ with EMA).
Both terms are evaluated exactly by binary powering: F^(2^j) by repeated squaring and
Q_j = Σ_{p<2^j} Fᵖ e eᵀ Fᵖᵀ by Q_{j+1} = Q_j + F^(2^j) Q_j F^(2^j)ᵀ. No loop over steps, no
matrix inverse, so critically damped or unstable settings are handled exactly too (in exact
arithmetic: next to momentum's stability limit rounding can dominate, which every evaluation
checks, see ``LOST_TOL``: such a value is reported lost, never returned as a number).

The small matrices are stored entry-wise as nested lists of numpy arrays of shape
(configurations, bins), so every operation is vectorised over all hyperparameter settings and
all bins at once (much faster than batched ``matmul`` for 2×2 and 3×3 blocks).

Example:
    >>> import numpy as np
    >>> dyn = build_dynamics(np.array([[0.1]]), np.array([[1.0]]), np.array([[0.0]]),
    ...                      momentum=np.array([[0.0]]), ema=np.array([[0.0]]))
    >>> round(float(second_moment(dyn, 1.0, np.array([[2]]))[0, 0]), 12)  # (1 - 0.1)^4
    0.6561
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the searches (curvlab.nqm.optimal) look for a crossing up to 2**MAX_LOG2_STEPS steps, and
# NQM.steps_to_target's default max_steps is the same (it was 2**40: a count optimal returned
# could be inf there at the same settings)
MAX_LOG2_STEPS = 48

# Rounding check (review s23). Near a defective F (heavy-ball momentum just inside its stability
# limit α a = 2(1 + β) with β near 1, where both eigenvalues approach −1) the entries of F^(2^j)
# and Q_j are large and E[θ²] is a small difference of them: rounding then dominates (a negative
# risk after 1e5 steps at 1 − β = 1e-4, until review s23). Every evaluated E[θ²] is compared with
# the magnitude of the operation that produced it, M = v0·(|r|·|P| u)² + |N| + |r|ᵀ|Q||r| (the
# sum of the absolute values of its terms, >= E[θ²] in exact arithmetic). Where they cancel
# (ρ = M/E[θ²] > LOST_RHO) the bin's absolute error is estimated as
# LOST_SAFETY·eps·M·min(t, t_relax) (the rounding, amplified by the cancellation, grows with the
# steps t until the slowest mode has relaxed: t_relax = 1/(1 − spectral radius of F)); a negative
# E[θ²] is an infinite error. Measured errors were below eps·M·min(t, t_relax) up to a factor of
# ~1e3 (LOST_SAFETY). LOST_RHO keeps plain SGD (ρ = 1 exactly; its own rounding is the
# documented t·2e-16 of slow bins) and ordinary momentum (ρ below ~1e3 up to 95% of the
# stability limit) out of it. A risk is lost where the weighted error exceeds LOST_TOL of it, a
# crossing where it exceeds the risk's distance to the target (the comparison could flip).
LOST_RHO = 1e4
LOST_SAFETY = 1e3
LOST_TOL = 1e-6
_EPS = float(np.finfo(float).eps)

Mat = list[list[np.ndarray]]
Vec = list[np.ndarray]

__all__ = ["Dynamics", "build_dynamics", "second_moment", "first_crossing"]


@dataclass
class Dynamics:
    """A batch of linear systems x ← F x + e ξ with start x_0 = θ_0 u and observed index ``obs``.

    Attributes:
        F: k×k transition, entry-wise arrays of shape (configs, bins).
        e: noise loading (length k), arrays of shape (configs, bins).
        u: initial direction (length k floats).
        obs: index of the observed component (θ, or θ̃ with EMA).
    """

    F: Mat
    e: Vec
    u: list[float]
    obs: int

    @property
    def k(self) -> int:
        return len(self.e)


def build_dynamics(
    lr: np.ndarray,
    curvature: np.ndarray,
    noise_var: np.ndarray,
    momentum: np.ndarray,
    ema: np.ndarray,
    states: tuple[bool, bool] | None = None,
) -> Dynamics:
    """Build F, e, u for heavy-ball momentum (eq. 5) with EMA (eq. 11) of the iterate.

    Args:
        lr: learning rates α, shape (configs, 1) (broadcast against bins).
        curvature: effective curvatures a = h^(1−p), shape (1, bins) or (configs, bins).
        noise_var: per-step noise variances s = c h^(−2p)/B, same broadcasting.
        momentum: β per configuration, shape (configs, 1). The m state is included only if any
            β is non-zero.
        ema: γ per configuration, shape (configs, 1). θ̃ is included only if any γ is non-zero.
        states: (include m, include θ̃) instead of deciding from ``momentum`` and ``ema`` (so that a
            part of a batch is evaluated with the same states, hence the same arithmetic).

    Returns:
        The :class:`Dynamics` with all entries broadcast to (configs, bins).
    """
    if states is None:
        states = (bool(np.any(momentum != 0)), bool(np.any(ema != 0)))
    use_m, use_e = states
    shape = np.broadcast_shapes(lr.shape, curvature.shape, noise_var.shape)

    def full(x: np.ndarray | float) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(np.asarray(x, dtype=float), shape))

    q = 1.0 - lr * curvature
    sd = np.sqrt(noise_var)
    rows: list[list[np.ndarray | float]] = [[q]]
    e: list[np.ndarray | float] = [-lr * sd]
    u = [1.0]
    if use_m:
        rows[0].append(-lr * momentum)
        rows.append([curvature, momentum])
        e.append(sd)
        u.append(0.0)
    if use_e:
        keep = 1.0 - ema
        for row in rows:
            row.append(0.0)
        last = [keep * q]
        if use_m:
            last.append(-keep * lr * momentum)
        last.append(ema)
        rows.append(last)
        e.append(-keep * lr * sd)
        u.append(1.0)
    F = [[full(x) for x in row] for row in rows]
    return Dynamics(F=F, e=[full(x) for x in e], u=u, obs=len(e) - 1 if use_e else 0)


def _dot(xs: Vec, ys: Vec, out: np.ndarray | None = None) -> np.ndarray:
    """Σ_l xs[l]·ys[l] with one temporary (in-place accumulation), into ``out`` if given."""
    acc = np.multiply(xs[0], ys[0], out=out)
    for x, y in zip(xs[1:], ys[1:]):
        acc += x * y
    return acc


def _matmul(A: Mat, B: Mat, out: Mat | None = None) -> Mat:
    k = len(A)
    cols = [[B[l][j] for l in range(k)] for j in range(k)]
    return [
        [_dot(A[i], cols[j], None if out is None else out[i][j]) for j in range(k)]
        for i in range(k)
    ]


def _sandwich(P: Mat, Q: Mat) -> Mat:
    """P Q Pᵀ for symmetric Q (stored as a full nested list)."""
    k = len(P)
    PQ = _matmul(P, Q)
    out: Mat = [[None] * k for _ in range(k)]  # type: ignore[list-item]
    for i in range(k):
        for j in range(i, k):
            out[i][j] = _dot(PQ[i], P[j])
            out[j][i] = out[i][j]
    return out


def _row_times(r: Vec, P: Mat) -> Vec:
    k = len(P)
    return [_dot(r, [P[l][j] for l in range(k)]) for j in range(k)]


def _quad(r: Vec, Q: Mat) -> np.ndarray:
    k = len(r)
    acc = r[0] * _dot(Q[0], r)
    for i in range(1, k):
        acc += r[i] * _dot(Q[i], r)
    return acc


def _pick(r: Vec, u: list[float]) -> np.ndarray:
    """r · u for a 0/1 vector u, without multiplications."""
    out = None
    for x, ui in zip(r, u):
        if ui:
            out = x if out is None else out + x
    assert out is not None
    return out


def _levels(dyn: Dynamics) -> tuple[Mat, Mat]:
    """Level 0: P = F, Q = e eᵀ."""
    Q = [[dyn.e[i] * dyn.e[j] for j in range(dyn.k)] for i in range(dyn.k)]
    return dyn.F, Q


def _next_level(P: Mat, Q: Mat, out: tuple[Mat, Mat] | None = None) -> tuple[Mat, Mat]:
    """(P², Q + P Q Pᵀ): the next level; written into ``out`` = (P', Q') if given (Q' with
    ``Q'[j][i] is Q'[i][j]``), the same arithmetic either way."""
    S = _sandwich(P, Q)
    k = len(Q)
    Qn: Mat = [[None] * k for _ in range(k)] if out is None else out[1]  # type: ignore[list-item]
    for i in range(k):
        for j in range(i, k):
            Qn[i][j] = Qn[j][i] = np.add(Q[i][j], S[i][j], out=None if out is None else Qn[i][j])
    return _matmul(P, P, None if out is None else out[0]), Qn


def _level_risk(
    P: Mat, Q: Mat, u: list[float], obs: int, w: np.ndarray, v0: np.ndarray, shared: bool
) -> np.ndarray:
    """The risk at a level: Σ_bins w·(v0 y² + N) with y = (F^t)[obs]·u and N = Q_t[obs][obs]."""
    return _risk(_pick(P[obs], u), Q[obs][obs], w, v0, shared)


def _abs(M: Mat) -> Mat:
    return [[np.abs(x) for x in row] for row in M]


def relax_time(dyn: Dynamics) -> np.ndarray:
    """1/(1 − ρ(F)) per configuration and bin (``inf`` where the spectral radius ρ(F) >= 1): the
    steps over which rounding errors can still grow (see ``LOST_TOL``). F is block triangular:
    its eigenvalues are those of the (θ, m) block (θ's alone without momentum) and γ with EMA."""
    F = dyn.F
    use_e = dyn.obs != 0
    use_m = dyn.k - int(use_e) == 2
    with np.errstate(all="ignore"):
        if use_m:
            tau = F[0][0] + F[1][1]
            det = F[0][0] * F[1][1] - F[0][1] * F[1][0]
            disc = tau * tau - 4.0 * det
            rad = np.where(
                disc < 0,
                np.sqrt(np.abs(det)),
                0.5 * (np.abs(tau) + np.sqrt(np.maximum(disc, 0.0))),
            )
        else:
            rad = np.abs(F[0][0])
        if use_e:
            rad = np.maximum(rad, np.abs(F[-1][-1]))
        return np.where(rad < 1.0, 1.0 / (1.0 - rad), np.inf)


def _error(
    value: np.ndarray, mag: np.ndarray, t: np.ndarray | int, relax: np.ndarray
) -> np.ndarray:
    """Estimated absolute rounding error of E[θ²] = ``value`` (magnitude ``mag`` of its terms)
    after ``t`` steps (see ``LOST_TOL``): ``inf`` if negative, LOST_SAFETY·eps·mag·min(t, t_relax)
    where the terms cancel by more than LOST_RHO, else 0. Non-finite values are left to the
    callers (overflow)."""
    with np.errstate(all="ignore"):
        grow = np.minimum(t, relax) * (_EPS * LOST_SAFETY)
        err = np.where(mag > LOST_RHO * value, mag * grow, 0.0)
        return np.where(np.isfinite(value), np.where(value < 0, np.inf, err), 0.0)


def _level_error(
    P: Mat, Q: Mat, u: list[float], obs: int, v0: np.ndarray, t: int, relax: np.ndarray
) -> np.ndarray:
    """``_error`` of the next level's E[θ²] at t = 2·(the current level's steps) per bin: P² and
    Q + PQPᵀ's observed entries against |P||P| and |Q| + |P||Q||P|ᵀ (before ``_next_level``)."""
    Pn, Qn = _row_times(P[obs], P), Q[obs][obs] + _quad(P[obs], Q)
    pa = [np.abs(x) for x in P[obs]]
    ym = _pick(_row_times(pa, _abs(P)), u)
    y = _pick(Pn, u)
    mag = ym * ym * v0 + (np.abs(Q[obs][obs]) + _quad(pa, _abs(Q)))
    return _error(y * y * v0 + Qn, mag, t, relax)


def _wsum(x: np.ndarray, w: np.ndarray, shared: bool) -> np.ndarray:
    """Σ_bins w·x per configuration (as ``_risk`` sums)."""
    return x @ w.reshape(-1) if shared else np.sum(w * x, axis=-1)


def second_moment(
    dyn: Dynamics, var0: np.ndarray | float, steps: np.ndarray, check: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """E[(oᵀ x_t)²] for per-configuration step counts ``steps`` (integer array, shape (configs, 1)).

    Exact for any F (stable or not) in exact arithmetic; cost O(log2 max(steps)) small-matrix
    products. With ``check`` also an array of the same shape: the estimated absolute rounding
    error of each value (see ``LOST_TOL``; ``inf`` for a negative one, 0 where nothing cancels).
    """
    steps = np.asarray(steps, dtype=np.int64)
    k = dyn.k
    ref = dyn.F[0][0]
    r: Vec = [np.full(ref.shape, 1.0 if i == dyn.obs else 0.0) for i in range(k)]
    N = np.zeros(ref.shape)
    P, Q = _levels(dyn)
    top = int(steps.max()).bit_length() if steps.size else 0
    v0 = np.asarray(var0, dtype=float)
    err = np.zeros(np.broadcast_shapes(ref.shape, steps.shape))
    relax = relax_time(dyn) if check else None
    done = np.zeros_like(steps)  # the steps taken so far
    with np.errstate(all="ignore"):
        for j in range(top):
            take = ((steps >> j) & 1).astype(bool)
            if np.any(take):
                Nn = N + _quad(r, Q)
                rn = _row_times(r, P)
                if check:  # the value after these steps against its terms' magnitude
                    ra = [np.abs(x) for x in r]
                    ym = _pick(_row_times(ra, _abs(P)), dyn.u)
                    y = _pick(rn, dyn.u)
                    mag = ym * ym * v0 + (np.abs(N) + _quad(ra, _abs(Q)))
                    e = _error(y * y * v0 + Nn, mag, done + (1 << j), relax)
                    err = np.where(take, err + e, err)
                N = np.where(take, Nn, N)
                r = [np.where(take, a, b) for a, b in zip(rn, r)]
                done = np.where(take, done + (1 << j), done)
            if j + 1 < top:
                if check:  # the level's own E[θ²] (at 2^(j+1) steps), for the steps that use it
                    e = _level_error(P, Q, dyn.u, dyn.obs, v0, 2 << j, relax)
                    err = np.where(steps >= (2 << j), err + e, err)
                P, Q = _next_level(P, Q)
        y = _pick(r, dyn.u)
        out = var0 * y * y + N
        return (out, err) if check else out


def _risk(y: np.ndarray, N: np.ndarray, w: np.ndarray, v: np.ndarray, shared: bool) -> np.ndarray:
    """Σ_bins w · (v y² + N): the risk of the configurations (``shared``: one weight vector)."""
    x = y * y
    x *= v
    x += N
    if shared:
        return x @ w.reshape(-1)
    return np.sum(w * x, axis=-1)


def _doubling(
    dyn: Dynamics,
    weights: np.ndarray,
    v0: np.ndarray,
    target: float,
    done0: np.ndarray,
    max_log2_steps: int,
    only_best: bool,
    shared: bool,
    relax: np.ndarray,
) -> tuple[np.ndarray, list, np.ndarray]:
    """The first level J with risk(2^J) <= target per configuration (-1: none), the levels'
    transition powers (kept for the bisection), and the configurations whose risk at a level up
    to theirs is lost to rounding (estimated error above its distance to the target,
    ``_error``: they never count as a hit; with ``only_best`` only their first level at or
    below the target is checked, as the compiled kernel does)."""
    obs = dyn.obs
    n = dyn.F[0][0].shape[0]
    first = np.full(n, -1)
    lost = np.zeros(n, dtype=bool)
    err = np.zeros(n)  # the current level's weighted error estimate (none at level 0)
    P, Q = _levels(dyn)
    levels = []
    for j in range(max_log2_steps + 1):
        levels.append((P, Q))
        risk = _level_risk(P, Q, dyn.u, obs, weights, v0, shared)
        pending = (first < 0) & ~done0 & ~lost
        # (the comparison could flip; the searches, only_best, check their hits only: a lost
        # level above the target can only make a configuration slower, no candidate anyway)
        check = pending if not only_best else pending & (risk <= target)
        lost |= check & (err > np.abs(risk - target))
        hit = (risk <= target) & pending & ~lost
        first[hit] = j
        pending = (first < 0) & ~done0 & ~lost
        if not np.any(pending) or (only_best and np.any(first >= 0)):
            break
        if j < max_log2_steps:
            err = _wsum(_level_error(P, Q, dyn.u, obs, v0, 2 << j, relax), weights, shared)
            P, Q = _next_level(P, Q)
    return first, levels, lost


def _bisect(
    levels: list,
    rows: np.ndarray | None,
    J: np.ndarray,
    u: list[float],
    obs: int,
    w: np.ndarray,
    v0: np.ndarray,
    target: float,
    only_best: bool,
    relax: np.ndarray,
) -> np.ndarray:
    """Steps t in (2^(J−1), 2^J] per configuration: the bits of t − 1 set greedily from the top.

    ``levels[j]`` holds (F^(2^j), Q_j) for j < max(J) with a row per configuration of the batch;
    ``rows`` picks the bisected configurations' rows (``None``: all, in order). ``w``, ``v0``
    and ``relax`` (:func:`relax_time`) are shared or already restricted to those rows. With
    ``only_best`` (all J equal) the configurations that cannot beat the best upper bound are
    dropped and reported ``inf``. A configuration with a trial risk lost to rounding (its
    estimated error, ``_error``, above its distance to the target) is ``nan`` (it takes no
    part in the bound once lost).
    """
    shared = w.ndim < 2 or w.shape[0] == 1
    n = J.size
    res = np.full(n, np.inf)
    top = int(J.max())
    bins = levels[0][0][0][0].shape[1]
    k = len(levels[0][0])
    r: Vec = [np.full((n, bins), 1.0 if i == obs else 0.0) for i in range(k)]
    N = np.zeros((n, bins))
    t = np.zeros(n, dtype=np.int64)
    lost = np.zeros(n, dtype=bool)
    idx = np.arange(n)  # configurations still bisected (positions in the result)
    alive: np.ndarray | None = None  # the same, None while all are
    for j in range(top - 1, -1, -1):
        Pl, Ql = levels[j]
        src = rows  # their rows in the levels
        if alive is not None:
            src = alive if src is None else src[alive]
        if src is not None:
            Pl = [[x[src] for x in row] for row in Pl]
            Ql = [[x[src] for x in row] for row in Ql]
        rn = _row_times(r, Pl)
        Nn = N + _quad(r, Ql)
        y = _pick(rn, u)
        risk = _risk(y, Nn, w, v0, shared)
        above = ~(risk <= target)
        # the trial's E[θ²] against the magnitude of its terms (see LOST_TOL)
        ra = [np.abs(x) for x in r]
        ym = _pick(_row_times(ra, _abs(Pl)), u)
        mag = ym * ym * v0 + (np.abs(N) + _quad(ra, _abs(Ql)))
        rl = relax if relax.shape[0] == 1 or alive is None else relax[alive]
        tt = (t + (1 << j))[:, None]
        err = _wsum(_error(y * y * v0 + Nn, mag, tt, rl), w, shared)
        lost |= (j <= J - 1) & (err > np.abs(risk - target))
        accept = np.where(j == J - 1, True, (j < J - 1) & above)
        t = np.where(accept, t + (1 << j), t)
        a2 = accept[:, None]
        N = np.where(a2, Nn, N)
        r = [np.where(a2, x, z) for x, z in zip(rn, r)]
        if only_best and j > 0:
            # all share J here; the answer of each lies in [t + 1, t + 2^j]: drop the
            # configurations that cannot beat the best upper bound (branch and bound; the
            # lost ones are dropped, as nan, once the others give a bound)
            ok = ~lost
            bound = np.min(t[ok] + (1 << j)) if ok.any() else -1
            keep = ok & (t + 1 <= bound)
            if keep.sum() <= keep.size // 2:
                gone = idx[~keep & lost]
                res[gone] = np.nan
                idx, t, J, N, lost = idx[keep], t[keep], J[keep], N[keep], lost[keep]
                alive = np.flatnonzero(keep) if alive is None else alive[keep]
                r = [x[keep] for x in r]
                w = w if shared else w[keep]
                v0 = v0 if v0.ndim < 2 or v0.shape[0] == 1 else v0[keep]
    res[idx] = np.where(lost, np.nan, (t + 1).astype(float))
    return res


def first_crossing(
    dyn: Dynamics,
    var0: np.ndarray | float,
    weights: np.ndarray,
    target: float,
    max_log2_steps: int = 40,
    only_best: bool = False,
) -> np.ndarray:
    """Per configuration, a step t with risk(t−1) > target ≥ risk(t) (the first one if monotone).

    risk(t) = Σ_bins weights · E[(oᵀ x_t)²]. Doubling finds the first power of two 2^J with
    risk ≤ target; then the bits of t are set greedily from the top (bisection on [2^(J−1), 2^J]).
    When the risk is non-increasing in t (e.g. plain SGD started above its steady state) the result
    is the smallest such t; when it oscillates (under-damped momentum) it is a down-crossing that
    is at most the first power of two below the target.

    Args:
        dyn: the batch of dynamics, entries of shape (configs, bins).
        var0: initial second moment E[θ_0²] per bin (broadcastable to (configs, bins)).
        weights: risk weight per bin (½ h_i × count_i), broadcastable to (configs, bins).
        target: the risk to reach.
        max_log2_steps: configurations that have not reached the target at 2^max_log2_steps steps
            are reported as ``inf``.
        only_best: stop doubling at the first power of two any configuration reaches and report
            ``inf`` for all configurations that are certainly slower (the grid searches'
            semantics; they run its compiled equivalent, :func:`curvlab.nqm._kernel.grid_crossing`).

    Returns:
        float array of shape (configs,): steps (integers as floats) or ``inf``; ``nan`` where a
        risk evaluated on the way is lost to rounding (its estimated error, see ``LOST_TOL``,
        above its distance to the target: momentum next to its stability limit), which never
        counts as a crossing (``inf`` with ``only_best``: no candidate of the searches).
    """
    weights = np.asarray(weights, dtype=float)
    v0 = np.asarray(var0, dtype=float)
    return _general_crossing(dyn, v0, weights, target, max_log2_steps, only_best)


def _general_crossing(
    dyn: Dynamics,
    v0: np.ndarray,
    weights: np.ndarray,
    target: float,
    max_log2_steps: int,
    only_best: bool,
) -> np.ndarray:
    """:func:`first_crossing` for any dynamics (arrays already converted)."""
    obs = dyn.obs
    shared = weights.ndim < 2 or weights.shape[0] == 1
    n_cfg = dyn.F[0][0].shape[0]
    out = np.full(n_cfg, np.inf)
    start = np.sum(weights * v0 * np.ones(dyn.F[0][0].shape), axis=-1)
    done0 = start <= target
    out[done0] = 0.0
    with np.errstate(all="ignore"):
        relax = relax_time(dyn)
        first, levels, lost = _doubling(
            dyn, weights, v0, target, done0, max_log2_steps, only_best, shared, relax
        )
        out[lost] = np.inf if only_best else np.nan
        todo = np.flatnonzero(first >= 0)
        if todo.size == 0:
            return out
        w = weights if shared else weights[todo]
        v0 = v0 if v0.ndim < 2 or v0.shape[0] == 1 else v0[todo]
        relax = relax[todo]
        rows = None if todo.size == n_cfg else todo
        out[todo] = _bisect(levels, rows, first[todo], dyn.u, obs, w, v0, target, only_best, relax)
    if only_best:  # the searches: a lost configuration is no candidate, as a slower one
        out[np.isnan(out)] = np.inf
    return out
