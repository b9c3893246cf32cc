"""Quadratic-model tools from the other seeds: Wen et al. (2020) Theorem 4.1 / Table 1, the
stationary covariance of SGD (Mandt et al., 2017) and the implicit regulariser of SGD
(Smith et al., 2021), both as presented in Grosse's CSC 2541 lecture 8.

All work on L(θ) = ½ θᵀ A θ (A symmetric positive definite) with dense numpy matrices.

* Wen et al., Theorem 4.1: θ_{k+1} = θ_k − α_k ∇L(θ_k) + α_k C ξ_k, ξ_k ~ N(0, I), with
  α_k = 2 / ((k + γ) λ_min) ≤ 1/λ_max, satisfies E[L(θ_k)] ≤ ν / (k + γ),
  ν = max(2 Tr(CᵀAC) / λ_min², γ L(θ_0)); so ε is reached within ν/ε − γ steps. For
  C = √A, Tr(CᵀAC) = ‖A‖_F²; for C = √diag(A) it is ‖diag A‖_F² (Table 1), while both noises have
  the same second moment Tr(CᵀC) = Tr(A).
* Mandt et al.: the stationary covariance Σ of SGD (lr α, batch B, gradient covariance C) solves
  ΣH + HΣ = (α/B) C, which equals α/(2B) H⁻¹C when H and C commute.
* Smith et al.: R(θ) = (α/4)‖∇J(θ)‖² + (N − B)/(N − 1) · α/(4B) · tr C(θ).

Example:
    >>> import numpy as np
    >>> A = np.array([[2.0, 0.9], [0.9, 1.0]])
    >>> cmp = sqrt_noise_comparison(A)
    >>> cmp["diag"] < cmp["full"]
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_continuous_lyapunov

from curvlab.nqm._validate import (
    _integer,
    _is_tensor,
    _numpy_rng,
    _positive,
    _real,
    _real_array,
    _what,
)

__all__ = [
    "WenBound",
    "noise_trace_term",
    "sqrt_noise_comparison",
    "wen_bound",
    "wen_expected_loss",
    "wen_simulate",
    "sgd_stationary_covariance",
    "implicit_regularizer",
]


def _symmetric(name: str, A: np.ndarray) -> np.ndarray:
    """``A`` as a finite symmetric float matrix, or a ValueError naming ``name``."""
    A = _real_array(name, A)  # numbers only ([["1"]] was read as [[1]])
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):  # (nan was reported as "not symmetric")
        raise ValueError(f"{name} must be finite")
    if not np.allclose(A, A.T, rtol=1e-10, atol=1e-12):
        raise ValueError(f"{name} must be symmetric")
    return A


def _spd(name: str, A: np.ndarray) -> np.ndarray:
    A = _symmetric(name, A)
    if np.linalg.eigvalsh(A).min() <= 0:
        raise ValueError(f"{name} must be positive definite")
    return A


def _psd(name: str, A: np.ndarray, eps: float = float(np.finfo(float).eps)) -> np.ndarray:
    """``A`` as a finite symmetric positive semi-definite float matrix, or a ValueError naming
    ``name``; an eigenvalue below ``-n·eps·max|eigenvalue|`` (more than rounding in a matrix
    computed with unit roundoff ``eps``) is negative."""
    A = _symmetric(name, A)
    w = np.linalg.eigvalsh(A) if A.size else np.zeros(0)
    if w.size and w[0] < -A.shape[0] * eps * max(abs(w[0]), abs(w[-1])):
        raise ValueError(
            f"{name} must be positive semi-definite (a covariance), but its smallest eigenvalue is "
            f"{w[0]:.6g} (largest {w[-1]:.6g}); pass a covariance such as G.T @ G / n"
        )
    return A


def _sqrtm_psd(A: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh(A)
    return (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T


def noise_trace_term(A: np.ndarray, C: np.ndarray) -> float:
    """Tr(Cᵀ A C), the noise term of Wen et al.'s Theorem 4.1 (noise C ξ, ξ ~ N(0, I))."""
    A, C = _real_array("A", A), _real_array("C", C)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or not np.all(np.isfinite(A)):
        # (a 2x3 A failed in matmul with a raw error, a nan came back as the value)
        raise ValueError(f"A must be a finite square matrix, got shape {A.shape}")
    if C.ndim != 2 or C.shape[0] != A.shape[0] or not np.all(np.isfinite(C)):
        raise ValueError(f"C must be a finite matrix with {A.shape[0]} rows, got shape {C.shape}")
    return float(np.trace(C.T @ A @ C))


