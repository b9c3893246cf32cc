"""Review s18: trace estimates with ``rtol=`` independent of the batching, and memory refusals
made before the data is read.

Found in review:

* With ``rtol=``, Hutchinson tested its stopping rule once after each batch of probes, and the
  batch size comes from ``memory_budget`` (by default from the memory available): 100 probes
  at ``rtol=0.1`` gave 2.156484 with 80 probes in blocks of 10, 2.224143 with 76 one at a time,
  2.181432 with 78 in blocks of 3, although the docs promise an estimate that does not depend on
  the memory of the machine.
* A ``memory_budget`` (or ``batch_size``) too small to run at all was refused by ``cl.trace``
  and ``cl.spectral_density`` only after the operator was built (a forward and a backward
  pass), and by ``trace(method="ggn_cv")`` after the whole exact GGN trace (17 forward, 37
  backward passes); ``cl.eigenvalues`` refuses the same before any forward pass.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import curvlab as cl
import curvlab.estimators._memory as memory_module
from curvlab.estimators import EstimatorMemoryError, hutchinson
from curvlab.estimators._probes import draw_probes
from curvlab.estimators._protocol import TensorOperator

DT = torch.float64
EPS = torch.finfo(DT).eps


# --------------------------------------------------------------------------------------------
# 1. rtol: the same probes, the same stop, whatever the batching
# --------------------------------------------------------------------------------------------


def _first_stop(samples: torch.Tensor, rtol: float, min_probes: int) -> int:
    """The stopping rule by its definition: the first count ``j >= min_probes`` whose first
    ``j`` samples have ``stderr <= rtol * |mean|`` (two-pass, float64)."""
    for j in range(min_probes, samples.numel() + 1):
        x = samples[:j]
        if float(x.std(unbiased=True)) / math.sqrt(j) <= rtol * abs(float(x.mean())):
            return j
    return samples.numel()


def _matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    M = torch.randn(30, 30, generator=g, dtype=DT)
    return M @ M.T / 30


def test_rtol_stop_and_estimate_do_not_depend_on_the_batching() -> None:
    A = _matrix()
    D, num_probes, rtol, min_probes = A.shape[0], 60, 0.06, 10
    Z = draw_probes(D, num_probes, torch.Generator().manual_seed(0), dtype=DT)
    samples = ((A @ Z) * Z).sum(0)  # dense z_j^T A z_j, the probes of seed 0 in order
    j = _first_stop(samples, rtol, min_probes)
    # the case must be one the batches of 3, 4 and 10 would step over (else nothing is tested)
    assert j < num_probes and j % 3 and j % 4 and j % 10, j
    want = float(samples[:j].mean())
    want_se = float(samples[:j].std(unbiased=True)) / math.sqrt(j)
    # the samples' rounding: D products of |z_i A_ik z_k| summed, relative EPS each
    tol = 4 * D * EPS * float(A.abs().sum())
    vec = D * 8
    runs = [("batch_size", b, {"batch_size": b}) for b in (1, 3, 4, 10)]
    runs += [("memory_budget", m, {"memory_budget": m * vec}) for m in (4, 12)]
    for label, size, kw in runs:
        op = TensorOperator(A)
        res = hutchinson(op, num_probes, seed=0, rtol=rtol, min_probes=min_probes, **kw)
        per_batch = size if label == "batch_size" else size // 4
        made = min(num_probes, -(-j // per_batch) * per_batch)
        assert res.num_probes == j, (label, size, res.num_probes)
        assert res.value == pytest.approx(want, abs=tol), (label, size)
        assert res.stderr == pytest.approx(want_se, abs=tol), (label, size)
        assert res.num_matvecs == op.num_matvecs == made, (label, size)


def test_rtol_per_block_traces_use_the_same_probes() -> None:
    """With ``blocks=`` (products assembled, per-block samples): only the first ``j`` samples
    are averaged, whatever the batch."""
    A = _matrix()
    D, num_probes, rtol = A.shape[0], 60, 0.06
    blocks = {"a": slice(0, 11), "b": slice(11, 30)}
    Z = draw_probes(D, num_probes, torch.Generator().manual_seed(0), dtype=DT)
    AZ = A @ Z
    j = _first_stop((AZ * Z).sum(0), rtol, 10)
    tol = 4 * D * EPS * float(A.abs().sum())
    for b in (1, 3, 10):
        res = hutchinson(
            TensorOperator(A), num_probes, seed=0, rtol=rtol, blocks=blocks, batch_size=b
        )
        assert res.num_probes == j
        assert res.by_layer is not None
        for name, s in blocks.items():
            want = float((AZ[s, :j] * Z[s, :j]).sum(0).mean())
            assert res.by_layer[name] == pytest.approx(want, abs=tol), (b, name)


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, X, y


def test_trace_rtol_does_not_depend_on_memory_budget() -> None:
    """``cl.trace`` (products as quadratic forms): the stop of the dense Hessian's samples."""
    model, X, y = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    params = {n: p.detach() for n, p in model.named_parameters()}
    names, sizes = list(params), [p.numel() for p in params.values()]
    H = hessian(lambda p: loss_fn(functional_call(model, p, (X,)), y))(params)
    H = torch.cat(
        [
            torch.cat([H[a][b].reshape(na, nb) for b, nb in zip(names, sizes)], 1)
            for a, na in zip(names, sizes)
        ]
    )
    D, num_probes, rtol = H.shape[0], 100, 0.3
    Z = draw_probes(D, num_probes, torch.Generator().manual_seed(0), dtype=DT)
    samples = ((H @ Z) * Z).sum(0)
    j = _first_stop(samples, rtol, 10)
    assert j < num_probes and j % 3 and j % 10, j
    tol = 4 * D * EPS * float(H.abs().sum())
    vec = D * 8
    for kw in ({}, {"memory_budget": 4 * vec}, {"memory_budget": 12 * vec}, {"batch_size": 1}):
        res = cl.trace(model, loss_fn, (X, y), num_probes=num_probes, rtol=rtol, seed=0, **kw)
        assert res.num_probes == j, (kw, res.num_probes)
        assert res.value == pytest.approx(float(samples[:j].mean()), abs=tol), kw
        assert res.num_matvecs >= j


