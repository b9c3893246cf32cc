"""DESIGN.md's contract as an outside test writer reads it (found in review):

* a BatchNorm without running statistics normalises with the batch's statistics in eval mode
  too: it couples the examples, so it is refused like train mode (``eigenvalues`` returned 8.57
  for a true 1.95, products were 389% off);
* the BackPACK backend left torch's "full backward hook" flag on every module, so the user's own
  ``register_backward_hook`` failed afterwards, and a module that once had a legacy hook made
  BackPACK raise torch's error instead of handing over;
* ``backend="backpack"`` forced on a forward with a functional op raised BackPACK's
  ``AssertionError`` rather than the documented clear error;
* ``curvlab.analysis.hf`` / ``.lightning`` needed an import of their own;
* a sampler's ``kind=`` error named a value the user never passed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

import curvlab as cl
from curvlab.noise import FullFisherNoise, KFACNoise
from tests.test_noise_samplers import _one_thread  # noqa: F401 (fixture)


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (6,), generator=g
    )


CALLS = {
    "diag_fisher": lambda m, L, d: cl.diag_fisher(m, L, d),
    "gradient_stats": lambda m, L, d: cl.gradient_stats(m, L, d),
    "kfac": lambda m, L, d: cl.kfac(m, L, d),
    "operator": lambda m, L, d: cl.curvature_operator(m, L, d),
    "eigenvalues": lambda m, L, d: cl.eigenvalues(m, L, d),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_batchnorm_without_running_statistics_is_refused_in_eval_mode(call: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)
    ).double()
    model.eval()
    with pytest.raises(ValueError, match=r"BatchNorm1d at '1' has no running statistics"):
        CALLS[call](model, nn.CrossEntropyLoss(), _data())


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_backpack_leaves_the_modules_backward_hook_flags_as_they_were() -> None:
    model, lf = _chain(), nn.CrossEntropyLoss()
    before = [m.__dict__.get("_is_full_backward_hook") for m in model.modules()]
    res = cl.diag_fisher(model, lf, _data(), kind="exact", backend="backpack")
    assert res.backend == "backpack"
    assert [m.__dict__.get("_is_full_backward_hook") for m in model.modules()] == before
    handle = model[0].register_backward_hook(lambda *a: None)  # the user's legacy hook: fine
    handle.remove()


def test_a_module_with_a_legacy_backward_hook_is_handed_over_exactly() -> None:
    model, lf = _chain(), nn.CrossEntropyLoss()
    want = cl.diag_fisher(model, lf, _data(), kind="exact", backend="func")
    model[0].register_backward_hook(lambda *a: None).remove()  # torch keeps the legacy flag
    got = cl.diag_fisher(model, lf, _data(), kind="exact")
    assert got.backend != "backpack"
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-14)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.h = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(torch.tanh(self.a(x)))


def test_forced_backpack_on_a_functional_op_is_the_clear_error() -> None:
    model = _Functional().double()
    with pytest.raises(ValueError, match="backend='backpack' cannot compute this model exactly"):
        cl.diag_fisher(model, nn.CrossEntropyLoss(), _data(), kind="exact", backend="backpack")


def test_the_callbacks_modules_come_with_import_curvlab() -> None:
    code = (
        "import sys, curvlab\n"
        "assert callable(curvlab.analysis.hf.diagnostics_callback)\n"
        "assert callable(curvlab.analysis.lightning.diagnostics_callback)\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sampler_kind_errors_name_what_was_passed_and_the_aliases() -> None:
    with pytest.raises(ValueError, match=r"FullFisherNoise: kind must be one of .*got 'fisher'"):
        FullFisherNoise(kind="fisher", scale=1.0)
    with pytest.raises(ValueError, match=r"matrix names \('fisher', 'empirical_fisher'\)"):
        KFACNoise(kind="ggn", scale=1.0)
    assert FullFisherNoise(kind="ggn", scale=1.0).kind == "true"  # aliases still work
