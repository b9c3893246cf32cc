"""The measurement registry: one small function per measurement, shared by ``analyze`` and
``Diagnostics``.

A measurement is a function ``fn(ctx, names, out)`` registered with :func:`measurement` for the
quantity names it computes; :func:`curvlab.analysis._measures.measure` calls each registered
function whose names were asked for, once, with the subset asked for (so measurements that share
a pass, like the first-order ones, compute what is wanted in one go) and records a failure under
those names. Registration order is the order of ``QUANTITIES`` and of the calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._losses import LossSpec

__all__ = [
    "Measurement",
    "PartlyMeasured",
    "Context",
    "Registered",
    "MEASUREMENTS",
    "measurement",
    "floats",
    "by_layer",
]


@dataclass
class Measurement:
    """What one measurement produced (plain Python numbers, ready for JSON).

    Attributes:
        values: quantity name -> float (or list of floats for ``top_eigenvalues``).
        per_layer: quantity name -> {module name -> float}.
        arrays: e.g. ``{"spectral_density": {"grid": [...], "density": [...], ...}}``.
        errors: quantity name -> error message, for quantities that failed (``on_error="skip"``).
    """

    values: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    arrays: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """What every measurement gets: the problem and the settings of one ``measure`` call.

    ``optimizer`` is the training loop's optimizer (``Diagnostics(..., optimizer=opt)``; only read,
    never stepped); ``state`` persists between the measurements of one ``Diagnostics`` (e.g. the
    previous top eigenvector that warm-starts ``"sharpness"``), a fresh dict otherwise.
    """

    model: nn.Module
    loss_fn: nn.Module
    spec: LossSpec
    data: Any
    seed: int
    generator: torch.Generator
    chunk_size: int | None
    options: dict[str, Any]
    optimizer: Any = None
    state: dict[str, Any] = field(default_factory=dict)


class PartlyMeasured(Exception):  # noqa: N818 - carries the failure of some names only
    """Raised by a measurement that wrote some of its quantities and failed on the others:
    ``failed`` are the names to record as failed, ``error`` why."""

    def __init__(self, failed: tuple[str, ...], error: Exception) -> None:
        super().__init__(str(error))
        self.failed = failed
        self.error = error


@dataclass(frozen=True)
class Registered:
    """One registered measurement: the quantity names it produces and its function."""

    names: tuple[str, ...]
    fn: Callable[[Context, tuple[str, ...], Measurement], None]


MEASUREMENTS: list[Registered] = []
"""Every registered measurement, in registration order."""


def measurement(*names: str) -> Callable[[Callable], Callable]:
    """Register ``fn(ctx, names, out)`` as the measurement of the quantity ``names``."""
    taken = {n for r in MEASUREMENTS for n in r.names}
    if not names or taken & set(names):
        raise ValueError(f"measurement names {names} are empty or already registered")

    def register(fn: Callable) -> Callable:
        MEASUREMENTS.append(Registered(tuple(names), fn))
        return fn

    return register


def floats(x: Any) -> list[float]:
    if isinstance(x, Tensor):
        return [float(v) for v in x.detach().double().reshape(-1).cpu()]
    return [float(v) for v in x]


def _layer(name: str) -> str:
    """The module name of a parameter name: ``"fc.weight"`` -> ``"fc"``, and ``""`` (the root
    module, as ``model.named_modules()`` names it) for a parameter of the model itself."""
    return name.rpartition(".")[0]


def by_layer(per_param: dict[str, float]) -> dict[str, float]:
    """Per-parameter values summed per module (keyed by module name, ``""`` for the root)."""
    out: dict[str, float] = {}
    for name, value in per_param.items():
        out[_layer(name)] = out.get(_layer(name), 0.0) + value
    return out
