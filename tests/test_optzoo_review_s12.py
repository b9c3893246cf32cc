"""Optimizer-zoo review, sweep 12: what ``critical_sharpness`` and ``preconditioned_sharpness`` read
from a torch optimizer.

* ``critical_sharpness`` models the step ``opt.step()`` takes, which moves every parameter it holds
  whose ``.grad`` is not ``None``, also one frozen mid-run (``requires_grad_(False)``) whose zero
  ``.grad`` ``zero_grad(set_to_none=False)`` left: checked against ``dᵀHd/gᵀd`` along the step a
  deep copy of model and optimizer really takes (dense float64 Hessian by ``torch.func``).
* The Adam/AdamW threshold with several param groups is the smallest of the groups' own bounds
  ``(1 + β₁,g)(2 − η_g λ_g)/((1 − β₁,g) η)``: checked against the spectral radius of the real
  ``torch.optim.AdamW`` step (frozen second moment) on a quadratic.
* ``preconditioned_sharpness`` says that the optimizer holds none of the model's parameters (one
  built on a copy) instead of "no state yet".
* Under ``NoisyOptimizer`` ``critical_sharpness`` is that of the noise-free update (documented).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvlab as cl
from curvlab._notrace import leave_no_trace
from curvlab.analysis import Diagnostics
from curvlab.analysis._measures import measure
from curvlab.analysis._optimizer_state import (
    preconditioned_threshold,
    record_grads,
    stepped_without_gradient,
    would_be_update,
)

DT = torch.float64


def _problem(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 2).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randn(n, 2, generator=g, dtype=DT)
    return model, X, y


def _dense(model: nn.Module, loss_fn, X, y):
    """Gradient and Hessian of the batch loss in all of the model's parameters (frozen too)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def f(v):
        params = {n: t.reshape(s) for n, t, s in zip(names, v.split(sizes), shapes)}
        return loss_fn(functional_call(model, params, (X,)), y)

    v = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.func.grad(f)(v), torch.func.hessian(f)(v)


def _critical_sharpness(model: nn.Module, loss_fn, opt, X, y) -> float:  # type: ignore[no-untyped-def]
    """``critical_sharpness`` measured through ``Diagnostics`` (tolerance 1e-8, errors raised)."""
    diag = Diagnostics(
        model,
        loss_fn,
        every=1,
        quantities=["critical_sharpness"],
        optimizer=opt,
        options={"critical_tol": 1e-8},
        on_error="raise",
    )
    return diag.measure(0, X, y)["values"]["critical_sharpness"]


def _real_step(model: nn.Module, opt, loss_fn, X, y, set_to_none: bool) -> torch.Tensor:
    """The change of all parameters in the loop's next ``zero_grad(); backward(); step()`` on
    ``(X, y)``, taken on a deep copy of model and optimizer."""
    m2, o2 = copy.deepcopy((model, opt))
    for p2, p in zip(m2.parameters(), model.parameters()):
        p2.grad = None if p.grad is None else p.grad.clone()  # deepcopy drops .grad
        p2.requires_grad_(p.requires_grad)
    o2.zero_grad(set_to_none=set_to_none)
    loss_fn(m2(X), y).backward()
    before = torch.cat([p.detach().reshape(-1).clone() for p in m2.parameters()])
    o2.step()
    return torch.cat([p.detach().reshape(-1) for p in m2.parameters()]) - before


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.1
    ),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.5, amsgrad=True),
}


