"""The first-order measurements: one fused pass per chunk for the loss, the gradient, the
empirical and Monte-Carlo Fisher traces and the gradient noise scale; and ``Tr(F^B)``.

The fused pass runs through the engine's one loop (:func:`~curvlab.quantities._sweep.sweep`), so
in-loop measurements pay the backend choice once per model and batch shape.

The fused pass is what makes in-loop ``Diagnostics`` cheap: one forward and two backward passes
per chunk (data labels and sampled labels) through the backend the registry picks, instead of one
call of :func:`curvlab.gradient_stats` plus one of :func:`curvlab.diag_fisher`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import call_model, iter_batches, iter_chunks, to_device
from curvlab._differentiating_forward import DifferentiatingForwardError
from curvlab._layout import MixedExamplesError
from curvlab._losses import LossSpec, check_counted, no_terms_error
from curvlab._notrace import buffer_snapshot, each_forward_on, leave_no_trace
from curvlab._precision import accumulation_dtype, upcast
from curvlab._scan import model_device
from curvlab._selection import select_parameters
from curvlab._warn import warn_once
from curvlab.analysis._batch_gradient import gradient_sums
from curvlab.analysis._registry import (
    Context,
    Measurement,
    PartlyMeasured,
    by_layer,
    measurement,
)
from curvlab.distributed import active, rank_generator
from curvlab.quantities._gradients import UNDERFLOW, _affected, underflow_losses
from curvlab.quantities._sweep import Counter, SweepInfo, replayable, sweep

ONE_EXAMPLE = (
    "ValueError: the batch holds one example, whose gradient variance is 0 by definition, so the "
    "noise scale says nothing (a packed batch, one row of concatenated sequences, is one "
    "example); measure on a batch of several examples"
)
"""Why a noise scale is not given for one example (``noise_scale``, ``noise_scale_hessian``)."""

ZERO_GRADIENTS = (
    "ValueError: every example's gradient is 0 (the model fits this batch exactly, or the loss "
    "does not depend on the parameters): tr(Sigma) = ||mean g||^2 = 0, so the noise scale "
    "tr(Sigma) / ||mean g||^2 is 0/0, undefined (trace_covariance, 0, is given); measure on a "
    "batch the model does not fit exactly"
)
"""Why ``noise_scale`` is not given when every per-example gradient is 0 (until review s17 it
was inf, as if the noise dominated; a NaN would have read as an overflow)."""

NON_FINITE_GRADIENTS = (
    "FloatingPointError: the per-example gradients are not finite (inf or NaN: the loss or the "
    "model's output is, or a gradient overflowed), so tr(Sigma) and ||mean g||^2 and the noise "
    "scale tr(Sigma) / ||mean g||^2 are undefined; check the loss and the model's output on this "
    "batch (torch.autograd.set_detect_anomaly names the operation)"
)
"""Why ``noise_scale`` is not given when the gradients are not finite (found in review: NaN
gradients fell through both ``> 0`` tests and were blamed on "every example's gradient is 0")."""


SQUARES_UNDERFLOWED = f"FloatingPointError: {UNDERFLOW}"
"""Why ``noise_scale`` (and ``trace_covariance``) is not given where the squared per-example
gradients underflowed (:func:`~curvlab.quantities._gradients.squares_underflowed`)."""


FIRST_ORDER = ("loss", "grad_norm", "trace_empirical_fisher", "noise_scale", "trace_fisher")


@measurement(*FIRST_ORDER)
def first_order(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """The requested first-order quantities, all from one pass over the chunks.

    On a model that mixes the examples of a batch, or whose forward pass differentiates (a
    physics-informed network: :mod:`curvlab._differentiating_forward`; review s25), which the
    per-example pass refuses, ``loss`` and ``grad_norm``, which are the whole batch's, come
    from a plain pass over each batch and the others fail
    (:class:`~curvlab.analysis._registry.PartlyMeasured`; found in review: the loss curve of
    such a model was lost with them). Not under ``torch.distributed``, whose ranks' sums the
    per-example pass would have made.
    """
    try:
        _first_order(ctx.model, ctx.spec, ctx.data, names, ctx.generator, ctx.chunk_size, out)
    except (MixedExamplesError, DifferentiatingForwardError) as exc:
        whole = tuple(q for q in ("loss", "grad_norm") if q in names)
        if not whole or active() is not None:
            raise
        _whole_batches(ctx, whole, out)
        rest = tuple(q for q in names if q not in whole)
        if rest:
            raise PartlyMeasured(rest, exc) from exc


def _whole_batches(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``loss`` and ``grad_norm`` of the objective on the data, each batch as a whole (never
    chunked: the examples of a model that mixes them are not to be split)."""
    model, spec = ctx.model, ctx.spec
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with (
        leave_no_trace(model),
        each_forward_on(model, buffer_snapshot(model.modules())),
    ):
        device = model_device(model)
        batches = (to_device(b, device) for b in iter_batches(replayable(ctx.data)))
        sums = gradient_sums(spec, batches, list(named.values()), lambda x: call_model(model, x))
    check_counted(spec, float(sums.count))  # every label ignored: the mean's clear error
    w = 1.0 if spec.reduction == "sum" else 1.0 / float(sums.count)
    total, nll = sums.grads, sums.nll
    if "loss" in names:
        out.values["loss"] = float(nll) * w
    if "grad_norm" in names:  # per layer too, as the per-example pass writes it
        gnorm2 = {
            n: float(g.double().pow(2).sum()) * w * w for n, g in zip(named, total) if g is not None
        }
        out.values["grad_norm"] = sum(gnorm2.values()) ** 0.5
        out.per_layer["grad_norm"] = {k: v**0.5 for k, v in by_layer(gnorm2).items()}


