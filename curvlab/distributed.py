"""Curvature under ``torch.distributed``: this rank's shard in, the result of all shards out.

When ``torch.distributed`` is initialised (e.g. under ``torchrun``) every curvlab entry point treats
``data`` as this rank's shard and returns, on every rank, the result for the union of all ranks'
shards: exactly what one process would compute on all the data (example-weighted means, sums, token
counts under ``ignore_index``, uneven shards). Nothing else changes: curvlab already sums raw
negative-log-likelihood quantities and counts over batches and scales them once at the end
(:mod:`curvlab._losses`), so each rank's sums are partial sums of the global ones and one
all-reduce of a flat buffer,

    ``[raw sums of every tensor..., N examples, M loss terms, class labels out of range]``,

turns them into the global sums before the scaling (the labels out of range where curvlab counts
them rather than torch's loss: every rank then raises the error, not the rank that holds them
alone; :class:`curvlab.quantities._sweep.Counter`). Operators reduce each product's raw sum the
same way (one all-reduce per product), so estimators built on them (Hutchinson, Hutch++, Lanczos,
SLQ) see the global matrix; their probes come from the given seed and are identical on every rank.

Which group, and how to stay local (``process_group=`` on every entry point):

* ``None`` (default): the default group when ``torch.distributed`` is initialised with more than
  one process, else no communication at all. A call nested in another inherits the outer call's
  choice.
* a ``ProcessGroup`` (``torch.distributed.new_group(...)``): reduce over that group; every member
  must make the same call.
* ``"local"`` (:data:`LOCAL`): this rank's data alone, no communication.

Counts travel in the same buffer as the sums: each count is split into base-2048 digits, which
float32 adds exactly for up to 8192 ranks (:func:`encode_counts`). A buffer of 16-bit values
travels in float32 (bfloat16 holds integers exactly only up to 256, float16 up to 2048, so
neither can carry the digits, and both lose the sums' low digits).

Randomness: a generator given to a call (or made from ``seed=``) is identical on every rank, so
probes agree. Labels sampled from the model (``kind="mc"``, the ``"fisher"`` operator) must differ
between ranks to keep the samples independent: :func:`rank_generator` draws one number from the
shared generator (so it stays in step on every rank) and seeds a per-rank generator with it plus
the rank.

A ``DistributedDataParallel`` (or ``DataParallel``) wrapper is unwrapped (:func:`unwrap_model`), so
results are keyed by the wrapped module's parameter names; so is a ``torch.compile`` wrapper, in
either nesting (docs/training-loops.md). A ``fully_shard`` (FSDP2) model is accepted by the first-order
entry points (``diag_fisher``, ``gradient_stats``, ``Diagnostics``' first-order quantities) and the
noise built on them (``DiagFisherNoise``, ``FisherTraceNoise``, ``IsotropicNoise`` in
``NoisyOptimizer`` and ``sampler.sample``; see :mod:`curvlab._fsdp`), a submodule of one only when it is a
``fully_shard`` unit itself (or all its parameters lie in units inside it); every other call, and
``FullyShardedDataParallel`` (FSDP1) everywhere, is rejected with a clear error.

When ``torch.distributed`` is not initialised none of this runs: :func:`active` returns ``None``
after one ``is_initialized()`` check.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from curvlab._compiled import compiled_note, record_compiled, strip_wrappers
from curvlab._precision import accumulation_dtype, without_autocast
from curvlab._scan import refuse_lazy

__all__ = [
    "LOCAL",
    "collective",
    "communication_stats",
    "group_scope",
    "rank_generator",
    "reset_communication_stats",
]

LOCAL = "local"
"""``process_group=LOCAL`` keeps a call on this rank's data, without any communication."""

