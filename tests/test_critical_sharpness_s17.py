"""``critical_sharpness`` refuses what it cannot measure, before any forward pass where it can.

Found in review: on a batch whose every label is ``ignore_index`` under ``reduction="sum"`` it
returned ``inf`` ("the loss rises at once") for a loss that is identically 0, since the descent
test read a slope of exactly 0 as "not descent"; an optimizer holding none of the model's
parameters was refused only after a forward and backward pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab.analysis._measures import measure

DT = torch.float64


def _trained() -> tuple[nn.Module, torch.optim.Optimizer, Tensor, Tensor]:
    """A float64 MLP after 3 SGD steps with momentum: the momentum buffer (the update) is
    nonzero whatever the measured batch's gradient."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(8, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (8,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    opt.zero_grad()
    return model, opt, X, y


def _forwards(model: nn.Module) -> list[int]:
    """A list that grows by one per forward pass of ``model``."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _loss_along(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, u: dict, s: float):
    params = {n: p.detach() + s * u.get(n, 0.0) for n, p in model.named_parameters()}
    return float(loss_fn(functional_call(model, params, (X,)), y))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_batch_with_every_label_ignored_is_refused_before_any_forward(reduction: str) -> None:
    model, opt, X, _ = _trained()
    y_ignored = torch.full((8,), -100)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    if reduction == "sum":
        # brute force: the loss is identically 0 along the momentum update (it never rises), so
        # the former inf ("rises at once") was false
        u = {n: -0.1 * 0.9 * opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
        assert max(abs(_loss_along(model, loss_fn, X, y_ignored, u, s)) for s in (0, 1, 10)) == 0
    calls = _forwards(model)
    with pytest.raises(ValueError, match="every target of the data is ignore_index=-100"):
        measure(model, loss_fn, (X, y_ignored), ["critical_sharpness"], optimizer=opt)
    assert calls == []


def test_a_batch_with_an_ignored_label_is_measured() -> None:
    """The refusal counts the labels: 7 counted of 8 are measured as before, and the located step
    is where the loss starts to rise (brute force along the momentum update, to the tolerance)."""
    model, opt, X, y = _trained()
    y_part = y.clone()
    y_part[7] = -100
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    tol, lr = 1e-2, 0.1
    out = measure(
        model,
        loss_fn,
        (X, y_part),
        ["critical_sharpness"],
        optimizer=opt,
        options={"critical_tol": tol},
    )
    lam = out.values["critical_sharpness"]
    assert 0 < lam < float("inf")
    # SGD with momentum: buf' = 0.9 buf + g, Δθ = -lr buf' (the update the search moves along)
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.func.grad(lambda p: loss_fn(functional_call(model, p, (X,)), y_part))(params)
    u = {
        n: -lr * (0.9 * opt.state[p]["momentum_buffer"] + g[n]) for n, p in model.named_parameters()
    }
    s_c = 2.0 / (lam * lr)  # λ_c = 2/η_c, η_c = s_c lr
    l0 = _loss_along(model, loss_fn, X, y_part, u, 0.0)
    # the final bracket's relative width is tol and the root lies in it: 2 tol either side
    assert _loss_along(model, loss_fn, X, y_part, u, s_c * (1 - 2 * tol)) <= l0
    assert _loss_along(model, loss_fn, X, y_part, u, s_c * (1 + 2 * tol)) > l0


def test_a_zero_slope_along_the_update_is_refused() -> None:
    """Dead ReLUs and weight decay: the update ``-lr wd θ`` of the first layer is nonzero, the
    gradient there exactly 0. The loss does not rise at once (brute force: it is unchanged along
    the update), so ``inf`` was false; ``λ_c = dᵀHd / gᵀd`` is undefined for ``gᵀd = 0``."""
    g = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).to(DT)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # |W x| < 100 for these inputs: every unit is dead
    X = torch.randn(8, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (8,), generator=g)
    lr, wd = 0.1, 0.1
    opt = torch.optim.SGD(model[0].parameters(), lr=lr, weight_decay=wd)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = torch.func.grad(lambda p: loss_fn(functional_call(model, p, (X,)), y))(params)
    u = {n: -lr * wd * params[n] for n in ("0.weight", "0.bias")}
    assert all(bool(grads[n].eq(0).all()) for n in u)  # gᵀu is exactly 0
    assert all(float(v.norm()) > 0 for v in u.values())  # the update is not
    l0 = _loss_along(model, loss_fn, X, y, u, 0.0)
    # the pre-activations scale by (1 - lr wd s) > 0 for s < 100: the loss is unchanged
    assert all(_loss_along(model, loss_fn, X, y, u, s) == l0 for s in (1e-6, 1e-3, 1.0, 10.0))

    with pytest.raises(ValueError, match="slope along the optimizer's update is exactly 0"):
        measure(model, loss_fn, (X, y), ["critical_sharpness"], optimizer=opt)


def test_an_optimizer_of_another_copy_is_refused_before_any_forward() -> None:
    model, _, X, y = _trained()
    other = copy.deepcopy(model)
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    calls = _forwards(model)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        measure(model, nn.CrossEntropyLoss(), (X, y), ["critical_sharpness"], optimizer=opt)
    assert calls == []
