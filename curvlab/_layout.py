"""Whether a layer holds the examples in its first dimension: the probe on fewer examples.

Per-example rules (a layer's input and output gradient read row by row, K-FAC's factors) need
each call of a layer to hold example ``n`` at index ``n`` of the first dimension of its input and
output. Shapes alone cannot always tell: a sequence-first layer (``nn.TransformerEncoderLayer``
with ``batch_first=False`` sees ``(T, N, d)``) or a layer run once on position features ``(T, p)``
whose output is broadcast over the batch has leading size ``T``, which may equal ``N``. A second
forward pass on fewer examples settles it (:func:`probe_size`: two, or one for a batch of two): a
batch-major call then has that leading size, the others keep theirs (:func:`misplaced`). K-FAC,
the noise captures and the BackPACK backend (whose rules read every hooked layer's first dimension
as the examples) decide with these functions; :mod:`curvlab.backends._hook_session` does the same
for its taps.

The probe runs without gradient, on the module inside DDP and ``torch.compile`` wrappers, with the
global RNG put back (a Dropout mask drawn in it changes nothing later).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import Inputs, check_inputs_fit, num_examples, slice_inputs
from curvlab._notrace import buffers_kept
from curvlab._rng import global_rng_kept
from curvlab._scan import model_device

__all__ = [
    "MISPLACED_HINT",
    "Sizes",
    "first_tensor",
    "leading",
    "misplaced",
    "probe_one_example",
    "probe_size",
    "recording",
]

Sizes = dict[str, list[tuple[int, int]]]
"""Per layer name, per call: the leading sizes of its input and of its output."""


def leading(t: Any) -> int:
    """The first dimension's size of a tensor (``-1`` for a scalar or a non-tensor)."""
    return int(t.shape[0]) if isinstance(t, Tensor) and t.ndim else -1


@contextmanager
def recording(modules: dict[str, nn.Module]) -> Iterator[Sizes]:
    """Record, while the block runs, the leading sizes of every call of each of ``modules``.

    Yields:
        layer name -> one ``(input, output)`` pair of leading sizes per call, appended as the
        calls happen (clear the lists to start a new forward pass); the hooks go with the block.
    """
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


def probe_size(n: int) -> int:
    """How many examples the probe runs on for a batch of ``n > 1``: fewer than ``n`` (so a
    batch-major call's leading size differs from ``n``), two where that is possible (a
    train-mode BatchNorm refuses a batch of one)."""
    return 2 if n > 2 else 1


def probe_one_example(
    model: nn.Module,
    inputs: Inputs,
    modules: dict[str, nn.Module],
    m: int = 1,
    call: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    autocast: tuple[str, torch.dtype] | None = None,
) -> tuple[Sizes, int]:
    """The leading sizes each of ``modules``' calls has in ``model`` run on the first ``m``
    examples, and that of the model's output (its ``.logits``, or the first tensor of a tuple).

    ``call``: the step's own ``(args, kwargs)`` of the model call, replayed with every tensor
    whose leading size is the batch's cut to its first ``m`` entries (a mask passed beside the
    inputs); else ``inputs`` alone. ``autocast``: ``(device_type, dtype)`` of the autocast region
    the step's forward ran in, entered again for the probe. ``model`` should be the plain module
    (no DDP wrapper: its forward may communicate). Every buffer (BatchNorm statistics, a running
    normaliser's counts) and the global RNG are left as they were.
    """
    n = num_examples(inputs)
    if call is not None:
        args, kwargs = call

        def cut(v: Any) -> Any:
            return v[:m] if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v

        args = tuple(cut(a) for a in args)
        kwargs = {k: cut(v) for k, v in kwargs.items()}
    else:
        part = slice_inputs(inputs, 0, m)
        check_inputs_fit(model, part)  # a clear error for inputs of another dtype or device
        args, kwargs = ((), dict(part)) if isinstance(part, Mapping) else ((part,), {})
    with (
        recording(modules) as sizes,
        torch.no_grad(),
        global_rng_kept(model_device(model)),
        buffers_kept(model),
        torch.autocast(autocast[0], dtype=autocast[1]) if autocast else nullcontext(),
    ):
        output = model(*args, **kwargs)
    return sizes, leading(first_tensor(output))


def first_tensor(output: Any) -> Any:
    """The model's output as the captures read it: a Tensor, its ``.logits``, or the first Tensor
    of a tuple or list."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, Tensor)), None)
    return None


def misplaced(full: Sizes, n: int, small: Sizes | None, m: int = 1) -> dict[str, str]:
    """The layers some call of which does not hold the ``n`` examples in its first dimension.

    Args:
        full: leading sizes of every call on the batch of ``n`` examples.
        n: the batch's number of examples.
        small: :func:`probe_one_example`'s sizes on ``m < n`` examples (needed when ``n > 1``:
            leading size ``n`` may be a coincidence), or ``None`` when ``n == 1`` (then a leading
            size of 1 is right either way: the sum over one example's positions is that
            example's).
        m: the probe's number of examples.

    Returns:
        layer name -> why, for the misplaced layers only.
    """
    bad = {}
    for name, calls in full.items():
        few = small.get(name, []) if small is not None else None
        for a, o in calls:
            if (a, o) != (n, n):
                bad[name] = f"leading sizes {a} (input) and {o} (output) for {n} examples"
                break
        else:
            if few is not None and (len(few) != len(calls) or any(s != (m, m) for s in few)):
                got = ", ".join(f"{a} and {o}" for a, o in few) or "no call"
                bad[name] = (
                    f"leading sizes {n} for {n} examples but {got} for {m} (input and output)"
                )
    return bad


MISPLACED_HINT = (
    "it does not hold the examples in its first dimension (a sequence-first layer such as "
    "nn.TransformerEncoderLayer without batch_first=True, inputs reshaped to (N*T, d) before the "
    "layer, or a layer run on features shared by all examples and broadcast over the batch)"
)
"""What a misplaced layer usually is, for error messages."""
