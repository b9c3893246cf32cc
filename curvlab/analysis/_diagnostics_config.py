"""The options of :class:`~curvlab.analysis.Diagnostics`, as one object."""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.parameter import is_lazy

from curvlab._numbers import is_count, is_int, is_positive, is_real
from curvlab._rng import SEED_RANGE
from curvlab._scan import scan_model

__all__ = [
    "DiagnosticsConfig",
    "MEASUREMENT_OPTIONS",
    "check_measurement_options",
    "check_top_k",
    "resolve_config",
]


@dataclass(frozen=True)
class DiagnosticsConfig:
    """How :class:`~curvlab.analysis.Diagnostics` measures, logs and reacts (every field optional).

    ``Diagnostics(model, loss_fn, quantities, every, log_dir, config=cfg, **fields)`` takes these
    fields either as a config object (to share one setting between runs) or as keywords; keywords
    override the config's fields.

    Attributes:
        budget: target overhead as a fraction of training time (e.g. ``0.05``): a step is measured
            only if the time spent measuring so far plus the expected cost of one more
            measurement stays within ``budget`` times the training time so far.
        seed: seed (an int) of the generator that draws sampled labels and of the estimators'
            probes and Lanczos starting vectors (never the global RNG). Every measurement draws
            anew: the labels and ``noise_scale_hessian``'s signs from the generator, which
            advances; ``trace_hessian``, ``top_eigenvalues`` and ``spectral_density`` take
            ``seed`` itself at their first measurement (the probes of
            ``cl.trace(..., seed=seed)``) and at each later one a new seed derived from
            ``seed`` and the count, so that successive measurements are independent draws (on
            one model and batch the average of ``n`` measurements has ``1/√n`` of one's
            standard error; before review s15 they reused ``seed``'s probes at every
            measurement: the same probe error from step to step). The same seed reproduces a
            run; ``state_dict`` carries the generator and the counts for a resumed run. The
            sharpness measurements' random start vector ``z`` is drawn the same way, new at
            every measurement.
        max_examples: measure on at most this many examples of the batch (a positive int;
            ``None``: all).
        csv: also write ``metrics.csv`` (one column per scalar quantity of the records so far:
            a record with a new quantity rewrites the file with the union of the columns, the
            earlier rows kept with that column blank).
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package:
            ``pip install 'curvlab[tensorboard]'``).
        on_error: ``"warn"`` (a failing quantity warns, logs an event and is left out of the
            record, whose other quantities are kept, under ``"errors"`` the reason; when every
            quantity fails there is no record; training goes on) or ``"raise"``.
        explosion_factor: warn when Tr(F) per loss term exceeds this factor times its minimum
            over the last ``explosion_window`` measurements ("catastrophic Fisher explosion").
            Per loss term: Tr(F) itself under ``reduction="mean"``, ``Tr(F) / M`` under
            ``"sum"`` (``M`` the measured batch's loss terms: examples, output entries, or
            scored tokens): a "sum" Tr(F) is the batch's total, and compared raw a short last
            batch of an epoch read as a fall and the next full batch as a rise.
        explosion_window: number of measurements the rise is measured over (an int >= 2).
        explosion_until: only check up to this step, an int >= 0 ("early in training");
            ``None``: always.
        options: estimator options passed to the measurement (``num_probes``, ``k``, ...).
        clock: the timer used for the budget (seconds); tests pass a fake one.
        callback: called with each record (the dict written to ``metrics.jsonl``) right after a
            measurement, e.g. ``lambda r: wandb.log(r["values"], step=r["step"])`` or
            ``mlflow.log_metrics``; under ``torch.distributed`` on rank 0 only. Its errors
            propagate (they are not measurement failures).
        process_group: under ``torch.distributed`` (a DDP-wrapped model is accepted) every rank
            passes its shard of the step's batch to ``step`` on the same steps, every rank gets
            the values of all shards, and rank 0 alone writes ``log_dir``. ``None``: the default
            group; a group; or ``"local"`` for each rank's shard alone.
        optimizer: the training loop's ``torch.optim`` optimizer (SGD, Adam, AdamW), read (never
            stepped or written) by the measurements that need it: the thresholds of
            ``"sharpness"``, ``"preconditioned_sharpness"`` (Adam/AdamW) and
            ``"critical_sharpness"`` (:mod:`curvlab.analysis._sharpness`).

    Example:
        >>> from curvlab.analysis import DiagnosticsConfig
        >>> cfg = DiagnosticsConfig(seed=1, on_error="raise")
        >>> cfg.seed, cfg.explosion_factor
        (1, 10.0)
    """

    budget: float | None = None
    seed: int = 0
    max_examples: int | None = None
    csv: bool = False
    tensorboard: bool = False
    on_error: str = "warn"
    explosion_factor: float = 10.0
    explosion_window: int = 5
    explosion_until: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter
    callback: Callable[[dict[str, Any]], None] | None = None
    process_group: Any = None
    optimizer: Any = None


