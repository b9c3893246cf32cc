"""The BackPACK backend: one-pass per-example and second-order quantities.

Every primitive here works on the *negative log-likelihood sum* ``sum_n NLL_n`` of one chunk of
examples (see :mod:`curvlab._losses`), never on the user's reduction: scaling to the ``"mean"`` or
``"sum"`` objective happens once, in :mod:`curvlab.quantities`. BackPACK's forward/backward hooks are
installed on the user's model for the duration of a :func:`extended` block and removed afterwards,
together with every attribute BackPACK stores on modules and parameters. Modules with
``inplace=True`` (which BackPACK's full backward hooks refuse on a hooked layer's output) run out
of place on tensors that require grad, checked on every forward pass to compute the model's own
function (:class:`~curvlab.backends._base.InplaceGuard`; else a hand-over); the user's flags are
put back, also the ones BackPACK's graph converter turns off. For a 16-bit model the extensions'
parameter rules square and sum float32 copies of the 16-bit values
(:func:`~curvlab.backends._backpack_fields._upcast_products`), and the loss factors of the
exact GGN and the Hessian diagonal, and the output gradient of the Hessian diagonal's residual
terms, are float32 scaled by powers of two before the 16-bit backward pass (undone exactly);
float32/float64 models run BackPACK's own rules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from backpack import disable, extend, hook_run_extensions, hook_store_io
from backpack import extensions as bext
from backpack.context import CTX
from backpack.utils.module_classification import is_no_op
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils.hooks import RemovableHandle

from curvlab._data import (
    Inputs,
    check_inputs_fit,
    dtype_errors_named,
    fresh_inputs,
    raise_if_part_failed,
    slice_inputs,
)
from curvlab._layout import (
    MISPLACED_HINT,
    Sizes,
    misplaced,
    probe_one_example,
    probe_size,
    recording,
)
from curvlab._losses import LossSpec, name_invalid_labels
from curvlab._notrace import _users, first_forward_hooks, tensor_hooks_off
from curvlab._precision import is_sixteen
from curvlab._scan import ModelScan, scan_model
from curvlab._warn import warn_explicit_once
from curvlab.backends._backpack_fields import (
    GRAD32,
    _extended_sum_loss,
    _extending,
    _extension,
    _field,
    _release_extensions,
    _unseen,
    _zero_grads,
    _zeros,
    scaled_residual_output,
)
from curvlab.backends._base import (
    PRIMITIVES,
    Handover,
    InplaceGuard,
    ModelFacts,
    in_place_modules,
    parameter_uses,
)
from curvlab.backends._layers import draw_labels
from curvlab.backends._validation import validate_model
from curvlab.distributed import active

__all__ = ["BackpackBackend"]

# attributes BackPACK may leave on parameters and modules
_PARAM_FIELDS = (
    "grad_batch",
    "sum_grad_squared",
    "variance",
    "batch_l2",
    "diag_ggn_exact",
    "diag_ggn_mc",
    "diag_h",
    "diag_h_batch",
    "sqrt_ggn_exact",
    "sqrt_ggn_mc",
    "kfac",
    "kflr",
    "kfra",
    GRAD32,
)
_MODULE_FIELDS = ("input0", "input1", "output")
_AVG_POOLS = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
"""BackPACK 1.7 builds the transposed convolution of these modules' second-order rules in the
default dtype (``avgpoolnd.py``), which fails for a model of another dtype."""
_CONVS = (nn.Conv1d, nn.Conv2d)


_WEIGHT_HOOKS = {SpectralNorm: "spectral_norm", WeightNorm: "weight_norm"}
"""The old-style forward pre-hooks that compute a layer's weight from other parameters."""

_IN_PLACE = "_curvlab_in_place"
"""Marks, with its name, each module the user set ``inplace=True`` for the duration of a converted
session (BackPACK's graph converter sets the flag to False and copies a module used twice)."""


_ModuleTree = list[tuple[nn.Module, dict[str, "nn.Module | None"]]]
"""Each module of a model with its children as they were (``_modules``), see :func:`_tree_of`."""


def _tree_of(model: nn.Module) -> _ModuleTree:
    """The children of every module of ``model`` (duplicates and all), to put back with
    :func:`_put_tree_back`: BackPACK's graph converter registers its ``ScaleModule`` children
    (one per ``float * tensor`` in the forward) on the user's model itself, and never removes
    them (a second converted session then failed, blaming ``'scale_module0'``: found in review).
    """
    return [(m, dict(m._modules)) for m in model.modules(remove_duplicate=False)]