@measurement("trace_fisher_batch")
def trace_fisher_batch(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``||grad L(x, y_hat)||^2`` with one sampled label per example (Tr(F^B)), ``B`` every
    example of ``ctx.data``: all ``N`` of ``analyze``'s data (its batches summed into one
    gradient), the step's batch of a ``Diagnostics``. Its expectation is ``w Tr(F)`` (``w`` the
    loss's weight, 1/M under "mean", 1 under "sum"): the cross terms vanish, ``E[s_n(y_hat)] =
    0``. ``cl.fisher_trace(...).batch_value`` is the mean over the data's batches instead."""
    out.values["trace_fisher_batch"] = _trace_fisher_batch(
        ctx.model, ctx.spec, ctx.data, ctx.generator, ctx.chunk_size
    )


def _first_order(
    model: nn.Module,
    spec: LossSpec,
    data: Any,
    names: tuple[str, ...],
    generator: torch.Generator,
    chunk_size: int | None,
    out: Measurement,
) -> None:
    """Data-label and sampled-label sums of squared per-example gradients, through the engine's
    one loop (:func:`~curvlab.quantities._sweep.sweep`: chunks, counts, the cross-rank sum)."""
    want_data = any(q in names for q in FIRST_ORDER[:4])
    want_mc = "trace_fisher" in names
    generator = rank_generator(generator)  # under torch.distributed: other labels per rank

    def fn(backend: Any, s: Any, inputs: Any, targets: Tensor) -> dict[Any, Tensor]:
        sgs: dict[str, Tensor] = {}
        grad: dict[str, Tensor] = {}
        mc: dict[str, Tensor] = {}
        if want_data and want_mc:  # one forward serves both backward passes
            sgs, grad, mc, output = backend.sum_grad_squared_with_sampled(
                s, inputs, targets, generator
            )
        elif want_data:
            sgs, grad, output = backend.sum_grad_squared(s, inputs, targets)
        else:
            mc, _, output = backend.sum_grad_squared(
                s, inputs, targets, mc_samples=1, generator=generator
            )
        values: dict[Any, Tensor] = {("mc", k): v for k, v in mc.items()}
        if want_data:
            values.update({("g", k): v for k, v in grad.items()})
            values.update({("sq", k): v for k, v in sgs.items()})
            # a 16-bit model's logits are upcast: the loss summed in float32, not bfloat16
            values["nll"] = spec.nll_sum(upcast(output.detach()), targets).double()
        return values

    raw, info = sweep(
        model,
        spec.loss_fn,
        replayable(data),
        fn,
        needs={"sum_grad_squared"},
        chunk_size=chunk_size,
        generator=generator,
    )
    parts: dict[str, dict[str, Tensor]] = {"g": {}, "sq": {}, "mc": {}}
    for key, value in raw.items():
        if isinstance(key, tuple):
            parts[key[0]][key[1]] = value
    nll = raw.get("nll", torch.zeros((), dtype=torch.float64))
    none_counted = info.loss_terms == 0  # every label ignored under "sum" ("mean" raised)
    _write_values(spec, names, parts["g"], parts["sq"], parts["mc"], nll, info, out, none_counted)


