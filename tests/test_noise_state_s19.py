"""Review s19: the noise samplers leave the user's model as they found it, and
NoisyOptimizer.load_state_dict checks a state's generator before it changes anything.

* F#2: a generator state of another device type (a CUDA generator's 16 bytes) loaded the
  optimizer's moments and the step count, then failed with torch's raw size error.
* G#4: KFACNoise read ``layer.weight`` of a ``parametrizations.spectral_norm`` layer, which runs
  the parametrization: one power iteration on the user's ``_u``/``_v`` per read.
* G#5: FullFisherNoise's and MultiplicativeNoise's own passes left a call-counting buffer one
  call further on.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from curvlab.noise import (
    DiagFisherNoise,
    FullFisherNoise,
    KFACNoise,
    MultiplicativeNoise,
    NoisyOptimizer,
)


class Counting(nn.Module):
    """Counts its calls in an integer buffer; the count changes its output (a stand-in for
    any forward whose result depends on a small integer buffer it updates)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * (1.0 + 0.1 * (self.calls % 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (8,), generator=g
    )


def _mlp(parametrized: bool = False, counting: bool = False) -> nn.Module:
    torch.manual_seed(0)
    mods = [nn.Linear(3, 4)] + ([Counting()] if counting else []) + [nn.Tanh(), nn.Linear(4, 2)]
    m = nn.Sequential(*mods).double()
    if parametrized:
        nn.utils.parametrizations.spectral_norm(m[-1])
    return m.train()


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------- F#2


def _trained_noisy() -> tuple[NoisyOptimizer, nn.Module, dict]:
    m = _mlp()
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.Adam(m.parameters(), lr=0.1), DiagFisherNoise(kind="empirical", scale=0.1),
        m, lf, seed=1,
    )  # fmt: skip
    for _ in range(3):

        def closure() -> torch.Tensor:
            noisy.zero_grad()
            loss = lf(m(X), y)
            loss.backward()
            return loss

        noisy.step(closure)
    return noisy, m, noisy.state_dict()


def _fresh(m: nn.Module, seed: int = 1) -> NoisyOptimizer:
    m2 = copy.deepcopy(m)
    return NoisyOptimizer(
        torch.optim.Adam(m2.parameters(), lr=0.1), DiagFisherNoise(kind="empirical", scale=0.1),
        m2, nn.CrossEntropyLoss(), seed=seed,
    )  # fmt: skip


