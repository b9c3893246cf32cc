"""Noise of parameters the model reads outside their layer's call, on NoisyOptimizer's one-pass path.

``KFACNoise("empirical")``'s captured path (``with noisy.capture(): loss.backward()``) gave a
parameter that the model reads without calling its layer (``F.linear(x, layer.weight)``;
``nn.MultiheadAttention`` reads ``out_proj.weight`` and ``out_proj.bias`` so) no noise at all:
0.0 where the engine path (``noisy.step(inputs=, targets=)``) drew its Fisher diagonal (max
``|noise|`` 0.52 on the weight, 0.72 on the bias), and the other layers' noise differed too (the
generator drew fewer numbers). The taps saw no statistics for such a use and did not check the
graph for it, as :class:`~curvlab.noise.DiagFisherNoise`'s capture does. Now every capture with
layer callbacks checks that each tapped parameter enters the graph once through its layer, and
hands a step where one does not over to the engine path.

Checked for every sampler with a one-pass path, on a model using a layer's parameters directly,
on ``nn.MultiheadAttention`` (trainable, and with its input projection frozen: then only
``out_proj``, read directly, is tapped) and on a weight used both by its layer and directly:

* captured noise equals the engine path's to rounding (same batch, same generator);
* the captured step's draws have the documented covariance, against dense float64 brute force
  (second moments over many draws, within six standard errors);
* a model whose layers are all called as layers measures in the step itself (no second pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl


class _Direct(nn.Module):
    """``a``'s weight and bias used directly: the layer never runs, its parameters have gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(x, self.a.weight, self.a.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Tied(nn.Module):
    """``a``'s weight used by its layer's call and again directly."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(torch.tanh(self.a(x)), self.a.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Attention(nn.Module):
    """Self-attention (batch first) pooled over positions, then a linear head."""

    frozen = False

    def __init__(self) -> None:
        super().__init__()
        self.att, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)
        if self.frozen:  # only out_proj, which the attention reads directly, is tapped
            self.att.in_proj_weight.requires_grad_(False)
            self.att.in_proj_bias.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.att(x, x, x, need_weights=False)[0].mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _AttentionFrozenIn(_Attention):
    frozen = True


class _Plain(nn.Module):
    """Every parameter used through its layer's call, once."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_SAMPLERS: dict[str, Callable[[], cl.noise.NoiseSampler]] = {
    "diag": lambda: cl.noise.DiagFisherNoise("empirical", scale=1.0),
    "trace": lambda: cl.noise.FisherTraceNoise("empirical", scale=1.0),
    "kfac": lambda: cl.noise.KFACNoise("empirical", scale=1.0),
    "full-empirical": lambda: cl.noise.FullFisherNoise("empirical", scale=1.0),
    "full-true": lambda: cl.noise.FullFisherNoise("true", scale=1.0),
}
_MODELS = {
    "direct": _Direct,
    "tied": _Tied,
    "attention": _Attention,
    "attention-frozen-in": _AttentionFrozenIn,
}
N = 8


def _setup(
    model_cls: type[nn.Module], sampler: cl.noise.NoiseSampler, recompute_every: int = 1
) -> tuple[nn.Module, cl.noise.NoisyOptimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = model_cls().double().eval()
    g = torch.Generator().manual_seed(1)
    shape = (N, 3, 4) if issubclass(model_cls, _Attention) else (N, 4)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(params, lr=0.0),
        sampler,
        model,
        nn.CrossEntropyLoss(),
        seed=3,
        recompute_every=recompute_every,
    )
    return model, noisy, X, y


