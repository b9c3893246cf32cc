"""Explicit randomness: every stochastic function takes ``seed=`` or ``generator=``."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

__all__ = ["global_rng_kept", "make_generator", "reseed_global", "seed_global"]


def make_generator(
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Generator:
    """A generator on ``device``: ``generator`` itself if given, else one seeded with ``seed``.

    ``seed=None`` without a generator means ``seed=0``, so results are reproducible by default.
    The global RNG is never used.

    Raises:
        ValueError: if both are given, or the generator lives on another device type.
    """
    device = torch.device(device)
    if generator is not None:
        if seed is not None:
            raise ValueError("pass either seed= or generator=, not both")
        if generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the model is on {device}; create it with "
                f"torch.Generator(device={str(device)!r})"
            )
        return generator
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    return gen


def global_rng_kept(device: torch.device) -> AbstractContextManager[None]:
    """A block whose draws from the global RNG are undone on exit: the CPU generator's state
    and, for a model on a GPU, that device's are put back (``torch.random.fork_rng``)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def reseed_global(device: torch.device) -> None:
    """Re-seed the global CPU RNG (and ``device``'s, for a GPU) from a draw of its own state.

    For a block inside :func:`global_rng_kept` whose random draws (a Dropout mask) must differ from
    those the caller's next draws would give: after the block the state is put back, so the caller
    draws what it would have drawn anyway, and the block drew from another stream. Deterministic
    given the state. Other GPUs' generators are left alone.
    """
    seed_global(device, int(torch.randint(0, 2**62, (1,))) ^ 0x2545F4914F6CDD1D)


def seed_global(device: torch.device, seed: int) -> None:
    """Seed the global CPU RNG (and ``device``'s, for a GPU) with ``seed``; other GPUs' generators
    are left alone. For use inside :func:`global_rng_kept` (a pass whose random draws, Dropout
    masks, must repeat exactly each time it runs)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