def _write_values(
    spec: LossSpec,
    names: tuple[str, ...],
    grad_sum: dict[str, Tensor],
    sq_sum: dict[str, Tensor],
    mc_sum: dict[str, Tensor],
    nll: Tensor,
    info: SweepInfo,
    out: Measurement,
    none_counted: bool = False,
) -> None:
    """The requested quantities from the raw sums of all the data, scaled once.

    ``none_counted``: every label was ignored (under ``"sum"``, whose loss, gradient and Fisher
    traces are then 0, rightly): ``noise_scale`` fails alone (:func:`~curvlab._losses.no_terms_error`).
    ``noise_scale`` is inf where ``||mean g||^2 = 0 < tr(Sigma)`` and not given where both are 0
    (:data:`ZERO_GRADIENTS` in ``errors``, ``trace_covariance`` 0 in the values), where the
    gradients are not finite (:data:`NON_FINITE_GRADIENTS`, no ``trace_covariance``), or where
    the squared per-example gradients underflowed and carry more than 1% of ``tr(Sigma)``
    (:data:`SQUARES_UNDERFLOWED`, no ``trace_covariance``: it read 0, the noise scale 0.0).

    Raises:
        PartlyMeasured: ``noise_scale`` with ``none_counted``, after the others are written.
    """
    want_data = any(q in names for q in FIRST_ORDER[:4])
    want_mc = "trace_fisher" in names
    n_total, c = info.num_examples, info.terms
    w = spec.ggn_weight(n_total, c)
    if want_data:
        # per parameter ||sum g||^2, sum g^2 and the squares' share lost to underflow, in float64
        # (0-dim), read in one host synchronisation
        keys = list(dict.fromkeys([*grad_sum, *sq_sum]))
        table = dict(zip(keys, _sums_table(grad_sum, sq_sum, keys, n_total)))
        g2_raw = {n: table[n][0] for n in grad_sum}
        gnorm2 = {n: v * w * w for n, v in g2_raw.items()}
        sq = {n: table[n][1] for n in sq_sum}
        # mean-convention statistics of g_n = grad NLL_n / c
        mean_sq = sum(sq.values()) / (n_total * c * c)
        mean_norm2 = sum(g2_raw.values()) / (n_total * c) ** 2
        lost = sum(r[2] for r in table.values()) / (n_total * c * c)
        trace_cov = max(mean_sq - mean_norm2, 0.0)
        emp_scale = spec.empirical_weight(n_total, c)
        if "loss" in names:
            out.values["loss"] = float(nll) * w
        if "grad_norm" in names:
            out.values["grad_norm"] = sum(gnorm2.values()) ** 0.5
            out.per_layer["grad_norm"] = {k: v**0.5 for k, v in by_layer(gnorm2).items()}
        if "trace_empirical_fisher" in names:
            out.values["trace_empirical_fisher"] = sum(sq.values()) * emp_scale
            out.per_layer["trace_empirical_fisher"] = {
                k: v * emp_scale for k, v in by_layer(sq).items()
            }
        if "noise_scale" in names and n_total < 2:  # one example's variance is 0 by definition
            out.errors["noise_scale"] = ONE_EXAMPLE
        elif (
            "noise_scale" in names
            and not none_counted
            and not (math.isfinite(mean_sq) and math.isfinite(mean_norm2))
        ):  # checked first: NaN fails every comparison below and read as 0/0
            out.errors["noise_scale"] = NON_FINITE_GRADIENTS
        elif "noise_scale" in names and not none_counted and _affected(lost, trace_cov):
            # the squares underflowed while the gradients did not: tr(Sigma) read 0 and the
            # noise scale 0.0 for a true 6.72 (a float32 classifier at logit margins ~57,
            # found in review s22)
            out.errors["noise_scale"] = SQUARES_UNDERFLOWED
        elif "noise_scale" in names and not none_counted:  # else raised below, once the
            # other quantities are written
            out.values["trace_covariance"] = trace_cov
            if mean_norm2 > 0:
                out.values["noise_scale"] = trace_cov / mean_norm2
            elif trace_cov > 0:  # noise without signal
                out.values["noise_scale"] = float("inf")
            else:  # 0 / 0: neither (cl.gradient_stats gives NaN)
                out.errors["noise_scale"] = ZERO_GRADIENTS
            _warn_cancellation(mean_sq, trace_cov, [*sq_sum.values(), *grad_sum.values()])
    if want_mc:
        mc = {n: float(v.double().sum()) * w for n, v in mc_sum.items()}
        out.values["trace_fisher"] = sum(mc.values())
        out.per_layer["trace_fisher"] = by_layer(mc)
    if want_data and "noise_scale" in names and n_total >= 2 and none_counted:
        raise PartlyMeasured(("noise_scale",), no_terms_error(spec, "the noise scale's"))


