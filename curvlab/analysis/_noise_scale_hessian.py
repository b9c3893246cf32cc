"""The in-loop measurement of the Hessian-weighted gradient noise scale.

``"noise_scale_hessian"``
    McCandlish et al.'s (2018) ``B_noise = tr(HΣ)/(GᵀHG)``, ``Σ = (1/N) Σ_n (g_n − G)(g_n − G)ᵀ``
    the covariance of the mean-convention per-example gradients ``g_n`` and ``G`` their mean,
    ``H`` the Hessian of the mean loss (the ratio does not depend on the reduction). ``tr(HΣ)`` is
    estimated without per-example Hessian products: with independent random signs ``s_n``,
    ``u = N^-1/2 (Σ_n s_n g_n − (Σ_n s_n) G)`` has ``E[u uᵀ] = Σ``, so ``uᵀHu`` is an unbiased
    probe of ``tr(HΣ)`` costing one backward pass (of ``Σ_n s_n ℓ_n``) and one Hessian product;
    ``num_probes`` of them (default 10), their standard error over probes, and ``GᵀHG`` exactly
    (one product). Where the data holds no more examples than that (``N <= num_probes``, all
    batches together) ``tr(HΣ) = (1/N) Σ_n (g_n − G)ᵀ H (g_n − G)`` is computed exactly instead,
    from ``N`` backward passes and ``N`` Hessian products (no more than the probes cost), and its
    standard error is 0: no sampling error (with ``N = 2`` the probes take two values only, and
    all of them drew the same one, a standard error of 0 for a random value, in 3 seeds of 1000
    at 10 probes and 225 of 400 at 2 probes before review s21). Also ``trace_hessian_covariance``
    (``tr(HΣ)``) with its standard error ``trace_hessian_covariance_stderr`` (that of the probes'
    mean; 0 when exact), ``grad_hessian_grad`` (``GᵀHG``, exact), both with the Hessian of the
    mean loss, and ``noise_scale_hessian_hvps``, the Hessian products made (``num_probes + 1``,
    or ``N + 1`` when exact).

    ``g_n`` is example ``n``'s own gradient: a model that mixes the examples of a batch (feature
    centering ``z - z.mean(0)``, a functional ``batch_norm(training=True)``) is refused with
    :class:`~curvlab._layout.MixedExamplesError` before any backward pass, as ``noise_scale`` is
    (the gradient of ``ℓ_n`` through the batch was taken for ``g_n`` before review s24: 5.8298
    with a standard error of 0 where each example alone gives 7.2323). A forward that draws
    random numbers (MC dropout, an input noise) has one draw per batch: every pass of batch ``i``
    (the operator's, and those of ``g_n`` and ``G``) runs from the operator's seed of that batch,
    so ``g_n``, ``G`` and ``H`` are those of one function (before review s24 each pass of ``g_n``
    drew afresh, and ``H`` was another draw's). They are of one reading of the data too: the
    operator is built on the batches read for ``g_n`` (before review s25 it read the data again,
    and an augmentation drawing outside the states a reading keeps gave ``G`` of one reading and
    ``H`` of another: ``GᵀHG`` 0.2406 where one reading gives 0.1460).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab._data import call_model, num_examples, to_device
from curvlab._losses import no_terms_error
from curvlab._notrace import buffer_snapshot, on_buffers
from curvlab._precision import upcast
from curvlab._rng import global_rng_kept, seed_global
from curvlab._scan import model_device, scan_model
from curvlab.analysis._first_order import ONE_EXAMPLE
from curvlab.analysis._registry import Context, Measurement, measurement
from curvlab.analysis._sharpness import device_batches, refuse_distributed
from curvlab.distributed import unwrap_model
from curvlab.estimators._protocol import values_checked_once
from curvlab.operators import curvature_operator
from curvlab.quantities._sweep import examples_apart

__all__ = ["NOISE_PROBES"]

NOISE_PROBES = 10
"""Default probes of ``noise_scale_hessian`` (option ``num_probes``)."""


ZERO_GRADIENTS_HESSIAN = (
    "ValueError: every example's gradient is 0 (the model fits this batch exactly, or the loss "
    "does not depend on the parameters): tr(H Sigma) = G^T H G = 0, so B_noise is 0/0, "
    "undefined (trace_hessian_covariance and grad_hessian_grad, 0, are given); measure on a "
    "batch the model does not fit exactly"
)
"""Why ``noise_scale_hessian`` is not given when every per-example gradient is 0 (until review
s17 it was inf, as if the noise dominated; ``noise_scale`` likewise, :data:`ZERO_GRADIENTS`)."""


@measurement("noise_scale_hessian")
def noise_scale_hessian(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``B_noise = tr(HΣ)/(GᵀHG)`` with random-sign probes of ``tr(HΣ)`` and its standard error,
    or ``tr(HΣ)`` exactly (standard error 0) where ``N <= num_probes``.

    Every forward pass (the per-example losses of each batch and probe, and the operator's own)
    runs on copies of the buffers as the operator was built on them, small integer ones (a call
    counter) included; the user's buffers are left as they were.

    Raises:
        ValueError: for ``num_probes < 2``, and for data whose every label is ``ignore_index``
            (under ``"sum"`` here, before any Hessian product; under ``"mean"`` the operator
            refuses it).
        MixedExamplesError: before the operator is built, for a model that mixes the examples
            of the first batch (``g_n`` undefined; :func:`~curvlab.quantities._sweep.examples_apart`,
            the check of the per-example quantities).
    """
    refuse_distributed("noise_scale_hessian")
    probes = int(ctx.options.get("num_probes", NOISE_PROBES))
    if probes < 2:
        raise ValueError(
            f"noise_scale_hessian needs num_probes >= 2 (a standard error), got {probes}"
        )
    model = unwrap_model(ctx.model)
    # g_n is example n's own gradient: a model that mixes the examples (feature centering, a
    # functional batch_norm(training=True)) is refused as noise_scale is, before any backward
    # pass; the gradient of l_n through the batch was taken for it (5.8298 with a standard
    # error of 0, each example alone 7.2323, in the same record that refused noise_scale;
    # review s24). The first batch, as the per-example quantities check their first chunk
    batches = device_batches(ctx, model_device(model))
    if batches:  # every pass of the check from the buffers as found (a call counter's too)
        found = buffer_snapshot(model.modules())
        examples_apart(model, scan_model(model), None, batches[0][0], found, ctx.data)
    # H of the batches g_n and G are taken from: the data is read once. The operator read it
    # again, and a loader whose augmentation draws outside what a reading keeps gave G of one
    # reading and H of another (G^T H G 0.2406, where one reading gives 0.1460, and a standard
    # error of 0; review s25)
    op = curvature_operator(model, ctx.loss_fn, batches, matrix="hessian", seed=ctx.seed)
    params = dict(zip(op.names, (dict(model.named_parameters())[n] for n in op.names)))
    device = op.device
    if device != model_device(model):
        batches = [to_device(b, device) for b in batches]
    spec = ctx.spec
    n_total = sum(num_examples(b[0]) for b in batches)
    terms = op.terms_per_example  # c = M/N: g_n = grad NLL_n / c (the mean convention)
    if terms == 0:  # (under "mean" the operator refused it itself, as the mean loss is 0/0)
        raise no_terms_error(spec, "noise_scale_hessian's")
    keep = len(batches) == 1
    cached: list[Tensor] = []

    def per_example(i: int) -> Tensor:
        """``NLL_n`` of batch ``i`` with its graph (kept when there is one batch)."""
        if cached and keep:
            return cached[0]
        inputs, targets = batches[i]
        # on copies of the buffers the operator was built on (small integer ones included), as
        # every forward pass of its own: a forward that counts its calls ran on over the batches
        # and probes (G^T H G 0.09488 for a true 0.09428 on two batches, and the user's counter
        # left at 62; found in review s17)
        # and from the seed of the operator's passes of this batch: a forward that draws (MC
        # dropout, an input noise) draws what the operator's drew, so g_n, G and H are of one
        # function (each pass drew afresh, another draw than H's; review s24)
        with on_buffers(op._buffers_built), global_rng_kept(device):
            seed_global(device, op._seeds[i])
            output = spec.prepare(call_model(model, inputs), targets)
        # this forward is curvlab's own: what it rewrites in place (an Embedding(max_norm=...)
        # renormalising its rows) is not a change of the user's for the operator (found in
        # review: the measurement was refused on such models)
        op._state.record()
        nll = spec.per_example_nll(output, targets)
        if keep:
            cached.append(nll)
        return nll

    plist = list(params.values())

    def weighted_grad(weights: list[Tensor | None]) -> Tensor:
        """``Σ_n weight_n ∇NLL_n`` over all batches, flat in the operator's layout (a batch
        whose weights are ``None`` is left out: no forward or backward pass of it), summed in
        the accumulation dtype (float32 for 16-bit parameters): a running bfloat16 sum of
        aligned batches rounds each term away once it is 256 times one batch's (300 batches of
        a bfloat16 model: ``GᵀHG`` 0.64157 for 0.55773 before review s25). ``G``, ``g_n − G``
        and the probes ``u`` follow in that dtype; the operator's products accept it."""
        acc: Tensor | None = None
        for i, wts in enumerate(weights):
            if wts is None:
                continue
            nll = per_example(i)
            grads = torch.autograd.grad(
                nll, plist, wts.to(nll.dtype), retain_graph=keep, allow_unused=True
            )
            flat = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(plist, grads)
                ]
            )
            acc = upcast(flat) if acc is None else acc.add_(flat)  # 16-bit: a float32 sum
        assert acc is not None
        return acc

    sizes = [num_examples(b[0]) for b in batches]
    if n_total < 2:  # one example's gradient covariance is 0 by definition
        out.errors["noise_scale_hessian"] = ONE_EXAMPLE
        return
    ones = [torch.ones(n, device=device) for n in sizes]
    mean = weighted_grad(ones).div_(n_total * terms)  # G = (1/N) Σ g_n
    gen = ctx.generator
    # N <= num_probes: tr(HΣ) = (1/N) Σ_n (g_n − G)ᵀ H (g_n − G) exactly, from N backward passes
    # and N products, no more than the probes'. (With 2 examples every probe is ±(g_1 − g_2)/√2
    # or 0, so u^T H u takes two values: 3 seeds in 1000 at 10 probes drew one of them only and
    # reported a random value with a standard error of 0, 225 in 400 at 2 probes; review s21.)
    exact = n_total <= probes
    # no code of the user's between the products: the model's values (.data) compared twice
    with values_checked_once(op, "noise_scale_hessian"):
        values = []
        for i, n in enumerate(sizes if exact else ()):
            for j in range(n):
                pick: list[Tensor | None] = [None] * len(sizes)
                pick[i] = torch.zeros(n, device=device)
                pick[i][j] = 1.0
                d = weighted_grad(pick).div_(terms).sub_(mean)  # g_n − G
                values.append(float(torch.dot(d.double(), op.matvec(d).double())))
                del d
        for _ in range(0 if exact else probes):
            signs = [
                torch.randint(0, 2, (n,), generator=gen, device=gen.device).to(device) * 2.0 - 1.0
                for n in sizes
            ]
            total_sign = float(sum(s.sum() for s in signs))
            u = (
                weighted_grad(signs)
                .div_(terms)
                .sub_(mean, alpha=total_sign)
                .div_(math.sqrt(n_total))
            )
            values.append(float(torch.dot(u.double(), op.matvec(u).double())))
            del u
        ghg = float(torch.dot(mean.double(), op.matvec(mean).double()))
    # op is the Hessian of L (scale w); that of the mean loss is op / (w M)
    to_mean = 1.0 / (op.weight * n_total * terms)
    q = torch.tensor(values, dtype=torch.float64)
    trace = float(q.mean())
    stderr = 0.0 if exact else float(q.std() / math.sqrt(probes))  # exact: no sampling error
    if ghg == 0 and trace == 0 and stderr == 0:  # every example's gradient is 0: 0/0
        out.errors["noise_scale_hessian"] = ZERO_GRADIENTS_HESSIAN
    else:
        out.values["noise_scale_hessian"] = trace / ghg if ghg != 0 else math.inf
        out.values["noise_scale_hessian_stderr"] = stderr / abs(ghg) if ghg != 0 else math.inf
    out.values["noise_scale_hessian_hvps"] = len(values) + 1
    out.values["trace_hessian_covariance"] = trace * to_mean
    out.values["trace_hessian_covariance_stderr"] = stderr * to_mean  # was computed, not stored
    out.values["grad_hessian_grad"] = ghg * to_mean
