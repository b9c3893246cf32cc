"""Frobenius norms of the full and the diagonal Fisher without forming the d x d matrix."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import num_examples, probe_inputs, slice_inputs
from curvlab._finite import NonFiniteError
from curvlab._kept_batches import read_chunks
from curvlab._losses import LossSpec, loss_spec
from curvlab._notrace import buffer_snapshot, each_forward_on, leave_no_trace
from curvlab._numbers import is_count
from curvlab._precision import accumulation_dtype, common, is_sixteen
from curvlab._rng import check_randomness, make_generator
from curvlab._scan import scan_model
from curvlab._selection import refuse_complex
from curvlab._vocabulary import quantity_kind
from curvlab.backends._choice import signature
from curvlab.backends._func_drawn import chunk_output, drawn_rows
from curvlab.backends._layers import add_squares, draw_labels, per_example_rows, squares_by_example
from curvlab.backends._rules import is_hf_conv1d
from curvlab.distributed import active, collective, rank_generator
from curvlab.quantities._gram import DenseRows, LayerRows, OuterRows, max_abs
from curvlab.quantities._gram_exchange import cross_rank_frob_sq
from curvlab.quantities._sweep import DEFAULT_CHUNK_SIZE, Counter, with_backends

__all__ = ["fisher_norms", "FisherNorms", "NORM_KINDS"]

NORM_KINDS = ("empirical", "exact", "mc")
_FACTOR_BUDGET_BYTES = 256 * 2**20  # one chunk of factor rows
_CACHE_BUDGET_BYTES = 1024 * 2**20  # all factor rows kept if they fit, else recomputed
_GRAM_BUDGET_BYTES = 256 * 2**20  # one Gram block of two chunks' rows, with its float64 square


@dataclass
class FisherNorms:
    """``||F||_F`` and ``||diag F||_F`` of one Fisher matrix (Wen et al. Fig. 5a).

    Attributes:
        frobenius: ``||F||_F``.
        diag_frobenius: ``||diag F||_F``; ``diag_frobenius / frobenius`` measures how much of the
            Fisher's mass sits on the diagonal.
        kind: which Fisher.
        num_examples: ``N``.
        backend: who computed it.
        info: how it was computed where that is not the default (``"compiled"``: a
            ``torch.compile``d model; docs/training-loops.md).
    """

    frobenius: float
    diag_frobenius: float
    kind: str
    num_examples: int
    backend: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``diag_frobenius / frobenius`` (1 for a diagonal matrix)."""
        return self.diag_frobenius / self.frobenius if self.frobenius > 0 else float("nan")


