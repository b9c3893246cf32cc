"""Review s27 (FX4), after the held-generator check of ``curvlab._rng.forward_draws``:

* The penalties' own forward leaves a generator a module holds (``self.gen``) as it found it, as
  it leaves the global RNG: the training loop's masks are bitwise those of a run without the
  penalty, and the penalty's forward draws a mask of its own (not the next training mask).
* ``fisher_trace`` and the exact traces measure a deterministic forward that re-seeds its own
  generator every call (fixed random features) on an instance that has not run a forward yet
  (they refused it), with the value of dense float64 ``torch.func`` brute force; a forward that
  really draws from a held generator is still refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl
import curvlab.regularizers as R
from tests.test_forward_draws_s27 import HeldDropout


class FixedFeatures(nn.Module):
    """Fixed random features: the generator is re-seeded in every call (deterministic)."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gen.manual_seed(0)
        w = torch.randn(3, 16, generator=self.gen, dtype=x.dtype)
        return torch.cos(x @ w)


def _train(penalty: str | None, steps: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A training loop with a held-generator Dropout; the masks its own forwards drew and the
    parameters at the end (the penalty's gradient is not added: the masks must be those of the
    run without it whatever it computes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), HeldDropout(), nn.Linear(8, 3)).train()
    if penalty == "hooked":
        model[3].register_full_backward_hook(lambda m, gi, go: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    data = [(torch.randn(6, 3), torch.randint(0, 3, (6,))) for _ in range(steps)]
    for x, y in data:
        start = len(seen)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        masks.append(seen[start])
        if penalty == "none_out":
            R.gradient_penalty(model, nn.CrossEntropyLoss(), x, targets=y)
        elif penalty == "hooked":
            R.gradient_penalty(model, nn.CrossEntropyLoss(), x, output=out, targets=y)
        elif penalty == "fisher":
            R.fisher_penalty(model, nn.CrossEntropyLoss(), x, seed=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return masks, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("penalty", ["none_out", "hooked", "fisher"])
def test_penalty_leaves_the_held_generator_and_training_bitwise(penalty: str) -> None:
    ref_masks, ref_params = _train(None)
    masks, params = _train(penalty)
    for a, b in zip(ref_masks, masks):
        assert torch.equal(a, b)
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)


def test_penalty_forward_draws_a_mask_of_its_own() -> None:
    """The penalty's mask is neither the step's nor the next training forward's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), HeldDropout(), nn.Linear(8, 3)).train()
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    seen: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda m, i, o: seen.append((o != 0).clone()))
    model(x)
    R.gradient_penalty(model, nn.CrossEntropyLoss(), x, targets=y)
    model(x)
    step, penalty, following = seen
    assert not torch.equal(penalty, step)
    assert not torch.equal(penalty, following)
    # and the penalty's mask is a function of the generator's state (deterministic)
    state = model[2].gen.get_state()
    R.gradient_penalty(model, nn.CrossEntropyLoss(), x, targets=y)
    model[2].gen.set_state(state)
    R.gradient_penalty(model, nn.CrossEntropyLoss(), x, targets=y)
    assert torch.equal(seen[-1], seen[-2])


def _brute_ggn_trace(model: nn.Module, x: torch.Tensor) -> float:
    """Tr(G) of the mean cross-entropy, dense float64: (1/N) Σ_n tr(J_nᵀ H_n J_n)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = 0.0
    for n in range(x.shape[0]):

        def f(ps: dict[str, torch.Tensor], xi: torch.Tensor = x[n : n + 1]) -> torch.Tensor:
            return functional_call(model, ps, (xi,))[0]

        jac = jacrev(f)(params)
        z = f(params).detach()
        h = hessian(lambda t: torch.logsumexp(t, 0))(z)
        j = torch.cat([jac[k].reshape(z.numel(), -1) for k in names], dim=1)
        total += float(torch.trace(j.T @ h @ j))
    return total / x.shape[0]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reseeding_forward_measured_on_a_fresh_instance(mode: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))

    def fresh() -> nn.Module:
        torch.manual_seed(1)
        m = nn.Sequential(FixedFeatures(), nn.Linear(16, 3)).double()
        return getattr(m, mode)()

    m = fresh()
    state = m[0].gen.get_state()
    exact = cl.trace(m, nn.CrossEntropyLoss(), (x, y), matrix="ggn", method="exact").value
    fisher = cl.fisher_trace(m, nn.CrossEntropyLoss(), (x, y), seed=0).value
    assert torch.equal(m[0].gen.get_state(), state)  # put back
    brute = _brute_ggn_trace(fresh(), x)
    assert exact == pytest.approx(brute, rel=1e-10)
    called = fresh()
    called(x)
    assert cl.fisher_trace(called, nn.CrossEntropyLoss(), (x, y), seed=0).value == fisher


def test_really_drawing_held_generator_still_refused() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    m = nn.Sequential(nn.Linear(3, 8), HeldDropout(), nn.Linear(8, 3)).train()
    state = m[1].gen.get_state()
    with pytest.raises(ValueError, match="draws random numbers"):
        cl.fisher_trace(m, nn.CrossEntropyLoss(), (x, y), seed=0)
    assert torch.equal(m[1].gen.get_state(), state)


class EvalNoise(nn.Module):
    """Input noise from a held generator in every mode (eval too)."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn(x.shape, generator=self.gen)


def test_refusal_in_eval_mode_does_not_offer_eval() -> None:
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    m = nn.Sequential(EvalNoise(), nn.Linear(3, 3)).eval()
    with pytest.raises(ValueError, match="draws random numbers") as err:
        cl.fisher_trace(m, nn.CrossEntropyLoss(), (x, y), seed=0)
    assert "model.eval()" not in str(err.value)


class GlobalFixedFeatures(nn.Module):
    """Fixed random features from a re-seeded global RNG (docs/conventions.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        w = torch.randn(3, 16, dtype=x.dtype)
        return torch.cos(x @ w)


def test_reseeding_global_forward_measured() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    torch.manual_seed(1)
    m = nn.Sequential(GlobalFixedFeatures(), nn.Linear(16, 3)).double()
    state = torch.get_rng_state()
    exact = cl.trace(m, nn.CrossEntropyLoss(), (x, y), matrix="ggn", method="exact").value
    assert torch.equal(torch.get_rng_state(), state)
    assert exact == pytest.approx(_brute_ggn_trace(m, x), rel=1e-10)


def test_held_reseeded_every_kind() -> None:
    """Inside the block each held generator draws another stream; after it, the next draws are
    those it would have made without the block."""
    import random

    import numpy as np

    from curvlab._rng import held_reseeded

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = torch.Generator().manual_seed(1)
            self.n = np.random.default_rng(2)
            self.r = np.random.RandomState(3)
            self.p = random.Random(4)

    def draws(h: Holder) -> list[float]:
        return [
            float(torch.rand(1, generator=h.t)),
            float(h.n.random()),
            float(h.r.random_sample()),
            h.p.random(),
        ]

    plain, kept = Holder(), Holder()
    expected = draws(plain)
    with held_reseeded(kept.modules()):
        inside = draws(kept)
    assert draws(kept) == expected
    assert all(a != b for a, b in zip(inside, expected))
    again = Holder()
    with held_reseeded(again.modules()):
        assert draws(again) == inside  # a function of the state
