"""Review s23: optimizer step hooks, and the optimizer refusals' reasons and group filters.

torch runs step hooks inside ``opt.step()`` (``opt.register_step_pre_hook`` / ``_post_hook`` and
the global ``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``_post_hook``); the
measurements rebuild the step from the param groups and state alone. A pre-hook scaling ``.grad``
by 0.1 under SGD momentum 0.9 at ``lr = 0.3`` gave ``critical_sharpness`` 0.736 where the step
``opt.step()`` takes gives 0.216, and ``sharpness_threshold`` 12.7 where the hooked dynamics'
is 126.7, silently. Now ``critical_sharpness`` refuses them, the thresholds are left out with a
``RuntimeWarning``, and ``options={"ignore_optimizer_hooks": True}`` measures as without them.

Brute force: dense float64 Hessians (``torch.func.hessian``) and the step ``opt.step()`` really
takes (on a deep copy), searched along for the first rise of the loss by bisection.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.optim import optimizer as torch_optimizer

import curvlab as cl
from curvlab.analysis._optimizer_state import check_optimizer
from curvlab.analysis._sharpness import check_optimizer_for

LOSS = nn.CrossEntropyLoss()
TOL = 1e-7  # critical_tol and sharpness_tol asked for: both bound the relative error


def _step_hooks(opt: Any) -> list[str]:
    from curvlab.analysis._optimizer_state import step_hooks  # new in s23

    return step_hooks(opt)


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    return model, X, y


def _train(model: nn.Module, opt: Any, X: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        LOSS(model(X), y).backward()
        opt.step()
    opt.zero_grad()
    LOSS(model(X), y).backward()  # the .grad the loop leaves before a measurement


def _rescale(optimizer: Any, args: Any, kwargs: Any) -> None:
    """A pre-hook that changes the step: ``.grad`` times 0.1."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(0.1)


def _diagnostics(model: nn.Module, opt: Any, quantities: list[str], **options: Any) -> Any:
    options.setdefault("critical_tol", TOL)
    options.setdefault("sharpness_tol", TOL)
    return cl.Diagnostics(
        model,
        LOSS,
        quantities=quantities,
        optimizer=opt,
        every=1,
        on_error="raise",
        options=options,
    )


def _real_update(model: nn.Module, opt: Any, X: torch.Tensor, y: torch.Tensor) -> dict:
    """``Δθ`` of ``opt.step()`` itself, on deep copies (the eval-mode gradient of the batch)."""
    m2, o2 = copy.deepcopy((model, opt))
    m2.eval()
    o2.zero_grad()
    LOSS(m2(X), y).backward()
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    o2.step()
    return {n: p.detach() - before[n] for n, p in m2.named_parameters()}


def _real_update_hooked(model: nn.Module, opt: Any, X: torch.Tensor, y: torch.Tensor) -> dict:
    """As :func:`_real_update` with the pre-hook put back on the copy (deepcopy drops hooks)."""
    m2, o2 = copy.deepcopy((model, opt))
    o2.register_step_pre_hook(_rescale)
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
        moved = {n: base[n] + s * upd.get(n, torch.zeros_like(base[n])) for n in base}
        return float(LOSS(functional_call(model, moved, (X,)), y))

    l0, lo, hi = loss(0.0), 0.0, 1e-3
    while loss(hi) <= l0:
        lo, hi = hi, hi * 1.01
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if loss(mid) > l0 else (mid, hi)
    return 2.0 / (hi * lr)


def _brute_top(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, scale: dict | None = None
) -> float:
    """``λ_max(S H S)`` of the dense Hessian, ``S = diag(scale)^½`` (``None``: ``λ_max(H)``)."""
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts, k = {}, 0
        for n, shape in zip(names, shapes):
            parts[n] = theta[k : k + shape.numel()].reshape(shape)
            k += shape.numel()
        return LOSS(functional_call(model, parts, (X,)), y)

    H = hessian(loss)(flat)
    if scale is not None:
        s = torch.cat([scale[n].reshape(-1) for n in names]).sqrt()
        H = s[:, None] * H * s[None, :]
    return float(torch.linalg.eigvalsh(H)[-1])


