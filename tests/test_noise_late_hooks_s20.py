"""Review s20 (T1): backward hooks registered inside the capture; KFACNoise's budget and NaN errors.

* A module backward (pre-)hook of the user's on an inner module (or a global one) registered
  inside ``with noisy.capture():`` (or by the model's own forward) was missed: the capture read
  the hooked gradients (noise 2.0x the separate pass's for DiagFisherNoise and KFACNoise, 1.66x
  for FisherTraceNoise; the captured empirical Fisher diagonal 4.0x the loss's).
* KFACNoise's memory-budget refusal repeated curvlab.kfac's, whose first remedy is ``params=``,
  which KFACNoise does not take; a ``memory_budget`` that is no number of bytes was accepted until
  the first step.
* A loss factor of 0 the graph does not show (``torch.where(False, loss, 0.0)``) made KFACNoise
  raise torch's raw ``_LinAlgError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from curvlab import NonFiniteError
from curvlab.noise import DiagFisherNoise, FisherTraceNoise, KFACNoise, NoisyOptimizer


def _mlp() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.6)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=g
    )


def _double(module: nn.Module, grad_output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
    return (grad_output[0] * 2,)


class _Lazy(nn.Module):
    """An MLP whose forward registers a backward pre-hook on its Tanh on the first call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.handle: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handle is None:
            self.handle = self.net[1].register_full_backward_pre_hook(_double)
        return self.net(x)


_SAMPLERS: dict[str, Callable[[], Any]] = {
    "diag": lambda: DiagFisherNoise("empirical", scale=0.3),
    "trace": lambda: FisherTraceNoise(scale=0.3),
    "kfac": lambda: KFACNoise("empirical", scale=0.3),
}


def _drawn(
    make: Callable[[], Any],
    model: nn.Module,
    ce: nn.Module,
    step: Callable[[NoisyOptimizer], None],
) -> dict[str, torch.Tensor]:
    """The noise the sampler draws in one NoisyOptimizer step (seed 7), as ``draw`` returns it."""
    sampler = make()
    out: dict[str, torch.Tensor] = {}
    draw = sampler.draw

    def recording(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        noise = draw(*args, **kwargs)
        out.update({n: t.clone() for n, t in noise.items()})
        return noise

    sampler.draw = recording
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sampler, model, ce, seed=7)
    noisy.zero_grad()
    step(noisy)
    assert out, "no noise was drawn"
    return out


@pytest.mark.parametrize("sampler", sorted(_SAMPLERS))
@pytest.mark.parametrize("mode", ["capture", "closure"])
@pytest.mark.parametrize("where", ["inner", "global", "lazy"])
def test_backward_hook_registered_inside_the_capture_sends_the_step_to_the_separate_pass(
    sampler: str, mode: str, where: str
) -> None:
    """A hook doubling the Tanh's output gradient (so layer 0's), registered inside the block,
    on the module or globally, or by the model's forward: the noise is bitwise the no-hook
    separate pass's (before: 2.0x for diag/kfac, 1.66x for trace on ``0.weight``)."""
    make = _SAMPLERS[sampler]
    x, y = _batch()
    ce = nn.CrossEntropyLoss()
    plain = _mlp()
    ref = _drawn(make, plain, ce, lambda noisy: noisy.step(inputs=x, targets=y))
    model: nn.Module = _Lazy() if where == "lazy" else _mlp()
    net = model.net if where == "lazy" else model
    handles: list[Any] = []

    def forward_backward() -> torch.Tensor:
        if where == "inner":
            handles.append(net[1].register_full_backward_pre_hook(_double))
        elif where == "global":
            handles.append(nn.modules.module.register_module_full_backward_pre_hook(_double))
        loss = ce(model(x), y)
        loss.backward()
        return loss

    def step(noisy: NoisyOptimizer) -> None:
        if mode == "closure":
            noisy.step(forward_backward)
            return
        with noisy.capture():
            forward_backward()
        noisy.step()

    try:
        got = _drawn(make, model, ce, step)
        if where == "lazy":
            handles.append(model.handle)
        # the hook acted on the step's gradients (else the test would not test it)
        assert handles
    finally:
        for h in handles:
            h.remove()
    prefix = "net." if where == "lazy" else ""
    for name, eps in ref.items():
        assert torch.equal(got[prefix + name], eps), (name, got[prefix + name].norm() / eps.norm())


