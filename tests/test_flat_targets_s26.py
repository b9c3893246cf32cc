"""Review s26 (RX4-2): logits flattened to ``(B*T, C)`` with targets ``(B*T,)`` are refused by
the quantities and, since the noise samplers' separate pass runs the data's shape checks, by
``MultiplicativeNoise`` and ``FullFisherNoise`` too; the message names the flattening and the
way out (return ``(B, T, C)`` logits and ``(B, T)`` targets)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl


class _Tokens(nn.Module):
    def __init__(self, flat: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out, self.flat = nn.Embedding(7, 5), nn.Linear(5, 7), flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.out(self.emb(x))
        return o.reshape(-1, 7) if self.flat else o


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 7, (2, 5), generator=g), torch.randint(0, 7, (2, 5), generator=g)


SAMPLERS = {
    "multiplicative": lambda: cl.noise.MultiplicativeNoise(0.1),
    "full_true": lambda: cl.noise.FullFisherNoise("true", scale=1.0),
    "full_empirical": lambda: cl.noise.FullFisherNoise("empirical", scale=1.0),
    "diag_empirical": lambda: cl.noise.DiagFisherNoise("empirical", scale=1.0),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_flattened_logits_refused_naming_the_way_out(name: str) -> None:
    x, y = _batch()
    with pytest.raises(ValueError, match=r"5 times as many.*\(B, T, C\).*\(B, T\)"):
        SAMPLERS[name]().sample(_Tokens(flat=True), nn.CrossEntropyLoss(), x, y.reshape(-1))


def test_flattened_logits_refused_by_the_quantities_naming_the_way_out() -> None:
    x, y = _batch()
    with pytest.raises(ValueError, match=r"flattened to \(B\*T, C\)"):
        cl.diag_fisher(_Tokens(flat=True), nn.CrossEntropyLoss(), [(x, y.reshape(-1))])
