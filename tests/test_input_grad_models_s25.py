"""Review s25, RG-3: models that differentiate inside their forward pass (a physics-informed
network returning ``u`` and ``du/dx``, forces ``-dE/dx``), checked against dense float64 brute
force (per-example gradients by a loop over the examples with plain autograd, Hessians by double
backward).

Such a model's parameters enter the loss a second time, through the graph of the derivative its
forward takes (``W^T`` in ``du/dx``), which no layer call shows. Handed inputs that still require
grad, the per-example quantities gave wrong numbers without a word (before review s24, which
detached such inputs; curvlab's layer hooks: ``gradient_stats(...).mean`` an entry -0.0086 for
-0.2364, ``diag_fisher`` 0.0822 for 0.2099) or raised torch's "element 0 of tensors does not
require grad" (BackPACK, ``torch.func``, ``kfac``, ``fisher_trace``; from review s24 on, every
entry point raised torch's errors). They are refused now with a ``DifferentiatingForwardError``
naming the cause and what is exact; the whole-batch quantities (Hessian and GGN products,
``trace(method="exact")`` of every matrix, ``analyze``'s ``loss`` and ``grad_norm``, the
penalties, ``FullFisherNoise``) are exact. An ordinary model given inputs that require grad keeps
every quantity exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvlab as cl
from curvlab._differentiating_forward import DifferentiatingForwardError
from curvlab.regularizers import fisher_penalty, gradient_penalty, input_gradient_penalty

DT = torch.float64
EPS = torch.finfo(DT).eps
N = 6


class _PINN(nn.Module):
    """``u(x)`` and ``du/dx``: differentiates in its inputs, which must require grad."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x: Tensor) -> Tensor:
        u = self.net(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        return torch.cat([u, du], 1)


class _OwnLeafPINN(_PINN):
    """The same function, making its own leaf where the input does not require grad, with
    gradients on (it runs under ``torch.no_grad()`` too, as ``analyze``'s checks need)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            u = self.net(x)
            (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        return torch.cat([u, du], 1)


class _Forces(_PINN):
    """An energy model returning ``E`` and the forces ``-dE/dx`` through ``torch.func``."""

    def forward(self, x: Tensor) -> Tensor:
        energy = self.net(x)
        forces = -torch.func.vmap(torch.func.grad(lambda xi: self.net(xi).sum()))(x)
        return torch.cat([energy, forces], 1)


def _setup(variant: str, n: int = N) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    kind = {"leaf": _PINN, "own": _OwnLeafPINN, "one": _PINN, "forces": _Forces}[variant]
    model = kind().to(DT)
    g = torch.Generator().manual_seed(0)
    n = 1 if variant == "one" else n
    X = torch.randn(n, 2, generator=g, dtype=DT)
    y = torch.randn(n, 3, generator=g, dtype=DT)
    return model, (X if variant == "own" else X.requires_grad_(True)), y


def _flat(tensors: Any, names: list[str] | None = None) -> Tensor:
    items = [tensors[n] for n in names] if names is not None else list(tensors)
    return torch.cat([t.reshape(-1) for t in items])


def _per_example(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``g_n = grad l_n`` (mean convention: ``l_n`` the MSE over example n's 3 outputs), one
    example at a time with plain autograd, each input a fresh leaf."""
    ps = list(model.parameters())
    rows = []
    for i in range(X.shape[0]):
        x = X[i : i + 1].detach().clone().requires_grad_(True)
        rows.append(_flat(torch.autograd.grad(F.mse_loss(model(x), y[i : i + 1]), ps)))
    return torch.stack(rows)


def _jacobian_sq(model: nn.Module, X: Tensor) -> float:
    """``sum_n ||J_n||_F^2``, ``J_n`` the Jacobian of example n's outputs in the parameters."""
    ps, total = list(model.parameters()), 0.0
    for i in range(X.shape[0]):
        out = model(X[i : i + 1].detach().clone().requires_grad_(True))
        for j in range(out.shape[1]):
            total += float(
                _flat(torch.autograd.grad(out[0, j], ps, retain_graph=True)).square().sum()
            )
    return total


def _hessian(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """The dense Hessian of the mean loss ``MSE(model(X), y)`` by double backward."""
    ps = list(model.parameters())
    x = X.detach().clone().requires_grad_(True)
    g = _flat(torch.autograd.grad(F.mse_loss(model(x), y), ps, create_graph=True))
    return torch.stack(
        [_flat(torch.autograd.grad(g[i], ps, retain_graph=True)) for i in range(len(g))]
    )


def _untouched(model: nn.Module, X: Tensor, leaf: bool) -> None:
    assert all(p.grad is None for p in model.parameters())
    assert X.grad is None and X.is_leaf and X.requires_grad == leaf


# --------------------------------------------------------------------- refused, by name

MSE = nn.MSELoss()
REFUSED: dict[str, Callable[[nn.Module, Tensor, Tensor], Any]] = {
    **{
        f"diag_fisher[{kind},{backend}]": (
            lambda m, X, y, kind=kind, backend=backend: cl.diag_fisher(
                m, MSE, (X, y), kind=kind, backend=backend, seed=0
            )
        )
        for kind in ("empirical", "mc", "exact")
        for backend in ("auto", "hooks", "backpack", "func")
        if (kind, backend) != ("exact", "hooks")  # (the hooks refuse second order by name)
    },
    **{
        f"gradient_stats[{backend}]": (
            lambda m, X, y, backend=backend: cl.gradient_stats(m, MSE, (X, y), backend=backend)
        )
        for backend in ("auto", "hooks", "backpack", "func")
    },
    **{
        f"fisher_norms[{kind}]": (
            lambda m, X, y, kind=kind: cl.fisher_norms(m, MSE, (X, y), kind=kind, seed=0)
        )
        for kind in ("empirical", "mc", "exact")
    },
    **{
        f"kfac[{kind}]": (lambda m, X, y, kind=kind: cl.kfac(m, MSE, (X, y), kind=kind, seed=0))
        for kind in ("empirical", "mc", "exact")
    },
    "fisher_trace": lambda m, X, y: cl.fisher_trace(m, MSE, (X, y), seed=0),
    "trace[ggn_cv]": lambda m, X, y: cl.trace(m, MSE, (X, y), method="ggn_cv", num_probes=4),
    "chunk_size=1": lambda m, X, y: cl.diag_fisher(m, MSE, (X, y), chunk_size=1),
    "DiagFisherNoise": lambda m, X, y: cl.noise.DiagFisherNoise(kind="empirical", scale=1.0).sample(
        m, MSE, X, y, generator=torch.Generator().manual_seed(0)
    ),
    "KFACNoise": lambda m, X, y: cl.noise.KFACNoise(kind="mc", scale=1.0).sample(
        m, MSE, X, y, generator=torch.Generator().manual_seed(0)
    ),
}


@pytest.mark.parametrize("variant", ["leaf", "own", "one", "forces"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_per_example_quantities_refused_by_name(name: str, variant: str) -> None:
    model, X, y = _setup(variant)
    rng = torch.get_rng_state()
    # was: the hooks' numbers (a gradient mean entry -0.0086 for -0.2364), or torch's raw
    # "element 0 of tensors does not require grad" / "One of the differentiated Tensors ..."
    with pytest.raises(DifferentiatingForwardError, match=r"forward pass differentiates") as err:
        REFUSED[name](model, X, y)
    assert isinstance(err.value, ValueError)
    text = str(err.value)
    assert "torch.autograd.grad" in text and "matrix='hessian'" in text and "diag_hessian" in text
    _untouched(model, X, leaf=variant != "own")
    assert torch.equal(torch.get_rng_state(), rng)


def test_refused_at_every_call() -> None:
    """A refusal is not remembered as a checked signature: the next call refuses again, and an
    ordinary model between them is computed."""
    model, X, y = _setup("leaf")
    for _ in range(2):
        with pytest.raises(DifferentiatingForwardError):
            cl.gradient_stats(model, MSE, (X, y))
    plain = nn.Sequential(nn.Linear(2, 3)).to(DT)
    assert cl.diag_fisher(plain, MSE, (X.detach(), y)).backend == "hooks"


@pytest.mark.parametrize("variant", ["leaf", "own", "one", "forces"])
def test_noisy_optimizer_per_example_sampler_refused(variant: str) -> None:
    """The capture sends such a step to a separate pass (the layer taps saw a backward pass in
    the forward), whose input requires grad as the step's did: refused there by name, the
    parameters and the optimizer untouched."""
    model, X, y = _setup(variant)
    before = [p.detach().clone() for p in model.parameters()]
    for sampler in (
        cl.noise.DiagFisherNoise(kind="empirical", scale=1.0),
        cl.noise.FisherTraceNoise(kind="mc", scale=1.0),
        cl.noise.KFACNoise(kind="empirical", scale=1.0),
    ):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        noisy = cl.noise.NoisyOptimizer(opt, sampler, model, MSE, seed=0)

        def closure(noisy: cl.noise.NoisyOptimizer = noisy) -> Tensor:
            noisy.zero_grad()
            loss = MSE(model(X), y)
            loss.backward()
            return loss

        # was: torch's "One of the differentiated Tensors does not require grad" (the step's
        # input detached for the separate pass)
        with pytest.raises(DifferentiatingForwardError, match="forward pass differentiates"):
            noisy.step(closure)
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        X.grad = None
        model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------- exact, whole batches


@pytest.mark.parametrize("variant", ["leaf", "own"])
def test_exact_traces_of_every_matrix_from_products(variant: str) -> None:
    """``trace(method="exact")`` of the GGN and the empirical Fisher (one-pass diagonals for an
    ordinary model, refused here) comes from the operator's products, one per parameter."""
    model, X, y = _setup(variant)
    G = _per_example(model, X, y)
    ggn = 2.0 / (N * 3) * _jacobian_sq(model, X)  # H_loss = 2/(3N) I for the mean MSE
    H = _hessian(model, X, y)
    D = G.shape[1]
    want = {
        "ggn": ggn,
        "empirical_fisher": float(G.square().mean(0).sum()),
        "hessian": float(H.trace()),
    }
    for matrix, value in want.items():
        # was (s24 to s25): torch's raw errors; before s24 the hooks' EF trace, 0.9186 for 1.3519
        res = cl.trace(model, MSE, (X, y), matrix=matrix, method="exact", by_layer=True)
        assert abs(res.value - value) <= 1e2 * D * EPS * abs(value), matrix
        assert abs(sum(res.by_layer.values()) - value) <= 1e2 * D * EPS * abs(value)
    _untouched(model, X, leaf=variant == "leaf")


def test_exact_monte_carlo_fisher_trace_is_unbiased_for_the_ggn() -> None:
    model, X, y = _setup("leaf")
    ggn = 2.0 / (N * 3) * _jacobian_sq(model, X)
    vals = torch.tensor(
        [
            cl.trace(model, MSE, (X, y), matrix="fisher", method="exact", seed=s).value
            for s in range(60)
        ]
    )
    stderr = float(vals.std()) / len(vals) ** 0.5
    assert abs(float(vals.mean()) - ggn) <= 5 * stderr


def test_analyze_whole_batch_quantities_exact_per_example_ones_refused() -> None:
    model, X, y = _setup("own")
    G = _per_example(model, X, y)
    H = _hessian(model, X, y)
    mean = G.mean(0)
    centred = G - mean
    t_h_sigma = float(torch.einsum("ni,ij,nj->", centred, H, centred)) / N
    gHg = float(mean @ H @ mean)
    per_example = ("trace_empirical_fisher", "noise_scale", "trace_fisher", "fisher_norms")
    quantities = ("loss", "grad_norm", *per_example, "top_eigenvalues", "noise_scale_hessian")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the report's notes)
        report = cl.analyze(model, MSE, (X, y), quantities=quantities, k=1, nqm=False)
    entry = report.entries[0]
    values = entry["values"]
    loss = float(F.mse_loss(model(X.clone().requires_grad_(True)), y).detach())
    assert abs(values["loss"] - loss) <= 1e2 * EPS * loss
    assert abs(values["grad_norm"] - float(mean.norm())) <= 1e3 * EPS * float(mean.norm())
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(values["top_eigenvalues"][0] - top) <= 1e-6 * top
    # N = 6 <= 10 probes: tr(H Sigma) exactly
    assert abs(values["trace_hessian_covariance"] - t_h_sigma) <= 1e-10 * t_h_sigma
    assert abs(values["grad_hessian_grad"] - gHg) <= 1e-10 * abs(gHg)
    assert abs(values["noise_scale_hessian"] - t_h_sigma / gHg) <= 1e-9 * t_h_sigma / gHg
    for q in per_example:  # was: the hooks' numbers (or torch's raw error, kfac-like paths)
        assert q not in values
        reasons = [v for k, v in entry["errors"].items() if q in k]
        assert reasons and "forward pass differentiates" in reasons[0], q
    _untouched(model, X, leaf=False)


def test_diagnostics_whole_batch_quantities_exact() -> None:
    model, X, y = _setup("own")
    G = _per_example(model, X, y)
    H = _hessian(model, X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cl.Diagnostics(
            model, MSE, every=1, quantities=("loss", "grad_norm", "trace_fisher", "sharpness")
        ) as diag:
            diag.step(0, X, y)
    record = diag.records[-1]
    assert abs(record["values"]["grad_norm"] - float(G.mean(0).norm())) <= 1e-12
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(record["values"]["sharpness"] - top) <= 1e-3 * top  # the documented tolerance
    assert "trace_fisher" not in record["values"]
    assert "forward pass differentiates" in next(iter(record["errors"].values()))


def test_penalties_exact() -> None:
    model, X, y = _setup("leaf")
    ps = list(model.parameters())
    x = X.detach().clone().requires_grad_(True)
    g = torch.autograd.grad(F.mse_loss(model(x), y), ps, create_graph=True)
    want = sum(t.square().sum() for t in g)
    want_grad = _flat(torch.autograd.grad(want, ps))
    got = gradient_penalty(model, MSE, X, y, alpha=1.0)
    assert abs(float(got.detach()) - float(want.detach())) <= 1e2 * EPS * float(want.detach())
    torch.testing.assert_close(_flat(torch.autograd.grad(got, ps)), want_grad, rtol=0, atol=1e-13)
    # GP_x: (1/B) sum_i ||d l_i / d x_i||^2, l_i the mean-convention example loss
    x = X.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(F.mse_loss(model(x), y, reduction="sum") / 3, x, create_graph=True)
    want_x = gx.square().sum() / N
    got_x = input_gradient_penalty(model, MSE, X, y)
    assert abs(float(got_x.detach()) - float(want_x.detach())) <= 1e2 * EPS * float(want_x.detach())
    # FP: E over the labels drawn of ||grad L(x, y_hat)||^2 = Tr(GGN) / (3N) for the mean MSE
    # (y_hat = f(x) + N(0, 1/2) noise)
    ggn = 2.0 / (N * 3) * _jacobian_sq(model, X)
    vals = torch.tensor([float(fisher_penalty(model, MSE, X, seed=s).detach()) for s in range(200)])
    assert abs(float(vals.mean()) - ggn / (3 * N)) <= 5 * float(vals.std()) / 200**0.5
    assert all(p.grad is None for p in ps)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_noise_exact_covariance(kind: str) -> None:
    """``E||eps||^2 = scale^2 Tr(F)`` for ``.sample()`` and inside ``NoisyOptimizer`` (the
    noise folded into the step's backward pass, or its separate pass)."""
    model, X, y = _setup("leaf")
    G = _per_example(model, X, y)
    want = (
        2.0 / (N * 3) * _jacobian_sq(model, X)
        if kind == "true"
        else float(G.square().mean(0).sum())
    )
    grad = G.mean(0)
    sampler = cl.noise.FullFisherNoise(kind, scale=1.0)
    gen = torch.Generator().manual_seed(0)
    drawn = [
        float(_flat(sampler.sample(model, MSE, X, y, generator=gen).values()).square().sum())
        for _ in range(150)
    ]
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        cl.noise.FullFisherNoise(kind, scale=1.0),
        model,
        MSE,
        seed=0,
    )
    stepped = []
    for _ in range(150):

        def closure() -> Tensor:
            noisy.zero_grad()
            loss = MSE(model(X), y)
            loss.backward()
            return loss

        noisy.step(closure)
        stepped.append(float((_flat(p.grad for p in model.parameters()) - grad).square().sum()))
        X.grad = None
    for values in (torch.tensor(drawn), torch.tensor(stepped)):
        assert abs(float(values.mean()) - want) <= 5 * float(values.std()) / len(values) ** 0.5


# --------------------------------------------------------------------- no false refusal


def test_ordinary_model_with_inputs_requiring_grad_stays_exact() -> None:
    """A model that does not differentiate in its forward, given inputs that require grad (an
    adversarial input): every per-example quantity is computed, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 2, generator=g, dtype=DT).requires_grad_(True)
    y = torch.randn(N, 3, generator=g, dtype=DT)
    names = [n for n, _ in model.named_parameters()]
    ps = list(model.parameters())
    G = torch.stack(
        [
            _flat(torch.autograd.grad(F.mse_loss(model(X[i : i + 1].detach()), y[i : i + 1]), ps))
            for i in range(N)
        ]
    )
    ef = G.square().mean(0)
    tol = 1e2 * EPS * float(ef.max())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain leaf: no warning
        for backend in ("hooks", "backpack", "func"):
            d = cl.diag_fisher(model, MSE, (X, y), backend=backend)
            torch.testing.assert_close(_flat(d, names), ef, rtol=0, atol=tol)
            s = cl.gradient_stats(model, MSE, (X, y), backend=backend)
            torch.testing.assert_close(_flat(s.mean, names), G.mean(0), rtol=0, atol=tol)
            var = (G - G.mean(0)).square().mean(0)
            torch.testing.assert_close(_flat(s.variance, names), var, rtol=0, atol=tol)
        frob = float(torch.linalg.matrix_norm(G.T @ G / N))
        assert abs(cl.fisher_norms(model, MSE, (X, y)).frobenius - frob) <= 1e2 * EPS * frob
        assert abs(
            cl.trace(model, MSE, (X, y), matrix="empirical_fisher", method="exact").value
            - float(ef.sum())
        ) <= tol * len(ef)
        # K-FAC and the Monte-Carlo Fisher trace: those of the same data without requires_grad
        plain = X.detach()
        for k, f in cl.kfac(model, MSE, (X, y), kind="empirical").items():
            ref = cl.kfac(model, MSE, (plain, y), kind="empirical")[k]
            torch.testing.assert_close(f.A, ref.A, rtol=0, atol=0)
            torch.testing.assert_close(f.G, ref.G, rtol=0, atol=0)
        a = cl.fisher_trace(model, MSE, (X, y), seed=0)
        b = cl.fisher_trace(model, MSE, (plain, y), seed=0)
        assert a.value == b.value
    # the first layer's input factor against brute force: the mean of x x^T
    A = cl.kfac(model, MSE, (X, y), kind="empirical")["0"].A
    torch.testing.assert_close(A, X.detach().T @ X.detach() / N, rtol=0, atol=1e2 * EPS)
    _untouched(model, X, leaf=True)
