"""Diagonals of the Fisher, the generalised Gauss-Newton matrix and the Hessian."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvlab._compiled import strip_wrappers
from curvlab._data import (
    check_chunk_size,
    iter_chunks,
    num_examples,
    read_again,
    slice_inputs,
    to_device,
)
from curvlab._fsdp import supports_fsdp2
from curvlab._layout import examples_mixed
from curvlab._losses import LossSpec, loss_spec
from curvlab._notrace import leave_no_trace
from curvlab._numbers import is_count
from curvlab._precision import accumulation_dtype
from curvlab._results import ParamDict, check_finite, scale_
from curvlab._rng import check_randomness, make_generator
from curvlab._scan import ModelScan, model_device, scan_model
from curvlab._selection import Params, select_parameters
from curvlab._vocabulary import quantity_kind
from curvlab.backends import Handover, candidates, model_facts
from curvlab.backends._choice import SignatureMemo, signature
from curvlab.backends._func import dense_embeddings
from curvlab.backends._validation import check_batchnorm
from curvlab.distributed import active, collective, failing_together, rank_generator
from curvlab.estimators._protocol import values_checked_once
from curvlab.quantities._sweep import DEFAULT_CHUNK_SIZE, replayable, sweep

__all__ = ["diag_fisher", "diag_hessian", "FISHER_KINDS"]

FISHER_KINDS = ("empirical", "mc", "exact")


@supports_fsdp2  # a fully_shard model: unsharded for the call (curvlab/backends/_fsdp2.py)
@collective
def diag_fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    kind: str = "empirical",
    *,
    mc_samples: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    params: Params = None,
) -> ParamDict:
    """Diagonal of a Fisher matrix of the objective ``L = loss_fn(model(X), y)`` on all of ``data``.

    With ``g_n`` example ``n``'s gradient under the mean convention and ``s_n`` its share of the sum
    (see docs/conventions.md):

    * ``kind="empirical"``: ``diag((1/N) sum_n g_n g_n^T)`` under ``"mean"``,
      ``diag(sum_n s_n s_n^T)`` under ``"sum"``; data labels.
    * ``kind="mc"``: the Monte-Carlo Fisher, labels ``y_hat`` drawn ``mc_samples`` times per example
      from the model's predictive distribution; unbiased for the GGN diagonal.
    * ``kind="exact"``: the diagonal of the generalised Gauss-Newton matrix ``sum J^T H_f J`` of L,
      which is the true Fisher for these losses.

    Args:
        model: the model, used in the mode it is in (BatchNorm must be in eval mode).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        data: one ``(inputs, targets)`` batch or an iterable of batches.
        kind: ``"empirical"``, ``"mc"`` or ``"exact"``.
        mc_samples: label draws per example for ``kind="mc"`` (a positive int).
        seed: seed of the label draws (``kind="mc"``); ``None`` means 0. An int or ``None``
            for every kind (the other kinds draw nothing and do not use it).
        generator: a ``torch.Generator`` on the model's device instead of ``seed`` (a
            ``torch.Generator`` or ``None`` for every kind).
        chunk_size: at most this many examples are processed at once (bounds memory; a
            positive int, or ``None`` to keep the batches as they are).
        backend: ``"auto"`` (default: the fastest backend that computes the model exactly: curvlab's
            own layer hooks for ``"empirical"``/``"mc"`` when every trainable parameter is in its
            own Linear/Conv layer, then BackPACK, then ``torch.func`` for any model),
            ``"hooks"``, ``"backpack"`` or ``"func"``; see docs/models.md.
        params: only these parameters (names, module prefixes or a predicate ``(name, param) ->
            bool``, as for :func:`~curvlab.curvature_operator`); ``None``: every trainable one.
            The diagonal of a block is the block of the diagonal, so the values are those of the
            whole-model call; the pass itself still runs over the whole model.
        process_group: under ``torch.distributed``, ``data`` is this rank's shard and the result
            is that of all ranks' shards (``None``: the default group; a group; or ``"local"``
            for this rank alone); see docs/distributed.md. A ``fully_shard`` (FSDP2) model is
            accepted, with each rank's shard of the data: every kind, exact, the results full
            tensors identical on every rank (docs/distributed.md, "FSDP2").

    Returns:
        A dict parameter name -> diagonal shaped like the parameter (``.backend`` says who computed it).

    Example:
        >>> import torch, curvlab as cl
        >>> model = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> F = cl.diag_fisher(model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> F["weight"].shape
        torch.Size([2, 3])
    """
    kind = quantity_kind(kind, FISHER_KINDS)
    if not is_count(mc_samples):  # a bool is not a count (True ran one sample, found in review)
        raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
    mc_samples = int(mc_samples)
    check_chunk_size(chunk_size)
    # a seed or generator of the wrong type is refused for every kind, before the data is read
    # (found in review: kind="empirical" took seed="a", generator=5 without a word)
    check_randomness(seed, generator, both=kind == "mc")
    chosen = list(select_parameters(model, params))  # refuses complex parameters (review s27)
    keep = None if params is None else chosen
    gen = None
    if kind == "mc":
        gen = make_generator(
            seed, generator, model_device(model) if isinstance(model, nn.Module) else "cpu"
        )
        gen = rank_generator(gen)  # under torch.distributed: other labels on every rank

    if kind == "empirical":

        def fn(be, s, X, y):  # noqa: ANN001, ANN202
            return be.sum_grad_squared(s, X, y, with_grad=False)[0]

    elif kind == "mc":

        def fn(be, s, X, y):  # noqa: ANN001, ANN202
            return be.sum_grad_squared(s, X, y, mc_samples=mc_samples, generator=gen)[0]

    else:

        def fn(be, s, X, y):  # noqa: ANN001, ANN202
            return be.diag_ggn(s, X, y)

    raw, info = sweep(
        model,
        loss_fn,
        data,
        fn,
        needs={"diag_ggn"} if kind == "exact" else {"sum_grad_squared"},
        chunk_size=chunk_size,
        backend=backend,
        generator=gen,
        defer_checks=True,
    )
    if keep is not None:
        raw = {n: raw[n] for n in keep}
    result = scale_(raw, info.empirical_weight if kind == "empirical" else info.ggn_weight)
    check_finite(result, f"diag_fisher(kind={kind!r})", info.unchecked)
    return ParamDict(
        result,
        backend=info.backend,
        kind=kind,
        reduction=info.spec.reduction,
        num_examples=info.num_examples,
        mc_samples=mc_samples if kind == "mc" else None,
        handed_over=info.handed_over,
        fallbacks=info.fallbacks,
    )


MAX_COLUMNS_PARAMETERS = 50_000
"""Largest model for the exact column-by-column Hessian diagonal (``O(d)`` Hessian products)."""


@collective
def diag_hessian(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    block_size: int = 64,
    params: Params = None,
) -> ParamDict:
    """Diagonal of the Hessian ``nabla^2 L`` of the objective on all of ``data``.

    Under ``"mean"`` this is the Hessian of the example-weighted mean loss, under ``"sum"`` of the
    total. ``backend="backpack"`` uses BackPACK's ``DiagHessian`` (one pass; needs a plain
    ``nn.Sequential`` chain of BackPACK's layers without BatchNorm or tied weights).
    ``backend="columns"`` (alias ``"func"``) reads the diagonal off exact Hessian-matrix products
    with blocks of ``block_size`` unit vectors (``d / block_size`` batched double-backward passes,
    any differentiable model: residual connections, BatchNorm in eval mode, transformers, tied
    weights; models of at most 50,000 parameters). ``"auto"`` (default) takes BackPACK where it
    applies, else the columns. ``params`` (names, module prefixes or a predicate, as for
    :func:`~curvlab.curvature_operator`) restricts the result to those parameters; the columns
    then cost ``d_selected / block_size`` products, so the Hessian diagonal of one layer of a
    large model is within reach (the 50,000 limit counts the selected parameters; ``"auto"``
    takes the columns for a selection of at most ``64 * block_size`` parameters). Under
    ``torch.distributed`` every rank takes the same route: where BackPACK hands over on one
    rank's shard only (a ``channels_last`` batch, an input size without a rule), every rank takes
    the columns (found in review s19: that rank ran the columns' collectives against the
    others' all-reduce, and gloo aborted). On the columns too, a batch of one rank's shard that
    fails (a class label out of range, a non-finite input) raises on every rank, the others
    naming that rank, before the operator's collectives (until review s20 it raised there
    alone, and the others waited until the process group's timeout).

    16-bit models: float32 results; BackPACK's loss-Hessian factors and the output gradient its
    residual terms are formed from are float32, scaled by powers of two before the 16-bit
    backward pass and unscaled exactly after (as the columns' Hessian products are), so a
    confident float16 classifier's diagonal (``1e-9`` to ``1e-12``) keeps float16's relative
    accuracy (it was 11% off, or 0, before review s18).

    Memory: at most ``chunk_size`` examples go through at once on every backend (``None``: the
    batches as they are). The columns keep the autograd graph of the data across their products
    while the data holds at most ``chunk_size`` examples in all; beyond that each product runs
    the chunks' passes again, one chunk at a time (more time, memory of one chunk). The
    Hessian is that of each batch's loss as given: on the columns a batch larger than
    ``chunk_size`` is split only after a check (once per call signature, without gradient, on
    its first ``chunk_size`` examples and two of them alone) found that the model keeps its
    examples apart; a model that mixes them (``F.batch_norm(x, None, None, training=True)``,
    ``z - z.mean(0)``, in-batch contrastive logits) has each such batch go through whole, more
    than ``chunk_size`` examples at once (found in review s24: each chunk was normalised by
    itself, the diagonal 111% off with ``chunk_size=3`` on a batch of 8).

    Example:
        >>> import torch, curvlab as cl
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> H = cl.diag_hessian(model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> sorted(H)
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    if backend not in ("auto", "backpack", "columns", "func"):
        raise ValueError(
            f"backend must be 'auto', 'backpack', 'columns' or 'func', got {backend!r}"
        )
    if not is_count(block_size):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    block_size = int(block_size)
    check_chunk_size(chunk_size)  # before the data, for every backend (the columns read it too)
    selected = select_parameters(model, params)
    keep = None if params is None else list(selected)
    scan = scan_model(model)
    if backend == "auto":
        few = keep is not None and sum(p.numel() for p in selected.values()) <= block_size * 64
        if few or not _backpack_handles_hessian(scan):
            backend = "columns"  # a small selection: its columns cost less than a BackPACK pass
    if backend in ("columns", "func"):
        return _diag_hessian_columns(model, loss_fn, data, block_size, params, chunk_size)
    data = replayable(data)
    try:
        raw, info = sweep(
            model,
            loss_fn,
            data,
            lambda be, s, X, y: be.diag_hessian(s, X, y),
            needs={"diag_hessian"},
            chunk_size=chunk_size,
            backend="auto" if backend == "auto" else "backpack",
            scan=scan,
        )
    except Handover as h:  # only under "auto": BackPACK found it cannot (outputs with positions)
        first = getattr(h, "first_chunk", None)
        return _diag_hessian_columns(model, loss_fn, data, block_size, params, chunk_size, first)
    if keep is not None:
        raw = {n: raw[n] for n in keep}
    result = scale_(raw, info.ggn_weight)
    check_finite(result, "diag_hessian")
    return ParamDict(
        result, backend=info.backend, reduction=info.spec.reduction, num_examples=info.num_examples
    )


def _backpack_handles_hessian(scan: ModelScan) -> bool:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for _, m in scan.modules):
        return False
    chosen = candidates("auto", model_facts(scan), {"diag_hessian"})
    return any(be.name == "backpack" for be in chosen)


def _diag_hessian_columns(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    block_size: int,
    params: Params = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    first: Any = None,
) -> ParamDict:
    """Exact diagonal from Hessian products with blocks of unit vectors.

    ``first``: the first chunk an earlier reading of ``data`` gave (BackPACK's sweep before it
    handed over), which this reading must give again: a loader over a one-shot iterator is no
    ``Iterator`` and, read again, gave only the batches not yet read (found in review).

    The data goes to the operator in chunks of at most ``chunk_size`` examples, whose graphs it
    keeps across the products only while they hold at most ``chunk_size`` examples in all
    (found in review: the columns ignored ``chunk_size`` and kept the graph of all the data).
    A batch of a model that mixes its examples goes whole (:func:`_split`).
    The products run with ``sparse=False`` on the model's embeddings (:func:`~curvlab.backends.
    _func.dense_embeddings`: the same values; a sparse weight gradient crashed in the product).
    """
    loss_spec(loss_fn)
    scan = scan_model(model)
    check_batchnorm(scan)
    with dense_embeddings(scan):  # Embedding(sparse=True): dense Hessian products, same values
        return _columns(model, loss_fn, data, block_size, params, chunk_size, first)


def _columns(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    block_size: int,
    params: Params,
    chunk_size: int | None,
    first: Any = None,
) -> ParamDict:
    """The body of :func:`_diag_hessian_columns`, after its checks."""
    from curvlab.operators import curvature_operator

    dim = sum(p.numel() for p in select_parameters(model, params).values())
    if dim > MAX_COLUMNS_PARAMETERS:
        raise ValueError(
            f"the exact Hessian diagonal of this model needs {dim} Hessian products (it has {dim} "
            "parameters and BackPACK's DiagHessian cannot handle it); estimate it instead, e.g. "
            "with cl.trace(..., by_layer=True), use diag_fisher(kind='exact') (the GGN), or "
            "select a few layers with params="
        )
    # a batch of one rank's shard that fails its checks (a non-finite input, an empty batch)
    # raises on every rank, the others naming that rank, before the operator's collectives
    # (found in review s20: that rank raised alone, the others waited in the operator's
    # all-reduce of the counts until the process group's timeout)
    with failing_together(active(), model_device(model)):
        if first is None:
            chunks = _split(model, loss_spec(loss_fn), data, chunk_size)
        else:  # read before by the sweep of BackPACK, which handed over: every module is one
            # of BackPACK's (BatchNorm in train mode refused), none mixes the examples
            rest, again = read_again(
                data,
                chunk_size,
                None,
                first,
                "after BackPACK found that it cannot compute this model's Hessian diagonal and "
                "handed over to Hessian products, which must start from the first batch",
                "backend='columns' to start with the products",
            )
            chunks = [again, *rest]
    total = sum(num_examples(inputs) for inputs, _ in chunks)
    keep = chunk_size is None or total <= chunk_size  # the graphs of at most chunk_size examples
    op = curvature_operator(
        model, loss_fn, chunks, matrix="hessian", params=params, keep_graph=keep
    )
    dtype = accumulation_dtype(op.dtype)  # float32 results for 16-bit parameters
    diag = torch.empty(dim, dtype=dtype, device=op.device)
    with values_checked_once(op, "diag_hessian"):  # before the first product, after the last
        for start in range(0, dim, block_size):
            stop = min(start + block_size, dim)
            E = torch.zeros(dim, stop - start, dtype=dtype, device=op.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            diag[start:stop] = torch.diagonal(op.matmat(E)[start:stop])
    result = op.unflatten(diag)
    check_finite(result, "diag_hessian")
    reduction = loss_fn.reduction
    return ParamDict(dict(result), backend="columns", reduction=reduction, block_size=block_size)


_MIXES: SignatureMemo[bool] = SignatureMemo()
"""Whether the model of a signature (:func:`~curvlab.backends._choice.signature`) mixes the
examples of its batches: :func:`_split` checks once per signature (64 kept)."""


def _split(model: nn.Module, spec: LossSpec, data: Any, chunk_size: int | None) -> list[Any]:
    """The batches of ``data`` in chunks of at most ``chunk_size`` examples, but a batch of a
    model that mixes the examples of a batch whole.

    The Hessian is of the loss of each batch as given: a model that mixes the examples
    (``F.batch_norm(x, None, None, training=True)``, ``z - z.mean(0)``, in-batch contrastive
    logits) computes another function on each chunk of a batch (found in review: with
    ``chunk_size=3`` on a batch of 8 through a functional batch norm the diagonal was 111% off,
    ``0.1021`` for ``0.0782``). So a batch that would be split is first checked
    (:func:`~curvlab._layout.examples_mixed`: one pass without gradient on its first
    ``chunk_size`` examples, and one on two of them alone; once per signature), and one whose
    examples mix goes to the operator whole: its passes then hold the whole batch, more than
    ``chunk_size`` examples (the memory of the batch the model was written for). A batch of at
    most ``chunk_size`` examples (or ``chunk_size=None``) is not checked.
    """
    plain = strip_wrappers(model)
    scan = scan_model(plain)
    device = model_device(plain)
    chunks: list[Any] = []
    for inputs, targets in iter_chunks(data, None):
        n = num_examples(inputs)
        if (
            chunk_size is None
            or n <= chunk_size
            or _mixes(plain, scan, spec, inputs, targets, device, chunk_size)
        ):
            chunks.append((inputs, targets))
            continue
        for start in range(0, n, chunk_size):
            stop = start + chunk_size
            chunks.append((slice_inputs(inputs, start, stop), targets[start:stop]))
    return chunks


def _mixes(
    model: nn.Module,
    scan: ModelScan,
    spec: LossSpec,
    inputs: Any,
    targets: torch.Tensor,
    device: torch.device,
    chunk_size: int,
) -> bool:
    """Whether ``model`` (no wrapper) mixes the examples of ``inputs`` or fails on some of them
    (most likely a batch without a batch axis): either way the batch cannot be split. Checked on
    its first ``chunk_size`` examples (two at least)."""
    key = signature(scan, spec, frozenset({"diag_hessian_split"}), "columns", inputs, targets)
    known = _MIXES.get(key)
    if known is None:
        # on a chunk's worth of examples (two at least): a coupling shows on any part of the
        # batch, and the pass without gradient stays within the memory chunk_size bounds
        part = slice_inputs(inputs, 0, max(chunk_size, 2))
        here = to_device((part, targets), device)[0]
        with leave_no_trace(model, scan=scan):
            known = examples_mixed(model, here) is not None
        _MIXES.put(key, known)
    return known
