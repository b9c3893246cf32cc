"""Backends compute the raw per-example and second-order quantities behind curvlab's functions.

A backend exposes primitives on chunks of examples, always for the negative log-likelihood *sum* of
the chunk; the quantity functions do the scaling, chunking and accumulation.

* ``"backpack"``: BackPACK's extensions; every quantity, any supported model.
* ``"hooks"``: curvlab's own layer hooks; first-order squared gradients only, for models whose
  trainable parameters all live in Linear/Conv1d/Conv2d layers; faster than BackPACK there.
* ``"auto"`` (the default of the first-order functions): ``"hooks"`` where it applies, else
  ``"backpack"``.

A torch.func backend for models BackPACK cannot extend is planned and will plug in through
:func:`get_backend`.
"""

from __future__ import annotations

from torch import nn

from curvlab.backends.backpack import BackpackBackend
from curvlab.backends.hooks import HooksBackend
from curvlab.scan import ModelScan

__all__ = ["BackpackBackend", "HooksBackend", "get_backend", "BACKENDS"]

BACKENDS = ("auto", "backpack", "hooks")


def get_backend(
    name: str = "backpack",
    model: nn.Module | None = None,
    hooks_ok: bool = False,
    scan: ModelScan | None = None,
) -> BackpackBackend | HooksBackend:
    """The backend called ``name``; ``"auto"`` picks ``"hooks"`` when ``hooks_ok`` and it applies.

    ``scan`` is the model's :func:`~curvlab.scan.scan_model`, if the caller has one already.

    Raises:
        ValueError: for an unknown backend name.
    """
    if name == "auto":
        if hooks_ok and isinstance(model, nn.Module):
            layers = HooksBackend.layers_of(model, scan)
            if layers is not None:
                return HooksBackend(layers)
        return BackpackBackend()
    if name == "backpack":
        return BackpackBackend()
    if name == "hooks":
        return HooksBackend()
    if name == "functorch":
        raise ValueError(
            "backend='functorch' is not available yet; use backend='backpack' (the default)"
        )
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
