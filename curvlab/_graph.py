"""Walking an autograd graph: every node a tensor's gradient would pass through, once each; what
a walk tells about the second derivative (the custom ``autograd.Function`` classes whose
backward is marked ``@once_differentiable``); and which parameters a reentrant activation
checkpoint hides from ``torch.autograd.grad`` or keeps it from reaching
(:func:`reentrant_checkpoint_params`, told from the modules seen to run inside it:
:func:`checkpoint_runs`)."""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction, once_differentiable

__all__ = [
    "graph_nodes",
    "reaching",
    "custom_functions",
    "once_differentiable_functions",
    "has_delayed_error",
    "hidden_by_reentrant_checkpoint",
    "ReentrantCheckpoints",
    "reentrant_checkpoint_params",
    "CheckpointRuns",
    "checkpoint_runs",
]


def graph_nodes(output: Tensor | Iterable[Tensor]) -> Iterator[Any]:
    """The nodes of ``output``'s autograd graph (of several tensors' graphs together), each
    once, depth first from ``output.grad_fn`` (none for a tensor without one). No tensor is
    touched; about 1 µs a node.

    Every node yielded is kept referenced until the walk ends, so no node's ``id`` is reused by
    another during it (a freed node's id may be handed to a new object).

    Example:
        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> [type(n).__name__ for n in graph_nodes((2 * x).sum())]
        ['SumBackward0', 'MulBackward0', 'AccumulateGrad']
    """
    outputs = [output] if isinstance(output, Tensor) else list(output)
    return _walk([t.grad_fn for t in reversed(outputs)])


def _walk(stack: list[Any]) -> Iterator[Any]:
    """The nodes reached from those of ``stack`` (the last first), each once, depth first:
    :func:`graph_nodes`' walk."""
    seen: set[int] = set()
    visited = []  # holds every node seen, so that no id is reused during the walk
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        visited.append(node)
        yield node
        stack.extend(next_fn for next_fn, _ in node.next_functions)


_ONCE_CODE = once_differentiable(lambda ctx: None).__code__
"""The code of the wrapper ``@once_differentiable`` puts around a backward (one code object for
every function it wraps)."""


def _once_differentiable(fn: Any) -> bool:
    """Whether ``fn`` is a ``@once_differentiable`` wrapper, or wraps one (``functools.wraps``
    decorators above it, e.g. ``torch.amp.custom_bwd``)."""
    for _ in range(32):  # a __wrapped__ chain, which a cycle would make endless
        if fn is None:
            return False
        if getattr(fn, "__code__", None) is _ONCE_CODE:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def once_differentiable_functions(
    output: Tensor | Iterable[Tensor], inputs: Sequence[Tensor] | None = None
) -> list[type]:
    """The custom ``torch.autograd.Function`` classes in ``output``'s autograd graph whose
    backward (or ``vjp``) is marked ``@once_differentiable``, each once, in the order met; with
    ``inputs``, only those whose backward a gradient with respect to them runs (a node from
    which one of their gradient accumulators is reached: a Function with no input of ``inputs``
    before it, such as one in a backbone left out of ``params=``, is pruned by autograd).

    Such a backward runs under ``no_grad``: a double backward through it does not raise, as
    torch means it to, where the derivative is taken with respect to chosen inputs
    (``torch.autograd.grad(..., inputs=params)``): the ``DelayedError`` node it leaves hangs off
    a detached copy of its result, which the engine prunes, so its part of the second
    derivative is silently dropped (a Hessian product 79% off, found in review). One walk of the
    graph, no tensor touched.

    Example:
        >>> import torch
        >>> from torch.autograd.function import once_differentiable
        >>> class Twice(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         return 2 * x
        ...
        ...     @staticmethod
        ...     @once_differentiable
        ...     def backward(ctx, g):
        ...         return 2 * g
        >>> x = torch.ones(2, requires_grad=True)
        >>> [f.__name__ for f in once_differentiable_functions(Twice.apply(x).exp())]
        ['Twice']
    """
    found = []
    for cls in custom_functions(output, inputs):
        # autograd calls vjp where a Function overrides it, else backward
        fn = cls.vjp if cls.vjp is not torch.autograd.Function.vjp else cls.backward
        if _once_differentiable(fn):
            found.append(cls)
    return found


