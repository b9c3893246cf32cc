"""K-FAC of a weight the model also uses outside its layer's calls, and FullFisherNoise's dtype.

``cl.kfac`` reads a layer's factors from its module calls. A weight the model also reads directly
(``F.linear(h, layer.weight)``, a matmul, ``F.embedding`` on it) has a Fisher block with that use's
share, which ``kron(G, A)`` of the calls lacks: for one example of a Linear layer the block the
docs call exact was not (found in review s18; ``KFACNoise`` drew 0.273 for such a weight's summed
noise variance where its empirical-Fisher diagonal sums to 0.592). Such a weight is now left out
of the factors, with the reason in ``info["left_out"]``, and ``KFACNoise`` gives it (and its
layer's bias) the Fisher diagonal. A layer whose forward never runs is reported there too.
Layers that share one weight, each calling it, stay one block; a head tied to an ``nn.Embedding``
keeps its documented factors of the head's calls.

References are dense float64 brute force written here (torch.func): the GGN block
``J^T H J`` of one example, the empirical-Fisher diagonal ``(1/N) sum_n (d NLL_n / d theta)^2``
(``"mean"`` cross-entropy, one term per example).

``FullFisherNoise`` on a 16-bit model returned its draws in the parameters' 16-bit dtype, where
docs/training-loops.md promises every result in float32; they are float32 now, with covariance
the Fisher of the (upcast) 16-bit model within Monte-Carlo error.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import curvlab as cl
from curvlab.noise import FullFisherNoise, KFACNoise

_DIAG = "__diagonal__"


class _Direct(nn.Module):
    """``a`` is called as a layer and its weight is also read by ``F.linear`` (the repro)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(F.linear(h, self.a.weight))
        return self.b(h)


class _DirectFirst(nn.Module):
    """The direct use comes before the layer's call (it is in the graph of the call's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.a.weight.t())
        return self.b(torch.tanh(self.a(h)))


class _OnlyDirect(nn.Module):
    """``a``'s forward never runs: the model reads its parameters with ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(F.linear(x, self.a.weight, self.a.bias)))


class _SharedLayers(nn.Module):
    """Two layers share one weight, each calling it: one block, as before."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


class _TiedHead(nn.Module):
    """A head tied to an ``nn.Embedding`` (documented: the head's calls give its factors)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def _data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (n,), generator=g)


def _ggn(model: nn.Module, X: Tensor, y: Tensor) -> tuple[list[str], Tensor]:
    """Dense GGN of the mean cross-entropy, ``J^T H J`` (flattened row-major, named order)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)

    def out(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, p, (X,))

    J = jacrev(out)(params)
    f = out(params)
    H = hessian(lambda z: F.cross_entropy(z, y))(f).reshape(f.numel(), f.numel())
    Jm = torch.cat([J[n].reshape(f.numel(), -1) for n in names], 1)
    return names, Jm.t() @ H @ Jm


def _block(names: list[str], M: Tensor, model: nn.Module, name: str) -> Tensor:
    sizes = [p.numel() for _, p in model.named_parameters()]
    start = sum(sizes[: names.index(name)])
    end = start + sizes[names.index(name)]
    return M[start:end, start:end]


def _empirical_diag(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``(1/N) sum_n (d NLL_n / d theta)^2`` per parameter (mean cross-entropy, ``c = 1``)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def nll(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None], reduction="sum")

    per = vmap(grad(nll), in_dims=(None, 0, 0))(params, X, y)
    return {n: (g**2).mean(0) for n, g in per.items()}


# ------------------------------------------------------------------------------------- kfac


@pytest.mark.parametrize("cls", [_Direct, _DirectFirst])
def test_a_weight_used_outside_its_layer_is_left_out_with_its_reason(cls: type) -> None:
    """One example: the direct-use weight gets no (wrong) factors and ``info["left_out"]`` says
    why; the other layer's ``kron(G, A)`` is its exact GGN block, its ``G`` the bias block."""
    torch.manual_seed(0)
    model = cls().double()
    X, y = _data(1)
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert list(f) == ["b"]
    why = f.info["left_out"]["a"]
    assert "outside" in why and "'a.weight'" in why and "diag_fisher" in why
    names, ggn = _ggn(model, X, y)
    ref_w = _block(names, ggn, model, "b.weight")
    ref_b = _block(names, ggn, model, "b.bias")
    tol = 1e-10 * float(ggn.abs().max())
    assert float((f["b"].weight_block() - ref_w).abs().max()) <= tol
    assert float((f["b"].bias_block() - ref_b).abs().max()) <= tol


def test_a_layer_whose_forward_never_runs_is_reported() -> None:
    """Its weight is used directly (``F.linear``): no factors, and the reason in ``left_out``
    (it was silently absent)."""
    torch.manual_seed(0)
    model = _OnlyDirect().double()
    X, y = _data(3)
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert list(f) == ["b"]
    assert "outside" in f.info["left_out"]["a"]


def test_a_layer_the_model_skips_is_reported_as_never_run() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x)

    torch.manual_seed(0)
    f = cl.kfac(Skip().double(), nn.CrossEntropyLoss(), _data(3), kind="exact")
    assert list(f) == ["a"]
    assert "never ran" in f.info["left_out"]["unused"]


