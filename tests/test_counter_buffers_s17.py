"""Every forward pass of the exact per-example traces and of ``analyze``'s first-order values
starts from the small integer buffers the call found (a call counter), as the sweep-based
quantities and the operators do (docs/conventions.md). Found in review s17: these two still
snapshotted float buffers only, so a counter ran on across batches."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab.estimators import exact_trace_per_example

DT = torch.float64


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cnt", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.cnt += 1
        return x * (1.0 + 0.1 * self.cnt)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), _Counter(), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _data() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(7, 3, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    return [(X[:3], y[:3]), (X[3:], y[3:])]


def _per_example_grads(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Gradients of each example's loss with the counter at 1 in every forward (as found: 0)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {"1.cnt": torch.zeros((), dtype=torch.long)}

    def loss(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        out = functional_call(model, (p, {k: v.clone() for k, v in buffers.items()}), (x[None],))
        return nn.functional.cross_entropy(out, t[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g[n].reshape(len(X), -1) for n in params], dim=1)


def test_exact_empirical_trace_starts_every_batch_from_the_counter_found() -> None:
    model, data = _model(), _data()
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    g = _per_example_grads(model, X, y)
    expected = (g**2).sum() / len(X)
    got = exact_trace_per_example(model, nn.CrossEntropyLoss(), data, "empirical_fisher")
    value = float(got[0])  # (trace, ...)
    assert abs(value - float(expected)) <= 1e-12 * float(expected)
    assert int(model[1].cnt) == 0


def test_analyze_first_order_values_start_every_batch_from_the_counter_found() -> None:
    model, data = _model(), _data()
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    g = _per_example_grads(model, X, y).mean(0)
    report = cl.analyze(model, nn.CrossEntropyLoss(), data, quantities=["grad_norm"])
    values = report.to_dict()
    flat = str(values)
    assert "grad_norm" in flat
    got = _find(values, "grad_norm")
    assert abs(got - float(g.norm())) <= 1e-12 * float(g.norm())
    assert int(model[1].cnt) == 0


def _find(d: object, key: str) -> float:
    if isinstance(d, dict):
        if key in d and isinstance(d[key], (int, float)):
            return float(d[key])
        for v in d.values():
            try:
                return _find(v, key)
            except KeyError:
                pass
    if isinstance(d, list):
        for v in d:
            try:
                return _find(v, key)
            except KeyError:
                pass
    raise KeyError(key)


# --- the measurement passes that still ran on the model's own buffers (review s17, R2):
# trace_fisher_batch's chunks, noise_scale_hessian's per-example forwards, critical_sharpness'
# gradient and line search. Brute force: every forward with the counter as found (0).

_CNT = {"1.cnt": torch.zeros((), dtype=torch.long)}


def _flat_loss(model: nn.Module, X: Tensor, y: Tensor) -> tuple[Tensor, object]:
    """The parameters flat, and the mean loss as a function of them (counter as found)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v: Tensor, x: Tensor = X, t: Tensor = y) -> Tensor:
        chunks = v.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        buffers = {k: b.clone() for k, b in _CNT.items()}
        return nn.functional.cross_entropy(functional_call(model, (params, buffers), (x,)), t)

    return theta, loss


def _possible_trace_fisher_batch(model: nn.Module, X: Tensor) -> Tensor:
    """``||(1/N) sum_n grad NLL_n(y_hat_n)||^2`` for every assignment of sampled labels (C^N)."""
    theta, loss = _flat_loss(model, X, torch.zeros(len(X), dtype=torch.long))
    n, c = len(X), 3
    labels = torch.arange(c)
    # per example and class: the gradient of that example's NLL at that label
    per = vmap(
        vmap(lambda x, t: torch.func.grad(loss)(theta, x[None], t[None]), in_dims=(None, 0)),
        in_dims=(0, None),
    )(X, labels)  # (N, C, D)
    combos = torch.cartesian_prod(*[labels] * n)  # (C^N, N)
    sums = per[torch.arange(n), combos].sum(1)  # (C^N, D)
    return (sums / n).pow(2).sum(1)


