"""The gradient-norm penalties as functions: FP, GP, GP_x and GP_r (see :mod:`curvlab.regularizers`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointError

from curvlab._compiled import eager, from_compiled_graph, strip_wrappers
from curvlab._data import call_model, check_has_examples
from curvlab._graph import graph_nodes
from curvlab._losses import DRAWN_IGNORE, LossSpec, loss_spec, raise_invalid_labels
from curvlab._notrace import (
    buffers_kept,
    gradient_hooks_off,
    math_attention,
    max_norm_weights,
    module_backward_hooks_off,
    put_back_renormalised,
    user_backward_hook,
)
from curvlab._numbers import is_real
from curvlab._own_pass import own_pass
from curvlab._precision import accumulation_dtype, upcast, without_autocast
from curvlab._rng import (
    check_randomness,
    forward_draws,
    global_rng_kept,
    held_reseeded,
    make_generator,
    reseed_global,
)
from curvlab._scan import _foreign, model_device
from curvlab._selection import refuse_complex_model
from curvlab.backends._validation import check_no_train_batchnorm
from curvlab.operators._matrices import _TwiceDifferentiable
from curvlab.regularizers._checks import (
    RECOMPUTED_OUTSIDE,
    check_not_sharded,
    check_output_type,
    check_recomputed,
    check_twice_differentiable,
)

__all__ = [
    "fisher_penalty",
    "gradient_penalty",
    "input_gradient_penalty",
    "random_label_penalty",
]


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, once checked to be a finite number >= 0.

    A Tensor is refused, not read: a penalty runs every training step, and reading a device
    tensor on the host is a synchronisation per step (found in review s17: ``tensor(0.5)`` was
    refused as if it were not a number >= 0).

    Raises:
        TypeError: for a Tensor (pass ``float(alpha)``).
        ValueError: for anything else that is not a finite real number >= 0.
    """
    if isinstance(alpha, Tensor):
        raise TypeError("alpha must be a Python float (got a Tensor: pass float(alpha))")
    if not is_real(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return float(alpha)


def _spec(loss: nn.Module | LossSpec) -> LossSpec:
    """The loss's :class:`~curvlab._losses.LossSpec`: validated here, or a class's own (which
    remembers the layout of its earlier batches, :meth:`~curvlab._losses.LossSpec.gpt_layout`)."""
    return loss if isinstance(loss, LossSpec) else loss_spec(loss)


def _check_labels(targets: Any, name: str) -> None:
    """Refuse ``targets`` of GP or GP_x (``name``) that are not a Tensor, before any forward
    pass (found in review s17: ``None`` raised ``AttributeError: 'NoneType' object has no
    attribute 'is_floating_point'``, GP_x's after its own forward pass).

    Raises:
        ValueError: for ``None`` (the labels are missing).
        TypeError: for anything else that is not a Tensor.
    """
    if targets is None:
        raise ValueError(
            f"{name} needs the batch's labels: pass targets= (a Tensor: class indices, or "
            "targets shaped like the outputs), got None; fisher_penalty and "
            "random_label_penalty draw their labels and do not need them"
        )
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"{name} takes the batch's labels as a Tensor of targets=, got "
            f"{type(targets).__name__}: convert them, e.g. torch.as_tensor(y)"
        )


def _check_optional_labels(targets: Any, name: str) -> None:
    """Refuse ``targets`` of FP or GP_r (``name``) that are neither ``None`` nor a Tensor, before
    any forward pass.

    Raises:
        TypeError: naming the type given.
    """
    if targets is not None and not isinstance(targets, Tensor):
        raise TypeError(
            f"{name} takes targets= as None or a Tensor (the batch's labels, for their shape "
            f"and ignored positions), got {type(targets).__name__}: convert them, e.g. "
            "torch.as_tensor(y)"
        )


def _readable_for_free(t: Tensor) -> bool:
    """Whether reading ``t`` on the host costs no synchronisation (it is in CPU memory)."""
    return t.device.type == "cpu"


def _void_labels(spec: LossSpec, output: Tensor, targets: Tensor | None) -> Tensor | None:
    """The number of class indices in the data ``targets`` of a penalty at drawn labels (FP,
    GP_r) that are neither in ``[0, C)`` nor ``ignore_index`` (a void label 255 with the default
    ``ignore_index=-100``): such a position was counted as a loss term and given a drawn label
    (found in review s17: GP refused them, FP and GP_r did not).

    Labels in CPU memory are read, and refused at once with GP's error; elsewhere the count is
    returned as a 0-dim tensor, to make the penalty NaN (:func:`_nan_where`), without a host
    synchronisation. ``None``: nothing to count (no class-index targets).

    Raises:
        ValueError: for such labels in CPU memory.
    """
    bad = None if targets is None else spec.invalid_labels(output, targets)
    if bad is None:
        return None
    if _readable_for_free(bad):
        raise_invalid_labels(spec, int(bad), output.shape[1])
        return None
    return bad


