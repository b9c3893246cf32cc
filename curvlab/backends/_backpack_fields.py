"""BackPACK's results as curvlab needs them: cached extensions and sum losses, the fields it
stores on parameters read back (zeros where the loss does not reach, a hand-over where BackPACK
missed a parameter that has a gradient), and ``.grad`` cleared between passes."""

from __future__ import annotations

import torch
from backpack import hook_run_extensions, hook_store_io
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.saved_quantities import SavedQuantities
from torch import Tensor, nn

from curvlab._losses import LossSpec
from curvlab.backends._base import Handover

__all__ = ["sum_loss"]


_EXTENSIONS: dict[type, BackpropExtension] = {}


def _extension(cls: type[BackpropExtension]) -> BackpropExtension:
    """A BackPACK extension of class ``cls`` (without arguments), built once per process.

    Building one sets up a module-extension object per supported layer type, which costs as much
    as a small model's backward pass (about 60 us for ``DiagGGNExact``). The only state an
    extension keeps is the quantities backpropagated during one backward pass: it starts empty
    each time, also after a backward pass that raised.
    """
    ext = _EXTENSIONS.get(cls)
    if ext is None:
        ext = _EXTENSIONS[cls] = cls()
    ext.saved_quantities = SavedQuantities()
    return ext


def _release_extensions() -> None:
    """Drop what the cached extensions saved during the last backward pass (tensors of the
    user's graph), so nothing of a call outlives it."""
    for ext in _EXTENSIONS.values():
        ext.saved_quantities = SavedQuantities()


def _field(params: dict[str, nn.Parameter], field: str) -> dict[str, Tensor]:
    """Each parameter's BackPACK field (``.grad`` included); zeros where the loss did not reach.

    Raises:
        Handover: for a parameter with a gradient but no field (see :func:`_unseen`).
    """
    out = {}
    for n, p in params.items():
        v = p.grad if field == "grad" else p.__dict__.get(field)
        if v is None and field != "grad":
            _unseen(n, p, field)
        out[n] = torch.zeros_like(p) if v is None else v
    return out


def _unseen(name: str, p: nn.Parameter, field: str) -> None:
    """Hand over if ``p`` got a gradient that BackPACK's module hooks did not see.

    A parameter that enters the loss once, but not through its module's output (``F.linear(x,
    layer.weight)``, or its module's output unused and the weight used outside), passes the
    forward check; BackPACK then computes nothing for it, and zeros would be wrong.
    """
    if p.grad is not None:
        raise Handover(
            f"parameter '{name}' has a gradient but BackPACK computed no {field} for it: it "
            "enters the loss outside its module (e.g. F.linear(x, layer.weight)), where "
            "BackPACK's module hooks cannot see it"
        )


def _zeros(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {n: torch.zeros_like(p) for n, p in params.items()}


def _zero_grads(params: dict[str, nn.Parameter]) -> None:
    for p in params.values():
        p.grad = None


_LOSSES: dict[str, nn.Module] = {}


def _extended_sum_loss(spec: LossSpec) -> nn.Module:
    """A sum-reduction loss of ``spec``'s family with BackPACK's hooks, built once per process.

    The module is curvlab's own (never the user's), so its hooks stay; the tensors BackPACK stores
    on it are removed after every block.
    """
    loss = _LOSSES.get(spec.kind)
    if loss is None:
        loss = sum_loss(spec)
        loss.register_forward_hook(hook_store_io)
        loss.register_full_backward_hook(hook_run_extensions)
        _LOSSES[spec.kind] = loss
    return loss


def sum_loss(spec: LossSpec) -> nn.Module:
    """A fresh sum-reduction loss module of the same family as ``spec``."""
    if spec.kind == "cross_entropy":
        return nn.CrossEntropyLoss(reduction="sum")
    if spec.kind == "mse":
        return nn.MSELoss(reduction="sum")
    return nn.BCEWithLogitsLoss(reduction="sum")
