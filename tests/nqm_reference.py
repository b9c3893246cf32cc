"""Brute-force reference for the NQM tuning: the search of ``curvlab.nqm.optimal`` as of commit
416d8c1 (before the speed-ups of issue #23, point 6), kept verbatim.

``reference_optimal(nqm, batch_size, ...)`` evaluates every grid configuration with the original
doubling + greedy bisection over the bits of t (:func:`first_crossing`), one small-matrix product at
a time, so ``tests/test_nqm_reference.py`` can check that the faster search picks identical
hyperparameters and steps. Do not optimise this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from curvlab.nqm._tuning import OptimalResult
from curvlab.nqm._validate import _positive, _power

Mat = list[list[np.ndarray]]
Vec = list[np.ndarray]


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
) -> Dynamics:
    """Build F, e, u for heavy-ball momentum (eq. 5) with EMA (eq. 11) of the iterate.

    Args:
        lr: learning rates α, shape (configs, 1) (broadcast against bins).
        curvature: effective curvatures a = h^(1−p), shape (1, bins) or (configs, bins).
        noise_var: per-step noise variances s = c h^(−2p)/B, same broadcasting.
        momentum: β per configuration, shape (configs, 1). The m state is included only if any
            β is non-zero.
        ema: γ per configuration, shape (configs, 1). θ̃ is included only if any γ is non-zero.

    Returns:
        The :class:`Dynamics` with all entries broadcast to (configs, bins).
    """
    use_m = bool(np.any(momentum != 0))
    use_e = bool(np.any(ema != 0))
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


def _dot(xs: Vec, ys: Vec) -> np.ndarray:
    """Σ_l xs[l]·ys[l] with one temporary (in-place accumulation)."""
    acc = xs[0] * ys[0]
    for x, y in zip(xs[1:], ys[1:]):
        acc += x * y
    return acc


def _matmul(A: Mat, B: Mat) -> Mat:
    k = len(A)
    cols = [[B[l][j] for l in range(k)] for j in range(k)]
    return [[_dot(A[i], cols[j]) for j in range(k)] for i in range(k)]


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


def _next_level(P: Mat, Q: Mat) -> tuple[Mat, Mat]:
    S = _sandwich(P, Q)
    k = len(Q)
    Qn: Mat = [[None] * k for _ in range(k)]  # type: ignore[list-item]
    for i in range(k):
        for j in range(i, k):
            Qn[i][j] = Qn[j][i] = Q[i][j] + S[i][j]
    return _matmul(P, P), Qn


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
        y = _pick(P[obs], dyn.u)
        hit = (_risk(y, Q[obs][obs], weights, v0, shared) <= target) & (first < 0) & ~done0
        first[hit] = j
        pending = (first < 0) & ~done0
        if not np.any(pending) or (only_best and np.any(first >= 0)):
            break
        if j < max_log2_steps:
            P, Q = _next_level(P, Q)
    return first, levels


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
            ``inf`` for all configurations that are certainly slower (used by grid searches).

    Returns:
        float array of shape (configs,): steps (integers as floats) or ``inf``.
    """
    weights = np.asarray(weights, dtype=float)
    obs = dyn.obs
    shared = weights.ndim < 2 or weights.shape[0] == 1
    v0 = np.asarray(var0, dtype=float)

    def risk_of(y: np.ndarray, N: np.ndarray, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        return _risk(y, N, w, v, shared)

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
        J = first[todo]
        top = int(J.max())
        n_all = n_cfg
        w = weights if shared else weights[todo]
        v0 = v0 if v0.ndim < 2 or v0.shape[0] == 1 else v0[todo]
        shape = (todo.size, dyn.F[0][0].shape[1])
        r: Vec = [np.full(shape, 1.0 if i == obs else 0.0) for i in range(dyn.k)]
        N = np.zeros(shape)
        t = np.zeros(todo.size, dtype=np.int64)
        idx = todo  # configurations still bisected (indices into the full batch)
        for j in range(top - 1, -1, -1):
            Pl, Ql = levels[j]
            if idx.size != n_all:
                Pl = [[x[idx] for x in row] for row in Pl]
                Ql = [[x[idx] for x in row] for row in Ql]
            rn = _row_times(r, Pl)
            Nn = N + _quad(r, Ql)
            above = ~(risk_of(_pick(rn, dyn.u), Nn, w, v0) <= target)
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
                    out[idx[~keep]] = np.inf
                    idx, t, J, N = idx[keep], t[keep], J[keep], N[keep]
                    r = [x[keep] for x in r]
                    w = w if shared else w[keep]
                    v0 = v0 if v0.ndim < 2 or v0.shape[0] == 1 else v0[keep]
        todo = idx
        out[todo] = (t + 1).astype(float)
    return out


OPTIMIZERS = ("sgd", "momentum", "ema")
# smallest 1 - β (momentum) and 1 - γ (EMA) on the first grid. Momentum stops at 1e-4: closer to
# 1 the slowest modes are strongly under-damped and the risk oscillates, dipping below the target
# transiently in phase across bins (an artefact of "first step with risk <= target"); EMA has no
# such oscillation and profits from long averaging windows at small batch sizes.
DECAY_MIN = {"momentum": 1e-4, "ema": 1e-6}


def _steady_state_lr(
    a: np.ndarray, s: np.ndarray, w: np.ndarray, target: float, hi: float
) -> float:
    """The lr at which plain SGD's steady-state risk Σ w α s / (a(2 − α a)) equals target."""

    def ss(lr: float) -> float:
        return float(np.sum(w * lr * s / (a * (2.0 - lr * a))))

    if ss(hi) <= target:
        return hi
    lo = hi
    while ss(lo) > target and lo > 1e-300:
        lo /= 16.0
    for _ in range(200):  # bisection in log space
        mid = math.sqrt(lo * hi)
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
        with np.errstate(all="ignore"):
            if optimizer == "momentum":
                lr = u * k
                v = lr * s * (1 + d) / (a * (2 * d + 2 - lr * a) * k)
            else:
                q = 1 - u * a
                v = u * s * k * (1 + q * d) / (a * (2 - u * a) * (1 + d) * (1 - q * d))
        return np.sum(w * v, axis=-1)

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

    def __init__(self, nqm: Any, batch_size: float, precond_power: float, target: float) -> None:
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
        steps = first_crossing(
            self.dyn(lr, beta, gamma), self.v0[None, :], self.w[None, :], self.target, 48, True
        )
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


def reference_optimal(
    nqm: Any,
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
    if decay_points is None:
        decay_points = 20 if optimizer == "ema" else 14
    if decay_min is None:
        decay_min = DECAY_MIN.get(optimizer, 1e-4)
    if lr_points_per_decade < 2 or decay_points < 3 or refine < 0 or lr_decades <= 0:
        raise ValueError(
            "need lr_points_per_decade >= 2, decay_points >= 3, refine >= 0, lr_decades > 0"
        )
    if not 0 < decay_min < 0.9:
        raise ValueError(f"decay_min must be in (0, 0.9), got {decay_min!r}")
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


def assert_same_or_fewer(new: OptimalResult, ref: OptimalResult, nqm: Any) -> None:
    """``optimal`` evaluates every point of the reference search, bit for bit, and since review
    s10 more where the reference stops at an edge: past the decay grid's lower edge while the
    best 1 − β (1 − γ) lies on it, and the gap to the stability limit 2/a_max when plain SGD's
    best lr is next to it; since review s17 also the gap to momentum's and EMA's limit
    (2(1 + β)/a_max, 2/a_max) when the best cell of their first grid is next to it. So its
    answer is the reference's, identical, unless the reference's best lies on such an edge or
    near such a limit; there it takes at most as many steps, and as many only with a risk at
    that step no larger (ties are broken by the lowest risk)."""
    if new == ref:
        return
    decay = ref.momentum if ref.optimizer == "momentum" else ref.ema
    on_decay_edge = ref.optimizer != "sgd" and decay == 1.0 - DECAY_MIN[ref.optimizer]
    a_max = float(nqm.effective(1.0, ref.precond_power)[0].max())
    beta = ref.momentum if ref.optimizer == "momentum" else 0.0
    # the zoom of a best cell next to the limit spans the neighbouring κ (a factor ~2 in
    # momentum's limit of the effective lr) and lrs down to two grid points (1.33² ≈ 1.8) below
    near_limit = ref.lr > (0.5 if ref.optimizer == "sgd" else 0.2) * 2.0 * (1.0 + beta) / a_max
    assert on_decay_edge or near_limit, (new, ref)
    assert new.steps <= ref.steps, (new, ref)
    if new.steps == ref.steps and 0 < ref.steps < math.inf:
        t, B, p = int(ref.steps), ref.batch_size, ref.precond_power

        def risk(r: OptimalResult) -> float:
            return nqm.risk(t, r.lr, B, momentum=r.momentum, precond_power=p, ema=r.ema)

        assert risk(new) <= risk(ref), (new, ref)
