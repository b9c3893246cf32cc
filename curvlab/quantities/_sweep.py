"""The accumulation loop every one-pass quantity goes through: one pass over the data in chunks.

:func:`sweep` validates the loss and the model before any work, picks the backends that may compute
the model (:func:`curvlab.backends.candidates`), runs a chunk function on every chunk inside the
backend's session under :func:`~curvlab._notrace.leave_no_trace`, and sums the raw (NLL-sum) results
(float32 sums in float64 from the second chunk on, cast back at the end: :func:`_add_chunk`)
and the counts needed to scale them: ``N`` examples and ``M`` loss terms (non-ignored tokens under
``ignore_index``). The scaling happens once, at the end, so several uneven batches give exactly the
quantity of all the data together. Under ``torch.distributed`` the sums and counts of every rank's
shard are added by one all-reduce of one flat buffer before that scaling
(:mod:`curvlab.distributed`).

Before any per-example work the model must keep the examples apart (:func:`examples_apart`: a
forward that mixes them, feature centering over the batch or in-batch contrastive logits, has no
per-example gradients), checked once per call signature; on the hooks backend inside its first
forward pass (:class:`_Deferred`), whose batch pass and layout probe the check shares.

When a fast backend hands over on the first chunk (a tied weight, a layer applied twice, ...) the
sweep restarts that chunk with the next backend; nothing of the first attempt is kept.

Under ``torch.distributed`` each rank chooses its backends from its own shard, so the ranks may
compute with different backends (the sums are the same); but an error on one rank's passes (the
last backend handing over, a memory refusal, a data check) is shared before the all-reduce
(:func:`_together`): every rank raises, or every rank hands over to its caller's next route.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from curvlab._data import is_single_batch, iter_chunks, num_examples, probe_inputs, read_again
from curvlab._differentiating_forward import derivatives_refused, watched_finding
from curvlab._finite import check_batch_finite, check_parameters_finite
from curvlab._kept_batches import ordinary, read_batches
from curvlab._layout import examples_mixed, raise_if_mixed
from curvlab._losses import LossSpec, check_counted, loss_spec, raise_invalid_labels
from curvlab._notrace import buffer_snapshot, each_forward_on, leave_no_trace
from curvlab._precision import upcast
from curvlab._scan import ModelScan, scan_model
from curvlab.backends import REGISTRY, Handover, candidates, model_facts
from curvlab.backends._choice import CHOICES, Choice, SignatureMemo, signature
from curvlab.backends._fsdp2 import forced_backend, fsdp2_route, fsdp2_sweep
from curvlab.backends._validation import check_batchnorm
from curvlab.distributed import Comm, active, raise_for

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SweepInfo",
    "sweep",
    "Counter",
    "examples_apart",
    "with_backends",
    "replayable",
]

DEFAULT_CHUNK_SIZE = 1024
"""Examples processed at once by default (the ``chunk_size=`` knob of every quantity)."""

ChunkFn = Callable[[Any, Any, Any, Tensor], dict[Any, Tensor]]
K = TypeVar("K")
T = TypeVar("T")


@dataclass
class SweepInfo:
    """What a sweep saw: the loss, the backend, ``N`` examples and ``M`` loss terms.

    Attributes:
        spec: the loss object.
        backend: the name of the backend that computed the result.
        num_examples: ``N``.
        terms: ``c = M / N``, the mean number of loss terms per example.
        handed_over: why faster backends declined or handed over, one line each.
        fallbacks: slower paths the backend took within the call (e.g. a per-example loop where
            ``vmap`` failed), one line each.
        unchecked: ``(parameters, batch)`` whose finiteness the caller's result check must
            cover (see ``defer_checks``), or ``None``.
        loss_terms: ``M`` itself: 0 when every label is ``ignore_index`` under ``"sum"``
            (``terms`` is then 1; under ``"mean"`` the sweep raises).
    """

    spec: LossSpec
    backend: str
    num_examples: int
    terms: float
    handed_over: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()
    unchecked: tuple[dict[str, Tensor], Any] | None = None
    loss_terms: float = -1.0

    @property
    def ggn_weight(self) -> float:
        """``w = 1/M`` (mean) or 1 (sum), with ``L = w sum_n NLL_n``: scales Hessians, GGNs."""
        return self.spec.ggn_weight(self.num_examples, self.terms)

    @property
    def empirical_weight(self) -> float:
        """``N/M^2`` (mean) or 1 (sum): scales ``sum_n grad NLL_n grad NLL_n^T``."""
        return self.spec.empirical_weight(self.num_examples, self.terms)


class Counter:
    """Counts examples and loss terms over chunks without a host synchronisation per chunk.

    Under ``torch.distributed`` :meth:`reduce` adds every rank's counts (the invalid labels'
    included) to the raw sums' all-reduce, so :meth:`terms_per_example` raises the same error on
    every rank.
    """

    def __init__(self, spec: LossSpec) -> None:
        self.spec = spec
        self.examples = 0
        self.count: Tensor | int = 0
        self.terms: int | None = None  # of the last output seen
        self.invalid: Tensor | int = 0  # class indices out of range (checked with the count)
        self.classes = 0
        self.own_invalid: Tensor | int | None = None  # this rank's, once reduced over ranks
        self.total = -1.0  # M, read by terms_per_example

    def on_output(self, output: Tensor, targets: Tensor) -> None:
        """Record a forward pass's loss terms per example and number of classes.

        A backend may run several forwards per chunk, or one on the chunk's first example only
        (``func``'s exact GGN): the labels are counted in :meth:`add`, once per chunk.
        """
        self.terms = self.spec.terms_per_example(output)
        if self.spec.invalid_labels(output, targets.reshape(-1)[:0]) is not None:  # class indices
            self.classes = output.shape[1]

    def add(self, inputs: Any, targets: Tensor) -> None:
        """Count a chunk's examples, loss terms and class labels out of range (no host sync).

        Called once per chunk after its forward pass (:meth:`on_output` gave the classes).
        """
        n = num_examples(inputs)
        self.examples += n
        if self.classes:  # all of the chunk's labels (found in review: func's exact GGN saw
            # the first example's only, and a label out of range in the others gave numbers)
            bad = self.spec.invalid_labels(targets.new_empty((0, self.classes)), targets)
            if bad is not None:
                self.invalid = self.invalid + bad
        if self.spec.kind == "cross_entropy" and not targets.is_floating_point():
            counted = (targets != self.spec.ignore_index).sum()
            self.count = (
                counted
                if isinstance(self.count, int) and not self.count
                else (self.count + counted)
            )
        else:
            self.count = self.count + n * (self.terms or 1)

    def reduce(self, comm: Comm, values: dict[K, Tensor]) -> dict[K, Tensor]:
        """All ranks' sums of ``values`` and of the counts, in one all-reduce.

        The counts ``N``, ``M`` and the invalid class labels travel with the sums, so a label out
        of range on one rank makes :meth:`terms_per_example` raise on every rank (found in review:
        the rank that held it raised, the others returned numbers); so do the layouts a
        cross-entropy loss read (:meth:`~curvlab._losses.LossSpec.layout_counts`): ranks that
        read torch's layout and the GPT layout raise on every rank, as one process does (found
        in review s19: the all-reduce added the two objectives, silently).

        Raises:
            ValueError: for the mixed layouts, on every rank.

        Args:
            comm: the group (:func:`curvlab.distributed.active`).
            values: this rank's raw sums (not empty: they give the buffer's device).

        Returns:
            The global sums by key; the counts of this object are the global ones afterwards.
        """
        self.own_invalid = self.invalid
        counts = [self.examples, self.count, self.invalid, *self.spec.layout_counts()]
        values, (self.examples, self.count, self.invalid, *layouts) = comm.reduce_sums(
            values, counts
        )
        self.spec.check_layout_counts(*layouts)  # the ranks read one layout (or all raise)
        return values

    def terms_per_example(self) -> float:
        """``M / N`` (one synchronisation); raises when every label is ignored under "mean", or
        when a class label is out of range (on any rank, after :meth:`reduce`)."""
        if self.examples == 0:
            raise ValueError(
                "data is empty: it yielded no batch; pass at least one (inputs, targets)"
            )
        total = self.total = float(self.count)
        self._check_labels()
        if total == 0:
            check_counted(self.spec, total)
            return 1.0
        return total / self.examples

    def _check_labels(self) -> None:
        """Raise for class labels out of range; after :meth:`reduce`, say which rank's they are."""
        bad = int(self.invalid)
        if not bad or self.own_invalid is None:
            raise_invalid_labels(self.spec, bad, self.classes)
            return
        own = int(self.own_invalid)
        try:
            raise_invalid_labels(self.spec, bad, self.classes)
        except ValueError as exc:
            where = (
                "all of them in this rank's shard"
                if own == bad
                else f"{own} in this rank's shard, {bad - own} in other ranks' shards"
            )
            raise ValueError(
                f"{exc} (under torch.distributed, counted over every rank's shard: {where}; "
                "every rank raises this error)"
            ) from None


