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
``trace_fisher_batch``      ``||grad L(x, y_hat)||^2``, their cheap proxy ``Tr(F^B)``
``trace_hessian``           Hutchinson estimate of ``Tr(H)`` (and per layer if available)
``top_eigenvalues``         the 5 largest Hessian eigenvalues (Lanczos)
``spectral_density``        the Hessian spectral density (stochastic Lanczos quadrature)
``fisher_norms``            ``||F||_F`` and ``||diag F||_F`` of the empirical Fisher
``noise_scale_dp``          under ``torch.distributed`` only: ``B_simple`` from the ranks' plain
                            gradients (McCandlish et al. 2018, appendix A; also
                            ``trace_covariance_dp``, ``grad_norm_sq_dp``); see
                            :mod:`curvlab.analysis.data_parallel`
==========================  =================================================================

The first five come from one forward and two backward passes per chunk (data labels and sampled
labels) through the backend the registry picks (the hooks backend on most models, torch.func
where a model needs it), so they are cheap enough to run inside a training loop. The rest call curvlab's
estimators. Every measurement runs in the mode the model is in; callers switch to eval mode.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.data import call_model, iter_chunks
from curvlab.distributed import active, rank_generator
from curvlab.finite import NonFiniteError
from curvlab.losses import LossSpec, loss_spec
from curvlab.notrace import leave_no_trace
from curvlab.quantities.sweep import Counter, replayable, with_backends
from curvlab.scan import model_device, scan_model

__all__ = [
    "Measurement",
    "QUANTITIES",
    "DIAGNOSTICS_DEFAULT",
    "ANALYZE_DEFAULT",
    "check_quantities",
    "measure",
]

_FIRST_ORDER = ("loss", "grad_norm", "trace_empirical_fisher", "noise_scale")
QUANTITIES: tuple[str, ...] = _FIRST_ORDER + (
    "trace_fisher",
    "trace_fisher_batch",
    "trace_hessian",
    "top_eigenvalues",
    "spectral_density",
    "fisher_norms",
    "noise_scale_dp",
)
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


