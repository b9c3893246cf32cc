"""The random states one reading of the data draws from, to keep and carry over its batches.

A shuffling ``DataLoader`` draws its order (and its workers' seeds) from torch's global RNG or
from its own ``generator=`` (or its sampler's); a dataset's augmentation draws from torch's,
numpy's or Python's global RNG (albumentations and custom ``np.random`` transforms; torchvision's
``RandomChoice``/``RandomOrder`` use ``random``), or from a generator the dataset keeps
(``self.generator``). :func:`reading_rngs` lists them as :class:`Kept` states that
:func:`curvlab._data.iter_batches` runs the reading on (carried from batch to batch, the caller's
put back around each), so that every reading sees the same draws and the caller's loop the ones
it would have had.

Found are: the three global RNGs, and an accelerator's (each of ``torch.cuda.default_generators``
once CUDA is initialised: a GPU augmentation's ``torch.randn(..., device="cuda")``); and generators (``torch.Generator``, numpy's ``Generator`` and
``RandomState``, ``random.Random``) held as attributes of the loader, its ``sampler``,
``batch_sampler`` (and that one's ``sampler``), ``dataset`` and ``collate_fn`` (and the objects
the ``collate_fn`` holds, one level down), and of the same owners of a loader held by a
wrapper (a ``DeviceLoader`` whose ``__iter__`` moves the batches of ``self.loader``). A
generator made during a reading (``self.rng = None`` until first use) is dropped again after
it (:mod:`curvlab._sampler_state`). A generator held deeper (a ``Subset``'s dataset's, a transform's, a closure's)
is not found: its draws differ between readings, which ``analyze`` notices
(:mod:`curvlab._same_readings`). numpy's and Python's states cost a few hundred microseconds per
batch to switch (:class:`Kept`).

Example:
    >>> import random
    >>> from curvlab._reading_rngs import device_generators, reading_rngs
    >>> kept = reading_rngs([])  # a list draws nothing of its own: the global RNGs only
    >>> len(kept) - len(device_generators())  # torch's CPU, Python's, numpy's; then a GPU's
    3
    >>> state = kept[1].get()
    >>> _ = random.random()
    >>> kept[1].put(state)
    >>> state == random.getstate()
    True
"""

from __future__ import annotations

import functools
import random
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Carried",
    "Kept",
    "collate_owners",
    "device_generators",
    "host_rngs",
    "held_generators",
    "held_states",
    "loaders_of",
    "reading_rngs",
    "same_state",
]


@dataclass(frozen=True)
class Kept:
    """One random state: how to read it (``get``) and set it (``put``), through the generator's
    own API (``get_state``/``set_state``, ``getstate``/``setstate``). numpy's cost about 40 µs
    each and Python's about 10 µs, so a reading pays a few hundred microseconds per batch for
    them; curvlab does not read or write their memory directly."""

    get: Callable[[], Any]
    put: Callable[[Any], None]


class Carried:
    """One state a reading runs on: its own ``stream`` (started from the caller's state, carried
    from batch to batch) switched in by :meth:`enter` before each step of the reading and the
    caller's state switched back by :meth:`leave` after it. Every state is carried over the whole
    reading (review s25: numpy's and Python's were dropped after a first batch that drew nothing
    from them, and later batches drew from the caller's state)."""

    __slots__ = ("_kept", "caller", "stream")

    def __init__(self, kept: Kept) -> None:
        self._kept = kept
        self.stream = kept.get()
        self.caller = self.stream

    def enter(self) -> None:
        """Put the stream in place (the caller's state kept)."""
        self.caller = self._kept.get()
        self._kept.put(self.stream)

    def leave(self) -> None:
        """Take the stream's state and put the caller's back."""
        self.stream = self._kept.get()
        self._kept.put(self.caller)


def _random_state(r: np.random.RandomState) -> Kept:
    """A numpy ``RandomState``: its bit generator's state and cached normal, through
    ``get_state(legacy=False)``/``set_state`` (no warning where the bit generator is not an
    MT19937, e.g. after ``np.random.set_bit_generator(PCG64())``: found in review s25)."""
    return Kept(lambda: r.get_state(legacy=False), r.set_state)


def _python_random(r: random.Random) -> Kept:
    """A ``random.Random``: through ``getstate``/``setstate``."""
    return Kept(r.getstate, r.setstate)


def host_rngs() -> list[Kept]:
    """Python's ``random`` and numpy's global ``np.random``."""
    return [
        _python_random(random._inst),  # type: ignore[attr-defined]
        _random_state(np.random.mtrand._rand),  # type: ignore[attr-defined]
    ]


_ACCELERATORS = ("cuda", "xpu")
"""The torch device modules whose default generators (``torch.<name>.default_generators``, one
per device) a reading carries once the module is initialised."""


