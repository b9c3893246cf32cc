"""Backends compute the raw per-example and second-order quantities behind curvlab's functions.

A backend exposes primitives on chunks of examples, always for the negative log-likelihood *sum* of
the chunk; the accumulation loop (:func:`curvlab.quantities._sweep.sweep`) does the chunking,
accumulation and scaling. The registry below is the only way to pick one:

* ``"hooks"``: curvlab's own layer hooks; first-order primitives only (per-example gradients and
  their squares), for models whose trainable parameters all sit in layers with a rule
  (:mod:`curvlab.backends._rules`: Linear, Conv1d/Conv2d, HuggingFace Conv1D, Embedding,
  LayerNorm, RMSNorm, eval BatchNorm; tied and repeated uses summed); the fastest there.
* ``"backpack"``: BackPACK's extensions; every quantity, for models built from BackPACK's layers.
* ``"func"``: ``torch.func``; every quantity, for any differentiable model (the fallback that
  makes "any model" true; see :mod:`curvlab.backends._func` for its costs).
* ``"auto"`` (the default): the first of these, in this order, that can compute the model
  exactly. Each backend declares what it refuses (:meth:`refuses`), and the fast ones check the
  first forward pass of every call and hand over (:class:`~curvlab.backends.Handover`) when
  a parameter is tied, used outside its layer, or a layer is applied twice.

Example:
    >>> import torch
    >>> from curvlab.backends import candidates
    >>> from curvlab.backends._base import model_facts
    >>> from curvlab._scan import scan_model
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    >>> [b.name for b in candidates("auto", model_facts(scan_model(model)), {"diag_ggn"})]
    ['backpack', 'func']
"""

from __future__ import annotations

from collections.abc import Iterable

from curvlab.backends._backpack import BackpackBackend
from curvlab.backends._base import Backend, Handover, ModelFacts, model_facts
from curvlab.backends._func import FuncBackend
from curvlab.backends._hooks import HooksBackend

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Backend",
    "BackpackBackend",
    "FuncBackend",
    "Handover",
    "HooksBackend",
    "candidates",
    "model_facts",
]

REGISTRY: dict[str, type] = {
    "hooks": HooksBackend,
    "backpack": BackpackBackend,
    "func": FuncBackend,
}
AUTO_ORDER = ("hooks", "backpack", "func")
BACKENDS = ("auto", *REGISTRY)


def candidates(name: str, facts: ModelFacts, needs: Iterable[str]) -> list[Backend]:
    """The backends to try, in order, for a model with ``facts`` and the primitives ``needs``.

    ``"auto"`` gives every registered backend that does not refuse the model, fastest first;
    a named backend gives itself alone.

    Raises:
        ValueError: for an unknown name, or a named backend that cannot compute the model exactly
            (the message says why and what to use instead).
    """
    needs = frozenset(needs)
    if name == "auto":
        found = []
        for key in AUTO_ORDER:
            be = REGISTRY[key]()
            if be.refuses(facts, needs, auto=True) is None:
                found.append(be)
        return found
    if name not in REGISTRY:
        alias = " (it is called 'func' now)" if name in ("functorch", "torch.func") else ""
        raise ValueError(f"unknown backend {name!r}{alias}; choose one of {BACKENDS}")
    be = REGISTRY[name]()
    reason = be.refuses(facts, needs, auto=False)
    if reason is not None:
        raise ValueError(
            f"backend={name!r} cannot compute this model exactly: {reason}. Use backend='auto' "
            "(it picks a backend that can) or backend='func' (any differentiable model)"
        )
    return [be]
