"""The entry points agree on what they refuse and on what ``trace_fisher_batch`` means (review
s25, AN): ``analyze`` refuses ``noise_scale_dp`` in one process before the data is read, as
``Diagnostics`` and the command do (1); ``Diagnostics`` refuses a ``top_eigenvalues`` ``k`` above
the model's trainable parameters when it is made, as ``analyze`` does (2); ``trace_fisher_batch``
says which batch ``B`` it is of at each entry point, and its value and expectation are checked
against dense float64 brute force (3)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl
from curvlab._losses import loss_spec
from curvlab.analysis import Diagnostics, MeasurementFailedWarning
from curvlab.analysis._glossary import describe
from curvlab.analysis._page import render_html
from tests.distributed_checks import Checker, run_named_world

DT = torch.float64


def _problem(n: int = 8, c: int = 3, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, c)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    return model, X, y


class _CountedData:
    """Batches whose readings are counted (``analyze`` must refuse before the first)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches
        self.readings = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.readings += 1
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _count_forwards(model: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    model.register_forward_hook(hook)
    return calls


# ------------------------------------------------------------------ 1. noise_scale_dp in analyze
@pytest.mark.parametrize("process_group", [None, "local"])
@pytest.mark.parametrize(
    "quantities",
    [["noise_scale_dp"], ["trace_hessian", "top_eigenvalues", "noise_scale_dp"]],
)
def test_analyze_refuses_noise_scale_dp_in_one_process_before_reading_data(
    quantities: list[str], process_group: str | None
) -> None:
    """It measured every other quantity at every checkpoint, then failed noise_scale_dp at each
    (an AnalysisWarning per checkpoint; alone, an AnalysisError after the data was read)."""
    model, X, y = _problem()
    data = _CountedData([(X[:4], y[:4]), (X[4:], y[4:])])
    calls = _count_forwards(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="noise_scale_dp.*at least 2 processes") as err:
        cl.analyze(
            model,
            nn.CrossEntropyLoss(),
            data,
            checkpoint=[model.state_dict(), model.state_dict()],
            quantities=quantities,
            process_group=process_group,
        )
    text = str(err.value)
    assert "'noise_scale' quantity" in text  # the one-process way out
    assert "cl.gradient_stats" in text
    assert "init_process_group" in text
    assert data.readings == 0 and calls[0] == 0  # before the data is read, no forward pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


SHARDS = (3, 5)  # rank 0: three examples, rank 1: five (uneven)


def _check_noise_scale_dp_under_ranks(c: Checker, rank: int) -> None:
    """Under 2 gloo ranks analyze measures noise_scale_dp (not refused) and gives McCandlish's
    estimate from dense float64 per-rank mean gradients; with process_group="local" it is
    refused before the data is read."""
    model, X, y = _problem(n=sum(SHARDS))
    loss_fn = nn.CrossEntropyLoss()
    lo = sum(SHARDS[:rank])
    shard = (X[lo : lo + SHARDS[rank]], y[lo : lo + SHARDS[rank]])
    report = cl.analyze(model, loss_fn, shard, quantities=["loss", "noise_scale_dp"], nqm=False)
    got = report.entries[0]["values"]
    flat, out = _flat_output(model, X)
    grad = torch.func.grad(lambda v, a, b: loss_fn(out(v)[a:b], y[a:b]))
    g = [grad(flat, sum(SHARDS[:r]), sum(SHARDS[: r + 1])) for r in range(len(SHARDS))]
    n = sum(SHARDS)
    big = sum(b * gr for b, gr in zip(SHARDS, g)) / n
    small_sq = sum(float(gr.pow(2).sum()) for gr in g) / len(g)
    h = sum(1.0 / b for b in SHARDS) / len(SHARDS)
    big_sq = float(big.pow(2).sum())
    tr_sigma = (small_sq - big_sq) / (h - 1.0 / n)
    g_sq = big_sq - tr_sigma / n
    c.close("analyze's trace_covariance_dp", got["trace_covariance_dp"], tr_sigma, 1e-10)
    c.close("analyze's grad_norm_sq_dp", got["grad_norm_sq_dp"], g_sq, 1e-10)
    c.close("analyze's noise_scale_dp", got["noise_scale_dp"], tr_sigma / g_sq, 1e-10)

    class Unread:
        def __iter__(self) -> Any:
            raise AssertionError("data was read")

    try:
        cl.analyze(model, loss_fn, Unread(), quantities=["noise_scale_dp"], process_group="local")
        c.true("process_group='local' refused", False, "it returned")
    except ValueError as exc:
        c.true("process_group='local' refused", "at least 2 processes" in str(exc), str(exc))


CHECKS: dict[str, Callable[[Checker, int], None]] = {
    "noise_scale_dp": _check_noise_scale_dp_under_ranks,
}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_analyze_measures_noise_scale_dp_under_two_ranks(tmp_path: Path) -> None:
    """The refusal is of one process only: under 2 ranks the value is McCandlish's."""
    run_named_world("tests.test_entry_points_s25", "noise_scale_dp", tmp_path, 2, 8, 90)


def test_diagnostics_still_refuses_noise_scale_dp_in_one_process() -> None:
    """The refusal now shared with analyze keeps the Diagnostics' own way out."""
    model, _, _ = _problem()
    with pytest.raises(ValueError, match="noise_scale_dp.*at least 2 processes") as err:
        Diagnostics(model, nn.CrossEntropyLoss(), ["loss", "noise_scale_dp"], every=1)
    assert "in Diagnostics that is the 'noise_scale' quantity" in str(err.value)
    assert "make the Diagnostics after" in str(err.value)


# ------------------------------------------------------------------ 2. Diagnostics' top k
@pytest.mark.parametrize("options", [None, {"k": 10}])
def test_diagnostics_refuses_top_k_above_the_trainable_parameters_when_made(
    options: dict[str, int] | None,
) -> None:
    """Diagnostics was made and failed top_eigenvalues at every measured step (a
    MeasurementFailedWarning each), after the other quantities' work; analyze refuses it."""
    model = nn.Linear(3, 1).to(DT)  # 4 trainable parameters
    calls = _count_forwards(model)
    with pytest.raises(ValueError, match="4 trainable parameters") as err:
        Diagnostics(
            model,
            nn.BCEWithLogitsLoss(),
            ["loss", "top_eigenvalues"],
            every=1,
            options=options,
        )
    text = str(err.value)
    k = 5 if options is None else options["k"]
    assert f"options={{'k': {k}}}" in text or f"k={k} (the default" in text
    assert "options={'k': 4}" in text  # the way out, with the largest k the model takes
    assert ("the default" in text) is (options is None)
    assert calls[0] == 0


def test_diagnostics_top_k_check_counts_trainable_parameters_only() -> None:
    """k is compared with the trainable count (a frozen layer does not count) and a k that fits
    is measured: the top eigenvalue equals the dense float64 Hessian's."""
    model, X, y = _problem()
    model[0].weight.requires_grad_(False)  # 12 frozen; trainable: 4 + 12 + 3 = 19
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="19 trainable parameters"):
        Diagnostics(model, loss_fn, ["top_eigenvalues"], every=1, options={"k": 20})
    diag = Diagnostics(model, loss_fn, ["top_eigenvalues"], every=1, options={"k": 2})
    rec = diag.step(0, X, y)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

    def loss(v: Tensor) -> Tensor:
        parts = torch.split(v, [math.prod(s) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)} | fixed
        return loss_fn(functional_call(model, params, (X,)), y)

    want = torch.linalg.eigvalsh(hessian(loss)(flat)).flip(0)[:2]
    got = torch.tensor(rec["values"]["top_eigenvalues"], dtype=DT)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)