def _nan_where(bad: Tensor | None, value: Tensor) -> Tensor:
    """``value``, or NaN (with a gradient of 0) where the 0-dim count ``bad`` is not 0. No host
    synchronisation."""
    if bad is None:
        return value
    return torch.where(bad > 0, value.new_full((), float("nan")), value)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "model has no trainable parameters (requires_grad=True); nothing to penalise"
        )
    return params


def _check_differentiable() -> None:
    """Refuse a penalty that cannot be differentiated, before any forward pass: under
    ``torch.no_grad()`` or ``torch.inference_mode()`` (a penalty is a gradient, taken with
    ``torch.autograd.grad``), or inside a ``torch.func`` transform, whose tensors
    ``torch.autograd.grad`` does not differentiate (found in review: inside ``torch.func.grad``
    every penalty came out 0, with gradient 0)."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    if peek is not None and peek() is not None:
        raise RuntimeError(
            "the penalty was called inside a torch.func transform (grad, grad_and_value, vjp, "
            "jacrev, vmap, ...): it differentiates with torch.autograd.grad, which does not see "
            "the transform's tensors (its value and gradient came out 0); call it outside the "
            "transform, on the model's own parameters, and add it to the loss there"
        )
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "the penalty was called with gradients disabled (torch.no_grad() or "
            "torch.inference_mode()): a penalty is a gradient norm, computed by differentiating "
            "the loss, so call it with gradients enabled (e.g. inside torch.enable_grad(), and "
            "take .item() or .detach() of the result to log it)"
        )


def _check_examples(inputs: Any, output: Any) -> None:
    """Refuse an empty batch before any forward pass, with the message of every other entry
    point ("the batch has no examples"). Found in review: ``fisher_penalty`` and
    ``random_label_penalty`` raised ``IndexError: index 0 is out of bounds``, and
    ``gradient_penalty`` and ``input_gradient_penalty`` returned NaN. A penalty of no examples
    is undefined (the mean over none); skip the step's penalty instead."""
    check_has_examples(inputs)
    if isinstance(output, Tensor):
        check_has_examples(output, "the batch (its output=)")


