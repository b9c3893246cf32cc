"""Reading a saved generator state back: :func:`generator_state`, shared by the ``state_dict``s
that hold one (:class:`~curvlab.analysis.Diagnostics`,
:class:`~curvlab.regularizers.GradientNormPenalty`, :class:`~curvlab.noise.NoisyOptimizer`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["CUDA_STATE_BYTES", "StateWording", "generator_state"]


CUDA_STATE_BYTES = 16
"""Size of a CUDA generator's state (its seed and Philox offset, two int64)."""


@dataclass(frozen=True)
class StateWording:
    """How an owner's errors word a refused generator state (:func:`generator_state`).

    Attributes:
        not_tensor: the error for a ``saved`` that is no tensor; ``str.format`` fields:
            ``{kind}`` (its type's name).
        other_device: the error for a state this device's generator cannot take; fields:
            ``{got}`` (its dtype and size), ``{origin}`` (": a CUDA generator's state, saved by a
            run on CUDA" where its size says so, else empty), ``{here}`` (this device type,
            upper case), ``{size}`` (this generator's state size in bytes) and ``{exc}`` (torch's
            error).
    """

    not_tensor: str
    other_device: str


def _wording(owner: str, save: str) -> StateWording:
    """The wording of the owners whose generator draws labels for unbiased estimates
    (:class:`~curvlab.analysis.Diagnostics`, :class:`~curvlab.regularizers.GradientNormPenalty`)."""
    return StateWording(
        not_tensor=(
            f"not a {owner} state_dict: its 'generator' is a {{kind}}, not the generator state "
            f"tensor (save {save})"
        ),
        other_device=(
            f"the {owner} state's 'generator' is {{got}}{{origin}}, but this {owner} draws on "
            "{here} (a {size}-byte state; torch: {exc}). Resume on the device type the "
            "state was saved on for the uninterrupted run's label draws; or load it with "
            'state["generator"] = None to continue here: the generator is then seeded from seed '
            "and the step counter (other draws of the same unbiased estimates)"
        ),
    )


def generator_state(
    device: torch.device,
    saved: Any,
    seed: int,
    calls: int,
    owner: str = "Diagnostics",
    save: str = "diag.state_dict()",
    *,
    salt: str = "generator",
    wording: StateWording | None = None,
) -> Tensor:
    """The state a generator on ``device`` takes from ``saved`` (checked on a scratch generator,
    so that a refused one changes nothing). ``None``: a state seeded from ``seed`` and the step
    counter ``calls``, for a state saved on another device type.

    Args:
        device: the device of the generator the state is for.
        saved: the ``"generator"`` entry of a saved state (``torch.load`` may have moved it).
        seed: the owner's seed (for ``saved=None``).
        calls: the owner's restored step counter (for ``saved=None``).
        owner: the class whose state it is, as the errors name it.
        save: how its state is saved, as the errors name it.
        salt: the owner's word in the seed of ``saved=None``: the generator is seeded from the
            hash of ``"{seed}/{salt}/{calls}"`` (``"noise"`` for
            :class:`~curvlab.noise.NoisyOptimizer`, whose resumed runs keep their draws).
        wording: the errors' wording (default: that of ``owner`` and ``save`` for a generator
            that draws labels, :class:`StateWording`).

    Raises:
        ValueError: ``saved`` is no generator state, or one of another device type (a CUDA
            generator's state is 16 bytes, a CPU one's thousands: torch's error only named the
            sizes, found in review), with what to do.
    """
    words = _wording(owner, save) if wording is None else wording
    scratch = torch.Generator(device=device)
    if saved is None:
        digest = hashlib.blake2b(f"{seed}/{salt}/{calls}".encode(), digest_size=8).digest()
        scratch.manual_seed(int.from_bytes(digest, "little") % 2**63)
        return scratch.get_state()
    if not isinstance(saved, Tensor):
        raise ValueError(words.not_tensor.format(kind=type(saved).__name__))
    state = saved.detach().cpu()  # torch.load(map_location="cuda") moved it
    try:
        scratch.set_state(state)
    except (RuntimeError, TypeError, ValueError) as exc:
        here = device.type
        size = scratch.get_state().numel()
        other = "cuda" if here == "cpu" else "cpu"
        other_size = torch.Generator().get_state().numel() if other == "cpu" else CUDA_STATE_BYTES
        got = f"a {state.dtype} tensor of {state.numel()} elements"
        origin = (
            f": a {other.upper()} generator's state, saved by a run on {other.upper()}"
            if state.dtype == torch.uint8 and state.numel() == other_size
            else ""
        )
        raise ValueError(
            words.other_device.format(got=got, origin=origin, here=here.upper(), size=size, exc=exc)
        ) from None
    return state
