"""Review s21 (K-FAC): a bias the model also reads outside its layer's calls, a bias shared by
layers with different weights (K-FAC and KFACNoise, both paths), and ``A`` of a layer whose calls
cover different numbers of positions (uneven calls, uneven batches, chunking).

Brute force: dense float64 empirical Fisher / GGN pieces from torch.func, written here.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

import curvlab as cl
from curvlab.noise import KFACNoise, NoisyOptimizer

D = torch.float64
# float64 sums of a few products of O(1) numbers: rounding ~1e-16 relative; 1e-12 leaves room for
# the different summation orders of brute force and K-FAC, far below the 4x (or 1.2x) errors
RTOL = 1e-12


class UsedTwice(nn.Module):
    """The bias of ``a`` is read by ``a``'s call and once more outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.a.bias


class SharedBias(nn.Module):
    """Two layers with weights of their own and one bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)
        self.b.bias = self.a.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(torch.tanh(x))


def _ef(model: nn.Module, X: Tensor, y: Tensor, name: str) -> Tensor:
    """Empirical Fisher block of parameter ``name`` under cross-entropy "mean":
    ``(1/N) sum_n g_n g_n^T``, ``g_n`` the gradient of example ``n``'s NLL."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p: Tensor, x: Tensor, t: Tensor) -> Tensor:
        out = functional_call(model, {**params, name: p}, (x[None],))
        return nn.functional.cross_entropy(out, t[None], reduction="sum")

    rows = torch.stack([grad(nll)(params[name], X[i], y[i]).reshape(-1) for i in range(X.shape[0])])
    return rows.T @ rows / X.shape[0]


def _one_example(cls: type[nn.Module], seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = cls().to(D)
    return model, torch.randn(1, 3, dtype=D), torch.randint(0, 2, (1,))


@pytest.mark.parametrize("cls", [UsedTwice, SharedBias])
def test_a_bias_not_only_its_layers_gets_no_bias_block(cls: type[nn.Module]) -> None:
    """One example, Linear: the docs call ``kron(G, A)`` and the bias block ``G`` exact. A bias
    read outside its layer's call, or shared by a layer with another weight, is not the block
    of ``G``: it was (bias_block 4x below the exact one); ``has_bias`` is ``False`` now, and the
    weight keeps its (exact) factors."""
    torch.set_num_threads(1)
    model, X, y = _one_example(cls, 0)
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="empirical")
    assert not f["a"].has_bias and f["a"].bias_block() is None
    torch.testing.assert_close(
        f["a"].weight_block(), _ef(model, X, y, "a.weight"), rtol=RTOL, atol=1e-15
    )
    if cls is SharedBias:
        assert not f["b"].has_bias


def test_a_bias_shared_with_another_module_gets_no_bias_block() -> None:
    """Only the layers outside the selection share the bias: still no bias block of ``a``."""
    model, X, y = _one_example(SharedBias, 1)
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact", params=["a.weight"])
    assert list(f) == ["a"] and not f["a"].has_bias


class HeldBias(nn.Module):
    """The module holds its layer's bias as a parameter of its own (BERT's MLM head:
    ``decoder.bias = self.bias``) and reads it only through the layer's call."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.bias = self.a.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x)


def test_a_bias_only_held_by_another_module_keeps_its_exact_block() -> None:
    """No use outside the call: the bias block ``G`` stays, exact for one example (the bias is
    named ``"bias"``, after the module that registers it first)."""
    torch.set_num_threads(1)
    model, X, y = _one_example(HeldBias, 0)
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="empirical")
    assert f["a"].has_bias
    torch.testing.assert_close(f["a"].bias_block(), _ef(model, X, y, "bias"), rtol=RTOL, atol=1e-15)


def test_a_layer_called_twice_with_its_bias_keeps_the_bias_block() -> None:
    """Each call of a layer is one use of its bias: two edges into it for two calls, none
    outside them, so the bias block ``G`` (summed over both calls) is kept."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(torch.tanh(self.a(x)))

    torch.manual_seed(2)
    model = Twice().to(D)
    X, y = torch.randn(2, 3, dtype=D), torch.randint(0, 3, (2,))
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert f["a"].has_bias


def _draw_variance(sampler: KFACNoise, model: nn.Module, state: dict, draws: int) -> Tensor:
    gen = torch.Generator().manual_seed(5)
    noise = torch.stack([sampler.draw(model, state, gen)["a.bias"] for _ in range(draws)])
    return noise.pow(2).mean(0)  # the noise has mean zero


@pytest.mark.parametrize("cls", [UsedTwice, SharedBias])
def test_kfac_noise_draws_such_a_bias_from_its_diagonal(cls: type[nn.Module]) -> None:
    """KFACNoise: the bias gets its empirical-Fisher diagonal (it drew from ``G``, 4x low, and
    for the shared bias from the last layer's ``G`` over the diagonal)."""
    torch.set_num_threads(1)
    model, X, y = _one_example(cls, 0)
    sampler = KFACNoise("empirical", scale=1.0)
    state = sampler.estimate(model, nn.CrossEntropyLoss(), X, y, torch.Generator().manual_seed(0))
    want = _ef(model, X, y, "a.bias").diagonal()
    torch.testing.assert_close(state["__diagonal__"]["a.bias"], want, rtol=RTOL, atol=0)
    assert sampler._saved_problem(state, model) is None
    # mean of n squared normals: relative standard deviation sqrt(2/n) = 0.022 at n = 4000;
    # 0.15 is 6.7 of them, and far below the 4x of drawing from G
    got = _draw_variance(sampler, model, state, 4000)
    torch.testing.assert_close(got, want, rtol=0.15, atol=0)


