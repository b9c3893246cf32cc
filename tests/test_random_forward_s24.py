"""Review s24: measurements on a forward that draws random numbers, and noise_scale_hessian on a
model that mixes the examples.

* ``critical_sharpness`` evaluates one function per measurement: the gradient's pass and every
  point of the line search draw the same numbers (common random numbers), so the result is the
  line-search definition on that fixed draw (each pass drew afresh before: MC dropout gave 0.253
  to 4.018 over 20 seeds for 0.259 to 0.598 on one mask each).
* ``noise_scale_hessian`` takes ``g_n``, ``G`` and ``H`` from one draw per batch (the operator's),
  and refuses a model that mixes the examples, as ``noise_scale`` does (it reported 5.8298 with a
  standard error of 0, the gradient through the coupling, where each example alone gives 7.2323).

Brute force: dense float64 ``torch.func`` on the draw the forward logged, replayed as a fixed
input of the same function.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl
from curvlab._layout import MixedExamplesError

SIGMA = 0.3
LOG: list[torch.Tensor] = []
"""The draws of :class:`Noise` (module level: a measurement may run the forward of a copy)."""


class Noise(nn.Module):
    """``x + σ ε`` with ``ε`` drawn from the global RNG in every call (eval mode too), logged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.randn_like(x)
        LOG.append(eps.detach().clone())
        return x + SIGMA * eps


class Fixed(nn.Module):
    """``x + σ ε`` with a given ``ε``: the brute force's replay of one logged draw."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + SIGMA * self.eps


def _flat(model: nn.Module) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().double().reshape(-1) for _, p in model.named_parameters()])
    return names, shapes, flat


def _unflat(names, shapes, flat):
    out, i = {}, 0
    for n, s in zip(names, shapes):
        k = s.numel()
        out[n] = flat[i : i + k].reshape(s)
        i += k
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_critical_sharpness_one_draw_per_measurement(dtype: torch.dtype) -> None:
    """A linear model on ``x + σ ε`` under MSE: a quadratic loss for each fixed draw ``ε``, on
    which SGD's update ``−η g`` gives ``λ_c = gᵀHg / gᵀg`` exactly (the root of
    ``s gᵀu + s²/2 uᵀHu``). Every forward pass of the measurement must see the same ``ε``, and
    the result must be that of the quadratic of this ``ε``. A float32 model is searched in
    float32 (in float64 it would draw another ``ε`` than its gradient's pass)."""
    torch.manual_seed(0)
    X = torch.randn(12, 3, dtype=dtype)
    y = torch.randn(12, 1, dtype=dtype)
    model = nn.Sequential(Noise(), nn.Linear(3, 1)).to(dtype)
    lf = nn.MSELoss()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    lf(model(X), y).backward()  # the training loop's own pass: .grad held, as before a step
    LOG.clear()
    state = torch.get_rng_state()
    d = cl.Diagnostics(model, lf, quantities=["critical_sharpness"], every=1, optimizer=opt)
    rec = d.measure(0, X, y)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG left as it was
    draws = list(LOG)
    assert len(draws) >= 3  # the gradient's pass, L(θ) and the line search's points
    for e in draws[1:]:
        assert torch.equal(e, draws[0])  # one function: the draws repeated bitwise

    # brute force on the logged draw
    fixed = nn.Sequential(Fixed(draws[0].double()), nn.Linear(3, 1)).double()
    fixed.load_state_dict({k: v.double() for k, v in model.state_dict().items()}, strict=False)
    names, shapes, theta = _flat(model)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        out = functional_call(fixed, _unflat(names, shapes, flat), (X.double(),))
        return (out - y.double()).pow(2).mean()

    g = jacrev(loss)(theta)
    H = hessian(loss)(theta)
    ghg, gg = g @ H @ g, g @ g
    expected = float(ghg / gg)
    # the line search interpolates the root of (L(θ + s u) − L(θ))/s, linear in s here, so its
    # error is the loss's rounding (eps · L per evaluation, a few of them) over the largest fall
    # along the update, (gᵀg)² / (2 gᵀHg); in float32 the update's own rounding (eps relative)
    # adds a relative eps times H's conditioning, bounded by λ_max / (gᵀHg / gᵀg)
    eps = torch.finfo(dtype).eps
    fall = float(gg * gg / (2 * ghg))
    cond = float(torch.linalg.eigvalsh(H)[-1]) / expected
    rtol = 16 * eps * float(loss(theta)) / fall + 4 * eps * cond
    assert rec is not None
    got = rec["values"]["critical_sharpness"]
    assert got == pytest.approx(expected, rel=rtol), (got, expected, rtol)


def _noise_scale_hessian(flat, names, shapes, model_at, batches):
    """``B_noise = tr(HΣ)/(GᵀHG)`` by brute force: ``model_at(i)`` the model of batch ``i``
    (its fixed draw), ``g_n`` each example's gradient, ``H`` the mean loss's Hessian."""

    def losses(theta: torch.Tensor) -> torch.Tensor:
        parts = []
        for i, (x, t) in enumerate(batches):
            out = functional_call(model_at(i), _unflat(names, shapes, theta), (x,))
            parts.append(nn.functional.cross_entropy(out, t, reduction="none"))
        return torch.cat(parts)

    gn = jacrev(losses)(flat)  # N x D
    H = hessian(lambda th: losses(th).mean())(flat)
    G = gn.mean(0)
    dev = gn - G
    sigma = dev.T @ dev / gn.shape[0]
    return float(torch.trace(H @ sigma) / (G @ H @ G))


def test_noise_scale_hessian_one_draw_per_batch() -> None:
    """Two batches (5 and 3 examples, ``N = 8 <= num_probes``: ``tr(HΣ)`` exact): ``g_n``, ``G``
    and ``H`` are of one function, each batch's draw that of the operator's passes (the last
    logged for its batch size: the last product rebuilds every batch's graph)."""
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(n, 3, dtype=torch.float64, generator=gen),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for n in (5, 3)
    ]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), Noise(), nn.Linear(6, 3)).double()
    lf = nn.CrossEntropyLoss()
    LOG.clear()
    report = cl.analyze(model, lf, batches, quantities=["noise_scale_hessian"], num_probes=10)
    values = report.to_dict()["entries"][0]["values"]
    assert values["noise_scale_hessian_stderr"] == 0.0  # the exact path
    draw = {e.shape[0]: e for e in LOG}  # the last of each batch size
    models = [
        nn.Sequential(model[0], model[1], Fixed(draw[x.shape[0]]), model[3]) for x, _ in batches
    ]
    names, shapes, theta = _flat(model)
    expected = _noise_scale_hessian(theta, names, shapes, lambda i: models[i], batches)
    # float64 throughout, N + 1 exact products: rounding only (a few hundred eps of the sums)
    assert values["noise_scale_hessian"] == pytest.approx(expected, rel=1e-10)


class Center(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


def test_noise_scale_hessian_refuses_a_model_that_mixes_the_examples() -> None:
    """Feature centering makes ``g_n`` undefined: refused as ``noise_scale`` is, with
    MixedExamplesError (5.8298 with a standard error of 0 was reported, the gradient of ``ℓ_n``
    through the batch; each example alone gives 7.2323)."""
    torch.manual_seed(1)
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Center(), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    lf = nn.CrossEntropyLoss()
    with pytest.raises(MixedExamplesError, match="mixes the examples"):
        cl.analyze(model, lf, [(X, y)], quantities=["noise_scale_hessian"], on_error="raise")