def custom_functions(
    output: Tensor | Iterable[Tensor], inputs: Sequence[Tensor] | None = None
) -> list[type]:
    """The custom ``torch.autograd.Function`` classes in ``output``'s autograd graph (their
    nodes are ``BackwardCFunction`` instances with a ``_forward_cls``), each once, in the order
    met; with ``inputs`` (leaf tensors), only those on a path to one of them
    (:func:`once_differentiable_functions`). One walk of the graph, no tensor touched."""
    nodes = graph_nodes(output) if inputs is None else _reaching(output, inputs)
    found: dict[type, None] = {}
    for node in nodes:
        cls = getattr(node, "_forward_cls", None) if isinstance(node, BackwardCFunction) else None
        if cls is not None:
            found[cls] = None
    return list(found)


def _reaching(output: Tensor | Iterable[Tensor], inputs: Sequence[Tensor]) -> list[Any]:
    """The nodes of ``output``'s graph from which the gradient accumulator of a leaf of
    ``inputs`` is reached (those a backward pass with respect to ``inputs`` runs), in the
    order :func:`graph_nodes` meets them."""
    wanted = {id(t) for t in inputs}
    order = list(graph_nodes(output))  # (holds every node: no id reused during the walk)
    targets = {n for n in order if id(getattr(n, "variable", None)) in wanted}
    memo = reaching(order, targets, set())
    return [node for node in order if memo[node]]


def reaching(tops: list[Any], targets: set[Any], stops: set[Any]) -> dict[Any, bool]:
    """For every node of the graph above ``tops`` (not below ``stops`` or the leaves): whether
    it reaches a node of ``targets``. Iterative, each node once."""
    memo: dict[Any, bool] = {}
    stack: list[tuple[Any, bool]] = [(node, False) for node in tops]
    while stack:
        node, expanded = stack.pop()
        if node in memo:
            continue
        if node in targets:
            memo[node] = True
            continue
        children = [nxt for nxt, _ in node.next_functions if nxt is not None]
        if node in stops or not children:
            memo[node] = False
        elif expanded:
            memo[node] = any(memo.get(nxt, False) for nxt in children)
        else:
            stack.append((node, True))
            stack.extend((nxt, False) for nxt in children if nxt not in memo)
    return memo


def has_delayed_error(output: Tensor | Iterable[Tensor]) -> bool:
    """Whether ``output``'s autograd graph holds a ``DelayedError`` node (type name ``Error``):
    the mark a ``@once_differentiable`` backward leaves on what it computed in a backward pass
    with ``create_graph=True``, whose own derivative is then dropped silently (see
    :func:`once_differentiable_functions`). One walk of the graph."""
    return any(type(node).__name__ == "Error" for node in graph_nodes(output))


