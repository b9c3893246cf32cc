"""The NQM side of ``examples/mnist1d_critical_batch.py``: sweeps, and ratios read like the network's.

The critical batch size rule (:func:`curvlab.nqm.critical_batch_from_steps`: where B·S(B) has
doubled from its minimum) depends on where a sweep starts: for S(B) = S_min(1 + B*/B) it
reports B* + 2·B_0, B_0 the sweep's smallest batch size. The network is swept from B_0 = 8,
about 0.2 of its SGD critical batch size; an NQM swept from B = 1 starts at about 0.02 of its
own. Ratios such as "critical batch size of momentum / SGD" read from such different relative
starts are not comparable: the offset 2·B_0 pulls the network's ratios towards 1 far more than
the NQM's.

So the NQM is read with the same rule from the batch size b_0 that sits where the network's
B_0 sits, relative to the SGD critical batch size each reports: b_0 = r · B_crit,SGD(b_0) with
r = B_0 / B_crit,SGD of the network, solved by bisection (:func:`matched_start`). Every curve
(SGD, momentum, the Adam bracket) is then read from b_0, as the network's are from B_0. For
S = S_min(1 + B*/B) this puts b_0 / B*_NQM = B_0 / B*_net, so the offset distorts the NQM's
ratios exactly as it distorts the network's, and the two agree when the NQM's B* ratios do;
the rule itself needs no model of S(B). The steps ratios are read at the NQM batch sizes with
the network's B / B_crit,SGD, the SGD critical batch size again read from b_0.

Steps at batch sizes off the sweep's grid come from a :class:`StepsAt`: :class:`ExactSteps`
solves the NQM there (a live run, or a saved spectrum); :class:`InterpolatedSteps` interpolates
the saved sweep log-log, for results saved without their spectrum (about 1% off the exact ratios
on this script's measured-spectrum NQM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

import curvlab as cl
from curvlab.nqm import NQM, batch_size_sweep, critical_batch_from_steps, critical_batch_size

POWERS = (0.0, 0.25, 0.5)
# NQM momentum variants: the default grid (1 - β down to 1e-4) and β capped at 0.9
BETA_VARIANTS = {"beta<=0.9999": {}, "beta<=0.9": {"decay_min": 0.1}}
SGD = "sgd p=0"
RTOL = 1e-4  # relative width of the bracket that ends the bisection of matched_start


class StepsAt(Protocol):
    """Steps to the target of one curve of a sweep at any batch size inside the sweep's range."""

    how: str

    def __call__(self, label: str, batch_size: float) -> float: ...


def nqm_sweeps(
    nqm: NQM, bs: Sequence[float], target: float, grid: Mapping[str, Any]
) -> dict[str, Any]:
    """SGD and momentum (β ≤ 0.9999 and β ≤ 0.9) sweeps over ``POWERS``: steps, β, critical B.

    ``critical_batch_size`` of each curve is read from the sweep's own smallest batch size (the
    NQM's own scaling claims); the comparison with the network reads it from
    :func:`matched_start` instead (:func:`nqm_ratios`).
    """
    out: dict[str, Any] = {"batch_sizes": list(bs), "target": target, "curves": {}}
    sweeps = {"sgd": batch_size_sweep(nqm, bs, ("sgd",), POWERS, target=target, **grid)}
    for name, extra in BETA_VARIANTS.items():
        sweeps[f"momentum {name}"] = batch_size_sweep(
            nqm, bs, ("momentum",), POWERS, target=target, **grid, **extra
        )
    for label, sweep in sweeps.items():
        opt = "sgd" if label == "sgd" else "momentum"
        for p in POWERS:
            rows = sweep.select(opt, p)
            out["curves"][f"{label} p={p:g}"] = {
                "steps": [float(r.steps) for r in rows],
                "lr": [float(r.lr) for r in rows],
                "momentum": [float(r.momentum) for r in rows],
                "critical_batch_size": float(critical_batch_size(sweep, opt, p)),
            }
    # β ≤ 0.9999 contains β ≤ 0.9, but the two grids differ: where the capped grid found fewer
    # steps, the wider optimum is at least that good; take it (counted per curve)
    for p in POWERS:
        wide = out["curves"][f"momentum beta<=0.9999 p={p:g}"]
        capped = out["curves"][f"momentum beta<=0.9 p={p:g}"]
        better = [i for i, (w, c) in enumerate(zip(wide["steps"], capped["steps"])) if c < w]
        for i in better:
            for field in ("steps", "lr", "momentum"):
                wide[field][i] = capped[field][i]
        wide["taken_from_capped_grid"] = len(better)
        wide["critical_batch_size"] = float(critical_batch_from_steps(bs, wide["steps"]))
    return out


