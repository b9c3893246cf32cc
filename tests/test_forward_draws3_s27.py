"""Review s27 (RX4, MU2), after ``fisher_trace``'s probe learned to accept a forward that re-seeds:

* A forward that draws and caches its draw, or draws every other call, is refused like its
  plain random twin (the probe's second run started from what the first left and saw no draw:
  ``fisher_trace`` 2.528 for 2.352, 1.355 for 2.041); the re-seeding forward stays measured and
  equal to dense float64 brute force.
* The penalties' own forward re-seeds a ``np.random.RandomState`` over a non-MT19937 bit
  generator (it raised "can only re-seed a MT19937 BitGenerator").
* A buffer registered as ``None`` that a forward fills is ``None`` again after the call.
* A global RNG state that cannot be read counts as drawn: ``fisher_trace`` refuses.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import curvlab as cl
import curvlab.regularizers as R
from curvlab import _rng
from curvlab._rng import forward_draws, reseed_held


class CachedNoise(nn.Module):
    """Input noise drawn once per batch shape and cached: random, though a second call draws
    nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.noise: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise is None or self.noise.shape != x.shape:
            self.noise = torch.randn_like(x)
        return x + self.noise


class EveryOther(nn.Module):
    """Dropout on every other call (a counter in a plain attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return nn.functional.dropout(x, 0.5, training=self.calls % 2 == 1)


class Reseeding(nn.Module):
    """Fixed random features from the global RNG re-seeded in every call (deterministic)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(3, 3, generator=gen, dtype=x.dtype)
        torch.manual_seed(1)  # moves (sets) the global state: the probe must look at outputs
        return torch.cos(x @ w)


class LazyBuffer(nn.Module):
    """A buffer registered as None and filled by the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w is None:
            self.w = torch.ones(3, 3, dtype=x.dtype)
        return torch.tanh(x @ self.w)


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _model(first: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(first, nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()


def _brute_fisher_trace(model: nn.Module, x: torch.Tensor) -> float:
    """Tr(F) of the mean cross-entropy, dense float64: (1/N) Σ_n Σ_k p_k ||∇ log p_k||²."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    total = 0.0
    for n in range(x.shape[0]):

        def logp(
            ps: dict[str, torch.Tensor], k: int, xi: torch.Tensor = x[n : n + 1]
        ) -> torch.Tensor:
            return torch.log_softmax(functional_call(model, ps, (xi,))[0], -1)[k]

        probs = logp(params, 0).exp(), *(logp(params, k).exp() for k in (1, 2))
        for k in range(3):
            g = grad(logp)(params, k)
            total += float(probs[k]) * float(sum((t**2).sum() for t in g.values()))
    return total / x.shape[0]