def sqrt_noise_comparison(A: np.ndarray) -> dict[str, float]:
    """Table 1 of Wen et al.: Tr(CᵀAC) for C = √A ("full") and C = √diag(A) ("diag").

    Returns:
        dict with "full" (= ‖A‖_F²), "diag" (= ‖diag A‖_F²) and "second_moment" (= Tr A, the
        same E‖Cξ‖² for both choices).
    """
    A = _spd("A", A)
    return {
        "full": noise_trace_term(A, _sqrtm_psd(A)),
        "diag": noise_trace_term(A, np.diag(np.sqrt(np.diag(A)))),
        "second_moment": float(np.trace(A)),
    }


@dataclass(frozen=True)
class WenBound:
    """ν, γ and the iteration bound of Theorem 4.1: E[L(θ_k)] <= ν/(k+γ), steps <= ν/ε − γ."""

    nu: float
    gamma: float
    steps: float


def _gamma(A: np.ndarray, gamma: float | None) -> tuple[float, float, float]:
    w = np.linalg.eigvalsh(A)
    lmin, lmax = float(w[0]), float(w[-1])
    g_min = 2.0 * lmax / lmin  # α_0 = 2/(γ λ_min) <= 1/λ_max
    # nan passed the comparison below (and gave steps 0.0), inf gave ν = inf and steps 0.0
    x = None if gamma is None else _real(gamma)  # numbers as everywhere: 0-d arrays too
    if gamma is not None and not (x is not None and math.isfinite(x) and x >= g_min * (1 - 1e-12)):
        raise ValueError(
            f"gamma must be a finite number >= 2 λ_max/λ_min = {g_min:.6g} (so that "
            f"α_k <= 1/λ_max), or None for that smallest value; got {gamma!r}"
        )
    return lmin, lmax, g_min if x is None else x


