"""Diagnostics (review s18): measure() after close(), batches of the wrong type, noise_scale_dp in
one process, trace_fisher_batch on a frozen model, and an in-process rollback's records."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import curvlab as cl
from curvlab.analysis import AnalysisError, Diagnostics, MeasurementFailedWarning

DT = torch.float64
EPS = torch.finfo(DT).eps


def _problem(n: int = 6) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, X, y


def _count_forwards(model: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    model.register_forward_hook(hook)
    return calls


def _brute_loss(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Mean cross-entropy, written out: log-sum-exp of the logits minus the label's logit."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    logits = functional_call(model, params, (X,))
    return float((torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]).mean())


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ 1. measure() after close()
@pytest.mark.parametrize("with_log", [True, False])
def test_measure_after_close_is_refused_before_any_work(tmp_path: Path, with_log: bool) -> None:
    """It measured the whole batch, put the record in ``records`` and then failed writing the
    closed log with a raw ``ValueError: I/O operation on closed file`` (with no log_dir it
    measured on silently); step() refuses a closed Diagnostics before any work."""
    model, X, y = _problem()
    log_dir = tmp_path if with_log else None
    with Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1, log_dir=log_dir) as diag:
        diag.step(0, X, y)
    calls = _count_forwards(model)
    with pytest.raises(RuntimeError, match="Diagnostics is closed"):
        diag.measure(1, X, y)
    assert calls[0] == 0  # nothing was computed
    assert [r["step"] for r in diag.records] == [0]
    if with_log:
        assert [r["step"] for r in _log(tmp_path)] == [0]


# ------------------------------------------------------------------ 2. the batch's types
BAD = {
    "inputs list": (lambda X, y: ([X], y), "inputs must be one Tensor or a dict of tensors"),
    "targets numpy": (lambda X, y: (X, y.numpy()), "numpy.ndarray arrays"),
    "targets list": (lambda X, y: (X, y.tolist()), "not a Tensor; convert them"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("max_examples", [None, 4])
def test_a_batch_of_the_wrong_type_is_named(case: str, max_examples: int | None) -> None:
    """A list of inputs or non-Tensor targets raised a raw ``AttributeError`` ('list' object has
    no attribute 'items', 'numpy.ndarray' object has no attribute 'detach') where
    ``gradient_stats`` says what to pass; it is now the same ``TypeError``, before any forward,
    and with ``on_error="warn"`` the measurement fails with it (a warning, an event)."""
    model, X, y = _problem()
    make, message = BAD[case]
    inputs, targets = make(X, y)
    calls = _count_forwards(model)
    diag = Diagnostics(
        model, nn.CrossEntropyLoss(), ["loss"], every=1, on_error="raise", max_examples=max_examples
    )
    with pytest.raises(TypeError, match=message):
        diag.step(0, inputs, targets)
    assert calls[0] == 0 and diag.records == []
    warn = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1, max_examples=max_examples)
    with pytest.warns(MeasurementFailedWarning, match=message):
        assert warn.step(0, inputs, targets) is None
    assert [e["event"] for e in warn.events] == ["measurement_failed"]
    assert "AttributeError" not in warn.events[0]["error"]
    assert calls[0] == 0


@pytest.mark.parametrize("max_examples", [None, 4])
def test_a_good_batch_is_measured_as_before(max_examples: int | None) -> None:
    """The check passes Tensors through: the loss is that of the (first ``max_examples``)
    examples, against the cross-entropy written out. Both are float64 sums of 6 terms of size
    O(1) divided by n: they agree to within a few ulps (16 eps of slack)."""
    model, X, y = _problem()
    diag = Diagnostics(
        model, nn.CrossEntropyLoss(), ["loss"], every=1, on_error="raise", max_examples=max_examples
    )
    got = diag.step(0, X, y)["values"]["loss"]
    n = len(y) if max_examples is None else max_examples
    want = _brute_loss(model, X[:n], y[:n])
    assert abs(got - want) <= 16 * EPS * abs(want)


# ------------------------------------------------------------------ 3. noise_scale_dp, one process
@pytest.mark.parametrize("process_group", [None, "local"])
def test_noise_scale_dp_without_ranks_is_refused_when_made(process_group: str | None) -> None:
    """It was accepted, then failed at every measured step after the other quantities' work
    (the curvlab command refuses it up front)."""
    model, X, y = _problem()
    calls = _count_forwards(model)
    with pytest.raises(ValueError, match="noise_scale_dp.*at least 2 processes") as err:
        Diagnostics(
            model,
            nn.CrossEntropyLoss(),
            ["loss", "noise_scale_dp"],
            every=1,
            process_group=process_group,
        )
    assert "'noise_scale' quantity" in str(err.value)  # the one-process way out
    assert "init_process_group" in str(err.value)
    assert calls[0] == 0


# ------------------------------------------------------------------ 4. trace_fisher_batch, frozen
def test_trace_fisher_batch_on_a_frozen_model_says_so_before_any_forward() -> None:
    """torch's "`inputs` argument to `grad()` cannot be empty" came after the forward passes;
    every other quantity says the model has no trainable parameters."""
    model, X, y = _problem()
    for p in model.parameters():
        p.requires_grad_(False)
    calls = _count_forwards(model)
    diag = Diagnostics(
        model, nn.CrossEntropyLoss(), ["trace_fisher_batch"], every=1, on_error="raise"
    )
    with pytest.raises(ValueError, match="no trainable parameters"):
        diag.step(0, X, y)
    assert calls[0] == 0
    with pytest.raises(AnalysisError, match="no trainable parameters"):
        cl.analyze(model, nn.CrossEntropyLoss(), (X, y), quantities=["trace_fisher_batch"])


def test_trace_fisher_batch_of_a_partly_frozen_model_is_that_of_its_trainable_part() -> None:
    """The check refuses only a model with nothing trainable: with the first layer frozen,
    Tr(F^B) = ||grad_theta L(x, y_hat)||^2 over the last layer's parameters for one sampled
    labelling y_hat of the 3 examples: one of the 27 labellings' values, each written out with
    torch.func. Both sides are float64 sums of the same O(1) terms: 1e3 eps of slack, far below
    the gaps between the labellings' values (checked)."""
    model, X, y = _problem(3)
    for p in model[0].parameters():
        p.requires_grad_(False)
    diag = Diagnostics(
        model, nn.CrossEntropyLoss(), ["trace_fisher_batch"], every=1, on_error="raise", seed=3
    )
    got = diag.step(0, X, y)["values"]["trace_fisher_batch"]
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def value(labels: Tensor) -> float:
        def loss(params: dict[str, Tensor]) -> Tensor:
            logits = functional_call(model, {**frozen, **params}, (X,))
            return (torch.logsumexp(logits, 1) - logits[torch.arange(3), labels]).mean()

        grads = torch.func.grad(loss)(trainable)
        return float(sum(g.pow(2).sum() for g in grads.values()))

    labellings = torch.cartesian_prod(*[torch.arange(3)] * 3)
    values = sorted(value(labels) for labels in labellings)
    tol = 1e3 * EPS * max(values)
    assert min(b - a for a, b in zip(values, values[1:])) > 2 * tol  # the labellings differ
    assert min(abs(got - v) for v in values) <= tol, (got, values)


