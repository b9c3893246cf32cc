"""Monte-Carlo quantities when ``ignore_index`` is a class index (the pad id 0, say).

A label drawn from the model is always a class: with ``CrossEntropyLoss(ignore_index=0)`` a drawn
``0`` is a real draw of class 0, and only the positions the *data* ignores are left out. So the
objective written with ``ignore_index=0`` (ignored positions hold 0, no real label is 0) and the
same objective written with ``ignore_index=-100`` must give the same numbers with the same seed,
for every Monte-Carlo quantity, to rounding (1e-10). A second test checks that the MC diagonal's
mean over many seeds is unbiased for the exact GGN diagonal of the ``ignore_index=0`` objective
(dense float64 brute force), within a tolerance derived from its standard error.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import curvlab as cl
from tests.bruteforce import Dense
from tests.zoo import BATCHINGS, build

PAD = 0
ENTRIES = ("tiny_gpt", "hf_gpt2", "seq_ce_gpt", "seq_ce_torch", "resblock")
IGNORED_EXAMPLES = (2, 5)  # 1-D targets (one label per example): these examples are ignored


def _variants(entry: str, reduction: str, batching: str) -> tuple[nn.Module, list, list]:
    """The model and one objective written twice: ignored labels as -100, and as the class 0.

    Real labels equal to 0 are moved to 1, so that 0 only marks ignored positions.
    """
    model, _, batches = build(entry, reduction, BATCHINGS[batching])
    y = torch.cat([b[1] for b in batches])
    y = torch.where(y == 0, torch.ones_like(y), y)
    if y.ndim == 1:
        y[list(IGNORED_EXAMPLES)] = -100
    sizes = [int(b[1].shape[0]) for b in batches]
    as_minus = y.split(sizes)
    as_pad = torch.where(y == -100, torch.full_like(y, PAD), y).split(sizes)
    a = [(b[0], t) for b, t in zip(batches, as_minus)]
    b = [(b[0], t) for b, t in zip(batches, as_pad)]
    return model, a, b


def _loss(reduction: str, ignore: int) -> nn.Module:
    return nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore)


def _data(batches: list) -> Any:
    return batches[0] if len(batches) == 1 else batches


def _mc_quantities(model: nn.Module, loss_fn: nn.Module, batches: list) -> dict[str, Tensor]:
    """Every Monte-Carlo quantity of curvlab on the data, seed 0, flattened into tensors."""
    data = _data(batches)
    out: dict[str, Tensor] = {}
    for k, v in cl.diag_fisher(model, loss_fn, data, kind="mc", seed=0).items():
        out[f"diag_fisher[{k}]"] = v
    for k, f in cl.kfac(model, loss_fn, data, kind="mc", seed=0).items():
        out[f"kfac[{k}].A"], out[f"kfac[{k}].G"] = f.A, f.G
    out["fisher_trace"] = torch.tensor(cl.fisher_trace(model, loss_fn, data, seed=0).value)
    tr = cl.trace(model, loss_fn, data, matrix="fisher", method="exact", seed=0)
    out["trace_fisher_exact"] = torch.tensor(tr.value)
    norms = cl.fisher_norms(model, loss_fn, data, kind="mc", seed=0)
    out["fisher_norms"] = torch.tensor([norms.frobenius, norms.diag_frobenius])
    op = cl.curvature_operator(model, loss_fn, data, matrix="fisher", seed=0)
    v = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=op.dtype)
    out["fisher_operator"] = op @ v
    return out


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        scale = max(float(a[k].abs().max()), 1e-30)
        torch.testing.assert_close(
            b[k].double(), a[k].double(), rtol=1e-10, atol=1e-12 * scale, msg=k
        )


@pytest.mark.parametrize("batching", ["one", "three"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_mc_quantities_same_objective_same_numbers(entry: str, reduction: str, batching: str):
    model, minus, pad = _variants(entry, reduction, batching)
    a = _mc_quantities(model, _loss(reduction, -100), minus)
    b = _mc_quantities(model, _loss(reduction, PAD), pad)
    _assert_same(a, b)
    # and the draws matter: at least one real draw of class 0 took place (else a wrong
    # implementation that drops drawn zeros would pass)
    op = cl.curvature_operator(model, _loss(reduction, PAD), _data(pad), matrix="fisher", seed=0)
    drawn = torch.cat([t.reshape(-1) for t in op.sampled_targets])
    assert bool((drawn == 0).any())


def _samples(model: nn.Module, loss_fn: nn.Module, X: Any, y: Tensor) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    samplers = {
        "diag_mc": cl.noise.DiagFisherNoise("mc", scale=0.3),
        "diag_exact": cl.noise.DiagFisherNoise("exact", scale=0.3),
        "diag_emp": cl.noise.DiagFisherNoise("empirical", scale=0.3),
        "trace_mc": cl.noise.FisherTraceNoise("mc", scale=0.3),
        "kfac_mc": cl.noise.KFACNoise("mc", scale=0.3),
        "kfac_emp": cl.noise.KFACNoise("empirical", scale=0.3),
        "full_true": cl.noise.FullFisherNoise("true", scale=0.3),
        "full_emp": cl.noise.FullFisherNoise("empirical", scale=0.3),
    }
    for name, sampler in samplers.items():
        for k, v in sampler.sample(model, loss_fn, X, y, seed=0).items():
            out[f"{name}[{k}]"] = v
    fp = cl.regularizers.fisher_penalty(model, loss_fn, X, alpha=1.0, seed=0, targets=y)
    out["fisher_penalty"] = fp.detach()
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_noise_samplers_same_objective_same_numbers(entry: str, reduction: str):
    model, minus, pad = _variants(entry, reduction, "one")
    (X, ya), (_, yb) = minus[0], pad[0]
    a = _samples(model, _loss(reduction, -100), X, ya)
    b = _samples(model, _loss(reduction, PAD), X, yb)
    _assert_same(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diagnostics_trace_fisher_same_objective(reduction: str):
    model, minus, pad = _variants("tiny_gpt", reduction, "one")
    records = []
    for loss_fn, batches in ((_loss(reduction, -100), minus), (_loss(reduction, PAD), pad)):
        X, y = batches[0]
        with cl.Diagnostics(model, loss_fn, quantities=["trace_fisher"], every=1, seed=0) as d:
            d.step(0, X, y)
        records.append(d.records[0]["values"]["trace_fisher"])
    assert math.isfinite(records[0]) and records[0] > 0
    assert abs(records[0] - records[1]) <= 1e-10 * abs(records[0])


@pytest.mark.parametrize("entry", ["tiny_gpt", "seq_ce_gpt", "resblock"])
def test_mc_diagonal_unbiased_for_ggn_with_class_ignore_index(entry: str):
    """Mean of R independent MC diagonals vs the dense GGN diagonal, per entry within 5 standard
    errors of the mean (estimated from the draws), and in total within 4 standard errors."""
    model, _, pad = _variants(entry, "mean", "three")
    loss_fn = _loss("mean", PAD)

    class Problem:
        pass

    prob = Problem()
    prob.model, prob.loss_fn, prob.batches = model, loss_fn, pad
    exact = torch.cat([v.reshape(-1) for v in Dense(prob).diag("ggn").values()])
    R = 200
    draws = torch.stack(
        [
            torch.cat(
                [
                    v.reshape(-1)
                    for v in cl.diag_fisher(model, loss_fn, pad, kind="mc", seed=r).values()
                ]
            )
            for r in range(R)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(R)
    live = se > 1e-12 * float(exact.abs().max())
    z = (mean - exact)[live] / se[live]
    assert float(z.abs().max()) < 5.5, float(z.abs().max())
    total_se = float(draws.sum(1).std()) / math.sqrt(R)
    assert abs(float(mean.sum() - exact.sum())) < 4 * total_se
    # (the old behaviour, drawn zeros dropped, is off by far more than this)
    assert total_se < 0.05 * float(exact.sum())
