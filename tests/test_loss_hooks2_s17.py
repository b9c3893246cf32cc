"""Review s17 (FB): hooks on the loss module. The behavioural check of global forward hooks
reads the whole first batch (one example passed a doubling hook when its label was ignored, and
every hook whose effect depends on the batch size), a batch on which nothing is counted does not
count as checked, and ``GradientNormPenalty`` validates its loss on every recomputation (hooks and
options changed after construction were followed by neither refusal nor value)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian

import curvlab as cl
from curvlab.regularizers import GradientNormPenalty

DT = torch.float64


def _setup(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    X = torch.randn(6, 3, generator=gen, dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, X, y


def _brute_trace(model: nn.Module, lf: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Tr of the dense float64 Hessian of ``lf(model(X), y)`` as torch calls it (hooks included)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names, sizes = list(params), [p.numel() for p in params.values()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        ps = {k: t.view_as(params[k]) for k, t in zip(names, flat.split(sizes))}
        return lf(functional_call(model, ps, (X,)), y)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return float(torch.trace(hessian(loss)(flat)))


def _global_hook(fn):  # noqa: ANN001, ANN202 - a test helper
    def hook(mod, args, out):  # noqa: ANN001, ANN202
        return fn(args, out) if isinstance(mod, nn.CrossEntropyLoss) else None

    return torch.nn.modules.module.register_module_forward_hook(hook)


@pytest.mark.parametrize(
    "effect",
    [
        pytest.param(lambda args, out: out * 2, id="doubling-first-label-ignored"),
        pytest.param(lambda args, out: out * args[1].shape[0], id="times-batch-size"),
    ],
)
def test_a_global_hook_the_first_example_does_not_show_is_refused(effect) -> None:  # noqa: ANN001
    model, X, y = _setup()
    y[0] = -100  # the first example is ignored: NaN against NaN passed the one-example check
    lf = nn.CrossEntropyLoss()
    plain = _brute_trace(model, lf, X, y)
    handle = _global_hook(effect)
    try:
        hooked = _brute_trace(model, lf, X, y)
        # the hook changes the objective (2x, 6x): curvlab, computing its own formula, must refuse
        assert abs(hooked - plain) > 0.5 * abs(plain)
        with pytest.raises(TypeError, match="global module forward hook"):
            cl.trace(model, lf, (X, y), matrix="hessian", method="exact")
    finally:
        handle.remove()


def test_a_logging_global_hook_passes_with_the_exact_value() -> None:
    model, X, y = _setup()
    y[0] = -100
    lf = nn.CrossEntropyLoss()
    seen: list[int] = []
    handle = _global_hook(lambda args, out: seen.append(1))  # returns None: changes nothing
    try:
        want = _brute_trace(model, lf, X, y)
        got = cl.trace(model, lf, (X, y), matrix="hessian", method="exact").value
    finally:
        handle.remove()
    # a Hessian of 43 parameters summed in float64: rounding near 1e-15 relative
    assert got == pytest.approx(want, rel=1e-10, abs=0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_batch_with_nothing_counted_leaves_the_hooks_unchecked(reduction: str) -> None:
    """NaN ("mean") or 0 ("sum") on both sides shows nothing: the next batch is checked."""
    model, X, y = _setup()
    lf = nn.CrossEntropyLoss(reduction=reduction)
    void = torch.full_like(y, -100)
    plain = _brute_trace(model, lf, X, y)
    handle = _global_hook(lambda args, out: out * 2)
    try:
        # the second batch shows the doubling (float64 rounding near 1e-15 relative)
        assert _brute_trace(model, lf, X, y) == pytest.approx(2 * plain, rel=1e-10)
        with pytest.raises(TypeError, match="global module forward hook"):
            cl.trace(model, lf, [(X, void), (X, y)], matrix="hessian", method="exact")
    finally:
        handle.remove()


def _brute_gp(model: nn.Module, lf: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """||grad_theta lf(model(X), y)||^2 in float64, as torch calls the loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return lf(functional_call(model, p, (X,)), y)

    return float(sum(g.pow(2).sum() for g in grad(loss)(params).values()))


@pytest.mark.parametrize("every", [1, 3])
def test_gradient_norm_penalty_refuses_a_loss_hook_added_after_construction(every: int) -> None:
    model, X, y = _setup()
    lf = nn.CrossEntropyLoss()
    pen = GradientNormPenalty(model, lf, kind="gradient", alpha=1.0, every=every)
    # float64 sums of a few dozen terms: 1e-10 relative leaves a wide margin over rounding
    assert float(pen(X, y).detach()) == pytest.approx(_brute_gp(model, lf, X, y), rel=1e-10)
    handle = lf.register_forward_hook(lambda mod, args, out: out * 2)
    try:
        assert _brute_gp(model, lf, X, y) > 3.5 * _brute_gp(model, nn.CrossEntropyLoss(), X, y)
        for _ in range(every - 1):  # cached steps: no recomputation, nothing computed
            pen(X, y)
        with pytest.raises(TypeError, match="forward hook"):  # was: 0.895846 for 3.583384
            pen(X, y)
    finally:
        handle.remove()


def test_gradient_norm_penalty_follows_a_reduction_changed_after_construction() -> None:
    model, X, y = _setup()
    lf = nn.CrossEntropyLoss()
    pen = GradientNormPenalty(model, lf, kind="gradient", alpha=1.0, every=1)
    pen(X, y)
    lf.reduction = "sum"  # the user's loss now sums: 36x the mean's squared gradient norm
    want = _brute_gp(model, lf, X, y)
    assert float(pen(X, y).detach()) == pytest.approx(want, rel=1e-10)
    lf.reduction = "none"
    with pytest.raises(ValueError, match="reduction"):
        pen(X, y)