def _sums_table(
    grad_sum: dict[str, Tensor], sq_sum: dict[str, Tensor], keys: list[str], rows: int
) -> list[list[float]]:
    """Per parameter of ``keys``: ``||sum_n g_n||^2``, ``sum_n ||g_n||^2`` and the part of the
    latter underflow may have lost (:func:`~curvlab.quantities._gradients.squares_underflowed`),
    in float64 (0 where a sum is missing), read in two host synchronisations (one per parameter
    and sum before review s22): the underflow check's candidates (:func:`~curvlab.quantities.
    _gradients.underflow_losses`), then the table."""
    if not keys:
        return []
    f64 = torch.float64
    device = (grad_sum.get(keys[0], sq_sum.get(keys[0]))).device
    zero = torch.zeros((), dtype=f64, device=device)
    lost = underflow_losses(
        {
            n: (sq_sum[n], grad_sum[n], sq_sum[n].dtype)
            for n in keys
            if grad_sum.get(n) is not None and sq_sum.get(n) is not None
        },
        rows,
    )
    out = []
    for n in keys:
        g, v = grad_sum.get(n), sq_sum.get(n)
        parts = [
            torch.linalg.vector_norm(g, dtype=f64).square() if g is not None else zero,
            v.sum(dtype=f64) if v is not None else zero,
            lost.get(n, zero),
        ]
        out.append(torch.stack([t.to(device) for t in parts]))
    return torch.stack(out).tolist()


_CANCELLATION = 0.01
"""The share of ``tr(Σ)`` its rounding bound may reach before ``noise_scale`` warns (as
:func:`curvlab.gradient_stats` does)."""
CANCELLATION_WARNING = (
    "curvlab noise_scale: tr(Sigma) = E||g_n||^2 - ||mean g||^2 cancels where the mean gradient "
    "dwarfs its spread: the rounding bound eps * E||g_n||^2 of the sums' dtype exceeds 1% of "
    "trace_covariance, so trace_covariance and noise_scale may be off by more than 1% (too low "
    "or rounded to 0). Measure a float64 copy of the model and data (cl.gradient_stats names the "
    "parameters affected), or make the examples' gradients less alike (centre regression "
    "targets, normalise the inputs)"
)
"""The text of that warning: constant (no per-step numbers), so that it is shown once per place
in a training loop (:func:`curvlab._warn.warn_once`: Python's own registry is emptied by every
``catch_warnings()`` entry, and it came back at every step after a BackPACK pass, review s24)."""
CANCELLATION_WARNING_FLOAT64 = (
    "curvlab noise_scale: tr(Sigma) = E||g_n||^2 - ||mean g||^2 cancels where the mean gradient "
    "dwarfs its spread: the rounding bound eps * E||g_n||^2 of float64 sums exceeds 1% of "
    "trace_covariance: the spread of the examples' gradients is at float64 rounding level, and "
    "trace_covariance and noise_scale are good only to within that bound (possibly 0). The sums "
    "are float64 already, so no float64 copy helps (cl.gradient_stats names the parameters "
    "affected)"
)
"""That warning where every sum is float64 (until review s17 it advised a float64 copy there
too)."""