def test_load_state_dict_refuses_other_device_generator_before_loading_anything() -> None:
    _, m, st = _trained_noisy()
    st["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    n2 = _fresh(m)
    gen_before = n2.generator.get_state()
    with pytest.raises(ValueError) as info:
        n2.load_state_dict(st)
    msg = str(info.value)
    assert "CUDA" in msg and "CPU" in msg  # both device types named
    assert 'state["generator"] = None' in msg  # the way out
    # nothing changed: no Adam moments, no step count, the generator as it was
    assert len(n2.optimizer.state) == 0
    assert n2.steps_taken == 0
    assert torch.equal(n2.generator.get_state(), gen_before)


@pytest.mark.parametrize("bad", [[1, 2, 3], torch.zeros(5, dtype=torch.float32)])
def test_load_state_dict_refuses_non_generator_state(bad: object) -> None:
    _, m, st = _trained_noisy()
    st["generator"] = bad
    n2 = _fresh(m)
    with pytest.raises(ValueError, match="generator"):
        n2.load_state_dict(st)
    assert len(n2.optimizer.state) == 0 and n2.steps_taken == 0


def test_load_state_dict_generator_none_reseeds_from_seed_and_steps() -> None:
    noisy, m, st = _trained_noisy()
    st = {**st, "generator": None}
    a, b, other = _fresh(m), _fresh(m), _fresh(m, seed=2)
    for n in (a, b, other):
        n.load_state_dict(st)
    # the rest of the state loaded
    assert a.steps_taken == 3 and len(a.optimizer.state) == len(noisy.optimizer.state)
    # deterministic in (seed, steps_taken): equal for equal seeds, another stream otherwise,
    # and not the generator as freshly seeded (which would repeat the first steps' draws)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert not torch.equal(a.generator.get_state(), other.generator.get_state())
    seeded = torch.Generator().manual_seed(1).get_state()
    assert not torch.equal(a.generator.get_state(), seeded)
    # a later step count gives another stream (no draws repeated after a second resume)
    later = _fresh(m)
    later.load_state_dict({**st, "steps_taken": 4})
    assert not torch.equal(a.generator.get_state(), later.generator.get_state())


# ----------------------------------------------------------------------------- G#4


def _sn_vectors(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    p = m[-1].parametrizations.weight[0]
    return p._u.clone(), p._v.clone()


@pytest.mark.parametrize("kind", ["empirical", "mc"])
def test_kfac_noise_leaves_spectral_norm_vectors(kind: str) -> None:
    m = _mlp(parametrized=True)
    X, y = _data()
    u, v = _sn_vectors(m)
    KFACNoise(kind=kind, scale=1.0).sample(
        m, nn.CrossEntropyLoss(), X, y, generator=torch.Generator().manual_seed(0)
    )
    u2, v2 = _sn_vectors(m)
    assert torch.equal(u, u2) and torch.equal(v, v2)


def _loop(sampler: object, mode: str, parametrized: bool, counting: bool) -> nn.Module:
    m = _mlp(parametrized=parametrized, counting=counting)
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    noisy = None if sampler is None else NoisyOptimizer(opt, sampler, m, lf, seed=0)
    for _ in range(3):
        if noisy is None:
            opt.zero_grad()
            lf(m(X), y).backward()
            opt.step()
        elif mode == "closure":

            def closure() -> torch.Tensor:
                noisy.zero_grad()
                loss = lf(m(X), y)
                loss.backward()
                return loss

            noisy.step(closure)
        else:
            noisy.zero_grad()
            lf(m(X), y).backward()
            noisy.step(inputs=X, targets=y)
    return m


@pytest.mark.parametrize("mode", ["closure", "inputs"])
def test_zero_scale_kfac_noise_trains_as_plain_loop_with_spectral_norm(mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _state(_loop(None, mode, parametrized=True, counting=False))
        got = _state(_loop(KFACNoise(kind="empirical", scale=0.0), mode, True, False))
    assert _same(ref, got) == []  # zero noise: bitwise the plain loop, _u/_v included


# ----------------------------------------------------------------------------- G#5


_PASSES = {
    "full-true": lambda: FullFisherNoise("true", scale=1.0),
    "full-empirical": lambda: FullFisherNoise("empirical", scale=1.0),
    "multiplicative": lambda: MultiplicativeNoise(0.5),
}


@pytest.mark.parametrize("name", list(_PASSES))
def test_sampler_pass_leaves_call_counter(name: str) -> None:
    m = _mlp(counting=True).eval()
    X, y = _data()
    before = _state(m)
    eps = _PASSES[name]().sample(
        m, nn.CrossEntropyLoss(), X, y, generator=torch.Generator().manual_seed(0)
    )
    assert _same(before, _state(m)) == []
    # the same generator on the same model: the same sample (the counter changes the forward)
    again = _PASSES[name]().sample(
        m, nn.CrossEntropyLoss(), X, y, generator=torch.Generator().manual_seed(0)
    )
    assert all(torch.equal(eps[k], again[k]) for k in eps)


def test_multiplicative_sample_is_gradient_of_forward_as_found() -> None:
    """``eps = g * std * xi`` with ``g`` the gradient of the model as the call found it (its
    counter at 2: the forward multiplies by ``1 + 0.1 * (3 % 3) = 1``), brute force by
    ``torch.func`` on copies of the buffers."""
    m = _mlp(counting=True).eval()
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    with torch.no_grad():
        m(X), m(X)  # the counter at 2
    params = {k: p.detach() for k, p in m.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        buffers = {k: b.clone() for k, b in m.named_buffers()}
        return lf(torch.func.functional_call(m, {**p, **buffers}, (X,)), y)

    g = torch.func.grad(loss)(params)
    std = 0.5
    eps = MultiplicativeNoise(std).sample(m, lf, X, y, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    want = {k: g[k] * (std * torch.randn(g[k].shape, generator=gen, dtype=g[k].dtype)) for k in g}
    # the same float64 operations in both (one forward, one backward of a 3-4-2 network): only
    # the summation order may differ, a few ulps of entries of order 1
    tol = 64 * torch.finfo(torch.float64).eps
    for k in want:
        torch.testing.assert_close(eps[k], want[k], rtol=tol, atol=tol)
    assert int(m[1].calls) == 2


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_zero_scale_full_fisher_separate_pass_trains_as_plain_loop(kind: str) -> None:
    ref = _state(_loop(None, "inputs", parametrized=True, counting=True))
    got = _state(_loop(FullFisherNoise(kind, scale=0.0), "inputs", True, True))
    assert _same(ref, got) == []


def test_kfac_estimate_keeps_parametrized_layer_on_the_diagonal() -> None:
    """The spectral-norm layer's ``original`` gets the empirical Fisher diagonal (it has no
    K-FAC factors of its own): ``(1/N) sum_n (grad NLL_n)^2``, brute force by ``torch.func`` in
    eval mode (no power iteration: the weight is a fixed function of ``original``)."""
    m = _mlp(parametrized=True).eval()
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    state = KFACNoise(kind="empirical", scale=1.0).estimate(
        m, lf, X, y, torch.Generator().manual_seed(0)
    )
    params = {k: p.detach() for k, p in m.named_parameters()}
    buffers = dict(m.named_buffers())

    def nll(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(m, {**p, **buffers}, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, t.unsqueeze(0))

    per = torch.func.vmap(torch.func.grad(nll), in_dims=(None, 0, 0))(params, X, y)
    name = "2.parametrizations.weight.original"
    want = per[name].pow(2).mean(0)
    diag = state["__diagonal__"][name]
    tol = 64 * torch.finfo(torch.float64).eps * float(want.abs().max())
    torch.testing.assert_close(diag, want, rtol=0.0, atol=tol)
    assert "0" in state  # the plain layer keeps its factors
