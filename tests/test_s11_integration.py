"""Review sweep s11, fixes made at integration (outside the fixers' files)."""

from __future__ import annotations

import copy

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


def _wrapped_like_accelerate(model: nn.Module) -> nn.Module:
    """What ``Accelerator(mixed_precision="bf16").prepare`` does to a model's forward."""
    import types

    model._original_forward = model.forward
    plain = model.forward.__func__

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain(self, *args, **kwargs).float()

    model.forward = types.MethodType(forward, model)
    return model


def test_a_forward_wrapped_in_autocast_by_accelerate_is_measured_in_float():
    """accelerate (and the HF Trainer under bf16=True) leave an autocast wrapper on
    ``model.forward``; curvlab's passes computed inside it, in bfloat16 (an exact Tr(GGN) of
    4.22700 for 4.22577; found in review). They now call the original forward."""
    g = torch.Generator().manual_seed(1)
    plain = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    wrapped = _wrapped_like_accelerate(copy.deepcopy(plain))
    X = torch.randn(12, 6, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    assert wrapped(X).dtype == torch.float32 and not torch.equal(wrapped(X), plain(X))
    forward = wrapped.__dict__["forward"]
    for f in (
        lambda m: cl.trace(m, loss_fn, (X, y), matrix="ggn", method="exact").value,
        lambda m: cl.eigenvalues(m, loss_fn, (X, y), k=1, seed=0).values,
        lambda m: torch.cat([v.flatten() for v in cl.diag_fisher(m, loss_fn, (X, y)).values()]),
        lambda m: cl.gradient_stats(m, loss_fn, (X, y)).noise_scale,
    ):
        assert torch.equal(torch.as_tensor(f(wrapped)), torch.as_tensor(f(plain)))
        assert wrapped.__dict__["forward"] is forward  # the wrapper is put back
