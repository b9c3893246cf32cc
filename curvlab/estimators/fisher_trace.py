"""Exact traces from per-example gradients: Tr(F) of Jastrzębski et al., Tr(F^B), Tr(GGN), Tr(EF).

For the objective ``L = w * sum_n NLL_n`` (see :mod:`curvlab.losses`) with ``s_n = grad NLL_n``:

* ``Tr(F) = w * sum_n ||s_n(y_hat_n)||^2`` with labels ``y_hat_n`` drawn once from the model: the trace of
  the ``"fisher"`` operator with the same seed. For ``CrossEntropyLoss(mean)`` this is
  ``(1/N) sum_n ||grad l(x_n, y_hat_n)||^2``, eq. (1) of Jastrzębski et al. (2021), exact per sample;
  its standard error is over examples (label draws and data).
* ``Tr(F^B) = ||grad L_B(y_hat)||^2``, the squared norm of one mini-batch gradient at sampled labels
  (with the loss's own reduction), averaged over the batches: the cheap proxy of the paper (appendix
  C). Under ``"mean"`` its expectation is about ``Tr(F) / B`` (cross terms vanish since
  ``E[s_n] = 0``), so it tracks ``Tr(F)`` up to the batch size, not its value.
* ``Tr(G) = w * sum_n tr(J_n^T Lambda_n J_n) = w * sum_n sum_c ||J_n^T m_nc||^2`` with
  ``Lambda_n = M_n M_n^T`` (cross-entropy: ``m_c = sqrt(p_c) (e_c - p)``; MSE: ``sqrt(2) e_c``; BCE:
  ``sqrt(p_c (1 - p_c)) e_c``): the sum of BackPACK's exact GGN diagonal where BackPACK supports the
  model, else one per-example gradient pass per output entry.
* ``Tr(EF) = w' * sum_n ||s_n(y_n)||^2`` (``w' = w / c`` under ``"mean"``, 1 under ``"sum"``).

Per-example gradients come from ``torch.func.vmap`` over ``functional_call``, so any model works
whose forward is per-example (no BatchNorm in train mode). Cost: one per-example gradient pass over the
data (``C`` passes for ``Tr(G)``); memory ``chunk_size x D``.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> data = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    >>> res = fisher_trace(model, torch.nn.CrossEntropyLoss(), data, seed=0)
    >>> res.value > 0 and res.num_examples == 6
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from curvlab.data import iter_batches, to_device
from curvlab.losses import LossSpec, loss_spec
from curvlab.notrace import leave_no_trace, model_device
from curvlab.operators import _check_model, select_parameters
from curvlab.rng import make_generator

__all__ = ["FisherTraceResult", "fisher_trace", "exact_trace_per_example"]


@dataclass
class FisherTraceResult:
    """Tr(F) with sampled labels and its mini-batch proxy Tr(F^B).

    Attributes:
        value: ``Tr(F)`` of the objective (see the module docstring).
        stderr: its standard error over examples.
        batch_value: ``Tr(F^B)``, the mean over batches of ``||grad L_B(y_hat)||^2``.
        per_batch: ``Tr(F^B)`` of each batch.
        num_examples: ``N``.
        seed: the seed of the labels (``None`` when a generator was passed).
        by_layer: ``Tr(F)`` of each layer's diagonal block (module name -> value).
    """

    value: float
    stderr: float
    batch_value: float
    per_batch: list[float]
    num_examples: int
    seed: int | None
    by_layer: dict[str, float]


def _per_example_grads(
    model: nn.Module, names: list[str], inputs: Tensor, coeffs: Tensor, chunk: int
) -> list[dict[str, Tensor]]:
    """Per-example gradients of ``coeffs_n . f(x_n)`` w.r.t. the named parameters, in chunks."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    chosen = {n: params[n].detach() for n in names}
    rest = {n: p.detach() for n, p in params.items() if n not in chosen}

    def scalar(sel: dict[str, Tensor], x: Tensor, a: Tensor) -> Tensor:
        out = functional_call(model, ({**rest, **sel}, buffers), (x[None],))
        return (out[0] * a).sum()

    per_ex = vmap(grad(scalar), in_dims=(None, 0, 0), randomness="different")
    return [
        per_ex(chosen, inputs[i : i + chunk], coeffs[i : i + chunk])
        for i in range(0, inputs.shape[0], chunk)
    ]


