"""Review s22: a warm-started ``critical_sharpness`` and ``KFACNoise`` on a weight set in forward.

1. ``critical_sharpness`` refuses a loss whose fall along the update is within the rounding of the
   loss (the located step would be rounding noise). It judged the fall by the points its search
   happened to evaluate: a warm start at the previous answer evaluates points next to the root
   only, where the loss has barely fallen, and a second measurement on the unchanged model with
   ``critical_tol=1e-6`` was refused ("falls by at most 3.55e-15 ... cannot be located") though
   the first gave the right value.
2. ``KFACNoise`` on a model whose ``Linear`` has its weight set in the forward as a slice of another
   parameter (``self.lin.weight = self.big[:3]``): :func:`curvlab.kfac` leaves that layer out, and
   the noise of ``big`` (and of the layer's bias) is the documented fallback, the Fisher
   diagonal; the other layers keep their K-FAC blocks. Checked against brute force.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian

from curvlab import Diagnostics

DT = torch.float64


def _mlp_problem() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X = torch.randn(8, 3, generator=g, dtype=DT)
    y = torch.randn(8, 2, generator=g, dtype=DT)
    return model, X, y


def _loss(model: nn.Module, params: dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(functional_call(model, params, (X,)), y)


def _first_rise(model: nn.Module, u: dict[str, Tensor], X: Tensor, y: Tensor) -> float:
    """Brute force: the smallest ``s`` with ``L(θ + s u) > L(θ)``, by a geometric scan for the
    first sign change and bisection to float64 resolution."""
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def rise(s: float) -> float:
        moved = {n: t + s * u[n] for n, t in theta.items()}
        return float(_loss(model, moved, X, y) - _loss(model, theta, X, y))

    grid = [10.0 ** (k / 50) for k in range(-150, 151)]
    i = next(i for i, s in enumerate(grid) if rise(s) > 0)
    lo, hi = grid[i - 1], grid[i]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if rise(mid) <= 0 else (lo, mid)
    return hi


def _measure_twice(model: nn.Module, X: Tensor, y: Tensor, opt, tol: float) -> list[float]:
    diag = Diagnostics(
        model,
        nn.MSELoss(),
        ["critical_sharpness"],
        every=1,
        optimizer=opt,
        options={"critical_tol": tol},
        on_error="raise",
    )
    try:  # the same parameters and batch: the second search is warm-started at the first answer
        return [diag.measure(step, X, y)["values"]["critical_sharpness"] for step in (0, 1)]
    finally:
        diag.close()


@pytest.mark.parametrize("tol", [1e-6, 1e-3])
def test_a_warm_start_at_the_answer_is_measured_on_an_mlp(tol: float) -> None:
    model, X, y = _mlp_problem()
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    g = grad(lambda p: _loss(model, p, X, y))(theta)
    s_c = _first_rise(model, {n: -lr * g[n] for n in theta}, X, y)
    exact = 2.0 / (s_c * lr)
    # the final bracket [lo, hi] holds the root and hi - lo <= tol * lo; the value returned lies
    # in it, so its step is within a relative tol of s_c and λ_c within tol / (1 - tol)
    values = _measure_twice(model, X, y, opt, tol)
    assert values == [pytest.approx(exact, rel=tol / (1 - tol))] * 2


def _quadratic() -> tuple[nn.Module, Tensor, Tensor, torch.optim.Optimizer]:
    """Linear regression (a quadratic loss) after two SGD steps with momentum: the update
    ``−η d``, ``d = μ b + g``, is not along the gradient."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 4, generator=g, dtype=DT)
    y = X @ torch.randn(4, 1, generator=g, dtype=DT) + torch.randn(10, 1, generator=g, dtype=DT)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(4, 1).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    opt.zero_grad()
    return model, X, y, opt


