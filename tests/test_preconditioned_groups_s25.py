"""Review s25 (CS): the unit ``η`` of the sharpness measurements, one rule for all three.

``preconditioned_sharpness`` scales group ``g``'s preconditioner by ``η/η_g`` and its threshold
is ``(2 + 2β₁)/((1 − β₁) η)``; ``critical_sharpness`` is ``2/(s_c η)`` with threshold ``2/η``.
``η`` is a unit: the ratio of value and threshold does not depend on it, but each number alone
does. Before review s25 ``preconditioned_sharpness`` took ``η`` from the first param group at
``lr > 0`` even where that group held another module's parameters (a projection head, a learnable
loss parameter trained in the same optimizer): 107.73 for a true 35.91, with 38000 for 12666.7,
3 times too large with such a group first at a third of the model's learning rate. And a first
group whose parameters were all frozen (gradual unfreezing: a backbone at 1e-5 beside a head at
1e-3) set ``η`` for ``preconditioned_sharpness`` and ``critical_sharpness`` though the measured
operator (or the update) does not contain its parameters: 100 times off.

Now ``η`` is, for all three, the learning rate of the first group at ``lr > 0`` that holds a
parameter the measurement covers (``reference_lr(optimizer, model, names)``): the operator's
parameters for ``sharpness`` and ``preconditioned_sharpness``, the parameters the update moves for
``critical_sharpness``.

Brute force (dense float64, written here): ``eigvalsh(P^-1/2 H P^-1/2)`` with ``H`` from
``torch.func.hessian`` over the trainable parameters and ``P`` read from the real
``torch.optim.Adam``/``AdamW`` state by the documented formula
``P = (1 − β₁ᵗ)(√(v_t/(1 − β₂ᵗ)) + ε)`` (the model's parameters in one group, so no per-group
scaling); the critical step by a line search along the update of a real ``step()`` on a deep copy.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import curvlab as cl
from curvlab.analysis._optimizer_state import (
    adam_preconditioner,
    preconditioned_threshold,
    reference_lr,
)

LOSS = nn.CrossEntropyLoss()
TOL = 1e-8  # sharpness_tol and critical_tol asked for: both bound the relative error
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    return model, X, y


def _train(
    model: nn.Module, opt: Any, X: torch.Tensor, y: torch.Tensor, steps: int, other: Any = None
) -> None:
    """``steps`` steps of the loss (plus a term of ``other``'s parameters, trained alongside)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        loss = LOSS(model(X), y)
        if other is not None:
            loss = loss + other(torch.randn(5, 2, generator=gen, dtype=torch.float64)).pow(2).mean()
        loss.backward()
        opt.step()
    opt.zero_grad()
    LOSS(model(X), y).backward()  # the .grad the loop leaves before a measurement


def _diagnostics(model: nn.Module, opt: Any, quantities: list[str]) -> Any:
    return cl.Diagnostics(
        model,
        LOSS,
        quantities=quantities,
        optimizer=opt,
        every=1,
        on_error="raise",
        options={"sharpness_tol": TOL, "critical_tol": TOL, "sharpness_vectors": 0},
    )


def _hessian(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The trainable parameters' names and their dense float64 Hessian (the others held fixed)."""
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [fixed[n].numel() for n in names]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params = dict(fixed)
        for n, part in zip(names, theta.split(sizes)):
            params[n] = part.reshape(fixed[n].shape)
        return LOSS(functional_call(model, params, (X,)), y)

    return names, hessian(loss)(torch.cat([fixed[n].reshape(-1) for n in names]))


def _brute_preconditioned(model: nn.Module, opt: Any, X: torch.Tensor, y: torch.Tensor) -> float:
    """``λ_max(P^-1/2 H P^-1/2)``, ``P`` by the documented formula from ``opt.state`` (Adam's
    defaults ``β = (0.9, 0.999)``, ``ε = 1e-8``), over the trainable parameters."""
    names, H = _hessian(model, X, y)
    params = dict(model.named_parameters())
    parts = []
    for n in names:
        state = opt.state[params[n]]
        t = float(state["step"])
        v = state["exp_avg_sq"].double()
        parts.append(((1 - BETA1**t) * ((v / (1 - BETA2**t)).sqrt() + EPS)).reshape(-1))
    s = torch.cat(parts).rsqrt()
    return float(torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1])


def _real_update(model: nn.Module, opt: Any, X: torch.Tensor, y: torch.Tensor) -> dict:
    """``Δθ`` of ``opt.step()`` itself, on deep copies (the eval-mode gradient of the batch)."""
    m2, o2 = copy.deepcopy((model, opt))
    m2.eval()
    o2.zero_grad()
    LOSS(m2(X), y).backward()
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    o2.step()
    return {n: p.detach() - before[n] for n, p in m2.named_parameters()}


def _brute_lambda_c(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, upd: dict, lr: float
) -> float:
    """``2/(s_c η)`` with ``s_c`` the first ``s`` where ``L(θ + s Δθ) > L(θ)``: scanned up by 1%
    from 1e-3 of the step, then bisected to machine precision."""
    base = {n: p.detach() for n, p in model.named_parameters()}

    def loss(s: float) -> float:
        moved = {n: base[n] + s * upd[n] for n in base}
        return float(LOSS(functional_call(model, moved, (X,)), y))

    l0, lo, hi = loss(0.0), 0.0, 1e-3
    while loss(hi) <= l0:
        lo, hi = hi, hi * 1.01
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if loss(mid) > l0 else (mid, hi)
    return 2.0 / (hi * lr)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_preconditioned_sharpness_ignores_a_group_of_another_module(kind: str) -> None:
    model, X, y = _problem()
    other = nn.Linear(2, 2).double()  # trained alongside in the same optimizer, not in the model
    wd = 0.0 if kind == "adam" else 0.1
    make = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    opt = make(
        [
            {"params": other.parameters(), "lr": 1e-3},  # another module's group first
            {"params": model.parameters(), "lr": 3e-3},
        ],
        weight_decay=wd,
    )
    _train(model, opt, X, y, 4, other)
    quantities = ["preconditioned_sharpness", "critical_sharpness"]
    values = _diagnostics(model, opt, quantities).measure(4, X, y)["values"]
    eta = 3e-3  # the model's group's
    # 107.73 (3 times the true 35.91) before, with 38000 for 38/η = 12666.7
    want = _brute_preconditioned(model, opt, X, y)
    assert values["preconditioned_sharpness"] == pytest.approx(want, rel=1e-6)
    thr = (1 + BETA1) * (2 - eta * wd) / ((1 - BETA1) * eta)
    assert values["preconditioned_sharpness_threshold"] == pytest.approx(thr, rel=1e-12)
    crit = _brute_lambda_c(model, X, y, _real_update(model, opt, X, y), eta)
    assert values["critical_sharpness"] == pytest.approx(crit, rel=1e-6)
    assert values["critical_sharpness_threshold"] == pytest.approx(2 / eta, rel=1e-12)


def _unfreezing(kind: str, mid_run: bool) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor]:
    """Gradual unfreezing: a backbone (``model[0]``) in the first group at 1e-5, frozen with
    ``requires_grad_(False)``, a head at 1e-3; the backbone trained 3 steps first (its state
    kept) when ``mid_run``, frozen from the start (no state) otherwise."""
    model, X, y = _problem()
    make = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    opt = make(
        [
            {"params": model[0].parameters(), "lr": 1e-5},
            {"params": model[2].parameters(), "lr": 1e-3},
        ],
        **extra,
    )
    if mid_run:
        _train(model, opt, X, y, 3)
    model[0].requires_grad_(False)
    _train(model, opt, X, y, 3)  # zero_grad(): the backbone's .grad is None, step() skips it
    return model, opt, X, y


