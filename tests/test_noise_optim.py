"""NoisyOptimizer: schedules, curvature reuse, one-pass capture, resume, optimizers, no trace."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from curvlab._rng import make_generator
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    MultiplicativeNoise,
    NoisyOptimizer,
)
from curvlab.noise._diagonal import diag_curvature
from tests import reference as R
from tests.problems import make_problem


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 3)
        ).double()


def _data(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return (
        torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (6,), generator=gen),
    )


def _make_opt(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "momentum":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(model.parameters(), lr=0.01)


SAMPLERS = {
    "diag": lambda: DiagFisherNoise("empirical", scale=0.5),
    "diag-mc": lambda: DiagFisherNoise("mc", scale=0.5),
    "trace": lambda: FisherTraceNoise("empirical", scale=0.5),
    "kfac": lambda: KFACNoise("empirical", scale=0.5),
    "full-true": lambda: FullFisherNoise("true", scale=0.5),
    "full-emp": lambda: FullFisherNoise("empirical", scale=0.5),
    "iso": lambda: IsotropicNoise(0.1),
    "mult": lambda: MultiplicativeNoise(0.5),
}


def _train(noisy: NoisyOptimizer, model, loss_fn, steps: range, path: str) -> list[Tensor]:
    losses = []
    for t in steps:
        X, y = _data(t)
        if path == "closure":

            def closure(X=X, y=y):
                noisy.zero_grad()
                loss = loss_fn(model(X), y)
                loss.backward()
                return loss

            losses.append(noisy.step(closure).detach())
        elif path == "capture":
            noisy.zero_grad()
            with noisy.capture():
                loss = loss_fn(model(X), y)
                loss.backward()
            noisy.step()
            losses.append(loss.detach())
        else:
            noisy.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            noisy.step(inputs=X, targets=y)
            losses.append(loss.detach())
    return losses


# ---------------------------------------------------------------------------- resume
@pytest.mark.parametrize("sampler_name", ["diag", "kfac", "full-true", "trace", "mult"])
@pytest.mark.parametrize("opt_kind", ["momentum", "adam"])
def test_resume_is_bitwise_identical(sampler_name: str, opt_kind: str) -> None:
    loss_fn = nn.CrossEntropyLoss()

    def fresh(model):
        return NoisyOptimizer(
            _make_opt(opt_kind, model),
            SAMPLERS[sampler_name](),
            model,
            loss_fn,
            recompute_every=3,
            seed=7,
        )

    model_a = _net()
    noisy_a = fresh(model_a)
    _train(noisy_a, model_a, loss_fn, range(7), "closure")

    model_b = _net()
    noisy_b = fresh(model_b)
    _train(noisy_b, model_b, loss_fn, range(4), "closure")
    saved = copy.deepcopy((model_b.state_dict(), noisy_b.state_dict()))
    model_c = _net()
    model_c.load_state_dict(saved[0])
    noisy_c = fresh(model_c)
    noisy_c.load_state_dict(saved[1])
    _train(noisy_c, model_c, loss_fn, range(4, 7), "closure")
    for (n, a), c in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(a, c), n


# ---------------------------------------------------------------------------- paths
@pytest.mark.parametrize("sampler_name", ["diag", "kfac", "trace", "full-true", "full-emp"])
def test_one_pass_paths_match_separate_pass(sampler_name: str) -> None:
    """Closure, capture and inputs= paths give the same training run (up to rounding)."""
    loss_fn = nn.CrossEntropyLoss()
    finals = []
    for path in ("closure", "capture", "inputs"):
        model = _net()
        noisy = NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            SAMPLERS[sampler_name](),
            model,
            loss_fn,
            seed=3,
            recompute_every=2,
        )
        _train(noisy, model, loss_fn, range(4), path)
        finals.append(R.flat(model))
    torch.testing.assert_close(finals[0], finals[2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(finals[1], finals[2], rtol=1e-10, atol=1e-12)


def test_sgd_update_is_eq2_and_capture_uses_one_pass() -> None:
    """theta <- theta - lr (grad + eps) with eps drawn from the diagonal of the same pass."""
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    sampler = DiagFisherNoise("empirical", scale=0.3)
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), sampler, model, loss_fn, seed=4
    )
    X, y = _data(0)
    theta0 = R.flat(model)
    grad = torch.func.grad(
        lambda t: loss_fn(torch.func.functional_call(model, R.unflatten(model, t), (X,)), y)
    )(theta0)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    _train(noisy, model, loss_fn, range(1), "closure")
    handle.remove()
    # the step's forward and, once per input signature, forwards on two examples (the two
    # passes of the mixed-examples check, review s24, then the layout check, curvlab/_layout.py)
    # with one on one example with gradient between them (a forward that differentiates, review
    # s26 RX5-3): no second pass over the batch
    assert calls == [len(X), 2, 2, 1, 2], "the one-pass path must not run a second forward pass"
    gen = make_generator(4)
    diag = diag_curvature(model_copy := _net(), loss_fn, X, y, "empirical", gen)
    eps = sampler.draw(model_copy, diag, gen)
    expected = theta0 - 0.5 * (grad + torch.cat([eps[n].reshape(-1) for n in R.param_names(model)]))
    torch.testing.assert_close(R.flat(model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_kind", ["sgd", "momentum", "adam"])
def test_noise_passes_through_optimizer_as_a_gradient(opt_kind: str) -> None:
    loss_fn = nn.CrossEntropyLoss()
    model = _net()
    noisy = NoisyOptimizer(_make_opt(opt_kind, model), KFACNoise(scale=0.5), model, loss_fn, seed=1)
    _train(noisy, model, loss_fn, range(3), "inputs")
    ref = _net()
    opt = _make_opt(opt_kind, ref)
    sampler, gen = KFACNoise(scale=0.5), make_generator(1)
    for t in range(3):
        X, y = _data(t)
        opt.zero_grad()
        loss_fn(ref(X), y).backward()
        eps = sampler.draw(ref, sampler.estimate(ref, loss_fn, X, y, gen), gen)
        for n, p in ref.named_parameters():
            p.grad.add_(eps[n])
        opt.step()
    torch.testing.assert_close(R.flat(model), R.flat(ref), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "kwargs,stop", [({"stop_after": 3}, 3), ({"stop_fraction": 0.25, "total_steps": 8}, 2)]
)
def test_noise_stops_when_asked(kwargs: dict, stop: int) -> None:
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), IsotropicNoise(0.1), model, **kwargs
    )
    for t in range(6):
        X, y = _data(t)
        noisy.zero_grad()
        loss_fn(model(X), y).backward()
        before = R.flat(model)
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert noisy.noise_active == (t < stop)
        noisy.step()
        noise = before - R.flat(model) - grad
        if t < stop:
            assert noise.abs().min() > 0
        else:
            assert torch.equal(before - grad, R.flat(model))


def test_curvature_is_reused_between_recomputations() -> None:
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    sampler = DiagFisherNoise(scale=0.5)
    counts = {"estimate": 0, "capture": 0}
    estimate, capture = sampler.estimate, sampler.capture

    def counting_estimate(*a, **k):
        counts["estimate"] += 1
        return estimate(*a, **k)

    def counting_capture(*a, **k):
        counts["capture"] += 1
        return capture(*a, **k)

    sampler.estimate, sampler.capture = counting_estimate, counting_capture
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        sampler,
        model,
        loss_fn,
        recompute_every=3,
        stop_after=8,
    )
    _train(noisy, model, loss_fn, range(10), "inputs")  # recompute at 0, 3, 6; stop at 8
    assert counts == {"estimate": 3, "capture": 0}
    counts.update(estimate=0)
    noisy2 = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), sampler, model, loss_fn, recompute_every=4
    )
    _train(noisy2, model, loss_fn, range(9), "closure")  # captures at 0, 4, 8
    assert counts == {"estimate": 0, "capture": 3}
    # between recomputations the same diagonal is used: the noise ratio to sqrt(diag) is N(0, s^2)
    assert noisy2._state_step == 8


# ---------------------------------------------------------------------------- no trace
@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
@pytest.mark.parametrize("path", ["closure", "inputs"])
def test_training_leaves_no_hooks_and_sample_leaves_no_trace(sampler_name: str, path: str) -> None:
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), SAMPLERS[sampler_name](), model, loss_fn
    )
    before = R.snapshot(model)
    loss_hooks = (len(loss_fn._forward_hooks), len(loss_fn._forward_pre_hooks))
    rng = torch.get_rng_state()
    _train(noisy, model, loss_fn, range(2), path)
    after = R.snapshot(model)
    assert after["hooks"] == before["hooks"] and after["attrs"] == before["attrs"]
    assert after["param_attrs"] == before["param_attrs"]
    assert (len(loss_fn._forward_hooks), len(loss_fn._forward_pre_hooks)) == loss_hooks
    assert torch.equal(torch.get_rng_state(), rng), "global RNG used"
    X, y = _data(0)
    model.zero_grad()
    loss_fn(model(X), y).backward()
    before = R.snapshot(model)
    eps = SAMPLERS[sampler_name]().sample(model, loss_fn, X, y, seed=0)
    R.assert_untouched(model, before)
    assert {n: e.shape for n, e in eps.items()} == {n: p.shape for n, p in model.named_parameters()}


def test_bn_model_falls_back_to_a_second_pass_in_capture() -> None:
    p = make_problem("cnnbn-ce-mean-three")
    model, loss_fn = p.model, p.loss_fn
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), DiagFisherNoise(scale=0.5), model, loss_fn
    )
    ref = copy.deepcopy(model)
    before = R.snapshot(model)
    noisy.zero_grad()
    with noisy.capture():
        loss = loss_fn(model(p.X), p.y)
        loss.backward()
    noisy.step()
    assert R.snapshot(model)["hooks"] == before["hooks"]
    gen = make_generator(0)
    diag = diag_curvature(ref, loss_fn, p.X, p.y, "empirical", gen)
    torch.testing.assert_close(noisy._state, diag)


def test_errors_are_clear() -> None:
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs loss_fn"):
        NoisyOptimizer(opt, DiagFisherNoise(scale=1.0), model)
    with pytest.raises(ValueError, match="recompute_every"):
        NoisyOptimizer(opt, DiagFisherNoise(scale=1.0), model, loss_fn, recompute_every=0)
    with pytest.raises(ValueError, match="go together"):
        NoisyOptimizer(opt, IsotropicNoise(1.0), model, stop_fraction=0.25)
    noisy = NoisyOptimizer(opt, DiagFisherNoise(scale=1.0), model, loss_fn)
    X, y = _data(0)
    loss_fn(model(X), y).backward()
    with pytest.raises(ValueError, match="needs this step's batch"):
        noisy.step()
    with pytest.raises(RuntimeError, match="more than once"), noisy.capture():
        model(X)
        model(X)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler_name", ["diag", "full-true", "full-emp", "trace", "iso", "mult"])
def test_cuda_step_does_not_synchronise(sampler_name: str) -> None:
    model = _net().float().cuda()
    loss_fn = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        SAMPLERS[sampler_name](),
        model,
        loss_fn,
        recompute_every=2,
    )
    X, y = _data(0)
    X, y = X.float().cuda(), y.cuda()

    def closure():
        noisy.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    noisy.step(closure)  # warm-up (allocations, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            noisy.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_capture_without_the_loss_module_is_a_clear_error(kind: str) -> None:
    """The loop computes its loss with another instance (or ``F.cross_entropy``): the capture
    never saw the targets, so a separate pass would not know them (nor the ignored positions)."""
    model = _net()
    X, y = _data(0)
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), DiagFisherNoise(kind, scale=0.1), model, lf
    )
    before = [p.detach().clone() for p in model.parameters()]
    with noisy.capture():
        nn.CrossEntropyLoss()(model(X), y).backward()
    with pytest.raises(RuntimeError, match="same module instance"):
        noisy.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
