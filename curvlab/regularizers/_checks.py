"""Checks of the penalties' inputs and graphs: the ``output=`` given, a compiled output's
replacement, and the second derivative the penalty's gradient needs (see
:mod:`curvlab.regularizers`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab._fsdp import fsdp_kind, penalty_message
from curvlab._graph import graph_nodes
from curvlab._losses import LossSpec

__all__ = [
    "check_not_sharded",
    "check_output_type",
    "check_recomputed",
    "check_twice_differentiable",
    "RECOMPUTED_OUTSIDE",
    "RELATIVE_TOLERANCE",
    "RELATIVE_TOLERANCE_16BIT",
]

RELATIVE_TOLERANCE = 0.01
"""How far (relative to its largest entry) a compiled ``output=`` may be from the eager
``model(inputs)`` that replaces it."""

RELATIVE_TOLERANCE_16BIT = 0.05
"""The same where 16-bit arithmetic is involved (a 16-bit output or model, or an autocast region):
bfloat16 autocast logits differ from the float32 ones by up to 1.2% of the largest entry
(MobileNetV3, ResNet-18, GPT-2 of 2 to 12 layers: 0.5% to 1.2%)."""

RECOMPUTED_OUTSIDE = (
    "the penalty's gradient recomputes a non-reentrant torch.utils.checkpoint block of the "
    "model given output= (torch's CheckpointError, chained: the recomputed tensors differ from "
    "the forward's; most likely an attention block whose scaled_dot_product_attention took "
    "another kernel in the recomputation than in your forward). Run the forward that made "
    "output, the penalty call and your backward of the penalty all inside "
    "curvlab.math_attention() (the math kernel, also where the model selects its own kernel), "
    "or pass output=None: the penalty's own forward runs the math kernel"
)
"""The refusal of a penalty whose inner gradient through ``output=`` fails in a checkpoint's
recomputation (review s26: torch's raw ``CheckpointError`` from inside the penalty, for an
``output=`` computed under ``sdpa_kernel(SDPBackend.MATH)`` as the fused-kernel message said)."""

_SIXTEEN = (torch.float16, torch.bfloat16)


def check_output_type(output: Any) -> None:
    """Refuse an ``output=`` that is neither ``None``, a Tensor nor an object with a ``.logits``
    Tensor, with the message of the penalties' own forward (found in review: a model's
    ``(logits, aux)`` tuple gave ``AttributeError: 'tuple' object has no attribute
    'requires_grad'``).

    Raises:
        TypeError: for any other ``output``.
    """
    if output is None or isinstance(output, Tensor):
        return
    if isinstance(getattr(output, "logits", None), Tensor):
        return
    raise TypeError(
        f"output= is a {type(output).__name__}; the penalty needs model(inputs) as a Tensor of "
        "outputs (logits) or an object with a .logits Tensor (as HuggingFace models return): "
        "pass the logits Tensor itself (e.g. output=out[0] for a model returning (logits, aux))"
    )


def check_not_sharded(model: nn.Module) -> None:
    """Refuse a sharded model (FSDP2 ``fully_shard``, FSDP1, DTensor parameters), before any
    forward pass.

    A penalty's gradient is a double backward through the model, which does not go through
    FSDP's hooks (pytorch#106637). Found in review: on an FSDP2 model with nested units,
    ``gradient_penalty(output=model(x))`` silently left out the parameters FSDP had resharded
    after the forward (0.6185 for 1.8080, its gradient up to 92% off), the penalty's own
    forward blamed ``functional_call`` copies, and with the root alone sharded the value was
    right but ``backward()`` failed inside FSDP ("setStorage ... storage of size 0").
    Costs one ``is_initialized()`` check outside ``torch.distributed`` (FSDP needs it), else
    one walk of the modules (:func:`curvlab._fsdp.fsdp_kind`).

    Raises:
        NotImplementedError: saying why and what to use (DistributedDataParallel).
    """
    kind = fsdp_kind(model)
    if kind is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        # a submodule of an FSDP2 unit between its forward and backward: its parameters are
        # FSDP's unsharded ones for the moment (no DTensor to see), FSDP's mark is still there
        managed = any(getattr(m, "_is_fsdp_managed_module", False) for m in model.modules())
        kind = "fsdp2" if managed else None
    if kind is not None:
        raise NotImplementedError(penalty_message(kind))


# ---------------------------------------------------------------- a compiled output= replaced


def _sixteen_bit(model: nn.Module, given: Tensor) -> bool:
    if given.dtype in _SIXTEEN:
        return True
    if torch.is_autocast_enabled(given.device.type):
        return True
    return any(p.dtype in _SIXTEEN for p in model.parameters())


def _largest_difference(given: Tensor, mine: Tensor) -> tuple[Tensor, Tensor]:
    """``max |given - mine|`` and ``max |mine|`` (finite entries), in float32 at least; entries
    equal in both (infinities of masked logits included) or NaN in both count as equal, and a
    NaN difference elsewhere stays NaN (never "within tolerance")."""
    wide = torch.promote_types(torch.promote_types(given.dtype, mine.dtype), torch.float32)
    a, b = given.detach(), mine.detach()
    diff = (a.to(wide) - b.to(wide)).abs_()
    diff.masked_fill_((a == b) | (a.isnan() & b.isnan()), 0)
    scale = b.to(wide).abs().masked_fill_(~b.isfinite(), 0)
    return diff.max(), scale.max()


def check_recomputed(
    model: nn.Module,
    given: Any,
    output: Tensor,
    spec: LossSpec,
    targets: Tensor | None,
    random: bool,
    why: str | None = None,
) -> None:
    """Refuse an ``output=`` from compiled code, or of a model with module backward hooks of the
    user's (``why``: that hook, in words), that is not ``model(inputs)``.

    The penalty recomputes ``model(inputs)`` eagerly in its place (compiled graphs have no double
    backward; a module backward hook is bound to the output's graph, and the penalty is of the
    loss's gradient, not the hooked one), so a transformed output (``logits / T``, ``* 1.05``, a slice) would be replaced
    silently. Shapes are compared always. Values are compared where the recomputing forward drew
    no random number (``random``: the global RNG, or a generator a module holds as an attribute,
    moved during it: Dropout of any kind in train mode, ``F.dropout``, drop-path, ``RReLU``, a
    layer's own ``self.gen`` mask; :func:`~curvlab._rng.forward_draws`), whatever the modules' modes: the largest
    difference must be within 1% of the largest entry (5% where 16-bit arithmetic is involved,
    :data:`RELATIVE_TOLERANCE_16BIT`: compiled, autocast and eager kernels round differently).
    Found in review: in train mode no value was compared, so ``output=compiled(X) / 2`` of a
    model without Dropout came out as the penalty of ``model(X)`` (0.6456 for 0.1335), and in
    eval mode a change of up to 10% was accepted.

    Raises:
        ValueError: if the output given is not ``model(inputs)``.
    """
    raw = given.logits if not isinstance(given, Tensor) else given
    if not isinstance(raw, Tensor) or raw.ndim == 0:
        return
    mine = output if targets is None or not spec.gpt_layout(raw, targets) else output.movedim(1, -1)
    what = f"shape {tuple(raw.shape)} against {tuple(mine.shape)}"
    same = tuple(raw.shape) == tuple(mine.shape)
    if same and not random and raw.numel() > 0:
        tolerance = RELATIVE_TOLERANCE_16BIT if _sixteen_bit(model, raw) else RELATIVE_TOLERANCE
        worst, scale = _largest_difference(raw, mine)
        same = bool(worst <= tolerance * scale)  # NaN: not the same
        what = (
            f"values {float(worst):.3g} apart where the largest entry is {float(scale):.3g}, "
            f"more than {tolerance:.0%} of it"
        )
    if not same:
        reason = (
            "an output= from compiled code, which has no double backward"
            if why is None
            else f"an output= whose graph holds {why}, which would change the gradient "
            "the penalty is the norm of"
        )
        raise ValueError(
            f"the penalty got {reason}, so it "
            "recomputes model(inputs) eagerly in its place; but the output given is not "
            f"model(inputs) ({what}): pass output=model(inputs) itself (or output=None), and "
            "transform the logits inside the model if the penalty is to see them transformed. "
            "(Values are compared where the model's forward draws no random number from the "
            "global RNG or a generator a module holds as an attribute; a model drawing from a "
            "generator held deeper, e.g. in a closure, in train mode: output=None)"
        )


# ---------------------------------------------------------------- the second derivative

_ERROR_NODES = ("Error", "NotImplemented")
"""Autograd nodes whose backward raises whatever it is given: torch has no derivative of the op
that made them (``NotImplemented``: "derivative for aten::hardsigmoid_backward is not
implemented"), or a custom ``autograd.Function`` marked ``@once_differentiable`` (``Error``)."""

_RAISING_NODES = {
    "EmbeddingBagBackwardBackward0": (
        "the derivative for '_embedding_bag_backward' is not implemented (nn.EmbeddingBag, "
        "F.embedding_bag)"
    ),
    "CudnnRnnBackwardBackward0": (
        "the derivative for '_cudnn_rnn_backward' is not implemented (nn.LSTM/GRU/RNN run by cuDNN)"
    ),
}
"""Nodes of a first backward whose own backward torch does not implement (found by probing this
torch: ``nn.EmbeddingBag`` in every mode; cuDNN's RNNs: "Double backwards is not supported for
CuDNN RNNs"). The generic probe (:data:`_ERROR_NODES`) covers every op without a derivative
formula (probed on torch 2.14, every default-constructible ``torch.nn`` module and about 80
functional ops: Hardsigmoid, the fused attention kernels, CTC and the margin losses)."""


def _raising_node(value: Tensor) -> tuple[Any, str] | None:
    """The first node of ``value``'s autograd graph whose backward raises, with torch's message;
    ``None`` where there is none. One walk of the graph (about 1 µs a node), no tensor touched."""
    for node in graph_nodes(value):
        name = type(node).__name__
        if name in _ERROR_NODES:
            return node, _error_message(node)
        if name in _RAISING_NODES:
            return node, _RAISING_NODES[name]
    return None


def _error_message(node: Any) -> str:
    """torch's own message of an error node: its backward raises it at once, whatever its
    inputs (nothing is computed)."""
    try:
        node(*[None] * len(node._input_metadata))
    except RuntimeError as exc:
        return str(exc).split("\n")[0]
    except Exception:  # noqa: BLE001 - an unexpected kind of node: a message without torch's
        pass
    return "an operation torch cannot differentiate twice"


def check_twice_differentiable(value: Tensor, model: nn.Module, own: bool) -> None:
    """Refuse a penalty whose gradient torch cannot compute, before the caller's backward pass.

    A penalty is a gradient norm: its gradient differentiates the model's forward twice. An op
    without a second derivative in torch made the caller's ``backward()`` fail with torch's raw
    message, after the penalty had been accepted (found in review: ``nn.Hardsigmoid`` with
    ``output=``, "derivative for aten::hardsigmoid_backward is not implemented"). The check is
    exact: it looks for the nodes that would raise in the penalty's own graph, so a model whose
    such ops have no trainable parameter before them (a frozen MobileNetV3 backbone) is accepted.

    Args:
        value: the penalty, with its graph.
        model: the model (to name its modules).
        own: whether the penalty ran its own forward (``output=None``), which already computes
            ``nn.Hardsigmoid`` and weight normalisation in ways torch differentiates twice.

    Raises:
        NotImplementedError: naming torch's missing derivative, the modules concerned where
            known, and the way out (as the curvature operators do for the same cause).
    """
    found = _raising_node(value)
    if found is None:
        return
    _, message = found
    raise NotImplementedError(
        "the penalty's gradient needs the second derivative of the model's forward, which torch "
        f"does not have for an operation of this model (torch: {message!r}); "
        + _remedy(message, model, own)
    )


def _remedy(message: str, model: nn.Module, own: bool) -> str:
    if "hardsigmoid" in message:
        names = [
            n or "(the model)" for n, m in model.named_modules() if isinstance(m, nn.Hardsigmoid)
        ]
        if names and not own:
            listed = ", ".join(repr(n) for n in names[:4]) + (
                f" and {len(names) - 4} more" if len(names) > 4 else ""
            )
            return (
                f"the model's nn.Hardsigmoid modules ({listed}) are the cause: pass "
                "output=None, and the penalty runs its own forward with them computed as "
                "clamp(x + 3, 0, 6) / 6 (the same values, twice differentiable)"
            )
        return (
            "hardsigmoid is called outside an nn.Hardsigmoid module (F.hardsigmoid): write it as "
            "(x + 3).clamp(0, 6) / 6, or use nn.Hardsigmoid modules, which the penalty's own "
            "forward (output=None) computes that way"
        )
    if "attention" in message:
        return (
            "a fused scaled_dot_product_attention kernel has no double backward: run the "
            "attention with the math kernel: the forward and the penalty call (and your backward "
            "of the penalty) inside curvlab.math_attention(), which also overrides a kernel the "
            "model selects itself (torch.nn.attention.sdpa_kernel(SDPBackend.MATH) does not)"
        )
    if "cudnn_rnn" in message:
        return (
            "run the RNN without cuDNN (the forward, and the penalty call where it runs its own "
            "forward, inside torch.backends.cudnn.flags(enabled=False))"
        )
    if "embedding_bag" in message:
        return (
            "compute the bags with nn.Embedding and a sum or mean over each bag (twice "
            "differentiable), or freeze the EmbeddingBag's weight (requires_grad=False)"
        )
    if "once_differentiable" in message:
        return (
            "a custom autograd.Function of the model is marked @once_differentiable: give it a "
            "backward that torch can differentiate, or freeze the parameters that come before "
            "it in the forward (requires_grad=False)"
        )
    return (
        "replace the operation by one that torch differentiates twice, or freeze the "
        "parameters that come before it in the forward (requires_grad=False)"
    )
