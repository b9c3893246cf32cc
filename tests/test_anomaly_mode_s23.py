"""A repeated call under ``torch.autograd.set_detect_anomaly(True)`` names the non-finite culprit
(review s23): the deferred check of a repeated single-batch call ran after the backward pass,
where anomaly mode raised autograd's own error naming curvlab's private Function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import NonFiniteError


def _setup() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 3, dtype=torch.float64, generator=g)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (6,), generator=g)


CALLS = {
    "diag_fisher": lambda m, L, d: cl.diag_fisher(m, L, d),
    "diag_fisher exact": lambda m, L, d: cl.diag_fisher(m, L, d, kind="exact"),
    "gradient_stats": lambda m, L, d: cl.gradient_stats(m, L, d),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_nan_inputs_of_a_repeated_call_under_anomaly_mode(name: str) -> None:
    model, loss_fn, X, y = _setup()
    call = CALLS[name]
    call(model, loss_fn, (X, y))  # the backend choice is remembered: the next call defers
    bad = X.clone()
    bad[0, 0] = float("nan")
    with torch.autograd.set_detect_anomaly(True), pytest.raises(NonFiniteError, match="batch 0"):
        call(model, loss_fn, (bad, y))
    assert not torch.is_anomaly_enabled()


def test_a_nan_parameter_of_a_repeated_call_under_anomaly_mode() -> None:
    model, loss_fn, X, y = _setup()
    cl.diag_fisher(model, loss_fn, (X, y))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with torch.autograd.set_detect_anomaly(True), pytest.raises(NonFiniteError, match="'0.weight'"):
        cl.diag_fisher(model, loss_fn, (X, y))
