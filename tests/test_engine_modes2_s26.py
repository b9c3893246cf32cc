"""Review s26 (RX2): a forward that skips its derivative without gradient (refused, not wrong
numbers), the penalty's backward through a checkpointed attention block that picks its own
kernel (``curvlab.math_attention()``), and ``output=`` through such a block (a clear error)."""

import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

import curvlab as cl
from curvlab._differentiating_forward import DifferentiatingForwardError
from curvlab.regularizers import gradient_penalty, input_gradient_penalty

DT = torch.float64
ROOT = pathlib.Path(__file__).resolve().parents[1]


class _CheapInferencePinn(nn.Module):
    """u and du/dx with gradient; without it (cheap inference) no derivative, no engine call."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        if not torch.is_grad_enabled():
            u = self.net(x)
            return torch.cat([u, torch.zeros_like(x)], 1)
        xx = x if x.requires_grad else x.detach().requires_grad_()
        u = self.net(xx)
        (du,) = torch.autograd.grad(u.sum(), xx, create_graph=True)
        return torch.cat([u, du], 1)


def _pinn_data():
    torch.manual_seed(0)
    X, y = torch.randn(6, 2, dtype=DT), torch.randn(6, 3, dtype=DT)
    return _CheapInferencePinn().to(DT), X, y


def _brute_fisher(model, X, y):
    """Per-example gradients (float64 autograd), the empirical Fisher's Frobenius norm."""
    ps = list(model.parameters())
    rows = []
    for i in range(X.shape[0]):
        gs = torch.autograd.grad(F.mse_loss(model(X[i : i + 1]), y[i : i + 1]), ps)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    G = torch.stack(rows)
    return torch.linalg.norm(G.T @ G / X.shape[0]).item()


@pytest.mark.parametrize(
    "call",
    [
        lambda m, L, d: cl.fisher_norms(m, L, d),
        lambda m, L, d: cl.diag_fisher(m, L, d),
        lambda m, L, d: cl.diag_fisher(m, L, d, chunk_size=1),
        lambda m, L, d: cl.gradient_stats(m, L, d),
        lambda m, L, d: cl.gradient_stats(m, L, d, chunk_size=1),
        lambda m, L, d: cl.kfac(m, L, d),
        lambda m, L, d: cl.trace(m, L, d, method="ggn_cv", seed=0),
        lambda m, L, d: cl.fisher_norms(m, L, d, backend="func"),
    ],
    ids=[
        "fisher_norms",
        "diag_fisher",
        "diag_fisher_c1",
        "gstats",
        "gstats_c1",
        "kfac",
        "ggn_cv",
        "fn_func",
    ],
)
def test_cheap_inference_forward_refused(call):
    m, X, y = _pinn_data()
    # before: fisher_norms' frobenius 1.1052 for 1.2028 (brute force), not refused
    assert abs(_brute_fisher(m, X, y) - 1.2028) < 1e-3
    before = [p.detach().clone() for p in m.parameters()]
    for _ in range(2):
        with pytest.raises(DifferentiatingForwardError, match="torch.autograd.grad"):
            call(m, nn.MSELoss(), (X, y))
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))


def test_cheap_inference_forward_refused_by_backpack():
    pytest.importorskip("backpack")
    m, X, y = _pinn_data()
    with pytest.raises(DifferentiatingForwardError, match="torch.autograd.grad"):
        cl.diag_fisher(m, nn.MSELoss(), (X, y), backend="backpack")


_ONE_WITH_GRAD: list[int] = []


