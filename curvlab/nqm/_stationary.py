"""The learning rates at which the searches' stationary risk equals the target, compiled.

The searches of :mod:`curvlab.nqm._search` start their learning-rate grids from these rates. Both
bisections run here with numba, with the numpy formulas' operations in the same order and numpy's
own summation over the bins (:func:`_pairwise_sum`, the pairwise scheme of ``np.sum``), so the
rates are the numpy code's bit for bit (``tests/test_nqm_kernel.py``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["stationary_lr", "steady_state_lr"]


@njit(cache=True, nogil=True, error_model="numpy")
def _block_sum(x: np.ndarray, lo: int, n: int) -> float:
    """numpy's sum of at most 128 terms: sequential below 8, else eight running sums."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += x[i]
        return res
    r0, r1, r2, r3 = x[lo], x[lo + 1], x[lo + 2], x[lo + 3]
    r4, r5, r6, r7 = x[lo + 4], x[lo + 5], x[lo + 6], x[lo + 7]
    m = n - n % 8
    for i in range(lo + 8, lo + m, 8):
        r0 += x[i]
        r1 += x[i + 1]
        r2 += x[i + 2]
        r3 += x[i + 3]
        r4 += x[i + 4]
        r5 += x[i + 5]
        r6 += x[i + 6]
        r7 += x[i + 7]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(lo + m, lo + n):
        res += x[i]
    return res


@njit(cache=True, nogil=True, error_model="numpy")
def _pairwise_sum(x: np.ndarray, lo: int, n: int) -> float:
    """``np.sum`` of x[lo:lo + n] in numpy's order: blocks of at most 128 terms
    (:func:`_block_sum`), above that the two halves (cut at a multiple of 8) summed apart and
    added. The halving runs on an explicit stack (numba's disk cache mishandles recursion)."""
    if n <= 128:
        return _block_sum(x, lo, n)
    # post-order walk of numpy's halving tree: (start, length, left half's sum or nan)
    starts = np.empty(64, np.int64)
    sizes = np.empty(64, np.int64)
    lefts = np.empty(64)
    done = np.zeros(64, np.bool_)
    depth = 0
    starts[0], sizes[0], done[0] = lo, n, False
    value = 0.0
    while True:
        m = sizes[depth]
        if m <= 128:  # a leaf: hand its sum up
            value = _block_sum(x, starts[depth], m)
            while True:
                if depth == 0:
                    return value
                depth -= 1
                if not done[depth]:  # the left half finished: go down its right half
                    done[depth] = True
                    lefts[depth] = value
                    h = sizes[depth] // 2
                    h -= h % 8
                    starts[depth + 1] = starts[depth] + h
                    sizes[depth + 1] = sizes[depth] - h
                    done[depth + 1] = False
                    depth += 1
                    break
                value = lefts[depth] + value  # both halves finished
        else:  # go down the left half
            h = m // 2
            h -= h % 8
            starts[depth + 1] = starts[depth]
            sizes[depth + 1] = h
            done[depth + 1] = False
            depth += 1


@njit(cache=True, nogil=True, error_model="numpy")
def _sgd_risk(lr: float, a: np.ndarray, s: np.ndarray, w: np.ndarray, x: np.ndarray) -> float:
    """Σ w α s / (a (2 − α a)): plain SGD's steady-state risk."""
    for b in range(a.shape[0]):
        x[b] = w[b] * lr * s[b] / (a[b] * (2.0 - lr * a[b]))
    return _pairwise_sum(x, 0, x.shape[0])


@njit(cache=True, nogil=True, error_model="numpy")
def _steady_state_lr(
    a: np.ndarray, s: np.ndarray, w: np.ndarray, target: float, hi: float
) -> float:
    x = np.empty(a.shape[0])
    if _sgd_risk(hi, a, s, w, x) <= target:
        return hi
    lo = hi
    while _sgd_risk(lo, a, s, w, x) > target and lo > 1e-300:
        lo /= 16.0
    for _ in range(200):  # bisection in log space
        mid = math.sqrt(lo * hi)
        if not lo < mid:  # lo * hi underflowed (a target near the smallest floats)
            mid = math.sqrt(lo) * math.sqrt(hi)
        if _sgd_risk(mid, a, s, w, x) <= target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return lo


