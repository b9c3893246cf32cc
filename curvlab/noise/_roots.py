"""The loss of a noise-capturing step, and the check of its backward pass's roots.

Inside a :class:`~curvlab.noise._capture.Taps` capture with a graph check, the loss module's
output is handed back as a :class:`_StepLoss`: a wrapper whose ``__torch_function__`` runs every
operation on the plain tensor and, on ``backward()`` / ``torch.autograd.backward`` /
``torch.autograd.grad``, hands the pass's roots to the open captures first. A capture then walks
the autograd graph from the roots (:func:`_reaches`, no host synchronisation) to see whether a
term other than the loss module's output reaches the model's output or a tapped layer; such a
step measures in the separate, exact pass. A capture that folds noise into the backward pass
(``FullFisherNoise``) asks instead whether the gradient the pass gives the loss module's output is
a GradScaler's scale alone (:func:`_loss_gradient`): a factor the loop puts on the loss
(``0.25 * loss``) would scale the folded noise, a factor of exactly 1 (``loss / 1``, as
``Accelerator.backward`` divides by one accumulation step) would not; where the loop states its
factor (``loss_factor=``), the capture compares it with the factor the graph shows
(:func:`_loss_gradient`), where that needs no host synchronisation.
"""

from __future__ import annotations

import math
import sys
import types
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvlab._graph import reaching

if TYPE_CHECKING:
    from curvlab.noise._capture import Taps

__all__ = [
    "_LIVE",
    "_StepLoss",
    "_loss_gradient",
    "_reaches",
    "_step_loss",
    "_weak",
]

_LIVE: list[Taps] = []
"""The open captures whose graph check reads the backward pass's roots (:class:`_StepLoss`)."""

_BACKWARDS = (Tensor.backward, torch.autograd.backward, torch.autograd.grad)
# the keyword of each one's explicit gradient for its roots
_SEEDS = {
    Tensor.backward: "gradient",
    torch.autograd.backward: "grad_tensors",
    torch.autograd.grad: "grad_outputs",
}
_MULS = (Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.mul)
# nodes on a path from a backward pass's root to the loss output that pass its gradient on as it
# is (a dtype cast, a copy, a reshape of the one-element loss)
_UNIT_NODES = frozenset(
    {
        "ToCopyBackward0",
        "CloneBackward0",
        "AliasBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
    }
)


class _StepLoss(Tensor):
    """The loss module's output inside a capture with a graph check, and every tensor with a
    graph the step computes from it: a wrapper of the plain tensor (``_curvlab_plain``).

    Its ``__torch_function__`` runs every operation on the plain tensors instead (values, hooks,
    ``.grad``, ``repr``, formatting and pickling are theirs), and wraps results with a graph while
    a capture is open. On ``Tensor.backward``, ``torch.autograd.backward`` and
    ``torch.autograd.grad`` it first hands the roots to the open captures
    (:meth:`Taps._check_roots`); the pass then runs from the plain roots, on the step's own graph.
    """

    _curvlab_plain: Tensor

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        args, kwargs = _plain(args), _plain(kwargs or {})
        if func in _BACKWARDS:
            return _backward(func, args, kwargs)
        result = func(*args, **kwargs)
        if not _LIVE:
            return result
        product = func in _MULS and isinstance(result, Tensor) and result.grad_fn is not None
        if product and _called_by_grad_scaler():  # scaler.scale(loss): not the loop's factor
            for taps in _LIVE:
                taps._scaler_nodes.add(result.grad_fn)
        return _wrap(result)


