"""The noisy quadratic model (NQM) of Zhang et al. (2019): exact expected risk and steps to target.

L(θ) = ½ Σ_i h_i θ_i² (a *sum* over coordinates, no 1/d), gradient queries g = Hθ + ε with
Cov(ε) = C = diag(c), a mini-batch of B queries has covariance C/B, θ_0 ~ N(0, init_var·I).
Coordinates may be grouped in bins: bin i stands for ``counts[i]`` coordinates that share
(h_i, c_i), so the risk is Σ_i counts_i · ½ h_i E[θ_i²].

Example:
    >>> nqm = NQM.paper(d=1000, bins=30)
    >>> round(nqm.risk(0, lr=0.5, batch_size=1), 3)   # ½ Σ_i 1/i for d = 1000
    3.743
    >>> nqm.steps_to_target(0.5, lr=1.0, batch_size=256)
    136
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from curvlab.nqm._dynamics import (
    LOST_TOL,
    MAX_LOG2_STEPS,
    build_dynamics,
    first_crossing,
    second_moment,
)

if TYPE_CHECKING:
    from curvlab.nqm._schedule import ScheduleResult
    from curvlab.nqm._simulate import SimulationResult
    from curvlab.nqm._tuning import OptimalResult

from curvlab._warn import user_stacklevel
from curvlab.nqm._validate import _integer, _positive, _power, _real_array, _unit

__all__ = ["NQM"]

# NQM.paper: d up to _PAPER_CHUNK is built from all d eigenvalues (bit for bit as ever); above
# it, per bin in O(bins) memory; an unbinned model keeps at most _PAPER_UNBINNED coordinates
_PAPER_CHUNK = 2**22
_PAPER_UNBINNED = 2**27


def _last_at_least(e: float, d: int) -> int:
    """The largest i in [0, d] with fl(1/i) >= e (0: none), i.e. how many of the rounded
    eigenvalues 1.0/i, i = 1..d, are at least ``e`` (they decrease with i)."""
    n = min(d, int(1.0 / e)) if e > 0 else d
    while n < d and 1.0 / (n + 1) >= e:
        n += 1
    while n >= 1 and 1.0 / n < e:
        n -= 1
    return n


def _harmonic_tail(lo: int, hi: int) -> float:
    """Σ_{i=lo}^{hi} 1/i for lo >= 2**20: ψ(hi + 1) − ψ(lo) from the asymptotic series
    ψ(x) = ln x − 1/(2x) − 1/(12x²) + 1/(120x⁴) (truncation below 1e-37 there), the logarithms
    taken as one ``log1p`` so that nothing cancels."""
    x, y = float(lo), float(hi + 1)

    def tail(z: float) -> float:
        z2 = 1.0 / (z * z)
        return -0.5 / z - z2 / 12.0 + z2 * z2 / 120.0

    return math.log1p((hi + 1 - lo) / x) + (tail(y) - tail(x))


def _paper_bins(d: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts and sums of h_i = 1/i per bin of :meth:`NQM.paper` for large ``d`` (bins < d):
    the members of a bin are the index range between its edges (fl(1/i) decreases with i, so
    membership is that of ``searchsorted`` on the rounded 1.0/i); each range's sum is direct for
    i < 2**20 (at most 2**20 terms in all) and :func:`_harmonic_tail` beyond."""
    h_min = float(1.0 / np.arange(d, d + 1)[0])  # as np.arange's h.min()
    edges = np.geomspace(h_min, 1.0, bins + 1)
    # bin k holds fl(1/i) in [edges[k], edges[k + 1]); the last one also those >= its top edge
    # ends[k] = how many i have fl(1/i) >= edges[k] (ends[0] = d, ends[bins] = 0): bin k holds
    # the i in (ends[k + 1], ends[k]]
    ends = [d, *(_last_at_least(float(e), d) for e in edges[1:bins]), 0]
    counts = np.zeros(bins)
    sums = np.zeros(bins)
    direct = 2**20
    for k in range(bins):
        lo, hi = ends[k + 1] + 1, ends[k]
        if hi < lo:
            continue
        counts[k] = hi - lo + 1
        total = 0.0
        if lo < direct:
            top = min(hi, direct - 1)
            total += float(np.sum(1.0 / np.arange(lo, top + 1)))
        if hi >= direct:
            total += _harmonic_tail(max(lo, direct), hi)
        sums[k] = total
    return counts, sums


