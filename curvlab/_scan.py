"""One traversal of a model: its named modules and parameters, shared by the steps of one call.

Every curvlab call validates the model, finds its layers, saves and restores its state and
installs hooks. Each of those steps used to walk the module tree on its own; on a small model
that walking costs as much as the forward pass. :func:`scan_model` walks it once and the steps
share the result. A scan describes the model at one moment: take a fresh one per call, never
cache it across calls (the user may change the model in between).

Example:
    >>> import torch
    >>> s = scan_model(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
    >>> list(s.trainable), [name for name, _ in s.modules]
    (['0.weight', '0.bias'], ['', '0', '1'])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

from curvlab._text import few

__all__ = ["ModelScan", "scan_model", "model_device", "check_materialized", "refuse_lazy"]


@dataclass(frozen=True)
class ModelScan:
    """The modules and parameters of a model, in ``named_modules``/``named_parameters`` order.

    Attributes:
        model: the model scanned.
        modules: ``(name, module)`` pairs as ``model.named_modules()`` yields them.
        params: every parameter by ``model.named_parameters()`` name (a shared one once).
        trainable: the parameters with ``requires_grad``, same order.
        device: the device of the first parameter (CPU for a parameter-free model).
        dtype: the dtype of the first parameter (the default dtype without parameters).
        sequential: whether the model is a plain (nested) ``nn.Sequential`` chain of leaf
            modules: every module with children is an ``nn.Sequential`` running
            ``nn.Sequential.forward`` (a subclass that scales, shifts or adds a residual is not),
            and no forward hook (nor a forward pre-hook below the root, nor a global one)
            may change a value between the layers (:func:`_chain_breaker`).
        not_chain: why the model is not a plain chain (``""`` when it is).
        lazy: the names of the modules with uninitialized (lazy) parameters or buffers
            (:func:`check_materialized` refuses them).
    """

    model: nn.Module
    modules: list[tuple[str, nn.Module]]
    params: dict[str, nn.Parameter]
    trainable: dict[str, nn.Parameter]
    device: torch.device
    dtype: torch.dtype
    sequential: bool
    not_chain: str = ""
    lazy: tuple[str, ...] = ()


def scan_model(model: nn.Module) -> ModelScan:
    """Walk ``model`` once and record its modules and parameters.

    Raises:
        TypeError: if ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.named_modules())
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    lazy = tuple(n for n, m in modules if _uninitialized(m))
    for prefix, module in modules:  # the order and de-duplication of named_parameters()
        if not module._parameters:
            continue
        for name, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            params[f"{prefix}.{name}" if prefix else name] = p
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    not_chain = _chain_breaker(modules)
    first = next(iter(params.values()), None)
    return ModelScan(
        model=model,
        modules=modules,
        params=params,
        trainable=trainable,
        device=first.device if first is not None else torch.device("cpu"),
        dtype=first.dtype if first is not None else torch.get_default_dtype(),
        sequential=not not_chain,
        not_chain=not_chain,
        lazy=lazy,
    )


def _uninitialized(module: nn.Module) -> bool:
    """Whether ``module`` holds uninitialized (lazy) parameters or buffers of its own: only a
    :class:`~torch.nn.modules.lazy.LazyModuleMixin` can (one ``isinstance`` test per module;
    ``nn.LazyLinear`` and the like become their plain class once materialized)."""
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _foreign(hooks: dict) -> list:
    """The hooks of a hook dictionary that are neither curvlab's own nor BackPACK's (those that
    ``backpack.extend`` installed): the user's, which may change a value."""
    return [h for h in hooks.values() if not _own_hook(getattr(h, "__module__", None) or "")]


def _own_hook(module: str) -> bool:
    """Whether a hook defined in ``module`` is curvlab's or BackPACK's."""
    return module in ("curvlab", "backpack") or module.startswith(("curvlab.", "backpack."))


def _chain_breaker(modules: list[tuple[str, nn.Module]]) -> str:
    """Why ``modules`` (``named_modules()`` of a model, root first) are not a plain chain of leaf
    modules whose outputs feed the next one unchanged (``""``: they are).

    BackPACK's second-order rules backpropagate from each module's input to the previous
    module's output; a container's own ``forward`` (an ``nn.Sequential`` subclass scaling its
    output, an op between layers, a residual) or a hook changing a value in between is an
    operation they do not see (and BackPACK then fails with an ``AssertionError``, or computes
    a wrong number). A forward pre-hook on the root changes the input alone: it is fine.
    """
    glob = nn.modules.module
    if _foreign(glob._global_forward_hooks) or _foreign(glob._global_forward_pre_hooks):
        return "a global module forward hook (register_module_forward_hook) is registered"
    for i, (name, m) in enumerate(modules):
        where = f"module '{name or '<root>'}' ({type(m).__name__})"
        if m._modules and any(c is not None for c in m._modules.values()):
            if not isinstance(m, nn.Sequential):
                return f"{where} has children and its own forward"
            if type(m).forward is not nn.Sequential.forward:
                return f"{where} overrides nn.Sequential.forward"
        if m._forward_hooks and _foreign(m._forward_hooks):
            return f"{where} has a forward hook, which may change its output"
        if i and m._forward_pre_hooks and _foreign(m._forward_pre_hooks):
            return f"{where} has a forward pre-hook, which may change its input"
    return ""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model).

    The same rule as :attr:`ModelScan.device`, without walking the whole model: for callers
    that need only the device (a generator's, say) and no scan.
    """
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_materialized(scan: ModelScan, what: str = "model") -> None:
    """Refuse a model with uninitialized (lazy) parameters or buffers, before any pass over it.

    A lazy module (``nn.LazyLinear``, ``nn.LazyConv2d``, ...) materializes its parameters with
    fresh random values on its first forward pass: curvlab's first pass would measure those in
    place of the model's and leave them in it (``analyze`` did, found in review s18; the other
    entry points failed inside torch with "Can't access the shape of an uninitialized
    parameter"). Free: :func:`scan_model` found them (``scan.lazy``). Called by
    :func:`curvlab._notrace.leave_no_trace`, the context of every pass; constructing a
    ``Diagnostics`` or an optimizer before the first forward pass stays allowed (the parameters
    are the same objects once materialized).

    Args:
        scan: the model's :func:`scan_model`.
        what: how the message names the model (``"--model"`` on the command line).

    Raises:
        ValueError: naming the uninitialized tensors and how to materialize them.
    """
    if not scan.lazy:
        return
    names = dict(scan.modules)
    lazy = [
        f"{prefix}.{name}" if prefix else name
        for prefix in scan.lazy
        for name, t in [*names[prefix]._parameters.items(), *names[prefix]._buffers.items()]
        if t is not None and is_lazy(t)
    ]
    raise ValueError(
        f"{what} has uninitialized (lazy) parameters or buffers [{few(lazy)}] (nn.LazyLinear "
        "and the like): a forward pass would materialize them with fresh random values, "
        "measured in place of the model's and left in it. Materialize them first: run one "
        "forward pass (model(example_inputs)), or load a checkpoint into the model "
        "(model.load_state_dict(torch.load(path)), which materializes them with its values)"
    )


def refuse_lazy(model: nn.Module, what: str = "model") -> None:
    """:func:`check_materialized` of a model not yet scanned (every public entry point's first
    step, :func:`curvlab.distributed.collective`, before the checks that read parameter shapes):
    one ``isinstance`` test per module, the model scanned only when one is lazy."""
    if any(_uninitialized(m) for m in model.modules()):
        check_materialized(scan_model(model), what)
