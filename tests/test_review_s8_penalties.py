"""Review of the penalties (eighth sweep): compiled models, Dropout masks, ignored targets,
autocast. Each case was wrong or failed before:

* a compiled model returning an output object (HuggingFace's ``.logits``) kept its compiled graph,
  whose double backward fails;
* a compiled ``output=`` that is not ``model(inputs)`` (``logits / T``) was replaced silently by the
  recomputed ``model(inputs)`` (0.955 instead of 0.050);
* the penalty's own forward drew exactly the Dropout mask of the training loop's next forward;
* every target ignored under ``"mean"``: 0 instead of NaN (torch's own loss is NaN, 0/0);
* the penalty's own forward ran in the caller's bfloat16 autocast (1.2e-3 off).

References: the penalties' definitions by nested ``torch.func.grad`` in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from curvlab.regularizers import gradient_penalty, input_gradient_penalty

DT = torch.float64


def _brute_gp(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: loss_fn(functional_call(model, p, (X,)), y))(params)
    return float(sum(v.pow(2).sum() for v in g.values()))


@dataclass
class Output:
    """A HuggingFace-style output object."""

    logits: torch.Tensor


class WithLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> Output:
        return Output(self.net(x))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)


def test_compiled_model_with_an_output_object_recomputes_eagerly() -> None:
    torch.manual_seed(1)
    model = WithLogits().to(DT)
    X, y = _data()
    compiled = torch.compile(model, backend="aot_eager")
    value = gradient_penalty(compiled, nn.CrossEntropyLoss(), X, y, output=compiled(X))
    value.backward()  # a compiled graph has no double backward: this failed
    plain = nn.Sequential(*model.net).eval()
    assert float(value.detach()) == pytest.approx(
        _brute_gp(plain, nn.CrossEntropyLoss(), X, y), rel=1e-10
    )


def test_compiled_output_that_is_not_model_of_inputs_is_refused() -> None:
    torch.manual_seed(2)
    # eval mode: without any train-mode module the values are compared too (in train mode only
    # the shapes: dropout of any kind makes the two forwards differ)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT).eval()
    X, y = _data()
    compiled = torch.compile(model, backend="aot_eager")
    for transformed in (compiled(X) / 2.0, compiled(X)[:, :2]):
        with pytest.raises(ValueError, match=r"output given is not model\(inputs\)"):
            gradient_penalty(compiled, nn.CrossEntropyLoss(), X, y[:], output=transformed)
    # model(inputs) itself is accepted and exact
    value = gradient_penalty(compiled, nn.CrossEntropyLoss(), X, y, output=compiled(X))
    assert float(value) == pytest.approx(_brute_gp(model, nn.CrossEntropyLoss(), X, y), rel=1e-10)


def test_own_forward_draws_a_dropout_mask_of_its_own() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT).train()
    X, y = _data()
    masks: list[torch.Tensor] = []
    handle = model[1].register_forward_hook(lambda m, a, o: masks.append(o != 0))
    try:
        state = torch.get_rng_state()
        gradient_penalty(model, nn.CrossEntropyLoss(), X, y)  # its own forward
        assert torch.equal(state, torch.get_rng_state())  # the global RNG as it was
        model(X)  # the training loop's next forward
    finally:
        handle.remove()
    penalty_mask, next_mask = masks
    assert not torch.equal(penalty_mask, next_mask)


@pytest.mark.parametrize("penalty", ["gp", "gp_x"])
def test_every_target_ignored_under_mean_is_nan_as_torch_gives(penalty: str) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X, _ = _data()
    y = torch.full((5,), -100)
    loss_fn = nn.CrossEntropyLoss()
    assert torch.isnan(loss_fn(model(X), y))
    fn = gradient_penalty if penalty == "gp" else input_gradient_penalty
    assert torch.isnan(fn(model, loss_fn, X, y))
    y[0] = 1  # one counted target: a number
    assert torch.isfinite(fn(model, loss_fn, X, y))


@pytest.mark.parametrize("penalty", ["gp", "gp_x"])
def test_own_forward_computes_outside_the_callers_autocast(penalty: str) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    fn = gradient_penalty if penalty == "gp" else input_gradient_penalty
    outside = float(fn(model, nn.CrossEntropyLoss(), X, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = float(fn(model, nn.CrossEntropyLoss(), X, y))
    assert inside == pytest.approx(outside, rel=1e-6)