def sweep(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    fn: ChunkFn,
    *,
    needs: Iterable[str],
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    scan: ModelScan | None = None,
    generator: torch.Generator | None = None,
    defer_checks: bool = False,
) -> tuple[dict[Any, Tensor], SweepInfo]:
    """Sum ``fn(backend, session, X, y)`` over all chunks of ``data``.

    Args:
        model, loss_fn, data: as in every quantity.
        fn: the chunk function; it calls the backend's primitives and returns raw sums by key.
        needs: the primitives ``fn`` calls (the backend is chosen by them).
        chunk_size: examples per chunk.
        backend: ``"auto"`` or a backend name.
        scan: the model's :func:`~curvlab._scan.scan_model` if the caller made one for this call.
        generator: the generator ``fn`` draws labels from: a restart with another backend
            starts from the same state, so the draws do not depend on which backend computed them.
        defer_checks: the caller checks its result with :func:`~curvlab._results.check_finite`
            and ``info.unchecked``: a repeated call (the signature remembered) on one batch then
            skips the up-front finiteness checks of parameters and inputs (two host
            synchronisations); should the result be non-finite, they run then and name the
            culprit. A first call checks up front, before any work.

    Returns:
        The raw sums (detached) and the :class:`SweepInfo` needed to scale them.

    Raises:
        ValueError: for a model that mixes the examples of a batch (:func:`examples_apart`,
            once per signature, before any work; not for BackPACK's Hessian diagonal alone,
            which needs no examples), besides the loss's, the model's and the data's errors.
            Under ``torch.distributed`` an error in one rank's passes is raised on every rank
            (:func:`_together`), and so is a :class:`~curvlab.backends.Handover` of the last
            backend, with ``first_chunk`` and ``ranks``.
        DifferentiatingForwardError: (a ``ValueError``) in the same check, for a forward pass
            that calls the autograd engine (a physics-informed network's ``du/dx``), whose
            per-example gradients no backend follows (:mod:`curvlab._differentiating_forward`).
    """
    spec = loss_spec(loss_fn)
    if fsdp2_route(model):  # FSDP2: unsharded for the call, curvlab's hooks alone (_fsdp2.py)
        return fsdp2_sweep(
            sweep,
            model,
            loss_fn,
            data,
            fn,
            needs=needs,
            chunk_size=chunk_size,
            backend=backend,
            generator=generator,
        )
    scan = scan if scan is not None else scan_model(model)
    needs = frozenset(needs)
    check_batchnorm(scan)
    # anomaly mode raises autograd's own error on a NaN during the backward pass, before a
    # deferred check could name the culprit (review s23: "Function '_FirstOrderBackward'
    # returned nan values" from the second call on): checked up front there, a debugging mode
    single = defer_checks and is_single_batch(data) and not torch.is_anomaly_enabled()
    if not single:
        check_parameters_finite(scan.trainable)
    chunks = iter_chunks(data, chunk_size, scan.device, finite=not single)
    first = next(chunks, None)
    if first is None:
        raise ValueError("data is empty: it yielded no batch; pass at least one (inputs, targets)")
    first = ordinary(first)  # inference tensors: ordinary clones (autograd saves them)
    key = signature(scan, spec, needs, backend, *first)
    forced = forced_backend()  # inside fsdp2_sweep: its backend alone, no memo
    known = CHOICES.get(key) if forced is None else None
    unchecked = None
    if single and known is not None:  # a repeated call: the result's check names a culprit
        unchecked = (scan.trainable, data)
    elif single:  # a first call: before any work
        check_parameters_finite(scan.trainable)
        check_batch_finite(data[0], data[1], 0)
    if known is not None:  # this signature's backend, its first-pass checks already done
        backends: list[Any] = [REGISTRY[known.backend]()]
        reasons = list(known.handed_over)
    else:
        backends = [forced] if forced is not None else candidates(backend, model_facts(scan), needs)
        reasons = []
    state = generator.get_state() if generator is not None else None
    # every forward pass runs on copies of the buffers as they are now (a train-mode forward
    # updates running statistics and spectral_norm's vectors in place, a counting forward its
    # small integer buffers): one function, however many passes a backend runs and however the
    # data is chunked
    buffers = buffer_snapshot((m for _, m in scan.modules))
    deferred = None
    if needs != {"diag_hessian"}:  # per-example primitives (BackPACK's Hessian: a whole chain)
        # on two examples of the first batch when its chunks hold one (chunk_size=1)
        probe = probe_inputs(first[0], chunks)
        if probe is first[0] and _Deferred.applies(key, probe):
            # in the first forward pass of a backend that can serve it, else before it
            deferred = _Deferred(model, key, probe, data)
        else:
            examples_apart(model, scan, key, probe, buffers, data, per_example=True)
    attempt = 0
    comm = active()
    try:
        while attempt < len(backends):
            be = backends[attempt]
            if (
                deferred is not None
                and not deferred.done
                and not getattr(be, "shares_examples_check", False)
            ):
                deferred.done = True  # this backend's passes cannot serve it: before any of them
                examples_apart(model, scan, key, deferred.inputs, buffers, data, per_example=True)
            if state is not None:  # every attempt draws the same labels
                generator.set_state(state)
            total: dict[Any, Tensor] = {}
            kept: dict[Any, torch.dtype] = {}  # totals widened to float64: their dtype
            counter = Counter(spec)
            started = False
            try:
                with (
                    leave_no_trace(
                        model, scan=scan, math_attention=getattr(be, "needs_math_attention", True)
                    ),
                    each_forward_on(model, buffers),
                    be.extended(
                        model, spec, second_order=needs != {"sum_grad_squared"}, scan=scan
                    ) as session,
                ):
                    session.on_output = counter.on_output
                    if known is not None:
                        session.resume(known.learned)
                    if deferred is not None and not deferred.done:
                        session.apart = deferred
                    for inputs, targets in chain([first], map(ordinary, chunks)):
                        values = fn(be, session, inputs, targets)
                        for name, value in values.items():
                            if name in total:
                                _add_chunk(total, kept, name, value.detach())
                            else:  # fresh tensors of this chunk: accumulate into them in place
                                total[name] = upcast(value.detach())  # 16-bit: float32 sums
                        counter.add(inputs, targets)
                        started = True
                        if deferred is not None:
                            deferred.remember()
                    if deferred is not None and not deferred.done:  # no forward pass ran it
                        deferred(deferred.inputs, None, None)
                        deferred.remember()
                    learned, notes = session.learned(), tuple(session.notes)
            except Handover as h:
                if known is not None and not started:  # the memo was wrong: choose afresh
                    CHOICES.forget(key)
                    known = None
                    backends, reasons, attempt = (
                        candidates(backend, model_facts(scan), needs),
                        [],
                        0,
                    )
                    continue
                if (
                    started
                    and backend == "auto"
                    and not isinstance(data, Iterator)
                    and (known is not None or attempt < len(backends) - 1)
                ):
                    # a later chunk showed what the first could not (data-dependent control flow):
                    # start over from the first chunk with the next backend (the data can be read again)
                    if known is not None:
                        CHOICES.forget(key)
                        known = None
                        backends, attempt = candidates(backend, model_facts(scan), needs), 0
                        backends = [b for b in backends if b.name != be.name]
                    else:
                        attempt += 1
                    reasons.append(f"{be.name}: {h}")
                    chunks, first = read_again(
                        data,
                        chunk_size,
                        scan.device,
                        first,
                        f"and the {be.name!r} backend found only on a later batch that it cannot "
                        f"compute this model exactly ({h}); the next backend must start over from "
                        "the first batch",
                        "a backend that computes any model (backend='func')",
                        finite=not single,
                    )
                    continue
                if (
                    started
                    and backend == "auto"
                    and isinstance(data, Iterator)
                    and (known is not None or attempt < len(backends) - 1)
                ):
                    # the next backend would have to start over, but a one-shot iterator cannot be
                    # read again: name it (the internal Handover blamed the model, found in review)
                    raise ValueError(
                        f"data is a one-shot iterator ({type(data).__name__}), which cannot be read "
                        f"again, and the {be.name!r} backend found only on a later batch that it "
                        f"cannot compute this model exactly: {h}. The next backend must start over "
                        "from the first batch: pass data that can be read twice (a list of batches, "
                        "a DataLoader), or a backend that computes any model (backend='func')"
                    ) from None
                if started or attempt == len(backends) - 1 or backend != "auto":
                    if backend != "auto":
                        raise ValueError(
                            f"backend={backend!r} cannot compute this model exactly: {h}. Use "
                            "backend='auto' or backend='func' (any differentiable model)"
                        ) from None
                    h.first_chunk = first  # for a caller that reads the data again (diag_hessian)
                    raise
                reasons.append(f"{be.name}: {h}")
                attempt += 1
                continue
            break
        else:
            raise AssertionError("unreachable: the last backend either returns or raises")
    except Exception as exc:
        if comm is not None:  # the other ranks learn of it before they wait in the all-reduce
            _together(comm, scan.device, exc, first)
        raise
    for name, dtype in kept.items():  # the float64 totals back in the chunks' dtype: the
        # dtype of the result, also of the cross-rank all-reduce (alike on every rank)
        total[name] = total[name].to(dtype)
    if comm is not None:  # any rank's failure or hand-over: every rank raises with it
        _together(comm, scan.device, None, first)
    if forced is None and known is None:  # a memo hit is already remembered
        CHOICES.put(key, Choice(be.name, tuple(reasons), learned))
    if comm is not None:  # this rank's sums are partial sums: one all-reduce of one buffer
        total = counter.reduce(comm, total)
    info = SweepInfo(
        spec=spec,
        backend=be.name,
        num_examples=counter.examples,
        terms=counter.terms_per_example(),
        handed_over=tuple(reasons),
        fallbacks=notes,
        unchecked=unchecked,
        loss_terms=counter.total,
    )
    return total, info


