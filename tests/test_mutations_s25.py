"""Review s25 (MU): tests for four mutations that the suite let survive.

1. ``preconditioned_sharpness`` under Adam with two *trainable* groups at different learning
   rates: dropping the ``η₁/η_g`` scaling of ``P`` gave 216.2 for a true 835.7 and no test
   failed (every test had the measured groups at one ``lr``, or froze the other group).
2. ``gradient_stats``' underflow check with several loss terms per example (``c > 1``): the lost
   squares rescaled by ``1/(N c)`` instead of ``1/(N c²)`` refused a model that lost under 1%
   (and the opposite mistake would keep one that lost more), unseen with ``c = 1`` only.
3. ``trace(method="ggn_cv", rtol=r)``: the stopping rule without the exact GGN trace as offset,
   ``stderr <= r |mean residual|``, stopped after 10 probes with ``stderr/|value| = 0.98`` at
   ``r = 0.25`` where the documented rule ``stderr <= r |value|`` needs 62.
4. The DGKS second Gram-Schmidt pass of the Krylov basis switched off: on a spectrum spreading
   far below ``eps ||A||`` one pass left the basis far from orthogonal (``||VᵀV − I|| = 0.998``
   where two passes give ``4.4e-16``), and no test looked.

References are dense float64 brute force written here (``torch.func``), or the documented
invariant itself.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import curvlab as cl
import curvlab.estimators._trace as trace_module
from curvlab._losses import loss_spec
from curvlab.analysis import Diagnostics
from curvlab.analysis._first_order import SQUARES_UNDERFLOWED, _first_order
from curvlab.analysis._registry import Measurement
from curvlab.estimators import TensorOperator
from curvlab.estimators._krylov import KrylovBasis

DT = torch.float64
EPS32 = torch.finfo(torch.float32).eps


def _flat_loss(model: nn.Module, loss_of_output: Callable) -> tuple[Tensor, Callable]:
    """The parameters as one flat float64 vector and ``theta -> loss_of_output(model(theta))``."""
    names = [n for n, _ in model.named_parameters()]
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [fixed[n].numel() for n in names]
    shapes = [fixed[n].shape for n in names]

    def as_params(theta: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}

    theta = torch.cat([fixed[n].reshape(-1) for n in names])
    return theta, lambda th, X: loss_of_output(functional_call(model, as_params(th), (X,)))


# ------------------------------------------- 1. Adam groups at different lr, both trainable
def _adam_P(opt: torch.optim.Optimizer, lr0: float | None) -> Tensor:
    """Adam's ``P`` of every parameter in the optimizer's order, flat: ``(η₁/η_g)(1 − β₁ᵗ)
    (sqrt(v / (1 − β₂ᵗ)) + ε)``, so that every group's step reads ``−η₁ P⁻¹ m``
    (``lr0=None``: without the factor ``η₁/η_g``)."""
    parts = []
    for group in opt.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = opt.state[p]
            t = float(state["step"])
            root = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + group["eps"]
            scale = 1.0 if lr0 is None else lr0 / group["lr"]
            parts.append((scale * (1 - beta1**t) * root).reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("lrs", [(0.01, 0.05), (0.05, 0.01)])
def test_preconditioned_sharpness_with_trainable_groups_at_different_lr(
    lrs: tuple[float, float],
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(12, 3, dtype=DT)
    y = torch.randint(0, 3, (12,))
    body, head = lrs
    opt = torch.optim.Adam(
        [
            {"params": list(model[0].parameters()), "lr": body},
            {"params": list(model[2].parameters()), "lr": head},
        ]
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
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    values = diag.measure(3, X, y)["values"]

    # brute force: λ_max(P^-1/2 H P^-1/2) with the dense float64 Hessian over both groups
    theta, loss = _flat_loss(model, lambda out: nn.functional.cross_entropy(out, y))
    H = hessian(lambda th: loss(th, X))(theta)
    s = _adam_P(opt, lr0=body).rsqrt()
    want = float(torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1])
    # without the η₁/η_g factor each group is measured in its own lr's units: 216.2 for a true
    # 835.7 (body at 0.01, head at 0.05), 205.8 for 189.1 the other way; the test tells them apart
    s_plain = _adam_P(opt, lr0=None).rsqrt()
    wrong = float(torch.linalg.eigvalsh(s_plain[:, None] * H * s_plain[None, :])[-1])
    assert abs(wrong - want) > 0.05 * want
    assert values["preconditioned_sharpness"] == pytest.approx(want, rel=1e-8)
    # both groups at β₁ = 0.9 in η₁'s units: 2(1 + β₁)/((1 − β₁) η₁)
    assert values["preconditioned_sharpness_threshold"] == pytest.approx(38 / body, rel=1e-12)


# ------------------------------------------- 2. the underflow share with c = C outputs
def _graded_regression(share: float, outputs: int = 4, n: int = 16):  # noqa: ANN202
    """``Linear(2, C, bias=False)`` at zero weights against constant targets ``1e-9``, inputs
    ``(a_n, b_n)``: column ``a`` (mean 1e-10, spread 1e-10) gives per-example gradients ~2e-19
    whose float32 squares are normal, column ``b`` (mean 0, spread ``β 1e-10``) squares below
    float32's normal range (their sums ~5e-39 < 1.2e-38: flagged). The part of ``tr(Σ)`` in
    ``b``'s squares is ``β² / (1 + β²)``, set to ``share``; every output is one more loss term
    per example (``c = C``)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g, dtype=DT)
    z = (z - z.mean(0)) / z.std(0, unbiased=False)
    z[:, 0] += 1.0  # a mean gradient: the noise scale is ~1, not a ratio of roundings
    beta = math.sqrt(share / (1 - share))
    X = (z * torch.tensor([1e-10, beta * 1e-10], dtype=DT)).float()
    y = torch.full((n, outputs), 1e-9)
    model = nn.Linear(2, outputs, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    return model, X, y


def _truth(model: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float, float]:
    """Dense float64 ``tr(Σ)``, ``||mean||²`` and ``sum E[g²]`` of the squares that underflow
    (column ``b``), of the mean-convention per-example gradients ``grad l_n`` (``l_n`` example
    ``n``'s mean squared error over its ``C`` outputs)."""
    m64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m64.named_parameters()}

    def one(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return nn.functional.mse_loss(functional_call(m64, p, (x[None],)), t[None])

    G = vmap(grad(one), in_dims=(None, 0, 0))(params, X.double(), y.double())["weight"]
    tr = float((G - G.mean(0)).pow(2).mean(0).sum())
    m2 = float(G.mean(0).pow(2).sum())
    lost = float(G[:, :, 1].pow(2).mean(0).sum())
    return tr, m2, lost


def _diagnostics_route(model: nn.Module, loss: nn.Module, X: Tensor, y: Tensor) -> Measurement:
    out = Measurement()
    gen = torch.Generator().manual_seed(0)
    _first_order(model, loss_spec(loss), (X, y), ("noise_scale",), gen, 1024, out)
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_squares_lost_below_one_percent_with_several_outputs_are_not_refused(
    reduction: str,
) -> None:
    model, X, y = _graded_regression(share=0.008)
    loss = nn.MSELoss(reduction=reduction)
    tr, m2, lost = _truth(model, X, y)
    assert 0.0079 < lost / tr < 0.0081  # under 1%, but over it times c = 4
    # b's squares subnormal (each rounded by at most 2^-150 against ~3e-40: 5e-6 of its 0.8%),
    # the rest float32 sums of 16 terms: 64 eps, times 1 + ||mean||^2 / tr (~2)
    tol = 64 * EPS32 * (1 + m2 / tr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no underflow warning: 4 x 0.8% was taken for 3.2%
        st = cl.gradient_stats(model, loss, (X, y))
    assert st.noise_scale == pytest.approx(tr / m2, rel=tol)
    assert st.trace_covariance == pytest.approx(tr, rel=tol)
    assert "underflowed_parameters" not in st.info
    out = _diagnostics_route(model, loss, X, y)  # the in-loop route shares the check
    assert "noise_scale" not in out.errors
    assert out.values["noise_scale"] == pytest.approx(tr / m2, rel=tol)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_squares_lost_above_one_percent_with_several_outputs_are_refused(
    reduction: str,
) -> None:
    model, X, y = _graded_regression(share=0.0125)
    loss = nn.MSELoss(reduction=reduction)
    tr, _, lost = _truth(model, X, y)
    assert 0.0124 < lost / tr < 0.0126  # over 1%, under it divided by c = 4
    with pytest.warns(RuntimeWarning, match="below float32's normal range") as rec:
        st = cl.gradient_stats(model, loss, (X, y))
    assert any("trace_covariance and noise_scale are NaN" in str(w.message) for w in rec)
    assert math.isnan(st.noise_scale) and math.isnan(st.trace_covariance)
    assert st.info["underflowed_parameters"] == ["weight"]
    out = _diagnostics_route(model, loss, X, y)
    assert out.errors["noise_scale"] == SQUARES_UNDERFLOWED
    assert "noise_scale" not in out.values


# ------------------------------------------- 3. ggn_cv's rtol rule includes the GGN trace
def _ggn_and_residual(model: nn.Module, loss: nn.Module, X: Tensor, y: Tensor):  # noqa: ANN202
    """Dense float64 ``G = Jᵀ H_out J`` and ``R = H − G`` over the flat parameters."""
    theta, flat = _flat_loss(model, lambda out: out)
    out = model(X).detach()
    H = hessian(lambda th: loss(flat(th, X), y))(theta)
    J = jacrev(lambda th: flat(th, X).reshape(-1))(theta)
    H_out = hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1))
    G = J.T @ H_out @ J
    return G, H - G


