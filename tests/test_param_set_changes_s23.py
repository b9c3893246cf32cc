"""The trainable parameter set changing between recomputations (review s23).

* ``GradientNormPenalty`` / ``FisherPenalty`` with ``every > 1``: a parameter unfrozen or added
  since the last recomputation got no penalty gradient until the next scheduled one;
* ``NoisyOptimizer(recompute_every=k)``: a layer replaced by one of the same names and shapes
  kept the old layer's cached curvature;
* warm-started ``sharpness``: Ritz vectors of another parameter set of the same total size were
  reused in the wrong coordinates.

Values are checked against dense float64 brute force written here (``torch.func``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
import curvlab.analysis._sharpness as sharpness_module
from curvlab.analysis._measures import measure
from curvlab.regularizers import FisherPenalty, GradientNormPenalty

DT = torch.float64
EPS = torch.finfo(DT).eps


def _mlp(seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- penalties (defect 1)


def _gp_gradient(model: nn.Module, X: torch.Tensor, y: torch.Tensor, alpha: float):
    """Brute force: ``grad_theta alpha ||grad_theta L||^2`` over the trainable parameters."""
    every = _params(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def loss(theta):
        return nn.functional.cross_entropy(functional_call(model, {**every, **theta}, (X,)), y)

    def penalty(theta):
        g = grad(loss)(theta)
        return alpha * sum((g[n] ** 2).sum() for n in names)

    theta = {n: every[n] for n in names}
    return penalty(theta), grad(penalty)(theta)


def _tol(reference: torch.Tensor) -> float:
    # two double backward passes through a few dozen float64 operations
    return 1e3 * EPS * max(1.0, float(reference.abs().max()))


def test_gradient_penalty_gives_an_unfrozen_layer_its_gradient_at_the_next_call() -> None:
    model, (X, y) = _mlp(0), _batch()
    model[0].requires_grad_(False)
    gp = GradientNormPenalty(model, nn.CrossEntropyLoss(), kind="gradient", alpha=0.5, every=5)
    model.zero_grad()
    gp(X, y).backward()  # recomputed for the head alone
    model[0].requires_grad_(True)  # progressive unfreezing
    model.zero_grad()
    value = gp(X, y)
    value.backward()
    ref_value, ref = _gp_gradient(model, X, y, 0.5)
    assert model[0].weight.grad is not None, "the unfrozen layer got no penalty gradient"
    assert abs(float(value.detach()) - float(ref_value)) <= _tol(ref_value)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[name], rtol=0, atol=_tol(ref[name])), name


def test_gradient_penalty_gives_an_appended_layer_its_gradient_at_the_next_call() -> None:
    model, (X, y) = _mlp(1), _batch()
    gp = GradientNormPenalty(model, nn.CrossEntropyLoss(), kind="gradient", alpha=1.0, every=5)
    model.zero_grad()
    gp(X, y).backward()
    extra = nn.Linear(2, 2).to(DT)
    with torch.no_grad():
        extra.weight.copy_(1.5 * torch.eye(2, dtype=DT))
        extra.bias.copy_(torch.tensor([0.3, -0.2], dtype=DT))
    model.append(extra)
    model.zero_grad()
    gp(X, y).backward()
    _, ref = _gp_gradient(model, X, y, 1.0)
    assert model[3].weight.grad is not None, "the appended layer got no penalty gradient"
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[name], rtol=0, atol=_tol(ref[name])), name


def test_fisher_penalty_default_every_recomputes_for_an_unfrozen_layer() -> None:
    # FisherPenalty's default every=10 gave the unfrozen body no gradient for 9 calls; the
    # recomputation it now makes is the every=1 penalty's (same seed: the same labels drawn)
    loss_fn = nn.CrossEntropyLoss()
    X, _ = _batch()
    got, want = _mlp(2), _mlp(2)
    for m in (got, want):
        m[0].requires_grad_(False)
    cached, fresh = FisherPenalty(got, loss_fn, alpha=1.0), FisherPenalty(want, loss_fn, every=1)
    for call in range(3):
        if call == 1:
            for m in (got, want):
                m[0].requires_grad_(True)
        for pen, m in ((cached, got), (fresh, want)):
            m.zero_grad()
            pen(X).backward()
        if call == 0:
            assert got[0].weight.grad is None and want[0].weight.grad is None
            continue
        assert got[0].weight.grad is not None, f"call {call}: no gradient for the unfrozen body"
        if call == 1:  # the recomputation: that of the every=1 penalty
            for (name, p), q in zip(got.named_parameters(), want.parameters()):
                assert torch.allclose(p.grad, q.grad, rtol=0, atol=_tol(q.grad)), name


def test_gradient_penalty_keeps_its_cache_for_a_layer_frozen_since() -> None:
    # no recomputation where a parameter was frozen: its cached term leaves it out (kind
    # "random" draws labels on a recomputation only: the generator tells)
    model, (X, _) = _mlp(3), _batch()
    gp = GradientNormPenalty(model, nn.CrossEntropyLoss(), kind="random", alpha=1.0, every=5)
    model.zero_grad()
    gp(X).backward()
    head = model[2].weight.grad.clone()
    drawn = gp.generator.get_state()
    model[0].requires_grad_(False)
    model.zero_grad()
    gp(X).backward()
    assert torch.equal(gp.generator.get_state(), drawn)  # not recomputed
    assert model[0].weight.grad is None
    assert torch.equal(model[2].weight.grad, head)


def test_gradient_penalty_resumed_keeps_the_loaded_cache() -> None:
    # the trainable set is not saved: taken from the model at load, the resumed run reuses the
    # cache as the uninterrupted one does
    model, (X, _) = _mlp(4), _batch()
    loss_fn = nn.CrossEntropyLoss()
    gp = GradientNormPenalty(model, loss_fn, kind="random", alpha=1.0, every=4, seed=3)
    model.zero_grad()
    gp(X).backward()
    state = copy.deepcopy(gp.state_dict())
    model.zero_grad()
    gp(X).backward()
    uninterrupted = [p.grad.clone() for p in model.parameters()]
    other = copy.deepcopy(model)
    resumed = GradientNormPenalty(other, loss_fn, kind="random", alpha=1.0, every=4, seed=3)
    resumed.load_state_dict(state)
    drawn = resumed.generator.get_state()
    other.zero_grad()
    resumed(X).backward()
    assert torch.equal(resumed.generator.get_state(), drawn)  # the cache, not a recomputation
    for a, p in zip(uninterrupted, other.parameters()):
        assert torch.equal(a, p.grad)


# ---------------------------------------------------------------- NoisyOptimizer (defect 2)


def _empirical_diag(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Brute force: ``(1/N) sum_n g_n^2`` with ``g_n`` the gradient of example ``n``'s NLL."""
    theta = _params(model)

    def nll(t, x, target):
        return nn.functional.cross_entropy(functional_call(model, t, (x[None],)), target[None])

    g = vmap(grad(nll), in_dims=(None, 0, 0))(theta, X, y)
    return {n: (v**2).mean(0) for n, v in g.items()}