def _add_chunk(
    total: dict[Any, Tensor], kept: dict[Any, torch.dtype], name: Any, value: Tensor
) -> None:
    """Add a chunk's sum ``value`` into ``total[name]``, which is float64 from the second chunk
    on where the sums are float32 (a float32 model's, or a 16-bit model's upcast): ``kept``
    records their dtype, which :func:`sweep` casts the totals back to at the end.

    Float32 running totals rounded once per chunk, an error growing with the number of chunks:
    ``gradient_stats`` over 4096 batches of one example lost 1.6% of a bias's variance at
    ``mean^2 / variance = 9.8e3`` (4.1% over 1024 batches of 4), where its rounding bound
    ``eps * second_moment`` is 0.12%, without a warning (found in review s22). In float64 the
    totals carry the chunks' own float32 rounding alone, then one rounding back to float32,
    whatever the number of chunks. Cost: parameter-sized float64 totals (twice the float32
    ones) while a sweep of several chunks runs; one chunk keeps its float32 sums.
    """
    t = total[name]
    if t.dtype == torch.float32:
        kept[name] = t.dtype
        t = total[name] = t.double()
    t.add_(value)


def _together(comm: Comm, device: Any, failure: Exception | None, first: Any) -> None:
    """Under ``torch.distributed``, after this rank's passes: raise on every rank where any
    rank's passes raised (:meth:`~curvlab.distributed.Comm.failures`: one all-reduce of one flag
    per rank, before the sums' all-reduce), else return.

    Each rank chooses its backends from its own shard: a backend can hand over on one rank's
    data only (a layer called twice, a strided input, BackPACK's Hessian on a channels_last
    batch), a memory check or a data check can refuse one rank's shard only. Such a rank used to
    raise alone while the others waited in the all-reduce of the sums (a hang), or, where the
    caller catches the hand-over (:func:`~curvlab.quantities.diag_hessian`'s Hessian columns),
    to run other collectives than theirs (gloo aborted on the mismatch; found in review s19).
    Now every rank raises: its own error where it failed; where every failure is a hand-over out
    of the sweep (the last backend handed over; its caller takes another route), a
    :class:`~curvlab.backends.Handover` on every rank, each with the ``first_chunk`` its caller
    reads the data again from, so every rank takes the same route; else the first failed rank's
    error, naming that rank (:meth:`~curvlab.distributed.RankFailure.error`). The hand-overs'
    ``ranks`` attribute lists the ranks whose data showed it.
    """
    failed = comm.failures(failure, device)
    if not failed:
        return
    if all(f.kind == Handover.__name__ for f in failed):
        h = failure
        if not isinstance(h, Handover):
            f = failed[0]
            h = Handover(f"{f.message} (found on rank {f.rank}'s shard)")
            h.first_chunk = first  # type: ignore[attr-defined]
        h.ranks = [f.rank for f in failed]  # type: ignore[attr-defined]
        raise h
    errors = [f for f in failed if f.kind != Handover.__name__]
    raise_for(errors, failure if not isinstance(failure, Handover) else None)


