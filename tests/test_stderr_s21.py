"""Standard errors of ``fisher_trace`` and ``noise_scale_hessian`` (review s21).

``noise_scale_hessian`` on a batch of 2 examples: every random-sign probe is
``u = ±(g_1 − g_2)/√2`` or 0, so ``uᵀHu`` takes two values, and when all probes drew the same one
the standard error was 0 for a random value (seed 352: ``0.000000 ± 0.0`` for an exact
``0.101946``; 3 seeds in 1000 at 10 probes, 225 in 400 at 2 probes). Where ``N <= num_probes``
``tr(HΣ) = (1/N) Σ_n (g_n − G)ᵀ H (g_n − G)`` is now computed exactly (``N`` backward passes and
``N`` Hessian products, no more than the probes cost), with a standard error of 0 that is
exactness. The brute force takes per-example gradients and the Hessian of the mean loss with
``torch.func``.

``fisher_trace``'s standard error is over examples and their drawn labels together:
``w N std_n(‖s_n(ŷ_n)‖²)/√N``. It is the error against the data distribution's ``Tr(F)`` (the
examples an i.i.d. sample, the labels drawn), not against the batch's own ``Tr(F)`` (only the
labels random), which it overstates by the spread of ``E_ŷ‖s_n(ŷ)‖²`` between the examples (a
ratio of 3.13 on 40 examples; a zero-weight ``Linear``, whose value is exact, reported 2.0971).
The docs now say so; these tests check both readings against exact moments.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap

import curvlab as cl
from curvlab.analysis._first_order import ONE_EXAMPLE
from curvlab.analysis._measures import measure

DT = torch.float64


def _model(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, classes)).to(DT)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


# ------------------------------------------------------------------ noise_scale_hessian, N small
def _nsh_brute(model: nn.Module, mse: bool, X: Tensor, y: Tensor) -> tuple[float, float]:
    """``tr(HΣ)`` and ``GᵀHG``: mean-convention ``g_n`` (the gradient of example ``n``'s mean
    loss) and ``H`` the Hessian of the mean loss over all the examples."""
    per = nn.MSELoss() if mse else nn.CrossEntropyLoss()
    theta = _flat(model)

    def loss(t: Tensor, x: Tensor, yy: Tensor) -> Tensor:
        return per(functional_call(model, _unflat(model, t), (x,)), yy)

    g = vmap(grad(lambda t, x, yy: loss(t, x[None], yy[None])), in_dims=(None, 0, 0))(theta, X, y)
    mean = g.mean(0)
    h = hessian(loss)(theta, X, y)
    d = g - mean
    return float(torch.einsum("ni,ij,nj->", d, h, d) / len(X)), float(mean @ h @ mean)


def _nsh_data(n: int, mse: bool, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=DT)
    y = (
        torch.randn(n, 3, generator=gen, dtype=DT)
        if mse
        else torch.randint(0, 3, (n,), generator=gen)
    )
    return X, y


@pytest.mark.parametrize("loss", ["ce_mean", "ce_sum", "mse_mean", "mse_sum"])
@pytest.mark.parametrize("split", [(2,), (3,), (2, 1), (1, 1, 1)])
def test_noise_scale_hessian_of_few_examples_is_exact(loss: str, split: tuple[int, ...]) -> None:
    """``N <= num_probes``: ``tr(HΣ)`` exact, its standard error 0, ``N + 1`` products. Several
    batches are one data set of ``N`` examples (``Σ`` over all of them, ``H`` of their mean loss).
    On the old code the value was a random probe mean (seed 352 of the review's 2-example batch
    gave 0 ± 0 for 0.102)."""
    mse = loss.startswith("mse")
    model = _model(1)
    X, y = _nsh_data(sum(split), mse, seed=sum(split) + 10 * len(split))
    want_trace, want_ghg = _nsh_brute(model, mse, X, y)
    assert abs(want_trace) > 1e-3 * abs(want_ghg)  # a nonzero tr(HΣ) to be wrong about
    bounds = [0, *torch.tensor(split).cumsum(0).tolist()]
    data = [(X[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]
    loss_fn = (nn.MSELoss if mse else nn.CrossEntropyLoss)(reduction=loss.split("_")[1])
    v = measure(
        model, loss_fn, data if len(split) > 1 else data[0], ["noise_scale_hessian"],
        options={"num_probes": 3},
    ).values  # fmt: skip
    # float64 throughout: rounding of a few products of size ~1, far below 1e-9
    assert v["trace_hessian_covariance"] == pytest.approx(want_trace, rel=1e-9, abs=1e-12)
    assert v["grad_hessian_grad"] == pytest.approx(want_ghg, rel=1e-9)
    assert v["noise_scale_hessian"] == pytest.approx(want_trace / want_ghg, rel=1e-9)
    assert v["noise_scale_hessian_stderr"] == 0.0
    assert v["trace_hessian_covariance_stderr"] == 0.0
    assert v["noise_scale_hessian_hvps"] == sum(split) + 1


def test_noise_scale_hessian_of_two_examples_at_the_reviews_seed() -> None:
    """The review's case: 2 examples, 10 probes, seed 352 (``analyze``'s path)."""
    model = _model(0)
    X, y = _nsh_data(2, False, seed=0)
    want_trace, want_ghg = _nsh_brute(model, False, X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = cl.analyze(
            model, nn.CrossEntropyLoss(), (X, y), quantities=["noise_scale_hessian"], seed=352,
            num_probes=10, nqm=False, progress=False,
        )  # fmt: skip
    v = report.values
    assert v["noise_scale_hessian"] == pytest.approx(want_trace / want_ghg, rel=1e-9)
    assert v["noise_scale_hessian_stderr"] == 0.0


def test_noise_scale_hessian_of_one_example_is_still_refused() -> None:
    """``N = 1``: ``Σ = 0`` by definition, ``B_noise`` says nothing; the error is kept."""
    model = _model(0)
    X, y = _nsh_data(1, False, seed=0)
    out = measure(
        model, nn.CrossEntropyLoss(), (X, y), ["noise_scale_hessian"], on_error="skip",
        options={"num_probes": 3},
    )  # fmt: skip
    assert out.errors["noise_scale_hessian"] == ONE_EXAMPLE
    assert "noise_scale_hessian_stderr" not in out.values


def test_noise_scale_hessian_above_the_probes_still_probes() -> None:
    """``N > num_probes``: the probes as before (``num_probes + 1`` products, a standard error
    over them that is not 0)."""
    model = _model(1)
    X, y = _nsh_data(4, False, seed=3)
    v = measure(
        model, nn.CrossEntropyLoss(), (X, y), ["noise_scale_hessian"], options={"num_probes": 3}
    ).values
    assert v["noise_scale_hessian_hvps"] == 4
    assert v["noise_scale_hessian_stderr"] > 0


# ------------------------------------------------------------------------ fisher_trace's stderr
def _sq_norms(model: nn.Module, X: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """``q[n, c] = ‖∇ CE(x_n, c)‖²`` and the model's probabilities ``p[n, c]``."""
    theta = _flat(model)

    def nll(t: Tensor, x: Tensor, c: Tensor) -> Tensor:
        out = functional_call(model, _unflat(model, t), (x[None],))
        return nn.functional.cross_entropy(out, c[None])

    per_class = []
    for c in range(classes):
        g = vmap(grad(nll), in_dims=(None, 0, 0))(theta, X, torch.full((len(X),), c))
        per_class.append(g.pow(2).sum(1))
    with torch.no_grad():
        p = model(X).softmax(-1)
    return torch.stack(per_class, 1), p