@pytest.mark.parametrize("set_to_none", [False, True])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_critical_sharpness_follows_the_step_of_a_parameter_frozen_mid_run(kind, set_to_none):
    torch.manual_seed(0)
    model, X, y = _problem()
    loss_fn = nn.MSELoss()
    opt = OPTIMIZERS[kind](model.parameters())
    for _ in range(3):
        opt.zero_grad(set_to_none=set_to_none)
        loss_fn(model(X), y).backward()
        opt.step()
    model.bias.requires_grad_(False)  # frozen mid-run; the loop goes on
    opt.zero_grad(set_to_none=set_to_none)
    loss_fn(model(X), y).backward()
    opt.step()
    lr = opt.param_groups[0]["lr"]
    u = _real_step(model, opt, loss_fn, X, y, set_to_none)
    moved = u[-2:].abs().max().item()
    assert (moved > 1e-4) == (not set_to_none)  # torch moves the frozen bias iff it has a .grad
    g, H = _dense(model, loss_fn, X, y)
    d = -u / lr
    want = float(d @ H @ d) / float(g @ d)  # λ_c along the real step (a quadratic loss)

    grads = [p.grad for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    got = _critical_sharpness(model, loss_fn, opt, X, y)
    assert got == pytest.approx(want, rel=1e-6)  # 5.37 for a true 5.50 before (SGD momentum)
    # nothing changed: .grad objects, parameters, requires_grad, optimizer state
    assert all(p.grad is q for p, q in zip(model.parameters(), grads))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert not model.bias.requires_grad and model.weight.requires_grad
    assert str(opt.state_dict()) == str(state)


def _frozen_mid_run(kind: str):
    model, X, y = _problem()
    loss_fn = nn.MSELoss()
    opt = OPTIMIZERS[kind](model.parameters())
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        loss_fn(model(X), y).backward()
        opt.step()
    model.bias.requires_grad_(False)
    opt.zero_grad(set_to_none=False)
    loss_fn(model(X), y).backward()
    opt.step()
    return model, opt, loss_fn, X, y


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_would_be_update_is_the_real_step_with_a_frozen_parameter(kind):
    model, opt, loss_fn, X, y = _frozen_mid_run(kind)
    u = _real_step(model, opt, loss_fn, X, y, set_to_none=False)
    g = torch.autograd.grad(loss_fn(model(X), y), [model.weight])[0]
    update = would_be_update(opt, model, {"weight": g})  # the loop's backward skips the bias
    got = torch.cat([update["weight"].reshape(-1), update["bias"]])
    torch.testing.assert_close(got, u, rtol=1e-12, atol=1e-15)
    # inside leave_no_trace (every .grad None) record_grads keeps what the loop left
    with record_grads(model), leave_no_trace(model):
        assert model.bias.grad is None
        inside = would_be_update(opt, model, {"weight": g})
        assert stepped_without_gradient(opt, model) == ["bias"]
    torch.testing.assert_close(inside["bias"], update["bias"], rtol=0, atol=0)
    with leave_no_trace(model):  # without the record nothing says step() would move it
        assert "bias" not in would_be_update(opt, model, {"weight": g})


def test_critical_sharpness_inside_record_grads_follows_the_frozen_parameter():
    """The measurement itself (as ``Diagnostics`` runs it: inside ``leave_no_trace``), with the
    loop's ``.grad`` recorded before the block."""
    model, opt, loss_fn, X, y = _frozen_mid_run("sgd_momentum")
    u = _real_step(model, opt, loss_fn, X, y, set_to_none=False)
    g, H = _dense(model, loss_fn, X, y)
    d = -u / 0.05
    with record_grads(model), leave_no_trace(model, mode=False):
        m = measure(
            model,
            loss_fn,
            (X, y),
            ["critical_sharpness"],
            optimizer=opt,
            options={"critical_tol": 1e-8},
        )
    got = m.values["critical_sharpness"]
    assert got == pytest.approx(float(d @ H @ d) / float(g @ d), rel=1e-6)  # 5.37 for 5.50


@pytest.mark.parametrize("way", ["uphill", "downhill_through_the_frozen_bias"])
def test_the_slope_has_the_loss_gradient_along_a_frozen_parameter(way):
    """A frozen parameter's move enters ``gᵀu`` with the loss's own gradient along it (not the zero
    the optimizer sees): momentum buffers set so that the weight's move goes uphill and the
    bias's either uphill too (``λ_c = inf``) or downhill by more (a finite ``λ_c``, which a slope
    without the bias would call ``inf``)."""
    model, X, y = _problem(1)
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt.zero_grad(set_to_none=False)
    loss_fn(model(X), y).backward()
    opt.step()
    model.bias.requires_grad_(False)
    opt.zero_grad(set_to_none=False)
    g, H = _dense(model, loss_fn, X, y)
    gw, gb = g[:-2], g[-2:]
    k = 1.0 + 10.0 * float(gw @ gw) / float(gb @ gb)
    with torch.no_grad():
        opt.state[model.weight]["momentum_buffer"].copy_(-3.0 * gw.reshape(2, 4))
        opt.state[model.bias]["momentum_buffer"].copy_((k if way != "uphill" else -k) * gb)
    u = _real_step(model, opt, loss_fn, X, y, set_to_none=False)
    assert float(gw @ u[:-2]) > 0  # the weight's part goes uphill
    got = _critical_sharpness(model, loss_fn, opt, X, y)
    if way == "uphill":
        assert float(g @ u) > 0 and got == math.inf
    else:
        assert float(g @ u) < 0
        d = -u / 0.05
        assert got == pytest.approx(float(d @ H @ d) / float(g @ d), rel=1e-6)


# ---------------------------------------------------------------------- AdamW with several groups
def _adamw_radius(h: float, lr: float, wd: float, beta1: float) -> tuple[float, float]:
    """Spectral radius of one real ``torch.optim.AdamW`` step on ``h θ²/2`` as a linear map of
    ``(θ, m)``, with a frozen second moment, and the ``P`` the step divides by (tiny probes at
    step 10^7, ``exp_avg_sq`` 1 after the step)."""
    p = nn.Parameter(torch.zeros(1, dtype=DT))
    opt = torch.optim.AdamW([p], lr=lr, betas=(beta1, 0.9), weight_decay=wd, eps=1e-8)
    t, e = 1e7, 1e-7
    cols = []
    for theta, m in ((e, 0.0), (0.0, e)):
        with torch.no_grad():
            p.fill_(theta)
        opt.state[p] = {
            "step": torch.tensor(t, dtype=DT),
            "exp_avg": torch.full((1,), m, dtype=DT),
            "exp_avg_sq": torch.full((1,), 1 / 0.9, dtype=DT),
        }
        p.grad = h * p.detach().clone()
        opt.step()
        cols.append([float(p.detach()) / e, float(opt.state[p]["exp_avg"]) / e])
    P = (1 - beta1**t) * ((1.0 / (1 - 0.9**t)) ** 0.5 + 1e-8)
    return float(torch.linalg.eigvals(torch.tensor(cols, dtype=DT).T).abs().max()), P


GROUPS = {
    # (lr, weight_decay, beta1) of two groups; the reviewer's cases and one with another β₁
    "ten_times_lr": [(0.05, 2.0, 0.9), (0.5, 2.0, 0.9)],
    "realistic": [(1e-3, 0.1, 0.9), (1e-2, 0.1, 0.9)],
    "second_beta": [(0.01, 0.1, 0.9), (0.01, 0.1, 0.5)],
    "decay_in_first_only": [(0.02, 5.0, 0.9), (0.2, 0.0, 0.9)],
}


@pytest.mark.parametrize("case", sorted(GROUPS))
def test_adamw_threshold_with_several_groups_is_where_the_real_step_turns_unstable(case):
    groups = GROUPS[case]
    params = [nn.Parameter(torch.zeros(1, dtype=DT)) for _ in groups]
    opt = torch.optim.AdamW(
        [
            {"params": [p], "lr": lr, "weight_decay": wd, "betas": (b, 0.999)}
            for p, (lr, wd, b) in zip(params, groups)
        ]
    )
    thr = preconditioned_threshold(opt)
    lr0 = groups[0][0]

    def radius(a: float) -> float:
        """The real step's radius when ``λ_max(P⁻¹H) = a`` in curvlab's operator, whose ``P`` is
        ``(η/η_g) P_g`` for group ``g``: curvature ``h = a (η/η_g) P_g`` in that group."""
        out = 0.0
        for lr, wd, b in groups:
            P = _adamw_radius(1.0, lr, wd, b)[1]
            out = max(out, _adamw_radius(a * (lr0 / lr) * P, lr, wd, b)[0])
        return out

    assert radius(thr * (1 - 1e-5)) < 1.0  # stable below: a sufficient condition
    assert radius(thr * (1 + 1e-5)) > 1.0  # and no larger one is (722 for a true 380 before)


def test_the_threshold_leaves_out_a_group_that_has_not_stepped_the_model():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).to(DT)
    X, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)
    opt = torch.optim.AdamW(model[0].parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    opt.add_param_group({"params": list(model[1].parameters()), "lr": 0.5, "weight_decay": 3.0})
    # the new group has no state, so no preconditioner: it is not in the operator
    want = (1 + 0.9) * (2 - 0.01 * 0.1) / ((1 - 0.9) * 0.01)
    assert preconditioned_threshold(opt, model) == pytest.approx(want, rel=1e-12)
    diag = Diagnostics(
        model,
        nn.MSELoss(),
        every=1,
        quantities=["preconditioned_sharpness"],
        optimizer=opt,
        on_error="raise",
    )
    values = diag.measure(0, X, y)["values"]
    assert values["preconditioned_sharpness_threshold"] == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------- messages
def test_preconditioned_sharpness_says_the_optimizer_holds_none_of_the_model_parameters():
    model, X, y = _problem()
    loss_fn = nn.MSELoss()
    other = copy.deepcopy(model)  # an optimizer built on a copy (an EMA model, a re-created one)
    opt = torch.optim.Adam(other.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(other(X), y).backward()
        opt.step()
    diag = Diagnostics(
        model,
        loss_fn,
        every=1,
        quantities=["preconditioned_sharpness"],
        optimizer=opt,
        on_error="raise",
    )
    with pytest.raises(ValueError, match="holds none of the model's parameters") as info:
        diag.measure(0, X, y)
    assert "yet" not in str(info.value)  # it had stepped: "no state yet" misled


def test_preconditioned_sharpness_messages_for_a_fresh_optimizer_and_groups_at_lr_zero():
    model, X, y = _problem()
    loss_fn = nn.MSELoss()

    def run(opt):
        diag = Diagnostics(
            model,
            loss_fn,
            every=1,
            quantities=["preconditioned_sharpness"],
            optimizer=opt,
            on_error="raise",
        )
        return diag.measure(0, X, y)

    with pytest.raises(ValueError, match=r"no state .* yet"):
        run(torch.optim.Adam(model.parameters(), lr=0.01))
    other = nn.Parameter(torch.zeros(3, dtype=DT))
    opt = torch.optim.Adam([{"params": list(model.parameters()), "lr": 0.0}, {"params": [other]}])
    other.grad = torch.ones(3, dtype=DT)
    opt.step()
    with pytest.raises(ValueError, match="only in param groups at lr = 0"):
        run(opt)


# ---------------------------------------------------------------------- NoisyOptimizer
def test_critical_sharpness_under_noisy_optimizer_is_that_of_the_noise_free_update():
    model, X, y = _problem()
    loss_fn = nn.MSELoss()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    noisy = cl.noise.NoisyOptimizer(sgd, cl.noise.IsotropicNoise(std=1.0), model, loss_fn, seed=0)
    got = _critical_sharpness(model, loss_fn, noisy, X, y)
    g, H = _dense(model, loss_fn, X, y)
    assert got == pytest.approx(float(g @ H @ g) / float(g @ g), rel=1e-6)
