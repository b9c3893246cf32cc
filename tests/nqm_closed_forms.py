"""Reference for the tests: the closed forms of Zhang et al. (2019) for one NQM coordinate: eqs. 3–4 and 9, and the 3×3
moment recursions of eq. 21 (momentum) and eq. 38 (EMA), evaluated with matrix powers.

Notation per coordinate: effective curvature a = h^(1−p), per-step noise variance
s = c h^(−2p)/B (preconditioner P = H^p applied to the gradient), learning rate α,
q = 1 − α a. All functions return E[θ_t²] (or E[θ̃_t²] with EMA) for θ_0 ~ N(0, var0); the
risk of the coordinate is ½ h times it.

* SGD, eqs. 3–4 / 9:  E[θ_t²] = q^(2t) var0 + α² s (1 − q^(2t)) / (1 − q²).
* Momentum, eq. 21: v = [A(θ), α² A(m), −α C(θ, m)], v(t+1) = T v(t) + α² s·[1, 1, 1].
* EMA, eq. 38: v = [A(θ), A(θ̃)/(1−γ)², C(θ, θ̃)/(1−γ)], v(t+1) = T v(t) + α² s·[1, 1, 1] with
  T = [[q², 0, 0], [q², γ², 2γq], [q², 0, γq]]. (The paper prints T[1, 2] = 2γ(1−γ)(1−αh); the
  factor (1−γ) is a typo: dividing the recursion for A(θ̃) by (1−γ)² leaves 2γq. The tests check
  this form against Monte-Carlo simulation.)

v(t) = Tᵗ v(0) + Σ_{p<t} Tᵖ n is evaluated with binary powering of the pair (Tᵗ, Σ_{p<t} Tᵖ n)
for per-element t: exact, no loop over steps, no inverse of (I − T).

Example:
    >>> import numpy as np
    >>> round(float(sgd_second_moment(np.array(10), 0.1, 1.0, 0.0, 1.0)), 12)  # 0.9**20
    0.121576654591
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "sgd_second_moment",
    "momentum_transition",
    "ema_transition",
    "transition_second_moment",
]


def sgd_second_moment(
    steps: np.ndarray, lr: np.ndarray | float, a: np.ndarray, s: np.ndarray, var0: np.ndarray
) -> np.ndarray:
    """E[θ_t²] of plain (preconditioned) SGD, eqs. 3–4 (and 9 with a = h^(1−p)).

    Args:
        steps: integer steps t (broadcastable).
        lr: learning rate α.
        a: effective curvature per coordinate.
        s: per-step gradient-noise variance per coordinate (c h^(−2p)/B).
        var0: E[θ_0²].

    Returns:
        The second moment, broadcast over all arguments. Uses log1p/expm1 so that
        α a → 0 and α a → 2 (ρ = q² → 1) are exact limits, not 0/0.
    """
    steps = np.asarray(steps, dtype=float)
    x = np.asarray(lr * a, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_rho = 2.0 * np.where(x <= 1.0, np.log1p(-np.minimum(x, 1.0)), np.log1p(x - 2.0))
        rho_t = np.where(steps == 0, 1.0, np.exp(steps * log_rho))
        # geometric sum Σ_{k<t} ρ^k = expm1(t log ρ) / expm1(log ρ), with the limit t at ρ = 1
        geo = np.where(
            np.abs(log_rho) < 1e-300,
            steps,
            np.expm1(steps * log_rho) / np.expm1(log_rho),
        )
        geo = np.where(steps == 0, 0.0, geo)
        return rho_t * var0 + lr * lr * s * geo


def momentum_transition(
    lr: np.ndarray, a: np.ndarray, s: np.ndarray, beta: np.ndarray
) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Transition T and noise n of eq. 21 for v = [A(θ), α² A(m), −α C(θ, m)].

    Args:
        lr: learning rate α; a: effective curvature; s: per-step noise variance; beta: momentum β.

    Returns:
        (T, n) with entry-wise broadcast arrays.
    """
    x = lr * a
    q = 1.0 - x
    b2 = beta * beta
    T = [
        [q * q, b2, 2.0 * q * beta],
        [x * x, b2, -2.0 * beta * x],
        [-q * x, b2, (1.0 - 2.0 * x) * beta],
    ]
    nn = lr * lr * s
    return T, [nn, nn, nn]


def ema_transition(
    lr: np.ndarray, a: np.ndarray, s: np.ndarray, gamma: np.ndarray
) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Transition T and noise n of eq. 38 for v = [A(θ), A(θ̃)/(1−γ)², C(θ, θ̃)/(1−γ)].

    Args:
        lr: learning rate α; a: effective curvature; s: per-step noise variance; gamma: EMA decay γ.

    Returns:
        (T, n); T[1][2] = 2γq (see the module docstring for the paper's typo).
    """
    q = 1.0 - lr * a
    q2 = q * q
    zero = np.zeros_like(q2 * gamma)
    T = [
        [q2 + zero, zero, zero],
        [q2 + zero, gamma * gamma + zero, 2.0 * gamma * q],
        [q2 + zero, zero, gamma * q + zero],
    ]
    nn = lr * lr * s
    return T, [nn, nn, nn]


def transition_second_moment(
    T: list[list[np.ndarray]],
    n: list[np.ndarray],
    v0: list[np.ndarray],
    row: int,
    steps: np.ndarray,
) -> np.ndarray:
    """Component ``row`` of v(t) = Tᵗ v0 + Σ_{p<t} Tᵖ n, for per-element integer ``steps``.

    Binary powering over the bits of t of the pair (T^(2^j), S_j = Σ_{p<2^j} Tᵖ n) with
    S_{j+1} = S_j + T^(2^j) S_j; only the needed row of Tᵗ is carried along.
    """
    steps = np.asarray(steps, dtype=np.int64)
    k = len(n)
    shape = np.broadcast_shapes(
        steps.shape, *(np.shape(x) for r in T for x in r), *map(np.shape, v0)
    )
    P = [[np.broadcast_to(x, shape) for x in r] for r in T]
    S = [np.broadcast_to(x, shape) for x in n]
    m = [np.full(shape, 1.0 if i == row else 0.0) for i in range(k)]
    acc = np.zeros(shape)
    top = int(steps.max()).bit_length() if steps.size else 0
    with np.errstate(all="ignore"):
        for j in range(top):
            take = ((steps >> j) & 1).astype(bool)
            acc = np.where(take, acc + sum(m[i] * S[i] for i in range(k)), acc)
            mn = [sum(m[l] * P[l][c] for l in range(k)) for c in range(k)]
            m = [np.where(take, x, y) for x, y in zip(mn, m)]
            if j + 1 < top:
                S = [S[i] + sum(P[i][l] * S[l] for l in range(k)) for i in range(k)]
                P = [[sum(P[i][l] * P[l][c] for l in range(k)) for c in range(k)] for i in range(k)]
        return sum(m[i] * v0[i] for i in range(k)) + acc