# --------------------------------------------------------------------------------------------
# 2. refusals that the arguments decide come before the data is read
# --------------------------------------------------------------------------------------------


class _Counted(nn.Module):
    """The MLP, counting its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.X, self.y = _mlp()
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.net(x)


VEC = 31 * 8  # one float64 parameter-vector of the MLP (D = 31)

REFUSED = [
    ("hutchinson", lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, memory_budget=100)),
    (
        "hutchinson, by_layer",
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, by_layer=True, memory_budget=3 * VEC),
    ),
    (
        "hutchinson, batch_size",
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, batch_size=5, memory_budget=8 * VEC),
    ),
    (
        "hutch++",  # k = 10, one probe a batch: max(2k, k + 4) = 20 vectors
        lambda m, d: cl.trace(
            m, nn.CrossEntropyLoss(), d, method="hutch++", num_probes=30, memory_budget=19 * VEC
        ),
    ),
    (
        "hutch++, batch_size",  # k = 10, b = 10: 50 vectors
        lambda m, d: cl.trace(
            m,
            nn.CrossEntropyLoss(),
            d,
            method="hutch++",
            num_probes=30,
            batch_size=10,
            memory_budget=49 * VEC,
        ),
    ),
    (
        "exact",
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, method="exact", memory_budget=3 * VEC),
    ),
    (
        "exact, batch_size",  # 31 unit vectors: 124 vectors
        lambda m, d: cl.trace(
            m, nn.CrossEntropyLoss(), d, method="exact", batch_size=64, memory_budget=123 * VEC
        ),
    ),
    (
        "block",
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, method="block", memory_budget=100),
    ),
    (
        "ggn_cv",
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, method="ggn_cv", memory_budget=100),
    ),
    (
        "spectral_density",
        lambda m, d: cl.spectral_density(
            m, nn.CrossEntropyLoss(), d, num_steps=10, memory_budget=3 * VEC - 1
        ),
    ),
    (
        "spectral_density, reorth",  # num_steps + 2 = 12 vectors
        lambda m, d: cl.spectral_density(
            m, nn.CrossEntropyLoss(), d, num_steps=10, reorth_passes=2, memory_budget=11 * VEC
        ),
    ),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_budget_too_small_is_refused_before_any_forward_pass(case) -> None:
    _, call = case
    model = _Counted()
    with pytest.raises(EstimatorMemoryError, match="more than memory_budget="):
        call(model, (model.X, model.y))
    assert model.forwards == 0


ACCEPTED = [  # the same calls with the budget they need: nothing refused up front
    ("hutchinson", lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, memory_budget=4 * VEC)),
    (
        "hutchinson, batch_size",
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, batch_size=5, memory_budget=20 * VEC),
    ),
    (
        "hutch++",
        lambda m, d: cl.trace(
            m, nn.CrossEntropyLoss(), d, method="hutch++", num_probes=30, memory_budget=20 * VEC
        ),
    ),
    (
        "exact, ggn",  # one-pass diagonal: no probe blocks, the budget unused
        lambda m, d: cl.trace(
            m, nn.CrossEntropyLoss(), d, "ggn", method="exact", memory_budget=100
        ),
    ),
    (
        "ggn_cv",
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, method="ggn_cv", memory_budget=4 * VEC),
    ),
    (
        "spectral_density, reorth",
        lambda m, d: cl.spectral_density(
            m, nn.CrossEntropyLoss(), d, num_steps=10, reorth_passes=2, memory_budget=12 * VEC
        ),
    ),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_a_budget_that_fits_is_not_refused(case) -> None:
    _, call = case
    model = _Counted()
    call(model, (model.X, model.y))
    assert model.forwards > 0


def test_ggn_cv_checks_the_memory_available_before_the_exact_ggn_trace(monkeypatch) -> None:
    """Without a budget, the memory available decides; it is consulted once the operator is
    built (one reading of the data), but before the exact GGN trace's passes."""
    model = _Counted()
    data = (model.X, model.y)
    cl.curvature_operator(model, nn.CrossEntropyLoss(), data, "residual")
    build = model.forwards
    model.forwards = 0
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: 3 * VEC)
    with pytest.raises(EstimatorMemoryError, match=r"trace\(method=.ggn_cv.\)"):
        cl.trace(model, nn.CrossEntropyLoss(), data, method="ggn_cv")
    assert model.forwards == build