@collective
def fisher_norms(
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
) -> FisherNorms:
    """Frobenius norms of the Fisher ``F`` and of its diagonal, never forming ``F``.

    ``F = w V^T V`` with rows ``V`` that are per-example gradients (``"empirical"``: data labels;
    ``"mc"``: labels sampled from the model, ``mc_samples`` per example) or per-example square-root
    factors of the GGN (``"exact"``, BackPACK's ``SqrtGGNExact``). Then
    ``||F||_F^2 = w^2 sum_{i,j} ||V_i V_j^T||_F^2`` over chunks ``i, j`` of rows (Gram-matrix
    identity) and ``diag F = w sum_rows V^2``. A chunk of rows takes at most 256 MiB; all rows are
    kept while they fit in 1 GiB, else chunk ``j``'s rows are recomputed for every ``i < j``
    (``O(chunks^2)`` passes, bounded memory). A Gram block ``V_i V_j^T`` with its float64 square
    takes at most 256 MiB too (about 3,300-3,700 rows a side): a chunk holds at most that many rows,
    and where one example alone has more (``kind="exact"`` with many outputs, a large
    ``mc_samples``) its Gram blocks are taken that many rows at a time, the squares summed (the
    same number). Cost: ``O(R^2 d)`` for ``R`` rows and ``d`` parameters.
    With ``backend="auto"`` (the default) and every trainable parameter in a Linear/Conv layer,
    ``"empirical"`` and ``"mc"`` take curvlab's own layer hooks, which keep a Linear layer's rows
    as the factors ``a_n, g_n`` of ``g_n a_n^T`` (:mod:`curvlab.quantities._gram`): its share of
    the cost drops to ``O(R^2 (in + out))``. Scaling follows docs/conventions.md (mean vs sum), as in
    :func:`~curvlab.diag_fisher`. Under ``torch.distributed`` the Gram blocks between ranks are
    computed by broadcasting each rank's rows chunk by chunk (:mod:`curvlab.quantities._gram_exchange`),
    so every rank gets the norms of all shards' Fisher.

    Raises:
        ValueError: for a model that mixes the examples of a batch (feature centering over the
            batch, in-batch contrastive logits), before any per-example work, naming where
            (:func:`curvlab.quantities._sweep.examples_apart`).
        NonFiniteError: for non-finite parameters or inputs (before any pass), and for norms
            that come out NaN or inf although they are finite (the forward pass overflows or
            gives NaN for some example), on every rank alike.
        FloatingPointError: where the rows' squares underflow: their largest entry is below
            ``1.1e-19`` in float32 (``1.5e-154`` in float64), every square and Gram entry 0 or
            subnormal (a classifier fit at logit margins above ~45); compute in float64.

    Example:
        >>> import torch, curvlab as cl
        >>> model = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> n = cl.fisher_norms(model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> n.diag_frobenius <= n.frobenius + 1e-6
        True
    """
    kind = quantity_kind(kind, NORM_KINDS)
    if not is_count(mc_samples):
        raise ValueError(f"mc_samples must be an int >= 1 (not a bool), got {mc_samples!r}")
    mc_samples = int(mc_samples)
    check_randomness(seed, generator, both=kind == "mc")
    spec = loss_spec(loss_fn)
    scan = scan_model(model)
    # F of a complex parameter's real coordinates (torch: "max_values_cpu" not implemented)
    refuse_complex(dict(scan.trainable), has_params=False)
    gen = make_generator(seed, generator, scan.device) if kind == "mc" else None
    # kept for several passes: a loader refilling its tensors is refused, not read as the
    # last batch N times (found in review: a Frobenius norm 1.2153 for 1.1615)
    chunks = read_chunks(data, chunk_size, scan.device)
    needs = {"sqrt_ggn"} if kind == "exact" else {"sum_grad_squared"}

    def body(be: Any) -> FisherNorms:
        if gen is not None and generator is None:
            gen.manual_seed(
                0 if seed is None else int(seed)
            )  # a hand-over restarts with the same draws
        return _norms(be, scan, spec, chunks, kind, mc_samples, rank_generator(gen))

    # before any per-example work: a model that mixes the examples has no rows (every rank
    # takes part, also one without data: the ranks' findings are gathered)
    key = signature(scan, spec, frozenset(needs), backend, *chunks[0]) if chunks else None
    probe = probe_inputs(chunks[0][0], chunks) if chunks else None  # chunk_size=1: its batch
    return with_backends(backend, scan, needs, body, (key, probe), data=data)


