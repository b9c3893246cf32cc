"""Review s24: a batch is data, also where it is a trainable parameter; its warning is shown once
per call site, however many ``warnings.catch_warnings()`` lie between the calls.

RG-1: a parameter of the model passed as the batch (``X = model[0].weight``, or as targets) is a
leaf without a graph; the Hessian operator (``trace(method="exact")``, ``eigenvalues``,
``curvature_operator``) differentiated through it while ``diag_hessian`` held it fixed: an exact
Hessian trace 1.6432 for 3.0568, a top eigenvalue 1.8521 for 1.7655, targets ``= model.weight``
4.9874 for 2.7048. The references are dense float64 Hessians of ``loss_fn(model(X), y)`` with
``X`` and ``y`` cloned and detached, built with ``torch.func`` in the test.

RG-2: the batch-as-data warning relied on Python's once-per-location registry, which each
``catch_warnings()`` entry empties (curvlab's BackPACK session enters one per call): three
``diag_hessian`` calls from one line gave three warnings, a ``DiagFisherNoise("exact")``
sampler one per training step.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import curvlab as cl
import curvlab._warn as cl_warn

EPS = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True)
def _fresh_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no warning recorded as shown (the record is per process)."""
    monkeypatch.setattr(cl_warn, "_SHOWN", set(), raising=False)


