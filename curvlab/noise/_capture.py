"""Hooks that let a sampler measure curvature inside the user's own forward and backward pass.

:class:`Taps` is a context manager. While it is open it records

* the model's input (a forward pre-hook on the model),
* what the loss function is called with, ``loss_fn(output, target)`` (a forward pre-hook on the
  loss module),
* the model's output (a forward hook on the model: the Tensor, or the ``.logits`` of another
  output), handed to a callback, and
* for every Linear/Conv1d/Conv2d layer, its input in the forward pass and the gradient of its output
  in the backward pass, handed to callbacks (a forward hook plus a backward hook at the gradient
  edge of the layer output, see :func:`_hook_output_grad`);
* the gradient that reaches the loss's own output in the backward pass, :attr:`Taps.loss_scale`:
  1 for ``loss.backward()``, the scale ``S`` under ``GradScaler`` (``scaler.scale(loss).backward()``).
  Layer output gradients are divided by it before the callbacks see them, so every captured
  quantity is that of the unscaled ``loss_fn(model(inputs), targets)``.

That holds only where the loss module's output is the one way the backward pass reaches the
model: a captured layer-output gradient is the sum of everything downstream of it. A capture with
layer callbacks therefore checks the step's graph, with no host synchronisation and no extra pass:

* the loss module called more than once with gradients (mixup's ``lam * loss_fn(out, ya) +
  (1 - lam) * loss_fn(out, yb)``, one loss per head) makes the step inexact
  (:attr:`Taps.loss_calls`);
* the loss module's output is handed back as a :class:`~curvlab.noise._roots._StepLoss`, a wrapper of it whose
  ``__torch_function__`` runs every operation on the plain tensor and so sees what the step
  computes from it, up to the ``backward()`` (or ``torch.autograd.backward``/``grad``) call,
  where it reads the roots of the backward pass. Before
  that pass runs, the graph from the roots is walked, stopping at the loss module's output: if it
  reaches the model's output or a tapped layer's output by another way (a z-loss or an L2 term
  on the logits, an L1 term on a hidden activation, an auxiliary loss the model computes
  inside its forward), the step is inexact. Terms that reach only the parameters (weight decay
  written into the loss) leave it exact and one pass. A backward pass whose roots the check did
  not see (the loss computed with another module, a ``backward`` that does not dispatch
  ``__torch_function__``) makes the step inexact too. After the capture, operations on a
  ``_StepLoss`` give plain tensors.
* a module backward hook of the user's on the model, or a global one
  (:func:`curvlab._notrace.user_backward_hook`: a gradient-scaling or gradient-reversal layer),
  registered before the block or inside it (the model's hook tables are read at the capture's
  start and again at the loss call, after the forward pass that a module's hooks act in),
  makes the step inexact: it changes the step's layer-output gradients, not the loss (captured,
  the Fisher diagonal was 4x that of the loss under a backward pre-hook doubling the last
  layer's output gradient, found in review s19); the separate pass runs without it, as every
  pass of curvlab's does. So does one on a module of the user's called between the model's
  output and the loss, outside the model (``loss_fn(post(model(x)), y)``), found before the
  backward pass by a walk of the autograd graph from the loss input to the model's output
  (:meth:`Taps._check_hooks_between`; captured, the noise was 2.0x the separate pass's under a
  hook doubling ``grad_input``, found in review s20): the separate pass does not call that
  module. A hook that changes nothing (a gradient logger) counts too. So does a tensor hook of
  the user's that the model's forward pass registers (``h.register_hook(lambda g: -g)``, seen
  while it runs: :class:`curvlab._notrace.TensorHookWatch`; a hook tripling a hidden layer's
  gradient gave a captured empirical Fisher diagonal 9x the loss's below it), and
  FullFisherNoise does not fold its noise into such a step.
* a backward pass that gives the loss module's output a gradient of 0, or one that is not finite
  (a schedule weight of 0 on the loss, ``(loss * 0.0).backward()``), leaves nothing to divide by:
  every captured layer-output gradient is 0 (the division was 0/0, and the noise and the
  parameters NaN, found in review s20), so the step is inexact. A constant that is readable
  without a host synchronisation (a Python number, a CPU scalar) is found on the way from the
  pass's roots to the loss before the pass runs (:func:`_vanishing_gradient`). The gradient
  itself is never read (on an accelerator that would synchronise): a zero that no such constant
  shows (a factor held in a tensor on an accelerator, ``loss.clamp(max=0)``) is not found, and
  its step's captured quantities are NaN.

An inexact step measures in a separate pass of ``loss_fn(model(inputs), targets)`` (exact). For that
pass the loss call records how its input was made from the model's output (the reshapes,
transposes and copies in the autograd graph between them, :func:`~curvlab.noise._roots._loss_path`),
so :meth:`Taps.step_targets` can put the targets back in the model output's order and say where it
holds the classes, or raise where the loss input is something else.

On exit every hook is removed, so the model and the loss module are left as they were. The hooks
only read tensors (and never call ``.item()``), so they add no host synchronisation. Inside the
block compiled models and functions run eagerly (``torch.compiler.set_stance("force_eager")``,
once anything was compiled in the process): dynamo does not guard on module hooks, so compiled code
could silently skip them (docs/training-loops.md). A block opened inside a compiled step, where the
stance cannot change, runs eagerly all the same: ``NoisyOptimizer.capture`` turns dynamo's frame
evaluation off around it (:class:`curvlab.noise._optim._CaptureBlock`).
"""

from __future__ import annotations

import inspect
import math
import sys
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.hooks import RemovableHandle

from curvlab._compiled import eager_code
from curvlab._data import num_examples
from curvlab._graph import reaching
from curvlab._layout import (
    Sizes,
    call_input,
    first_tensor,
    leading,
    misplaced,
    probe_one_example,
    probe_size,
)
from curvlab._losses import loss_module
from curvlab._notrace import (
    TensorHookWatch,
    first_forward_hooks,
    plain_attributes_kept,
    user_backward_hook,
)
from curvlab._own_pass import in_own_pass, own_pass
from curvlab._precision import upcast, without_autocast
from curvlab.backends._base import parameter_uses
from curvlab.backends._layers import tappable_layers
from curvlab.noise._roots import (
    _LIVE,
    _hooked_between,
    _loss_gradient,
    _loss_path,
    _reaches,
    _separate_targets,
    _step_loss,
    _StepLoss,
    _weak,
)

# tappable_layers re-exported for the samplers
__all__ = ["ConfirmedLayouts", "Taps", "tappable_layers"]

# selections between the model's output and the loss input: their indices are not read (that
# would synchronise), so even one that keeps every position in order is refused
_SELECTION = (
    "; a selection's indices are not read (a host synchronisation), so one that keeps every "
    "position in order is refused too: use the output itself, or a slice"
)
_PATH_HINTS = dict.fromkeys(
    ("IndexSelectBackward0", "IndexBackward0", "GatherBackward0", "TakeBackward0"), _SELECTION
)

LayerForward = Callable[[str, nn.Module, Tensor], None]
LayerBackward = Callable[[str, nn.Module, Tensor, Tensor], None]
LossInput = Callable[[Tensor, Any], None]
ModelOutput = Callable[[Tensor], None]


