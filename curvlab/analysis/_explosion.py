"""The catastrophic Fisher explosion check of :class:`~curvlab.analysis.Diagnostics`.

Jastrzębski et al. (2021) observe that Tr(F) rising sharply early in training ("catastrophic
Fisher explosion") goes with worse generalisation. :class:`ExplosionWatch` keeps the last
``explosion_window`` measured values of Tr(F) per loss term and warns once when the newest is
``explosion_factor`` times the smallest before it. Under ``reduction="mean"`` Tr(F) is that of
the mean loss and is compared as it is; under ``"sum"`` it is the measured batch's total and grows
with the batch, so it is divided by the batch's loss terms ``M`` (:func:`loss_terms`) first (a
1-example last batch of an epoch read as a 24x rise before, found in review).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import torch
from torch import Tensor

from curvlab._losses import LossSpec
from curvlab._warn import user_stacklevel
from curvlab.distributed import active

__all__ = ["ExplosionWatch", "FisherExplosionWarning", "loss_terms"]


class FisherExplosionWarning(RuntimeWarning):
    """Tr(F) per loss term rose by more than the configured factor within the window
    (Jastrzębski et al.)."""


def loss_terms(spec: LossSpec, targets: Tensor, device: torch.device) -> int:
    """``M``, the loss terms of the measured batch (of every rank's shard under
    ``torch.distributed``, whose Tr(F) is that of all shards): the positions whose label is
    not ``ignore_index`` for class indices, one per position for class probabilities (the
    classes are in axis 1), every output entry for MSE and BCE (their targets are shaped
    like the output). Under ``"sum"`` only; one host synchronisation (one all-reduce of a
    count under ``torch.distributed``, on every rank on the same measured steps)."""
    count: Tensor | int
    if spec.kind == "cross_entropy" and not targets.is_floating_point():
        count = (targets != spec.ignore_index).sum()
    elif spec.kind == "cross_entropy" and targets.ndim >= 2:
        count = targets.numel() // targets.shape[1]
    else:
        count = targets.numel()
    comm = active()
    if comm is None:
        return int(count)
    _, (total,) = comm.reduce_sums({}, [count], device=device)
    return total


class ExplosionWatch:
    """The window of Tr(F) per loss term and whether the explosion was reported.

    Args:
        factor: warn when the newest value reaches this factor times the window's minimum
            before it.
        size: the number of values kept (``explosion_window``).
        until: the last step checked (``None``: every step).
    """

    def __init__(self, factor: float, size: int, until: int | None) -> None:
        self.factor = factor
        self.size = size
        self.until = until
        self.exploded = False
        # saved by Diagnostics.state_dict, so that a resumed run warns where the uninterrupted
        # one does
        self.window: list[float] = []

    def load(self, exploded: bool, window: list[float]) -> None:
        """Continue from a saved flag and window (its last ``size`` values are kept)."""
        self.exploded = exploded
        self.window = [float(v) for v in window][-self.size :]

    def add(self, trace_fisher: Any, terms: int | None) -> bool:
        """Put Tr(F) per loss term into the window: Tr(F) itself under ``"mean"`` (``terms``
        ``None``), ``Tr(F) / M`` under ``"sum"``. Returns whether a value was added: not when
        Tr(F) was not measured, nor under ``"sum"`` for a batch whose every label is ignored
        (``M = 0``)."""
        if not isinstance(trace_fisher, numbers.Real) or isinstance(trace_fisher, bool):
            return False
        if terms is not None and terms <= 0:
            return False
        self.window.append(float(trace_fisher) if terms is None else float(trace_fisher) / terms)
        del self.window[: -self.size]
        return True

    def check(self, step: int, trace_fisher: float, terms: int | None) -> dict[str, Any] | None:
        """Warn (``FisherExplosionWarning``, once) when the newest value of the window reaches
        ``factor`` times its minimum before it; returns the event to log, else ``None``
        (``terms``: ``M`` under ``"sum"``, else ``None``)."""
        if self.exploded or (self.until is not None and step > self.until):
            return None
        window = self.window  # the last `size` values, this one's last
        if len(window) < 2:
            return None
        low = min(window[:-1])
        if not (low > 0 and window[-1] >= self.factor * low):
            return None
        self.exploded = True
        factor = window[-1] / low
        event: dict[str, Any] = {
            "event": "fisher_explosion",
            "step": step,
            "trace_fisher": trace_fisher,
            "window_min": low,
            "factor": factor,
        }
        what = "Tr(F)"
        if terms is not None:  # "sum": the window holds Tr(F) / M
            event["loss_terms"] = terms
            event["trace_fisher_per_term"] = window[-1]
            what = (
                f"Tr(F) per loss term (reduction='sum': Tr(F) = {trace_fisher:.4g} over "
                f"this batch's {terms} loss terms)"
            )
        warnings.warn(
            f"curvlab.Diagnostics: catastrophic Fisher explosion at step {step}: {what} rose "
            f"{factor:.1f}x (from {low:.4g} to {window[-1]:.4g}) within "
            f"{len(window)} measurements; a larger learning rate, a smaller batch or the "
            "Fisher penalty (curvlab.regularizers.FisherPenalty) usually prevents this",
            FisherExplosionWarning,
            stacklevel=user_stacklevel(),
        )
        return event