def _critical_sharpness_brute(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """``2 / eta_c`` with ``eta_c`` the smallest SGD step ``theta - eta g`` raising the loss."""
    theta, loss = _flat_loss(model, X, y)
    g = torch.func.grad(loss)(theta)
    l0 = loss(theta)
    with torch.no_grad():
        grid = torch.linspace(0.0, 100.0, 2001, dtype=DT)[1:]
        rises = torch.stack([loss(theta - e * g) for e in grid]) > l0
        hi = float(grid[int(rises.nonzero()[0])])
        lo = hi - float(grid[1] - grid[0])
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if loss(theta - mid * g) > l0:
                hi = mid
            else:
                lo = mid
    return 2.0 / hi


def _values(report: object) -> dict:
    return report.to_dict()["entries"][0]["values"]  # type: ignore[attr-defined]


def _assert_trace_fisher_batch(value: float, model: nn.Module, X: Tensor) -> None:
    # one of the C^N values the sampled labels can give, to float64 rounding of sums of
    # N * D = 7 * 31 terms (~ 2e-14 relative; 1e-12 leaves room, and the values differ by far more)
    possible = _possible_trace_fisher_batch(model, X)
    assert float((possible - value).abs().min()) <= 1e-12 * value


def test_trace_fisher_batch_starts_every_batch_from_the_counter_found() -> None:
    # two batches: the second one's forward ran with the counter at 2 (1.2 x for a true 1.1 x)
    model, data = _model(), _data()
    X = torch.cat([b[0] for b in data])
    report = cl.analyze(model, nn.CrossEntropyLoss(), data, quantities=["trace_fisher_batch"])
    _assert_trace_fisher_batch(_values(report)["trace_fisher_batch"], model, X)
    assert int(model[1].cnt) == 0


def test_noise_scale_hessian_starts_every_forward_from_the_counter_found() -> None:
    # two batches: each probe's forwards ran on the counter (G^T H G 0.09488 for 0.09428)
    model, data = _model(), _data()
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    theta, loss = _flat_loss(model, X, y)
    g = torch.func.grad(loss)(theta)
    ghg = float(g @ torch.func.hessian(loss)(theta) @ g)
    report = cl.analyze(model, nn.CrossEntropyLoss(), data, quantities=["noise_scale_hessian"])
    # exact Hessian products in float64: rounding of D = 31 term sums, far below 1e-12
    assert abs(_values(report)["grad_hessian_grad"] - ghg) <= 1e-12 * ghg
    assert int(model[1].cnt) == 0


def _critical_diagnostics(model: nn.Module, quantities: list[str]) -> cl.Diagnostics:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return cl.Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        every=1,
        quantities=quantities,
        optimizer=opt,
        options={"critical_tol": 1e-6},
    )


def test_critical_sharpness_starts_every_forward_from_the_counter_found() -> None:
    # its gradient and line-search forwards ran on the counter: 0.08710 for a true 0.08192
    model, data = _model(), _data()
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    expected = _critical_sharpness_brute(model, X, y)
    record = _critical_diagnostics(model, ["critical_sharpness"]).measure(0, X, y)
    # the final bracket's relative width is at most critical_tol (1e-6): lambda_c = 2/eta_c is
    # within that of the true one (the brute force's bisection is exact to 2^-60)
    got = record["values"]["critical_sharpness"]
    assert abs(got - expected) <= 1e-6 * expected * (1 + 1e-6)
    assert int(model[1].cnt) == 0


def test_one_diagnostics_step_measures_every_quantity_at_the_counter_found() -> None:
    # trace_fisher_batch measured first left the counter at 1: sharpness 1.0908 for 0.9789
    model, data = _model(), _data()
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    theta, loss = _flat_loss(model, X, y)
    g = torch.func.grad(loss)(theta)
    H = torch.func.hessian(loss)(theta)
    top, ghg = float(torch.linalg.eigvalsh(H)[-1]), float(g @ H @ g)
    crit = _critical_sharpness_brute(model, X, y)
    quantities = ["trace_fisher_batch", "sharpness", "noise_scale_hessian", "critical_sharpness"]
    values = _critical_diagnostics(model, quantities).measure(0, X, y)["values"]
    _assert_trace_fisher_batch(values["trace_fisher_batch"], model, X)
    # Lanczos stops at a residual of sharpness_tol |theta| (default 1e-3), which bounds the error
    assert abs(values["sharpness"] - top) <= 1e-3 * top
    assert abs(values["grad_hessian_grad"] - ghg) <= 1e-12 * ghg
    assert abs(values["critical_sharpness"] - crit) <= 1e-6 * crit * (1 + 1e-6)
    assert int(model[1].cnt) == 0
