"""The noisy quadratic model of a measured Hessian spectrum: critical batch sizes from SLQ nodes.

:func:`nqm_prediction` turns the spectral density ``analyze`` measures (stochastic Lanczos
quadrature nodes and weights) into an NQM (Zhang et al., 2019; :mod:`curvlab.nqm`) and predicts
the steps to a target risk against batch size and the critical batch size, for plain SGD and for
SGD preconditioned by ``H^p``, with the spread over the SLQ probes. Its batch sizes count loss
terms (tokens for sequence models), not examples.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["nqm_prediction"]


def _nqm_from_nodes(
    nodes: np.ndarray, weights: np.ndarray, dim: int, flat_below: float
) -> tuple[Any, float]:
    """The NQM of the SLQ nodes above ``flat_below`` (weights normalised to sum to 1), and the
    weight it keeps. The weights are finite and >= 0, the nodes of positive weight finite
    (:func:`_check_spectrum`)."""
    from curvlab.nqm import NQM

    ev = np.asarray(nodes, dtype=float)
    w = np.asarray(weights, dtype=float)
    ok = w > 0  # SLQ pads short runs with zero weights
    if not ok.any():
        raise ValueError("the measured spectrum has no node of positive weight")
    ev, w = ev[ok], w[ok] / w[ok].sum()
    keep = ev > flat_below
    if not keep.any():
        raise ValueError(
            "the measured spectrum has no positive eigenvalue (none above the flat threshold "
            f"{flat_below:.3g}); the NQM needs positive curvature"
        )
    return NQM.from_spectrum(ev[keep], w[keep] * dim), float(w[keep].sum())


def _check_spectrum(ev: np.ndarray, w: np.ndarray) -> None:
    """Refuse, naming the argument and the entry, weights that are not finite and >= 0 and nodes
    of positive weight that are not finite (as ``NQM.from_spectrum``): they were dropped
    silently, and ``positive_mass`` reported 1.0 of a spectrum that had lost them."""
    bad = np.flatnonzero(~(np.isfinite(w) & (w >= 0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"weights must be finite and >= 0 (SLQ weights are), got weights[{i}] = {float(w[i])!r}"
        )
    bad = np.flatnonzero((w > 0) & ~np.isfinite(ev))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"nodes of positive weight must be finite, got nodes[{i}] = {float(ev[i])!r} "
            f"(weight {float(w[i]):g}); the spectrum that gave it is not usable (a non-finite "
            "Hessian?)"
        )


def _nqm_curves(
    model: Any, batch_sizes: list[float], target: float, precond_power: float
) -> dict[str, Any]:
    from curvlab.nqm import batch_size_sweep, critical_batch_size

    sweep = batch_size_sweep(
        model,
        batch_sizes,
        optimizers=("sgd",),
        precond_powers=tuple(dict.fromkeys((0.0, float(precond_power)))),  # once each
        target=target * model.initial_risk(),
    )
    curves: dict[str, Any] = {}
    for label, power in (
        ("SGD", 0.0),
        (f"preconditioned SGD (P = H^{precond_power:g})", precond_power),
    ):
        rows = sweep.select("sgd", power)
        curves[label] = {
            "batch_size": [float(r.batch_size) for r in rows],
            "steps": [float(r.steps) for r in rows],
            "critical_batch_size": float(critical_batch_size(sweep, "sgd", power)),
        }
    return curves


def nqm_prediction(
    nodes: Sequence[float],
    weights: Sequence[float],
    dim: int,
    batch_sizes: Sequence[float] | None = None,
    target: float = 0.01,
    precond_power: float = 0.5,
    num_probes: int = 1,
    flat_tol: float = 1e-3,
    terms_per_example: float | None = None,
) -> dict[str, Any]:
    """Critical batch sizes predicted by the NQM built from a measured Hessian spectrum.

    **Units: the batch size B counts loss terms** (one query of gradient-noise covariance
    ``C = H`` per batch unit): tokens for sequence models, where one sequence of ``T`` scored
    tokens is ``T`` loss terms and its gradient's true-Fisher covariance is ``H/T``. So divide
    the predicted batch sizes (and critical batch sizes) by the tokens per sequence for batches
    of sequences; for one loss term per example they count examples. Pass
    ``terms_per_example`` (the loss terms per example, e.g. scored tokens per sequence) to get
    them in examples as well (``critical_batch_size_examples``).

    ``nodes`` are those of the Hessian of the mean loss (the per-example convention the NQM's
    noise ``C`` is read in): scaling ``H`` and ``C`` together by ``k`` acts as a ``k`` times larger
    batch, so a ``"sum"`` loss's nodes, ``M`` times larger, would divide the prediction by about
    ``M``; :func:`curvlab.analyze` divides them by the data's ``M`` loss terms.
    The SLQ nodes ``lambda_i`` with weights ``w_i`` (those of weight exactly 0, which pad short
    Lanczos runs, dropped, whatever their value; the rest normalised to sum to 1; a weight that
    is not finite and >= 0, or a node of positive weight that is not finite, is refused) become
    an NQM with ``dim * w_i`` coordinates of curvature ``lambda_i`` and gradient-noise variance
    ``c_i = lambda_i`` (C = H: the per-example gradient covariance approximated by the Fisher,
    approximated by the Hessian),
    keeping only nodes above ``flat_tol`` times the spectrum's range ``max(lambda) - min(lambda,
    0)``. Below that the Ritz values of the large near-zero bulk are unresolved (their sign and
    size change from probe to probe), so those directions count as flat and are left out; kept,
    they would make the prediction depend on noise (preconditioning by ``H^p`` magnifies them
    most). Steps to reach ``target`` times the initial risk are optimised
    over the learning rate for each batch size, for plain SGD and for SGD preconditioned by
    ``H^precond_power``; the critical batch size is where ``B * steps(B)`` doubles
    (:func:`curvlab.nqm.critical_batch_size`).

    With several SLQ probes (``nodes`` and ``weights`` hold ``num_probes`` rows of equal length,
    flattened) the prediction uses the spectrum of all probes together, and each probe's own
    prediction gives the spread: ``critical_batch_size_per_probe`` (NaN for a probe that saw
    no positive curvature above ``flat_below``: it has no prediction of its own) and the
    ``[min, max]`` of the others, ``critical_batch_size_range`` (``None`` where no probe has a
    prediction), per curve. The report says how many probes give a prediction where some do
    not (:func:`curvlab.analysis._glossary.nqm_probe_spread`): the range of the others read as
    that of all of them (found in review).

    Args:
        nodes, weights: the SLQ nodes and weights (``num_probes`` rows, flattened).
        dim: the number of parameters (> 0): the NQM's dimension.
        batch_sizes: the batch sizes B (in loss terms) to predict at; default 1 … 65536.
        target: the risk to reach as a fraction of the initial risk, in (0, 1).
        precond_power: p of the preconditioned curve, P = H^p.
        num_probes: the number of SLQ probes (rows of ``nodes``), an integer >= 1.
        flat_tol: nodes below this fraction of the spectrum's range count as flat, in [0, 1).
        terms_per_example: loss terms per example (> 0), if known: the result then states it
            and gives each curve's ``critical_batch_size_examples`` (= the critical batch size
            / ``terms_per_example``). None: stated as None, no conversion.

    Returns:
        A dict with ``curves`` ``{label: {"batch_size", "steps", "critical_batch_size", ...}}``
        (batch sizes in loss terms), ``batch_size_unit`` (``"loss terms"``),
        ``terms_per_example``, ``note`` and the settings.

    Raises:
        ValueError: naming the argument: ``target`` outside (0, 1), ``dim`` not > 0,
            ``num_probes`` not an integer >= 1 or not dividing ``nodes`` into equal rows,
            ``flat_tol`` outside [0, 1), ``precond_power`` not a number in [0, 1] (a string
            too), ``terms_per_example`` not > 0, ``weights`` not finite
            and >= 0, ``nodes`` of positive weight not finite (naming the entry); and if the
            spectrum has no positive node of positive weight (no NQM exists). All before any
            curve is computed.
    """
    ev = np.asarray(nodes, dtype=float).reshape(-1)
    w = np.asarray(weights, dtype=float).reshape(-1)
    if ev.shape != w.shape:
        raise ValueError(f"nodes and weights differ in length: {ev.size} vs {w.size}")
    _check_spectrum(ev, w)
    try:  # numpy integers too (np.int64(1) was refused with a message about dividing)
        probes = None if isinstance(num_probes, bool) else operator.index(num_probes)
    except TypeError:
        probes = None
    if probes is None or probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    if ev.size % probes:
        raise ValueError(
            f"num_probes={num_probes!r} does not divide the {ev.size} nodes into equal rows"
        )
    num_probes = probes
    from curvlab.nqm._validate import _power

    precond_power = _power(precond_power)  # a string ("0.5") passed float() and broke later
    if not 0 <= flat_tol < 1:
        raise ValueError(f"flat_tol must be in [0, 1), got {flat_tol!r}")
    if not 0 < target < 1:  # 1.5 gave NaN critical batch sizes (met at step 0) with no error
        raise ValueError(
            f"target is a fraction of the initial risk and must be in (0, 1), got {target!r}"
        )
    if not 0 < dim < math.inf:  # 0 was reported as "weights are all zero"
        raise ValueError(f"dim (the number of parameters) must be > 0, got {dim!r}")
    if terms_per_example is not None and not 0 < terms_per_example < math.inf:
        raise ValueError(
            f"terms_per_example (loss terms per example) must be > 0, got {terms_per_example!r}"
        )
    bs = list(batch_sizes) if batch_sizes is not None else [2.0**k for k in range(0, 17)]
    live = w > 0  # (the weights are finite and >= 0, these nodes finite: _check_spectrum)
    if not live.any():
        raise ValueError("the measured spectrum has no node of positive weight")
    flat_below = flat_tol * (ev[live].max() - min(ev[live].min(), 0.0))
    model, mass = _nqm_from_nodes(ev, w, dim, flat_below)
    curves = _nqm_curves(model, bs, target, precond_power)
    if num_probes > 1:
        rows = []
        for ev_p, w_p in zip(ev.reshape(num_probes, -1), w.reshape(num_probes, -1)):
            try:
                rows.append(
                    _nqm_curves(
                        _nqm_from_nodes(ev_p, w_p, dim, flat_below)[0], bs, target, precond_power
                    )
                )
            except ValueError:  # this probe saw no positive curvature: it has no prediction
                rows.append(None)
        for label, curve in curves.items():
            per = [r[label]["critical_batch_size"] if r else math.nan for r in rows]
            curve["critical_batch_size_per_probe"] = per
            finite = [c for c in per if math.isfinite(c)]
            curve["critical_batch_size_range"] = [min(finite), max(finite)] if finite else None
    if terms_per_example is not None:
        for curve in curves.values():
            curve["critical_batch_size_examples"] = curve["critical_batch_size"] / float(
                terms_per_example
            )
    return {
        "curves": curves,
        "target_fraction_of_initial_risk": target,
        "positive_mass": mass,
        "flat_below": float(flat_below),
        "num_probes": num_probes,
        "batch_size_unit": "loss terms",
        "terms_per_example": None if terms_per_example is None else float(terms_per_example),
        "note": (
            "NQM (Zhang et al., 2019) built from the measured Hessian spectrum with gradient noise "
            f"C = H; directions of curvature below {flat_below:.3g} ({flat_tol:g} of the "
            "spectrum's range, below SLQ's resolution) count as flat and are left out; critical "
            "batch size = where batch size x steps to target doubles. Batch sizes count loss "
            "terms (tokens for sequence models): divide by the tokens per sequence for "
            "sequences."
        ),
    }
