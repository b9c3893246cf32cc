"""What an operator's forward passes run besides the tensors: the modules, their hooks, their
instance-level ``forward`` and their plain attributes, recorded when the operator is built.

:class:`~curvlab.operators._state.ModelState` records the parameters and buffers. A product that
runs the model's forward pass again (a graph rebuilt for each of several batches, a forward-mode
``J v``) also runs whatever modules, hooks and settings the model has *then*: after a
parameterless submodule was replaced (``model[1] = nn.ReLU()`` for a ``Tanh``), a ``Dropout``'s
``p`` changed or a forward hook added, the products of a three-batch operator were those of the
new model (off by 0.96 to 1.39 relative, silently), while one batch's kept the matrix as built
(found in review). :class:`ModelStructure` records, for every module of ``named_modules()``, its
identity and class, the keys of its forward, forward pre-, backward and backward pre-hooks (the
user's, not curvlab's or BackPACK's), an instance-level
``forward`` and its public plain attributes (numbers, strings, booleans, ``None``, tuples of
them: ``Dropout.p``, ``eps``, ``negative_slope``, a convolution's ``stride``; functions by
identity: ``TransformerEncoderLayer.activation``).

A module's own forward may keep plain state in attributes (a rotary embedding's
``max_seq_len_cached``): an attribute that the operator's own forward passes change is the
model's own state, not a change of the user's, and is left out from then on. Attributes that
appear or disappear, or whose old or new value is not plain (a tensor cached in an attribute),
are not compared either: a forward that caches an object lazily must not be refused. An
attribute that only forward passes of the user's change between products (never the
operator's own) cannot be told from a setting the user changed: refused, naming it.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))
    >>> structure = ModelStructure(model)
    >>> structure.changes()
    []
    >>> model[1].p = 0.5
    >>> structure.changes()
    ["'1'.p: 0.0 -> 0.5"]
"""

from __future__ import annotations

import enum
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvlab._scan import _own_hook

__all__ = ["ModelStateError", "ModelStructure", "Snapshot", "snapshot", "structure_error"]


class ModelStateError(RuntimeError):
    """A product refused because the model changed since the operator was built, or changes
    itself at its forward passes (a ``RuntimeError``; never taken for a failed batched product,
    which falls back to one vector at a time)."""


_HOOKS = (
    ("_forward_pre_hooks", "forward pre-hook"),
    ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"),
    ("_backward_hooks", "backward hook"),
)
"""A module's hook dictionaries (keyed by handle id) and what each hook is called."""

_SKIPPED = frozenset({"training", "inplace", "gradient_checkpointing", "scale_grad_by_freq"})
"""Public attributes that change no value the operator computes: ``training`` (its passes run
in the modes as built), ``inplace``, ``gradient_checkpointing`` (the same values), and
``scale_grad_by_freq`` (off in every pass of curvlab's, :func:`curvlab._notrace.leave_no_trace`)."""

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType)
_ABSENT = object()


@dataclass
class _Module:
    """One module as recorded."""

    ref: weakref.ReferenceType
    kind: type
    hooks: dict[str, tuple[int, ...]]
    forward: Any
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Snapshot:
    """The structure of a model at one moment: its modules by name."""

    modules: dict[str, _Module]


def _plain(value: Any) -> Any:
    """``value`` as a comparable plain value (lists as tuples), or ``_ABSENT`` when it is not
    one (tensors, modules, containers of other things, objects)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, _FUNCTIONS):
        return value  # compared by identity
    if isinstance(value, (tuple, list)) and len(value) <= 16:
        items = tuple(_plain(v) for v in value)
        return _ABSENT if any(v is _ABSENT for v in items) else items
    return _ABSENT


def _same(a: Any, b: Any) -> bool:
    """Whether two plain values are the same (functions: the same object; NaN equals NaN)."""
    if isinstance(a, _FUNCTIONS) or isinstance(b, _FUNCTIONS):
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def _foreign_keys(hooks: dict) -> tuple[int, ...]:
    """The keys of the user's hooks in a hook dictionary (not curvlab's or BackPACK's)."""
    if not hooks:
        return ()
    return tuple(k for k, h in hooks.items() if not _own_hook(getattr(h, "__module__", None) or ""))


def snapshot(model: nn.Module) -> Snapshot:
    """Record the structure of ``model`` as it is now (see the module docstring)."""
    modules: dict[str, _Module] = {}
    for name, m in model.named_modules():
        own = m.__dict__
        attributes = {}
        for key, value in own.items():
            if key.startswith("_") or key in _SKIPPED or key == "forward":
                continue
            plain = _plain(value)
            if plain is not _ABSENT:
                attributes[key] = plain
        modules[name] = _Module(
            ref=weakref.ref(m),
            kind=type(m),
            hooks={attr: _foreign_keys(getattr(m, attr, {})) for attr, _ in _HOOKS},
            forward=own.get("forward", _ABSENT),
            attributes=attributes,
        )
    # global module hooks are not compared: torch registers them to watch while one of its
    # modes is active (FlopCounterMode, torch.utils.module_tracker), and an operator's products
    # were refused under FlopCounterMode (found in self-review)
    return Snapshot(modules)


