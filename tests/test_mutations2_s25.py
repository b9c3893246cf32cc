"""Review s25 (MV): tests for three mutations that the suite let survive.

1. ``noise_scale_hessian`` on its probe path (``N > num_probes``) had no value check: probes
   ``u = N^-½ Σ_n s_n g_n`` without the centring ``− (Σ_n s_n) G`` estimate
   ``tr(HΣ) + GᵀHG`` and gave ``B_noise`` 1.3194 ± 0.1036 for a brute-force 0.2488 (10σ off),
   while every value check used ``N <= num_probes`` (the exact branch).
2. ``kfac``'s byte count for 16-bit models: counting the weight's 2 bytes per factor entry
   instead of float32's 4 halved ``info["factor_bytes"]`` (594 for 1188) and let
   ``memory_budget`` pass factors twice its size; no test read it for a 16-bit model.
3. Hutch++'s per-block traces (``blocks=``): the weight 2 of the cross term
   ``2 tr(P_b Q (Pi A Q)ᵀ)`` changed to 1 leaves the total unchanged (the cross terms sum to 0
   over the blocks) but biases each block; over 200 seeds the first block's mean was 16σ off.

References: dense float64 brute force (``torch.func``), the exact block traces of a dense
matrix, and the documented byte count. Statistical tolerances are 4 standard errors.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap

import curvlab as cl
from curvlab.analysis._measures import measure
from curvlab.estimators import TensorOperator, hutchpp

DT = torch.float64


# ------------------------------------------------ 1. noise_scale_hessian on its probe path
def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _nsh_brute(model: nn.Module, per: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    """``tr(HΣ) = (1/N) Σ_n (g_n − G)ᵀ H (g_n − G)`` and ``GᵀHG``, with ``g_n`` the gradient of
    example ``n``'s mean loss, ``G`` their mean and ``H`` the Hessian of the mean loss (``per``
    has ``reduction="mean"``)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    theta = torch.cat([p.reshape(-1) for p in params])

    def loss(t: Tensor, x: Tensor, yy: Tensor) -> Tensor:
        parts = t.split([p.numel() for p in params])
        values = {n: v.view_as(p) for n, v, p in zip(names, parts, params)}
        return per(functional_call(model, values, (x,)), yy)

    g = vmap(grad(lambda t, x, yy: loss(t, x[None], yy[None])), in_dims=(None, 0, 0))(theta, X, y)
    mean = g.mean(0)
    h = hessian(loss)(theta, X, y)
    d = g - mean
    return float(torch.einsum("ni,ij,nj->", d, h, d) / len(X)), float(mean @ h @ mean)


def _check_probe_path(v: dict, want_trace: float, want_ghg: float, probes: int) -> None:
    """The probes' mean within 4 of its standard errors of the brute force (``GᵀHG`` exact)."""
    assert v["noise_scale_hessian_hvps"] == probes + 1  # the probe branch, not the exact one
    assert v["grad_hessian_grad"] == pytest.approx(want_ghg, rel=1e-9)
    se = v["trace_hessian_covariance_stderr"]
    assert abs(v["trace_hessian_covariance"] - want_trace) < 4 * se
    assert 0 < se < 0.2 * want_trace  # a real standard error, small enough to be decisive
    b, b_se = v["noise_scale_hessian"], v["noise_scale_hessian_stderr"]
    assert b_se == pytest.approx(se / want_ghg, rel=1e-9)
    assert abs(b - want_trace / want_ghg) < 4 * b_se


def test_noise_scale_hessian_probe_path_matches_brute_force_through_analyze() -> None:
    """``N = 256 > num_probes = 200``, MSE against targets far from the outputs: a large mean
    gradient (``B_noise = 0.249``), where probes that are not centred (``E[uᵀHu] = tr(HΣ) +
    GᵀHG``) are off by about 1: 1.3194 ± 0.1036 (10σ). The current code: 0.2574 ± 0.0224."""
    model = _mlp(1)
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(256, 3, generator=gen, dtype=DT)
    y = 3.0 + 0.5 * torch.randn(256, 3, generator=gen, dtype=DT)
    want_trace, want_ghg = _nsh_brute(model, nn.MSELoss(), X, y)
    assert want_trace / want_ghg < 0.5  # the missing centring would add 1: decisive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = cl.analyze(
            model, nn.MSELoss(), (X, y), quantities=["noise_scale_hessian"], seed=0,
            num_probes=200, nqm=False, progress=False,
        )  # fmt: skip
    _check_probe_path(report.values, want_trace, want_ghg, 200)


