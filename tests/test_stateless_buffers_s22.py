"""curvlab's functional_call: a buffer stand-in is never left in a module registered twice whose
forward reassigns that buffer, and the caller's dictionary is not changed (review s22 R1)."""

from __future__ import annotations

import torch
from torch import nn

from curvlab._stateless import functional_call


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("stat", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stat = x.detach().abs().mean()  # the model reassigns its own buffer
        return self.lin(x)


def test_a_reassigned_buffer_of_a_shared_module_gets_its_original_back() -> None:
    for shared in (False, True):
        torch.manual_seed(0)
        block = _Block()
        model = nn.Sequential(block, nn.Tanh(), block if shared else _Block())
        original, weight = block.stat, block.lin.weight
        stand_in = torch.full((), 7.0, dtype=torch.float64)
        tensors = {"0.stat": stand_in}
        functional_call(model, tensors, (torch.ones(1, 2),))
        assert block.stat is original, f"shared={shared}: the buffer was not put back"
        assert block.stat.dtype == torch.float32
        assert block.lin.weight is weight
        assert tensors == {"0.stat": stand_in} and tensors["0.stat"] is stand_in