def _quadratic_exact(model: nn.Module, X: Tensor, y: Tensor, opt) -> float:
    """``dᵀHd / gᵀd`` (dense float64), the update being ``−η d`` with ``d = μ b + g``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat: Tensor) -> Tensor:
        parts = torch.split(flat, [s.numel() for s in shapes])
        return _loss(model, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, X, y)

    g = grad(f)(flat0)
    H = hessian(f)(flat0)
    mu = opt.param_groups[0]["momentum"]
    b = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    d = mu * b + g
    return float(d @ H @ d / (g @ d))


@pytest.mark.parametrize("tol", [1e-6, 1e-3])
def test_a_warm_start_at_the_answer_is_measured_on_a_quadratic(tol: float) -> None:
    model, X, y, opt = _quadratic()
    exact = _quadratic_exact(model, X, y, opt)
    values = _measure_twice(model, X, y, opt, tol)
    assert values == [pytest.approx(exact, rel=tol / (1 - tol))] * 2


def test_a_cold_start_next_to_the_answer_is_measured() -> None:
    """The optimizer's own step (where the search starts cold) just short of the critical one:
    the first points evaluated lie next to the root as well."""
    model, X, y, opt = _quadratic()
    exact = _quadratic_exact(model, X, y, opt)
    # s_c = 2 / (λ_c η): η just below 2/λ_c puts s = 1 below the root by ~1e-13
    opt.param_groups[0]["lr"] = 2.0 / exact * (1 - 1e-13)
    assert exact == _quadratic_exact(model, X, y, opt)  # (λ_c does not depend on η)
    values = _measure_twice(model, X, y, opt, 1e-6)
    assert values == [pytest.approx(exact, rel=1e-6 / (1 - 1e-6))] * 2


def test_a_fall_within_rounding_is_still_refused() -> None:
    """Linear regression at its float64 least-squares solution moved by 1e-9: the loss falls along
    the update by about 1e-18 of 8, far within float64 rounding (8 * 2.2e-16), cold and warm."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(16, 3, generator=g, dtype=DT)
    y = X @ torch.randn(3, 1, generator=g, dtype=DT) + torch.randn(16, 1, generator=g, dtype=DT)
    A = torch.cat([X, torch.ones(16, 1, dtype=DT)], 1)
    sol = torch.linalg.lstsq(A, y).solution
    model = nn.Linear(3, 1).to(DT)
    with torch.no_grad():
        model.weight.copy_(sol[:3].T + 1e-9)
        model.bias.copy_(sol[3])
    # brute force: the largest fall along the SGD update, -η g, over any step, is that of the
    # quadratic at half the critical step, (gᵀu)² / (4 uᵀHu) (summed loss, as curvlab sums it)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    total = float(nn.functional.mse_loss(model(X), y, reduction="sum").detach())
    gs = grad(lambda p: nn.functional.mse_loss(functional_call(model, p, (X,)), y, reduction="sum"))
    gv = torch.cat([t.reshape(-1) for t in gs(theta).values()])
    H = 2 * A.T @ A
    fall = float((gv @ gv) ** 2 / (4 * gv @ H @ gv))
    assert fall < 4 * torch.finfo(DT).eps * total
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(
        model, nn.MSELoss(), ["critical_sharpness"], every=1, optimizer=opt, on_error="raise"
    )
    for step in (0, 1):
        with pytest.raises(ValueError, match="cannot be located"):
            diag.measure(step, X, y)
    diag.close()


def test_a_warm_fall_within_float32_rounding_is_still_refused() -> None:
    """A model whose forward fixes float32 is searched in float32; near a least-squares minimum
    the fall is within its rounding: refused on the first measurement and on a warm one."""

    class Float32Only(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(5, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x.float())

    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 5, generator=g, dtype=DT)
    noise = 0.5 * torch.randn(64, 1, generator=g, dtype=DT)
    y = X @ torch.randn(5, 1, generator=g, dtype=DT) + noise
    A = torch.cat([X, torch.ones(64, 1, dtype=DT)], 1)
    sol = torch.linalg.lstsq(A, y).solution
    model = Float32Only()
    with torch.no_grad():
        model.inner.weight.copy_(sol[:5].T + 1e-5 * torch.randn(1, 5, generator=g, dtype=DT))
        model.inner.bias.copy_(sol[5])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    diag = Diagnostics(
        model, nn.MSELoss(), ["critical_sharpness"], every=1, optimizer=opt, on_error="raise"
    )
    for step in (0, 1):
        with pytest.raises(ValueError, match="cannot be located"):
            diag.measure(step, X.float(), y.float())
    diag.close()


