"""Normalising ``data`` arguments and the example-weighted accumulation over batches.

Every entry point of curvlab takes ``data`` as either one batch or an iterable of batches:

* one batch is a ``tuple`` or ``list`` of length two whose first element is a Tensor,
  ``(inputs, targets)``;
* anything else (a ``DataLoader``, a list of batches, a generator) is iterated as batches.

``inputs`` is a Tensor or a mapping of Tensors (a HuggingFace batch such as ``{"input_ids": ...,
"attention_mask": ...}``), in which case the model is called as ``model(**inputs)``; a model output
that is not a Tensor gives its ``.logits`` (:func:`call_model`). An *example* is one index of the
leading (batch) dimension of ``inputs`` (of every tensor of a mapping). Over several batches each
quantity is exactly the one of the objective on all the data together: an example-weighted mean under
``reduction="mean"``, the total under ``reduction="sum"``. curvlab achieves this by summing raw
negative-log-likelihood quantities over batches and scaling once at the end (:mod:`curvlab._losses`),
so ``data`` may be a one-shot iterator.

Example:
    >>> import torch
    >>> from curvlab._data import iter_batches
    >>> X, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    >>> [b[0].shape[0] for b in iter_batches((X, y))]
    [5]
    >>> [b[0].shape[0] for b in iter_batches([(X[:2], y[:2]), (X[2:], y[2:])])]
    [2, 3]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._ambient import process_state_held
from curvlab._finite import check_batch_finite
from curvlab._graph import CheckpointRuns, checkpoint_runs, reentrant_checkpoint_params
from curvlab._notrace import tensor_hooks_off
from curvlab._numbers import is_count
from curvlab._persistent_loader import held_persistent, mark_left, readable
from curvlab._reading_rngs import Carried, reading_rngs
from curvlab._same_readings import reading_check
from curvlab._sampler_state import sampler_states
from curvlab._unreadable_data import refuse_unreadable
from curvlab._warn import warn_once

__all__ = [
    "Batch",
    "Chunks",
    "as_data",
    "EmptyDataError",
    "Inputs",
    "inputs_to_device",
    "autocast_enabled",
    "call_model",
    "check_chunk_size",
    "check_inputs_fit",
    "InputDtypeError",
    "ReentrantCheckpointError",
    "dtype_errors_named",
    "dtype_mismatch",
    "check_batch_shapes",
    "check_has_examples",
    "fresh_inputs",
    "is_single_batch",
    "iter_batches",
    "batch_tensors",
    "iter_chunks",
    "num_examples",
    "part_failed",
    "probe_inputs",
    "raise_if_part_failed",
    "resource_error",
    "read_again",
    "same_batch",
    "slice_inputs",
    "to_device",
]

Inputs = Tensor | Mapping[str, Tensor]
Batch = tuple[Inputs, Tensor]


def _is_inputs(x: Any) -> bool:
    return isinstance(x, Tensor) or (
        isinstance(x, Mapping) and len(x) > 0 and all(isinstance(v, Tensor) for v in x.values())
    )


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` batch rather than an iterable of batches."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and _is_inputs(data[0])
        and isinstance(data[1], Tensor)
    )


def num_examples(inputs: Inputs) -> int:
    """The batch size of ``inputs`` (a Tensor, or the first tensor of a mapping)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    return int(next(iter(inputs.values())).shape[0])


