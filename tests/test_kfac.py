"""K-FAC factors against brute-force Jacobians of each layer's output."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

import curvlab as cl
from tests import reference as R
from tests.problems import Problem, make_problem


def _layer_refs(p: Problem, layer_name: str) -> dict[str, torch.Tensor]:
    """Brute-force A, G (exact, empirical) of one layer via a perturbation of its output."""
    layer = dict(p.model.named_modules())[layer_name]
    captured = {}

    def capture(m, inp, out):  # noqa: ANN001
        captured["x"] = inp[0].detach()
        captured["z"] = out.detach()

    h = layer.register_forward_hook(capture)
    with torch.no_grad():
        out = p.model(p.X)
    h.remove()
    z0 = captured["z"]

    def f(eps: torch.Tensor) -> torch.Tensor:
        hook = layer.register_forward_hook(lambda m, i, o: o + eps)
        try:
            return p.model(p.X)
        finally:
            hook.remove()

    J = jacrev(f)(torch.zeros_like(z0))  # (N, K, N, *zshape)
    N, K = out.shape
    T = z0[0].numel() // z0.shape[1]
    Jn = torch.stack([J[n, :, n].reshape(K, z0.shape[1], T) for n in range(N)])  # (N,K,out,T)
    H = hessian(lambda o: p.loss_fn(o, p.y))(out)  # (N,K,N,K)
    G_exact = sum(torch.einsum("kot,kl,lpt->op", Jn[n], H[n, :, n], Jn[n]) for n in range(N))
    loss_mean = type(p.loss_fn)(reduction="mean")
    c = R.terms_per_example(p)
    scale = 1.0 if p.loss_fn.reduction == "mean" else float(c)
    G_emp = 0
    for n in range(N):
        dl = torch.func.grad(lambda o, n=n: loss_mean(o, p.y[n : n + 1]))(out[n : n + 1])[0]
        delta = torch.einsum("k,kot->ot", dl, Jn[n]) * scale  # (out, T)
        G_emp = G_emp + delta @ delta.T
    if p.loss_fn.reduction == "mean":
        G_emp = G_emp / N
    # input side: rows u_{n,t} = d z[n, 0, t] / d W[0, :]
    if isinstance(layer, nn.Linear):
        U = captured["x"].reshape(N, -1, captured["x"].shape[-1])
    else:
        W = layer.weight.detach()

        def conv_w(w0: torch.Tensor) -> torch.Tensor:
            w = torch.cat([w0.unsqueeze(0), W[1:]])
            return layer._conv_forward(captured["x"], w, None)[:, 0].reshape(N, -1)

        U = jacrev(conv_w)(W[0]).reshape(N, T, -1)
    A = torch.einsum("nti,ntj->ij", U, U) / (N * T)
    return {"A": A, "G_exact": G_exact, "G_empirical": G_emp}


LAYER_CASES = [
    ("mlp-ce-mean-three", ["0", "2"]),
    ("mlp-mse-sum-one", ["0", "2"]),
    ("mlp-bce-mean-one", ["2"]),
    ("cnn-ce-mean-one", ["0", "4"]),
    ("cnn-mse-sum-three", ["0"]),
    ("res-ce-sum-three", ["lin1", "lin2", "head"]),
    ("conv1d-mse-sum-one", ["0"]),
]


@pytest.mark.parametrize(("name", "layers"), LAYER_CASES)
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_kfac_factors_match_brute_force(name: str, layers: list[str], kind: str) -> None:
    p = make_problem(name)
    factors = cl.kfac(p.model, p.loss_fn, p.data, kind=kind)
    for layer in layers:
        ref = _layer_refs(p, layer)
        torch.testing.assert_close(factors[layer].A, ref["A"], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(factors[layer].G, ref[f"G_{kind}"], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp-ce-mean-one", "mlp-mse-sum-one", "res-bce-mean-one"])
def test_kron_is_exact_ggn_block_for_one_example(name: str) -> None:
    p = make_problem(name)
    one = (p.X[:1], p.y[:1])
    p1 = Problem(p.name, p.model, p.loss_fn, one, *one)
    ggn = R.dense_ggn(p1)
    slices = R.blocks(p.model)
    factors = cl.kfac(p.model, p.loss_fn, one, kind="exact")
    for layer, f in factors.items():
        w = slices[f"{layer}.weight"]
        b = slices[f"{layer}.bias"]
        torch.testing.assert_close(f.weight_block(), ggn[w, w], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(f.bias_block(), ggn[b, b], rtol=1e-6, atol=1e-10)
        evals_a, evecs_a, evals_g, evecs_g = f.eigh()
        torch.testing.assert_close(evecs_a @ torch.diag(evals_a) @ evecs_a.T, f.A)
        torch.testing.assert_close(evecs_g @ torch.diag(evals_g) @ evecs_g.T, f.G)


@pytest.mark.parametrize("name", ["mlp-ce-mean-three", "cnn-bce-sum-one"])
def test_kfac_mc_is_unbiased_for_exact(name: str) -> None:
    p = make_problem(name)
    exact = cl.kfac(p.model, p.loss_fn, p.data, kind="exact")
    reps = [cl.kfac(p.model, p.loss_fn, p.data, kind="mc", mc_samples=8, seed=s) for s in range(30)]
    for layer in exact:
        G = torch.stack([r[layer].G for r in reps])
        mean, se = G.mean(0), G.std(0) / len(reps) ** 0.5
        z = (mean - exact[layer].G).abs() / (se + 1e-12)
        assert (z < 5).all(), f"{layer}: max z {z.max():.2f}"
        torch.testing.assert_close(reps[0][layer].A, exact[layer].A)
    again = cl.kfac(p.model, p.loss_fn, p.data, kind="mc", mc_samples=8, seed=0)
    for layer in exact:
        assert torch.equal(again[layer].G, reps[0][layer].G)


def test_kfac_rejects_unsupported_options() -> None:
    p = make_problem("mlp-ce-mean-one")
    with pytest.raises(ValueError, match="kind must be one of"):
        cl.kfac(p.model, p.loss_fn, p.data, kind="kflr")
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)).double()
    X = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="groups=2"):
        cl.kfac(model, nn.CrossEntropyLoss(), (X, torch.tensor([0, 1])))


def test_kfac_reduce_equals_expand_on_vectors_and_shared_weights_form_one_block() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()
    a = cl.kfac(model, loss_fn, (X, y), kind="exact")
    b = cl.kfac(model, loss_fn, (X, y), kind="exact", approx="reduce")
    for k in a:
        torch.testing.assert_close(a[k].A, b[k].A)
        torch.testing.assert_close(a[k].G, b[k].G)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x)))

    shared = Shared().double()
    f = cl.kfac(shared, loss_fn, (X, torch.randint(0, 3, (6,))), kind="exact")
    assert list(f) == ["a"]  # one block for the one weight
    # A averages the two uses: (A_a + A_b) / 2 with A_a from x and A_b from tanh(a(x))
    h = torch.tanh(shared.a(X)).detach()
    expected = (X.T @ X + h.T @ h) / (2 * X.shape[0])
    torch.testing.assert_close(f["a"].A, expected)
    with pytest.raises(ValueError, match="approx"):
        cl.kfac(model, loss_fn, (X, y), approx="nope")


class _AuxHead(nn.Module):
    """``l -> h`` is the output; ``aux`` runs on the hidden state but never reaches the loss, and
    ``t`` runs under ``no_grad`` (a teacher-style branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l, self.h, self.aux, self.t = (
            nn.Linear(4, 5),
            nn.Linear(5, 3),
            nn.Linear(5, 2),
            nn.Linear(5, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.l(x))
        self.last_aux = self.aux(z)
        with torch.no_grad():
            self.last_t = self.t(z)
        return self.h(z)


class _Plain(nn.Module):
    def __init__(self, m: _AuxHead) -> None:
        super().__init__()
        self.l, self.h = m.l, m.h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.l(x)))


