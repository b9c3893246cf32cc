"""Complex parameters, after the refusal of review s27 (RX2 on commit 91d3155):

* ``data_parallel_noise_scale`` and ``noise_scale_from_gradients`` squared a complex gradient as
  ``t.double() ** 2`` (its imaginary part cast away: -94.51 for -52.95): refused on every rank
  before any collective (2 gloo ranks, one thread each), naming the parameter.
* ``kfac(params=...)`` leaves a complex parameter of a layer K-FAC does not cover out, as with
  ``params=None`` (it was refused); the covered layer's factors equal the split model's.
* ``Diagnostics`` names a complex parameter unfrozen after its construction at the measurement
  (every quantity failed with torch's dtype errors), with freezing as the way out, not ``params=``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import curvlab as cl
from tests.distributed_checks import Checker, run_named_world
from tests.test_complex_params_s27 import LF, _setup

WORLD = 2


def check_data_parallel_refusals(c: Checker, rank: int) -> None:
    model, _, (X, y) = _setup()
    shard = (X[3 * rank : 3 * rank + 3], y[3 * rank : 3 * rank + 3])
    for what, fn in [
        (
            "data_parallel_noise_scale",
            lambda: cl.analysis.data_parallel_noise_scale(model, LF, shard),
        ),
        (
            "noise_scale_from_gradients",
            lambda: cl.analysis.noise_scale_from_gradients(
                {n: torch.ones_like(p) for n, p in model.named_parameters()}, 3
            ),
        ),
    ]:
        try:
            fn()
            c.true(f"{what} refuses a complex parameter", False, "returned")
        except TypeError as e:
            c.true(f"{what} names the parameter", "'2.w'" in str(e) and "complex" in str(e), str(e))
    # and the ranks are still in step: a collective after the refusals completes
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    c.close("all-reduce after the refusals", t, torch.full((1,), float(WORLD)))


CHECKS: dict[str, Callable[[Checker, int], None]] = {"refusals": check_data_parallel_refusals}


def test_data_parallel_noise_scale_refuses_on_every_rank(tmp_path: Path) -> None:
    run_named_world("tests.test_complex_params2_s27", "refusals", tmp_path, WORLD, 60.0, 240.0)


def test_kfac_params_leaves_an_uncovered_complex_layer_out() -> None:
    model, split, (X, y) = _setup()
    a = cl.kfac(model, LF, (X, y), kind="exact", params=lambda n, p: True)
    b = cl.kfac(split, LF, (X, y), kind="exact")
    assert list(a) == ["0"]
    torch.testing.assert_close(a["0"].A, b["0"].A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a["0"].G, b["0"].G, rtol=1e-12, atol=1e-14)
    assert float(a["0"].A.abs().max()) > 1e-3


def test_diagnostics_names_a_complex_parameter_unfrozen_later(tmp_path: Path) -> None:
    model, _, (X, y) = _setup()
    model[2].w.requires_grad_(False)
    diag = cl.Diagnostics(
        model, LF, quantities=["grad_norm", "noise_scale"], every=1, on_error="raise"
    )
    first = diag.step(0, X, y)
    assert first is not None and "grad_norm" in first["values"]
    # the loss' gradient over the real layer alone (the frozen one is measured around)
    loss = LF(model(X), y)
    grads = torch.autograd.grad(loss, [model[0].weight, model[0].bias])
    want = float(sum((g**2).sum() for g in grads) ** 0.5)
    assert float(first["values"]["grad_norm"]) == pytest.approx(want, rel=1e-10)
    model[2].w.requires_grad_(True)
    with pytest.raises(TypeError, match=r"'2\.w' is complex.*freeze it") as err:
        diag.step(1, X, y)
    assert "params=" not in str(err.value)
    model[2].w.requires_grad_(False)
    warn = cl.Diagnostics(model, LF, quantities=["grad_norm"], every=1)  # on_error="warn"
    model[2].w.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"'2\.w' is complex"):
        warn.step(0, X, y)
    assert not warn.records
