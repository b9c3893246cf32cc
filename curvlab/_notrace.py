"""Leave no trace: put a model's gradients, modes, buffers and the global RNG back after a pass;
keep the user's hooks from changing what curvlab's passes compute (:func:`gradient_hooks_off`,
:func:`module_backward_hooks_off`, :func:`tensor_hooks_off`, :func:`first_forward_hooks`)."""

from __future__ import annotations

import functools
import inspect
import operator
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from types import FunctionType
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from curvlab._ambient import process_state_held, saved_tensors_hooks_off
from curvlab._compiled import eager
from curvlab._graph import graph_nodes
from curvlab._own_pass import own_pass
from curvlab._precision import own_forwards, without_autocast
from curvlab._reading_rngs import held_states
from curvlab._rng import global_rng_kept
from curvlab._scan import ModelScan, _foreign, _own_hook, check_materialized, scan_model
from curvlab._warn import user_stacklevel

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.overrides import _get_current_function_mode_stack

    from curvlab._graph import _GLOBAL_HOOK_WARNING

    class _MathAttentionMode(TorchFunctionMode):
        """``F.scaled_dot_product_attention`` on its math kernel whatever ``sdpa_kernel``
        context the model's own forward opens inside curvlab's block (review s24: a forward's
        ``with sdpa_kernel(SDPBackend.FLASH_ATTENTION):`` overrode the outer selection, and
        Hessian and GGN products raised ``NotImplementedError`` naming
        ``aten::_scaled_dot_product_flash_attention_for_cpu_backward``). The call is torch's own,
        with its arguments as given (``attn_mask``, ``is_causal``, ``dropout_p``, ``scale``,
        ``enable_gqa``), under ``sdpa_kernel(SDPBackend.MATH)`` where another kernel is enabled
        (the model's selection is put back after it). So is a torch function written in Python
        (``F.multi_head_attention_forward``, which ``nn.MultiheadAttention`` calls): the mode is
        off inside the functions it sees (torch pops it), and such a function calls the
        attention itself. A backward pass (``torch.autograd.grad``, ``torch.autograd.backward``,
        ``Tensor.backward``) runs the modules that a non-reentrant ``torch.utils.checkpoint``
        recomputes with the mode pushed again (:class:`_RecomputedUnderMath`; found in review
        s25: with the mode off there the model's own ``sdpa_kernel(FLASH_ATTENTION)`` took
        effect in the recomputation, whose tensors then differed from the forward's, and
        ``kfac``, ``diag_fisher(backend="func")`` and the GGN and Hessian traces raised torch's
        ``CheckpointError``). Every other function goes through untouched (checks of
        ``func``'s identity and type). A model that calls a fused kernel's aten op itself
        (``torch.ops.aten._scaled_dot_product_flash_attention``) is not seen."""

        def __torch_function__(
            self,
            func: Callable[..., Any],
            types: Any,
            args: tuple = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            if type(func) is FunctionType and func in _BACKWARD_PASSES:
                with _RecomputedUnderMath():
                    return func(*args, **(kwargs or {}))
            if (func is _SDPA or type(func) is FunctionType) and not _math_only():
                with sdpa_kernel(SDPBackend.MATH):
                    return func(*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    class _RecomputedUnderMath:
        """A backward pass passed on by :class:`_MathAttentionMode`, whose module calls (a
        non-reentrant checkpoint's recomputation: ``checkpoint(block, h)``, HF's
        ``checkpoint(layer.__call__, ...)``, a function that calls modules) run with the mode
        pushed: a global forward pre-hook pushes it where no enclosing call did, and a forward
        hook that runs also when the forward raises pops it (torch skips that hook where the
        forward raises a ``BaseException`` such as ``KeyboardInterrupt``: the pass's leftover
        calls are dropped when it ends). Only the module calls of this
        backward pass (a key in autograd's thread-local state, which its worker threads get)
        are affected, not another thread's. A checkpointed function that calls
        ``scaled_dot_product_attention`` itself inside an ``sdpa_kernel`` context of its own,
        with no module call around it, is out of reach: its recomputation takes the model's
        kernel (torch's ``CheckpointError``)."""

        def __enter__(self) -> None:
            self.own_key = _STASH is not None and not torch._C._is_key_in_tls(_KEY)
            if self.own_key:
                torch._C._stash_obj_in_tls(_KEY, True)
            # the calls recorded before this pass: those above are this pass's (review s25: a
            # KeyboardInterrupt inside a recomputed module skips the always-called hook, and its
            # stale entry kept the mode from being pushed in every later recomputation)
            self.depth = len(_CALLS.__dict__.setdefault("calls", []))
            self.quiet = _compiled_parts_eager()
            if self.quiet:  # torch warns at each compiled submodule's call under global hooks
                self.caught = warnings.catch_warnings()
                self.caught.__enter__()
                warnings.filterwarnings("ignore", message=_GLOBAL_HOOK_WARNING)
            self.handles = (
                nn.modules.module.register_module_forward_pre_hook(_push_math),
                nn.modules.module.register_module_forward_hook(_pop_math, always_call=True),
            )

        def __exit__(self, *exc: object) -> None:
            for handle in self.handles:
                handle.remove()
            calls = _CALLS.__dict__.setdefault("calls", [])
            while len(calls) > self.depth:  # left by a call that a BaseException ended
                mode = calls.pop()[1]
                # autograd's engine puts the function-mode stack back after a node raises, so
                # the mode is popped only where it is still the innermost
                stack = _get_current_function_mode_stack()
                if mode is not None and stack and stack[-1] is mode:
                    mode.__exit__(None, None, None)
            if self.quiet:
                self.caught.__exit__(None, None, None)
            if self.own_key:
                torch._C._remove_obj_from_tls(_KEY)

    def _compiled_parts_eager() -> bool:
        """Whether the model holds compiled parts (:func:`curvlab._compiled.eager` runs them
        with the ``force_eager`` stance): a compiled submodule called while global module hooks
        are registered warns that they fire an extra time (they only push and pop the mode), a
        warning silenced then (review s25: five at each product of a model with a compiled
        checkpointed block). ``warnings.catch_warnings`` shows warnings already shown once
        again, so it is not entered for other models."""
        eval_frame = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
        stance = getattr(getattr(eval_frame, "_stance", None), "stance", None)
        return stance == "force_eager"

    _KEY = "curvlab.math_attention_backward"
    _STASH = getattr(torch._C, "_stash_obj_in_tls", None)
    _CALLS = threading.local()  # per thread: (module, the mode its call pushed, or None)

    def _in_backward() -> bool:
        """Whether this module call runs inside a backward pass of :class:`_RecomputedUnderMath`
        (older torch: inside any backward pass)."""
        if _STASH is not None:
            return torch._C._is_key_in_tls(_KEY)
        return torch._C._current_graph_task_id() != -1  # pragma: no cover - older torch

    def _push_math(module: nn.Module, args: Any) -> None:
        """Push the mode for a module call of the backward pass where no enclosing call did."""
        if not _in_backward():
            return
        calls = _CALLS.__dict__.setdefault("calls", [])
        if any(mode is not None for _, mode in calls):
            calls.append((module, None))  # an enclosing call pushed the mode
            return
        mode = _MathAttentionMode()
        mode.__enter__()
        calls.append((module, mode))

    def _pop_math(module: nn.Module, args: Any, output: Any) -> None:
        """Pop what :func:`_push_math` pushed for this call (also where the forward raised)."""
        calls = _CALLS.__dict__.get("calls")
        if calls and calls[-1][0] is module:
            mode = calls.pop()[1]
            if mode is not None:
                mode.__exit__(None, None, None)

    _SDPA = torch.nn.functional.scaled_dot_product_attention
    _BACKWARD_PASSES = frozenset({torch.autograd.grad, torch.autograd.backward, Tensor.backward})
    _MATH_CODES: frozenset[Any] = frozenset({_MathAttentionMode.__torch_function__.__code__})
    _FUSED_ON = tuple(
        getattr(torch._C, f"_get_{name}_sdp_enabled")
        for name in ("flash", "mem_efficient", "cudnn", "overrideable")
        if hasattr(torch._C, f"_get_{name}_sdp_enabled")
    )

    def _math_only() -> bool:
        """Whether ``scaled_dot_product_attention`` would take its math kernel now."""
        return torch._C._get_math_sdp_enabled() and not any(on() for on in _FUSED_ON)

    @contextmanager
    def _math_attention() -> Iterator[None]:
        # the flags are process-wide: saved and put back under the process-wide lock, so that
        # two threads' blocks do not interleave their saves and restores (review s25: the
        # flags were left math-only for good)
        with process_state_held(), sdpa_kernel(SDPBackend.MATH), _MathAttentionMode():
            yield
except ImportError:  # pragma: no cover - older torch: its default kernels are used
    from contextlib import nullcontext as _math_attention

    _MATH_CODES = frozenset()

from torch.nn.utils import parametrize as _parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _SpectralNormParametrization
from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNormHook


class EngineCalls(TorchFunctionMode):
    """Records the first call made while it is pushed that builds a derivative's graph the loss
    can depend on: ``seen``, the function's name, or ``None``. Every torch function goes through
    unchanged (its frame is in :data:`PASSING_CODES`). Pushed around the examples-apart check's
    passes, it tells a forward pass that differentiates
    (:mod:`curvlab._differentiating_forward`).

    Recorded: the reverse-mode engine (``torch.autograd.grad``, ``torch.autograd.backward``,
    ``Tensor.backward``; also through ``torch.func.grad`` and ``torch.autograd.functional``)
    called with ``create_graph=True``, by keyword or by position; and forward-mode AD's dual
    numbers (``torch.autograd.forward_ad.make_dual``/``unpack_dual``, whose tangents carry the
    parameters' graph) made outside a ``torch.func`` forward-mode transform. Not recorded: a
    derivative taken without ``create_graph`` (it holds no graph: a constant to the parameters,
    such as a trainable head on a frozen network's input gradient, whose per-example quantities
    are exact; review s25, RX3-3), and ``torch.func.jvp``/``jacfwd``, which the backends' own
    checks hand over or refuse and ``torch.func`` computes exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: str | None = None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.seen is None:
            if type(func) is FunctionType and func in _ENGINE:
                name, at = _ENGINE[func]
                made = (
                    kwargs["create_graph"]
                    if "create_graph" in kwargs
                    else (args[at] if len(args) > at else False)
                )
                if made:
                    self.seen = name
            elif func in _DUALS and not _in_forward_transform():
                self.seen = _DUALS[func]
        return func(*args, **kwargs)


_ENGINE: dict[Any, tuple[str, int]] = {
    torch.autograd.grad: ("torch.autograd.grad", 4),
    torch.autograd.backward: ("torch.autograd.backward", 3),
    Tensor.backward: ("Tensor.backward", 3),  # args[0] is the tensor
}
"""The reverse-mode engine's entry points written in Python (a ``TorchFunctionMode`` sees them),
with the position of their ``create_graph`` argument."""

_DUALS: dict[Any, str] = {
    torch._make_dual: "torch.autograd.forward_ad.make_dual",
    torch._unpack_dual: "torch.autograd.forward_ad.unpack_dual",
}
"""Forward-mode AD's dual numbers, as ``torch.autograd.forward_ad`` calls them."""


def _in_forward_transform() -> bool:
    """Whether the innermost ``torch.func`` transform is a forward-mode one (``jvp``,
    ``jacfwd``), which makes its own dual numbers."""
    try:
        from torch._C._functorch import TransformType, peek_interpreter_stack
    except ImportError:  # pragma: no cover - older torch
        return False
    top = peek_interpreter_stack()
    return top is not None and top.key() == TransformType.Jvp


PASSING_CODES: frozenset[Any] = _MATH_CODES | {EngineCalls.__torch_function__.__code__}
# PASSING_CODES: the code objects of curvlab's frames that only pass a torch call through (the
# math-attention mode's and EngineCalls' __torch_function__): an error raised by the torch
# function they call has such a frame innermost in its traceback and is torch's (the model's),
# not curvlab's

__all__ = [
    "BufferSnapshot",
    "math_attention",
    "MaxNormWeights",
    "batchnorm_stats_kept",
    "buffer_snapshot",
    "buffers_kept",
    "each_forward_on",
    "EngineCalls",
    "first_forward_hooks",
    "gradient_hooks_off",
    "leave_no_trace",
    "max_norm_weights",
    "module_backward_hooks_off",
    "on_buffers",
    "PASSING_CODES",
    "plain_attributes_kept",
    "put_back_renormalised",
    "TensorHookWatch",
    "tensor_hooks_off",
    "user_backward_hook",
]

math_attention = _math_attention
"""The math kernel of ``scaled_dot_product_attention`` for the block (curvlab's passes need it:
the fused kernels have no double backward and no ``vmap`` rule), also where the model's forward
opens an ``sdpa_kernel`` context of its own (:class:`_MathAttentionMode`, on the block's
thread)."""

_ABSENT = object()

BufferSnapshot = list[tuple[nn.Module, str, Tensor | None]]
"""``(module, buffer name, tensor)`` triples: :func:`buffer_snapshot`'s copies, or the user's own
buffers (:func:`_buffer_slots`)."""


MaxNormWeights = list[tuple[str, nn.Module, Tensor, Tensor]]
"""``(module name, module, its weight, a copy of the weight's values)`` for each
``nn.Embedding``/``nn.EmbeddingBag`` with ``max_norm``: :func:`max_norm_weights`."""


def max_norm_weights(named_modules: Iterable[tuple[str, nn.Module]]) -> MaxNormWeights:
    """A copy of the weight of each ``nn.Embedding``/``nn.EmbeddingBag`` with ``max_norm`` among
    ``(name, module)`` pairs, for :func:`put_back_renormalised`: every forward pass of such a
    layer (torch's own too) renormalises the rows it looks up in place. Nothing is copied for a
    model without one (EmbeddingBag too: found in review)."""
    return [
        (name, m, m.weight, m.weight.detach().clone())
        for name, m in named_modules
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    ]


def put_back_renormalised(
    weights: MaxNormWeights, warn: bool = True, graph: Iterable[Tensor] = ()
) -> None:
    """Put back the values of each weight of :func:`max_norm_weights` whose rows were
    renormalised since the copy (one host read per weight: ``torch.equal``), under ``no_grad``,
    and with ``warn`` warn for each (:func:`_warn_renormalised`, after all are put back).

    A weight that a node of ``graph``'s autograd graph saved for its backward (the weight or a
    view of it, read by an operation other than the lookup: a tied head ``h @ emb.weight.T``;
    ``graph``: the output tensors of a graph the caller hands on, a penalty's) is left
    renormalised: putting it back in place would make that backward fail autograd's check of
    in-place changes. The lookup itself saves only the indices, so its graph, the gradient of the
    weight included, is that at the renormalised rows either way (torch renormalises under
    ``no_grad``).
    """
    changed = [entry for entry in weights if not torch.equal(entry[2].detach(), entry[3])]
    if not changed:
        return
    read = _saved_by_graph(graph, [weight for _, _, weight, _ in changed])
    for _, _, weight, saved in changed:
        if id(weight) not in read:
            with torch.no_grad():
                weight.copy_(saved)
    if warn:
        for name, m, weight, _ in changed:
            _warn_renormalised(name, m, left=id(weight) in read)


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}
"""The names of each node type's ``_raw_saved_*`` attributes (its saved tensors)."""


def _saved_by_graph(graph: Iterable[Tensor], weights: list[Tensor]) -> set[int]:
    """The ``id`` of each of ``weights`` whose storage a tensor saved by a node of ``graph``'s
    autograd graph shares (the weight or a view of it; a custom ``autograd.Function``'s
    ``save_for_backward`` and the tensors kept on its ``ctx`` included), read without unpacking
    (a saved-tensor hook's packed object, activation checkpointing's, is not looked into: it
    recomputes at the backward pass). One walk of the graph, none without ``graph``."""
    graph = [t for t in graph if isinstance(t, Tensor) and t.grad_fn is not None]
    storages = {}
    for weight in weights:
        ptr = _storage(weight)
        if ptr:
            storages[ptr] = id(weight)
    if not graph or not storages:
        return set()
    found: set[int] = set()
    for node in graph_nodes(graph):
        for t in _saved_tensors(node):
            hit = storages.get(_storage(t))
            if hit is not None:
                found.add(hit)
    return found


def _saved_tensors(node: Any) -> Iterator[Tensor]:
    """The tensors a graph node saved for its backward, without unpacking them."""
    names = _SAVED_NAMES.get(type(node))
    if names is None:
        names = _SAVED_NAMES[type(node)] = tuple(
            a for a in dir(node) if a.startswith("_raw_saved_")
        )
    for name in names:
        try:
            value = getattr(node, name)
        except RuntimeError:  # released (after a backward)
            continue
        for raw in value if isinstance(value, (list, tuple)) else (value,):
            data = getattr(raw, "data", None)
            if isinstance(data, Tensor):
                yield data
    kept = getattr(node, "__dict__", None)  # a custom Function's ctx.w = w
    if kept:
        yield from (v for v in kept.values() if isinstance(v, Tensor))


def _storage(t: Tensor) -> int:
    """The address of ``t``'s storage, 0 for one without (sparse, empty)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


def _warn_renormalised(name: str, m: nn.Module, left: bool = False) -> None:
    """Warn that this call's forward passes renormalised rows of ``m``'s weight in place (a
    ``max_norm`` embedding with rows longer than ``max_norm``); ``left``: the weight is left
    renormalised (a graph the call returns reads it: :func:`put_back_renormalised`).

    Each pass renormalises only the rows it looks up: where the weight is also used elsewhere (a
    tied head, ``h @ emb.weight.T``) that use reads a weight that depends on which passes ran
    before, so results over several batches or chunks depend on how the data is split, and the
    exact GGN quantities (per-example passes) were 2-3x off even on one batch (found in review).
    Whether the weight is used elsewhere cannot be told from the modules alone (a functional
    use), hence a warning for every such embedding, not an error: one batch's loss, gradient,
    empirical Fisher and Hessian are exact."""
    if left:
        warnings.warn(
            f"{type(m).__name__} '{name or '<root>'}' (max_norm={m.max_norm}): this call's "
            "forward pass renormalised rows of its weight in place (rows longer than max_norm) "
            "and the weight is left renormalised: the autograd graph the call returns reads it "
            "outside the lookup (a tied head, h @ emb.weight.T), and putting the rows back in "
            "place would make your backward fail. The value and its gradient are those at the "
            "renormalised rows. Renormalise the rows the data uses once before the call (with "
            "torch.no_grad(): model(inputs)), after which the call changes no row",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return
    warnings.warn(
        f"{type(m).__name__} '{name or '<root>'}' (max_norm={m.max_norm}): this call's forward "
        "passes renormalised rows of its weight in place (rows longer than max_norm). If the "
        "weight is also used elsewhere (a tied head, h @ emb.weight.T), that use reads a weight "
        "that depends on which passes ran before: results over several batches or chunks "
        "depend on how the data is split, and the exact GGN quantities (diag_fisher "
        "kind='exact', trace(matrix='ggn', method='exact'), fisher_norms kind='exact') are "
        "wrong. Renormalise the rows the data uses once before the call (with torch.no_grad(): "
        "model(inputs) for every batch), after which every quantity is exact",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


@contextmanager
def leave_no_trace(
    model: nn.Module,
    mode: bool | None = None,
    scan: ModelScan | None = None,
    math_attention: bool = True,
) -> Iterator[nn.Module]:
    """Run a block that may touch ``.grad``, train/eval mode, buffers and the global RNG, then
    restore them.

    Inside the block every parameter's ``.grad`` is ``None`` (so backward passes start clean) and
    autograd is enabled (curvature needs it, also when the caller is inside ``torch.no_grad()``);
    on exit the original ``.grad`` objects, each module's ``training`` flag, the grad mode, the
    global CPU (and model-device CUDA) RNG state and the weights of ``Embedding(max_norm=...)``
    layers (which every forward pass renormalises in place) are put back, also when the block
    raises (their values: torch's ``embedding_renorm_`` moves the version counter at every forward
    pass, even when no row changes, and so does any forward pass of the user's; curvature
    operators accept such a move when the values are the same,
    :class:`curvlab.operators._state.ModelState`). The buffers a forward pass updates in place (the running statistics of
    BatchNorm/InstanceNorm layers, ``spectral_norm``'s vectors: :func:`_buffer_slots`) are
    replaced by copies for the block and the user's own tensors put back after: a train-mode
    forward pass updates them, and the user's next step would compute another function (those
    buffers are small; other buffers, frozen weights among them, are not copied). A custom module
    that updates buffers of its own in its forward pass updates them here too.
    ``scale_grad_by_freq`` of ``nn.Embedding``/``nn.EmbeddingBag`` modules
    is off inside the block: it rescales autograd's gradient of the weight (not the forward pass),
    so curvature built on autograd would not be that of the loss. So is their ``sparse``: it
    changes only the layout of the weight's gradient, and curvlab's passes (per-example
    gradients, double backward, products) need it dense (found in review: a sparse embedding
    crashed inside torch in operator products, ``trace``, ``fisher_trace``).
    torch's fused "fast path" of ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` is off
    inside the block (:func:`_no_mha_fastpath`). Any ambient ``torch.autocast`` region is switched
    off inside the block (curvlab's passes
    compute in the parameters' dtype). Inside the block ``scaled_dot_product_attention`` uses its math kernel: the fused kernels
    have no double backward and no ``vmap`` rule, which curvature passes need; also where the
    model's forward opens an ``sdpa_kernel`` context of its own (:data:`math_attention`). The
    tensors a forward pass stores on the model's modules (``self.last = h.detach()``, the
    old-style ``weight_norm``/``spectral_norm``'s ``module.weight``) are the user's objects
    again after the block, and those it created are removed (:func:`plain_attributes_kept`):
    made inside the func backend's ``vmap`` they were dead tensors. Compiled parts of
    the model (``module.compile()``, a ``torch.compile``d submodule) run eagerly inside the block,
    for the same reason (:func:`curvlab._compiled.eager`). The block leaves an ambient
    ``torch.inference_mode()`` (``enable_grad`` alone does not: no graph, a zero curvature), and
    runs without the parametrisation cache of ``torch.nn.utils.parametrize.cached()`` (a cached
    weight is computed once outside the functional and per-example passes, which then get no
    gradient through it). The user's hooks on parameters (``register_hook``,
    ``register_post_accumulate_grad_hook``) are off inside the block (:func:`gradient_hooks_off`):
    curvlab computes the loss's curvature, and a hook would rescale it, or step the user's
    optimizer inside curvlab's backward passes. So are the user's module backward hooks
    (``register_full_backward_hook``, ``register_full_backward_pre_hook``, the legacy
    ``register_backward_hook``, and the global ``register_module_full_backward_hook`` /
    ``_pre_hook``) for the forward passes the block runs (:func:`module_backward_hooks_off`): a
    gradient-scaling or gradient-reversal hook changes the gradient, not the loss, and rescaled
    the products, diagonals and gradients of the passes that backpropagate through the module
    and not the others (found in review s19: a GGN product and the empirical Fisher diagonal 3x
    off, the exact GGN diagonal right). The tensor hooks of the user's that the model's forward
    registers (a gradient-reversal layer's ``h.register_hook(lambda g: -g)``) are off in every
    forward pass of curvlab's (:func:`curvlab._data.call_model`, :func:`tensor_hooks_off`).

    Args:
        model: the user's model.
        mode: ``True``/``False`` to switch the model to train/eval mode inside the block;
            ``None`` keeps the mode it is in.
        scan: the model's :func:`~curvlab._scan.scan_model`, if the caller has one already.
        math_attention: force the math kernel of ``scaled_dot_product_attention`` (default);
            ``False`` for a block that needs only first derivatives without ``vmap`` (the hooks
            backend's passes), which any kernel gives.

    Raises:
        RuntimeError: when the model's parameters or the data were made inside
            ``torch.inference_mode()`` (inference tensors take no part in autograd).
        ValueError: on entry, when the model has uninitialized (lazy) parameters or buffers
            (:func:`~curvlab._scan.check_materialized`).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> with leave_no_trace(model, mode=False):
        ...     model(torch.randn(3, 2)).sum().backward()
        >>> model.weight.grad is None
        True
    """
    scan = scan if scan is not None else scan_model(model)
    check_materialized(scan)  # before any pass: a lazy layer's first one draws its weights
    params = list(scan.params.values())
    modules = [m for _, m in scan.modules]
    device = scan.device
    grads = [p.grad for p in params]
    modes = [m.training for m in modules]
    # Embedding(max_norm=...) renormalises the rows it looks up in place in every forward pass
    # (torch's own forward does too): the user's weight is put back as it was
    renormed = max_norm_weights(scan.modules)
    # scale_grad_by_freq off: the true gradient, not one divided by each index's frequency;
    # sparse off: a dense gradient of the weight (the same values)
    flags: list[tuple[nn.Module, str, bool]] = []
    for m in modules:
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            for flag in ("scale_grad_by_freq", "sparse"):
                if getattr(m, flag, False) is True:
                    flags.append((m, flag, True))
    kept = _plain_attributes(modules)  # put back last, after the modes and flags
    # the generators the modules hold (self.rng = np.random.default_rng(seed), a
    # torch.Generator): put back as the global RNG is (review s26: left moved after the call)
    held = held_states(modules)
    held_at = [h.get() for h in held]
    try:
        with (
            global_rng_kept(device),
            _inference_left(params),
            torch.enable_grad(),
            saved_tensors_hooks_off(),
            _parametrize_uncached(),
            gradient_hooks_off(params),
            module_backward_hooks_off(modules),
            _math_attention() if math_attention else nullcontext(),
            _no_mha_fastpath(modules),
            without_autocast(),
            own_forwards(modules),
            own_pass(params),
            eager(modules),
            on_buffers(_buffer_slots(modules)),
        ):
            for p in params:
                if p.grad is not None:
                    p.grad = None
            for m, name, _ in flags:
                setattr(m, name, False)
            if mode is not None:
                model.train(mode)
            yield model
        put_back_renormalised(renormed)  # and warn, where rows were renormalised
    finally:
        try:
            for m, name, flag in flags:
                setattr(m, name, flag)
            for p, g in zip(params, grads):
                if p.grad is not g:
                    p.grad = g
            for m, training in zip(modules, modes):
                if m.training != training:
                    m.training = training
            put_back_renormalised(renormed, warn=False)  # the block raised (else done): no warning
        finally:
            for h, state in zip(held, held_at):
                h.put(state)
            _put_back_plain(kept)


_TORCH_SLOTS = frozenset(nn.Module().__dict__)
"""The entries ``nn.Module.__init__`` puts in every module's ``__dict__`` (parameters, buffers,
submodules, hooks, ``training``): kept by their own means, not by :func:`plain_attributes_kept`."""

PlainAttributes = list[tuple[nn.Module, dict[str, Any], dict[str, list | dict]]]
"""Per module: a shallow copy of its ``__dict__`` and a copy of the items of its plain attributes
(less :data:`_TORCH_SLOTS`) that are lists or dicts (:func:`plain_attributes_kept`)."""


@contextmanager
def plain_attributes_kept(modules: Iterable[nn.Module], every: bool = False) -> Iterator[None]:
    """Run the block, then give each module whose tensor-valued plain attributes the block
    changed all its plain attributes back as they were, also when the block raises
    (:func:`leave_no_trace` does it for every call).

    A forward pass may store a tensor on a module: a model that keeps its last activation or
    attention map (``self.last = h.detach()``), the pre-hook of the old-style
    ``torch.nn.utils.weight_norm``/``spectral_norm`` (``module.weight``). Made in one of
    curvlab's passes, it is curvlab's, not the user's: inside ``vmap(grad(...))`` (the func
    backend) a dead ``GradTrackingTensor`` holding one example's row, on which arithmetic raised
    torch's "escaped from inside a function being vmapped" and ``torch.save(model)``
    ``NotImplementedError`` (review s24); elsewhere a tensor of curvlab's batch, perhaps holding
    its graph. So the attribute gets the user's object back (the same object, not a copy), or is
    removed where the block created it (a cache made lazily in the block is made again by the
    user's next forward), as do tensors put into or taken out of a module's plain list or dict
    (one level deep, in place: the user's references to the container stay valid). The other
    plain attributes of such a module are put back with them (a cache's bookkeeping, a cached
    length, goes with the cache); a module whose forward changes only non-tensor state (a call
    counter) keeps it, as a custom buffer updated in place is kept (:func:`leave_no_trace`).
    An attribute that the block turned into a parameter, buffer or submodule of the same name
    is left to those. Tensors changed in place are not seen (their values stay changed).

    ``every``: every module's plain attributes are put back, a call counter's and a flag's too
    (for a probe that must run a forward twice from the same state: review s27, a forward that
    draws every other call, or caches its draw, was taken for one that draws nothing).

    Per block one shallow copy of each module's ``__dict__`` (and of the items of its plain lists
    and dicts), and one identity comparison of it after: O(modules), no tensor copied.
    """
    kept = _plain_attributes(modules)
    try:
        yield
    finally:
        _put_back_plain(kept, every)


def _plain_attributes(modules: Iterable[nn.Module]) -> PlainAttributes:
    """The ``__dict__`` of each module as it is now, for :func:`_put_back_plain`."""
    kept: PlainAttributes = []
    for m in modules:
        own = m.__dict__
        items: dict[str, list | dict] = {}
        for k in own.keys() - _TORCH_SLOTS:  # (set difference: C speed)
            v = own[k]
            if isinstance(v, list):
                items[k] = list(v)
            elif isinstance(v, dict):
                items[k] = dict(v)
        kept.append((m, dict(own), items))
    return kept


def _put_back_plain(kept: PlainAttributes, every: bool = False) -> None:
    """Put back the plain attributes of each module of ``kept`` whose tensor-valued ones changed
    (``every``: of each module whose plain attributes changed; see :func:`plain_attributes_kept`)."""
    for m, before, items in kept:
        own = m.__dict__
        refilled = [k for k, v in items.items() if own.get(k) is before[k] and _refilled(own[k], v)]
        if (
            not refilled
            and own.keys() == before.keys()
            and all(map(operator.is_, own.values(), before.values()))
        ):
            continue  # (the usual case: identity checks at C speed)
        attrs = {k: before[k] for k in before.keys() - _TORCH_SLOTS}
        changed = [k for k, v in attrs.items() if own.get(k, _ABSENT) is not v]
        added = own.keys() - _TORCH_SLOTS - attrs.keys()
        tensors = (
            any(_holds_tensor(attrs[k]) or _holds_tensor(own.get(k)) for k in changed)
            or any(_holds_tensor(own[k]) for k in added)
            or any(_holds_tensor(own[k]) or _holds_tensor(items[k]) for k in refilled)
        )
        if not tensors and not every:
            continue
        registered = (m._parameters, m._buffers, m._modules)
        for k in added:
            del own[k]
        for k in changed:
            if not any(k in r for r in registered):
                own[k] = attrs[k]
        for k in refilled:
            container, items_before = own[k], items[k]
            if isinstance(container, list):
                container[:] = items_before
            else:
                container.clear()
                container.update(items_before)


def _refilled(container: list | dict, before: list | dict) -> bool:
    """Whether a list's or dict's items are other objects than ``before``'s."""
    if len(container) != len(before):
        return True
    if isinstance(container, list):
        return any(a is not b for a, b in zip(container, before))
    return any(container.get(k, _ABSENT) is not v for k, v in before.items())


def _holds_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor or a list, tuple or dict with a tensor among its items."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, Tensor) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, Tensor) for v in value.values())
    return False


@contextmanager
def _no_mha_fastpath(modules: list[nn.Module]) -> Iterator[None]:
    """torch's "fast path" of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` off
    for the block, when the model has such a module.

    In eval mode, without gradient (curvlab's probes and checks) torch runs them as one fused
    kernel and, with a ``src_key_padding_mask``, on nested tensors: the layers inside never run
    as modules, padded positions come out as 0, and a probe on a few examples crashed inside
    torch ("NestedTensorImpl doesn't support sizes"; ``kfac`` on an ``nn.TransformerEncoder``
    with a padding mask). Off, every pass computes what a pass with gradient (training)
    computes. torch's switch is process-wide; it is put back on exit.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not any(
        isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in modules
    ):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


_INFERENCE_HINT = (
    "inference tensors take no part in autograd, which curvature needs: build the model and "
    "the data outside torch.inference_mode() (torch.no_grad() is fine), or pass clones made "
    "outside it (t.clone())"
)


@contextmanager
def _inference_left(params: list[Tensor]) -> Iterator[None]:
    """Run the block outside an ambient ``torch.inference_mode()``; one clear error for the
    inference tensors (parameters up front, the data when a pass meets it) that cannot enter
    autograd there."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    made = next((p for p in params if p.is_inference()), None)
    if made is not None:
        raise RuntimeError(
            f"the model's parameters were made inside torch.inference_mode(): {_INFERENCE_HINT}"
        )
    try:
        with torch.inference_mode(False):
            yield
    except RuntimeError as e:
        if "Inference tensor" not in str(e):
            raise
        raise RuntimeError(
            f"curvlab was called inside torch.inference_mode() on data made there: "
            f"{_INFERENCE_HINT} ({e})"
        ) from e


@contextmanager
def _parametrize_uncached() -> Iterator[None]:
    """Run the block with ``torch.nn.utils.parametrize.cached()`` off (its module-global counter
    and cache put back exactly after): a parametrised weight is computed in each pass."""
    enabled, cache = _parametrize._cache_enabled, _parametrize._cache
    if not enabled:
        yield
        return
    _parametrize._cache_enabled, _parametrize._cache = 0, {}
    try:
        yield
    finally:
        _parametrize._cache_enabled, _parametrize._cache = enabled, cache


@contextmanager
def gradient_hooks_off(params: Iterable[Tensor]) -> Iterator[None]:
    """Run the block with the user's hooks on ``params`` off: tensor hooks (``register_hook``,
    which rescale or clip a gradient) and post-accumulate-grad hooks (an optimizer step in
    backward, which would move the parameters inside curvlab's backward passes). Each
    parameter's own hook dictionaries are put back after (handles removed meanwhile stay
    removed); nothing is done for parameters without hooks."""
    stashed: list[tuple[Tensor, Any, Any]] = []
    for p in params:
        pre, post = p._backward_hooks, p._post_accumulate_grad_hooks
        if pre or post:
            stashed.append((p, pre, post))
            if pre:
                p._backward_hooks = OrderedDict()
            if post:
                p._post_accumulate_grad_hooks = OrderedDict()
    try:
        yield
    finally:
        for p, pre, post in stashed:
            if pre:
                p._backward_hooks = pre
            if post:
                p._post_accumulate_grad_hooks = post


def _users(hooks: dict) -> list:
    """The user's hooks of a hook dictionary: neither curvlab's nor BackPACK's
    (:func:`curvlab._scan._foreign`), nor torch's own (its observers and distributed machinery,
    ``torch.*``)."""
    return [h for h in _foreign(hooks) if not _torch_hook(h)]


def _torch_hook(hook: object) -> bool:
    """Whether a hook is defined in torch."""
    return (getattr(hook, "__module__", None) or "").startswith("torch.")


_GLOBAL_BACKWARD_HOOKS = ("_global_backward_hooks", "_global_backward_pre_hooks")


@contextmanager
def module_backward_hooks_off(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the block with the user's module backward hooks off: each module's full backward
    hooks and backward pre-hooks (``register_full_backward_hook``,
    ``register_full_backward_pre_hook``, the legacy ``register_backward_hook``) and the global
    ones (``register_module_full_backward_hook``, ``register_module_full_backward_pre_hook``).

    torch binds a module's backward hooks to the graph at its forward pass: forward passes run in
    the block build graphs without them (a graph built before the block keeps them). Only the
    user's hooks go: curvlab's, BackPACK's (a model the user extended) and torch's own stay
    (:func:`_users`). Each hook dictionary is replaced by one without the user's hooks and put
    back after (handles removed meanwhile stay removed; hooks registered in the block go with
    the replacement); nothing is done where there are none.
    """
    glob = nn.modules.module
    stashed: list[tuple[Any, str, Any]] = []
    try:
        for owner, attrs in (
            *((m, ("_backward_hooks", "_backward_pre_hooks")) for m in modules),
            (glob, _GLOBAL_BACKWARD_HOOKS),
        ):
            for attr in attrs:
                hooks = getattr(owner, attr, None)
                if not hooks:
                    continue
                users = _users(hooks)
                if users:
                    kept = OrderedDict(
                        (k, h) for k, h in hooks.items() if not any(h is u for u in users)
                    )
                    stashed.append((owner, attr, hooks))
                    setattr(owner, attr, kept)
        yield
    finally:
        for owner, attr, hooks in reversed(stashed):
            setattr(owner, attr, hooks)


def user_backward_hook(model: nn.Module) -> str | None:
    """The first module backward hook of the user's on ``model`` or a global one, in words
    (``None``: none; the hooks :func:`module_backward_hooks_off` takes off)."""
    glob = nn.modules.module
    for attr in _GLOBAL_BACKWARD_HOOKS:
        if _users(getattr(glob, attr)):
            return f"a global module backward{' pre-' if 'pre' in attr else ' '}hook"
    for name, m in model.named_modules():
        for attr, what in (
            ("_backward_pre_hooks", "backward pre-hook"),
            ("_backward_hooks", "backward hook"),
        ):
            hooks = getattr(m, attr)
            if hooks and _users(hooks):
                return f"a {what} on module '{name or '<root>'}' ({type(m).__name__})"
    return None


ForwardHook = Callable[..., Any]
"""A forward hook: ``hook(module, args, output)``, or ``hook(module, args, kwargs, output)``."""


def first_forward_hooks(
    hooks: Mapping[nn.Module, ForwardHook], with_kwargs: bool = False
) -> list[RemovableHandle]:
    """Register each module's hook to run first of the forward hooks that see its output, and
    return the handles (remove them after).

    curvlab's hooks that read a layer's output (K-FAC's and the hooks backend's taps, the noise
    samplers' capture) or stand in for it (:class:`curvlab.operators._matrices._TwiceDifferentiable`)
    must see the layer's own output: a forward hook of the user's that returns another output
    (``2 * out``) is then part of the model downstream of the layer, and the gradient curvlab
    reads at the layer's output goes through it (appended after the user's hooks, curvlab's read
    the hooked output as the layer's: K-FAC's ``G`` and the captured Fisher diagonals 4x off for
    ``2 * out + 0.1``, the user's hook dropped from the Hessian of a ``Hardsigmoid``, found in
    review s19). A module's own hooks run after torch's global forward hooks
    (``register_module_forward_hook``): where the user has a global one, the hooks go in one
    global hook placed first of the global ones instead (a dictionary look-up in every module's
    call while registered).

    Args:
        hooks: each module's hook.
        with_kwargs: the hooks take the call's keyword arguments (``hook(module, args, kwargs,
            output)``).
    """
    glob = nn.modules.module
    if not _users(glob._global_forward_hooks):  # (torch's observers return None)
        return [
            m.register_forward_hook(h, prepend=True, with_kwargs=with_kwargs)
            for m, h in hooks.items()
        ]
    table = {id(m): h for m, h in hooks.items()}

    def first(module: nn.Module, *rest: Any) -> Any:
        hook = table.get(id(module))
        return None if hook is None else hook(module, *rest)

    # what register_module_forward_hook does, placed first, with a handle that also takes the
    # keyword flag out again (torch 2.14's leaves it behind)
    handle = RemovableHandle(
        glob._global_forward_hooks, extra_dict=glob._global_forward_hooks_with_kwargs
    )
    glob._global_forward_hooks[handle.id] = first
    glob._global_forward_hooks.move_to_end(handle.id, last=False)  # type: ignore[attr-defined]
    if with_kwargs:
        glob._global_forward_hooks_with_kwargs[handle.id] = True
    return [handle]


# ---------------------------------------------------------------- tensor hooks made in a forward

_TENSOR_HOOK_METHODS = ("register_hook", "register_post_accumulate_grad_hook")
"""The methods of ``torch.Tensor`` through which a forward pass hooks a gradient."""

_watch_lock = threading.Lock()
_watch_count = 0  # watches open, all threads together: the methods are wrapped while > 0
_wrappers: dict[str, tuple[Any, Any]] = {}  # method -> (torch's, its wrapper), made once
_unwrapped: dict[str, tuple[Any, Any]] = {}  # those installed now
_watching = threading.local()  # .stack: this thread's open watches, innermost last


class TensorHookWatch:
    """A watch on the tensor hooks of the user's that this thread registers while it is open
    (``register_hook``, ``register_post_accumulate_grad_hook``; say, a gradient-reversal or
    gradient-scaling layer's ``h.register_hook(lambda g: -g)`` in a model's forward).

    Such a hook is bound to a tensor of the forward pass, not to a module or a parameter: it
    cannot be taken off after the forward, nor seen in the autograd graph from Python, so the
    watch sees it being registered. While a watch is open ``torch.Tensor``'s two methods are
    wrapped (process-wide, put back when the last watch of every thread closes; about 1 µs a
    watch): a call from another thread, or with a hook of curvlab's, BackPACK's or torch's own
    (:func:`_foreign_tensor_hook`: the layer taps, checkpointing, FSDP's gradient hooks), goes
    to torch's method unchanged. A hook of the user's is recorded in :attr:`seen` and, with
    ``off``, removed as soon as torch registered it, or, on a tensor that does not require
    gradient (curvlab's passes under ``no_grad``; torch would refuse it), not handed to torch at
    all: a handle that removes nothing comes back, so a forward hook of the user's that registers
    a tensor hook without checking ``requires_grad`` runs in curvlab's passes as in the user's
    training forward (review s20). Without ``off`` torch's checks stay: a tensor without gradient
    still raises, as it does with no watch open. Watches nest; the innermost open one of the
    thread decides.

    Args:
        off: take the user's hooks off (curvlab's own passes, :func:`tensor_hooks_off`);
            ``False`` only records them (the noise capture of the user's training step, whose
            backward pass runs them).

    Attributes:
        seen: each user hook registered while the watch was innermost, in words (its function
            and module), in the order registered.
    """

    def __init__(self, off: bool) -> None:
        self.off = off
        self.seen: list[str] = []
        self._open = False

    def start(self) -> TensorHookWatch:
        """Open the watch (once; a no-op when open)."""
        global _watch_count
        if self._open:
            return self
        with _watch_lock:
            if _watch_count == 0:
                _wrap_tensor_hook_methods()
            _watch_count += 1
            self._open = True
        stack = getattr(_watching, "stack", None)
        if stack is None:
            stack = _watching.stack = []
        stack.append(self)
        return self

    def stop(self) -> None:
        """Close the watch (a no-op when closed; in any order with the thread's other watches)."""
        global _watch_count
        if not self._open:
            return
        stack = getattr(_watching, "stack", [])
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is self:
                del stack[i]
                break
        with _watch_lock:
            self._open = False
            _watch_count -= 1
            if _watch_count == 0:
                _unwrap_tensor_hook_methods()


@contextmanager
def tensor_hooks_off() -> Iterator[TensorHookWatch]:
    """Run the block (one of curvlab's forward passes: :func:`curvlab._data.call_model`) with the
    tensor hooks of the user's that it registers off: curvlab computes the curvature of the loss
    itself, and a hook that changes a gradient inside the forward (a gradient-reversal or
    gradient-scaling layer) would make it that of another function (found in review s19: an
    exact Hessian trace 9.266 for 1.943, the gradient 3x, under ``h.register_hook(lambda g:
    3 * g)``), as the user's hooks on parameters and module backward hooks would
    (:func:`gradient_hooks_off`, :func:`module_backward_hooks_off`). The user's own forward and
    backward passes keep them. See :class:`TensorHookWatch`."""
    watch = TensorHookWatch(off=True).start()
    try:
        yield watch
    finally:
        watch.stop()


def _foreign_tensor_hook(hook: object) -> bool:
    """Whether a tensor hook is the user's: defined neither in curvlab nor BackPACK
    (:func:`curvlab._scan._own_hook`) nor in a submodule of torch (its own machinery;
    ``torch.neg`` itself, as a hook, is the user's choice). ``functools.partial`` objects and
    bound methods are read through to their function."""
    fn = hook
    for _ in range(8):  # a partial of a partial ...
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif inspect.ismethod(fn):
            fn = fn.__func__
        else:
            break
    home = getattr(fn, "__module__", None)
    if not isinstance(home, str):
        home = type(fn).__module__
    return not (_own_hook(home) or home.startswith("torch."))


def _hook_name(hook: object) -> str:
    """A hook in words: its function's qualified name and module."""
    fn = hook.func if isinstance(hook, functools.partial) else hook
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    home = getattr(fn, "__module__", None) or type(fn).__module__
    partial = "functools.partial of " if fn is not hook else ""
    return f"{partial}{name} (module {home})"


def _watched(method: str, registered: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.Tensor``'s ``method`` (``registered``, torch's) as seen by the open watches."""

    @functools.wraps(registered)
    def register(self: Tensor, hook: Callable[..., Any]) -> Any:
        stack = getattr(_watching, "stack", None)
        if not stack or not _foreign_tensor_hook(hook):
            return registered(self, hook)
        watch = stack[-1]
        if watch.off and not self.requires_grad:
            # torch refuses a hook on a tensor without gradient, which a forward hook that does
            # not check requires_grad meets in curvlab's passes without gradient only (the
            # user's training forward runs it fine): taken off anyway, so not handed to torch
            # (before review s20 those passes raised torch's error)
            watch.seen.append(f"{_hook_name(hook)} by Tensor.{method}")
            return RemovableHandle(OrderedDict())
        handle = registered(self, hook)  # torch's checks (and a subclass's __torch_function__)
        watch.seen.append(f"{_hook_name(hook)} by Tensor.{method}")
        if watch.off:
            handle.remove()
        return handle

    return register


def _wrap_tensor_hook_methods() -> None:
    """Wrap ``torch.Tensor``'s hook methods (under ``_watch_lock``)."""
    methods = vars(torch.Tensor)
    for method in _TENSOR_HOOK_METHODS:
        registered = methods.get(method)
        if registered is None:  # pragma: no cover - a torch without the method
            continue
        made = _wrappers.get(method)
        if made is None or made[0] is not registered:
            made = _wrappers[method] = (registered, _watched(method, registered))
        _unwrapped[method] = made
        setattr(torch.Tensor, method, made[1])


def _unwrap_tensor_hook_methods() -> None:
    """Put torch's hook methods back (under ``_watch_lock``), unless something else replaced the
    wrapper meanwhile (then that stays; the wrapper, with no watch open, calls torch's)."""
    methods = vars(torch.Tensor)
    for method, (registered, wrapper) in _unwrapped.items():
        if methods.get(method) is wrapper:
            setattr(torch.Tensor, method, registered)
    _unwrapped.clear()


@contextmanager
def batchnorm_stats_kept(model: nn.Module) -> Iterator[None]:
    """Run the block with the running statistics of train-mode BatchNorm layers left as they were
    (see :func:`buffers_kept`)."""
    norms = (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
    with on_buffers(_buffer_slots(m for m in norms if m.training)):
        yield


@contextmanager
def buffers_kept(model: nn.Module, every: bool = True) -> Iterator[None]:
    """Run the block with the buffers of ``model`` left as they were: every buffer (a forward
    pass may update running statistics: BatchNorm's, a running input normaliser's, an EMA
    codebook's), or with ``every=False`` those :func:`_buffer_slots` names (norm statistics,
    ``spectral_norm``'s vectors; no copy of frozen weights kept as buffers)."""
    with on_buffers(_buffer_slots(model.modules(), every=every)):
        yield


SMALL_BUFFER_BYTES = 64 * 1024
"""Integer and boolean buffers up to this size (call counters, flags, zero-points, small masks)
are copied by :func:`buffer_snapshot`."""


def buffer_snapshot(modules: Iterable[nn.Module]) -> BufferSnapshot:
    """Copies of the modules' buffers as they are now, for :func:`on_buffers` (e.g. an operator
    whose every forward pass must see the buffers as they were when it was built).

    Besides the floating-point buffers, the integer and boolean ones of at most
    :data:`SMALL_BUFFER_BYTES` (a forward that counts its calls, a quantisation flag): every
    forward pass then starts from the counts as they were, and the user's are left alone. Larger
    ones (packed quantised weights) are not copied. (Every caller asked for the small integer
    buffers after review s17, which found call counters running on across passes.)
    """
    modules = list(modules)
    slots = _buffer_slots(modules)
    seen = {(id(m), name) for m, name, _ in slots}
    for m in modules:
        for name, buf in m._buffers.items():
            if buf is None:  # a forward may fill it: None is put back (review s27)
                slots.append((m, name, None))
            elif (
                (id(m), name) not in seen
                and not isinstance(buf, nn.parameter.UninitializedBuffer)
                and not (buf.is_floating_point() or buf.is_complex())
                and buf.numel() * buf.element_size() <= SMALL_BUFFER_BYTES
            ):
                slots.append((m, name, buf))
    return list(_copies(slots))


@contextmanager
def each_forward_on(model: nn.Module, snapshot: BufferSnapshot) -> Iterator[None]:
    """Run the block with every call of ``model`` on fresh copies of ``snapshot``'s buffers (a
    forward pre-hook, first of the model's; none without buffers), so that the passes of a call
    compute one function however many forward passes they run; the model's own buffers are put
    back after (:func:`on_buffers`)."""
    if not snapshot:
        yield
        return

    def fresh(module: nn.Module, args: Any) -> None:
        _install_copies(snapshot)

    handle = model.register_forward_pre_hook(fresh, prepend=True)
    try:
        with on_buffers(snapshot):
            yield
    finally:
        handle.remove()


@contextmanager
def on_buffers(slots: Iterable[tuple[nn.Module, str, Tensor | None]]) -> Iterator[None]:
    """Run the block with each ``(module, buffer name, tensor)``'s buffer replaced by a fresh copy
    of ``tensor`` (one copy per distinct tensor: a buffer shared by two modules stays shared), and
    the module's own buffer put back after, also when the block raises.

    The block's forward passes update the copies; restoring values in place instead would bump the
    buffers' version counters and break a graph built on them. Nothing is copied for a model
    without buffers.
    """
    saved = _install_copies(slots)
    try:
        yield
    finally:
        _put_back(saved)


def _put_back(saved: list[tuple[nn.Module, str, Any]]) -> None:
    """Put each ``(module, name, tensor)``'s tensor back in its module's buffer, last first."""
    for m, name, buf in reversed(saved):
        if buf is _ABSENT:  # removed since the snapshot: not put back
            m._buffers.pop(name, None)
        else:
            m._buffers[name] = buf


def _install_copies(
    slots: Iterable[tuple[nn.Module, str, Tensor | None]],
) -> list[tuple[nn.Module, str, Any]]:
    """Put a fresh copy of each slot's tensor in its module's buffer (one copy per distinct
    tensor); returns ``(module, name, the tensor that was there)`` (``_ABSENT``: none).

    All or nothing: when a copy fails (out of memory, an interrupt), the copies already installed
    are taken out again before the error goes on (the model kept them before: its buffers were no
    longer the tensors the user's references point to; found in review).
    """
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for m, name, copy in _copies(slots):
            saved.append((m, name, m._buffers.get(name, _ABSENT)))
            m._buffers[name] = copy
    except BaseException:
        _put_back(saved)
        raise
    return saved


def _copies(
    slots: Iterable[tuple[nn.Module, str, Tensor | None]],
) -> Iterator[tuple[nn.Module, str, Tensor | None]]:
    """``(module, name, a copy of the slot's tensor)`` for each slot with a tensor, one copy per
    distinct tensor (a buffer shared by two modules stays shared); ``None`` for a slot holding
    ``None`` (a buffer registered as ``None`` that a forward fills starts each pass empty and is
    put back empty: review s27, ``fisher_trace``'s probe left it filled with a draw that matched
    the user's next one)."""
    copies: dict[int, Tensor] = {}
    for m, name, value in slots:
        if value is None:
            yield m, name, None
            continue
        if isinstance(value, nn.parameter.UninitializedBuffer):
            continue
        copy = copies.get(id(value))
        if copy is None:
            copy = copies[id(value)] = _copy(value)
        yield m, name, copy


def _buffer_slots(modules: Iterable[nn.Module], every: bool = False) -> BufferSnapshot:
    """``(module, name, buffer)`` for the buffers of ``modules`` that a forward pass updates in
    place (no copies): the running statistics of BatchNorm/InstanceNorm layers that track them,
    the power-iteration vectors of ``spectral_norm`` (both flavours); ``every``: all buffers.

    Only those by default: copying every buffer cost 4-14 times the buffers' memory on models
    whose frozen weights are buffers (quantised bases under LoRA: +408 MB for 96 MB of buffers),
    and broke modules that keep state in a buffer *and* a plain attribute (HF's dynamic NTK
    rotary embedding re-registers ``inv_freq`` and sets ``max_seq_len_cached``: the copy put the
    unscaled buffer back under a "scaled" attribute, found in review). A custom module that
    updates its own buffers in a forward pass (a running input normaliser) is not covered here.
    """
    out = []
    for m in modules:
        if not m._buffers:
            continue
        names = m._buffers.keys() if every else _updated_in_forward(m)
        for name in names:
            buf = m._buffers.get(name)
            if buf is not None and not isinstance(buf, nn.parameter.UninitializedBuffer):
                out.append((m, name, buf))
    return out


def _updated_in_forward(m: nn.Module) -> list[str]:
    """The names of ``m``'s buffers its forward pass updates in place (see :func:`_buffer_slots`)."""
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return ["running_mean", "running_var", "num_batches_tracked"]
    if isinstance(m, _SpectralNormParametrization):
        return ["_u", "_v"]
    names = []
    for hook in m._forward_pre_hooks.values():  # torch.nn.utils.spectral_norm (the older one)
        if isinstance(hook, _SpectralNormHook):
            names += [f"{hook.name}_u", f"{hook.name}_v"]
    return names


def _copy(buf: Tensor) -> Tensor:
    """A copy of a buffer outside any graph (``requires_grad`` as the buffer's)."""
    with torch.no_grad():
        copy = buf.clone()
    return copy.requires_grad_(True) if buf.requires_grad else copy