_FIELDS = tuple(f.name for f in dataclasses.fields(DiagnosticsConfig))


def resolve_config(
    config: DiagnosticsConfig | None, overrides: dict[str, Any]
) -> DiagnosticsConfig:
    """``config`` (or the defaults) with the keyword ``overrides``, checked.

    Raises:
        TypeError: for an unknown option name or a ``config`` that is not a DiagnosticsConfig.
        ValueError: for a bad value of ``seed``, ``max_examples``, the ``explosion_*`` fields
            or ``options`` (naming it).
    """
    if config is not None and not isinstance(config, DiagnosticsConfig):
        raise TypeError(f"config must be a DiagnosticsConfig, got {type(config).__name__}")
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise TypeError(
            f"Diagnostics got unknown option(s) {unknown}; the options are "
            f"{', '.join(_FIELDS)} (see DiagnosticsConfig)"
        )
    cfg = dataclasses.replace(config or DiagnosticsConfig(), **overrides)
    return dataclasses.replace(
        cfg, options=check_measurement_options(cfg.options), **_checked_numbers(cfg)
    )


def _checked_numbers(cfg: DiagnosticsConfig) -> dict[str, Any]:
    """The numeric fields of ``cfg``, checked and made Python numbers (numpy's accepted).

    A bool is refused where a count is meant (``max_examples=True`` measured one example), and
    a seed torch cannot take is refused here rather than by torch's ``manual_seed`` inside.

    Raises:
        ValueError: naming the field, what it must be and the value given.
    """
    seed = cfg.seed
    if not (is_int(seed) and SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1]):
        raise ValueError(
            f"seed must be an int (a 64-bit integer seeding the Diagnostics' own generator), "
            f"got {seed!r}"
        )
    factor = cfg.explosion_factor
    if not (isinstance(factor, numbers.Real) and not isinstance(factor, bool) and factor > 1):
        raise ValueError(f"explosion_factor must be a number > 1, got {factor!r}")
    if not is_count(cfg.explosion_window, 2):
        raise ValueError(f"explosion_window must be an int >= 2, got {cfg.explosion_window!r}")
    until = cfg.explosion_until
    whole = is_real(until) and float(until).is_integer() and float(until) >= 0  # 5e3 too
    if until is not None and not (is_count(until, 0) or whole):
        raise ValueError(
            f"explosion_until must be a step number (an int >= 0) or None (check at every "
            f"step), got {until!r}"
        )
    if cfg.max_examples is not None and not is_count(cfg.max_examples):
        raise ValueError(f"max_examples must be a positive int or None, got {cfg.max_examples!r}")
    return {
        "seed": int(seed),
        "explosion_factor": float(factor),
        "explosion_window": int(cfg.explosion_window),
        "explosion_until": None if until is None else int(until),
        "max_examples": None if cfg.max_examples is None else int(cfg.max_examples),
    }