class _SetInForward(nn.Module):
    """``lin``'s weight is deleted and set in the forward as a slice of ``big``, whose other rows
    the model uses outside any layer; ``l2`` is a plain layer."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.randn(6, 4, dtype=DT))
        self.lin = nn.Linear(4, 3).to(DT)
        del self.lin.weight
        self.l2 = nn.Linear(3, 3).to(DT)

    def forward(self, x: Tensor) -> Tensor:
        self.lin.weight = self.big[:3]
        return self.l2(torch.tanh(self.lin(x))) + F.linear(x, self.big[3:])


@pytest.mark.parametrize("fresh", [True, False])
def test_kfac_noise_gives_a_weight_set_in_forward_its_fisher_diagonal(fresh: bool) -> None:
    from curvlab.noise import KFACNoise

    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = _SetInForward()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(5, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=g)
    if not fresh:
        model(X)  # lin.weight is now a view of big
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert set(params) == {"big", "lin.bias", "l2.weight", "l2.bias"}

    # brute force: per-example gradients of the NLL (CrossEntropyLoss(mean): the empirical
    # Fisher is (1/N) Σ g_n g_nᵀ), and l2's K-FAC factors A = (1/N) Σ a aᵀ, G = (1/N) Σ δ δᵀ
    def nll(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    per = [grad(nll)(params, X[n], y[n]) for n in range(5)]
    diag = {k: torch.stack([q[k] ** 2 for q in per]).mean(0) for k in params}
    with torch.no_grad():
        a = torch.tanh(X @ params["big"][:3].T + params["lin.bias"])
        logits = a @ params["l2.weight"].T + params["l2.bias"] + X @ params["big"][3:].T
        delta = logits.softmax(-1) - F.one_hot(y, 3).to(DT)
    A, G = a.T @ a / 5, delta.T @ delta / 5

    sampler = KFACNoise(scale=1.0)
    state = sampler.estimate(model, nn.CrossEntropyLoss(), X, y, torch.Generator().manual_seed(0))
    assert set(state) == {"l2", "__diagonal__"}  # lin has no factors: its weight is not its own
    assert set(state["__diagonal__"]) == {"big", "lin.bias"}
    for k in ("big", "lin.bias"):  # float64 sums of a few squares: a few ulps
        torch.testing.assert_close(state["__diagonal__"][k], diag[k], rtol=1e-12, atol=0)
    # the factors come from an eigen-decomposition (backward error ~ n eps |M|, eigenvalues below
    # n eps max set to 0): 100 n eps |M| covers both
    B, C = state["l2"]["B"], state["l2"]["C"]
    for got, want in ((B @ B.T, G), (C.T @ C, A)):
        err = float((got - want).abs().max())
        assert err <= 100 * 3 * torch.finfo(DT).eps * float(want.abs().max())

    # the draws: big's entries have variance scale² times its Fisher diagonal; the sample
    # variance of n normal draws has relative standard deviation sqrt(2/n): 5 of them at n = 4000
    n = 4000
    gen = torch.Generator().manual_seed(1)
    draws = [sampler.draw(model, state, gen) for _ in range(n)]
    for k in ("big", "lin.bias"):
        var = torch.stack([d[k] for d in draws]).pow(2).mean(0)
        assert float((var / diag[k] - 1).abs().max()) <= 5 * (2 / n) ** 0.5
