"""Monte-Carlo labels on a random forward: drawn from the forward whose gradient is taken.

The Monte-Carlo Fisher ``sum_n grad NLL(y_hat_n)^2``, ``y_hat_n ~ p(y | f(x_n))``, is unbiased
for the Fisher only where each label is drawn from the output of the very forward that is
differentiated. A forward that draws random numbers (a train-mode ``Dropout``, a per-example
sign drawn from numpy or Python) is another function on every call: labels drawn from the func
backend's chunk forward and gradients from its per-example ``vmap`` (or loop) forwards paired
the labels of one mask with the gradients of another, ``E sum_y p(y | m1) g(y; m2)^2`` instead
of ``E_m F(m)``: ``diag_fisher(kind="mc")`` gave 22.4 in sum where the hooks backend gives 15.5
and the exact Fisher 15.4 (review s26). Here each example runs the real forward once, with
gradients; its labels are drawn from that output and every draw's gradient is taken from it (as
the hooks and BackPACK backends do with the chunk's one forward). The labels are drawn example
by example in order, which is the stream :func:`~curvlab.backends._layers.draw_labels` takes on
the whole chunk. Costs one forward and ``samples`` backward passes per example (no ``vmap``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvlab._data import Inputs, call_model, num_examples, slice_inputs
from curvlab._precision import is_sixteen
from curvlab._rng import forward_draws
from curvlab.backends._layers import draw_labels

if TYPE_CHECKING:
    from curvlab.backends._func import _FuncSession

__all__ = ["chunk_output", "drawn_grads", "drawn_rows", "drawn_squares"]

_NOTE = (
    "func: per-example loop for Monte-Carlo labels (the forward draws random numbers: each "
    "example's labels are drawn from the forward whose gradient is taken)"
)


def chunk_output(
    s: _FuncSession | Any,
    inputs: Inputs,
    targets: Tensor,
    modules: Iterable[nn.Module] | None = None,
) -> tuple[Tensor, bool]:
    """The prepared output on the chunk (no gradients) and whether that forward drew from a
    global RNG (torch's, on the CPU or the device, numpy's or Python's) or from a generator a
    module holds (:func:`~curvlab._reading_rngs.held_generators`): a forward that is another
    function on every call, whose Monte-Carlo labels must come from the forward that is
    differentiated. A forward that moves the global RNG but whose draws are fixed (it re-seeds
    it) takes the per-example loop too: exact for both, slower.

    ``s``: a session with ``params`` and ``forward`` (the func backend's, or the one
    :mod:`curvlab.quantities._norms` reads rows from); ``modules``: those whose held generators
    count (default: ``s.model``'s); the check is :func:`~curvlab._rng.forward_draws` (the held
    generators are left where the forward moved them, as the global RNG is)."""
    device = next(iter(s.params.values())).device if s.params else torch.device("cpu")
    modules = s.model.modules() if modules is None else modules
    with forward_draws(device, modules) as drawn, torch.no_grad():
        output = s.forward(inputs, targets)
    return output, drawn()


def _rows(
    s: _FuncSession,
    inputs: Inputs,
    targets: Tensor,
    generator: torch.Generator | None,
    samples: int,
) -> Iterator[list[dict[str, Tensor]]]:
    """Per example: the forward once, ``samples`` labels drawn from its output, and the NLL
    gradient at each (``{name: grad}`` per draw)."""
    if _NOTE not in s.notes:
        s.notes.append(_NOTE)
    params = list(s.params.values())
    for i in range(num_examples(inputs)):
        y = targets[i : i + 1]
        out = s.spec.prepare(call_model(s.model, slice_inputs(inputs, i, i + 1)), y)
        labels = draw_labels(s.spec, out.detach(), generator, y, samples)
        row = []
        for j, lab in enumerate(labels):
            loss = s.nll(out, lab, drawn=True)
            gs = torch.autograd.grad(loss, params, retain_graph=j < samples - 1, allow_unused=True)
            row.append(
                {
                    k: torch.zeros_like(p)
                    if g is None
                    else (g if g.layout == torch.strided else g.to_dense())
                    for (k, p), g in zip(s.params.items(), gs)
                }
            )
        yield row


def drawn_squares(
    s: _FuncSession,
    inputs: Inputs,
    targets: Tensor,
    generator: torch.Generator | None,
    samples: int,
) -> dict[str, Tensor]:
    """``sum_n (grad NLL_n(y_hat_n))^2`` summed over ``samples`` draws per example (not yet
    divided by ``samples``), each label drawn from the forward that is differentiated; a 16-bit
    gradient squared in float32."""
    total: dict[str, Tensor] = {}
    for row in _rows(s, inputs, targets, generator, samples):
        for grads in row:
            for k, g in grads.items():
                sq = g.float().square_() if is_sixteen(g.dtype) else g.square()
                total[k] = sq if k not in total else total[k].add_(sq)
    return total


def drawn_grads(
    s: _FuncSession, inputs: Inputs, targets: Tensor, generator: torch.Generator | None
) -> dict[str, Tensor]:
    """Per-example gradients ``grad NLL_n(y_hat_n)`` at one label per example drawn from the
    forward that is differentiated: ``(n, *shape)`` per parameter."""
    return drawn_rows(s, inputs, targets, generator, 1)[0]


def drawn_rows(
    s: _FuncSession,
    inputs: Inputs,
    targets: Tensor,
    generator: torch.Generator | None,
    samples: int,
) -> list[dict[str, Tensor]]:
    """Per draw ``j < samples``, the per-example gradients ``grad NLL_n(y_hat_nj)``, ``(n,
    *shape)`` per parameter; each example's ``samples`` labels are drawn from one forward of it,
    the forward that is differentiated (``fisher_norms(kind="mc")``'s rows, review s26)."""
    rows = list(_rows(s, inputs, targets, generator, samples))
    if not rows:
        return [{k: p.new_zeros((0, *p.shape)) for k, p in s.params.items()}] * samples
    return [{k: torch.stack([r[j][k] for r in rows]) for k in s.params} for j in range(samples)]
