"""The gradient noise scale from data-parallel gradients (McCandlish et al. 2018, appendix A).

With ``R`` ranks each holding ``b_r`` examples, rank ``r``'s mean gradient ``g_r`` is a small-batch
gradient and their example-weighted mean ``G`` (the gradient of all ``N = sum_r b_r`` examples) a
big-batch one. For examples drawn independently from a distribution with mean gradient ``G*`` and
per-example covariance ``Sigma``,

    ``E ||g_r||^2 = ||G*||^2 + tr(Sigma) / b_r``,     ``E ||G||^2 = ||G*||^2 + tr(Sigma) / N``.

Averaging the first over the ranks, ``S = (1/R) sum_r ||g_r||^2`` has expectation
``||G*||^2 + tr(Sigma) h`` with ``h = (1/R) sum_r 1/b_r``, so

    ``tr(Sigma)_est = (S - ||G||^2) / (h - 1/N)``,   ``||G*||^2_est = ||G||^2 - tr(Sigma)_est / N``

are unbiased (for equal ``b_r = b`` these are McCandlish et al.'s Eqs. A.2/A.3 with
``B_small = b``, ``B_big = R b``), and ``B_simple = tr(Sigma)_est / ||G*||^2_est`` is their ratio
(consistent, not unbiased, as the paper notes; average the two estimates over steps before
dividing for a less noisy value). The cost is one backward pass of the plain gradient per rank
(no per-example gradients) and one all-reduce of one parameter-vector plus twelve numbers (the
rank's ``||g_r||^2``, ``1/b_r``, whether it counts and whether it failed, and ``b_r`` and its
weight as exact integer digits, four each).

A rank whose own pass fails (a label out of range, a non-finite input, an empty shard: bad data on
that rank only) still takes part in the all-reduce, with a failure flag, so every rank raises
together and none is left waiting in a collective that the failed rank's next one (a DDP
gradient all-reduce) would then meet: the failed rank re-raises its own error, the others a
``RuntimeError`` that names the failed ranks and quotes the first error (one more, small
collective on this path only).

Under ``ignore_index`` the per-example weights are token counts; ``G`` is then the token-weighted
mean gradient (the gradient of the global objective) and the estimate assumes examples with equal
token counts. A rank whose every target is ignored has no ``g_r`` (``0 / 0``) and adds nothing to
``G``: it is left out, so ``R``, ``h``, ``S`` and ``N`` count only the ranks with counted loss
terms, and the estimates above stay unbiased for those ranks' examples. Fewer than two such ranks
leave no second batch size to compare: a ``ValueError`` says so (on every rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import call_model, iter_chunks
from curvlab._losses import loss_spec
from curvlab._notrace import leave_no_trace
from curvlab._precision import accumulation_dtype, upcast
from curvlab._scan import scan_model
from curvlab._selection import refuse_complex_model
from curvlab.distributed import Comm, active, collective, decode_counts, encode_counts, group_scope
from curvlab.quantities._sweep import DEFAULT_CHUNK_SIZE, Counter

__all__ = ["DataParallelNoiseScale", "data_parallel_noise_scale", "noise_scale_from_gradients"]


@dataclass
class DataParallelNoiseScale:
    """McCandlish et al.'s estimates from ``R`` per-rank gradients and their mean.

    Attributes:
        noise_scale: ``B_simple = trace_covariance / grad_norm_sq``, the plain ratio of the
            two estimates whatever their signs: negative where one of them came out negative
            (sampling noise: few ranks, or a mean gradient small next to its noise, so that
            ``||G||^2 < trace_covariance / N``), NaN where ``grad_norm_sq`` is 0. Until review s17 it was inf wherever ``grad_norm_sq <= 0``, which hid the
            sign and broke averaging; average ``trace_covariance`` and ``grad_norm_sq`` over
            steps before dividing for a steadier value.
        trace_covariance: unbiased estimate of ``tr(Sigma)``.
        grad_norm_sq: unbiased estimate of ``||G*||^2``.
        small_batch_sq: ``(1/R) sum_r ||g_r||^2``.
        big_batch_sq: ``||G||^2`` of the mean gradient of all ranks.
        num_ranks: ``R``, the ranks whose shard holds a counted loss term (all ranks unless some
            shard's targets are all ``ignore_index``).
        num_examples: ``N``, those ranks' examples.
        info: how it was computed where that is not the default (``"compiled"``: a
            ``torch.compile``d model, docs/training-loops.md; ``"ranks_left_out"``: how many
            ranks' shards held no counted loss term and were left out).
    """

    noise_scale: float
    trace_covariance: float
    grad_norm_sq: float
    small_batch_sq: float
    big_batch_sq: float
    num_ranks: int
    num_examples: int
    info: dict[str, Any] = field(default_factory=dict)


def _need_comm() -> Comm:
    comm = active()
    if comm is None:
        raise ValueError(
            "the data-parallel noise scale needs torch.distributed initialised with at least 2 "
            "processes (it compares each rank's gradient with their mean); in one process use "
            "cl.gradient_stats(model, loss_fn, data).noise_scale (exact, per-example gradients)"
        )
    return comm


def refuse_one_process(entry: str, after: str) -> None:
    """Refuse the ``"noise_scale_dp"`` quantity of ``entry`` (``"analyze"``, ``"Diagnostics"``)
    without a group of at least 2 processes (``torch.distributed`` not initialised, a group of
    one, or ``process_group="local"``; the group in scope: the caller's ``process_group``): the
    quantity failed at every measured step or checkpoint, after the other quantities' work
    (``Diagnostics``: review s18; ``analyze``: review s25, which also read the data first).

    Args:
        entry: the entry point, as the message names it.
        after: the way out under torchrun, e.g. ``"call analyze after ..."``.

    Raises:
        ValueError: the data-parallel noise scale's own message, with the one-process way out
            (the ``"noise_scale"`` quantity) and ``after``.
    """
    try:
        _need_comm()
    except ValueError as exc:
        raise ValueError(
            f"quantities holds 'noise_scale_dp', but {exc}; in {entry} that is the "
            f"'noise_scale' quantity. Under torchrun, {after}"
        ) from None


def _estimate(
    comm: Comm,
    weighted: list[Tensor],
    weight: Any,
    small_sq: Tensor,
    batch: int,
    failure: Exception | None = None,
) -> DataParallelNoiseScale:
    """One all-reduce of ``[sum_r weight_r g_r, ||g_r||^2, 1/b_r, 1, failed]`` and the digits of
    the integers ``[b_r, weight_r]``; all but the first and ``weight_r`` are zero on a rank whose
    weight (count) is zero, which has no ``g_r``.

    ``failure``: this rank's pass raised it (its other arguments are then zeros of the right
    shapes); every rank raises after the all-reduce (:func:`_raise_together`).

    Raises:
        ValueError: on every rank, when fewer than two ranks have a nonzero weight.
        Exception: on every rank, when a rank's pass failed (``failure`` there, a
            ``RuntimeError`` naming it elsewhere).
    """
    # 16-bit gradients travel and are summed in float32: in bfloat16 the near-cancelling
    # differences below lost |G|^2 by a third
    flat = torch.cat([upcast(t.reshape(-1)) for t in weighted])
    dtype, device = flat.dtype, flat.device
    counted = torch.as_tensor(weight, device=device) > 0  # no host synchronisation
    zero = torch.zeros((), dtype=dtype, device=device)
    extra = torch.stack(
        [
            torch.where(counted, small_sq.to(device=device, dtype=dtype), zero),
            torch.where(
                counted, torch.tensor(1.0 / max(batch, 1), dtype=dtype, device=device), zero
            ),
            counted.to(dtype),  # ranks: exact in float32 up to 2**24
            torch.tensor(float(failure is not None), dtype=dtype, device=device),
        ]
    )
    ints = [counted.to(torch.int64) * batch, weight]
    buffer = torch.cat([flat, extra, encode_counts(ints, dtype, device)])
    comm.all_reduce_(buffer)
    d = flat.numel()
    if round(float(buffer[d + 3])):
        _raise_together(comm, failure)

    n_total, w_total = decode_counts(buffer[d + 4 :], 2)
    ranks = round(float(buffer[d + 2]))
    if ranks < 2:
        raise ValueError(
            f"the data-parallel noise scale compares the mean gradients of at least 2 ranks, but "
            f"on {comm.size - ranks} of the {comm.size} ranks every target is ignore_index (no "
            f"counted loss term, so no mean gradient), which leaves {ranks}; give at least 2 "
            f"ranks counted targets, or use cl.gradient_stats(model, loss_fn, data).noise_scale "
            f"(exact, per-example gradients)"
        )
    big = buffer[:d].double() / w_total
    big_sq = float((big * big).sum())
    small = float(buffer[d]) / ranks
    h = float(buffer[d + 1]) / ranks
    tr = (small - big_sq) / (h - 1.0 / n_total)
    g2 = big_sq - tr / n_total
    est = DataParallelNoiseScale(
        noise_scale=tr / g2 if g2 != 0 else math.nan,
        trace_covariance=tr,
        grad_norm_sq=g2,
        small_batch_sq=small,
        big_batch_sq=big_sq,
        num_ranks=ranks,
        num_examples=n_total,
    )
    if ranks < comm.size:
        est.info["ranks_left_out"] = comm.size - ranks
    return est


def _raise_together(comm: Comm, failure: Exception | None) -> None:
    """Raise on every rank after a rank's pass failed: ``failure`` where it happened, else a
    ``RuntimeError`` naming the failed ranks and quoting the first one's error (one gather of
    the messages, which every rank enters: they all saw the failure flag)."""
    mine = None if failure is None else f"{type(failure).__name__}: {failure}"
    messages = comm.all_gather_object(mine)
    if failure is not None:
        raise failure
    failed = [r for r, m in enumerate(messages) if m is not None]
    raise RuntimeError(
        f"the data-parallel noise scale failed on rank(s) {failed} (every rank raises, so "
        f"that none is left waiting in a collective); rank {failed[0]}: {messages[failed[0]]}"
    )


def noise_scale_from_gradients(
    gradients: dict[str, Tensor] | list[Tensor], batch_size: int, *, process_group: Any = None
) -> DataParallelNoiseScale:
    """``B_simple`` from this rank's mean gradient over its ``batch_size`` examples.

    Call it on every rank with the gradient of the rank's own mean loss, taken *before* DDP
    averages it (e.g. the backward pass inside ``with ddp_model.no_sync():``). One all-reduce.
    The big-batch gradient is the ``batch_size``-weighted mean of the ranks' gradients.

    Every entry must be a tensor, in the same order and of the same shape on every rank. A
    ``None`` (the ``.grad`` of a parameter the loss did not reach) is refused, not read as zero:
    it carries no shape, so the ranks' buffers would no longer line up. Leave that parameter out
    on every rank, or pass ``torch.zeros_like(param)``. A sparse tensor (the ``.grad`` of an
    ``nn.Embedding(sparse=True)``) is made dense first, its repeated rows summed (until review
    s17 it raised on ``reshape``).

    Raises:
        ValueError: without ``torch.distributed`` (or with one process), for an empty batch, or
            for an entry that is not a tensor (naming it).
        TypeError: for a complex entry (naming it; pass ``torch.view_as_real`` of it).
    """

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    named = list(gradients.items()) if isinstance(gradients, dict) else list(enumerate(gradients))
    if not named:
        raise ValueError("gradients is empty; pass the rank's gradient tensors")
    for key, t in named:
        if not isinstance(t, Tensor):
            raise ValueError(
                f"gradients[{key!r}] is {type(t).__name__}, not a tensor (a parameter that got no "
                f"gradient has .grad None); leave the parameter out on every rank, or pass "
                f"torch.zeros_like(param) if its gradient is zero"
            )
        if t.is_complex():  # before the all-reduce: every rank holds the same dtypes and raises
            # (review s27: squared as t.double() ** 2, the imaginary part cast away: -94.51
            # for -52.95)
            raise TypeError(
                f"gradients[{key!r}] is complex ({t.dtype}): complex parameters are not "
                f"supported; pass torch.view_as_real(grad) (its real and imaginary parts as two "
                f"real coordinates), or split the parameter into two real ones"
            )
    # a sparse gradient (nn.Embedding(sparse=True)), dense: an uncoalesced one's repeated rows
    # are summed first (squaring its entries gave sum a_i^2, not (sum a_i)^2), and it flattens
    tensors = [_dense(t) for _, t in named]
    with group_scope(process_group):
        comm = _need_comm()
        small_sq = sum((t.detach().double() ** 2).sum() for t in tensors)
        weighted = [upcast(t.detach()) * batch_size for t in tensors]
        return _estimate(comm, weighted, batch_size, torch.as_tensor(small_sq), batch_size)


def _dense(t: Tensor) -> Tensor:
    """``t`` as a strided tensor: a sparse COO one coalesced (repeated indices summed), then
    made dense, as is one of any other sparse layout; a strided one as it is."""
    if t.layout == torch.strided:
        return t
    return (t.coalesce() if t.is_sparse else t).to_dense()


@collective
def data_parallel_noise_scale(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> DataParallelNoiseScale:
    """``B_simple`` from the plain gradient of every rank's shard (see the module docstring).

    One forward and backward pass per chunk of this rank's ``data`` (no per-example gradients)
    and one all-reduce; the model is left as it was. Every rank gets the same numbers.

    Example (under ``torchrun --nproc-per-node 2``)::

        est = cl.analysis.data_parallel_noise_scale(model, loss_fn, (x_shard, y_shard))
        est.noise_scale, est.trace_covariance, est.grad_norm_sq
    """
    comm = _need_comm()
    spec = loss_spec(loss_fn)
    # before any pass: every rank holds the same model and raises (review s27: a complex
    # gradient squared as t.double() ** 2 cast its imaginary part away, -94.51 for -52.95)
    refuse_complex_model(model)
    scan = scan_model(model)
    params = list(scan.trainable.values())
    raw = [  # 16-bit parameters: float32 sums
        torch.zeros_like(
            p, dtype=accumulation_dtype(p.dtype), memory_format=torch.contiguous_format
        )
        for p in params
    ]
    counter = Counter(spec)
    failure: Exception | None = None
    try:  # this rank's data alone: a failure here joins the all-reduce, flagged
        with leave_no_trace(model, scan=scan):
            for inputs, targets in iter_chunks(data, chunk_size, scan.device):
                output = spec.prepare(call_model(model, inputs), targets)
                spec.check_classes(output, targets)  # before the loss (torch raises there)
                counter.on_output(output, targets)
                counter.add(inputs, targets)
                loss = spec.nll_sum(output, targets)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for acc, g in zip(raw, grads):
                    if g is not None:
                        acc.add_(g.detach())
        if counter.examples == 0:
            raise ValueError(
                "data is empty: it yielded no batch; pass at least one (inputs, targets)"
            )
    except Exception as exc:  # noqa: BLE001 - raised on every rank by _estimate
        failure = exc
        for acc in raw:
            acc.zero_()
        counter = Counter(spec)
    count = counter.count
    m_r = torch.as_tensor(count, device=scan.device).double()
    # a shard with every target ignored has no mean gradient (0 / 0): _estimate leaves it out
    small_sq = sum((t.double() ** 2).sum() for t in raw) / (m_r * m_r).clamp(min=1.0)
    return _estimate(comm, raw, count, torch.as_tensor(small_sq), counter.examples, failure)