def slice_inputs(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of ``inputs``."""
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    return {k: v[start:stop] for k, v in inputs.items()}


def autocast_enabled() -> bool:
    """Whether torch autocast is on (then dtypes of inputs and parameters may differ)."""
    try:
        return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled()


def _first_parameter(model: nn.Module) -> Tensor | None:
    """``next(model.parameters(), None)``, without building ``named_modules``' name strings."""
    stack = [model]
    while stack:
        module = stack.pop()
        for p in module._parameters.values():
            if p is not None:
                return p
        stack.extend(reversed([c for c in module._modules.values() if c is not None]))
    return None


def check_inputs_fit(model: Any, inputs: Inputs) -> None:
    """Raise a clear error when ``inputs`` are on another device than ``model``.

    Only attributes are compared (no host synchronisation). A floating-point input of another
    dtype than the model's parameters is not refused here: a model may cast its inputs itself
    (a bfloat16 HuggingFace ViT given float32 pixels); where it does not, the model's own error
    is named by :func:`dtype_errors_named` (found in review: refused up front, such a model
    could not be measured at all).

    Raises:
        ValueError: if an input tensor is on another device than the model's parameters.
    """
    if not isinstance(model, nn.Module):
        return
    p = _first_parameter(model)
    if p is None or p.device.type == "meta":
        return
    tensors = {"inputs": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    for key, t in tensors.items():
        if t.device != p.device:
            what = "the inputs are" if key == "inputs" else f"inputs[{key!r}] is"
            raise ValueError(
                f"{what} on {t.device} but the model's parameters are on {p.device}; move the "
                f"data to the model's device (x.to('{p.device}')) or the model to the data's"
            )


def dtype_mismatch(model: Any, inputs: Inputs) -> str | None:
    """The error for floating-point inputs of another dtype than the model's first parameter
    (unless autocast is on), or ``None``."""
    p = _first_parameter(model) if isinstance(model, nn.Module) else None
    tensors = {"inputs": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    if p is None or not p.is_floating_point() or autocast_enabled():
        return None
    for key, t in tensors.items():
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != p.dtype:
            what = "the inputs are" if key == "inputs" else f"inputs[{key!r}] is"
            want = str(p.dtype).replace("torch.", "")
            return (
                f"{what} {str(t.dtype).replace('torch.', '')} but the model's parameters are "
                f"{want}, and the model failed on them; convert the data "
                f"(x.to(torch.{want})) or the model (model.to({t.dtype})) so that they match"
            )
    return None


@contextmanager
def dtype_errors_named(model: Any, inputs: Inputs) -> Iterator[None]:
    """Raise a ``TypeError`` naming the dtypes in place of the model's own error when it fails
    on floating-point inputs of another dtype than its parameters (:func:`dtype_mismatch`);
    any other error passes unchanged.

    Raises:
        TypeError: chained from the model's error.
    """
    try:
        yield
    except RuntimeError as exc:
        why = dtype_mismatch(model, inputs)
        if why is None:
            hint = _swapped_hint(model, inputs)
            if hint is not None:
                exc.add_note(hint)
            raise
        raise InputDtypeError(why) from exc


def _swapped_hint(model: Any, inputs: Inputs) -> str | None:
    """A note for a model that failed on integer inputs while its parameters are floating
    point: integer inputs are right for embeddings, but they are also what a batch given as
    ``(targets, inputs)`` puts first (review s22: torch's bare "mat1 and mat2 must have the
    same dtype, but got Long and Double" was all a swapped pair got)."""
    p = _first_parameter(model) if isinstance(model, nn.Module) else None
    if p is None or not p.is_floating_point() or not isinstance(inputs, Tensor):
        return None
    if inputs.is_floating_point() or inputs.is_complex():
        return None
    if any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules()):
        return None  # integer inputs are what it takes: its failure is its own (review s22 R3)
    dtype = str(inputs.dtype).replace("torch.", "")
    return (
        f"curvlab: the model failed on inputs of dtype {dtype} and shape {tuple(inputs.shape)}; "
        "curvlab reads a batch as (inputs, targets): if the data holds (targets, inputs), swap "
        "them"
    )


class InputDtypeError(TypeError):
    """The model failed on floating-point inputs of another dtype than its parameters."""


def _fresh(t: Tensor) -> Tensor:
    """A copy of ``t`` that holds its values in memory of its own (an expanded tensor's
    repeated entries stay shared within the copy: its memory is not multiplied)."""
    if t.layout != torch.strided:
        return t.clone()
    small = t
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:  # an expanded axis (position ids broadcast over a batch)
            small = small.narrow(dim, 0, 1)
    return t.clone() if small is t else small.clone().expand(t.shape)


def fresh_inputs(inputs: Inputs) -> Inputs:
    """``inputs`` with each tensor copied (a mapping's other values as they are), for one
    forward pass of curvlab's.

    curvlab runs the model on the same data tensors several times in one call (layout and
    examples-apart probes, per-example passes, one forward pass per operator product). A
    forward that writes into its own input (``x.div_(2)`` as preprocessing, a first
    ``nn.SiLU(inplace=True)`` on the raw inputs) would repeat the write at each pass: later
    passes saw ``X/2``, ``X/4``, ... and the caller's data came back changed (found in review
    s22: ``diag_fisher(kind="exact")`` 9.3% off, ``trace(matrix="ggn")`` 1.9%, the examples-apart
    check raising :class:`MixedExamplesError` about a model that mixes nothing; one pass's write
    invalidating a tensor another pass's graph saved raised autograd's raw "modified by an
    inplace operation"). Each pass on its own copy computes the function the user's own step
    computes on fresh data, and the caller's tensors are never written. Cost: one copy of the
    batch's inputs per forward pass (the first layer's input that autograd saves is the copy;
    the activations a forward pass keeps are larger); an expanded tensor's copy keeps its
    broadcast axes (:func:`_fresh`). Version counters cannot replace the copy: they tell a write
    only after it was made.

    Example:
        >>> import torch
        >>> x = torch.ones(2, 3)
        >>> y = fresh_inputs(x).div_(2)
        >>> bool(x.eq(1).all()), fresh_inputs({"ids": x, "n": 3})["n"]
        (True, 3)
    """
    if isinstance(inputs, Tensor):
        return _fresh(inputs)
    return {k: _fresh(v) if isinstance(v, Tensor) else v for k, v in inputs.items()}


def call_model(
    model: Any,
    inputs: Inputs,
    whole: Inputs | None = None,
    received: list[Inputs] | None = None,
    module: nn.Module | None = None,
) -> Tensor:
    """``model(inputs)``, or ``model(**inputs)`` for a mapping; a non-Tensor output gives ``.logits``.

    Every forward pass of curvlab's goes through here. The model runs on a copy of ``inputs``
    (:func:`fresh_inputs`): a forward that writes into its own input (``x.div_(2)``, a first
    ``nn.LeakyReLU(inplace=True)``) sees the data as given at every pass, and the caller's
    tensors are left as they were (before review s22 each pass repeated the write into them).
    The tensor hooks of the user's that the
    forward registers (``h.register_hook(lambda g: -g)``, a gradient-reversal or
    gradient-scaling layer; ``register_post_accumulate_grad_hook``) are off for it
    (:func:`curvlab._notrace.tensor_hooks_off`): they change the gradient, not the loss, whose
    curvature curvlab computes (before review s19 they acted in curvlab's backward passes: an
    exact Hessian trace 9.266 for 1.943 under a hook tripling a hidden layer's gradient).
    curvlab's, BackPACK's and torch's own hooks stay.

    Args:
        model: the model.
        inputs: a batch's inputs (a Tensor or a mapping of Tensors).
        whole: the batch ``inputs`` are some examples of, when the model has already run on all
            of it: a failure of the model on ``inputs`` is then raised as :func:`part_failed`
            (the batch most likely has no batch axis), not as the model's raw shape error.
        received: if given, the copy of ``inputs`` the model ran on is appended to it (the
            hooks backend tells a layer run on the batch as given by its input's storage).
        module: the module a function ``model`` runs (``functional_call(module, params, ...)``
            in torch.func passes): looked through for ``torch.compile``'d submodules, whose
            warning about curvlab's global hook is silenced as for a module ``model``
            (:func:`~curvlab._graph.checkpoint_runs`; before review s23 the func backend's and
            the Hessian operator's passes showed it).

    Raises:
        TypeError: if the output is neither a Tensor nor has a Tensor ``.logits``, or if the
            model fails on floating-point inputs of another dtype (:func:`dtype_errors_named`).
        ValueError: if the inputs are on another device than the model, (with ``whole``) if
            the model fails on ``inputs``, or if trainable parameters run inside reentrant
            activation checkpointing (:func:`check_no_reentrant_checkpoint`).
    """
    check_inputs_fit(model, inputs)
    inputs = fresh_inputs(inputs)  # the model may write into them: never into the caller's
    if received is not None:
        received.append(inputs)
    try:
        # (checkpoint_runs: which modules run inside a reentrant activation checkpoint)
        with (
            dtype_errors_named(model, inputs),
            tensor_hooks_off(),
            checkpoint_runs(model if module is None else module) as runs,
        ):
            out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    except Exception as e:
        if whole is None or _raised_by_curvlab(e) or resource_error(e):
            raise
        raise part_failed(whole, inputs, e) from e
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        check_no_reentrant_checkpoint(model, logits, runs)
        return logits
    # the output's own type named (a tuple, list or dict was called "NoneType", review s20)
    what, fix = type(out).__name__, ""
    if isinstance(out, (tuple, list)):
        what += f" of {len(out)} ({', '.join(type(o).__name__ for o in out[:4])})"
        fix = " alone (not a tuple or list)"
    elif isinstance(out, Mapping):
        what += f" with keys {list(out)[:8]} and no .logits attribute"
        fix = " alone (e.g. out['logits'])"
    elif hasattr(out, "logits"):
        what += f" whose .logits is a {type(logits).__name__}"
    raise TypeError(
        f"the model returned a {what}; curvlab needs a Tensor of outputs (logits) "
        "or an object with a .logits Tensor (as HuggingFace models return). Wrap the model so "
        f"that its forward returns the logits{fix}"
    )


class ReentrantCheckpointError(ValueError):
    """A gradient curvlab's pass needs passes through reentrant activation checkpointing, which
    ``torch.autograd.grad`` cannot run (:func:`check_no_reentrant_checkpoint`)."""


_REENTRANT_FIX = (
    "Checkpoint with use_reentrant=False for the call (gradient_checkpointing_kwargs="
    "{'use_reentrant': False}), turn checkpointing off for it "
    "(model.gradient_checkpointing_disable()), or freeze the parameters the call is not "
    "about (requires_grad_(False))"
)


def check_no_reentrant_checkpoint(
    model: Any, output: Tensor, runs: CheckpointRuns | None = None
) -> None:
    """Refuse an ``output`` whose trainable parameters ran inside
    ``torch.utils.checkpoint(..., use_reentrant=True)`` (HF's ``gradient_checkpointing_enable``
    with that option), before any backward pass; arm a clear error for those whose gradient
    passes through such a checkpoint.

    Every pass of curvlab differentiates with ``torch.autograd.grad``, which cannot run the
    reentrant form's backward (torch raises where a gradient must pass through it), and prunes
    it where it reaches none of the parameters asked for: the block's own parameters are not in
    the graph at all (the block ran under ``no_grad``), so a pass about them got no gradient and
    reported 0 (found in review s19: an exact Hessian trace 0.0 for 0.3661, gradient statistics
    and the noise of ``NoisyOptimizer.step(inputs=, targets=)`` 0 on a GPT-2 whose MLPs alone
    are trainable). A parameter the block uses counts also where the model uses it again outside
    the block (a tied head: its inside contribution was dropped, found in review s20), and so
    does a trainable tensor the checkpointed function holds directly (a closure's or a
    ``functools.partial``'s parameter, or a tensor computed from trainable layers; review s20).
    Every trainable parameter counts, whatever the call's
    ``params=`` (not known here): freeze those the call is not about. Which ones the block
    holds is told from the modules seen to run inside it during the forward pass (``runs``,
    :func:`~curvlab._graph.checkpoint_runs`); where a checkpointed function holds the whole
    model, a trainable parameter absent from the graph whose module was not seen to run outside
    counts too (read inside directly, ``self.ws[0]``, or unused: the message says so and to
    freeze it; found in review s20). One walk of the output's
    autograd graph (:func:`~curvlab._graph.reentrant_checkpoint_params`), no tensor touched,
    none for an output without a graph (``no_grad``) or of a ``torch.func`` transform (under
    which torch refuses the reentrant form itself).

    The trainable parameters of the layers before a checkpointed block whose own parameters are
    frozen get their gradient through its backward node: a pass about them raised torch's raw
    "incompatible with .grad()" error (``trace``, ``gradient_stats``, ``diag_fisher``, ``kfac``,
    ``eigenvalues``; found in review s19), one about the later layers alone (``params=``) is
    computed. Which of the two a pass is is not known here: a pre-hook on each checkpoint's node
    raises :class:`ReentrantCheckpointError` naming them where ``torch.autograd.grad`` is about
    to run the node, in place of torch's error (at the call's first backward pass, before any
    result); ``loss.backward()`` runs it as before.

    Raises:
        ValueError: naming the hidden parameters and ``use_reentrant=False``.
    """
    if _functorch_wrapped(output) or output.grad_fn is None:
        return
    found = reentrant_checkpoint_params(output, model, runs)
    hidden, behind, nodes = found.hidden, found.behind, found.nodes
    if behind:
        more = f" and {len(behind) - 4} more" if len(behind) > 4 else ""
        message = (
            f"the trainable parameters {behind[:4]}{more} get their gradient through reentrant "
            "activation checkpointing (torch.utils.checkpoint(..., use_reentrant=True), or HF's "
            "gradient_checkpointing_enable with use_reentrant=True) of a later block: its "
            "backward runs only in loss.backward(), and torch.autograd.grad, which curvlab's "
            "passes take, cannot pass through it (torch raises 'When use_reentrant=True, "
            f"torch.utils.checkpoint is incompatible with .grad()'). {_REENTRANT_FIX}, e.g. "
            "leave them out of params="
        )
        for node in nodes:
            node.register_prehook(_refuse_in_grad(message))
    if not hidden:
        return
    more = f" and {len(hidden) - 4} more" if len(hidden) > 4 else ""
    raise ValueError(
        f"the trainable parameters {hidden[:4]}{more} run inside reentrant activation "
        "checkpointing (torch.utils.checkpoint(..., use_reentrant=True), or HF's "
        "gradient_checkpointing_enable with use_reentrant=True), whose forward runs without "
        "autograd: only loss.backward() recomputes the block, torch.autograd.grad, which "
        "curvlab's passes take, gets no gradient for them from the block (every number about "
        "them would be 0, or miss the block's part where the model uses them outside it too, "
        f"as a tied head). {_REENTRANT_FIX}{_unseen_note(found.unseen)}"
    )


def _unseen_note(unseen: list[str]) -> str:
    """The note for the hidden parameters counted only for being absent from the graph (a
    checkpointed function holding the whole model: their use inside cannot be seen)."""
    if not unseen:
        return ""
    more = f" and {len(unseen) - 4} more" if len(unseen) > 4 else ""
    return (
        f". Of these, {unseen[:4]}{more} are not in the output's graph, and a checkpointed "
        "function holds the whole model: it may read them directly (self.ws[0], "
        "F.linear(h, self.proj.weight)), which cannot be told from outside, or they may simply "
        "be unused (or run only under no_grad); if so, freeze them (requires_grad_(False))"
    )


def _refuse_in_grad(message: str) -> Any:
    """A pre-hook for a reentrant checkpoint's backward node: raise
    :class:`ReentrantCheckpointError` with ``message`` where torch would raise its own (the node
    runs in ``torch.autograd.grad`` or ``backward(inputs=...)``), nothing in ``loss.backward()``."""

    def prehook(grad_outputs: Any) -> None:
        if not torch.autograd._is_checkpoint_valid():
            raise ReentrantCheckpointError(message)

    return prehook


def _functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a tensor of a ``torch.func`` transform (its graph is not the model's)."""
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor
    except ImportError:  # pragma: no cover - torch without functorch
        return False
    return bool(is_functorch_wrapped_tensor(t))


def part_failed(whole: Inputs, part: Inputs, error: BaseException) -> ValueError:
    """The error for a model that ran on a batch but fails on some of its examples alone.

    The usual cause is a "batch" without a batch axis: one example (a ``DataLoader`` with
    ``batch_size=None`` over single samples yields an autoencoder's ``(x_i, x_i)`` of shape
    ``(D,)``), whose first axis curvlab reads as ``D`` examples; the model runs on it (a
    ``Linear`` takes an unbatched vector) but not on ``D' < D`` of its "examples". Found in
    review: the per-example quantities raised torch's raw ``mat1 and mat2 shapes cannot be
    multiplied``. The message calls that cause the likely one only where the model's error is
    about shapes or sizes (:func:`_about_shapes`); another error (found in review s20: torch's
    refusal of a tensor hook under ``no_grad``, blamed on a missing batch axis) is named as the
    possible cause, the batch axis as one of two others.

    Args:
        whole: the batch's inputs, on which the model ran.
        part: some of its examples, on which the model raised ``error``.
        error: the model's exception (chained by the caller: ``raise ... from error``).
    """
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    failed = (
        f"the model ran on the batch (inputs {_shapes(whole)}, read as {num_examples(whole)} "
        f"examples along the first axis) but failed on {num_examples(part)} of its examples "
        f"alone (inputs {_shapes(part)}: {type(error).__name__}: {reason})"
    )
    whole_batch = (
        "the model's forward needs the whole batch (a fixed batch size, or a squeeze() that "
        "drops the axis of a single example), which per-example quantities cannot split: make "
        "it run on any number of examples"
    )
    if not _about_shapes(error, reason):  # evidence of another cause: not blamed on the batch
        return ValueError(
            f"{failed}. The error is not about shapes or sizes, so it may have another cause "
            "than the batch (see the model's error, chained above). If the batch has no batch "
            f"axis ({_NO_BATCH_AXIS}), curvlab reads the first axis as the examples: "
            f"{_GIVE_BATCH_AXIS[0].lower()}{_GIVE_BATCH_AXIS[1:]}. If {whole_batch}"
        )
    return ValueError(
        f"{failed}. Most likely the batch has no batch axis: {_NO_BATCH_AXIS}, and curvlab reads "
        f"the first axis as the examples. {_GIVE_BATCH_AXIS}. Otherwise {whole_batch}"
    )


def _about_shapes(error: BaseException, reason: str) -> bool:
    """Whether the model's error on some examples is about shapes or sizes, as a batch without
    a batch axis makes it (``mat1 and mat2 shapes cannot be multiplied``, ``The size of tensor a
    (5) must match ...``, ``index 3 is out of bounds for dimension 0 with size 2``); an error
    of another kind (torch's ``cannot register a hook on a tensor that doesn't require
    gradient``, found in review s20) is no evidence for it."""
    words = ("shape", "size", "dim", "batch", "index", "bound", "mat1", "numel")
    return isinstance(error, IndexError) or any(w in reason.lower() for w in words)


_NO_BATCH_AXIS = (
    "it is a single example (a DataLoader with batch_size=None over single samples, or one "
    "example's tensors passed without a leading axis)"
)
_GIVE_BATCH_AXIS = (
    "Give every batch a leading batch axis: DataLoader(dataset, batch_size=B), or "
    "(x.unsqueeze(0), y.unsqueeze(0)) for one example"
)


def raise_if_part_failed(model: Any, whole: Inputs, part: Inputs, error: BaseException) -> None:
    """Raise :func:`part_failed` when ``model`` failed on ``part`` but runs on ``whole``.

    For a caller whose first call of the model was on some examples of a batch (a probe) and
    failed: one forward pass on the whole batch, without gradient and with the global RNG put
    back (the caller keeps the buffers), tells a batch without a batch axis from a model that
    fails anyway; nothing is raised then (the caller re-raises ``error``). Only on that error
    path: it costs nothing otherwise.

    A resource error (:func:`resource_error`: out of memory, an interrupt) returns at once, for
    the caller to re-raise unchanged: it says nothing about the batch's axes, and a whole-batch
    forward right after an out-of-memory error would only fail again (until review s26 a
    transient ``torch.OutOfMemoryError`` came back as this ``ValueError``, which a loop catching
    the OOM to shrink its batch did not catch).

    Raises:
        ValueError: :func:`part_failed`, chained from ``error``.
    """
    if _raised_by_curvlab(error) or resource_error(error):
        return
    p = _first_parameter(model) if isinstance(model, nn.Module) else None
    device = p.device if p is not None else torch.device("cpu")
    try:
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        ):
            call_model(model, whole)
    except Exception:  # noqa: BLE001 - the model fails on the whole batch too: its own error
        return
    raise part_failed(whole, part, error) from error


def resource_error(error: BaseException) -> bool:
    """Whether ``error`` is about resources, not the model or its data: ``torch.OutOfMemoryError``,
    ``MemoryError``, a ``RuntimeError`` whose first line says "out of memory" (older torch and
    other backends raise it so), or no ``Exception`` at all (``KeyboardInterrupt``,
    ``SystemExit``). Such an error passes through the checks that name a culprit unchanged."""
    if not isinstance(error, Exception) or isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    first = (str(error).strip().splitlines() or [""])[0].lower()
    return isinstance(error, RuntimeError) and "out of memory" in first


def _raised_by_curvlab(error: BaseException) -> bool:
    """Whether ``error`` is one of curvlab's own (a hand-over, a NonFiniteError), not the model's."""
    return type(error).__module__.split(".")[0] == "curvlab"


def _shapes(inputs: Inputs) -> str:
    """``"of shape (3,)"``, or ``"{'input_ids': (7,), ...}"`` for a mapping, for a message."""
    if isinstance(inputs, Tensor):
        return f"of shape {tuple(inputs.shape)}"
    return str({k: tuple(v.shape) for k, v in list(inputs.items())[:4]})


def _check_batch(batch: Any, index: int, finite: bool = True) -> Batch:
    if isinstance(batch, Mapping):
        raise TypeError(
            f"batch {index} of data is a {type(batch).__name__} with keys {list(batch)[:6]}, "
            "expected an (inputs, targets) pair; split each batch, e.g. "
            "(({k: v for k, v in b.items() if k != 'labels'}), b['labels']) for a HuggingFace "
            "batch (mind that causal-LM labels must then be shifted by one position)"
        )
    if isinstance(batch, str):
        raise TypeError(
            f"batch {index} of data is the str {batch[:40]!r}: data was iterated as a "
            "dict-like object, whose iteration yields its keys. Pass one batch as a tuple "
            "(inputs, targets), where inputs may be a dict of tensors, or a list of such tuples"
        )
    if isinstance(batch, (tuple, list)) and len(batch) != 2:
        raise TypeError(
            f"batch {index} of data is {_described(batch)}, expected an (inputs, targets) pair "
            "of two; "
            + (
                "curvlab takes no third element (per-example weights, masks or ids are not "
                "supported): yield (inputs, targets) only, e.g. (b[0], b[1])"
                if len(batch) > 2
                else "pass the targets as its second element: (inputs, targets)"
            )
        )
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            f"batch {index} of data is {_described(batch)}, expected an (inputs, targets) pair; "
            "pass one batch as a tuple (X, y) or an iterable of such tuples (e.g. a DataLoader)"
        )
    inputs, targets = batch
    if isinstance(inputs, Mapping) and isinstance(targets, Tensor):
        odd = [k for k, v in inputs.items() if not isinstance(v, Tensor)]
        if odd:
            raise TypeError(
                f"batch {index} of data holds inputs whose entries {odd[:5]} are not Tensors "
                f"({type(inputs[odd[0]]).__name__}); every value of a dict of inputs must be a "
                "Tensor with the examples in its first dimension (drop or convert the others)"
            )
    if not _is_inputs(inputs) or not isinstance(targets, Tensor):
        raise TypeError(_not_tensors(inputs, targets, index))
    check_batch_shapes(inputs, targets, index)
    if finite:
        check_batch_finite(inputs, targets, index)
    inputs, targets = as_data(_usable(inputs), _usable(targets), "a batch of the data")
    assert targets is not None
    return inputs, targets


def check_batch_shapes(inputs: Inputs, targets: Tensor, index: int = 0) -> None:
    """Refuse a batch whose inputs are 0-dim or empty, differ in number between their tensors,
    or whose targets are 0-dim or as many as the inputs are not (every batch of the data is
    checked so by :func:`iter_batches`; a noise sampler's separate pass by
    :func:`curvlab.noise._base.check_batch`). Reads shapes only.

    Raises:
        ValueError: naming batch ``index``, the shapes and the fix.
    """
    tensors = {"inputs": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    for key, t in tensors.items():
        what = "the inputs" if isinstance(inputs, Tensor) else f"inputs[{key!r}]"
        if t.ndim == 0:
            raise ValueError(
                f"{what} of batch {index} of data {'are' if what == 'the inputs' else 'is'} a 0-dim "
                f"tensor (a scalar{_value(t)}): every tensor of the inputs must hold the "
                "examples in its first dimension. Pass one value per example "
                "(t.expand(batch_size)), or give the model the constant another way (a "
                "default argument of its forward, or an attribute)"
            )
        if t.shape[0] == 0:
            raise ValueError(
                f"batch {index} of data has no examples (inputs of shape {tuple(t.shape)}); "
                "drop empty batches before passing the data"
            )
    n = num_examples(inputs)
    if any(t.shape[0] != n for t in tensors.values()):
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        raise ValueError(
            f"batch {index} of data holds inputs with different batch sizes {shapes}; every "
            "tensor of the inputs must have the examples in its first dimension"
        )
    if targets.ndim == 0:  # one example's label: a "batch" without a batch axis (found in review)
        raise ValueError(
            f"batch {index} of data has targets of shape () (a 0-dim tensor) for inputs "
            f"{_shapes(inputs)}; the leading dimensions must match. A 0-dim target is the "
            f"label of a single example: most likely the batch has no batch axis ("
            f"{_NO_BATCH_AXIS}). {_GIVE_BATCH_AXIS}"
        )
    if targets.shape[0] != n:
        flat = targets.shape[0] > n and targets.shape[0] % n == 0
        raise ValueError(
            f"batch {index} of data has {n} inputs but targets of shape "
            f"{tuple(targets.shape)}; the leading dimensions must match"
            + (
                f". Targets {targets.shape[0] // n} times as many as the inputs are most "
                "likely a sequence flattened to (B*T,) for logits flattened to (B*T, C): "
                "return the logits as (B, T, C) (or (B, C, T)) and pass targets of shape "
                "(B, T), so that each example's tokens stay together"
                if flat
                else ""
            )
        )


def _value(t: Tensor) -> str:
    """``", 2.0"``: a 0-dim tensor's value for a message (nothing for a meta tensor)."""
    return "" if t.device.type == "meta" else f", {t.item()!r}"


def _is_array(x: Any) -> bool:
    """Whether ``x`` is a NumPy array (or another array type that is not a torch Tensor)."""
    return not isinstance(x, Tensor) and hasattr(x, "__array__") and hasattr(x, "shape")


def _type_name(x: Any) -> str:
    kind = type(x)
    return f"numpy.{kind.__name__}" if kind.__module__ == "numpy" else kind.__name__


def _described(x: Any) -> str:
    """``x`` in a few words: "a Tensor of shape (5, 3)", "a tuple of 3 (Tensor, Tensor, list)"."""
    if isinstance(x, Tensor):
        return f"a Tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        parts = ", ".join(_type_name(v) for v in list(x)[:5]) + (", ..." if len(x) > 5 else "")
        return f"a {type(x).__name__} of {len(x)} ({parts})"
    return f"a {_type_name(x)}"


def _not_tensors(inputs: Any, targets: Any, index: int) -> str:
    """The message for a pair whose inputs or targets are not (dicts of) Tensors."""
    where = f"of batch {index} of data"
    arrays = [what for what, x in (("inputs", inputs), ("targets", targets)) if _is_array(x)]
    if arrays:
        kind = _type_name(inputs if _is_array(inputs) else targets)
        return (
            f"the {' and the '.join(arrays)} {where} are {kind} arrays: curvlab takes torch "
            "Tensors; convert them with torch.from_numpy(x) (or torch.as_tensor(x)), or load "
            "them with a DataLoader, which converts NumPy arrays itself"
        )
    if _is_inputs(inputs) and isinstance(targets, (list, tuple, int, float)):
        return (
            f"the targets {where} are a {type(targets).__name__}, not a Tensor; convert them: "
            "torch.tensor(y) (class indices) or torch.tensor(y, dtype=...) (float targets)"
        )
    if _is_inputs(inputs):
        return (
            f"the targets {where} are a {_type_name(targets)}; they must be a Tensor with the "
            "examples in its first dimension"
        )
    return (
        f"batch {index} of data holds ({_type_name(inputs)}, {_type_name(targets)}); "
        "inputs must be a Tensor or a dict of Tensors, targets a Tensor"
    )


def _usable(x: Any) -> Any:
    """Tensors made under ``torch.inference_mode()`` as ordinary tensors (autograd cannot save
    inference tensors for its backward pass, which curvature needs); others as they are."""
    if isinstance(x, Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, Mapping) and any(v.is_inference() for v in x.values()):
        return {k: v.clone() if v.is_inference() else v for k, v in x.items()}
    return x


def as_data(inputs: Inputs, targets: Tensor | None, where: str) -> tuple[Inputs, Tensor | None]:
    """``(inputs, targets)`` with every tensor that requires grad detached (a view: nothing
    copied, the caller's tensors untouched), with a ``RuntimeWarning`` naming those that carry
    an autograd graph or are trainable parameters. Such an input is handed on as a fresh leaf
    that requires grad (``x.detach().requires_grad_()``): no graph of it reaches the parameters
    or the caller's tensor, and a model can still differentiate in it.

    A batch is data: curvlab measures ``L(θ) = loss_fn(model(X; θ), y)`` with ``X`` and ``y``
    held fixed (docs/conventions.md, "Data"). Targets or inputs computed with gradients on from
    the model (self-distillation targets ``softmax(model(X_aug))``, HuggingFace
    ``inputs_embeds = model.get_input_embeddings()(ids)``) carry a graph back into its
    parameters; the Hessian operator and ``diag_hessian`` differentiated through it while every
    other quantity took the batch as data (found in review s23: an exact Hessian trace -0.8293
    for 1.5330, the GGN and Fishers of another function than the Hessian). A batch tensor that
    is itself one of the model's parameters (``model(model.prompt)``, a learned input) is a leaf
    without a graph, and the Hessian operator differentiated through it too (found in review
    s24: ``X = model[0].weight`` gave an exact Hessian trace 1.6432 for 3.0568, targets
    ``= model.weight`` 4.9874 for 2.7048). The warning says that the batch is not
    differentiated, which the user's own ``loss.backward()`` on such a batch does; it is shown
    once per line of the caller's (:func:`curvlab._warn.warn_once`). A leaf that requires grad
    and is no ``nn.Parameter`` (``X.requires_grad_()`` for input gradients, an adversarial
    perturbation, the inputs of a physics-informed network) is no parameter of the model, and
    it is taken without a word. An input stays a tensor that requires grad, for a forward that
    differentiates in its inputs (``torch.autograd.grad(u, x, create_graph=True)``: a
    physics-informed network, forces ``-dE/dx``; found in review s25, such a model raised
    torch's "One of the differentiated Tensors does not require grad" once the input was
    detached; its per-example quantities are refused by name,
    :mod:`curvlab._differentiating_forward`); the parameters' derivatives do not follow it into
    the caller's tensor or into a parameter passed as the batch, so no quantity changes.
    Targets are detached (a model does not read them). Only ``requires_grad``, ``grad_fn`` and
    the tensor's class are read: ordinary data passes as it is, and no graph is walked.

    Args:
        inputs: the batch's inputs (a Tensor or a mapping of Tensors).
        targets: its targets (``None``: none given, as a noise sampler's ``"mc"`` kind takes).
        where: the batch, for the warning (``"a batch of the data"``, ``"the step's batch"``:
            no batch number, so that the warning is shown once per call site, not once per
            batch).
    """
    tensors = {"inputs": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    held = [k for k, v in tensors.items() if isinstance(v, Tensor) and v.requires_grad]
    hold_targets = isinstance(targets, Tensor) and targets.requires_grad
    if not held and not hold_targets:
        return inputs, targets
    batch = [
        ("the inputs" if isinstance(inputs, Tensor) else f"inputs[{k!r}]", tensors[k]) for k in held
    ] + ([("the targets", targets)] if hold_targets else [])
    graph = [what for what, t in batch if t.grad_fn is not None]
    params = [what for what, t in batch if isinstance(t, nn.Parameter)]
    if graph or params:
        warn_once(_held_message(graph, params, where))
    if isinstance(inputs, Tensor):
        inputs = _fresh_leaf(inputs) if held else inputs
    else:
        inputs = {k: _fresh_leaf(v) if k in held else v for k, v in inputs.items()}
    return inputs, (targets.detach() if hold_targets else targets)


def _fresh_leaf(x: Tensor) -> Tensor:
    """``x`` as a new leaf that requires grad (a view: nothing copied): the model may
    differentiate in it, and no derivative reaches ``x``'s graph, ``x`` itself or a parameter
    that ``x`` is."""
    return x.detach().requires_grad_(True)


def _held_message(graph: list[str], params: list[str], where: str) -> str:
    """The warning of :func:`as_data`: the batch's tensors that carry an autograd graph
    (``graph``) and those that are ``nn.Parameter``s (``params``), named as ``"the inputs"``,
    ``"inputs['x']"``, ``"the targets"``. One text per kind of batch (no batch number), so that
    it is shown once per call site, not once per batch of a DataLoader (review s23: 40 warnings
    for 40 batches)."""

    def clause(what: list[str], of: str, singular: str, plural: str) -> str:
        # "the inputs carry", "inputs['x'] carries": the noun's number, not the tensors'
        one = len(what) == 1 and what[0].startswith("inputs[")
        return f"{' and '.join(what)}{of} {singular if one else plural}"

    parts, of = [], f" of {where}"
    if graph:
        graph_is = " an autograd graph (computed with gradients on)"
        parts.append(clause(graph, of, "carries", "carry") + graph_is)
        of = ""
    if params:
        number = "a trainable parameter (an nn.Parameter)"
        if len(params) > 1:
            number = "trainable parameters (nn.Parameter)"
        parts.append(clause(params, of, "is", "are") + f" {number}")
    one = len(graph) + len(params) == 1 and (graph + params)[0].startswith("inputs[")
    why = []
    if graph:
        why.append(
            "Where that graph leads into the measured model's parameters (self-distillation "
            "targets, inputs_embeds from its own embedding) a loss.backward() on the batch would "
            "follow it and differ; where it does not (a separate teacher's targets) nothing "
            "changes."
        )
    if params:
        why.append(
            f"Where {'that parameter is' if len(params) == 1 else 'those parameters are'} the "
            "measured model's own (a learned input, model(model.prompt)) a loss.backward() on "
            "the batch would differentiate through the batch as well and differ; another "
            "module's parameter changes nothing."
        )
    hint = (
        ", or give the model what the inputs were computed from (input_ids instead of "
        "inputs_embeds)"
        if any(w != "the targets" for w in graph)
        else ""
    )
    return (
        f"curvlab: {' and '.join(parts)}; curvlab takes a batch as data and measures "
        f"loss_fn(model(X), y) with {'it' if one else 'them'} held fixed (detached). "
        f"{' '.join(why)} Pass .detach() to say so and silence this{hint}"
    )


def iter_batches(data: Any, finite: bool = True) -> Iterator[Batch]:
    """Yield validated ``(inputs, targets)`` batches from one batch or an iterable of batches.

    Each batch is checked as it is read: its structure, its batch sizes and that its floating-point
    inputs and targets are finite (one host synchronisation per batch when they are on a GPU;
    none for the usual CPU batches of a DataLoader, which are checked before they move). A
    tensor of the batch that carries an autograd graph is yielded detached, with a
    ``RuntimeWarning`` (:func:`as_data`): the batch is data. Within ``analyze`` every reading
    of ``data`` is checked against the first (:func:`curvlab._same_readings.same_readings`).

    Raises:
        ValueError: if ``data`` holds no batch at all, or a batch has no examples; for a
            wrapper of a ``persistent_workers=True`` loader in the middle of its epoch
            (:func:`~curvlab._persistent_loader.readable`); within ``analyze``, for a reading
            that gives other batches than the first (:class:`~curvlab._same_readings.
            ReadingsDifferError`).
        TypeError: if a batch is not a pair of Tensors; before anything is read, for an
            endless ``itertools.cycle``/``count``/``repeat`` or a Lightning ``CombinedLoader``
            (:func:`~curvlab._unreadable_data.refuse_unreadable`).
        curvlab.NonFiniteError: naming the batch whose inputs or targets hold NaN or inf
            (``finite=False``: not checked here; the caller checks its result instead).
    """
    if is_single_batch(data):
        yield _check_batch(data, 0, finite)
        return
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Mapping)
        and isinstance(data[1], Tensor)
    ):  # meant as one batch whose dict of inputs holds something other than Tensors
        yield _check_batch(data, 0, finite)
        return
    if (
        isinstance(data, (tuple, list))
        and data
        and (isinstance(data[0], Tensor) or _is_array(data[0]))
    ):  # meant as one batch (a list of batches never starts with a Tensor): (X, y_list),
        # (X_np, y_np), (X, y, w) were "batch 0 of data is a Tensor" before (found in review)
        if len(data) != 2:
            raise TypeError(
                f"data is {_described(data)}, expected one (inputs, targets) pair or an iterable "
                "of such pairs; "
                + (
                    "curvlab takes no third element (per-example weights, masks or ids are not "
                    "supported): pass (inputs, targets) only, e.g. (X, y)"
                    if len(data) > 2
                    else "pass the targets as the second element: (X, y)"
                )
            )
        yield _check_batch(data, 0, finite)
        return
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and isinstance(data[0], (tuple, list))
        and data[0]
        and all(isinstance(x, Tensor) for x in data[0])
    ):  # ((a, b), y): several positional inputs, read as two batches before (found in review)
        raise TypeError(
            f"the inputs of batch (inputs, targets) are a {type(data[0]).__name__} of "
            f"{len(data[0])} tensors; inputs must be one Tensor or a dict of tensors: pass "
            "several inputs as a dict keyed by the forward's argument names, "
            "({'a': a, 'b': b}, y)"
        )
    if isinstance(data, Mapping):
        raise TypeError(
            f"data is a {type(data).__name__} with keys {list(data)[:5]}; pass one batch as a "
            "tuple (inputs, targets), where inputs may be a dict of tensors, e.g. "
            "({'input_ids': ids, 'attention_mask': mask}, labels), or an iterable of such tuples"
        )
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data is a {type(data).__name__}; pass one batch as a tuple (inputs, targets) "
            "or an iterable of such tuples (e.g. a DataLoader)"
        )
    refuse_unreadable(data)  # endless itertools, a Lightning CombinedLoader: before reading
    check = reading_check(data)  # within analyze: every reading against the first
    count = 0
    for index, batch in enumerate(_rng_kept(data)):
        count += 1
        batch = _check_batch(batch, index, finite)
        if check is not None:
            check.batch(index, batch)
        yield batch
    if count == 0:
        raise EmptyDataError(
            "data is empty: it yielded no batch; pass at least one (inputs, targets)"
        )
    if check is not None:
        check.end(count)


