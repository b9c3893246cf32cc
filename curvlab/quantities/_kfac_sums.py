"""The raw sums behind :func:`curvlab.kfac`'s factors, one chunk at a time.

The backward passes of a chunk for each ``kind`` (:func:`_passes`: the labels, labels drawn from
the model, or the columns of the loss Hessian's square root), and the outer products of the
captured layer inputs (``A``, :func:`_add_input_side`) and output gradients (``G``,
:func:`_add_output_side`) added per block under K-FAC-expand or K-FAC-reduce, 16-bit values upcast
to float32 first; only the calls that are uses of a block's weight enter ``A`` (:func:`_uses`). The
sums are scaled into factors by :mod:`curvlab.quantities._kfac`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab._precision import unit_exponents, upcast
from curvlab.backends._layers import draw_labels, input_columns, output_columns
from curvlab.backends._rules import is_hf_conv1d


def _passes(
    spec: Any,
    kind: str,
    output: Tensor,
    y: Tensor,
    gen: torch.Generator | None,
    mc_samples: int,
    sixteen: bool = False,
) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
    """The backward passes of one chunk: ``(what to differentiate, its output gradient, the
    factor that undoes its scaling)``, the last ``None`` where the gradient is not scaled.

    ``kind="exact"``: the columns ``s_k`` of the loss Hessian's square root, taken in float32
    from float32 logits. With ``sixteen`` (a 16-bit output or layer) each column is handed on as
    ``2^-e_k s_k``, its largest entry brought to ``[0.5, 1)`` (as the exact-GGN diagonal's
    factors are, :mod:`curvlab.backends._backpack_fields`), and its output gradients are
    multiplied by ``2^e_k`` in float32 (:func:`_add_output_side`; exact, powers of two). Cast to
    float16 as they were, a confident classifier's columns (``sqrt(p_c) ~ 1e-7``) were subnormal
    and its ``G`` 8% low at a margin of 32 (found in review).
    """
    if kind == "empirical":
        return [(spec.nll_sum(output, y), None, None)]
    if kind == "mc":  # example-major draws: each example's labels do not depend on chunking
        return [
            (spec.nll_sum(output, labels, drawn=True), None, None)
            for labels in draw_labels(spec, output, gen, y, mc_samples)
        ]
    if not sixteen:
        S = spec.sqrt_columns(output, y)
        return [(output, S[k], None) for k in range(S.shape[0])]
    S = spec.sqrt_columns(output, y, wide=True)
    down, up = _unit_scales(S)
    return [(output, (S[k] * down[k]).to(output.dtype), up[k]) for k in range(S.shape[0])]


def _unit_scales(S: Tensor) -> tuple[Tensor, Tensor]:
    """Per column ``S[k]`` the power of two ``2^-e_k`` that brings its largest magnitude
    ``m 2^e_k`` into ``[0.5, 1)``, and ``2^e_k`` (float32, ``(K,)``; 1 where the column is 0
    or not finite). No host synchronisation.

    ``e_k`` is kept to ``[-126, 126]``, where ``2^-e_k`` and ``2^e_k`` are both float32 normals
    (a column below ``2^-126`` is brought to ``[2^-23, 1)`` only): unclamped, a column whose
    largest entry is below ``2^-128`` got ``2^-e_k = inf`` and ``inf * 0 = NaN``, a false
    ``NonFiniteError``. That is the likely class's column of a chunk whose examples are all at a
    margin of 89 or more (``-p_j sqrt(p_c) ~ p_j``; every chunk of one such example under
    ``chunk_size=1``; found in review s19)."""
    top = S.detach().abs().flatten(1).amax(1).float() if S.numel() else S.new_ones(S.shape[0])
    exponent = unit_exponents(top)  # top = m 2^e, m in [0.5, 1)
    return torch.pow(2.0, -exponent), torch.pow(2.0, exponent)


def _add(total: dict[str, Tensor], key: str, value: Tensor) -> None:
    """Accumulate in place (every first ``value`` is a fresh tensor): a factor plus one temporary.

    16-bit values accumulate in float32 (:mod:`curvlab._precision`).
    """
    if key in total:
        total[key].add_(value)
    else:
        total[key] = upcast(value)


def _input_columns(layer: nn.Module, x: Tensor) -> Tensor:
    """``(n, in', T)``; HF ``Conv1D`` multiplies the last axis like a Linear layer."""
    if is_hf_conv1d(layer):
        return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    return input_columns(layer, x)


def _output_columns(layer: nn.Module, g: Tensor) -> Tensor:
    """``(n, out, T)``; HF ``Conv1D`` outputs its ``out`` features on the last axis."""
    if is_hf_conv1d(layer):
        return g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2)
    return output_columns(layer, g)


