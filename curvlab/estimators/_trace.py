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
from typing import Any

import torch
from torch import Tensor

from curvlab._finite import check_products_finite
from curvlab._numbers import is_count, is_positive, is_real
from curvlab._precision import column_dots
from curvlab._progress import ProgressBar
from curvlab._rng import make_generator
from curvlab.estimators._memory import (
    CHUNK_ELEMENTS,
    EstimatorMemoryError,
    agree,
    available_bytes,
    budget_limit,
    check_memory_budget,
    default_budget,
    require,
    storage_dtype,
    vector_bytes,
)
from curvlab.estimators._parts import Blocks, BlocksArg, check_blocks, own_products
from curvlab.estimators._probes import (
    PROBE_BLOCK_BYTES,
    PROBE_VECTORS,
    batch_plan,
    draw_probes,
    probe_batch,
    probe_rows,
)
from curvlab.estimators._protocol import check_operator, checked_matmat, checks_values_once

__all__ = [
    "TraceResult",
    "hutchinson",
    "block_hutchinson",
    "hutchpp",
    "exact_trace",
    "check_trace_plan",
    "draw_probes",
    "probe_rows",
    "probe_batch",
    "PROBE_VECTORS",
    "PROBE_BLOCK_BYTES",
]


@dataclass
class TraceResult:
    """A trace estimate with its standard error.

    Attributes:
        value: the estimate.
        stderr: its standard error (0 for exact methods, and for Hutch++ whose sketch spans
            all ``D`` dimensions; ``nan`` if it cannot be estimated, e.g. one probe), over the
            probes: for the Monte-Carlo Fisher, given its drawn labels. A sample standard error
            of 0 is not always exactness: Rademacher probes of a tiny operator can all give the
            same value (``D = 2``: chance ``2^(1-K)`` for ``K`` probes).
        num_matvecs: operator products made: with ``rtol=``, Hutchinson's last batch may
            hold probes beyond the ``num_probes`` the stopping rule kept, whose products are
            counted here but not used.
        seed: the seed of the probes (``None`` when a generator was passed or nothing is random).
        method: the method used.
        num_probes: probes used (stochastic methods): with ``rtol=``, the first count at
            which the stopping rule held, whatever the batching.
        by_layer: per-block traces (``None`` unless blocks were given).
        by_layer_stderr: their standard errors.
        extra: method-specific details (e.g. the exact part of a control variate).
        info: how it was computed where that is not the default (``"compiled"``: a
            ``torch.compile``d model; docs/training-loops.md).
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
    info: dict[str, Any] = field(default_factory=dict)


def _dots(Z: Tensor, AZ: Tensor, rows: slice | None = None) -> Tensor:
    """``(k,)`` column dot products ``z_j[rows]^T (A z_j)[rows]`` of two ``(D, k)`` blocks,
    accumulated in float64 (:func:`~curvlab._precision.column_dots`, chunks of at most
    ``CHUNK_ELEMENTS`` entries)."""
    if rows is not None:
        Z, AZ = Z[rows], AZ[rows]
    return column_dots(Z, AZ, CHUNK_ELEMENTS)


def _product(op, X: Tensor, own: bool) -> Tensor:
    """``A X`` for a ``(D, k)`` block kept in the estimator's storage dtype, handed to ``matmat``
    in the operator's dtype, as Lanczos and SLQ hand theirs
    (:func:`~curvlab.estimators._krylov.apply_to_vector`): a 16-bit operator gets 16-bit
    vectors (found in review s19: the trace estimators handed a bfloat16 ``TensorOperator``
    float32 probes, refused with "expected m1 and m2 to have the same dtype"). ``own``
    (:func:`~curvlab.estimators._parts.own_products`): a
    :class:`~curvlab.operators.CurvatureOperator`'s own ``matmat``, which takes vectors of any
    real floating dtype and rounds each parameter's rows to its dtype after an exact
    power-of-two scaling (the same products, without a 16-bit copy and its upcast), gets ``X``.
    The product comes back in the operator's dtype (convert it where it is written into),
    checked by :func:`~curvlab.estimators._protocol.checked_matmat` (found in review s24: a
    user's ``matmat`` that multiplied its input in place, handed the probe block itself, gave a
    Hutchinson trace of 21.7 and Hutch++ -3219 for 8.0; one that answered a ``(D, 1)`` product
    broadcast over the block gave 0.37)."""
    return checked_matmat(op, X if own else X.to(op.dtype))


def _gram(X: Tensor, Y: Tensor) -> Tensor:
    """``X^T Y`` for ``(D, a)`` and ``(D, b)`` blocks, accumulated in float64 over row chunks
    through reused buffers of at most ``CHUNK_ELEMENTS`` entries."""
    n, a, b = X.shape[0], X.shape[1], Y.shape[1]
    step = max(1, min(n, CHUNK_ELEMENTS // max(a + b, 1)))
    xbuf = torch.empty(step * a, dtype=torch.float64, device=X.device)
    ybuf = torch.empty(step * b, dtype=torch.float64, device=X.device)
    out = torch.zeros(a, b, dtype=torch.float64, device=X.device)
    for r in range(0, n, step):
        rows_here = min(step, n - r)
        xb = xbuf[: rows_here * a].view(rows_here, a)
        yb = ybuf[: rows_here * b].view(rows_here, b)
        xb.copy_(X[r : r + rows_here])
        yb.copy_(Y[r : r + rows_here])
        out.addmm_(xb.T, yb)
    return out


def _block_dots(Z: Tensor, AZ: Tensor, blocks: Blocks | None) -> dict[str, Tensor]:
    """Per block: ``(k,)`` dot products over the block's rows (see :func:`_dots`)."""
    if blocks is None:
        return {}
    return {name: sum(_dots(Z, AZ, s) for s in slices) for name, slices in blocks.items()}  # type: ignore[misc]