def test_noise_scale_hessian_probe_path_over_two_batches_of_a_summed_loss() -> None:
    """The same over two batches (85 + 171 examples, signs drawn per batch and centred by their
    total) of ``CrossEntropyLoss(reduction="sum")``, most labels 0 (a large mean gradient,
    ``B_noise = 0.528``): uncentred probes give 1.5986 ± 0.1060 (10σ), the code 0.5735 ± 0.0319."""
    model = _mlp(1)
    gen = torch.Generator().manual_seed(5)
    n = 256
    X = torch.randn(n, 3, generator=gen, dtype=DT)
    y = torch.zeros(n, dtype=torch.long)
    y[: n // 8] = torch.randint(0, 3, (n // 8,), generator=gen)
    want_trace, want_ghg = _nsh_brute(model, nn.CrossEntropyLoss(), X, y)
    assert want_trace / want_ghg < 0.6
    h = n // 3
    v = measure(
        model, nn.CrossEntropyLoss(reduction="sum"), [(X[:h], y[:h]), (X[h:], y[h:])],
        ["noise_scale_hessian"], options={"num_probes": 200}, seed=0,
    ).values  # fmt: skip
    _check_probe_path(v, want_trace, want_ghg, 200)


# ------------------------------------------------------------- 2. kfac's bytes, 16-bit models
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kfac_factor_bytes_and_budget_of_a_16_bit_model(dtype: torch.dtype) -> None:
    """16-bit models get float32 factors: ``info["factor_bytes"]`` is their real size, the
    documented ``Σ (in'² + out²) · max(4, itemsize)`` (here ``(12² + 8² + 8² + 5²) · 4 = 1188``),
    and a ``memory_budget`` under it, even by one byte, is refused before any forward pass.
    Counting the weight's 2 bytes reported 594 and let budgets of 595 and 1187 through."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 5)).to(dtype)
    X = torch.randn(16, 12, dtype=dtype)
    y = torch.randint(0, 5, (16,))
    loss_fn = nn.CrossEntropyLoss()
    factors = cl.kfac(model, loss_fn, (X, y))
    real = sum(f.A.nbytes + f.G.nbytes for f in factors.values())
    assert all(f.A.dtype == f.G.dtype == torch.float32 for f in factors.values())
    assert real == 1188
    assert factors.info["factor_bytes"] == real
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for budget in (real - 1, real // 2 + 1):
            with pytest.raises(ValueError, match=rf"memory_budget={budget} bytes"):
                cl.kfac(model, loss_fn, (X, y), memory_budget=budget)
            assert calls == []  # refused before any pass
        fitted = cl.kfac(model, loss_fn, (X, y), memory_budget=real)  # exactly fits
        assert fitted.info["factor_bytes"] == real
    finally:
        hook.remove()


# ------------------------------------------------------------ 3. Hutch++'s per-block traces
def test_hutchpp_block_traces_are_unbiased_with_coupled_blocks() -> None:
    """``A = v vᵀ + diag(0.1 … 1)``, ``v`` of rank 3 with its first 20 rows x5 (strongly coupled
    blocks), ``k = 10 < D = 40``: the mean of ``by_layer`` over 200 seeds is each block's exact
    trace within 4 standard errors of that mean, and the blocks add up to ``value``. With the
    cross term weighted 1 instead of 2 (the total unchanged) the means were 16σ and 7σ off."""
    D = 40
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(D, 3, generator=gen, dtype=DT)
    v[:20] *= 5
    A = v @ v.T + torch.diag(torch.linspace(0.1, 1, D, dtype=DT))
    blocks = {"first": slice(0, 20), "second": slice(20, D)}
    exact = {name: float(A.diagonal()[s].sum()) for name, s in blocks.items()}
    runs = [hutchpp(TensorOperator(A), num_matvecs=30, seed=s, blocks=blocks) for s in range(200)]
    for r in runs:
        assert r.by_layer is not None
        assert sum(r.by_layer.values()) == pytest.approx(r.value, rel=1e-9)
    for name in blocks:
        x = torch.tensor([r.by_layer[name] for r in runs], dtype=DT)
        se = float(x.std()) / math.sqrt(len(x))
        assert 0 < se < 1e-3 * abs(exact[name])
        assert abs(float(x.mean()) - exact[name]) < 4 * se, (name, float(x.mean()), exact[name], se)