def _first_stop(samples: Tensor, offset: float, rtol: float, least: int = 10) -> int | None:
    """The first ``j >= least`` with ``stderr_j <= rtol |offset + mean_j|`` (plain formulas)."""
    for j in range(least, samples.numel() + 1):
        x = samples[:j]
        if float(x.std(unbiased=True)) / math.sqrt(j) <= rtol * abs(offset + float(x.mean())):
            return j
    return None


def test_ggn_cv_rtol_stops_at_the_first_count_where_stderr_meets_rtol_of_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a regression whose residual trace (-5.03) is larger than, and opposite to, the Hessian's
    # (1.77): a rule on the residual alone stopped after 10 probes at stderr/|value| = 0.98
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    X = torch.randn(16, 3, dtype=DT)
    y = 12 * torch.randn(16, 2, dtype=DT)
    loss = nn.MSELoss()
    G, R = _ggn_and_residual(model, loss, X, y)
    tr_g = float(G.trace())
    assert abs(float(R.trace())) > 2 * abs(tr_g + float(R.trace()))

    # the probes, recorded from a run of 200 without rtol (the same seed draws the same ones)
    drawn: list[Tensor] = []
    real = trace_module.probe_rows

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        rows = real(*args, **kwargs)
        drawn.append(rows.detach().clone())
        return rows

    monkeypatch.setattr(trace_module, "probe_rows", spy)
    cl.trace(model, loss, (X, y), method="ggn_cv", num_probes=200, seed=0)
    monkeypatch.undo()
    dim = G.shape[0]
    Z = torch.cat([z for z in drawn if z.numel() == dim]).to(DT)
    assert Z.shape == (200, dim)
    # block Hutchinson's samples sum_b z_b^T R_bb z_b over the layers' blocks
    block = torch.zeros_like(R)
    for a, b in [(0, 20), (20, dim)]:  # model[0]: 3*5 + 5, model[2]: 5*2 + 2
        block[a:b, a:b] = R[a:b, a:b]
    samples = ((Z @ block) * Z).sum(1)

    rtol = 0.25
    want = _first_stop(samples, tr_g, rtol)
    assert want is not None and 10 < want < 200
    offset_free = _first_stop(samples, 0.0, rtol)
    assert offset_free != want  # the rule without the offset stops elsewhere: the test can tell

    res = cl.trace(model, loss, (X, y), method="ggn_cv", num_probes=200, rtol=rtol, seed=0)
    assert res.num_probes == want
    assert res.extra["ggn_trace"] == pytest.approx(tr_g, rel=1e-10)
    x = samples[:want]
    stderr = float(x.std(unbiased=True)) / math.sqrt(want)
    assert res.value == pytest.approx(tr_g + float(x.mean()), rel=1e-10)
    assert res.stderr == pytest.approx(stderr, rel=1e-10)
    assert res.stderr <= rtol * abs(res.value)  # the documented contract