def _dense_hessian(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """The Hessian of ``loss_fn(model(X), y)`` in the parameters, ``X`` and ``y`` copied as data."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    X, y = X.detach().clone(), y.detach().clone()

    def f(t: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = t[i : i + s.numel()].view(s)
            i += s.numel()
        return loss_fn(functional_call(model, params, (X,)), y)

    return hessian(f)(theta)


def _seeded(model: nn.Module, g: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def _parameter_as_inputs():
    g = torch.Generator().manual_seed(0)
    model = _seeded(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double(), g)
    X = model[0].weight  # 3 examples of 3 features: a parameter leaf as the inputs
    y = torch.randn(3, 2, generator=g, dtype=torch.float64)
    return model, X, y


@pytest.mark.parametrize("case", ["inputs", "targets"])
def test_a_parameter_as_the_batch_is_held_fixed(case: str) -> None:
    if case == "inputs":
        model, X, y = _parameter_as_inputs()
    else:
        g = torch.Generator().manual_seed(1)
        model = _seeded(nn.Linear(2, 2).double(), g)
        X = torch.randn(2, 2, generator=g, dtype=torch.float64)
        y = model.weight  # the measured model's own parameter as the targets
    assert isinstance(X if case == "inputs" else y, nn.Parameter)
    loss_fn = nn.MSELoss()
    H = _dense_hessian(model, loss_fn, X, y)
    D = H.shape[0]
    evals = torch.linalg.eigvalsh(H)
    scale = float(evals.abs().max())
    # float64 products of ~20 parameters through two layers: each entry of H (and each product's
    # coordinate) is off by a few hundred eps * scale at most, the trace by D times that; the
    # defect gave traces 2.93 for 5.12 (inputs) and 9.92 for 5.84 (targets) here
    tol = 1e3 * EPS * scale
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trainable parameter", category=RuntimeWarning)
        tr = cl.trace(model, loss_fn, (X, y), matrix="hessian", method="exact").value
        top = cl.eigenvalues(model, loss_fn, (X, y), matrix="hessian", k=1, tol=1e-10)
        diag = cl.diag_hessian(model, loss_fn, (X, y))
        op = cl.curvature_operator(model, loss_fn, (X, y), matrix="hessian")
        v = torch.randn(D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        hv = op.matvec(v)
    assert abs(float(tr) - float(H.trace())) <= D * tol
    # a Ritz value lies within its residual ||H u - θ u|| of an eigenvalue of H
    assert abs(float(top.values[0]) - float(evals[-1])) <= float(top.residuals[0]) + tol
    got = torch.cat([diag[n].reshape(-1) for n, _ in model.named_parameters()])
    torch.testing.assert_close(got, H.diagonal(), atol=tol, rtol=0)
    torch.testing.assert_close(hv, H @ v, atol=D * tol * float(v.abs().max()), rtol=0)
    assert (X if case == "inputs" else y).requires_grad  # the caller's parameter untouched


def test_a_parameter_is_named_a_plain_leaf_is_quiet() -> None:
    model, X, y = _parameter_as_inputs()
    loss_fn = nn.MSELoss()
    with pytest.warns(
        RuntimeWarning,
        match=r"the inputs of a batch of the data are a trainable parameter \(an nn\.Parameter\)",
    ):
        want = cl.trace(model, loss_fn, (X, y), matrix="hessian", method="exact").value
    with pytest.warns(RuntimeWarning, match=r"the targets of a batch .* are a trainable param"):
        cl.diag_hessian(model, loss_fn, (X.detach(), nn.Parameter(y.clone())))
    leaf = X.detach().clone().requires_grad_(True)  # an input-gradient study's leaf: no parameter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cl.trace(model, loss_fn, (leaf, y), matrix="hessian", method="exact").value
    H = _dense_hessian(model, loss_fn, X, y)
    scale = float(torch.linalg.eigvalsh(H).abs().max())
    assert abs(float(got) - float(H.trace())) <= H.shape[0] * 1e3 * EPS * scale
    assert abs(float(want) - float(got)) <= H.shape[0] * 1e3 * EPS * scale
    assert leaf.requires_grad and leaf.grad is None


def _teacher_problem():
    g = torch.Generator().manual_seed(3)
    model = _seeded(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), g)
    teacher = _seeded(nn.Linear(3, 2).double(), g)
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return model, teacher, X, nn.MSELoss()


def _graph_warnings(caught: list) -> list:
    return [w for w in caught if "autograd graph" in str(w.message)]


def test_three_calls_from_one_line_warn_once() -> None:
    model, teacher, X, loss_fn = _teacher_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):  # the BackPACK session enters catch_warnings() at every call
            cl.diag_hessian(model, loss_fn, (X, teacher(X)))
    assert len(_graph_warnings(caught)) == 1
    assert _graph_warnings(caught)[0].filename == __file__  # it names the caller's line


def test_a_noise_sampler_warns_once_over_training_steps() -> None:
    model, teacher, X, loss_fn = _teacher_problem()
    sampler = cl.noise.DiagFisherNoise("exact", scale=0.1)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(4):
            sampler.sample(model, loss_fn, X, teacher(X), generator=g)
    assert len(_graph_warnings(caught)) == 1


def test_the_filters_still_decide() -> None:
    model, teacher, X, loss_fn = _teacher_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest.warns' filter: every call
        for _ in range(2):
            cl.diag_hessian(model, loss_fn, (X, teacher(X)))
    assert len(_graph_warnings(caught)) == 2
    with warnings.catch_warnings(record=True) as caught:
        # hidden and not recorded as shown, so that the same line warns where not ignored
        for action in ("ignore", "default", "default"):
            warnings.simplefilter(action)
            cl.diag_hessian(model, loss_fn, (X, teacher(X)))
    assert len(_graph_warnings(caught)) == 1
    with warnings.catch_warnings(), pytest.raises(RuntimeWarning, match="autograd graph"):
        warnings.simplefilter("error")
        cl.diag_hessian(model, loss_fn, (X, teacher(X)))


def test_caught_warnings_given_again_once_per_place() -> None:
    """BackPACK's graph converter runs at every session; the warnings it gives (caught and given
    again by curvlab) were shown at every call before."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            with warnings.catch_warnings():
                pass  # what a session does: Python's registry emptied
            cl_warn.warn_explicit_once(UserWarning("from a library"), UserWarning, "lib.py", 7)
    assert len(caught) == 1 and caught[0].filename == "lib.py" and caught[0].lineno == 7
