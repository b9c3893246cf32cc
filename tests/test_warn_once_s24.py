"""Review s24: curvlab's constant-text warnings promised once per place in a training loop are
shown once, whatever ``warnings.catch_warnings()`` lies between the calls (curvlab's own BackPACK
session enters one per call, and Python's once-per-location registry is emptied by each entry).

The noise-scale cancellation warning (docs/analysis.md: "in a training loop Python shows it once
per place") came back at every iteration of a loop that also called ``diag_hessian``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
import curvlab._warn as cl_warn
from curvlab.analysis._first_order import CANCELLATION_WARNING


@pytest.fixture(autouse=True)
def _fresh_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cl_warn, "_SHOWN", set(), raising=False)


def _alike_regression() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """float32 linear regression on inputs 1 ± 1e-3: the examples' gradients nearly agree, so
    tr(Σ) = E‖g_n‖² − ‖ḡ‖² cancels beyond float32's rounding bound (docs/analysis.md)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 3, generator=g))
        model.bias.zero_()
    X = 1 + 1e-3 * torch.randn(16, 3, generator=g)
    y = torch.full((16, 1), 10.0)
    return model, nn.MSELoss(), (X, y)


def _cancellation(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if str(w.message) == CANCELLATION_WARNING]


def test_noise_scale_cancellation_warns_once_across_backpack_calls() -> None:
    model, loss_fn, batch = _alike_regression()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            report = cl.analyze(model, loss_fn, batch, quantities=["noise_scale"])
            cl.diag_hessian(model, loss_fn, batch)  # enters catch_warnings() (BackPACK session)
    assert "noise_scale" in report.values  # measured, with the warning
    assert len(_cancellation(caught)) == 1
    assert _cancellation(caught)[0].filename == __file__


def test_an_always_filter_still_shows_it_at_every_call() -> None:
    model, loss_fn, batch = _alike_regression()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            cl.analyze(model, loss_fn, batch, quantities=["noise_scale"])
    assert len(_cancellation(caught)) == 2
