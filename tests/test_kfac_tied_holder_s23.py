"""K-FAC on a weight that a non-embedding module registers and reads (review s23)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl

DT = torch.float64


class _Decoder(nn.Module):
    """Holds the encoder's weight as its own parameter and reads it (a tied autoencoder)."""

    def __init__(self, w: nn.Parameter) -> None:
        super().__init__()
        self.w = w

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.w.t())


class _TiedAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 2, bias=False)
        self.dec = _Decoder(self.enc.weight)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dec(torch.tanh(self.enc(x))))


class _Holder(nn.Module):
    """Registers the weight and never reads it."""

    def __init__(self, w: nn.Parameter) -> None:
        super().__init__()
        self.w = w


class _HeldOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.holder = _Holder(self.enc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, dtype=DT, generator=g), torch.randint(0, 3, (1,), generator=g)


def test_a_weight_read_by_another_module_is_left_out_not_factored_from_its_layer_alone() -> None:
    # before: factors for 'enc' from its own call alone, its one-example block 75% off the true
    # one (which has the decoder's use in it), no note in info["left_out"]
    torch.manual_seed(1)
    model = _TiedAE().to(DT)
    f = cl.kfac(model, nn.CrossEntropyLoss(reduction="sum"), _data(), kind="empirical")
    assert "enc" not in f
    assert "enc" in f.info["left_out"]
    assert "outside the layer's calls" in f.info["left_out"]["enc"]
    # the untied head is exact: its one-example empirical block is g g^T
    X, y = _data()
    loss = nn.CrossEntropyLoss(reduction="sum")(model(X), y)
    g = torch.autograd.grad(loss, model.out.weight)[0].reshape(-1)
    torch.testing.assert_close(f["out"].weight_block(), torch.outer(g, g), rtol=1e-12, atol=1e-14)


def test_a_module_that_only_holds_the_weight_keeps_the_layers_factors() -> None:
    torch.manual_seed(2)
    model = _HeldOnly().to(DT)
    X, y = _data()
    f = cl.kfac(model, nn.CrossEntropyLoss(reduction="sum"), (X, y), kind="empirical")
    loss = nn.CrossEntropyLoss(reduction="sum")(model(X), y)
    g = torch.autograd.grad(loss, model.enc.weight)[0].reshape(-1)
    torch.testing.assert_close(f["enc"].weight_block(), torch.outer(g, g), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_a_head_tied_to_an_embedding_keeps_its_head_only_factors(kind: str) -> None:
    torch.manual_seed(3)
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), head).to(DT)
    ids = torch.tensor([[0, 1, 4]])
    f = cl.kfac(model, nn.CrossEntropyLoss(), (ids, torch.tensor([[1, 2, 3]])), kind=kind)
    assert "2" in f
