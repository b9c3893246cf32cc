"""A batch given as (targets, inputs): the model's own error carries a note naming the swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def test_swapped_pair_gets_a_note() -> None:
    model = _model()
    X = torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([0, 2])
    with pytest.raises(RuntimeError) as info:
        cl.diag_fisher(model, nn.CrossEntropyLoss(), [y, X])
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "(inputs, targets)" in notes and "swap" in notes and "int64" in notes


def test_embedding_failure_is_not_blamed_on_a_swap() -> None:
    """Float inputs that fail (a shape error) get no note: only integer inputs into a
    floating-point model could be targets in front."""
    model = _model()
    X = torch.randn(2, 5, dtype=torch.float64)  # wrong width
    y = torch.tensor([0, 2])
    with pytest.raises(RuntimeError) as info:
        cl.diag_fisher(model, nn.CrossEntropyLoss(), [X, y])
    assert not getattr(info.value, "__notes__", [])


def test_an_embedding_models_own_failure_gets_no_note() -> None:
    """A model that takes token ids and fails for a reason of its own (a width bug) is not told
    its data may be swapped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(5, 3)).double()
    ids = torch.randint(0, 10, (2,))
    with pytest.raises(RuntimeError) as info:
        cl.diag_fisher(model, nn.CrossEntropyLoss(), [ids, torch.tensor([0, 1])])
    assert not getattr(info.value, "__notes__", [])