class InterpolatedSteps:
    """Steps of a saved sweep, log-log interpolated between its batch sizes.

    Raises:
        ValueError: for a batch size outside the sweep's range (never extrapolated).
    """

    how = "log-log interpolation of the saved NQM sweep (no spectrum saved)"

    def __init__(self, sweep: Mapping[str, Any]) -> None:
        self._bs = np.asarray(sweep["batch_sizes"], dtype=float)
        self._curves = sweep["curves"]

    def __call__(self, label: str, batch_size: float) -> float:
        lo, hi = float(self._bs.min()), float(self._bs.max())
        if not lo * (1 - 1e-12) <= batch_size <= hi * (1 + 1e-12):
            raise ValueError(
                f"batch size {batch_size:.6g} is outside the saved NQM sweep [{lo:g}, {hi:g}]; "
                "rerun the script (its sweep covers it) instead of interpolating"
            )
        steps = np.log(np.asarray(self._curves[label]["steps"], dtype=float))
        return float(np.exp(np.interp(math.log(batch_size), np.log(self._bs), steps)))


class ExactSteps:
    """Steps of the NQM itself: the sweep's values on its grid, the NQM solved elsewhere (cached).

    SGD alone is solved where only it is asked (the bisection of :func:`matched_start`); the
    other curves together, as :func:`nqm_sweeps` makes them (β ≤ 0.9999 takes the capped grid's
    result where that is better).
    """

    how = "the NQM solved at each batch size off its sweep's grid"

    def __init__(
        self, nqm: NQM, sweep: Mapping[str, Any], grid: Mapping[str, Any] | None = None
    ) -> None:
        self._nqm, self._target, self._grid = nqm, float(sweep["target"]), dict(grid or {})
        self._cache: dict[tuple[str, float], float] = {
            (label, float(b)): float(s)
            for label, curve in sweep["curves"].items()
            for b, s in zip(sweep["batch_sizes"], curve["steps"])
        }

    def __call__(self, label: str, batch_size: float) -> float:
        key = (label, float(batch_size))
        if key not in self._cache:
            if label == SGD:
                rows = batch_size_sweep(
                    self._nqm, [batch_size], ("sgd",), (0.0,), self._target, **self._grid
                ).select("sgd", 0.0)
                self._cache[key] = float(rows[0].steps)
            else:
                sw = nqm_sweeps(self._nqm, [batch_size], self._target, self._grid)
                for name, curve in sw["curves"].items():
                    self._cache[(name, float(batch_size))] = float(curve["steps"][0])
        return self._cache[key]


def critical_from(at: StepsAt, batch_sizes: Sequence[float], label: str, start: float) -> float:
    """The critical batch size of curve ``label`` read from ``start`` (the grid above it)."""
    grid = [float(start)] + sorted(float(b) for b in batch_sizes if b > start)
    return critical_batch_from_steps(grid, [at(label, b) for b in grid])


def matched_start(at: StepsAt, batch_sizes: Sequence[float], rel: float) -> float:
    """The NQM batch size b_0 with b_0 = ``rel`` · (SGD's critical batch size read from b_0).

    ``rel`` is the network's smallest batch size over its SGD critical batch size. Bisection in
    log b_0 between the sweep's batch sizes, to a relative bracket of ``RTOL``. The NQM's
    steps are whole numbers, so the equation can hold only up to a jump (a fraction of a percent
    on a coarse search grid): the end of the final bracket closer to it is returned, and
    :func:`nqm_ratios` reports the b_0 / B* it reached.

    Raises:
        ValueError: if ``rel`` is not in (0, 0.5) (the rule's critical batch size is at least
            twice the start), or the sweep does not bracket b_0 (it starts too high, or SGD's
            critical batch size is not inside it).
    """
    if not 0 < rel < 0.5:
        raise ValueError(
            f"the network's smallest batch size over its SGD critical batch size must lie in "
            f"(0, 0.5), got {rel!r}"
        )
    bs = sorted(float(b) for b in batch_sizes)

    def gap(b0: float) -> float:
        crit = critical_from(at, bs, SGD, b0)
        if math.isnan(crit):
            raise ValueError(f"the NQM's SGD curve read from batch size {b0:.6g} has no B*")
        return math.log(b0) - math.log(rel * crit) if math.isfinite(crit) else -math.inf

    if gap(bs[0]) >= 0:
        raise ValueError(
            f"the NQM sweep starts at batch size {bs[0]:g}, at or past the matched start "
            f"(B_0 / B* = {rel:.3g}): sweep the NQM from smaller batch sizes"
        )
    above = next((i for i, b in enumerate(bs[1:], 1) if gap(b) >= 0), None)
    if above is None:
        raise ValueError(
            f"no NQM batch size up to {bs[-1]:g} reaches B_0 / B* = {rel:.3g}: sweep the NQM to "
            "larger batch sizes"
        )
    lo, hi = bs[above - 1], bs[above]
    while hi / lo - 1 > RTOL:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    # whole steps make the gap jump where the NQM's count changes: the closer end of the bracket
    return min((lo, hi), key=lambda b: abs(gap(b)))