def hidden_by_reentrant_checkpoint(
    output: Tensor, model: Any = None, runs: CheckpointRuns | None = None
) -> list[str]:
    """The trainable parameters that ``torch.utils.checkpoint(..., use_reentrant=True)`` hides
    from ``torch.autograd.grad`` in ``output``'s autograd graph. Empty when the graph holds no
    reentrant checkpoint.

    The reentrant form runs the block under ``no_grad`` and recomputes it, with autograd, only
    when its own backward node runs (``loss.backward()``): ``torch.autograd.grad`` with
    respect to the block's parameters prunes that node, which reaches none of them, and returns
    no gradient, which ``allow_unused=True`` made 0 (found in review: an exact Hessian trace 0.0
    for 0.3661, a gradient mean of norm 0 for 0.6301 on a GPT-2 whose MLPs alone are
    trainable). A parameter the block uses and the model uses again outside it (a head tied to
    the block's weight) is in the graph through its outside use alone: its inside contribution
    was dropped (found in review s20: an exact Hessian trace 0.147 for 0.332). A checkpoint
    whose inputs do not require gradients leaves no node: its block gets no gradient in torch's
    own backward pass either (torch warns "None of the inputs have requires_grad=True"), and
    nothing is reported here.

    Which parameters the block holds:

    * with ``runs`` (:func:`checkpoint_runs` around the forward pass), every trainable
      parameter of a module seen to run inside the checkpoint's forward, in the graph or not,
      and those of its submodules absent from the graph (a child's weight used directly);
    * and those absent from the graph of the modules its function is, is bound to or holds
      (through ``functools.partial``, closures and default arguments, and the lists, tuples,
      dicts and plain objects there), the model itself excepted: a lambda holding ``self``
      (``lambda z: self.blk(z)``) made every unused trainable parameter of the model "hidden"
      (found in review s20);
    * every trainable parameter the function holds itself, in a ``functools.partial``'s
      arguments, a closure cell or a default argument (or a list, tuple, dict's values or
      plain object's attributes there, the object a bound method is bound to included):
      ``partial(fn, self.blk, self.gamma)``, ``lambda z: blk(z) * gamma`` after ``blk, gamma =
      self.blk, self.gamma``, ``partial(functional_call, self.tmpl, {"weight": self.w})``
      (found in review s20: ``gamma`` was dropped, its gradient 0 and an exact Hessian trace
      1.8189 for 1.8727, silently; 0.8287 for 1.0157 with ``w`` in a dict), in the graph or
      not (its use inside is dropped either way); for a tensor held so that has a history (a
      gate ``sigmoid(self.proj(x))``), every trainable parameter that history reaches (their part
      through it is dropped); a leaf that is no parameter (an input made to require
      gradients) does not count;
    * where the function holds the model itself, or no module: every trainable parameter of
      the model absent from the graph (a parameter of ``self`` used directly inside,
      ``lambda z: self.blk(z) @ self.w``, a ``ParameterList``'s ``self.ws[0]``, the weight of
      a module never called, ``F.linear(h, self.proj.weight)``: found in review s20, an exact
      Hessian trace 0.600 for 0.876 when only the modules seen to run counted), but those of a
      module seen to run outside every checkpoint whose call encloses none (a teacher branch
      run under ``no_grad``); where no module was seen to run inside (a purely functional
      block, or no ``runs``), every one absent from the graph. An unused one counts too: it
      cannot be told from one read inside (:attr:`ReentrantCheckpoints.unseen` names them).

    Not seen: a parameter used directly (not through a call of its module or of one above it)
    inside a checkpoint and again outside it, where the function does not hold it itself
    (``self.w`` read through a ``self`` it holds); a module run with autograd switched back on
    inside a checkpoint's forward (``torch.enable_grad()``), taken as run outside.

    Args:
        output: the model's output.
        model: the model (an ``nn.Module``), whose parameter names name those of the block;
            the block's own names (``"Linear.weight"``) where it is not one, or for a block
            outside it (``"Parameter(4,)"`` for a parameter outside it the function holds).
            Read only where the graph holds a reentrant checkpoint.
        runs: what :func:`checkpoint_runs` saw during the forward pass that made ``output``.

    Returns:
        The names, in ``model.named_parameters()`` order then the blocks'; one walk of the
        graph (and one of the histories of the tensors the functions hold, where one has a
        history), no tensor touched.

    Example:
        >>> import torch
        >>> from torch.utils.checkpoint import checkpoint
        >>> block = torch.nn.Linear(2, 2)
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> hidden_by_reentrant_checkpoint(checkpoint(block, x, use_reentrant=True).sum())
        ['Linear.weight', 'Linear.bias']
    """
    return reentrant_checkpoint_params(output, model, runs).hidden


class ReentrantCheckpoints(NamedTuple):
    """What :func:`reentrant_checkpoint_params` found in a graph."""

    hidden: list[str]
    """The trainable parameters the checkpointed blocks hide
    (:func:`hidden_by_reentrant_checkpoint`)."""
    behind: list[str]
    """The trainable parameters whose gradient passes through a checkpoint's backward node."""
    nodes: list[Any]
    """The checkpoints' backward nodes (``CheckpointFunctionBackward``), in the order met."""
    unseen: list[str] = []
    """Those of ``hidden`` counted only for being absent from the graph where a checkpointed
    function holds the whole model: not seen to run inside a block (not used through a call of
    their module), they may simply be unused (never read in the forward pass)."""


