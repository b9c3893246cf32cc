"""K-FAC on models with activation checkpointing (review s9): the recomputation in the backward
pass fired the capture's hooks again and paired other gradients (IndexError / shape errors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
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


class _ReentrantChain(_Chain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = checkpoint(lambda z, layer=layer: torch.tanh(layer(z)), x, use_reentrant=True)
        return self.layers[-1](x)


def test_kfac_refuses_reentrant_checkpointing():
    """Reentrant checkpointing runs the block under no_grad: its layers got G = 0, silently (a
    branch the model itself runs under no_grad, a teacher, keeps its zero G: test_kfac.py)."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 5, (8,), generator=g)
    X.requires_grad_(True)  # (reentrant checkpointing needs an input that requires grad)
    with pytest.raises(ValueError, match="reentrant activation checkpointing"):
        cl.kfac(_ReentrantChain(False).to(DT), nn.CrossEntropyLoss(), (X, y))


class _AttentionBlock(nn.Module):
    def __init__(self, checkpointed: bool = True) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 3)
        self.checkpointed = checkpointed

    def block(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 1, 4).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a.transpose(1, 2).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.checkpointed:
            return self.out(self.block(x))
        return self.out(checkpoint(self.block, x, use_reentrant=False))


def test_operator_products_on_a_kept_graph_through_checkpointed_attention():
    """Products on the kept graph ran outside the math attention kernel the graph was built
    with; the checkpoint's recomputation then failed (CheckpointError)."""
    model, plain = _AttentionBlock().to(DT), _AttentionBlock(False).to(DT)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 5, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (3, 5), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    ps = {n: p.detach() for n, p in model.named_parameters()}

    def loss(theta):
        d, o = {}, 0
        for n in names:
            d[n] = theta[o : o + ps[n].numel()].reshape(ps[n].shape)
            o += ps[n].numel()
        out = torch.func.functional_call(plain, d, (X,))  # (torch.func refuses checkpoints)
        return loss_fn(out.transpose(1, 2), y)

    theta = torch.cat([ps[n].reshape(-1) for n in names])
    with sdpa_kernel(SDPBackend.MATH):  # (the CPU flash kernel has no forward-mode AD)
        H = torch.func.hessian(loss)(theta)
    op = cl.curvature_operator(model, loss_fn, (X, y), matrix="hessian")
    assert torch.allclose(op.to_dense(), H, rtol=1e-9, atol=1e-12)
    got = cl.trace(model, loss_fn, (X, y), method="exact")
    assert got.value == pytest.approx(float(torch.trace(H)), rel=1e-10)