@pytest.mark.parametrize("mid_run", [False, True], ids=["frozen_from_start", "frozen_mid_run"])
def test_a_frozen_first_group_sets_no_unit_under_adam(mid_run: bool) -> None:
    model, opt, X, y = _unfreezing("adam", mid_run)
    quantities = ["preconditioned_sharpness", "critical_sharpness"]
    values = _diagnostics(model, opt, quantities).measure(6, X, y)["values"]
    eta = 1e-3  # the head's: the backbone's 1e-5 moves nothing measured
    # 100 times too small before (P scaled by 1e-5/1e-3), with 38/1e-5 for 38/1e-3
    want = _brute_preconditioned(model, opt, X, y)
    assert values["preconditioned_sharpness"] == pytest.approx(want, rel=1e-6)
    assert values["preconditioned_sharpness_threshold"] == pytest.approx(38 / eta, rel=1e-12)
    # 100 times too large before, with 2/1e-5 for 2/1e-3
    crit = _brute_lambda_c(model, X, y, _real_update(model, opt, X, y), eta)
    assert values["critical_sharpness"] == pytest.approx(crit, rel=1e-6)
    assert values["critical_sharpness_threshold"] == pytest.approx(2 / eta, rel=1e-12)


def test_a_frozen_first_group_sets_no_unit_under_sgd() -> None:
    model, opt, X, y = _unfreezing("sgd", mid_run=True)
    values = _diagnostics(model, opt, ["sharpness", "critical_sharpness"]).measure(6, X, y)
    values = values["values"]
    eta = 1e-3
    names, H = _hessian(model, X, y)
    assert names == ["2.weight", "2.bias"]
    assert values["sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    # momentum 0.9: (2 + 2β)/η; the same η as critical_sharpness's (it took 1e-5 before)
    assert values["sharpness_threshold"] == pytest.approx(3.8 / eta, rel=1e-12)
    crit = _brute_lambda_c(model, X, y, _real_update(model, opt, X, y), eta)
    assert values["critical_sharpness"] == pytest.approx(crit, rel=1e-6)
    assert values["critical_sharpness_threshold"] == pytest.approx(2 / eta, rel=1e-12)


def test_a_frozen_group_the_update_still_moves_sets_the_unit_of_critical_sharpness() -> None:
    """Frozen with ``zero_grad(set_to_none=False)``: the backbone keeps a zero ``.grad`` and
    ``step()`` moves it by its momentum, so it is in the update and its group, first, gives ``η``
    (the threshold ``2/η`` still says whether that step raises the loss)."""
    model, X, y = _problem()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 1e-2},
            {"params": model[2].parameters(), "lr": 3e-2},
        ],
        momentum=0.9,
    )
    _train(model, opt, X, y, 3)
    model[0].requires_grad_(False)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        LOSS(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=False)
    LOSS(model(X), y).backward()
    values = _diagnostics(model, opt, ["critical_sharpness"]).measure(5, X, y)["values"]
    m2, o2 = copy.deepcopy((model, opt))  # (deepcopy leaves .grad out: put the zero one back)
    for p in m2[0].parameters():
        p.grad = torch.zeros_like(p)
    m2.eval()
    o2.zero_grad(set_to_none=False)
    LOSS(m2(X), y).backward()
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    o2.step()
    upd = {n: p.detach() - before[n] for n, p in m2.named_parameters()}
    assert float(upd["0.weight"].abs().max()) > 0  # step() moves the frozen backbone
    crit = _brute_lambda_c(model, X, y, upd, 1e-2)
    assert values["critical_sharpness"] == pytest.approx(crit, rel=1e-6)
    assert values["critical_sharpness_threshold"] == pytest.approx(2 / 1e-2, rel=1e-12)


def test_reference_lr_one_rule() -> None:
    model, X, y = _problem()
    other = nn.Linear(2, 2).double()
    opt = torch.optim.Adam(
        [
            {"params": other.parameters(), "lr": 1e-1},  # another module's
            {"params": model[0].parameters(), "lr": 0.0},  # does not move
            {"params": [], "lr": 5e-2},  # holds nothing
            {"params": model[2].parameters(), "lr": 2e-2},
        ]
    )
    assert reference_lr(opt) == 1e-1  # no model: the first moving group
    assert reference_lr(opt, model) == 2e-2  # the first moving group holding a model parameter
    assert reference_lr(opt, model, ["2.weight"]) == 2e-2
    assert reference_lr(opt, model, ["0.weight"]) == 2e-2  # only in a group at lr = 0
    _train(model, opt, X, y, 2, other)
    diag = adam_preconditioner(opt, model)
    assert set(diag) == {"2.weight", "2.bias"}
    assert preconditioned_threshold(opt, model) == pytest.approx(38 / 2e-2, rel=1e-12)