def _clean_grads(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(X), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step_noise(
    model_cls: type[nn.Module], sampler_name: str, path: str
) -> dict[str, torch.Tensor]:
    """The noise one step adds to ``.grad``: on the captured one-pass path or the engine path."""
    model, noisy, X, y = _setup(model_cls, _SAMPLERS[sampler_name]())
    clean = _clean_grads(model, X, y)
    noisy.zero_grad()
    if path == "captured":
        with noisy.capture():
            noisy.loss_fn(model(X), y).backward()
        noisy.step()
    else:
        noisy.loss_fn(model(X), y).backward()
        noisy.step(inputs=X, targets=y)
    return {n: p.grad - clean[n] for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sampler_name", list(_SAMPLERS))
@pytest.mark.parametrize("model_name", list(_MODELS))
def test_captured_noise_equals_engine_noise(model_name: str, sampler_name: str) -> None:
    """docs/noise.md: on the same batch and generator both paths draw identical noise (to
    rounding). Before the fix KFACNoise's captured path gave ``a`` (and ``out_proj``) 0.0."""
    captured = _step_noise(_MODELS[model_name], sampler_name, "captured")
    engine = _step_noise(_MODELS[model_name], sampler_name, "engine")
    assert set(captured) == set(engine)
    for name in captured:
        assert engine[name].abs().max() > 0, name
        # float64 throughout: the same factorisation of the same matrices, rounding only
        torch.testing.assert_close(captured[name], engine[name], rtol=1e-9, atol=1e-12, msg=name)


# --- brute force: the documented covariance of the captured step's draws ----------------------


def _per_example_grads(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``grad NLL_n`` of every trainable parameter, ``(N, *shape)``, float64 (torch.func)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def nll(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**p, **buffers}, (x.unsqueeze(0),))
        return F.cross_entropy(out, t.unsqueeze(0))

    rows = [torch.func.grad(nll)(params, X[i], y[i]) for i in range(X.shape[0])]
    return {n: torch.stack([r[n] for r in rows]) for n in params}


def _documented_covariances(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, sampler_name: str
) -> dict[str, torch.Tensor]:
    """Dense covariance of each parameter's noise (row-major flattening), ``scale = 1``, mean
    CE (``c = 1``): ``F_emp = (1/N) sum_n g_n g_n^T``; DiagFisherNoise its diagonal,
    FisherTraceNoise ``Tr(F_emp)/d I``, KFACNoise ``kron(G, A)`` for the head's weight and ``G``
    for its bias (``A = (1/N) sum a a^T`` of the head's inputs, ``G = (1/N) sum g g^T`` of its
    output gradients, which are the per-example bias gradients) and the diagonal of ``F_emp`` for
    the parameters read outside their layer."""
    grads = _per_example_grads(model, X, y)
    n = X.shape[0]
    diag = {k: (g.reshape(n, -1) ** 2).mean(0) for k, g in grads.items()}
    if sampler_name == "trace":
        d = sum(v.numel() for v in diag.values())
        mean = sum(v.sum() for v in diag.values()) / d
        return {k: torch.eye(v.numel(), dtype=v.dtype) * mean for k, v in diag.items()}
    cov = {k: torch.diag(v) for k, v in diag.items()}
    if sampler_name == "kfac":
        with torch.no_grad():
            a = model.features(X)
        gb = grads["head.bias"]
        G, A = gb.t() @ gb / n, a.t() @ a / n
        cov["head.weight"], cov["head.bias"] = torch.kron(G, A), G
    return cov


@pytest.mark.parametrize(
    ("model_name", "sampler_name"),
    [
        ("direct", "diag"),
        ("direct", "trace"),
        ("direct", "kfac"),
        ("attention-frozen-in", "diag"),
        ("attention-frozen-in", "kfac"),
        ("tied", "diag"),
        ("tied", "trace"),
    ],
)
def test_captured_draws_have_the_documented_covariance(model_name: str, sampler_name: str) -> None:
    """The captured step measures the state; later steps reuse it (``recompute_every``): the
    differences of ``.grad`` between steps are independent draws. Their second moments ``M``
    match the dense covariance ``S`` within six standard errors, ``Var(x_i x_j) = S_ii S_jj +
    S_ij^2`` for Gaussian draws (before the fix KFACNoise's draws of ``a`` were 0)."""
    draws = 1500
    model, noisy, X, y = _setup(_MODELS[model_name], _SAMPLERS[sampler_name](), draws + 1)
    expected = _documented_covariances(model, X, y, sampler_name)
    noisy.zero_grad()
    with noisy.capture():
        noisy.loss_fn(model(X), y).backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.grad.clone() for n, p in trained.items()}
    noisy.step()
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in trained}
    for _ in range(draws):
        for name, p in trained.items():
            samples[name].append((p.grad - before[name]).reshape(-1))
            before[name] = p.grad.clone()
        noisy.step()  # the cached state, a new draw (lr 0: the model stays)
    for name, S in expected.items():
        x = torch.stack(samples[name])
        M = x.t() @ x / draws
        v = torch.diagonal(S)
        se = ((v[:, None] * v[None, :] + S**2) / draws).sqrt()
        slack = 1e-12 * float(v.max())
        assert bool((M - S).abs().le(6 * se + slack).all()), (name, (M - S).abs().max(), se.max())
        assert bool(x.mean(0).abs().le(6 * (v / draws).sqrt() + slack).all()), name
        assert float(v.max()) > 0, name


# --- the hot path stays one pass where every layer is called as a layer ------------------------


@pytest.mark.parametrize("sampler_name", ["diag", "trace", "kfac"])
def test_layers_called_as_layers_measure_in_the_step(
    sampler_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose layers are all called normally keeps its captured noise: the step measures
    in its own backward pass (no separate pass of ``estimate``), and that noise is the engine
    path's to rounding."""
    engine = _step_noise(_Plain, sampler_name, "engine")
    sampler_cls = type(_SAMPLERS[sampler_name]())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the one-pass step ran a separate pass")

    monkeypatch.setattr(sampler_cls, "estimate", refuse)
    captured = _step_noise(_Plain, sampler_name, "captured")
    for name in engine:
        assert math.isfinite(float(captured[name].abs().max())) and captured[name].abs().max() > 0
        torch.testing.assert_close(captured[name], engine[name], rtol=1e-9, atol=1e-12, msg=name)
