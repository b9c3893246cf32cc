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
matrix inverse, so critically damped or unstable settings are handled exactly too.

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


def second_moment(dyn: Dynamics, var0: np.ndarray | float, steps: np.ndarray) -> np.ndarray:
    """E[(oᵀ x_t)²] for per-configuration step counts ``steps`` (integer array, shape (configs, 1)).

    Exact for any F (stable or not); cost O(log2 max(steps)) small-matrix products.
    """
    steps = np.asarray(steps, dtype=np.int64)
    k = dyn.k
    ref = dyn.F[0][0]
    r: Vec = [np.full(ref.shape, 1.0 if i == dyn.obs else 0.0) for i in range(k)]
    N = np.zeros(ref.shape)
    P, Q = _levels(dyn)
    top = int(steps.max()).bit_length() if steps.size else 0
    with np.errstate(all="ignore"):
        for j in range(top):
            take = ((steps >> j) & 1).astype(bool)
            if np.any(take):
                N = np.where(take, N + _quad(r, Q), N)
                rn = _row_times(r, P)
                r = [np.where(take, a, b) for a, b in zip(rn, r)]
            if j + 1 < top:
                P, Q = _next_level(P, Q)
        y = _pick(r, dyn.u)
        return var0 * y * y + N


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
) -> tuple[np.ndarray, list]:
    """The first level J with risk(2^J) <= target per configuration (-1: none), and the levels'
    transition powers (kept for the bisection)."""
    obs = dyn.obs
    first = np.full(dyn.F[0][0].shape[0], -1)
    P, Q = _levels(dyn)
    levels = []
    for j in range(max_log2_steps + 1):
        levels.append((P, Q))
        risk = _level_risk(P, Q, dyn.u, obs, weights, v0, shared)
        hit = (risk <= target) & (first < 0) & ~done0
        first[hit] = j
        pending = (first < 0) & ~done0
        if not np.any(pending) or (only_best and np.any(first >= 0)):
            break
        if j < max_log2_steps:
            P, Q = _next_level(P, Q)
    return first, levels


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
) -> np.ndarray:
    """Steps t in (2^(J−1), 2^J] per configuration: the bits of t − 1 set greedily from the top.

    ``levels[j]`` holds (F^(2^j), Q_j) for j < max(J) with a row per configuration of the batch;
    ``rows`` picks the bisected configurations' rows (``None``: all, in order). ``w`` and ``v0``
    are shared or already restricted to those rows. With ``only_best`` (all J equal) the
    configurations that cannot beat the best upper bound are dropped and reported ``inf``.
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
        above = ~(_risk(_pick(rn, u), Nn, w, v0, shared) <= target)
        accept = np.where(j == J - 1, True, (j < J - 1) & above)
        t = np.where(accept, t + (1 << j), t)
        a2 = accept[:, None]
        N = np.where(a2, Nn, N)
        r = [np.where(a2, x, z) for x, z in zip(rn, r)]
        if only_best and j > 0:
            # all share J here; the answer of each lies in [t + 1, t + 2^j]: drop the
            # configurations that cannot beat the best upper bound (branch and bound)
            keep = t + 1 <= np.min(t + (1 << j))
            if keep.sum() <= keep.size // 2:
                idx, t, J, N = idx[keep], t[keep], J[keep], N[keep]
                alive = np.flatnonzero(keep) if alive is None else alive[keep]
                r = [x[keep] for x in r]
                w = w if shared else w[keep]
                v0 = v0 if v0.ndim < 2 or v0.shape[0] == 1 else v0[keep]
    res[idx] = (t + 1).astype(float)
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
        float array of shape (configs,): steps (integers as floats) or ``inf``.
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
        first, levels = _doubling(
            dyn, weights, v0, target, done0, max_log2_steps, only_best, shared
        )
        todo = np.flatnonzero(first >= 0)
        if todo.size == 0:
            return out
        w = weights if shared else weights[todo]
        v0 = v0 if v0.ndim < 2 or v0.shape[0] == 1 else v0[todo]
        rows = None if todo.size == n_cfg else todo
        out[todo] = _bisect(levels, rows, first[todo], dyn.u, obs, w, v0, target, only_best)
    return out