def test_captured_diagonal_with_a_hook_registered_inside_is_not_the_hooked_one() -> None:
    """The capture itself: with the hook registered inside the block it gives no state (the
    separate pass measures), where before it gave 4.0x the empirical Fisher diagonal of
    ``0.weight`` (brute force: the mean squared per-example gradient, torch.func)."""
    model, (x, y), ce = _mlp(), _batch(), nn.CrossEntropyLoss()
    sampler = DiagFisherNoise("empirical", scale=0.3)
    taps = sampler.capture(model, ce, torch.Generator())
    assert taps is not None
    with taps:
        handle = model[1].register_full_backward_pre_hook(_double)
        try:
            ce(model(x), y).backward()
        finally:
            handle.remove()
    assert taps.result() is None
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none"))(
        params
    )
    brute = {k: jac[k].pow(2).mean(0) for k in params}
    state = sampler.estimate(model, ce, x, y, torch.Generator())
    for k in params:  # the separate pass: the loss's own diagonal (float64 rounding)
        torch.testing.assert_close(state[k], brute[k], rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- KFACNoise's budget


@pytest.mark.parametrize("budget", [-5, 0, "1GB", float("nan"), True, torch.tensor(1000)])
def test_kfac_noise_refuses_a_budget_that_is_no_number_of_bytes_at_construction(
    budget: object,
) -> None:
    with pytest.raises(ValueError, match=r"KFACNoise: memory_budget must be a number of bytes"):
        KFACNoise(scale=0.3, memory_budget=budget)  # type: ignore[arg-type]


def _refusal(budget: int, path: str) -> str:
    model, (x, y), ce = _mlp(), _batch(), nn.CrossEntropyLoss()
    sampler = KFACNoise(scale=0.3, memory_budget=budget)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sampler, model, ce, seed=0)
    with pytest.raises(ValueError) as info:
        if path == "capture":
            with noisy.capture():
                ce(model(x), y).backward()
        else:
            ce(model(x), y).backward()
            noisy.step(inputs=x, targets=y)
    return str(info.value)


@pytest.mark.parametrize("path", ["capture", "separate"])
def test_kfac_noise_budget_refusal_is_its_own_and_its_remedy_works(path: str) -> None:
    """Factors (4^2 + 5^2 + 5^2 + 3^2) * 8 = 600 bytes over a 599-byte budget: KFACNoise's own
    message (no ``params=``, which it does not take), with the numbers; freezing the layer it
    names fits the budget."""
    msg = _refusal(599, path)
    assert msg.startswith("KFACNoise: ") and "params=" not in msg, msg
    assert "600 B, over memory_budget=599 bytes" in msg and "'0' (Linear" in msg, msg
    assert "requires_grad_(False)" in msg and "DiagFisherNoise" in msg, msg
    assert "model.get_submodule('0')" in msg, msg
    model, (x, y), ce = _mlp(), _batch(), nn.CrossEntropyLoss()
    model.get_submodule("0").requires_grad_(False)  # the remedy: 5^2 + 3^2 numbers = 272 bytes
    sampler = KFACNoise(scale=0.3, memory_budget=599)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sampler, model, ce, seed=0)
    with noisy.capture():
        ce(model(x), y).backward()
    noisy.step()
    assert noisy.steps_taken == 1


@pytest.mark.parametrize("path", ["capture", "separate"])
def test_kfac_noise_budget_under_every_layer_names_the_smallest(path: str) -> None:
    msg = _refusal(271, path)
    assert msg.startswith("KFACNoise: ") and "params=" not in msg, msg
    assert "'2' (Linear, weight '2.weight'" in msg and "(272 bytes)" in msg, msg
    assert "at least 600 bytes" in msg, msg


# ----------------------------------------------------------------- a loss factor of 0, unseen


@pytest.mark.parametrize("mode", ["capture", "closure"])
def test_kfac_noise_unseen_zero_loss_factor_is_a_nonfinite_error_leaving_no_trace(
    mode: str,
) -> None:
    """``torch.where(False, loss, 0.0).backward()``: the captured ``G`` is 0/0; KFACNoise raises
    curvlab's NonFiniteError naming the cause (before: torch's ``_LinAlgError`` from ``svd``),
    and the generator, the parameters and the gradients are as the backward pass left them."""
    model, (x, y), ce = _mlp(), _batch(), nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), KFACNoise(scale=0.3), model, ce, seed=0
    )
    before = [p.detach().clone() for p in model.parameters()]
    rng = noisy.generator.get_state()
    noisy.zero_grad()

    def closure() -> torch.Tensor:
        loss = torch.where(torch.tensor(False), ce(model(x), y), 0.0)
        loss.backward()
        return loss

    with pytest.raises(NonFiniteError, match=r"gradient of 0.*step\(inputs=") as info:
        if mode == "closure":
            noisy.step(closure)
        else:
            with noisy.capture():
                closure()
            noisy.step()
    assert "KFACNoise" in str(info.value) and "'0'" in str(info.value)
    assert torch.equal(noisy.generator.get_state(), rng)
    assert noisy.steps_taken == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
