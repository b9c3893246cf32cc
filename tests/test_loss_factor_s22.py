"""FullFisherNoise's ``loss_factor=`` checked against the factor the autograd graph shows (review s22).

``FullFisherNoise`` folds its noise into the step's own backward pass and multiplies it there by
the gradient the pass gives the loss output (``k S``: the loop's factor ``k`` on the loss, a
GradScaler's scale ``S``) divided by the stated ``loss_factor``. A stated factor the graph
contradicts scaled the noise by ``k / loss_factor`` without a word: docs/training-loops.md's
``capture(loss_factor=1 / accumulation_steps)`` in a token-weighted accumulation loop
(``loss * n_i / N``) gave ``E|eps|^2`` 0.0461 for the documented ``scale^2 Tr(F_emp)`` 0.512, and
a loop that sums the micro-batch means undivided but states ``1 / k`` 4.61. Where the factor can
be read without a host synchronisation (Python numbers and CPU scalars the loss is multiplied or
divided by, the root's explicit gradient, no factor at all) a contradicting ``loss_factor`` is now
a ``ValueError`` before the backward pass runs; a stated factor the graph confirms folds exactly
the documented noise.

The reference: given the batch, the empirical fold's noise is ``scale * sqrt(e) * sum_n r_n
grad NLL_n`` with Rademacher ``r_n`` (``e = 1/N`` under "mean" with every label counted), so the
per-example gradients ``grad NLL_n`` (dense float64, ``torch.func``) must explain the noise in
``.grad`` with coefficients ``r_n`` that are exactly ``+-1`` (a mis-scaled fold gives ``+-k /
loss_factor``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    KFACNoise,
    NoiseSampler,
    NoisyOptimizer,
)

SCALE = 0.5
CE = nn.CrossEntropyLoss()  # the loss module the loop calls is the one NoisyOptimizer got
EPS = torch.finfo(torch.float64).eps
SIZES = (3, 5, 2)  # the micro-batches of one step: token weights n_i / N differ from 1 / k


def _model() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
    return model


def _batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in SIZES
    ]


def _noisy(model: nn.Module, sampler: NoiseSampler | None = None) -> NoisyOptimizer:
    sampler = sampler if sampler is not None else FullFisherNoise("empirical", scale=SCALE)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return NoisyOptimizer(opt, sampler, model, CE, seed=3)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _example_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``grad NLL_n`` of every example (rows), dense float64 brute force."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None], reduction="sum")

    g = vmap(grad(nll), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in params], 1)


def _signs(model: nn.Module, noise: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The coefficients ``r`` with ``noise = scale * sqrt(1/N) * G^T r`` (least squares), checked
    to explain the noise: a noise of another form than the empirical fold's fails here."""
    G = _example_grads(model, x, y) * (SCALE / math.sqrt(x.shape[0]))
    sv = torch.linalg.svdvals(G)
    cond = float(sv[0] / sv[-1])
    assert cond < 1e3  # (the per-example gradients are independent: r is well determined)
    r = torch.linalg.lstsq(G.T, noise[:, None]).solution[:, 0]
    # float64 least squares: residual and coefficients good to ~cond * eps of their size
    tol = 100 * cond * EPS
    torch.testing.assert_close(G.T @ r, noise, rtol=0, atol=tol * float(noise.abs().max()))
    return r


Weight = Callable[[Tensor, int], Tensor]


def _accumulated_step(
    noisy: NoisyOptimizer, model: nn.Module, weight: Weight, stated: float | None
) -> None:
    """One step of gradient accumulation: ``weight(loss_fn(model(x_i), y_i), i)`` per
    micro-batch, the last one captured with ``loss_factor=stated``."""
    ce = CE
    batches = _batches()
    noisy.zero_grad()
    for i, (x, y) in enumerate(batches[:-1]):
        weight(ce(model(x), y), i).backward()
    x, y = batches[-1]
    with noisy.capture(loss_factor=stated):
        weight(ce(model(x), y), len(batches) - 1).backward()


