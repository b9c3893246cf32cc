"""Calls made inside the caller's global state (review s10): post-accumulate-grad and tensor hooks
on parameters, ``torch.inference_mode()``, ``parametrize.cached()``, and chains that are not plain
``nn.Sequential`` chains (a subclass's own forward, a forward pre-hook between layers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import curvlab as cl
from curvlab._notrace import leave_no_trace
from curvlab._scan import scan_model
from curvlab.backends._backpack_fields import _extending
from curvlab.backends._base import Handover


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, dtype=torch.float64, generator=g), torch.randint(
        0, 3, (8,), generator=g
    )


def _flat_fn(model: nn.Module, lf: nn.Module, X: torch.Tensor, y: torch.Tensor):
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def params(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.reshape(s) for n, c, s in zip(names, t.split(sizes), shapes)}

    def out(t: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params(t), (X,))

    return theta, out, (lambda t: lf(out(t), y)), params


def _bf_hessian_diag(model, lf, X, y) -> dict[str, torch.Tensor]:
    theta, _, loss, params = _flat_fn(model, lf, X, y)
    return params(torch.autograd.functional.hessian(loss, theta).diagonal())


def _bf_ggn_diag(model, lf, X, y) -> dict[str, torch.Tensor]:
    theta, out, _, params = _flat_fn(model, lf, X, y)
    o = out(theta).detach()
    J = torch.autograd.functional.jacobian(out, theta).reshape(o.numel(), -1)
    Hf = torch.autograd.functional.hessian(lambda z: lf(z.reshape(o.shape), y), o.reshape(-1))
    return params((J.T @ Hf @ J).diagonal())


def _close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------- 1. post-accumulate-grad hooks
def test_post_accumulate_grad_hooks_do_not_step_the_optimizer():
    model, (X, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    ggn, hess = _bf_ggn_diag(model, lf, X, y), _bf_hessian_diag(model, lf, X, y)
    opts = {p: torch.optim.SGD([p], lr=0.1, momentum=0.9) for p in model.parameters()}
    fired = []

    def step_in_backward(p: torch.Tensor) -> None:
        fired.append(p)
        opts[p].step()
        opts[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_in_backward)
    before = [p.detach().clone() for p in model.parameters()]
    results = {
        "exact": (cl.diag_fisher(model, lf, (X, y), kind="exact"), ggn),
        "hessian": (cl.diag_hessian(model, lf, (X, y)), hess),
        "hessian-backpack": (cl.diag_hessian(model, lf, (X, y), backend="backpack"), hess),
    }
    for _, (got, want) in results.items():
        _close(dict(got), want)
    assert results["exact"][0].backend == "backpack"
    assert not fired
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(not o.state for o in opts.values()) and all(
        p.grad is None for p in model.parameters()
    )
    lf(model(X), y).backward()  # the user's hooks still fire in the user's own backward
    assert len(fired) == 4


# ----------------------------------------------------------------- 2. inference_mode
def test_kfac_and_diag_fisher_inside_inference_mode():
    model, (X, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    ref = cl.kfac(model, lf, (X, y), kind="exact")  # (checked against brute force elsewhere)
    ggn = _bf_ggn_diag(model, lf, X, y)
    with torch.inference_mode():
        got = cl.kfac(model, lf, (X, y), kind="exact")
        diag = cl.diag_fisher(model, lf, (X, y), kind="exact")
    for k in ("0", "2"):
        torch.testing.assert_close(got[k].A, ref[k].A)
        torch.testing.assert_close(got[k].G, ref[k].G)
        assert got[k].G.abs().max() > 0
    _close(dict(diag), ggn)


def test_inference_tensors_raise_one_clear_error():
    lf = nn.CrossEntropyLoss()
    X, y = _data()
    with torch.inference_mode():
        model = _mlp()
        with pytest.raises(RuntimeError, match="inference_mode"):
            cl.diag_fisher(model, lf, (X, y), kind="exact")
        Xi = X.clone()
        outside = _mlp_outside()
        # inference-tensor inputs: every forward runs on a copy made outside inference mode
        # (review s22), so they are computed, exactly (they were one clear error before)
        got = cl.diag_fisher(outside, lf, (Xi, y), kind="exact")
    ref = cl.diag_fisher(outside, lf, (X, y), kind="exact")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def _mlp_outside() -> nn.Module:
    with torch.inference_mode(False):
        return _mlp()


# ----------------------------------------------------------------- 3. parametrize.cached()
class _Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 1.5 * w


def test_parametrize_cached_is_off_inside_calls():
    model, (X, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    parametrize.register_parametrization(model[0], "weight", _Scale())
    outside = cl.diag_fisher(model, lf, (X, y), kind="exact", backend="func")
    trace_out = cl.fisher_trace(model, lf, (X, y)).value
    emp_out = cl.diag_fisher(model, lf, (X, y), kind="empirical")
    with parametrize.cached():
        inside = cl.diag_fisher(model, lf, (X, y), kind="exact", backend="func")
        trace_in = cl.fisher_trace(model, lf, (X, y)).value
        emp_in = cl.diag_fisher(model, lf, (X, y), kind="empirical")
        assert parametrize._cache_enabled == 1
    assert parametrize._cache_enabled == 0
    _close(dict(inside), dict(outside))
    _close(dict(emp_in), dict(emp_out))
    assert trace_in == pytest.approx(trace_out, rel=1e-10)
    # the outside number against brute force on the equivalent plain model
    plain = _mlp()
    with torch.no_grad():
        plain[0].weight.mul_(1.5)
    bf = _bf_ggn_diag(plain, lf, X, y)
    torch.testing.assert_close(
        outside["0.parametrizations.weight.original"], 1.5**2 * bf["0.weight"]
    )


# ----------------------------------------------------------------- 4. tensor hooks on parameters
def test_parameter_tensor_hooks_are_off_inside_passes():
    model, (X, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    ref = cl.diag_hessian(model, lf, (X, y), backend="backpack")
    handles = [p.register_hook(lambda g: 2 * g) for p in model.parameters()]
    with leave_no_trace(model):
        lf(model(X), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
    theta, _, loss, params = _flat_fn(model, lf, X, y)
    bf = params(torch.autograd.grad(loss(theta.requires_grad_()), theta)[0])
    for g, b in zip(grads, bf.values()):
        torch.testing.assert_close(g, b)
    _close(dict(cl.diag_hessian(model, lf, (X, y), backend="backpack")), dict(ref))
    assert all(len(p._backward_hooks) == 1 for p in model.parameters())
    handles[0].remove()
    assert not model[0].weight._backward_hooks


def test_parameter_tensor_hooks_do_not_scale_the_hessian_trace():
    model, (X, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    exact = cl.trace(model, lf, (X, y), method="exact").value
    for p in model.parameters():
        p.register_hook(lambda g: 2 * g)
    assert cl.trace(model, lf, (X, y), method="exact").value == pytest.approx(exact, rel=1e-10)


# ----------------------------------------------------------------- 5. not a plain chain
class _Shift(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5 + 1.0


class _Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[1](self[0](x))
        return self[2](h + h.square())


def _prehooked() -> nn.Sequential:
    model = _mlp()
    model[2].register_forward_pre_hook(lambda m, args: (args[0] * 3,))
    return model


@pytest.mark.parametrize("make", [_Shift, _Residual, "prehook"])
def test_chains_with_an_op_between_layers_hand_over(make):
    if make == "prehook":
        model = _prehooked()
    else:
        base = _mlp()
        model = make(*base)
    (X, y), lf = _data(), nn.CrossEntropyLoss()
    assert not scan_model(model).sequential
    _close(dict(cl.diag_fisher(model, lf, (X, y), kind="exact")), _bf_ggn_diag(model, lf, X, y))
    _close(dict(cl.diag_hessian(model, lf, (X, y))), _bf_hessian_diag(model, lf, X, y))


def test_root_pre_hook_is_still_a_plain_chain():
    model = _mlp()
    model.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    assert scan_model(model).sequential
    (X, y), lf = _data(), nn.CrossEntropyLoss()
    got = cl.diag_fisher(model, lf, (X, y), kind="exact")
    assert got.backend == "backpack"
    _close(dict(got), _bf_ggn_diag(model, lf, X, y))


def test_backpack_lost_quantity_hands_over():
    with pytest.raises(Handover, match="lost the quantity"), _extending():
        raise AssertionError(
            "BackPACK extension expects a backpropagation quantity but it is None. Module: Tanh()"
        )
    with pytest.raises(AssertionError, match="other"), _extending():
        raise AssertionError("other")


def test_backpack_and_curvlab_hooks_keep_a_plain_chain():
    from backpack import extend

    model = extend(_mlp())
    assert scan_model(model).sequential
    model[1].register_forward_hook(lambda m, args, out: None)
    assert "forward hook" in scan_model(model).not_chain