_APART: SignatureMemo[bool] = SignatureMemo()
"""Signatures (:func:`~curvlab.backends._choice.signature`) whose model was found to compute
each example alone: the check runs once per signature, like the backend choice (64 kept)."""


def examples_apart(
    model: nn.Module,
    scan: ModelScan,
    key: Hashable | None,
    inputs: Any | None,
    buffers: Any = None,
    data: Any = None,
    per_example: bool = False,
) -> None:
    """Raise, before any per-example work, when ``model`` mixes the examples of a batch.

    :func:`~curvlab._layout.examples_mixed` on ``inputs`` (the first chunk): one pass on the
    chunk and one on two of its examples, without gradient, as the backends' passes run (inside
    :func:`~curvlab._notrace.leave_no_trace`, every forward on the call's copies of the
    buffers). Once per signature ``key`` (``None``: every call); ``inputs=None`` (no data on
    this rank) checks nothing but takes part in the gather below. Under ``torch.distributed``
    every rank's finding is gathered (one small collective per call, memo hit or not, so the
    ranks stay in step): a coupling that only one rank's shard shows (a forward that branches
    on a rare input anywhere in the batch) makes every rank raise, not that rank alone while
    the others wait in the sweep's all-reduce. ``data``: the data ``inputs`` came from (a
    ``DataLoader(batch_size=None)``'s coupling names the missing batch axis first;
    :func:`~curvlab._layout.finding_error`). ``per_example``: the caller's passes split the
    batch into examples (the backends' per-example primitives), which a forward pass that
    differentiates defeats: the check's passes watch for it
    (:func:`~curvlab._differentiating_forward.derivatives_refused`; a caller that differentiates
    whole batches, ``noise_scale_hessian``'s, does not ask).

    Raises:
        ValueError: naming where the examples mix (or the missing batch axis) and the way out.
        DifferentiatingForwardError: (``per_example``) for a forward pass that calls the
            autograd engine, naming what is exact for such a model; a finding gathered as a
            coupling is (under ``torch.distributed`` every rank raises).
    """
    why = None
    if inputs is not None and (key is None or key not in _APART):
        with (
            leave_no_trace(model, scan=scan),
            each_forward_on(model, buffers) if buffers is not None else nullcontext(),
        ):
            why = (
                watched_finding(model, inputs, lambda: examples_mixed(model, inputs))
                if per_example
                else examples_mixed(model, inputs)
            )
    raise_if_mixed(why, data)
    if inputs is not None:
        _remember(key)


