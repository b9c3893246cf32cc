"""The FSDP2 route of the one accumulation loop: unshard once, curvlab's hooks, one all-reduce.

On a model sharded with ``fully_shard`` (:mod:`curvlab._fsdp` says which calls take one):

1. **Unshard once.** :func:`unsharded` all-gathers every ``fully_shard``ed module's parameters
   (``FSDPModule.unshard()``: the only communication besides the final sum) and keeps them
   unsharded for the whole call: FSDP's reshard after forward and after backward and its
   reduce-scatter of unused parameters are off for the call and restored afterwards, then every
   module that was sharded before is resharded (local). While unsharded, FSDP registers the plain
   full parameters on the modules, under the user's names, so the hooks see ordinary tensors,
   ``module.weight`` in a forward hook is the full parameter, the first-forward checks
   (``parameter_uses`` walks to those parameters) work unchanged, and the passes issue **no
   collective**: ranks may pass different numbers of batches and examples. FSDP's pre-backward
   hooks find the parameters unsharded (no all-gather); its post-backward finds no gradient to
   reduce, since the backward passes stop at the layer outputs. The user's sharded ``.grad`` is
   never touched.
2. **The one loop.** :func:`fsdp2_sweep` runs :func:`~curvlab.quantities._sweep.sweep` inside
   that block with one backend forced (:func:`forced_backend`): :class:`FSDP2HooksBackend`,
   curvlab's hooks plus the exact GGN diagonal. The sweep's single all-reduce sums every rank's
   raw sums and counts, exactly as under DDP.
3. **Results** are plain full tensors, identical on every rank, keyed by the user's parameter
   names; ``distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)`` places one
   like its parameter without communication.

Memory: every rank holds the whole model's parameters for the duration of the call (plus one
full-size parameter-vector per result), as DDP does all the time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from curvlab._data import Inputs, check_inputs_fit, iter_batches
from curvlab._fsdp import (
    FULL_COPY,
    dtensor_type,
    fsdp2_module_type,
    fsdp_kind,
    group_mesh_message,
    unsupported_message,
)
from curvlab._losses import LossSpec
from curvlab._precision import is_sixteen, upcast
from curvlab._scan import ModelScan, scan_model
from curvlab.backends._base import Handover
from curvlab.backends._func import _column_scales
from curvlab.backends._hook_session import Layer, _HookSession, _Tap, _tap_grad
from curvlab.backends._hooks import HooksBackend
from curvlab.backends._rules import PARAM_ATTRS, rule_for
from curvlab.backends._validation import check_batchnorm
from curvlab.distributed import active

__all__ = [
    "FSDP2HooksBackend",
    "MAX_EXACT_COLUMNS",
    "forced_backend",
    "fsdp2_route",
    "fsdp2_sweep",
    "unsharded",
]

MAX_EXACT_COLUMNS = 4096
"""Largest number ``K`` of output entries per example for ``diag_fisher(kind="exact")`` under
FSDP2: it costs ``K`` backward passes per chunk (use ``kind="mc"`` beyond)."""

_FORCED: ContextVar[HooksBackend | None] = ContextVar("curvlab_fsdp2_backend", default=None)


# --------------------------------------------------------------------------- unsharding
def _groups(modules: list[nn.Module]) -> list[Any]:
    """The FSDP parameter groups of ``modules`` (FSDP2 internals, checked)."""
    groups = []
    for m in modules:
        state = m._get_fsdp_state()
        found = getattr(state, "_fsdp_param_groups", None)
        if found is None:  # torch < 2.7 kept one group per state
            single = getattr(state, "_fsdp_param_group", None)
            found = [] if single is None else [single]
        for g in found:
            for attr in (
                "post_forward_mesh_info",
                "reshard_after_backward",
                "is_unsharded",
                "_to_sharded",
            ):
                if not hasattr(g, attr):
                    raise NotImplementedError(
                        f"this torch's FSDP2 internals differ from those curvlab drives (its "
                        f"parameter groups have no '{attr}'); curvlab's FSDP2 route was written "
                        f"for torch 2.14. {FULL_COPY}"
                    )
            groups.append(g)
    return groups


@contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Run the block with every ``fully_shard``ed module's parameters all-gathered and kept.

    A collective (every rank must enter it): each FSDP module's ``unshard()`` all-gathers its
    parameters once. Inside, the modules hold the plain full parameters under the user's names,
    and forward and backward passes issue no collective (FSDP's reshard after forward and after
    backward, and its reduce-scatter of unused parameters, are off). On exit the settings are
    restored and every module that was sharded before is resharded (local, no communication);
    after an error inside a forward or backward pass FSDP's per-iteration state is reset
    (``FSDPModule.reset_iter_state()``) as well.

    FSDP fixes its root for good at the first forward (lazy initialisation): the outermost
    ``fully_shard``ed module inside ``model`` is initialised as a root for the call when no
    forward has run yet, and put back uninitialised afterwards (:func:`_lazy_init_undo`), so a
    ``model`` that is a submodule of a larger, not yet initialised FSDP tree (``outer.net``)
    does not become the root the user's next forward through ``outer`` trips over.
    """
    fsdp = fsdp2_module_type()
    assert fsdp is not None
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, fsdp)]
    modules = [m for _, m in named]
    roots = [
        m
        for n, m in named
        if not any(n != o and (o == "" or n.startswith(o + ".")) for o, _ in named)
    ]
    undo = _lazy_init_undo(modules)
    try:
        for root in roots:  # what the first forward would do; it may change the root's settings
            lazy = getattr(root._get_fsdp_state(), "_lazy_init", None)
            if lazy is not None:
                lazy()
        groups = _groups(modules)
    except BaseException:
        undo()
        raise
    saved = [
        (
            g,
            g.post_forward_mesh_info,
            g.reshard_after_backward,
            getattr(g, "reduce_scatter_unused_params", None),
            g.is_unsharded,
        )
        for g in groups
    ]
    failed = False
    try:
        for g in groups:
            g.post_forward_mesh_info = None  # no reshard after forward
            g.reshard_after_backward = False
            if hasattr(g, "reduce_scatter_unused_params"):
                g.reduce_scatter_unused_params = False
        for m in modules:
            m.unshard()
        yield
    except BaseException:
        failed = True
        raise
    finally:
        try:
            for g, post_forward, after_backward, unused, _ in saved:
                g.post_forward_mesh_info = post_forward
                g.reshard_after_backward = after_backward
                if unused is not None:
                    g.reduce_scatter_unused_params = unused
            if failed and any(_busy(g) for g in groups):  # an error inside a pass
                for root in roots:
                    reset = getattr(root, "reset_iter_state", None)
                    if reset is not None:
                        reset()
            for g, _, _, _, was_unsharded in saved:
                if not was_unsharded and g.is_unsharded:
                    g._to_sharded()
        finally:
            undo()


