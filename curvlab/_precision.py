"""The precision policy: curvlab's own passes run outside autocast; 16-bit values accumulate in float32.

* **Own passes** (quantities, operators, estimators, ``analyze``, ``Diagnostics``' measurements)
  compute as they would outside any ``torch.autocast`` region: :func:`without_autocast` switches an
  ambient region off, so they run in the parameters' dtype.
* **16-bit parameters** (bfloat16, float16) are computed in their dtype, but every product that
  sums over examples, every accumulation over chunks and every result is float32
  (:func:`accumulation_dtype`, :func:`upcast`): never a silently 16-bit number.
* **In-step captures** (the noise samplers inside the user's step, the Fisher penalty) read the
  user's own autocast pass, whose layer inputs and output gradients may differ in dtype (a float32
  input, a bfloat16 output gradient): they bring both to the accumulation dtype before any product
  (:func:`common`), and ``.grad`` keeps its own dtype.

Example:
    >>> import torch
    >>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float64)
    (torch.float32, torch.float64)
    >>> a, g = common(torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=torch.bfloat16))
    >>> a.dtype, g.dtype
    (torch.float32, torch.float32)
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "column_dots", "common", "upcast", "without_autocast"]

_SIXTEEN = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of values of ``dtype`` are kept in: float32 for 16-bit floats, else ``dtype``."""
    return torch.float32 if dtype in _SIXTEEN else dtype


def upcast(t: Tensor) -> Tensor:
    """``t`` in its accumulation dtype (itself, no copy, unless it is 16-bit)."""
    return t.float() if t.dtype in _SIXTEEN else t


def common(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``g`` in one dtype, at least float32 (for products of an autocast pass's tensors)."""
    if a.dtype == g.dtype and a.dtype not in _SIXTEEN:
        return a, g
    dtype = accumulation_dtype(torch.promote_types(a.dtype, g.dtype))
    return a.to(dtype), g.to(dtype)


def without_autocast() -> AbstractContextManager[None]:
    """Switch off any ambient ``torch.autocast`` region (CPU and CUDA) for a block.

    Costs two flag reads when no region is active.
    """
    if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
        return nullcontext()
    stack = ExitStack()
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def column_dots(X: Tensor, Y: Tensor, max_entries: int = 2**22) -> Tensor:
    """``(k,)`` dot products ``x_j^T y_j`` of the columns of two ``(n, k)`` blocks, in float64.

    A float32 dot product of ``10^8`` entries loses three or four digits: the entries (float32 or
    16-bit) are copied into one reused float64 buffer of at most ``max_entries`` entries and 1/64
    of the block (so it adds under 2% to the blocks' memory), where their products are exact and
    summed over row chunks.
    """
    n, k = X.shape
    entries = min(max_entries, max(2**16, n * k // 64))
    step = max(1, min(n, entries // max(k, 1)))
    buf = torch.empty(step * k, dtype=torch.float64, device=X.device)
    out = torch.zeros(k, dtype=torch.float64, device=X.device)
    for r in range(0, n, step):
        rows = min(step, n - r)
        block = buf[: rows * k].view(rows, k)
        block.copy_(X[r : r + rows])
        out += block.mul_(Y[r : r + rows]).sum(0)
    return out