def _squared_grad_norm(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    """``||grad loss||^2``, differentiable, summed in float32 at least: the squares of a 16-bit
    model's gradient entries underflow in its own dtype (a float16 entry below 2.4e-4 squares
    to 0). For a 16-bit model this holds a float32 copy of the gradient in the graph.

    Raises:
        ValueError: if ``loss`` reaches none of ``params`` (found in review: an output computed
            from copies of the parameters gave a penalty of 0 where 0.63 was the value).
    """
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    if all(g is None for g in grads):
        raise ValueError(
            "the penalty's output does not reach any trainable parameter of the model "
            "(model.parameters()): it was computed from other tensors than the model's "
            "parameters (e.g. torch.func.functional_call with copies of them), so the penalty "
            "would be 0; pass output=model(inputs) from the model itself, or output=None to let "
            "the penalty run its own forward"
        )
    total = loss.new_zeros((), dtype=accumulation_dtype(loss.dtype))
    for g in grads:
        if g is not None:
            total = total + upcast(g).pow(2).sum()
    return total


def _own_forward(model: nn.Module, inputs: Any, draws: list[bool] | None = None) -> Any:
    """The penalty's own forward pass, with the buffers forward passes update in place left as
    they were (norm layers' running statistics: the training step's forward updates them once,
    this one updated them a second time per step; ``spectral_norm``'s vectors; no copy of frozen
    weights kept as buffers, on every recomputed step), the global RNG as it was (a Dropout mask
    drawn here shifted every later draw of the training loop), and outside any autocast region
    (curvlab's own passes compute in the parameters' dtype, docs/conventions.md). Attention runs
    the math kernel of ``scaled_dot_product_attention``, as in curvlab's other passes
    (docs/models.md): the fused kernels have no double backward.

    The weight of an ``nn.Embedding``/``nn.EmbeddingBag`` with ``max_norm``, whose rows this
    forward renormalises in place, is put back as it was, with a ``RuntimeWarning`` where rows
    changed, as in curvlab's other calls (:func:`curvlab._notrace.put_back_renormalised`; found
    in review s22: the penalties left it renormalised, silently). The penalty is that at the
    renormalised rows: the lookup saves only its indices, so the graph, the gradient your
    backward takes included, holds them. Where the output's graph saved the weight itself (a
    tied head ``h @ emb.weight.T``) it is left renormalised (putting it back would make your
    backward fail), with a warning saying so. This costs a copy of such a weight and one host
    read per call; a model without one pays nothing.

    Dropout draws a mask of its own: inside the block the global RNG is re-seeded from a draw of
    its current state, so the mask is not the one the training step's next forward draws (which
    it was while the state was merely put back), and the state is put back afterwards. So are
    the generators the modules hold (a layer's ``self.gen`` mask:
    :func:`~curvlab._rng.held_reseeded`; review s27: the penalty's forward used up the training
    loop's next mask, and every later mask of the run shifted by one).

    ``draws``: a list to which whether the forward drew random numbers is appended (for
    :func:`~curvlab.regularizers._checks.check_recomputed`): from the global RNG or from a
    generator a module holds (``self.gen``: :func:`~curvlab._rng.forward_draws`; review s27:
    a held-generator Dropout's other mask was compared and its ``output=`` refused).
    """
    device = model_device(model)
    renormed = max_norm_weights(model.named_modules())
    try:
        with (
            buffers_kept(model, every=False),
            global_rng_kept(device),
            without_autocast(),
            math_attention(),
            _TwiceDifferentiable(list(model.named_modules())),
            held_reseeded(model.modules()),
        ):
            reseed_global(device)
            if draws is None:
                output = call_model(model, inputs)
            else:  # the global RNGs and the generators the modules hold (review s27)
                with forward_draws(device, model.modules()) as drawn:
                    output = call_model(model, inputs)
                draws.append(drawn())
    except BaseException:
        put_back_renormalised(renormed, warn=False)
        raise
    put_back_renormalised(renormed, graph=_output_tensors(output))
    return output


def _output_tensors(output: Any) -> Iterator[Tensor]:
    """The tensors of a model's output (a Tensor, a tuple/list or a mapping of them, an object
    with a ``.logits`` Tensor)."""
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, Mapping):
        for v in output.values():
            yield from _output_tensors(v)
    elif isinstance(output, (tuple, list)):
        for v in output:
            yield from _output_tensors(v)
    elif isinstance(getattr(output, "logits", None), Tensor):
        yield output.logits


def _refuse_weight_norm(model: nn.Module) -> None:
    """A penalty's gradient differentiates the step's graph twice; through ``torch._weight_norm``
    torch's second derivative is wrong (torch 2.14, CPU: a gradient penalty's gradient 40% off),
    so ``output=`` of a model with weight normalisation is refused (its own forward computes the
    weight another way, :class:`~curvlab.operators._matrices._TwiceDifferentiable`)."""
    if _TwiceDifferentiable(list(model.named_modules())).weight_norm_modules():
        raise ValueError(
            "the model uses weight_norm, whose second derivative torch computes wrongly, and a "
            "penalty's gradient needs it: pass output=None (the penalty then runs its own "
            "forward with the same weights computed as g * v / ||v||)"
        )


def _nan_if_nothing_counted(spec: LossSpec, output: Tensor, targets: Any, value: Tensor) -> Tensor:
    """``value``, or NaN when every target is ``ignore_index`` under ``"mean"``: the objective is
    then 0/0 (torch's own loss is NaN), not 0. Only the value: its gradient is ``value``'s where
    a target is counted, else 0 (as torch's own loss gives), so ``value`` must have a finite
    gradient on such a batch (:func:`_finite_weight`). No host synchronisation."""
    if (
        spec.kind != "cross_entropy"
        or spec.reduction != "mean"
        or not isinstance(targets, Tensor)
        or targets.is_floating_point()
    ):
        return value
    counted = (targets != spec.ignore_index).any()
    return torch.where(counted, value, value.new_full((), float("nan")))


def _finite_weight(w: float | Tensor) -> float | Tensor:
    """The loss weight ``1 / count``, with 0 for a batch whose every target is ignored under
    ``"mean"`` (whose ``1 / 0 = inf`` times the sum of no terms made every gradient of the
    penalty NaN: found in review, one such padding batch made the parameters NaN after an SGD
    step, where torch's own loss gives a zero gradient). The penalty's value is made NaN apart
    (:func:`_nan_if_nothing_counted`). No host synchronisation."""
    if not isinstance(w, Tensor):
        return w
    return torch.where(torch.isfinite(w), w, torch.zeros_like(w))


