"""Noise review, sweep 11 (found in review). Each case was wrong before:

* a ``NoisyOptimizer`` whose optimizer steps none of ``model``'s parameters (built on a copy)
  trained without any noise and without a word; ``stop_fraction=True`` was accepted;
* a curvlab call (``cl.trace``, ``curvature_operator``, ...) inside a capturing step was blamed on
  the user's forward ("the model was called more than once"), and a noise sampler's own
  ``sample()`` there was refused although its pass is curvlab's own;
* ``FullFisherNoise`` + GradScaler + gradient accumulation raised on the step after one the
  scaler skipped (the earlier micro-batches refill the cleared gradients before the capture);
* ``load_state_dict`` took another sampler's cached state: a diagonal read as K-FAC factors
  added exactly zero noise, other pairs failed with a bare ``AttributeError``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    NoisyOptimizer,
)

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp(dtype: torch.dtype = DT) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _batches(k: int, n: int = 8, dtype: torch.dtype = DT) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
        for _ in range(k)
    ]


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------ the optimizer and the model
@pytest.mark.parametrize("sampler", ["isotropic", "diag"])
def test_an_optimizer_over_a_copy_of_the_model_is_refused(sampler: str) -> None:
    model = _mlp()
    twin = copy.deepcopy(model)
    made = IsotropicNoise(10.0) if sampler == "isotropic" else DiagFisherNoise(scale=10.0)
    with pytest.raises(ValueError, match=r"steps none of the parameters of model=.*copy"):
        NoisyOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), made, model, nn.MSELoss())


def test_tensors_stepped_outside_the_model_are_named_and_parts_are_fine() -> None:
    model = _mlp()
    temperature = nn.Parameter(torch.ones(1, dtype=DT))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) that are not parameters.*\(1,\)"):
        NoisyOptimizer(opt, IsotropicNoise(0.1), model)
    with warnings.catch_warnings():  # a part of the model (documented): neither error nor warning
        warnings.simplefilter("error")
        NoisyOptimizer(torch.optim.SGD(model[2].parameters(), lr=0.1), IsotropicNoise(0.1), model)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stop_fraction": True, "total_steps": 10},
        {"stop_fraction": "0.5", "total_steps": 10},
        {"stop_fraction": float("nan"), "total_steps": 10},
        {"stop_fraction": 0.5, "total_steps": True},
        {"stop_after": True},
    ],
)
def test_schedule_refuses_bools_and_non_numbers(kwargs: dict[str, object]) -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="must be"):
        NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), IsotropicNoise(0.1), model, **kwargs)  # type: ignore[arg-type]  # fmt: skip


def test_schedule_takes_numpy_numbers() -> None:
    model = _mlp()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        IsotropicNoise(0.1),
        model,
        stop_fraction=np.float32(0.25),
        total_steps=np.int64(10),
    )
    assert noisy.stop_step == 2 and type(noisy.stop_step) is int


# ------------------------------------------------------------ curvlab calls inside a capture
CALLS: dict[str, Callable[[nn.Module, nn.Module, tuple[Tensor, Tensor]], object]] = {
    "trace": lambda m, lf, b: cl.trace(m, lf, b, num_probes=2).value,
    "curvature_operator": lambda m, lf, b: (
        cl.curvature_operator(m, lf, b)
        @ torch.ones(sum(p.numel() for p in m.parameters()), dtype=DT)
    ),
    "diag_fisher": lambda m, lf, b: torch.cat(
        [v.reshape(-1) for v in cl.diag_fisher(m, lf, b).values()]
    ),
}


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_curvlab_call_inside_the_capture_is_left_alone(call: str, where: str) -> None:
    """curvlab's own passes are marked as such (``leave_no_trace``), so a capture open around
    them ignores them: the step is bitwise that of the loop without the call, and the call's
    value that of the same call outside the step (it was refused as a second forward of the
    user's before; found in review)."""
    loss_fn = nn.CrossEntropyLoss()
    (X, y), other = _batches(2)

    def run(inside: bool) -> tuple[Tensor, object, Tensor]:
        model = _mlp()
        noisy = NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), DiagFisherNoise(scale=0.5), model, loss_fn
        )
        outside = CALLS[call](model, loss_fn, other)
        got = []

        def closure() -> Tensor:
            noisy.zero_grad()
            if inside and where == "before":
                got.append(CALLS[call](model, loss_fn, other))
            loss = loss_fn(model(X), y)
            if inside and where == "after":
                got.append(CALLS[call](model, loss_fn, other))
            loss.backward()
            return loss

        noisy.step(closure)
        assert noisy.steps_taken == 1
        return _flat(model), (got[0] if got else None), outside

    plain, _, _ = run(inside=False)
    trained, value, outside = run(inside=True)
    assert torch.equal(trained, plain)
    assert torch.equal(torch.as_tensor(value), torch.as_tensor(outside))


