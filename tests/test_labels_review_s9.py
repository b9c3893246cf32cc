"""Class indices out of range (review s9): torch's loss raises for them, but the GGN, the
Monte-Carlo Fisher and the operators read the labels only for the ignored positions, so a void
label 255 with the default ``ignore_index=-100`` was counted as a loss term without a class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl

DT = torch.float64


def _segmentation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1)).to(DT)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 2, 4, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (3, 4, 4), generator=g)
    y[0, 0, :2] = 255  # void pixels
    return model, X, y


CALLS = {
    "diag_fisher exact": lambda m, lf, d: cl.diag_fisher(m, lf, d, kind="exact"),
    "diag_fisher mc": lambda m, lf, d: cl.diag_fisher(m, lf, d, kind="mc", seed=0),
    "fisher_norms exact": lambda m, lf, d: cl.fisher_norms(m, lf, d, kind="exact"),
    "kfac exact": lambda m, lf, d: cl.kfac(m, lf, d, kind="exact"),
    "ggn operator": lambda m, lf, d: cl.curvature_operator(m, lf, d, matrix="ggn"),
    "ggn trace": lambda m, lf, d: cl.trace(m, lf, d, matrix="ggn", method="exact"),
    "fisher_trace": lambda m, lf, d: cl.fisher_trace(m, lf, d, seed=0),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_void_label_that_is_not_ignore_index_is_refused(call):
    model, X, y = _segmentation()
    with pytest.raises(ValueError, match=r"2 target\(s\) are neither a class index in \[0, 3\)"):
        CALLS[call](model, nn.CrossEntropyLoss(), (X, y))
    # as the loss's ignore_index the same data is measured, and equals the labels mapped to -100
    got = CALLS[call](model, nn.CrossEntropyLoss(ignore_index=255), (X, y))
    mapped = y.masked_fill(y == 255, -100)
    want = CALLS[call](model, nn.CrossEntropyLoss(), (X, mapped))
    if call == "ggn trace":
        assert got.value == pytest.approx(want.value, rel=1e-12)
    elif call == "fisher_norms exact":
        assert got.frobenius == pytest.approx(want.frobenius, rel=1e-12)
    elif call == "diag_fisher exact":
        assert all(torch.allclose(got[k], want[k], rtol=1e-12) for k in want)


def test_a_label_out_of_range_in_a_later_batch_is_refused():
    model, X, y = _segmentation()
    clean = y.masked_fill(y == 255, 0)
    data = [(X[:2], clean[:2]), (X[2:], torch.full_like(clean[2:], 3))]
    op = None
    with pytest.raises(ValueError, match="neither a class index"):
        op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix="ggn")
    assert op is None
    with pytest.raises(ValueError, match="neither a class index"):
        cl.diag_fisher(model, nn.CrossEntropyLoss(), data, kind="exact")