def _replace_head(model: nn.Sequential, opt: torch.optim.Optimizer, factor: float) -> None:
    """A new head of the same names and shapes (re-initialised), handed to the optimizer."""
    head = nn.Linear(4, 2).to(DT)
    with torch.no_grad():
        head.weight.copy_(factor * torch.linspace(-1, 1, 8, dtype=DT).reshape(2, 4))
        head.bias.copy_(torch.tensor([0.5, -0.5], dtype=DT))
    model[2] = head
    opt.add_param_group({"params": list(head.parameters())})


@pytest.mark.parametrize("path", ["separate", "closure"])
@pytest.mark.parametrize("sampler", ["diag", "trace"])
def test_noisy_optimizer_measures_a_replaced_layer_anew(path: str, sampler: str) -> None:
    model, (X, y) = _mlp(5), _batch()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = (
        cl.noise.DiagFisherNoise("empirical", scale=1.0)
        if sampler == "diag"
        else cl.noise.FisherTraceNoise("empirical", scale=1.0)
    )
    noisy = cl.noise.NoisyOptimizer(opt, noise, model, loss_fn, recompute_every=10, seed=0)
    for step in range(3):
        if step == 1:
            _replace_head(model, opt, factor=20.0)
            want = _empirical_diag(model, X, y)  # at the parameters of the measuring step
        if path == "closure":

            def closure():
                noisy.zero_grad()
                loss = loss_fn(model(X), y)
                loss.backward()
                return loss

            noisy.step(closure)
        else:
            noisy.zero_grad()
            loss_fn(model(X), y).backward()
            noisy.step(inputs=X, targets=y)
    got = noisy.state_dict()["sampler_state"]
    if sampler == "diag":
        for name, ref in want.items():
            tol = 1e2 * EPS * max(1.0, float(ref.abs().max()))
            assert torch.allclose(got[name], ref, rtol=0, atol=tol), name
    else:  # Tr(F) / d
        ref = sum(v.sum() for v in want.values()) / sum(v.numel() for v in want.values())
        assert abs(float(got) - float(ref)) <= 1e2 * EPS * max(1.0, float(ref))
    assert noisy.state_dict()["sampler_state_step"] == 1  # measured when the head was replaced


def test_noisy_optimizer_kfac_measures_a_replaced_layer_anew() -> None:
    model, (X, y) = _mlp(6), _batch()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = cl.noise.KFACNoise("empirical", scale=1.0)
    noisy = cl.noise.NoisyOptimizer(opt, sampler, model, loss_fn, recompute_every=10, seed=0)
    for step in range(2):
        if step == 1:
            _replace_head(model, opt, factor=10.0)
            want = sampler.estimate(model, loss_fn, X, y, torch.Generator())
        noisy.zero_grad()
        loss_fn(model(X), y).backward()
        noisy.step(inputs=X, targets=y)
    got = noisy.state_dict()["sampler_state"]
    for layer in want:
        for factor in want[layer]:
            assert torch.equal(got[layer][factor], want[layer][factor]), (layer, factor)