# ------------------------------------------------------------------ 5. in-process rollback
def _rollback(tmp_path: Path, drop: tuple[str, ...] = ()) -> tuple[Diagnostics, list[dict]]:
    """Steps 0-6 (every 2; step 4's targets out of range: a measurement_failed event), the
    state saved at step 2 and loaded into the same Diagnostics, steps 3-6 again (good data)."""
    model, X, y = _problem()
    bad = torch.full_like(y, 7)  # class 7 of 3
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=2, log_dir=tmp_path)
    state = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementFailedWarning)
        for s in range(7):
            diag.step(s, X, bad if s == 4 else y)
            if s == 2:
                state = diag.state_dict()
    assert [e["step"] for e in diag.events] == [4]
    assert state is not None
    for key in drop:
        state.pop(key, None)  # (an earlier curvlab saved neither)
    with pytest.warns(RuntimeWarning, match="metrics.dropped"):
        diag.load_state_dict(state)
    for s in range(3, 7):
        diag.step(s, X, y)
    diag.close()
    return diag, _log(tmp_path)


def test_a_rollback_in_process_cuts_records_and_events_as_the_log(tmp_path: Path) -> None:
    """The log held steps [0, 2, 4, 6] but records and history [0, 2, 4, 6, 4, 6] (and the
    step-4 failure of the abandoned branch stayed in events); the class promises records "as
    written to the JSONL file"."""
    diag, log = _rollback(tmp_path)
    records = [line for line in log if "event" not in line]
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert [r["step"] for r in diag.records] == [0, 2, 4, 6]
    assert [r["values"] for r in diag.records] == [r["values"] for r in records]
    assert diag.history("loss")[0] == [0, 2, 4, 6]
    assert diag.events == [] and [line for line in log if "event" in line] == []
    model, X, y = _problem()
    want = _brute_loss(model, X, y)  # the model is not trained: the same loss at every step
    for value in diag.history("loss")[1]:
        assert abs(value - want) <= 16 * EPS * abs(want)


