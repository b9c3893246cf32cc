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