_STATE_FIELDS = ("_is_root", "_state_ctx", "_comm_ctx")
_GROUP_FIELDS = (
    "comm_ctx",
    "post_forward_mesh_info",
    "_module_fqn",
    "_param_group_index",
    "_num_param_groups",
)


def _fields(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(obj, n) for n in names if hasattr(obj, n)}


def _contents(obj: Any) -> dict[str, Any]:
    """``obj``'s attributes, its lists, dicts and sets copied (they are appended to in place)."""
    return {
        k: copy.copy(v) if isinstance(v, list | dict | set) else v for k, v in vars(obj).items()
    }


def _lazy_init_undo(modules: list[nn.Module]) -> Callable[[], None]:
    """A function that puts the FSDP states of ``modules`` that no forward has initialised yet
    (``_is_root is None``) back as they are now, after a lazy initialisation and passes (a
    no-op once the user's first forward has chosen the root).

    FSDP2's ``_lazy_init`` on a root marks it ``_is_root=True`` and every state below it
    ``False``, gives them all the root's context objects (which the passes then fill), and names
    the parameter groups and parameters after the root; everything else it does (the groups'
    own ``lazy_init``) is idempotent and repeated by the real root's first forward.
    """
    states: dict[int, Any] = {}
    for m in modules:
        state = m._get_fsdp_state()
        if getattr(state, "_is_root", False) is None:
            states.setdefault(id(state), state)
    if not states:
        return lambda: None
    saved_states = [(st, _fields(st, _STATE_FIELDS)) for st in states.values()]
    contexts = {
        id(ctx): (ctx, _contents(ctx))
        for st in states.values()
        for ctx in (getattr(st, "_state_ctx", None), getattr(st, "_comm_ctx", None))
        if ctx is not None
    }
    groups = [
        g
        for st in states.values()
        for g in getattr(st, "_fsdp_param_groups", None)  # torch < 2.7: one group per state
        or [x for x in [getattr(st, "_fsdp_param_group", None)] if x is not None]
    ]
    saved_groups = [(g, _fields(g, _GROUP_FIELDS)) for g in groups]
    saved_params = [
        (p, p._param_fqn)
        for g in groups
        for p in getattr(g, "fsdp_params", [])
        if hasattr(p, "_param_fqn")
    ]

    def undo() -> None:
        for ctx, contents in contexts.values():
            vars(ctx).clear()
            vars(ctx).update(contents)
        for obj, fields in (*saved_states, *saved_groups):
            for name, value in fields.items():
                setattr(obj, name, value)
        for p, fqn in saved_params:
            p._param_fqn = fqn

    return undo


