"""Review s20 (D): stability thresholds over the param groups the measured operator covers, and
``critical_sharpness`` under SGD momentum with a sparse embedding.

* ``preconditioned_sharpness_threshold`` counted every group holding a parameter Adam had stepped,
  also one frozen later (``requires_grad_(False)``): its state stays, but the operator covers the
  trainable parameters only. A frozen head at ``β₁ = 0.5`` gave 600 for a true 3800.
* ``sharpness_threshold`` (SGD) was dropped whenever the groups differed in ``lr`` or momentum,
  also when the differing group's parameters were all frozen (not in ``H``).
* ``critical_sharpness`` under SGD momentum with ``nn.Embedding(sparse=True)`` crashed with torch's
  "add(sparse, dense) is not supported" (``step()`` keeps a sparse momentum buffer there).

Everything is checked against hand formulas and dense float64 brute force written here: the
Hessian by ``torch.func.hessian`` and the critical step by a line search along the update of a
real ``step()`` on a deep copy.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from curvlab.analysis import Diagnostics

DT = torch.float64


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(12, 3, dtype=DT)
    y = torch.randint(0, 3, (12,))
    return model, X, y


def _train(model, opt, X, y, steps: int, set_to_none: bool = True) -> None:
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()


def _top_eigenvalue_of_body(model, X, y, P: dict[str, torch.Tensor] | None = None) -> float:
    """``λ_max`` of ``P^-1/2 H P^-1/2`` over ``model[0]``'s parameters, dense float64."""
    names = ["0.weight", "0.bias"]
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [fixed[n].shape for n in names]
    sizes = [fixed[n].numel() for n in names]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params = dict(fixed)
        for n, part, shape in zip(names, theta.split(sizes), shapes):
            params[n] = part.reshape(shape)
        return nn.functional.cross_entropy(functional_call(model, params, (X,)), y)

    theta = torch.cat([fixed[n].reshape(-1) for n in names])
    H = hessian(loss)(theta)
    if P is not None:
        s = torch.cat([P[n].reshape(-1) for n in names]).rsqrt()
        H = s[:, None] * H * s[None, :]
    return float(torch.linalg.eigvalsh(H)[-1])


def _adam_P(opt, param, lr0: float) -> torch.Tensor:
    """Adam's ``P`` of ``param`` from its state (``(η₁/η_g) P`` for a group at another ``lr``)."""
    group = next(g for g in opt.param_groups if any(q is param for q in g["params"]))
    beta1, beta2 = group["betas"]
    state = opt.state[param]
    t = float(state["step"])
    v = state["exp_avg_sq"]
    return (1 - beta1**t) * (lr0 / group["lr"]) * ((v / (1 - beta2**t)).sqrt() + group["eps"])


# ------------------------------------------------------ Adam: groups the operator covers
@pytest.mark.parametrize("set_to_none", [True, False])
def test_preconditioned_threshold_leaves_out_a_group_frozen_mid_run(set_to_none: bool) -> None:
    model, X, y = _mlp()
    opt = torch.optim.Adam(
        [
            {"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "betas": (0.5, 0.999)},
        ],
        lr=0.01,
    )
    diag = Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        ["preconditioned_sharpness"],
        every=1,
        optimizer=opt,
        on_error="raise",
        options={"sharpness_tol": 1e-10},
    )
    _train(model, opt, X, y, 3)
    for p in model[2].parameters():  # the head frozen: its Adam state stays
        p.requires_grad_(False)
    _train(model, opt, X, y, 1, set_to_none)  # False: a zero .grad, step() still moves it
    values = diag.measure(4, X, y)["values"]
    # the operator covers the body only (group 1, β₁ = 0.9): 2(1 + 0.9)/((1 − 0.9) 0.01)
    assert values["preconditioned_sharpness_threshold"] == pytest.approx(3800.0, rel=1e-12)  # 600
    P = {n: _adam_P(opt, p, 0.01) for n, p in model.named_parameters() if n.startswith("0.")}
    want = _top_eigenvalue_of_body(model, X, y, P)
    assert values["preconditioned_sharpness"] == pytest.approx(want, rel=1e-8)


def test_preconditioned_threshold_leaves_out_a_frozen_group_s_decoupled_decay() -> None:
    model, X, y = _mlp()
    opt = torch.optim.AdamW(
        [
            {"params": list(model[0].parameters()), "weight_decay": 0.1},
            {"params": list(model[2].parameters()), "lr": 0.05, "weight_decay": 30.0},
        ],
        lr=0.01,
    )
    diag = Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        ["preconditioned_sharpness"],
        every=1,
        optimizer=opt,
        on_error="raise",
    )
    _train(model, opt, X, y, 2)
    for p in model[2].parameters():
        p.requires_grad_(False)
    _train(model, opt, X, y, 1)
    got = diag.measure(3, X, y)["values"]["preconditioned_sharpness_threshold"]
    # body only: (1 + β₁)(2 − η λ)/((1 − β₁) η) with η = 0.01, λ = 0.1; the head's own bound,
    # (1.9)(2 − 0.05·30)/(0.1·0.01) = 950, was taken before
    assert got == pytest.approx(1.9 * (2 - 0.01 * 0.1) / (0.1 * 0.01), rel=1e-12)