def test_fisher_trace_stderr_is_calibrated_for_the_data_distributions_trace() -> None:
    """Examples drawn i.i.d. from a fixed population of 5, labels drawn: ``mean(stderr²)`` and the
    estimate's variance both match the exact ``Var(‖s(x, ŷ)‖²)/N``, and the mean value the
    population's ``Tr(F)`` per example (CrossEntropyLoss(mean): ``w = 1/N``). Tolerances: 5
    standard errors of each mean over the replicates."""
    model, classes, pop, n, reps = _model(2), 3, 5, 8, 400
    gen = torch.Generator().manual_seed(0)
    P = (
        torch.randn(pop, 3, generator=gen, dtype=DT)
        * torch.linspace(0.3, 2.5, pop, dtype=DT)[:, None]
    )
    q, p = _sq_norms(model, P, classes)
    mu = float((p * q).sum() / pop)  # E over examples and labels
    var_x = float((p * q * q).sum() / pop) - mu**2
    var_est = var_x / n
    values, se2 = [], []
    for r in range(reps):
        idx = torch.randint(0, pop, (n,), generator=gen)
        res = cl.fisher_trace(model, nn.CrossEntropyLoss(), (P[idx], torch.zeros(n).long()), seed=r)
        values.append(res.value)
        se2.append(res.stderr**2)
    v, s = torch.tensor(values, dtype=DT), torch.tensor(se2, dtype=DT)
    assert abs(float(v.mean()) - mu) <= 5 * float(v.std()) / math.sqrt(reps)
    dev2 = (v - mu) ** 2  # its mean estimates var_est without bias
    assert abs(float(dev2.mean()) - var_est) <= 5 * float(dev2.std()) / math.sqrt(reps)
    assert abs(float(s.mean()) - var_est) <= 5 * float(s.std()) / math.sqrt(reps)


