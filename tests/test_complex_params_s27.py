"""Complex parameters (review s27, OP finding 1).

A complex parameter ``w = a + i b`` is two real coordinates per entry (torch's Adam steps it through
``torch.view_as_real``). Every entry point that computed with ``w`` as a complex tensor crashed
with torch's dtype errors or gave a wrong number silently (``critical_sharpness`` under Adam 0.1234
for 0.0443, the diagonal Fisher ``g**2`` for ``Re(g)**2`` and ``Im(g)**2``, ``trace_fisher`` with
the imaginary part cast away). They now refuse, naming the parameter and the ways out; the entry
points that were exact stay so, checked against dense float64 brute force over the real
coordinates.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import regularizers

SPLIT = "two real parameters"


class _Complex(nn.Module):
    """``Re(x W) + 0.7 Im(x W)`` with a complex ``W``: both its real and imaginary parts count."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, dtype=torch.complex128) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(torch.complex128) @ self.w
        return z.real + 0.7 * z.imag


class _Split(nn.Module):
    """The way out: the same layer with ``W = W_re + i W_im`` as two real parameters."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.re = nn.Parameter(w.detach().real.clone())
        self.im = nn.Parameter(w.detach().imag.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.re + 0.7 * (x @ self.im)


def _setup() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).double(), nn.Tanh(), _Complex()).eval()
    split = nn.Sequential(nn.Linear(4, 3).double(), nn.Tanh(), _Split(model[2].w)).eval()
    split[0].load_state_dict(model[0].state_dict())
    X = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)
    return model, split, (X, y)


def _real_hessian(model: nn.Module, lf: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """Dense float64 Hessian over the real coordinates (``view_as_real`` for a complex one)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, p in params.items():
            k = p.numel() * (2 if p.is_complex() else 1)
            t = v[i : i + k]
            i += k
            if p.is_complex():
                t = t.reshape(*p.shape, 2)
                out[n] = torch.complex(t[..., 0], t[..., 1])
            else:
                out[n] = t.reshape(p.shape)
        return out

    flat = [(torch.view_as_real(p) if p.is_complex() else p).reshape(-1) for p in params.values()]
    v0 = torch.cat(flat)

    def loss(v: torch.Tensor) -> torch.Tensor:
        return lf(torch.func.functional_call(model, unflat(v), (X,)), y)

    return torch.func.hessian(loss)(v0)


def _refused(fn, has_params: bool = True) -> None:
    with pytest.raises(TypeError, match="'2.w' is complex") as err:
        fn()
    msg = str(err.value)
    assert "not supported" in msg and SPLIT in msg
    assert ("params=" in msg) == has_params


LF = nn.MSELoss()


@pytest.mark.parametrize(
    "call",
    [
        lambda m, d: cl.diag_hessian(m, LF, d),
        lambda m, d: cl.diag_fisher(m, LF, d, kind="exact"),
        lambda m, d: cl.diag_fisher(m, LF, d, kind="empirical"),
        lambda m, d: cl.diag_fisher(m, LF, d, kind="mc"),
        lambda m, d: cl.gradient_stats(m, LF, d),
        lambda m, d: cl.trace(m, LF, d, method="exact"),
        lambda m, d: cl.trace(m, LF, d, num_probes=4),
        lambda m, d: cl.eigenvalues(m, LF, d, k=1),
        lambda m, d: cl.spectral_density(m, LF, d, num_steps=5),
        lambda m, d: cl.fisher_trace(m, LF, d),
        lambda m, d: cl.curvature_operator(m, LF, d),
    ],
)
def test_refused_with_params_way_out(call) -> None:
    """Crashed (diag_hessian, trace, operator, gradient_stats) or were wrong (the Fisher
    diagonals: 0.1121+0.3078j for 0.2199 and 0.1077; fisher_trace cast the imaginary part away)."""
    model, _, data = _setup()
    _refused(lambda: call(model, data))


