"""BCE Monte-Carlo labels (``LossSpec.sample_targets`` of ``BCEWithLogitsLoss``, review s22 BC).

The label of a logit ``z`` is 1 with probability ``sigmoid(z)``. Drawn from a float32
``sigmoid(z)`` and float32 uniforms (a float32 or 16-bit model), the label 0 was never drawn from
``z ~ 17`` on (float32 ``sigmoid(17)`` is exactly 1), so the Monte-Carlo Fisher's expectation there
was ``4e-8`` times the GGN instead of the GGN. The exact probability with which each label is
drawn is read off the sampler by bisection over the uniforms it can be given (a stand-in for
``torch.rand`` returning a chosen point of the requested dtype's grid); the draws of a real
generator are checked against the GGN within their standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvlab import diag_fisher
from curvlab._losses import loss_spec

_BITS = 53  # float64 uniforms are multiples of 2**-53 (torch.rand on the CPU); float32: 2**-24


def _label0_probability(monkeypatch: pytest.MonkeyPatch, z: torch.Tensor) -> torch.Tensor:
    """The exact probability (float64) with which ``sample_targets`` draws the label 0 at each
    entry of ``z``: the label is 0 exactly for the uniforms ``u >= u0`` (monotone in ``u``), so
    bisection over the 2**-53 grid finds ``u0``, and ``P(0) = 1 - u0``. A uniform of a coarser
    dtype (float32: 24 bits) is the grid point below, so ``u0`` is then on that dtype's grid."""
    spec = loss_spec(nn.BCEWithLogitsLoss())
    probe = torch.zeros(z.shape, dtype=torch.int64)  # the uniform given, in units of 2**-53

    def fake_rand(*size, generator=None, device=None, dtype=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        assert tuple(shape) == tuple(z.shape) and generator is not None
        dtype = dtype or torch.get_default_dtype()
        bits = 1 - int(math.log2(torch.finfo(dtype).eps))  # float32: 24, float64: 53
        coarse = torch.div(probe, 2 ** (_BITS - bits), rounding_mode="floor")
        return (coarse.double() * 2.0**-bits).to(dtype)  # exact: a point of dtype's grid

    monkeypatch.setattr(torch, "rand", fake_rand)
    gen = torch.Generator().manual_seed(0)
    lo = torch.full(z.shape, -1, dtype=torch.int64)  # the label is 1 at u = lo (or lo < 0)
    hi = torch.full(z.shape, 2**_BITS, dtype=torch.int64)  # 0 at u = hi (or hi = 2**53)
    while bool((hi - lo > 1).any()):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        probe.copy_(mid)
        zero = spec.sample_targets(z, gen) == 0
        hi = torch.where(zero, mid, hi)
        lo = torch.where(zero, lo, mid)
    monkeypatch.undo()
    return (2**_BITS - hi).double() * 2.0**-_BITS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_each_label_is_drawn_with_its_probability_to_the_uniforms_grid(monkeypatch, dtype):
    """P(label 0) within 2**-53 (the float64 uniforms' grid) of ``sigmoid(-z)`` for every logit,
    the confident ones included (float32 z = 17, 20: 4.1e-8 and 2.1e-9 were drawn with
    probability 0; the float32 grid of 2**-24 rounded every probability by up to 6e-8)."""
    values = [0.0, 3.0, -3.0, 17.0, -17.0, 20.0, -20.0, 30.0, -30.0, 36.0, -36.0, 40.0, -40.0]
    z = torch.tensor(values + [math.inf, -math.inf], dtype=dtype)
    p0 = _label0_probability(monkeypatch, z)
    truth = torch.sigmoid(-z.double())  # float64: relative error of a few ulps
    eps = torch.finfo(torch.float64).eps
    tol = 2.0**-_BITS + 4 * eps * truth  # the grid's resolution and the reference's rounding
    assert torch.all((p0 - truth).abs() <= tol), list(zip(values, p0.tolist(), truth.tolist()))
    assert p0[0] == 0.5 and p0[-2] == 0.0 and p0[-1] == 1.0  # exact at 0 and at +-inf


def test_float64_draws_keep_their_stream() -> None:
    """A float64 model's labels for a given generator are those of ``u < sigmoid(z)`` with the
    generator's float64 uniforms, as before (the float64 rule only lost the rounding of
    ``sigmoid(z)``, which no uniform of this test falls between)."""
    spec = loss_spec(nn.BCEWithLogitsLoss())
    z = torch.linspace(-10, 10, 4001, dtype=torch.float64).reshape(-1, 1)
    drawn = spec.sample_targets(z, torch.Generator().manual_seed(5))
    u = torch.rand(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(drawn, (u < torch.sigmoid(z)).double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rare_label_frequency_within_its_standard_error(dtype) -> None:
    """A real generator: the rare label at ``z = +-6.9`` (probability ~1e-3) and the label 1 at
    ``z = 0`` are drawn with their frequencies within five binomial standard errors."""
    spec = loss_spec(nn.BCEWithLogitsLoss())
    n = 400_000
    z = torch.tensor([6.9, -6.9, 0.0], dtype=dtype).repeat(n, 1)
    drawn = spec.sample_targets(z, torch.Generator().manual_seed(11)).double()
    p1 = torch.sigmoid(z[0].double())
    rare = torch.stack([n - drawn[:, 0].sum(), drawn[:, 1].sum(), drawn[:, 2].sum()])
    p = torch.stack([1 - p1[0], p1[1], p1[2]])
    se = (n * p * (1 - p)).sqrt()
    assert torch.all((rare - n * p).abs() <= 5 * se), (rare, n * p, se)


def test_mc_fisher_over_seeds_is_the_ggn_within_its_standard_error() -> None:
    """``diag_fisher(kind="mc")`` of a float32 logistic regression averaged over seeds against the
    float64 GGN diagonal (torch.func), within five standard errors derived from the draws'
    variance: ``(s - y)^2`` has the mean ``s q`` and the variance ``s q (s - q)^2``."""
    torch.manual_seed(0)
    n, seeds = 400, 40
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, -1.5, 1.0]]))
        model.bias.fill_(0.5)
    x = torch.randn(n, 3)
    y = torch.zeros(n, 1)
    loss = nn.BCEWithLogitsLoss()

    params = {k: v.detach().double() for k, v in model.named_parameters()}
    xd = x.double()

    def logits(p):
        return functional_call(model, p, (xd,))

    def bce_mean(f):
        return nn.functional.binary_cross_entropy_with_logits(f, y.double())

    J = jacrev(logits)(params)  # name -> (n, 1, *shape)
    f = logits(params)
    H = hessian(bce_mean)(f).reshape(n, n)  # diagonal: s q / n
    ggn = {
        k: torch.einsum("ia,ij,ja->a", j.reshape(n, -1), H, j.reshape(n, -1)) for k, j in J.items()
    }

    s = torch.sigmoid(f).reshape(n)
    q = torch.sigmoid(-f).reshape(n)
    var = s * q * (s - q) ** 2  # of (s - y)^2 for y ~ Bernoulli(s)
    runs = [diag_fisher(model, loss, (x, y), kind="mc", seed=k) for k in range(seeds)]
    for k, j in J.items():
        jj = j.reshape(n, -1)
        mean = torch.stack([r[k].double().reshape(-1) for r in runs]).mean(0)
        se = ((var[:, None] * jj**4).sum(0) / n**2 / seeds).sqrt()
        tol = 5 * se + n * 2.0**-24 * ggn[k].abs()  # float32 sums of n terms
        assert torch.all((mean - ggn[k]).abs() <= tol), (k, mean, ggn[k], se)