def test_fisher_trace_stderr_overstates_the_error_for_the_batchs_own_trace() -> None:
    """On one fixed batch the value is random through the labels only (variance
    ``w² Σ_n Var_ŷ‖s_n‖²``), while ``E[stderr²]`` over the labels is
    ``w² N [(1/N) Σ_n Var_n + Σ_n (μ_n − μ̄)²/(N − 1)]``: larger by the examples' spread.
    Checked by the mean of ``stderr²`` over seeds (5 of its standard errors)."""
    model, classes, n, reps = _model(2), 3, 6, 400
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=gen, dtype=DT) * torch.linspace(0.3, 2.5, n, dtype=DT)[:, None]
    q, p = _sq_norms(model, X, classes)
    mu_n = (p * q).sum(1)
    var_n = (p * q * q).sum(1) - mu_n**2
    w = 1.0 / n
    label_only = float(w**2 * var_n.sum())
    expected_se2 = float(w**2 * n * (var_n.mean() + ((mu_n - mu_n.mean()) ** 2).sum() / (n - 1)))
    assert expected_se2 > 2 * label_only  # this batch's examples differ: a real overstatement
    s = torch.tensor(
        [
            cl.fisher_trace(model, nn.CrossEntropyLoss(), (X, torch.zeros(n).long()), seed=r).stderr
            ** 2
            for r in range(reps)
        ],
        dtype=DT,
    )
    assert abs(float(s.mean()) - expected_se2) <= 5 * float(s.std()) / math.sqrt(reps)


def test_fisher_trace_of_label_free_norms_is_exact_with_a_nonzero_stderr() -> None:
    """A zero-weight ``Linear`` (uniform softmax: ``‖s_n(c)‖²`` the same for every label ``c``):
    the value is the batch's exact ``Tr(F)`` (= ``trace(matrix="ggn", method="exact")``, the
    error bar-free value the docs point to), and the stderr is the spread over the examples,
    ``w N std_n(‖s_n‖²)/√N``, not 0: it is an error bar for the data distribution's trace."""
    m = nn.Linear(3, 4, bias=False).to(DT)
    with torch.no_grad():
        m.weight.zero_()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(10, 3, generator=gen, dtype=DT) * torch.linspace(0.1, 3, 10, dtype=DT)[:, None]
    y = torch.randint(0, 4, (10,), generator=gen)
    q = 0.75 * X.pow(2).sum(1)  # ‖p − e_c‖² ‖x_n‖², ‖p − e_c‖² = 3/4 for every c
    res = cl.fisher_trace(m, nn.CrossEntropyLoss(), (X, y), seed=0)
    exact = cl.trace(m, nn.CrossEntropyLoss(), (X, y), matrix="ggn", method="exact").value
    assert res.value == pytest.approx(float(q.mean()), rel=1e-12)
    assert exact == pytest.approx(float(q.mean()), rel=1e-12)
    assert res.stderr == pytest.approx(float(q.std() / math.sqrt(10)), rel=1e-12)
