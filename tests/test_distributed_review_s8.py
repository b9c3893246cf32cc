"""Review s8 findings that need no spawned world (the spawned ones are ``check_review_s8`` in
tests/distributed_checks.py and ``check_lazy_init_untouched`` in tests/test_fsdp2.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab._losses import loss_spec
from curvlab.analysis import noise_scale_from_gradients
from curvlab.analysis._first_order import _trace_fisher_batch
from curvlab.distributed import decode_counts, encode_counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_counts_beside_16bit_values_stay_exact(dtype: torch.dtype) -> None:
    """bfloat16 digits rounded 301 to 300 (exact only up to 256): [301, 1001] on 2 ranks gave
    [600, 2000]; the digits now travel in float32, and a buffer of 16-bit values with them."""
    counts = [301, 1001, 2047, 5_000_001]
    enc = encode_counts(counts, dtype, "cpu")
    assert enc.dtype == torch.float32
    assert decode_counts(enc * 4000, len(counts)) == [4000 * c for c in counts]
    buffer = torch.cat([torch.ones(3, dtype=dtype), enc])
    assert buffer.dtype == torch.float32


def test_trace_fisher_batch_of_a_bfloat16_model_sums_in_float32() -> None:
    """The gradient summed over 128 chunks in bfloat16 came out 0.5% low; now it is the float64
    sum of the same bfloat16 chunk gradients to float32 rounding."""
    model = nn.Sequential(nn.Linear(4, 3)).bfloat16()
    gen = torch.Generator().manual_seed(1)
    n, chunk = 1024, 8
    X = torch.randn(n, 4, generator=gen).bfloat16()
    y = torch.randint(0, 3, (n,), generator=gen)
    spec = loss_spec(nn.CrossEntropyLoss())
    got = _trace_fisher_batch(model, spec, (X, y), torch.Generator().manual_seed(7), chunk)
    draw = torch.Generator().manual_seed(7)  # the same labels, chunk by chunk
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in model.parameters()]
    for i in range(0, n, chunk):
        out = spec.prepare(model(X[i : i + chunk]), y[i : i + chunk])
        yhat = spec.sample_targets(out, draw, y[i : i + chunk])
        grads = torch.autograd.grad(spec.nll_sum(out, yhat, drawn=True), list(model.parameters()))
        for t, g in zip(total, grads):
            t += g.double()
    want = float(sum(t.pow(2).sum() for t in total)) / n**2
    assert isinstance(got, float)
    assert abs(got - want) <= 1e-5 * want


@pytest.mark.parametrize("as_dict", [True, False])
def test_noise_scale_from_gradients_names_a_missing_gradient(as_dict: bool) -> None:
    """A parameter the loss did not reach (``.grad`` None) raised AttributeError on 'detach'."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    X, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    nn.CrossEntropyLoss()(model[0](X), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    arg = grads if as_dict else list(grads.values())
    name = "'1.weight'" if as_dict else "2"
    with pytest.raises(ValueError, match=rf"gradients\[{name}\] is NoneType.*zeros_like"):
        noise_scale_from_gradients(arg, 5)