_DEFAULT = object()
_SCOPE: ContextVar[Any] = ContextVar("curvlab_process_group", default=_DEFAULT)
_STATS = {"calls": 0, "bytes": 0}
_DIGIT_BITS = 11
_DIGITS = 4  # counts below 2**44


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(frozen=True)
class Comm:
    """The process group a call reduces over.

    Attributes:
        group: the ``ProcessGroup`` (``None`` means the default group, as in ``torch.distributed``).
        rank: this process's rank in the group.
        size: the number of processes in the group (> 1).
    """

    group: Any
    rank: int
    size: int

    def all_reduce_(self, buffer: Tensor) -> Tensor:
        """Sum ``buffer`` over the group in place (one collective) and return it."""
        _STATS["calls"] += 1
        _STATS["bytes"] += buffer.numel() * buffer.element_size()
        torch.distributed.all_reduce(buffer, group=self.group)
        return buffer

    def reduce_sums(
        self,
        values: dict[Any, Tensor],
        counts: Sequence[int | Tensor] = (),
        device: Any = None,
    ) -> tuple[dict[Any, Tensor], list[int]]:
        """Global sums of ``values`` (same keys and shapes on every rank) and of ``counts``.

        One all-reduce of one flat buffer; the keys are packed in a rank-independent order. The
        buffer is the values' promoted dtype, float32 for 16-bit values (they are summed in
        float32, and the counts' digits stay exact), float64 for integers.
        ``device`` is where a buffer of counts alone lives (default: the values' device, or CPU).

        Returns:
            New tensors by key (order, dtype and shape as given), and the counts as Python ints.
        """
        keys = sorted(values, key=repr)
        tensors = [values[k] for k in keys]
        if tensors:
            dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
            device = tensors[0].device
        else:
            dtype, device = torch.float64, torch.device("cpu" if device is None else device)
        dtype = accumulation_dtype(dtype) if dtype.is_floating_point else torch.float64
        parts = [t.detach().reshape(-1).to(dtype) for t in tensors]
        if counts:
            parts.append(encode_counts(counts, dtype, device))
        flat = self.all_reduce_(torch.cat(parts) if parts else torch.zeros(0, dtype=dtype))
        reduced: dict[Any, Tensor] = {}
        start = 0
        for k, t in zip(keys, tensors):
            reduced[k] = flat[start : start + t.numel()].view(t.shape).to(t.dtype)
            start += t.numel()
        return {k: reduced[k] for k in values}, decode_counts(flat[start:], len(counts))

    def failures(self, failure: BaseException | None, device: Any = None) -> list[RankFailure]:
        """Every rank's failure at one point of a call that all ranks reach, raised or not.

        One all-reduce of one flag per rank (on ``device``, CPU by default; a host read), and,
        only where some rank failed, one ``all_gather_object`` of each failed rank's error type
        and message. For a code path whose ranks may fail alone (a backend handing over, a
        memory refusal, a data-dependent error on one rank's shard) before a collective the
        others would wait in: every rank calls this first, then all raise together
        (:func:`raise_for`), none left waiting.

        Args:
            failure: this rank's error, or ``None``.
            device: where the flags live (the device of the call's tensors: NCCL needs CUDA).

        Returns:
            The failed ranks' :class:`RankFailure`, in rank order (empty where none failed).
        """
        flags = torch.zeros(self.size, dtype=torch.float32, device=device)
        flags[self.rank] = float(failure is not None)
        if not bool(self.all_reduce_(flags).any()):
            return []
        mine = None if failure is None else RankFailure.of(self.rank, failure)
        return [f for f in self.all_gather_object(mine) if f is not None]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (pickled; for small metadata only)."""
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj, group=self.group)
        _STATS["calls"] += 1
        return out

    def broadcast_(self, tensor: Tensor, src: int) -> Tensor:
        """``tensor`` of group rank ``src`` on every rank (in place)."""
        _STATS["calls"] += 1
        _STATS["bytes"] += tensor.numel() * tensor.element_size()
        global_src = (
            src if self.group is None else torch.distributed.get_global_rank(self.group, src)
        )
        torch.distributed.broadcast(tensor, global_src, group=self.group)
        return tensor


@dataclass(frozen=True)
class RankFailure:
    """One rank's error as :meth:`Comm.failures` shares it (plain values: it is pickled).

    Attributes:
        rank: the rank that failed.
        kind: the error's type name (``"Handover"`` for a backend that handed over).
        base: the built-in (or curvlab) error type the other ranks raise for it:
            ``"EstimatorMemoryError"``, ``"NotImplementedError"``, ``"TypeError"``,
            ``"ValueError"`` or ``"RuntimeError"``.
        message: its message.
        needed, allowed: an :class:`~curvlab.estimators.EstimatorMemoryError`'s numbers.
    """

    rank: int
    kind: str
    base: str
    message: str
    needed: int | None = None
    allowed: int | None = None

    @staticmethod
    def of(rank: int, error: BaseException) -> RankFailure:
        """``error`` of ``rank``, shared."""
        from curvlab.estimators._memory import EstimatorMemoryError

        base = next(
            (
                t.__name__
                for t in (EstimatorMemoryError, NotImplementedError, TypeError, ValueError)
                if isinstance(error, t)
            ),
            "RuntimeError",
        )
        needed = getattr(error, "needed", None) if base == "EstimatorMemoryError" else None
        allowed = getattr(error, "allowed", None) if base == "EstimatorMemoryError" else None
        return RankFailure(rank, type(error).__name__, base, str(error), needed, allowed)

    def error(self) -> Exception:
        """The error the ranks that did not fail raise for this one: its type (or the built-in
        it derives from), naming the rank and quoting the message."""
        from curvlab.estimators._memory import EstimatorMemoryError

        message = (
            f"on rank {self.rank}: {self.message} (under torch.distributed every rank raises "
            f"this error, so that none is left waiting in a collective)"
        )
        if self.base == "EstimatorMemoryError":
            return EstimatorMemoryError(message, self.needed or 0, self.allowed)
        kinds = {"NotImplementedError": NotImplementedError, "TypeError": TypeError}
        kind = kinds.get(self.base, ValueError if self.base == "ValueError" else RuntimeError)
        return kind(message)


def raise_for(failed: Sequence[RankFailure], failure: BaseException | None) -> None:
    """Raise on every rank after :meth:`Comm.failures` found ``failed``: ``failure`` where this
    rank failed, else the first failed rank's error (:meth:`RankFailure.error`). Returns where
    no rank failed."""
    if failure is not None:
        raise failure
    if failed:
        raise failed[0].error()


@contextmanager
def failing_together(comm: Comm | None, device: Any = None) -> Iterator[None]:
    """Run the block; under ``torch.distributed`` raise on every rank where any rank's block
    raised (:meth:`Comm.failures`, then :func:`raise_for`), else go on.

    For a stretch of rank-local work whose ranks may fail alone on their own shard (a batch's
    checks, a forward pass) before a collective the others would wait in: every rank reaches
    the exchange at the block's end (a failed rank as soon as it fails), so the block must hold
    no collective. The failed rank raises its own error, the others the same type naming that
    rank (:meth:`RankFailure.error`). Costs one all-reduce of one flag per rank (a host read)
    where ``comm`` is a group; nothing where it is ``None`` (a local call).

    Args:
        comm: the call's group (:func:`active`), or ``None``.
        device: where the flags live (the device of the call's tensors: NCCL needs CUDA).
    """
    if comm is None:
        yield
        return
    try:
        yield
    except Exception as exc:
        raise_for(comm.failures(exc, device), exc)
        raise  # unreachable: raise_for raised exc
    raise_for(comm.failures(None, device), None)


def encode_counts(counts: Sequence[int | Tensor], dtype: torch.dtype, device: Any) -> Tensor:
    """Counts as base-2048 digits in ``dtype`` (exact sums in float32 for up to 8192 ranks).

    A 16-bit ``dtype`` gives float32 digits instead: bfloat16 holds integers exactly only up to
    256 and float16 up to 2048, too few for a digit (up to 2047) or a sum of digits; concatenated with
    16-bit values (``torch.cat`` promotes) the buffer then travels in float32. Tensor counts stay
    on the device (no host synchronisation here).

    Example:
        >>> decode_counts(encode_counts([5, 3_000_000], torch.float32, "cpu"), 2)
        [5, 3000000]
        >>> encode_counts([5], torch.bfloat16, "cpu").dtype
        torch.float32
    """
    dtype = accumulation_dtype(dtype)
    digits = []
    for c in counts:
        c = torch.as_tensor(c, device=device).to(torch.int64)
        for i in range(_DIGITS):
            digits.append(torch.bitwise_and(c >> (_DIGIT_BITS * i), (1 << _DIGIT_BITS) - 1))
    return torch.stack(digits).to(dtype) if digits else torch.zeros(0, dtype=dtype, device=device)


def decode_counts(flat: Tensor, num: int) -> list[int]:
    """The inverse of :func:`encode_counts` after summation (one host synchronisation)."""
    if num == 0:
        return []
    d = [round(float(x)) for x in flat.double().cpu()]
    return [
        sum(d[j * _DIGITS + i] << (_DIGIT_BITS * i) for i in range(_DIGITS)) for j in range(num)
    ]


def active() -> Comm | None:
    """The group the current call reduces over, or ``None`` for a local call.

    ``None`` when ``torch.distributed`` is not initialised, when the call runs under
    ``process_group="local"``, or when the group has a single process.
    """
    if not _initialized():
        return None
    scope = _SCOPE.get()
    if isinstance(scope, str) and scope == LOCAL:
        return None
    group = None if scope is _DEFAULT else scope
    if group is not None and group == torch.distributed.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "this process is not a member of the process_group given; call curvlab on the "
            "group's members only, or pass process_group='local' here"
        )
    size = torch.distributed.get_world_size(group)
    if size <= 1:
        return None
    return Comm(group=group, rank=torch.distributed.get_rank(group), size=size)


def _check_group(process_group: Any) -> None:
    if process_group is None or (isinstance(process_group, str) and process_group == LOCAL):
        return
    if isinstance(process_group, str):
        raise ValueError(
            f"process_group must be None (the default group), a torch.distributed ProcessGroup "
            f"or 'local' (no communication), got {process_group!r}"
        )
    if not _initialized():
        raise ValueError(
            "process_group= was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (or drop process_group=)"
        )


@contextmanager
def group_scope(process_group: Any = None) -> Iterator[None]:
    """Run the block with ``process_group`` as the group of every curvlab call inside it.

    ``None`` keeps the enclosing choice (the default group at the top level); ``"local"``
    disables communication; a ``ProcessGroup`` selects that group.
    """
    if process_group is None:
        yield
        return
    _check_group(process_group)
    token = _SCOPE.set(process_group)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def rank_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """``generator`` itself for a local call; else a per-rank generator derived from it.

    One 62-bit number is drawn from ``generator`` (identically on every rank, so the shared
    generator stays in step) and seeds a generator with that number plus the rank: sampled labels
    then differ between ranks (independent samples) and are reproducible.
    """
    comm = active()
    if generator is None or comm is None:
        return generator
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    gen = torch.Generator(device=generator.device)
    gen.manual_seed((base + 0x9E3779B97F4A7C15 * (comm.rank + 1)) % 2**63)
    return gen


def unwrap_model(model: Any) -> Any:
    """The module inside ``DistributedDataParallel``/``DataParallel``/``torch.compile`` wrappers.

    Wrappers nest in any order (a compiled DDP model, DDP around a compiled model); a
    ``torch.compile`` wrapper gives its original module, ``model._orig_mod``, whose parameter
    names are the user's (see :mod:`curvlab._compiled`). Anything else is returned as it is.

    Raises:
        NotImplementedError: for a model sharded by FSDP (``FullyShardedDataParallel`` or
            ``fully_shard``), whose parameters no rank holds whole; an FSDP2 (``fully_shard``)
            model passes only into the entry points that opt in
            (:func:`curvlab._fsdp.supports_fsdp2`, :func:`curvlab._fsdp.fsdp2_allowed`;
            docs/distributed.md, "FSDP2").
    """
    model = strip_wrappers(model)
    if isinstance(model, nn.Module) and _initialized():
        _reject_fsdp(model)
    return model


def _reject_fsdp(model: nn.Module) -> None:
    """Refuse a sharded model, unless it is FSDP2 and the entry point opted in (curvlab/_fsdp.py).

    The opt-in (``supports_fsdp2``) is used up here, so calls nested in the entry point refuse.
    """
    from curvlab._fsdp import enclosed_message, fsdp_kind, take_allowance, unsupported_message

    allowed = take_allowance()
    kind = fsdp_kind(model)
    if kind is None or (kind == "fsdp2" and allowed):
        return
    if kind == "fsdp2_enclosed":  # a submodule (outer.net) of an FSDP2 tree, not a unit itself
        raise NotImplementedError(enclosed_message(model))
    raise NotImplementedError(unsupported_message(kind))


F = TypeVar("F", bound=Callable[..., Any])


def collective(fn: F) -> F:
    """Give an entry point ``process_group=``, DDP and ``torch.compile`` unwrapping, and the
    precision policy.

    The wrapped function gets a keyword-only ``process_group=None`` (see the module docstring);
    its first argument ``model``, if a DDP/DataParallel/``torch.compile`` wrapper, is replaced by
    the wrapped module, and a result computed for a compiled model says so in its
    ``info["compiled"]`` (:mod:`curvlab._compiled`). The call runs with any ambient
    ``torch.autocast`` switched off (curvlab's own passes compute in the parameters' dtype;
    :mod:`curvlab._precision`). Called from code that ``torch.compile`` traces (a compiled
    training step), the entry point is not traced: dynamo breaks the graph there and the call runs
    eagerly (``torch.compiler.disable``; dynamo has no double backward and mis-traces curvlab's
    passes), then the compiled code resumes. Without ``torch.distributed``, ``torch.compile`` and
    autocast this costs a few ``isinstance`` checks per call and one per module (a model with
    lazy, uninitialized parameters is refused before any work: :func:`curvlab._scan.refuse_lazy`),
    a walk over the modules: about 0.1 ms on GPT-2 small's 164, against seconds for any quantity.
    """
    sig = inspect.signature(fn)
    first = next(iter(sig.parameters), None)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        process_group = kwargs.pop("process_group", None)
        note = None  # info["compiled"] of the result: the model as the user passed it
        if args and first == "model":
            note = compiled_note(args[0])
            args = (unwrap_model(args[0]), *args[1:])
            _materialized(args[0])
        elif "model" in kwargs:
            note = compiled_note(kwargs["model"])
            kwargs["model"] = unwrap_model(kwargs["model"])
            _materialized(kwargs["model"])
        with without_autocast():  # curvlab's own passes compute outside the user's autocast
            if process_group is None:
                return record_compiled(fn(*args, **kwargs), note)
            with group_scope(process_group):
                return record_compiled(fn(*args, **kwargs), note)

    if "process_group" not in sig.parameters:
        params = list(sig.parameters.values())
        extra = inspect.Parameter("process_group", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next(
            (i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD),
            len(params),
        )
        params.insert(at, extra)
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    # inside a compiled step: a graph break, the call runs eagerly (docs/training-loops.md);
    # functools.wraps inside keeps the name, docstring and the signature set above
    return torch.compiler.disable(wrapper)  # type: ignore[return-value]


def _materialized(model: Any) -> None:
    """:func:`curvlab._scan.refuse_lazy` of an entry point's model (anything else is left to
    the entry point's own type check)."""
    if isinstance(model, torch.nn.Module):
        refuse_lazy(model)


def communication_stats() -> dict[str, int]:
    """Collectives issued by curvlab in this process so far and the bytes they carried.

    ``bytes`` counts each buffer once per call (what one rank contributes), the figure the
    benchmark compares with the parameter count.
    """
    return dict(_STATS)


def reset_communication_stats() -> None:
    """Set :func:`communication_stats` back to zero."""
    _STATS["calls"] = 0
    _STATS["bytes"] = 0