def test_diag_fisher_was_complex_square() -> None:
    """The refused value was wrong, not only a matter of layout: the real coordinates' GGN
    diagonal (brute force) is what the split model gives, with params= the real layer is exact."""
    model, split, (X, y) = _setup()
    H = _real_hessian(model, LF, X, y)  # a linear last layer after tanh: GGN block = H block
    d = H.diagonal()
    nw = model[0].weight.numel() + model[0].bias.numel()
    got = cl.diag_fisher(split, LF, (X, y), kind="exact")
    re_im = d[nw:].reshape(3, 3, 2)
    torch.testing.assert_close(got["2.re"], re_im[..., 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["2.im"], re_im[..., 1], rtol=1e-10, atol=1e-12)
    assert (re_im[..., 1] > 0.01).all()  # the imaginary coordinates count
    part = cl.diag_hessian(model, LF, (X, y), params="0")  # the way out: leave it out
    torch.testing.assert_close(part["0.weight"].reshape(-1), d[:12], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(part["0.bias"], d[12:15], rtol=1e-10, atol=1e-12)


def test_params_way_out_is_exact() -> None:
    """Leaving the complex parameter out with params= gives the real block's brute force."""
    model, _, (X, y) = _setup()
    H = _real_hessian(model, LF, X, y)[:15, :15]
    t = cl.trace(model, LF, (X, y), method="exact", params="0")
    assert abs(t.value - float(H.trace())) < 1e-10 * abs(float(H.trace()))
    e = cl.eigenvalues(model, LF, (X, y), k=1, params="0", tol=1e-10)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(e.values[0] - top) < 1e-7 * abs(top)
    model[2].w.requires_grad_(False)  # a frozen complex parameter is no parameter measured
    d = cl.diag_hessian(model, LF, (X, y))
    assert list(d) == ["0.weight", "0.bias"]
    torch.testing.assert_close(d["0.weight"].reshape(-1), H.diagonal()[:12], rtol=1e-10, atol=0)


def test_no_params_entry_points_refused() -> None:
    model, _, (X, y) = _setup()
    _refused(lambda: cl.fisher_norms(model, LF, (X, y)), has_params=False)
    _refused(lambda: cl.analyze(model, LF, (X, y), quantities=["loss"]), has_params=False)
    for q in ["loss", "grad_norm", "trace_fisher", "sharpness", "noise_scale_hessian"]:
        _refused(lambda q=q: cl.Diagnostics(model, LF, quantities=[q], every=1), False)
    _refused(lambda: regularizers.fisher_penalty(model, LF, X), has_params=False)
    _refused(lambda: regularizers.gradient_penalty(model, LF, X, y), has_params=False)
    ce = nn.CrossEntropyLoss()
    labels = torch.randint(0, 3, (6,))
    _refused(lambda: regularizers.random_label_penalty(model, ce, X, labels), has_params=False)


@pytest.mark.parametrize(
    "quantity", ["critical_sharpness", "preconditioned_sharpness", "sharpness"]
)
def test_optimizer_quantities_refused(quantity: str) -> None:
    """critical_sharpness under Adam gave 0.1234 for 0.0443 (Adam's complex square of g in place
    of the per-coordinate squares); the other two crashed inside the product."""
    model, _, (X, y) = _setup()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        LF(model(X), y).backward()
        opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _refused(
        lambda: cl.Diagnostics(model, LF, quantities=[quantity], every=1, optimizer=opt), False
    )
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


@pytest.mark.parametrize(
    "make",
    [
        lambda: cl.noise.DiagFisherNoise(scale=0.1),
        lambda: cl.noise.FullFisherNoise(scale=0.1),
        lambda: cl.noise.KFACNoise(scale=0.1),
        lambda: cl.noise.FisherTraceNoise(scale=0.1),
        lambda: cl.noise.IsotropicNoise(std=0.1),
        lambda: cl.noise.MultiplicativeNoise(std=0.1),
    ],
)
def test_noise_refused(make) -> None:
    """FisherTraceNoise crashed ("clamp is not supported for complex types"); IsotropicNoise drew
    complex N(0, 1) entries, whose parts have std 0.0707 for the documented 0.1."""
    model, _, (X, y) = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _refused(lambda: cl.noise.NoisyOptimizer(opt, make(), model=model, loss_fn=LF), False)
    _refused(lambda: make().sample(model, LF, X, y), has_params=False)


def test_exact_entry_points_not_refused() -> None:
    """kfac leaves a layer it does not cover out (the complex one here): the covered layer's
    factors are those of the split model; the input-gradient penalty is the brute force."""
    model, split, (X, y) = _setup()
    a = cl.kfac(model, LF, (X, y), kind="exact")
    b = cl.kfac(split, LF, (X, y), kind="exact")
    assert list(a) == ["0"]
    torch.testing.assert_close(a["0"].A, b["0"].A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a["0"].G, b["0"].G, rtol=1e-12, atol=1e-14)
    assert float(a["0"].G.abs().max()) > 1e-3
    got = float(regularizers.input_gradient_penalty(model, LF, X, y).detach())
    Xg = X.clone().requires_grad_(True)
    losses = ((model(Xg) - y) ** 2).mean(dim=1)  # mean-convention example losses
    (gx,) = torch.autograd.grad(losses.sum(), Xg)
    want = float((gx**2).sum()) / X.shape[0]
    assert abs(got - want) < 1e-12 * want


def test_complex_kfac_layer_refused() -> None:
    """A complex Linear's K-FAC factors came out complex, not those of its real coordinates."""
    model = nn.Sequential(nn.Linear(4, 3, dtype=torch.complex128))
    X = torch.randn(6, 4, dtype=torch.complex128)

    class _Re(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z.real

    model.append(_Re())
    y = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="'0.weight' is complex.*params="):
        cl.kfac(model, LF, (X, y), kind="exact")