def _row_chunks(slices: list[slice], dim: int, width: int) -> list[slice]:
    """``slices`` cut into pieces of at most ``CHUNK_ELEMENTS / width`` rows (each piece the
    same indices as its part of the slice, steps included)."""
    rows = max(1, CHUNK_ELEMENTS // max(width, 1))
    out = []
    for s in slices:
        indices = range(*s.indices(dim))
        for r in range(0, len(indices), rows):
            part = indices[r : r + rows]
            out.append(slice(part.start, part.stop, part.step))
    return out


def _power_of_two_above(x: float) -> float:
    """The power of two ``2^e`` with ``|x| < 2^e`` (``|x|`` in ``[2^(e-1), 2^e)``; 1 for 0): a
    scale by which samples divide exactly."""
    return math.ldexp(1.0, math.frexp(x)[1])


def _mean_se(samples: Tensor) -> tuple[float, float]:
    """The mean and its standard error ``std / sqrt(n)`` (``nan`` for one sample) of float64
    samples, computed on the samples divided by a power of two above their largest ``|x|`` and
    multiplied back (exact: the same numbers as the plain formulas wherever those neither
    underflow nor overflow). Found in review s19: the plain squared deviations underflowed
    below ``||A|| ~ 1e-158`` (standard error 0 at ``1e-170``, where it was ``1.04e-170``) and
    overflowed above ``1e154`` (``inf``), as the SLQ standard error did before review s16."""
    x = samples.to(torch.float64)
    n = x.numel()
    top = float(x.abs().max()) if n else 0.0
    if not math.isfinite(top):  # a non-finite sample: the plain formulas say so
        return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    scale = _power_of_two_above(top)
    xs = x / scale
    mean = float(xs.mean()) * scale
    se = float(xs.std(unbiased=True)) * scale / math.sqrt(n) if n > 1 else math.nan
    return mean, se


class _Stopping:
    """The ``rtol`` stopping rule, tested at every probe count ``j >= min_probes``:
    ``stderr_j <= rtol * |mean_j + offset|`` over the first ``j`` samples.

    Tested probe by probe (not once per batch), so the count at which a run stops, and hence its
    estimate, is the same however its probes are batched (found in review: tested after each
    batch, 100 probes at ``rtol=0.1`` gave 2.156484 with 80 probes in blocks of 10 and 2.224143
    with 76 one at a time). The running mean and sum of squared deviations are updated in
    float64 with Welford's recurrence: ``O(1)`` per sample, one read of each batch to the host.
    They are kept in units of a power of two above the largest ``|sample|`` so far (rescaled,
    exactly, when a larger sample arrives), so the decision is the one of the plain recurrence
    at every scale of the operator (found in review s19: the plain squares underflowed below
    ``||A|| ~ 1e-158`` and overflowed above ``1e154``; at ``rtol=0.2`` a run stopped after 10
    probes at ``1e-170`` and ran all 30 at ``1e160`` where it stops after 17 at scale 1).
    A non-finite sample makes every later test fail, so a run never stops after one.
    """

    def __init__(self, rtol: float, min_probes: int, offset: float = 0.0) -> None:
        self.rtol, self.min_probes, self.offset = float(rtol), int(min_probes), float(offset)
        self.count, self.mean, self.squares = 0, 0.0, 0.0  # mean and squares in units of scale
        self.top, self.scale, self.finite = 0.0, 1.0, True  # largest |sample|, 2^e above it

    def feed(self, samples: Tensor) -> int | None:
        """Take a batch's samples in order; return how many of them the run keeps (up to the
        first count that meets the rule), or ``None`` while it is not met."""
        for i, x in enumerate(samples.to(torch.float64).tolist()):
            self.count += 1
            if not self.finite or not math.isfinite(x):
                self.finite = False
                continue
            if abs(x) > self.top:  # a larger sample: the running statistics in its units
                scale = _power_of_two_above(x)
                if self.top > 0:  # (before the first nonzero sample they are 0 in any unit)
                    ratio = self.scale / scale  # <= 1, a power of two: exact (or 0 far below)
                    self.mean *= ratio
                    self.squares *= ratio * ratio
                self.top, self.scale = abs(x), scale
            xs = x / self.scale
            delta = xs - self.mean
            self.mean += delta / self.count
            self.squares += delta * (xs - self.mean)
            if self.count >= max(self.min_probes, 2):  # one sample has no stderr
                se = math.sqrt(self.squares / (self.count - 1) / self.count)
                if se <= self.rtol * abs(self.mean + self.offset / self.scale):
                    return i + 1
        return None


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and not is_count(batch_size):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")


def _check_common(
    num_probes: int,
    batch_size: int | None,
    rtol: float | None = None,
    min_probes: int = 1,
    memory_budget: float | None = None,
) -> None:
    if not is_count(num_probes):
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
    _check_batch_size(batch_size)
    if rtol is not None and not is_positive(rtol):
        raise ValueError(f"rtol must be a finite number > 0 or None, got {rtol!r}")
    if not is_count(min_probes):
        raise ValueError(f"min_probes must be a positive int, got {min_probes!r}")
    check_memory_budget(memory_budget)


def check_trace_args(
    method: str,
    num_probes: int,
    rtol: float | None,
    batch_size: int | None,
    memory_budget: float | None = None,
) -> None:
    """The checks of :func:`curvlab.trace`'s estimator arguments, made before the data is read
    (``num_probes``, ``batch_size`` and ``memory_budget`` for every method, found in review:
    ``method="exact"`` ignored any value, ``"x"``, ``-3``, ``0``, ``2.5`` or ``True`` as
    ``num_probes`` included, and ``trace`` read NaN or ``"x"`` as a budget after its forward
    pass). ``method="exact"`` uses no probes, but a ``num_probes`` that is not a positive int is
    a mistake in the call all the same."""
    if method == "exact":
        if not is_count(num_probes):
            raise ValueError(
                f"num_probes must be a positive int, got {num_probes!r} (method='exact' uses "
                "no probes: leave num_probes at its default)"
            )
        if rtol is not None:
            raise ValueError("rtol stops a stochastic estimate early; method='exact' has none")
        _check_batch_size(batch_size)
        check_memory_budget(memory_budget)
        return
    _check_common(num_probes, batch_size, rtol, memory_budget=memory_budget)
    if method == "hutch++":
        if num_probes < 3:
            raise ValueError(
                f"method='hutch++' spends num_probes products in thirds (sketch, its products, "
                f"probes of the rest): num_probes must be >= 3, got {num_probes!r}"
            )
        if rtol is not None:
            raise ValueError(
                "rtol is not supported by method='hutch++' (its sketch is built up front): use "
                "method='hutchinson' for early stopping, or drop rtol"
            )


@checks_values_once
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
    *,
    memory_budget: float | None = None,
) -> TraceResult:
    """Hutchinson's estimator ``(1/K) sum_k z_k^T A z_k``.

    Memory: one batch of ``b`` probes at a time, the probes and their products (``2b``
    parameter-vectors, float32 for 16-bit models), freed before the next batch is drawn; the
    samples ``z_k^T A z_k`` are reduced without a ``D x b`` temporary. Probe ``k`` is the
    ``k``-th draw from the generator, so the estimate does not depend on the batching (to
    rounding: the probes are the same, a batch's products may round differently). On a
    :class:`~curvlab.operators.CurvatureOperator` the samples come from its ``quadratic_forms``
    (no ``A Z`` assembled), unless a subclass changes ``matmat`` (then, as on any other
    operator, from ``matmat``: :func:`~curvlab.estimators._parts.own_products`). With ``rtol``
    the stopping rule is tested at every probe count, not once per batch, so the run stops at
    the same probe ``j`` whatever the batching; the rest of the last batch (at most
    ``batch_size - 1`` products) is made but not used: counted in ``num_matvecs``, not in
    ``num_probes`` or the estimate.

    Args:
        op: the operator.
        num_probes: number of probes ``K`` (the maximum when ``rtol`` is given).
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        seed / generator: the probes' randomness (default seed 0).
        blocks: name -> a slice or a list of slices of indices; per-block traces are returned
            in ``by_layer``.
        rtol: stop early at the first probe count ``j >= min_probes`` with
            ``stderr <= rtol * |value|`` over the first ``j`` probes (tested probe by probe;
            the estimate uses those ``j`` probes alone).
        min_probes: the fewest probes before stopping early.
        batch_size: probes per batched product (default: at most 10, as many as
            ``memory_budget`` allows at :data:`PROBE_VECTORS` parameter-vectors per probe).
        show_progress: progress bar on stderr.
        memory_budget: bytes a batch may take (default: half the memory available on the
            operator's device when the call starts, at most :data:`PROBE_BLOCK_BYTES`, 1 GiB;
            ``float("inf")``: no budget, only the memory available).

    Raises:
        ValueError: for an invalid argument (a count that is not a positive int, a bool, a
            budget that is not a number of bytes), before any product.
        EstimatorMemoryError: (a ``MemoryError``) before drawing, when ``batch_size`` probes or
            a single one do not fit.
    """
    op = check_operator(op)
    _check_common(num_probes, batch_size, rtol, min_probes, memory_budget)
    blocks = check_blocks(blocks)
    _check_disjoint_within(blocks, op.shape[0])  # before the generator and any product
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else int(seed))
    dim, dtype = op.shape[0], storage_dtype(op.dtype)
    probe_rows(1, 0, gen, distribution)  # validates the distribution before any work
    step = probe_batch(op, num_probes, batch_size, memory_budget, "hutchinson")
    forms = own_products(op)  # quadratic_forms are CurvatureOperator.matmat's, not a subclass's
    samples: list[Tensor] = []
    block_samples: dict[str, list[Tensor]] = {}
    stopping = None if rtol is None else _Stopping(rtol, min_probes)
    done = used = 0  # products made, probes kept
    bar = ProgressBar(total=num_probes, desc="hutchinson", enable=show_progress)
    while done < num_probes:
        k = min(step, num_probes - done)
        Z = probe_rows(dim, k, gen, distribution, op.device, dtype).T
        by_block: dict[str, Tensor] = {}
        if blocks is None and forms:
            sample = op.quadratic_forms(Z)  # z^T A z without assembling A Z
        else:
            AZ = _product(op, Z, forms)
            sample = _dots(Z, AZ)
            by_block = _block_dots(Z, AZ, blocks)
            del AZ
        del Z  # nothing of this batch is held while the next one is drawn
        stop = None if stopping is None else stopping.feed(sample)
        keep = k if stop is None else stop  # the probes up to the stopping count
        check_products_finite(
            sample[:keep], "the curvature product of Hutchinson probe", done, op=op
        )
        samples.append(sample[:keep])
        for name, val in by_block.items():
            block_samples.setdefault(name, []).append(val[:keep])
        done += k
        used += keep
        bar.update(k)
        if stop is not None:
            break
    bar.close()
    value, se = _mean_se(torch.cat(samples))
    by_layer = by_se = None
    if blocks is not None:
        stats = {n: _mean_se(torch.cat(v)) for n, v in block_samples.items()}
        by_layer = {n: m for n, (m, _) in stats.items()}
        by_se = {n: s for n, (_, s) in stats.items()}
    return TraceResult(value, se, done, used_seed, "hutchinson", used, by_layer, by_se)


