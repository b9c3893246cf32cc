"""What a noisy training step touches and refuses (found in review):

* noise goes only into the gradients of the parameters the wrapped optimizer steps (a body
  trained by another optimizer kept getting it, also through ``FullFisherNoise``'s fold);
* a BatchNorm in train mode couples the examples also when it has no parameters of its own
  (``affine=False``), which the one-pass hooks never see: refused before the step runs, as
  the separate pass refuses it (the captured diagonal was 0.151 where every example's gradient
  is exactly 0);
* curvlab's penalties that run a forward of their own (GP_x, no ``output=``) inside a
  capturing step are not the step's forward: the capture stays one pass and exact;
* non-finite noise scales and penalty weights are refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import curvlab as cl
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    MultiplicativeNoise,
    NoisyOptimizer,
)
from curvlab.regularizers import FisherPenalty, GradientNormPenalty, input_gradient_penalty
from tests.test_noise_samplers import _one_thread  # noqa: F401 (fixture)


def _mlp(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(8, affine=False)] if bn else []
    return nn.Sequential(nn.Linear(6, 8), *mid, nn.Tanh(), nn.Linear(8, 3)).double()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


SAMPLERS = {
    "isotropic": lambda: IsotropicNoise(0.5),
    "diag": lambda: DiagFisherNoise("empirical", scale=0.5),
    "kfac": lambda: KFACNoise("empirical", scale=0.5),
    "full-true": lambda: FullFisherNoise("true", scale=0.5),
    "full-empirical": lambda: FullFisherNoise("empirical", scale=0.5),
    "multiplicative": lambda: MultiplicativeNoise(0.5),
}


def _noisy_grads(sampler: str, head_only: bool) -> dict[str, Tensor]:
    """The gradients after one closure step minus those without noise (lr 0)."""
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    model = _mlp()
    params = model[2].parameters() if head_only else model.parameters()
    noisy = NoisyOptimizer(torch.optim.SGD(params, lr=0.0), SAMPLERS[sampler](), model, lf, seed=3)

    def closure() -> Tensor:
        noisy.zero_grad()
        model.zero_grad()
        loss = lf(model(X), y)
        loss.backward()
        return loss

    noisy.step(closure)
    noisy_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    closure()
    return {n: noisy_grads[n] - p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_noise_goes_only_where_the_wrapped_optimizer_steps(sampler: str) -> None:
    full = _noisy_grads(sampler, head_only=False)
    head = _noisy_grads(sampler, head_only=True)
    for name in ("0.weight", "0.bias"):  # trained by another optimizer: untouched
        assert full[name].abs().max() > 1e-6
        assert torch.equal(head[name], torch.zeros_like(head[name]))
    for name in ("2.weight", "2.bias"):  # the draw's part for the head: the same noise
        torch.testing.assert_close(head[name], full[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sampler", ["diag", "kfac", "trace"])
def test_train_mode_batchnorm_without_parameters_is_refused_before_the_step(sampler: str) -> None:
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    model = _mlp(bn=True).train()
    made = (lambda: FisherTraceNoise(scale=0.5)) if sampler == "trace" else SAMPLERS[sampler]
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), made(), model, lf)
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        noisy.zero_grad()
        loss = lf(model(X), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"BatchNorm1d at '1' is in train mode.*model.eval\(\)"):
        noisy.step(closure)
    assert not calls  # before the step's forward
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="BatchNorm1d at '1' is in train mode"):
        made().sample(model, lf, X, y, seed=0)
    model.eval()  # in eval mode it is a fixed affine map: fine
    noisy.step(closure)
    assert calls == [1]
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it stepped


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_noise_with_train_mode_batchnorm_is_the_batch_objectives(kind: str) -> None:
    """FullFisherNoise is one gradient of a batch objective: with the examples coupled by a
    train-mode BatchNorm it stays defined (the batch's GGN / empirical Fisher through the
    coupling), so it is accepted, and the capture's fold equals the separate pass."""
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    noise = {}
    for mode in ("capture", "separate"):
        model = _mlp(bn=True).train()
        noisy = NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            FullFisherNoise(kind, scale=0.5),
            model,
            lf,
            seed=3,
        )
        lf(model(X), y).backward()
        clean = [p.grad.clone() for p in model.parameters()]
        noisy.zero_grad()
        with noisy.capture() if mode == "capture" else torch.enable_grad():
            lf(model(X), y).backward()
        if mode == "capture":
            noisy.step()
        else:
            noisy.step(inputs=X, targets=y)
        noise[mode] = torch.cat(
            [(p.grad - c).reshape(-1) for p, c in zip(model.parameters(), clean)]
        )
    assert noise["separate"].norm() > 1e-3
    torch.testing.assert_close(noise["capture"], noise["separate"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["input", "fisher"])
@pytest.mark.parametrize("sampler", ["diag", "full-true"])
def test_penalty_with_its_own_forward_keeps_the_capture_one_pass(kind: str, sampler: str) -> None:
    """GP_x (and a penalty called without ``output=``) runs a forward of its own inside the
    step: that used to count as a second model call (a RuntimeError)."""
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    model = _mlp()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), SAMPLERS[sampler](), model, lf, seed=3
    )
    penalty = GradientNormPenalty(model, lf, kind=kind, alpha=0.5, every=1, seed=0)
    noisy.zero_grad()
    with noisy.capture():
        (lf(model(X), y) + penalty(X, y)).backward()
    pending = noisy._pending
    noisy.step()
    if sampler == "diag":
        assert pending.result() is not None  # the step's own backward measured it
        want = cl.diag_fisher(model, lf, (X, y), kind="empirical")
        for name, value in want.items():
            torch.testing.assert_close(noisy._state[name], value, rtol=1e-10, atol=1e-14)
    else:  # the folded noise equals a separate pass's draw (same generator), added once
        assert pending.folded and pending.noise_added
        captured = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        grads = {}
        for mode in ("separate", "none"):
            other = _mlp()
            noisy2 = NoisyOptimizer(
                torch.optim.SGD(other.parameters(), lr=0.0), SAMPLERS[sampler](), other, lf, seed=3
            )
            penalty2 = GradientNormPenalty(other, lf, kind=kind, alpha=0.5, every=1, seed=0)
            noisy2.zero_grad()
            (lf(other(X), y) + penalty2(X, y)).backward()
            if mode == "separate":
                noisy2.step(inputs=X, targets=y)
            grads[mode] = torch.cat([p.grad.reshape(-1) for p in other.parameters()])
        noise_separate = grads["separate"] - grads["none"]
        assert noise_separate.norm() > 1e-3
        torch.testing.assert_close(captured - grads["none"], noise_separate, rtol=1e-9, atol=1e-12)