def test_an_earlier_curvlabs_state_cuts_records_and_events_by_step(tmp_path: Path) -> None:
    """A state without the counts (nor a log position) cuts by its step, as its log is cut."""
    diag, log = _rollback(tmp_path, drop=("num_records", "num_events", "log_position"))
    assert [r["step"] for r in diag.records] == [0, 2, 4, 6]
    assert [line["step"] for line in log] == [0, 2, 4, 6]
    assert diag.events == []


def test_a_fresh_diagnostics_loads_the_counts_of_a_longer_run(tmp_path: Path) -> None:
    """A resumed process's Diagnostics has no records: counts above its own cut nothing."""
    model, X, y = _problem()
    first = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1)
    for s in range(3):
        first.step(s, X, y)
    state = first.state_dict()
    assert (state["num_records"], state["num_events"]) == (3, 0)
    resumed = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1)
    resumed.load_state_dict(state)
    resumed.step(3, X, y)
    assert [r["step"] for r in resumed.records] == [3]


def test_a_resumed_diagnostics_rolled_back_to_its_checkpoint_keeps_none_since(
    tmp_path: Path,
) -> None:
    """Review of s18's fix: the counts are of the saving process's lists. A resumed Diagnostics
    that measured steps 5-7 and rolled back to the checkpoint it resumed from (saved at step 4,
    5 records) kept [5, 6, 7] and, re-measuring, held [5, 6, 7, 5, 6, 7]."""
    model, X, y = _problem()
    first = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1, log_dir=tmp_path / "a")
    for s in range(5):
        first.step(s, X, y)
    state = first.state_dict()
    first.close()
    resumed = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1, log_dir=tmp_path / "b")
    resumed.load_state_dict(state)
    for s in range(5, 8):
        resumed.step(s, X, y)
    resumed.load_state_dict(state)  # a spike: back to the checkpoint it resumed from
    assert resumed.records == []
    for s in range(5, 8):
        resumed.step(s, X, y)
    assert [r["step"] for r in resumed.records] == [5, 6, 7]
    assert resumed.history("loss")[0] == [5, 6, 7]
    own = resumed.state_dict()  # its own state: cut by its own count
    resumed.step(8, X, y)
    resumed.load_state_dict(own)
    assert [r["step"] for r in resumed.records] == [5, 6, 7]


@pytest.mark.parametrize("bad", [-1, 2.5, "3", True])
def test_a_bad_count_is_refused_before_anything_changes(bad: object) -> None:
    model, X, y = _problem()
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1)
    for s in range(3):
        diag.step(s, X, y)
    state = {**diag.state_dict(), "num_records": bad}
    state["calls"] = 0
    with pytest.raises(ValueError, match="'num_records'"):
        diag.load_state_dict(state)
    assert len(diag.records) == 3 and diag._calls == 3


def test_numpy_counts_load() -> None:
    """Counts come back as numpy integers from some checkpoint formats: accepted."""
    model, X, y = _problem()
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1)
    diag.step(0, X, y)
    state = diag.state_dict()
    diag.step(1, X, y)
    diag.load_state_dict({**state, "num_records": np.int64(1)})
    assert [r["step"] for r in diag.records] == [0]
