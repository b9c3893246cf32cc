"""gradient_stats' ``variance = E[g^2] - mean^2`` cancels where the examples' gradients agree
(``mean^2 / variance > ~1e5`` in float32): it warns then, naming the parameters, and stays silent
where the float32 numbers agree with a float64 brute force (torch.func per-example gradients)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import curvlab as cl


def _brute_force(m64: nn.Module, X: Tensor, y: Tensor) -> tuple[dict[str, Tensor], float]:
    """Per-coordinate variances of the per-example gradients (MSE, one output) and the noise
    scale, in float64 from the definitions."""
    params = {k: v.detach() for k, v in m64.named_parameters()}

    def loss(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return ((functional_call(m64, p, (x[None],)) - t[None]) ** 2).mean()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    var = {k: v.var(0, unbiased=False) for k, v in g.items()}
    tr = sum(float(v.sum()) for v in var.values())
    mean_sq = sum(float(v.mean(0).pow(2).sum()) for v in g.values())
    return var, tr / mean_sq


def _run(model: nn.Module, X: Tensor, y: Tensor) -> tuple[cl.GradientStats, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = cl.gradient_stats(model, nn.MSELoss(), (X, y))
    return stats, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_near_constant_inputs_warn_and_name_the_parameters():
    """A linear model on inputs 1 +- 1e-3: mean^2 / variance 1e6-1.6e7, float32 noise scale
    18% off; the warning says so (it was silent)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    X = 1 + 1e-3 * torch.randn(256, 8, dtype=torch.float64)
    y = 5 + 1e-3 * torch.randn(256, 1, dtype=torch.float64)
    m32 = nn.Linear(8, 1)
    m64 = copy.deepcopy(m32).double()
    stats, messages = _run(m32, X.float(), y.float())
    var, noise_scale = _brute_force(m64, X.float().double(), y.float().double())
    off = abs(stats.noise_scale - noise_scale) / noise_scale
    assert off > 0.01  # the float32 result is wrong, so the warning is due
    assert len(messages) == 1
    assert "'bias'" in messages[0] and "'weight'" in messages[0]
    assert "noise_scale are affected" in messages[0]


def test_offset_targets_warn_for_the_output_bias_only():
    """Targets 2000 +- 1: the output bias's variance is off (mean^2 / variance 3.6e6), the totals
    are not, and the warning says which; targets 50 +- 0.5 (mean^2 / variance up to 8.6e3, a
    rounding bound of 1e-3) stay silent and within 1% of the brute force."""
    torch.set_num_threads(1)
    for offset, spread, warns in [(2000.0, 1.0, True), (50.0, 0.5, False)]:
        torch.manual_seed(0)
        X = torch.randn(256, 8, dtype=torch.float64)
        y = offset + spread * torch.randn(256, 1, dtype=torch.float64)
        m32 = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        m64 = copy.deepcopy(m32).double()
        stats, messages = _run(m32, X.float(), y.float())
        var, noise_scale = _brute_force(m64, X.float().double(), y.float().double())
        assert abs(stats.noise_scale - noise_scale) / noise_scale < 1e-4
        off = {k: float((stats.variance[k].double() - v).norm() / v.norm()) for k, v in var.items()}
        if not warns:
            assert messages == []
            assert max(off.values()) < 0.01, off
            continue
        assert off["2.bias"] > 0.01
        assert len(messages) == 1
        assert "'2.bias'" in messages[0] and "'0.weight'" not in messages[0]
        assert "noise_scale are not" in messages[0]
