"""Explicit randomness: every stochastic function takes ``seed=`` or ``generator=``."""

from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from curvlab._ambient import process_state_held
from curvlab._numbers import is_int
from curvlab._reading_rngs import held_generators, held_states, host_rngs, same_state

__all__ = [
    "SEED_RANGE",
    "check_randomness",
    "drew",
    "forward_draws",
    "global_rng_kept",
    "make_generator",
    "reseed_global",
    "reseed_held",
    "held_reseeded",
    "rng_states",
    "seed_global",
]


SEED_RANGE = (-(2**63), 2**64 - 1)
"""The seeds ``torch.Generator.manual_seed`` takes (a negative seed is taken modulo ``2**64``)."""


def check_randomness(
    seed: object = None,
    generator: object = None,
    device: torch.device | str | None = None,
    *,
    both: bool = True,
) -> None:
    """Refuse a ``seed=`` or ``generator=`` that cannot give the draws, naming the argument.

    Cheap (no draw, no host synchronisation), so every entry point calls it before it reads
    the data, including those whose result draws nothing (a deterministic kind).

    Args:
        seed: ``None`` or an integer (numpy integers too; never a ``bool``) in :data:`SEED_RANGE`.
        generator: ``None`` or a ``torch.Generator`` (a numpy ``Generator`` is refused with the
            torch equivalent).
        device: where the draws are made; a generator on another device type is refused
            (``None``: not checked).
        both: refuse ``seed`` and ``generator`` given together.

    Raises:
        ValueError: for a seed that is not an integer in range, both given, or a generator on
            another device type.
        TypeError: for a generator that is not a ``torch.Generator``.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        kind = type(generator)
        name = (
            f"{kind.__module__.split('.')[0]}.{kind.__name__}"
            if kind.__module__ != "builtins"
            else kind.__name__
        )
        hint = (
            "curvlab draws with torch: pass torch.Generator().manual_seed(n) (on the model's "
            "device), or seed=n"
            if kind.__module__.startswith("numpy")
            else "pass a torch.Generator (e.g. torch.Generator().manual_seed(n)), or seed=n for "
            "an integer seed"
        )
        raise TypeError(
            f"generator must be a torch.Generator or None, got {name} {generator!r}; {hint}"
        )
    in_range = is_int(seed) and SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1]  # type: ignore[call-overload]
    if seed is not None and not in_range:
        why = "an int" if not is_int(seed) else f"an int in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"
        raise ValueError(
            f"seed must be {why} or None, got {seed!r}"
            + (" (a bool is not a seed)" if isinstance(seed, bool) else "")
        )
    if both and seed is not None and generator is not None:
        raise ValueError("pass either seed= or generator=, not both")
    if device is not None and isinstance(generator, torch.Generator):
        device = torch.device(device)
        if generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the model is on {device}; create it with "
                f"torch.Generator(device={str(device)!r})"
            )


def make_generator(
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Generator:
    """A generator on ``device``: ``generator`` itself if given, else one seeded with ``seed``.

    ``seed=None`` without a generator means ``seed=0``, so results are reproducible by default.
    The global RNG is never used. The arguments are checked by :func:`check_randomness`.

    Raises:
        ValueError: if both are given, the seed is not an integer, or the generator lives on
            another device type.
        TypeError: if the generator is not a ``torch.Generator``.
    """
    device = torch.device(device)
    check_randomness(seed, generator, device)
    if generator is not None:
        return generator  # type: ignore[return-value]
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


@contextmanager
def global_rng_kept(device: torch.device) -> Iterator[None]:
    """A block whose draws from the global RNG are undone on exit: the CPU generator's state
    and, for a model on a GPU, that device's are put back (``torch.random.fork_rng``), and so
    are Python's ``random`` and numpy's global RNG.

    The block holds :data:`curvlab._ambient.PROCESS_STATE_LOCK`: the generators are
    process-wide, and another thread's curvlab call re-seeding them between this block's passes
    changed its Dropout masks (review s25). Another thread's own draws are not held back
    (docs/conventions.md).
    """
    with (
        process_state_held(),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        # Python's and numpy's global RNGs too: a forward may draw from them (HF's LayerDrop,
        # np.random.random() or random.uniform(0, 1): review s25, a call left them moved)
        kept = host_rngs()
        states = [k.get() for k in kept]
        try:
            yield
        finally:
            for k, state in zip(kept, states):
                k.put(state)


def reseed_global(device: torch.device) -> None:
    """Re-seed the global CPU RNG (and ``device``'s, for a GPU) from a draw of its own state.

    For a block inside :func:`global_rng_kept` whose random draws (a Dropout mask) must differ from
    those the caller's next draws would give: after the block the state is put back, so the caller
    draws what it would have drawn anyway, and the block drew from another stream. Deterministic
    given the state. Other GPUs' generators are left alone.
    """
    seed_global(device, int(torch.randint(0, 2**62, (1,))) ^ 0x2545F4914F6CDD1D)


def reseed_held(generators: Iterable[Any]) -> None:
    """Re-seed each generator a module holds (:func:`~curvlab._reading_rngs.held_generators`)
    from its own state: the held analogue of :func:`reseed_global`, for a block whose draws (a
    layer's ``self.gen`` Dropout mask) must differ from those the caller's next forward would
    make; the caller puts the states back after it (review s27: a penalty's forward used up the
    training loop's next mask, and every later mask shifted by one).

    The seed is a hash (BLAKE2b) of the generator's state, so it is deterministic given the
    state, needs no draw and no host synchronisation (a GPU generator's state is held on the
    host). A ``torch.Generator`` is ``manual_seed``-ed with it, a numpy ``Generator``'s bit
    generator is set to that of a fresh one of its kind with that seed, so is a ``RandomState``
    over another bit generator than MT19937 (``RandomState(PCG64(1))``, whose ``seed`` raises),
    another ``RandomState`` and a ``random.Random`` are ``seed``-ed."""
    for g in generators:
        if isinstance(g, torch.Generator):
            state: Any = g.get_state().numpy().tobytes()
        elif isinstance(g, np.random.Generator):
            state = pickle.dumps(g.bit_generator.state)
        elif isinstance(g, np.random.RandomState):
            # legacy=False: a RandomState over another bit generator (PCG64) has no legacy state
            # (review s27: it warned, and re-seeding it raised)
            state = pickle.dumps(g.get_state(legacy=False))
        else:  # random.Random
            state = pickle.dumps(g.getstate())
        digest = hashlib.blake2b(state, digest_size=8, person=b"curvlab-held").digest()
        seed = int.from_bytes(digest, "little") >> 2
        if isinstance(g, torch.Generator):
            g.manual_seed(seed)
        elif isinstance(g, np.random.Generator):
            g.bit_generator.state = type(g.bit_generator)(seed).state
        elif isinstance(g, np.random.RandomState):
            kind = g.get_state(legacy=False)["bit_generator"]
            if kind == "MT19937":
                g.seed(seed % 2**32)
            else:  # seed() re-seeds an MT19937 only: a fresh bit generator of its kind's state
                g.set_state(getattr(np.random, kind)(seed).state)
        else:
            g.seed(seed)


@contextmanager
def held_reseeded(modules: Iterable[Any]) -> Iterator[None]:
    """A block whose draws from the generators the modules hold come from another stream and are
    undone on exit (an exception too): each is re-seeded from its state
    (:func:`reseed_held`) on entry and its state is put back on exit, as
    :func:`global_rng_kept` with :func:`reseed_global` treats the global RNG."""
    modules = list(modules)
    kept = held_states(modules)
    states = [k.get() for k in kept]
    try:
        reseed_held(held_generators(modules))
        yield
    finally:
        for k, state in zip(kept, states):
            k.put(state)


def seed_global(device: torch.device, seed: int) -> None:
    """Seed the global CPU RNG (and ``device``'s, for a GPU) with ``seed``; other GPUs' generators
    are left alone; Python's ``random`` and numpy's global RNG are seeded with it too. For use
    inside :func:`global_rng_kept` (a pass whose random draws, Dropout masks or a LayerDrop's
    ``random.uniform``, must repeat exactly each time it runs)."""
    torch.random.default_generator.manual_seed(seed)
    # a forward that draws from Python's or numpy's RNG (LayerDrop) is one function per batch
    # too, as a Dropout is (review s25: each pass drew its own, an "exact" trace mixed them)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def host_states() -> list[Any]:
    """Python's ``random`` state and numpy's global RNG state, as :func:`global_rng_kept` keeps
    them (:func:`curvlab._reading_rngs.host_rngs`), to tell whether a forward drew from them (a
    LayerDrop's ``random.uniform`` or ``np.random.random()``)."""
    return [k.get() for k in host_rngs()]


def rng_states(device: torch.device) -> list[Any] | None:
    """The global RNG states a forward pass on ``device`` draws from (the CPU generator's and the
    device's, Python's ``random`` and numpy's global RNG: :func:`host_states`), to tell whether
    it drew random numbers; ``None`` where the device's state cannot be read. No host
    synchronisation (the states are held on the host). A forward drawing from Python's or
    numpy's RNG is one that draws (found in review s25: ``fisher_trace`` took its labels and
    its gradients from different LayerDrop decisions, 15.05 ± 0.69 for 10.28)."""
    states: list[Any] = [torch.random.default_generator.get_state(), *host_states()]
    if device.type == "cpu":
        return states
    module = getattr(torch, device.type, None)
    get = getattr(module, "get_rng_state", None)
    if get is None:
        return None
    try:
        states.append(get(device))
    except (RuntimeError, TypeError, ValueError):
        return None
    return states


def drew(before: list[Any] | None, after: list[Any] | None) -> bool:
    """Whether the global RNG moved between two :func:`rng_states` (unknown counts as moved)."""
    if before is None or after is None:
        return True
    return any(not same_state(a, b) for a, b in zip(before, after))


@contextmanager
def forward_draws(
    device: torch.device,
    modules: Iterable[Any] = (),
    *,
    torch_too: bool = True,
    put_back: bool = False,
) -> Iterator[Callable[[], bool]]:
    """A block (one forward pass) and, after it, whether it drew random numbers: the one home of
    that check.

    Reads, before the block, the global RNG states the forward draws from (:func:`rng_states`:
    torch's CPU generator and ``device``'s, Python's ``random``, numpy's global RNG) and the
    states of the generators ``modules`` hold as attributes
    (:func:`~curvlab._reading_rngs.held_generators`: a layer's ``self.gen =
    torch.Generator()`` it draws its own Dropout mask from, ``np.random.default_rng(seed)``,
    ``random.Random(seed)``; ``torch_too=False``: numpy's and Python's only); after it, whether
    any of them moved. A state that cannot be read (a device whose RNG has no
    ``get_rng_state``) counts as moved. Whether the draws are random or fixed (a forward that
    re-seeds) is not told apart here: either moves a state (``fisher_trace``'s check runs a
    forward that moved a state a second time, and a re-seeding one does not move it again). No host synchronisation (every state is
    held on the host).

    Before review s27 three of the five places that asked read the global states only: a
    module's own generator was taken for a forward that draws nothing (``fisher_trace`` then
    paired the labels of one mask with the gradients of others, ``critical_sharpness`` drew
    other noise in every pass of its line search, a penalty's recomputed ``output=`` was
    refused as "not model(inputs)").

    Args:
        device: the device the forward runs on.
        modules: the modules whose held generators count (e.g. ``model.modules()``).
        torch_too: count held ``torch.Generator``s too.
        put_back: put the held generators' states back on exit (an exception too); the global
            ones are the caller's to keep (:func:`global_rng_kept`).

    Yields:
        ``drawn()``: whether the block drew, to call after the block (inside it: ``RuntimeError``).

    Example:
        >>> import torch
        >>> with forward_draws(torch.device("cpu")) as drawn:
        ...     _ = torch.ones(2) * 2
        >>> drawn()
        False
    """
    held = held_states(modules, torch_too)
    held_at = [h.get() for h in held]
    before = rng_states(device)
    told: list[bool] = []

    def drawn() -> bool:
        if not told:
            raise RuntimeError("forward_draws: drawn() is known after the block only")
        return told[0]

    try:
        yield drawn
    finally:
        moved = any(not same_state(h.get(), a) for h, a in zip(held, held_at))
        if put_back:
            for h, state in zip(held, held_at):
                h.put(state)
        told.append(moved or drew(before, rng_states(device)))
