"""Review s26 (RB): engine calls whose create_graph follows grad mode, enable_grad blocks in a
forward, a penalty through a checkpointed attention block, data made in inference_mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import curvlab as cl
from curvlab._differentiating_forward import DifferentiatingForwardError
from curvlab.regularizers import gradient_penalty

DT = torch.float64


def _per_example_grads(model, X, y):
    ps = list(model.parameters())
    rows = []
    for i in range(X.shape[0]):
        loss = F.mse_loss(model(X[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, ps, allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps)]
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _flat(d, model):
    return torch.cat([d[k].reshape(-1) for k, _ in model.named_parameters()])


class _GradModePinn(nn.Module):
    """create_graph follows grad mode: False in passes without gradient, True with it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        cg = torch.is_grad_enabled()
        with torch.enable_grad():
            xx = x if x.requires_grad else x.detach().requires_grad_()
            u = self.net(xx)
            (du,) = torch.autograd.grad(u.sum(), xx, create_graph=cg)
        return torch.cat([u, du], 1)


@pytest.mark.parametrize("n", [2, 6])
def test_create_graph_following_grad_mode_is_refused(n):
    torch.manual_seed(0)
    X, y = torch.randn(n, 2, dtype=DT), torch.randn(n, 3, dtype=DT)
    m = _GradModePinn().to(DT)
    for _ in range(2):  # the second call too (no memo of a passed check)
        with pytest.raises(DifferentiatingForwardError, match="torch.autograd.grad"):
            cl.gradient_stats(m, nn.MSELoss(), (X, y))
        with pytest.raises(DifferentiatingForwardError, match="torch.autograd.grad"):
            cl.diag_fisher(m, nn.MSELoss(), (X, y))
    assert all(p.grad is None for p in m.parameters())


class _FrozenGradHead(nn.Module):
    """An input gradient without create_graph at all: a constant to the parameters (exact)."""

    def __init__(self):
        super().__init__()
        self.pot = nn.Linear(2, 1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        with torch.enable_grad():
            xx = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.pot(xx).sum(), xx)
        return self.head(g + x)


def test_engine_call_without_create_graph_still_exact():
    torch.manual_seed(1)
    X, y = torch.randn(5, 2, dtype=DT), torch.randn(5, 3, dtype=DT)
    m = _FrozenGradHead().to(DT)
    G = _per_example_grads(m, X, y)
    got = _flat(cl.diag_fisher(m, nn.MSELoss(), (X, y)), m)
    torch.testing.assert_close(got, G.square().mean(0), atol=1e-12, rtol=1e-10)


class _EnableGradBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        with torch.enable_grad():
            h = torch.tanh(self.a(x))
        return self.b(h)


@pytest.mark.parametrize("backend", ["auto", "hooks", "backpack"])
@pytest.mark.parametrize("n", [2, 6])
def test_enable_grad_block_exact(backend, n):
    torch.manual_seed(0)
    X, y = torch.randn(n, 2, dtype=DT), torch.randn(n, 3, dtype=DT)
    m = _EnableGradBlock().to(DT)
    G = _per_example_grads(m, X, y)
    got = _flat(cl.diag_fisher(m, nn.MSELoss(), (X, y), backend=backend), m)
    torch.testing.assert_close(got, G.square().mean(0), atol=1e-12, rtol=1e-10)
    if backend != "backpack":
        s = cl.gradient_stats(m, nn.MSELoss(), (X, y), backend=backend)
        torch.testing.assert_close(_flat(s.mean, m), G.mean(0), atol=1e-12, rtol=1e-10)


class _Attn(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, h):
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v).squeeze(1)


class _Checkpointed(nn.Module):
    def __init__(self, ckpt=True):
        super().__init__()
        self.inp, self.attn, self.out, self.ckpt = nn.Linear(3, 4), _Attn(), nn.Linear(4, 2), ckpt

    def forward(self, x):
        h = self.inp(x)
        h = checkpoint(self.attn, h, use_reentrant=False) if self.ckpt else self.attn(h)
        return self.out(h).mean(1)


def test_gradient_penalty_through_checkpointed_attention():
    torch.manual_seed(0)
    X, y = torch.randn(4, 5, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    m = _Checkpointed().to(DT)
    ps = list(m.parameters())
    gs = torch.autograd.grad(F.mse_loss(m(X), y), ps, create_graph=True)
    expected = sum(g.square().sum() for g in gs).detach()
    value = gradient_penalty(m, nn.MSELoss(), X, y)
    torch.testing.assert_close(value.detach(), expected, atol=1e-12, rtol=1e-10)
    plain = _Checkpointed(ckpt=False).to(DT)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(
        gradient_penalty(plain, nn.MSELoss(), X, y).detach(), expected, atol=1e-12, rtol=1e-10
    )


def test_inference_mode_data_computed_everywhere():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    L = nn.CrossEntropyLoss()
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 4, (8,))
    ps = dict(m.named_parameters())

    def loss_at(p):
        return F.cross_entropy(torch.func.functional_call(m, p, (X,)), y)

    H = torch.func.hessian(lambda flat: loss_at(_unflat(flat, ps)))(_flat(ps, m).detach())
    dhess = torch.diagonal(H)
    with torch.inference_mode():
        Xi, yi = X.clone(), y.clone()
        tr = cl.trace(m, L, (Xi, yi), method="exact").value
        top = cl.eigenvalues(m, L, (Xi, yi), k=1, seed=0).values
        dh = cl.diag_hessian(m, L, (Xi, yi))
        op = cl.curvature_operator(m, L, (Xi, yi))
        v = torch.ones(op.shape[0] if hasattr(op, "shape") else H.shape[0], dtype=DT)
        Hv = op @ v
        cl.fisher_norms(m, L, (Xi, yi))
        cl.spectral_density(m, L, (Xi, yi), seed=0)
    assert float(tr) == pytest.approx(float(torch.trace(H)), rel=1e-10)
    assert float(top[0]) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    torch.testing.assert_close(_flat(dh, m), dhess, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(Hv.reshape(-1), H @ v, atol=1e-12, rtol=1e-10)


def _unflat(flat, ps):
    out, i = {}, 0
    for k, p in ps.items():
        out[k] = flat[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out
