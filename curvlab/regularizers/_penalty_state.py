"""Reading a :class:`~curvlab.regularizers.GradientNormPenalty` state back
(:meth:`GradientNormPenalty.state_dict`).

:func:`checked_penalty_state` checks every field of a saved state and converts it before
:meth:`GradientNormPenalty.load_state_dict` changes anything, so a refused state leaves the
penalty as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._generator_state import generator_state
from curvlab._numbers import is_count, is_real

__all__ = ["LoadedPenaltyState", "checked_penalty_state", "named_cache"]


@dataclass
class LoadedPenaltyState:
    """A checked :meth:`GradientNormPenalty.state_dict`, its values converted."""

    generator: Tensor  # the state for the penalty's generator
    calls: int
    last_value: Tensor | None  # on the model's device
    cache: list[tuple[nn.Parameter, Tensor]] | None  # by the model's parameters, on their devices
    cached_value: Tensor | None  # None with ``cache``
    dropped: str | None  # why a saved cache was not restored (recomputed at the next call)


def named_cache(
    model: nn.Module, cache: list[tuple[nn.Parameter, Tensor]] | None
) -> dict[str, Tensor] | None:
    """``cache`` keyed by the names of its parameters in ``model`` (``None`` without a cache, or
    when one of its parameters is no longer the model's: the next call recomputes then)."""
    if cache is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    if any(id(p) not in names for p, _ in cache):
        return None
    return {names[id(p)]: g for p, g in cache}


def checked_penalty_state(
    state: Any,
    owner: str,
    kind: str,
    alpha: float,
    seed: int,
    model: nn.Module,
    generator_device: torch.device,
    device: torch.device,
) -> LoadedPenaltyState:
    """``state`` checked and converted for the penalty ``owner`` (its class name) of ``kind``,
    ``alpha`` and ``seed`` on ``model`` (unwrapped: its parameter names are the state's keys),
    whose generator lives on ``generator_device``; the values go to ``device``.

    The cached gradients are restored when every name is a parameter of ``model`` of the same
    shape and dtype and the state's ``alpha`` is ``alpha``; otherwise ``cache`` is ``None``
    (recomputed at the next call) and ``dropped`` says why.

    Raises:
        ValueError: if ``state`` is not a penalty state dict, is one of another ``kind``, or its
            generator state is one of another device type.
    """
    save = "penalty.state_dict()"
    if not isinstance(state, Mapping):
        raise ValueError(f"not a {owner} state_dict: a {type(state).__name__} (save {save})")
    missing = {"generator", "calls", "kind"} - set(state)
    if missing:
        raise ValueError(f"not a {owner} state_dict: it lacks {sorted(missing)} (save {save})")
    if state["kind"] != kind:
        raise ValueError(
            f"the {owner} state is one of kind={state['kind']!r}, but this penalty is "
            f"kind={kind!r}: load the state of a penalty of the same kind"
        )
    calls = state["calls"]
    if not is_count(calls, least=0):
        raise ValueError(
            f"not a {owner} state_dict: its 'calls' is {calls!r}, not a call count (save {save})"
        )
    saved_alpha = state.get("alpha", alpha)
    if not is_real(saved_alpha):
        raise ValueError(
            f"not a {owner} state_dict: its 'alpha' is {saved_alpha!r}, not a number (save {save})"
        )
    values = {k: state.get(k) for k in ("last_value", "cached_value")}
    for key, value in values.items():
        if value is not None and not (isinstance(value, Tensor) and value.dim() == 0):
            raise ValueError(
                f"not a {owner} state_dict: its {key!r} is {value!r}, not None or a "
                f"0-dimensional tensor (save {save})"
            )
    grads = state.get("cached_grads")
    if grads is not None and not (
        isinstance(grads, Mapping)
        and all(isinstance(k, str) and isinstance(g, Tensor) for k, g in grads.items())
    ):
        raise ValueError(
            f"not a {owner} state_dict: its 'cached_grads' is not None or a dict of tensors "
            f"by parameter name (save {save})"
        )
    gen = generator_state(
        generator_device, state["generator"], seed, int(calls), owner=owner, save=save
    )
    cache, dropped = None, None
    cached_value = values["cached_value"]
    if grads is not None and cached_value is not None:
        params = dict(model.named_parameters())
        lacking = [n for n in grads if n not in params]
        differ = [
            f"{n} {tuple(g.shape)} {g.dtype}, now {tuple(params[n].shape)} {params[n].dtype}"
            for n, g in grads.items()
            if n in params and (g.shape != params[n].shape or g.dtype != params[n].dtype)
        ]
        if lacking or differ:
            dropped = (
                f"the model has no parameter {lacking}" if lacking else f"it differs: {differ}"
            ) + " of the saved penalty gradient"
        elif float(saved_alpha) != alpha:
            dropped = (
                f"it was computed with alpha={float(saved_alpha)!r}, this penalty's is {alpha!r}"
            )
        else:
            cache = [(params[n], g.detach().to(params[n].device)) for n, g in grads.items()]
    last = values["last_value"]
    return LoadedPenaltyState(
        generator=gen,
        calls=int(calls),
        last_value=None if last is None else last.detach().to(device),
        cache=cache,
        cached_value=None if cache is None else cached_value.detach().to(device),
        dropped=dropped,
    )