def _clean(model: nn.Module, weight: Weight, upto: int = len(SIZES)) -> Tensor:
    """The gradient the first ``upto`` micro-batches accumulate, without noise."""
    ce = CE
    model.zero_grad()
    for i, (x, y) in enumerate(_batches()[:upto]):
        weight(ce(model(x), y), i).backward()
    return _flat(model)


N = sum(SIZES)
K = len(SIZES)
WEIGHTS: dict[str, Weight] = {
    # loss * n_i / N: the mean over all examples of the step
    "token-weighted": lambda loss, i: loss * (SIZES[i] / N),
    # the counts held in CPU tensors, as (y != ignore_index).sum() gives them
    "token-weighted-cpu-tensors": lambda loss, i: loss * torch.tensor(SIZES[i]) / torch.tensor(N),
    # the micro-batch means summed, not divided: no factor at all (a unit gradient)
    "undivided": lambda loss, i: loss,
}
ACTUAL = {"token-weighted": SIZES[-1] / N, "token-weighted-cpu-tensors": SIZES[-1] / N}


@pytest.mark.parametrize("how", list(WEIGHTS))
def test_full_fisher_refuses_a_loss_factor_the_graph_contradicts(how: str) -> None:
    """docs' ``loss_factor=1 / accumulation_steps`` where the last micro-batch's loss carries
    another factor: a ``ValueError`` naming both, raised before the backward pass (the
    gradients hold the earlier micro-batches alone, the noise generator is rewound, the capture
    closed). Before review s22 the fold scaled the noise by ``actual * k`` (0.6x in standard
    deviation for the token weights here, 3x undivided)."""
    stated, actual = 1 / K, ACTUAL.get(how, 1.0)
    model = _model()
    noisy = _noisy(model)
    start = noisy.generator.get_state()
    with pytest.raises(ValueError, match="loss_factor=") as err:
        _accumulated_step(noisy, model, WEIGHTS[how], stated)
    message = str(err.value)
    assert f"loss_factor={stated:.6g}" in message and f"loss_factor={actual:.6g}" in message
    assert torch.equal(noisy.generator.get_state(), start)
    after = _flat(model)
    assert torch.equal(after, _clean(_model(), WEIGHTS[how], upto=K - 1))
    # the capture was closed: the same optimizer runs the step with the factor the loss carries
    _accumulated_step(noisy, model, WEIGHTS[how], actual)
    assert noisy._pending is not None and noisy._pending.noise_added


@pytest.mark.parametrize("how", list(WEIGHTS))
def test_full_fisher_folds_the_documented_noise_with_the_factor_the_loss_carries(
    how: str,
) -> None:
    """The factor the graph shows, stated: folded in the one pass, and the noise in ``.grad`` is
    ``scale * sqrt(1/N) * sum_n r_n grad NLL_n`` of the captured micro-batch with ``r_n = +-1``
    exactly (a mis-scaled fold gives ``+-actual / stated``)."""
    model = _model()
    noisy = _noisy(model)
    _accumulated_step(noisy, model, WEIGHTS[how], ACTUAL.get(how, 1.0))
    assert noisy._pending is not None and noisy._pending.noise_added
    noisy.step()
    noise = _flat(model) - _clean(_model(), WEIGHTS[how])
    x, y = _batches()[-1]
    r = _signs(model, noise, x, y)
    tol = 1e-9  # >= 100 * cond * eps with cond < 1e3 (checked in _signs)
    torch.testing.assert_close(r.abs(), torch.ones_like(r), rtol=0, atol=tol)


def _single_step(backward: Callable[[Tensor], None], stated: float) -> NoisyOptimizer:
    model, (x, y) = _model(), _batches()[-1]
    noisy = _noisy(model)
    noisy.zero_grad()
    with noisy.capture(loss_factor=stated):
        backward(CE(model(x), y))
    return noisy


