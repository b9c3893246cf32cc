"""A ``Diagnostics`` state saved before a submodule was ``torch.compile``d (review s25).

``Diagnostics.load_state_dict`` compares the state's parameter names with the model's (review
s24); a compiled submodule's parameters are named ``<sub>._orig_mod.<name>``, so a state saved on
the eager model was refused as "of another model" although the compiled wrapper changes no
parameter. Names are now compared without the ``_orig_mod`` segments; the resumed run's records
equal the uninterrupted run's, and the exact values are checked against dense float64 brute
force of the Hessian written here.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import curvlab as cl

DT = torch.float64


def _mlp() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, generator=g, dtype=DT), torch.randint(0, 2, (16,), generator=g)


def _step(model, opt, diag, step, X, y, loss_fn) -> None:
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    opt.step()
    diag.step(step, X, y)


def _top_hessian_eigenvalue(model: nn.Module, loss_fn: nn.Module, X, y) -> float:
    """λ_max of the dense Hessian of the mean loss over all parameters (float64)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(theta):
        parts = dict(
            zip(
                names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))
            )
        )
        return loss_fn(functional_call(model, parts, (X,)), y)

    return torch.linalg.eigvalsh(hessian(loss)(flat))[-1].item()


def test_state_of_eager_model_loads_into_compiled_submodule_model() -> None:
    X, y = _batch()
    loss_fn = nn.CrossEntropyLoss()
    quantities = ["sharpness", "trace_empirical_fisher"]
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = cl.Diagnostics(model, loss_fn, quantities=quantities, every=1, optimizer=opt)
    for step in range(3):
        _step(model, opt, diag, step, X, y, loss_fn)
    buf = io.BytesIO()
    torch.save(diag.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = _mlp()
    resumed.load_state_dict(model.state_dict())
    resumed[0] = torch.compile(resumed[0], backend="aot_eager")
    assert "0._orig_mod.weight" in dict(resumed.named_parameters())
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1)
    diag2 = cl.Diagnostics(resumed, loss_fn, quantities=quantities, every=1, optimizer=opt2)
    diag2.load_state_dict(state)  # refused as "of another model" before

    _step(model, opt, diag, 3, X, y, loss_fn)
    _step(resumed, opt2, diag2, 3, X, y, loss_fn)
    assert diag2.records[-1]["step"] == diag.records[-1]["step"] == 3
    assert diag2.records[-1]["values"] == pytest.approx(diag.records[-1]["values"], rel=1e-12)
    exact = _top_hessian_eigenvalue(model, loss_fn, X, y)
    assert diag2.records[-1]["values"]["sharpness"] == pytest.approx(exact, rel=2e-3)


def test_state_of_other_model_still_refused_through_orig_mod() -> None:
    loss_fn = nn.CrossEntropyLoss()
    X, y = _batch()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = cl.Diagnostics(
        model, loss_fn, quantities=["trace_empirical_fisher"], every=1, optimizer=opt
    )
    _step(model, opt, diag, 0, X, y, loss_fn)
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    other[0] = torch.compile(other[0], backend="aot_eager")
    diag2 = cl.Diagnostics(other, loss_fn, quantities=["trace_empirical_fisher"], every=1)
    with pytest.raises(ValueError, match=r"another model.*shapes differ: '0\.weight'"):
        diag2.load_state_dict(diag.state_dict())