class _Deferred:
    """:func:`examples_apart` on a first chunk, run inside the first forward pass of a backend
    whose session can serve it (``session.apart``, the hooks backend's): that pass's output is
    the check's batch pass, and the check's first pass on two examples is the session's layout
    probe, so a first call runs two forward passes fewer (0.8 s of GPT-2 small's 3.2 s on 4 x 64
    tokens). For a single process and a first chunk of two examples or more (else
    :func:`examples_apart` runs up front, as before a backend that cannot serve it).

    The check still comes before any per-example work: after the batch pass's forward, before
    its backward pass. ``done`` once it has run (raised or passed); remembered
    (:meth:`remember`) only once the first chunk's work has succeeded.
    """

    def __init__(
        self, model: nn.Module, key: Hashable | None, inputs: Any, data: Any = None
    ) -> None:
        self.model, self.key, self.inputs, self.done = model, key, inputs, False
        self.passed = False  # the check ran and passed, not yet remembered
        self.data = data  # for the error (:func:`~curvlab._layout.finding_error`)

    @staticmethod
    def applies(key: Hashable | None, inputs: Any) -> bool:
        """Whether the check of ``inputs`` (the first chunk) may wait for the first pass."""
        return (key is None or key not in _APART) and num_examples(inputs) >= 2 and active() is None

    def __call__(
        self,
        inputs: Any,
        output: Tensor | None,
        first_pass: Callable[[], AbstractContextManager[Any]] | None,
    ) -> None:
        """Check the first chunk against ``output``, the session's batch pass on ``inputs``
        (``None``, or another chunk's: passes of its own), inside the session's
        ``leave_no_trace``; ``first_pass``: the session's context around the two-example pass
        (see :class:`~curvlab._layout.ExamplesApart`).

        Raises:
            ValueError: the coupling error, or the model's failure on some of the examples
                alone (most likely a batch without a batch axis; :func:`part_failed`).
        """
        self.done = True
        ours = output is not None and inputs is self.inputs  # else passes of its own
        with derivatives_refused(self.model, self.inputs):  # a forward that differentiates
            why = examples_mixed(
                self.model,
                self.inputs,
                full=output if ours else None,
                first_pass=first_pass if ours else None,
            )
        raise_if_mixed(why, self.data)  # one process: the finding as it is
        # remembered once the first chunk has been computed (remember()): a pass that failed
        # after the check left it remembered, and the retry skipped it (review s26)
        self.passed = True

    def remember(self) -> None:
        """Remember the check's signature, where it passed (after the first chunk's work)."""
        if self.passed:
            _remember(self.key)
            self.passed = False


