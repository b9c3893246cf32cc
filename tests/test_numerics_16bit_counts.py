"""Float16 models and autocast passes with 65,536 counted tokens: the weight ``w = 1/M`` and its
products stay float32 (a float16 count of 65,520 or more is inf, and made the noise samplers and
the penalties exactly 0), and the gradients reaching a float16 output are not subnormal.

Every value is compared with a float64 brute force (torch.func) on the float16 model's own weights
and data; labels or signs drawn by curvlab are replayed from the same generator.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

import curvlab as cl
from curvlab._losses import loss_spec

B, T, D, V = 2, 32768, 4, 8  # 65,536 counted positions (float16's largest finite value: 65,504)


def _flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.detach().double().flatten() for v in d.values()])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor, Tensor]:
    """A float16 token model, its float64 copy (same weights), inputs of each, and labels."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, V))
    m16 = copy.deepcopy(model).half()
    m64 = copy.deepcopy(m16).double()
    x16 = torch.randn(B, T, D, generator=gen).half()
    y = torch.randint(0, V, (B, T), generator=gen)
    return m16, m64, x16, x16.double(), y


def _nll(m64: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """``sum_n NLL_n`` of the float64 model (GPT layout flattened)."""
    out = functional_call(m64, params, (x,))
    return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")


def _params(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in m.named_parameters()}


def test_full_fisher_noise_empirical_float16_matches_float64(problem):
    m16, m64, x16, x64, y = problem
    eps = cl.noise.FullFisherNoise("empirical", scale=1.0).sample(
        m16, nn.CrossEntropyLoss(), x16, y, generator=torch.Generator().manual_seed(0)
    )
    # scale * sqrt(e) * sum_n r_n grad NLL_n, e = N / M^2, r_n the sampler's Rademacher signs
    signs = torch.randint(0, 2, (B,), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    params, M = _params(m64), B * T

    def signed(p: dict[str, Tensor]) -> Tensor:
        per = [_nll(m64, p, x64[i : i + 1], y[i : i + 1]) for i in range(B)]
        return sum(s * v for s, v in zip(signs.double(), per))

    ref = {k: v * (B**0.5 / M) for k, v in grad(signed)(params).items()}
    assert float(_flat(eps).norm()) > 0  # was exactly 0
    assert _rel(_flat(eps), _flat(ref)) < 0.02


def test_full_fisher_noise_true_float16_matches_float64(problem):
    m16, m64, x16, x64, y = problem
    lf = nn.CrossEntropyLoss()
    eps = cl.noise.FullFisherNoise("true", scale=1.0).sample(
        m16, lf, x16, y, generator=torch.Generator().manual_seed(0)
    )
    spec = loss_spec(lf)
    with torch.no_grad():
        out = spec.prepare(m16(x16), y)
    drawn = spec.sample_targets(out, torch.Generator().manual_seed(0), y)  # the sampler's draws
    g = grad(lambda p: _nll(m64, p, x64, drawn))(_params(m64))
    ref = {k: v / (B * T) ** 0.5 for k, v in g.items()}  # scale * sqrt(w) * grad sum NLL(y_hat)
    assert _rel(_flat(eps), _flat(ref)) < 0.02


def test_multiplicative_noise_gradient_float16_matches_float64(problem):
    m16, m64, x16, x64, y = problem
    state = cl.noise.MultiplicativeNoise(1.0).estimate(
        m16, nn.CrossEntropyLoss(), x16, y, torch.Generator().manual_seed(0)
    )
    ref = grad(lambda p: _nll(m64, p, x64, y) / (B * T))(_params(m64))
    assert _rel(_flat(state), _flat(ref)) < 0.02


def test_fisher_penalty_float16_matches_float64(problem):
    m16, m64, x16, x64, y = problem
    lf = nn.CrossEntropyLoss()
    value = cl.regularizers.fisher_penalty(
        m16, lf, x16, targets=y, generator=torch.Generator().manual_seed(0)
    )
    spec = loss_spec(lf)
    with torch.no_grad():
        out = spec.prepare(m16(x16), y)
    drawn = spec.sample_targets(out, torch.Generator().manual_seed(0), y)
    g = grad(lambda p: _nll(m64, p, x64, drawn) / (B * T))(_params(m64))
    ref = float(_flat(g).pow(2).sum())
    assert value.dtype == torch.float32
    assert abs(float(value.detach()) - ref) / ref < 0.02


def test_input_gradient_penalty_float16_matches_float64(problem):
    m16, m64, x16, x64, y = problem
    value = cl.regularizers.input_gradient_penalty(m16, nn.CrossEntropyLoss(), x16, targets=y)
    # (1/B) sum_i ||d l_i / d x_i||^2, l_i = NLL_i * B / M (examples do not interact)
    gx = grad(lambda x: _nll(m64, _params(m64), x, y) * B / (B * T))(x64)
    ref = float(gx.pow(2).sum()) / B
    assert abs(float(value.detach()) - ref) / ref < 0.02


def test_noise_folded_into_float16_autocast_step_matches_float64():
    """FullFisherNoise("empirical") folded into a training step under float16 autocast."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, V))
    x = torch.randn(1, 2 * T, D, generator=gen)  # one example of 65,536 tokens: one sign
    y = torch.randint(0, V, (1, 2 * T), generator=gen)
    lf = nn.CrossEntropyLoss()

    def loss_of(m: nn.Module) -> Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return lf(m(x).flatten(0, 1), y.flatten())

    m64 = copy.deepcopy(model).double()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    plain = torch.autograd.grad(loss_of(model), list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    noisy = cl.noise.NoisyOptimizer(
        opt, cl.noise.FullFisherNoise("empirical", scale=1.0), model, lf, seed=0
    )

    def closure() -> Tensor:
        noisy.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    noisy.step(closure)
    # SGD with lr 1: after = before - (gradient + noise)
    eps = torch.cat(
        [
            (before[k] - p.detach() - g).double().flatten()
            for (k, p), g in zip(model.named_parameters(), plain)
        ]
    )
    # one example: noise = r * scale * sqrt(N) * w * grad NLL = +-grad of the mean loss
    ref = _flat(grad(lambda p: _nll(m64, p, x.double(), y) / (2 * T))(_params(m64)))
    assert float(eps.norm()) > 0  # was 0
    assert min(_rel(eps, ref), _rel(eps, -ref)) < 0.05
