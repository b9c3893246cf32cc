"""Review s17 (F10): the penalties' inputs. Missing targets of GP and GP_x, a Tensor alpha, void
labels in the targets of FP and GP_r, and the layout a ``GradientNormPenalty`` remembers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import curvlab.regularizers._penalties as penalties
from curvlab._losses import AmbiguousLayoutWarning
from curvlab.regularizers import (
    FisherPenalty,
    GradientNormPenalty,
    fisher_penalty,
    gradient_penalty,
    input_gradient_penalty,
    random_label_penalty,
)


def _setup() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    X = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, nn.CrossEntropyLoss(), X, y


def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


# ---------------------------------------------------------------- 1. GP and GP_x without targets


@pytest.mark.parametrize("penalty", ["gradient", "input"])
def test_gp_and_gp_x_refuse_missing_targets_before_any_forward(penalty: str) -> None:
    model, lf, X, y = _setup()
    calls = _count_forwards(model)
    name = "gradient_penalty" if penalty == "gradient" else "input_gradient_penalty"

    def call(targets: object) -> torch.Tensor:
        if penalty == "gradient":
            return gradient_penalty(model, lf, X, targets)  # type: ignore[arg-type]
        return input_gradient_penalty(model, lf, X, targets)  # type: ignore[arg-type]

    # was: AttributeError 'NoneType' object has no attribute 'is_floating_point' / 'shape'
    with pytest.raises(ValueError, match=rf"{name} .* needs the batch's labels") as err:
        call(None)
    assert "fisher_penalty" in str(err.value) and "random_label_penalty" in str(err.value)
    with pytest.raises(TypeError, match=rf"{name} .* got list"):
        call(y.tolist())
    assert calls == []  # refused before the forward pass (GP_x ran its own before)
    assert call(y).ndim == 0  # the labels themselves are accepted


def test_fp_and_gp_r_refuse_targets_that_are_not_a_tensor() -> None:
    model, lf, X, y = _setup()
    calls = _count_forwards(model)
    with pytest.raises(TypeError, match="targets= .* got list"):
        fisher_penalty(model, lf, X, targets=y.tolist())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="targets= .* got list"):
        random_label_penalty(model, lf, X, targets=y.tolist())  # type: ignore[arg-type]
    assert calls == []


# ---------------------------------------------------------------- 2. alpha as a Tensor


def test_tensor_alpha_is_refused_with_the_way_out() -> None:
    model, lf, X, y = _setup()
    alpha = torch.tensor(0.5)
    # was: "alpha must be a finite number >= 0, got tensor(0.5000)", which 0.5 is
    message = r"alpha must be a Python float \(got a Tensor: pass float\(alpha\)\)"
    with pytest.raises(TypeError, match=message):
        gradient_penalty(model, lf, X, y, alpha=alpha)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=message):
        input_gradient_penalty(model, lf, X, y, alpha=alpha)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=message):
        FisherPenalty(model, lf, alpha=alpha)  # type: ignore[arg-type]
    # float(alpha) gives the penalty at 0.5: half the one at alpha=1 (the same labels)
    half = gradient_penalty(model, lf, X, y, alpha=float(alpha))
    whole = gradient_penalty(model, lf, X, y, alpha=1.0)
    torch.testing.assert_close(half, 0.5 * whole, rtol=1e-14, atol=0.0)


# ---------------------------------------------------------------- 3. void labels in FP / GP_r

_VOID = r"1 target\(s\) are neither a class index in \[0, 3\) nor ignore_index=-100"


@pytest.mark.parametrize("penalty", [fisher_penalty, random_label_penalty])
def test_fp_and_gp_r_refuse_void_labels_as_gp_does(penalty) -> None:
    model, lf, X, _ = _setup()
    bad = torch.tensor([0, 1, 2, 255, 0, 1])  # a void label 255, ignore_index is -100
    with pytest.raises(ValueError, match=_VOID):
        gradient_penalty(model, lf, X, bad)
    with pytest.raises(ValueError, match=_VOID):  # was: accepted, 255 counted as a loss term
        penalty(model, lf, X, targets=bad)
    with pytest.raises(ValueError, match=_VOID):
        penalty(model, lf, X, output=model(X), targets=bad)
    kind = "fisher" if penalty is fisher_penalty else "random"
    with pytest.raises(ValueError, match=_VOID):
        GradientNormPenalty(model, lf, kind=kind, every=2)(X, bad, output=model(X))
    # the loss's own ignore_index is a void label that is accepted
    ignored = torch.tensor([0, 1, 2, -100, 0, 1])
    assert torch.isfinite(penalty(model, lf, X, targets=ignored))


@pytest.mark.parametrize("penalty", [fisher_penalty, random_label_penalty])
def test_void_labels_on_a_device_make_the_value_nan_without_a_host_read(
    penalty, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where reading the count would synchronise (labels on an accelerator), the value is NaN
    and its gradient 0, as for a batch with no counted label; simulated on the CPU."""
    monkeypatch.setattr(penalties, "_readable_for_free", lambda t: False, raising=False)
    model, lf, X, _ = _setup()
    bad = torch.tensor([0, 1, 2, 255, 0, 1])
    value = penalty(model, lf, X, output=model(X), targets=bad)
    assert torch.isnan(value)
    grads = torch.autograd.grad(value, list(model.parameters()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    good = torch.tensor([0, 1, 2, -100, 0, 1])
    assert torch.isfinite(penalty(model, lf, X, targets=good))


# ---------------------------------------------------------------- 4. the layout a class remembers


def test_gradient_norm_penalty_follows_the_gpt_layout_of_earlier_batches() -> None:
    gen = torch.Generator().manual_seed(1)
    C, d = 3, 2
    model = nn.Linear(d, C).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    lf = nn.CrossEntropyLoss()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def brute_gp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """||grad_theta L||^2 with the classes in the last axis (the GPT layout), float64."""

        def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = functional_call(model, p, (x,))
            return nn.functional.cross_entropy(logits.reshape(-1, C), y.reshape(-1))

        return sum(g.pow(2).sum() for g in grad(loss)(params).values())

    pen = GradientNormPenalty(model, lf, kind="gradient", every=1)
    x1 = torch.randn(2, 4, d, generator=gen, dtype=torch.float64)  # T=4 != C: GPT layout only
    y1 = torch.randint(0, C, (2, 4), generator=gen)
    x2 = torch.randn(2, C, d, generator=gen, dtype=torch.float64)  # T == C: both layouts fit
    y2 = torch.randint(0, C, (2, C), generator=gen)
    # float64 sums of a few dozen terms: rounding near 1e-15 relative; 1e-12 leaves margin
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousLayoutWarning)  # was: warned, torch's layout
        first = pen(x1, y1, output=model(x1))
        second = pen(x2, y2, output=model(x2))
    torch.testing.assert_close(first.detach(), brute_gp(x1, y1), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(second.detach(), brute_gp(x2, y2), rtol=1e-12, atol=0.0)
