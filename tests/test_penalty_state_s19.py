"""Review s19 (F#3): GradientNormPenalty / FisherPenalty resume from a saved state, and a
parameter replaced while the penalty's gradient is cached.

* ``state_dict()`` / ``load_state_dict()`` did not exist: a run resumed from the model's and the
  optimizer's state recomputed at once with fresh label draws (losses 0.560698, 0.985414, ...
  for the uninterrupted 0.559766, 0.912109, ...).
* With ``every > 1`` the cached surrogate was keyed by the old ``nn.Parameter``: a parameter
  replaced by a new one got no penalty gradient (``None``) until the next recomputation.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from curvlab.regularizers import FisherPenalty, GradientNormPenalty


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (6,), generator=g),
        )
        for _ in range(n)
    ]


def _train(model, opt, pen, batches) -> list[torch.Tensor]:
    lf = nn.CrossEntropyLoss()
    losses = []
    for X, y in batches:
        opt.zero_grad()
        out = model(X)
        loss = lf(out, y) + pen(X, y, output=out)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _saved(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("split", [3, 4, 5])  # at a recomputation, one and two calls after
def test_a_resumed_fisher_penalty_trains_as_the_uninterrupted_run(split: int) -> None:
    base, data, lf = _mlp(), _batches(8), nn.CrossEntropyLoss()
    m1 = copy.deepcopy(base)
    o1 = torch.optim.SGD(m1.parameters(), lr=0.5)
    whole = _train(m1, o1, FisherPenalty(m1, lf, alpha=0.5, every=3), data)

    m2 = copy.deepcopy(base)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.5)
    p2 = FisherPenalty(m2, lf, alpha=0.5, every=3)
    _train(m2, o2, p2, data[:split])
    saved = _saved({"model": m2.state_dict(), "opt": o2.state_dict(), "pen": p2.state_dict()})

    m3 = copy.deepcopy(base)
    m3.load_state_dict(saved["model"])
    o3 = torch.optim.SGD(m3.parameters(), lr=0.5)
    o3.load_state_dict(saved["opt"])
    p3 = FisherPenalty(m3, lf, alpha=0.5, every=3)
    p3.load_state_dict(saved["pen"])
    assert p3.calls == split
    resumed = _train(m3, o3, p3, data[split:])
    # the same operations in the same order on the same numbers: equal to the last bit
    assert torch.equal(torch.stack(resumed), torch.stack(whole[split:]))


def test_the_state_holds_the_cache_by_parameter_name() -> None:
    model = _mlp()
    X, y = _batches(1)[0]
    pen = GradientNormPenalty(model, nn.CrossEntropyLoss(), kind="gradient", every=4)
    pen(X, y).backward()
    state = pen.state_dict()
    assert state["calls"] == 1 and state["kind"] == "gradient"
    assert list(state["cached_grads"]) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert state["cached_grads"][name].shape == p.shape


def _gp_brute(model: nn.Module, X: torch.Tensor, y: torch.Tensor, alpha: float):
    """alpha * ||grad_theta L||^2 (mean cross-entropy) and its gradient, by torch.func."""
    lf = nn.CrossEntropyLoss()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(ps):
        return lf(functional_call(model, ps, (X,)), y)

    def penalty(ps):
        g = grad(loss)(ps)
        return alpha * sum((v**2).sum() for v in g.values())

    return penalty(params), grad(penalty)(params)


def test_a_replaced_parameter_makes_the_next_call_recompute() -> None:
    model = _mlp()
    X, y = _batches(1)[0]
    pen = GradientNormPenalty(model, nn.CrossEntropyLoss(), kind="gradient", alpha=0.7, every=3)
    pen(X, y).backward()
    model[0].weight = nn.Parameter(model[0].weight.detach() * 2)  # e.g. a re-initialised layer
    model.zero_grad()
    term = pen(X, y)
    term.backward()
    value, grads = _gp_brute(model, X, y, 0.7)
    # one double backward each, float64: rounding ~1e-16 relative, 1e-12 leaves a wide margin
    torch.testing.assert_close(term.detach(), value, rtol=1e-12, atol=0)
    assert model[0].weight.grad is not None  # None before the fix: the old parameter's term
    torch.testing.assert_close(model[0].weight.grad, grads["0.weight"], rtol=1e-12, atol=1e-15)


def test_a_cache_of_other_shapes_is_dropped_with_a_warning_and_recomputed() -> None:
    model = _mlp()
    X, y = _batches(1)[0]
    lf = nn.CrossEntropyLoss()
    pen = GradientNormPenalty(model, lf, kind="gradient", alpha=0.7, every=3)
    pen(X, y)
    state = pen.state_dict()

    torch.manual_seed(5)
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    resumed = GradientNormPenalty(other, lf, kind="gradient", alpha=0.7, every=3)
    with pytest.warns(RuntimeWarning, match=r"not restored.*0\.weight"):
        resumed.load_state_dict(state)
    assert resumed.calls == 1  # the cycle is restored, the cache is not
    term = resumed(X, y)  # off the schedule: recomputed, not the other model's cached term
    term.backward()
    value, grads = _gp_brute(other, X, y, 0.7)
    torch.testing.assert_close(term.detach(), value, rtol=1e-12, atol=0)
    torch.testing.assert_close(other[0].weight.grad, grads["0.weight"], rtol=1e-12, atol=1e-15)


def test_a_cache_of_another_alpha_is_recomputed() -> None:
    model = _mlp()
    X, y = _batches(1)[0]
    lf = nn.CrossEntropyLoss()
    pen = GradientNormPenalty(model, lf, kind="gradient", alpha=0.7, every=3)
    pen(X, y)
    resumed = GradientNormPenalty(model, lf, kind="gradient", alpha=0.2, every=3)
    with pytest.warns(RuntimeWarning, match="alpha=0.7"):
        resumed.load_state_dict(pen.state_dict())
    value, _ = _gp_brute(model, X, y, 0.2)
    torch.testing.assert_close(resumed(X, y).detach(), value, rtol=1e-12, atol=0)


def test_a_generator_state_of_another_device_type_is_refused_and_changes_nothing() -> None:
    model = _mlp()
    X, y = _batches(1)[0]
    pen = FisherPenalty(model, nn.CrossEntropyLoss(), every=3)
    pen(X, y)
    state = pen.state_dict()
    fresh = FisherPenalty(model, nn.CrossEntropyLoss(), every=3)
    before = fresh.generator.get_state()
    bad = dict(state, generator=torch.zeros(16, dtype=torch.uint8))  # a CUDA generator's
    with pytest.raises(ValueError, match=r'CUDA generator.*state\["generator"\] = None'):
        fresh.load_state_dict(bad)
    assert fresh.calls == 0 and fresh.last_value is None and fresh._cached_grads is None
    assert torch.equal(fresh.generator.get_state(), before)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(dict(state, generator=None))  # the way out: seeded, cache kept
    again = FisherPenalty(model, nn.CrossEntropyLoss(), every=3)
    again.load_state_dict(dict(state, generator=None))
    assert fresh.calls == 1 and fresh._cached_grads is not None
    assert torch.equal(fresh.generator.get_state(), again.generator.get_state())
    assert not torch.equal(fresh.generator.get_state(), before)


def test_a_state_of_another_kind_or_no_state_is_refused() -> None:
    model = _mlp()
    lf = nn.CrossEntropyLoss()
    state = GradientNormPenalty(model, lf, kind="random", every=2).state_dict()
    fisher = FisherPenalty(model, lf)
    with pytest.raises(ValueError, match="kind='random'"):
        fisher.load_state_dict(state)
    with pytest.raises(ValueError, match="not a FisherPenalty state_dict"):
        fisher.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="'calls'"):
        fisher.load_state_dict(dict(FisherPenalty(model, lf).state_dict(), calls=-1))


def test_the_cache_names_are_those_inside_a_wrapper() -> None:
    model = _mlp()
    X, y = _batches(1)[0]
    lf = nn.CrossEntropyLoss()
    wrapped = GradientNormPenalty(nn.DataParallel(model), lf, kind="gradient", every=3)
    wrapped(X, y)
    state = wrapped.state_dict()
    assert list(state["cached_grads"]) == [n for n, _ in model.named_parameters()]
    bare = GradientNormPenalty(model, lf, kind="gradient", every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bare.load_state_dict(state)
    assert torch.equal(bare(X, y).detach(), wrapped(X, y).detach())  # both from the cache