def test_critical_sharpness_refuses_a_pre_hook_registered_after_diagnostics() -> None:
    model, X, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    diag = _diagnostics(model, opt, ["critical_sharpness"])
    opt.register_step_pre_hook(_rescale)  # after construction: caught at measurement time
    _train(model, opt, X, y)
    with pytest.raises(ValueError, match="critical_sharpness") as info:
        diag.measure(3, X, y)
    msg = str(info.value)
    assert "pre-hook" in msg and "_rescale" in msg and "register_step_pre_hook" in msg
    assert "ignore_optimizer_hooks" in msg and "remove" in msg.lower()
    # what the old code reported instead: λ_c along the step without the hook, which is not the
    # step opt.step() takes (0.736 against 0.216 in review)
    hooked = _brute_lambda_c(model, X, y, _real_update_hooked(model, opt, X, y), 0.3)
    plain = _brute_lambda_c(model, X, y, _real_update(model, opt, X, y), 0.3)
    assert abs(hooked - plain) > 0.1 * plain


def test_critical_sharpness_refuses_global_and_post_hooks_naming_each() -> None:
    model, X, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)

    def project(optimizer: Any, args: Any, kwargs: Any) -> None:  # moves the weights
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-0.5, 0.5)

    handles = [
        torch_optimizer.register_optimizer_step_pre_hook(_rescale),
        opt.register_step_post_hook(project),
    ]
    try:
        _train(model, opt, X, y)
        with pytest.raises(ValueError) as info:  # when built, once it passes options on
            _diagnostics(model, opt, ["critical_sharpness"]).measure(3, X, y)
        msg = str(info.value)
        assert "pre-hook" in msg and "_rescale" in msg and "global" in msg
        assert "post-hook" in msg and "project" in msg and "register_step_post_hook" in msg
    finally:
        for h in handles:
            h.remove()
    assert _step_hooks(opt) == []


def test_construction_time_check_refuses_hooks_present_then() -> None:
    model, _, _ = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    handle = opt.register_step_pre_hook(_rescale)
    try:
        with pytest.raises(ValueError, match="_rescale"):
            check_optimizer_for(("critical_sharpness",), opt, {})
        check_optimizer_for(("critical_sharpness",), opt, {"ignore_optimizer_hooks": True})
        check_optimizer_for(("sharpness",), opt, {})  # thresholds: a warning at measurement
    finally:
        handle.remove()
    check_optimizer_for(("critical_sharpness",), opt, {})


def test_sharpness_threshold_left_out_with_a_warning_sharpness_kept() -> None:
    model, X, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    opt.register_step_pre_hook(_rescale)
    _train(model, opt, X, y)
    diag = _diagnostics(model, opt, ["sharpness"])
    with pytest.warns(RuntimeWarning, match="sharpness_threshold left out") as rec:
        record = diag.measure(3, X, y)
    assert any("_rescale" in str(w.message) for w in rec)
    values = record["values"]
    assert "sharpness_threshold" not in values  # 12.67 before, for a hooked dynamics' 126.67
    want = _brute_top(model, X, y)
    assert values["sharpness"] == pytest.approx(want, rel=2 * TOL)


def test_preconditioned_threshold_left_out_with_a_warning_value_kept() -> None:
    model, X, y = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.register_step_post_hook(lambda *_: None)
    _train(model, opt, X, y)
    diag = _diagnostics(model, opt, ["preconditioned_sharpness"])
    with pytest.warns(RuntimeWarning, match="preconditioned_sharpness_threshold left out"):
        record = diag.measure(3, X, y)
    values = record["values"]
    assert "preconditioned_sharpness_threshold" not in values
    beta1, beta2 = opt.param_groups[0]["betas"]
    eps = opt.param_groups[0]["eps"]
    inv_p = {}
    for n, p in model.named_parameters():
        state = opt.state[p]
        t = float(state["step"])
        v = state["exp_avg_sq"].double()
        inv_p[n] = 1.0 / ((1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + eps))
    want = _brute_top(model, X, y, inv_p)
    assert values["preconditioned_sharpness"] == pytest.approx(want, rel=2 * TOL)


