"""What every backend shares: the protocol, the model facts it is chosen by, and the hand-over.

A backend computes raw primitives (always for the negative log-likelihood *sum* of one chunk of
examples) inside an :meth:`Backend.extended` session. It declares which primitives it has
(:attr:`Backend.primitives`) and, through :meth:`Backend.refuses`, which models it cannot compute
exactly. A fast backend that finds out only while running (on the first forward pass of a session)
that it cannot compute a model exactly raises :class:`Handover`; the engine then hands the chunk to
the next backend, so no backend ever answers for a model it cannot do. :class:`InplaceGuard` is
the fast backends' shared way of running modules with ``inplace=True`` out of place exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from curvlab._layout import call_input
from curvlab._losses import LossSpec
from curvlab._scan import ModelScan

__all__ = [
    "Backend",
    "Handover",
    "InplaceGuard",
    "ModelFacts",
    "in_place_modules",
    "model_facts",
    "parameter_uses",
    "PRIMITIVES",
]

PRIMITIVES = frozenset(
    {"sum_grad_squared", "batch_grad", "diag_ggn", "diag_hessian", "sqrt_ggn", "output_grads"}
)
"""The primitives a backend may offer (see :class:`Backend`)."""


class Handover(ValueError):
    """Raised by a backend that found it cannot compute this model exactly.

    Under ``backend="auto"`` the engine catches it and moves on to the next backend; under a forced
    ``backend=`` it reaches the user as a clear error (it is a ``ValueError``).
    """


@dataclass(frozen=True)
class ModelFacts:
    """Structural facts about a model that decide which backend may compute it.

    Attributes:
        scan: the model's :class:`~curvlab._scan.ModelScan`.
        shared: trainable parameter names owned by more than one module (tied weights).
        reused: module names reachable under more than one path (one module used twice).
        owners: names of modules with children that own trainable parameters directly.
    """

    scan: ModelScan
    shared: tuple[str, ...]
    reused: tuple[str, ...]
    owners: tuple[str, ...]


def model_facts(scan: ModelScan) -> ModelFacts:
    """Collect the :class:`ModelFacts` of a scanned model (one walk of its modules)."""
    owners_of: dict[int, int] = {}
    owners = []
    for name, module in scan.modules:
        own = False
        for p in module._parameters.values():
            if p is not None and p.requires_grad:
                owners_of[id(p)] = owners_of.get(id(p), 0) + 1
                own = True
        if own and any(c is not None for c in module._modules.values()):
            owners.append(name or "<root>")
    shared = tuple(n for n, p in scan.trainable.items() if owners_of.get(id(p), 0) > 1)
    seen: dict[int, int] = {}
    for _, m in scan.model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    reused = tuple(name or "<root>" for name, m in scan.modules if seen[id(m)] > 1)
    return ModelFacts(scan=scan, shared=shared, reused=reused, owners=tuple(owners))


def parameter_uses(
    output: Tensor, params: dict[str, nn.Parameter], reached: set[int] | None = None
) -> dict[str, int]:
    """How many times each parameter enters the autograd graph of ``output``.

    Counts the graph edges into each parameter's gradient accumulator: a parameter used by one
    layer once has one, a tied weight or a layer applied twice has two or more, an unused one
    none. One walk of the graph, no forward-pass overhead. ``reached``, if given, receives the
    ids of the graph's nodes (every autograd node ``output`` depends on), e.g. to tell which
    recorded module outputs reach the loss.
    """
    ids = {id(p): n for n, p in params.items()}
    counts = dict.fromkeys(params, 0)
    root = output.grad_fn
    if root is None:
        return counts
    casts: dict[int, str | None] = {}  # node id -> the parameter it is a dtype cast of
    stack, seen = [root], {id(root)}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                name = ids.get(id(var))
                if name is not None:
                    counts[name] += 1
                continue
            if id(nxt) not in casts:
                casts[id(nxt)] = _cast_of(nxt, ids)
            if casts[id(nxt)] is not None:  # autocast casts a weight once and reuses the cast:
                counts[casts[id(nxt)]] += 1  # each edge into the cast is one use
                continue
            if id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
    if reached is not None:
        reached.update(seen)
    return counts


def _cast_of(node: Any, ids: dict[int, str]) -> str | None:
    """The parameter name if ``node`` is a dtype cast (``ToCopyBackward0``) of one parameter."""
    if type(node).__name__ != "ToCopyBackward0":
        return None
    nexts = [n for n, _ in node.next_functions if n is not None]
    var = getattr(nexts[0], "variable", None) if len(nexts) == 1 else None
    return None if var is None else ids.get(id(var))


class Backend(Protocol):
    """The protocol of a backend (see the module docstring).

    Attributes:
        name: recorded in every result it computes.
        primitives: the primitives it offers, a subset of :data:`PRIMITIVES`; each is a method of
            that name taking ``(session, inputs, targets, ...)`` and returning raw NLL-sum values
            per parameter (see :class:`~curvlab.backends.FuncBackend` for the signatures).
        needs_math_attention: whether its passes need ``scaled_dot_product_attention``'s math
            kernel (double backward or ``vmap``, which the fused kernels lack); ``False`` lets
            a model's attention run its fastest kernel in the pass.
        shares_examples_check: whether its session runs a pending examples-apart check (its
            ``apart`` attribute, set by the sweep) in its first forward pass, sharing that pass
            (optional; ``False`` when absent: the sweep runs the check before the session).

    The session yielded by :meth:`extended` has ``forward(inputs, targets) -> output`` (the
    model's output in the loss's layout) and an ``on_output`` attribute the accumulation loop sets
    to a callable receiving each ``(output, targets)`` (to count loss terms).
    """

    name: str
    primitives: frozenset[str]
    needs_math_attention: bool

    def refuses(self, facts: ModelFacts, needs: frozenset[str], auto: bool) -> str | None:
        """Why this backend cannot compute the model exactly (``None``: it can try).

        ``auto`` says the choice is automatic: a backend may then also decline models it could do
        but slowly or fragilely.
        """
        ...

    def extended(
        self, model: nn.Module, spec: LossSpec, second_order: bool, scan: ModelScan
    ) -> AbstractContextManager[Any]:
        """A session in which the primitives run; every trace of it is removed on exit."""
        ...


_VIEWS = frozenset(
    {
        "AliasBackward0",
        "AsStridedBackward0",
        "BackwardHookFunctionBackward",  # a module's full backward hook: its input as it is
        "DiagonalBackward0",
        "ExpandBackward0",
        "NarrowBackward0",
        "PermuteBackward0",
        "ReshapeAliasBackward0",
        "SelectBackward0",
        "SliceBackward0",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "TBackward0",
        "TransposeBackward0",
        "UnbindBackward0",
        "UnfoldBackward0",
        "UnsafeViewBackward0",
        "UnsqueezeBackward0",
        "ViewBackward0",
    }
)
"""Autograd nodes of operations whose result shares its input's memory: a read through it is a
read of the input. (A view operation missing here counts as a read: a hand-over, never a miss.)"""


@dataclass
class _InplaceCall:
    """One call of a module with ``inplace=True`` that :class:`InplaceGuard` ran out of place."""

    name: str
    roots: tuple[tuple[Any, int], ...]  # gradient edges of the input and of its base
    floor: int  # sequence number of the input's autograd node: the module's own nodes are newer
    out: Any = None  # the output's autograd node (None: the module's output has no graph)


def _edge_key(t: Tensor) -> tuple[Any, int]:
    edge = get_gradient_edge(t)
    return edge.node, edge.output_nr


class InplaceGuard:
    """Runs modules with ``inplace=True`` out of place where that matters, and checks it is exact.

    A module that writes into its input in place (``nn.ReLU(inplace=True)``) breaks the backends'
    bookkeeping: BackPACK's full backward hooks refuse an in-place change of a hooked layer's
    output, and the hooks backend loses the gradient edge of a layer output that is a view (a
    ``Linear`` on sequences). So while the guard is installed every call of such a module on a
    tensor that requires grad (grad mode on) runs out of place; every other call (no gradient
    there, e.g. the user's raw inputs, a frozen backbone, a probe under ``no_grad``) runs in
    place as the user set it, which is exact by construction.

    Out of place is the same function only if nothing but the module itself reads the input's
    memory after the call: with ``self.act(h)`` and its result unused, or ``r = h; h =
    self.act(h); ... + r``, the user's model reads ``relu(h)`` where the out-of-place run reads
    ``h``. :meth:`check`, run on the graph of each forward pass's output, finds every other
    autograd consumer of the input, of its base and of any view of either (and the output
    itself being one of them) and hands over (:class:`Handover`) naming the module. It is
    conservative: a read *before* the call (same values either way) also hands over. Not seen:
    a read outside autograd (of ``h.detach()``, under ``no_grad``, or in Python control flow).

    Cost: two hook calls per such module call; one walk of the output's graph per forward pass
    that ran one out of place (none for models without in-place modules).
    """

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        """``modules``: the (name, module) pairs that run in place (:func:`in_place_modules`)."""
        self._modules = modules
        self._calls: list[_InplaceCall] = []
        self._pending: dict[int, list[_InplaceCall]] = {}

    @contextmanager
    def installed(self, root: nn.Module) -> Iterator[InplaceGuard]:
        """Hooks on the in-place modules and on ``root`` (the module the backend calls, whose
        output :meth:`check` reads) for the duration of the block; the flags as they were after.
        """
        handles = []
        try:
            if self._modules:
                for name, module in self._modules:
                    module.inplace = True  # (BackPACK's graph converter turns it off)
                    handles.append(
                        module.register_forward_pre_hook(self._before(name), with_kwargs=True)
                    )
                    handles.append(module.register_forward_hook(self._after()))
                handles.append(root.register_forward_pre_hook(self._start))
                handles.append(root.register_forward_hook(self._check))
            yield self
        finally:
            for h in handles:
                h.remove()
            for _, module in self._modules:
                module.inplace = True
            self._calls.clear()
            self._pending.clear()

    def _start(self, root: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():  # (a probe under no_grad runs inside the checked pass)
            self._calls.clear()
            self._pending.clear()

    def _check(self, root: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_grad_enabled():
            self.check(output)

    def _before(self, name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = call_input(module, args, kwargs)  # act(h) or act(input=h) (found in review)
            if not (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()):
                return  # in place, as the user set it: no graph to keep apart
            module.inplace = False
            roots = [_edge_key(x)]
            base = x._base if x._is_view() else None
            if base is not None and base.requires_grad:
                roots.append(_edge_key(base))
            node = roots[0][0]
            floor = -1 if hasattr(node, "variable") else node._sequence_nr()
            call = _InplaceCall(name, tuple(roots), floor)
            self._pending.setdefault(id(module), []).append(call)

        return hook

    def _after(self) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            stack = self._pending.get(id(module))
            if not stack:
                return
            call = stack.pop()
            module.inplace = True
            if isinstance(output, Tensor) and output.grad_fn is not None:
                if _edge_key(output) == call.roots[0]:
                    return  # the input itself (eval-mode Dropout): nothing was changed
                call.out = output.grad_fn
            self._calls.append(call)

        return hook

    def check(self, output: Any) -> None:
        """Hand over if a module run out of place in this forward pass had its input read by
        anything else (see the class docstring); ``output``: the tensor(s) the loss reads."""
        if not self._calls:
            return
        outs = [t for t in _tensors(output) if t.grad_fn is not None]
        # readers[id(node)][output_nr]: the nodes that read that output (None: the loss)
        readers: dict[int, dict[int, list[Any]]] = {}
        for t in outs:
            readers.setdefault(id(t.grad_fn), {}).setdefault(t.output_nr, []).append(None)
        stack = [t.grad_fn for t in outs]
        seen = {id(n) for n in stack}
        while stack:
            node = stack.pop()
            for nxt, nr in node.next_functions:
                if nxt is None:
                    continue
                readers.setdefault(id(nxt), {}).setdefault(nr, []).append(node)
                if id(nxt) not in seen:
                    seen.add(id(nxt))
                    stack.append(nxt)
        calls, self._calls = self._calls, []
        for call in calls:
            own = _own_nodes(call)
            found = [readers.get(id(node), {}).get(nr, []) for node, nr in call.roots]
            done: set[int] = set()
            while found:
                for reader in found.pop():
                    if reader is not None and id(reader) in own:
                        continue
                    if reader is None or type(reader).__name__ not in _VIEWS:
                        raise Handover(_read_elsewhere(call.name, reader))
                    if id(reader) not in done:  # a view: its readers (of any of its outputs,
                        done.add(id(reader))  # e.g. chunks) read the same memory
                        found.extend(readers.get(id(reader), {}).values())


def _read_elsewhere(name: str, reader: Any) -> str:
    what = (
        "it is the model's output" if reader is None else f"autograd node {type(reader).__name__}"
    )
    return (
        f"module '{name}' has inplace=True and its input is also read elsewhere ({what}): the "
        "model may rely on the module changing its argument (its result unused, or the input "
        "kept under another name or as a view), and this backend runs in-place modules out of "
        "place"
    )


def in_place_modules(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose ``inplace`` flag is set (read from ``__dict__``:
    ``Module.__getattr__`` is slow on a miss)."""
    return [(n, m) for n, m in modules if m.__dict__.get("inplace") is True]


def _own_nodes(call: _InplaceCall) -> set[int]:
    """Ids of the autograd nodes a call created: reachable from its output, newer than its
    input's node (the walk stops at the input)."""
    if call.out is None:
        return set()
    stop = {id(node) for node, _ in call.roots}
    own, stack = set(), [call.out]
    while stack:
        node = stack.pop()
        if id(node) in own or id(node) in stop:
            continue
        if hasattr(node, "variable") or node._sequence_nr() <= call.floor:
            continue
        own.add(id(node))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return own


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in a model output (a tensor, a tuple/list or a mapping of them)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
