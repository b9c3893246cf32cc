"""Whether a layer holds the examples in its first dimension: the one-example probe.

Per-example rules (a layer's input and output gradient read row by row, K-FAC's factors) need
each call of a layer to hold example ``n`` at index ``n`` of the first dimension of its input and
output. Shapes alone cannot always tell: a sequence-first layer (``nn.TransformerEncoderLayer``
with ``batch_first=False`` sees ``(T, N, d)``) or a layer run once on position features ``(T, p)``
whose output is broadcast over the batch has leading size ``T``, which may equal ``N``. A second
forward pass on the first example alone settles it: a batch-major call then has leading size 1,
the others keep theirs. :func:`curvlab.backends._hook_session` does the same for its taps.

The probe runs without gradient, on the module inside DDP and ``torch.compile`` wrappers, with the
global RNG put back (a Dropout mask drawn in it changes nothing later).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import Inputs, call_model, slice_inputs
from curvlab._rng import global_rng_kept
from curvlab._scan import model_device

__all__ = ["MISPLACED_HINT", "Sizes", "leading", "misplaced", "probe_one_example"]

Sizes = dict[str, list[tuple[int, int]]]
"""Per layer name, per call: the leading sizes of its input and of its output."""


def leading(t: Any) -> int:
    """The first dimension's size of a tensor (``-1`` for a scalar or a non-tensor)."""
    return int(t.shape[0]) if isinstance(t, Tensor) and t.ndim else -1


@contextmanager
def _recording(modules: dict[str, nn.Module]) -> Iterator[Sizes]:
    sizes: Sizes = {name: [] for name in modules}
    handles = []

    def hook(name: str):  # noqa: ANN202
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            sizes[name].append((leading(args[0]) if args else -1, leading(output)))

        return fn

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook(name)))
        yield sizes
    finally:
        for h in handles:
            h.remove()


def probe_one_example(model: nn.Module, inputs: Inputs, modules: dict[str, nn.Module]) -> Sizes:
    """The leading sizes each of ``modules``' calls has in ``model`` run on the first example.

    ``model`` should be the plain module (no DDP wrapper: its forward may communicate).
    """
    with (
        _recording(modules) as sizes,
        torch.no_grad(),
        global_rng_kept(model_device(model)),
    ):
        call_model(model, slice_inputs(inputs, 0, 1))
    return sizes


def misplaced(full: Sizes, n: int, one: Sizes | None) -> dict[str, str]:
    """The layers some call of which does not hold the ``n`` examples in its first dimension.

    Args:
        full: leading sizes of every call on the batch of ``n`` examples.
        n: the batch's number of examples.
        one: :func:`probe_one_example`'s sizes (needed when ``n > 1``: leading size ``n`` may be
            a coincidence), or ``None`` when ``n == 1`` (then a leading size of 1 is right either
            way: the sum over one example's positions is that example's).

    Returns:
        layer name -> why, for the misplaced layers only.
    """
    bad = {}
    for name, calls in full.items():
        small = one.get(name, []) if one is not None else None
        for a, o in calls:
            if (a, o) != (n, n):
                bad[name] = f"leading sizes {a} (input) and {o} (output) for {n} examples"
                break
        else:
            if small is not None and (len(small) != len(calls) or any(s != (1, 1) for s in small)):
                got = ", ".join(f"{a} and {o}" for a, o in small) or "no call"
                bad[name] = (
                    f"leading sizes {n} for {n} examples but {got} for one example (input and "
                    "output)"
                )
    return bad


MISPLACED_HINT = (
    "it does not hold the examples in its first dimension (a sequence-first layer such as "
    "nn.TransformerEncoderLayer without batch_first=True, inputs reshaped to (N*T, d) before the "
    "layer, or a layer run on features shared by all examples and broadcast over the batch)"
)
"""What a misplaced layer usually is, for error messages."""