def _add_output_side(
    G_raw: dict[str, Tensor],
    grads: tuple[Tensor, ...],
    names: list[str],
    store: dict[str, Any],
    layers: dict[str, nn.Module],
    group: dict[str, str],
    approx: str,
    up: Tensor | None = None,
) -> None:
    """Add one backward pass's output-gradient outer products to the raw ``G`` factors
    (``up``: the power of two that undoes the scaling of the pass's output gradient,
    :func:`_passes`)."""
    pos = 0
    sums: dict[str, Tensor] = {}  # K-FAC-reduce: per-example sums over uses and positions
    for name in names:
        key = group[name]
        for _ in store[name].outputs:
            # 16-bit gradients are upcast before the products: summed in float16, delta delta^T
            # fell to subnormals (G 20% off) and large sums overflowed (found in review)
            d = upcast(_output_columns(layers[name], grads[pos].detach()))  # (n, out, T)
            if up is not None:
                d = d * up.to(d.dtype)  # the 16-bit pass's scaling undone (exact)
            pos += 1
            if approx == "reduce":
                _add(sums, key, d.sum(2))
            else:
                _add(G_raw, key, torch.einsum("not,npt->op", d, d))
    for key, dbar in sums.items():
        _add(G_raw, key, dbar.T @ dbar)


def _add_input_side(
    A_raw: dict[str, Tensor],
    names: list[str],
    store: dict[str, Any],
    layers: dict[str, nn.Module],
    group: dict[str, str],
    approx: str,
) -> None:
    """Add one chunk's input outer products to the raw ``A`` factors: per example the average
    over every position of every use of its block (a weight applied ``R`` times, by one layer or
    several sharing it, :func:`_uses`), ``(1/T) sum_r sum_t u u^T`` with ``T = sum_r T_r``, or
    (``"reduce"``) the outer product of the mean ``(1/T) sum_r sum_t u``.

    A use on more positions weighs more: the uses split a layer's positions as the model does
    (``layer(x[:, :1])`` and ``layer(x[:, 1:])``), and ``A`` is that of one call on all of
    them. Before review s21 each use's own mean entered with weight ``1/R``: 0.8974 where one
    call on the same 4 positions gives 0.7280 (calls on 1 and 3 positions). Uses of equal
    length give the same as before, to the bit under ``"expand"``.
    """
    inputs = _uses(names, store, group)
    total: dict[str, int] = {}  # per block the positions of each example over all its uses
    for name in names:
        key = group[name]
        total[key] = total.get(key, 0) + sum(_positions(layers[name], z) for _, z in inputs[name])
    sums: dict[str, Tensor] = {}
    for name in names:
        key = group[name]
        count = max(total[key], 1)  # a layer on no positions (T = 0) adds zeros
        for x, _ in inputs[name]:
            # 16-bit inputs are upcast before the products (float16 sums of x x^T overflowed)
            u = upcast(_input_columns(layers[name], x))  # (n, in', T)
            if approx == "reduce":
                _add(sums, key, u.sum(2).div_(count))
            else:
                # divided in place: a second temporary of the factor's size otherwise
                _add(A_raw, key, torch.einsum("nit,njt->ij", u, u).div_(count))
    for key, ubar in sums.items():
        _add(A_raw, key, ubar.T @ ubar)


def _positions(layer: nn.Module, z: Tensor) -> int:
    """The positions ``T`` of one call, from its output's shape (no copy, no host read): the
    features are on the last axis of a Linear or HuggingFace ``Conv1D`` output, on axis 1 of a
    convolution's, the examples on axis 0."""
    out = z.shape[-1] if isinstance(layer, nn.Linear) or is_hf_conv1d(layer) else z.shape[1]
    return z.numel() // (z.shape[0] * out) if z.numel() else 0


def _uses(
    names: list[str], store: dict[str, Any], group: dict[str, str]
) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """Per layer the calls (input, output) that count as uses of its block's weight in ``A``.

    A call whose output does not require grad (the layer run under ``torch.no_grad()`` inside the
    forward, a gate or target) has no output gradient and no share in the weight's Fisher: it is
    no use (it diluted ``A``'s average before, found in review: a Linear used once in the graph
    and once under ``no_grad`` gave a block 1.5x off the exact one). A block none of whose calls
    requires grad (a branch run wholly under ``no_grad``, ``G = 0``) keeps all its calls, so that
    it still has an ``A``. A call whose output requires grad but never reaches the loss counts
    (its ``G`` share is 0)."""
    live: dict[str, bool] = {}
    for name in names:
        key = group[name]
        live[key] = live.get(key, False) or any(z.requires_grad for z in store[name].outputs)
    return {
        name: [
            (x, z)
            for x, z in zip(store[name].inputs, store[name].outputs)
            if z.requires_grad or not live[group[name]]
        ]
        for name in names
    }