def _busy(group: Any) -> bool:
    """Whether an FSDP parameter group is inside a forward or backward pass (not idle)."""
    state = getattr(group, "_training_state", None)
    return state is not None and getattr(state, "name", "IDLE") != "IDLE"


# --------------------------------------------------------------------------- the backend
class _Cotangent:
    """A vector at the model output, passed where labels go: ``output_grads`` then
    back-propagates it (a column of the loss Hessian's square root) instead of an NLL."""

    def __init__(self, value: Tensor) -> None:
        self.value = value


class FSDP2HooksBackend(HooksBackend):
    """curvlab's hooks (first-order primitives) plus the exact GGN diagonal, for FSDP2 models.

    ``diag_ggn`` back-propagates each column ``s_k`` of the per-example loss-Hessian square roots
    (:meth:`curvlab._losses.LossSpec.sqrt_columns`) to the layer outputs and sums the squared
    per-example gradients ``J_n^T s_nk`` over ``k``: exact, ``K`` backward passes per chunk
    (``K`` = output entries of one example).

    ``unchecked``: the sessions call the model through :class:`_Unchecked` (its first
    parameter's ``fully_shard`` unit casts its inputs, :func:`_first_unit_casts`).
    """

    name = "hooks"
    primitives = HooksBackend.primitives | {"diag_ggn"}

    def __init__(self, layers: dict[str, Layer] | None = None, unchecked: bool = False) -> None:
        super().__init__(layers)
        self.unchecked = unchecked

    @contextmanager
    def extended(
        self,
        model: nn.Module,
        spec: LossSpec,
        second_order: bool = False,
        scan: ModelScan | None = None,
    ) -> Iterator[_HookSession]:
        """As :meth:`HooksBackend.extended`; with ``unchecked`` the session calls the model
        through :class:`_Unchecked`."""
        with super().extended(model, spec, second_order, scan) as session:
            if self.unchecked:
                session.module = _Unchecked(model)  # type: ignore[assignment]
            yield session

    def output_grads(
        self,
        s: _HookSession,
        output: Tensor,
        label_sets: list[Any],
        retain_graph: bool = False,
        drawn: bool = False,
    ) -> tuple[list[_Tap], list[list[Tensor]]]:
        """As :meth:`HooksBackend.output_grads`; a :class:`_Cotangent` is back-propagated as is."""
        if not any(isinstance(x, _Cotangent) for x in label_sets):
            return super().output_grads(s, output, label_sets, retain_graph, drawn)
        taps = list(s.taps)
        if not taps:
            return taps, [[] for _ in label_sets]
        for t in taps:
            t.check_input()
        edges: list[GradientEdge] = [t.edge for t in taps]
        grads = []
        for k, v in enumerate(label_sets):
            gs = torch.autograd.grad(
                output,
                edges,
                grad_outputs=v.value,
                retain_graph=retain_graph or k < len(label_sets) - 1,
                allow_unused=True,
            )
            grads.append([_tap_grad(t, g) for g, t in zip(gs, taps)])
        return taps, grads

    def diag_ggn(self, s: _HookSession, inputs: Inputs, targets: Tensor) -> dict[str, Tensor]:
        """``diag sum_n J_n^T (d^2 NLL_n / d f^2) J_n`` per parameter (raw NLL-sum)."""
        output = s.forward(inputs, targets)
        K = output[0].numel() if output.ndim else 1
        if K > MAX_EXACT_COLUMNS:
            raise NotImplementedError(
                f"diag_fisher(kind='exact') on an FSDP2 model costs one backward pass per output "
                f"entry of one example, here {K} (more than {MAX_EXACT_COLUMNS}); use "
                "kind='mc' (unbiased for the same diagonal; mc_samples= draws per example) or "
                "kind='empirical'"
            )
        # a 16-bit output or parameter: float32 columns, each scaled by a power of two before
        # the 16-bit backward pass and its squares unscaled after (exact); cast to float16 as
        # they were, a confident classifier's sqrt(p) ~ 1e-7 was subnormal, and p = 6e-9 was 0
        # (found in review s19)
        sixteen = is_sixteen(output.dtype) or any(is_sixteen(p.dtype) for p in s.params.values())
        if sixteen:
            cols, up = _column_scales(s.spec.sqrt_columns(output, targets, wide=True), output.dtype)
        else:
            cols, up = s.spec.sqrt_columns(output, targets), None
        total: dict[str, Tensor] = {}
        for k in range(cols.shape[0]):
            sq, _ = self._squares(s, output, _Cotangent(cols[k]), False, retain=k < K - 1)
            for name, value in sq.items():
                if up is not None:  # twice: up^2 is inf or 0 past 2^+-64
                    value = upcast(value) * up[k] * up[k]
                total[name] = total[name].add_(value) if name in total else value
        return total


