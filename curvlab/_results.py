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

__all__ = ["ParamDict", "check_finite", "scale_"]


class ParamDict(dict):
    """A ``dict[str, Tensor]`` keyed by parameter (or module) name that remembers how it was made.

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


def check_finite(values: dict[str, Tensor], what: str, unchecked: Any = None) -> None:
    """Raise :class:`~curvlab.NonFiniteError` naming the first entry holding NaN or inf.

    ``unchecked``: the ``(parameters, batch)`` a sweep did not check up front
    (``SweepInfo.unchecked``); for a non-finite result they are checked first, so the error names
    the parameter or the inputs that caused it. Under ``torch.distributed`` the result adds every
    rank's shard, so the message of a rank whose own parameters and inputs are finite says that
    another rank's shard may hold the value (that rank's error names it). This synchronises with
    the device once: use it for analysis results, not inside training steps.
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
