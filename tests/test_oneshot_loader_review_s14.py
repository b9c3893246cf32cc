"""Review s14 (inputs): a loader over a one-shot iterator, read again after a hand-over.

A ``DataLoader`` whose ``IterableDataset`` returns one stored iterator is no ``Iterator`` itself,
so a backend that handed over on a later batch started over by reading it again, and got only the
batches not yet read: ``diag_fisher`` answered with the Fisher of batch 3 of 3 (17.5% off the
brute force on all the data), ``gradient_stats``' mean 74% off, ``diag_hessian`` with the
batches after the first; with two batches, "data is empty". The second reading is now compared
with the first chunk, and a loader that gives another first batch (or none) is a clear error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import curvlab as cl
from curvlab.backends._choice import CHOICES

DT = torch.float64


class Cond(nn.Module):
    """An in-place change of a module's input on a batch the hooks meet only later."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(x)
        h = self.a(u)
        if x.shape[0] == 2 and bool((x[:, 0] > 50).all()):
            u.mul_(2.0)
            h = h + u
        return self.b(torch.tanh(h))


class OneShot(IterableDataset):
    def __init__(self, batches: list) -> None:
        self.it = iter(batches)

    def __iter__(self):  # noqa: ANN204
        return self.it


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(4, 3, dtype=DT, generator=g), torch.randint(0, 3, (4,), generator=g))]
    X2 = torch.randn(2, 3, dtype=DT, generator=g)
    X2[:, 0] += 100
    out.append((X2, torch.randint(0, 3, (2,), generator=g)))
    if n == 3:
        out.append(
            (torch.randn(3, 3, dtype=DT, generator=g), torch.randint(0, 3, (3,), generator=g))
        )
    return out


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Cond().to(DT)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("call", ["diag_fisher", "gradient_stats"])
def test_one_shot_loader_read_again_after_a_handover_is_refused(n: int, call: str) -> None:
    model, loss = _model(), nn.CrossEntropyLoss()
    CHOICES.clear()  # the hooks backend is tried first and hands over on batch 2
    loader = DataLoader(OneShot(_batches(n)), batch_size=None)
    fn = getattr(cl, call)
    with pytest.raises(ValueError, match="when read again"):
        fn(model, loss, loader)


def test_a_list_of_the_same_batches_still_answers() -> None:
    """The restart itself stays: a list is read again and gives torch.func's numbers (the
    model's numbers are checked against brute force in test_data_review_s10.py)."""
    model, loss = _model(), nn.CrossEntropyLoss()
    batches = _batches(3)
    CHOICES.clear()
    got = cl.diag_fisher(model, loss, batches)
    ref = cl.diag_fisher(model, loss, batches, backend="func")
    assert got.backend == "func"
    for k in ref:
        assert torch.equal(got[k], ref[k])


def test_diag_hessian_refuses_a_one_shot_loader_after_backpack_hands_over() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 5, 3, dtype=DT, generator=g), torch.randn(4, 5, 2, dtype=DT, generator=g))
        for _ in range(3)
    ]
    loader = DataLoader(OneShot(batches), batch_size=None)
    with pytest.raises(ValueError, match="when read"):
        cl.diag_hessian(model, nn.MSELoss(), loader)
    assert cl.diag_hessian(model, nn.MSELoss(), batches).backend == "columns"