def _uncovered(scan: ModelScan) -> list[str]:
    """Names of the trainable parameters the hooks have no rule for."""
    out = []
    by_id = {id(p): n for n, p in scan.trainable.items()}
    covered: set[str] = set()
    for _, module in scan.modules:
        for attr, p in module._parameters.items():
            if p is None or not p.requires_grad:
                continue
            if rule_for(module) is not None and attr in PARAM_ATTRS:
                covered.add(by_id[id(p)])
    for name in scan.trainable:
        if name not in covered:
            out.append(name)
    return out


# --------------------------------------------------------------------------- mixed precision
def _casting_policy(module: nn.Module) -> torch.dtype | None:
    """The dtype the ``MixedPrecisionPolicy`` of the ``fully_shard`` unit ``module`` casts the
    inputs of its forward to (``param_dtype``, when set and ``cast_forward_inputs``), else
    ``None``."""
    policy = getattr(module._get_fsdp_state(), "_mp_policy", None)
    dtype = getattr(policy, "param_dtype", None)
    if dtype is None or not getattr(policy, "cast_forward_inputs", False):
        return None
    return dtype


def _forward_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype ``model``'s forward casts its inputs to when ``model`` is itself a
    ``fully_shard`` unit whose policy casts them (:func:`_casting_policy`), else ``None``.

    Only then are ``model``'s raw inputs cast: FSDP casts the inputs of each unit's own forward,
    so a unit below an unsharded root sees what the root computed from the inputs as given (found
    in review: ``net(x - 1000)`` with ``net`` a bfloat16 unit was measured on ``x`` cast to
    bfloat16 first, a diagonal 51% off).
    """
    fsdp = fsdp2_module_type()
    if fsdp is None or not isinstance(model, fsdp):
        return None
    return _casting_policy(model)


def _first_unit_casts(model: nn.Module) -> bool:
    """Whether the ``fully_shard`` unit that holds ``model``'s first parameter (the one
    :func:`~curvlab._data.check_inputs_fit` compares the inputs with) casts its forward inputs.

    That parameter then has the unit's ``param_dtype`` while the call runs, whatever dtype the
    inputs reaching the unit have: FSDP casts them.
    """
    fsdp = fsdp2_module_type()
    units: list[tuple[str, nn.Module]] = []  # in module order: an ancestor before its subtree
    for name, module in model.named_modules():
        if fsdp is not None and isinstance(module, fsdp):
            units.append((name, module))
        if not any(p is not None for p in module._parameters.values()):
            continue
        holders = [u for n, u in units if n == "" or name == n or name.startswith(n + ".")]
        return bool(holders) and _casting_policy(holders[-1]) is not None  # the nearest unit
    return False


class _Unchecked:
    """``model`` as the hook session calls it when its first parameter's ``fully_shard`` unit
    casts its inputs (:func:`_first_unit_casts`): the inputs' device is checked, their dtype is
    not (they enter the model as given, as in the user's forward, and FSDP casts them at the
    unit)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with suppress(TypeError):  # the dtype differs from the first parameter's: FSDP casts it
            check_inputs_fit(self.model, args[0] if args else kwargs)
        return self.model(*args, **kwargs)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()