def _overlap(a: range, b: range) -> bool:
    """Whether two non-empty ranges of positive steps share an index: ``x = a.start mod a.step``
    and ``x = b.start mod b.step`` (Chinese remainder theorem) within both bounds."""
    lo, hi = max(a[0], b[0]), min(a[-1], b[-1])
    if lo > hi:
        return False
    g = math.gcd(a.step, b.step)
    if (b.start - a.start) % g:
        return False
    m = b.step // g  # x = a.start + a.step * t with t = (b.start - a.start) / g * inv(a.step / g)
    t = (b.start - a.start) // g * pow(a.step // g, -1, m) % m if m > 1 else 0
    period = a.step * m  # lcm
    first = lo + (a.start + a.step * t - lo) % period  # the first common index >= lo
    return first <= hi


def _check_disjoint_within(blocks: Blocks | None, dim: int) -> None:
    """Refuse a block whose slices share an index (``by_layer`` of :func:`hutchinson`,
    :func:`hutchpp`, :func:`exact_trace`: each block's trace stands on its own, so two blocks may
    overlap, but a block's trace counted such an index twice, found in review s19)."""
    for name, slices in (blocks or {}).items():
        _check_disjoint({name: slices}, dim, "a block's trace")


def _check_disjoint(blocks: Blocks, dim: int, what: str = "block Hutchinson") -> None:
    """Refuse blocks with an index in two slices (of one block or two), naming them: sorted by
    their first index, each range is compared with those still open (for layers' contiguous
    blocks, the one before it). ``what``: whose sum would count the index twice."""
    ranges = sorted(
        (
            (r, name, s)
            for name, slices in blocks.items()
            for s in slices
            if len(r := range(*s.indices(dim)))
        ),
        key=lambda item: item[0][0],
    )
    open_: list[tuple[range, str, slice]] = []
    for r, name, s in ranges:
        open_ = [o for o in open_ if o[0][-1] >= r[0]]
        for r2, name2, s2 in open_:
            if _overlap(r2, r):
                raise ValueError(
                    f"blocks overlap: blocks[{name2!r}] holds {s2!r} and blocks[{name!r}] holds "
                    f"{s!r}, which share indices; {what} sums over the slices, so an index in "
                    "two slices would be counted twice: give disjoint slices"
                )
        open_.append((r, name, s))