def _checkpoint_forward_code() -> Any:
    """The code of ``torch.utils.checkpoint.CheckpointFunction.forward`` (the reentrant form's
    forward, which runs the block), or ``None`` where torch has none."""
    from torch.utils import checkpoint as torch_checkpoint

    forward = getattr(getattr(torch_checkpoint, "CheckpointFunction", None), "forward", None)
    return getattr(forward, "__code__", None)


_CHECKPOINT_FORWARD = _checkpoint_forward_code()


_CALL_CODES = frozenset(
    getattr(getattr(nn.Module, name, None), "__code__", None)
    for name in ("_call_impl", "_wrapped_call_impl")
) - {None}
"""The code of ``nn.Module.__call__``'s steps, whose ``self`` is the module called."""


@dataclass
class CheckpointRuns:
    """The modules seen to run during a forward pass (:func:`checkpoint_runs`).

    Attributes:
        outside: every module called outside every reentrant checkpoint's forward (with
            autograd, or under ``no_grad`` with no such forward on the calling frames: a
            teacher branch), by ``id`` (held: no id reused while recorded).
        inside: per reentrant checkpoint, by the ``id`` of its backward node (the ``ctx`` of
            ``CheckpointFunction.forward``, which is the node of its output), the node and the
            modules called inside its forward (of a checkpoint nested in it too), by ``id``.
        enclosing: the modules whose call was under way when a module ran inside a reentrant
            checkpoint's forward (the model, the module whose forward called ``checkpoint``),
            by ``id``: their own parameters may be used inside it directly.
    """

    outside: dict[int, nn.Module] = field(default_factory=dict)
    inside: dict[int, tuple[Any, dict[int, nn.Module]]] = field(default_factory=dict)
    enclosing: dict[int, nn.Module] = field(default_factory=dict)

    def ran_inside(self, node: Any) -> list[nn.Module]:
        """The modules called inside the checkpoint whose backward node is ``node``."""
        entry = self.inside.get(id(node))
        return [] if entry is None or entry[0] is not node else list(entry[1].values())

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        """A global forward pre-hook: record ``module`` as run outside, or, where it runs
        without autograd, the reentrant checkpoints whose forward it runs inside (read from the
        calling frames: a module run under ``no_grad`` on purpose, a teacher branch, is in none
        and counts as outside), and at the first module inside a checkpoint the modules whose
        call encloses it. A module run with autograd is taken as outside without reading the
        frames (a reentrant checkpoint's forward runs without autograd)."""
        if torch.is_grad_enabled() or _CHECKPOINT_FORWARD is None:
            self.outside.setdefault(id(module), module)
            return
        seen_inside = False
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code is _CHECKPOINT_FORWARD:
                ctx = frame.f_locals.get("ctx")
                if ctx is not None:
                    entry = self.inside.get(id(ctx))
                    if entry is None:  # the first module inside it: who called it
                        entry = self.inside[id(ctx)] = (ctx, {})
                        self._enclosing(frame.f_back)
                    entry[1].setdefault(id(module), module)
                seen_inside = True
            frame = frame.f_back
        if not seen_inside:
            self.outside.setdefault(id(module), module)

    def _enclosing(self, frame: Any) -> None:
        """Record the modules being called on ``frame`` and the frames that called it."""
        while frame is not None:
            if frame.f_code in _CALL_CODES:
                module = frame.f_locals.get("self")
                if isinstance(module, nn.Module):
                    self.enclosing.setdefault(id(module), module)
            frame = frame.f_back


_GLOBAL_HOOK_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"
"""The start of the warning ``torch.compile``'s ``OptimizedModule`` gives when it is called
while a global module hook is registered (:func:`checkpoint_runs`' own)."""


