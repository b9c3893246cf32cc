"""Rows of per-example gradients kept layer by layer, and their Gram matrices.

:func:`~curvlab.quantities.fisher_norms` writes a Fisher as ``F = w V^T V`` with one row of ``V``
per example (and label draw) and needs only Gram matrices ``V_i V_j^T`` of blocks of rows and the
column sums of squares ``sum_r V_r^2``. A Linear layer on 2-D inputs never has to materialise its
rows: example ``n``'s weight gradient is the outer product ``g_n a_n^T``, so

    <g_n a_n^T, g_m a_m^T> = (g_n . g_m) (a_n . a_m),

and the bias row ``g_n`` adds ``g_n . g_m``. Its Gram block costs ``O(R^2 (in + out))`` instead of
``O(R^2 in out)`` and its rows ``O(R (in + out))`` memory instead of ``O(R in out)``. Other layers
(convolutions, Linear layers on sequences) keep their rows dense.

16-bit rows (a bfloat16 or float16 model's) stay 16-bit where they are kept, but every product and
square here is float32 (:mod:`curvlab._precision`): a Gram entry is a sum over parameters, which
overflowed float16 from 256 on once squared (``||F||_F`` NaN, a false NonFiniteError) and whose
squares below ``6e-8`` were 0 (``||F||_F = 0`` for a regression that fits its batch; found in
review). Their float32 copies are made a bounded block of columns at a time.

Example:
    >>> import torch
    >>> a, g = torch.randn(4, 3), torch.randn(4, 2)
    >>> rows = LayerRows([OuterRows(a, g, bias=False)])
    >>> dense = torch.einsum("no,ni->noi", g, a).flatten(1)
    >>> torch.allclose(rows.gram(rows), dense @ dense.T)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab._precision import common, is_sixteen, upcast

__all__ = ["DenseRows", "LayerRows", "OuterRows", "max_abs"]


@dataclass
class OuterRows:
    """Rows ``[g_r a_r^T, g_r]`` of a Linear layer, kept as the factors ``a`` and ``g``.

    Attributes:
        A: ``(n, in)`` layer inputs, one per example.
        G: ``(M n, out)`` output gradients, ``M`` label draws stacked draw by draw; row
            ``m n + k`` pairs with input ``k``.
        bias: whether the rows include the bias gradient ``g_r``.
    """

    A: Tensor
    G: Tensor
    bias: bool

    @property
    def draws(self) -> int:
        return self.G.shape[0] // self.A.shape[0]

    def gram(self, other: OuterRows) -> Tensor:
        inner = _products(self.A, other.A)
        if self.bias:
            inner = inner + 1
        if self.draws > 1 or other.draws > 1:
            inner = inner.repeat(self.draws, other.draws)
        return _products(self.G, other.G).mul_(inner)

    def top(self) -> Tensor:
        """A bound of the largest ``|entry|`` of the rows, ``max|g| max(max|a|, 1 for a bias)``
        (float64, 0-dim, on the device)."""
        a = max_abs(self.A)
        return max_abs(self.G) * (torch.clamp_min(a, 1.0) if self.bias else a)

    def col_sq_sums(self) -> Tensor:
        A, G = upcast(self.A), upcast(self.G)  # (n, in) and (M n, out): the factors, not rows
        n, out = A.shape[0], G.shape[1]
        g2 = (G * G).view(self.draws, n, out).sum(0)  # summed over draws
        parts = [(g2.T @ (A * A)).flatten()]
        if self.bias:
            parts.append(g2.sum(0))
        return torch.cat(parts)


@dataclass
class DenseRows:
    """Materialised rows ``P`` (``(R, k)``): per-example gradients of one or more parameters."""

    P: Tensor

    def gram(self, other: DenseRows) -> Tensor:
        return _products(self.P, other.P)

    def top(self) -> Tensor:
        """The largest ``|entry|`` of the rows (float64, 0-dim, on the device)."""
        return max_abs(self.P)

    def col_sq_sums(self) -> Tensor:
        if not is_sixteen(self.P.dtype):
            return (self.P * self.P).sum(0)
        out = []
        for c in range(0, self.P.shape[1], _columns(self.P)):
            block = self.P[:, c : c + _columns(self.P)].float()
            out.append(block.mul_(block).sum(0))
        return torch.cat(out) if out else self.P.new_zeros(0, dtype=torch.float32)


def max_abs(t: Tensor) -> Tensor:
    """``max |t|`` as a float64 0-dim tensor on ``t``'s device (0 for no entries)."""
    if not t.numel():
        return torch.zeros((), dtype=torch.float64, device=t.device)
    t = t.detach()
    return torch.maximum(t.amax().abs(), t.amin().abs()).double()  # no |t| copy


_UPCAST_ENTRIES = 2**22
"""Entries of a 16-bit block copied to float32 at once (16 MiB) by :func:`_products`."""


def _columns(P: Tensor) -> int:
    """Columns of ``P`` per float32 block of at most :data:`_UPCAST_ENTRIES` entries."""
    return max(1, _UPCAST_ENTRIES // max(1, P.shape[0]))


def _products(P: Tensor, Q: Tensor) -> Tensor:
    """``P Q^T``; float32 (summed over blocks of columns, each copied to float32) for 16-bit
    ``P`` or ``Q``, in their dtype (one product, unchanged) otherwise."""
    if not (is_sixteen(P.dtype) or is_sixteen(Q.dtype)):
        return P @ Q.T
    step = min(_columns(P), _columns(Q))
    total = None
    for c in range(0, P.shape[1], step):
        a, b = common(P[:, c : c + step], Q[:, c : c + step])
        block = a @ b.T
        total = block if total is None else total.add_(block)
    if total is None:  # no columns
        total = torch.zeros(P.shape[0], Q.shape[0], dtype=torch.float32, device=P.device)
    return total


@dataclass
class LayerRows:
    """The rows of one block of examples, as a list of per-layer parts (same layers per block).

    ``layers`` names the layers the parts came from, in order (the hooks backend's recorded
    modules; empty for rows of all parameters at once): blocks are paired part by part, so two
    blocks with other ``layers`` cannot be paired (a multi-task model running another head on
    another rank).
    """

    parts: list[OuterRows | DenseRows]
    layers: tuple[str, ...] = ()

    def gram(self, other: LayerRows) -> Tensor:
        """``V_self V_other^T``: the sum of the layers' Gram blocks."""
        total = None
        for mine, theirs in zip(self.parts, other.parts):
            block = mine.gram(theirs)
            total = block if total is None else total.add_(block)
        return total

    def top(self) -> Tensor:
        """A bound of the largest ``|entry|`` of the rows (float64, 0-dim, on the device): where
        its square is below the products' smallest normal number every square and Gram entry
        underflowed (:func:`~curvlab.quantities._norms.fisher_norms` refuses it)."""
        tops = [part.top() for part in self.parts]
        return torch.stack(tops).amax() if tops else torch.zeros((), dtype=torch.float64)

    def col_sq_sums(self) -> Tensor:
        """``sum_r V_r^2``, flattened over all parameters (in the parts' order)."""
        return torch.cat([part.col_sq_sums() for part in self.parts])
