"""Regularisers: gradients of FP, GP, GP_x and GP_r against brute force on a tiny float64 model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap

from curvlab._losses import loss_spec
from curvlab._rng import make_generator
from curvlab.regularizers import (
    FisherPenalty,
    GradientNormPenalty,
    fisher_penalty,
    gradient_penalty,
    input_gradient_penalty,
    random_label_penalty,
)

ALPHA = 0.7


def _setup(loss: str = "ce", reduction: str = "mean"):
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    if loss == "ce":
        loss_fn: nn.Module = nn.CrossEntropyLoss(reduction=reduction)
        y = torch.randint(0, 3, (6,), generator=g)
    elif loss == "bce":
        loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
        y = torch.randint(0, 2, (6, 3), generator=g).double()
    else:
        loss_fn = nn.MSELoss(reduction=reduction)
        y = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return model, loss_fn, X, y


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _flat_grad(term: Tensor, model: nn.Module) -> Tensor:
    gs = torch.autograd.grad(term, list(model.parameters()), retain_graph=True)
    return torch.cat([g.reshape(-1) for g in gs])


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model, theta):
    out, i = {}, 0
    for n, p in model.named_parameters():
        out[n] = theta[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _brute_grad_norm_penalty(model, loss_fn, X, labels) -> Tensor:
    """d/dtheta of alpha*||grad L||^2 = 2 alpha H g, with the dense Hessian of L at fixed labels."""

    def L(theta):
        return loss_fn(functional_call(model, _unflat(model, theta), (X,)), labels)

    theta = _flat_params(model)
    H = hessian(L)(theta)
    g = grad(L)(theta)
    return 2 * ALPHA * H @ g


@pytest.mark.parametrize(
    ("loss", "reduction"), [("ce", "mean"), ("ce", "sum"), ("bce", "mean"), ("mse", "mean")]
)
def test_fisher_penalty_gradient_matches_brute_force(loss, reduction):
    model, loss_fn, X, _ = _setup(loss, reduction)
    out = model(X)
    term = fisher_penalty(model, loss_fn, X, output=out, alpha=ALPHA, seed=5)
    sampled = loss_spec(loss_fn).sample_targets(out, make_generator(seed=5))
    expected = _brute_grad_norm_penalty(model, loss_fn, X, sampled)
    torch.testing.assert_close(_flat_grad(term, model), expected, rtol=1e-9, atol=1e-11)
    # the value is alpha * ||grad L(y_hat)||^2
    gL = torch.autograd.grad(loss_fn(model(X), sampled), list(model.parameters()))
    torch.testing.assert_close(term.detach(), ALPHA * sum(g.pow(2).sum() for g in gL))


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_gradient_penalty_gradient_matches_brute_force(loss):
    model, loss_fn, X, y = _setup(loss)
    term = gradient_penalty(model, loss_fn, X, y, alpha=ALPHA)
    expected = _brute_grad_norm_penalty(model, loss_fn, X, y)
    torch.testing.assert_close(_flat_grad(term, model), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_random_label_penalty_gradient_matches_brute_force(loss):
    model, loss_fn, X, _ = _setup(loss)
    term = random_label_penalty(model, loss_fn, X, alpha=ALPHA, seed=2)
    gen = make_generator(seed=2)
    if loss == "ce":
        labels = torch.randint(0, 3, (6,), generator=gen)
    else:
        labels = torch.randint(0, 2, (6, 3), generator=gen).double()
    expected = _brute_grad_norm_penalty(model, loss_fn, X, labels)
    torch.testing.assert_close(_flat_grad(term, model), expected, rtol=1e-9, atol=1e-11)
    assert labels.float().std() > 0  # the labels are not all equal


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_input_gradient_penalty_matches_per_example_brute_force(loss):
    model, loss_fn, X, y = _setup(loss)
    spec = loss_spec(loss_fn)

    def per_example_loss(theta, x, t):
        out = functional_call(model, _unflat(model, theta), (x.unsqueeze(0),))
        return spec.nll_sum(out, t.unsqueeze(0)) / spec.terms_per_example(out)

    def penalty(theta):
        gx = vmap(grad(per_example_loss, argnums=1), in_dims=(None, 0, 0))(theta, X, y)
        return ALPHA * gx.pow(2).sum() / X.shape[0]

    theta = _flat_params(model)
    term = input_gradient_penalty(model, loss_fn, X, y, alpha=ALPHA)
    torch.testing.assert_close(term.detach(), penalty(theta))
    torch.testing.assert_close(_flat_grad(term, model), grad(penalty)(theta), rtol=1e-9, atol=1e-11)
    # and a central finite difference along one direction, independent of autograd's 2nd order
    d = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-6
    fd = (penalty(theta + eps * d) - penalty(theta - eps * d)) / (2 * eps)
    torch.testing.assert_close(_flat_grad(term, model) @ d, fd, rtol=1e-6, atol=1e-9)


def test_every_k_reuses_the_last_gradient_and_value():
    model, loss_fn, X, y = _setup()
    pen = GradientNormPenalty(model, loss_fn, kind="gradient", alpha=ALPHA, every=3)
    first = pen(X, y)
    g1 = _flat_grad(first, model)
    expected = _brute_grad_norm_penalty(model, loss_fn, X, y)
    torch.testing.assert_close(g1, expected, rtol=1e-9, atol=1e-11)
    # change the parameters: calls 2 and 3 still return the cached value and gradient
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    for _ in range(2):
        term = pen(X, y)
        torch.testing.assert_close(term.detach(), first.detach())
        torch.testing.assert_close(_flat_grad(term, model), g1)
    fresh = pen(X, y)  # call 4 recomputes at the new parameters
    expected_new = _brute_grad_norm_penalty(model, loss_fn, X, y)
    torch.testing.assert_close(_flat_grad(fresh, model), expected_new, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(expected_new, g1)
    assert pen.calls == 4


def test_fisher_penalty_class_in_a_training_step_leaves_global_rng():
    model, loss_fn, X, y = _setup()
    fp = FisherPenalty(model, loss_fn, alpha=0.1, every=10, seed=0)
    state = torch.get_rng_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        out = model(X)
        (loss_fn(out, y) + fp(X, output=out)).backward()
        opt.step()
    assert torch.equal(state, torch.get_rng_state())
    assert fp.every == 10 and fp.last_value is not None and fp.last_value > 0


def test_bad_inputs_get_clear_errors():
    model, loss_fn, X, y = _setup()
    with pytest.raises(ValueError, match="alpha must be"):
        fisher_penalty(model, loss_fn, X, alpha=-1.0)
    with pytest.raises(ValueError, match="every must be"):
        FisherPenalty(model, loss_fn, every=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        GradientNormPenalty(model, loss_fn, kind="hessian")
    with pytest.raises(ValueError, match="not MSELoss"):
        GradientNormPenalty(model, nn.MSELoss(), kind="random")
    with pytest.raises(ValueError, match="needs the batch targets"):
        GradientNormPenalty(model, loss_fn, kind="gradient")(X)
    with pytest.raises(ValueError, match="does not require grad"):
        with torch.no_grad():
            out = model(X)
        fisher_penalty(model, loss_fn, X, output=out)
    with pytest.raises(ValueError, match="reduction"):
        gradient_penalty(model, nn.CrossEntropyLoss(reduction="none"), X, y)
    with pytest.raises(TypeError, match="floating-point"):
        input_gradient_penalty(nn.Embedding(5, 3), loss_fn, torch.zeros(2, dtype=torch.long), y[:2])


def test_penalties_on_sequence_logits_without_targets_are_refused():
    """Logits ``(B, T, C)`` without targets: the class axis is unknown (softmax over axis 1
    took T as the classes, a wrong penalty, 0.10 instead of 0.22); a clear error instead, and
    with targets the GPT layout is read from them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    X = torch.randint(0, 7, (3, 5))
    y = torch.randint(0, 7, (3, 5))
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="pass targets="):
        fisher_penalty(model, loss_fn, X, seed=0)
    with pytest.raises(ValueError, match="pass targets="):
        FisherPenalty(model, loss_fn)(X, output=model(X))
    value = fisher_penalty(model, loss_fn, X, seed=0, targets=y)
    assert torch.isfinite(value) and value > 0


