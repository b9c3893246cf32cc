"""Optimised piecewise-constant learning-rate schedules for (preconditioned) SGD on the NQM.

Zhang et al. (2019), Section 3.7.2 and footnote 3: for a given number of steps T the exact final
risk of a schedule with ``pieces`` constant pieces is computed by dynamic programming over the
pieces with eq. 3 (each piece in closed form, eqs. 3–4), minimised over the piece learning rates
with BFGS (analytic gradient by a backward pass), and the smallest T whose optimised risk reaches
the target is found by bisection. Learning rates are kept below 2/a_max (2/h_1 for p = 0) through
α_k = α_max·sigmoid(z_k).

Example:
    >>> from curvlab.nqm import NQM
    >>> nqm = NQM.paper(d=1000, bins=30)
    >>> res = nqm.optimize_schedule(4, target=0.05, pieces=10)
    >>> res.steps <= res.constant.steps
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from curvlab.nqm._tuning import OptimalResult, optimal

if TYPE_CHECKING:
    from curvlab.nqm._model import NQM

__all__ = ["ScheduleResult", "optimize_schedule", "schedule_risk"]


@dataclass(frozen=True)
class ScheduleResult:
    """An optimised schedule.

    Attributes:
        steps: fewest steps T found to reach the target (``inf`` if even a constant lr cannot).
        lrs: learning rate of each piece.
        boundaries: step index where each piece starts, plus T at the end (length pieces + 1).
        risk: final exact risk of the schedule after ``steps`` steps.
        constant: the best constant learning rate (the starting point and the comparison).
    """

    steps: float
    lrs: np.ndarray
    boundaries: np.ndarray
    risk: float
    constant: OptimalResult


def _pieces(total: int, pieces: int) -> np.ndarray:
    k = max(1, min(pieces, total))
    return np.round(np.linspace(0, total, k + 1)).astype(np.int64)


def schedule_risk(
    nqm: NQM,
    lrs: np.ndarray,
    lengths: np.ndarray,
    batch_size: float,
    precond_power: float = 0.0,
    grad: bool = False,
) -> tuple[float, np.ndarray | None]:
    """Exact risk after running piece k at lr ``lrs[k]`` for ``lengths[k]`` steps (eq. 3 DP).

    Returns (risk, d risk / d lrs) (the gradient only if ``grad``).
    """
    a, s = nqm.effective(batch_size, precond_power)
    lrs = np.asarray(lrs, dtype=float)
    lengths = np.asarray(lengths, dtype=float)
    v = nqm.init_var.copy()
    saved = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for lr, L in zip(lrs, lengths):
            x = lr * a
            q = 1.0 - x
            rho = q * q
            log_rho = 2.0 * np.where(x <= 1.0, np.log1p(-np.minimum(x, 1.0)), np.log1p(x - 2.0))
            g = np.exp(L * log_rho) if L > 0 else np.ones_like(x)
            D = x * (2.0 - x)  # 1 - rho
            geo = np.where(D > 1e-300, -np.expm1(L * log_rho) / D, L)
            saved.append((v, x, q, rho, g, D, geo))
            v = g * v + lr * lr * s * geo
        risk = float(np.sum(nqm.weights * v))
        if not grad:
            return risk, None
        lam = nqm.weights.copy()
        out = np.zeros_like(lrs)
        for k in range(len(lrs) - 1, -1, -1):
            v_prev, x, q, rho, g, D, geo = saved[k]
            lr, L = lrs[k], lengths[k]
            dg = L * np.power(rho, L - 1.0) * (-2.0 * a * q) if L > 0 else np.zeros_like(x)
            dD = 2.0 * a * q
            dgeo = np.where(D > 1e-300, (-dg * D - (1.0 - g) * dD) / (D * D), 0.0)
            dh = 2.0 * lr * s * geo + lr * lr * s * dgeo
            out[k] = float(np.sum(lam * (dg * v_prev + dh)))
            lam = lam * g
    return risk, out


def _optimise(
    nqm: NQM, total: int, pieces: int, batch_size: float, p: float, z0: np.ndarray, lr_max: float
) -> tuple[float, np.ndarray]:
    lengths = np.diff(_pieces(total, pieces)).astype(float)
    z0 = np.resize(z0, lengths.size)

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        sig = expit(z)
        lrs = lr_max * sig
        r, g = schedule_risk(nqm, lrs, lengths, batch_size, p, grad=True)
        assert g is not None
        return math.log(r), g * lrs * (1.0 - sig) / r

    res = minimize(fun, z0, jac=True, method="BFGS", options={"gtol": 1e-7, "maxiter": 400})
    z = res.x if math.isfinite(res.fun) and res.fun <= fun(z0)[0] else z0
    return math.exp(fun(z)[0]), z


def optimize_schedule(
    nqm: NQM,
    batch_size: float,
    target: float = 0.01,
    pieces: int = 50,
    precond_power: float = 0.0,
    rel_tol: float = 0.01,
) -> ScheduleResult:
    """Fewest steps to ``target`` over piecewise-constant lr schedules with ``pieces`` pieces.

    Args:
        nqm: the model.
        batch_size: B > 0.
        target: risk to reach.
        pieces: number of equal-length constant pieces (fewer if T < pieces).
        precond_power: p of P = H^p.
        rel_tol: bisection over T stops when the bracket is within this relative width.

    Returns:
        :class:`ScheduleResult`; ``steps`` is never worse than the best constant lr.
    """
    if int(pieces) != pieces or pieces < 1:
        raise ValueError(f"pieces must be a positive integer, got {pieces!r}")
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    const = optimal(nqm, batch_size, target, "sgd", precond_power)
    a, _ = nqm.effective(batch_size, precond_power)
    lr_max = 2.0 / float(a.max())
    if not math.isfinite(const.steps):
        return ScheduleResult(math.inf, np.array([]), np.array([0]), math.nan, const)
    z_const = math.log(const.lr / (lr_max - const.lr))
    hi = int(const.steps)
    z_hi = np.full(min(pieces, hi), z_const)
    r_hi = nqm.risk(hi, const.lr, batch_size, precond_power=precond_power)
    lo = max(1, int(nqm.lower_bound(target, batch_size) / 4))
    while lo < hi:
        r_lo, z_lo = _optimise(nqm, lo, pieces, batch_size, precond_power, z_hi, lr_max)
        if r_lo > target:
            break
        hi, z_hi, r_hi, lo = lo, z_lo, r_lo, max(1, lo // 4)
        if hi == 1:
            break
    while hi - lo > max(1, rel_tol * hi):
        mid = int(math.sqrt(lo * hi)) if hi > 4 * lo else (lo + hi) // 2
        mid = min(max(mid, lo + 1), hi - 1)
        r_mid, z_mid = _optimise(nqm, mid, pieces, batch_size, precond_power, z_hi, lr_max)
        if r_mid <= target:
            hi, z_hi, r_hi = mid, z_mid, r_mid
        else:
            lo = mid
    lrs = lr_max * expit(np.resize(z_hi, len(_pieces(hi, pieces)) - 1))
    return ScheduleResult(float(hi), lrs, _pieces(hi, pieces), float(r_hi), const)
