"""The model's forward pass with stand-ins for its parameters (and buffers), leaving the model's
own tensors where they were: the one home of ``torch.func.functional_call`` in curvlab.

torch's ``functional_call`` (``tie_weights=True``, its default) swaps a stand-in in under every
name a tensor has and puts the originals back in the order it swapped them. A module registered
under two names (ALBERT-style ``nn.ModuleList([block] * 3)``, or ``seq[2] = seq[0]``) is swapped
once per name: the second swap records the first's stand-in as the "original", and the restore
writes that stand-in back (``torch/nn/utils/stateless.py``, ``_reparametrize_module``). The
model then held a plain tensor where its ``nn.Parameter`` was: later curvature at the stand-in's
values (a Hessian trace 0.8206 for a true 1.1781 after ``diag_fisher(kind="exact")``, found in
review s22) and the user's optimizer no longer training the layer. :func:`functional_call`
records every module's ``_parameters`` and ``_buffers`` entries before the call and puts each
one back by identity after it, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call as _torch_functional_call

__all__ = ["functional_call"]


def functional_call(
    model: nn.Module,
    tensors: dict[str, Tensor],
    args: Any = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """``model(*args, **kwargs)`` with ``tensors`` (keyed by ``named_parameters()`` /
    ``named_buffers()`` names; the others as they are) in place of the model's own, like
    ``torch.func.functional_call(model, tensors, args, kwargs, strict=False)``.

    Afterwards (also when the forward raises) every module's ``_parameters`` entries are the
    objects they were before the call, and so is every ``_buffers`` entry that holds one of
    ``tensors`` (a stand-in left behind by torch's restore of a module registered under two
    names, module docstring); a buffer the forward itself registers again (a grown rotary cache)
    is kept, as torch keeps it. Works under ``vmap``/``grad``/``jvp`` (only Python dictionaries
    are read and written).

    Args:
        model: the user's model.
        tensors: the stand-ins, by parameter or buffer name.
        args: the positional inputs (a non-tuple is one input).
        kwargs: the keyword inputs.

    Returns:
        What ``model`` returns.

    Example:
        >>> import torch
        >>> block = torch.nn.Linear(2, 2)
        >>> model = torch.nn.Sequential(block, torch.nn.Tanh(), block)  # one module, two names
        >>> weight = block.weight
        >>> out = functional_call(model, {"0.weight": torch.zeros(2, 2)}, (torch.ones(1, 2),))
        >>> block.weight is weight
        True
    """
    slots = [(m._parameters, name, t) for m in model.modules() for name, t in m._parameters.items()]
    buffers = [(m._buffers, name, t) for m in model.modules() for name, t in m._buffers.items()]
    # the stand-ins recorded (and held alive) before the call: torch writes what the modules
    # hold at exit back into the dictionary it is given, so a buffer the forward reassigns
    # replaced its stand-in there, and that stand-in, left in a module registered twice, went
    # unseen (a float64 trial point of critical_sharpness left in a float32 buffer, review s22);
    # torch gets a copy, so the caller's dictionary is not changed either
    given = list(tensors.values())
    stand_ins = {id(t) for t in given}
    try:
        return _torch_functional_call(model, dict(tensors), args, kwargs, strict=False)
    finally:
        for table, name, t in slots:
            if name in table and table[name] is not t:
                table[name] = t
        for table, name, t in buffers:
            now = table.get(name)
            if now is not t and now is not None and id(now) in stand_ins:
                table[name] = t