def device_generators() -> list[torch.Generator]:
    """The global RNGs of the accelerators in use: each initialised device module's
    ``default_generators`` (``torch.cuda.default_generators[i]``, which ``torch.randn(...,
    device="cuda:i")`` draws from). None of a module that is not initialised: reading its state
    would initialise it (and start a CUDA context in a process that never used the GPU); a
    model or batch on the device has initialised it before the reading."""
    found: list[torch.Generator] = []
    for name in _ACCELERATORS:
        module = getattr(torch, name, None)
        initialised = getattr(module, "is_initialized", None)
        if initialised is None or not initialised():
            continue
        found.extend(g for g in getattr(module, "default_generators", ()) if _is_generator(g))
    return found


def _global_rngs() -> list[Kept]:
    """Torch's global CPU RNG, Python's ``random``, numpy's global ``np.random`` and each
    initialised accelerator's (:func:`device_generators`: until review s26 a GPU augmentation,
    ``torch.randn(..., device="cuda")`` in a loader, drew other noise at every reading, moved the
    caller's device RNG, and ``analyze`` refused it with ``ReadingsDifferError``)."""
    devices = [Kept(g.get_state, g.set_state) for g in device_generators()]
    return [Kept(torch.get_rng_state, torch.set_rng_state), *host_rngs(), *devices]


