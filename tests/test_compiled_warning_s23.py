"""No torch warning about curvlab's own global hook in torch.func passes over a model holding a
``torch.compile``'d submodule (review s23): the func backend and the exact Hessian/GGN
operator ran the model through ``functional_call`` inside a function, which the silencing of
review s20 did not look through."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab as cl

DT = torch.float64


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    compiled = nn.Sequential(torch.compile(eager[0], backend="eager"), eager[1], eager[2])
    return eager, compiled


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 4, dtype=DT, generator=g), torch.randint(0, 3, (6,), generator=g)


CALLS = {
    "diag_fisher exact": lambda m: cl.diag_fisher(m, nn.CrossEntropyLoss(), _data(), kind="exact"),
    "gradient_stats func": lambda m: (
        cl.gradient_stats(m, nn.CrossEntropyLoss(), _data(), backend="func").variance
    ),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_func_passes_on_a_compiled_submodule_give_no_global_hook_warning(name: str) -> None:
    eager, compiled = _models()
    call = CALLS[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = call(compiled)
    assert not [w for w in caught if "global hooks" in str(w.message)]
    want = call(eager)
    # the compiled model names its first layer's parameters "0._orig_mod.weight", ...
    assert len(got) == len(want)
    for a, b in zip(got.values(), want.values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert list(nn.modules.module._global_forward_pre_hooks) == []
