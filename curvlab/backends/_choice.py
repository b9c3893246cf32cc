"""Pay the backend choice once: the choice and the first-pass checks, remembered per signature.

Choosing a backend (:func:`curvlab.backends.candidates`: the model's facts, each backend's
refusal) and the checks a fast backend runs on the first forward pass of a session (how often each
parameter enters the loss, which layers hold the examples in their first dimension) depend only
on the model's structure, the loss and the shapes of the inputs. On a small model they cost as
much as the pass itself, and in-loop measurements and noise samplers repeat the same call every
step. :class:`SignatureMemo` remembers, per :func:`signature`, which backend computed the last call
(and why faster ones declined) and what its session learned on the first forward pass; the next
call with the same signature starts that backend directly with the checks already done.

The signature holds the model (by identity, held weakly), its module names, types, modes and
plain attributes (numbers, strings, flags, numpy scalars, containers of them of any length,
functions by identity, ``functools.partial``, public and private, the plain values of a dict and
one level of a config object it holds: :func:`~curvlab.operators._structure.plain_attributes`;
not those its forward changes, a call counter: :class:`ModulesKey`; a flag ``self.mix = True``,
``self._mix = True``, ``self.config.mix = True`` or ``self.opts["mix"] = True`` that turns on
in-batch mixing is a new signature, so the examples-apart check runs again: found in review
s26, where it was skipped and ``diag_fisher`` gave numbers for a model it refuses), why it is
not a plain chain (a user's forward hook added since, say), its trainable parameters' names,
identities (held weakly), shapes, dtypes and devices, the loss's family, reduction and
``ignore_index``, the primitives asked for, the ``backend=`` argument, and the shapes and dtypes
of the first batch. It holds no module and no tensor but by weak reference (nothing of the
user's is kept alive), and an entry of a freed model or parameter is never hit by a later one
given the same ``id``. The values of buffers and of tensors kept in attributes are not in it
(a fingerprint per call); a forward switched to mixing the examples by such a value is checked
again only in a new process. A remembered backend that hands over all the same (a forward that
branches on the values of its inputs) is forgotten and the full choice runs again on the same
chunk, so the memo never changes a result.

Example:
    >>> memo = SignatureMemo(size=2)
    >>> memo.put(("a",), Choice("hooks", (), None))
    >>> memo.get(("a",)).backend, memo.get(("b",))
    ('hooks', None)
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import Tensor, nn

from curvlab._losses import LossSpec
from curvlab._scan import ModelScan
from curvlab.operators._structure import (
    SharedObject,
    learn_state,
    plain_attributes,
    state_names,
)

__all__ = ["Choice", "CHOICES", "Held", "SignatureMemo", "modules_signature", "signature"]


@dataclass(frozen=True)
class Choice:
    """What one call found out.

    Attributes:
        backend: the name of the backend that computed it.
        handed_over: why faster backends declined or handed over, one line each.
        learned: what that backend's session learned on its first forward pass (passed back to
            the next session's ``resume``), or ``None``.
    """

    backend: str
    handed_over: tuple[str, ...]
    learned: Any


V = TypeVar("V")


class SignatureMemo(Generic[V]):
    """A bounded least-recently-used map from a signature (:func:`signature`, or another
    hashable key that holds no module and no tensor) to what a call found out for it: the
    backend :class:`Choice`, whether a model keeps the examples of its batches apart. A ``None``
    key is never remembered."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, V] = OrderedDict()

    def __contains__(self, key: Hashable | None) -> bool:
        return key is not None and key in self._entries

    def get(self, key: Hashable | None) -> V | None:
        if key is None:
            return None
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: Hashable | None, value: V) -> None:
        """Remember ``value`` under ``key``, less the attributes that the call's forward passes
        were seen to change (:meth:`ModulesKey.settled`: state, not switches), so the next call's
        key, taken without them, finds it."""
        if key is None:
            return
        if isinstance(key, tuple) and any(isinstance(k, ModulesKey) for k in key):
            key = tuple(k.settled() if isinstance(k, ModulesKey) else k for k in key)
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, key: Hashable | None) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


CHOICES: SignatureMemo[Choice] = SignatureMemo()
"""The process's memo (signatures only: it holds no module and no tensor)."""


class Held:
    """An object in a key by identity, held weakly: equal to another ``Held`` only while both
    refer to the same live object, so an entry of a freed model or parameter is never taken for
    a later object that Python gave the same ``id`` (review s26, LK-2); hashed by that ``id``."""

    __slots__ = ("_ref", "_hash")

    def __init__(self, obj: Any) -> None:
        self._ref = weakref.ref(obj)
        self._hash = id(obj)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Held):
            return NotImplemented
        held = self._ref()
        return held is not None and held is other._ref()


