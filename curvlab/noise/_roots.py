"""The loss of a noise-capturing step, and the check of its backward pass's roots.

Inside a :class:`~curvlab.noise._capture.Taps` capture with a graph check, the loss module's
output is handed back as a :class:`_StepLoss`: a wrapper whose ``__torch_function__`` runs every
operation on the plain tensor and, on ``backward()`` / ``torch.autograd.backward`` /
``torch.autograd.grad``, hands the pass's roots to the open captures first. A capture then walks
the autograd graph from the roots (:func:`_reaches`, no host synchronisation) to see whether a
term other than the loss module's output reaches the model's output or a tapped layer; such a
step measures in the separate, exact pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from curvlab.noise._capture import Taps

__all__ = ["_LIVE", "_StepLoss", "_reaches", "_step_loss", "_weak"]

_LIVE: list[Taps] = []
"""The open captures whose graph check reads the backward pass's roots (:class:`_StepLoss`)."""

_BACKWARDS = (Tensor.backward, torch.autograd.backward, torch.autograd.grad)


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
        return _wrap(result) if _LIVE else result


def _backward(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a backward pass (``func`` one of ``_BACKWARDS``, its arguments plain) after the open
    captures checked its roots, marking it as checked while it runs."""
    if args:
        roots = args[0]
    else:
        roots = kwargs.get("tensors" if func is torch.autograd.backward else "outputs")
    roots = [roots] if isinstance(roots, Tensor) else list(roots or ())
    roots = [r for r in roots if isinstance(r, Tensor)]
    checked = [taps for taps in _LIVE if taps._check_roots(roots)]
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
