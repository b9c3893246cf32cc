"""Review sweep s11, fixes made at integration (outside the fixers' files)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl


def _problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (5,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


@pytest.mark.parametrize("fn", [cl.kfac, cl.fisher_norms])
def test_mc_samples_is_never_a_bool(fn):
    model, loss_fn, data = _problem()
    with pytest.raises(ValueError, match="mc_samples"):
        fn(model, loss_fn, data, kind="mc", mc_samples=True)


@pytest.mark.parametrize("fn", [cl.kfac, cl.fisher_norms])
@pytest.mark.parametrize(
    "kw, err",
    [({"seed": "a"}, ValueError), ({"seed": True}, ValueError), ({"generator": 5}, TypeError)],
)
def test_deterministic_kinds_refuse_bad_randomness(fn, kw, err):
    model, loss_fn, data = _problem()
    with pytest.raises(err, match="seed|generator"):
        fn(model, loss_fn, data, kind="exact", **kw)


def test_an_explicit_probe_batch_is_sized_with_the_operators_buffers():
    """``trace(batch_size=k, memory_budget=B)`` counted 2 vectors per probe where a batch holds
    up to :data:`PROBE_VECTORS` (the default sizing's count; 26% over the budget measured)."""
    from curvlab.estimators._trace import PROBE_VECTORS

    model, loss_fn, data = _problem()
    dim = sum(p.numel() for p in model.parameters())
    vec = dim * 8
    fits = PROBE_VECTORS * 3 * vec
    r = cl.trace(model, loss_fn, data, num_probes=6, batch_size=3, memory_budget=fits, seed=0)
    assert r.num_matvecs == 6
    with pytest.raises(cl.estimators.EstimatorMemoryError, match=f"{PROBE_VECTORS * 3} vectors"):
        cl.trace(model, loss_fn, data, num_probes=6, batch_size=3, memory_budget=fits - 1, seed=0)