def _prepare(model: Any, loss_fn: Any, params: Any) -> tuple[LossSpec, list[str]]:
    spec = loss_spec(loss_fn)
    _check_model(model)
    return spec, list(select_parameters(model, params))


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def _nll_grad_out(spec: LossSpec, output: Tensor, targets: Tensor) -> Tensor:
    leaf = output.detach().requires_grad_(True)
    with torch.enable_grad():
        (s,) = torch.autograd.grad(spec.nll_sum(leaf, targets), leaf)
    return s


def fisher_trace(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    params: str | Sequence[str] | None = None,
    chunk_size: int = 64,
) -> FisherTraceResult:
    """``Tr(F)`` with labels sampled from the model (exact per sample) and the proxy ``Tr(F^B)``.

    Labels are drawn batch by batch from one generator exactly as
    :func:`curvlab.curvature_operator` does for ``matrix="fisher"``, so with the same seed
    ``value`` is the exact trace of that operator.

    Args:
        model, loss_fn, data: as everywhere in curvlab.
        seed: seed of the sampled labels (default 0); or pass ``generator``.
        params: restrict to some parameters (names or module prefixes).
        chunk_size: examples per vectorised per-example gradient pass.
    """
    spec, names = _prepare(model, loss_fn, params)
    device = model_device(model)
    gen = make_generator(seed=seed, generator=generator, device=device)
    used_seed = None if generator is not None else (0 if seed is None else seed)
    sq_rows: list[Tensor] = []
    batch_sq: list[Tensor] = []
    layer_tot: dict[str, Tensor] = {}
    w = None
    with leave_no_trace(model):
        batches = [to_device(b, device) for b in iter_batches(data)]
        num = sum(b[0].shape[0] for b in batches)
        for inputs, _ in batches:
            with torch.no_grad():
                output = model(inputs)
            if w is None:
                w = spec.nll_weight(output, num)
            sampled = spec.sample_targets(output, gen)
            s = _nll_grad_out(spec, output, sampled)
            w_b = spec.nll_weight(output, inputs.shape[0])
            total = {n: 0.0 for n in names}
            rows = []
            for g in _per_example_grads(model, names, inputs, s, chunk_size):
                per_param = torch.stack(
                    [g[n].reshape(g[n].shape[0], -1).pow(2).sum(1) for n in names], dim=1
                )
                rows.append(per_param)
                for n in names:
                    total[n] = total[n] + g[n].sum(0)
            per_param = torch.cat(rows)
            sq_rows.append(per_param.sum(1))
            for j, n in enumerate(names):
                key = _module_of(n)
                layer_tot[key] = layer_tot.get(key, 0.0) + per_param[:, j].sum()
            batch_sq.append(sum((w_b * t).pow(2).sum() for t in total.values()))
    sq = torch.cat(sq_rows).to(torch.float64)
    assert w is not None
    value = float(w * sq.sum())
    stderr = float(w * num * sq.std(unbiased=True) / math.sqrt(num)) if num > 1 else math.nan
    per_batch = [float(b) for b in batch_sq]
    return FisherTraceResult(
        value=value,
        stderr=stderr,
        batch_value=sum(per_batch) / len(per_batch),
        per_batch=per_batch,
        num_examples=num,
        seed=used_seed,
        by_layer={k: float(w * v) for k, v in layer_tot.items()},
    )