def _put_tree_back(tree: _ModuleTree) -> None:
    """Give every module of ``tree`` its children back as they were (added ones removed,
    replaced ones put back, the order kept); a module left as it was is not touched."""
    for m, children in tree:
        now = m._modules
        if list(now) != list(children) or any(now[k] is not v for k, v in children.items()):
            now.clear()
            now.update(children)


def _converted(model: nn.Module, tree: _ModuleTree) -> nn.Module:
    """BackPACK's graph-converted module of ``model`` (it shares the parameters).

    The converter adds children to the user's model (its ``ScaleModule``s); the caller takes
    the model's module tree (``tree``, :func:`_tree_of`) and puts it back after the session, and
    this function at once when the conversion fails.

    Raises:
        Handover: if the converter fails on the model (any error: it traces the model with
            ``torch.fx``; the culprit named where a trace shows it) or finds an operation that
            its second-order extensions cannot backpropagate through.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = extend(model, use_converter=True)
    except Exception as e:  # noqa: BLE001 - a failing conversion means "not this model"
        _put_tree_back(tree)  # what it added before failing: not in the trace of the culprit
        raise Handover(
            f"BackPACK's graph converter cannot convert the model ({_culprit(model, e)})"
        ) from None
    breaking = [w for w in caught if "may break second-order" in str(w.message)]
    if breaking:  # its extensions would fail in the backward pass (AssertionError)
        raise Handover(
            "BackPACK's graph converter found an operation outside modules that its "
            f"second-order extensions cannot backpropagate through ({breaking[0].message})"
        )
    for w in caught:  # the others as they were: once per place, not at every conversion
        warn_explicit_once(w.message, w.category, w.filename, w.lineno)
    return module


def _culprit(model: nn.Module, error: Exception) -> str:
    """What in ``model`` the graph converter failed on: a parameter or buffer its own
    ``forward`` reads directly (outside a ``torch.nn`` layer), else the converter's error."""
    said = f"{type(error).__name__}: {error}"
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - no trace: the converter's own error says it
        return said
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        if node.target in params:
            return (
                f"parameter '{node.target}' is used outside a torch.nn layer, e.g. "
                f"F.linear(h, layer.weight.t()); {said}"
            )
        if node.target in buffers:
            return f"buffer '{node.target}' is read by the model's own forward; {said}"
    return said


def _computed_weights(scan: ModelScan) -> str | None:
    """Why BackPACK cannot compute a module whose tensors are computed from trainable parameters
    (``None``: none is): a ``torch.nn.utils.parametrize`` parametrization or an old-style
    ``spectral_norm``/``weight_norm`` forward pre-hook. BackPACK's rules give quantities to a
    layer's own ``weight``, not to the parameters it is computed from (a parametrised Linear with
    a bias was refused naming the bias, found in review)."""
    trainable = {id(p) for p in scan.trainable.values()}
    for name, m in scan.modules:
        if parametrize.is_parametrized(m):
            how = "a torch.nn.utils.parametrize parametrization"
            tensors = list(m.parametrizations.keys())
            owners = [(f"parametrizations.{t}", m.parametrizations[t]) for t in tensors]
        else:
            hooks = [h for h in m._forward_pre_hooks.values() if type(h) in _WEIGHT_HOOKS]
            if not hooks:
                continue
            how = f"an old-style torch.nn.utils.{_WEIGHT_HOOKS[type(hooks[0])]} forward pre-hook"
            tensors = [h.name for h in hooks]
            owners = [("", m)]
        prefix = f"{name}." if name else ""
        trained = [
            f"{prefix}{where}{'.' if where else ''}{n}"
            for where, owner in owners
            for n, p in owner.named_parameters()
            if id(p) in trainable and n != "bias"
        ]
        if trained:
            return (
                f"module '{name or '<root>'}' ({type(m).__name__}) computes its "
                f"{', '.join(repr(t) for t in tensors)} from {trained} with {how}; BackPACK's "
                "rules give quantities to a layer's own parameters, not to those its weight is "
                "computed from"
            )
    return None