def test_ignore_optimizer_hooks_measures_as_without_them() -> None:
    model, X, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))  # logging: does not change the step
    _train(model, opt, X, y)
    quantities = ["sharpness", "critical_sharpness"]
    with pytest.raises(ValueError, match="ignore_optimizer_hooks"):
        _diagnostics(model, opt, quantities, ignore_optimizer_hooks="yes")
    diag = _diagnostics(model, opt, quantities, ignore_optimizer_hooks=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = diag.measure(3, X, y)["values"]
    want = _brute_lambda_c(model, X, y, _real_update(model, opt, X, y), 0.3)
    assert values["critical_sharpness"] == pytest.approx(want, rel=10 * TOL)
    assert values["critical_sharpness_threshold"] == pytest.approx(2 / 0.3, rel=1e-12)
    assert values["sharpness_threshold"] == pytest.approx((2 + 2 * 0.9) / 0.3, rel=1e-12)
    assert len(calls) == 3  # the measurement never stepped it


def test_an_lr_scheduler_is_no_step_hook() -> None:
    model, X, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, X, y)
    sched.step()
    assert _step_hooks(opt) == []
    diag = _diagnostics(model, opt, ["critical_sharpness"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = diag.measure(3, X, y)["values"]
    want = _brute_lambda_c(model, X, y, _real_update(model, opt, X, y), 0.15)
    assert values["critical_sharpness"] == pytest.approx(want, rel=10 * TOL)


class _MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize(
    ("make", "adam_only", "says"),
    [
        (lambda ps: torch.optim.RMSprop(ps, lr=0.1), False, "only exactly torch.optim.SGD"),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.1), False, "only exactly torch.optim.SGD"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), True, "only exactly torch.optim.Adam, torch"),
        (lambda ps: _MySGD(ps, lr=0.1), False, "a subclass"),
    ],
)
def test_refusal_gives_the_reason_that_applies(
    make: Callable[[Any], Any], adam_only: bool, says: str
) -> None:
    opt = make(nn.Linear(2, 1).parameters())
    with pytest.raises(TypeError) as info:
        check_optimizer(opt, "critical_sharpness", adam_only=adam_only)
    msg = str(info.value)
    assert says in msg
    assert ("subclass" in msg) == (type(opt) is _MySGD)


def test_preconditioned_threshold_ignores_a_frozen_ascending_group() -> None:
    model, X, y = _problem()
    model[0].requires_grad_(False)  # frozen whole: not in the measured operator
    opt = torch.optim.Adam(
        [
            {"params": model[2].parameters()},
            {"params": model[0].parameters(), "maximize": True},
        ],
        lr=1e-2,
    )
    _train(model, opt, X, y)
    record = _diagnostics(model, opt, ["preconditioned_sharpness"]).measure(3, X, y)
    # the measured group's bound (2 + 2β₁)/((1 − β₁) η); None before (the frozen group ascends)
    want = (2 + 2 * 0.9) / ((1 - 0.9) * 1e-2)
    assert record["values"]["preconditioned_sharpness_threshold"] == pytest.approx(want, rel=1e-12)


def test_critical_sharpness_ignores_a_group_of_another_module() -> None:
    model, X, y = _problem()
    other = nn.Linear(2, 2).double()  # in the same optimizer, not in the model, not stepped
    opt = torch.optim.SGD(
        [
            {"params": other.parameters(), "lr": 0.1, "maximize": True},
            {"params": model.parameters(), "lr": 0.3},
        ]
    )
    _train(model, opt, X, y)
    values = _diagnostics(model, opt, ["critical_sharpness"]).measure(3, X, y)["values"]
    want = _brute_lambda_c(model, X, y, _real_update(model, opt, X, y), 0.3)
    # η was the other module's group's 0.1 (λ_c 3 times too large) and its maximize dropped 2/η
    assert values["critical_sharpness"] == pytest.approx(want, rel=10 * TOL)
    assert values["critical_sharpness_threshold"] == pytest.approx(2 / 0.3, rel=1e-12)


def test_diagnostics_refuses_hooks_present_when_it_is_built() -> None:
    model, _, _ = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    handle = opt.register_step_pre_hook(_rescale)
    try:
        with pytest.raises(ValueError, match="_rescale"):
            _diagnostics(model, opt, ["critical_sharpness"])
        _diagnostics(model, opt, ["critical_sharpness"], ignore_optimizer_hooks=True)
        _diagnostics(model, opt, ["sharpness"])  # the threshold: a warning when measured
    finally:
        handle.remove()
