"""The first-order measurements: one fused pass per chunk for the loss, the gradient, the
empirical and Monte-Carlo Fisher traces and the gradient noise scale; and ``Tr(F^B)``.

The fused pass is what makes in-loop ``Diagnostics`` cheap: one forward and two backward passes
per chunk (data labels and sampled labels) through the backend the registry picks, instead of one
call of :func:`curvlab.gradient_stats` plus one of :func:`curvlab.diag_fisher`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import call_model, iter_chunks
from curvlab._losses import LossSpec
from curvlab._notrace import leave_no_trace
from curvlab._scan import model_device, scan_model
from curvlab.analysis._registry import Context, Measurement, by_layer, measurement
from curvlab.distributed import active, rank_generator
from curvlab.quantities._sweep import Counter, replayable, with_backends

FIRST_ORDER = ("loss", "grad_norm", "trace_empirical_fisher", "noise_scale", "trace_fisher")


@measurement(*FIRST_ORDER)
def first_order(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """The requested first-order quantities, all from one pass over the chunks."""
    _first_order(ctx.model, ctx.spec, ctx.data, names, ctx.generator, ctx.chunk_size, out)


@measurement("trace_fisher_batch")
def trace_fisher_batch(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``||grad L(x, y_hat)||^2`` with one sampled label per example (Tr(F^B))."""
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
    """Data-label and sampled-label sums of squared per-example gradients, accumulated over chunks."""
    want_data = any(q in names for q in FIRST_ORDER[:4])
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
    _write_values(spec, names, grad_sum, sq_sum, mc_sum, nll, counter, out)


def _write_values(
    spec: LossSpec,
    names: tuple[str, ...],
    grad_sum: dict[str, Tensor],
    sq_sum: dict[str, Tensor],
    mc_sum: dict[str, Tensor],
    nll: Tensor,
    counter: Counter,
    out: Measurement,
) -> None:
    """The requested quantities from the raw sums of all the data, scaled once."""
    want_data = any(q in names for q in FIRST_ORDER[:4])
    want_mc = "trace_fisher" in names
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
            out.per_layer["grad_norm"] = {k: v**0.5 for k, v in by_layer(gnorm2).items()}
        if "trace_empirical_fisher" in names:
            out.values["trace_empirical_fisher"] = sum(sq.values()) * emp_scale
            out.per_layer["trace_empirical_fisher"] = {
                k: v * emp_scale for k, v in by_layer(sq).items()
            }
        if "noise_scale" in names:
            out.values["trace_covariance"] = trace_cov
            out.values["noise_scale"] = trace_cov / mean_norm2 if mean_norm2 > 0 else float("inf")
    if want_mc:
        mc = {n: float(v.double().sum()) * w for n, v in mc_sum.items()}
        out.values["trace_fisher"] = sum(mc.values())
        out.per_layer["trace_fisher"] = by_layer(mc)


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
        loss = spec.nll_sum(output, sampled, drawn=True)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
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