def _empirical_diag(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Brute force ``(1/N) sum_n grad NLL_n ** 2`` (cross-entropy, mean)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def nll(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        out = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, t.unsqueeze(0), reduction="sum")

    g = vmap(grad(nll), in_dims=(None, 0, 0))(params, X, y)
    return {n: (v**2).mean(0) for n, v in g.items()}


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_samplers_own_pass_inside_the_capture_is_left_alone(where: str) -> None:
    """``sampler.sample`` inside the step: the capture stays one pass and exact, training is
    bitwise that of the loop without the call, and the sample that of a call outside."""
    loss_fn = nn.CrossEntropyLoss()
    batches, (Xv, yv) = _batches(3), _batches(4)[3]
    side = KFACNoise("mc", scale=0.3)

    def run(inside: bool) -> tuple[Tensor, list[dict[str, Tensor]], list[tuple]]:
        model = _mlp()
        noisy = NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            DiagFisherNoise("empirical", scale=0.5),
            model,
            loss_fn,
            seed=0,
        )
        samples, seen = [], []
        for X, y in batches:
            at = {k: v.clone() for k, v in model.state_dict().items()}

            def closure(X: Tensor = X, y: Tensor = y) -> Tensor:
                noisy.zero_grad()
                if inside and where == "before":
                    samples.append(side.sample(model, loss_fn, Xv, yv, seed=7))
                loss = loss_fn(model(X), y)
                if inside and where == "after":
                    samples.append(side.sample(model, loss_fn, Xv, yv, seed=7))
                loss.backward()
                return loss

            noisy.step(closure)
            seen.append((at, X, y, {n: d.clone() for n, d in noisy._state.items()}))
        return _flat(model), samples, seen

    plain, _, _ = run(inside=False)
    trained, samples, seen = run(inside=True)
    assert torch.equal(trained, plain)
    for (at, X, y, state), sample in zip(seen, samples, strict=True):
        model = _mlp()
        model.load_state_dict(at)
        want = _empirical_diag(model, X, y)  # the captured diagonal: brute force at that step
        for n in want:
            torch.testing.assert_close(state[n], want[n], rtol=1e-10, atol=1e-15)
        outside = side.sample(model, loss_fn, Xv, yv, seed=7)
        for n in outside:
            assert torch.equal(sample[n], outside[n])


# ------------------------------------------------------------ skipped step, accumulation
def _accumulated_run(
    kind: str, batches: list[tuple[Tensor, Tensor]], poison: int | None, clear: str
) -> tuple[Tensor, int]:
    """Two micro-batches per step, the last captured with ``loss_factor=0.5``, under a
    GradScaler; step ``poison`` gets an inf gradient from its first micro-batch (skipped)."""
    model, loss_fn = _mlp(torch.float32), nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        FullFisherNoise(kind, scale=0.5),
        model,
        loss_fn,
        seed=0,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for step, (X, y) in enumerate(batches):
        if clear == "noisy":
            noisy.zero_grad()
        elif clear == "model":
            model.zero_grad()
        else:
            noisy.zero_grad(set_to_none=False)
        scaler.scale(loss_fn(model(X[:4]), y[:4]) * 0.5).backward()
        if step == poison:  # a gradient that overflowed in this micro-batch
            model[0].weight.grad[0, 0] = float("inf")
        with noisy.capture(loss_factor=0.5):
            scaler.scale(loss_fn(model(X[4:]), y[4:]) * 0.5).backward()
        scaler.step(noisy)
        scaler.update()
    return _flat(model), noisy.steps_taken


@pytest.mark.parametrize("clear", ["noisy", "model", "zeros"])
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_skipped_step_under_accumulation_is_as_if_absent(kind: str, clear: str) -> None:
    batches = _batches(4, dtype=torch.float32)
    skipped, n_skipped = _accumulated_run(kind, batches, poison=1, clear=clear)
    without, n_without = _accumulated_run(kind, batches[:1] + batches[2:], None, clear)
    assert n_skipped == n_without == 3
    assert torch.equal(skipped, without)


def test_capturing_every_micro_batch_is_still_refused_with_zeros_kept() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), FullFisherNoise("true", scale=1.0), model, loss_fn
    )  # fmt: skip
    (X, y), _ = _batches(2)
    noisy.zero_grad(set_to_none=False)
    with noisy.capture(loss_factor=0.5):
        (loss_fn(model(X[:4]), y[:4]) * 0.5).backward()
    with pytest.raises(RuntimeError, match="wrap only the LAST micro-batch"), noisy.capture(0.5):
        (loss_fn(model(X[4:]), y[4:]) * 0.5).backward()


