"""A first call on the hooks backend checks that the model keeps the examples apart inside its own
first forward pass: the batch pass with gradient is the check's batch pass, and the check's pass on
two examples is the layout probe. Two forward passes fewer (0.8 s of GPT-2 small's 3.2 s), with
the same answers and the same errors, before any backward pass. Against the ``func`` backend
(dense per-example gradients by ``torch.func``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._layout import MixedExamplesError
from curvlab.backends._choice import CHOICES
from curvlab.quantities._sweep import _APART
from tests.zoo import TinyGPT


def _forget() -> None:
    CHOICES.clear()
    _APART.clear()


class _GPT2Positions(TinyGPT):
    """Positions embedded as HF GPT-2 does, ``wpe(position_ids)`` of shape ``(1, T, d)``: a
    module whose leading size is not the number of examples (the layout probe must see it)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device)[None])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _batches(sizes: tuple[int, ...], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        idx = torch.randint(0, 11, (n, 6), generator=g)
        out.append((idx[:, :-1].contiguous(), idx[:, 1:].contiguous()))
    return out


def _counting(model: nn.Module) -> tuple[list[tuple[int, bool]], object]:
    calls: list[tuple[int, bool]] = []

    def pre(module: nn.Module, args: tuple) -> None:
        calls.append((int(args[0].shape[0]), torch.is_grad_enabled()))

    return calls, model.register_forward_pre_hook(pre)


@pytest.mark.parametrize(
    ("n", "passes"),
    # the batch pass with gradient, then the check's passes: two examples, or each of two alone
    [(4, [(4, True), (2, False)]), (2, [(2, True), (1, False), (1, False)])],
)
def test_a_first_call_runs_the_check_in_its_own_forward_pass(n, passes):
    torch.manual_seed(0)
    model = _GPT2Positions().double()
    data = _batches((n,))
    loss_fn = nn.CrossEntropyLoss()
    ref = cl.diag_fisher(model, loss_fn, data, backend="func")
    _forget()
    calls, handle = _counting(model)
    try:
        got = cl.diag_fisher(model, loss_fn, data, backend="hooks")
    finally:
        handle.remove()
    assert calls == passes  # was: a batch pass and the two-example one before, two more after
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-14, msg=k)


@pytest.mark.parametrize("sizes", [(2,), (3,), (2, 5), (4, 1, 3)])
@pytest.mark.parametrize("quantity", ["empirical", "mc", "variance"])
def test_the_layout_from_the_checks_pass_gives_the_func_backends_numbers(sizes, quantity):
    torch.manual_seed(0)
    model = _GPT2Positions().double()
    data = _batches(sizes)
    loss_fn = nn.CrossEntropyLoss(ignore_index=3)

    def run(backend: str) -> dict:
        if quantity == "variance":
            return cl.gradient_stats(model, loss_fn, data, backend=backend).variance
        return cl.diag_fisher(model, loss_fn, data, kind=quantity, seed=5, backend=backend)

    ref = run("func")
    _forget()
    got = run("auto")  # the first call: the shared pass
    again = run("auto")  # remembered: no check, no probe
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-14, msg=k)
        torch.testing.assert_close(again[k], got[k], rtol=0, atol=0, msg=k)


class _Centered(nn.Module):
    """Features centered over the batch when ``mix`` is set: per-example gradients undefined."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.mix = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        return self.head(z - z.mean(0) if self.mix else z)


def _centered_data(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(n, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1][:n]))
    ]


def test_a_coupling_is_raised_before_any_backward_pass():
    torch.manual_seed(0)
    model = _Centered().double()
    backwards: list[int] = []
    handle = model.body.register_full_backward_hook(lambda *a: backwards.append(1))
    _forget()
    try:
        with pytest.raises(MixedExamplesError, match="mixes the examples"):
            cl.diag_fisher(model, nn.CrossEntropyLoss(), _centered_data(), backend="hooks")
    finally:
        handle.remove()
    assert backwards == []
    assert all(p.grad is None for p in model.parameters())


def test_a_remembered_backend_still_runs_a_forgotten_check():
    # the backend choice remembered (a call on which the model kept the examples apart), the
    # examples-apart memo not: the session resumes its layout and runs the check alone
    torch.manual_seed(0)
    model = _Centered().double()
    model.mix = False
    data = _centered_data()
    _forget()
    cl.diag_fisher(model, nn.CrossEntropyLoss(), data)
    (choice,) = CHOICES._entries.values()
    assert choice.backend == "hooks" and choice.learned is not None  # a layout to resume
    _APART.clear()
    model.mix = True
    with pytest.raises(MixedExamplesError, match="mixes the examples"):
        cl.diag_fisher(model, nn.CrossEntropyLoss(), data)


def test_a_batch_without_batch_axis_is_named_in_the_shared_pass():
    # an autoencoder's single sample (x_i, x_i) of 6 features, read as 6 examples: the model
    # runs on it (a Linear takes an unbatched vector) but not on two of its "examples"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 6)).double()
    x = torch.randn(6, dtype=torch.float64)
    _forget()
    calls, handle = _counting(model)
    try:
        with pytest.raises(ValueError, match="no batch axis") as err:
            cl.diag_fisher(model, nn.MSELoss(), [(x, x)], backend="hooks")
    finally:
        handle.remove()
    assert "mat1 and mat2" in str(err.value)
    assert [c[1] for c in calls][:2] == [True, False]  # found in the shared pass