def _eager_route(model: nn.Module, output: Tensor | None) -> tuple[nn.Module, Tensor | None]:
    """The original module of a compiled model, and ``output`` unless it must be recomputed.

    AOTAutograd graphs have no double backward: an output whose graph went through compiled code
    (a compiled model or step) is dropped, so that the penalty's own forward, run eagerly,
    replaces it. With Dropout in train mode that forward draws its own mask.
    """
    if not isinstance(output, (Tensor, type(None))) and isinstance(
        getattr(output, "logits", None), Tensor
    ):
        output = output.logits  # a HuggingFace model's output object: its logits
    if output is not None and from_compiled_graph(output):
        output = None
    return strip_wrappers(model), output


def _hooked_output(model: nn.Module, output: Tensor | None) -> str | None:
    """The module backward hook of the user's (in words, :func:`curvlab._notrace.user_backward_hook`)
    that an ``output=`` of the user's forward has in its graph, or ``None`` (none, or no
    ``output``).

    torch binds a module's backward hooks to the graph at its forward pass, so they cannot be
    taken off the step's graph afterwards: the penalty then runs its own forward, eagerly, in
    the output's place (as for an output of compiled code, :func:`_eager_route`), without them.
    Found in review s20: with ``output=`` a full backward hook tripling a gradient gave the
    penalty of the hooked gradient (0.677 for 0.144). One walk of the modules per call.

    A tensor hook of the user's on the output itself (``output.register_hook(lambda g: 3 * g)``,
    in ``output._backward_hooks``; curvlab's own, a noise capture's, are fine) is bound to the
    graph too and is handled the same way (found in review s20: the gradient 3x, the penalty 9x,
    1.323 for 0.147).
    """
    if output is None:
        return None
    hooks = getattr(output, "_backward_hooks", None)
    if hooks and _foreign(hooks):
        return "a tensor hook on the output= tensor itself (output.register_hook)"
    return user_backward_hook(model)


_DDP_SINK = "_DDPSinkBackward"
"""The node of ``DistributedDataParallel``'s ``_DDPSink`` (its outputs' pass-through)."""


def _static_ddp_sink(output: Tensor | None) -> str | None:
    """The sink node (in words) of ``DistributedDataParallel(static_graph=True)``'s first step
    that an ``output=`` of the user's DDP forward has in its graph, or ``None``.

    On its first step such a DDP hands its outputs through ``_DDPSink``, whose backward queues
    DDP's gradient all-reduce at the end of the backward pass that runs it, once: the penalty's
    inner gradient ran it, so the all-reduce came at the end of the penalty's pass, before any
    gradient was there, and your backward reduced nothing (each rank kept its own gradient,
    the replicas drifted apart, silently; found in review s23: 0.2998 off the ranks' average).
    The penalty then runs its own forward on the module inside DDP in the output's place, as for
    a compiled or hooked output (:func:`_hooked_output`). A sink without ``static_graph``
    (``find_unused_parameters=True``) only hands gradients through: the output is used.

    One walk of the output's graph per call (about 1 µs a node) while a process group is
    initialised; none otherwise.
    """
    if output is None or not (dist.is_available() and dist.is_initialized()):
        return None
    for node in graph_nodes(output):
        if type(node).__name__ != _DDP_SINK:
            continue
        ref = getattr(node, "ddp_weakref", None)
        ddp = ref() if callable(ref) else None
        if (
            ddp is not None
            and getattr(ddp, "static_graph", False)
            and not getattr(ddp, "_static_graph_delay_allreduce_enqueued", True)
        ):
            return (
                "the sink of DistributedDataParallel(static_graph=True)'s first step (its "
                "backward in the penalty's pass would start DDP's gradient all-reduce there, "
                "before your backward)"
            )
    return None


@contextmanager
def retained_grads_kept(output: Any) -> Iterator[None]:
    """Put back the ``.grad`` of the tensors of ``output`` (:func:`_output_tensors`) that retain
    their gradient (``out.retain_grad()``) as they were before the block.

    ``torch.autograd.grad`` runs the retains-grad hooks on its path: the penalty's inner
    gradient set ``out.grad`` (with ``every=1`` a tensor holding a graph), and your backward of
    ``loss + penalty`` then added to it (found in review s23: a norm of 1.2219 for 0.4068).
    Retaining inner tensors (``h.retain_grad()`` in the forward) cannot be seen from the output
    (torch does not expose a node's retains-grad hooks): pass ``output=None`` for them.
    """
    kept = [(t, t.grad) for t in _output_tensors(output) if t.retains_grad]
    try:
        yield
    finally:
        for t, grad in kept:
            t.grad = grad


