"""curvlab's warnings name the caller's line (review s17).

``torch.compiler.disable`` around ``Diagnostics.step``/``measure`` and every collective entry point
added frames (curvlab's FSDP2 wrapper, torch's ``_dynamo/eval_frame.py``): warnings issued with a
fixed ``stacklevel``, or with a walk that stopped at the first frame outside curvlab, pointed into
``curvlab/_fsdp.py`` or torch's ``eval_frame.py`` instead of the line below that called curvlab.
Each test asserts ``filename == __file__`` for the warning of one entry point.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.analysis import MeasurementFailedWarning
from curvlab.noise import IsotropicNoise, NoisyOptimizer

CANCELS = "tr\\(Sigma\\)|variance = E\\[g\\^2\\] - mean\\^2 cancels"


def _cancelling() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """float32 linear regression on inputs ``1 +- 1e-3`` and targets ``2000 +- 1``: the mean
    gradient dwarfs its spread, so ``tr(Sigma)`` cancels in float32 and every noise-scale path
    warns (the documented trigger, docs/quantities.md)."""
    g = torch.Generator().manual_seed(0)
    x = 1 + 1e-3 * torch.randn(64, 3, generator=g)
    y = 2000 + torch.randn(64, 1, generator=g)
    torch.manual_seed(0)
    return nn.Linear(3, 1), x, y


def _from_here(caught: list[warnings.WarningMessage], category: type[Warning]) -> None:
    mine = [w for w in caught if issubclass(w.category, category)]
    assert mine, [str(w.message) for w in caught]
    assert [w.filename for w in mine] == [__file__] * len(mine), [
        f"{w.filename}:{w.lineno}" for w in mine
    ]


def test_gradient_stats_warns_at_the_callers_line() -> None:
    model, x, y = _cancelling()
    with pytest.warns(RuntimeWarning, match=CANCELS) as caught:
        cl.gradient_stats(model, nn.MSELoss(), (x, y))
    _from_here(caught.list, RuntimeWarning)


@pytest.mark.parametrize("how", ["measure", "step"])
def test_diagnostics_warns_at_the_callers_line(how: str) -> None:
    model, x, y = _cancelling()
    diag = cl.Diagnostics(model, nn.MSELoss(), every=1, quantities=["noise_scale"])
    with pytest.warns(RuntimeWarning, match=CANCELS) as caught:
        getattr(diag, how)(0, x, y)
    _from_here(caught.list, RuntimeWarning)


def test_analyze_warns_at_the_callers_line() -> None:
    model, x, y = _cancelling()
    with pytest.warns(RuntimeWarning, match=CANCELS) as caught:
        cl.analyze(model, nn.MSELoss(), (x, y), quantities=["noise_scale"], nqm=False)
    _from_here(caught.list, RuntimeWarning)


def test_a_failed_measurement_warns_at_the_step_line() -> None:
    """``Diagnostics._failed``: a measurement that fails under ``on_error="warn"``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    diag = cl.Diagnostics(model, nn.CrossEntropyLoss(), every=1, quantities=["grad_norm"])
    x, bad = torch.randn(4, 3), torch.tensor([0, 1, 5, 0])  # class 5 of 2: out of range
    with pytest.warns(MeasurementFailedWarning) as caught:
        diag.step(0, x, bad)
    _from_here(caught.list, MeasurementFailedWarning)


def test_a_log_dir_taken_over_warns_at_the_constructor_line(tmp_path: Path) -> None:
    """``_metrics_log._claim``: a second Diagnostics on a log_dir still open."""
    model = nn.Linear(3, 2)
    first = cl.Diagnostics(model, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="takes it over") as caught:
        second = cl.Diagnostics(model, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path)
    _from_here(caught.list, RuntimeWarning)
    second.close()
    del first


def test_noisy_optimizer_warns_at_the_constructor_line() -> None:
    """``noise/_optim_checks.check_steps_model``: tensors stepped that are not model's."""
    model = nn.Linear(3, 2)
    extra = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    with pytest.warns(UserWarning, match="not parameters of model") as caught:
        NoisyOptimizer(opt, IsotropicNoise(1e-3), model)
    _from_here(caught.list, UserWarning)


def test_an_ambiguous_layout_warns_at_the_callers_line() -> None:
    """The T == C layout warning is issued deep in the loss code; it names the call."""
    from curvlab._losses import AmbiguousLayoutWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(3, 4), nn.Linear(4, 3)).double()
    x, y = torch.randint(0, 3, (2, 3)), torch.randint(0, 3, (2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cl.diag_fisher(model, nn.CrossEntropyLoss(), (x, y))
    layout = [w for w in caught if issubclass(w.category, AmbiguousLayoutWarning)]
    assert layout and all(w.filename == __file__ for w in layout)