def _backward(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a backward pass (``func`` one of ``_BACKWARDS``, its arguments plain) after the open
    captures checked its roots, marking it as checked while it runs."""
    if args:
        roots = args[0]
    else:
        roots = kwargs.get("tensors" if func is torch.autograd.backward else "outputs")
    # an explicit gradient for the roots (not the implicit 1 of a scalar loss), one per root
    at = 2 if func is torch.autograd.grad else 1
    seed = args[at] if len(args) > at else kwargs.get(_SEEDS[func])
    if isinstance(roots, Tensor):
        pairs = [(roots, seed)]
    else:
        roots = list(roots or ())
        seeds = [seed] if isinstance(seed, Tensor) else list(seed or ())
        seeds += [None] * (len(roots) - len(seeds))
        pairs = list(zip(roots, seeds))
    pairs = [(r, g) for r, g in pairs if isinstance(r, Tensor)]
    roots, seeds = [r for r, _ in pairs], [g for _, g in pairs]
    checked = [taps for taps in _LIVE if taps._check_roots(roots, seeds)]
    for taps in checked:
        taps._checking = True
    try:
        return func(*args, **kwargs)
    finally:
        for taps in checked:
            taps._checking = False


def _step_loss(tensor: Tensor) -> _StepLoss:
    """``tensor`` wrapped as a :class:`_StepLoss`."""
    wrapper = tensor.as_subclass(_StepLoss)
    wrapper._curvlab_plain = tensor
    return wrapper


def _plain(obj: Any) -> Any:
    """``obj`` with every :class:`_StepLoss` (also in lists, tuples, dicts) its plain tensor."""
    if isinstance(obj, _StepLoss):
        return obj._curvlab_plain
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    if type(obj) is dict:
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _wrap(obj: Any) -> Any:
    """A plain tensor with a graph as a :class:`_StepLoss` (also in lists and tuples)."""
    if type(obj) is Tensor and obj.grad_fn is not None:
        return _step_loss(obj)
    if type(obj) in (list, tuple):
        return type(obj)(_wrap(v) for v in obj)
    return obj


def _weak(obj: Any) -> Any:
    """A weak reference to a tensor (``None`` for anything else)."""
    return weakref.ref(obj) if isinstance(obj, Tensor) else None


def _reaches(roots: list[Tensor], stops: set[Any], marks: set[Any]) -> bool:
    """Whether the autograd graph of ``roots`` reaches a node of ``marks`` on a path that does
    not pass through a node of ``stops`` (a walk of the graph above the stops; no
    synchronisation). Nodes are kept while walking, so their Python objects stay the same."""
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in stops or node in seen:
            continue
        if node in marks:
            return True
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return False


def _loss_gradient(
    roots: list[Tensor],
    stops: set[Any],
    scaler_nodes: set[Any],
    marks: set[Any],
    seeds: list[Any] | None = None,
) -> tuple[bool, tuple[float, float] | None]:
    """What a backward pass from ``roots`` gives the loss output (its node one of ``stops``) as
    its gradient, read off the autograd graph before the pass runs (no host synchronisation):
    ``(unit, factor)``.

    ``unit``: whether the loss output gets the gradient 1 times a GradScaler's scale: one path
    from the roots (with the gradients ``seeds``, ``None`` for the implicit 1) reaches it,
    through GradScaler products (``scaler_nodes``), other terms added (``loss + penalty``,
    coefficient 1), a product or quotient with a constant that is exactly 1 (``loss /
    accumulation_steps`` with one step, as ``Accelerator.backward`` divides) and
    value-preserving operations on the one-element loss (a copy, a cast, a reshape); a walk of
    the autograd graph that does not go below ``marks`` (the model's output) or the leaves.
    ``factor``: ``(k, rounding)`` where that gradient is ``k`` times a GradScaler's scale and
    every step of the path can be read without a host synchronisation (the operations ``unit``
    accepts, with a
    product or quotient by any such constant, ``a + alpha * loss``, a negation, and a root's
    explicit gradient, each a Python number or a one-element real tensor on the CPU); ``rounding`` is the
    relative rounding of the tensors read (their dtype's ``eps``; 0 for Python numbers), so
    that a loop's factor held in a 16-bit tensor is not told from the number it rounds. ``None``
    where any step cannot be read: a constant on an accelerator (reading it would synchronise),
    the loss used twice, another operation on the way (``loss.clamp(...)``, ``loss ** 1``), or
    not one path from one one-element root. The product is taken in float64, so ``k`` can differ
    from the gradient the pass computes in the loss's dtype by its rounding."""
    seeds = seeds if seeds is not None else [None] * len(roots)
    tops = [r.grad_fn for r in roots if r.grad_fn is not None]
    reach = reaching(tops, stops, marks)
    tops = [
        (r, g, r.grad_fn)
        for r, g in zip(roots, seeds)
        if r.grad_fn is not None and reach[r.grad_fn]
    ]
    if len(tops) != 1 or tops[0][0].numel() != 1:
        return False, None
    steps = [(1.0, 0.0) if tops[0][1] is None else _read_number(tops[0][1])]
    node, seen = tops[0][2], set()
    # every accepted node's input on the path holds at most as many entries as its output, so
    # from the one-element root down the gradient stays one element: no broadcast sums it
    while node not in stops:
        if node in seen:
            return False, None
        seen.add(node)
        edges = [
            (i, nxt)
            for i, (nxt, _) in enumerate(node.next_functions)
            if nxt is not None and reach.get(nxt, False)
        ]
        if len(edges) != 1:
            return False, None
        steps.append(_edge_factor(node, edges[0][0], scaler_nodes))
        node = edges[0][1]
    unit = all(s is not None and s[0] == 1 for s in steps)
    if any(s is None for s in steps):
        return unit, None
    factor, rounding = 1.0, 0.0
    for value, error in steps:  # (a Python loop: the few nodes between the roots and the loss)
        factor, rounding = factor * value, rounding + error
    return unit, (factor, rounding)


def _edge_factor(node: Any, index: int, scaler_nodes: set[Any]) -> tuple[float, float] | None:
    """The factor by which ``node`` multiplies the gradient of its output on the way to its
    input ``index`` (up to a GradScaler's scale), with the relative rounding of its reading
    (:func:`_read_number`), or ``None`` where it cannot be read without a host synchronisation
    or ``node`` is not a product, quotient, sum or value-preserving operation of the one-element
    loss: see :func:`_loss_gradient`."""
    if node in scaler_nodes:
        return 1.0, 0.0
    name = node.name()
    if name in _UNIT_NODES:
        return 1.0, 0.0
    if name == "AddBackward0":  # a + alpha * b
        if index == 0:
            return 1.0, 0.0
        alpha = getattr(node, "_saved_alpha", None)
        return None if alpha is None else _read_number(alpha)
    if name == "SubBackward0":  # a - alpha * b: the loss must be a
        return (1.0, 0.0) if index == 0 else None
    if name == "NegBackward0":  # -loss
        return -1.0, 0.0
    if name in ("SumBackward0", "MeanBackward0"):  # the sum (mean) of all the elements
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        if sizes is None:
            return None
        # each element's gradient is the output's (divided by their number for a mean): a loss
        # stacked with other terms and averaged, ``torch.stack([loss, aux]).mean()``, carries
        # 1/2 (it was trusted as stated until review s22)
        return (
            (1.0, 0.0) if name == "SumBackward0" else (1.0 / math.prod(int(d) for d in sizes), 0.0)
        )
    if name in ("SumBackward1", "MeanBackward1"):
        sizes = getattr(node, "_saved_self_sym_sizes", None)  # of a one-element tensor
        return (1.0, 0.0) if sizes is not None and all(int(d) == 1 for d in sizes) else None
    if name in ("StackBackward0", "CatBackward0"):  # the one input that reaches the loss
        return 1.0, 0.0
    try:  # the constant the loss is multiplied (divided) by: ``_saved_*`` of the node
        if name in ("MulBackward0", "MulBackward1"):  # a * b: the gradient of a is b's
            return _read_number(node._saved_self if index == 1 else node._saved_other)
        if name in ("DivBackward0", "DivBackward1") and index == 0:  # a / b, the loss a
            divisor = _read_number(node._saved_other)
            if divisor is None or divisor[0] == 0:  # (a zero gradient: _vanishing_gradient)
                return None
            return 1.0 / divisor[0], divisor[1]
    except (AttributeError, RuntimeError):  # not saved, or changed in place since
        return None
    return None


def _read_number(value: Any) -> tuple[float, float] | None:
    """``(value, relative rounding)`` of a Python number, or of a one-element real tensor on the
    CPU (a Python scalar's wrapped tensor is; the rounding is its dtype's ``eps``, 0 for integer
    tensors), read without a host synchronisation; ``None`` for anything else (a tensor on an
    accelerator: reading it would synchronise; a bool, a complex number, several elements)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        return None
    if not isinstance(value, Tensor):
        return float(value), 0.0
    if value.numel() != 1 or value.device.type != "cpu" or value.is_complex():
        return None
    try:
        number = float(value.detach().reshape(()).item())
    except (RuntimeError, TypeError, ValueError):  # a tensor without data (meta, fake)
        return None
    return number, torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0


_SCALER_CODES: dict[tuple[str, ...], frozenset[types.CodeType]] = {}


def _called_by_grad_scaler() -> bool:
    """Whether the operation running now was called by a GradScaler's ``scale`` (torch's, or
    FSDP's ShardedGradScaler once imported): a look at the few frames above the dispatch."""
    frame = sys._getframe(2)  # above _called_by_grad_scaler and __torch_function__
    codes = _grad_scaler_codes()
    for _ in range(3):
        if frame is None:
            return False
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _grad_scaler_codes() -> frozenset[types.CodeType]:
    """The code objects of the GradScaler ``scale`` methods (and the functions they define)."""
    owners = ["torch.amp.grad_scaler"]
    if "torch.distributed.fsdp.sharded_grad_scaler" in sys.modules:
        owners.append("torch.distributed.fsdp.sharded_grad_scaler")
    key = tuple(owners)
    if key not in _SCALER_CODES:
        found: set[types.CodeType] = set()
        for owner in owners:
            module = sys.modules.get(owner)
            for cls in vars(module).values() if module is not None else ():
                if not (isinstance(cls, type) and cls.__module__ == owner):
                    continue
                scale = cls.__dict__.get("scale")
                stack = [scale.__code__] if hasattr(scale, "__code__") else []
                while stack:
                    code = stack.pop()
                    found.add(code)
                    stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        _SCALER_CODES[key] = frozenset(found)
    return _SCALER_CODES[key]


# ------------------------------------------------------------------ the loss input's layout
Op = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""``(kind, input shape, output shape, permutation)`` of one operation between the model's output
and the loss input: ``"reshape"`` (row-major order kept) or ``"permute"``
(``output = input.permute(permutation)``)."""

_RESHAPES = frozenset(
    {"ViewBackward0", "UnsafeViewBackward0", "SqueezeBackward0", "SqueezeBackward1"}
    | {"SqueezeBackward2", "ReshapeAliasBackward0"}
)
_SAME = frozenset({"CloneBackward0", "AliasBackward0", "ToCopyBackward0"})
# the node torch wraps a module's inputs and outputs in for its full backward (pre-)hooks (the
# outputs after the forward hooks ran, so after the capture read the model's output): the hooks
# act on the gradient that passes it (:func:`_hooked_between`)
_HOOK_NODE = "BackwardHookFunctionBackward"
# nodes that hand each of their inputs through as the output of the same number: DDP's sink, and
# the hook node: a backward hook on the root module, or a global one, put it between the model's
# output and the loss input (before review s20 the walk stopped there, and every noise step of
# such a model was refused)
_PASS_THROUGH = frozenset({"_DDPSinkBackward", _HOOK_NODE})
# a slice or expand that keeps its input whole (_no_op)
_NO_OPS = frozenset({"SliceBackward0", "ExpandBackward0"})


def _loss_path(loss_input: Tensor, output: tuple[Any, int], limit: int = 64) -> list[Op] | str:
    """The operations that made ``loss_input`` from the model's output (``output``: its autograd
    node and output number), in forward order: reshapes (``view``, ``reshape``, ``flatten``,
    ``squeeze``, ``unsqueeze``), permutations (``transpose``, ``permute``, ``movedim``, ``.mT``)
    and value-preserving copies (``contiguous``, ``clone``, a dtype cast, DDP's pass-through, the
    wrapping of a module's outputs for its full backward hooks, a slice over a whole axis such
    as ``out[:]`` or an expand to the same sizes). Such a hook acts on the step's gradients:
    the capture checks for it apart, on every path (:func:`_hooked_between`).
    A walk of the autograd graph down from the loss input (no synchronisation).

    Returns:
        The operations (``[]``: the loss input is the model's output), or the name of the
        first other operation on the way (a selection, an arithmetic operation), or a sentence
        saying that the walk did not reach the model's output.
    """
    node, nr = loss_input.grad_fn, loss_input.output_nr
    shape = tuple(int(d) for d in loss_input.shape)
    ops: list[Op] = []
    for _ in range(limit):
        if node is output[0] and nr == output[1]:
            return ops[::-1]
        if node is None:
            return "a tensor that is not computed from the model's output"
        name = node.name()
        n = len(shape)
        index = 0
        if name in _RESHAPES:
            before = tuple(int(d) for d in node._saved_self_sym_sizes)
            ops.append(("reshape", before, shape, ()))
        elif name == "UnsqueezeBackward0":
            dim = _dim(node._saved_dim, n)
            before = shape[:dim] + shape[dim + 1 :]
            ops.append(("reshape", before, shape, ()))
        elif name in ("TransposeBackward0", "TransposeBackward1", "TBackward0"):
            perm = list(range(n))
            d0, d1 = (
                (0, n - 1)
                if name == "TBackward0"
                else (_dim(node._saved_dim0, n), _dim(node._saved_dim1, n))
            )
            perm[d0], perm[d1] = perm[d1], perm[d0]
            before = tuple(shape[perm.index(a)] for a in range(n))
            ops.append(("permute", before, shape, tuple(perm)))
        elif name == "PermuteBackward0":
            perm = [_dim(d, n) for d in node._saved_dims]
            before = tuple(shape[perm.index(a)] for a in range(n))
            ops.append(("permute", before, shape, tuple(perm)))
        elif (
            name in _SAME
            or name in _PASS_THROUGH
            or (name in _NO_OPS and _no_op(node, name, shape))
        ):
            before = shape
            index = nr if name in _PASS_THROUGH else 0  # output k passes input k through
        else:
            return name
        nxt = node.next_functions[index] if index < len(node.next_functions) else (None, 0)
        (node, nr), shape = nxt, before
    return f"more than {limit} operations"


def _hooked_between(loss_input: Tensor, marks: set[Any]) -> bool:
    """Whether a module's full backward hook or pre-hook acts on a gradient that the loss input
    passes on to the model's output or a tapped layer's output (their nodes: ``marks``): a
    :data:`_HOOK_NODE` on a path from the loss input down to a node of ``marks``. Such a node is
    the root module's (or a global hook's) where the model has one, else a module's of the loop's
    own called between the model and the loss (``loss_fn(post(model(x)), y)``): also below an
    operation :func:`_loss_path` does not pass (``2 * post(out)``), and where the loss input is
    made from the model's output along several paths. A walk of the autograd graph from the loss
    input, not below ``marks`` or the leaves (no synchronisation)."""
    top = loss_input.grad_fn
    if top is None or not marks:
        return False
    reach = reaching([top], marks, set())
    return any(hit and node.name() == _HOOK_NODE for node, hit in reach.items())


def _no_op(node: Any, name: str, shape: tuple[int, ...]) -> bool:
    """Whether a slice or expand that made a tensor of ``shape`` kept its input as it was: a
    slice over the whole axis with step 1 (``out[:]``, ``out.narrow(1, 0, T)``), an expand to
    the input's own sizes (``out.expand_as(out)``). Read from the node's saved arguments."""
    sizes = tuple(int(d) for d in node._saved_self_sym_sizes)
    if name == "ExpandBackward0":
        return sizes == shape
    size = sizes[_dim(node._saved_dim, len(sizes))]
    start, end = _index(node._saved_start, size, 0), _index(node._saved_end, size, size)
    return sizes == shape and int(node._saved_step) == 1 and start == 0 and end == size


def _index(d: Any, size: int, default: int) -> int:
    """A saved slice bound (a negative one saved as an unsigned 64-bit integer; ``None``:
    ``default``) in ``[0, size]``, as Python's slicing clamps it."""
    if d is None:
        return default
    d = int(d)
    if d >= 2**63:
        d -= 2**64
    if d < 0:
        d += size
    return min(max(d, 0), size)


def _dim(d: Any, n: int) -> int:
    """A saved dimension (a negative one is saved as an unsigned 64-bit integer) in ``[0, n)``."""
    d = int(d)
    if d >= 2**63:
        d -= 2**64
    return d + n if d < 0 else d


def _separate_targets(
    ops: list[Op], out_shape: tuple[int, ...], loss_shape: tuple[int, ...], target: Any, ce: bool
) -> tuple[Any, bool] | None:
    """The loss call's targets rearranged for a separate pass of ``loss_fn(model(inputs),
    targets)``, and whether that pass must be told the classes are last.

    ``ops`` made the loss input (``loss_shape``) from the model's output (``out_shape``). For
    cross-entropy the loss input holds the classes in axis 1 (axis 0 if it is 1-D): they must come
    from one axis of the model's output, its last (then the pass is told so, with
    :func:`curvlab._losses.classes_last`; with ``T == C`` torch's layout would fit too) or axis 1
    (torch's layout), and the other axes' positions are the loss's positions in some order, which
    the targets are put back into (a time-major flatten, ``out.transpose(0, 1).reshape(-1, C)``,
    takes the targets in that order too). For the other losses (and class-probability targets)
    every entry is rearranged. ``None`` when the operations keep no class axis whole.
    """
    out_shape, loss_shape = tuple(out_shape), tuple(loss_shape)
    last = False
    if ce:
        axis = 1 if len(loss_shape) >= 2 else 0  # torch's class axis of the loss input
        found = None
        for h in dict.fromkeys((len(out_shape) - 1, min(1, len(out_shape) - 1))):
            tracked = _track(ops, out_shape, h)
            if tracked is not None and tracked[0] == axis:
                found = h
                break
        if found is None:
            return None
        last = found == len(out_shape) - 1 and found != 1
        if isinstance(target, Tensor) and not target.is_floating_point():
            tracked = _track(ops, out_shape, found)
            assert tracked is not None
            kept = out_shape[:found] + out_shape[found + 1 :]
            put = _put_back(tracked[1], target, kept)
            return None if put is None else (put, last)
    if not isinstance(target, Tensor):
        return target, last
    tracked = _track(ops, out_shape, None)
    put = None if tracked is None else _put_back(tracked[1], target, out_shape)
    return None if put is None else (put, last)


def _track(
    ops: list[Op], out_shape: tuple[int, ...], axis: int | None
) -> tuple[int | None, Tensor] | None:
    """Follow the model output's ``axis`` (``None``: none) through ``ops``: where it ends up, and
    for every other entry of the loss input the flat index of its entry of the model's output
    (with ``axis`` taken out). ``None`` when a reshape splits or merges ``axis``."""
    kept = out_shape if axis is None else out_shape[:axis] + out_shape[axis + 1 :]
    pos = torch.arange(math.prod(kept)).reshape(kept)
    shape = out_shape
    for kind, before, after, perm in ops:
        if before != shape:
            return None
        if kind == "reshape":
            if axis is None:
                pos = pos.reshape(after)
            else:
                k = _kept_axis(before, axis, after)
                if k is None:
                    return None
                pos, axis = pos.reshape(after[:k] + after[k + 1 :]), k
        elif axis is None:
            pos = pos.permute(perm)
        else:
            new = perm.index(axis)
            pos = pos.permute([p if p < axis else p - 1 for p in perm if p != axis])
            axis = new
        shape = after
    return axis, pos


def _kept_axis(before: tuple[int, ...], axis: int, after: tuple[int, ...]) -> int | None:
    """The axis of the reshaped ``after`` that holds ``before``'s ``axis`` whole (the axes before
    it merged or split among themselves, likewise those after it), or ``None``."""
    size, head, tail = before[axis], math.prod(before[:axis]), math.prod(before[axis + 1 :])
    for k, d in enumerate(after):
        if d == size and math.prod(after[:k]) == head and math.prod(after[k + 1 :]) == tail:
            return k
    return None


def _put_back(pos: Tensor, target: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """``target`` (entry ``q`` belongs to the model output's entry ``pos[q]``) in the model
    output's order, shaped ``shape`` (``None`` if ``target`` is not shaped like ``pos``). The
    index is built on the host: no synchronisation."""
    if tuple(target.shape) != tuple(pos.shape):
        return None
    flat = pos.reshape(-1)
    if torch.equal(flat, torch.arange(flat.numel())):  # kept in order: a reshape
        return target.reshape(shape)
    inverse = torch.empty_like(flat)
    inverse[flat] = torch.arange(flat.numel())
    return target.reshape(-1)[inverse.to(target.device)].reshape(shape)
