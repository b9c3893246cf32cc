"""What an operator's forward passes read of the model besides the data: every parameter (the
selected ones and the rest) and buffer, recorded when the operator is built.

An operator is one fixed matrix. Its products run the model's forward pass again (a graph rebuilt
for each of several batches, a forward-mode ``J v``), so a parameter outside ``params=``, a frozen
one or a buffer changed in place after the build gave products at the new state with several
batches and at the old one with one (found in review: ``op @ v`` off by 0.11 after an optimizer
step on the backbone of a ``params=`` head). :class:`ModelState` records each tensor's identity,
storage and version counter; products refuse after any of them moved outside curvlab's own passes.

Some tensors move at every forward pass without changing: the weight of an
``nn.Embedding(max_norm=...)``, which torch renormalises in place (``embedding_renorm_`` bumps the
version counter even when no row exceeds the norm, and :func:`curvlab._notrace.leave_no_trace`
puts the values back), or a buffer a module rewrites with ``copy_`` (an observer's range). For
these (the max_norm weights, and whatever the operator's first forward passes moved)
:class:`ModelState` keeps a fingerprint of the values and accepts a moved version when the values
are the same (found in review: every Hessian quantity refused max_norm models with "the model's
parameters changed").

What the first forward passes over some batches change once (a rotary cos/sin cache registered
again, longer, for a longer sequence: ``"<name> (grown)"``) is left to the operator, which runs
that product again (:meth:`curvlab.operators.CurvatureOperator._over_batches`). The modules,
hooks and plain attributes the forward passes run are recorded too
(:class:`~curvlab.operators._structure.ModelStructure`, :attr:`ModelState.structure`).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> state = ModelState(model, copied=[])
    >>> state.changes().changed
    []
    >>> with torch.no_grad():
    ...     _ = model.bias.add_(1.0)
    >>> state.changes().changed
    ['bias']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._kept_batches import fingerprint, same_fingerprint
from curvlab._text import few
from curvlab.operators._structure import ModelStateError, ModelStructure, Snapshot

__all__ = [
    "ModelState",
    "ModelStateError",
    "Changes",
    "changed_error",
    "first_pass_error",
    "own_pass_error",
    "relative_difference",
    "values_fingerprint",
    "tensor_versions",
    "versions",
]


_CHUNK = 1 << 22
"""Entries per chunk of :func:`_weighted_sum` (bounds its temporary memory)."""


def values_fingerprint(t: Tensor) -> tuple[Tensor, ...]:
    """:func:`~curvlab._kept_batches.fingerprint` (64 entries and the sum) and a position-weighted
    sum ``sum_i (i + 1) t_i`` in float64, all on ``t``'s device without a host synchronisation.

    The weighted sum sees what the other two miss: a change of entries that were not sampled
    which keeps the sum (rows swapped; an SGD step on an embedding followed by a LayerNorm, whose
    gradient rows sum to zero).
    """
    entries, total = fingerprint(t)
    return entries, total, _weighted_sum(t)


def _weighted_sum(t: Tensor) -> Tensor:
    """``sum_i (i + 1) t_i`` over the flat entries (real and imaginary parts of complex ones)."""
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    acc = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to(torch.float64)
        weights = torch.arange(
            start + 1, start + 1 + part.numel(), dtype=torch.float64, device=flat.device
        )
        acc += torch.dot(part, weights)
    return acc


@dataclass
class _Slot:
    """One tensor of the model as recorded: identity, storage, version (and values, for tensors a
    forward pass rewrites with the same values)."""

    kind: str  # "parameter" or "buffer"
    tensor: Tensor
    version: int | None
    ptr: int | None
    values: tuple[Tensor, ...] | None = None


@dataclass
class Changes:
    """What moved since the state was recorded.

    Attributes:
        changed: names of parameters and buffers changed in place, through ``.data``, replaced by
            other tensors, added or removed (``"<name> (new)"``, ``"<name> (removed)"``,
            ``"<name> (replaced)"``; ``"<name> (grown)"``: a buffer replaced by a larger one whose
            leading entries hold the recorded values, as a cache grown for longer inputs).
        parameters: whether any of ``changed`` is a parameter (else all are buffers).
        rewritten: whether a tensor that a forward pass rewrites in place moved with the same
            values (accepted and recorded again; a graph kept before may hold its old version).
    """

    changed: list[str] = field(default_factory=list)
    parameters: bool = False
    rewritten: bool = False


class ModelState:
    """The parameters and buffers of ``model`` as recorded (see the module docstring).

    Args:
        model: the model (unwrapped).
        copied: ``(module, buffer name, ...)`` of the buffers the operator's passes run on copies
            of (:func:`curvlab._notrace.buffer_snapshot`): the model's own tensors there are not
            read by the operator, and a train-mode forward of the user's may update them.
        before: :func:`versions` of the model before the operator's first forward passes: the
            tensors they moved get a fingerprint too.
        before_structure: the model's :func:`~curvlab.operators._structure.snapshot` then (the
            plain attributes those passes changed are the model's own state).

    Attributes:
        structure: the modules, hooks and plain attributes as recorded
            (:class:`~curvlab.operators._structure.ModelStructure`).
    """

    def __init__(
        self,
        model: nn.Module,
        copied: Iterable[tuple[nn.Module, str, Any]],
        before: dict[int, int | None] | None = None,
        before_structure: Snapshot | None = None,
    ) -> None:
        self.model = model
        self._copied = {(id(m), name) for m, name, *_ in copied}
        moved = {i for i, v in versions(model).items() if before is not None and before.get(i) != v}
        self._rewrites = moved | {
            id(m.weight)
            for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
        }
        self._slots: dict[str, _Slot] = {}
        self.structure = ModelStructure(model, before_structure)
        self._record_tensors()

    def _current(self) -> dict[str, tuple[str, Tensor]]:
        """``name -> (kind, tensor)`` of every parameter and every buffer the operator reads."""
        out: dict[str, tuple[str, Tensor]] = {}
        for name, p in self.model.named_parameters():
            out[name] = ("parameter", p)
        for prefix, m in self.model.named_modules():
            for name, b in m._buffers.items():
                if b is None or (id(m), name) in self._copied:
                    continue
                out.setdefault(f"{prefix}.{name}" if prefix else name, ("buffer", b))
        return out

    def record(self) -> None:
        """Record every tensor, and the structure, as they are now, after forward passes of
        curvlab's own (the plain attributes they changed are the model's own state)."""
        self._record_tensors()
        self.structure.after_own_passes()

    def rewrites_too(self, names: Iterable[str]) -> None:
        """Give the tensors ``names`` (changed in place by a forward pass) a fingerprint: from
        now on a move with the same values is accepted (a forward that rewrites them)."""
        wanted = {n.split(" ")[0] for n in names}
        self._rewrites |= {id(t) for n, (_, t) in self._current().items() if n in wanted}

    def _record_tensors(self) -> None:
        """Record every tensor as it is now."""
        rewritten = self._rewrites
        self._slots = {
            name: _Slot(
                kind,
                t,
                _version(t),
                _ptr(t),
                values_fingerprint(t) if id(t) in rewritten else None,
            )
            for name, (kind, t) in self._current().items()
        }

    def changes(self) -> Changes:
        """What moved since :meth:`record`; a rewritten tensor with unchanged values is recorded
        again (its new version counter)."""
        out = Changes()
        now = self._current()
        for name in now.keys() - self._slots.keys():
            out.changed.append(f"{name} (new)")
            out.parameters = out.parameters or now[name][0] == "parameter"
        for name, slot in self._slots.items():
            kind, t = now.get(name, (slot.kind, None))
            if t is None:
                out.changed.append(f"{name} (removed)")
            elif t is not slot.tensor:
                if (
                    kind == "buffer"
                    and _version(slot.tensor) == slot.version
                    and _same(slot.tensor, t)
                ):
                    # a buffer registered again with the same values (a forward that
                    # re-registers a table): the function is the same
                    self._slots[name] = _Slot(kind, t, _version(t), _ptr(t), slot.values)
                    continue
                grown = (
                    kind == "buffer"
                    and _version(slot.tensor) == slot.version
                    and _grown(slot.tensor, t)
                )
                out.changed.append(f"{name} ({'grown' if grown else 'replaced'})")
            elif _version(t) == slot.version and _ptr(t) == slot.ptr:
                continue
            elif slot.values is not None and same_fingerprint(values_fingerprint(t), slot.values):
                slot.version, slot.ptr = _version(t), _ptr(t)
                out.rewritten = True
                continue
            else:
                out.changed.append(name)
            out.parameters = out.parameters or kind == "parameter"
        out.changed.sort()
        return out


def tensor_versions(tensors: Iterable[Tensor]) -> list[int | None]:
    """The version counters of ``tensors``, in order (``None`` for an inference tensor): moved
    by every in-place change."""
    return [_version(t) for t in tensors]


def versions(model: nn.Module) -> dict[int, int | None]:
    """``id -> version counter`` of every parameter and buffer of ``model``."""
    out = {id(p): _version(p) for p in model.parameters()}
    out.update((id(b), _version(b)) for b in model.buffers())
    return out


def changed_error(changes: Changes, selected: Iterable[str]) -> ModelStateError:
    """The error for parameters or buffers changed since an operator (acting on the parameters
    ``selected``) was built."""
    names = changes.changed
    outside = [n for n in names if n.split(" ")[0] not in set(selected)]
    what = "parameters" if changes.parameters else "buffers"
    note = ""
    if outside and changes.parameters:
        note = (
            " (parameters outside the operator's selection, params= or frozen ones, count too: "
            "its forward passes read them)"
        )
    if any(n.endswith(" (grown)") for n in names):
        note += (
            " (grown: replaced by a larger buffer that starts with the old values, as a forward "
            "pass on longer inputs grows a cache; whether the function stayed the same cannot "
            "be told)"
        )
    return ModelStateError(
        f"the model's {what} changed since this operator was built: {few(names)} changed in "
        f"place, through .data, or were replaced{note}; build a new operator with "
        "curvature_operator(...) for the new parameters"
    )


_REFUSED_FROM_NOW = (
    "This operator refuses this product and every later one (a retry is not the fix). "
)


def own_pass_error(names: list[str], forward_mode: bool = False) -> ModelStateError:
    """The error for parameters or buffers that an operator's own forward passes change again
    and again (not only on their first pass over a batch)."""
    if forward_mode:
        way = (
            "Make that update conditional on module.training and put the module in eval mode "
            "(keep_graph=True does not help here: this operator computes J v in forward mode, "
            "which runs the model's forward pass at every product)"
        )
    else:
        way = (
            "Build the operator with keep_graph=True (every batch's graph built once, at "
            "construction: products run no forward pass), or make that update conditional on "
            "module.training and put the module in eval mode"
        )
    return ModelStateError(
        f"the model's forward pass changes {few(names)} in place or replaces them, each time "
        "it runs and not only on its first pass over a batch (a custom module's running "
        "statistic in a buffer, a hook that rewrites a weight, a buffer that keeps growing): "
        "each product of this operator runs forward passes and would apply another matrix. "
        + _REFUSED_FROM_NOW
        + way
    )


def first_pass_error(names: list[str], relative: float) -> ModelStateError:
    """The error for buffers that the first forward passes over some batches changed once, in a
    way that changes the products (the same product before and after differs by
    ``relative``)."""
    return ModelStateError(
        f"the model's forward pass changed {few(names)} on its first pass over some batches "
        "(a state it keeps, such as a table rebuilt for the longest input seen), and this "
        f"product computed before and after that change differs by {relative:.1e} relative: "
        "the operator's matrix would depend on the order of its passes. "
        + _REFUSED_FROM_NOW
        + "Build the operator with keep_graph=True (every batch's graph built once, at "
        "construction, in one pass over the data), or set that state before building it "
        "(a forward pass on the longest input first)"
    )


def relative_difference(a: Any, b: Any) -> float:
    """``max |a - b| / max |a|`` of two sums (tensors, or lists of tensors); entries equal in
    both (NaN in both included) count as no difference."""
    diff, scale = 0.0, 0.0
    for x, y in zip(a, b) if isinstance(a, list) else [(a, b)]:
        if not x.numel():
            continue
        x, y = x.double(), y.double()
        same = (x == y) | (x.isnan() & y.isnan())
        d = (x - y).abs().masked_fill(same, 0.0).nan_to_num(nan=float("inf"))
        diff = max(diff, float(d.max()))
        scale = max(scale, float(x.abs().nan_to_num(nan=0.0, posinf=0.0).max()))
    return diff / scale if scale > 0 else diff


def _grown(old: Tensor, new: Tensor) -> bool:
    """Whether ``new`` is ``old`` grown: the same dtype, device and number of dimensions, at
    least as large in each, and its leading block equal to ``old`` (a cache rebuilt larger)."""
    if (
        new.dtype != old.dtype
        or new.device != old.device
        or new.ndim != old.ndim
        or any(n < o for n, o in zip(new.shape, old.shape))
    ):
        return False
    return torch.equal(new[tuple(slice(0, o) for o in old.shape)], old)


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same values (shape, dtype and device too)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _version(t: Tensor) -> int | None:
    """The version counter (``None`` for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _ptr(t: Tensor) -> int | None:
    """Where the tensor's data starts (``None`` where there is no such address)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return None
