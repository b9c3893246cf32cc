"""NoisyOptimizer with a backward hook of the user's on the ROOT model, or a global one (review s20).

A module backward hook of the user's makes the noise capture's step inexact: the step draws in
the separate pass of ``loss_fn(model(inputs), targets)``, which runs without the hook
(docs/noise.md, "Where the work happens"). For a hook on the root model, or a global one, torch
wraps the model's output in a ``BackwardHookFunction`` after the forward hooks ran (after the
capture read the output), and the walk from the loss input back to the model's output
(``curvlab.noise._roots._loss_path``) stopped at that node: every noise step of such a model
was refused ("cannot rebuild this step's loss input ... by BackwardHookFunctionBackward"), for
``DiagFisherNoise`` and ``FullFisherNoise``, on both one-pass paths (``step(closure)`` and
``with noisy.capture(): ...; noisy.step()``).

The reference is the noise of the same sampler's separate pass on the same model without the
hook, with the same seed (``noisy.step(inputs=, targets=)`` on zero gradients: the gradient is
then the noise itself), added to the hooked model's own gradient: the noisy step's gradient
must equal it bit for bit (same pass, same draw, same addition).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

import curvlab as cl

SEED = 7


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 5, dtype=torch.float64, generator=g), torch.randint(
        0, 3, (12,), generator=g
    )


def _sampler(name: str) -> cl.noise.NoiseSampler:
    if name == "DiagFisherNoise":
        return cl.noise.DiagFisherNoise(scale=0.1)
    return cl.noise.FullFisherNoise("true", scale=0.1)


def _double_pre(module: nn.Module, grad_output: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(2 * g for g in grad_output)  # doubles every gradient below the hook


def _logger(module: nn.Module, grad_input: object, grad_output: object) -> None:
    return None  # a gradient logger: reads, changes nothing


def _hook(where: str, model: nn.Module) -> Callable[[], None]:
    """Put the hook on; return what takes it off."""
    if where == "root":
        h = model.register_full_backward_hook(_logger)
    elif where == "root_pre":
        h = model.register_full_backward_pre_hook(_double_pre)
    elif where == "global":
        h = nn.modules.module.register_module_full_backward_hook(_logger)
    else:
        h = nn.modules.module.register_module_full_backward_pre_hook(_double_pre)
    return h.remove


def _reference_noise(sampler: str, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The separate pass's noise without any hook: the gradient of a step on zero gradients."""
    model = _mlp()
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        _sampler(sampler),
        model,
        nn.CrossEntropyLoss(),
        seed=SEED,
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    noisy.step(inputs=x, targets=y)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _hooked_gradient(where: str, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The hooked model's own gradient (the training step's, without noise)."""
    model = _mlp()
    off = _hook(where, model)
    try:
        nn.CrossEntropyLoss()(model(x), y).backward()  # a module: global hooks act on it too
    finally:
        off()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _brute_gradient(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    model = _mlp()
    params = {n: p.detach() for n, p in model.named_parameters()}
    return grad(lambda q: F.cross_entropy(functional_call(model, q, (x,)), y))(params)


# torch's note that a full backward hook on the root fires without input gradients (x has none)
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("path", ["closure", "capture"])
@pytest.mark.parametrize("sampler", ["DiagFisherNoise", "FullFisherNoise"])
@pytest.mark.parametrize("where", ["root", "root_pre", "global", "global_pre"])
def test_root_or_global_backward_hook_draws_in_the_separate_pass(
    where: str, sampler: str, path: str
) -> None:
    x, y = _data()
    reference = _reference_noise(sampler, x, y)
    hooked = _hooked_gradient(where, x, y)
    # the hook does act on the training step's gradient (the pre-hooks double it), so a noise
    # measured in that step would be another one than the loss's
    factor = 1.0 if where in ("root", "global") else 2.0
    brute = _brute_gradient(x, y)
    for name, g in hooked.items():
        if where != "global_pre":  # (a global pre-hook doubles once per module: compounds)
            torch.testing.assert_close(g, factor * brute[name], rtol=1e-12, atol=1e-14)

    model = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), _sampler(sampler), model, loss_fn, seed=SEED
    )
    off = _hook(where, model)
    try:
        if path == "closure":

            def closure() -> Tensor:
                noisy.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            noisy.step(closure)
        else:
            noisy.zero_grad()
            with noisy.capture():
                loss_fn(model(x), y).backward()
            noisy.step()
    finally:
        off()
    for name, p in model.named_parameters():
        expected = hooked[name].clone().add_(reference[name])  # as the step adds it
        assert torch.equal(p.grad, expected), (where, sampler, path, name)