def test_preconditioned_threshold_still_takes_every_covered_group() -> None:
    model, X, y = _mlp()
    opt = torch.optim.Adam(
        [
            {"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "betas": (0.5, 0.999)},
        ],
        lr=0.01,
    )
    diag = Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        ["preconditioned_sharpness"],
        every=1,
        optimizer=opt,
        on_error="raise",
    )
    _train(model, opt, X, y, 2)
    got = diag.measure(2, X, y)["values"]["preconditioned_sharpness_threshold"]
    assert got == pytest.approx(1.5 * 2 / (0.5 * 0.01), rel=1e-12)  # the head's, the smaller


# ------------------------------------------------------ SGD: groups the Hessian covers
@pytest.mark.parametrize("set_to_none", [True, False])
def test_sgd_threshold_over_the_groups_the_hessian_covers(set_to_none: bool) -> None:
    model, X, y = _mlp()
    opt = torch.optim.SGD(
        [
            {"params": list(model[0].parameters()), "weight_decay": 0.01},
            {"params": list(model[2].parameters()), "lr": 0.5, "momentum": 0.0, "weight_decay": 1},
        ],
        lr=0.1,
        momentum=0.9,
    )
    diag = Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        ["sharpness"],
        every=1,
        optimizer=opt,
        on_error="raise",
        options={"sharpness_tol": 1e-10},
    )
    _train(model, opt, X, y, 2)
    assert "sharpness_threshold" not in diag.measure(2, X, y)["values"]  # groups differ in H
    for p in model[2].parameters():
        p.requires_grad_(False)
    _train(model, opt, X, y, 1, set_to_none)
    values = diag.measure(3, X, y)["values"]
    # H covers the body only: (2 + 2β)/η − wd of its group (none before: the groups differ)
    assert values["sharpness_threshold"] == pytest.approx(3.8 / 0.1 - 0.01, rel=1e-12)
    assert values["sharpness"] == pytest.approx(_top_eigenvalue_of_body(model, X, y), rel=1e-8)


# ------------------------------------------------------ critical sharpness, sparse momentum
class _Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(6, 3, sparse=True)
        self.l = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(torch.tanh(self.e(x)))


def _real_update(model, opt, X, y) -> dict[str, torch.Tensor]:
    """``Δθ`` of a real ``opt.step()`` on deep copies, with the gradient of ``(X, y)``."""
    twin, twin_opt = copy.deepcopy((model, opt))  # the optimizer on the copy's parameters
    twin_opt.zero_grad()
    nn.functional.cross_entropy(twin(X), y).backward()  # a sparse gradient for the embedding
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    twin_opt.step()
    return {n: p.detach() - before[n] for n, p in twin.named_parameters()}


def _brute_critical_step(model, X, y, update: dict[str, torch.Tensor]) -> float:
    """The smallest ``s > 0`` with ``L(θ + s u) > L(θ)``: a scan by 1.005, then bisection."""
    fixed = {n: p.detach() for n, p in model.named_parameters()}

    def loss(s: float) -> float:
        params = {n: t + s * update[n] for n, t in fixed.items()}
        with torch.no_grad():
            return float(nn.functional.cross_entropy(functional_call(model, params, (X,)), y))

    l0, s = loss(0.0), 1e-3
    while loss(s) <= l0:
        s *= 1.005
        assert s < 1e4, "the loss does not rise along the update"
    lo, hi = s / 1.005, s
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if loss(mid) <= l0 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize(
    "kw",
    [dict(momentum=0.9), dict(momentum=0.9, dampening=0.5), dict(momentum=0.9, nesterov=True)],
    ids=["momentum", "dampening", "nesterov"],
)
def test_critical_sharpness_with_a_sparse_momentum_buffer(kw: dict) -> None:
    torch.manual_seed(0)
    model = _Embedded().to(DT)
    X, y = torch.randint(0, 6, (10,)), torch.randint(0, 3, (10,))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, **kw)
    _train(model, opt, X, y, 2)
    buffer = opt.state[model.e.weight]["momentum_buffer"]
    assert buffer.is_sparse  # torch's own step keeps it sparse
    kept = buffer.to_dense().clone()
    diag = Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        ["critical_sharpness"],
        every=1,
        optimizer=opt,
        on_error="raise",
        options={"critical_tol": 1e-9},
    )
    got = diag.measure(2, X, y)["values"]["critical_sharpness"]  # raised add(sparse, dense)
    want = 2.0 / (_brute_critical_step(model, X, y, _real_update(model, opt, X, y)) * 0.3)
    assert math.isfinite(want)
    # the search's root lies in a bracket 1e-9 wide (relative), the brute force's in one 2^-60 of
    # a 0.5% scan step wide; both move by ~1e-15 with the loss's float64 rounding
    assert got == pytest.approx(want, rel=1e-8)
    state = opt.state[model.e.weight]["momentum_buffer"]
    assert state.is_sparse and torch.equal(state.to_dense(), kept)  # only read
