"""The precision policy: curvlab's own passes run outside autocast; 16-bit values accumulate in float32.

* **Own passes** (quantities, operators, estimators, ``analyze``, ``Diagnostics``' measurements)
  compute as they would outside any ``torch.autocast`` region: :func:`without_autocast` switches an
  ambient region off, so they run in the parameters' dtype.
* **16-bit parameters** (bfloat16, float16) are computed in their dtype, but every product that
  sums over examples, every accumulation over chunks and every result is float32
  (:func:`accumulation_dtype`, :func:`upcast`): never a silently 16-bit number. That includes
  every square and Gram entry of per-example gradients or GGN factors, on every backend: the
  16-bit values are upcast *before* they are multiplied (a float16 square is 0 below ``6e-8``
  and inf above ``65504``: spurious zeros and false NonFiniteErrors, found in review).
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

import math
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch
from torch import Tensor, nn

__all__ = [
    "FUSED_CHUNK",
    "accumulation_dtype",
    "axpy_dot",
    "column_dots",
    "common",
    "is_sixteen",
    "own_forwards",
    "plain_norm_ok",
    "scaled_norm",
    "unit_exponents",
    "upcast",
    "without_autocast",
]

_SIXTEEN = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of values of ``dtype`` are kept in: float32 for 16-bit floats, else ``dtype``."""
    return torch.float32 if dtype in _SIXTEEN else dtype


