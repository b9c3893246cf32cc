"""Named measurements shared by :func:`curvlab.analyze` and :class:`curvlab.Diagnostics`.

A measurement turns ``(model, loss_fn, data)`` into JSON-friendly numbers: scalars in ``values``,
per-layer scalars in ``per_layer`` (keyed by module name) and arrays (e.g. a spectral density) in
``arrays``. All quantities are those of the objective ``L`` that ``loss_fn`` computes on all of
``data`` (see docs/conventions.md):

==========================  =================================================================
``loss``                    ``L``
``grad_norm``               ``||grad L||`` (and per layer)
``trace_empirical_fisher``  ``Tr`` of the empirical Fisher, ``(1/N) sum_n ||g_n||^2`` under
                            ``"mean"`` (``g_n`` the mean-convention per-example gradient),
                            ``sum_n ||s_n||^2`` under ``"sum"`` (and per layer)
``noise_scale``             McCandlish's ``B_simple = tr(Sigma) / ||mean g||^2`` with
                            ``Sigma = (1/N) sum_n (g_n - mean)(g_n - mean)^T``; also
                            ``trace_covariance``
``trace_fisher``            ``Tr(F)`` of the Monte-Carlo Fisher, one label ``y_hat ~ p_theta``
                            per example (Jastrzębski et al.'s ``Tr(F)``; and per layer)
``trace_fisher_batch``      ``||grad L(x, y_hat)||^2``, their cheap proxy ``Tr(F^B)`` at ``B`` =
                            all the measured examples (``analyze``: all ``N`` of the data;
                            ``Diagnostics``: the step's batch); ``E = w Tr(F)``
``trace_hessian``           Hutchinson estimate of ``Tr(H)`` (and per layer if available)
``top_eigenvalues``         the 5 largest Hessian eigenvalues (Lanczos; not converging is a
                            failure, never a rough value)
``spectral_density``        the Hessian spectral density (stochastic Lanczos quadrature)
``fisher_norms``            ``||F||_F`` and ``||diag F||_F`` of the empirical Fisher
``noise_scale_dp``          under ``torch.distributed`` only: ``B_simple`` from the ranks' plain
                            gradients (McCandlish et al. 2018, appendix A; also
                            ``trace_covariance_dp``, ``grad_norm_sq_dp``); see
                            :mod:`curvlab.analysis._data_parallel`
``sharpness``               ``lambda_max(H)``, warm-started Lanczos (threshold with an SGD
                            ``optimizer``)
``noise_scale_hessian``     McCandlish's ``B_noise = tr(H Sigma) / (G^T H G)`` (random-sign
                            probes, with its standard error)
==========================  =================================================================

Two more need the training loop's optimizer (``Diagnostics(..., optimizer=opt)``):
``preconditioned_sharpness``, ``lambda_max(P^-1 H)`` with Adam's preconditioner, and
``critical_sharpness``, ``2 / eta_c`` along the optimizer's update by forward passes only; see
:mod:`curvlab.analysis._sharpness` and :mod:`curvlab.analysis._critical_sharpness`.

Each quantity is a registered function (:mod:`curvlab.analysis._registry`); the first five
come from one forward and two backward passes per chunk (data labels and sampled
labels) through the backend the registry picks (the hooks backend on most models, torch.func
where a model needs it), so they are cheap enough to run inside a training loop. The rest call curvlab's
estimators. Every measurement runs in the mode the model is in; callers switch to eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from curvlab._finite import NonFiniteError
from curvlab._losses import loss_spec
from curvlab._same_readings import ReadingsDifferError
from curvlab._scan import model_device
from curvlab.analysis import (  # noqa: F401 - they register
    _critical_sharpness,
    _estimator_measures,
    _first_order,
    _noise_scale_hessian,
    _sharpness,
)
from curvlab.analysis._registry import (
    MEASUREMENTS,
    Context,
    Measurement,
    PartlyMeasured,
    Registered,
)

__all__ = [
    "Measurement",
    "QUANTITIES",
    "DIAGNOSTICS_DEFAULT",
    "ANALYZE_DEFAULT",
    "check_quantities",
    "measure",
]

QUANTITIES: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "trace_empirical_fisher",
    "noise_scale",
    "trace_fisher",
    "trace_fisher_batch",
    "trace_hessian",
    "top_eigenvalues",
    "spectral_density",
    "fisher_norms",
    "noise_scale_dp",
    "sharpness",
    "noise_scale_hessian",
)
"""The built-in quantities, in the order they are measured (a quantity registered later with
:func:`~curvlab.analysis._registry.measurement` is accepted too, measured after these)."""
DIAGNOSTICS_DEFAULT: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "trace_fisher",
    "trace_empirical_fisher",
    "noise_scale",
)
ANALYZE_DEFAULT: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "trace_hessian",
    "trace_fisher",
    "trace_empirical_fisher",
    "top_eigenvalues",
    "spectral_density",
    "noise_scale",
    "fisher_norms",
)


def check_quantities(
    quantities: Iterable[str] | None,
    default: tuple[str, ...],
    unoffered: tuple[str, ...] = (),
) -> tuple[str, ...]:
    """Validate a list of quantity names (``None`` means ``default``).

    ``unoffered``: quantities the caller cannot measure (``analyze`` has no optimizer), left out
    of the "choose from" list of the error for an unknown name (the caller refuses them itself).
    """
    if quantities is None:
        return default
    if isinstance(quantities, str):
        quantities = (quantities,)
    names = tuple(quantities)
    offered = [q for q in _known() if q not in unoffered]
    unknown = [q for q in names if q not in _known()]
    if unknown:
        raise ValueError(f"unknown quantities {unknown}; choose from {offered}")
    if not names:
        raise ValueError(f"quantities is empty; choose from {offered}")
    return names


def _known() -> tuple[str, ...]:
    """Every registered quantity (also those registered after import)."""
    return tuple(n for r in MEASUREMENTS for n in r.names)


def _in_order() -> list[Registered]:
    """The registered measurements in the order of :data:`QUANTITIES`, later ones after."""
    rank = {n: i for i, n in enumerate(QUANTITIES)}
    return sorted(MEASUREMENTS, key=lambda r: min(rank.get(n, len(rank)) for n in r.names))


def measure(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    quantities: Iterable[str],
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 256,
    options: dict[str, Any] | None = None,
    on_error: str = "raise",
    optimizer: Any = None,
    state: dict[str, Any] | None = None,
) -> Measurement:
    """Compute the named quantities of ``L`` on ``data`` with the model in its current mode.

    Args:
        model, loss_fn, data: as everywhere in curvlab.
        quantities: names from :data:`QUANTITIES` (or registered later).
        seed: seed for the estimators; ``generator`` (or a fresh one from ``seed``) draws labels.
        chunk_size: examples processed at once by the first-order passes.
        options: estimator settings: ``num_probes`` (Tr(H)), ``k`` (eigenvalues),
            ``num_steps`` and ``num_probes_density`` (spectral density: Lanczos steps and
            probes); ``sharpness_tol``, ``critical_tol``, ``num_probes`` (``noise_scale_hessian``)
            and the others of :mod:`curvlab.analysis._sharpness`,
            :mod:`curvlab.analysis._critical_sharpness` and
            :mod:`curvlab.analysis._noise_scale_hessian`.
        on_error: ``"raise"``, or ``"skip"`` to record a failing quantity in ``errors`` and go on.
        optimizer: the training loop's optimizer, for the measurements that read it
            (thresholds, ``preconditioned_sharpness``, ``critical_sharpness``); never stepped.
        state: a dict the measurements keep between calls (warm starts); ``None``: a fresh one.

    Returns:
        A :class:`Measurement`.
    """
    names = check_quantities(quantities, ANALYZE_DEFAULT)
    spec = loss_spec(loss_fn)
    if generator is None:
        generator = torch.Generator(device=model_device(model))
        generator.manual_seed(seed)
    ctx = Context(model, loss_fn, spec, data, seed, generator, chunk_size, dict(options or {}))
    ctx.optimizer = optimizer
    ctx.state = {} if state is None else state
    out = Measurement()
    for registered in _in_order():
        wanted = tuple(q for q in names if q in registered.names)
        if not wanted:
            continue
        try:  # measurements that share a pass fail together
            registered.fn(ctx, wanted, out)
        except PartlyMeasured as part:  # some of the pass's quantities were measured
            if on_error == "raise" or isinstance(part.error, ReadingsDifferError):
                raise part.error from None
            out.errors[", ".join(part.failed)] = f"{type(part.error).__name__}: {part.error}"
        except Exception as exc:  # noqa: BLE001 - recorded and re-raised per on_error
            # data that reads otherwise each time fails every quantity alike: raised
            if on_error == "raise" or isinstance(exc, ReadingsDifferError):
                raise
            out.errors[", ".join(wanted)] = f"{type(exc).__name__}: {exc}"
    _drop_nan(out, on_error)
    return out


def _drop_nan(out: Measurement, on_error: str) -> None:
    """Never report a NaN as a measurement: it becomes an error (or raises under "raise")."""
    for name, value in list(out.values.items()):
        vals = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and math.isnan(v) for v in vals):
            why = (
                f"{name} came out NaN although the inputs and parameters are finite "
                "(an overflow in this dtype?)"
            )
            if on_error == "raise":
                raise NonFiniteError(why)
            del out.values[name]
            out.per_layer.pop(name, None)
            out.arrays.pop(name, None)  # its residuals: no measurement left (review s23)
            out.errors[name] = f"NonFiniteError: {why}"
