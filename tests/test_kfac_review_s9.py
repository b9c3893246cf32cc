"""K-FAC on models with activation checkpointing (review s9): the recomputation in the backward
pass fired the capture's hooks again and paired other gradients (IndexError / shape errors)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import curvlab as cl

DT = torch.float64


class _Chain(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(5, 5) for _ in range(3)])
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:

            def block(z: torch.Tensor, layer: nn.Module = layer) -> torch.Tensor:
                return torch.tanh(layer(z))

            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.layers[-1](x)


def test_kfac_with_non_reentrant_checkpointing_equals_without():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 5, (8,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    for kind in ("empirical", "exact"):
        want = cl.kfac(_Chain(False).to(DT), loss_fn, (X, y), kind=kind)
        got = cl.kfac(_Chain(True).to(DT), loss_fn, (X, y), kind=kind)
        assert want.keys() == got.keys()
        for k in want:
            assert torch.allclose(got[k].A, want[k].A, rtol=1e-12, atol=1e-14), k
            assert torch.allclose(got[k].G, want[k].G, rtol=1e-12, atol=1e-14), k


def _conv_pair(padding_valid: bool) -> nn.Module:
    torch.manual_seed(1)
    pad = "valid" if padding_valid else 0
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=pad), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(DT)


def test_conv_padding_valid_is_padding_zero_on_the_hooks_and_in_kfac():
    """``padding="valid"`` (no padding) was declined by the hooks (the slower func engine ran)
    and refused by ``kfac``; it is padding 0."""
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(5, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    valid, zero = _conv_pair(True), _conv_pair(False)
    got = cl.diag_fisher(valid, loss_fn, (X, y), backend="hooks")
    want = cl.diag_fisher(zero, loss_fn, (X, y), backend="hooks")
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-12, atol=1e-15), k
    fk, zk = cl.kfac(valid, loss_fn, (X, y)), cl.kfac(zero, loss_fn, (X, y))
    for k in zk:
        assert torch.allclose(fk[k].A, zk[k].A, rtol=1e-12) and torch.allclose(fk[k].G, zk[k].G)
    assert valid[0].padding == "valid"