def test_noisy_optimizer_in_place_reload_recipe_measures_anew() -> None:
    # model.load_state_dict keeps the parameter objects: not seen (documented); the documented
    # recipe drops the cached curvature so the next step measures the reloaded model's
    model, (X, y) = _mlp(7), _batch()
    loss_fn = nn.CrossEntropyLoss()
    ckpt = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model[0].weight.mul_(5.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = cl.noise.DiagFisherNoise("empirical", scale=1.0)
    noisy = cl.noise.NoisyOptimizer(opt, noise, model, loss_fn, recompute_every=10, seed=0)
    noisy.zero_grad()
    loss_fn(model(X), y).backward()
    noisy.step(inputs=X, targets=y)
    model.load_state_dict(ckpt)
    noisy.load_state_dict({**noisy.state_dict(), "sampler_state": None})
    want = _empirical_diag(model, X, y)
    noisy.zero_grad()
    loss_fn(model(X), y).backward()
    noisy.step(inputs=X, targets=y)
    got = noisy.state_dict()["sampler_state"]
    for name, ref in want.items():
        tol = 1e2 * EPS * max(1.0, float(ref.abs().max()))
        assert torch.allclose(got[name], ref, rtol=0, atol=tol), name


def test_noisy_optimizer_resumed_reuses_its_state_bitwise() -> None:
    # the parameter objects are not saved: a resumed run takes the model's and reuses the
    # loaded state, bitwise as the uninterrupted run
    loss_fn = nn.CrossEntropyLoss()
    X, y = _batch()

    def build(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        noise = cl.noise.DiagFisherNoise("empirical", scale=1.0)
        return cl.noise.NoisyOptimizer(opt, noise, model, loss_fn, recompute_every=4, seed=2)

    def run(model, noisy, steps):
        for _ in range(steps):
            noisy.zero_grad()
            loss_fn(model(X), y).backward()
            noisy.step(inputs=X, targets=y)

    a = _mlp(8)
    noisy_a = build(a)
    run(a, noisy_a, 2)
    saved = copy.deepcopy((a.state_dict(), noisy_a.state_dict()))
    run(a, noisy_a, 3)
    b = _mlp(9)
    b.load_state_dict(saved[0])
    noisy_b = build(b)
    noisy_b.load_state_dict(saved[1])
    run(b, noisy_b, 3)
    assert noisy_b.state_dict()["sampler_state_step"] == noisy_a.state_dict()["sampler_state_step"]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- sharpness (defect 3)


def _two_blocks() -> nn.Sequential:
    g = torch.Generator().manual_seed(10)
    model = nn.Sequential(
        nn.Linear(3, 3, bias=False), nn.Tanh(), nn.Linear(3, 3, bias=False), nn.Tanh()
    ).to(DT)
    model.append(nn.Linear(3, 2).to(DT))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    model[4].requires_grad_(False)
    return model


def _top_hessian_eigenvalue(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    every = _params(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [every[n].numel() for n in names]

    def f(flat):
        theta, i = dict(every), 0
        for n, s in zip(names, sizes):
            theta[n] = flat[i : i + s].reshape(every[n].shape)
            i += s
        return nn.functional.cross_entropy(functional_call(model, theta, (X,)), y)

    flat = torch.cat([every[n].reshape(-1) for n in names])
    return float(torch.linalg.eigvalsh(torch.func.hessian(f)(flat))[-1])


def test_sharpness_warm_start_is_dropped_for_another_parameter_set_of_equal_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starts: list[bool] = []
    original = sharpness_module.warm_top_eigenvalue

    def spy(op, warm, *args, **kwargs):
        starts.append(warm is not None)
        return original(op, warm, *args, **kwargs)

    monkeypatch.setattr(sharpness_module, "warm_top_eigenvalue", spy)
    model, (X, y) = _two_blocks(), _batch(16, seed=11)
    loss_fn = nn.CrossEntropyLoss()
    state: dict = {}
    tol = 1e-6  # sharpness_tol: the value within tol |lambda| (and in practice far closer)

    def sharpness() -> float:
        out = measure(
            model, loss_fn, (X, y), ["sharpness"], state=state, options={"sharpness_tol": tol}
        )
        return out.values["sharpness"]

    model[2].requires_grad_(False)  # block 0 (9 entries) trainable
    sharpness()
    sharpness()  # the same parameters: warm
    model[0].requires_grad_(False)
    model[2].requires_grad_(True)  # block 2, also 9 entries: other coordinates
    value = sharpness()
    assert starts == [False, True, False], starts
    ref = _top_hessian_eigenvalue(model, X, y)
    assert abs(value - ref) <= tol * abs(ref)
    sharpness()  # and warm again for this set
    assert starts[-1] is True