def _tensor_sig(t: Any) -> Hashable:
    if isinstance(t, Tensor):
        return (tuple(t.shape), t.dtype, t.device, t.requires_grad)
    if isinstance(t, Mapping):
        return tuple((k, _tensor_sig(v)) for k, v in t.items())
    return type(t)


class ModulesKey:
    """The modules' part of a key (:func:`modules_signature`): equal and hashed by ``value``;
    while the call that took it runs, it also refers to the modules, weakly (``None`` once
    remembered).

    A forward that changes a plain attribute of its own (a call counter, ``num_updates``) moved
    it in curvlab's own passes, so the key never repeated: the examples-apart check ran again
    at every call, 4 forward passes per ``Diagnostics`` step for 1 (review s26, RX7-2).
    :meth:`settled`, where the call's result is remembered (after its passes), reads the
    attributes again: those that moved are the modules' state
    (:func:`~curvlab.operators._structure.learn_state`), left out of this key and the later ones.
    """

    __slots__ = ("value", "_modules", "_hash")

    def __init__(
        self, value: tuple[Any, Any], modules: tuple[weakref.ReferenceType, ...] | None
    ) -> None:
        self.value = value
        self._modules = modules
        self._hash: int | None = None

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self.value)
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModulesKey):
            return NotImplemented
        return self.value == other.value

    def settled(self) -> ModulesKey:
        """This key without the modules and without the plain attributes that changed since it
        was taken (learned as state for the later keys)."""
        if self._modules is None:
            return self
        modules, objects = self.value
        out = []
        for (name, kind, training, inplace, attrs), ref in zip(modules, self._modules):
            m = ref()
            if m is None:  # freed since: nothing to read again
                out.append((name, kind, training, inplace, attrs))
                continue
            now = dict(plain_attributes(m))
            # a container (a dict of options beside a call counter) is never state as a
            # whole: its switches would leave the key with the counter (review s26, RX8-1: a
            # flip of opts["mix"] then measured a mixing model); it keeps the key moving, so
            # such a model is checked at every call
            state = frozenset(
                k
                for k, v in attrs
                if not isinstance(v, (SharedObject, tuple, frozenset, list, dict))
                and not _same(now.get(k, v), v)
            )
            learn_state(m, state)
            state = state_names(m)
            if state:
                attrs = tuple((k, v) for k, v in attrs if k not in state)
            out.append((name, kind, training, inplace, attrs))
        return ModulesKey((tuple(out), objects), None)


def _same(a: Any, b: Any) -> bool:
    """Whether two key parts are the same (a NaN the same object as itself)."""
    return a is b or a == b


def modules_signature(named: Iterable[tuple[str, nn.Module]]) -> ModulesKey:
    """The part of a signature that the modules make: each module's name, class, train/eval
    mode, ``inplace`` and :func:`~curvlab.operators._structure.plain_attributes` (private ones,
    dict values and the config objects it holds included: each distinct object read once, its
    values after the modules'; not the state its forward changes: :class:`ModulesKey`).
    :func:`signature` and ``NoisyOptimizer``'s captured-step check
    (``curvlab.noise._optim._call_key``; review s26, RX5-1) key on it."""
    objects: dict[int, tuple[Any, ...]] = {}
    pairs = tuple(named)
    modules = tuple(
        (name, type(m), m.training, m.__dict__.get("inplace"), plain_attributes(m, objects))
        for name, m in pairs
    )
    value = (modules, tuple(found for _, found, _ in objects.values()))
    return ModulesKey(value, tuple(weakref.ref(m) for _, m in pairs))


def signature(
    scan: ModelScan,
    spec: LossSpec,
    needs: frozenset[str],
    backend: str,
    inputs: Any,
    targets: Tensor,
) -> Hashable:
    """The key under which a call's :class:`Choice` is remembered (see the module docstring);
    ``None`` (never remembered) where a plain attribute's value cannot be hashed."""
    modules = modules_signature(scan.modules)
    params = tuple(
        (n, Held(p), tuple(p.shape), p.dtype, p.device) for n, p in scan.trainable.items()
    )
    key = (
        Held(scan.model),
        scan.not_chain,  # a hook added since may break the chain BackPACK was chosen for
        modules,
        params,
        (spec.kind, spec.reduction, spec.ignore_index),
        needs,
        backend,
        _tensor_sig(inputs),
        _tensor_sig(targets),
    )
    try:
        hash(key)
    except TypeError:  # an enum member or function object that refuses hashing, an unkeyable
        return None  # value (plain_attributes' UNKEYABLE)
    return key