def _forward(
    model: nn.Module,
    inputs: Any,
    output: Tensor | None,
    spec: LossSpec,
    targets: Tensor | None,
    draws: list[bool] | None = None,
) -> Tensor:
    """The step's output in curvlab's layout (classes in axis 1; see :mod:`curvlab._losses`).

    ``draws``: see :func:`_own_forward` (for an own forward only)."""
    own = output is None
    if own:
        output = _own_forward(model, inputs, draws)
    else:
        _refuse_weight_norm(model)
    if not isinstance(output, Tensor) and isinstance(getattr(output, "logits", None), Tensor):
        output = output.logits
    if (
        isinstance(inputs, Tensor)
        and isinstance(output, Tensor)
        and (output.shape[0] != inputs.shape[0])
    ):
        raise ValueError(
            "output must be model(inputs) for the same batch (got leading dimension "
            f"{getattr(output, 'shape', None)} for {inputs.shape[0]} inputs)"
        )
    if not output.requires_grad:
        if own:
            raise ValueError(
                "the model's output does not require grad: it depends on none of the model's "
                "trainable parameters (requires_grad=True), so there is nothing to penalise"
            )
        raise ValueError(
            "output does not require grad (was it computed under torch.no_grad()?); pass the "
            "output of a normal forward pass, or output=None to let the penalty run one"
        )
    if targets is None and spec.kind == "cross_entropy" and output.ndim > 2:
        raise ValueError(
            f"the penalty got logits of shape {tuple(output.shape)} and no targets: pass "
            "targets= (the batch's labels; only their shape and ignored positions are used), so "
            "that the class axis (1, or the last one in the GPT layout (B, T, C)) is known"
        )
    return output if targets is None else spec.prepare(output, targets)


