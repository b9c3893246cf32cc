"""func backend, Monte-Carlo labels on a random forward (review s26, RX1-3).

The labels must come from the forward whose gradient is taken: labels from the chunk forward
and gradients from other per-example forwards gave ``E sum_y p(y|m1) g(y;m2)^2`` (22.4 for a
Dropout model whose Fisher is 15.4). Brute force: the expectation over every Dropout mask (or
sign), each mask's Fisher exact in float64 with the mask fixed; the tolerance is from the
standard error of the mean over the examples.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import curvlab as cl
from curvlab._losses import loss_spec
from curvlab.backends._func import FuncBackend, _FuncSession

DT = torch.float64
H = 5  # hidden units: 2^5 Dropout masks, enumerated


def _dropout_model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, H), nn.Dropout(0.5), nn.Tanh(), nn.Linear(H, 3)).to(DT)
    with torch.no_grad():
        m[3].weight.mul_(6)
    return m.train()


def _moments(outs_grads: list[tuple[float, list[float], list[float]]]) -> tuple[float, float]:
    """Mean and variance of one example's ``sum ||g(y_hat; m)||^2``: masks ``m`` (weight
    ``w``), ``y_hat ~ p(y|m)``."""
    e1 = sum(w * sum(p * z for p, z in zip(probs, zs)) for w, probs, zs in outs_grads)
    e2 = sum(w * sum(p * z * z for p, z in zip(probs, zs)) for w, probs, zs in outs_grads)
    return e1, e2 - e1 * e1


def _dropout_truth(m: nn.Sequential, x0: torch.Tensor) -> tuple[float, float, float]:
    """Over every mask (fixed, scale 2): the MC Fisher's per-example mean and variance, and the
    mismatched expectation (labels of one mask, gradients of another)."""
    params = {k: p.detach() for k, p in m.named_parameters()}

    def logits(p: dict, mask: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(x0, p["0.weight"], p["0.bias"]) * mask * 2
        return torch.nn.functional.linear(torch.tanh(h), p["3.weight"], p["3.bias"])

    rows, G = [], []
    for bits in itertools.product([0.0, 1.0], repeat=H):
        mask = torch.tensor(bits, dtype=DT)
        probs = torch.softmax(logits(params, mask), -1)[0].tolist()
        zs = []
        for c in range(3):

            def nll(p: dict, mask: torch.Tensor = mask, c: int = c) -> torch.Tensor:
                return nn.functional.cross_entropy(logits(p, mask), torch.tensor([c]))

            g = grad(nll)(params)
            zs.append(sum(float((v**2).sum()) for v in g.values()))
        rows.append((1 / 2**H, probs, zs))
        G.append(zs)
    mean, var = _moments(rows)
    mis = sum(w1 * p * z2[c] for w1, probs, _ in rows for z2 in G for c, p in enumerate(probs))
    return mean, var, mis / len(G)


def _total(d) -> float:
    return sum(float(v.sum()) for v in d.values())


def test_dropout_mc_matches_mask_expectation_and_hooks():
    m = _dropout_model()
    N = 600
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    X, Y = x0.expand(N, 3).clone(), torch.zeros(N, dtype=torch.long)
    mean, var, mis = _dropout_truth(m, x0)
    se = (var / N) ** 0.5
    assert abs(mis - mean) > 7 * se  # the test can tell the mismatch
    lf = nn.CrossEntropyLoss()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    d = cl.diag_fisher(m, lf, (X, Y), kind="mc", backend="func", seed=0)
    assert abs(_total(d) - mean) < 4.5 * se, (_total(d), mean, mis, se)
    h = cl.diag_fisher(m, lf, (X, Y), kind="mc", backend="hooks", seed=0)
    assert abs(_total(d) - _total(h)) < 4.5 * 2**0.5 * se
    assert torch.equal(torch.get_rng_state(), rng) and m.training
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_dropout_mc_samples_two():
    m = _dropout_model()
    N = 400
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    X, Y = x0.expand(N, 3).clone(), torch.zeros(N, dtype=torch.long)
    mean, var, _ = _dropout_truth(m, x0)
    # two labels per example from one mask: the variance of their mean is at most var
    d = cl.diag_fisher(
        m, nn.CrossEntropyLoss(), (X, Y), kind="mc", mc_samples=2, backend="func", seed=3
    )
    assert abs(_total(d) - mean) < 4.5 * (var / N) ** 0.5


class _Sign(nn.Module):
    """One random sign per example, drawn from numpy's, Python's or torch's global RNG."""

    def __init__(self, src: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).to(DT)
        self.src = src
        self.rng = np.random.default_rng(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.src == "numpy":
            s = torch.from_numpy(np.random.choice([-1.0, 1.0], size=(n, 1)))
        elif self.src == "held":  # a numpy generator the layer holds itself
            s = torch.from_numpy(self.rng.choice([-1.0, 1.0], size=(n, 1)))
        elif self.src == "python":
            s = torch.tensor([[random.choice([-1.0, 1.0])] for _ in range(n)], dtype=DT)
        else:
            s = (torch.randint(0, 2, (n, 1)) * 2 - 1).to(DT)
        return self.lin(x) * 4 * s


def _sign_truth(m: _Sign, x0: torch.Tensor) -> tuple[float, float]:
    params = {k: p.detach() for k, p in m.named_parameters()}
    rows = []
    for s in (1.0, -1.0):
        probs = torch.softmax(functional_call(m.lin, params_lin(params), (x0,)) * 4 * s, -1)[0]
        zs = []
        for c in range(3):

            def nll(p: dict, s: float = s, c: int = c) -> torch.Tensor:
                out = functional_call(m.lin, params_lin(p), (x0,)) * 4 * s
                return nn.functional.cross_entropy(out, torch.tensor([c]))

            zs.append(sum(float((v**2).sum()) for v in grad(nll)(params).values()))
        rows.append((0.5, probs.tolist(), zs))
    return _moments(rows)


def params_lin(p: dict) -> dict:
    return {k.removeprefix("lin."): v for k, v in p.items()}


@pytest.mark.parametrize("src", ["numpy", "held", "python", "torch"])
def test_sign_mc_per_source(src):
    torch.manual_seed(0)
    m = _Sign(src)
    N = 400
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    X, Y = x0.expand(N, 3).clone(), torch.zeros(N, dtype=torch.long)
    mean, var = _sign_truth(m, x0)
    d = cl.diag_fisher(m, nn.CrossEntropyLoss(), (X, Y), kind="mc", backend="func", seed=0)
    assert abs(_total(d) - mean) < 4.5 * (var / N) ** 0.5, (_total(d), mean, (var / N) ** 0.5)


def _session(m: nn.Module) -> _FuncSession:
    spec = loss_spec(nn.CrossEntropyLoss())
    return _FuncSession(model=m, spec=spec, params=dict(m.named_parameters()))


def test_backend_sampled_paths_take_labels_from_differentiated_forward():
    """``sum_grad_squared_with_sampled`` (``trace_fisher`` with the data quantities) and
    ``batch_grad(sampled=True)``: the squared gradients at the draws average to the MC mean."""
    m = _dropout_model()
    N = 600
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    X, Y = x0.expand(N, 3).clone(), torch.zeros(N, dtype=torch.long)
    mean, var, _ = _dropout_truth(m, x0)
    se = (var / N) ** 0.5
    be = FuncBackend()
    s = _session(m)
    _, _, at_sampled, _ = be.sum_grad_squared_with_sampled(
        s, X, Y, torch.Generator().manual_seed(0)
    )
    assert abs(_total(at_sampled) / N - mean) < 4.5 * se
    g = be.batch_grad(s, X, Y, sampled=True, generator=torch.Generator().manual_seed(1))
    assert abs(sum(float((v**2).sum()) for v in g.values()) / N - mean) < 4.5 * se


def test_deterministic_forward_keeps_vmap():
    """An eval-mode model (no draws) is mapped as before: no per-example loop note."""
    m = _dropout_model().eval()
    X = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    Y = torch.tensor([0, 1, 2, 0, 1, 2])
    d = cl.diag_fisher(m, nn.CrossEntropyLoss(), (X, Y), kind="mc", backend="func", seed=0)
    assert not any("Monte-Carlo labels" in f for f in d.info.get("fallbacks", ()))
    h = cl.diag_fisher(m, nn.CrossEntropyLoss(), (X, Y), kind="mc", backend="hooks", seed=0)
    for k in d:
        torch.testing.assert_close(d[k], h[k], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- review s26, PR-1
def _error(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("case", ["empty_ce", "empty_mse", "unbatched", "mismatch"])
def test_full_fisher_noise_checks_batch_shape_as_diag(kind, case):
    """``FullFisherNoise.sample`` refuses an empty, unbatched or mismatched batch with the
    message every other sampler gives (it said "every target is ignore_index", or a raw
    IndexError from inside the loss)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT).eval()
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    lf, xb, yb = {
        "empty_ce": (nn.CrossEntropyLoss(), X[:0], y[:0]),
        "empty_mse": (nn.MSELoss(), X[:0], torch.randn(0, 3, dtype=DT)),
        "unbatched": (nn.CrossEntropyLoss(), X[0], y[0]),
        "mismatch": (nn.CrossEntropyLoss(), X, y[:5]),
    }[case]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    got = _error(
        lambda: cl.noise.FullFisherNoise(kind, scale=1.0).sample(
            m, lf, xb, yb, generator=torch.Generator().manual_seed(0)
        )
    )
    want = _error(
        lambda: cl.noise.DiagFisherNoise(kind, scale=1.0).sample(
            m, lf, xb, yb, generator=torch.Generator().manual_seed(0)
        )
    )
    assert got == want
    assert "batch" in got[1] and "ignore_index" not in got[1]
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