@checks_values_once
def block_hutchinson(
    op,
    blocks: BlocksArg,
    num_probes: int = 10,
    distribution: str = "rademacher",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    rtol: float | None = None,
    min_probes: int = 10,
    offset: float = 0.0,
    show_progress: bool | None = False,
    *,
    memory_budget: float | None = None,
) -> TraceResult:
    """Block-diagonal Hutchinson: ``sum_b z_b^T (A z_b)_b`` with one product per block and probe.

    Unbiased for ``tr(A)``; it ignores the blocks' couplings, whose variance plain Hutchinson pays
    for. Uses ``num_probes * len(blocks)`` products. Memory: the probe and one group of
    restricted probes with their products (all blocks at once where ``memory_budget`` allows,
    :data:`PROBE_VECTORS` parameter-vectors per block).

    Args:
        op: the operator.
        blocks: name -> a slice or a list of slices of indices, covering the blocks whose
            traces are summed (normally all indices; any index outside every block is left out
            of the trace). No index may be in two slices (of one block or two): it would be
            counted twice.
        num_probes: probes (the maximum when ``rtol`` is given).
        distribution, seed, generator, rtol, min_probes, show_progress: as in :func:`hutchinson`.
        offset: a known finite quantity added to the estimate before the ``rtol`` test (when
            this estimates one part of a larger trace).
        memory_budget: bytes a group of blocks may take (default: the smaller of
            :data:`PROBE_BLOCK_BYTES`, 1 GiB, and half the memory available).

    Raises:
        ValueError: before any product, for an invalid argument: a count that is not a positive
            int, an ``offset`` that is not a finite number (found in review s19: ``nan`` turned
            ``rtol`` off silently, 200 probes where 10 were enough), blocks with an index in
            two slices (found in review s19: ``{"a": slice(0, 5), "b": slice(0, 5)}`` gave 30
            for a trace of 15).
    """
    op = check_operator(op)
    _check_common(num_probes, None, rtol, min_probes, memory_budget)
    if not is_real(offset):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    blocks = check_blocks(blocks)
    if not blocks:
        raise ValueError("blocks must name at least one block")
    _check_disjoint(blocks, op.shape[0])
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else int(seed))
    names = list(blocks)
    dim, dtype = op.shape[0], storage_dtype(op.dtype)
    own = own_products(op)
    probe_rows(1, 0, gen, distribution)  # validates the distribution before any work
    group = block_group(op, len(names), memory_budget)
    rows: list[Tensor] = []
    stopping = None if rtol is None else _Stopping(rtol, min_probes, offset)
    bar = ProgressBar(total=num_probes, desc="block hutchinson", enable=show_progress)
    for _ in range(num_probes):
        z = probe_rows(dim, 1, gen, distribution, op.device, dtype)[0]
        values: list[Tensor] = []
        for g0 in range(0, len(names), group):
            part = names[g0 : g0 + group]
            Zr = torch.zeros(len(part), dim, device=op.device, dtype=dtype)
            for j, name in enumerate(part):
                for s in blocks[name]:
                    Zr[j, s] = z[s]
            AZ = _product(op, Zr.T, own)
            for j, name in enumerate(part):  # z_b^T (A z_b)_b per block
                values.append(sum(_dots(z[:, None], AZ[:, j : j + 1], s)[0] for s in blocks[name]))
            del Zr, AZ
        rows.append(torch.stack(values))  # type: ignore[arg-type]
        bar.update()
        if stopping is not None and stopping.feed(rows[-1].sum()[None]) is not None:
            break
    bar.close()
    table = torch.stack(rows)
    check_products_finite(table.sum(1), "the curvature product of block-Hutchinson probe", op=op)
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


