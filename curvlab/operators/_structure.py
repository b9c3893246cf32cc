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

A tensor kept in a public plain attribute (a temperature ``self.temp = torch.tensor(2.0)``, an
unregistered mask) is read by the forward like a buffer: it is recorded by its shape, dtype,
device and the :func:`~curvlab.operators._state.bit_sums` of its values, and a change in place
(through ``.data`` too) or a replacement by other values is refused like a buffer's (found in
review s20: a several-batch Hessian product silently the new model's, off by 1.2 in norm, after
``model.temp.fill_(3.0)``); a new tensor with the same values is the same. Its version counter
and storage are recorded too: a change in place is refused before the product, also where the
graph kept at construction runs no forward pass (one batch: autograd's raw "modified by an
inplace operation" error before, found in review s20), and a rewrite in place with the same
values is accepted (the kept graph built again); a tensor unmoved since is not fingerprinted
again before a product (:meth:`ModelStructure.changes`), its values changed through ``.data``
being seen by :meth:`~curvlab.operators._state.ModelState.values_moved`. Not compared: a tensor
with an autograd history (an activation kept for inspection, ``self.hidden = h``), one without
plain storage (sparse, a subclass) or on the meta device, and tensors inside tuples or lists.

A module's own forward may keep plain state in attributes (a rotary embedding's
``max_seq_len_cached``): an attribute that the operator's own forward passes change is the
model's own state, not a change of the user's, and is left out from then on; so is a tensor
attribute they create or change. Such a tensor moved in place since (written again by a forward
pass of the user's between products) is no refusal, but a graph kept before is built again (it
may have saved the old version: autograd's raw in-place error at every product before, found in
review s20). Attributes that appear or disappear, or whose old or new value is not
plain (an object cached in an attribute), are not compared either: a forward that caches an
object lazily must not be refused. An attribute that only forward passes of the user's change
between products (never the operator's own) cannot be told from a setting the user changed:
refused, naming it.

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
import functools
import sys
import types
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._scan import _own_hook

__all__ = [
    "ModelStateError",
    "ModelStructure",
    "SharedObject",
    "Snapshot",
    "plain_attributes",
    "snapshot",
    "structure_error",
]


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


@dataclass(frozen=True, eq=False)
class _TensorValue:
    """A tensor kept in a plain attribute, as recorded: what its values are read by."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    bits: Tensor
    """:func:`~curvlab.operators._state.bit_sums` of its values (on its device)."""
    ref: Any = None
    """A weak reference to the tensor (``None`` where it takes none)."""
    version: int | None = None
    """Its version counter then (moved by every in-place change but those through ``.data``)."""
    ptr: int | None = None
    """Where its data started then (moved by a ``.data`` assignment)."""

    def same_kind(self, other: Any) -> bool:
        """Whether ``other`` is a recorded tensor of the same shape, dtype and device, with
        fingerprints of one shape (their values are then compared by these)."""
        return (
            isinstance(other, _TensorValue)
            and (self.shape, self.dtype, self.device) == (other.shape, other.dtype, other.device)
            and self.bits.shape == other.bits.shape
        )

    def unmoved(self, t: Tensor) -> bool:
        """Whether ``t`` is the tensor recorded, at the same version counter and storage (its
        values changed, if at all, through ``.data`` alone)."""
        return (
            self.ref is not None
            and self.ref() is t
            and (self.version, self.ptr) == (_version_of(t), _ptr_of(t))
        )


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


def _plain(value: Any, weights: dict[torch.device, Any] | None = None, was: Any = None) -> Any:
    """``value`` as a comparable plain value (lists as tuples; a tensor as a
    :class:`_TensorValue`, with ``weights``: the :class:`~curvlab.operators._state.BitWeights`
    per device, filled as needed; ``was``, as recorded before: taken as it is, no fingerprint
    computed, where it is the same tensor at the same version and storage), or ``_ABSENT`` when
    it is not one (modules, containers of other things, objects, a tensor that is not
    compared: see the module docstring)."""
    if isinstance(value, Tensor):
        if weights is None:
            return _ABSENT
        if isinstance(was, _TensorValue) and was.unmoved(value):
            return was
        return _tensor_value(value, weights)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, _FUNCTIONS):
        return value  # compared by identity
    if isinstance(value, (tuple, list)) and len(value) <= 16:
        items = tuple(_plain(v) for v in value)
        return _ABSENT if any(v is _ABSENT for v in items) else items
    return _ABSENT


def _tensor_value(t: Tensor, weights: dict[torch.device, Any]) -> Any:
    """``t`` as a :class:`_TensorValue`, or ``_ABSENT`` for a tensor not compared (an autograd
    history, the meta device, no plain storage)."""
    from curvlab.operators._state import BitWeights, bit_sums  # (_state imports this module)

    if t.grad_fn is not None or t.device.type == "meta":
        return _ABSENT
    try:
        w = weights.get(t.device)
        if w is None:
            w = weights[t.device] = BitWeights(t.device)
        bits = bit_sums(t, w)
    except (RuntimeError, TypeError, NotImplementedError):  # a subclass that refuses the views
        return _ABSENT
    if bits is None:
        return _ABSENT
    try:
        ref = weakref.ref(t)
    except TypeError:  # pragma: no cover - a tensor type without weak references
        ref = None
    return _TensorValue(tuple(t.shape), t.dtype, t.device, bits, ref, _version_of(t), _ptr_of(t))


def _version_of(t: Tensor) -> int | None:
    """The version counter (``None`` for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _ptr_of(t: Tensor) -> int | None:
    """Where the tensor's data starts (``None`` where there is no such address)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return None


def _same(a: Any, b: Any) -> bool:
    """Whether two plain values are the same (functions: the same object; NaN equals NaN).
    Recorded tensors are compared by :func:`_same_tensor_values`, all at once."""
    if isinstance(a, _FUNCTIONS) or isinstance(b, _FUNCTIONS):
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def _same_tensor_values(pairs: list[tuple[Any, Any]]) -> list[bool]:
    """For each pair of recorded values of which at least one is a :class:`_TensorValue`,
    whether they are the same: one host synchronisation per device for them all."""
    out = [isinstance(a, _TensorValue) and a.same_kind(b) for a, b in pairs]
    by_device: dict[torch.device, list[int]] = {}
    for i, (a, _) in enumerate(pairs):
        if out[i]:
            by_device.setdefault(a.bits.device, []).append(i)
    for where in by_device.values():
        old = torch.stack([pairs[i][0].bits for i in where])
        new = torch.stack([pairs[i][1].bits for i in where])
        for i, same in zip(where, old.eq(new).all(dim=1).tolist()):
            out[i] = bool(same)
    return out


def _compared(key: str) -> bool:
    """Whether a module's attribute ``key`` is one of the public settings compared (see
    :data:`_SKIPPED`; an instance-level ``forward`` is recorded apart)."""
    return not (key.startswith("_") or key in _SKIPPED or key == "forward")


_NOT_SWITCHES = (
    frozenset(nn.Module().__dict__)
    | frozenset(
        {
            "_compiled_call_impl",  # Module.compile
            "_reversed_padding_repeated_twice",  # convolutions
            "_all_weights",  # recurrent layers
            "_flat_weights",
            "_flat_weight_refs",
            "_flat_weights_names",
            "_qkv_same_embed_dim",  # MultiheadAttention
        }
    )
    | _SKIPPED
    | {"forward"}
)
"""The entries of a module's ``__dict__`` that :func:`plain_attributes` leaves out: those
``nn.Module.__init__`` puts in every module (parameters, buffers, submodules, hook dictionaries,
``training``), torch's own private settings of its layers, :data:`_SKIPPED`, and an
instance-level ``forward`` (recorded apart)."""


@dataclass(frozen=True)
class SharedObject:
    """In :func:`plain_attributes`' answer, an object (a config) held by a module, as the
    ``index`` of its entry in the ``objects`` given: read once per call however many modules
    hold it (a Hugging Face model's ``config`` is held by most of its modules)."""

    index: int


def plain_attributes(
    module: nn.Module, objects: dict[int, tuple[Any, ...]] | None = None
) -> tuple[tuple[str, Any], ...]:
    """``module``'s own plain attributes, the switches its forward may read, without tensors (no
    fingerprint, no host synchronisation): ``(name, value)`` pairs sorted by name, hashable
    (functions by identity, held weakly). The part of
    :func:`~curvlab.backends._choice.signature` that a flag such as ``self.mix = True`` changes
    (found in review s26: the memoised examples-apart check was skipped after it).

    Kept: public and private attributes with a plain value (``self.mix``, ``self._mix``; not
    nn.Module's own entries nor torch's private settings: :data:`_NOT_SWITCHES`, nor the state
    its forward was seen to change: :func:`learn_state`); numpy scalars by their value
    (``.item()``); a ``functools.partial`` by its function (weakly), arguments and keywords;
    lists and tuples of any length, sets and frozensets of such values; a dict's plain values
    (``self.opts["mix"]``) as ``(dict, ((key, value), ...))``, however many; and one level of the
    plain attributes of any other object with a ``__dict__`` (a ``SimpleNamespace``, a
    dataclass, Hugging Face's ``PretrainedConfig``: ``self.config.mix``) as
    ``(type, ((name, value), ...))`` (review s26, RX5-2 and RX7-1: a switch kept in these was
    skipped). With ``objects`` (a dict filled across the modules of one call, keyed by ``id``),
    each distinct object is read once and appears as a :class:`SharedObject`: its values are
    then ``tuple(objects.values())`` (the caller puts them in its key). Tensors, modules and
    other objects inside containers are left out (a tensor's values are fingerprinted by
    :class:`ModelStructure`, not here). A value that cannot be keyed (a ``partial`` of an object,
    containers nested deeper than :data:`_DEPTH`) appears as :data:`UNKEYABLE`, which refuses
    hashing: the caller's key is then ``None`` (the call is not remembered), never a key without
    it.
    """
    own = module.__dict__
    names = own.keys() - _NOT_SWITCHES  # (set difference: C speed)
    if _STATE:
        names -= _STATE.get(module, frozenset())
    out = []
    for key in sorted(names):
        value = own[key]
        plain = _keyed(value, 0)
        if plain is _ABSENT:
            plain = _held(value, objects)
        if plain is not _ABSENT:
            out.append((key, plain))
    return tuple(out)


class _Unkeyable:
    """A value that cannot be put in a key: refuses hashing, so the key that holds it is
    ``None`` (never remembered)."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "UNKEYABLE"


UNKEYABLE = _Unkeyable()
"""What :func:`plain_attributes` gives for a value it cannot key (see there)."""

_DEPTH = 4
"""The deepest nesting of containers :func:`plain_attributes` keys (deeper: :data:`UNKEYABLE`)."""

_STATE: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()
"""Per module (held weakly), the names of its plain attributes that its own forward changes (a
call counter): state, not switches, left out of :func:`plain_attributes` (:func:`learn_state`)."""


def learn_state(module: nn.Module, names: frozenset[str]) -> None:
    """Take ``names``, plain attributes of ``module`` that changed while only curvlab's own
    passes ran (its forward changes them: a call counter, ``num_updates``), as state from now
    on: :func:`plain_attributes` leaves them out, so a key taken before such a call is the key
    of the next (review s26, RX7-2: the examples-apart check ran again at every call)."""
    if names:
        _STATE[module] = _STATE.get(module, frozenset()) | names


def state_names(module: nn.Module) -> frozenset[str]:
    """The names :func:`learn_state` took as ``module``'s state."""
    return _STATE.get(module, frozenset()) if _STATE else frozenset()


def _keyed(value: Any, depth: int) -> Any:
    """``value`` as a hashable key part (see :func:`plain_attributes`), ``_ABSENT`` for a tensor,
    a module or another object (left out; dicts and held objects: :func:`_held`), or
    :data:`UNKEYABLE`."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, _FUNCTIONS):
        try:
            return weakref.ref(value)  # equal while the same function lives
        except TypeError:  # a builtin function: no weak reference, nothing of the user's held
            return value
    if isinstance(value, (Tensor, nn.Module)):
        return _ABSENT
    if depth >= _DEPTH:
        return UNKEYABLE
    if isinstance(value, (tuple, list)):
        items = tuple(_keyed(v, depth + 1) for v in value)
        return _worst(items, items)
    if isinstance(value, (set, frozenset)):
        items = tuple(_keyed(v, depth + 1) for v in value)
        found = _worst(items, items)
        return found if found is _ABSENT or found is UNKEYABLE else (frozenset, frozenset(items))
    if isinstance(value, functools.partial):
        func = _keyed(value.func, depth + 1)
        args = _keyed(value.args, depth + 1)
        keywords = _keyed(value.keywords, depth + 1)
        parts = (func, args, keywords)
        if any(p is _ABSENT or p is UNKEYABLE for p in parts):
            return UNKEYABLE  # a partial of an object: its behaviour is not in a key
        return (functools.partial, *parts)
    if isinstance(value, dict) and depth > 0:
        items = tuple((k, _keyed(v, depth + 1)) for k, v in value.items())
        if not all(isinstance(k, _PLAIN) for k, _ in items):
            return UNKEYABLE
        return _worst(tuple(v for _, v in items), (dict, items))
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        item = value.item()
        return item if isinstance(item, _PLAIN) else UNKEYABLE
    return _ABSENT


def _worst(items: tuple[Any, ...], keyed: Any) -> Any:
    """``keyed``, or ``_ABSENT`` where an item is not a value (a tensor, a module, an object:
    the container is left out, as before), or :data:`UNKEYABLE` where an item is."""
    if any(v is UNKEYABLE for v in items):
        return UNKEYABLE
    if any(v is _ABSENT for v in items):
        return _ABSENT
    return keyed


def _held(value: Any, objects: dict[int, tuple[Any, ...]] | None) -> Any:
    """The plain values in a dict or in another object held by a module (see
    :func:`plain_attributes`), or ``_ABSENT``."""
    if isinstance(value, dict):
        items = _plain_items(value)
        return _ABSENT if not items else (dict, items)
    if isinstance(value, (Tensor, nn.Module, type, types.ModuleType, *_FUNCTIONS)):
        return _ABSENT
    if objects is not None:
        found = objects.get(id(value))
        if found is not None:
            return _ABSENT if found[1] is _ABSENT else SharedObject(found[0])
    try:
        fields = getattr(value, "__dict__", None)  # None: slots, a builtin
    except Exception:  # noqa: BLE001 - an object whose attribute access raises: not a switch
        fields = None
    items = _plain_items(fields) if isinstance(fields, dict) else ()
    found = (type(value), items) if items else _ABSENT
    if objects is None:
        return found
    objects[id(value)] = (len(objects), found, value)  # (value: alive while the call runs)
    return _ABSENT if found is _ABSENT else SharedObject(len(objects) - 1)


def _plain_items(values: dict) -> tuple[tuple[Any, Any], ...]:
    """The ``(key, value)`` pairs of ``values`` with a plain key and a keyed value (see
    :func:`_keyed`; tensors, modules and objects left out), in order, all of them."""
    out = []
    for k, v in values.items():
        if isinstance(k, _PLAIN):
            plain = _keyed(v, 1)
            if plain is not _ABSENT:
                out.append((k, plain))
    return tuple(out)


def _foreign_keys(hooks: dict) -> tuple[int, ...]:
    """The keys of the user's hooks in a hook dictionary (not curvlab's or BackPACK's)."""
    if not hooks:
        return ()
    return tuple(k for k, h in hooks.items() if not _own_hook(getattr(h, "__module__", None) or ""))


def snapshot(
    model: nn.Module,
    weights: dict[torch.device, Any] | None = None,
    reuse: Snapshot | None = None,
) -> Snapshot:
    """Record the structure of ``model`` as it is now (see the module docstring); ``weights``:
    the :class:`~curvlab.operators._state.BitWeights` per device of the tensor attributes'
    fingerprints (made here where not given, filled as needed); ``reuse``: an earlier snapshot
    whose fingerprints are taken again for the tensors unmoved since (the same tensor, version
    counter and storage: a change through ``.data`` is then not seen here)."""
    weights = {} if weights is None else weights
    modules: dict[str, _Module] = {}
    for name, m in model.named_modules():
        own = m.__dict__
        before = None if reuse is None else reuse.modules.get(name)
        recorded = before.attributes if before is not None and before.ref() is m else {}
        attributes = {}
        for key, value in own.items():
            if not _compared(key):
                continue
            plain = _plain(value, weights, recorded.get(key))
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


def _changed(old: Snapshot, new: Snapshot, skip: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(module name, attribute)`` of the attributes recorded in both ``old`` and ``new`` on
    the same module object whose values differ (those in ``skip`` left out), in order."""
    pairs: list[tuple[str, str]] = []
    values: list[tuple[Any, Any]] = []
    for name, was in old.modules.items():
        now = new.modules.get(name)
        if now is None or now.ref() is not was.ref():
            continue
        for attr, value in was.attributes.items():
            if (name, attr) not in skip and attr in now.attributes:
                pairs.append((name, attr))
                values.append((value, now.attributes[attr]))
    tensors = [i for i, (a, b) in enumerate(values) if _TensorValue in (type(a), type(b))]
    same = [True] * len(values)
    for i, ok in zip(tensors, _same_tensor_values([values[i] for i in tensors])):
        same[i] = ok
    compared = set(tensors)
    for i, (a, b) in enumerate(values):
        if i not in compared:
            same[i] = _same(a, b)
    return [pair for pair, ok in zip(pairs, same) if not ok]


def _appeared_tensors(old: Snapshot, new: Snapshot) -> set[tuple[str, str]]:
    """``(module name, attribute)`` of the tensor attributes in ``new`` that ``old`` did not
    have on the same module object (created by the forward passes in between)."""
    out = set()
    for name, now in new.modules.items():
        was = old.modules.get(name)
        if was is not None and was.ref() is not now.ref():
            continue
        for attr, value in now.attributes.items():
            if isinstance(value, _TensorValue) and (was is None or attr not in was.attributes):
                out.add((name, attr))
    return out


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
    for name, attr in _changed(old, new, skip):
        value, now_value = old.modules[name].attributes[attr], new.modules[name].attributes[attr]
        if isinstance(value, _TensorValue) and isinstance(now_value, _TensorValue):
            shown = (
                f"the values of a tensor {list(value.shape)} kept in a plain attribute (not a "
                "buffer) changed"
            )
            if (value.shape, value.dtype) != (now_value.shape, now_value.dtype):
                shown = (
                    f"a tensor {list(value.shape)} {_dtype(value)} kept in a plain attribute "
                    f"(not a buffer) -> {list(now_value.shape)} {_dtype(now_value)}"
                )
        else:
            shown = f"{_shown(value)} -> {_shown(now_value)}"
        out.append(f"{_where(name)}.{attr}: {shown}")
    for name, now in new.modules.items():
        if name not in old.modules:
            out.append(f"{_where(name)} ({now.kind.__name__}) added")
    return out


def _dtype(value: _TensorValue) -> str:
    return str(value.dtype).replace("torch.", "")


def _attributes_changed(old: Snapshot, new: Snapshot) -> set[tuple[str, str]]:
    """``(module name, attribute)`` of the plain attributes that differ from ``old`` to ``new``
    on the same module object, and of the tensor attributes ``new`` has and ``old`` had not."""
    return set(_changed(old, new, set())) | _appeared_tensors(old, new)


class ModelStructure:
    """The structure of ``model`` as recorded (see the module docstring).

    Args:
        model: the model (unwrapped).
        before: its :func:`snapshot` before the operator's first forward passes: the plain
            attributes they changed are the model's own state, never compared.
    """

    def __init__(self, model: nn.Module, before: Snapshot | None = None) -> None:
        self.model = model
        self._weights: dict[torch.device, Any] = {}  # the tensor attributes' fingerprint weights
        self._record = snapshot(model, self._weights)
        self._own: set[tuple[str, str]] = set()
        if before is not None:
            self._own |= _attributes_changed(before, self._record)

    def changes(self) -> list[str]:
        """What changed since the record, in words (empty: nothing). The tensor attributes
        unmoved since (the same tensor, version counter and storage) are not fingerprinted
        again: a change of their values through ``.data`` is seen by
        :meth:`~curvlab.operators._state.ModelState.values_moved`, which fingerprints them
        before every product (found in review s20: every attribute fingerprinted twice per
        product, at a cost that grows with its size)."""
        now = snapshot(self.model, self._weights, reuse=self._record)
        return _differences(self._record, now, self._own)

    def moved_in_place(self) -> tuple[list[str], bool]:
        """The tensor attributes recorded (not the model's own state) that still hold the same
        tensor but whose version counter or storage moved (changed in place, ``fill_``): a
        graph kept at construction that saved one raised autograd's raw "modified by an
        inplace operation" error at the next product (found in review s20). Those whose values
        are the same (a rewrite) are recorded again.

        A tensor attribute of the model's own state (one the operator's own forward passes
        write, ``self.scale.copy_(...)``) that moved is recorded again too, whatever its values,
        and counts as a rewrite: a graph kept before that saved it raised autograd's raw
        "modified by an inplace operation" error at every product after a forward pass of the
        user's (found in review s20); built again, it computes at the model's state then, as
        a product over several batches, whose forward passes run again, does.

        Returns:
            ``(names, rewritten)``: ``"<name> (a tensor in a plain attribute)"`` for those
            whose values changed, and whether one moved with the same values, or one of the
            model's own state moved (a graph kept before may hold its old version). Version
            counters compared on the host; a fingerprint computed, and read, only for a tensor
            that moved and is not the model's own state.
        """
        names: list[str] = []
        rewritten = False
        for name, was in self._record.modules.items():
            module = was.ref()
            if module is None:
                continue
            for attr, value in list(was.attributes.items()):
                if not isinstance(value, _TensorValue):
                    continue
                now = module.__dict__.get(attr)
                if not isinstance(now, Tensor) or value.ref is None or value.ref() is not now:
                    continue  # (replaced: compared by its values, values_moved)
                if value.unmoved(now):
                    continue
                if (name, attr) in self._own:  # written by the forward: never compared
                    was.attributes[attr] = replace(
                        value, version=_version_of(now), ptr=_ptr_of(now)
                    )
                    rewritten = True
                    continue
                new = _tensor_value(now, self._weights)
                if isinstance(new, _TensorValue) and _same_tensor_values([(value, new)])[0]:
                    was.attributes[attr] = new  # the same values: recorded at the new version
                    rewritten = True
                else:
                    names.append(f"{name}.{attr}" if name else attr)
        return [f"{n} (a tensor in a plain attribute)" for n in names], rewritten

    def record(self) -> None:
        """Record the structure as it is now (a change accepted)."""
        self._record = snapshot(self.model, self._weights)

    def tensor_attributes(self) -> list[tuple[str, Any, Any]]:
        """``(name, as recorded, now)`` of every tensor attribute recorded (not one of the
        model's own state) that still holds a tensor compared (a :class:`_TensorValue`): read
        by :meth:`~curvlab.operators._state.ModelState.values_moved` before every product, also
        those that run no forward pass (a graph kept at construction holds the tensor)."""
        out = []
        for name, was in self._record.modules.items():
            module = was.ref()
            if module is None:
                continue
            for attr, value in was.attributes.items():
                if not isinstance(value, _TensorValue) or (name, attr) in self._own:
                    continue
                now = module.__dict__.get(attr)
                if isinstance(now, Tensor):
                    now = _tensor_value(now, self._weights)
                    if now is not _ABSENT:
                        out.append((f"{name}.{attr}" if name else attr, value, now))
        return out

    def after_own_passes(self) -> None:
        """After the operator's own forward passes (whose start found no change): the plain
        attributes they changed, and the tensor attributes they created, are the model's own
        state (left out from now on), and whatever else they changed is the model's own doing
        (recorded)."""
        now = snapshot(self.model, self._weights)
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
