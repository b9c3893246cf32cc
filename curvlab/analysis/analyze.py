"""``curvlab.analyze``: a model (and checkpoints) in, a :class:`Report` with numbers and plots out.

Example:
    >>> import torch, curvlab as cl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> report = cl.analyze(model, torch.nn.CrossEntropyLoss(), (X, y),
    ...                     quantities=["loss", "trace_fisher", "noise_scale"])
    >>> sorted(report.per_layer["trace_fisher"])
    ['0', '2']
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.analysis.checkpoint import checkpoint_label, load_into, resolve_state_dict
from curvlab.analysis.measures import ANALYZE_DEFAULT, check_quantities, measure
from curvlab.analysis.report import Report
from curvlab.data import is_single_batch, num_examples
from curvlab.losses import loss_spec
from curvlab.notrace import leave_no_trace, model_device

__all__ = ["analyze", "nqm_prediction", "AnalysisWarning"]


class AnalysisWarning(RuntimeWarning):
    """A quantity could not be computed; the report records why and holds the others."""


def _is_trajectory(checkpoint: Any) -> bool:
    return isinstance(checkpoint, (list, tuple))


def _count_examples(data: Any) -> int:
    if is_single_batch(data):
        return num_examples(data[0])
    return sum(num_examples(b[0]) for b in data)


def nqm_prediction(
    nodes: Sequence[float],
    weights: Sequence[float],
    dim: int,
    batch_sizes: Sequence[float] | None = None,
    target: float = 0.01,
    precond_power: float = 0.5,
) -> dict[str, Any]:
    """Critical batch sizes predicted by the NQM built from a measured Hessian spectrum.

    The SLQ nodes ``lambda_i`` with weights ``w_i`` (normalised to sum to 1) become an NQM with
    ``dim * w_i`` coordinates of curvature ``lambda_i`` and gradient-noise variance
    ``c_i = lambda_i`` (C = H: the per-example gradient covariance approximated by the Fisher,
    approximated by the Hessian), keeping only positive nodes. Steps to reach ``target`` times
    the initial risk are optimised over the learning rate for each batch size, for plain SGD and
    for SGD preconditioned by ``H^precond_power``; the critical batch size is where
    ``B * steps(B)`` doubles (:func:`curvlab.nqm.critical_batch_size`).

    Returns:
        A dict with ``curves`` ``{label: {"batch_size", "steps", "critical_batch_size"}}``,
        ``note`` and the settings.
    """
    from curvlab.nqm import NQM, batch_size_sweep, critical_batch_size

    ev = np.asarray(nodes, dtype=float)
    w = np.asarray(weights, dtype=float)
    keep = ev > 1e-12 * max(float(np.abs(ev).max()), 1e-300)
    if keep.sum() == 0:
        raise ValueError("the measured spectrum has no positive eigenvalue; the NQM needs some")
    w = w / w.sum()  # SLQ weights sum to 1 per probe; several probes are averaged
    counts = w[keep] * dim
    model = NQM.from_spectrum(ev[keep], counts)
    bs = list(batch_sizes) if batch_sizes is not None else [2.0**k for k in range(0, 17)]
    risk_target = target * model.initial_risk()
    sweep = batch_size_sweep(
        model, bs, optimizers=("sgd",), precond_powers=(0.0, precond_power), target=risk_target
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
    return {
        "curves": curves,
        "target_fraction_of_initial_risk": target,
        "positive_mass": float(w[keep].sum()),
        "note": (
            "NQM (Zhang et al., 2019) built from the measured Hessian spectrum with gradient noise "
            "C = H; critical batch size = where batch size x steps to target doubles."
        ),
    }


def analyze(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    checkpoint: Any = None,
    quantities: Sequence[str] | None = None,
    *,
    map_location: Any = None,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    num_probes: int = 30,
    k: int = 5,
    num_steps: int = 60,
    chunk_size: int | None = 256,
    nqm: bool = True,
    nqm_target: float = 0.01,
    precond_power: float = 0.5,
    on_error: str = "warn",
    progress: bool = False,
) -> Report:
    """Measure curvature quantities of ``model`` (at one checkpoint or along a trajectory).

    All quantities are those of ``L = loss_fn(model(X), y)`` on all of ``data``, measured in eval
    mode (BatchNorm uses its running statistics, as in Jastrzębski et al.); see
    :mod:`curvlab.analysis.measures` for each quantity's definition and scaling. The model is left
    exactly as it was: parameters, buffers, ``.grad``, modes and the global RNG are restored, also
    after loading checkpoints into it.

    Args:
        model: the network (its architecture must match the checkpoints).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        data: one ``(inputs, targets)`` batch, or a re-iterable collection of batches (a list or a
            DataLoader; a one-shot iterator cannot be read several times).
        checkpoint: ``None`` (the model as it is), a file path, a state_dict, a wrapper dict
            (``{"state_dict": ...}``, ``{"model": ...}``), or a list of these (a trajectory).
        quantities: names from :data:`~curvlab.analysis.measures.QUANTITIES`; default all of
            ``loss, grad_norm, trace_hessian, trace_fisher, trace_empirical_fisher,
            top_eigenvalues, spectral_density, noise_scale, fisher_norms``.
        map_location: where tensors of checkpoint files are loaded (default the model's device);
            files are read with ``weights_only=True``.
        labels: names of the checkpoints in the report (default the file names).
        seed: seed of every random draw (probes, sampled labels).
        num_probes, k, num_steps: Hutchinson probes for Tr(H), number of top eigenvalues, Lanczos
            steps of the spectral density.
        chunk_size: examples per BackPACK pass.
        nqm: feed the final spectral density into the NQM and predict critical batch sizes.
        nqm_target: NQM target risk as a fraction of its initial risk.
        precond_power: power p of the preconditioner ``H^p`` for the preconditioned prediction.
        on_error: ``"warn"`` (record a failing quantity, warn and go on) or ``"raise"``.
        progress: print one line per checkpoint to stderr.

    Returns:
        A :class:`~curvlab.analysis.report.Report`.

    Raises:
        FileNotFoundError, CheckpointError, CheckpointMismatchError: for unusable checkpoints
            (before any measurement).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec = loss_spec(loss_fn)
    names = check_quantities(quantities, ANALYZE_DEFAULT)
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
    if isinstance(data, Iterator):
        raise TypeError(
            "analyze reads the data several times; pass one batch, a list of batches or a "
            "DataLoader, not a one-shot iterator or generator"
        )
    n_examples = _count_examples(data)
    device = model_device(model)
    location = device if map_location is None else map_location
    checkpoints = list(checkpoint) if _is_trajectory(checkpoint) else [checkpoint]
    if not checkpoints:
        raise ValueError("checkpoint is an empty list; pass at least one checkpoint or None")
    if labels is not None and len(labels) != len(checkpoints):
        raise ValueError(f"labels has {len(labels)} names for {len(checkpoints)} checkpoints")
    # read and check every checkpoint before spending time on measurements
    states: list[dict[str, Tensor] | None] = []
    for i, ckpt in enumerate(checkpoints):
        if ckpt is None:
            states.append(None)
            continue
        source = (
            f"'{ckpt}'"
            if isinstance(ckpt, (str, bytes)) or hasattr(ckpt, "__fspath__")
            else (f"{i} of the trajectory" if len(checkpoints) > 1 else "(state_dict)")
        )
        sd = resolve_state_dict(ckpt, map_location=location, source=source)
        probe = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            load_into(model, sd, source=source)
        finally:
            model.load_state_dict(probe)
        states.append(sd)
    names_out = (
        list(labels)
        if labels is not None
        else ["model" if c is None else checkpoint_label(c, i) for i, c in enumerate(checkpoints)]
    )
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    options = {"num_probes": num_probes, "k": k, "num_steps": num_steps}
    entries = []
    try:
        for i, (sd, label) in enumerate(zip(states, names_out)):
            if sd is not None:
                load_into(model, sd)
            t0 = time.perf_counter()
            with leave_no_trace(model, mode=False):
                m = measure(
                    model,
                    loss_fn,
                    data,
                    names,
                    seed=seed,
                    chunk_size=chunk_size,
                    options=options,
                    on_error="raise" if on_error == "raise" else "skip",
                )
            seconds = time.perf_counter() - t0
            for what, why in m.errors.items():
                warnings.warn(
                    f"curvlab.analyze: {what} failed at {label} ({why}); the report omits it",
                    AnalysisWarning,
                    stacklevel=2,
                )
            entries.append(
                {
                    "label": label,
                    "values": m.values,
                    "per_layer": m.per_layer,
                    "arrays": m.arrays,
                    "errors": m.errors,
                    "seconds": seconds,
                }
            )
            if progress:
                print(
                    f"[curvlab] analyzed {label} ({i + 1}/{len(states)}) in {seconds:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        model.load_state_dict(original)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = {
        "quantities": list(names),
        "loss": type(loss_fn).__name__,
        "reduction": spec.reduction,
        "examples": n_examples,
        "parameters": dim,
        "checkpoints": len(entries),
        "seed": seed,
        "num_probes": num_probes,
        "lanczos_steps": num_steps,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "mode": "eval (restored afterwards)",
    }
    report = Report(entries=entries, meta=meta)
    density = entries[-1]["arrays"].get("spectral_density")
    if nqm and density:
        try:
            report.nqm = nqm_prediction(
                density["nodes"],
                density["weights"],
                dim,
                target=nqm_target,
                precond_power=precond_power,
            )
        except Exception as exc:  # noqa: BLE001 - the NQM is an extra; the report stays useful
            if on_error == "raise":
                raise
            warnings.warn(
                f"curvlab.analyze: the NQM prediction failed ({exc})", AnalysisWarning, stacklevel=2
            )
    return report
