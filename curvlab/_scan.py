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

__all__ = ["ModelScan", "scan_model", "model_device"]


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
        sequential: whether the model is a (nested) ``nn.Sequential`` chain of leaf modules,
            i.e. every module with children is an ``nn.Sequential``.
    """

    model: nn.Module
    modules: list[tuple[str, nn.Module]]
    params: dict[str, nn.Parameter]
    trainable: dict[str, nn.Parameter]
    device: torch.device
    dtype: torch.dtype
    sequential: bool


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
    for prefix, module in modules:  # the order and de-duplication of named_parameters()
        if not module._parameters:
            continue
        for name, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            params[f"{prefix}.{name}" if prefix else name] = p
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    sequential = all(
        not m._modules
        or isinstance(m, nn.Sequential)
        or not any(c is not None for c in m._modules.values())
        for _, m in modules
    )
    first = next(iter(params.values()), None)
    return ModelScan(
        model=model,
        modules=modules,
        params=params,
        trainable=trainable,
        device=first.device if first is not None else torch.device("cpu"),
        dtype=first.dtype if first is not None else torch.get_default_dtype(),
        sequential=sequential,
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model).

    The same rule as :attr:`ModelScan.device`, without walking the whole model: for callers
    that need only the device (a generator's, say) and no scan.
    """
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