class ConfirmedLayouts:
    """The layer layouts a sampler's captures confirmed by a probe (:meth:`Taps._batch_major`,
    :meth:`Taps.output_examples_first`), kept per model.

    A confirmation holds for one model (held by a weak reference: a model that is freed takes its
    entries with it), one input signature (each input tensor's shape after the batch axis, dtype
    and device), the tapped module objects (a weak reference each: a layer replaced by another
    is probed anew) and the shapes after the batch axis and strides of every tapped layer's input
    and output in the step (of the model's output, for the output's layout). So a sampler shared
    by two models (a sweep, a teacher and a student with the same layer names) probes each, and
    a model whose layers are called on another arrangement of the same input (a flag that makes a
    layer sequence-first: a transposed, strided layer input) is probed again. Before this, a
    confirmation was keyed by the input signature and the layer names only: the second model of a
    shared sampler had its time-major rows read as examples (an ``enc.weight`` empirical diagonal
    summing to 0.0638 against the exact 0.0226). What no cache can see, and is not re-checked, is
    a model whose layout changes between steps with all of these unchanged (a layout chosen by
    the input's values, or a sequence-first path that makes its inputs contiguous again): give
    such a model a fresh sampler when its layout changes, or call :meth:`clear`.

    A cache only: copies and pickles of a sampler start empty (they probe again, once).
    """

    def __init__(self) -> None:
        self._by_model: weakref.WeakKeyDictionary[nn.Module, set[Any]] = weakref.WeakKeyDictionary()

    def confirmed(self, model: nn.Module, key: Any) -> bool:
        """Whether a probe confirmed ``key`` (see :meth:`Taps._layout_key`) for ``model``."""
        return key in self._by_model.get(model, ())

    def confirm(self, model: nn.Module, key: Any) -> None:
        """Remember that a probe confirmed ``key`` for ``model``."""
        self._by_model.setdefault(model, set()).add(key)

    def clear(self) -> None:
        """Forget every confirmation: the next capture of each model probes again."""
        self._by_model.clear()

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._by_model.values())

    def __reduce__(self) -> tuple[type[ConfirmedLayouts], tuple[()]]:
        # copies and pickles start empty: weak references cannot be pickled, and a cache is
        # rebuilt by the next probe
        return ConfirmedLayouts, ()


