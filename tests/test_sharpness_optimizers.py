"""Sharpness thresholds and preconditioners for the optimizer settings researchers use (review s9).

Thresholds are checked against the real optimizer: its ``step()`` on a one-parameter quadratic
``h θ²/2`` is a linear map of ``(θ, buffer)``, probed column by column; the threshold is where the
map's spectral radius crosses 1. Preconditioned sharpness is checked against a dense float64
``eigvalsh`` of ``P^-1/2 (H + wd I) P^-1/2`` with ``P`` rebuilt from a real Adam state.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvlab as cl
from curvlab.analysis import Diagnostics
from curvlab.analysis._estimator_measures import measurement_seed
from curvlab.analysis._optimizer_state import (
    critical_threshold,
    preconditioned_threshold,
    sharpness_threshold,
)
from curvlab.analysis._sharpness import warm_top_eigenvalue

DT = torch.float64


# ---------------------------------------------------------------------- brute-force stability
def _sgd_map(h: float, **kw) -> torch.Tensor:
    """The linear map (θ, buf) -> (θ', buf') of one ``torch.optim.SGD`` step on ``h θ²/2``."""
    p = nn.Parameter(torch.zeros(1, dtype=DT))
    opt = torch.optim.SGD([p], **kw)
    momentum = kw.get("momentum", 0.0) != 0
    cols = []
    for e in ([1.0, 0.0], [0.0, 1.0]) if momentum else ([1.0],):
        with torch.no_grad():
            p.fill_(e[0])
        if momentum:
            opt.state[p]["momentum_buffer"] = torch.full((1,), e[1], dtype=DT)
        p.grad = h * p.detach().clone()
        opt.step()
        col = [float(p.detach())] + ([float(opt.state[p]["momentum_buffer"])] if momentum else [])
        cols.append(col)
    return torch.tensor(cols, dtype=DT).T


def _adamw_map(h: float, lr: float, wd: float, beta1: float) -> tuple[torch.Tensor, float]:
    """The linear map (θ, m) -> (θ', m') of one ``torch.optim.AdamW`` step on ``h θ²/2`` with a
    frozen second moment (probes of size 1e-7; ``exp_avg_sq`` 1/β₂ before the step, so 1 after
    it; step 10^7), and the ``P`` the step divides by."""
    p = nn.Parameter(torch.zeros(1, dtype=DT))
    opt = torch.optim.AdamW([p], lr=lr, betas=(beta1, 0.9), weight_decay=wd, eps=1e-8)
    t, d = 1e7, 1e-7
    cols = []
    for e in ([d, 0.0], [0.0, d]):
        with torch.no_grad():
            p.fill_(e[0])
        opt.state[p] = {
            "step": torch.tensor(t, dtype=DT),
            "exp_avg": torch.full((1,), e[1], dtype=DT),
            "exp_avg_sq": torch.full((1,), 1 / 0.9, dtype=DT),
        }
        p.grad = h * p.detach().clone()
        opt.step()
        cols.append([float(p.detach()) / d, float(opt.state[p]["exp_avg"]) / d])
    P = (1 - beta1**t) * ((1.0 / (1 - 0.9**t)) ** 0.5 + 1e-8)
    return torch.tensor(cols, dtype=DT).T, P


def _radius(M: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(M).abs().max())


SGD_KW = {
    "plain": dict(lr=0.1, weight_decay=0.3),
    "momentum": dict(lr=0.1, momentum=0.9, weight_decay=0.5),
    "dampening": dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.2),
    "nesterov": dict(lr=0.1, momentum=0.5, nesterov=True, weight_decay=1.0),
}


@pytest.mark.parametrize("case", list(SGD_KW))
def test_sgd_threshold_with_weight_decay_is_where_the_real_step_turns_unstable(case):
    kw = SGD_KW[case]
    p = nn.Parameter(torch.zeros(1, dtype=DT))
    thr = sharpness_threshold(torch.optim.SGD([p], **kw))
    assert _radius(_sgd_map(thr, **kw)) == pytest.approx(1.0, abs=1e-9)
    assert _radius(_sgd_map(thr * (1 - 1e-3), **kw)) < 1.0
    assert _radius(_sgd_map(thr * (1 + 1e-3), **kw)) > 1.0
    # (the threshold without the decay term, which the old code gave, is unstable)
    assert _radius(_sgd_map(thr + kw["weight_decay"] * 0.999, **kw)) > 1.0


def test_adamw_threshold_with_decoupled_decay_is_where_the_real_step_turns_unstable():
    lr, wd, beta1 = 0.01, 5.0, 0.9
    p = nn.Parameter(torch.zeros(1, dtype=DT))
    thr = preconditioned_threshold(
        torch.optim.AdamW([p], lr=lr, betas=(beta1, 0.999), weight_decay=wd)
    )
    assert thr == pytest.approx((1 + beta1) * (2 - lr * wd) / ((1 - beta1) * lr), rel=1e-12)
    _, P = _adamw_map(1.0, lr, wd, beta1)
    M, _ = _adamw_map(thr * P, lr, wd, beta1)  # h = μ P, μ = λ_max(P⁻¹H) at the threshold
    assert _radius(M) == pytest.approx(1.0, abs=1e-5)
    assert _radius(_adamw_map(thr * P * (1 - 1e-2), lr, wd, beta1)[0]) < 1.0
    assert _radius(_adamw_map(thr * P * (1 + 1e-2), lr, wd, beta1)[0]) > 1.0


def test_groups_with_different_learning_rates_or_momenta_have_no_sgd_threshold():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    a, b = model[0].parameters(), model[1].parameters()
    assert (
        sharpness_threshold(torch.optim.SGD([{"params": a}, {"params": b, "lr": 0.5}], lr=0.1))
        is None
    )
    a, b = model[0].parameters(), model[1].parameters()
    two_momenta = torch.optim.SGD(
        [{"params": a}, {"params": b, "momentum": 0.5}], lr=0.1, momentum=0.9
    )
    assert sharpness_threshold(two_momenta) is None
    # only the decays differ (no decay on some parameters): the largest, a sufficient condition
    a, b = model[0].parameters(), model[1].parameters()
    decays = torch.optim.SGD(
        [{"params": a, "weight_decay": 0.0}, {"params": b}], lr=0.1, weight_decay=0.4
    )
    assert sharpness_threshold(decays) == pytest.approx(2 / 0.1 - 0.4, rel=1e-12)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_maximize_has_no_threshold(kind):
    p = nn.Parameter(torch.zeros(2))
    if kind == "sgd":
        opt = torch.optim.SGD([p], lr=0.1, maximize=True)
        assert sharpness_threshold(opt) is None
    else:
        opt = torch.optim.Adam([p], lr=0.1, maximize=True)
        assert preconditioned_threshold(opt) is None
    assert critical_threshold(opt) is None


# ---------------------------------------------------------------------- Adam's L2 decay
def _mlp(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 3, generator=g, dtype=DT), torch.randint(0, 3, (24,), generator=g)


def _hessian(model, loss_fn, X, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = t[i : i + k].reshape(s)
            i += k
        return loss_fn(functional_call(model, out, (X,)), y)

    return torch.func.hessian(f)(theta)


def test_preconditioned_sharpness_of_adam_with_l2_decay_includes_the_decay():
    """Adam(weight_decay=wd) descends L + wd/2 |θ|², so P⁻¹(H + wd I); the second group has no
    decay (the usual no-decay group for biases)."""
    model, loss_fn = _mlp(2), nn.CrossEntropyLoss()
    X, y = _data()
    wd = 0.05
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.Adam(
        [{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=0.01, weight_decay=wd
    )
    diag = Diagnostics(
        model, loss_fn, ["preconditioned_sharpness"], every=3, optimizer=opt, on_error="raise"
    )
    for step in range(4):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        diag.step(step, X, y)
    beta1, beta2 = opt.param_groups[0]["betas"]
    P, W = [], []
    for n, p in model.named_parameters():
        st = opt.state[p]
        t = float(st["step"])
        P.append(((1 - beta1**t) * ((st["exp_avg_sq"] / (1 - beta2**t)).sqrt() + 1e-8)).reshape(-1))
        W.append(torch.full((p.numel(),), wd if n.endswith("weight") else 0.0, dtype=DT))
    s = torch.cat(P).rsqrt()
    H = _hessian(model, loss_fn, X, y) + torch.diag(torch.cat(W))
    exact = float(torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1])
    without = float(
        torch.linalg.eigvalsh(s[:, None] * (H - torch.diag(torch.cat(W))) * s[None, :])[-1]
    )
    got = diag.records[-1]["values"]["preconditioned_sharpness"]
    assert abs(got - exact) <= 1e-3 * exact, (got, exact)
    assert abs(without - exact) > 1e-2 * exact  # the decay matters here
    assert diag.records[-1]["values"]["preconditioned_sharpness_threshold"] == pytest.approx(
        (2 + 2 * beta1) / ((1 - beta1) * 0.01), rel=1e-12
    )


# ---------------------------------------------------------------------- wrappers
class _Lookahead(torch.optim.Optimizer):
    """A Lookahead-style wrapper: holds the inner optimizer as ``.optimizer``, moves the weights."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = {}
        self.defaults = {}

    def step(self, closure=None):
        self.optimizer.step()