def test_input_gradient_penalty_refuses_coupled_examples_and_non_tensor_inputs() -> None:
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    model = _mlp(bn=True).train()
    with pytest.raises(ValueError, match="BatchNorm1d at '1' is in train mode"):
        input_gradient_penalty(model, lf, X, y)
    with pytest.raises(TypeError, match="one floating-point Tensor of inputs, got dict"):
        input_gradient_penalty(_mlp(), lf, {"x": X}, y)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scales_and_weights_are_refused(bad: float) -> None:
    model, lf = _mlp(), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="scale must be a finite float"):
        DiagFisherNoise(scale=bad)
    with pytest.raises(ValueError, match="std must be a finite float"):
        IsotropicNoise(bad)
    with pytest.raises(ValueError, match="std must be a finite float"):
        MultiplicativeNoise(bad)
    with pytest.raises(ValueError, match="need lr > 0"):
        IsotropicNoise.langevin(lr=bad)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        FisherPenalty(model, lf, alpha=bad)


@pytest.mark.parametrize("penalty", ["gp_x", "fisher"])
def test_functional_penalties_with_their_own_forward_keep_the_capture_exact(penalty: str) -> None:
    """The functions themselves (not only the penalty classes) mark their own forward."""
    from curvlab.regularizers import fisher_penalty

    X, y = _data()
    lf = nn.CrossEntropyLoss()
    model = _mlp()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), SAMPLERS["diag"](), model, lf, seed=3
    )
    noisy.zero_grad()
    with noisy.capture():
        extra = (
            input_gradient_penalty(model, lf, X, y, alpha=0.3)
            if penalty == "gp_x"
            else fisher_penalty(model, lf, X, alpha=0.3, seed=1)
        )
        (lf(model(X), y) + extra).backward()
    assert noisy._pending.result() is not None
    noisy.step()
    want = cl.diag_fisher(model, lf, (X, y), kind="empirical")
    for name, value in want.items():
        torch.testing.assert_close(noisy._state[name], value, rtol=1e-10, atol=1e-14)