def fisher_penalty(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    output: Tensor | None = None,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """Fisher penalty ``alpha * ||grad_theta L(x, y_hat)||^2`` with ``y_hat ~ p_theta(y | x)``.

    Args:
        model: the model being trained.
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        inputs: the mini-batch inputs ``x_{1:B}``.
        output: ``model(inputs)`` from the training step, reused to save a forward pass. The
            penalty runs its own forward in its place, eagerly, where it came out of compiled
            code or the model has module backward hooks of the user's (bound to its graph; a
            ``Dropout`` in train mode then draws its own mask). A tensor hook that the model's
            forward registered (``h.register_hook(lambda g: -g)``) cannot be seen afterwards and
            stays in its graph: the penalty is then that of the hooked gradient (pass
            ``output=None`` for such a model: its own forward runs without the hook). The
            first step's output of a ``DistributedDataParallel(static_graph=True)`` is replaced
            too (its sink would start DDP's gradient all-reduce in the penalty's pass, and your
            backward would reduce nothing; docs/distributed.md). The ``.grad`` of an output that retains it (``out.retain_grad()``)
            is put back after the penalty's inner gradient; an inner tensor that retains its
            gradient (``h.retain_grad()``) cannot be seen and gets that gradient written into
            its ``.grad`` (pass ``output=None`` where you read it).
        alpha: the penalty coefficient (>= 0).
        generator: draws the labels; or ``seed`` (default 0) for a fresh generator.
        targets: optional data labels (a Tensor): only their shape (the GPT layout ``(B, T)``
            for logits ``(B, T, C)``) and their ``ignore_index`` positions are used. Class
            indices must be in ``[0, C)`` or ``ignore_index``, as for :func:`gradient_penalty`:
            a void label (255 with the default ``ignore_index=-100``) in CPU memory is refused
            with a ``ValueError``; on an accelerator, where reading it would synchronise the
            host every step, it makes the value NaN (with a gradient of 0) instead.

    Returns:
        A differentiable scalar to add to the loss.

    Raises:
        RuntimeError: if called with gradients disabled (``torch.no_grad()``,
            ``torch.inference_mode()``) or inside a ``torch.func`` transform (as do the other
            penalties).
        ValueError: if ``output`` reaches none of the model's trainable parameters (computed
            from copies of them, e.g. by ``torch.func.functional_call``), or the batch has no
            examples (as do the other penalties).
        NotImplementedError: if the penalty's gradient goes through an operation torch cannot
            differentiate twice (``nn.Hardsigmoid`` with ``output=``, ``nn.EmbeddingBag``, a
            fused attention kernel, a ``@once_differentiable`` function): raised before the
            caller's backward pass, naming the way out; or, before any forward pass, if the
            model is sharded (FSDP2 ``fully_shard``, FSDP1, DTensor parameters), whose double
            backward does not go through FSDP's hooks (as do the other penalties).
        TypeError: if ``generator`` is not a ``torch.Generator``, ``output`` is neither a
            Tensor nor has a ``.logits`` Tensor (a tuple), ``targets`` are neither ``None`` nor
            a Tensor, or ``alpha`` is a Tensor (pass ``float(alpha)``: read every step, it would
            synchronise the host); a ``seed`` that is not an int is a ``ValueError`` (all
            refused before any forward pass).

    Warns:
        RuntimeWarning: when the penalty's own forward pass renormalised rows of the weight of
            an ``nn.Embedding``/``nn.EmbeddingBag`` with ``max_norm``, as curvlab's other calls
            warn (docs/models.md): the penalty and its gradient are those at the renormalised
            rows, and the weight is put back after the call; where the penalty's graph keeps
            the weight itself (a tied head, ``h @ emb.weight.T``) it is left renormalised
            (putting it back would make your backward fail), and the warning says so.

    With every target ``ignore_index`` under ``"mean"`` the value is NaN (0/0), as torch's own
    loss is, and its gradient 0, as torch's loss gradient is.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> X = torch.randn(8, 4)
        >>> fisher_penalty(model, torch.nn.CrossEntropyLoss(), X, alpha=0.1).ndim
        0
    """
    return _drawn("fisher", model, loss_fn, inputs, output, alpha, generator, seed, targets)


def _fisher_labels(
    spec: LossSpec, out: Tensor, gen: torch.Generator, targets: Tensor | None
) -> Tensor:
    """FP's labels: drawn from the model's predictive distribution, without host reads
    (``checked=False``: on an accelerator, logits holding NaN or inf make the penalty NaN rather
    than ``torch.multinomial``'s two host checks every step)."""
    return spec.sample_targets(out, gen, targets, checked=False)


def _random_labels(
    spec: LossSpec, out: Tensor, gen: torch.Generator, targets: Tensor | None
) -> Tensor:
    """GP_r's labels: drawn uniformly from the label set (ignored positions kept ignored)."""
    labels = _uniform_labels(spec, out, gen)
    if targets is not None and spec.kind == "cross_entropy" and not targets.is_floating_point():
        labels = torch.where(targets == spec.ignore_index, DRAWN_IGNORE, labels)
    return labels


DRAWN_PENALTIES = {
    "fisher": (_fisher_labels, "fisher_penalty (FP)"),
    "random": (_random_labels, "random_label_penalty (GP_r)"),
}
"""The penalties on drawn labels, by kind: how their labels are drawn and their name in errors."""


def _drawn(
    kind: str,
    model: nn.Module,
    loss: nn.Module | LossSpec,
    inputs: Tensor,
    output: Tensor | None,
    alpha: float,
    generator: torch.Generator | None,
    seed: int | None,
    targets: Tensor | None,
) -> Tensor:
    """:func:`fisher_penalty` (``kind="fisher"``) or :func:`random_label_penalty`
    (``"random"``) with the loss given as a module or a class's own spec."""
    draw, name = DRAWN_PENALTIES[kind]
    check_randomness(seed, generator)  # before the forward pass (the device is checked at the draw)
    _check_optional_labels(targets, name)

    unsampleable: list[Tensor] = []

    def labels(spec: LossSpec, out: Tensor) -> Tensor:
        gen = make_generator(seed=seed, generator=generator, device=out.device)
        if kind == "fisher" and not _readable_for_free(out):  # the CPU's draw refuses them
            flag = spec.unsampleable(out)  # NaN/inf logits: no class drawn, a NaN value
            unsampleable.extend([] if flag is None else [flag])
        return draw(spec, out, gen, targets)

    value = _penalty_at(model, loss, inputs, output, alpha, targets, labels, drawn=True)
    return _nan_where(unsampleable[0] if unsampleable else None, value)


@torch.compiler.disable  # inside a compiled step: runs eagerly (docs/training-loops.md)
def _penalty_at(
    model: nn.Module,
    loss: nn.Module | LossSpec,
    inputs: Tensor,
    output: Tensor | None,
    alpha: float,
    targets: Tensor | None,
    labels: Callable[[LossSpec, Tensor], Tensor],
    drawn: bool,
) -> Tensor:
    """``alpha * ||grad_theta L(x, labels)||^2``: the gradient-norm penalties differ only in the
    labels (sampled from the model, the data's, or uniform; ``drawn`` unless the data's).
    ``loss``: the loss module, or the spec of a class (:func:`_spec`).

    A compiled model, or an ``output`` from compiled code, has no double backward: the forward then
    runs again, eagerly, on the original module (docs/training-loops.md). So does an ``output``
    of a model with module backward hooks of the user's (:func:`_hooked_output`), or of the
    first step of a ``DistributedDataParallel(static_graph=True)`` (:func:`_static_ddp_sink`).
    The ``.grad`` of a retaining ``output`` is put back after the inner gradient
    (:func:`retained_grads_kept`).

    The user's hooks on parameters are off in the inner gradient, and their module backward
    hooks in the penalty's own forward (:func:`~curvlab._notrace.gradient_hooks_off`,
    :func:`~curvlab._notrace.module_backward_hooks_off`), as in curvlab's other passes
    (docs/conventions.md): the value is ``alpha * ||grad L||^2`` of the loss itself, not of the
    hooked gradient (found in review s20: 0.5667, 0.5954 and 2.1220 for 0.2358 under a
    parameter hook, a full backward hook and a backward pre-hook tripling a gradient). The
    user's own backward of the penalty applies their parameter hooks once, as to any loss.
    """
    _check_differentiable()
    spec = _spec(loss)
    alpha = check_alpha(alpha)
    check_output_type(output)
    _check_examples(inputs, output)
    given = output
    model, output = _eager_route(model, output)
    check_not_sharded(model)  # before any forward: no double backward through FSDP
    # complex parameters: ||g||^2 came out as the complex sum of g**2 (review s27)
    refuse_complex_model(model)
    hooked = _hooked_output(model, output) or _static_ddp_sink(output)
    if hooked is not None:  # the user's module backward hooks, or DDP's first static sink
        output = None
    recomputed = given is not None and output is None  # run again eagerly (compiled, hooked)
    params = trainable(model)
    # a forward of its own (no output=) is not the training step's: a noise capture around the
    # step leaves it alone (curvlab/_own_pass.py); on the step's output its graph is the step's
    own = output is None  # its own forward: also outside the caller's autocast, as a whole
    with (
        own_pass(model.parameters()) if own else nullcontext(),
        without_autocast() if own else nullcontext(),
        gradient_hooks_off(model.parameters()),  # the inner gradient is the loss's
        retained_grads_kept(given),  # out.retain_grad(): the inner gradient sets out.grad
    ):
        draws: list[bool] = []
        with eager(model.modules()), module_backward_hooks_off(model.modules()):
            # whether the recomputing forward drew: asked only of one (a module walk)
            output = _forward(model, inputs, output, spec, targets, draws if recomputed else None)
        if recomputed:
            check_recomputed(model, given, output, spec, targets, random=any(draws), why=hooked)
        # void labels of the data: GP's loss refuses them itself, FP and GP_r only read the
        # ignored positions (refused on the CPU, else the value is made NaN below: no host read)
        bad = _void_labels(spec, output, targets) if drawn else None
        # ||grad (w NLL)||^2 = w ||grad (sqrt(w) NLL)||^2: the gradient reaching a 16-bit output
        # is sqrt(w) (p - y), not w (p - y), which float16 holds as a subnormal (20% off at
        # 65,536 tokens) or 0
        w = _finite_weight(spec.nll_weight(output, output.shape[0], targets))
        objective = w**0.5 * spec.nll_sum(output, labels(spec, output), drawn, twice=True)
        # its own forward ran the math kernel: so does a checkpoint's recomputation in the
        # inner gradient (review s26: torch's CheckpointError through a non-reentrant
        # checkpointed attention block)
        with math_attention() if own else nullcontext():
            try:
                value = (alpha * w) * _squared_grad_norm(objective, params)
            except CheckpointError as exc:  # output= given: made under the user's kernel
                if own:
                    raise
                raise RuntimeError(RECOMPUTED_OUTSIDE) from exc
        check_twice_differentiable(value, model, own)
        return _nan_where(bad, _nan_if_nothing_counted(spec, output, targets, value))


def gradient_penalty(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    output: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """GP: ``alpha * ||grad_theta L(x, y)||^2`` at the data labels (differentiable).

    See :func:`fisher_penalty` for ``output`` and the errors raised. With every target
    ``ignore_index`` under ``"mean"`` the value is NaN and its gradient 0, as torch's own loss's.

    Raises:
        ValueError: if ``targets`` is ``None`` (GP is taken at the batch's labels; the Fisher
            and random-label penalties draw theirs); a ``TypeError`` for targets that are not a
            Tensor (both before any forward pass).
    """
    return _gradient(model, loss_fn, inputs, targets, output, alpha)


def _gradient(
    model: nn.Module,
    loss: nn.Module | LossSpec,
    inputs: Tensor,
    targets: Tensor,
    output: Tensor | None,
    alpha: float,
) -> Tensor:
    """:func:`gradient_penalty` with the loss given as a module or a class's own spec."""
    _check_labels(targets, "gradient_penalty (GP)")
    return _penalty_at(
        model, loss, inputs, output, alpha, targets, lambda spec, out: targets, drawn=False
    )


def _uniform_labels(spec: LossSpec, output: Tensor, generator: torch.Generator) -> Tensor:
    if spec.kind == "cross_entropy":
        classes = output.shape[1]
        shape = (output.shape[0],) + tuple(output.shape[2:])
        return torch.randint(0, classes, shape, generator=generator, device=output.device)
    if spec.kind == "bce":
        draws = torch.randint(0, 2, output.shape, generator=generator, device=output.device)
        return draws.to(output.dtype)
    raise ValueError(
        "random_label_penalty (GP_r) needs a finite label set: use CrossEntropyLoss or "
        "BCEWithLogitsLoss, not MSELoss"
    )


def random_label_penalty(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    output: Tensor | None = None,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """GP_r: ``alpha * ||grad_theta L(x, y_r)||^2``, labels drawn uniformly from the label set.

    ``targets`` (optional) give the layout and the ``ignore_index`` positions, as for
    :func:`fisher_penalty` (void labels refused, or the value NaN on an accelerator, as there).
    """
    return _drawn("random", model, loss_fn, inputs, output, alpha, generator, seed, targets)


@torch.compiler.disable  # inside a compiled step: runs eagerly (docs/training-loops.md)
def input_gradient_penalty(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
) -> Tensor:
    """GP_x: ``alpha * (1/B) sum_i ||d l_i / d x_i||^2`` (``l_i``: mean-convention example losses).

    Runs its own forward pass on a copy of ``inputs`` that requires grad (eagerly, on the original
    module of a compiled model). Examples must not interact (no BatchNorm in train mode), so that
    ``d (sum_n l_n) / d x_i = d l_i / d x_i`` (a BatchNorm in train mode is refused). A sharded
    model (FSDP2, FSDP1, DTensor parameters) is refused before any forward pass, as by the other
    penalties (:func:`fisher_penalty`). ``targets`` must be a Tensor (``None`` is a
    ``ValueError``, another type a ``TypeError``, both before any forward pass).
    """
    return _input_gradient(model, loss_fn, inputs, targets, alpha)


def _input_gradient(
    model: nn.Module,
    loss: nn.Module | LossSpec,
    inputs: Tensor,
    targets: Tensor,
    alpha: float,
) -> Tensor:
    """:func:`input_gradient_penalty` with the loss given as a module or a class's own spec."""
    _check_differentiable()
    _check_labels(targets, "input_gradient_penalty (GP_x)")
    spec = _spec(loss)
    alpha = check_alpha(alpha)
    _check_examples(inputs, None)
    model, _ = _eager_route(model, None)
    check_not_sharded(model)  # before any forward: no double backward through FSDP
    trainable(model)
    check_no_train_batchnorm(model)  # d(sum_n l_n)/dx_i = dl_i/dx_i needs uncoupled examples
    if not isinstance(inputs, Tensor):
        raise TypeError(
            "input_gradient_penalty (GP_x) differentiates with respect to the model's input, so "
            f"it needs one floating-point Tensor of inputs, got {type(inputs).__name__} (a model "
            "called with a dict or several inputs: use the fisher, gradient or random penalty)"
        )
    if not inputs.is_floating_point():
        raise TypeError(
            f"input_gradient_penalty (GP_x) needs floating-point inputs, got {inputs.dtype}; "
            "it is undefined for token ids or other integer inputs"
        )
    x = inputs.detach().requires_grad_(True)
    # its own forward: not the training step's (as above), outside the caller's autocast
    # the user's hooks on parameters and module backward hooks off, as in _penalty_at (found in
    # review s20: 0.369 for 0.041 under a full backward hook tripling a gradient)
    with own_pass(model.parameters()), without_autocast(), gradient_hooks_off(model.parameters()):
        with eager(model.modules()), module_backward_hooks_off(model.modules()):
            output = spec.prepare(_own_forward(model, x), targets)
        n = inputs.shape[0]
        count = spec.count(output, targets)  # float32 at least: a float16 65,520 is inf
        count = count.to(accumulation_dtype(output.dtype)) if isinstance(count, Tensor) else count
        # sum_n l_n, mean convention; nothing counted: 0 with a zero gradient (n / 0 made it NaN)
        shares = spec.nll_sum(output, targets, twice=True) * _finite_weight(n / count)
        with math_attention():  # as its own forward (a checkpoint's recomputation)
            (gx,) = torch.autograd.grad(shares, x, create_graph=True)
        value = alpha * upcast(gx).pow(2).sum() / inputs.shape[0]
        check_twice_differentiable(value, model, own=True)
        return _nan_if_nothing_counted(spec, output, targets, value)