@pytest.mark.parametrize("cls", [UsedTwice, SharedBias])
def test_captured_step_gives_such_a_bias_its_diagonal(cls: type[nn.Module]) -> None:
    """The training step's path (NoisyOptimizer): the same diagonal as the engine path."""
    torch.set_num_threads(1)
    model, X, y = _one_example(cls, 0)
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        KFACNoise("empirical", scale=1.0),
        model,
        lf,
        recompute_every=100,
        seed=0,
    )

    def closure() -> Tensor:
        noisy.zero_grad()
        loss = lf(model(X), y)
        loss.backward()
        return loss

    noisy.step(closure)
    want = _ef(model, X, y, "a.bias").diagonal()
    torch.testing.assert_close(noisy._state["__diagonal__"]["a.bias"], want, rtol=RTOL, atol=0)


class Split(nn.Module):
    """One Linear called on the first ``k`` positions and on the rest (uneven calls), the
    positions' outputs mixed by a fixed nonlinearity into the logits."""

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.k = k
        self.l = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.l(x[:, : self.k]), self.l(x[:, self.k :]))

    @staticmethod
    def post(z1: Tensor, z2: Tensor) -> Tensor:
        return torch.tanh(z1).sum(1) + 0.5 * torch.tanh(z2).pow(2).sum(1) + torch.tanh(z2).sum(1)


def _split_data() -> list[tuple[Tensor, Tensor]]:
    """Two batches of different sizes and sequence lengths (1 + 3 and 1 + 5 positions)."""
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(n, t, 2, generator=gen, dtype=D), torch.randint(0, 3, (n,), generator=gen))
        for n, t in ((3, 4), (2, 6))
    ]


def _split_brute(model: Split, data: list, approx: str) -> tuple[Tensor, Tensor]:
    """``A`` and the exact-GGN ``G`` by their definitions: every position of every call is an
    example of the layer (``"expand"``: ``A = (1/N) sum_n (1/T_n) sum_t x x^T``, ``G = (1/N)
    sum_n sum_t J_t^T H_n J_t``), or each example's mean input over all its positions and its
    summed output Jacobian (``"reduce"``); ``T_n`` counts the positions of all calls, ``J_t``
    is the Jacobian of example ``n``'s logits in the layer output at position ``t``, ``H_n``
    the Hessian of its NLL in the logits."""
    N = sum(x.shape[0] for x, _ in data)
    A = torch.zeros(2, 2, dtype=D)
    G = torch.zeros(3, 3, dtype=D)
    W, b = model.l.weight.detach(), model.l.bias.detach()
    for X, Y in data:
        for x, t in zip(X, Y):
            z1, z2 = x[: model.k] @ W.T + b, x[model.k :] @ W.T + b
            J1, J2 = jacrev(Split.post, argnums=(0, 1))(z1[None], z2[None])
            J = torch.cat([J1[0, :, 0], J2[0, :, 0]], 1).permute(1, 0, 2)  # (T, C, out)
            logits = Split.post(z1[None], z2[None])[0]
            H = hessian(lambda o, t=t: nn.functional.cross_entropy(o[None], t[None]))(logits)
            if approx == "expand":
                A += x.T @ x / x.shape[0]
                G += torch.einsum("tco,cd,tdp->op", J, H, J)
            else:
                u, Js = x.mean(0), J.sum(0)
                A += torch.outer(u, u)
                G += Js.T @ H @ Js
    return A / N, G / N


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_uneven_calls_average_every_position(approx: str, chunk_size: int | None) -> None:
    """A layer called on 1 and on 3 (5) positions: ``A`` averages all positions of all its
    calls, as one call on all of them does (it averaged the calls' own means: 0.8974 for the
    one-call 0.7280), over uneven batches and chunks; ``G`` is unchanged."""
    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = Split().to(D)
    data = _split_data()
    A, G = _split_brute(model, data, approx)
    f = cl.kfac(
        model, nn.CrossEntropyLoss(), data, kind="exact", approx=approx, chunk_size=chunk_size
    )["l"]
    torch.testing.assert_close(f.A, A, rtol=RTOL, atol=1e-15)
    torch.testing.assert_close(f.G, G, rtol=RTOL, atol=1e-15)
    # the labels do not enter A: the Monte Carlo kind's A is the same
    mc = cl.kfac(model, nn.CrossEntropyLoss(), data, kind="mc", seed=0, approx=approx)["l"]
    torch.testing.assert_close(mc.A, A, rtol=RTOL, atol=1e-15)


def test_uneven_calls_equal_one_call_on_all_positions() -> None:
    """The same function as one call on every position gives the same factors (expand)."""
    torch.set_num_threads(1)
    torch.manual_seed(4)
    model = Split(k=1).to(D)

    class Whole(nn.Module):
        def __init__(self, l: nn.Linear) -> None:
            super().__init__()
            self.l = l

        def forward(self, x: Tensor) -> Tensor:
            z = self.l(x)
            return Split.post(z[:, :1], z[:, 1:])

    data = _split_data()
    f = cl.kfac(model, nn.CrossEntropyLoss(), data, kind="exact")["l"]
    g = cl.kfac(Whole(model.l), nn.CrossEntropyLoss(), data, kind="exact")["l"]
    torch.testing.assert_close(f.A, g.A, rtol=RTOL, atol=1e-15)
    torch.testing.assert_close(f.G, g.G, rtol=RTOL, atol=1e-15)
