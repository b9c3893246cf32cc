"""Forwards that call random operations under the func backend's per-example maps (review s18).

A forward that draws from a freshly seeded generator (fixed random features, a fixed random
float attention mask) is deterministic, but ``vmap(randomness="different")`` gave every example
another "fixed" matrix: curvlab measured another function (the exact Fisher diagonal 17% off,
the mean gradient 132%, ``fisher_norms`` 0.933 for 1.018). Such a forward now takes the exact
per-example loop; one that draws from the global RNG (train-mode Dropout) is still mapped.

References are dense float64 brute force written here: one real forward and backward per
example (autograd), the GGN as ``(1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
import curvlab.backends._func as func_mod
from curvlab.backends._choice import CHOICES
from curvlab.estimators._fisher_trace import exact_trace_per_example

# float64 results summed in another order than the brute force: each entry is a sum of at most
# N * K = 18 products of O(1) factors, so rounding stays within ~1e2 eps; 1e4 eps = 2.2e-12
# leaves a margin of 100, and the defect moved the numbers by 1e-2 to 1e0 relative
TOL = 1e4 * torch.finfo(torch.float64).eps
N, C = 6, 3


def _fixed_features() -> torch.Tensor:
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


class SeededFeatures(nn.Module):
    """Deterministic: the same 'random' projection on every call (a freshly seeded generator)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        return self.lin(torch.tanh(x @ P))


class BufferFeatures(nn.Module):
    """The same function as :class:`SeededFeatures`, its projection a buffer (no random op)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin
        self.register_buffer("P", _fixed_features())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(x @ self.P))


class ReseededGlobal(nn.Module):
    """Deterministic through the global RNG: fixed features drawn after re-seeding it (forked)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            P = torch.randn(4, 4, dtype=x.dtype)
        return self.lin(torch.tanh(x @ P))


class SeededMaskAttention(nn.Module):
    """Attention with a fixed random float mask (a freshly seeded generator)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        mask = torch.randn(T, T, generator=torch.Generator().manual_seed(0), dtype=x.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (2, 2)).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask
        )
        return self.head(o.transpose(1, 2).flatten(-2).mean(1))


def _case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = {"seeded": SeededFeatures, "reseeded": ReseededGlobal, "sdpa": SeededMaskAttention}[
        name
    ]().double()
    g = torch.Generator().manual_seed(1)
    shape = (N, 3, 4) if name == "sdpa" else (N, 4)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return model, X, y


def _flat(d: dict, model: nn.Module) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1).double() for n, _ in model.named_parameters()])


def _brute(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of the mean CE's terms and the GGN of the mean CE, dense."""
    params = list(model.parameters())
    grads, ggn = [], 0.0
    for i in range(X.shape[0]):
        out = model(X[i : i + 1])[0]
        g = torch.autograd.grad(F.cross_entropy(out[None], y[i : i + 1]), params, retain_graph=True)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
        J = torch.stack(
            [
                torch.cat(
                    [t.reshape(-1) for t in torch.autograd.grad(out[k], params, retain_graph=True)]
                )
                for k in range(out.numel())
            ]
        )
        p = out.detach().softmax(0)
        ggn = ggn + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    G = torch.stack(grads)
    return {"grads": G, "ggn": ggn / X.shape[0]}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got - want).norm() / want.norm())
    assert err < TOL, f"relative error {err:.3g} (tolerance {TOL:.3g})"


@pytest.mark.parametrize("name", ["seeded", "reseeded", "sdpa"])
@pytest.mark.parametrize("backend", ["func", "auto"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_diag_fisher_of_a_forward_with_fixed_draws(name, backend, kind):
    model, X, y = _case(name)
    ref = _brute(model, X, y)
    want = (ref["grads"] ** 2).mean(0) if kind == "empirical" else ref["ggn"].diagonal()
    res = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind=kind, backend=backend)
    _close(_flat(res, model), want)
    if res.backend == "func":
        assert any("per-example loop" in line for line in res.info["fallbacks"]), res.info


@pytest.mark.parametrize("name", ["seeded", "sdpa"])
@pytest.mark.parametrize("backend", ["func", "auto"])
def test_gradient_stats_of_a_forward_with_fixed_draws(name, backend):
    model, X, y = _case(name)
    G = _brute(model, X, y)["grads"]
    s = cl.gradient_stats(model, nn.CrossEntropyLoss(), (X, y), backend=backend)
    _close(_flat(s.mean, model), G.mean(0))
    _close(_flat(s.second_moment, model), (G**2).mean(0))
    _close(_flat(s.variance, model), ((G - G.mean(0)) ** 2).mean(0))


@pytest.mark.parametrize("name", ["seeded", "sdpa"])
@pytest.mark.parametrize("backend", ["func", "auto"])
def test_fisher_norms_exact_of_a_forward_with_fixed_draws(name, backend):
    model, X, y = _case(name)
    ggn = _brute(model, X, y)["ggn"]
    res = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y), kind="exact", backend=backend)
    want = float(ggn.norm())
    assert abs(res.frobenius - want) < TOL * want, (res.frobenius, want)
    want_d = float(ggn.diagonal().norm())
    assert abs(res.diag_frobenius - want_d) < TOL * want_d, (res.diag_frobenius, want_d)


