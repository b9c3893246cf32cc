"""trace(method="ggn_cv")'s budget refusal names ggn_cv, not block_hutchinson (review s19)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.estimators import EstimatorMemoryError


@pytest.mark.parametrize(
    ("method", "name"), [("ggn_cv", "trace(method='ggn_cv'): "), ("block", "block_hutchinson: ")]
)
def test_the_budget_refusal_names_the_method(method, name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    # one probe, its product and the buffers: 4 vectors of 26 float32 entries = 416 bytes
    with pytest.raises(EstimatorMemoryError) as info:
        cl.trace(model, nn.CrossEntropyLoss(), (X, y), method=method, memory_budget=100)
    assert str(info.value).startswith(name), str(info.value)
    assert "416 bytes" in str(info.value)
