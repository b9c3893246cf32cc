"""Review of session 16's own diff: SLQ standard errors at float64's extreme scales, the
in-place guard and BackPACK on layers called with their input by keyword."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.estimators import TensorOperator, slq


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e160, 1e300])
def test_slq_standard_error_scales_with_the_operator(scale: float) -> None:
    # the density matched at every scale, its standard error was inf (1e-160, 1e-200) or 0
    # (1e160, 1e300) at most grid points: the probes' spread from plain squares
    g = torch.Generator().manual_seed(0)
    D = 40
    ev = torch.randn(D, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    B = (Q * ev) @ Q.T
    B = (B + B.T) / 2
    ref = slq(TensorOperator(B), num_steps=12, num_probes=3, seed=0)
    got = slq(TensorOperator(B * scale), num_steps=12, num_probes=3, seed=0)
    assert torch.isfinite(got.stderr).all()
    err = (got.stderr * scale - ref.stderr).abs().max() / ref.stderr.abs().max()
    assert err < 1e-12


class _InplaceKeyword(nn.Module):
    """An in-place ReLU called as ``act(input=h)`` after a HuggingFace ``Conv1D`` (whose output
    is a view)."""

    def __init__(self, keyword: bool) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.a, self.act, self.b = Conv1D(4, 3), nn.ReLU(inplace=True), nn.Linear(4, 3)
        self.keyword = keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.act(input=h) if self.keyword else self.act(h)
        return self.b(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=g
    )


def test_inplace_module_called_by_keyword_runs_on_the_hooks_backend() -> None:
    # the guard read args[0] only: a keyword call stayed in place and the hooks backend handed
    # over naming a wrong cause ("used outside its module")
    torch.manual_seed(0)
    model = _InplaceKeyword(keyword=True).double()
    data, lf = _data(), nn.CrossEntropyLoss()
    hooks = cl.diag_fisher(model, lf, data, backend="hooks")
    ref = cl.diag_fisher(model, lf, data, backend="func")
    for k in ref:
        torch.testing.assert_close(hooks[k], ref[k], rtol=1e-12, atol=1e-15)
    assert model.act.inplace  # the user's flag as it was


def test_backpack_names_a_keyword_called_layer() -> None:
    # BackPACK's hook_store_io stores positional inputs only: a raw AttributeError ('input0')
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(torch.tanh(self.l1(input=x)))

    model, data, lf = Net().double(), _data(), nn.CrossEntropyLoss()
    for call in (
        lambda: cl.diag_fisher(model, lf, data, backend="backpack"),
        lambda: cl.gradient_stats(model, lf, data, backend="backpack"),
    ):
        with pytest.raises(
            ValueError, match=r"module 'l1' \(Linear\) was called with its input by keyword"
        ):
            call()
    auto = cl.diag_fisher(model, lf, data)
    ref = cl.diag_fisher(model, lf, data, backend="func")
    for k in ref:
        torch.testing.assert_close(auto[k], ref[k], rtol=1e-12, atol=1e-15)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