class _Counting(nn.Module):
    """A plain model counting its forward passes (with gradient, one example) in a buffer, and
    drawing from the global RNG (without using the draw)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        torch.rand(1)
        if torch.is_grad_enabled() and x.shape[0] == 1:
            _ONE_WITH_GRAD.append(1)  # outside the module: curvlab puts its attributes back
        return self.lin(x)


def test_plain_model_one_extra_pass_per_signature_no_trace():
    torch.manual_seed(3)
    X, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    m = _Counting().to(DT)
    for p in m.parameters():
        p.grad = torch.full_like(p, 7.0)
    L = nn.MSELoss()
    ref = cl.diag_fisher(m, L, (X, y), backend="func")  # another signature
    _ONE_WITH_GRAD.clear()
    rng = torch.get_rng_state()
    first = cl.diag_fisher(m, L, (X, y))
    assert len(_ONE_WITH_GRAD) == 1  # the check's one extra pass, with gradient, one example
    assert torch.equal(torch.get_rng_state(), rng)
    assert int(m.calls) == 0
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in m.parameters())
    again = cl.diag_fisher(m, L, (X, y))
    assert len(_ONE_WITH_GRAD) == 1  # remembered: no pass on the second call
    for k in ref:
        torch.testing.assert_close(first[k], ref[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(again[k], ref[k], rtol=1e-12, atol=1e-14)
    # exact against brute force
    ps = dict(m.named_parameters())
    for i in range(5):
        gs = torch.autograd.grad(L(m(X[i : i + 1]), y[i : i + 1]), list(ps.values()))
        for (k, _), g in zip(ps.items(), gs):
            ref[k] = ref[k] - g.square() / 5
    assert all(v.abs().max() < 1e-14 for v in ref.values())


# --- attention: a checkpointed block that picks its own kernel -------------------------------


class _Attn(nn.Module):
    def __init__(self, own=None):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.own = own

    def forward(self, h):
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, -1)
        if self.own is not None:
            with sdpa_kernel(self.own):
                o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return o.squeeze(1)


class _Net(nn.Module):
    def __init__(self, own=None, ckpt=True):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(3, 4), _Attn(own), nn.Linear(4, 3)
        self.ckpt = ckpt

    def forward(self, x):
        h = self.inp(x)
        h = checkpoint(self.attn, h, use_reentrant=False) if self.ckpt else self.attn(h)
        return self.out(torch.tanh(h)).mean(1)


def _attn_data(own):
    torch.manual_seed(0)
    X, y = torch.randn(4, 5, 3, dtype=DT), torch.randint(0, 3, (4,))
    torch.manual_seed(1)
    m = _Net(own).to(DT)
    plain = _Net(None, ckpt=False).to(DT)  # the same function, math kernel, no checkpoint
    plain.load_state_dict(m.state_dict())
    return m, plain, X, y


def _brute(plain, X, y, kind):
    """Float64 double backward (math kernel): the penalty and its gradient."""
    with sdpa_kernel(SDPBackend.MATH):
        return _brute_math(plain, X, y, kind)


def _brute_math(plain, X, y, kind):
    ps = list(plain.parameters())
    if kind == "gp":
        gs = torch.autograd.grad(F.cross_entropy(plain(X), y), ps, create_graph=True)
        v = sum(g.square().sum() for g in gs)
    else:
        x = X.clone().requires_grad_()
        (gx,) = torch.autograd.grad(
            F.cross_entropy(plain(x), y, reduction="sum"), x, create_graph=True
        )
        v = gx.square().sum() / X.shape[0]
    return v.detach(), torch.cat([d.reshape(-1) for d in torch.autograd.grad(v, ps)])


@pytest.mark.parametrize("kind", ["gp", "gpx"])
@pytest.mark.parametrize(
    "own", [SDPBackend.FLASH_ATTENTION, [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], None]
)
def test_penalty_backward_under_math_attention(kind, own):
    m, plain, X, y = _attn_data(own)
    L = nn.CrossEntropyLoss()
    bv, bg = _brute(plain, X, y, kind)
    pen = gradient_penalty(m, L, X, y) if kind == "gp" else input_gradient_penalty(m, L, X, y)
    assert abs(pen.item() - bv.item()) < 1e-14
    with cl.math_attention():
        pen.backward()
    got = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert (got - bg).abs().max() < 1e-13
    # the process-wide kernel flags are put back
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_total_loss_backward_under_math_attention():
    m, plain, X, y = _attn_data(SDPBackend.FLASH_ATTENTION)
    L = nn.CrossEntropyLoss()
    _, bg = _brute(plain, X, y, "gp")
    ps = list(plain.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        tg = torch.cat([g.reshape(-1) for g in torch.autograd.grad(L(plain(X), y), ps)])
    with cl.math_attention():
        total = L(m(X), y) + gradient_penalty(m, L, X, y)
        total.backward()
    got = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert (got - (bg + tg)).abs().max() < 1e-13


def test_docs_name_math_attention_for_the_backward():
    text = (ROOT / "docs" / "training-loops.md").read_text()
    assert "curvlab.math_attention()" in text
    # the old advice (sdpa_kernel(MATH) around the backward) fails for a model's own kernel
    flat = " ".join(text.split())
    assert "call it under `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`" not in flat
    assert "compute that forward inside `torch.nn.attention.sdpa_kernel" not in flat
    assert re.search(
        r"`penalty\.backward\(\)` \(or the total loss's backward\)[^*]*run that backward "
        r"under `curvlab\.math_attention\(\)`",
        flat,
    )
    assert cl.math_attention.__doc__ and "Example" in cl.math_attention.__doc__
    assert "math_attention" in cl.__all__


# --- output= through a checkpointed attention block --------------------------------------------


@pytest.mark.parametrize("which", ["gp", "fp"])
def test_output_given_checkpoint_error_is_clear(which):
    m, plain, X, y = _attn_data(None)
    L = nn.CrossEntropyLoss()
    with sdpa_kernel(SDPBackend.MATH):  # the forward only, as the message said before
        out = m(X)
    with pytest.raises(RuntimeError, match=r"curvlab\.math_attention\(\)") as info:
        if which == "gp":
            gradient_penalty(m, L, X, y, output=out)
        else:
            cl.regularizers.fisher_penalty(m, L, X, output=out, seed=0)
    assert "penalty call" in str(info.value)
    assert all(p.grad is None for p in m.parameters())
    # the way out named: exact
    bv, bg = _brute(plain, X, y, "gp")
    with cl.math_attention():
        out = m(X)
        pen = gradient_penalty(m, L, X, y, output=out)
        g = torch.autograd.grad(pen, list(m.parameters()))
    assert abs(pen.item() - bv.item()) < 1e-14
    assert (torch.cat([d.reshape(-1) for d in g]) - bg).abs().max() < 1e-13


def test_fused_kernel_message_names_the_penalty_call():
    m, _, X, y = _attn_data(SDPBackend.FLASH_ATTENTION)
    out = m(X)  # the model's own fused kernel
    with pytest.raises(NotImplementedError) as info:
        gradient_penalty(m, nn.CrossEntropyLoss(), X, y, output=out)
    msg = str(info.value)
    assert "where it runs its own forward" not in msg
    assert "the forward and the penalty call" in msg and "curvlab.math_attention()" in msg


def test_extra_pass_leaves_power_iteration_buffers_and_grads():
    """The with-gradient pass on a train-mode spectral_norm model (its power-iteration vectors
    are buffers a forward pass updates in place): the buffers, .grad and the mode unchanged,
    the values the func backend's; and it reaches a user's input that requires grad without
    setting X.grad."""
    torch.manual_seed(0)
    X, y = torch.randn(6, 15, dtype=DT), torch.randn(6, 2, dtype=DT)
    sn = nn.utils.parametrizations.spectral_norm(nn.Linear(15, 2).to(DT)).train()
    bufs = [b.detach().clone() for b in sn.buffers()]
    Xg = X.clone().requires_grad_()
    got = cl.diag_fisher(sn, nn.MSELoss(), (Xg, y))
    assert all(torch.equal(a, b) for a, b in zip(bufs, sn.buffers()))
    assert sn.training and Xg.grad is None and all(p.grad is None for p in sn.parameters())
    ref = cl.diag_fisher(sn, nn.MSELoss(), (X, y), backend="func")
    assert all(torch.equal(a, b) for a, b in zip(bufs, sn.buffers()))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-14)
