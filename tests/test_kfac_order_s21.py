"""K-FAC's result lists its layers in the model's order, whatever order the data runs them in
(review s21: under DDP, ranks whose batches route to the heads in another order got the layers in
another order, so a per-layer loop or collective over the result paired different layers)."""

from __future__ import annotations

import torch
from torch import nn

import curvlab as cl


class _Routed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.c = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.c(h) if bool(x[0, 0] > 0) else self.b(h)  # the batch picks the head


def test_kfac_layers_in_model_order_whatever_the_data_runs_first() -> None:
    torch.manual_seed(0)
    model = _Routed().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    to_c = x.clone()
    to_c[:, 0] = 1.0
    to_b = x.clone()
    to_b[:, 0] = -1.0
    y = torch.tensor([0, 1, 1, 0])
    for batches in ([(to_c, y), (to_b, y)], [(to_b, y), (to_c, y)]):
        factors = cl.kfac(model, nn.CrossEntropyLoss(), batches, kind="exact")
        assert list(factors) == ["a", "b", "c"]