@checks_values_once
def hutchpp(
    op,
    num_matvecs: int = 30,
    distribution: str = "rademacher",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    blocks: BlocksArg | None = None,
    *,
    batch_size: int | None = None,
    memory_budget: float | None = None,
) -> TraceResult:
    """Hutch++ with a budget of ``num_matvecs`` products (a multiple of 3 is used).

    ``tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T))`` with ``Q`` an orthonormal basis of ``A S``;
    the first term is exact, the second is estimated by Hutchinson. Per-block traces use
    ``tr(P_b A) = tr(P_b Q C Q^T) + 2 tr(P_b Q (Pi A Q)^T) + tr(P_b Pi A Pi)``, ``C = Q^T A Q``.

    Memory: the sketch ``Q`` of ``k = num_matvecs / 3`` parameter-vectors (``2k`` during its QR
    factorisation) plus one batch of ``b`` probes, their products and the operator's buffers
    (:data:`PROBE_VECTORS` ``* b`` vectors) at a time: ``max(2k, k + 4b)`` vectors at the peak,
    checked against ``memory_budget`` before any product. The projected probes ``Pi g`` overwrite
    the probes and ``Pi A Pi g`` the products (``g^T Pi A Pi g`` is
    ``(Pi g)^T (Pi A Pi g) + (Q^T g)^T Q^T (Pi A Pi g)``).

    Args:
        op, num_matvecs, distribution, seed, generator: as described above.
        blocks: as in :func:`hutchinson`.
        batch_size: probes per batched product (default: all ``k`` where ``memory_budget``
            allows beside the sketch, at least one).
        memory_budget: bytes for the sketch and a batch together, ``max(2k, k + 4b)`` vectors
            (default: batches within the smaller of :data:`PROBE_BLOCK_BYTES`, 1 GiB, and half
            the memory available; ``float("inf")``: no budget, only the memory available).

    Raises:
        EstimatorMemoryError: (a ``MemoryError``) before any product, when ``max(2k, k + 4b)``
            vectors (``b = 1`` at the least) exceed ``memory_budget`` or the memory available;
            the message gives that total and the budget as passed.
    """
    op = check_operator(op)
    if not is_count(num_matvecs, 3):
        raise ValueError(f"num_matvecs must be an int >= 3, got {num_matvecs!r}")
    num_matvecs = int(num_matvecs)
    _check_batch_size(batch_size)
    check_memory_budget(memory_budget)
    blocks = check_blocks(blocks)
    _check_disjoint_within(blocks, op.shape[0])  # before the generator and any product
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else int(seed))
    dim, dtype = op.shape[0], storage_dtype(op.dtype)
    probe_rows(1, 0, gen, distribution)  # validates the distribution before any work
    k = _hutchpp_sketch(num_matvecs, dim)
    b = _hutchpp_check_memory(op, num_matvecs, k, batch_size, memory_budget, dtype)
    batches = [(j, min(k, j + b)) for j in range(0, k, b)]
    own = own_products(op)
    f64 = torch.float64
    # 1. the sketch Q = orth(A S)
    AS = torch.empty(dim, k, device=op.device, dtype=dtype)
    for j0, j1 in batches:
        S = probe_rows(dim, j1 - j0, gen, distribution, op.device, dtype).T
        AS[:, j0:j1] = _product(op, S, own)
        del S
    check_products_finite(AS, "the curvature product of Hutch++ sketch vector", op=op)
    Q = torch.linalg.qr(AS)[0]
    del AS
    # 2. C = Q^T A Q exactly, and the low-rank part of the block traces
    C = torch.empty(k, k, device=op.device, dtype=f64)
    # every block's sums start from a float64 zero: a block with no rows has trace 0 (found in
    # review s19: the int 0 of an empty sum raised a raw TypeError after all 3k products)
    low = {name: torch.zeros((), device=op.device, dtype=f64) for name in blocks or {}}
    for j0, j1 in batches:
        AQ = _product(op, Q[:, j0:j1], own).to(dtype)
        C[:, j0:j1] = _gram(Q, AQ)
        for name, slices in (blocks or {}).items():
            for r in _row_chunks(slices, dim, k + j1 - j0):
                Qr, AQr = Q[r].to(torch.float64), AQ[r].to(torch.float64)
                QC = Qr @ C[:, j0:j1]
                part = QC * Qr[:, j0:j1] + 2 * Qr[:, j0:j1] * (AQr - QC)
                low[name] += part.sum()
        del AQ
    exact_part = float(torch.trace(C).to(torch.float64))
    # 3. Hutchinson on (I - QQ^T) A (I - QQ^T)
    samples: list[Tensor] = []
    rest: dict[str, list[Tensor]] = {}
    for j0, j1 in batches:
        G = probe_rows(dim, j1 - j0, gen, distribution, op.device, dtype).T
        M = _gram(Q, G)
        G.addmm_(Q, M.to(dtype), alpha=-1)  # Pi g, in place
        PAPG = _product(op, G, own).to(dtype)
        if PAPG.untyped_storage().data_ptr() == G.untyped_storage().data_ptr():
            PAPG = PAPG.clone()  # an operator that returns its input: keep Pi g intact
        PAPG.addmm_(Q, _gram(Q, PAPG).to(dtype), alpha=-1)  # Pi A Pi g, in place
        sample = _dots(G, PAPG) + (M * _gram(Q, PAPG)).sum(0)  # g^T Pi A Pi g
        check_products_finite(sample, "the curvature product of Hutch++ probe", j0, op=op)
        samples.append(sample)
        for name, slices in (blocks or {}).items():
            acc = torch.zeros(j1 - j0, device=op.device, dtype=f64)
            for r in _row_chunks(slices, dim, k + j1 - j0):
                acc += ((G[r].to(f64) + Q[r].to(f64) @ M) * PAPG[r]).sum(0)
            rest.setdefault(name, []).append(acc)
        del G, PAPG, M
    mean, se = _mean_se(torch.cat(samples))
    # k = D: Q is an orthogonal D x D basis, I - QQ^T = 0 and the estimate is exact (to
    # rounding): its standard error is 0, not that of rounding noise or, for D = 1, nan
    exact = k == dim
    by_layer = by_se = None
    if blocks is not None:
        stats = {n: _mean_se(torch.cat(rest[n])) for n in blocks}
        by_layer = {n: float(low[n]) + stats[n][0] for n in blocks}
        by_se = {n: 0.0 if exact else stats[n][1] for n in blocks}
    if exact:
        se = 0.0
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