def same_state(a: Any, b: Any) -> bool:
    """Whether two states of one generator are equal (tuples and dicts of ints, floats and
    arrays, as ``random``'s and numpy's are; tensors as torch's)."""
    if isinstance(a, (tuple, list)):
        if not any(isinstance(x, (np.ndarray, Tensor, dict, tuple, list)) for x in a):
            return a == b  # Python's: a tuple of 625 ints, compared at once
        return (
            isinstance(b, (tuple, list))
            and len(a) == len(b)
            and all(same_state(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a, b)
    return bool(a == b)


def _is_global(g: Any) -> bool:
    """Whether ``g`` is one of the global RNGs :func:`_global_rngs` carries already: torch's
    ``default_generator``, an accelerator's (``torch.cuda.default_generators[i]``), Python's
    ``random._inst`` or numpy's ``np.random.mtrand._rand`` (which sklearn's
    ``check_random_state(None)`` returns)."""
    globals_ = (
        torch.default_generator,
        *device_generators(),
        random._inst,  # type: ignore[attr-defined]
        np.random.mtrand._rand,  # type: ignore[attr-defined]
    )
    return any(g is h for h in globals_)


def reading_rngs(data: Any) -> list[Kept]:
    """The random states a reading of ``data`` may draw from: the global RNGs, then each
    generator :func:`_generators_of` finds (once each), less the global ones (a dataset holding
    ``np.random.mtrand._rand``, a loader given ``generator=torch.default_generator``): carried
    twice, the second handle took the first's stream for the caller's state, and every batch
    drew the same numbers (review s26: exact trace 2.2478 for 1.3398, numpy's state moved)."""
    return _global_rngs() + [_kept(g) for g in _generators_of(data) if not _is_global(g)]


def _kept(g: Any) -> Kept:
    """The state of one generator (see :func:`_is_generator`)."""
    if isinstance(g, torch.Generator):
        return Kept(g.get_state, g.set_state)
    if isinstance(g, np.random.Generator):
        bits = g.bit_generator

        def put(state: Any) -> None:
            bits.state = state

        return Kept(lambda: bits.state, put)
    if isinstance(g, np.random.RandomState):
        return _random_state(g)
    return _python_random(g)  # random.Random


def _is_generator(x: Any) -> bool:
    """A generator whose state can be read and set (not ``random.SystemRandom``: the OS's)."""
    return isinstance(
        x, (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)
    ) and not isinstance(x, random.SystemRandom)


def held_generators(modules: Iterable[Any], torch_too: bool = True) -> list[Any]:
    """The distinct generators the modules hold as instance attributes, one level down
    (``self.rng = np.random.default_rng(seed)``, ``np.random.RandomState(seed)``,
    ``random.Random(seed)``, a ``torch.Generator``; ``torch_too=False``: numpy's and Python's
    only), less the global ones (:func:`_is_global`), as a reading finds a dataset's
    (review s26: a layer drawing per example from its own numpy generator was mapped with
    ``vmap``, one draw per block, and the generator was left moved after the call)."""
    found: list[Any] = []
    for m in modules:
        for value in _attributes(m):
            if (
                _is_generator(value)
                and (torch_too or not isinstance(value, torch.Generator))
                and not _is_global(value)
                and all(value is not h for h in found)
            ):
                found.append(value)
    return found


def held_states(modules: Iterable[Any], torch_too: bool = True) -> list[Kept]:
    """The states of :func:`held_generators`, one :class:`Kept` each."""
    return [_kept(g) for g in held_generators(modules, torch_too)]


def _is_loader(x: Any) -> bool:
    """A ``DataLoader``-like object: one with a sampler and a dataset."""
    return hasattr(x, "sampler") and hasattr(x, "dataset") and not isinstance(x, type)


def _attributes(owner: Any) -> list[Any]:
    """The values of ``owner``'s instance attributes (none for objects without ``__dict__``)."""
    fields = getattr(owner, "__dict__", None)
    return list(fields.values()) if isinstance(fields, dict) else []


def collate_owners(loader: Any) -> list[Any]:
    """The loader's ``collate_fn`` and the objects its instance attributes hold, one level
    down (a ``PairCollator`` whose ``self.c`` is HF's ``DataCollatorForLanguageModeling``):
    the objects that may hold the generators a collation draws from (HF's collator with
    ``seed=`` draws its masks from ``self.generator``; review s26: every reading moved it on,
    the next epoch's masks changed and ``analyze`` refused the loader). Generators, tensors,
    plain values, containers and classes are not among them; a function ``collate_fn``
    (``default_collate``) holds nothing. A bound method's object (``collate_fn=dm.collate``)
    and a ``functools.partial``'s function and arguments count as held too (review s26: a
    call changed the next epoch's augmentation through either); a generator given as an
    argument of the partial is held as the ``generator`` of a stand-in."""
    collate = getattr(loader, "collate_fn", None)
    if collate is None or isinstance(collate, type):
        return []
    found = [collate]
    held = list(_attributes(collate))
    fn = collate
    while isinstance(fn, functools.partial):  # a partial of a partial (of a bound method)
        args = [*fn.args, *fn.keywords.values()]
        # and one level into a container argument (partial(f, rngs={"x": g}); review s26)
        held += args + [
            v
            for a in args
            if isinstance(a, (Mapping, list, tuple))
            for v in (a.values() if isinstance(a, Mapping) else a)
        ]
        fn = fn.func
        held.append(fn)
    bound = getattr(fn, "__self__", None)  # a bound method's object
    if bound is not None and not isinstance(bound, types.ModuleType):
        held.append(bound)
    for value in held:
        if _is_generator(value):  # a partial's argument: found as a stand-in's generator
            if all(getattr(f, "generator", None) is not value for f in found):
                found.append(types.SimpleNamespace(generator=value))
            continue
        if (
            isinstance(getattr(value, "__dict__", None), dict)
            and not isinstance(value, (type, Tensor, Mapping, tuple, list, str, bytes))
            and not _is_generator(value)
            and all(value is not f for f in found)
        ):
            found.append(value)
    return found


def _owners(loader: Any) -> list[Any]:
    """The loader and the objects that may hold its generators: its samplers, its dataset and
    its ``collate_fn`` (one level of the latter's attributes: :func:`collate_owners`)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    return [
        loader,
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
        getattr(loader, "dataset", None),
        *collate_owners(loader),
    ]


def loaders_of(data: Any) -> list[Any]:
    """The ``DataLoader``-like objects a reading of ``data`` reads: ``data`` itself, or the
    loaders a wrapper holds one level down (a ``DeviceLoader``'s ``self.loader``)."""
    if isinstance(data, (Tensor, tuple, list, Mapping, str, bytes)):
        return []
    if _is_loader(data):
        return [data]
    return [value for value in _attributes(data) if _is_loader(value)]


def _data_owners(data: Any) -> list[Any]:
    """The objects that may hold the generators of a reading of ``data``: of a
    ``DataLoader``-like ``data``, the loader, its sampler, its batch sampler (and that one's
    sampler), its dataset and its ``collate_fn`` (:func:`_owners`); of any other object, itself and the same of the
    loaders it holds (:func:`loaders_of`). ``None`` and plain containers are left out."""
    if isinstance(data, (Tensor, tuple, list, Mapping, str, bytes)):
        return []
    owners = [] if _is_loader(data) else [data]
    for loader in loaders_of(data):
        owners.extend(_owners(loader))
    return [
        o
        for o in owners
        if o is not None and not isinstance(o, (Tensor, tuple, list, Mapping, str, bytes))
    ]


def _generators_of(data: Any) -> list[Any]:
    """The distinct generators attributes of ``data`` hold: of a ``DataLoader``-like ``data``,
    its own (``generator``), its sampler's, its batch sampler's (and that one's sampler's), its
    dataset's and its ``collate_fn``'s (:func:`collate_owners`); of any other object, its own and, one level down, those of the loaders it
    holds (a wrapper's)."""
    found: list[Any] = []
    for owner in _data_owners(data):
        own = getattr(owner, "generator", None)  # a property's too
        for value in [own, *_attributes(owner)]:
            if _is_generator(value) and all(value is not h for h in found):
                found.append(value)
    return found
