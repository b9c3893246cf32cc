"""Review s19 (F#4): curvlab's results saved with ``torch.save`` load with ``torch.load``'s default
``weights_only=True`` (torch >= 2.6), with their contents and attributes.

Before the fix every result (a ``ParamDict``, ``kfac``'s, ``GradientStats``, ``FisherNorms``,
``TraceResult``, ``EigenResult``, ``DensityResult``, ``FisherTraceResult``, ``Report``) raised
``UnpicklingError: Weights only load failed``.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import pickle
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import curvlab as cl


def _problem() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


RESULTS = {
    "diag_fisher": lambda m, lf, d: cl.diag_fisher(m, lf, d),
    "diag_fisher_mc": lambda m, lf, d: cl.diag_fisher(m, lf, d, kind="mc", seed=3),
    "diag_hessian": lambda m, lf, d: cl.diag_hessian(m, lf, d),
    "kfac": lambda m, lf, d: cl.kfac(m, lf, d, kind="exact"),
    "gradient_stats": lambda m, lf, d: cl.gradient_stats(m, lf, d),
    "fisher_norms": lambda m, lf, d: cl.fisher_norms(m, lf, d),
    "trace": lambda m, lf, d: cl.trace(m, lf, d, num_probes=4),
    "eigenvalues": lambda m, lf, d: cl.eigenvalues(m, lf, d, k=2, return_vectors=True),
    "spectral_density": lambda m, lf, d: cl.spectral_density(m, lf, d, num_steps=10),
    "fisher_trace": lambda m, lf, d: cl.fisher_trace(m, lf, d),
    "report": lambda m, lf, d: cl.analyze(
        m, lf, d, quantities=["loss", "trace_fisher", "top_eigenvalues", "spectral_density"]
    ),
}


def _same(a: Any, b: Any, where: str = "result") -> None:
    """``a`` and ``b`` hold the same values (bitwise; NaN equal to NaN), of the same types."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(
            a.nan_to_num(0.0) if a.is_floating_point() else a,
            b.nan_to_num(0.0) if b.is_floating_point() else b,
        ), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, z) in enumerate(zip(a, b)):
            _same(x, z, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    elif dataclasses.is_dataclass(a) or hasattr(a, "__dict__"):
        _same(vars(a), vars(b), f"{where}.__dict__")
    else:
        assert a == b, where
    if isinstance(a, dict) and hasattr(a, "__dict__"):  # a ParamDict's .backend, .info
        _same(vars(a), vars(b), f"{where}.__dict__")


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_a_saved_result_loads_with_the_default_weights_only(name: str) -> None:
    model, lf, data = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny problem: estimator notes are not the point
        result = RESULTS[name](model, lf, data)
    buf = io.BytesIO()
    torch.save(result, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # torch's default: weights_only=True
    _same(result, loaded)
    if isinstance(result, cl.ParamDict):
        assert loaded.backend == result.backend and loaded.info == result.info


def test_a_param_dict_still_pickles_and_deep_copies_with_its_attributes() -> None:
    model, lf, data = _problem()
    F = cl.diag_fisher(model, lf, data)
    F.note = "mine"  # an attribute of the user's travels too
    for copied in (pickle.loads(pickle.dumps(F)), copy.deepcopy(F)):
        _same(F, copied)
        assert copied.note == "mine"
        assert all(copied[k] is not F[k] for k in F)