def steady_state_lr(a: np.ndarray, s: np.ndarray, w: np.ndarray, target: float, hi: float) -> float:
    """The lr at which plain SGD's steady-state risk Σ w α s / (a(2 − α a)) equals ``target``
    (``hi`` if its risk is already below; bisection in log space to a relative 1e-12).

    Args:
        a, s, w: effective curvature, per-step noise variance and risk weight per bin.
        target: the risk.
        hi: the largest lr considered (the stability limit).
    """
    f = np.ascontiguousarray
    return float(
        _steady_state_lr(f(a, dtype=float), f(s, dtype=float), f(w, dtype=float), target, hi)
    )


@njit(cache=True, nogil=True, error_model="numpy")
def _stationary_risk(
    u: float,
    k: float,
    momentum: bool,
    a: np.ndarray,
    s: np.ndarray,
    w: np.ndarray,
    x: np.ndarray,
) -> float:
    d = 1.0 - k
    for b in range(a.shape[0]):
        if momentum:
            lr = u * k
            v = lr * s[b] * (1 + d) / (a[b] * (2 * d + 2 - lr * a[b]) * k)
        else:
            q = 1 - u * a[b]
            v = u * s[b] * k * (1 + q * d) / (a[b] * (2 - u * a[b]) * (1 + d) * (1 - q * d))
        x[b] = w[b] * v
    return _pairwise_sum(x, 0, x.shape[0])


@njit(cache=True, nogil=True, error_model="numpy")
def _stationary_lr(
    momentum: bool,
    a: np.ndarray,
    s: np.ndarray,
    w: np.ndarray,
    kappa: np.ndarray,
    hi: np.ndarray,
    target: float,
) -> np.ndarray:
    x = np.empty(a.shape[0])
    out = np.empty(kappa.shape[0])
    for i in range(kappa.shape[0]):
        k = kappa[i]
        lo = hi[i]
        for _ in range(200):
            if not (_stationary_risk(lo, k, momentum, a, s, w, x) > target):
                break
            lo = lo / 16.0
        if _stationary_risk(hi[i], k, momentum, a, s, w, x) <= target:
            out[i] = hi[i]
            continue
        up = hi[i]
        for _ in range(60):
            mid = np.sqrt(lo * up)
            if _stationary_risk(mid, k, momentum, a, s, w, x) <= target:
                lo = mid
            else:
                up = mid
        out[i] = lo
    return out


def stationary_lr(
    optimizer: str,
    a: np.ndarray,
    s: np.ndarray,
    w: np.ndarray,
    kappa: np.ndarray,
    hi: np.ndarray,
    target: float,
) -> np.ndarray:
    """Per κ, the (effective) lr whose stationary risk equals the target (``hi`` if below it).

    Stationary E[θ²] per coordinate: momentum α s (1+β) / (a (2β + 2 − α a)(1 − β)) (eq. 6)
    with α = u κ, EMA u s (1−γ)(1 + qγ) / (a (2 − u a)(1 + γ)(1 − qγ)) with q = 1 − u a (eq. 12);
    κ = 1 − β (1 − γ). Halving from ``hi`` until below the target, then 60 bisection steps in
    log space.

    Args:
        optimizer: ``"momentum"`` or ``"ema"``.
        a, s, w: effective curvature, per-step noise variance and risk weight per bin.
        kappa, hi: κ per row and the largest (effective) lr of the row.
        target: the risk.
    """
    f = np.ascontiguousarray
    return _stationary_lr(
        optimizer == "momentum",
        f(a, dtype=float),
        f(s, dtype=float),
        f(w, dtype=float),
        f(kappa, dtype=float),
        f(hi, dtype=float),
        float(target),
    )