@pytest.mark.parametrize(
    ("backward", "stated", "actual"),
    [
        (lambda loss: loss.backward(), 0.5, 1.0),
        (lambda loss: (loss / 4).backward(), 0.5, 0.25),
        (lambda loss: (0.25 * loss).float().backward(), 0.5, 0.25),
        (lambda loss: loss.backward(torch.tensor(0.25, dtype=torch.float64)), 0.5, 0.25),
        (lambda loss: (loss * torch.tensor(2.0)).backward(), 0.5, 2.0),
        (lambda loss: (-loss).backward(), 0.5, 1.0),
    ],
    ids=["no-factor", "divided", "cast", "explicit-gradient", "cpu-tensor", "negated"],
)
def test_full_fisher_refuses_a_contradicted_loss_factor_on_one_batch(
    backward: Callable[[Tensor], None], stated: float, actual: float
) -> None:
    """One batch, zeroed gradients: the factor read off every readable path (no factor, a
    quotient, through a cast, the root's explicit gradient, a CPU tensor, a negation) is
    compared."""
    with pytest.raises(ValueError, match=f"loss_factor={actual:.6g}"):
        _single_step(backward, stated)


def test_full_fisher_closure_refuses_a_contradicted_loss_factor() -> None:
    """``step(closure, loss_factor=)``: the same check; parameters untouched, nothing stepped."""
    model, (x, y) = _model(), _batches()[-1]
    noisy = _noisy(model)
    before = [p.detach().clone() for p in model.parameters()]

    def closure() -> Tensor:
        noisy.zero_grad()
        loss = 0.25 * CE(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="loss_factor=0.25"):
        noisy.step(closure, loss_factor=0.5)
    assert noisy.steps_taken == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize(
    ("backward", "stated"),
    [
        (lambda loss: (0.5 * loss + 0.5 * loss).backward(), 1.0),  # used twice: not read
        (lambda loss: (loss * torch.tensor(0.3, dtype=torch.bfloat16)).backward(), 0.3),
        (lambda loss: (loss * torch.tensor(1 / 3, dtype=torch.float32)).backward(), 1 / 3),
        (lambda loss: (-(loss * 0.5)).backward(), 0.5),  # the noise's sign flips: same covariance
    ],
    ids=["loss-used-twice", "bfloat16-factor", "float32-factor", "negated"],
)
def test_full_fisher_keeps_folding_where_the_factor_agrees_or_is_not_read(
    backward: Callable[[Tensor], None], stated: float
) -> None:
    """No false alarm: a factor the walk cannot read (the loss used twice) stays trusted, a factor
    held in a 16-bit or float32 CPU tensor agrees with the number it rounds, and ``-loss``
    agrees with its magnitude (its noise has the same covariance)."""
    noisy = _single_step(backward, stated)
    assert noisy._pending is not None and noisy._pending.noise_added


SAMPLERS: dict[str, Callable[[], NoiseSampler]] = {
    "diag-empirical": lambda: DiagFisherNoise("empirical", scale=SCALE),
    "trace": lambda: FisherTraceNoise(scale=SCALE),
    "kfac": lambda: KFACNoise("empirical", scale=SCALE),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_captured_samplers_ignore_loss_factor(name: str) -> None:
    """The samplers that read the curvature off the step's gradients divide by the gradient the
    loss output actually gets: a contradicting ``loss_factor`` changes nothing (bitwise the noise
    of the step without one), as docs/noise.md now says."""
    grads = []
    for stated in (None, 1 / K):
        model = _model()
        noisy = _noisy(model, SAMPLERS[name]())
        _accumulated_step(noisy, model, WEIGHTS["token-weighted"], stated)
        noisy.step()
        grads.append(_flat(model))
    assert torch.equal(grads[0], grads[1])
