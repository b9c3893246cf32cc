"""Backends compute the raw per-example and second-order quantities behind curvlab's functions.

A backend exposes the primitives of :class:`~curvlab.backends.backpack.BackpackBackend` on chunks of
examples, always for the negative log-likelihood *sum* of the chunk; the quantity functions do the
scaling, chunking and accumulation. ``"backpack"`` is the default and only backend so far; a torch.func
backend for models BackPACK cannot extend is planned and will plug in through :func:`get_backend`.
"""

from __future__ import annotations

from curvlab.backends.backpack import BackpackBackend

__all__ = ["BackpackBackend", "get_backend", "BACKENDS"]

BACKENDS = ("backpack",)


def get_backend(name: str = "backpack") -> BackpackBackend:
    """The backend called ``name``.

    Raises:
        ValueError: for an unknown backend name.
    """
    if name == "backpack":
        return BackpackBackend()
    if name == "functorch":
        raise ValueError(
            "backend='functorch' is not available yet; use backend='backpack' (the default)"
        )
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
