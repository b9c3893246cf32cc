"""Forwards drawing from Python's ``random`` or numpy's global RNG (a LayerDrop) (review s25).

After the s25 change that seeds and puts back numpy's and Python's RNGs per batch:

* the examples-apart check watched torch's RNG only, so such a forward, whose two probe passes
  now drew alike, was taken for a model that mixes the examples and ``diag_fisher`` /
  ``gradient_stats`` were refused;
* ``fisher_trace`` refused a forward drawing from torch's RNG but not from numpy's or Python's,
  and took its labels and its per-example gradients from different LayerDrop decisions (15.05 ±
  0.69 for 10.28);
* with numpy's global bit generator set to a PCG64, every call warned "get_state and legacy can
  only be used with the MT19937 BitGenerator".

The diagonal is checked against dense float64 per-example gradients (``torch.func``) of the
model with the layer kept and with it dropped: one decision per batch, as for a Dropout.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import curvlab as cl

DT = torch.float64


def _draw(source: str) -> float:
    return random.random() if source == "python" else float(np.random.random())


class _LayerDrop(nn.Module):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self.drop: bool | None = None  # forced decision for the brute force
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        drop = (self.training and _draw(self.source) < 0.5) if self.drop is None else self.drop
        if not drop:
            h = torch.tanh(self.b(h))
        return self.c(h)


def _model(source: str) -> _LayerDrop:
    torch.manual_seed(0)
    return _LayerDrop(source).to(DT).train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)


def _empirical_diag(model: _LayerDrop, X: torch.Tensor, y: torch.Tensor, drop: bool) -> dict:
    """``(1/N) sum_n g_n^2``, ``g_n`` the gradient of example n's squared error (MSE, mean)."""
    model.drop = drop
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, t):
        return ((functional_call(model, p, (x[None],)) - t[None]) ** 2).mean()

    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for x, t in zip(X, y):
        g = grad(loss)(params, x, t)
        for k in out:
            out[k] += g[k] ** 2 / X.shape[0]
    model.drop = None
    return out


def _host_states() -> tuple:
    return random.getstate(), np.random.get_state(legacy=False)


def _same_host(a: tuple, b: tuple) -> bool:
    np_a, np_b = a[1], b[1]
    return (
        a[0] == b[0]
        and all(
            np.array_equal(np_a["state"][k], np_b["state"][k])
            if isinstance(np_a["state"][k], np.ndarray)
            else np_a["state"][k] == np_b["state"][k]
            for k in np_a["state"]
        )
        and np_a["has_gauss"] == np_b["has_gauss"]
    )


@pytest.mark.parametrize("source", ["python", "numpy"])
@pytest.mark.parametrize("backend", ["auto", "func"])
def test_layerdrop_diag_fisher_is_one_decisions_exact_diagonal(source: str, backend: str) -> None:
    model = _model(source)
    X, y = _batch()
    random.seed(3)
    np.random.seed(3)
    before = _host_states()
    got = [cl.diag_fisher(model, nn.MSELoss(), (X, y), backend=backend) for _ in range(2)]
    assert _same_host(before, _host_states())
    for k in got[0]:  # one function per batch: the same decision at every call
        assert torch.equal(got[0][k], got[1][k])
    options = [_empirical_diag(model, X, y, drop) for drop in (False, True)]
    errors = [
        max(
            float((got[0][k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-300))
            for k in ref
        )
        for ref in options
    ]
    assert min(errors) < 1e-10, errors


@pytest.mark.parametrize("source", ["python", "numpy"])
def test_layerdrop_fisher_trace_refused(source: str) -> None:
    model = _model(source)
    X, y = _batch()
    before = _host_states()
    with pytest.raises(ValueError, match="fisher_trace: the model's forward draws random numbers"):
        cl.fisher_trace(model, nn.MSELoss(), (X, y), seed=0)
    assert _same_host(before, _host_states())


def test_no_numpy_legacy_warning_with_a_pcg64_global_bit_generator() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 1)).to(DT)
    model.train()
    X, y = _batch()
    old = np.random.mtrand._rand._bit_generator
    np.random.set_bit_generator(np.random.PCG64(123))
    try:
        before = np.random.get_state(legacy=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cl.diag_fisher(model, nn.MSELoss(), (X, y))
            cl.trace(model, nn.MSELoss(), (X, y), method="exact")
            cl.eigenvalues(model, nn.MSELoss(), (X, y), k=1, seed=0)
        after = np.random.get_state(legacy=False)
        assert before["state"] == after["state"]
    finally:
        np.random.set_bit_generator(old)
