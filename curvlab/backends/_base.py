"""What every backend shares: the protocol, the model facts it is chosen by, and the hand-over.

A backend computes raw primitives (always for the negative log-likelihood *sum* of one chunk of
examples) inside an :meth:`Backend.extended` session. It declares which primitives it has
(:attr:`Backend.primitives`) and, through :meth:`Backend.refuses`, which models it cannot compute
exactly. A fast backend that finds out only while running (on the first forward pass of a session)
that it cannot compute a model exactly raises :class:`Handover`; the engine then hands the chunk to
the next backend, so no backend ever answers for a model it cannot do.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from curvlab._losses import LossSpec
from curvlab._scan import ModelScan

__all__ = ["Backend", "Handover", "ModelFacts", "model_facts", "parameter_uses", "PRIMITIVES"]

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