def _norms(
    be: Any,
    scan: Any,
    spec: LossSpec,
    chunks: list,
    kind: str,
    mc_samples: int,
    gen: torch.Generator | None,
) -> FisherNorms:
    model, device = scan.model, scan.device
    counter = Counter(spec)
    with (
        leave_no_trace(model, scan=scan),
        # every forward on copies of the buffers as the call found them: one function however
        # the data is chunked (spectral_norm's vectors moved 0.3% of the norms with 3-example
        # chunks, found in review)
        each_forward_on(model, buffer_snapshot((m for _, m in scan.modules))),
        be.extended(model, spec, second_order=kind == "exact", scan=scan) as s,
    ):
        s.on_output = counter.on_output
        # one chunk's Gram matrix can be folded in layer by layer (_streamed_gram): then a chunk
        # is bounded by its largest layer's rows, not by all parameters' rows together
        stream = len(chunks) == 1 and active() is None and "output_grads" in be.primitives
        chunks, rows_per_example, num_params, itemsize, random = _rechunk(
            s, spec, chunks, kind, mc_samples, gen, counter, stream, model
        )
        # a random forward (train-mode Dropout): each chunk's Monte-Carlo labels are drawn from
        # the forward whose rows are taken, not once ahead (labels of one mask with gradients of
        # another gave ||F||_F 5.77 for 3.58, review s26)
        draw = _drawer(spec, gen, mc_samples) if random else None
        if random and mc_samples > 1 and "output_grads" not in be.primitives and be.name != "func":
            raise ValueError(
                f"fisher_norms(kind='mc', mc_samples={mc_samples}, backend={be.name!r}): the "
                "model's forward draws random numbers (a train-mode Dropout, drop-path, noise), "
                f"so an example's {mc_samples} labels must come from the one forward whose "
                f"gradients are taken, and the {be.name} backend takes one label set per "
                "forward; use backend='hooks' or backend='func', mc_samples=1, or model.eval()"
            )
        total_rows = sum(num_examples(X) for X, _ in chunks) * rows_per_example
        cache: dict[int, LayerRows] | None = (
            {} if total_rows * num_params * itemsize <= _CACHE_BUDGET_BYTES else None
        )

        def factor(i: int) -> LayerRows:
            if cache is not None and i in cache:
                return cache[i]
            X, y = chunks[i]
            label_sets = [y] if kind == "empirical" or random else list(y)
            if "output_grads" in be.primitives:  # layer outputs' gradients: factored rows
                V = _hook_rows(be, s, X, label_sets, drawn=kind == "mc", draw=draw)
            elif kind == "exact":
                parts = be.sqrt_ggn(s, X, y)
                if not parts:  # every label of the chunk ignored: it adds no rows
                    p0 = next(iter(s.params.values()))
                    V = LayerRows([DenseRows(p0.new_zeros(0, num_params))])
                else:
                    V = LayerRows([DenseRows(_dense(parts, 2).flatten(0, 1))])
            else:
                rows = [
                    _dense(parts, 1)
                    for parts in (
                        _drawn_dense(be, s, X, y, gen, mc_samples)
                        if random
                        else (
                            be.batch_grad(s, X, labels, drawn=kind == "mc") for labels in label_sets
                        )
                    )
                ]
                V = LayerRows([DenseRows(rows[0] if len(rows) == 1 else torch.cat(rows))])
            if cache is not None:
                cache[i] = V
            return V

        n = counter.examples
        comm = active()
        # F = w V^T V: the empirical-Fisher or the GGN weight (see curvlab._losses), and 1/M for
        # the average over M label draws; under torch.distributed from all ranks' counts, after
        # the reduction (a rank whose labels are all ignored raised here alone and left the
        # others waiting in the collective). The counts are not reduced before the rows: a rank
        # whose hooks backend hands over on its rows (a forward that branches on its batch)
        # would then meet the others' Gram exchange with a second reduction of counts.
        w = (
            0.0
            if comm is not None
            else _weight(spec, kind, n, counter.terms_per_example(), mc_samples)
        )
        if stream and len(chunks) == 1 and total_rows <= _gram_rows(itemsize):
            # one chunk: its Gram matrix and diagonal layer by layer, no rows kept (whole: only
            # when it fits one Gram block; one example's rows past it took this path, found in
            # review)
            X, y = chunks[0]
            label_sets = [y] if kind == "empirical" or random else list(y)
            gram, diag_sq = _streamed_gram(
                be, s, X, label_sets, drawn=kind == "mc", kind=kind, draw=draw
            )
            # squared in float64: a float32 Gram entry of 1.6e18 is finite, its square is not
            # (a false NonFiniteError, found in review)
            frobenius = float((gram.double() ** 2).sum().sqrt()) * w
            diag_frobenius = float(diag_sq.sqrt()) * w
            return _checked(frobenius, diag_frobenius, kind, n, be.name)
        frob_sq = torch.zeros((), dtype=torch.float64, device=device)
        top = torch.zeros((), dtype=torch.float64, device=device)
        diag = None
        side = _gram_rows(itemsize)
        products = torch.float32
        for i in range(len(chunks)):
            Vi = factor(i)
            d_i = Vi.col_sq_sums()
            products = d_i.dtype
            top = torch.maximum(top, Vi.top().to(device))
            # the column sums added over chunks in float64 (in float32 their rounding grew with
            # the number of chunks)
            diag = d_i.double() if diag is None else diag.add_(d_i)
            frob_sq += _frob_sq(Vi, Vi, side)
            for j in range(i + 1, len(chunks)):
                frob_sq += 2 * _frob_sq(Vi, factor(j), side)
        if comm is not None:  # Gram blocks with the other ranks' rows, then one all-reduce
            frob_sq += cross_rank_frob_sq(
                comm, len(chunks), factor, be.name, lambda a, b: _frob_sq(a, b, side)
            )
            # the counts travel with the sums, invalid labels included: every rank raises
            # the ranks' largest entries summed, a bound of the largest: every rank alike
            sums = counter.reduce(comm, {"f": frob_sq, "d": diag.double(), "t": top})
            frob_sq, diag, top = sums["f"], sums["d"], sums["t"]
            n, terms = counter.examples, counter.terms_per_example()
            w = _weight(spec, kind, n, terms, mc_samples)
    frobenius = float(frob_sq.sqrt()) * w
    diag_frobenius = float((diag.double() ** 2).sum().sqrt()) * w
    _check_underflow(float(top), accumulation_dtype(products), kind)
    return _checked(frobenius, diag_frobenius, kind, n, be.name)