@contextmanager
def checkpoint_runs(model: Any = None) -> Iterator[CheckpointRuns | None]:
    """Record the modules that run in the block, and which run inside a reentrant activation
    checkpoint's forward (:class:`CheckpointRuns`, read by :func:`reentrant_checkpoint_params`):
    a global forward pre-hook (``register_module_forward_pre_hook``) while the block runs,
    removed after it, also when it raises. A dictionary insertion per module call; the calling
    frames are read only for a module run without autograd. Nothing is recorded (``None``)
    under ``no_grad``, where the output has no graph.

    A ``torch.compile``'d submodule (an ``OptimizedModule``) of ``model`` warns, at each call,
    that a global hook fires an extra time for it (the extra call is recorded as a module run
    outside, which changes nothing here): that warning is silenced while the block runs, for
    such a model alone (``warnings.catch_warnings`` makes warnings already shown once show
    again, so it is not entered for other models; found in review s20: the warning at every
    curvlab call on a model with a compiled block).

    Args:
        model: the model the block runs (looked through for compiled submodules).
    """
    if not torch.is_grad_enabled():
        yield None
        return
    runs = CheckpointRuns()
    with ExitStack() as stack:
        if _has_optimized_module(model):
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=_GLOBAL_HOOK_WARNING)
        handle = nn.modules.module.register_module_forward_pre_hook(runs.pre_hook)
        try:
            yield runs
        finally:
            handle.remove()