def _warn_lost(what: str, lr: float, a: np.ndarray, beta: float, gamma: float) -> None:
    """The RuntimeWarning of a ``nan`` result whose E[θ²] rounding dominates (the cause: an
    update matrix near a defective one, i.e. momentum just inside its stability limit)."""
    ratio = lr * float(a.max()) / (2.0 * (1.0 + beta))
    warnings.warn(
        f"{what} is nan: float64 rounding dominates the exact E[θ²] of some bins here "
        f"(momentum={beta:g}, ema={gamma:g}, lr·a_max at 1 - {1.0 - ratio:.3g} of the stability "
        f"limit 2(1 + momentum)): the update matrix is nearly defective and its powers cancel. "
        f"Move lr or momentum away from the stability limit (or take fewer steps)",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _steps_array(steps: Any) -> np.ndarray:
    """``risk``'s step counts as an array of an integer or float dtype (float16 read as float64,
    whose comparison with 2**62 overflowed with a warning), or a ValueError: a bool, a string,
    or a complex number (its imaginary part was dropped: ``risk(3 + 1j)`` gave risk(3); review
    s21) is no step count, as anywhere in the NQM."""
    if isinstance(steps, (bool, np.bool_, str, bytes, complex, np.complexfloating)):
        raise ValueError(f"steps must be integers >= 0, got {steps!r}")
    try:
        t = _real_array("steps", steps, as_float=False)
    except ValueError as err:
        raise ValueError(f"steps must be integers >= 0, got {steps!r}") from err
    return t


class NQM:
    """A diagonal noisy quadratic model with (optionally binned) curvatures and noise variances.

    Args:
        h: curvatures h_i > 0 (Hessian eigenvalues), one per coordinate or bin.
        c: gradient-noise variances c_i >= 0 of a single query (batch size 1).
        init_var: variance of θ_0 ~ N(0, init_var·I), a scalar or one value per bin.
        counts: number of coordinates each entry stands for (default 1 each).

    Raises:
        ValueError: on shape mismatches or non-positive curvatures/counts.
    """

    def __init__(
        self,
        h: Any,
        c: Any,
        init_var: Any = 1.0,
        counts: Any = None,
    ) -> None:
        # numbers only: ["1", "2"] was read as [1, 2] and [True] as [1] (review s21)
        h = np.atleast_1d(_real_array("h", h))
        c = np.atleast_1d(_real_array("c", c))
        if h.ndim != 1 or h.size == 0:
            raise ValueError(f"h must be a non-empty 1-D array, got shape {h.shape}")
        if c.shape != h.shape:
            raise ValueError(f"c must have the shape of h {h.shape}, got {c.shape}")
        if not np.all(np.isfinite(h)) or np.any(h <= 0):
            raise ValueError("h must be finite and > 0 (drop or clip non-positive eigenvalues)")
        if not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ValueError("c must be finite and >= 0")
        counts = np.ones_like(h) if counts is None else _real_array("counts", counts)
        if counts.shape != h.shape or np.any(counts <= 0) or not np.all(np.isfinite(counts)):
            raise ValueError(f"counts must be finite, > 0 and of shape {h.shape}")
        iv = _real_array("init_var", init_var)
        if iv.size != 1 and iv.shape != h.shape:  # (a raw numpy broadcast error named nothing)
            raise ValueError(
                f"init_var must be a scalar or one value per entry of h (shape {h.shape}), "
                f"got shape {iv.shape}"
            )
        iv = np.broadcast_to(iv.reshape(()) if iv.size == 1 else iv, h.shape).copy()
        if not np.all(np.isfinite(iv)) or np.any(iv <= 0):
            raise ValueError(f"init_var must be finite and > 0, got {init_var!r}")
        self.h, self.c, self.counts, self.init_var = h, c, counts, iv

    # ------------------------------------------------------------------ constructors
    @classmethod
    def paper(cls, d: int = 10_000, bins: int | None = 100, init_var: float = 1.0) -> NQM:
        """The paper's NQM: h_i = 1/i (i = 1..d), C = H, θ_0 ~ N(0, init_var·I).

        Eigenvalues are grouped in ``bins`` log-spaced bins over [1/d, 1]; each non-empty bin is
        represented by the mean eigenvalue of its members and their count, which keeps Tr(H) and
        Tr(C) exact. ``bins=None`` keeps all d coordinates.

        Memory: up to d = 2**22 (``_PAPER_CHUNK``) the d eigenvalues are formed and summed per
        bin in order; above it (binned) each bin's index range is found from its edges and its
        sum Σ 1/i taken directly for i < 2**20 and from the asymptotic series of the harmonic
        numbers beyond (relative error near 1e-16 instead of the ulp-exact running sum), in
        O(bins) memory and time: d = 3e7 took 1.4 GB and d = 1e13 failed with a raw
        ``MemoryError`` (review s21). d is at most 2**53 (float64 counts the coordinates
        exactly); ``bins=None`` (or ``bins >= d``) keeps d coordinates and is refused above
        d = 2**27 (``_PAPER_UNBINNED``, about 1 GiB per array) before any allocation.

        Raises:
            ValueError: if ``d`` is not an integer in [1, 2**53] or ``bins`` not an integer >= 1
                (nor None); a bool is not an integer here; if the model would keep more than
                2**27 coordinates (pass ``bins``).
        """
        # integers (numpy's and integral floats too), never a bool: d=True built a 1-coordinate
        # model; both checked before use ("3" for bins failed on the comparison with d)
        d = _integer("d", d, 1)
        if bins is not None:
            bins = _integer("bins (or None)", bins, 1)
        if d > 2**53:
            raise ValueError(
                f"d must be at most 2**53 = {2**53} (coordinates are counted in float64), got {d}"
            )
        if (bins is None or bins >= d) and d > _PAPER_UNBINNED:
            raise ValueError(
                f"NQM.paper(d={d}, bins={bins}) keeps all {d} coordinates (about "
                f"{4 * 8 * d / 2**30:.3g} GiB of arrays); at most d = 2**27 = {_PAPER_UNBINNED} "
                "are kept unbinned: pass bins (e.g. bins=100), which builds it in O(bins) memory"
            )
        if bins is None or bins >= d:
            h = 1.0 / np.arange(1, d + 1)
            return cls(h, h.copy(), init_var=init_var)
        if d > _PAPER_CHUNK:
            counts, sums = _paper_bins(d, bins)
        else:  # all d eigenvalues, summed per bin in order (as ever, bit for bit)
            h = 1.0 / np.arange(1, d + 1)
            edges = np.geomspace(h.min(), h.max(), int(bins) + 1)
            idx = np.clip(np.searchsorted(edges, h, side="right") - 1, 0, int(bins) - 1)
            counts = np.bincount(idx, minlength=int(bins)).astype(float)
            sums = np.bincount(idx, weights=h, minlength=int(bins))
        keep = counts > 0
        hb = sums[keep] / counts[keep]
        order = np.argsort(-hb)
        return cls(hb[order], hb[order].copy(), init_var=init_var, counts=counts[keep][order])

    @classmethod
    def from_spectrum(
        cls,
        eigenvalues: Any,
        weights: Any,
        noise: Any = None,
        init_var: float = 1.0,
        dim: float | None = None,
    ) -> NQM:
        """An NQM from a measured spectrum, e.g. SLQ nodes and weights of a Hessian or GGN.

        ``eigenvalues`` and ``weights`` are 1-D (one spectrum), or 2-D with one row per SLQ
        probe, as :func:`curvlab.spectral_density` returns them (``DensityResult.nodes`` and
        ``.weights``, shape ``(num_probes, m)`` even for one probe; CPU tensors are read as
        arrays): the spectrum is then the mean of the rows' (each row's weights sum to 1, so
        the weights are divided by the number of rows), and with ``dim`` the weights of all rows
        together are normalised to sum to ``dim``, as
        :func:`curvlab.analysis.nqm_prediction` pools its probes. One row gives the model of
        that row as a 1-D spectrum.

        Args:
            eigenvalues: spectrum nodes (> 0 where the weight is > 0; drop negative/zero SLQ
                nodes first, e.g. ``weights = np.where(nodes > 0, weights, 0)``).
            weights: multiplicity of each node (>= 0, not all 0), of the shape of
                ``eigenvalues``. SLQ weights sum to 1 (per row): pass ``dim`` (the number of
                parameters) to rescale them to counts. Nodes of weight 0 (SLQ's padding) carry
                no mass and are dropped, which leaves the risk, ``dim`` and the lower bound
                unchanged.
            noise: per-node gradient-noise variance c, of the shape of ``eigenvalues``;
                default C = H (c = eigenvalues).
            init_var: variance of θ_0 (a scalar, or one per node of ``eigenvalues``, of its
                shape, zero-weight nodes included).
            dim: if given, weights are normalised to sum to ``dim``.

        Raises:
            ValueError: naming ``eigenvalues``, ``weights``, ``noise``, ``init_var`` or ``dim``.
        """
        ev = np.atleast_1d(_real_array("eigenvalues", eigenvalues))
        w = np.atleast_1d(_real_array("weights", weights))
        if ev.ndim not in (1, 2) or ev.size == 0:
            raise ValueError(
                "eigenvalues must be a non-empty 1-D array, or 2-D with one row per SLQ probe "
                f"(DensityResult.nodes), got shape {ev.shape}"
            )
        if w.shape != ev.shape:
            raise ValueError(
                f"weights must have the shape of eigenvalues {ev.shape}, got {w.shape}"
            )
        # (num_probes, m) nodes and weights (spectral_density's, refused as "not 1-D" before
        # review s19): the mean spectrum of the rows, each row's weights summing to 1; with
        # dim, normalised over all rows together (nqm_prediction's pooling)
        rows = ev.shape[0] if ev.ndim == 2 else 1
        bad = np.argwhere(~(np.isfinite(w) & (w >= 0)))
        if bad.size:
            at = tuple(int(i) for i in bad[0])
            where = ", ".join(map(str, at))
            raise ValueError(f"weights must be finite and >= 0, got weights[{where}] = {w[at]}")
        c = ev.copy() if noise is None else np.atleast_1d(_real_array("noise", noise))
        if c.shape != ev.shape:
            raise ValueError(f"noise must have the shape of eigenvalues {ev.shape}, got {c.shape}")
        # zero-weight nodes (SLQ pads short runs with them) carry no mass: no risk, no dimension,
        # no bound; dropped, so that they do not set the stability limit either
        keep = w > 0
        if not keep.any():
            raise ValueError("weights are all zero: the spectrum has no mass")
        iv = _real_array("init_var", init_var)
        if iv.size != 1 and iv.shape != ev.shape:  # else mapped onto the kept nodes silently
            raise ValueError(
                "init_var must be a scalar or one value per node of eigenvalues (shape "
                f"{ev.shape}), got shape {iv.shape}"
            )
        if iv.size != 1:  # one per node: drop with the nodes
            iv = iv[keep]
        ev, w, c = ev[keep], w[keep] / rows, c[keep]  # (2-D: flattened by the mask)
        if not np.all(np.isfinite(ev)) or np.any(ev <= 0):
            raise ValueError(
                "eigenvalues of positive weight must be finite and > 0 (drop negative/zero SLQ "
                "nodes first, e.g. weights = np.where(eigenvalues > 0, weights, 0)), got "
                f"{ev[~(np.isfinite(ev) & (ev > 0))][:3]!r}"
            )
        if not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ValueError("noise must be finite and >= 0")
        if dim is not None:
            w = w / w.sum() * _positive("dim", dim)
        return cls(ev, c, init_var=iv, counts=w)

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> float:
        """Total number of coordinates d = Σ counts."""
        return float(self.counts.sum())

    @property
    def weights(self) -> np.ndarray:
        """Risk weight of each bin: counts_i · ½ h_i."""
        return 0.5 * self.h * self.counts

    def __repr__(self) -> str:
        lo, hi = self.h.min(), self.h.max()
        return f"NQM(bins={self.h.size}, dim={self.dim:g}, h in [{lo:.3g}, {hi:.3g}])"

    def effective(
        self, batch_size: float, precond_power: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(a, s): curvature h^(1−p) and per-step noise variance c h^(−2p)/B seen by the update."""
        B = _positive("batch_size", batch_size)
        p = _power(precond_power)
        with np.errstate(over="ignore"):  # a subnormal B: the noise is inf, as it should be
            return self.h ** (1.0 - p), self.c * self.h ** (-2.0 * p) / B

    def max_stable_lr(self, precond_power: float = 0.0, momentum: float = 0.0) -> float:
        """Largest stable learning rate: α a_max < 2(1 + β) (2/h_1 for plain SGD)."""
        a, _ = self.effective(1.0, precond_power)
        return 2.0 * (1.0 + _unit("momentum", momentum)) / float(a.max())

    def initial_risk(self) -> float:
        """E[L(θ_0)] = ½ Σ h_i counts_i init_var_i."""
        return float(np.sum(self.weights * self.init_var))

    # ------------------------------------------------------------------ exact risk
    def risk(
        self,
        steps: Any,
        lr: float,
        batch_size: float,
        momentum: float = 0.0,
        precond_power: float = 0.0,
        ema: float = 0.0,
    ) -> Any:
        """Exact expected risk E[L(θ_t)] (of the EMA iterate θ̃_t if ``ema > 0``) after t steps.

        One engine for every case (:mod:`curvlab.nqm._dynamics`): per bin the update is a linear
        system x ← F x + e ξ of one to three states (θ, with m for momentum, θ̃ for EMA), and
        E[θ_t²] = var0·(oᵀFᵗu)² + Σ_{p<t} (oᵀFᵖe)² is evaluated by binary powering: O(log t)
        products of matrices of size at most 3×3, no loop over steps, no inverse, stable or not.
        It equals the paper's eqs. 3–4/9 (SGD), 21 (momentum) and 38 (EMA, corrected) in exact
        arithmetic (``tests/nqm_closed_forms.py`` evaluates those as an independent check).

        Rounding: the powers are of the float q = 1 − αa, whose spacing below 1 is 1.1e-16, and
        repeated squaring doubles relative errors. The part of the risk still decaying at step t
        (bins with αa ≲ 1/t) carries a relative error up to about t·2e-16: negligible below
        ~1e12 steps; measured 2e-5 at αa = 1e-12 after 5·10^11 steps, 8e-4 at αa = 1e-14 after
        5·10^13, 10% at αa = 1e-16 after 5·10^15; for αa below 5.6e-17, q rounds to 1 and the
        bin does not decay at all.

        Momentum just inside its stability limit (αa → 2(1 + β) with β near 1: F nearly
        defective, both eigenvalues near −1) is worse: E[θ²] is a small difference of large
        entries of F^(2^j) and Q_j, and rounding, amplified by that cancellation, can dominate it
        (a negative risk after 10^5 steps at 1 − β = 1e-4, 1 − αa/(2(1 + β)) = 1e-13, until review
        s23). Every evaluated E[θ²] is checked against the magnitude of its terms (see
        ``curvlab.nqm._dynamics.LOST_TOL``): where the cancellation could cost more than 1e-6
        of the risk (an estimate from measured errors, with a margin of ~1e3), the risk is
        ``nan`` with a ``RuntimeWarning`` naming the cause.

        A diverging setting (αa > 2(1 + β) in some bin) whose risk exceeds the float64 range
        returns ``inf`` (the risk is a sum of non-negative terms), for SGD, momentum and EMA
        alike, and so does a per-step noise c/B beyond the float range (a subnormal batch size)
        after a step; a noise near the top of the range (c ~ 1e308) whose E[θ²] is finite (the
        EMA iterate's) is computed in a scaled form and returned finite (both were ``nan`` for
        momentum and EMA until review s21). A coordinate whose E[θ²] (or c/B) is itself beyond
        the float range gives ``inf`` even where ½ h E[θ²] would fit (a known limit).

        Args:
            steps: integer t >= 0, scalar or array (of an integer or float dtype, a tensor too;
                a bool, a string or a complex number is refused: ``3 + 1j`` ran as 3).
            lr: learning rate α > 0.
            batch_size: B > 0 (need not be an integer).
            momentum: heavy-ball β in [0, 1) (m ← βm + P⁻¹g, θ ← θ − αm).
            precond_power: p in [0, 1], preconditioner P = H^p applied before momentum.
            ema: EMA decay γ in [0, 1) (θ̃ ← γθ̃ + (1−γ)θ, θ̃_0 = θ_0).

        Returns:
            A float for scalar ``steps``, else an array of the shape of ``steps``.
        """
        lr = _positive("lr", lr)
        beta, gamma = _unit("momentum", momentum), _unit("ema", ema)
        a, s = self.effective(batch_size, precond_power)
        t = _steps_array(steps)
        if np.any(t < 0) or np.any(t != np.round(t)):
            raise ValueError(f"steps must be integers >= 0, got {steps!r}")
        if np.any(t >= 2.0**62):  # int64 would overflow (1e19 came back as step 0, silently)
            raise ValueError(f"steps must be below 2**62, got {steps!r}")
        ti = t.astype(np.int64)
        v0 = self.init_var
        # the one exact engine for every case (tests/nqm_closed_forms.py holds the paper's closed
        # forms of SGD, momentum and EMA as an independent check of it)
        flat = ti.reshape(-1, 1)
        col = np.ones((flat.shape[0], 1))
        dyn = build_dynamics(col * lr, a[None, :], s[None, :], col * beta, col * gamma)
        m2, err = second_moment(dyn, v0[None, :], flat, check=True)
        m2 = m2.reshape(ti.shape + (a.size,))
        bad = ~np.isfinite(m2)
        if bad.any():
            m2 = self._overflowed(m2, bad, ti, lr, a, s, beta, gamma)
        out = np.sum(self.weights * m2, axis=-1)
        with np.errstate(invalid="ignore"):  # (inf · 0 where nothing is lost: not a case)
            err = np.sum(self.weights * err.reshape(m2.shape), axis=-1)
            lost = err > LOST_TOL * np.abs(out)
        if lost.any():  # rounding dominates (momentum at its stability limit): never a number
            out = np.where(lost, np.nan, out)
            _warn_lost(f"risk at {int(lost.sum())} of the step counts", lr, a, beta, gamma)
        return float(out) if np.ndim(out) == 0 else out

    def _overflowed(
        self,
        m2: np.ndarray,
        bad: np.ndarray,
        ti: np.ndarray,
        lr: float,
        a: np.ndarray,
        s: np.ndarray,
        beta: float,
        gamma: float,
    ) -> np.ndarray:
        """``risk``'s E[θ²] where the engine gave inf or nan (the inputs are finite, checked: a
        nan is inf − inf or 0·inf of values that overflowed on the way).

        Bins whose noise s or E[θ²] is near the float range (c ~ 1e308, or a tiny batch size)
        are recomputed with var0 and s divided by a power of two (E[θ²] is linear in them
        jointly, so this is exact), and multiplied back: inf only if the value itself is beyond
        the range. What stays nan is a diverging bin's (its overflowed powers) or one whose last
        step's noise (α(1 − γ))²·s, the term p = 0 of the noise sum, overflows (s = inf for a
        subnormal batch size): after t >= 1 steps its E[θ²] >= 0 is beyond the float range too,
        inf as plain SGD gives (momentum and EMA gave nan there: review s21).
        """
        v0 = self.init_var
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            big = np.where(np.isfinite(s), np.maximum(s, v0), v0)
            scale = np.exp2(np.floor(np.log2(big)))
            redo = bad.reshape(-1, a.size).any(axis=0)  # the bins with an overflow somewhere
            if redo.any():
                flat = ti.reshape(-1, 1)
                col = np.ones((flat.shape[0], 1))
                sc = scale[redo]
                dyn = build_dynamics(
                    col * lr, a[None, redo], (s[redo] / sc)[None, :], col * beta, col * gamma
                )
                m2s = second_moment(dyn, (v0[redo] / sc)[None, :], flat) * sc
                m2 = m2.copy()
                part = m2[..., redo]
                m2s = m2s.reshape(part.shape)
                m2[..., redo] = np.where(~np.isfinite(part) & ~np.isnan(m2s), m2s, part)
            last = (lr * (1.0 - gamma)) ** 2 * s
        beyond = (lr * a > 2.0 * (1.0 + beta)) | (np.isinf(last) & (ti[..., None] >= 1))
        return np.where(np.isnan(m2) & beyond, np.inf, m2)

    def steps_to_target(
        self,
        target: float,
        lr: float,
        batch_size: float,
        momentum: float = 0.0,
        precond_power: float = 0.0,
        ema: float = 0.0,
        max_steps: int = 2**MAX_LOG2_STEPS,
    ) -> float:
        """A step t with risk(t) <= target (the smallest one when the risk is non-increasing),
        ``math.inf`` if the risk is above the target at every power of two up to ``max_steps``.

        Found by doubling (t = 1, 2, 4, ...) up to the first power of two whose risk is at most
        the target, then bisection over the bits of t on the exact risk. Exact whenever the risk
        is non-increasing in t. Otherwise it is a down-crossing at most that power of two, not
        necessarily the first: with an oscillating (under-damped momentum) risk a later one
        (measured: 1637 where the risk first reached the target at 168, for β = 0.999), and
        with a risk that dips below the target only between two powers of two and rises again
        (bins that start below their noise floor rise while the others fall; it happens with
        plain SGD) ``inf``, though the target is reached. Check ``risk`` along the way where the
        risk may not be monotone. Returns an ``int``, ``math.inf`` or ``math.nan`` (below).

        ``max_steps`` is an int in [1, 2**62) (numpy integers too), as the steps of :meth:`risk`;
        the default, 2**48, is the horizon of :meth:`optimal`'s search, so that the steps it
        returns are found here too at its settings (a default of 2**40 reported ``inf`` for them).

        ``math.nan``, with a ``RuntimeWarning``, where a risk the search evaluated is lost to
        rounding (momentum just inside its stability limit, see :meth:`risk`): such a risk
        never counts as reaching the target (a step count was returned for settings whose risk
        grows without bound until review s23).
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if max_steps >= 2**62:  # as risk(): int64 step counts (2**66 gave a raw OverflowError)
            raise ValueError(f"max_steps must be below 2**62, got {max_steps!r}")
        target = _positive("target", target)
        lr = _positive("lr", lr)
        a, s = self.effective(batch_size, precond_power)
        one = np.ones((1, 1))
        beta, gamma = _unit("momentum", momentum), _unit("ema", ema)
        dyn = build_dynamics(one * lr, a[None, :], s[None, :], one * beta, one * gamma)
        K = max(1, int(math.ceil(math.log2(max(2, int(max_steps))))))
        t = first_crossing(dyn, self.init_var[None, :], self.weights[None, :], target, K)[0]
        if math.isnan(t):
            _warn_lost("steps_to_target", lr, a, beta, gamma)
            return math.nan
        return math.inf if not math.isfinite(t) or t > max_steps else int(t)

    def lower_bound(self, target: float, batch_size: float | None = None) -> float:
        """Information-theoretic bound: examples needed N = tr(H⁻¹C) / (2·target) (= d/(2·target)
        for C = H, Section 3.6), or steps N/B if ``batch_size`` is given. The paper's asymptotic
        MLE bound: a bound only for targets far below the initial risk (for a target near it, it
        can exceed what SGD needs by orders of magnitude; docs/nqm.md)."""
        target = _positive("target", target)
        n = float(np.sum(self.counts * self.c / self.h)) / (2.0 * target)
        return n if batch_size is None else n / _positive("batch_size", batch_size)

    # ------------------------------------------------------------------ delegates
    def optimal(
        self,
        batch_size: float,
        target: float = 0.01,
        optimizer: str = "sgd",
        precond_power: float = 0.0,
        **grid: Any,
    ) -> OptimalResult:
        """Fewest steps over the learning rate (and momentum or EMA decay); see
        :func:`curvlab.nqm.optimal`."""
        from curvlab.nqm._tuning import optimal

        return optimal(self, batch_size, target, optimizer, precond_power, **grid)

    def optimize_schedule(
        self, batch_size: float, target: float = 0.01, pieces: int = 50, **kwargs: Any
    ) -> ScheduleResult:
        """Optimised piecewise-constant lr schedule (see :mod:`curvlab.nqm._schedule`)."""
        from curvlab.nqm._schedule import optimize_schedule

        return optimize_schedule(self, batch_size, target, pieces, **kwargs)

    def simulate(self, steps: int, lr: float, batch_size: float, **kwargs: Any) -> SimulationResult:
        """Monte-Carlo run of the stochastic updates; see :func:`curvlab.nqm.simulate`."""
        from curvlab.nqm._simulate import simulate

        return simulate(self, steps, lr, batch_size, **kwargs)