def test_reused_gradients_stay_with_their_parameters_when_layers_are_frozen():
    """``every > 1`` reuses the last recomputation's gradients; freezing a layer in between
    (progressive freezing) shifted them onto the wrong parameters (they were zipped by position
    with the new trainable list)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    m = m.double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (8,), generator=g)
    pen = GradientNormPenalty(m, nn.CrossEntropyLoss(), kind="gradient", every=10)
    first = pen(X, y)
    names = [n for n, _ in m.named_parameters()]
    cached = dict(zip(names, torch.autograd.grad(first, list(m.parameters()))))
    for p in m[0].parameters():
        p.requires_grad_(False)
    second = pen(X, y)  # reused
    live = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(second, [p for _, p in live])
    for (n, _), grad_n in zip(live, got):
        torch.testing.assert_close(grad_n, cached[n], rtol=0, atol=0, msg=n)
    assert float(second) == float(first)


@pytest.mark.parametrize("which", ["fisher", "input"])
def test_the_penalty_forward_leaves_batchnorm_running_statistics_alone(which):
    """The penalty's own forward pass (``output=None``, a compiled model, ``kind="input"``) ran
    in train mode and updated BatchNorm's running statistics a second time per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    bn = model[1]
    before = [b.clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    if which == "fisher":
        value = fisher_penalty(model, nn.CrossEntropyLoss(), X, seed=0)
        value.backward()  # the graph is intact
    else:  # GP_x is per example: a train-mode BatchNorm is refused before its forward
        with pytest.raises(ValueError, match="BatchNorm1d at '1' is in train mode"):
            input_gradient_penalty(model, nn.CrossEntropyLoss(), X, y)
    after = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    for b, a in zip(before, after):
        assert torch.equal(a, b)


def test_the_penalty_forward_leaves_the_global_rng_with_dropout():
    """The penalty's own forward pass draws a Dropout mask; the global RNG is put back after it
    (every later draw of the training loop shifted)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    state = torch.get_rng_state()
    fisher_penalty(model, nn.CrossEntropyLoss(), X, seed=0).backward()
    input_gradient_penalty(model, nn.CrossEntropyLoss(), X, y).backward()
    assert torch.equal(torch.get_rng_state(), state)
