"""Review sweep 15 (model zoo): K-FAC on models whose check passes run the model again, and
curvature products of a max_norm embedding tied to a linear head.

Every number is checked against a brute force written here: torch.func Jacobians of each
layer's output (K-FAC's ``A`` and exact ``G``) and torch.func Hessians / GGNs of the loss over
the flat parameters, at the weights the model's forward pass uses (the rows of a max_norm
embedding renormalised, ``max_norm`` then switched off).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl

DTYPE = torch.float64
N, V, T = 4, 6, 3


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.norm())


# --- brute force ------------------------------------------------------------------------------


def _token_loss(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over every token (``(N, T, V)`` logits) or example (``(N, K)``)."""
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _kfac_reference(
    run: Callable[[Tensor], Tensor], layer: nn.Module, X: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    """``A`` (mean of the layer's inputs' outer products over examples and positions) and the
    exact ``G`` (``sum_n sum_t J_nt^T H_n J_nt``, ``J_nt``: example n's output by the layer's
    output at position t) of a Linear ``layer`` in the deterministic forward ``run``."""
    captured: dict[str, Tensor] = {}

    def record(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        captured["x"], captured["z"] = inp[0].detach(), out.detach()

    handle = layer.register_forward_hook(record)
    with torch.no_grad():
        out = run(X)
    handle.remove()
    z0, x = captured["z"], captured["x"]

    def f(eps: Tensor) -> Tensor:
        h = layer.register_forward_hook(lambda m, i, o: o + eps)
        try:
            return run(X)
        finally:
            h.remove()

    J = jacrev(f)(torch.zeros_like(z0))  # (*out.shape, *z0.shape)
    H = hessian(lambda o: _token_loss(o, y))(out)  # (*out.shape, *out.shape)
    n_ex, k = out.shape[0], out[0].numel()
    G = torch.zeros(z0.shape[-1], z0.shape[-1], dtype=DTYPE)
    for n in range(n_ex):
        Jn = J[n].reshape(k, n_ex, -1, z0.shape[-1])[:, n]  # (K, T, O)
        Hn = H[n].reshape(k, n_ex, k)[:, n]  # (K, K)
        G = G + torch.einsum("kto,kl,ltp->op", Jn, Hn, Jn)
    U = x.reshape(-1, x.shape[-1])
    return U.T @ U / U.shape[0], G


def _flat_function(model: nn.Module, X: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The model's output as a function of its flat parameters (``named_parameters`` order)."""
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def f(theta: Tensor) -> Tensor:
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(theta.split(sizes), shapes))))
        return functional_call(model, parts, (X,))

    return f, torch.cat([p.detach().reshape(-1) for p in params.values()])


def _hessian_and_ggn(model: nn.Module, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The Hessian and the GGN of the mean token cross-entropy over the flat parameters."""
    f, theta = _flat_function(model, X)
    Hf = hessian(lambda t: _token_loss(f(t), y))(theta)
    out = f(theta)
    J = jacrev(f)(theta).reshape(out.numel(), -1)
    Ho = hessian(lambda o: _token_loss(o, y))(out).reshape(out.numel(), out.numel())
    return Hf, J.T @ Ho @ J


# --- models -----------------------------------------------------------------------------------


class _Noisy(nn.Module):
    """Gaussian noise from the model's own generator (the global RNG untouched); the noise of
    the last pass with gradient is kept, so a brute force can replay it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)
        self.gen = torch.Generator().manual_seed(0)
        self.fixed: Tensor | None = None  # replay this noise instead of drawing
        self.noise: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        noise = self.fixed
        if noise is None:
            noise = 0.1 * torch.randn(h.shape, generator=self.gen, dtype=h.dtype)
            if torch.is_grad_enabled():
                self.noise = noise
        return self.b(torch.tanh(h + noise))


class _TiedLM(nn.Module):
    """A token model whose ``Embedding(max_norm=...)`` weight is also its linear head's."""

    def __init__(self, max_norm: float | None = 0.8, tied: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 4, max_norm=max_norm)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))))