def _check_underflow(top: float, products: torch.dtype, kind: str) -> None:
    """Raise where every square and Gram entry of the rows underflowed: ``top``, a bound of the
    rows' largest ``|entry|``, squares below ``products``' smallest normal number (``2^-126``
    in float32: rows below ``1.1e-19``), while the rows are not 0.

    The squares then are 0 or subnormal although the rows themselves are accurate: a float32
    classifier fit at logit margins ~57 gave ``||F||_F = 0`` and ``ratio`` NaN for a true
    0.3653, and at margins ~53 a ratio 0.3% off, without a word (found in review s22).

    Raises:
        FloatingPointError: naming the largest entry and the way out (float64).
    """
    tiny = torch.finfo(products).tiny
    if top > 0.0 and top * top < tiny:
        raise FloatingPointError(
            f"fisher_norms(kind={kind!r}): the squares and Gram entries of the per-example "
            f"{'GGN factors' if kind == 'exact' else 'gradients'} underflow in "
            f"{str(products)[6:]}: their largest entry is {top:.3g}, whose square is below "
            f"{tiny:.3g} (e.g. a classifier fitting its examples at logit margins above ~45), so "
            "||F||_F, ||diag F||_F and their ratio would come out 0, NaN or subnormal-rounded. "
            "Compute on a float64 copy of the model and data (copy.deepcopy(model).double() and "
            "float64 inputs)"
        )


def _checked(frobenius: float, diag_frobenius: float, kind: str, n: int, name: str) -> FisherNorms:
    """The norms, or :class:`~curvlab.NonFiniteError` (a plain ``FloatingPointError`` before,
    which ``except curvlab.NonFiniteError`` missed, found in review)."""
    if not (math.isfinite(frobenius) and math.isfinite(diag_frobenius)):
        bad = [
            what
            for what, v in (("||F||_F", frobenius), ("||diag F||_F", diag_frobenius))
            if not math.isfinite(v)
        ]
        which = " and ".join(bad) + (" are" if len(bad) > 1 else " is")
        raise NonFiniteError(
            f"fisher_norms(kind={kind!r}): {which} not finite (NaN or inf) although the "
            "parameters and the inputs are: the forward pass overflows or gives NaN for some "
            "example (e.g. exp overflowing in float32, log or sqrt of a negative value), or "
            "the per-example gradients overflow in this dtype. Find those examples with "
            "torch.isfinite(model(X)).flatten(1).all(1) per batch and drop or fix them, or use "
            "float64 (model.double() and float64 inputs)"
        )
    return FisherNorms(frobenius, diag_frobenius, kind, n, name)


_POSITION_GRAM_BYTES = 64 * 2**20
"""Largest ``(n T)^2`` position Gram matrix :func:`_by_positions` forms (per pair of label draws)."""
_POSITIONS_ALWAYS = False  # tests: take the position route whatever the sizes