class EmptyDataError(ValueError):
    """``data`` yielded no batch (a ``ValueError``; its own class for a second reading that
    finds a one-shot loader exhausted)."""


def _rng_kept(data: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``data`` leaving the caller's random states, and those of the generators ``data``
    holds, as they were.

    A shuffling ``DataLoader`` without a generator draws its order (and its workers' seeds) from
    torch's global RNG, one with ``generator=`` (or a sampler with its own) from that generator; a
    generator of random batches or a dataset's augmentation draws its values from torch's,
    numpy's or Python's global RNG, or from a generator the dataset holds (the states of
    :func:`~curvlab._reading_rngs.reading_rngs`). Those draws run on a stream of their own,
    started from the caller's states and carried from one batch to the next (batch 2 continues
    where batch 1 stopped, as in the user's loop), while the caller's states are put back around
    each: every reading of the data sees the same draws (a call's passes over it agree) and the
    training loop draws what it would have drawn (a loader's ``generator=`` was advanced by
    every reading before, found in review: the next epoch's order changed, and ``analyze`` of
    identical checkpoints reported different losses; numpy's and Python's RNGs until review
    s25: a ``RandomChoice`` augmentation, a call between epochs changed training by 0.029). A
    ``persistent_workers=True`` loader is read through a non-persistent copy, which leaves the
    caller's epoch and workers alone (:func:`~curvlab._persistent_loader.readable`). A
    sampler's plain attributes (an ``epoch`` it moves on after a pass) are carried as the random
    states are (:func:`~curvlab._sampler_state.sampler_states`; review s26). Every state
    is carried over the whole reading (until review s25 numpy's and Python's were dropped after
    a first batch that drew nothing from them; :class:`~curvlab._reading_rngs.Carried`). A list
    or tuple of batches is read as it is: its batches exist, and reading them runs no code that
    could draw.

    Raises:
        ValueError: for a wrapper of a persistent loader in the middle of its epoch, before
            anything is read.
    """
    if isinstance(data, (list, tuple)):  # its batches exist: reading them runs no code, no draw
        yield from data
        return
    source = readable(data)
    # a sampler's own epoch too (accelerate's SeedableRandomSampler: review s26)
    carried = [Carried(k) for k in reading_rngs(data) + sampler_states(data)]

    def advance(step: Any) -> Any:
        # the global RNGs are process-wide: switched under the lock of curvlab's passes, so that
        # putting the caller's state back does not reset another thread's curvlab pass midway
        # (its Dropout masks: review s25)
        with process_state_held():
            for c in carried:
                c.enter()
            try:
                return step()
            finally:
                for c in reversed(carried):  # two handles on one state never cross (s26)
                    c.leave()

    held = [] if source is not data else held_persistent(data)  # read through, between epochs
    it = advance(lambda: iter(source))
    while True:
        try:
            batch = advance(lambda: next(it))
        except StopIteration:
            return
        finally:
            mark_left(held)
        yield batch


def batch_tensors(batch: Batch) -> list[Tensor]:
    """The tensors of a batch: its inputs (each of a dict's) and its targets."""
    inputs, targets = batch
    parts = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    return [t for t in (*parts, targets) if isinstance(t, Tensor)]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move a batch to ``device`` without blocking the host (no-op when already there)."""
    inputs, targets = batch
    return inputs_to_device(inputs, device), targets.to(device, non_blocking=True)


def inputs_to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """The inputs of a batch (a tensor or a dict of them) on ``device``, without blocking."""
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def check_chunk_size(chunk_size: object) -> None:
    """Refuse a ``chunk_size=`` that is not a positive int or ``None`` (numpy integers are
    ints; a ``bool`` is not: ``chunk_size=True`` ran one example at a time, found in review).

    Raises:
        ValueError: naming the value.
    """
    if chunk_size is not None and not is_count(chunk_size):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_has_examples(inputs: Any, what: str = "the batch") -> None:
    """Refuse a batch whose inputs (a Tensor or a mapping of Tensors) hold no examples, with
    the message of :func:`iter_batches`; anything else is left to the caller's own checks.

    Raises:
        ValueError: if the leading dimension of an input tensor is 0.
    """
    tensors = [inputs] if isinstance(inputs, Tensor) else []
    if isinstance(inputs, Mapping):
        tensors = [v for v in inputs.values() if isinstance(v, Tensor)]
    for t in tensors:
        if t.ndim > 0 and t.shape[0] == 0:
            raise ValueError(
                f"{what} has no examples (inputs of shape {tuple(t.shape)}); drop empty "
                "batches before passing the data"
            )


def iter_chunks(
    data: Any, chunk_size: int | None, device: torch.device | None = None, finite: bool = True
) -> Chunks:
    """Yield the batches of ``data`` split into chunks of at most ``chunk_size`` examples.

    ``chunk_size=None`` keeps the batches as they are. Chunks are moved to ``device`` if given.
    Splitting is exact for every curvlab quantity, since all of them are sums over examples.
    ``finite=False`` skips the finiteness check of the batches (see :func:`iter_batches`).
    The iterator's :attr:`Chunks.pair` holds the first two examples of the first batch read
    that has two or more.
    """
    check_chunk_size(chunk_size)
    return Chunks(data, chunk_size, device, finite)


class Chunks(Iterator[Batch]):
    """The iterator of :func:`iter_chunks`.

    Attributes:
        pair: the inputs of the first two examples of the first batch read so far that has at
            least two (on the chunks' device), else ``None``. The check that the model keeps
            the examples apart (:func:`curvlab._layout.examples_mixed`) needs two examples
            computed together; with ``chunk_size=1`` no chunk has two, but the batch they come
            from does: the model's answer on the batch as given must not depend on how curvlab
            chunks it (found in review: ``chunk_size=1`` let a coupled model through).
    """

    def __init__(
        self, data: Any, chunk_size: int | None, device: torch.device | None, finite: bool
    ) -> None:
        self._pair: Inputs | None = None  # a view of the batch, moved to the device when read
        self._device = device
        self._it = self._chunks(data, chunk_size, device, finite)

    def __next__(self) -> Batch:
        return next(self._it)

    @property
    def pair(self) -> Inputs | None:
        if self._pair is not None and self._device is not None:
            self._pair, self._device = inputs_to_device(self._pair, self._device), None
        return self._pair

    def _chunks(
        self, data: Any, chunk_size: int | None, device: torch.device | None, finite: bool
    ) -> Iterator[Batch]:
        for inputs, targets in iter_batches(data, finite):
            n = num_examples(inputs)
            if self._pair is None and n > 1:
                self._pair = inputs if n == 2 else slice_inputs(inputs, 0, 2)
            step = n if chunk_size is None else int(chunk_size)
            for start in range(0, n, step):
                if step >= n:
                    chunk = inputs, targets
                else:
                    chunk = slice_inputs(inputs, start, start + step), targets[start : start + step]
                yield chunk if device is None else to_device(chunk, device)


def same_batch(a: Batch, b: Batch) -> bool:
    """Whether two batches hold the same tensors (shapes, dtypes and values; dict keys alike)."""

    def tensors(batch: Batch) -> list[tuple[str, Tensor]]:
        inputs, targets = batch
        named = sorted(inputs.items()) if isinstance(inputs, Mapping) else [("", inputs)]
        return [*named, ("targets", targets)]

    ta, tb = tensors(a), tensors(b)
    return [k for k, _ in ta] == [k for k, _ in tb] and all(
        x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y.to(x.device)))
        for (_, x), (_, y) in zip(ta, tb)
    )


def read_again(
    data: Any,
    chunk_size: int | None,
    device: torch.device | None,
    first: Batch,
    why: str,
    instead: str,
    finite: bool = True,
) -> tuple[Chunks, Batch]:
    """Read ``data`` again from its start for a computation that must start over, checking
    that it gives the same first chunk ``first`` as the reading before.

    A loader whose dataset is a one-shot iterator is no ``Iterator`` itself: read again it
    gave only the batches not yet read, and the result was theirs alone (found in review: the
    Fisher of batch 3 of 3, without a word).

    Args:
        why: why the computation starts over from the first batch (for the message).
        instead: the way out besides re-readable data (for the message).

    Returns:
        The chunks' iterator, past its first chunk, and that chunk.

    Raises:
        ValueError: if the data gives no batch or another first chunk.
    """
    chunks = iter_chunks(data, chunk_size, device, finite)
    try:
        again = next(chunks, None)
    except EmptyDataError:  # read out the first time
        again = None
    if again is None or not same_batch(again, first):
        gave = "no batch" if again is None else "another first batch"
        raise ValueError(
            f"data ({type(data).__name__}) gave {gave} when read again, {why}: pass data that "
            "reads the same batches every time (a list of batches, a DataLoader over a "
            "map-style dataset, no augmentation drawing from a generator curvlab cannot reach: "
            f"it keeps torch's, numpy's and Python's global RNGs and the loader's), or {instead}"
        )
    return chunks, again


def probe_inputs(first: Inputs, chunks: Any) -> Inputs:
    """The inputs on which to check that the model keeps the examples apart: the first chunk's
    ``first``, or, when it holds a single example, :attr:`Chunks.pair` (two examples of its
    batch) if there is one. ``chunks``: a :class:`Chunks` or anything with its ``pair``."""
    return chunks.pair if num_examples(first) < 2 and chunks.pair is not None else first