# the measurements' options: name -> (what it must be, its check)
_COUNT = ("a positive int", lambda x: is_count(x))
_UNIT = ("a number in (0, 1)", lambda x: is_positive(x) and float(x) < 1)
MEASUREMENT_OPTIONS: dict[str, tuple[str, Any]] = {
    # trace_hessian, noise_scale_hessian: both report a standard error over their probes, which
    # one probe has not (1 was accepted and both failed at every measured step)
    "num_probes": (
        "a positive int >= 2 (Tr(H) and B_noise report a standard error over probes)",
        lambda x: is_count(x, 2),
    ),
    "k": _COUNT,  # top_eigenvalues
    "num_steps": _COUNT,  # spectral_density
    "num_probes_density": _COUNT,
    "sharpness_tol": _UNIT,
    "sharpness_vectors": ("an int >= 0 (0: cold starts)", lambda x: is_count(x, 0)),
    "sharpness_max_basis": ("an int >= 5", lambda x: is_count(x, 5)),
    "sharpness_max_matvecs": _COUNT,
    "critical_tol": _UNIT,
    "critical_max_forwards": ("an int >= 2", lambda x: is_count(x, 2)),
    "ignore_optimizer_hooks": (  # the sharpness measurements' (review s23)
        "True or False (True: the optimizer's step hooks do not change its step)",
        lambda x: isinstance(x, bool),
    ),
}


def check_measurement_options(options: Any) -> dict[str, Any]:
    """``options`` checked against the measurements' own (:data:`MEASUREMENT_OPTIONS`), numpy
    numbers made Python's: a misspelt name or a bad value is refused when ``Diagnostics`` is
    made, not ignored or refused inside a measurement.

    Raises:
        ValueError: naming the option and what it must be (unknown names: the known ones).
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "optimizer":
            raise ValueError(
                "options has 'optimizer': pass it as Diagnostics(..., optimizer=opt), where the "
                "measurements read it (in options it was ignored)"
            )
        if name not in MEASUREMENT_OPTIONS:
            raise ValueError(
                f"options has an unknown name {name!r}; the measurements read "
                f"{', '.join(sorted(MEASUREMENT_OPTIONS))}"
            )
        what, ok = MEASUREMENT_OPTIONS[name]
        if not ok(value):
            raise ValueError(f"options[{name!r}] must be {what}, got {value!r}")
        out[name] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def check_top_k(model: nn.Module, quantities: Sequence[str], options: Mapping[str, Any]) -> None:
    """``options["k"]`` (default 5) at most the model's trainable parameters where
    ``top_eigenvalues`` is measured, when :class:`~curvlab.analysis.Diagnostics` is made: a larger
    one failed at every measured step, after the other quantities' work, where ``analyze``
    refuses it up front (review s25). Parameters frozen later are still checked at each
    measurement (:func:`curvlab.analysis._estimator_measures.top_eigenvalues`), and so is a model
    with uninitialized (lazy) parameters, whose size the first forward pass sets, or with none
    trainable yet.

    Raises:
        ValueError: naming ``k``, the trainable parameters' count and the largest ``k`` to pass.
    """
    if "top_eigenvalues" not in quantities:
        return
    params = list(scan_model(model).trainable.values())
    if not params or any(is_lazy(p) for p in params):  # nothing trainable yet (each step says
        return  # so), or sized at the first forward: checked at each step
    k = options.get("k", 5)
    dim = sum(p.numel() for p in params)
    if k > dim:
        what = f"options={{'k': {k}}}" if "k" in options else f"k={k} (the default of options)"
        raise ValueError(
            f"quantities holds 'top_eigenvalues' with {what}, but the model has {dim} trainable "
            f"parameters: pass options={{'k': {dim}}} or a smaller k, or leave top_eigenvalues "
            "out of quantities"
        )
