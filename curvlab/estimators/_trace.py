"""Trace estimators for symmetric operators: Hutchinson, block Hutchinson, Hutch++ and exact.

All estimators take an operator (``shape``, ``dtype``, ``device``, ``matmat``; see
:mod:`curvlab.estimators._protocol`) and explicit randomness, and return a :class:`TraceResult`.

* Hutchinson (1990): ``tr(A) = E[z^T A z]`` for probes with ``E[z z^T] = I``; one product per probe.
  Rademacher probes have variance ``2 sum_{i != j} A_ij^2`` per probe, Gaussian ``2 ||A||_F^2``.
* Block Hutchinson (block-diagonal probing): ``tr(A) = sum_b E[z_b^T (A z_b)_b]`` with the probe
  restricted to one block ``b`` (a layer) at a time; ``L`` products per probe, and the variance of
  the couplings between blocks is gone (for networks it is most of the variance: the Hessian's
  cross-layer blocks are large and traceless).
* Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with ``m`` products, a sketch ``Q`` of ``A S``
  (``m/3`` products), the exact ``tr(Q^T A Q)`` (``m/3``) and Hutchinson on ``(I - QQ^T) A (I - QQ^T)``
  (``m/3``). Its standard error is that of the last part, conditional on ``Q``.
* Exact: ``sum_i e_i^T A e_i`` with ``D`` products (small problems only).

Per-block traces (``blocks=``) come for free with every method.

Example:
    >>> import torch
    >>> from curvlab.estimators._protocol import TensorOperator
    >>> A = TensorOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    >>> hutchinson(A, num_probes=4, seed=0).value  # exact on diagonal matrices (Rademacher)
    6.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvlab._finite import check_products_finite
from curvlab._progress import ProgressBar
from curvlab._rng import make_generator
from curvlab.estimators._protocol import check_operator

__all__ = [
    "TraceResult",
    "hutchinson",
    "block_hutchinson",
    "hutchpp",
    "exact_trace",
    "draw_probes",
]

Blocks = dict[str, list[slice]]


@dataclass
class TraceResult:
    """A trace estimate with its standard error.

    Attributes:
        value: the estimate.
        stderr: its standard error (0 for exact methods; ``nan`` if it cannot be estimated,
            e.g. one probe).
        num_matvecs: operator products used.
        seed: the seed of the probes (``None`` when a generator was passed or nothing is random).
        method: the method used.
        num_probes: probes used (stochastic methods).
        by_layer: per-block traces (``None`` unless blocks were given).
        by_layer_stderr: their standard errors.
        extra: method-specific details (e.g. the exact part of a control variate).
    """

    value: float
    stderr: float
    num_matvecs: int
    seed: int | None
    method: str
    num_probes: int = 0
    by_layer: dict[str, float] | None = None
    by_layer_stderr: dict[str, float] | None = None
    extra: dict[str, float] = field(default_factory=dict)


def draw_probes(
    dim: int,
    k: int,
    generator: torch.Generator,
    distribution: str = "rademacher",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``k`` probe vectors as a ``(dim, k)`` tensor with ``E[z z^T] = I``."""
    if distribution == "rademacher":
        z = torch.randint(0, 2, (dim, k), generator=generator, device=device)
        return z.to(dtype).mul_(2).sub_(1)
    if distribution == "gaussian":
        return torch.randn(dim, k, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")


def _block_sums(values: Tensor, blocks: Blocks | None) -> dict[str, Tensor] | None:
    """Sum the rows of ``values`` ``(D, k)`` over each block -> name -> ``(k,)``."""
    if blocks is None:
        return None
    return {name: sum(values[s].sum(0) for s in slices) for name, slices in blocks.items()}


def _mean_se(samples: Tensor) -> tuple[float, float]:
    x = samples.to(torch.float64)
    n = x.numel()
    mean = float(x.mean())
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return mean, se


def _check_common(num_probes: int, batch_size: int | None) -> None:
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")


def hutchinson(
    op,
    num_probes: int = 30,
    distribution: str = "rademacher",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    blocks: Blocks | None = None,
    rtol: float | None = None,
    min_probes: int = 10,
    batch_size: int | None = None,
    show_progress: bool | None = False,
) -> TraceResult:
    """Hutchinson's estimator ``(1/K) sum_k z_k^T A z_k``.

    Args:
        op: the operator.
        num_probes: number of probes ``K`` (the maximum when ``rtol`` is given).
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        seed / generator: the probes' randomness (default seed 0).
        blocks: name -> index slices; per-block traces are returned in ``by_layer``.
        rtol: stop early once ``stderr <= rtol * |value|`` (checked after each batch of probes,
            at least ``min_probes`` probes).
        min_probes: the fewest probes before stopping early.
        batch_size: probes per batched product (default: all at once, at most 10).
        show_progress: progress bar on stderr.
    """
    op = check_operator(op)
    _check_common(num_probes, batch_size)
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else seed)
    step = batch_size or min(num_probes, 10)
    samples: list[Tensor] = []
    block_samples: dict[str, list[Tensor]] = {}
    done = 0
    bar = ProgressBar(total=num_probes, desc="hutchinson", enable=show_progress)
    while done < num_probes:
        k = min(step, num_probes - done)
        Z = draw_probes(op.shape[0], k, gen, distribution, op.device, op.dtype)
        prod = Z * op.matmat(Z)
        samples.append(prod.sum(0))
        for name, val in (_block_sums(prod, blocks) or {}).items():
            block_samples.setdefault(name, []).append(val)
        done += k
        bar.update(k)
        if rtol is not None and done >= min_probes:
            mean, se = _mean_se(torch.cat(samples))
            if se <= rtol * abs(mean):
                break
    bar.close()
    check_products_finite(torch.cat(samples), "the curvature product of Hutchinson probe")
    value, se = _mean_se(torch.cat(samples))
    by_layer = by_se = None
    if blocks is not None:
        stats = {n: _mean_se(torch.cat(v)) for n, v in block_samples.items()}
        by_layer = {n: m for n, (m, _) in stats.items()}
        by_se = {n: s for n, (_, s) in stats.items()}
    return TraceResult(value, se, done, used_seed, "hutchinson", done, by_layer, by_se)