class Taps:
    """Record the model input and loss call, and tap layer inputs/output gradients.

    Args:
        model: the network.
        loss_fn: the loss module the user calls on the model output (may be ``None``).
        layers: ``module name -> (module, ...)`` to tap (see :func:`tappable_layers`), or ``None``.
        on_forward: called as ``on_forward(name, module, layer_input)`` in the forward pass.
        on_backward: called as ``on_backward(name, module, layer_input, grad_output)`` in the
            backward pass.
        on_loss: called as ``on_loss(output, target)`` when the loss module runs.
        on_output: called as ``on_output(output)`` with the model's output (its ``.logits`` if it
            is not a Tensor, the first Tensor of a tuple or list; not called for other outputs)
            when the model's forward pass ends.
        finish: called as ``finish(taps)`` by :meth:`result` after the block to build the state.
        params: the trainable parameters by name; the loss call checks that each enters the
            graph once through its tapped layer (else :attr:`exact` turns false and the sampler
            measures in a separate pass): a parameter the model reads without calling its layer
            (``F.linear(x, layer.weight)``, ``nn.MultiheadAttention``'s ``out_proj``) or reads
            beside the layer's call (a weight tied to a direct use) has a gradient no tap
            accounts for. ``None`` with ``on_backward``: the tapped layers' parameters (the
            check is never skipped where layer callbacks measure curvature; before review s18
            :class:`~curvlab.noise.KFACNoise` gave none, and a weight used outside its layer got
            no noise on the one-pass path, 0.0 where the engine path gave 0.52).
        layouts: the sampler's :class:`ConfirmedLayouts`, kept across steps: per model, the
            input signatures (with the tapped modules and their inputs' and outputs' shapes and
            strides) for which a forward pass on fewer examples confirmed that every tapped layer
            holds the examples in its first dimension (see :meth:`_batch_major`); ``None``:
            confirm every step.
        on_roots: called as ``on_roots(unit, factor)`` before a backward pass through the loss
            module's output runs (the roots check of the module docstring), ``unit`` telling
            whether that pass gives the loss output the gradient 1 times a GradScaler's scale
            (no factor on the loss, :func:`~curvlab.noise._roots._loss_gradient`), ``factor``
            the factor ``(k, rounding)`` it gives it (times that scale) where the autograd graph
            shows it without a host synchronisation, else ``None``
            (:func:`~curvlab.noise._roots._loss_gradient`); for samplers that fold noise into
            the backward pass (FullFisherNoise: a ``loss_factor=`` that contradicts it is an
            error).

    Attributes:
        model_input: the first positional argument of the last model call (detached, still
            requiring grad where it did: :func:`_held`), or the
            dict of its keyword tensors for ``model(**inputs)``, or ``None``.
        left_out: what of the last model call a separate pass of
            ``loss_fn(model(model_input), targets)`` would not pass the model (descriptions:
            other positional arguments, keyword arguments that are not their ``forward``'s
            default, keyword tensors of different leading sizes); that pass would measure
            another model's curvature, so it is refused where this is not empty.
        loss_output: the model output the loss was called with (its first call with gradients,
            else its first call), or ``None``.
        model_output_shape: the shape of the model's output (its ``.logits`` if it is not a
            Tensor, the first Tensor of a tuple or list), or ``None``.
        loss_target: the target the loss was called with, or ``None``.
        calls: how often the model was called.
        loss_calls: how often the loss module was called with gradients (grad mode on, an input
            that requires grad); more than one makes the step inexact.
        loss_calls_differ: ``"outputs"`` when a later such call had another loss input than the
            first, else ``"targets"`` when it had other targets (both compared by identity),
            else ``None``: what a separate pass cannot choose between.
        folded: set by samplers that add their noise straight into the gradient during the
            backward pass (then nothing is left to add afterwards).
        exact: whether the taps see every parameter's whole gradient (see ``params``) and every
            tapped layer's output gradient, that of the loss module's one output alone (see the
            module docstring); when false :meth:`result` is ``None`` (the sampler measures in a
            separate pass).
        loss_scale: the gradient at the loss output in the backward pass (a scalar tensor; no
            host synchronisation), or ``None`` before it ran.
        loss_factor: the factor the loop puts on the loss before ``backward`` (e.g.
            ``1 / accumulation_steps``), as :meth:`NoisyOptimizer.capture` was told, or ``None``
            (not told: 1); ``loss_scale`` is that factor times a GradScaler's scale. Only noise
            folded into the backward pass needs it (FullFisherNoise, which refuses one that the
            autograd graph contradicts where the graph shows the factor: ``on_roots``); captured
            curvature divides by ``loss_scale`` and ignores it.
        noise_added: set by samplers that fold noise into the backward pass once it was added
            (``folded`` without ``noise_added`` after the step's backward: the backward never
            reached the fold, and the step measures the noise in a separate pass).
        separate_cause: ``(why, remedy)`` set by a sampler that sends a step it would have
            measured in the step itself to the separate pass (FullFisherNoise: a factor on the
            loss): the error of a loss input that pass cannot rebuild names it, and its remedy.
        scratch: a sampler's per-capture state; its ``"output"`` entry (a tensor holding the
            step's graph) is dropped when the block closes.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | None,
        layers: dict[str, tuple[nn.Module, str, str | None]] | None = None,
        on_forward: LayerForward | None = None,
        on_backward: LayerBackward | None = None,
        on_loss: LossInput | None = None,
        on_output: ModelOutput | None = None,
        finish: Callable[[Taps], Any] | None = None,
        params: dict[str, nn.Parameter] | None = None,
        layouts: ConfirmedLayouts | None = None,
        on_roots: Callable[[bool, tuple[float, float] | None], None] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.layers = layers or {}
        self.on_forward = on_forward
        self.on_backward = on_backward
        self.on_loss = on_loss
        self.on_output = on_output
        self._finish = finish
        if params is None and on_backward is not None and self.layers:
            params = _layer_params(self.layers)
        self._params = params
        self.exact = True
        self.folded = False
        self.model_input: Tensor | None = None
        self.left_out: list[str] = []
        self.loss_output: Tensor | None = None
        self.model_output_shape: torch.Size | None = None
        self.loss_target: Any = None
        self.calls = 0
        self._first_caller: str | None = None  # the curvlab function that made the first call
        self.loss_calls = 0
        self.loss_calls_differ: str | None = None
        self._first_loss: tuple[Any, Any] | None = None  # weak references to its input, target
        self.loss_scale: Tensor | None = None
        self.loss_factor: float | None = None
        self.noise_added = False
        self.separate_cause: tuple[str, str] | None = None
        self.nonfinite = False  # a sampler found the step's logits non-finite
        # the step's backward pass gives the loss output a gradient of 0 or a non-finite one
        # (a zero factor found in the graph before it ran, _vanishing_gradient)
        self._vanished = False
        self.scratch: dict[str, Any] = {}
        self.rewind: Tensor | None = None  # the noise generator's state before the capture
        # the gradients a fold left (parameter, weak reference, version), set by NoisyOptimizer
        self.folded_into: list[tuple[nn.Parameter, Any, int]] | None = None
        self._seen: dict[str, int] = {}  # layers whose forward ran in this step
        self._sizes: Sizes = {}  # their input's and output's leading sizes (see _batch_major)
        # their input's and output's shapes after the batch axis and strides (see _layout_key)
        self._arrangement: dict[str, tuple[Any, Any]] = {}
        self._layouts = layouts  # what a probe found batch-major, per model (the sampler's)
        self._call: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # the model call
        self._autocast: tuple[str, torch.dtype] | None = None  # its autocast region
        self._got_grad: set[str] = set()  # layers whose output gradient reached the callback
        self._fragile: list[tuple[str, Tensor, int]] = []  # see _hook_output_grad
        self._missed = False  # a layer output gradient the hooks cannot see
        # the graph check (module docstring): only where layer callbacks read output gradients
        self._checks = on_backward is not None
        self.on_roots = on_roots
        self._reads_roots = self._checks or on_roots is not None  # the loss is a _StepLoss
        self._marks: set[Any] = set()  # autograd nodes of the model output and tapped outputs
        self._scaler_nodes: set[Any] = set()  # GradScaler products of the loss (_StepLoss)
        # the model output's autograd node and output number (until the loss call), its data
        # pointer, shape and strides, and how the loss input was made from it (_loss_path)
        self._out_edge: tuple[Any, int] | None = None
        self._out_meta: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None
        self._path: list[Any] | str | None = None
        self._separate: tuple[Any, bool] | None = None  # step_targets' answer
        self._loss_nodes: set[Any] = set()  # those of the loss module's outputs: the walk stops
        self._checking = False  # a backward pass whose roots were checked is running now
        self._unchecked = False  # a layer output gradient came from a pass never checked
        self._other_terms = False  # a checked pass reaches the model not only through the loss
        self._backward_hooked = False  # a module backward hook of the user's changes gradients
        self._tensor_hooked: str | None = None  # a tensor hook of the user's made in the forward
        self._hook_watch: TensorHookWatch | None = None  # open during the step's forward pass
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._key = next(iter(model.parameters()), None)  # see in_own_pass

    def in_own_pass(self) -> bool:
        """Whether the pass running now is curvlab's own (a recomputed penalty's forward and
        gradients inside the step, :mod:`curvlab._own_pass`), not the step's: the hooks then leave
        it alone."""
        return in_own_pass(self._key)

    def _live(self) -> bool:
        return self._active and not self.in_own_pass()

    def result(self) -> Any:
        """The sampler state measured during the block (``None`` if this capture measures none, or
        if it did not see every gradient it needs: the sampler then measures in a separate pass)."""
        if self._finish is None:
            return None
        if (
            self._missed
            or self._other_terms
            or self._unchecked
            or self._backward_hooked
            or self._tensor_hooked is not None
            or self.gradient_vanished()
        ):
            self.exact = False
        elif (
            self.exact
            and self._params is not None
            and self.on_backward is not None
            and self.loss_scale is not None
        ):
            # the loss check found every layer that ran reached by the loss (else exact is false),
            # so each must have had its output gradient: one that did not was missed by the hooks
            # (never answer with a silent zero for it)
            self.exact = all(name in self._got_grad for name in self._seen)
        if self.exact and self.on_backward is not None and not self._batch_major():
            self.exact = False  # rows of a tapped layer are not the examples: a separate pass
        if not self.exact:
            return None
        return self._finish(self)

    def gradient_vanished(self) -> bool:
        """Whether the step's backward pass gives the loss output a gradient of 0 or one that is
        not finite, as far as the host can tell without a synchronisation: a zero or non-finite
        constant found on the way from the pass's roots to the loss before it ran
        (:func:`_vanishing_gradient`; :attr:`loss_scale` itself is never read). The captured
        quantities are divided by that gradient (:meth:`unscaled`), and a gradient of 0 leaves
        every captured one 0 (0/0: NaN noise and parameters, found in review s20): the step
        measures in the separate pass instead, whose noise does not depend on the loop's factor,
        and :attr:`separate_cause` names the zero gradient."""
        return self._vanished

    def _vanish(self) -> None:
        """Record that the loss output's gradient is 0 or not finite (:meth:`gradient_vanished`)."""
        self._vanished = True
        if self.separate_cause is None:
            self.separate_cause = (
                "found that this step's backward pass gives the loss output a gradient of 0 or "
                "one that is not finite (a factor of 0 on the loss, a warm-up weight?), which "
                "leaves no curvature to read off the step's gradients",
                "Run such steps outside the capture and call noisy.step(inputs=..., targets=...) "
                "with the batch, or leave the factor off the loss inside the capture",
            )

    def _batch_major(self) -> bool:
        """Whether every tapped layer held the step's examples in its first dimension.

        The per-example callbacks read a layer's rows as the examples; a sequence-first layer,
        inputs reshaped to ``(N*T, d)`` or a layer on features broadcast over the batch would give
        wrong numbers (:mod:`curvlab._layout`). Leading sizes other than the batch size settle it
        at once; equal ones are confirmed by a forward pass on fewer examples (two, or one),
        replaying the step's call (its other arguments cut alike) in its autocast region, once
        per model and input signature (remembered in the sampler's ``layouts``,
        :class:`ConfirmedLayouts`, with the tapped modules and their inputs' and outputs' shapes
        and strides). Where that pass cannot
        run (a model that needs more examples), the leading sizes decide, as they did before the
        probe existed. Without the step's inputs nothing can be confirmed: the separate pass
        measures.
        """
        inputs = self.model_input
        if inputs is None:
            return False
        n = num_examples(inputs)
        if misplaced(self._sizes, n, None):
            return False
        if n == 1:
            return True
        key = self._layout_key(inputs)
        if self._layouts is not None and self._layouts.confirmed(self.model, key):
            return True
        modules = {name: self.layers[name][0] for name in self._sizes}
        m = probe_size(n)
        try:
            # the tensors the probe's forward stores on modules (a cached activation) are put
            # back: the training forward's, not the probe's 2 examples (review s24)
            with own_pass(self.model.parameters()), plain_attributes_kept(self.model.modules()):
                few, _ = probe_one_example(
                    self.model, inputs, modules, m, self._call, self._autocast
                )
        except Exception:  # noqa: BLE001 - the probe cannot run: the leading sizes decide
            few = None
        if few is not None and misplaced(self._sizes, n, few, m):
            return False
        if self._layouts is not None:
            self._layouts.confirm(self.model, key)
        return True

    def _layout_key(self, inputs: Any) -> tuple[Any, ...]:
        """What a confirmation of the tapped layers' layout holds for (:class:`ConfirmedLayouts`;
        the model is its other half): the input signature and, per tapped layer that ran, its
        name, the module (a weak reference: a replaced layer is not the confirmed one) and its
        input's and output's shapes after the batch axis and strides."""
        return (
            _signature(inputs),
            tuple(
                (name, weakref.ref(self.layers[name][0]), self._arrangement.get(name))
                for name in sorted(self._sizes)
            ),
        )

    def output_examples_first(self) -> bool:
        """Whether the model's output held the step's examples on its first axis.

        Its leading size must be the batch size, and (for more than one example, where that size
        may be a coincidence: a sequence-first model's ``(T, N, V)`` with ``T == N``) a forward
        pass on fewer examples gives that leading size (once per model, input signature and the
        output's shape after the batch axis and strides, remembered in the sampler's ``layouts``,
        :class:`ConfirmedLayouts`). Runs during the step's forward, before its backward pass.
        """
        inputs, shape = self.model_input, self.model_output_shape
        if inputs is None or shape is None or len(shape) == 0:
            return False
        n = num_examples(inputs)
        if shape[0] != n:
            return False
        if n == 1:
            return True
        meta = self._out_meta
        key = ("output", _signature(inputs), None if meta is None else (meta[1][1:], meta[2]))
        if self._layouts is not None and self._layouts.confirmed(self.model, key):
            return True
        m = probe_size(n)
        try:  # curvlab's own forward: the step's hooks leave it alone
            with own_pass(self.model.parameters()):
                _, lead = probe_one_example(self.model, inputs, {}, m, self._call, self._autocast)
        except Exception:  # noqa: BLE001 - the probe cannot run: the leading size decides
            lead = m
        if lead != m:
            return False
        if self._layouts is not None:
            self._layouts.confirm(self.model, key)
        return True

    def batch_size(self) -> int:
        """Number of examples of the step: the model input's batch size (raises if the loss never
        ran). A GPT loop that flattens ``(B, T)`` tokens for the loss still has ``B`` examples."""
        if self.loss_output is None:
            raise RuntimeError(
                "the loss function was not called inside the noise-capturing step: compute "
                "loss = loss_fn(model(inputs), targets) with the loss module given to "
                "NoisyOptimizer, that same module instance (not a copy, not F.cross_entropy)"
            )
        if self.model_input is not None:
            return num_examples(self.model_input)
        return int(self.loss_output.shape[0])

    def step_targets(self, sampler: str = "the sampler") -> Any:
        """The loss call's targets shaped for a separate pass of ``loss_fn(model(inputs), targets)``.

        The loss input was made from the model's output by the operations the loss call found
        in the autograd graph (:func:`~curvlab.noise._roots._loss_path`): reshapes (a
        batch-major flatten ``(B*T, C)``), permutations (``out.transpose(1, 2)``, torch's
        class-axis-1 layout) and copies. The targets are put back in the model output's order
        (a time-major flatten ``out.transpose(0, 1).reshape(-1, C)`` took them time-major), and
        :meth:`classes_last` says where the output holds the classes.

        Raises:
            RuntimeError: if the loss input was not made from the model's output by such
                operations (selected or shifted tokens, a slice of the vocabulary, scaled
                logits), or by ones that do not keep the classes on one axis of it: a separate
                pass would measure another objective (before these checks, a time-major flatten
                paired its targets with other tokens' logits, and with ``T == C`` the targets
                of selected tokens or of ``out.transpose(1, 2)`` were read with the positions
                as classes).
        """
        if self._separate is None:
            self._separate = self._separate_call(sampler)
        return self._separate[0]

    def classes_last(self) -> bool:
        """Whether the model's output holds the classes in its last axis (loss input made by a
        flatten ``(B*T, C)`` or ``out.transpose(1, 2)`` of ``(B, T, C)`` logits), which a separate
        pass must be told (with ``T == C`` torch's layout fits ``(B, T, C)`` against ``(B, T)``
        too). Call :meth:`step_targets` first."""
        return self._separate is not None and self._separate[1]

    def _separate_call(self, sampler: str) -> tuple[Any, bool]:
        """:meth:`step_targets` and :meth:`classes_last` (raising what the former documents)."""
        target, out, shape = self.loss_target, self.loss_output, self.model_output_shape
        if isinstance(out, Tensor) and shape is not None and out.numel() != shape.numel():
            self._cannot_rebuild(
                sampler,
                f"the loss was called on {tuple(out.shape)} values, not on the model's output "
                f"{tuple(shape)} or a reshape of it (selected or shifted tokens?)",
            )
        path = self._path
        if not isinstance(out, Tensor) or shape is None or path is None:
            return target, False  # the model's output was not seen: the targets as they are
        done = None
        if not isinstance(path, str):
            ce = isinstance(loss_module(self.loss_fn), nn.CrossEntropyLoss)  # compiled too
            done = _separate_targets(path, tuple(shape), tuple(out.shape), target, ce)
        if done is None:
            how = f"by {path}" if isinstance(path, str) else "by a reshape that splits the classes"
            hint = _PATH_HINTS.get(path, "") if isinstance(path, str) else ""
            self._cannot_rebuild(
                sampler,
                f"the loss input {tuple(out.shape)} was made from the model's output "
                f"{tuple(shape)} {how}, not by a reshape, transpose or permutation of it that "
                "keeps the classes on one axis (selected or shifted tokens, scaled or changed "
                f"logits?{hint})",
            )
        if done[1] and isinstance(target, Tensor) and target.is_floating_point():
            raise RuntimeError(
                f"{sampler} measures this step's curvature in a separate pass of "
                f"loss_fn(model(inputs), targets), but the loss got class-probability targets "
                f"for logits that the model's output {tuple(shape)} holds with the classes in its "
                "last axis; curvlab reads class probabilities with the classes in axis 1 only "
                "(torch's layout). Return (B, C, ...) logits from the model, or use a sampler "
                "that measures in the step itself (DiagFisherNoise/KFACNoise('empirical') on "
                "Linear/Conv layers)"
            )
        return done

    def _cannot_rebuild(self, sampler: str, what: str) -> None:
        """Raise: the separate pass cannot rebuild the loss input (``what`` says how it was
        made), naming why the step needs that pass where a sampler said so
        (:attr:`separate_cause`), else that the pass would measure another objective."""
        fix = (
            "Call the loss on the model's output (flattened or transposed if you like), marking "
            "positions to skip with the loss's ignore_index, or call noisy.step(inputs=..., "
            "targets=...) with targets shaped for loss_fn(model(inputs), targets)"
        )
        if self.separate_cause is None:
            raise RuntimeError(
                f"{sampler} measures this step's curvature in a separate pass of "
                f"loss_fn(model(inputs), targets), but {what}: that pass would measure another "
                f"objective. {fix}"
            )
        cause, remedy = self.separate_cause
        raise RuntimeError(
            f"{sampler} {cause}, so this step needs a separate pass of loss_fn(model(inputs), "
            f"targets), which cannot rebuild this step's loss input: {what}. {remedy}; or "
            f"{fix[0].lower()}{fix[1:]}"
        )

    # -------------------------------------------------------------- context manager
    def __enter__(self) -> Taps:
        # compiled models and steps run eagerly inside the block: dynamo does not guard on module
        # hooks, so compiled code may silently skip these (docs/training-loops.md)
        self._eager = eager_code()
        self._eager.__enter__()
        self._active = True
        if self._reads_roots:
            _LIVE.append(self)
        if self._checks:  # (one walk of the modules' hook tables per capture)
            hooked = user_backward_hook(self.model)
            if hooked is not None:
                self._hooked_model(hooked)
        self._handles.append(
            self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(self._model_post))
        if self.loss_fn is not None:
            self._handles.append(self.loss_fn.register_forward_pre_hook(self._loss_pre))
            self._handles.append(self.loss_fn.register_forward_hook(self._loss_post))
        if self.on_forward is not None or self.on_backward is not None:
            # first of the forward hooks: the layer's own output, a forward hook of the user's
            # that changes it is downstream of the layer (read at the hooked output, the
            # captured Fisher diagonal was 0.25x for 2 * out + 0.1, found in review s19)
            self._handles += first_forward_hooks(
                {module: self._layer_hook(name) for name, (module, *_rest) in self.layers.items()},
                with_kwargs=True,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._active = False
        self._end_hook_watch()  # (the forward raised: _model_post never ran)
        if self in _LIVE:
            _LIVE.remove(self)
        # autograd nodes hold the hooks' closures (and so this object): a cycle through C++
        self._marks.clear()
        self._loss_nodes.clear()
        self._scaler_nodes.clear()
        self._out_edge = None
        self._first_loss = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._fragile.clear()  # holds layer outputs (their graph) only until the loss call
        self.scratch.pop("output", None)
        eager, self._eager = getattr(self, "_eager", None), None
        if eager is not None:
            eager.__exit__(exc_type, exc, tb)

    # -------------------------------------------------------------- hooks
    def _model_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._live():
            return
        self.calls += 1
        caller = _curvlab_caller()  # a few frames: the code that called the model
        if self.calls > 1:
            raise RuntimeError(_second_call(caller, self._first_caller))
        self._first_caller = caller
        self._seen.clear()
        self._sizes.clear()
        self._arrangement.clear()
        self._got_grad.clear()
        # the call as the step made it, for the layout probe (tensors detached)
        self._call = (
            tuple(a.detach() if isinstance(a, Tensor) else a for a in args),
            {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()},
        )
        self._autocast = _autocast_state()
        self._fragile.clear()
        self.left_out = _left_out(module, args, kwargs)
        if args and isinstance(args[0], Tensor):
            self.model_input = _held(args[0])
        elif not args and kwargs:  # model(**inputs), as HuggingFace models are called
            tensors = {k: v for k, v in kwargs.items() if isinstance(v, Tensor) and v.ndim > 0}
            if tensors:  # per-example tensors only (not e.g. the HF Trainer's num_items_in_batch)
                n = next(iter(tensors.values())).shape[0]
                tensors = {k: _held(v) for k, v in tensors.items() if v.shape[0] == n}
            self.model_input = tensors or None
        # the tensor hooks of the user's that the forward registers (a gradient-reversal or
        # gradient-scaling layer's h.register_hook(lambda g: -g)): they act in the step's
        # backward pass, on the gradients captured (and on a noise folded into it), but are no
        # part of the loss (see _end_hook_watch)
        self._end_hook_watch()
        self._hook_watch = TensorHookWatch(off=False).start()

    def _end_hook_watch(self) -> None:
        """Close the watch on the step's forward pass, if open: a tensor hook of the user's
        registered in it changes the step's gradients, not the loss, and sends the step to the
        separate pass, which runs without it (:func:`curvlab._notrace.tensor_hooks_off`), as a
        module backward hook does (a hook tripling a hidden layer's gradient gave a captured
        empirical Fisher diagonal 9x the loss's for the layers below it, found in review s19)."""
        watch, self._hook_watch = self._hook_watch, None
        if watch is None:
            return
        watch.stop()
        if watch.seen and self._tensor_hooked is None:
            self._tensor_hooked = watch.seen[0]
            if self.separate_cause is None:
                self.separate_cause = (
                    f"found a tensor hook of yours registered in the model's forward pass "
                    f"({watch.seen[0]}), which changes this step's gradients but not the loss "
                    "whose curvature it measures",
                    "Remove the hook for the noisy steps",
                )

    def _model_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._end_hook_watch()
        if not self._live():
            return
        out = first_tensor(output)  # a Tensor, its .logits, or the first tensor of a tuple
        self.model_output_shape = out.shape if isinstance(out, Tensor) else None
        self._out_edge = self._out_meta = None
        if isinstance(out, Tensor):
            if out.grad_fn is not None:  # held until the loss call (see _loss_path)
                self._out_edge = (out.grad_fn, out.output_nr)
            try:  # metadata only, no synchronisation
                self._out_meta = (out.data_ptr(), tuple(out.shape), tuple(out.stride()))
            except RuntimeError:  # a tensor without storage
                self._out_meta = None
        if self._reads_roots and isinstance(out, Tensor):
            self._mark(out)
        if self.on_output is not None and isinstance(out, Tensor) and out.requires_grad:
            self.on_output(out)

    def _loss_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self._live() or len(args) < 2:
            return
        output, target = args[0], args[1]
        grad = isinstance(output, Tensor) and output.requires_grad and torch.is_grad_enabled()
        if grad:
            self.loss_calls += 1
            if self.loss_calls > 1:  # mixup, one loss per head: the captured sums mix the calls
                self.exact = False
                self._compare_call(output, target)
                self._call_on_loss(output, target)
                return
            self._first_loss = (_weak(output), _weak(target))
        elif self.loss_calls or self.loss_output is not None:
            return  # a call without gradients (logging) after the step's loss call: not the step
        # detached: a graph-holding output would close a cycle through the C++ autograd graph
        # (output -> grad_fn -> the layer hooks' closures -> self) that Python's gc cannot free,
        # leaking every step's graph, activations and the model
        self.loss_output = output.detach() if isinstance(output, Tensor) else output
        self.loss_target = target.detach() if isinstance(target, Tensor) else target
        self._path = self._loss_input_path(output)
        if grad:
            self._out_edge = None  # (the node would hold this object in a cycle through C++)
        if not grad:  # no backward pass goes through this call (yet): nothing to check
            if isinstance(output, Tensor):
                self._call_on_loss(output, target)
            return
        if self._checks and not self._backward_hooked:
            # again: a module backward hook registered inside the block (or by the model's own
            # forward) acts on the step's gradients too; missed, the captured empirical Fisher
            # diagonal of the layers below a hook doubling an inner layer's output gradient was
            # 4x the loss's, the noise 2.0x the separate pass's (found in review s20). A walk
            # of the modules' hook tables, as at the capture's start: no graph, no host
            hooked = user_backward_hook(self.model)
            if hooked is not None:
                self._hooked_model(hooked)
        self._check_hooks_between(output)
        fragile, self._fragile = self._fragile, []
        if any(out._version != version for _, out, version in fragile):
            self._missed = True  # a hooked view changed in place: its gradient hook cannot fire
        if self._params is not None:
            fired = set()
            for lname in self._seen:
                _, wname, bname = self.layers[lname]
                fired.update(n for n in (wname, bname) if n is not None)
            uses = parameter_uses(output, self._params)
            exact = all(u == (1 if n in fired else 0) for n, u in uses.items())
            self.exact = self.exact and exact
        self._call_on_loss(output, target)

    def _check_hooks_between(self, loss_input: Tensor) -> None:
        """Before the step's backward pass: make the step inexact where a module backward hook
        (``register_full_backward_hook``, ``register_full_backward_pre_hook``) of a module called
        between the model's output and the loss, outside the model (``loss_fn(post(model(x)),
        y)``), acts on the gradient the loss gives the model (:func:`_hooked_between`; a walk of
        the autograd graph, no synchronisation). Like a hook on the model, it changes the step's
        gradients, not the loss: captured, the Fisher diagonal's noise (and FullFisherNoise's,
        folded in at the loss input) was 2.0x the separate pass's under a hook doubling
        ``grad_input`` (found in review s20). The step draws in the separate pass of
        ``loss_fn(model(inputs), targets)``, which does not call that module. Whether a hook
        changes the gradient cannot be told (a logger's does not): any such hook counts. A hook
        node where the model has a backward hook of the user's on a module or a global one
        (:func:`curvlab._notrace.user_backward_hook`) may be the model's own: that case was
        found at the capture's start (FullFisherNoise: in its fold), and is named as such."""
        if not self._reads_roots or not _hooked_between(loss_input, self._marks):
            return
        hooked = user_backward_hook(self.model)  # (a walk of the modules, on such steps only)
        if hooked is not None:  # the model's own hook, or a global one
            if self._checks and not self._backward_hooked:  # registered inside the block
                self._hooked_model(hooked)
            return
        self._backward_hooked = True
        if self.separate_cause is None:
            self.separate_cause = (
                "found a module backward hook between the model's output and the loss (on a "
                "module of yours called on the model's output, outside the model), which "
                "changes this step's gradients but not the loss whose curvature it measures",
                "Remove the hook for the noisy steps, or call that module inside the model",
            )

    def _hooked_model(self, hooked: str) -> None:
        """Record a module backward hook of the user's on the model, or a global one (``hooked``
        says which: :func:`curvlab._notrace.user_backward_hook`): the step is inexact."""
        self._backward_hooked = True
        if self.separate_cause is None:
            self.separate_cause = (
                f"found {hooked} of yours, which changes this step's gradients but not the "
                "loss whose curvature it measures",
                "Remove the hook for the noisy steps",
            )

    def _call_on_loss(self, output: Any, target: Any) -> None:
        """:attr:`on_loss` (FullFisherNoise's fold), unless a tensor hook of the user's was
        registered in the step's forward pass, or a module backward hook between the model's
        output and the loss was found (:meth:`_check_hooks_between`): it would act on the folded
        noise as on the step's gradients, and the step draws in the separate pass instead
        (:meth:`_end_hook_watch`)."""
        if self.on_loss is None or self._tensor_hooked is not None or self._backward_hooked:
            return
        with without_autocast():
            self.on_loss(output, target)

    def _compare_call(self, output: Tensor, target: Any) -> None:
        """Record how a second loss call differs from the first (:attr:`loss_calls_differ`)."""
        assert self._first_loss is not None
        first_output, first_target = (
            ref() if ref is not None else None for ref in self._first_loss
        )
        if output is not first_output:
            self.loss_calls_differ = "outputs"
        elif target is not first_target and self.loss_calls_differ is None:
            self.loss_calls_differ = "targets"

    def _loss_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self._live() or not isinstance(output, Tensor) or not output.requires_grad:
            return None

        def record(g: Tensor) -> None:  # runs before any layer's gradient (the loss comes first)
            if self._live():
                self.loss_scale = g.detach().reshape(())

        output.register_hook(record)
        if not self._reads_roots:
            return None
        if isinstance(output, _StepLoss):  # a second NoisyOptimizer's capture wrapped it first
            plain = output._curvlab_plain
            if plain.grad_fn is not None:  # its roots check reaches this capture too (_LIVE)
                self._loss_nodes.add(plain.grad_fn)
            return None
        if type(output) is not Tensor or output.grad_fn is None:
            return None
        self._loss_nodes.add(output.grad_fn)
        return _step_loss(output)  # sees the backward call (module docstring)

    def _check_roots(self, roots: list[Tensor], seeds: list[Any] | None = None) -> bool:
        """Before a backward pass from ``roots`` runs: does it reach the model's output or a
        tapped layer's output other than through the loss module's output? (No synchronisation:
        a walk of the autograd graph above the loss, stopping at it.) With :attr:`on_roots`,
        tell it whether the pass gives the loss output the gradient 1 times a GradScaler's scale
        (``seeds``: the roots' explicit gradients, ``None`` for the implicit 1; one other than
        a CPU ``1`` is not known to be that).
        Returns whether it checked (then :attr:`_checking` is to be set while the pass runs)."""
        if not self._live() or not self._loss_nodes:
            return False
        others = self._checks and not self._other_terms
        if others and _reaches(roots, self._loss_nodes, self._marks):
            self._other_terms = True
        if not self._vanished and _vanishing_gradient(
            roots, self._loss_nodes, self._scaler_nodes, self._marks, seeds
        ):
            self._vanish()  # (loss * 0.0).backward(): nothing to divide by, nor to fold into
        if self.on_roots is not None:
            unit, factor = _loss_gradient(
                roots, self._loss_nodes, self._scaler_nodes, self._marks, seeds
            )
            self.on_roots(unit, factor)
        return True

    def _loss_input_path(self, loss_input: Any) -> list[Any] | str | None:
        """How the loss input was made from the model's output (:func:`_loss_path`), or
        ``None`` when the model's output was not seen. A loss input without a graph (a
        call on a detached output, for logging) is the model's output or a row-major reshape of
        it where it shares its memory, else unknown."""
        meta = self._out_meta
        if not isinstance(loss_input, Tensor) or meta is None:
            return None
        if self._out_edge is not None and loss_input.grad_fn is not None:
            try:  # inside the user's loss call: never an error there
                return _loss_path(loss_input, self._out_edge)
            except (AttributeError, RuntimeError, TypeError, ValueError):
                return "an operation whose saved arguments could not be read"
        try:
            same = loss_input.data_ptr() == meta[0] and loss_input.numel() == math.prod(meta[1])
        except RuntimeError:
            same = False
        if same and (loss_input.shape, loss_input.stride()) == (meta[1], meta[2]):
            return []
        if same and loss_input.is_contiguous() and _contiguous(meta[1], meta[2]):
            return [("reshape", meta[1], tuple(loss_input.shape), ())]
        return "a tensor that is not computed from the model's output"

    def _mark(self, output: Tensor) -> None:
        """Remember the autograd node(s) that receive ``output``'s gradient (also its base's)."""
        node, base = output.grad_fn, output._base
        if node is not None:
            self._marks.add(node)
        if base is not None and base.grad_fn is not None:  # where the hook sits for a view
            self._marks.add(base.grad_fn)

    def unscaled(self, g: Tensor) -> Tensor:
        """``g`` divided by :attr:`loss_scale` (a GradScaler's scale; itself without one).

        A ``loss_scale`` of 0 or one that is not finite gives no usable quotient; such a step is
        sent to the separate pass (:meth:`gradient_vanished`) where a constant in the graph shows
        it, before the quotients are read.

        A 16-bit ``g`` is upcast first: divided in float16, the small values the scale protects
        would fall to subnormals or zero again (under float16 autocast the captured diagonal of
        a first layer was 21% off, K-FAC's output factor 66%).
        """
        return g if self.loss_scale is None else upcast(g) / self.loss_scale

    def _layer_hook(
        self, name: str
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if not self._live() or not isinstance(output, Tensor) or not output.requires_grad:
                return
            x = call_input(module, args, kwargs)  # layer(x) or layer(input=x) (found in review)
            if not isinstance(x, Tensor):  # no input to read: the separate pass measures
                self._missed = True
                return
            if getattr(fwAD, "_current_level", -1) >= 0:
                # a forward-mode AD level is open (dual numbers, a physics-informed network's
                # du/dx): the tangents' graph uses the weights outside the layer calls, which
                # no tap sees; the separate pass refuses such a model by name (its captured
                # noise was the hooks' wrong per-example gradients; review s25, RX3-1)
                self._missed = True
                return
            count = self._seen.get(name, 0) + 1
            self._seen[name] = count
            if count > 1:  # per-layer taps need each layer once: the separate pass measures it
                self._missed = True  # (result() is None; it raised before, though sample() and
                return  # step(inputs=...) handle such a model)
            a = x.detach()
            self._sizes[name] = [(leading(a), leading(output))]
            self._arrangement[name] = (_arranged(a), _arranged(output))
            if self._checks:
                self._mark(output)
            if self.on_forward is not None:
                with without_autocast():  # the user's autocast region: curvlab sums in float32
                    self.on_forward(name, module, a)
            if self.on_backward is not None:
                callback = self.on_backward

                def grad_hook(g: Tensor) -> None:
                    if not self._live() or self._other_terms:
                        return  # (another term reaches the layers: a separate pass measures)
                    if not self._checking:  # a backward pass the graph check did not see
                        self._unchecked = True
                        return
                    if torch.is_grad_enabled() or name in self._got_grad:
                        # a backward pass that builds a graph (a penalty's inner gradient) or a
                        # second one through this layer: its output gradient is not the loss's
                        # alone, so the captured curvature would be off; a separate pass
                        self._missed = True
                        return
                    self._got_grad.add(name)
                    with without_autocast():
                        callback(name, module, a, self.unscaled(g.detach()))

                if not _hook_output_grad(output, grad_hook):
                    self._fragile.append((name, output, output._version))

        return hook


# frames between a model-call hook and the code that called the model (torch's module call,
# compiled-code machinery, context managers, the backends' libraries)
_THROUGH = ("torch", "contextlib", "functools", "backpack", "curvlinops")


def _curvlab_caller() -> str | None:
    """The curvlab function whose call ran the model now (the outermost of the curvlab frames
    between the model call and the caller's own code: ``trace``, ``diag_fisher``), or ``None``
    when the caller's own code called it. Reads the Python frames, no tensors."""
    frame = sys._getframe(1)
    found = wrapper = None
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        top = module.split(".", 1)[0]
        if top == "curvlab" and module != __name__:
            code = frame.f_code
            name = getattr(code, "co_qualname", code.co_name)
            if "<locals>" in name:  # a decorator's wrapper: name the function it wraps
                wrapper = wrapper or name
            else:
                found = name
        elif top not in _THROUGH and module != __name__:
            break  # the caller's own code (or a library's that runs its step)
        frame = frame.f_back
    return found or wrapper


def _second_call(now: str | None, first: str | None) -> str:
    """The error of a second model call inside a capture, naming the curvlab function that made
    it (``now``) or the first one (``first``) where one did."""
    who = now or first
    if who is not None:
        when = "" if now is not None else " (the first of the two calls, before the step's own)"
        return (
            f"curvlab's {who}() ran a forward pass of the model inside a noise-capturing step"
            f"{when}: NoisyOptimizer.capture() and step(closure) read the step's one forward "
            "and backward pass on the steps that measure curvature, and cannot tell a pass of "
            f"{who}() from a second forward of the step. Call {who}() outside the capture: "
            "before it, or after noisy.step() (inside the step, curvlab.Diagnostics, the "
            "noise samplers' sample() and curvlab's penalties run passes the capture leaves "
            "alone)"
        )
    return (
        "the model was called more than once inside one noise-capturing step; call it once "
        "per step (one forward, one backward; curvlab's penalties and Diagnostics may run "
        "forwards of their own), or use NoisyOptimizer.step(inputs=, targets=) after your own "
        "backward instead. curvlab's own entry points (curvlab.trace, diag_fisher, "
        "curvature_operator, analyze, Diagnostics, ...) may run inside the capture: their "
        "passes are left alone. A capture block entered by hand (a Trainer callback) and "
        "left open by a step that raised inside it: close it with noisy.abort_capture()"
    )


def _vanishing_gradient(
    roots: list[Tensor],
    stops: set[Any],
    scaler_nodes: set[Any],
    marks: set[Any],
    seeds: list[Any] | None = None,
) -> bool:
    """Whether a backward pass from ``roots`` (with the gradients ``seeds``, ``None`` for the
    implicit 1) surely gives the loss output (its node one of ``stops``) a gradient of 0 or one
    that is not finite: one path from one root reaches it, and on it the root's explicit gradient,
    a constant the loss is multiplied by (``loss * 0.0``, ``0.0 * loss``, ``loss * w`` with a
    warm-up weight ``w = 0``) or one it is divided by (``loss / 0``, ``loss / inf``) is 0 or not
    finite. Only constants readable without a host synchronisation count (Python numbers, CPU
    tensors of one element, as :func:`~curvlab.noise._roots._loss_gradient` reads them); the
    rest answers ``False``. A GradScaler's products (``scaler_nodes``) are passed unread: its
    scale is finite and positive. A walk of the autograd graph above ``marks`` (the model's
    output)."""
    seeds = seeds if seeds is not None else [None] * len(roots)
    tops = [r.grad_fn for r in roots if r.grad_fn is not None]
    if not tops:
        return False
    reach = reaching(tops, stops, marks)
    found = [(r, g) for r, g in zip(roots, seeds) if r.grad_fn is not None and reach[r.grad_fn]]
    if len(found) != 1:
        return False
    root, seed = found[0]
    if root.numel() == 1 and _zero_or_nonfinite(seed):
        return True
    node, seen = root.grad_fn, set()
    while node not in stops and node not in seen:
        seen.add(node)
        edges = [
            (i, nxt)
            for i, (nxt, _) in enumerate(node.next_functions)
            if nxt is not None and reach.get(nxt, False)
        ]
        if len(edges) != 1:  # the loss used twice: not one factor on the way
            return False
        if node not in scaler_nodes and _zero_or_nonfinite(_constant_factor(node, edges[0][0])):
            return True
        node = edges[0][1]
    return False


def _constant_factor(node: Any, index: int) -> Any:
    """The constant by which ``node`` multiplies the gradient of its input ``index`` (for a
    quotient ``a / b`` with the loss in ``a``: the divisor ``b``, 0 or not finite where the
    quotient's factor is), or ``None`` for any other node or one whose operands are not saved."""
    name = node.name()
    try:
        if name in ("MulBackward0", "MulBackward1"):  # a * b: the gradient of a is b's
            return node._saved_self if index == 1 else node._saved_other
        if name in ("DivBackward0", "DivBackward1") and index == 0:  # a / b, the loss a
            return node._saved_other
    except (AttributeError, RuntimeError):  # not saved, or changed in place since
        return None
    return None


def _zero_or_nonfinite(value: Any) -> bool:
    """Whether ``value`` is 0 or not finite: a Python number, or a one-element real tensor on
    the CPU (a Python scalar's wrapped tensor is), read without a host synchronisation. Anything
    else (a tensor on an accelerator, of several elements) answers ``False``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        return False
    if not isinstance(value, Tensor):
        return value == 0 or not math.isfinite(value)
    if value.numel() != 1 or value.device.type != "cpu" or value.is_complex():
        return False
    try:
        number = float(value.detach().reshape(()).item())
    except (RuntimeError, TypeError, ValueError):  # a tensor without data (meta, fake)
        return False
    return number == 0 or not math.isfinite(number)


def _layer_params(layers: dict[str, tuple[nn.Module, str, str | None]]) -> dict[str, nn.Parameter]:
    """The parameters of the tapped layers by name (``name -> (module, weight, bias)``): those
    whose gradients the layer callbacks stand for, each to be reached through its layer alone."""
    params: dict[str, nn.Parameter] = {}
    for module, wname, bname in layers.values():
        params[wname] = module.weight
        if bname is not None:
            params[bname] = module.bias
    return params


def _hook_output_grad(output: Tensor, hook: Callable[[Tensor], None]) -> bool:
    """Call ``hook(g)`` with the gradient at ``output`` in the backward pass, even if the model
    later changes ``output`` in place.

    A layer output that is a view (``F.linear`` on inputs of more than two dimensions returns its
    2-D result reshaped, an unbatched convolution its result squeezed) loses the backward node it
    had when it is changed in place (``z = layer(h); z += h``): autograd routes the gradient past
    that node, so a tensor hook on the view never fires. Such an output is a plain reshape of its
    base, so the gradient edge of the base (its node survives the in-place change) carries the
    same gradient, reshaped; it is read there by a node pre-hook. Any other output gets an ordinary
    tensor hook, which survives an in-place change of a non-view tensor.

    Returns:
        ``False`` when the hook sits on a view that is not a plain reshape of its base: if that
        view is changed in place the hook will not fire (the caller checks its version).
    """
    base = output._base if output._is_view() else None
    if base is None:
        output.register_hook(hook)
        return True
    if not (
        base.requires_grad
        and base.numel() == output.numel()
        and base.storage_offset() == output.storage_offset()
        and base.is_contiguous()
        and output.is_contiguous()
    ):
        output.register_hook(hook)
        return False
    edge = get_gradient_edge(base)
    index, shape = edge.output_nr, output.shape

    def prehook(grad_outputs: tuple[Tensor | None, ...]) -> None:
        g = grad_outputs[index]
        if g is not None:
            hook(g.reshape(shape))

    edge.node.register_prehook(prehook)
    return True


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether ``shape`` and ``stride`` are those of a contiguous (row-major) tensor."""
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _autocast_state() -> tuple[str, torch.dtype] | None:
    """``(device_type, dtype)`` of the autocast region running now, or ``None``."""
    for device in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device):
                return device, torch.get_autocast_dtype(device)
        except (TypeError, AttributeError):  # older torch: no device argument
            return None
    return None


def _arranged(t: Tensor) -> tuple[Any, ...]:
    """A tensor's shape after the batch axis and its strides (``None`` for a layout without
    strides): metadata only, no synchronisation. Tells a layer called on a transposed input
    (sequence-first) from one called on the input as it is, where the sizes agree (``T == N``)."""
    try:
        stride: tuple[int, ...] | None = tuple(t.stride())
    except (RuntimeError, NotImplementedError):  # sparse, nested: no strides
        stride = None
    return tuple(t.shape[1:]), stride


def _held(t: Tensor) -> Tensor:
    """A model input of the step for a separate pass: detached (no graph of the step's kept),
    a fresh leaf that requires grad where the step's did (a view, nothing copied), as
    :func:`curvlab._data.as_data` hands the batch on. Detached alone, the input of a model that
    differentiates in its inputs (a physics-informed network's ``du/dx``) no longer required
    grad, and the separate pass raised torch's "One of the differentiated Tensors does not
    require grad" before the refusal of such a model could name it (review s25)."""
    return t.detach().requires_grad_(t.requires_grad)


def _signature(inputs: Any) -> tuple[Any, ...]:
    """What a layout confirmation holds for: each input tensor's name, shape after the batch
    axis, dtype and device."""
    tensors = inputs.items() if isinstance(inputs, dict) else [("", inputs)]
    return tuple((k, tuple(v.shape[1:]), v.dtype, v.device) for k, v in tensors)


# keyword arguments of a HuggingFace model call that change neither its logits nor the examples
# they hold (the Trainer's loss normaliser, switches of the output's format)
_NO_EFFECT = frozenset(
    {"num_items_in_batch", "use_cache", "return_dict", "output_attentions", "output_hidden_states"}
)


def _left_out(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """What of the model call ``module(*args, **kwargs)`` a separate pass on
    :attr:`Taps.model_input` would not pass the model (see there): every argument but the first
    positional tensor, or, for ``model(**inputs)``, every keyword that is no tensor with the
    examples in its first dimension, unless it is its ``forward``'s default (``None`` where that
    is unknown) or in :data:`_NO_EFFECT`; keyword tensors of different leading sizes (one
    broadcast over the batch, as HuggingFace's ``position_ids`` of shape ``(1, T)``) as one entry.
    Empty where nothing is recorded as the model input (the separate pass refuses then anyway).
    """
    found: list[str] = []
    params = _forward_parameters(module) if len(args) > 1 or kwargs else {}
    if args and isinstance(args[0], Tensor):
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [n for n, p in params.items() if p.kind in kinds]
        for i, a in enumerate(args[1:], 1):
            if not _is_default(params.get(names[i]) if i < len(names) else None, a):
                found.append(f"positional argument {i + 1} ({_what(a)})")
        others = kwargs
    elif not args and kwargs:
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, Tensor) and v.ndim > 0}
        if len({v.shape[0] for v in tensors.values()}) > 1:
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            found.append(f"keyword tensors of different leading sizes {shapes}")
        others = {k: v for k, v in kwargs.items() if k not in tensors}
    else:
        return []
    for k, v in others.items():
        if k not in _NO_EFFECT and not _is_default(params.get(k), v):
            found.append(f"keyword argument {k}= ({_what(v)})")
    return found


def _forward_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    """The parameters of ``module.forward`` by name (empty where its signature is unknown)."""
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _is_default(param: inspect.Parameter | None, value: Any) -> bool:
    """Whether ``value`` is what the ``forward`` parameter ``param`` takes when it is not passed
    (``None`` counts as that where the parameter or its default is unknown)."""
    if param is None:
        return value is None
    default = param.default
    if default is inspect.Parameter.empty:
        return False
    if value is default:
        return True
    if isinstance(value, Tensor) or isinstance(default, Tensor):
        return False
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, default))
    if type(value) is not type(default) and not numbers:  # (gain=1 for a default of 1.0)
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - a value that cannot be compared is no default
        return False


def _what(value: Any) -> str:
    """A short description of an argument for a message."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
