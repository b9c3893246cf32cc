"""Rows of per-example gradients kept layer by layer, and their Gram matrices.

:func:`~curvlab.quantities.fisher_norms` writes a Fisher as ``F = w V^T V`` with one row of ``V``
per example (and label draw) and needs only Gram matrices ``V_i V_j^T`` of blocks of rows and the
column sums of squares ``sum_r V_r^2``. A Linear layer on 2-D inputs never has to materialise its
rows: example ``n``'s weight gradient is the outer product ``g_n a_n^T``, so

    <g_n a_n^T, g_m a_m^T> = (g_n . g_m) (a_n . a_m),

and the bias row ``g_n`` adds ``g_n . g_m``. Its Gram block costs ``O(R^2 (in + out))`` instead of
``O(R^2 in out)`` and its rows ``O(R (in + out))`` memory instead of ``O(R in out)``. Other layers
(convolutions, Linear layers on sequences) keep their rows dense.

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

__all__ = ["DenseRows", "LayerRows", "OuterRows"]


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
        inner = self.A @ other.A.T
        if self.bias:
            inner = inner + 1
        if self.draws > 1 or other.draws > 1:
            inner = inner.repeat(self.draws, other.draws)
        return (self.G @ other.G.T).mul_(inner)

    def col_sq_sums(self) -> Tensor:
        n, out = self.A.shape[0], self.G.shape[1]
        g2 = (self.G * self.G).view(self.draws, n, out).sum(0)  # summed over draws
        parts = [(g2.T @ (self.A * self.A)).flatten()]
        if self.bias:
            parts.append(g2.sum(0))
        return torch.cat(parts)


@dataclass
class DenseRows:
    """Materialised rows ``P`` (``(R, k)``): per-example gradients of one or more parameters."""

    P: Tensor

    def gram(self, other: DenseRows) -> Tensor:
        return self.P @ other.P.T

    def col_sq_sums(self) -> Tensor:
        return (self.P * self.P).sum(0)


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

    def col_sq_sums(self) -> Tensor:
        """``sum_r V_r^2``, flattened over all parameters (in the parts' order)."""
        return torch.cat([part.col_sq_sums() for part in self.parts])