def test_diagnostics_top_k_is_still_checked_at_each_step_after_freezing() -> None:
    """Parameters frozen after the Diagnostics is made: the per-step check stays."""
    model, X, y = _problem()
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss", "top_eigenvalues"], every=1)
    for p in model.parameters():
        p.requires_grad_(False)
    model[2].bias.requires_grad_(True)  # 3 trainable parameters now, k = 5
    with pytest.warns(MeasurementFailedWarning, match="top_eigenvalues"):
        rec = diag.step(0, X, y)
    assert (
        "k must be at most the model's 3 trainable parameters" in rec["errors"]["top_eigenvalues"]
    )


def test_diagnostics_top_k_of_a_lazy_model_is_checked_when_it_is_sized() -> None:
    """A model with lazy parameters is made (its size is unknown; numel raised torch's
    "uninitialized parameter" error) and checked at each measurement once materialized."""
    model = nn.Sequential(nn.LazyLinear(1)).to(DT)
    diag = Diagnostics(model, nn.BCEWithLogitsLoss(), ["loss", "top_eigenvalues"], every=1)
    X = torch.randn(6, 3, dtype=DT)
    y = (X[:, :1] > 0).to(DT)
    model(X)  # materialized: 4 trainable parameters, k = 5
    with pytest.warns(MeasurementFailedWarning, match="top_eigenvalues"):
        rec = diag.step(0, X, y)
    assert (
        "k must be at most the model's 4 trainable parameters" in rec["errors"]["top_eigenvalues"]
    )
    loss = nn.BCEWithLogitsLoss()(model(X), y)
    assert rec["values"]["loss"] == pytest.approx(float(loss), rel=1e-12)


