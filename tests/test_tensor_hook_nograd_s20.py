"""A tensor hook of the user's registered without a ``requires_grad`` check (review s20).

A forward hook ``lambda m, i, o: o.register_hook(lambda g: 3 * g)`` works in the user's training
forward (the output requires grad there) but torch refuses it on a tensor without gradient. Since
review s19 curvlab's forward passes take such hooks off (``curvlab._notrace.tensor_hooks_off``:
they change the gradient, not the loss whose curvature curvlab computes), yet they still handed
them to torch first, so curvlab's passes without gradient failed: torch's raw "cannot register a
hook on a tensor that doesn't require gradient" (``Diagnostics`` ``loss``, ``fisher_norms``,
``diag_fisher``), or a message claiming that the batch most likely had no batch axis
(``grad_norm``, ``gradient_stats``: the two-example probe). Now the hook of a tensor without
gradient is not handed to torch inside curvlab's passes (it would be removed at once anyway);
the user's own code keeps torch's error.

Every reference is dense float64 brute force with ``torch.func``, on the loss without the hook
(curvlab's passes run without the user's tensor hooks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab._data import part_failed

# float64 sums of a few dozen terms of size O(1): a relative error above this is a wrong number
TOL = 1e-10


def _triple(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
    output.register_hook(lambda g: 3 * g)  # no requires_grad check: fine in training only


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 3, (16,), generator=g)


def _per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(q: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, q, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_curvlab_passes_without_gradient_run_with_an_unguarded_tensor_hook() -> None:
    model, (x, y) = _mlp(), _data()
    loss_fn = nn.CrossEntropyLoss()
    g_n = _per_example_grads(model, x, y)  # before the hook: brute force of the loss itself
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y)
    mean = {n: g.mean(0) for n, g in g_n.items()}
    second = {n: (g**2).mean(0) for n, g in g_n.items()}
    norm = torch.cat([m.reshape(-1) for m in mean.values()]).norm()

    model[0].register_forward_hook(_triple)
    values = cl.Diagnostics(
        model, loss_fn, every=1, quantities=["loss", "grad_norm"], on_error="raise"
    ).step(0, x, y)["values"]
    assert abs(values["loss"] - float(loss)) <= TOL * float(loss)
    assert abs(values["grad_norm"] - float(norm)) <= TOL * float(norm)

    for backend in ("auto", "backpack"):  # (BackPACK's own two-example layout probe)
        fisher = cl.diag_fisher(model, loss_fn, (x, y), backend=backend)
        for name, ref in second.items():
            assert _rel(fisher[name], ref) < TOL, (backend, name)

    stats = cl.gradient_stats(model, loss_fn, (x, y))
    for name in mean:
        assert _rel(stats.mean[name], mean[name]) < TOL, name
        assert _rel(stats.second_moment[name], second[name]) < TOL, name

    # nothing left behind: the user's own training step still runs the hook (3x below it)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    torch.testing.assert_close(model[2].weight.grad, mean["2.weight"], rtol=TOL, atol=0)
    torch.testing.assert_close(model[0].weight.grad, 3 * mean["0.weight"], rtol=TOL, atol=0)


def test_the_users_own_pass_without_gradient_keeps_torchs_error() -> None:
    model, (x, _) = _mlp(), _data()
    model[0].register_forward_hook(_triple)
    with torch.no_grad(), pytest.raises(RuntimeError, match="doesn't require gradient"):
        model(x)
    # also while a noise capture records the user's training step (its watch does not take the
    # user's hooks off: torch's checks are the user's)
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        cl.noise.DiagFisherNoise(scale=0.1),
        model,
        nn.CrossEntropyLoss(),
    )
    with noisy.capture(), torch.no_grad(), pytest.raises(RuntimeError, match="require gradient"):
        model(x)


def test_a_two_example_failure_not_about_shapes_does_not_blame_the_batch_axis() -> None:
    whole, part = torch.zeros(16, 5), torch.zeros(2, 5)
    other = RuntimeError("the model's own refusal: needs a calibration call first")
    message = str(part_failed(whole, part, other))
    assert "needs a calibration call first" in message  # the model's error, shown
    assert "most likely" not in message.lower()
    shape = RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x2 and 5x6)")
    message = str(part_failed(whole, part, shape))
    assert "mat1 and mat2 shapes cannot be multiplied" in message
    assert "Most likely the batch has no batch axis" in message


@pytest.mark.parametrize("sampler", ["DiagFisherNoise", "KFACNoise"])
def test_a_noise_step_runs_with_an_unguarded_tensor_hook(sampler: str) -> None:
    """The step draws in the separate pass (a tensor hook of the user's makes it inexact), whose
    two-example probe ran the hook under ``no_grad``: the noise is that of the model without the
    hook, bit for bit (same seed), added to the step's own (hooked) gradient."""
    x, y = _data()
    loss_fn = nn.CrossEntropyLoss()

    def noisy_for(model: nn.Module) -> cl.noise.NoisyOptimizer:
        make = getattr(cl.noise, sampler)
        return cl.noise.NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            make(scale=0.1),
            model,
            loss_fn,
            seed=3,
        )

    plain = _mlp()
    for p in plain.parameters():
        p.grad = torch.zeros_like(p)
    noisy_for(plain).step(inputs=x, targets=y)  # zero gradients: the gradient is the noise

    model = _mlp()
    model[0].register_forward_hook(_triple)
    F.cross_entropy(model(x), y).backward()
    hooked = {n: p.grad.clone() for n, p in model.named_parameters()}
    noisy = noisy_for(model)

    def closure() -> Tensor:
        noisy.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    noisy.step(closure)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, hooked[name].clone().add_(q.grad)), name