@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
def test_layers_whose_output_never_reaches_the_loss(kind: str) -> None:
    """Their Fisher block is zero: G = 0 (A as measured); the other layers' factors are those of
    the model without them. Found in review: autograd's raw 'not used in the graph' error."""
    m = _AuxHead().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    lf = nn.CrossEntropyLoss()
    got = cl.kfac(m, lf, (X, y), kind=kind, seed=0)
    want = cl.kfac(_Plain(m), lf, (X, y), kind=kind, seed=0)
    for name in ("l", "h"):
        torch.testing.assert_close(got[name].A, want[name].A, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got[name].G, want[name].G, rtol=1e-12, atol=1e-15)
    for name in ("aux", "t"):
        assert got[name].G.abs().max() == 0 and got[name].A.abs().max() > 0


def test_a_selected_layer_that_never_runs_is_a_clear_error() -> None:
    """nn.MultiheadAttention uses out_proj's weight directly, never calling the module."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.h = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.h(self.a(x, x, x, need_weights=False)[0].mean(1))

    X, y = torch.randn(5, 3, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="none of the selected layers.*out_proj"):
        cl.kfac(Attn(), nn.CrossEntropyLoss(), (X, y), kind="exact", params="a.out_proj")
    assert set(cl.kfac(Attn(), nn.CrossEntropyLoss(), (X, y), kind="exact")) == {"h"}
