"""Mark curvlab's own backward passes that run inside a user's training step.

A penalty recomputed every ``every`` steps (:class:`~curvlab.regularizers.GradientNormPenalty`)
takes the gradient of its value with ``torch.autograd.grad`` inside the user's closure, through
the step's model output. The hooks a noise capture put on that output and on the layers
(:class:`~curvlab.noise._capture.Taps`, ``FullFisherNoise``'s fold) must not take that pass for
the training step's backward: the noise would go into the penalty's cached gradient and the
captured curvature would mix in the penalty's. Grad mode cannot tell them apart (both passes
run without ``create_graph``), so the pass is marked here, by the parameters it differentiates:
a capture checks whether its model's parameters are in such a pass. Keyed by parameter rather
than held per thread, because autograd may run hooks on its own device threads.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> with own_pass([w]):
    ...     inside = in_own_pass(w)
    >>> inside, in_own_pass(w)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor

__all__ = ["own_pass", "in_own_pass"]

_ACTIVE: dict[int, int] = {}  # id(parameter) -> how many nested own passes hold it


@contextmanager
def own_pass(params: Iterable[Tensor]) -> Iterator[None]:
    """Mark a backward pass of curvlab's over ``params`` (all of the model's parameters)."""
    keys = [id(p) for p in params]
    for k in keys:
        _ACTIVE[k] = _ACTIVE.get(k, 0) + 1
    try:
        yield
    finally:
        for k in keys:
            n = _ACTIVE[k] - 1
            if n:
                _ACTIVE[k] = n
            else:
                del _ACTIVE[k]


def in_own_pass(param: Tensor | None) -> bool:
    """Whether ``param`` (any parameter of a capture's model) is inside :func:`own_pass`."""
    return param is not None and id(param) in _ACTIVE