@pytest.mark.parametrize("first", [CachedNoise, EveryOther])
def test_a_forward_that_draws_once_is_refused(first: type[nn.Module]) -> None:
    model = _model(first())
    x, y = _data()
    before = copy.deepcopy(model.state_dict()), dict(model[0].__dict__)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="fisher_trace: the model's forward draws random numbers"):
        cl.fisher_trace(model, nn.CrossEntropyLoss(), [(x, y)], seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model[0].__dict__
    assert after.get("noise", None) is before[1].get("noise", None)
    assert after.get("calls", None) == before[1].get("calls", None)


def test_a_reseeding_forward_stays_measured_and_exact() -> None:
    model = _model(Reseeding())
    x, y = _data()
    value = cl.fisher_trace(model, nn.CrossEntropyLoss(), [(x, y)], seed=0)
    exact = cl.trace(model, nn.CrossEntropyLoss(), [(x, y)], matrix="ggn", method="exact")
    assert float(exact.value) == pytest.approx(_ggn_trace(model, x), rel=1e-10)
    # the sampled trace is unbiased for the same quantity: within 5 standard errors
    assert abs(float(value.value) - float(exact.value)) <= 5 * float(value.stderr) + 1e-12


def _ggn_trace(model: nn.Module, x: torch.Tensor) -> float:
    return _brute_fisher_trace(model, x)  # for cross-entropy F = G


def test_a_none_buffer_is_none_again() -> None:
    model = _model(LazyBuffer())
    x, y = _data()
    value = cl.fisher_trace(model, nn.CrossEntropyLoss(), [(x, y)], seed=0)
    assert model[0].w is None
    exact = cl.trace(model, nn.CrossEntropyLoss(), [(x, y)], matrix="ggn", method="exact")
    assert model[0].w is None
    model(x)  # the brute force's model with its buffer filled, as every pass of the call had it
    assert float(exact.value) == pytest.approx(_brute_fisher_trace(model, x), rel=1e-10)
    assert abs(float(value.value) - float(exact.value)) <= 5 * float(value.stderr) + 1e-12


class FunctionalDropout(nn.Module):
    """``F.dropout`` in a forward (no Dropout module for the scan to see)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, 0.5, training=True)


class PcgNoise(nn.Module):
    """Multiplicative noise from a RandomState over PCG64 that the module holds."""

    def __init__(self) -> None:
        super().__init__()
        self.rs = np.random.RandomState(np.random.PCG64(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.as_tensor(self.rs.rand(*x.shape), dtype=x.dtype)


def test_penalty_reseeds_a_pcg64_random_state_and_puts_it_back() -> None:
    model = _model(PcgNoise())
    x, y = _data()
    state = model[0].rs.get_state(legacy=False)
    value = R.gradient_penalty(model, nn.CrossEntropyLoss(), x, targets=y)
    after = model[0].rs.get_state(legacy=False)
    assert after["bit_generator"] == "PCG64"
    assert after["state"] == state["state"]
    # the penalty's draws: those of the generator re-seeded from its state
    twin = copy.deepcopy(model)
    reseed_held([twin[0].rs])
    params = {k: p.detach() for k, p in twin.named_parameters()}

    def loss(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(twin, ps, (x,)), y)

    g = grad(loss)(params)
    expected = sum((t**2).sum() for t in g.values())
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-10)


def test_an_unreadable_state_counts_as_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_rng, "rng_states", lambda device: None)
    with forward_draws(torch.device("cpu")) as drawn:
        pass
    assert drawn()
    model = _model(FunctionalDropout())
    x, y = _data()
    with pytest.raises(ValueError, match="draws random numbers"):
        cl.fisher_trace(model, nn.CrossEntropyLoss(), [(x, y)], seed=0)


def test_outputs_compared_through_mappings_and_dataclasses() -> None:
    """A Hugging Face ``ModelOutput`` is a mapping: its tensors are compared, not the object."""
    import dataclasses
    from collections import OrderedDict

    from curvlab.estimators._fisher_trace import _same_output

    one, zero = torch.ones(2), torch.zeros(2)
    assert not _same_output(OrderedDict(logits=one), OrderedDict(logits=zero))
    assert _same_output(OrderedDict(logits=one), OrderedDict(logits=one.clone()))

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    assert not _same_output(Out(one), Out(zero))
    nan = torch.tensor([float("nan")])
    assert _same_output((one, [nan]), (one.clone(), [nan.clone()]))
    assert not _same_output("no tensor", "no tensor")


class DropPath(nn.Module):
    """Stochastic depth: the residual branch dropped with probability ``p`` (one draw a call)."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.a, self.p = nn.Linear(3, 3), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and bool(torch.rand(()) < self.p):
            return x
        return x + torch.tanh(self.a(x))


class AliasedNoise(nn.Module):
    """Refills a buffer with fresh noise in place and returns it (without gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 3).double()
        self.register_buffer("noise", torch.zeros(64, 3, dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # the model's output is the buffer itself
            self.noise[: x.shape[0]].copy_(self.l(x) + torch.randn_like(x))
            return self.noise[: x.shape[0]]
        return self.l(x) + torch.randn_like(x)


def test_a_rarely_visible_draw_is_refused_whatever_the_global_state() -> None:
    """RX5-1: a drop-path whose three probe outputs often agree was accepted in 14 of 20 calls,
    with values depending on the global RNG; the states the runs leave now tell it apart."""
    model = _model(DropPath(0.1))
    x, y = _data(16)
    for k in range(10):
        torch.manual_seed(100 + k)
        with pytest.raises(ValueError, match="draws random numbers"):
            cl.fisher_trace(model, nn.CrossEntropyLoss(), [(x, y)], seed=1)


def test_an_output_aliasing_a_refilled_buffer_is_refused() -> None:
    """RX5-2: the probe kept the output objects: a forward returning a buffer it refills compared
    one tensor with itself and was accepted."""
    torch.manual_seed(0)
    model = AliasedNoise()
    x, y = _data(16)
    with pytest.raises(ValueError, match="draws random numbers"):
        cl.fisher_trace(model, nn.CrossEntropyLoss(), [(x, y)], seed=1)