def _sqrt_factors(spec: LossSpec, output: Tensor) -> list[Tensor]:
    """Columns ``m`` (each shaped like ``output``) with ``sum m m^T`` = the output Hessian."""
    out = output.detach()
    cols: list[Tensor] = []
    if spec.kind == "cross_entropy":
        p = torch.softmax(out, dim=1)
        rest = out.shape[2:]
        flat_p = p.reshape(p.shape[0], p.shape[1], -1)
        for pos in range(flat_p.shape[2]):
            for c in range(p.shape[1]):
                col = torch.zeros_like(flat_p)
                pc = flat_p[:, c, pos]
                col[:, :, pos] = -pc.sqrt()[:, None] * flat_p[:, :, pos]
                col[:, c, pos] += pc.sqrt()
                cols.append(col.reshape(p.shape[0], p.shape[1], *rest))
        return cols
    scale = (
        torch.full_like(out, 2.0).sqrt()
        if spec.kind == "mse"
        else (torch.sigmoid(out) * (1 - torch.sigmoid(out))).sqrt()
    )
    flat = scale.reshape(out.shape[0], -1)
    for j in range(flat.shape[1]):
        col = torch.zeros_like(flat)
        col[:, j] = flat[:, j]
        cols.append(col.reshape(out.shape))
    return cols


def _ggn_trace_backpack(
    model: nn.Module, spec: LossSpec, data: Any, names: list[str]
) -> dict[str, float] | None:
    """Per-layer ``Tr(G)`` from BackPACK's exact GGN diagonal (about 10 passes' cost), or
    ``None`` when BackPACK cannot extend the model (then per-example gradients are used)."""
    from curvlab.backends.backpack import BackpackBackend

    backend = BackpackBackend()
    try:
        backend.check(model, second_order=True)
    except (TypeError, ValueError):
        return None
    device = model_device(model)
    totals: dict[str, Tensor] = {}
    w = None
    try:
        with leave_no_trace(model), backend.extended(model, spec, second_order=True) as session:
            batches = [to_device(b, device) for b in iter_batches(data)]
            num = sum(b[0].shape[0] for b in batches)
            for inputs, targets in batches:
                if w is None:
                    with torch.no_grad():
                        w = spec.nll_weight(model(inputs[:1]), num)
                diag = backend.diag_ggn(session, inputs, targets)
                for n in names:
                    key = _module_of(n)
                    totals[key] = totals.get(key, 0.0) + diag[n].detach().sum()
    except (NotImplementedError, RuntimeError):
        return None
    assert w is not None
    return {k: float(w * v) for k, v in totals.items()}


def exact_trace_per_example(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    matrix: str,
    *,
    params: str | Sequence[str] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
) -> tuple[float, dict[str, float]]:
    """Exact trace of ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"`` from per-example gradients.

    Returns:
        ``(trace, by_layer)`` with ``by_layer`` keyed by module name.
    """
    if matrix == "fisher":
        res = fisher_trace(
            model,
            loss_fn,
            data,
            seed=seed,
            generator=generator,
            params=params,
            chunk_size=chunk_size,
        )
        return res.value, res.by_layer
    if matrix not in ("ggn", "empirical_fisher"):
        raise ValueError(
            f"per-example exact traces exist for ggn/fisher/empirical_fisher, not {matrix!r}"
        )
    spec, names = _prepare(model, loss_fn, params)
    if matrix == "ggn":
        fast = _ggn_trace_backpack(model, spec, data, names)
        if fast is not None:
            return sum(fast.values()), fast
    device = model_device(model)
    layer_tot: dict[str, Tensor] = {}
    w = None
    c = 1
    with leave_no_trace(model):
        batches = [to_device(b, device) for b in iter_batches(data)]
        num = sum(b[0].shape[0] for b in batches)
        for inputs, targets in batches:
            with torch.no_grad():
                output = model(inputs)
            if w is None:
                w = spec.nll_weight(output, num)
                c = spec.terms_per_example(output)
            if matrix == "ggn":
                coeffs = _sqrt_factors(spec, output)
            else:
                coeffs = [_nll_grad_out(spec, output, targets)]
            for a in coeffs:
                for g in _per_example_grads(model, names, inputs, a, chunk_size):
                    for n in names:
                        key = _module_of(n)
                        layer_tot[key] = layer_tot.get(key, 0.0) + g[n].pow(2).sum()
    assert w is not None
    if matrix == "empirical_fisher" and spec.reduction == "mean":
        w = w / c
    by_layer = {k: float(w * v) for k, v in layer_tot.items()}
    return sum(by_layer.values()), by_layer
