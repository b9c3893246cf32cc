"""The construction-time checks shared by the training-loop callbacks (HuggingFace
:mod:`curvlab.analysis.hf`, Lightning :mod:`curvlab.analysis.lightning`): what ``Diagnostics``
would refuse once training started is refused when the callback is made."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from curvlab._losses import loss_module, loss_spec
from curvlab.analysis._diagnostics import _check_schedule
from curvlab.analysis._diagnostics_config import resolve_config
from curvlab.analysis._measures import DIAGNOSTICS_DEFAULT, check_quantities
from curvlab.analysis._metrics_log import check_log_dir
from curvlab.analysis._sharpness import check_optimizer_for

__all__ = ["callback_settings", "check_options", "materialise"]


def materialise(quantities: Iterable[str] | None) -> tuple[str, ...] | None:
    """``quantities`` as a tuple, read once (a generator checked, then read again, was empty);
    a single name as a 1-tuple, as :class:`Diagnostics` reads it."""
    if quantities is None:
        return None
    if isinstance(quantities, str):
        return (quantities,)
    return tuple(quantities)


def check_options(
    loss_fn: nn.Module | None, every: Any, quantities: Any, options: dict[str, Any]
) -> tuple[tuple[str, ...], Any]:
    """Fail before training on what ``Diagnostics(...)`` would refuse once training started.

    ``quantities`` must
    be materialised (:func:`materialise`): it is read here and again by the ``Diagnostics``.
    What needs the training loop's optimizer is checked here only for an ``optimizer=`` given.
    ``log_dir`` must be a path (a ``TypeError``) that is no existing file (a
    ``NotADirectoryError``); another open ``Diagnostics`` writing it is taken over (a
    ``RuntimeWarning``) when the callback's ``Diagnostics`` is made (training starts).

    Returns:
        The quantity names (the defaults for ``None``) and the resolved ``DiagnosticsConfig``.
    """
    if loss_fn is not None:
        loss_spec(loss_fn)
    names = check_quantities(quantities, DIAGNOSTICS_DEFAULT)
    check_log_dir(options.get("log_dir"))  # a TypeError here, not an os.fspath one in train()
    rest = dict(options)
    rest.pop("log_dir", None)
    config = rest.pop("config", None)
    process_group = rest.pop("process_group", None)
    if process_group is not None:
        rest["process_group"] = process_group
    cfg = resolve_config(config, rest)  # also seed, max_examples and the explosion_* fields
    _check_schedule(every, cfg.budget, cfg.on_error)
    if cfg.callback is not None and not callable(cfg.callback):
        raise TypeError(f"callback must be callable (record -> None), got {cfg.callback!r}")
    if options.get("log_dir") is None and (cfg.csv or cfg.tensorboard):
        raise ValueError("csv=True and tensorboard=True need a log_dir")
    if cfg.optimizer is not None:  # else the training loop's own, known when training starts
        check_optimizer_for(names, cfg.optimizer, cfg.options)
    return names, cfg


def callback_settings(
    loss_fn: nn.Module | None, names: tuple[str, ...], every: Any, cfg: Any, **extra: Any
) -> dict[str, Any]:
    """What a callback's saved ``Diagnostics`` state must have been measured with to be resumed
    by it (the HuggingFace callback's state file holds it; the Lightning callback's
    ``state_key`` is made of it): plain values, stable across runs (no object's repr).

    Args:
        loss_fn: the callback's loss (``None``: the model's own).
        names, cfg: what :func:`check_options` returned.
        every: the measurement period (``None`` with a budget).
        extra: further settings, placed after the loss (the Lightning callback's ``model_attr``).
    """
    return {
        "loss": None if loss_fn is None else type(loss_module(loss_fn)).__name__,
        **extra,
        "quantities": list(names),
        "every": None if every is None else int(every),
        "budget": None if cfg.budget is None else float(cfg.budget),
        "seed": int(cfg.seed),
        "max_examples": None if cfg.max_examples is None else int(cfg.max_examples),
    }