class _CastBatches:
    """The batches of ``data`` with floating-point inputs in ``dtype``, as FSDP's forward casts
    them, and the targets as given.

    FSDP casts the forward's inputs only: the user's ``loss_fn(model(x), y)`` scores the targets
    as given, and curvlab applies the loss's usual dtype rules to them
    (:meth:`~curvlab._losses.LossSpec.check_shapes`: wider ``MSELoss`` targets are scored in their
    dtype, targets of another dtype refused). Found in review: float32 MSE targets cast to a
    bfloat16 output's dtype measured the loss 19% low (2.543e-06 for 3.150e-06) and the gradient
    norm 29% low.
    """

    def __init__(self, data: Any, dtype: torch.dtype) -> None:
        self.data, self.dtype = data, dtype

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for inputs, targets in iter_batches(self.data):
            if isinstance(inputs, Tensor):
                inputs = self._cast(inputs)
            else:
                inputs = {k: self._cast(v) for k, v in inputs.items()}
            yield inputs, targets


# --------------------------------------------------------------------------- the sweep
def fsdp2_route(model: nn.Module) -> bool:
    """Whether a sweep over ``model`` must take the FSDP2 route (and is not inside it yet)."""
    return _FORCED.get() is None and fsdp_kind(model) == "fsdp2"


def forced_backend() -> HooksBackend | None:
    """The backend a sweep inside :func:`fsdp2_sweep` must use (``None`` elsewhere)."""
    return _FORCED.get()