def is_sixteen(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a 16-bit float (bfloat16, float16), whose products are upcast."""
    return dtype in _SIXTEEN


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


@contextmanager
def own_forwards(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the block with the modules' own ``forward``, without accelerate's autocast wrapper.

    ``accelerate`` (``Accelerator(mixed_precision="bf16"|"fp16").prepare``, and the HF Trainer
    with ``bf16=True``/``fp16=True``) replaces a model's ``forward`` by one wrapped in an autocast
    region and keeps the original as ``_original_forward``; the wrapper stays on the model after
    training. :func:`without_autocast` switches off only a region the caller opened around the
    call, so curvlab's own passes would run in bfloat16 inside the wrapper (found in review: an
    exact Tr(GGN) of 4.22700 for 4.22577, a raw dtype error on a GPT-2). Inside the block every
    such module calls its original ``forward``; the wrapper is put back after, also when the
    block raises. Costs one dictionary lookup per module otherwise.
    """
    swapped: list[tuple[nn.Module, object]] = []
    for m in modules:
        state = m.__dict__
        original = state.get("_original_forward")
        wrapped = state.get("forward")
        if original is not None and wrapped is not None and wrapped is not original:
            swapped.append((m, wrapped))
            m.forward = original  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m, wrapped in reversed(swapped):
            m.forward = wrapped  # type: ignore[method-assign]


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


FUSED_CHUNK = 2**18
"""Entries per chunk of :func:`axpy_dot` (2 MiB of float64 buffer for each of the two operands):
on GPT-2 small (2 CPU cores) an update with its dot product takes 0.12 s, 0.29 s with 2^15."""


def axpy_dot(
    u: list[Tensor], coef: float | Tensor, x: list[Tensor] | None, y: list[Tensor] | None
) -> Tensor:
    """``u <- u - coef * x`` in place (skipped for ``x=None``), then ``y^T u`` in float64.

    ``coef`` may be a 0-dim tensor on ``u``'s device (no host synchronisation).

    ``y=None`` means ``u`` itself (the squared norm). One sweep over chunks of :data:`FUSED_CHUNK`
    entries: each chunk is updated in ``u``'s dtype and its entries copied into float64 buffers,
    where the products are exact and summed (a float32 dot of ``10^8`` entries loses three or
    four digits).
    """
    device = u[0].device
    neg = -coef if isinstance(coef, Tensor) else None
    if neg is not None:
        neg = neg.to(device, u[0].dtype)
    a = torch.empty(min(FUSED_CHUNK, max(t.numel() for t in u)), dtype=torch.float64, device=device)
    b = torch.empty_like(a) if y is not None else a
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, ui in enumerate(u):
        for r in range(0, ui.numel(), FUSED_CHUNK):
            uc = ui[r : r + FUSED_CHUNK]
            if x is not None:
                if neg is None:
                    uc.add_(x[i][r : r + FUSED_CHUNK], alpha=-coef)
                else:
                    uc.addcmul_(x[i][r : r + FUSED_CHUNK], neg)
            n = uc.numel()
            a[:n].copy_(uc)
            if y is not None:
                b[:n].copy_(y[i][r : r + FUSED_CHUNK])
            total += torch.dot(a[:n], b[:n])
    return total


_TINY = torch.finfo(torch.float64).tiny


def plain_norm_ok(value: float, numel: int) -> bool:
    """Whether a float64 norm of ``numel`` entries computed from plain squares is exact.

    Squares below ``2^-1022`` (entries below ``1.5e-154``) are subnormal or 0, each off by up to
    ``2^-1075``, so a norm below ``sqrt(numel * tiny)`` may have lost every digit (found in
    review: at ``||A|| = 1e-170`` Lanczos read ``beta = 0``, a false invariant subspace, and
    returned 0.18 for 2.02 with ``converged=True``), and above ``1.3e154`` the sum of squares
    overflows while the entries are finite. Above that floor their total error is below
    ``eps`` of the sum. ``False`` also for NaN.
    """
    return math.sqrt(numel * _TINY) <= value < math.inf


def scaled_norm(parts: list[Tensor]) -> Tensor:
    """``||u||`` (``u`` the concatenation of ``parts``) as a float64 0-dim tensor, from its
    entries divided by their largest ``|entry|``: exact where plain squares underflow or overflow
    (see :func:`plain_norm_ok`). Two sweeps (the largest entry, then the sum of squares, over
    chunks of :data:`FUSED_CHUNK` entries in one float64 buffer): the rare path only. NaN or inf
    when an entry is; 0 for a zero vector.
    """
    device = parts[0].device
    f64 = torch.float64
    big = torch.zeros((), dtype=f64, device=device)
    for p in parts:
        if p.numel():
            big = torch.maximum(big, p.detach().abs().max().to(f64))
    top = float(big)
    if top == 0.0 or not math.isfinite(top):
        return big
    buf = torch.empty(min(FUSED_CHUNK, max(p.numel() for p in parts)), dtype=f64, device=device)
    total = torch.zeros((), dtype=f64, device=device)
    for p in parts:
        flat = p.reshape(-1)
        for r in range(0, flat.numel(), FUSED_CHUNK):
            chunk = flat[r : r + FUSED_CHUNK]
            a = buf[: chunk.numel()].copy_(chunk).div_(top)
            total += torch.dot(a, a)
    return total.sqrt() * top


FLOAT32_NORMAL_EXPONENTS = (-126, 126)
"""The powers of two the 16-bit scalings shift by, ``2^-126`` to ``2^126``: both ``2^e`` and
``2^-e`` are float32 normals, so a shift and its undoing are exact (also as each other's
inverse). One home for the bounds :func:`unit_exponents`, the func backend's square-root
columns and the operators' output scaling clamp to."""


def unit_exponents(top: Tensor) -> Tensor:
    """Per largest magnitude ``top = m 2^e`` (``m`` in ``[0.5, 1)``) the exponent ``e`` as a
    float32 tensor, 0 where ``top`` is 0 or not finite, kept to ``[-126, 126]``: ``2^-e`` and
    ``2^e`` are float32 normals, a value below ``2^-126`` is brought to ``[2^-23, 1)`` only.

    Unclamped, a largest magnitude below ``2^-128`` gave ``2^-e = inf`` and ``inf * 0 = NaN``:
    BackPACK's ``diag_hessian`` of a float16 classifier whose examples are all at a margin of 89
    or more (the loss gradient ``p - e_c`` is ``p_j < 2^-128`` and 0) and ``kfac(kind="exact")``
    of a chunk of such examples raised a false ``NonFiniteError`` (found in review s19). Shared by
    the 16-bit scalings of BackPACK's factors and K-FAC's square-root columns."""
    exponent = torch.frexp(top).exponent.float()
    usable = torch.isfinite(top) & (top > 0)
    return torch.where(usable, exponent, torch.zeros_like(exponent)).clamp(
        *FLOAT32_NORMAL_EXPONENTS
    )
