"""BackPACK's results as curvlab needs them: cached extensions and sum losses, the fields it
stores on parameters read back (zeros where the loss does not reach, a hand-over where BackPACK
missed a parameter that has a gradient), ``.grad`` cleared between passes, and BackPACK's own
failures that mean "not this model" turned into hand-overs (:func:`_extending`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import backpack as backpack_package
import torch
from backpack import backpack, hook_run_extensions, hook_store_io
from backpack import extensions as bext
from backpack.core.derivatives.bcewithlogitsloss import BCELossWithLogitsDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.saved_quantities import SavedQuantities
from backpack.extensions.secondorder.diag_ggn.losses import DiagGGNLoss
from backpack.extensions.secondorder.diag_hessian.losses import DiagHLoss
from backpack.extensions.secondorder.sqrt_ggn.losses import SqrtGGNBaseLossModule
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

from curvlab._losses import LossSpec
from curvlab._precision import upcast
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
        stable = _STABLE_BCE.get(cls)
        if stable is not None:  # this instance is curvlab's own: BackPACK's others keep theirs
            ext.set_module_extension(nn.BCEWithLogitsLoss, stable(), overwrite=True)
    ext.saved_quantities = SavedQuantities()
    return ext


class _StableBCEDerivatives(BCELossWithLogitsDerivatives):
    """BackPACK's BCEWithLogits derivatives with the loss Hessian's square root taken as
    ``sqrt(sigmoid(z) sigmoid(-z))`` on float32 (at least) logits.

    BackPACK's ``sqrt(s (1 - s))`` in the logits' dtype is 0 once ``s`` rounds to 1 (``z >= 17``
    in float32, ``z >= 6`` in bfloat16): the exact diagonal GGN and the exact GGN trace of a
    binary classifier that fits its positives were 0 (52% off at bfloat16 ``z ~ 6``).
    """

    def _sqrt_hessian(
        self,
        module: nn.BCEWithLogitsLoss,
        g_inp: tuple[Tensor],
        g_out: tuple[Tensor],
        subsampling: list[int] | None,
    ) -> Tensor:
        self._check_is_default(module)
        self._check_input_dims(module)
        z = upcast(subsample(module.input0, subsampling=subsampling)).unsqueeze(0)
        sqrt_h = (torch.sigmoid(z) * torch.sigmoid(-z)).sqrt()
        if module.reduction == "mean":
            sqrt_h = sqrt_h / module.input0.shape[0] ** 0.5
        return sqrt_h.to(module.input0.dtype)


_STABLE_BCE: dict[type, Callable[[], ModuleExtension]] = {
    bext.DiagGGNExact: lambda: DiagGGNLoss(derivatives=_StableBCEDerivatives()),
    bext.DiagHessian: lambda: DiagHLoss(derivatives=_StableBCEDerivatives()),
    bext.SqrtGGNExact: lambda: SqrtGGNBaseLossModule(_StableBCEDerivatives()),
}
"""The second-order extensions curvlab runs through a BCE loss, and the stable module extension
of the loss for each."""


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


@contextmanager
def _extending(*extensions: Any, retain_graph: bool = False) -> Iterator[None]:
    """``backpack(...)``, with BackPACK's "no rule for this" (``NotImplementedError`` in its
    backward hooks: e.g. an adaptive pooling whose input size is no multiple of its output
    size), its ``AssertionError`` for a backpropagated quantity it lost (an operation between
    layers that its module hooks do not see) and its failure to ``view`` a layer's
    non-contiguous tensor (``DiagHessian`` on a ``channels_last`` CNN with a curved activation)
    turned into a hand-over to the next backend."""
    try:
        with backpack(*extensions, retain_graph=retain_graph):
            yield
    except NotImplementedError as e:
        raise Handover(f"BackPACK has no rule for a module of this model: {e}") from None
    except AssertionError as e:
        if _MISSING_QUANTITY not in str(e):
            raise
        raise Handover(
            "BackPACK's second-order rules lost the quantity they backpropagate: an operation "
            "between the model's layers (a container's own forward, a hook) that its module "
            "hooks do not see"
        ) from None
    except RuntimeError as e:
        if not _strided_view_failure(e):
            raise
        raise Handover(
            "BackPACK's rules cannot reshape a layer's non-contiguous tensors (a channels_last "
            "model or input: torch.channels_last strides); the next backend computes it, or "
            "use model.to(memory_format=torch.contiguous_format) and contiguous inputs"
        ) from None


_BACKPACK_DIR = os.path.dirname(backpack_package.__file__) + os.sep
_MISSING_QUANTITY = "BackPACK extension expects a backpropagation quantity but it is None"
_VIEW_FAILURE = "view size is not compatible with input tensor's size and stride"


def _strided_view_failure(e: RuntimeError) -> bool:
    """Whether ``e`` is torch's ``view`` refusing a strided tensor inside BackPACK's own code."""
    if not str(e).startswith(_VIEW_FAILURE):
        return False
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_BACKPACK_DIR):
            return True
        tb = tb.tb_next
    return False
