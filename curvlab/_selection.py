"""Selections of parameters: which diagonal block of a curvature matrix a call is about.

Every operator, estimator and per-parameter quantity takes ``params=``: ``None`` for all trainable
parameters, a parameter name (``"0.weight"``), a module prefix (``"blocks.1"``: every parameter
below that module), a list of them, or a predicate ``fn(name, parameter) -> bool``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from curvlab._compiled import strip_wrappers

__all__ = ["Params", "select_parameters"]


Params = str | Sequence[str] | Callable[[str, nn.Parameter], bool] | None
"""A selection of parameters: names / module prefixes, or a predicate ``(name, param) -> bool``."""


def select_parameters(model: nn.Module, params: Params = None) -> dict[str, nn.Parameter]:
    """The trainable parameters an operator acts on, in ``model.named_parameters()`` order.

    Args:
        model: the user's model.
        params: ``None`` for all trainable parameters; a predicate ``fn(name, param) -> bool``;
            or a name or a list of names, each either a parameter name (``"0.weight"``) or a
            module prefix (``"0"``, ``"blocks.1"``) selecting every parameter below that module.

    Raises:
        ValueError: if an entry matches no trainable parameter, or nothing is trainable.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> list(select_parameters(m, "1")), list(select_parameters(m, lambda n, p: p.ndim == 1))
        (['1.weight', '1.bias'], ['0.bias', '1.bias'])
    """
    model = strip_wrappers(model)  # a compiled/DDP model: the names of the module it wraps
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    if params is None:
        return trainable
    if callable(params):
        chosen = {n: p for n, p in trainable.items() if params(n, p)}
        if not chosen:
            raise ValueError(
                f"the params predicate selects none of the trainable parameters "
                f"{sorted(trainable)[:8]}"
            )
        return chosen
    entries = [params] if isinstance(params, str) else list(params)
    if not entries:
        raise ValueError("params is empty; pass None for all parameters or at least one name")
    chosen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"params entries must be names (str), got {type(entry).__name__}")
        hits = {n for n in trainable if entry == "" or n == entry or n.startswith(entry + ".")}
        if not hits:
            raise ValueError(
                f"params entry {entry!r} matches no trainable parameter; use a parameter name or "
                f"a module prefix, e.g. one of {sorted(trainable)[:8]}"
            )
        chosen |= hits
    return {n: p for n, p in trainable.items() if n in chosen}
