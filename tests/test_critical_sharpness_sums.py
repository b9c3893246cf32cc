"""``critical_sharpness`` takes its update direction from one fresh gradient of the measured data:
on a 16-bit model over many batches that gradient is summed in float32 (as every sum of curvlab's),
not in the parameters' dtype, whose rounding grows with the number of batches. Against the float64
gradient of the same model and data."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from curvlab._losses import loss_spec
from curvlab.analysis._critical_sharpness import _gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_gradient_over_many_batches_is_summed_in_float32(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g)) for _ in range(256)]
    ctx = SimpleNamespace(spec=loss_spec(nn.MSELoss()))

    def grads_in(d: torch.dtype) -> dict:
        m = model.to(d)
        params = {n: p for n, p in m.named_parameters()}
        data = [(x.to(d), y.to(d)) for x, y in batches]
        return {n: v.double() for n, v in _gradient(m, ctx, data, params).items()}

    ref = grads_in(torch.float64)
    got = grads_in(dtype)
    flat = torch.cat([got[n].flatten() for n in ref])
    want = torch.cat([ref[n].flatten() for n in ref])
    err = float((flat - want).norm() / want.norm())
    # each batch's gradient of a 16-bit model rounds (by ~2^-9 in bfloat16), which averages out
    # over 256 batches (0.24% bfloat16, 0.033% float16); a running 16-bit sum rounds the whole
    # sum again on every batch (1.6% and 0.16% before)
    assert err < (6e-3 if dtype == torch.bfloat16 else 8e-4), err
    # returned in the parameters' dtype: the optimizer's update is simulated as step() computes it
    model.to(dtype)
    few = [(x.to(dtype), y.to(dtype)) for x, y in batches[:2]]
    assert all(
        v.dtype == dtype
        for v in _gradient(model, ctx, few, dict(model.named_parameters())).values()
    )