def fsdp2_sweep(
    sweep: Callable[..., tuple[dict[Any, Tensor], Any]],
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    fn: Callable[..., dict[Any, Tensor]],
    *,
    needs: Iterable[str],
    chunk_size: int | None,
    backend: str,
    generator: torch.Generator | None,
) -> tuple[dict[Any, Tensor], Any]:
    """``sweep(...)`` on an FSDP2 model: unsharded for the call, :class:`FSDP2HooksBackend` alone.

    Raises:
        NotImplementedError: for primitives other than first-order ones and the GGN diagonal,
            for parameters the hooks do not cover, for parameters still sharded after FSDP's
            all-gather, or when the hooks cannot compute the model exactly (the message says
            why and what to use): on every rank, also where only one rank's data shows it
            (a weight read outside its layer on that rank's batch alone; the sweep's ranks
            agree before its all-reduce, and the message names the rank; found in review s19:
            that rank raised alone while the others waited in the all-reduce).
        ValueError: for ``backend=`` other than ``"auto"`` or ``"hooks"``; before any
            communication, as one process does, for a BatchNorm in train mode or without running
            statistics and for a model without trainable parameters
            (:func:`~curvlab.backends._validation.check_batchnorm`; found in review s24: they
            were refused as parameters the hooks do not cover), and for a process group that
            does not fit the model's device mesh: a rank outside the mesh, or part of a shard
            group only (``process_group="local"`` where a shard group has several ranks), whose
            all-gather would wait for the ranks not calling
            (:func:`curvlab._fsdp.group_mesh_message`).
    """
    needs = frozenset(needs)
    problem = group_mesh_message(model, active())
    if problem is not None:  # before any communication: FSDP's all-gather would wait
        raise ValueError(problem)
    if backend not in ("auto", "hooks"):
        raise ValueError(
            f"backend={backend!r} cannot compute an FSDP2 (fully_shard) model: under FSDP2 "
            "curvlab uses its own layer hooks (backend='auto' or 'hooks')"
        )
    missing = needs - FSDP2HooksBackend.primitives
    if missing:
        raise NotImplementedError(
            f"this quantity needs {sorted(missing)}, which curvlab does not compute on an FSDP2 "
            "model. " + unsupported_message("fsdp2", "It")
        )
    # the one-process sweep's first refusals (a train-mode BatchNorm, no trainable parameter),
    # from flags alone, on every rank before the all-gather (review s24: they were found as
    # parameters the hooks do not cover, "these are not: ['bn.weight', 'bn.bias']" or "[]")
    check_batchnorm(scan_model(model))
    cast = _forward_dtype(model)
    if cast is not None:  # the model is a unit that casts its inputs: curvlab's checks see them
        data = _CastBatches(data, cast)  # cast (below an unsharded root, FSDP casts them itself)
    with unsharded(model):
        scan = scan_model(model)
        dtensor = dtensor_type()
        still = [n for n, p in scan.params.items() if dtensor and isinstance(p, dtensor)]
        if still:
            raise NotImplementedError(
                f"parameters {still[:4]} are still DTensors after FSDP's all-gather (tensor "
                "parallelism or a 2-D mesh?); " + unsupported_message("dtensor", "curvlab")
            )
        layers = HooksBackend.layers_of(model, scan)
        if layers is None:
            raise NotImplementedError(
                f"under FSDP2 curvlab computes per-example quantities with its own layer hooks, "
                f"which need every trainable parameter to be the weight or bias of a Linear, "
                f"Conv1d/Conv2d (groups=1, zero padding), HuggingFace Conv1D, Embedding, "
                f"LayerNorm, RMSNorm or eval-mode BatchNorm module; these are not: "
                f"{_uncovered(scan)[:6]} (freeze them with requires_grad_(False) to measure the "
                f"others). {FULL_COPY}"
            )
        token = _FORCED.set(FSDP2HooksBackend(layers, unchecked=_first_unit_casts(model)))
        try:
            return sweep(
                model,
                loss_fn,
                data,
                fn,
                needs=needs,
                chunk_size=chunk_size,
                backend="auto",
                scan=scan,
                generator=generator,
            )
        except Handover as h:  # on every rank (the sweep's ranks agree before its reduce)
            ranks = getattr(h, "ranks", None)
            where = f" on the data of rank(s) {ranks}" if ranks else ""
            raise NotImplementedError(
                f"curvlab's layer hooks cannot compute this FSDP2 model exactly{where}: {h}. "
                f"Under FSDP2 no other backend applies. {FULL_COPY}"
            ) from None
        finally:
            _FORCED.reset(token)
