"""NoisyOptimizer with a module backward hook OUTSIDE the model, between its output and the loss
(review s20).

``loss_fn(post(model(x)), y)`` with ``post`` a module of the user's that is not part of the model
and has a full backward hook (or pre-hook): torch wraps ``post``'s input and output in
``BackwardHookFunction`` nodes, and the hook acts on the gradient that reaches the model's output,
so on every gradient the capture reads and on a noise folded in at the loss input. Such a hook
changes the step's gradients, not the loss whose curvature the noise stands for, so the step must
draw in the separate pass of ``loss_fn(model(inputs), targets)`` (docs/noise.md, "Where the work
happens"), as for a hook on the model. Before the fix the capture's check of the model's hooks
(``curvlab._notrace.user_backward_hook(model)``) did not see it, and the walk from the loss input
to the model's output passed its nodes silently: ``DiagFisherNoise``'s captured noise and
``FullFisherNoise("true")``'s folded noise were 2.0x the separate pass's under a hook doubling
``grad_input`` (right: 1.0x).

The reference is the noise of the same sampler's separate pass, without ``post`` or any hook,
with the same seed (``noisy.step(inputs=, targets=)`` on zero gradients: the gradient is then the
noise itself), added to the hooked step's own gradient: the noisy step's gradient must equal it
bit for bit (same pass, same draw, same addition). The hooked step's own gradient is checked
against a dense ``torch.func`` gradient: the doubling hook does double it.
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
SAMPLERS = [
    "DiagFisherNoise",
    "DiagFisherNoise-mc",
    "FisherTraceNoise",
    "KFACNoise",
    "FullFisherNoise-true",
    "FullFisherNoise-empirical",
]
# the samplers that measure inside the step (or fold into it) when nothing stands in the way
ONE_PASS = [s for s in SAMPLERS if s != "DiagFisherNoise-mc"]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 3, (12,), generator=g)


def _sampler(name: str) -> cl.noise.NoiseSampler:
    if name == "DiagFisherNoise":
        return cl.noise.DiagFisherNoise(scale=0.1)
    if name == "DiagFisherNoise-mc":
        return cl.noise.DiagFisherNoise("mc", scale=0.1)
    if name == "FisherTraceNoise":
        return cl.noise.FisherTraceNoise(scale=0.1)
    if name == "KFACNoise":
        return cl.noise.KFACNoise(scale=0.1)
    return cl.noise.FullFisherNoise(name.split("-")[1], scale=0.1)


class Post(nn.Module):
    """A module of the loop's own between the model's output and the loss (not in the model)."""

    def forward(self, z: Tensor) -> Tensor:
        return z


def _double(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
    return tuple(None if g is None else 2 * g for g in grad_input)  # doubles the model's


def _double_pre(module: nn.Module, grad_output: tuple) -> tuple:
    return tuple(2 * g for g in grad_output)


def _logger(module: nn.Module, grad_input: object, grad_output: object) -> None:
    return None  # reads, changes nothing: curvlab cannot tell, so it takes the exact pass too


def _post(hook: str | None) -> nn.Module:
    post = Post()
    if hook == "double":
        post.register_full_backward_hook(_double)
    elif hook == "double_pre":
        post.register_full_backward_pre_hook(_double_pre)
    elif hook == "logger":
        post.register_full_backward_hook(_logger)
    return post


def _reference_noise(sampler: str, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The separate pass's noise without ``post``: the gradient of a step on zero gradients."""
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


def _hooked_gradient(hook: str | None, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The training step's own gradient (with ``post`` and its hook, without noise)."""
    model = _mlp()
    nn.CrossEntropyLoss()(_post(hook)(model(x)), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _brute_gradient(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    model = _mlp()
    params = {n: p.detach() for n, p in model.named_parameters()}
    return grad(lambda q: F.cross_entropy(functional_call(model, q, (x,)), y))(params)


def _noisy_step(
    sampler: cl.noise.NoiseSampler,
    model: nn.Module,
    post: nn.Module,
    path: str,
    x: Tensor,
    y: Tensor,
    loss_of: Callable[[Tensor], Tensor] = lambda out: out,
) -> None:
    loss_fn = nn.CrossEntropyLoss()
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, loss_fn, seed=SEED
    )
    if path == "closure":

        def closure() -> Tensor:
            noisy.zero_grad()
            loss = loss_fn(loss_of(post(model(x))), y)
            loss.backward()
            return loss

        noisy.step(closure)
    else:
        noisy.zero_grad()
        with noisy.capture():
            loss_fn(loss_of(post(model(x))), y).backward()
        noisy.step()


@pytest.mark.parametrize("path", ["closure", "capture"])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("hook", ["double", "double_pre", "logger"])
def test_backward_hook_between_output_and_loss_draws_in_the_separate_pass(
    hook: str, sampler: str, path: str
) -> None:
    x, y = _data()
    reference = _reference_noise(sampler, x, y)
    hooked = _hooked_gradient(hook, x, y)
    brute = _brute_gradient(x, y)
    factor = 1.0 if hook == "logger" else 2.0  # the hook does act on the step's gradient
    for name, g in hooked.items():
        torch.testing.assert_close(g, factor * brute[name], rtol=1e-12, atol=1e-14)

    model = _mlp()
    _noisy_step(_sampler(sampler), model, _post(hook), path, x, y)
    for name, p in model.named_parameters():
        expected = hooked[name].clone().add_(reference[name])  # as the step adds it
        assert torch.equal(p.grad, expected), (hook, sampler, path, name)


@pytest.mark.parametrize("sampler", ["DiagFisherNoise", "KFACNoise", "FullFisherNoise-true"])
def test_hook_below_an_operation_the_separate_pass_cannot_rebuild_is_named(sampler: str) -> None:
    """The hook sits below a scaling of the logits, which the walk from the loss input does not
    pass: it is found all the same, and the separate pass, which cannot rebuild ``2 * logits``,
    says the hook is why that pass is needed (before, the step stayed in one pass: captured
    noise 2x the loss's)."""
    x, y = _data()
    with pytest.raises(RuntimeError, match="backward hook between the model's output and the"):
        _noisy_step(_sampler(sampler), _mlp(), _post("double"), "capture", x, y, lambda o: 2 * o)


@pytest.mark.parametrize("path", ["closure", "capture"])
@pytest.mark.parametrize("sampler", ONE_PASS)
def test_no_hook_keeps_the_one_pass_path(
    sampler: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a hook (``post`` still called) the step measures in the step itself, as before."""
    x, y = _data()
    s = _sampler(sampler)

    def no_separate_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the separate pass ran")

    monkeypatch.setattr(s, "estimate", no_separate_pass)
    model = _mlp()
    _noisy_step(s, model, _post(None), path, x, y)
    hooked = _hooked_gradient(None, x, y)
    assert any(not torch.equal(p.grad, hooked[n]) for n, p in model.named_parameters())