def _tied_problem(tied: bool = True) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    model = _TiedLM(tied=tied).to(DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
        model.emb.weight.mul_(2.0)  # rows well above max_norm: every forward renormalises
    X = torch.randint(0, V, (N, T), generator=g)
    y = torch.randint(0, V, (N, T), generator=g)
    return model, X, y


def _renormed(model: nn.Module, X: Tensor) -> nn.Module:
    """The model at the weights its forward pass on ``X`` uses, with max_norm switched off."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref(X)  # renormalises the looked-up rows in place
    ref.emb.max_norm = None
    return ref


def _reference(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Hessian and GGN of the mean token loss over equal batches, each at the weights its own
    forward pass uses: the rows renormalised by it and by the batches before it."""
    state = copy.deepcopy(model)
    H = G = 0
    for X, y in batches:
        ref = _renormed(state, X)
        Hb, Gb = _hessian_and_ggn(ref, X, y)
        H, G = H + Hb / len(batches), G + Gb / len(batches)
        with torch.no_grad():
            state(X)  # the next batch's forward sees these rows renormalised
    return H, G


# --- 1. K-FAC: the check's own passes are not the factors' calls ------------------------------


def test_kfac_of_a_model_with_its_own_generator_matches_brute_force() -> None:
    """Found in review: the coupling check ran the model again (outputs differ: the noise), the
    capture recorded those calls of 2 examples, and kfac blamed the layout of a plain model."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _Noisy().to(DTYPE)
    X = torch.randn(6, 5, dtype=DTYPE)
    y = torch.randint(0, 3, (6,))
    seen: list[Tensor] = []  # the noise of each forward (the model's attribute is put back)
    hook = model.register_forward_hook(lambda m, a, o: seen.append(m.noise))
    factors = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    hook.remove()
    assert model.noise is None  # left as the call found it (review s24)
    noise = [z for z in seen if z is not None and z.shape == (6, 4)]
    assert noise
    model.fixed = noise[-1]  # replay the noise of the factors' pass (the last on the batch)
    for name in ("a", "b"):
        A, G = _kfac_reference(model, getattr(model, name), X, y[:, None])
        assert _rel(factors[name].A, A) < 1e-10, name
        assert _rel(factors[name].G, G) < 1e-10, name


def test_kfac_of_a_tied_max_norm_embedding_matches_brute_force() -> None:
    """Found in review: the check's passes renormalised the tied weight (and were recorded):
    refused as a misplaced layout, then autograd's in-place error. Rows longer than max_norm get
    a warning (the tied head's weight depends on the passes before); renormalised once by the
    user, the factors are exact."""
    torch.set_num_threads(1)
    model, X, y = _tied_problem()
    with pytest.warns(RuntimeWarning, match="renormalised rows of its weight"):
        cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    with torch.no_grad():
        model(X)  # the rows the data uses renormalised once
    saved = model.emb.weight.detach().clone()
    factors = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert torch.equal(model.emb.weight, saved)  # the user's values put back
    ref = _renormed(model, X)
    for name in ("mix", "head"):
        A, G = _kfac_reference(ref, getattr(ref, name), X, y)
        assert _rel(factors[name].A, A) < 1e-10, name
        assert _rel(factors[name].G, G) < 1e-10, name


# --- 2. products of a max_norm embedding tied to a linear head --------------------------------


@pytest.mark.parametrize("keep_graph", [None, True])
@pytest.mark.parametrize("tied", [True, False])
def test_products_of_a_tied_max_norm_embedding_match_brute_force(
    keep_graph: bool | None, tied: bool
) -> None:
    """Found in review: every Hessian/GGN product raised torch's raw in-place error (the user's
    weight put back after the build invalidated the graph the head's F.linear saved)."""
    torch.set_num_threads(1)
    model, X, y = _tied_problem(tied)
    if tied:  # rows longer than max_norm: a warning (found in review: batch-dependent numbers)
        with pytest.warns(RuntimeWarning, match="renormalised rows of its weight"):
            cl.curvature_operator(model, nn.CrossEntropyLoss(), (X, y))
        with torch.no_grad():
            model(X)  # the rows the data uses renormalised once: every pass leaves them
    saved = model.emb.weight.detach().clone()
    batches = [(X[:2], y[:2]), (X[2:], y[2:])] if keep_graph else [(X, y)]
    H, G = _reference(model, batches)
    Vs = torch.randn(H.shape[0], 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    data = batches if keep_graph else (X, y)
    loss = nn.CrossEntropyLoss()
    for matrix, ref in (("hessian", H), ("ggn", G)):
        op = cl.curvature_operator(model, loss, data, matrix=matrix, keep_graph=keep_graph)
        for _ in range(2):  # a second product on what the first left
            assert _rel(op @ Vs, ref @ Vs) < 1e-10, matrix
            assert _rel(op @ Vs[:, 0], ref @ Vs[:, 0]) < 1e-10, matrix
        assert torch.equal(model.emb.weight, saved)  # the user's values put back
    H, _ = _reference(model, [(X, y)])
    trace = cl.trace(model, loss, (X, y), method="exact").value
    assert abs(trace - float(torch.trace(H))) < 1e-10 * float(H.diagonal().abs().sum())
    diag = cl.diag_hessian(model, loss, (X, y))
    flat = torch.cat([diag[n].reshape(-1) for n, _ in model.named_parameters()])
    assert _rel(flat, H.diagonal()) < 1e-10
    assert torch.equal(model.emb.weight, saved)


def test_kept_graphs_of_a_tied_max_norm_embedding_over_two_batches() -> None:
    """Rows already within max_norm (the user's forward ran): nothing is put back, but the second
    batch's forward pass moves the weight's version, and the first batch's kept graph raised
    torch's raw in-place error."""
    torch.set_num_threads(1)
    model, X, y = _tied_problem()
    with torch.no_grad():
        model(X)  # the user's own forward: every row looked up renormalised
    batches = [(X[:2], y[:2]), (X[2:], y[2:])]
    H, _ = _reference(model, batches)
    v = torch.randn(H.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches, keep_graph=True)
    for _ in range(2):
        assert _rel(op @ v, H @ v) < 1e-10
    assert "graphs" in op.info  # the route taken is recorded


class _TiedMaxNorm(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, max_norm=0.5)
        self.head = nn.Linear(3, 6, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)))


class _FunctionalTie(nn.Module):
    """The embedding's weight used again in the forward, ``h @ emb.weight.T``: no second module."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, max_norm=0.5)
        self.mix = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.emb(x))) @ self.emb.weight.T


@pytest.mark.parametrize("which", ["tied", "functional", "untied"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_a_max_norm_weight_renormalised_by_the_call_is_warned_about(which, kind):
    # found in review: over several batches each forward pass renormalises only its rows, so a
    # tied head's weight depends on the batches before (a Hessian entry 1.45 off over two
    # batches), and the exact GGN diagonal was 2-3x off even on one batch, silently: a warning
    # whenever the call renormalised rows; with the rows already within max_norm none, and
    # every kind exact against the model without max_norm
    torch.manual_seed(0)
    model = (_FunctionalTie() if which == "functional" else _TiedMaxNorm(which == "tied")).double()
    with torch.no_grad():
        model.emb.weight.mul_(3.0)
    x = torch.tensor([[0, 1], [2, 3], [4, 5]])
    y = torch.tensor([[1, 2], [3, 4], [5, 0]])
    saved = model.emb.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="'emb' .*renormalised rows") as rec:
        cl.diag_fisher(model, nn.CrossEntropyLoss(), (x, y), kind=kind)
    assert "torch.no_grad(): model(inputs)" in str(rec[0].message)
    assert torch.equal(model.emb.weight, saved)
    with torch.no_grad():
        model(x)  # the rows the data uses renormalised once
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error", RuntimeWarning)  # none now
        got = cl.diag_fisher(model, nn.CrossEntropyLoss(), (x, y), kind=kind)
    ref = copy.deepcopy(model)
    ref.emb.max_norm = None
    want = cl.diag_fisher(ref, nn.CrossEntropyLoss(), (x, y), kind=kind, backend="func")
    for k in want:
        assert _rel(got[k], want[k]) < 1e-10, k