# ------------------------------------------------------------ checkpoints of another sampler
SAMPLERS: dict[str, Callable[[], cl.noise.NoiseSampler]] = {
    "diag-empirical": lambda: DiagFisherNoise("empirical", scale=1.0),
    "diag-mc": lambda: DiagFisherNoise("mc", scale=1.0),
    "trace": lambda: FisherTraceNoise("empirical", scale=1.0),
    "kfac": lambda: KFACNoise("empirical", scale=1.0),
    "full-true": lambda: FullFisherNoise("true", scale=1.0),
    "full-empirical": lambda: FullFisherNoise("empirical", scale=1.0),
}


def _noisy(model: nn.Module, sampler: cl.noise.NoiseSampler) -> NoisyOptimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return NoisyOptimizer(opt, sampler, model, nn.CrossEntropyLoss(), seed=0, recompute_every=5)


def _step(noisy: NoisyOptimizer, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """One separate-pass step; the noise it added."""
    model = noisy.model
    noisy.zero_grad()
    noisy.loss_fn(model(X), y).backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    saved = [p.detach().clone() for p in model.parameters()]
    noisy.optimizer.param_groups[0]["lr"], lr = 0.0, noisy.optimizer.param_groups[0]["lr"]
    noisy.step(inputs=X, targets=y)
    noisy.optimizer.param_groups[0]["lr"] = lr
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    return {n: p.grad - clean[n] for n, p in model.named_parameters()}


def _saved(name: str, tagged: bool) -> dict[str, object]:
    model = _mlp()
    noisy = _noisy(model, SAMPLERS[name]())
    _step(noisy, *_batches(1)[0])
    state = noisy.state_dict()
    if not tagged:
        state.pop("sampler", None)  # a checkpoint from before the entry
    return state


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("diag-empirical", "kfac"),
        ("kfac", "diag-empirical"),
        ("diag-empirical", "trace"),
        ("diag-mc", "diag-empirical"),
        ("full-true", "full-empirical"),
    ],
)
def test_a_state_saved_with_another_sampler_is_refused(src: str, dst: str) -> None:
    state = _saved(src, tagged=True)
    model = _mlp()
    noisy = _noisy(model, SAMPLERS[dst]())
    with pytest.raises(ValueError, match=r"saved with .*this NoisyOptimizer has .*drop the saved"):
        noisy.load_state_dict(state)
    assert noisy.steps_taken == 0 and noisy._state is None  # nothing loaded
    assert not noisy.optimizer.state


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("diag-empirical", "kfac"),
        ("kfac", "diag-empirical"),
        ("diag-empirical", "trace"),
        ("trace", "kfac"),
    ],  # fmt: skip
)
def test_an_untagged_state_of_another_shape_is_refused(src: str, dst: str) -> None:
    state = _saved(src, tagged=False)
    noisy = _noisy(_mlp(), SAMPLERS[dst]())
    with pytest.raises(ValueError, match="does not say which sampler saved it.*cannot use"):
        noisy.load_state_dict(state)
    assert noisy.steps_taken == 0 and noisy._state is None


@pytest.mark.parametrize("name", ["diag-empirical", "trace", "kfac"])
@pytest.mark.parametrize("tagged", [True, False])
def test_a_state_of_the_same_sampler_resumes_bitwise(name: str, tagged: bool) -> None:
    batches = _batches(4)
    model = _mlp()
    noisy = _noisy(model, SAMPLERS[name]())
    _step(noisy, *batches[0])
    state = noisy.state_dict()
    if not tagged:
        state.pop("sampler", None)
    want = [_step(noisy, X, y) for X, y in batches[1:]]
    resumed = _noisy(_mlp(), SAMPLERS[name]())
    resumed.load_state_dict(state)
    got = [_step(resumed, X, y) for X, y in batches[1:]]
    for a, b in zip(want, got):
        for n in a:
            assert torch.equal(a[n], b[n])


def test_dropping_the_saved_sampler_goes_on_with_another_measured_anew() -> None:
    state = _saved("diag-empirical", tagged=True)
    noisy = _noisy(_mlp(), KFACNoise("empirical", scale=1.0))
    noisy.load_state_dict({**state, "sampler": None, "sampler_state": None})
    added = _step(noisy, *_batches(2)[1])
    assert all(v.abs().max() > 1e-6 for v in added.values())  # (zero from the diagonal before)
