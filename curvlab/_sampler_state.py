"""The plain state of a loader's samplers, to keep and carry over the batches of one reading.

A sampler may keep a counter of its own and move it on as it is read: accelerate's
``SeedableRandomSampler`` (HF ``Trainer``'s default) re-seeds its generator from
``initial_seed + self.epoch`` and runs ``self.set_epoch(self.epoch + 1)`` after a full pass;
torchdata's stateful samplers count ``yielded`` examples. Every curvlab reading moved the
user's epoch on (review s26: the training loop's next epoch took another order, and ``analyze``
found another batch 0 at its second reading). :func:`sampler_states` lists, as
:class:`~curvlab._reading_rngs.Kept` states that :func:`curvlab._data.iter_batches` carries as
it carries the random states, each instance attribute of the loader's ``sampler``,
``batch_sampler`` (and that one's ``sampler``) whose value is an ``int``, ``float``, ``bool``
or ``None`` when the reading starts (``epoch``, ``yielded``, a lazily made ``generator``), of
a loader or of the loaders a wrapper holds. A reading starts from the caller's values, and the
caller's are put back around each of its steps. Other state (a list a sampler appends to, a
counter a dataset keeps) is not kept. The plain attributes of each loader (also one a wrapper
holds; not those of a wrapper that is no loader) are carried too: accelerate's prepared loader (``DataLoaderShard``) holds its
epoch as ``self.iteration``, re-seeds its sampler from it in ``__iter__`` and moves it on after
a pass (review s26: each reading moved the user's next epoch to a later epoch's order, and
``analyze`` refused the loader with ``ReadingsDifferError``). Of each loader's dataset and
``collate_fn`` (and the objects the ``collate_fn`` holds) only the attributes that are ``None``
when the reading starts are carried, and so put back to ``None`` after it: a generator made on
first use (``self.rng = None`` until then; HF's MLM collator with ``seed=``) is dropped again,
and every reading, like the user's next epoch, makes it afresh from its seed (review s26).

Example:
    >>> from torch.utils.data import DataLoader, RandomSampler
    >>> loader = DataLoader(list(range(4)), sampler=RandomSampler(range(4)))
    >>> loader.sampler.epoch = 3
    >>> [k.get() for k in sampler_states(loader) if k.get() == 3]
    [3]
"""

from __future__ import annotations

from typing import Any

from curvlab._reading_rngs import Kept, collate_owners, loaders_of

__all__ = ["sampler_states"]

_PLAIN = (int, float, bool, type(None))
"""The values kept: counters and flags (``bool`` is an ``int``), and ``None``."""

_NOT_KEPT = frozenset({"_iterator"})
"""A loader's attributes left alone: a ``persistent_workers=True`` loader's iterator (its
workers; :mod:`curvlab._persistent_loader` reads such a loader)."""

_MISSING = object()
"""An attribute the sampler does not hold (deleted while the reading ran)."""


def _samplers(data: Any) -> list[Any]:
    """The distinct samplers of the loaders a reading of ``data`` reads."""
    found: list[Any] = []
    for loader in loaders_of(data):
        batch_sampler = getattr(loader, "batch_sampler", None)
        for s in (
            getattr(loader, "sampler", None),
            batch_sampler,
            getattr(batch_sampler, "sampler", None),
        ):
            if s is not None and all(s is not f for f in found):
                found.append(s)
    return found


def _attribute(fields: dict[str, Any], name: str) -> Kept:
    """One instance attribute, read and set in the instance's ``__dict__`` (no property or
    ``__setattr__`` runs)."""

    def put(value: Any) -> None:
        if value is _MISSING:
            fields.pop(name, None)
        else:
            fields[name] = value

    return Kept(lambda: fields.get(name, _MISSING), put)


def _holders(data: Any) -> list[Any]:
    """The objects whose plain attributes a reading of ``data`` carries: the samplers
    (:func:`_samplers`) and each loader a reading of ``data`` reads (:func:`loaders_of`).

    Not a wrapper ``data`` that is no loader itself: its plain attributes may be a guard or a
    position tied to state no reading can put back (a stream's count of its readings that
    refuses a second one, a file offset), and putting them back made a read-once stream read
    as unread (found in review s26)."""
    found = _samplers(data)
    for owner in loaders_of(data):
        if all(owner is not f for f in found):
            found.append(owner)
    return found


def _none_holders(data: Any, holders: list[Any]) -> list[Any]:
    """The objects whose ``None`` attributes a reading of ``data`` carries (and no other): the
    dataset and the ``collate_fn`` (and the objects it holds, one level down:
    :func:`~curvlab._reading_rngs.collate_owners`) of each loader it reads, less ``holders``.

    An attribute that is ``None`` when the reading starts is where a lazily made generator
    goes (``if self.rng is None: self.rng = np.random.default_rng(seed)``, HF's MLM collator's
    ``generator`` and ``_generator_pid``): the reading makes it, draws from it and, carried,
    puts ``None`` back after each step, so that every reading, and the user's next epoch,
    start from the seeded generator (review s26: it was left made and moved on, a call before
    training changed training and ``analyze`` refused the loader). Their other plain
    attributes are not put back: a dataset's count of its readings may guard state no reading
    can put back (a read-once stream, a file offset)."""
    found: list[Any] = []
    for loader in loaders_of(data):
        for owner in (getattr(loader, "dataset", None), *collate_owners(loader)):
            if owner is not None and all(owner is not f for f in holders + found):
                found.append(owner)
    return found


def _fields(holder: Any) -> dict[str, Any]:
    """``holder``'s instance ``__dict__`` (empty for an object without one)."""
    fields = getattr(holder, "__dict__", None)
    return fields if isinstance(fields, dict) else {}


def sampler_states(data: Any) -> list[Kept]:
    """The plain attributes (``int``, ``float``, ``bool``, ``None``) of the samplers of the
    loaders a reading of ``data`` reads and of those loaders (accelerate's
    ``DataLoaderShard.iteration``: review s26), and the ``None`` attributes of their datasets
    and ``collate_fn`` (:func:`_none_holders`), one :class:`~curvlab._reading_rngs.Kept` each;
    none for a list of batches or an object without a sampler. A loader's ``_iterator`` (a
    persistent loader's workers) is not among them."""
    kept: list[Kept] = []
    holders = _holders(data)
    for holder in holders:
        fields = _fields(holder)
        kept.extend(
            _attribute(fields, k)
            for k, v in fields.items()
            if isinstance(v, _PLAIN) and k not in _NOT_KEPT
        )
    for holder in _none_holders(data, holders):
        fields = _fields(holder)
        kept.extend(_attribute(fields, k) for k, v in fields.items() if v is None)
    return kept
