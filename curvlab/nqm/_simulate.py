"""Monte-Carlo simulation of the actual stochastic NQM updates (to validate the exact dynamics).

Each run draws θ_0 ~ N(0, init_var) and, per step, a mini-batch gradient g = Hθ + ε_B with
ε_B ~ N(0, C/B) (the mean of B i.i.d. Gaussian queries has exactly this law), then applies

    m ← β m + P⁻¹ g,   θ ← θ − α m,   θ̃ ← γ θ̃ + (1 − γ) θ    (P = H^p, θ̃_0 = θ_0).

One coordinate per bin is simulated; Σ_i counts_i ½ h_i θ_i² is then an unbiased estimate of the
expected risk (the bins are independent), and the standard error is over runs.

Example:
    >>> from curvlab.nqm import NQM
    >>> nqm = NQM.paper(d=100, bins=10)
    >>> sim = nqm.simulate(20, lr=0.5, batch_size=4, num_runs=200, seed=0)
    >>> sim.risk.shape == (21,)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from curvlab.nqm._validate import _integer, _numpy_rng, _positive, _unit

if TYPE_CHECKING:
    from curvlab.nqm._model import NQM

__all__ = ["SimulationResult", "simulate"]


@dataclass(frozen=True)
class SimulationResult:
    """Mean risk over runs at each recorded step, with its standard error.

    Attributes:
        steps: recorded step indices.
        risk: Monte-Carlo mean of the risk at those steps.
        stderr: standard error of the mean (sample std / sqrt(num_runs)).
        num_runs: number of independent runs.
    """

    steps: np.ndarray
    risk: np.ndarray
    stderr: np.ndarray
    num_runs: int


def simulate(
    nqm: NQM,
    steps: int,
    lr: float,
    batch_size: float,
    momentum: float = 0.0,
    precond_power: float = 0.0,
    ema: float = 0.0,
    num_runs: int = 1000,
    seed: int | np.random.Generator | None = 0,
    record: Any = None,
) -> SimulationResult:
    """Run ``num_runs`` independent stochastic trajectories for ``steps`` steps.

    Args:
        nqm: the model.
        steps: number of updates (>= 0).
        lr, batch_size, momentum, precond_power, ema: as in :meth:`NQM.risk`.
        num_runs: independent runs (>= 2).
        seed: an int seed (curvlab's seeds, ``curvlab._rng.SEED_RANGE``; ``None`` means 0, so
            results are reproducible by default) or a ``numpy.random.Generator`` (the global RNG
            is never used).
        record: integer step indices to record (default every step 0..steps); a value that is
            not an integer is refused.

    Returns:
        :class:`SimulationResult` (risk of θ̃ if ``ema > 0``, else of θ).

    Raises:
        ValueError: naming the argument (``seed`` included: a bool, a float, out of range),
            before any draw.
    """
    steps = _integer("steps", steps, 0)
    num_runs = _integer("num_runs", num_runs, 2)
    rng = _numpy_rng(seed)  # None drew OS entropy (every call differed); -1, 1.5: numpy's errors
    lr = _positive("lr", lr)
    beta, gamma = _unit("momentum", momentum), _unit("ema", ema)
    a, s = nqm.effective(batch_size, precond_power)
    if record is None:
        rec = np.arange(int(steps) + 1)
    else:
        raw = np.asarray(record)
        real = np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)
        if not real or not np.all(np.isfinite(raw) & (raw == np.round(raw))):
            # (1.7 was recorded as step 1, silently)
            raise ValueError(
                f"record must hold integer step indices in [0, {steps}], got {record!r}"
            )
        if raw.size and (raw.min() < 0 or raw.max() > steps):
            raise ValueError(f"record must lie in [0, {steps}], got {record!r}")
        rec = np.unique(raw.astype(np.int64))
    shape = (num_runs, a.size)
    theta = rng.standard_normal(shape) * np.sqrt(nqm.init_var)
    m = np.zeros(shape)
    avg = theta.copy()
    sd = np.sqrt(s)
    w = nqm.weights
    means, errs = [], []
    want = set(rec.tolist())

    def log() -> None:
        r = (avg * avg) @ w
        means.append(r.mean())
        errs.append(r.std(ddof=1) / np.sqrt(r.size))

    for t in range(steps + 1):
        if t in want:
            log()
        if t == steps:
            break
        g = a * theta + sd * rng.standard_normal(shape)  # P^-1 (H θ + ε_B)
        m = beta * m + g
        theta = theta - lr * m
        avg = gamma * avg + (1.0 - gamma) * theta
    return SimulationResult(rec, np.array(means), np.array(errs), int(num_runs))