def test_an_unknown_wrapper_is_refused_where_its_step_is_modelled_and_known_ones_unwrapped():
    model, loss_fn = _mlp(0), nn.CrossEntropyLoss()
    X, y = _data()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"_Lookahead wrapping SGD.*optimizer=<wrapper>.optimizer"):
        Diagnostics(model, loss_fn, ["critical_sharpness"], optimizer=_Lookahead(inner))
    assert sharpness_threshold(_Lookahead(inner)) is None  # no threshold for an unknown step
    # curvlab's own NoisyOptimizer passes the inner step through (Accelerate's wrapper: the HF
    # Trainer test in test_sharpness.py)
    noisy = cl.noise.NoisyOptimizer(inner, cl.noise.IsotropicNoise(1e-3), model)
    assert sharpness_threshold(noisy) == pytest.approx(20.0)
    assert critical_threshold(noisy) == pytest.approx(20.0)


# ---------------------------------------------------------------------- cold starts on request
def test_sharpness_vectors_zero_starts_every_measurement_cold():
    model, loss_fn = _mlp(3), nn.CrossEntropyLoss()
    X, y = _data(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    diag = Diagnostics(
        model, loss_fn, ["sharpness"], every=2, on_error="raise", options={"sharpness_vectors": 0}
    )
    seeds = SimpleNamespace(seed=0, state={})  # each measurement's seed, as Diagnostics draws it
    for step in range(5):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        if diag.step(step, X, y) is not None:
            op = cl.curvature_operator(model, loss_fn, (X, y))
            seed = measurement_seed(seeds, "sharpness")
            cold = warm_top_eigenvalue(op, None, 1e-3, seed=seed)
            values = diag.records[-1]["values"]
            assert values["sharpness_hvps"] == cold[2]
            assert values["sharpness"] == pytest.approx(cold[0], rel=1e-12)
    with pytest.raises(ValueError, match="sharpness_vectors"):
        Diagnostics(model, loss_fn, ["sharpness"], options={"sharpness_vectors": -1})