def _own(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters ``module`` holds itself (not its children's)."""
    return (p for p in module._parameters.values() if p is not None)


_HOOKED_OUTPUT = (
    "BackPACK's rules would take the gradient at the hooked output for the gradient at the "
    "layer's own output (for a hook returning 2 * out + 0.1 the layer's Fisher diagonals came "
    "out 0.25x the right ones)"
)
"""Why a layer output changed by a hook makes BackPACK wrong (found in review s19: forced, it
computed the empirical Fisher diagonal and the exact GGN diagonal 0.75 off)."""


def _converter_hook(scan: ModelScan) -> str | None:
    """A forward hook or forward pre-hook of the user's that BackPACK's graph converter cannot
    keep (``None``: none): torch's own and curvlab's and BackPACK's hooks do not count
    (:func:`curvlab._notrace._users`).

    The converted model is a new module, traced with ``torch.fx`` through every container down
    to the layers: the hooks of the model itself and of its containers never run in it (a
    forward pre-hook on the model that shifts the input, a forward hook that scales the output:
    exact GGN diagonals 0.69 off, found in review s19), and those of a layer that change its
    output are read as the layer's own (:data:`_HOOKED_OUTPUT`). Whether a hook changes a value
    cannot be told before it runs, so any one refuses (the plain-chain path keeps a pre-hook on
    the model and checks the layers' outputs as they run: :func:`_output_guard`).
    """
    glob = nn.modules.module
    for attr, what in (
        (
            "_global_forward_hooks",
            "a global module forward hook of yours (register_module_forward_hook)",
        ),
        (
            "_global_forward_pre_hooks",
            "a global module forward pre-hook of yours (register_module_forward_pre_hook)",
        ),
    ):
        if _users(getattr(glob, attr)):
            return what
    for name, m in scan.modules:
        for attr, what in (
            ("_forward_pre_hooks", "forward pre-hook"),
            ("_forward_hooks", "forward hook"),
        ):
            hooks = getattr(m, attr)
            if hooks and _users(hooks):
                return f"a {what} of yours on module '{name or '<root>'}' ({type(m).__name__})"
    return None


def _converter_refusal(hooked: str) -> str:
    """Why BackPACK cannot compute the graph-converted model with ``hooked``
    (:func:`_converter_hook`)."""
    return (
        f"{hooked} is registered and the model is not a plain nn.Sequential chain: BackPACK's "
        "graph converter "
        "rebuilds its forward from the layers, where hooks on the model and on its containers "
        "do not run and a layer's hooked output is read as its own "
        f"({_HOOKED_OUTPUT})"
    )


def _output_guard(checked: dict[nn.Module, str]) -> list[RemovableHandle]:
    """Hooks that hand over when a forward hook changes the output of a layer BackPACK extends;
    their handles (remove them after).

    torch binds a module's full backward hook (BackPACK's, which runs its extensions) to the
    output the forward hooks return: after a hook of the user's that returns another output
    (``2 * out + 0.1``; per module, ``with_kwargs=True`` or global) or changes it in place, the
    output gradient BackPACK's rules read is the one at the hooked output
    (:data:`_HOOKED_OUTPUT`), a wrong number whatever order BackPACK's own hooks run in. A hook
    placed first of the forward hooks (:func:`curvlab._notrace.first_forward_hooks`, first of the
    global ones where the user has one) records the layer's own output and its version, one
    appended last compares, in every forward pass with gradients: an observing hook (that
    returns ``None``) passes, as do forward pre-hooks (the layer's input is the one it
    computes with, which BackPACK stores). Cost: two hook calls per extended layer call.

    Args:
        checked: each extended layer and its name.
    """
    own: dict[int, tuple[Tensor, int]] = {}

    def main(output: object) -> object:
        return output[0] if isinstance(output, tuple) and output else output  # an RNN's

    def first(module: nn.Module, args: tuple, output: object) -> None:
        t = main(output)
        if torch.is_grad_enabled() and isinstance(t, Tensor):
            own[id(module)] = (t, t._version)

    def last(module: nn.Module, args: tuple, output: object) -> None:
        mine = own.pop(id(module), None)
        if mine is None:
            return
        t = main(output)
        if t is not mine[0] or (isinstance(t, Tensor) and t._version != mine[1]):
            raise Handover(
                f"a forward hook of yours changed the output of module '{checked[module]}' "
                f"({type(module).__name__}): {_HOOKED_OUTPUT}"
            )

    handles = first_forward_hooks(dict.fromkeys(checked, first))
    handles += [m.register_forward_hook(last) for m in checked]
    return handles


@dataclass
class _Session:
    """The extended model of one :func:`BackpackBackend.extended` block."""

    module: nn.Module
    loss: nn.Module | None  # an extended sum-reduction loss module (second order), else None
    spec: LossSpec
    params: dict[str, nn.Parameter]
    watched: dict[str, nn.Module] = field(default_factory=dict)  # layers whose rows BackPACK reads
    sizes: Sizes = field(default_factory=dict)  # their leading sizes in the running forward pass
    on_output: Callable[[Tensor, Tensor], None] | None = None
    probe: bool = True  # check the first forward pass of the session (see forward)
    probed: bool = False  # the layout probe ran (on the first forward pass of over one example)
    notes: list[str] = field(default_factory=list)  # fallbacks taken (none in this backend)
    sixteen: bool = False  # a 16-bit model: squares in float32 (_backpack_fields._upcast_products)

    def forward(self, inputs: Inputs, targets: Tensor) -> Tensor:
        """The model's output; the first call checks that BackPACK can compute it exactly.

        BackPACK computes each parameter's quantities from the one module that owns it, so a
        parameter that enters the graph more than once (tied, used outside its module, a module
        applied twice) hands over (:class:`~curvlab.backends.Handover`); so do dict inputs,
        and for second-order quantities outputs that are not ``(examples, outputs)``. Every
        forward pass with gradients also hands over when a watched layer does not hold the
        examples in its first dimension (:meth:`_check_layout`). Inputs are detached: the
        backward passes here reach the parameters alone, never the user's input or its graph.
        The model runs on a copy of them (:func:`~curvlab._data.fresh_inputs`, as every forward
        pass of curvlab's): a forward that writes into its input leaves the caller's as it was.
        """
        if not isinstance(inputs, Tensor):
            raise Handover("BackPACK needs Tensor inputs, not a mapping")
        check_inputs_fit(self.module, inputs)
        if inputs.requires_grad:  # .backward() would fill its .grad (and free the user's graph)
            inputs = inputs.detach()
        for calls in self.sizes.values():
            calls.clear()
        try:
            # the user's tensor hooks made in forward off, as in every other pass of curvlab's
            # (curvlab._data.call_model; this one calls the module itself: an empirical Fisher
            # 9x under h.register_hook(lambda g: 3 * g), found in review s19)
            with dtype_errors_named(self.module, inputs), tensor_hooks_off():
                output = self.module(fresh_inputs(inputs))
        except RuntimeError as e:
            said = str(e)
            if "BackwardHookFunction" in said:  # the output itself: out += identity
                raise Handover(
                    "the model changes a layer's output in place (e.g. out += identity), which "
                    "BackPACK's module hooks forbid"
                ) from None
            if "is a view and is being modified inplace" in said and "custom Function" in said:
                # a write into a slice of a hooked layer's output (its backward hook's
                # Function made it): torch's raw error named neither (found in review)
                raise Handover(
                    "the model writes in place into a slice of a layer's output (e.g. "
                    "h[:, 0].mul_(3.0) on h = layer(x)), which BackPACK's module hooks forbid "
                    f"(torch: {said.split('. ')[0]}); clone the output before writing into it "
                    "(h = layer(x).clone()) or write out of place"
                ) from None
            raise
        if not isinstance(output, Tensor):
            raise Handover(f"BackPACK needs a Tensor output, not a {type(output).__name__}")
        output = self.spec.prepare(output, targets)
        if torch.is_grad_enabled():  # a no-grad forward has no graph to check
            self._check_layout(inputs)
        if self.probe and torch.is_grad_enabled():
            self.probe = False
            for name, uses in parameter_uses(output, self.params).items():
                if uses > 1:
                    raise Handover(
                        f"parameter '{name}' enters the loss {uses} times (tied, used outside "
                        "its module, or its module applied twice); BackPACK would count one use"
                    )
            if self.loss is not None:
                if output.ndim != 2:
                    raise Handover(
                        f"BackPACK's second-order extensions need outputs of shape (examples, "
                        f"outputs), got {tuple(output.shape)}"
                    )
                if self.spec.kind == "bce" and output.shape[1] > 1:
                    raise Handover(
                        "BackPACK's second-order extensions handle one BCE logit per example, "
                        f"got {output.shape[1]}"
                    )
        if self.on_output is not None:
            self.on_output(output, targets)
        return output

    def _check_layout(self, inputs: Tensor) -> None:
        """Hand over if a watched layer does not hold the examples in its first dimension.

        BackPACK's rules read the first dimension of each hooked layer's input and output as the
        examples (a Linear on ``(T, N, d)`` gets ``T`` "examples"). Each forward pass compares
        the leading sizes of every call with the number of examples: ``O(layers)`` integer
        comparisons. A leading size equal to it may be a coincidence (``T == N``): on the first
        forward pass of more than one example a forward pass without gradients on the first two
        (:func:`curvlab._layout.probe_one_example`: buffers and the global RNG kept) settles it,
        once per call, and not again when the choice memo remembers the same call. (With one
        example a leading size of 1 is right either way.) The probe runs on a copy of those
        examples (:func:`~curvlab._data.fresh_inputs`): it runs between the forward pass and its
        backward, and a first ``nn.ReLU(inplace=True)`` rewriting ``inputs`` there invalidated
        the tensor the forward pass saved (autograd's raw "modified by an inplace operation"
        error in ``diag_fisher(kind="exact")`` and ``diag_hessian``, found in review s22).
        """
        n = int(inputs.shape[0])
        full = {name: list(calls) for name, calls in self.sizes.items()}  # before the probe's
        few, m = None, probe_size(n)
        if not self.probed and n > 1:
            try:
                part = fresh_inputs(slice_inputs(inputs, 0, m))
                # BackPACK's stored inputs and outputs kept: a layer run under
                # torch.enable_grad() inside the forward stored the probe's few rows over the
                # batch's (review s26: "Compared shapes [6, 4] and [2, 4] do not match")
                with disable():
                    few = probe_one_example(self.module, part, self.watched, m)[0]
            except Exception as e:  # runs on the batch (just now), not on m of its examples
                try:
                    raise_if_part_failed(self.module, inputs, slice_inputs(inputs, 0, m), e)
                except ValueError as named:  # a batch without a batch axis (diag_hessian's
                    # Hessian products take the batch as it is: found in review, torch's raw
                    # shape error here while backend="columns" answered); under
                    # torch.distributed the clear error: a hand-over on one rank alone would
                    # desynchronise the ranks' collectives
                    if active() is not None:
                        raise
                    raise Handover(f"BackPACK reads examples along the first axis: {named}") from e
                raise
            self.probed = True
        bad = misplaced(full, n, few, m)
        if bad:
            name, why = next(iter(bad.items()))
            raise Handover(
                f"module '{name}' has {why}: {MISPLACED_HINT}; BackPACK reads the first "
                "dimension of every layer it hooks as the examples"
            )

    def learned(self) -> bool:
        """Whether the first forward pass's checks and the layout probe ran (and passed).

        Not after chunks of one example alone: the next call probes the layout again.
        """
        return not self.probe and self.probed

    def resume(self, learned: bool) -> None:
        """Start with the checks of a previous session on the same signature already done."""
        if learned:
            self.probe, self.probed = False, True

    def nll(self, output: Tensor, targets: Tensor, drawn: bool = False) -> Tensor:
        """The chunk's NLL sum (through the extended loss module for second order).

        Targets are detached: soft targets that require grad (a teacher's output) would get a
        ``.grad`` from the backward passes here, and their graph would be freed.
        """
        if targets.requires_grad:
            targets = targets.detach()
        if self.loss is None:  # first-order extensions need no hooks on the loss
            return self.spec.nll_sum(output, targets, drawn)
        assert not drawn, "BackPACK's second-order extensions draw their own labels"
        try:
            return self.loss(output, targets)
        except IndexError as exc:  # a class index out of range: curvlab's error, not torch's
            name_invalid_labels(self.spec, output, targets, exc)
            raise

    def kept(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor] | None:
        """Second order: the examples whose label is not ``ignore_index`` (``None``: no example).

        BackPACK's losses have no ``ignore_index``; with one label per example an ignored example
        contributes nothing, so leaving it out is exact.
        """
        if self.spec.kind != "cross_entropy" or targets.is_floating_point() or targets.ndim != 1:
            return inputs, targets  # (outputs with positions hand over in forward)
        keep = targets != self.spec.ignore_index
        if bool(keep.all()):
            return inputs, targets
        if not bool(keep.any()):
            return None
        return inputs[keep], targets[keep]


class BackpackBackend:
    """Computes raw (NLL-sum) quantities on chunks of examples with BackPACK.

    Attributes:
        name: ``"backpack"``, recorded in every result this backend computes.
    """

    name = "backpack"
    primitives = PRIMITIVES - {"output_grads"}
    needs_math_attention = True  # double backward / vmap

    def refuses(self, facts: ModelFacts, needs: frozenset[str], auto: bool) -> str | None:
        """Why BackPACK cannot compute this model exactly (``None``: it can try)."""
        scan = facts.scan
        second = bool(needs - {"sum_grad_squared", "batch_grad"})
        computed = _computed_weights(scan)
        if computed is not None:  # before validate_model, which named the layer's bias
            return computed
        try:
            validate_model(
                scan.model, second_order=second, hessian="diag_hessian" in needs, scan=scan
            )
        except TypeError as e:
            return str(e)
        if second and not scan.sequential and not auto:  # (auto: refused below)
            hooked = _converter_hook(scan)
            if hooked is not None:
                return _converter_refusal(hooked)
        if facts.shared:
            return f"parameters {list(facts.shared)} are shared by several modules (tied)"
        if facts.reused:
            return f"modules {list(facts.reused)} are used at more than one place of the model"
        if second and scan.dtype != torch.get_default_dtype():
            pools = [name for name, m in scan.modules if isinstance(m, _AVG_POOLS)]
            if pools:
                return (
                    f"BackPACK's second-order rules for average pooling (module '{pools[0]}') "
                    f"build their kernels in the default dtype {torch.get_default_dtype()}, not "
                    f"the model's {scan.dtype}"
                )
        if auto and not scan.sequential:
            return (
                f"the model is not a plain nn.Sequential chain: {scan.not_chain} (its own "
                "forward may use layers twice, change outputs in place or use parameters "
                "outside layers)"
            )
        return None

    @contextmanager
    def extended(
        self,
        model: nn.Module,
        spec: LossSpec,
        second_order: bool,
        scan: ModelScan | None = None,
    ) -> Iterator[_Session]:
        """Extend ``model`` (and a sum-reduction copy of the loss) for the duration of the block.

        First-order quantities only need hooks on the modules that own parameters, so the model's
        graph may be anything (residual connections included). Second-order quantities backpropagate
        through every module: a model that is not a plain ``nn.Sequential`` chain is converted with
        BackPACK's graph converter, which shares the parameters with ``model``; a model it cannot
        convert hands over (:func:`_converted`).
        """
        scan = scan if scan is not None else scan_model(model)
        n_handles = len(CTX.hook_handles)
        warnings_ctx = warnings.catch_warnings()
        warnings_ctx.__enter__()
        # torch warns when the first layer's input needs no gradient; that is expected here
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        modules = [m for _, m in scan.modules]
        inplace = in_place_modules(scan.modules)
        # padding="valid" is padding 0; BackPACK's unfold (im2col) takes integers only
        valid = [m for m in modules if isinstance(m, _CONVS) and m.padding == "valid"]
        # the layers whose first dimension BackPACK reads as the examples: those it computes
        # parameter quantities for, and for second order every layer it backpropagates through
        watched = {
            name: m
            for name, m in scan.modules
            if (not m._modules if second_order else any(p.requires_grad for p in _own(m)))
        }
        # modules the user extended already; the graph converter flags the others as extended
        flagged = {m for m in modules if "_backpack_extend" in m.__dict__}
        names = {id(m): name for name, m in scan.modules}
        loss = _extended_sum_loss(spec) if second_order else None
        handles: list = []
        # torch flags a module on its first backward hook (full: True, legacy: False) and never
        # clears it: the user's own legacy hooks would be refused after this block, and a module
        # flagged legacy refuses BackPACK's full hooks
        full_flags = {m: m.__dict__.get("_is_full_backward_hook") for m in modules}
        tree: _ModuleTree | None = None
        try:
            legacy = [m for m, flag in full_flags.items() if flag is False]
            if legacy:
                raise Handover(
                    f"{type(legacy[0]).__name__} has (or had) a legacy backward hook "
                    "(register_backward_hook), beside which BackPACK's full backward hooks "
                    "cannot be registered"
                )
            for m in valid:  # the same convolution
                m.padding = (0,) * len(m.kernel_size)
            module = model
            if second_order and not scan.sequential:
                hooked = _converter_hook(scan)  # (also where the choice memo skipped refuses)
                if hooked is not None:
                    raise Handover(_converter_refusal(hooked))
                for name, m in inplace:  # the converter turns the flags off and copies modules
                    m.__dict__[_IN_PLACE] = name
                tree = _tree_of(model)  # the converter adds children to the user's modules
                module = _converted(model, tree)
            else:  # what backpack.extend does, without its per-module flag and recursion
                checked: dict[nn.Module, str] = {}
                for m in modules:
                    wanted = (
                        not is_no_op(m)
                        if second_order
                        else any(p is not None for p in m._parameters.values())
                    )
                    if wanted:
                        checked[m] = names.get(id(m), "?") or "<root>"
                    if m in flagged:
                        continue  # the user extended it already: its hooks are in place
                    if wanted:
                        handles.append(
                            m.register_forward_pre_hook(
                                _keyword_refusal(names.get(id(m), "?")), with_kwargs=True
                            )
                        )
                        handles.append(m.register_forward_hook(hook_store_io))
                        handles.append(m.register_full_backward_hook(hook_run_extensions))
                # a forward hook of the user's that changes an extended layer's output hands
                # over (found in review s19: the Fisher diagonals were 0.25x behind 2 * out + 0.1)
                handles += _output_guard(checked)
            # in-place modules clash with BackPACK's module hooks (and it reads the tensors it
            # stored in the backward pass): they run out of place on the graph, checked to
            # compute the same function; the converter's copies of a module used twice too
            guarded = (
                inplace
                if module is model
                else [
                    (m.__dict__[_IN_PLACE], m) for m in module.modules() if _IN_PLACE in m.__dict__
                ]
            )
            with recording(watched) as sizes, InplaceGuard(guarded).installed(module):
                yield _Session(
                    module=module,
                    loss=loss,
                    spec=spec,
                    params=scan.trainable,
                    watched=watched,
                    sizes=sizes,
                    sixteen=any(is_sixteen(p.dtype) for p in scan.params.values()),
                )
        finally:
            warnings_ctx.__exit__(None, None, None)
            if tree is not None:
                _put_tree_back(tree)
            _release_extensions()
            for handle in handles:
                handle.remove()
            for handle in CTX.hook_handles[n_handles:]:  # the graph converter's
                handle.remove()
            del CTX.hook_handles[n_handles:]
            for _, m in inplace:  # (BackPACK's graph converter turns them off)
                m.inplace = True
                m.__dict__.pop(_IN_PLACE, None)
            for m in valid:
                m.padding = "valid"
            for m, flag in full_flags.items():
                m.__dict__["_is_full_backward_hook"] = flag
            for m in modules if loss is None else [*modules, loss]:
                fields = m.__dict__
                for f in _MODULE_FIELDS:
                    if f in fields:
                        del fields[f]
                if m not in flagged:
                    fields.pop("_backpack_extend", None)
            for p in scan.params.values():
                fields = p.__dict__
                for f in _PARAM_FIELDS:
                    if f in fields:
                        del fields[f]

    # ---------------------------------------------------------------- first order
    def sum_grad_squared(
        self,
        s: _Session,
        inputs: Tensor,
        targets: Tensor,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        with_grad: bool = True,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """``sum_n (grad NLL_n)^2`` at the data labels, or averaged over ``mc_samples`` draws.

        ``with_grad`` is accepted for the backends' common signature; the gradient comes with
        BackPACK's backward pass anyway.

        Returns:
            (per-parameter sums, the gradient ``sum_n grad NLL_n`` at the data labels (``{}`` for
            Monte-Carlo labels), the output).
        """
        _zero_grads(s.params)
        output = s.forward(inputs, targets)
        if mc_samples == 0:
            with _extending(_extension(bext.SumGradSquared, s.sixteen)):
                s.nll(output, targets).backward()
            sgs = _field(s.params, "sum_grad_squared")
            grad = _field(s.params, GRAD32 if s.sixteen else "grad")
            return sgs, grad, output
        total: dict[str, Tensor] = {}
        # example-major draws: each example's labels do not depend on the chunk boundaries
        for i, sampled in enumerate(draw_labels(s.spec, output, generator, targets, mc_samples)):
            _zero_grads(s.params)
            with _extending(
                _extension(bext.SumGradSquared, s.sixteen), retain_graph=i < mc_samples - 1
            ):
                s.nll(output, sampled, drawn=True).backward(retain_graph=i < mc_samples - 1)
            for n, v in _field(s.params, "sum_grad_squared").items():
                if n in total:
                    total[n].add_(v)
                else:
                    total[n] = v.clone()
        return {n: v / mc_samples for n, v in total.items()}, {}, output

    def sum_grad_squared_with_sampled(
        self, s: _Session, inputs: Tensor, targets: Tensor, generator: torch.Generator | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
        """One forward, two backward passes: squared gradients at the labels and at one draw.

        Returns:
            (sums at the labels, gradient at the labels, sums at sampled labels, output).
        """
        _zero_grads(s.params)
        output = s.forward(inputs, targets)
        with _extending(_extension(bext.SumGradSquared, s.sixteen), retain_graph=True):
            s.nll(output, targets).backward(retain_graph=True)
        at_labels = _field(s.params, "sum_grad_squared")
        grads = _field(s.params, GRAD32 if s.sixteen else "grad")
        _zero_grads(s.params)
        sampled = s.spec.sample_targets(output, generator, targets)
        with _extending(_extension(bext.SumGradSquared, s.sixteen)):
            s.nll(output, sampled, drawn=True).backward()
        at_sampled = _field(s.params, "sum_grad_squared")
        return at_labels, grads, at_sampled, output

    def batch_grad(
        self,
        s: _Session,
        inputs: Tensor,
        targets: Tensor,
        sampled: bool = False,
        generator: torch.Generator | None = None,
        drawn: bool = False,
    ) -> dict[str, Tensor]:
        """Per-example gradients ``grad NLL_n`` (labels or one model sample), each ``(n, *shape)``.

        ``drawn``: ``targets`` were themselves drawn from the model (``sample_targets``).
        """
        _zero_grads(s.params)
        output = s.forward(inputs, targets)
        labels = s.spec.sample_targets(output, generator, targets) if sampled else targets
        with _extending(_extension(bext.BatchGrad)):
            s.nll(output, labels, drawn=sampled or drawn).backward()
        n = output.shape[0]
        out = {}
        for k, p in s.params.items():
            if "grad_batch" not in p.__dict__:
                _unseen(k, p, "grad_batch")
            out[k] = p.__dict__.get("grad_batch", p.new_zeros(n, *p.shape))
        return out

    # ---------------------------------------------------------------- second order
    def diag_ggn(self, s: _Session, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``diag sum_n J_n^T (d^2 NLL_n / d f^2) J_n``."""
        return _second_order_field(s, inputs, targets, bext.DiagGGNExact, "diag_ggn_exact")

    def diag_hessian(self, s: _Session, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``diag d^2 (sum_n NLL_n) / d theta^2``.

        For a 16-bit model the loss Hessian's square-root factors and the output gradient the
        residual terms are formed from are float32, scaled by powers of two before the 16-bit
        backward pass and unscaled exactly after (:func:`~curvlab.backends._backpack_fields.
        scaled_residual_output`).
        """
        return _second_order_field(
            s, inputs, targets, bext.DiagHessian, "diag_h", residuals=s.sixteen
        )

    def sqrt_ggn(self, s: _Session, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-example square-root factors ``V`` of the NLL-sum GGN, ``GGN = sum_{c,n} v v^T``.

        Returns per parameter a tensor of shape ``(C, n, *shape)``. For a 16-bit model these
        are float32: the loss Hessian's square-root columns are formed from float32 logits and
        enter the 16-bit backward pass scaled by a power of two per column and example, undone
        exactly in the parameter rules (:func:`~curvlab.backends._backpack_fields.
        _scaled_sqrt_columns`; formed in float16, a classifier at a margin of 19 had all its
        factors 0, found in review s19).
        """
        kept = s.kept(inputs, targets)
        if kept is None:
            return {}
        _zero_grads(s.params)
        output = s.forward(*kept)
        with _extending(_extension(bext.SqrtGGNExact, s.sixteen)):
            s.nll(output, kept[1]).backward()
        for n, p in s.params.items():
            if "sqrt_ggn_exact" not in p.__dict__:
                _unseen(n, p, "sqrt_ggn_exact")
        return {
            n: p.__dict__["sqrt_ggn_exact"]
            for n, p in s.params.items()
            if "sqrt_ggn_exact" in p.__dict__
        }


def _second_order_field(
    s: _Session, inputs: Tensor, targets: Tensor, ext: type, field: str, residuals: bool = False
) -> dict[str, Tensor]:
    """One backward pass of the chunk's kept examples with the extension ``ext``; its ``field``.

    ``residuals``: the backward pass takes the scaled float32 output gradient of
    :func:`~curvlab.backends._backpack_fields.scaled_residual_output` (a 16-bit model's
    ``DiagHessian``)."""
    kept = s.kept(inputs, targets)
    if kept is None:
        return _zeros(s.params)
    _zero_grads(s.params)
    output = s.forward(*kept)
    extension = _extension(ext, s.sixteen)
    if residuals:
        output = scaled_residual_output(extension, s.spec, output, kept[1])
    with _extending(extension):
        s.nll(output, kept[1]).backward()
    return _field(s.params, field)


def _keyword_refusal(name: str) -> Callable[[nn.Module, tuple, dict], None]:
    """A forward pre-hook that hands over when the layer gets its input by keyword
    (``layer(input=x)``): BackPACK's ``hook_store_io`` stores positional inputs only, and its
    backward hooks then failed with a raw ``AttributeError`` (``input0``; found in review)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not args and kwargs:
            raise Handover(
                f"module '{name}' ({type(module).__name__}) was called with its input by keyword "
                f"({', '.join(sorted(kwargs))}=...), which BackPACK's hooks cannot store; "
                "call it positionally, or use backend='hooks' or backend='func'"
            )

    return hook