def _has_optimized_module(model: Any) -> bool:
    """Whether ``model`` is or holds a ``torch.compile`` wrapper (``OptimizedModule``); ``False``
    at the cost of a dictionary lookup while ``torch._dynamo`` was never imported."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    if optimized is None or not isinstance(model, nn.Module):
        return False
    return any(isinstance(m, optimized) for m in model.modules())


def reentrant_checkpoint_params(
    output: Tensor, model: Any = None, runs: CheckpointRuns | None = None
) -> ReentrantCheckpoints:
    """The trainable parameters ``torch.utils.checkpoint(..., use_reentrant=True)`` keeps from
    ``torch.autograd.grad`` in ``output``'s autograd graph: those it hides
    (:func:`hidden_by_reentrant_checkpoint`), and those whose gradient must pass through a
    reentrant checkpoint's backward node (the parameters of layers before the block, whose
    output is its input). ``torch.autograd.grad`` cannot run that node: torch raises "When
    use_reentrant=True, torch.utils.checkpoint is incompatible with .grad()" where it is asked
    for the gradient of one of them, also when the block's own parameters are frozen (found in
    review s19: a frozen checkpointed block after trainable layers failed so in ``trace``,
    ``gradient_stats``, ``diag_fisher``, ``kfac`` and ``eigenvalues``); a gradient about the
    later layers alone prunes the node and is computed. All empty when the graph holds no
    reentrant checkpoint.

    Args:
        output: the model's output.
        model: the model (an ``nn.Module``), whose parameter names name them; without one,
            the hidden ones are named as :func:`hidden_by_reentrant_checkpoint` says, and
            those behind a checkpoint are the ``nn.Parameter`` leaves there (by shape).
        runs: what :func:`checkpoint_runs` saw during the forward pass that made ``output``
            (the modules that ran inside each checkpoint); without it, the blocks are told from
            what the checkpointed functions hold alone.

    Returns:
        ``(hidden, behind, nodes)``: the names, in ``model.named_parameters()`` order (then
        the blocks'), and the checkpoints' nodes. One walk of the graph, and, where there are
        checkpoints and none hides a parameter, one of its part below them; no tensor touched.

    Example:
        >>> import torch
        >>> from torch.utils.checkpoint import checkpoint
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> _ = model[1].requires_grad_(False)
        >>> h = model[0](torch.ones(1, 2))
        >>> found = reentrant_checkpoint_params(
        ...     checkpoint(model[1], h, use_reentrant=True).sum(), model
        ... )
        >>> found.hidden, found.behind
        ([], ['0.weight', '0.bias'])
    """
    checkpoints, leaves = [], set()
    for node in graph_nodes(output):
        cls = getattr(node, "_forward_cls", None) if isinstance(node, BackwardCFunction) else None
        if cls is not None and _is_reentrant_checkpoint(cls):
            checkpoints.append(node)
        variable = getattr(node, "variable", None)  # (an AccumulateGrad node's leaf)
        if variable is not None:
            leaves.add(id(variable))
    if not checkpoints:
        return ReentrantCheckpoints([], [], [])
    hidden, unseen = _hidden(checkpoints, leaves, model, runs)
    if hidden:  # refused as such: no need to look further
        return ReentrantCheckpoints(hidden, [], checkpoints, unseen)
    # the leaves below a checkpoint: autograd.grad about them runs its node
    named = dict(model.named_parameters()) if isinstance(model, nn.Module) else {}
    below: dict[int, Tensor] = {}
    for node in _walk([nxt for c in checkpoints for nxt, _ in c.next_functions]):
        variable = getattr(node, "variable", None)
        if variable is not None:
            below[id(variable)] = variable
    if named:
        behind = [n for n, p in named.items() if p.requires_grad and id(p) in below]
    else:
        behind = [
            f"Parameter{tuple(v.shape)}" for v in below.values() if isinstance(v, nn.Parameter)
        ]
    return ReentrantCheckpoints(hidden, behind, checkpoints)


def _hidden(
    checkpoints: list[Any], leaves: set[int], model: Any, runs: CheckpointRuns | None
) -> tuple[list[str], list[str]]:
    """The names of the trainable parameters the reentrant checkpoints of ``checkpoints`` hide,
    ``leaves`` the ids of the graph's leaves (:func:`hidden_by_reentrant_checkpoint`), and those
    of them counted only for being absent from the graph (``unseen``: not seen to run inside)."""
    root = model if isinstance(model, nn.Module) else None
    found: dict[int, tuple[nn.Module, str]] = {}  # id -> (a module holding it, its name there)

    def add(module: nn.Module, recurse: bool, absent_only: bool, spared: Any = ()) -> None:
        for n, p in module.named_parameters(recurse=recurse):
            if p.requires_grad and (not absent_only or id(p) not in leaves) and id(p) not in spared:
                found.setdefault(id(p), (module, n))

    everything = False  # every absent trainable parameter of the model counts
    whole = False  # every absent one counts but those of modules seen to run outside alone
    tensors: dict[int, Tensor] = {}  # the tensors requiring gradients the functions hold
    for node in checkpoints:
        ran = runs.ran_inside(node) if runs is not None else []
        held, held_tensors = _modules_of(getattr(node, "run_function", None))
        tensors.update((id(t), t) for t in held_tensors)
        for module in ran:  # ran under no_grad inside: hidden even where also used outside
            add(module, recurse=False, absent_only=False)
        for module in [*ran, *(m for m in held if m is not root)]:
            add(module, recurse=True, absent_only=True)
        if not held or any(m is root for m in held):  # the block cannot be told from them
            if ran and runs is not None:
                whole = True
            else:
                everything = True
    named = dict(root.named_parameters()) if root is not None else {}
    direct = _held_parameters(list(tensors.values()), named)
    seen = set(found) | set(direct)
    if root is not None and (everything or whole):
        spared: set[int] = set()
        if not everything and runs is not None:
            # a module run outside every checkpoint (not one whose call encloses one, as the
            # model's own does) holds parameters the block does not use (a teacher branch run
            # under no_grad); any other absent one, a ParameterList's or a weight read directly
            # (F.linear(h, self.proj.weight)), may be used inside it (found in review s20: an
            # exact Hessian trace 0.600 for 0.876 when only modules that ran were looked at)
            for module in runs.outside.values():
                if module is not root and id(module) not in runs.enclosing:
                    spared.update(id(p) for p in module.parameters(recurse=False))
        for module in root.modules():
            add(module, recurse=False, absent_only=True, spared=spared)
    names = [n for n, p in named.items() if id(p) in found or id(p) in direct]
    known = {id(p) for p in named.values()}
    for key, (module, n) in found.items():  # a block outside the model (a function's module)
        if key not in known:
            names.append(f"{type(module).__name__}.{n}")
    for key, p in direct.items():  # a parameter outside the model the function holds
        if key not in known and key not in found:
            names.append(f"Parameter{tuple(p.shape)}")
    unseen = [n for n, p in named.items() if id(p) in found and id(p) not in seen]
    return names, unseen


def _held_parameters(tensors: list[Tensor], named: dict[str, Tensor]) -> dict[int, Tensor]:
    """The trainable parameters whose part a checkpointed function's held ``tensors`` (those
    requiring gradients, :func:`_modules_of`) drop, by ``id``: such a tensor is read inside the
    block, where no graph is recorded, so its use there reaches no gradient, whether or not it
    is also in the output's graph through a use outside (as a tied weight). A leaf counts where
    it is a trainable parameter (of ``named``, the model's, or an ``nn.Parameter`` outside it;
    a leaf input made to require gradients, as HF's ``enable_input_require_grads`` does, is no
    parameter); a tensor with a history (a gate ``sigmoid(self.proj(x))``) drops the part of
    every trainable parameter its graph reaches (one walk of their graphs together)."""
    if not tensors:
        return {}
    params = {id(p): p for p in named.values() if p.requires_grad}

    def counts(t: Tensor) -> bool:
        return t.requires_grad and (id(t) in params or isinstance(t, nn.Parameter))

    found = {id(t): t for t in tensors if t.grad_fn is None and counts(t)}
    histories = [t for t in tensors if t.grad_fn is not None]
    for node in graph_nodes(histories):
        variable = getattr(node, "variable", None)  # (an AccumulateGrad node's leaf)
        if variable is not None and counts(variable):
            found.setdefault(id(variable), variable)
    return found


def _is_reentrant_checkpoint(cls: type) -> bool:
    """Whether ``cls`` is ``torch.utils.checkpoint.CheckpointFunction`` (the reentrant form)."""
    return cls.__name__ == "CheckpointFunction" and cls.__module__ == "torch.utils.checkpoint"


def _modules_of(fn: Any) -> tuple[list[nn.Module], list[Tensor]]:
    """What a checkpointed function holds (:func:`_held`): the modules, and the tensors that
    require gradients."""
    modules: dict[int, nn.Module] = {}
    tensors: dict[int, Tensor] = {}
    _held(fn, modules, tensors, 0, {})
    return list(modules.values()), list(tensors.values())


def _held(
    fn: Any,
    modules: dict[int, nn.Module],
    tensors: dict[int, Tensor],
    depth: int,
    visited: dict[int, int],
) -> None:
    """Add to ``modules`` the modules a checkpointed function is (``checkpoint(self.block,
    h)``), is bound to (``layer.forward``), or holds in a ``functools.partial`` (HF's
    ``partial(Block.forward, block, ...)``), a closure or its default arguments (``lambda z,
    layer=layer: ...``), or in a list, tuple, dict's values or plain object's attributes there
    (a ``SimpleNamespace``, the object a bound method is bound to); and to ``tensors`` the
    tensors that require gradients held so (``partial(fn, self.blk, self.gamma)``, a closure
    over ``gamma = self.gamma`` or ``d = {"g": self.gamma}``, ``partial(functional_call,
    self.tmpl, {"weight": self.w})``; found in review s20: such a trainable ``gamma`` got no
    gradient, silently, an exact Hessian trace 1.8189 for 1.8727, and 0.8287 for 1.0157 with
    ``w`` held in a dict). A few levels deep, each once at its least depth (``visited``: ``id``
    to depth); a module's own tensors are not looked into here."""
    if isinstance(fn, nn.Module):
        modules.setdefault(id(fn), fn)
        return
    if isinstance(fn, Tensor):
        if fn.requires_grad:
            tensors.setdefault(id(fn), fn)
        return
    if depth >= 4 or fn is None or visited.get(id(fn), 4) <= depth:
        return
    visited[id(fn)] = depth
    held: list[Any] = []
    if isinstance(fn, functools.partial):
        held = [fn.func, *fn.args, *fn.keywords.values()]
    elif inspect.ismethod(fn):
        held = [fn.__self__, fn.__func__]
    elif inspect.isfunction(fn):
        for cell in fn.__closure__ or ():
            try:
                held.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        held += [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]
    elif isinstance(fn, (list, tuple)):
        held = list(fn)
    elif isinstance(fn, Mapping):
        held = list(fn.values())
    elif not (inspect.isclass(fn) or inspect.ismodule(fn) or inspect.isroutine(fn)):
        try:  # a plain object's attributes (a SimpleNamespace, a config, a wrapper)
            held = list(vars(fn).values())
        except TypeError:  # none (a number, a string, an object with __slots__)
            held = []
    for x in held:
        _held(x, modules, tensors, depth + 1, visited)