# ------------------------------------------- 4. the DGKS second pass keeps the basis orthonormal
def _graded(D: int, decades: float, dtype: torch.dtype) -> Tensor:
    """A symmetric matrix with eigenvalues ``10^(-decades k/(D-1))``, ``k = 0..D-1``, in a random
    orthonormal basis."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))
    ev = torch.logspace(0, -decades, D, dtype=DT)
    return (Q @ torch.diag(ev) @ Q.T).to(dtype)


@pytest.mark.parametrize(("D", "decades", "dtype"), [(40, 40, DT), (13, 30, torch.float32)])
def test_krylov_basis_stays_orthonormal_on_a_spectrum_far_below_rounding(
    D: int, decades: float, dtype: torch.dtype
) -> None:
    # most eigenvalues lie below eps ||A||: there A v_j is rounding, largely along the basis,
    # and one classical Gram-Schmidt pass keeps a small remainder of a large vector, far from
    # orthogonal; the DGKS test sees the lost norm and runs the second pass. Without it the
    # basis had ||V^T V - I|| = 0.998 (float64) and 0.981 (float32)
    basis = KrylovBasis(TensorOperator(_graded(D, decades, dtype)), torch.ones(D, dtype=DT), D)
    while basis.m < basis.dim:  # the whole space
        basis.step()
    V = torch.stack([v.to(DT) for v in basis.V[: basis.m]])
    err = float((V @ V.T - torch.eye(D, dtype=DT)).abs().max())
    assert err <= 16 * torch.finfo(dtype).eps  # seen: 4.4e-16 and 1.0e-7
