"""report.html's rows: a value shown as another's ``±`` is not a row of its own (review s23)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import curvlab as cl
from curvlab.analysis._glossary import STDERR_KEYS
from curvlab.analysis._page import _row_names


def test_sharpness_residual_is_not_a_row_of_its_own() -> None:
    """The HTML listed ``sharpness_residual`` as a row beside ``sharpness ± residual`` (its value
    twice), where ``summary()`` did not."""
    torch.manual_seed(1)
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = cl.analyze(
            model, nn.CrossEntropyLoss(), (X, y), quantities=["sharpness"], progress=False
        )
    assert "sharpness_residual" in rep.entries[0]["values"]
    rows = _row_names(rep.entries)
    summary_rows = [line.split()[0] for line in rep.summary().splitlines()[1:] if line.strip()]
    assert "sharpness" in rows
    assert not set(rows) & set(STDERR_KEYS.values())
    assert [r for r in rows if r in summary_rows] == [r for r in summary_rows if r in rows]
    assert "sharpness_residual" not in rows
