"""Result containers shared by the quantity functions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab._finite import (
    NonFiniteError,
    check_batch_finite,
    check_parameters_finite,
    check_values_finite,
)
from curvlab.distributed import active

__all__ = ["ParamDict", "allow_weights_only_load", "check_finite", "scale_"]


class ParamDict(dict):
    """A ``dict[str, Tensor]`` keyed by parameter (or module) name that remembers how it was made.

    ``torch.save`` it as it is: it loads with ``torch.load``'s default ``weights_only=True``
    (it is rebuilt from a plain dict of its values, its backend and its attributes, see
    :func:`allow_weights_only_load`; a ``dict`` subclass pickled as such did not load, found in
    review s19). A ``ParamDict`` saved by an earlier curvlab needs ``weights_only=False``.

    Attributes:
        backend: the backend that computed it (``"backpack"``, ``"torch"``, ...).
        info: further metadata (kind, reduction, number of examples, seed, ...).
    """

    def __init__(self, values: dict[str, Tensor], backend: str, **info: object) -> None:
        super().__init__(values)
        self.backend = backend
        self.info = dict(info)

    def __repr__(self) -> str:
        shapes = ", ".join(  # values are tensors, or objects such as KFACFactors
            f"{k}: {tuple(v.shape) if hasattr(v, 'shape') else type(v).__name__}"
            for k, v in self.items()
        )
        return f"ParamDict({{{shapes}}}, backend={self.backend!r}, info={self.info!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as ``type(self)(dict(self), backend)`` and then its attributes: what
        ``torch.load(weights_only=True)`` rebuilds (it fills no ``dict`` subclass item by item).
        Also what ``pickle`` and ``copy.deepcopy`` use."""
        return (type(self), (dict(self), self.backend), dict(self.__dict__))


def allow_weights_only_load(*classes: type) -> None:
    """Let ``torch.load(weights_only=True)`` (its default since torch 2.6) rebuild ``classes``.

    For curvlab's result containers, which hold only what ``weights_only`` loads itself
    (tensors, numbers, strings, ``None``, lists, tuples and dicts of them) and each other:
    ``torch.load`` then creates them without calling their ``__init__`` (``__new__`` and their
    ``__dict__`` set from the file; a :class:`ParamDict` through its ``__reduce__``), so a file
    can run no code through them. A no-op under a torch without
    ``torch.serialization.add_safe_globals`` (before 2.4, whose ``torch.load`` does not default
    to ``weights_only=True``).
    """
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(list(classes))


def check_finite(values: dict[str, Tensor], what: str, unchecked: Any = None) -> None:
    """Raise :class:`~curvlab.NonFiniteError` naming the first entry holding NaN or inf.

    ``unchecked``: the ``(parameters, batch)`` a sweep did not check up front
    (``SweepInfo.unchecked``); for a non-finite result they are checked first, so the error names
    the parameter or the inputs that caused it. Under ``torch.distributed`` the result adds every
    rank's shard, so the message of a rank whose own parameters and inputs are finite says that
    another rank's shard may hold the value (that rank's error names it). This synchronises with
    the device once (one read per device holding ``values``; more only where a sum overflows or
    a value is not finite). The analysis calls check their results with it, and so does a noise
    sampler's separate curvature pass (``diag_fisher`` inside ``NoisyOptimizer.step``, on every
    measuring step); the one-pass captures of a training step never call it (docs/noise.md,
    "Host reads in a step").
    """
    try:
        check_values_finite(values, what)
    except NonFiniteError as exc:
        if unchecked is not None:
            params, (inputs, targets) = unchecked
            check_parameters_finite(params)
            check_batch_finite(inputs, targets, 0)
        if active() is None:
            raise
        # found in review: rank 0 said "check the model's parameters and inputs", all finite
        # there, when rank 1's inputs held the NaN
        mine = " and this rank's parameters and inputs are finite" if unchecked is not None else ""
        raise NonFiniteError(
            f"{exc}. Under torch.distributed this result adds every rank's shard{mine}: another "
            "rank's shard may hold the non-finite value (that rank's error names it)"
        ) from None


def scale_(values: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """Multiply every tensor of ``values`` by ``weight`` in place (one fused call); return it."""
    if values and weight != 1.0:
        torch._foreach_mul_(list(values.values()), weight)
    return values