def nqm_ratios(
    sw: Mapping[str, Any], rel_batch: Mapping[str, float], at: StepsAt | None = None
) -> dict[str, Any]:
    """Predicted ratios to SGD, read like the network's (module docstring).

    Args:
        sw: a sweep of :func:`nqm_sweeps`.
        rel_batch: the network's batch sizes over its SGD critical batch size; ``"smallest B"``
            (its B_0) is required and sets the NQM's start :func:`matched_start`; the steps
            ratios are read at each entry.
        at: steps off the sweep's grid (default :class:`InterpolatedSteps` of ``sw``).

    Returns:
        ``matched_start`` (b_0), ``sgd_critical_batch_size`` (read from b_0), their ratio (the
        network's ``rel_batch["smallest B"]`` up to the NQM's whole steps), ``critical batch
        sizes from the matched start`` (every curve), ``evaluation`` (how off-grid steps were
        got) and per β variant the ratios ``critical {X}/SGD``, ``critical {X}/momentum`` and
        ``steps {X}/SGD at {where}`` with ``nqm batch at {where}``.
    """
    at = InterpolatedSteps(sw) if at is None else at
    bs = sw["batch_sizes"]
    b0 = matched_start(at, bs, rel_batch["smallest B"])
    crit = {label: critical_from(at, bs, label, b0) for label in sw["curves"]}
    b_sgd = crit[SGD]
    out: dict[str, Any] = {
        "matched_start": b0,
        "sgd_critical_batch_size": b_sgd,
        "matched_start / sgd_critical_batch_size": b0 / b_sgd,
        "critical batch sizes from the matched start": crit,
        "evaluation": at.how,
    }
    where_b = {w: (b0 if w == "smallest B" else rel * b_sgd) for w, rel in rel_batch.items()}
    for name in BETA_VARIANTS:
        r: dict[str, Any] = {}
        mom = crit[f"momentum {name} p=0"]
        for label, p in (("momentum", 0.0), ("Adam p=0.25", 0.25), ("Adam p=0.5", 0.5)):
            curve = f"momentum {name} p={p:g}"
            r[f"critical {label}/SGD"] = crit[curve] / b_sgd
            r[f"critical {label}/momentum"] = crit[curve] / mom
            for where, b in where_b.items():
                r[f"steps {label}/SGD at {where}"] = at(curve, b) / at(SGD, b)
                r[f"nqm batch at {where}"] = b
        out[name] = r
    return out


def measured_nqm(model: nn.Module, X: torch.Tensor, y: torch.Tensor, quick: bool) -> dict:
    """The NQM of cl.analyze from the model's Hessian spectral density (C = H, flat nodes dropped).

    Returns:
        ``nqm`` and ``info`` (what went into it, ``spectrum`` included: the kept nodes and their
        counts, from which :func:`nqm_from_info` rebuilds the NQM).
    """
    num_steps, probes = (10, 1) if quick else (40, 4)
    report = cl.analyze(
        model,
        nn.CrossEntropyLoss(),
        (X[:1000], y[:1000]),
        quantities=["spectral_density", "top_eigenvalues"],
        num_steps=num_steps,
        density_probes=probes,
        k=1,
        seed=0,
        progress=False,
    )
    entry = report.entries[-1]
    density = entry["arrays"]["spectral_density"]
    ev = np.asarray(density["nodes"], dtype=float).reshape(-1)
    w = np.asarray(density["weights"], dtype=float).reshape(-1)
    ok = np.isfinite(ev) & np.isfinite(w) & (w > 0)
    ev, w = ev[ok], w[ok] / w[ok].sum()
    flat_below = (report.nqm or {}).get("flat_below", 1e-12 * np.abs(ev).max())
    keep = ev > flat_below
    dim = sum(p.numel() for p in model.parameters())
    info = {
        "slq_steps": num_steps,
        "slq_probes": probes,
        "analyze_critical_batch_size": {
            label: curve["critical_batch_size"]
            for label, curve in ((report.nqm or {}).get("curves") or {}).items()
        },
        "top_eigenvalue": entry["values"].get("top_eigenvalues"),
        "positive_mass": float(w[keep].sum()),
        "flat_below": float(flat_below),
        "nodes_kept": int(keep.sum()),
        "parameters": dim,
        "spectrum": {"eigenvalues": ev[keep].tolist(), "counts": (w[keep] * dim).tolist()},
    }
    return {"nqm": nqm_from_info(info), "info": info}


def nqm_from_info(info: Mapping[str, Any]) -> NQM:
    """The measured-spectrum NQM (C = H, init_var 1) from ``info["spectrum"]``."""
    spectrum = info["spectrum"]
    return NQM.from_spectrum(spectrum["eigenvalues"], spectrum["counts"])