def _by_positions(tap: Any, gs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
    """A Linear layer on sequences or an HF ``Conv1D``: its Gram block, ``sum_j (sum_r
    V_rj^2)^2`` and a bound of its rows' largest entry (:meth:`LayerRows.top`) without its
    per-example gradients, or ``None`` where that is not cheaper.

    Example ``n``'s weight gradient is ``sum_t g_nt a_nt^T``, so
    ``<grad_n, grad_m> = sum_{t,s} (a_nt . a_ms)(g_nt . g_ms)``: two ``(nT) x (nT)`` position Gram
    matrices instead of ``n`` products of ``in x out`` entries, taken when ``n T (in + out) < in
    out`` and the position Gram fits :data:`_POSITION_GRAM_BYTES`. The column squares come from
    one product per example (:func:`~curvlab.backends._layers.squares_by_example`).
    """
    module, names = tap.module, tap.layer.names
    sequence_linear = isinstance(module, nn.Linear) and tap.input.dim() > 2
    if not (sequence_linear or is_hf_conv1d(module)) or "weight" not in names:
        return None
    n = tap.input.shape[0]
    A = tap.input.reshape(n, -1, tap.input.shape[-1])  # (n, T, in)
    Gs = [g.reshape(n, -1, g.shape[-1]) for g in gs]  # (n, T, out) per label draw
    A = common(A, Gs[0])[0]
    Gs = [common(A, G)[1] for G in Gs]
    T, din, dout, M = A.shape[1], A.shape[2], Gs[0].shape[2], len(Gs)
    rows = n * T
    small = rows * rows * M * M * A.element_size() <= _POSITION_GRAM_BYTES
    if not (_POSITIONS_ALWAYS or (rows * (din + dout) < din * dout and small)):
        return None
    X = A.reshape(rows, din)
    SA = (X @ X.T).view(n, T, n, T)
    Ys = [G.reshape(rows, dout) for G in Gs]
    bias = "bias" in names
    gram = A.new_zeros(M * n, M * n)
    for i in range(M):
        for j in range(M):
            SG = (Ys[i] @ Ys[j].T).view(n, T, n, T)
            block = torch.einsum("atbs,atbs->ab", SA, SG)
            if bias:
                block = block + SG.sum((1, 3))
            gram[i * n : (i + 1) * n, j * n : (j + 1) * n] = block
    sq = None
    for G in Gs:
        s_w, _ = squares_by_example(G, A, False)
        sq = s_w if sq is None else sq.add_(s_w)
    diag = (sq.double() ** 2).sum()
    if bias:
        sb = torch.stack([(G.sum(1) ** 2).sum(0) for G in Gs]).sum(0)
        diag = diag + (sb.double() ** 2).sum()
    # a bound of the largest entry: |sum_t g_ntk a_ntj| <= sum_t |g_ntk| max|a|, and a bias
    # entry |sum_t g_ntk| <= sum_t |g_ntk| (max|g| max(max|a| T, 1) before: a bias entry of
    # 7.8e-19, whose square is normal, was bounded by 7.8e-20 where max|a| T < 1, a false
    # refusal, found in review s22)
    g1 = max_abs(torch.stack([max_abs(torch.linalg.vector_norm(G, 1, dim=1)) for G in Gs]))
    a = max_abs(A)
    top = g1 * (torch.clamp_min(a, 1.0) if bias else a)
    return gram, diag, top


def _own_gram(part: OuterRows | DenseRows) -> tuple[Tensor, Tensor, Tensor]:
    """A part's Gram block, ``sum_j (sum_r V_rj^2)^2`` and a bound of its largest entry
    (:meth:`~curvlab.quantities._gram.LayerRows.top`, taken before the squares); dense rows (this call's own) are
    squared in place, 16-bit ones in float32 a bounded block of columns at a time
    (:meth:`DenseRows.col_sq_sums`; a float16 square above 65504 was inf: a NonFiniteError for a
    LayerNorm's per-example gradients of 3000, found in review)."""
    block = part.gram(part)  # before the rows are squared
    top = part.top()
    if isinstance(part, DenseRows) and not is_sixteen(part.P.dtype):
        col_sq = add_squares(None, part.P)
    else:
        col_sq = part.col_sq_sums()
    return block, (col_sq.double() ** 2).sum(), top


def _streamed_gram(
    be: Any,
    s: Any,
    inputs: Any,
    label_sets: list[Tensor],
    drawn: bool = False,
    kind: str = "empirical",
    draw: Callable[[Tensor, Tensor], list[Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """One chunk's Gram matrix ``V V^T`` (rows: label draw, then example) and
    ``sum_j (sum_r V_rj^2)^2``, from the layer hooks one layer at a time; raises where every
    square underflowed (:func:`_check_underflow`, ``kind`` for its message).

    The rows of all parameters together (``D`` numbers per example and draw: 2 GB for GPT-2 small
    and four sequences) are never held: each single-use layer's rows are formed, folded into the
    Gram matrix and the diagonal, and dropped; parameters used several times (a tied embedding
    and head) get their uses summed first (:meth:`HooksBackend.per_example`). ``draw``: the
    label sets are drawn from this forward's output (a random forward, :func:`_drawer`).
    """
    output = s.forward(inputs, label_sets[0])
    if draw is not None:
        label_sets = draw(output, label_sets[0])
    taps, grads = be.output_grads(s, output, label_sets, drawn=drawn)
    uses = s.uses()
    gram: Tensor | None = None
    diag_sq = torch.zeros((), dtype=torch.float64, device=output.device)
    top = torch.zeros((), dtype=torch.float64, device=output.device)

    for part in _layer_parts(be, taps, grads, uses, positions=True):
        block, d, t = part if isinstance(part, tuple) else _own_gram(part)
        gram = block if gram is None else gram.add_(block)
        diag_sq = diag_sq + d
        top = torch.maximum(top, t.to(top.device))
        # this layer's rows go before the next layer's are formed (the loop variable kept them:
        # two layers' rows at once, found in review)
        del part, block, d
    if gram is None:  # no hooked layer reached the loss
        r = len(label_sets) * num_examples(inputs)
        gram = torch.zeros(r, r, device=output.device)
    _check_underflow(float(top), accumulation_dtype(gram.dtype), kind)
    return gram, diag_sq


def _rechunk(
    s: Any,
    spec: LossSpec,
    chunks: list,
    kind: str,
    mc_samples: int,
    gen: torch.Generator | None,
    counter: Counter,
    stream: bool = False,
    model: nn.Module | None = None,
) -> tuple[list, int, int, int, bool]:
    """Chunks small enough that their rows fit the factor budget (counted once), with the
    Monte-Carlo labels drawn once per chunk; the rows per example, parameters and item size; and
    whether the forward draws random numbers (then the chunks keep the data's targets and the
    labels are drawn from the forward whose rows are taken: :func:`_drawer`).

    ``stream``: the rows are folded in one layer at a time, so a chunk holds the rows of its
    largest parameter (a tied group is one) within the cache budget, instead of every
    parameter's rows within the factor budget.

    A chunk also holds at most :func:`_gram_rows` rows (one example at least), so that the Gram
    block of any two chunks fits :data:`_GRAM_BUDGET_BYTES`: the streamed chunk's whole Gram
    matrix, and each Gram block between ranks. Before, only the rows were counted: a
    ``(40960, 40960)`` float64 Gram matrix (12.5 GiB) for 62.5 MiB of rows failed with the
    allocator's error after the passes (found in review).
    """
    # one example of each batch: its output entries (the exact kind's rows per example) and its
    # loss terms per example, which may differ between batches (variable sequence lengths)
    terms: list[int | None] = []
    entries = 1
    for X, y in chunks:
        with torch.no_grad():
            try:
                probe = s.forward(slice_inputs(X, 0, 1), y[:1])  # sets counter.terms (on_output)
            except (ValueError, TypeError):
                # the shape and dtype checks quoted the one-example probe's shapes, "(1, 3)" for
                # the user's (6, 3) logits (found in review): the same checks on the whole batch
                # raise with its shapes (a forward pass on this error path only)
                s.forward(X, y)
                raise
        terms.append(counter.terms)
        entries = max(entries, probe[0].numel())
    num_params = sum(p.numel() for p in s.params.values())
    rows_per_example = {"empirical": 1, "mc": mc_samples, "exact": entries}[kind]
    itemsize = next(iter(s.params.values())).element_size()
    if kind == "exact":  # a 16-bit model's exact rows are float32 (scaled square roots)
        itemsize = max(itemsize, 4)
    gram_examples = _gram_rows(itemsize) // rows_per_example  # 0: one example is over
    factor_examples = _FACTOR_BUDGET_BYTES // (rows_per_example * num_params * itemsize)
    per_chunk = max(1, min(factor_examples, gram_examples))
    if stream:
        widest = max(p.numel() for p in s.params.values())  # a tied group is one parameter
        streamed = max(1, _CACHE_BUDGET_BYTES // (rows_per_example * widest * itemsize))
        total = sum(num_examples(X) for X, _ in chunks)
        # its whole Gram matrix is formed: only for data whose rows fit one Gram block
        if total <= min(streamed, gram_examples):
            per_chunk = streamed  # one chunk, folded in layer by layer
        # else several chunks, which take the unstreamed path: all parameters' rows of a chunk
        # within the factor budget (a chunk sized for the widest layer alone held ~12x that)
    pieces = []
    for (X, y), t in zip(chunks, terms):
        counter.terms = t  # this batch's loss terms per example
        for i in range(0, num_examples(X), per_chunk):
            piece = (slice_inputs(X, i, i + per_chunk), y[i : i + per_chunk])
            counter.add(*piece)
            pieces.append(piece)
    chunks = pieces
    random = False
    if kind == "mc":  # draw each chunk's labels once, so recomputed rows use the same ones
        sampled = []
        for X, y in chunks:
            output, random = chunk_output(s, X, y, () if model is None else model.modules())
            if random:  # labels from another forward than the rows' (review s26): not here
                break
            draws = draw_labels(spec, output, gen, y, mc_samples)  # example-major
            sampled.append((X, torch.stack(draws)))
        chunks = chunks if random else sampled
    return chunks, rows_per_example, num_params, itemsize, random


def _drawer(
    spec: LossSpec, gen: torch.Generator | None, mc_samples: int
) -> Callable[[Tensor, Tensor], list[Tensor]]:
    """``(output, targets) -> label sets``: ``mc_samples`` labels per example drawn from the
    output of the forward whose rows are taken (example-major, as :func:`_rechunk` draws them).

    On a random forward the Monte-Carlo Fisher ``sum_n grad NLL_n(y_hat_n)^2`` is unbiased for
    ``E_m F(m)`` over the forward's draws ``m`` only where ``y_hat_n ~ p(y | f(x_n; m))`` comes
    from the forward that is differentiated: labels drawn ahead from another forward gave
    ``E sum_y p(y | m1) g(y; m2)^2`` (review s26). Rows recomputed for a later Gram block then
    come from a fresh forward and fresh labels of the same chunk: the same distribution, and
    its examples are independent of the other chunk's.
    """

    def draw(output: Tensor, targets: Tensor) -> list[Tensor]:
        return draw_labels(spec, output.detach(), gen, targets, mc_samples)

    return draw


def _drawn_dense(
    be: Any, s: Any, inputs: Any, targets: Tensor, gen: torch.Generator | None, mc_samples: int
) -> list[dict[str, Tensor]]:
    """Per label draw, the per-example gradients at labels drawn from the forward that is
    differentiated (the func backend: each example's ``mc_samples`` labels from one forward of
    it; another backend one draw from the chunk's one forward, ``mc_samples == 1``)."""
    if be.name == "func":
        return drawn_rows(s, inputs, targets, gen, mc_samples)
    return [be.batch_grad(s, inputs, targets, sampled=True, generator=gen)]


def _gram_rows(itemsize: int) -> int:
    """Rows a side of the largest Gram block within :data:`_GRAM_BUDGET_BYTES` (one at least).

    A block is float32 for 16-bit rows, else in the rows' dtype (``g`` bytes an entry); counted
    per entry: ``3 g`` while the layers' blocks are summed (the running sum, a Linear layer's two
    factor products), or ``g + 16`` for the float64 copy and its square.
    """
    g = max(itemsize, 4)
    return max(1, math.isqrt(_GRAM_BUDGET_BYTES // max(3 * g, g + 16)))


def _frob_sq(Vi: LayerRows, Vj: LayerRows, side: int) -> Tensor:
    """``||V_i V_j^T||_F^2`` (float64, 0-dim) from Gram blocks of at most ``side`` rows a side.

    The squared entries add over blocks, so this is the number of the whole block; rows within
    ``side`` are one block, as before. ``Vi is Vj``: the blocks below the diagonal are those
    above it, transposed, and counted twice.
    """
    mine = _row_ranges(Vi, side)
    theirs = mine if Vj is Vi else _row_ranges(Vj, side)
    if len(mine) == 1 and len(theirs) == 1:
        return (Vi.gram(Vj).double() ** 2).sum()
    total: Tensor | None = None
    for p, (a, b) in enumerate(mine):
        rows = _rows(Vi, a, b)
        for q, (c, d) in enumerate(theirs):
            if Vj is Vi and q < p:
                continue
            sq = (rows.gram(_rows(Vj, c, d)).double() ** 2).sum()
            sq = sq if Vj is not Vi or q == p else 2 * sq
            total = sq if total is None else total + sq
    assert total is not None  # at least one range a side
    return total


def _row_ranges(V: LayerRows, side: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of ``V`` of at most ``side`` rows (one for no parts)."""
    if not V.parts:
        return [(0, 0)]
    part = V.parts[0]
    n = part.G.shape[0] if isinstance(part, OuterRows) else part.P.shape[0]
    return [(a, min(a + side, n)) for a in range(0, n, side)] or [(0, 0)]


def _rows(V: LayerRows, a: int, b: int) -> LayerRows:
    """Rows ``a:b`` of ``V``, every part alike (views, except a Linear layer's inputs for a range
    across two label draws: their rows gathered)."""
    parts: list[OuterRows | DenseRows] = []
    for part in V.parts:
        if isinstance(part, DenseRows):
            parts.append(DenseRows(part.P[a:b]))
            continue
        n = part.A.shape[0]  # row r pairs with input r mod n
        if a // n == (b - 1) // n:
            A = part.A[a % n : a % n + (b - a)]
        else:
            A = part.A[torch.arange(a, b, device=part.A.device) % n]
        parts.append(OuterRows(A, part.G[a:b], part.bias))
    return LayerRows(parts, V.layers)


def _weight(spec: LossSpec, kind: str, n: int, terms: float, mc_samples: int) -> float:
    """``F = w V^T V``: the empirical-Fisher or GGN weight, and ``1/M`` for ``M`` label draws."""
    if kind == "empirical":
        return spec.empirical_weight(n, terms)
    return spec.ggn_weight(n, terms) / (mc_samples if kind == "mc" else 1)


def _dense(parts: dict[str, Tensor], batch_dims: int) -> Tensor:
    """Per-parameter rows (``batch_dims`` leading row dimensions) side by side, detached."""
    return torch.cat(
        [v.detach().reshape(*v.shape[:batch_dims], -1) for v in parts.values()], dim=batch_dims
    )


def _hook_rows(
    be: Any,
    s: Any,
    inputs: Tensor,
    label_sets: list[Tensor],
    drawn: bool = False,
    draw: Callable[[Tensor, Tensor], list[Tensor]] | None = None,
) -> LayerRows:
    """One chunk's per-example gradient rows from the layer hooks: one forward, one backward per
    label set, one part per layer (:func:`_layer_parts`). ``drawn``: the label sets were drawn
    from the model; ``draw``: they are drawn from this forward's output (:func:`_drawer`)."""
    output = s.forward(inputs, label_sets[0])
    if draw is not None:
        label_sets = draw(output, label_sets[0])
    taps, grads = be.output_grads(s, output, label_sets, drawn=drawn)
    return LayerRows(list(_layer_parts(be, taps, grads, s.uses())), tuple(t.name for t in taps))


def _layer_parts(
    be: Any, taps: list, grads: list[list[Tensor]], uses: dict[str, int], positions: bool = False
) -> Iterator[OuterRows | DenseRows | tuple[Tensor, Tensor, Tensor]]:
    """Each layer's rows in turn (label draw, then example): a Linear layer on 2-D inputs as
    factors, the other layers dense, parameters used several times (a tied embedding and head)
    last, their uses summed first (:meth:`HooksBackend.per_example`). ``positions``: a layer that
    :func:`_by_positions` handles comes as its ``(Gram block, sum_j (sum_r V_rj^2)^2, bound of
    its largest entry)`` instead.
    """
    shared = []
    for k, tap in enumerate(taps):
        gs = [g[k] for g in grads]
        if any(uses[p] != 1 for p in tap.layer.names.values()):
            shared.append(k)
            continue
        block = _by_positions(tap, gs) if positions else None
        # the factored rows hold the weight and any bias: only for a layer trained whole (a
        # frozen weight or bias of it was counted too, 50% off on a frozen first weight)
        whole = set(tap.layer.names) == (
            {"weight", "bias"} if getattr(tap.module, "bias", None) is not None else {"weight"}
        )
        if block is not None:
            yield block
        elif whole and isinstance(tap.module, nn.Linear) and tap.input.dim() == 2:
            G = gs[0] if len(gs) == 1 else torch.cat(gs)
            yield OuterRows(tap.input, G, "bias" in tap.layer.names)
        elif whole and isinstance(tap.module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            # the weight's rows, then the bias's: V V^T and the column sums add over parameters
            yield from (DenseRows(r) for r in per_example_rows(tap.module, tap.input, gs))
        else:  # LayerNorm, an embedding, HF Conv1D, a part-frozen layer: its rule's per-example
            # gradients, the trainable attributes alone
            per_draw = [tap.layer.rule.per_example(tap.module, tap.input, g) for g in gs]
            for attr in tap.layer.names:
                yield DenseRows(_draw_rows([d[attr] for d in per_draw]))
    if shared:
        staps = [taps[k] for k in shared]
        per_draw = [be.per_example(staps, [g[k] for k in shared]) for g in grads]
        for name in per_draw[0]:
            yield DenseRows(_draw_rows([d[name] for d in per_draw]))


def _draw_rows(per_draw: list[Tensor]) -> Tensor:
    """Per-example gradients ``(n, *shape)`` of each label draw as rows, draw by draw.

    The tensors are this call's own (fresh from the rules), so one draw's comes back as a view,
    not a copy (GPT-2 small's tied embedding and head: 0.6 GB less at the peak)."""
    if len(per_draw) == 1:
        return per_draw[0].reshape(per_draw[0].shape[0], -1)
    return torch.cat([v.reshape(v.shape[0], -1) for v in per_draw])
