"""Weight normalisation and spectral norm inside training steps (review s9): a penalty's gradient
through weight_norm, and training with spectral_norm left as without curvlab."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as P

import curvlab as cl
from curvlab.regularizers import gradient_penalty

DT = torch.float64


def _weight_norm_mlp() -> nn.Module:
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(P.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def test_gradient_penalty_through_weight_norm_matches_brute_force():
    """torch's second derivative of ``torch._weight_norm`` is wrong (40% off here); the penalty's
    own forward computes the weight as ``g * v / ||v||``, and ``output=`` is refused."""
    model = _weight_norm_mlp()
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    ps = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(theta):
        d, o = {}, 0
        for n in names:
            k = ps[n].numel()
            d[n] = theta[o : o + k].reshape(ps[n].shape)
            o += k
        v, gain = d["0.parametrizations.weight.original1"], d["0.parametrizations.weight.original0"]
        W = gain * v / v.pow(2).sum(1, keepdim=True).sqrt()
        hidden = torch.tanh(X @ W.T + d["0.bias"])
        return F.cross_entropy(hidden @ d["2.weight"].T + d["2.bias"], Y)

    theta = torch.cat([ps[n].reshape(-1) for n in names]).requires_grad_()
    (grad,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
    (want,) = torch.autograd.grad(grad.pow(2).sum(), theta)
    value = gradient_penalty(model, nn.CrossEntropyLoss(), X, Y)
    model.zero_grad()
    value.backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float(value.detach()) == pytest.approx(float(grad.pow(2).sum()), rel=1e-12)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), float(
        (got - want).norm() / want.norm()
    )
    with pytest.raises(ValueError, match="weight_norm"):
        gradient_penalty(model, nn.CrossEntropyLoss(), X, Y, output=model(X))


def _spectral_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(P.spectral_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _train(penalty: bool, noise: bool, steps: int = 4):
    model = _spectral_mlp()
    g = torch.Generator().manual_seed(3)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noisy = cl.noise.NoisyOptimizer(opt, cl.noise.DiagFisherNoise(scale=0.0), model, loss_fn)
    for _ in range(steps):
        X, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        if noise:
            with noisy.capture():
                loss_fn(model(X), y).backward()
            noisy.step()
        else:
            loss = loss_fn(model(X), y)
            if penalty:
                loss = loss + gradient_penalty(model, loss_fn, X, y, alpha=0.0)
            loss.backward()
            opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state


@pytest.mark.parametrize("what", ["penalty", "noise"])
def test_spectral_norm_training_is_as_without_curvlab(what):
    """A penalty's own forward (alpha 0) and a zero-scale noise capture each advanced
    spectral_norm's power iteration (the capture read ``module.weight`` twice per step):
    parameters 1.5e-5 and 6.8e-5 off plain SGD after 4 steps."""
    plain = _train(False, False)
    other = _train(what == "penalty", what == "noise")
    for k in plain:
        assert torch.equal(plain[k], other[k]), (k, float((plain[k] - other[k]).abs().max()))


def test_fisher_norms_and_fisher_trace_do_not_depend_on_the_chunking_under_spectral_norm():
    """Every forward pass of one call sees the buffers as the call found them (train-mode
    spectral_norm advanced its vectors on every chunk: 0.3% and 0.24% apart)."""
    model = _spectral_mlp()
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(9, 4, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    whole = cl.fisher_norms(model, loss_fn, (X, y), kind="empirical", chunk_size=None)
    parts = cl.fisher_norms(model, loss_fn, (X, y), kind="empirical", chunk_size=3)
    assert parts.frobenius == pytest.approx(whole.frobenius, rel=1e-12)
    one = cl.fisher_trace(model, loss_fn, (X, y), seed=0, chunk_size=9)
    two = cl.fisher_trace(model, loss_fn, [(X[:4], y[:4]), (X[4:], y[4:])], seed=0, chunk_size=9)
    assert two.value == pytest.approx(one.value, rel=1e-12)


def test_kfac_over_its_budget_names_a_weight_normalised_layer():
    """The budget's error looked the layer's weight up by ``id(layer.weight)``: a parametrized
    weight has no name, and the message itself raised ``KeyError``. Since review s17 such a layer
    gets no factors (they would be those of the computed weight, not of the parameters
    trained): it is left out before the budget is counted, and ``info`` names its parameters."""
    model = nn.Sequential(P.weight_norm(nn.Linear(30, 40)), nn.Tanh(), nn.Linear(40, 3)).to(DT)
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(6, 30, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    # the head's factors fit the budget; the weight-normalised layer is not counted
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), memory_budget=20_000)
    assert set(f) == {"2"}
    assert "0.parametrizations.weight.original0" in f.info["left_out"]["0"]