def block_hutchinson(
    op,
    blocks: Blocks,
    num_probes: int = 10,
    distribution: str = "rademacher",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    rtol: float | None = None,
    min_probes: int = 10,
    offset: float = 0.0,
    show_progress: bool | None = False,
) -> TraceResult:
    """Block-diagonal Hutchinson: ``sum_b z_b^T (A z_b)_b`` with one product per block and probe.

    Unbiased for ``tr(A)``; it ignores the blocks' couplings, whose variance plain Hutchinson pays
    for. Uses ``num_probes * len(blocks)`` products (one batched product per probe).

    Args:
        op: the operator.
        blocks: name -> index slices covering the blocks whose traces are summed (normally all
            indices; any index outside every block is left out of the trace).
        num_probes: probes (the maximum when ``rtol`` is given).
        distribution, seed, generator, rtol, min_probes, show_progress: as in :func:`hutchinson`.
        offset: a known quantity added to the estimate before the ``rtol`` test (when this
            estimates one part of a larger trace).
    """
    op = check_operator(op)
    _check_common(num_probes, None)
    if not blocks:
        raise ValueError("blocks must name at least one block")
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else seed)
    names = list(blocks)
    dim = op.shape[0]
    masks = torch.zeros(dim, len(names), device=op.device, dtype=op.dtype)
    for j, name in enumerate(names):
        for s in blocks[name]:
            masks[s, j] = 1
    rows: list[Tensor] = []
    bar = ProgressBar(total=num_probes, desc="block hutchinson", enable=show_progress)
    for i in range(num_probes):
        z = draw_probes(dim, 1, gen, distribution, op.device, op.dtype)
        Z = masks * z
        rows.append((Z * op.matmat(Z)).sum(0))  # (L,): z_b^T (A z_b)_b per block
        bar.update()
        if rtol is not None and i + 1 >= min_probes:
            mean, se = _mean_se(torch.stack(rows).sum(1))
            if se <= rtol * abs(mean + offset):
                break
    bar.close()
    table = torch.stack(rows)
    check_products_finite(table.sum(1), "the curvature product of block-Hutchinson probe")
    value, se = _mean_se(table.sum(1))
    stats = {n: _mean_se(table[:, j]) for j, n in enumerate(names)}
    n_probes = table.shape[0]
    return TraceResult(
        value,
        se,
        n_probes * len(names),
        used_seed,
        "block",
        n_probes,
        {n: m for n, (m, _) in stats.items()},
        {n: s for n, (_, s) in stats.items()},
    )


