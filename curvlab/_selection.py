"""Selections of parameters: which diagonal block of a curvature matrix a call is about.

Every operator, estimator and per-parameter quantity takes ``params=``: ``None`` for all trainable
parameters, a parameter name (``"0.weight"``), a module prefix (``"blocks.1"``: every parameter
below that module), a module of the model (``model.blocks[1]``: its parameters), a parameter
(``model.fc.weight``), a list of any of these (``list(model.fc.parameters())``, and the
``(name, parameter)`` pairs of ``named_parameters()``), or a predicate
``fn(name, parameter) -> bool``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn

from curvlab._compiled import strip_wrappers

__all__ = ["Params", "refuse_complex", "refuse_complex_model", "select_parameters"]


Params = (
    str
    | nn.Module
    | Tensor
    | tuple[str, Tensor]
    | Sequence[str | nn.Module | Tensor | tuple[str, Tensor]]
    | Callable[[str, nn.Parameter], bool]
    | None
)
"""A selection of parameters: names / module prefixes, modules, parameters, ``(name, parameter)``
pairs, or a predicate ``(name, param) -> bool``."""


def select_parameters(model: nn.Module, params: Params = None) -> dict[str, nn.Parameter]:
    """The trainable parameters an operator acts on, in ``model.named_parameters()`` order.

    A parameter, a module and a ``(name, parameter)`` pair are taken by identity: a weight tied
    to another (a head tied to the embedding) is the one parameter ``named_parameters()`` names
    once, under its first name (``params=model.head`` selects ``"emb.weight"``); a name is taken
    as written, and the second name of a tied weight is refused naming the first.

    Args:
        model: the user's model.
        params: ``None`` for all trainable parameters; a predicate ``fn(name, param) -> bool``;
            or one entry or a list of them, each a parameter name (``"0.weight"``), a module
            prefix (``"0"``, ``"blocks.1"``) selecting every parameter below that module, a
            module of the model (its trainable parameters), a parameter of the model, or a
            ``(name, parameter)`` pair (its parameter: ``list(model.fc.named_parameters())``,
            whose names are the layer's own, works too; one pair alone is one entry, its name
            not read). A list, not a one-shot iterator:
            ``model.fc.parameters()`` is read by the first use alone and is refused (pass
            ``list(model.fc.parameters())`` or the names).

    Raises:
        TypeError: if a selected parameter is complex (:func:`refuse_complex`).
        ValueError: if an entry matches no trainable parameter (the second name of a tied
            weight, a module or tensor not of the model, a frozen parameter), or nothing is
            trainable.
        TypeError: for a one-shot iterator, bytes, an object that is neither a name, a module,
            a parameter, a pair, a predicate nor iterable (``params=3``), or an entry of another
            type.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> list(select_parameters(m, "1")), list(select_parameters(m, lambda n, p: p.ndim == 1))
        (['1.weight', '1.bias'], ['0.bias', '1.bias'])
        >>> list(select_parameters(m, m[1])) == list(select_parameters(m, list(m[1].parameters())))
        True
    """
    chosen = _select(model, params)
    refuse_complex(chosen, has_params=True)
    return chosen


def refuse_complex(
    params: dict[str, Tensor], *, has_params: bool, frozen_hint: bool = False
) -> None:
    """Refuse complex parameters by name, before any work (found in review s27).

    A complex parameter ``w = a + i b`` is two real coordinates per entry to an optimizer (torch's
    Adam steps it through ``torch.view_as_real``), while complex arithmetic on ``w`` mixes them
    up: a diagonal came out as ``g**2`` (the complex square) where the real coordinates' diagonals
    are ``Re(g)**2`` and ``Im(g)**2``, Adam's modelled update pointed elsewhere than its step
    (``critical_sharpness`` 0.1234 for 0.0443), and the Hessian product, the Fisher trace and the
    noise samplers crashed with torch's dtype errors. Entry points that never touch the selected
    parameters' curvature (:func:`~curvlab.kfac` on the layers it covers, the input-gradient
    penalty, the loss) do not call this.

    Args:
        params: ``name -> parameter``, as selected.
        has_params: whether the entry point takes ``params=`` (then named as a way out).
        frozen_hint: name freezing it (``requires_grad_(False)``) as a way out (``Diagnostics``,
            which has no ``params=``; a frozen complex parameter is measured around).

    Raises:
        TypeError: for the first complex parameter, naming it and the ways out.
    """
    for name, p in params.items():
        if p.is_complex():
            leave_out = (
                ", or leave it out with params= (params=lambda n, p: not p.is_complex())"
                if has_params
                else ", or freeze it (requires_grad_(False)) while measuring"
                if frozen_hint
                else ""
            )
            raise TypeError(
                f"parameter {name!r} is complex ({p.dtype}): complex parameters are not "
                f"supported (curvlab treats every parameter as real coordinates; complex "
                f"arithmetic would mix up the real and imaginary parts). Split it into two real "
                f"parameters (w = w_re + 1j * w_im, each a real nn.Parameter){leave_out}"
            )


def refuse_complex_model(model: nn.Module, *, diagnostics: bool = False) -> None:
    """:func:`refuse_complex` on the trainable parameters of a model (in a compiled or DDP
    wrapper: of the module it wraps), for an entry point without ``params=`` (``diagnostics``:
    ``Diagnostics``, at construction and at every measurement, where freezing the parameter is
    the way out).

    Raises:
        TypeError: for a complex trainable parameter, naming it.
    """
    model = strip_wrappers(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    refuse_complex(trainable, has_params=False, frozen_hint=diagnostics)


def _select(model: nn.Module, params: Params) -> dict[str, nn.Parameter]:
    """:func:`select_parameters` without the complex check."""
    model = strip_wrappers(model)  # a compiled/DDP model: the names of the module it wraps
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    if params is None:
        return trainable
    # a module is callable: it was called as a predicate, with the module's own forward error
    # (found in review s20), so modules and tensors are told apart first
    if isinstance(params, (nn.Module, Tensor)) or _is_pair(params):
        # one (name, parameter) pair is one entry, not a list of two (found in review s20:
        # params=("1.weight", model[0][1].weight) selected the model's own "1.weight" too)
        params = [params]
    elif callable(params):
        chosen = {n: p for n, p in trainable.items() if params(n, p)}
        if not chosen:
            raise ValueError(
                f"the params predicate selects none of the trainable parameters "
                f"{sorted(trainable)[:8]}"
            )
        return chosen
    if isinstance(params, Iterator):  # model.fc.parameters(): the first use would empty it
        names = _names_of(model, list(params))
        instead = f", or the names: params={names}" if names else ""
        raise TypeError(
            f"params is a one-shot iterator ({type(params).__name__}, as model.fc.parameters() "
            f"is), which curvlab reads more than once; pass a list: params=list(...){instead}"
        )
    if isinstance(params, (bytes, bytearray)) or not _iterable(params):
        # found in review s24: params=3 raised the raw "'int' object is not iterable", and
        # params=b"0" was read byte by byte ("... got int")
        raw = isinstance(params, (bytes, bytearray))
        hint = " (decode it: params=params.decode())" if raw else ""
        raise TypeError(
            f"params entries must be names (str), modules, parameters or (name, parameter) "
            f"pairs of the model, or params a list of them or a predicate (name, parameter) -> "
            f"bool, got {type(params).__name__}{hint}"
        )
    entries = [params] if isinstance(params, str) else list(params)
    if not entries:
        raise ValueError("params is empty; pass None for all parameters or at least one name")
    name_of = {id(p): n for n, p in model.named_parameters()}  # frozen ones too
    chosen: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            chosen |= _by_name(model, trainable, name_of, entry)
        else:
            chosen |= _by_identity(trainable, name_of, entry)
    return {n: p for n, p in trainable.items() if n in chosen}


def _by_name(
    model: nn.Module, trainable: dict[str, nn.Parameter], name_of: dict[int, str], entry: str
) -> set[str]:
    """The trainable parameters a name or module prefix selects."""
    hits = {n for n in trainable if entry == "" or n == entry or n.startswith(entry + ".")}
    if hits:
        return hits
    # the other names of tied weights: named_parameters() names each tensor once (found in
    # review s20: "head.weight", the embedding's, "matched no trainable parameter")
    aliases = {
        n: name_of[id(p)]
        for n, p in model.named_parameters(remove_duplicate=False)
        if (n == entry or n.startswith(entry + ".")) and name_of[id(p)] in trainable
    }
    if aliases:
        same = "; ".join(f"{a!r} is the same tensor as {n!r}" for a, n in list(aliases.items())[:4])
        pick = sorted(set(aliases.values()))
        raise ValueError(
            f"params entry {entry!r} matches no trainable parameter under its own name: {same} "
            f"(tied: named_parameters() names a tied weight once, under its first name); "
            f"select {pick[0]!r}" + (f" (all: {pick})" if len(pick) > 1 else "")
        )
    raise ValueError(
        f"params entry {entry!r} matches no trainable parameter; use a parameter name or "
        f"a module prefix, e.g. one of {sorted(trainable)[:8]}"
    )


def _by_identity(
    trainable: dict[str, nn.Parameter], name_of: dict[int, str], entry: object
) -> set[str]:
    """The trainable parameters a module, a parameter or a ``(name, parameter)`` pair selects."""
    if _is_pair(entry):
        entry = entry[1]  # by the tensor: the names of a submodule's named_parameters() differ
    if isinstance(entry, nn.Module):
        own = list(entry.parameters())
        ours = [name_of[id(p)] for p in own if id(p) in name_of]
        if not ours:
            raise ValueError(
                f"params entry, a {type(entry).__name__} module, is not part of the model (none of its "
                f"{len(own)} parameters is the model's); pass a module of the model, or names, "
                f"e.g. one of {sorted(trainable)[:8]}"
            )
        hits = {n for n in ours if n in trainable}
        if not hits:
            raise ValueError(
                f"params entry, a {type(entry).__name__} module, has no trainable parameter: its {ours[:8]} have "
                "requires_grad=False"
            )
        return hits
    if isinstance(entry, Tensor):
        name = name_of.get(id(entry))
        if name is None:
            raise ValueError(
                f"params entry, a {type(entry).__name__} of shape {tuple(entry.shape)}, is not a "
                f"parameter of the model (a copy or a detached tensor is another tensor); pass "
                f"the model's own parameters or their names, e.g. one of {sorted(trainable)[:8]}"
            )
        if name not in trainable:
            raise ValueError(
                f"params entry {name!r} (a parameter of the model) has requires_grad=False; "
                f"select trainable ones, e.g. one of {sorted(trainable)[:8]}"
            )
        return {name}
    raise TypeError(
        f"params entries must be names (str), modules, parameters or (name, parameter) pairs "
        f"of the model, got {type(entry).__name__}"
    )


def _iterable(obj: object) -> bool:
    """Whether ``obj`` can be iterated (``iter`` accepts it)."""
    try:
        iter(obj)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


def _is_pair(entry: object) -> bool:
    """Whether ``entry`` is a ``(name, parameter)`` pair (an item of ``named_parameters()``)."""
    return (
        isinstance(entry, tuple)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], Tensor)
    )


def _names_of(model: nn.Module, entries: list[object]) -> list[str] | None:
    """The names of what a one-shot iterator held, for the message that refuses it (``None``
    when an entry selects nothing)."""
    try:
        return list(select_parameters(model, entries)) if entries else None
    except (TypeError, ValueError):
        return None