def _warn_cancellation(mean_sq: float, trace_cov: float, sums: list[Tensor]) -> None:
    """Warn when ``tr(Σ) = E‖g_n‖² − ‖ḡ‖²`` may have lost more than 1% to rounding.

    The subtraction's error is about ``eps · E‖g_n‖²`` with ``eps`` that of the coarsest of the
    gradient and squared-gradient ``sums`` (float32 for a float32 or 16-bit model), the bound
    :func:`curvlab.gradient_stats` warns with; it was not checked here, and a float32 linear
    regression on inputs near 1 reported a noise scale 14% low without a word (found in
    review). Where every sum is float64 the warning says the spread is at rounding level
    (:data:`CANCELLATION_WARNING_FLOAT64`) instead of advising a float64 copy. ``mean_sq`` and
    ``trace_cov`` are Python floats already on the host and a tensor's ``dtype`` is metadata:
    no synchronisation.
    """
    if not sums:
        return
    eps = max(torch.finfo(v.dtype).eps for v in sums)
    if eps * mean_sq > _CANCELLATION * trace_cov:
        f64 = eps == torch.finfo(torch.float64).eps
        text = CANCELLATION_WARNING_FLOAT64 if f64 else CANCELLATION_WARNING
        warn_once(text, RuntimeWarning)  # once per line, whatever catch_warnings came between


def _trace_fisher_batch(
    model: nn.Module, spec: LossSpec, data: Any, generator: torch.Generator, chunk_size: int | None
) -> float:
    """``||grad L(x, y_hat)||^2`` with one sampled label per example (Tr(F^B)).

    The gradient is summed over chunks (and ranks) in the accumulation dtype: float32 for a
    16-bit model (in bfloat16 the running sum lost its low digits, 0.5% at 128 chunks). Every
    chunk's forward pass starts from the buffers as the measurement found them, small integer
    ones included (:func:`~curvlab._notrace.each_forward_on`): a forward that counts its calls
    ran on from chunk to chunk and left the user's counter moved, which shifted every later
    measurement of the step (``sharpness`` 1.0908 for a true 0.9789, found in review s17).

    Raises:
        ValueError: for a model without trainable parameters, before any forward pass, as
            every other quantity says it (torch's "``inputs`` argument to ``grad()`` cannot
            be empty" came after the forward passes, found in review s18).
    """
    select_parameters(model)  # raises for a model with nothing trainable
    snapshot = buffer_snapshot(model.modules())  # empty: no buffers
    with each_forward_on(model, snapshot):
        return _sampled_gradient_norm(model, spec, data, generator, chunk_size)


def _sampled_gradient_norm(
    model: nn.Module, spec: LossSpec, data: Any, generator: torch.Generator, chunk_size: int | None
) -> float:
    """:func:`_trace_fisher_batch` on the model's buffers as they are."""
    device = model_device(model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    total = [
        torch.zeros_like(
            p, dtype=accumulation_dtype(p.dtype), memory_format=torch.contiguous_format
        )
        for p in params
    ]
    counter = Counter(spec)
    generator = rank_generator(generator)
    for inputs, targets in iter_chunks(data, chunk_size, device):
        output = spec.prepare(call_model(model, inputs), targets)
        counter.on_output(output, targets)
        counter.add(inputs, targets)
        sampled = spec.sample_targets(output, generator, targets)
        loss = spec.nll_sum(output, sampled, drawn=True)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g)
    comm = active()
    if comm is not None:  # the gradient of all ranks' batch
        sums = counter.reduce(comm, dict(enumerate(total)))  # invalid labels: every rank raises
        total = [sums[i] for i in range(len(total))]
    w = spec.ggn_weight(counter.examples, counter.terms_per_example())
    return float(sum(t.double().pow(2).sum() for t in total)) * w * w