def _start(A: np.ndarray, C: np.ndarray, theta0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C (a finite matrix with A's rows) and θ_0 (a finite vector of A's size) as float arrays,
    or a ValueError naming the one that does not fit (it was a raw matmul error)."""
    n = A.shape[0]
    C = _real_array("C", C)
    if C.ndim != 2 or C.shape[0] != n or not np.all(np.isfinite(C)):
        raise ValueError(
            f"C must be a finite matrix with {n} rows (A is {n}x{n}), got shape {C.shape}"
        )
    th = _real_array("theta0", theta0)
    if th.shape != (n,) or not np.all(np.isfinite(th)):
        raise ValueError(
            f"theta0 must be a finite vector of length {n} (A is {n}x{n}), got shape {th.shape}"
        )
    return C, th


def wen_bound(
    A: np.ndarray, C: np.ndarray, theta0: np.ndarray, epsilon: float, gamma: float | None = None
) -> WenBound:
    """Theorem 4.1 of Wen et al. with step sizes α_k = 2/((k + γ)λ_min), k = 0, 1, ...

    Args:
        A: SPD Hessian; C: noise factor (noise C ξ, ``A.shape[0]`` rows); theta0: start (a
            vector of length ``A.shape[0]``); epsilon: target loss (> 0).
        gamma: offset, a finite number >= 2 λ_max/λ_min (default that smallest value).

    Raises:
        ValueError: naming ``A``, ``C``, ``theta0``, ``epsilon`` or ``gamma``.
    """
    A = _spd("A", A)
    eps = _real(epsilon)  # "0.1" failed on the comparison with a raw TypeError, True ran as 1
    if eps is None or not eps > 0:  # (inf: met at once, 0 steps)
        raise ValueError(f"epsilon must be a number > 0 (the target loss), got {_what(epsilon)}")
    epsilon = eps
    lmin, _, g = _gamma(A, gamma)
    C, th = _start(A, C, theta0)
    nu = max(2.0 * noise_trace_term(A, C) / lmin**2, g * 0.5 * float(th @ A @ th))
    return WenBound(nu, g, max(0.0, nu / epsilon - g))


def wen_expected_loss(
    A: np.ndarray, C: np.ndarray, theta0: np.ndarray, steps: int, gamma: float | None = None
) -> np.ndarray:
    """Exact E[L(θ_k)], k = 0..steps, of the algorithm of Theorem 4.1 (second-moment recursion
    S ← (I − α_k A) S (I − α_k A) + α_k² C Cᵀ from S_0 = θ_0 θ_0ᵀ).

    ``steps`` is an integer >= 0; the other arguments are as in :func:`wen_bound`.

    Raises:
        ValueError: naming ``A``, ``C``, ``theta0``, ``steps`` or ``gamma``.
    """
    A = _spd("A", A)
    lmin, _, g = _gamma(A, gamma)
    C, th = _start(A, C, theta0)
    steps = _integer("steps", steps, 0)  # -1 returned [L(θ_0)], 2.7 ran 2 steps
    S = np.outer(th, th)
    CC = C @ C.T
    eye = np.eye(A.shape[0])
    out = [0.5 * float(np.sum(A * S))]
    for k in range(steps):
        a = 2.0 / ((k + g) * lmin)
        M = eye - a * A
        S = M @ S @ M.T + a * a * CC
        out.append(0.5 * float(np.sum(A * S)))
    return np.array(out)


def wen_simulate(
    A: np.ndarray,
    C: np.ndarray,
    theta0: np.ndarray,
    steps: int,
    num_runs: int = 1000,
    seed: int | np.random.Generator | None = 0,
    gamma: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo of Theorem 4.1's algorithm; returns (mean loss, standard error), k = 0..steps.

    Args:
        A, C, theta0, gamma: as in :func:`wen_bound`.
        steps: an integer >= 0.
        num_runs: independent runs, an integer >= 2 (the standard error needs two).
        seed: an int seed (curvlab's seeds; ``None`` means 0, reproducible by default) or a
            ``numpy.random.Generator``; the global RNG is never used.

    Raises:
        ValueError: naming ``A``, ``C``, ``theta0``, ``steps``, ``num_runs``, ``seed`` or
            ``gamma``, before any draw.
    """
    A = _spd("A", A)
    lmin, _, g = _gamma(A, gamma)
    C, th0 = _start(A, C, theta0)
    steps = _integer("steps", steps, 0)  # 2.7 ran 2 steps
    num_runs = _integer("num_runs", num_runs, 2)  # 1 gave a nan standard error and a warning
    rng = _numpy_rng(seed)  # None drew OS entropy: every call differed
    th = np.tile(th0, (num_runs, 1))
    mean, err = [], []
    for k in range(steps + 1):
        loss = 0.5 * np.einsum("ri,ij,rj->r", th, A, th)
        mean.append(loss.mean())
        err.append(loss.std(ddof=1) / math.sqrt(num_runs))
        if k == steps:
            break
        a = 2.0 / ((k + g) * lmin)
        th = th - a * th @ A + a * rng.standard_normal((num_runs, C.shape[1])) @ C.T
    return np.array(mean), np.array(err)


def sgd_stationary_covariance(
    H: np.ndarray, C: np.ndarray, lr: float, batch_size: float
) -> np.ndarray:
    """Σ solving ΣH + HΣ = (α/B) C (Mandt et al.), via ``scipy.linalg.solve_continuous_lyapunov``.

    This is the small-lr (Ornstein–Uhlenbeck) limit of SGD's stationary covariance on
    ½ θᵀHθ with per-example gradient covariance C; for commuting H, C it is α/(2B) H⁻¹C.

    Args:
        H: the Hessian, symmetric positive definite.
        C: the per-example gradient covariance, a finite symmetric matrix of H's shape
            (positive semi-definite: a singular C is fine).
        lr: α, a finite number > 0.
        batch_size: B, a finite number > 0.

    Raises:
        ValueError: naming ``H``, ``C``, ``lr`` or ``batch_size`` (``lr=inf`` and a C holding
            nan failed inside scipy with a message naming neither; ``batch_size=inf`` returned
            zeros; an indefinite C, not a covariance, returned an indefinite Σ).
    """
    H = _spd("H", H)
    C = _real_array("C", C)
    if C.shape != H.shape:
        raise ValueError(f"C must have the shape of H {H.shape}, got {C.shape}")
    C = _psd("C", C)
    lr = _positive("lr", lr)
    batch_size = _positive("batch_size", batch_size)
    scale = lr / batch_size
    if not math.isfinite(scale):
        raise ValueError(f"lr / batch_size = {lr!r} / {batch_size!r} overflows float64")
    S = solve_continuous_lyapunov(H, scale * C)
    return 0.5 * (S + S.T)


def implicit_regularizer(
    grad: np.ndarray | float,
    noise: np.ndarray | float,
    lr: float,
    batch_size: int,
    dataset_size: int,
) -> float:
    """Smith et al.'s implicit regulariser (α/4)‖∇J‖² + (N − B)/(N − 1) · α/(4B) · tr C.

    Args:
        grad: the full-batch gradient ∇J (a finite array, any shape), or its squared norm
            ‖∇J‖² (a finite number >= 0).
        noise: the per-example gradient covariance C (a finite symmetric positive semi-definite
            D × D matrix for a gradient of D entries, to the rounding of its own precision: a
            float32 covariance of fewer examples than entries is accepted), or its trace tr C (a
            finite number >= 0).
        lr: α, a finite number > 0.
        batch_size: B, an integer in [1, N].
        dataset_size: N, an integer >= 2.

    Raises:
        ValueError: naming ``grad``, ``noise``, ``lr``, ``batch_size`` or ``dataset_size`` (a
            bool or a string is not a number: ``grad="3"`` was read as 3, ``lr=True`` as 1; a
            negative squared norm or trace, or a 2×3 "covariance", gave a negative or
            meaningless regulariser until review s21), or if the value overflows float64.
    """
    lr = _positive("lr", lr)
    N = _integer("dataset_size", dataset_size, 2)
    B = _integer("batch_size", batch_size, 1)
    if B > N:
        raise ValueError(f"batch_size must be an integer in [1, {N}], got {batch_size!r}")
    g2 = _squared_norm(grad)
    tr = _noise_trace(noise)
    if not _scalar(grad) and not _scalar(noise):  # a gradient of D entries, a D x D covariance
        D, C = np.size(_real_array("grad", grad)), np.shape(_real_array("noise", noise))
        if C != (D, D):
            raise ValueError(
                f"noise must be the {D} x {D} covariance of the gradient's {D} entries, got shape "
                f"{C}"
            )
    with np.errstate(over="ignore"):
        out = lr / 4.0 * g2 + (N - B) / (N - 1) * lr / (4.0 * B) * tr
    if not math.isfinite(out):
        raise ValueError(
            f"the implicit regulariser overflows float64 (lr {lr!r}, ‖∇J‖² {g2!r}, tr C {tr!r})"
        )
    return out


def _scalar(x: object) -> bool:
    """Whether ``x`` is given as one value (a number, a string, a 0-d array or tensor) rather
    than an array."""
    if _is_tensor(x):
        return x.ndim == 0  # type: ignore[attr-defined]
    if isinstance(x, (str, bytes)):
        return True
    try:
        return np.ndim(x) == 0
    except Exception:  # a ragged list: refused as an array
        return False


def _squared_norm(grad: object) -> float:
    """‖∇J‖² of ``grad``: a number is the squared norm itself (finite, >= 0), an array the
    gradient (finite entries)."""
    if _scalar(grad):
        x = _real(grad)
        if x is None or not math.isfinite(x) or x < 0:
            raise ValueError(
                "grad must be the full-batch gradient (a finite array) or its squared norm (a "
                f"finite number >= 0), got {_what(grad)}"
            )
        return x
    g = _real_array("grad", grad)
    if not np.all(np.isfinite(g)):
        raise ValueError("grad must be finite (the full-batch gradient ∇J)")
    with np.errstate(over="ignore"):
        return float(np.sum(g * g))


def _noise_trace(noise: object) -> float:
    """tr C of ``noise``: a number is the trace itself (finite, >= 0), a matrix the covariance
    (square, finite, symmetric positive semi-definite: :func:`_psd`)."""
    if _scalar(noise):
        x = _real(noise)
        if x is None or not math.isfinite(x) or x < 0:
            raise ValueError(
                "noise must be the per-example gradient covariance (a square positive "
                "semi-definite matrix) or its trace (a finite number >= 0), got "
                f"{_what(noise)}"
            )
        return x
    C = _real_array("noise", noise)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(
            "noise must be the per-example gradient covariance (a square matrix) or its trace "
            f"(a number), got shape {C.shape}"
        )
    # computed in float32 (torch.cov of N < D per-example gradients) its eigenvalues reach
    # -1e-8 of the largest: rounding of that precision, not indefiniteness (found in review s21:
    # refused with float64's tolerance)
    dtype = str(getattr(noise, "dtype", "float64"))
    low = any(k in dtype for k in ("float32", "float16"))
    eps = float(np.finfo(np.float32 if low else np.float64).eps)
    return float(np.trace(_psd("noise", C, eps)))