@dataclass
class Measurement:
    """What one measurement produced (plain Python numbers, ready for JSON).

    Attributes:
        values: quantity name -> float (or list of floats for ``top_eigenvalues``).
        per_layer: quantity name -> {module name -> float}.
        arrays: e.g. ``{"spectral_density": {"grid": [...], "density": [...], ...}}``.
        errors: quantity name -> error message, for quantities that failed (``on_error="skip"``).
    """

    values: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    arrays: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def check_quantities(quantities: Iterable[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """Validate a list of quantity names (``None`` means ``default``)."""
    if quantities is None:
        return default
    if isinstance(quantities, str):
        quantities = (quantities,)
    names = tuple(quantities)
    unknown = [q for q in names if q not in QUANTITIES]
    if unknown:
        raise ValueError(f"unknown quantities {unknown}; choose from {list(QUANTITIES)}")
    if not names:
        raise ValueError(f"quantities is empty; choose from {list(QUANTITIES)}")
    return names


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _by_layer(per_param: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in per_param.items():
        out[_layer(name)] = out.get(_layer(name), 0.0) + value
    return out


def _first_order(
    model: nn.Module,
    spec: LossSpec,
    data: Any,
    names: tuple[str, ...],
    generator: torch.Generator,
    chunk_size: int | None,
    out: Measurement,
) -> None:
    """Data-label and sampled-label sums of squared per-example gradients, accumulated over chunks."""
    want_data = any(q in names for q in _FIRST_ORDER)
    want_mc = "trace_fisher" in names
    scan = scan_model(model)
    device = scan.device
    data = replayable(data)
    generator = rank_generator(generator)  # under torch.distributed: other labels per rank
    state = generator.get_state()

    def body(backend: Any) -> tuple:
        generator.set_state(state)  # a hand-over restarts with the same draws
        grad_sum: dict[str, Tensor] = {}
        sq_sum: dict[str, Tensor] = {}
        mc_sum: dict[str, Tensor] = {}
        nll = torch.zeros((), dtype=torch.float64, device=device)
        counter = Counter(spec)

        def add(total: dict[str, Tensor], values: dict[str, Tensor]) -> None:
            for n, v in values.items():
                total[n] = total[n] + v.detach() if n in total else v.detach()

        with (
            leave_no_trace(model, scan=scan),
            backend.extended(model, spec, second_order=False, scan=scan) as s,
        ):
            s.on_output = counter.on_output
            for inputs, targets in iter_chunks(data, chunk_size, device):
                if want_data and want_mc:  # one forward serves both backward passes
                    sgs, grad, mc, output = backend.sum_grad_squared_with_sampled(
                        s, inputs, targets, generator
                    )
                    add(mc_sum, mc)
                elif want_data:
                    sgs, grad, output = backend.sum_grad_squared(s, inputs, targets)
                else:
                    mc, _, output = backend.sum_grad_squared(
                        s, inputs, targets, mc_samples=1, generator=generator
                    )
                    add(mc_sum, mc)
                counter.add(inputs, targets)
                if want_data:
                    nll += spec.nll_sum(output.detach(), targets).double()
                    add(grad_sum, grad)
                    add(sq_sum, sgs)
            for p in s.params.values():
                p.grad = None
        return grad_sum, sq_sum, mc_sum, nll, counter

    grad_sum, sq_sum, mc_sum, nll, counter = with_backends("auto", scan, {"sum_grad_squared"}, body)
    comm = active()
    if comm is not None:  # all ranks' shards: one all-reduce of one flat buffer
        parts = {"g": grad_sum, "sq": sq_sum, "mc": mc_sum}
        flat = {(tag, k): v for tag, d in parts.items() for k, v in d.items()}
        dtype = next(iter(flat.values())).dtype if flat else nll.dtype
        sums, (counter.examples, counter.count) = comm.reduce_sums(
            {**flat, "nll": nll.to(dtype)}, [counter.examples, counter.count]
        )
        grad_sum, sq_sum, mc_sum = ({k: sums[(tag, k)] for k in parts[tag]} for tag in parts)
        nll = sums["nll"].double()
    n_total, c = counter.examples, counter.terms_per_example()
    w = spec.ggn_weight(n_total, c)
    if want_data:
        gnorm2 = {n: float(g.double().pow(2).sum()) * w * w for n, g in grad_sum.items()}
        sq = {n: float(v.double().sum()) for n, v in sq_sum.items()}
        # mean-convention statistics of g_n = grad NLL_n / c
        mean_sq = sum(sq.values()) / (n_total * c * c)
        mean_norm2 = (
            sum(float(g.double().pow(2).sum()) for g in grad_sum.values()) / (n_total * c) ** 2
        )
        trace_cov = max(mean_sq - mean_norm2, 0.0)
        emp_scale = spec.empirical_weight(n_total, c)
        if "loss" in names:
            out.values["loss"] = float(nll) * w
        if "grad_norm" in names:
            out.values["grad_norm"] = sum(gnorm2.values()) ** 0.5
            out.per_layer["grad_norm"] = {k: v**0.5 for k, v in _by_layer(gnorm2).items()}
        if "trace_empirical_fisher" in names:
            out.values["trace_empirical_fisher"] = sum(sq.values()) * emp_scale
            out.per_layer["trace_empirical_fisher"] = {
                k: v * emp_scale for k, v in _by_layer(sq).items()
            }
        if "noise_scale" in names:
            out.values["trace_covariance"] = trace_cov
            out.values["noise_scale"] = trace_cov / mean_norm2 if mean_norm2 > 0 else float("inf")
    if want_mc:
        mc = {n: float(v.double().sum()) * w for n, v in mc_sum.items()}
        out.values["trace_fisher"] = sum(mc.values())
        out.per_layer["trace_fisher"] = _by_layer(mc)


def _trace_fisher_batch(
    model: nn.Module, spec: LossSpec, data: Any, generator: torch.Generator, chunk_size: int | None
) -> float:
    """``||grad L(x, y_hat)||^2`` with one sampled label per example (Tr(F^B))."""
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    counter = Counter(spec)
    generator = rank_generator(generator)
    for inputs, targets in iter_chunks(data, chunk_size, device):
        output = spec.prepare(call_model(model, inputs), targets)
        counter.on_output(output, targets)
        counter.add(inputs, targets)
        sampled = spec.sample_targets(output, generator, targets)
        grads = torch.autograd.grad(spec.nll_sum(output, sampled), params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g)
    comm = active()
    if comm is not None:  # the gradient of all ranks' batch
        sums, (counter.examples, counter.count) = comm.reduce_sums(
            dict(enumerate(total)), [counter.examples, counter.count]
        )
        total = [sums[i] for i in range(len(total))]
    w = spec.ggn_weight(counter.examples, counter.terms_per_example())
    return float(sum(t.double().pow(2).sum() for t in total)) * w * w


def _public(name: str) -> Any:
    """A public curvlab function, looked up when needed (curvlab's estimators are optional here)."""
    for module in ("curvlab", "curvlab.estimators", "curvlab.quantities"):
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except ImportError:
            fn = None
        if fn is not None:
            return fn
    raise ImportError(f"curvlab.{name} is not available in this installation")


def _floats(x: Any) -> list[float]:
    if isinstance(x, Tensor):
        return [float(v) for v in x.detach().double().reshape(-1).cpu()]
    return [float(v) for v in x]


def _estimators(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    name: str,
    seed: int,
    options: dict[str, Any],
    out: Measurement,
) -> None:
    if name == "trace_hessian":
        res = _public("trace")(
            model,
            loss_fn,
            data,
            matrix="hessian",
            num_probes=options.get("num_probes", 30),
            seed=seed,
            by_layer=True,
            show_progress=False,
        )
        out.values["trace_hessian"] = float(res.value)
        stderr = getattr(res, "stderr", None)
        if stderr is not None:
            out.values["trace_hessian_stderr"] = float(stderr)
        by_layer = getattr(res, "by_layer", None)
        if by_layer:
            out.per_layer["trace_hessian"] = {k: float(v) for k, v in dict(by_layer).items()}
    elif name == "top_eigenvalues":
        res = _public("eigenvalues")(
            model,
            loss_fn,
            data,
            matrix="hessian",
            k=options.get("k", 5),
            seed=seed,
            show_progress=False,
        )
        out.values["top_eigenvalues"] = _floats(res.values)
        out.arrays["top_eigenvalues"] = {  # the Lanczos error bound of each value
            "residuals": _floats(res.residuals),
            "converged": [float(res.converged)],
        }
    elif name == "spectral_density":
        res = _public("spectral_density")(
            model,
            loss_fn,
            data,
            matrix="hessian",
            num_steps=options.get("num_steps", 60),
            num_probes=options.get("num_probes_density", 1),
            seed=seed,
            show_progress=False,
        )
        out.arrays["spectral_density"] = {
            "grid": _floats(res.grid),
            "density": _floats(res.density),
            "nodes": _floats(res.nodes),  # num_probes rows of num_steps, flattened
            "weights": _floats(res.weights),
            "num_probes": int(res.nodes.shape[0]),
        }
    elif name == "fisher_norms":
        res = _public("fisher_norms")(model, loss_fn, data, kind="empirical")
        out.values["fisher_frobenius"] = float(res.frobenius)
        out.values["fisher_diag_frobenius"] = float(res.diag_frobenius)


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
) -> Measurement:
    """Compute the named quantities of ``L`` on ``data`` with the model in its current mode.

    Args:
        model, loss_fn, data: as everywhere in curvlab.
        quantities: names from :data:`QUANTITIES`.
        seed: seed for the estimators; ``generator`` (or a fresh one from ``seed``) draws labels.
        chunk_size: examples processed at once by the first-order passes.
        options: estimator settings: ``num_probes`` (Tr(H)), ``k`` (eigenvalues),
            ``num_steps`` and ``num_probes_density`` (spectral density: Lanczos steps and
            probes).
        on_error: ``"raise"``, or ``"skip"`` to record a failing quantity in ``errors`` and go on.

    Returns:
        A :class:`Measurement`.
    """
    names = check_quantities(quantities, ANALYZE_DEFAULT)
    spec = loss_spec(loss_fn)
    options = dict(options or {})
    if generator is None:
        generator = torch.Generator(device=model_device(model))
        generator.manual_seed(seed)
    out = Measurement()

    def guarded(label: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - recorded and re-raised per on_error
            if on_error == "raise":
                raise
            out.errors[label] = f"{type(exc).__name__}: {exc}"

    first = [q for q in names if q in _FIRST_ORDER + ("trace_fisher",)]
    if first:  # one pass serves them all: a failure is theirs together
        guarded(
            ", ".join(first), _first_order, model, spec, data, names, generator, chunk_size, out
        )

    def fisher_batch() -> None:
        out.values["trace_fisher_batch"] = _trace_fisher_batch(
            model, spec, data, generator, chunk_size
        )

    if "trace_fisher_batch" in names:
        guarded("trace_fisher_batch", fisher_batch)
    for name in ("trace_hessian", "top_eigenvalues", "spectral_density", "fisher_norms"):
        if name in names:
            guarded(name, _estimators, model, loss_fn, data, name, seed, options, out)
    if "noise_scale_dp" in names:
        guarded("noise_scale_dp", _noise_scale_dp, model, loss_fn, data, chunk_size, out)
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
            out.errors[name] = f"NonFiniteError: {why}"


def _noise_scale_dp(
    model: nn.Module, loss_fn: nn.Module, data: Any, chunk_size: int | None, out: Measurement
) -> None:
    """McCandlish's B_simple from the ranks' plain gradients (:mod:`.data_parallel`)."""
    from curvlab.analysis.data_parallel import data_parallel_noise_scale

    est = data_parallel_noise_scale(model, loss_fn, data, chunk_size=chunk_size)
    out.values["noise_scale_dp"] = est.noise_scale
    out.values["trace_covariance_dp"] = est.trace_covariance
    out.values["grad_norm_sq_dp"] = est.grad_norm_sq