def _where(name: str) -> str:
    return f"'{name}'" if name else "the model"


def _shown(value: Any) -> str:
    text = getattr(value, "__qualname__", None) if isinstance(value, _FUNCTIONS) else None
    text = text or repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(old: Snapshot, new: Snapshot, skip: set[tuple[str, str]]) -> list[str]:
    """What changed from ``old`` to ``new``, in words (attributes in ``skip`` left out)."""
    out: list[str] = []
    for name, was in old.modules.items():
        now = new.modules.get(name)
        if now is None:
            out.append(f"{_where(name)} ({was.kind.__name__}) removed")
            continue
        if now.ref() is not was.ref():
            out.append(f"{_where(name)}: {was.kind.__name__} replaced by a {now.kind.__name__}")
            continue
        if now.kind is not was.kind:
            out.append(f"{_where(name)}: class {was.kind.__name__} -> {now.kind.__name__}")
        for attr, what in _HOOKS:
            if set(now.hooks[attr]) - set(was.hooks[attr]):
                out.append(f"{_where(name)}: a {what} added")
            if set(was.hooks[attr]) - set(now.hooks[attr]):
                out.append(f"{_where(name)}: a {what} removed")
        if now.forward is not was.forward:
            out.append(f"{_where(name)}: its forward replaced (an instance attribute)")
        for attr, value in was.attributes.items():
            if (name, attr) in skip or attr not in now.attributes:
                continue
            if not _same(value, now.attributes[attr]):
                shown = f"{_shown(value)} -> {_shown(now.attributes[attr])}"
                out.append(f"{_where(name)}.{attr}: {shown}")
    for name, now in new.modules.items():
        if name not in old.modules:
            out.append(f"{_where(name)} ({now.kind.__name__}) added")
    return out


def _attributes_changed(old: Snapshot, new: Snapshot) -> set[tuple[str, str]]:
    """``(module name, attribute)`` of the plain attributes that differ from ``old`` to ``new``
    on the same module object."""
    out = set()
    for name, was in old.modules.items():
        now = new.modules.get(name)
        if now is None or now.ref() is not was.ref():
            continue
        for attr, value in was.attributes.items():
            if attr in now.attributes and not _same(value, now.attributes[attr]):
                out.add((name, attr))
    return out


class ModelStructure:
    """The structure of ``model`` as recorded (see the module docstring).

    Args:
        model: the model (unwrapped).
        before: its :func:`snapshot` before the operator's first forward passes: the plain
            attributes they changed are the model's own state, never compared.
    """

    def __init__(self, model: nn.Module, before: Snapshot | None = None) -> None:
        self.model = model
        self._record = snapshot(model)
        self._own: set[tuple[str, str]] = set()
        if before is not None:
            self._own |= _attributes_changed(before, self._record)

    def changes(self) -> list[str]:
        """What changed since the record, in words (empty: nothing)."""
        return _differences(self._record, snapshot(self.model), self._own)

    def record(self) -> None:
        """Record the structure as it is now (a change accepted)."""
        self._record = snapshot(self.model)

    def after_own_passes(self) -> None:
        """After the operator's own forward passes (whose start found no change): the plain
        attributes they changed are the model's own state (left out from now on), and whatever
        else they changed is the model's own doing (recorded)."""
        now = snapshot(self.model)
        self._own |= _attributes_changed(self._record, now)
        self._record = now


def structure_error(changes: list[str], forward_mode: bool) -> ModelStateError:
    """The error for a model whose structure changed since an operator was built, when a
    product would run its forward pass again.

    Args:
        changes: what changed, in words.
        forward_mode: whether the products compute ``J v`` in forward mode (a forward pass at
            every product, whatever ``keep_graph``).
    """
    shown = "; ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
    if forward_mode:
        way = (
            " (keep_graph=True does not help here: this operator computes J v in forward mode, "
            "which runs the model's forward pass at every product)"
        )
    else:
        way = (
            ", or build this one with keep_graph=True (every batch's graph built once, at "
            "construction: its products run no forward pass and keep the matrix as built)"
        )
    return ModelStateError(
        f"the model changed since this operator was built: {shown}. Its products run the "
        "model's forward pass again and would apply the changed model's matrix, not the one "
        f"built. Build a new operator with curvature_operator(...) for the changed model{way}"
    )
