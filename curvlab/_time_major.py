"""Time-major batches: a batch whose first axis is time, not the examples.

curvlab reads the first axis of every input tensor as the examples. A time-major batch
``(T, B, ...)`` (torch's word_language_model layout, fed to a sequence-first ``nn.LSTM`` or
``nn.TransformerEncoder`` without ``batch_first=True``) puts time there instead, and the
examples-apart check (:class:`curvlab._layout.ExamplesApart`) sees what follows:

* a sequence-first layer runs along its first axis, so the "examples" (time steps) run without
  the others give other outputs: a coupling, whose usual way out (statistics without the batch)
  does not apply. :func:`time_major_call` is the evidence that the layer that mixes them reads
  that axis as time, and :func:`time_major_message` names that cause first (found in review s25:
  the error advised BatchNorm/LayerNorm changes to a model without batch statistics);
* a model that pools over time (output ``(B, C)``) gives ``B`` rows however many time steps it
  is run on: with ``T == B`` nothing tells the layout by shapes, and the per-example passes fed
  one time step of every sequence to a loss that then reported shapes the user never passed
  (review s25). :func:`not_following_message` says that the output does not follow the inputs'
  first axis.

Both refusals name the way out: the examples first in every tensor (``batch_first=True``, or a
transpose inside ``forward``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["not_following_message", "time_major_call", "time_major_message"]

_SEQUENCE_FIRST: tuple[type[nn.Module], ...] = (
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
"""torch's layers that read a batched input as ``(T, B, d)`` unless ``batch_first=True``."""

_WAY_OUT = (
    "Put the examples first in every tensor of the batch: batch-major data (B, T, ...) with "
    "batch_first=True on the layer, or keep the layer sequence-first and transpose inside "
    "forward (x.transpose(0, 1) before it, and back after), with the inputs and the targets "
    "passed examples first"
)

_ATTENTION = ("Transformer", "MultiheadAttention")  # the layers (and stacks) that attend
_KFAC_NOTE = (
    " (kfac and KFACNoise: for torch's Transformer layers, batch_first=True only, since they "
    "refuse the Linear layers inside a sequence-first Transformer layer, transposed or not; or "
    "leave those layers out with params=)"
)


def _way_out(evidence: str) -> str:
    """:data:`_WAY_OUT`, with the K-FAC limit where the layer attends (torch's Transformer
    layers and stacks, and their ``MultiheadAttention``, the layer named when it is one of
    theirs). Found in review s25: the transpose the message advised for a Transformer layer is
    refused by ``kfac``, whose factors need every call of a Linear layer to hold the examples
    first."""
    layer = evidence.partition(" (")[2].partition(",")[0]
    return _WAY_OUT + (_KFAC_NOTE if layer.startswith(_ATTENTION) else "")


def _batch_first(module: nn.Module) -> bool | None:
    """A sequence-first-capable layer's ``batch_first`` (an encoder or decoder stack's: that of
    its first layer), or ``None`` for any other module."""
    if not isinstance(module, _SEQUENCE_FIRST):
        return None
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        layers = getattr(module, "layers", None)
        return _batch_first(layers[0]) if layers else None
    flag = getattr(module, "batch_first", None)
    if flag is None:  # torch's encoder and decoder layers keep it on their attention only
        flag = getattr(getattr(module, "self_attn", None), "batch_first", None)
    return bool(flag) if flag is not None else None


def time_major_call(module: nn.Module, name: str, first: Any, n: int) -> str:
    """Evidence that a batch is time-major: ``module`` (named ``name``, ``"<root>"`` for the
    model) is a sequence-first layer (``batch_first=False``) called on a batched input
    (``(T, B, d)``, three dimensions) whose first axis, which it reads as time, has the batch's
    ``n`` "examples"; ``""`` otherwise."""
    if not isinstance(first, Tensor) or first.ndim != 3 or first.shape[0] != n:
        return ""
    if _batch_first(module) is not False:
        return ""
    what = "the model" if name == "<root>" else f"module '{name}'"
    return (
        f"{what} ({type(module).__name__}, batch_first=False) reads the first axis of its "
        f"input, of shape {tuple(first.shape)}, as time and runs along it, and that axis holds "
        f'the batch\'s {n} "examples"'
    )


def time_major_message(why: str, evidence: str) -> str:
    """The error for a coupling (``why``) found in a sequence-first layer run along the batch's
    first axis (``evidence``: :func:`time_major_call`): the layout first, then the coupling."""
    return (
        f"the batch is most likely time-major (T, B, ...): {evidence}. curvlab reads the first "
        "axis of every tensor as the examples, and so read, the model mixes them: "
        f"{why}. {_way_out(evidence)}. If the first axis does hold the examples (a layer that "
        "runs across the examples on purpose), per-example quantities are undefined; the whole "
        "batch's loss is not (cl.curvature_operator, cl.trace, cl.diag_hessian do not split it "
        "into examples)"
    )


def not_following_message(n: int, k: int, shape: tuple[int, ...], evidence: str) -> str:
    """The error for a model whose output keeps ``n`` rows on ``k < n`` of the batch's
    ``n`` examples (``shape``: that output's), so its first axis is not the examples';
    ``evidence``: a sequence-first layer reading the first axis as time (:func:`time_major_call`),
    or ``""``."""
    seen = f" ({evidence})" if evidence else ""
    return (
        f"the model's output has {n} rows for {n} examples and {n} for {k} (shape {shape} on "
        f"{k} of them alone): its first axis is not the inputs' first axis, so the batch cannot "
        "be split into examples (a pass on one example would feed the model a slice of every "
        "one of them). Most likely a time-major input (T, B, ...) to a sequence-first model"
        f"{seen}: curvlab reads the first axis of every input tensor as the examples. "
        f"{_way_out(evidence)}; or use a model whose output follows the inputs' first axis"
    )