def test_layers_sharing_one_weight_and_a_tied_embedding_head_keep_their_factors() -> None:
    torch.manual_seed(0)
    X, y = _data(3)
    f = cl.kfac(_SharedLayers().double(), nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert list(f) == ["a", "b"] and not f["a"].has_bias and f.info["left_out"] == {}
    ids = torch.tensor([0, 3, 4])
    t = cl.kfac(_TiedHead().double(), nn.CrossEntropyLoss(), (ids, y), kind="exact")
    assert list(t) == ["head"] and t.info["left_out"] == {}


def test_kfac_on_an_ordinary_model_is_the_exact_block_for_one_example() -> None:
    """The check leaves ordinary layers alone (exact for one example, both layers)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = _data(1)
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert list(f) == ["0", "2"] and f.info["left_out"] == {}
    names, ggn = _ggn(model, X, y)
    tol = 1e-10 * float(ggn.abs().max())
    for layer in ("0", "2"):
        ref = _block(names, ggn, model, f"{layer}.weight")
        assert float((f[layer].weight_block() - ref).abs().max()) <= tol


# ------------------------------------------------------------------------------- KFACNoise


def test_kfac_noise_gives_a_directly_used_weight_its_empirical_fisher_diagonal() -> None:
    """The state holds the brute-force empirical-Fisher diagonal of ``a``'s weight and bias, and
    the draws' variance matches ``scale^2`` times it within Monte-Carlo error (the calls' factors
    gave 0.273 summed where the diagonal sums to 0.592)."""
    torch.manual_seed(0)
    model = _Direct().double()
    X, y = _data(6, seed=1)
    loss_fn = nn.CrossEntropyLoss()
    sampler = KFACNoise("empirical", scale=1.0)
    gen = torch.Generator().manual_seed(0)
    state = sampler.estimate(model, loss_fn, X, y, gen)
    ref = _empirical_diag(model, X, y)
    assert "a" not in state and "b" in state
    for n in ("a.weight", "a.bias"):
        torch.testing.assert_close(state[_DIAG][n], ref[n], rtol=1e-10, atol=1e-14)
    S = 4000
    draws = {n: [] for n in ("a.weight", "a.bias")}
    for _ in range(S):
        eps = sampler.draw(model, state, gen)
        for n in draws:
            draws[n].append(eps[n])
    for n, ds in draws.items():
        v = torch.stack(ds).pow(2).mean(0)
        # the mean of S squared N(0, d) draws has standard error d * sqrt(2 / S)
        z = (v - ref[n]) / (ref[n] * math.sqrt(2 / S))
        assert float(z.abs().max()) < 5.0, (n, float(z.abs().max()))


# ------------------------------------------------------------------------ FullFisherNoise


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_full_fisher_noise_of_a_bfloat16_model_is_float32_with_the_fisher_covariance(
    kind: str,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    X, y = _data(8, seed=2)
    Xb = X.to(torch.bfloat16)
    loss_fn = nn.CrossEntropyLoss()
    m64 = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    X64 = Xb.double()
    if kind == "true":
        names, M = _ggn(m64, X64, y)
        ref = M.diag()
    else:
        emp = _empirical_diag(m64, X64, y)
        names = list(emp)
        ref = torch.cat([emp[n].reshape(-1) for n in names])
    sampler = FullFisherNoise(kind, scale=1.0)
    gen = torch.Generator().manual_seed(0)
    S = 1000
    draws = []
    for _ in range(S):
        eps = sampler.sample(model, loss_fn, Xb, y, generator=gen)
        assert {t.dtype for t in eps.values()} == {torch.float32}
        draws.append(torch.cat([eps[n].double().reshape(-1) for n in names]))
    sq = torch.stack(draws).pow(2)
    # E|eps|^2 = tr(F): the mean of S draws' |eps|^2 within 5 of its standard errors (measured
    # from the draws: the labels' noise is not Gaussian), plus the bfloat16 forward's own error
    # (docs/training-loops.md: 16-bit quantities within 5e-2 of the float64 ones)
    norms = sq.sum(1)
    se = float(norms.std()) / math.sqrt(S)
    total, want = float(norms.mean()), float(ref.sum())
    assert abs(total - want) <= 5 * se + 5e-2 * want, (total, want, se)
    # per entry: the largest entries (half the trace at least) within 5 standard errors each
    v, se_i = sq.mean(0), sq.std(0) / math.sqrt(S)
    big = ref >= ref.max() / 4
    assert float(ref[big].sum()) >= float(ref.sum()) / 2
    z = (v - ref).abs() / (5 * se_i + 5e-2 * ref)
    assert float(z[big].max()) <= 1.0, float(z[big].max())