def _remember(key: Hashable | None) -> None:
    """Remember that ``key``'s model keeps the examples apart (:data:`_APART`)."""
    _APART.put(key, True)


def replayable(data: Any) -> Any:
    """``data`` itself, or its batches in a list when it is a one-shot iterator (a generator).

    A computation that may hand over to another backend must be able to read the data again.
    The batches are read as every reading is (:func:`~curvlab._kept_batches.read_batches`): the caller's
    RNG left as it was, and a batch overwritten in place by a later one (a loader refilling its
    tensors) refused, not kept N times as the last (found in review: ``diag_hessian`` 85% off).
    Their finiteness is checked where they are used.
    """
    return read_batches(data, finite=False) if isinstance(data, Iterator) else data


def with_backends(
    backend: str,
    scan: ModelScan,
    needs: Iterable[str],
    body: Callable[[Any], T],
    first: tuple[Hashable | None, Any] | None = None,
    data: Any = None,
) -> T:
    """``body(be)`` for the first candidate backend that does not hand over.

    For computations that read the data more than once (Gram blocks, several passes) and so are
    restartable as a whole; ``data`` must be :func:`replayable`. Under a forced ``backend=`` a
    hand-over becomes a clear ``ValueError``. ``first``: ``(signature, inputs of the first
    chunk)`` (``inputs`` ``None`` for a rank without data), checked by :func:`examples_apart`
    after the backend's refusals and before ``body``; ``data``: the data those inputs came from,
    for that check's error (a ``DataLoader(batch_size=None)`` names the missing batch axis).
    """
    check_batchnorm(scan)
    check_parameters_finite(scan.trainable)
    backends = candidates(backend, model_facts(scan), frozenset(needs))
    if first is not None:  # before any per-example work, after the up-front refusals
        examples_apart(scan.model, scan, first[0], first[1], data=data, per_example=True)
    for attempt, be in enumerate(backends):
        try:
            return body(be)
        except Handover as h:
            if backend != "auto":
                raise ValueError(
                    f"backend={backend!r} cannot compute this model exactly: {h}. Use "
                    "backend='auto' or backend='func' (any differentiable model)"
                ) from None
            if attempt == len(backends) - 1:
                raise
    raise AssertionError("unreachable")