# ------------------------------------------------------------------ 3. trace_fisher_batch's B
def _flat_output(model: nn.Module, X: Tensor) -> tuple[Tensor, Any]:
    """The parameters as one flat vector and the model's output as a function of it."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(v: Tensor) -> Tensor:
        parts = torch.split(v, [math.prod(s) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return functional_call(model, params, (X,))

    return flat, out


def _ggn_trace(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> float:
    """Tr(J^T (d^2 L / d f^2) J) of L = loss_fn(f(X), y), dense float64."""
    flat, out = _flat_output(model, X)
    f = out(flat).detach()
    J = jacrev(out)(flat).reshape(f.numel(), -1)
    H = hessian(lambda z: loss_fn(z.reshape(f.shape), y))(f.reshape(-1))
    return float(torch.trace(J.T @ H @ J))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_analyze_trace_fisher_batch_expectation_is_w_times_the_fisher_trace(
    kind: str, reduction: str
) -> None:
    """The documented expectation with B = all N examples: E ||grad L(y_hat)||^2 = w Tr(F),
    w = 1/M under "mean" (Tr(F)/N for one loss term per example), 1 under "sum" (then Tr(F)
    itself); Tr(F) = Tr(GGN) by dense float64 brute force. Mean over 400 seeds, within 4.5
    standard errors."""
    model, X, y = _problem(n=6, c=2)
    if kind == "ce":
        loss_fn: nn.Module = nn.CrossEntropyLoss(reduction=reduction)
        target = y
        terms = len(y)
    else:
        loss_fn = nn.MSELoss(reduction=reduction)
        target = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
        terms = target.numel()
    w = 1.0 if reduction == "sum" else 1.0 / terms
    want = w * _ggn_trace(model, loss_fn, X, target)
    draws = torch.tensor(
        [
            cl.analyze(
                model,
                loss_fn,
                [(X[:3], target[:3]), (X[3:], target[3:])],
                quantities=["trace_fisher_batch"],
                seed=s,
                nqm=False,
            ).entries[0]["values"]["trace_fisher_batch"]
            for s in range(400)
        ],
        dtype=DT,
    )
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - want) <= 4.5 * se, (float(draws.mean()), want, se)
    assert se < 0.06 * want  # 4.5 se < 0.27 want: it tells B = N from B = 3 (a factor 2)


def _sampled_gradient_sq(model: nn.Module, X: Tensor, y_hat: Tensor, reduction: str) -> float:
    """||grad L(X, y_hat)||^2 of the cross-entropy at the given labels, dense float64."""
    flat, out = _flat_output(model, X)
    lf = nn.CrossEntropyLoss(reduction=reduction)
    g = torch.func.grad(lambda v: lf(out(v), y_hat))(flat)
    return float(g.pow(2).sum())


def _labels_drawn(model: nn.Module, X: Tensor, seed: int) -> Tensor:
    """The labels one generator seeded ``seed`` draws for X's examples in order, by the loss's
    own sampler (the brute force is the gradient at them, not the draw)."""
    with torch.no_grad():
        output = model(X)
    spec = loss_spec(nn.CrossEntropyLoss())
    return spec.sample_targets(output, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_trace_fisher_batch_is_of_all_the_data_in_analyze_and_of_the_step_batch_in_diagnostics(
    reduction: str,
) -> None:
    """analyze's B is every analysed example whatever the loader's batches; Diagnostics' is the
    step's batch; cl.fisher_trace's batch_value is the mean over the data's batches. Each equals
    ||grad L_B(y_hat)||^2 by dense float64 brute force at the labels the generator draws."""
    model, X, y = _problem(n=8)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    y_hat = _labels_drawn(model, X, seed=0)  # in example order: batch by batch the same
    whole = _sampled_gradient_sq(model, X, y_hat, reduction)
    got = cl.analyze(
        model, loss_fn, batches, quantities=["trace_fisher_batch"], seed=0, nqm=False
    ).entries[0]["values"]["trace_fisher_batch"]
    assert abs(got - whole) <= 1e-12 * whole  # B = N = 8, not the loader's 4
    one = cl.analyze(model, loss_fn, (X, y), quantities=["trace_fisher_batch"], seed=0, nqm=False)
    assert one.entries[0]["values"]["trace_fisher_batch"] == got
    # Diagnostics: the step's batch, its first measurement drawing from the same seed
    diag = Diagnostics(model, loss_fn, ["trace_fisher_batch"], every=1, seed=0)
    first = diag.step(0, *batches[0])["values"]["trace_fisher_batch"]
    step_batch = _sampled_gradient_sq(model, X[:4], y_hat[:4], reduction)
    assert abs(first - step_batch) <= 1e-12 * step_batch
    assert abs(first - whole) > 0.01 * whole  # another quantity: B = 4
    # cl.fisher_trace: the mean over the data's batches of each batch's proxy
    res = cl.fisher_trace(model, loss_fn, batches, seed=0)
    per = [
        _sampled_gradient_sq(model, X[:4], y_hat[:4], reduction),
        _sampled_gradient_sq(model, X[4:], y_hat[4:], reduction),
    ]
    assert res.per_batch == pytest.approx(per, rel=1e-12)
    assert res.batch_value == pytest.approx(sum(per) / 2, rel=1e-12)


def test_trace_fisher_batch_definition_names_its_batch_for_each_entry_point() -> None:
    """The glossary (the report page's definition) said "the whole-batch gradient", which a
    DataLoader user reads as the loader's batch: it now says B = all N analysed examples, the
    expectation w Tr(F), and that Diagnostics' and fisher_trace's values are at other B."""
    q = describe("trace_fisher_batch")
    text = " ".join([q.definition, q.scaling, q.estimate])
    assert "B = N" in text and "all the analysed examples" in text
    assert "Tr(F)/N" in text and "w Tr(F)" in text
    assert "Diagnostics" in text and "step's batch" in text
    assert "fisher_trace" in text and "batch_value" in text
    model, X, y = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = cl.analyze(
            model,
            nn.CrossEntropyLoss(),
            [(X[:4], y[:4]), (X[4:], y[4:])],
            quantities=["trace_fisher", "trace_fisher_batch"],
            nqm=False,
        )
    page = render_html(report, [])
    assert "B = N" in page and "8 examples" in page  # the definition and the N it refers to