@pytest.mark.parametrize("matrix", ["ggn", "empirical_fisher"])
def test_exact_trace_per_example_of_a_forward_with_fixed_draws(matrix):
    model, X, y = _case("seeded")
    ref = _brute(model, X, y)
    want = float(ref["ggn"].trace() if matrix == "ggn" else (ref["grads"] ** 2).mean(0).sum())
    got, _ = exact_trace_per_example(model, nn.CrossEntropyLoss(), [(X, y)], matrix)
    assert abs(got - want) < TOL * want, (got, want)


def test_fisher_trace_of_a_forward_with_fixed_draws_is_that_of_the_same_function():
    # the same function with the projection a buffer (no random op: the per-example map is
    # exact there) and the same seed draws the same labels from the same outputs
    model, X, y = _case("seeded")
    twin = BufferFeatures(model.lin)
    assert torch.equal(model(X), twin(X))
    got = cl.fisher_trace(model, nn.CrossEntropyLoss(), [(X, y)], seed=3, chunk_size=4)
    want = cl.fisher_trace(twin, nn.CrossEntropyLoss(), [(X, y)], seed=3, chunk_size=4)
    assert abs(got.value - want.value) < TOL * want.value, (got.value, want.value)
    for k, v in want.by_layer.items():
        assert abs(got.by_layer[k] - v) < TOL * v, (k, got.by_layer[k], v)
    # brute force: Tr(F) = (1/N) sum_n ||grad l(x_n, c_n)||^2 at the drawn labels c_n, which
    # are not read back here: the value must be that of one of the C**N label assignments
    A = torch.stack(
        [
            torch.stack(
                [_brute(model, X[i : i + 1], torch.tensor([c]))["grads"][0] for c in range(C)]
            )
            .pow(2)
            .sum(1)
            for i in range(N)
        ]
    )  # (N, C): ||grad l(x_n, c)||^2
    idx = torch.cartesian_prod(*[torch.arange(C)] * N)  # (C**N, N)
    values = A[torch.arange(N), idx].mean(1)
    assert float((values - got.value).abs().min()) < TOL * got.value


def _dropout_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, C)).double()
    g = torch.Generator().manual_seed(1)
    n = 16
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return model.train(), X, torch.randint(0, C, (n,), generator=g)


def _count_probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = func_mod.loop_needed

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(func_mod, "loop_needed", counted)
    CHOICES.clear()  # a model of an earlier test may have left its signature (ids are reused)
    return calls


def test_a_train_mode_dropout_forward_is_still_mapped_and_stays_random():
    model, X, y = _dropout_model()
    forwards = []
    model[0].register_forward_pre_hook(lambda m, a: forwards.append(1))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG as the call found it
    assert first.info["fallbacks"] == (), first.info  # mapped, not the per-example loop
    assert len(forwards) < X.shape[0]  # the loop would run one forward per example
    torch.manual_seed(6)
    other = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert not torch.equal(_flat(first, model), _flat(other, model))  # each example's own masks


def test_a_dropout_that_drops_nothing_on_the_probe_is_still_mapped():
    # the probe reads the global RNG's states, not the outputs: a rare drop is still random
    model, X, y = _dropout_model()
    model[2].p = 1e-9
    res = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert res.info["fallbacks"] == (), res.info


def test_a_train_mode_dropout_forward_is_probed_once_per_signature(monkeypatch):
    calls = _count_probes(monkeypatch)
    model, X, y = _dropout_model()
    cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert len(calls) == 1
    again = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert len(calls) == 1  # remembered with the signature: no probe passes in a repeated call
    assert again.info["fallbacks"] == ()


def test_a_forward_with_fixed_draws_is_probed_once_per_signature(monkeypatch):
    calls = _count_probes(monkeypatch)
    model, X, y = _case("seeded")
    first = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="exact", backend="func")
    again = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="exact", backend="func")
    assert len(calls) == 1
    assert any("torch.Generator" in line for line in again.info["fallbacks"]), again.info
    assert torch.equal(_flat(first, model), _flat(again, model))