def _hutchpp_batch(
    k: int,
    vec: int,
    device: torch.device | str,
    batch_size: int | None,
    memory_budget: float | None,
    *,
    available: bool = True,
) -> int:
    """Hutch++'s probes per batch: ``batch_size`` (at most ``k``), else all ``k`` cut to what
    :data:`PROBE_VECTORS` vectors per probe allow beside the sketch's ``k`` vectors within
    ``memory_budget`` (``None``: within :data:`PROBE_BLOCK_BYTES` or half the memory available,
    as :func:`probe_batch`; ``inf``: the memory available), at least one. Refuses nothing:
    :func:`_hutchpp_require` checks the whole need. ``available=False``: the caller's
    ``memory_budget`` alone, not the memory on ``device`` (all ``k`` without a budget)."""
    if batch_size is not None:
        return min(int(batch_size), k)
    if memory_budget is None:
        if not available:
            return k
        free = default_budget(device)
        room: float | None = PROBE_BLOCK_BYTES if free is None else min(free, PROBE_BLOCK_BYTES)
    elif math.isinf(memory_budget):
        avail = available_bytes(device) if available else None
        room = None if avail is None else avail - k * vec
    else:
        room = memory_budget - k * vec
    if room is None:
        return k
    return max(1, min(k, int(room // (PROBE_VECTORS * vec))))


def _hutchpp_sketch(num_matvecs: int, dim: int) -> int:
    """Hutch++'s sketch size ``k``: a third of ``num_matvecs``, at least 1, at most ``D``."""
    return max(1, min(num_matvecs // 3, dim))


def _hutchpp_require(
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    num_matvecs: int,
    k: int,
    b: int,
    batch_size: int | None,
    memory_budget: float | None,
) -> None:
    """Refuse, with the numbers, a Hutch++ run whose ``max(2k, k + 4b)`` vectors of ``dim``
    entries of ``dtype`` exceed ``memory_budget`` or the memory available on ``device``
    (``None``: the budget alone)."""
    vec = vector_bytes(dim, dtype)
    held = max(2 * k, k + PROBE_VECTORS * b)
    budget = budget_limit(memory_budget)
    ways = ["a smaller num_matvecs (num_probes of cl.trace)"] if k > 1 else []
    if batch_size is not None and b > 1 and k + PROBE_VECTORS * b > 2 * k:
        ways.append("a smaller batch_size (or batch_size=None to size it from memory_budget)")
    more = "raise memory_budget" if budget is not None else "free memory on the device"
    require(
        f"hutch++ with num_matvecs={num_matvecs}: a sketch of {k} vector{'s' * (k > 1)} of "
        f"{dim:,} {str(dtype).removeprefix('torch.')} entries ({2 * k} during its QR "
        f"factorisation) and, beside it, a batch of {b} probe{'s' * (b > 1)} with "
        f"{'their products' if b > 1 else 'its product'} and the operator's buffers "
        f"({PROBE_VECTORS * b} vectors): "
        f"max(2k, k + {PROBE_VECTORS}b) = {held} vectors",
        held * vec,
        device,
        (f"pass {' or '.join(ways)}, " if ways else "")
        + f"{more}, or use method='hutchinson', whose memory does not grow with the probes",
        budget=budget,
    )


def _hutchpp_check_memory(
    op,
    num_matvecs: int,
    k: int,
    batch_size: int | None,
    memory_budget: float | None,
    dtype: torch.dtype,
) -> int:
    """The batch size of :func:`hutchpp`, after one check of all it holds, before any product.

    Hutch++ holds the sketch (``k`` parameter-vectors; ``2k`` while ``A S`` is factorised into
    ``Q``) and, beside it, one batch of ``b`` probes with their products and the operator's
    buffers (:data:`PROBE_VECTORS` ``* b``): ``max(2k, k + 4b)`` vectors at its peak (found in
    review: the refusal quoted ``memory_budget - k`` vectors as the caller's ``memory_budget``,
    refusing a budget equal to the need, and the sketch's ``2k`` alone was checked where
    ``k + 4 > 2k``). Under ``torch.distributed`` every rank takes the smallest batch and a
    refusal on one rank is raised on all (:func:`agree`).

    Raises:
        EstimatorMemoryError: when ``max(2k, k + 4b)`` vectors exceed ``memory_budget`` or the
            memory available, with the total and the caller's own budget.
    """
    dim = op.shape[0]
    vec = vector_bytes(dim, dtype)
    comm = getattr(op, "_comm", None)
    b = agree(comm, _hutchpp_batch(k, vec, op.device, batch_size, memory_budget), None)
    try:
        _hutchpp_require(dim, dtype, op.device, num_matvecs, k, b, batch_size, memory_budget)
        refusal = None
    except EstimatorMemoryError as exc:
        refusal = exc
    agree(comm, 0, refusal)  # a refusal on one rank stops all of them
    return b


def block_group(
    op, num_blocks: int, memory_budget: float | None, what: str = "block_hutchinson"
) -> int:
    """How many of :func:`block_hutchinson`'s ``num_blocks`` restricted probes go through the
    operator at once (:func:`probe_batch`, all where ``memory_budget`` allows); refused with the
    numbers where one probe does not fit, naming ``what``. ``trace(method="ggn_cv")`` calls it
    before the exact GGN trace, whose passes a refusal here would waste (and names itself: its
    refusal named block_hutchinson, found in review s19)."""
    return probe_batch(op, num_blocks, None, memory_budget, what, num_blocks)


_BLOCK_NAMES = {"block": "block_hutchinson", "ggn_cv": "trace(method='ggn_cv')"}
"""How a budget refusal names the estimator of ``trace(method=...)``'s block probes."""


def check_trace_plan(
    method: str,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    num_probes: int,
    batch_size: int | None,
    memory_budget: float | None,
) -> None:
    """What the trace estimator of ``method`` would refuse on an operator of ``dim`` entries of
    ``dtype`` on ``device`` that the arguments alone decide (probe blocks, Hutch++'s sketch or a
    ``batch_size`` that cannot fit ``memory_budget``), refused the same way and with the same
    message; :func:`curvlab.trace` checks this before it reads the data (found in review: such a
    budget was refused after the operator's forward and backward pass, and for
    ``method="ggn_cv"`` after the whole exact GGN trace). The memory available is consulted
    later, by the estimator. Not for the one-pass exact diagonals of the GGN and the Fishers,
    which hold no probe blocks.

    Args:
        method: one of :data:`curvlab.estimators.TRACE_METHODS`.
        dim: the selected parameters' count ``D``.
        dtype: the operator's dtype (the model's; vectors are kept in :func:`storage_dtype`).
        device: the operator's device.
        num_probes, batch_size, memory_budget: as in :func:`curvlab.trace` (checked already by
            :func:`check_trace_args`).

    Raises:
        EstimatorMemoryError: a need above ``memory_budget``, with the numbers.
    """
    stored = storage_dtype(dtype)
    if method == "hutchinson":
        batch_plan(
            dim,
            stored,
            device,
            num_probes,
            batch_size,
            memory_budget,
            "hutchinson",
            available=False,
        )
    elif method in ("block", "ggn_cv"):  # one probe with its product at the least
        batch_plan(
            dim, stored, device, 1, None, memory_budget, _BLOCK_NAMES[method], 1, available=False
        )
    elif method == "hutch++":
        k = _hutchpp_sketch(int(num_probes), dim)
        vec = vector_bytes(dim, stored)
        b = _hutchpp_batch(k, vec, device, batch_size, memory_budget, available=False)
        _hutchpp_require(dim, stored, None, int(num_probes), k, b, batch_size, memory_budget)
    elif method == "exact":  # unit vectors in the operator's own dtype, as exact_trace
        batch_plan(
            dim,
            dtype,
            device,
            dim,
            batch_size,
            memory_budget,
            "exact_trace",
            64,
            available=False,
        )


@checks_values_once
def exact_trace(
    op,
    blocks: BlocksArg | None = None,
    batch_size: int | None = None,
    *,
    memory_budget: float | None = None,
) -> TraceResult:
    """``sum_i e_i^T A e_i`` with ``D`` products in batches of unit vectors.

    Args:
        op: the operator.
        blocks: as in :func:`hutchinson`; per-block traces are returned in ``by_layer``.
        batch_size: unit vectors per batched product (default: 64, fewer where
            ``memory_budget`` says so).
        memory_budget: bytes a batch may take (default: the smaller of
            :data:`PROBE_BLOCK_BYTES`, 1 GiB, and half the memory available;
            ``float("inf")``: no budget, only the memory available).

    Raises:
        ValueError: for a ``batch_size`` that is not a positive int (found in review:
            ``batch_size=-1`` ran no product and returned the sum of uninitialised memory) or a
            ``memory_budget`` that is not a number of bytes, before any product.
        EstimatorMemoryError: (a ``MemoryError``) when a batch does not fit.
    """
    op = check_operator(op)
    _check_batch_size(batch_size)
    check_memory_budget(memory_budget)
    blocks = check_blocks(blocks)
    dim = op.shape[0]
    _check_disjoint_within(blocks, dim)
    step = probe_batch(op, dim, batch_size, memory_budget, "exact_trace", 64, op.dtype)
    diag = torch.empty(dim, device=op.device, dtype=storage_dtype(op.dtype))
    for start in range(0, dim, step):
        stop = min(dim, start + step)
        E = torch.zeros(stop - start, dim, device=op.device, dtype=op.dtype)
        idx = torch.arange(start, stop, device=op.device)
        E[idx - start, idx] = 1
        diag[start:stop] = checked_matmat(op, E.T)[idx, idx - start]
        del E
    check_products_finite(diag, "the curvature product with unit vector", op=op)
    by_layer = None
    if blocks is not None:
        by_layer = {n: float(sum(diag[s].sum() for s in sl)) for n, sl in blocks.items()}
    total = float(diag.to(torch.float64).sum())
    return TraceResult(total, 0.0, dim, None, "exact", 0, by_layer, None)