def hutchpp(
    op,
    num_matvecs: int = 30,
    distribution: str = "rademacher",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    blocks: Blocks | None = None,
) -> TraceResult:
    """Hutch++ with a budget of ``num_matvecs`` products (a multiple of 3 is used).

    ``tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T))`` with ``Q`` an orthonormal basis of ``A S``;
    the first term is exact, the second is estimated by Hutchinson. Per-block traces use
    ``tr(P_b A) = tr(P_b Q C Q^T) + 2 tr(P_b Q (Pi A Q)^T) + tr(P_b Pi A Pi)``, ``C = Q^T A Q``.
    """
    op = check_operator(op)
    if not isinstance(num_matvecs, int) or num_matvecs < 3:
        raise ValueError(f"num_matvecs must be an int >= 3, got {num_matvecs!r}")
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else seed)
    dim = op.shape[0]
    k = max(1, min(num_matvecs // 3, dim))
    S = draw_probes(dim, k, gen, distribution, op.device, op.dtype)
    AS = op.matmat(S)
    check_products_finite(AS, "the curvature product of Hutch++ sketch vector")
    Q, _ = torch.linalg.qr(AS)
    AQ = op.matmat(Q)
    C = Q.T @ AQ
    exact_part = float(torch.trace(C).to(torch.float64))
    G = draw_probes(dim, k, gen, distribution, op.device, op.dtype)
    PG = G - Q @ (Q.T @ G)
    APG = op.matmat(PG)
    PAPG = APG - Q @ (Q.T @ APG)
    prod = G * PAPG
    samples = prod.sum(0)
    check_products_finite(samples, "the curvature product of Hutch++ probe")
    mean, se = _mean_se(samples)
    by_layer = by_se = None
    if blocks is not None:
        PAQ = AQ - Q @ C
        low = (Q @ C) * Q + 2 * Q * PAQ
        low_b = {n: float(v.sum()) for n, v in (_block_sums(low, blocks) or {}).items()}
        rest = {n: _mean_se(v) for n, v in (_block_sums(prod, blocks) or {}).items()}
        by_layer = {n: low_b[n] + rest[n][0] for n in blocks}
        by_se = {n: rest[n][1] for n in blocks}
    return TraceResult(
        exact_part + mean,
        se,
        3 * k,
        used_seed,
        "hutch++",
        k,
        by_layer,
        by_se,
        extra={"low_rank_part": exact_part, "sketch_size": float(k)},
    )


def exact_trace(op, blocks: Blocks | None = None, batch_size: int = 64) -> TraceResult:
    """``sum_i e_i^T A e_i`` with ``D`` products in batches of ``batch_size`` unit vectors."""
    op = check_operator(op)
    dim = op.shape[0]
    diag = torch.empty(dim, device=op.device, dtype=op.dtype)
    for start in range(0, dim, batch_size):
        stop = min(dim, start + batch_size)
        E = torch.zeros(dim, stop - start, device=op.device, dtype=op.dtype)
        idx = torch.arange(start, stop, device=op.device)
        E[idx, idx - start] = 1
        diag[start:stop] = op.matmat(E)[idx, idx - start]
    check_products_finite(diag, "the curvature product with unit vector")
    by_layer = None
    if blocks is not None:
        by_layer = {n: float(sum(diag[s].sum() for s in sl)) for n, sl in blocks.items()}
    total = float(diag.to(torch.float64).sum())
    return TraceResult(total, 0.0, dim, None, "exact", 0, by_layer, None)
