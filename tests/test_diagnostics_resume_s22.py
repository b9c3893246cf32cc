"""Diagnostics (review s22): a state resumed into another log folder, a step called twice, and
the loss reassigned mid-run."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab.analysis import Diagnostics, FisherExplosionWarning

DT = torch.float64
EPS = torch.finfo(DT).eps


def _problem(n: int = 6, steps: int = 12) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    data = [
        (torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for _ in range(steps)
    ]
    return model, data


def _brute_loss(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Mean cross-entropy, written out: log-sum-exp of the logits minus the label's logit."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    logits = functional_call(model, params, (X,))
    return float((torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]).mean())


def _steps(folder: Path) -> list[int]:
    return [
        json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()
    ]


def _csv_steps(folder: Path) -> list[str]:
    with open(folder / "metrics.csv", newline="") as f:
        return [row["step"] for row in csv.DictReader(f)]


def _run(folder: Path, steps: range, state: dict | None = None, save_at: int | None = None):
    """Steps ``steps`` of a loop measuring ``loss`` every 2 steps into ``folder`` (csv too);
    ``state`` loaded first; returns the state saved at step ``save_at``."""
    model, data = _problem()
    saved = None
    with Diagnostics(
        model, nn.CrossEntropyLoss(), ["loss"], every=2, log_dir=folder, csv=True
    ) as d:
        if state is not None:
            d.load_state_dict(state)
        for s in steps:
            d.step(s, *data[s])
            if s == save_at:
                saved = d.state_dict()
    return saved


# ------------------------------------------------------------------ 1. another folder's log
def test_a_state_of_another_folder_leaves_this_folders_log_alone(tmp_path: Path) -> None:
    """Run C's state (saved at step 5) resumed with log_dir=B, B holding an earlier finished
    run (steps 0..10): B was cut at C's byte position (lines 4..10 of B moved to
    metrics.dropped.jsonl, rows 6..10 to metrics.dropped.csv) with a warning that they "were
    written after it was saved". Now nothing of B is moved; a warning names both folders; the
    rest of the state (its step) is loaded."""
    b, c = tmp_path / "B", tmp_path / "C"
    _run(b, range(11))
    before = (b / "metrics.jsonl").read_bytes(), (b / "metrics.csv").read_bytes()
    state = _run(c, range(8), save_at=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(b, range(6, 9), state=state)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not (b / "metrics.dropped.jsonl").exists() and not (b / "metrics.dropped.csv").exists()
    assert (b / "metrics.jsonl").read_bytes().startswith(before[0])
    assert (b / "metrics.csv").read_bytes().startswith(before[1])
    assert _steps(b) == [0, 2, 4, 6, 8, 10, 6, 8]  # B's run, then the resumed run's records
    assert _csv_steps(b) == ["0", "2", "4", "6", "8", "10", "6", "8"]
    assert len(messages) == 1 and str(b) in messages[0] and str(c) in messages[0]
    assert "not cut" in messages[0]
    assert _steps(c) == [0, 2, 4, 6]  # C's own log is not touched either


def test_the_same_folder_spelled_another_way_is_cut(tmp_path: Path) -> None:
    """``C/../C``: the same folder, so the lines the run wrote after the state (6) are moved."""
    c = tmp_path / "C"
    state = _run(c, range(8), save_at=5)
    with pytest.warns(RuntimeWarning, match="were written after it was saved"):
        _run(tmp_path / "C" / ".." / "C", range(6, 9), state=state)
    assert _steps(c) == [0, 2, 4, 6, 8]
    assert _csv_steps(c) == ["0", "2", "4", "6", "8"]
    assert [
        json.loads(x)["step"] for x in (c / "metrics.dropped.jsonl").read_text().splitlines()
    ] == [6]


def test_a_run_folder_moved_as_a_whole_is_still_cut(tmp_path: Path) -> None:
    """The log's bytes before the saved position are the saved ones (its fingerprint): the
    run's folder copied elsewhere is the same log, cut at the position."""
    c, moved = tmp_path / "C", tmp_path / "elsewhere" / "C"
    state = _run(c, range(8), save_at=5)
    shutil.copytree(c, moved)
    with pytest.warns(RuntimeWarning, match="were written after it was saved"):
        _run(moved, range(6, 9), state=state)
    assert _steps(moved) == [0, 2, 4, 6, 8]
    assert _csv_steps(moved) == ["0", "2", "4", "6", "8"]
    assert _steps(c) == [0, 2, 4, 6]


def test_a_log_replaced_in_the_same_folder_is_not_cut(tmp_path: Path) -> None:
    """A state of folder C whose log was replaced since (a fresh run into C after its files
    were removed): the position is of the old log; nothing is moved, with a warning."""
    c = tmp_path / "C"
    state = _run(c, range(8), save_at=5)
    for name in ("metrics.jsonl", "metrics.csv"):
        (c / name).unlink()
    _run(c, range(11))  # another run, longer: the position falls inside its lines
    before = (c / "metrics.jsonl").read_bytes()
    with pytest.warns(RuntimeWarning, match="not cut"):
        _run(c, range(6, 9), state=state)
    assert not (c / "metrics.dropped.jsonl").exists()
    assert (c / "metrics.jsonl").read_bytes().startswith(before)
    assert _steps(c) == [0, 2, 4, 6, 8, 10, 6, 8]


def test_a_state_without_its_folder_is_taken_as_this_logs(tmp_path: Path) -> None:
    """A state of curvlab before review s22 names no folder and no fingerprint: its position
    is taken as this log's, as before (and as the training callbacks take theirs)."""
    c = tmp_path / "C"
    state = _run(c, range(8), save_at=5)
    assert state is not None
    for key in ("log_dir", "log_tail"):
        state.pop(key, None)
    with pytest.warns(RuntimeWarning, match="were written after it was saved"):
        _run(c, range(6, 9), state=state)
    assert _steps(c) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("key, value", [("log_dir", 3), ("log_tail", b"x")])
def test_a_malformed_folder_or_fingerprint_is_refused_before_any_change(
    tmp_path: Path, key: str, value: object
) -> None:
    c = tmp_path / "C"
    state = _run(c, range(8), save_at=5)
    assert state is not None
    before = (c / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=key):
        _run(c, range(0), state={**state, key: value})
    assert (c / "metrics.jsonl").read_bytes() == before


def test_a_state_names_its_folder_and_where_its_log_ends(tmp_path: Path) -> None:
    """``"log_dir"``: absolute; ``"log_tail"``: the fingerprint of the bytes before the
    position; both ``None`` without a log, where nothing is cut."""
    state = _run(tmp_path / "C" / ".." / "C", range(8), save_at=5)
    assert state is not None and state["log_dir"] == str(tmp_path / "C" / ".." / "C")
    assert isinstance(state["log_tail"], str)
    model, data = _problem()
    d = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=2)
    d.step(0, *data[0])
    state = d.state_dict()
    assert state["log_dir"] is None and state["log_tail"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # into a folder: nothing to cut, nothing to say
        _run(tmp_path / "B", range(2, 3), state=state)
    assert _steps(tmp_path / "B") == [2]


# ------------------------------------------------------------------ 2. a step called twice
@pytest.mark.parametrize("mode", ["every", "budget_every", "budget"])
def test_a_step_is_measured_at_most_once(mode: str) -> None:
    """A loop that calls ``diag.step`` once per micro-batch (3 per step, gradient
    accumulation): every=1 measured each call (3 records per step, the labels drawn anew each
    time), budget=0.5 with every=1 once; with every=None and budget=0.5 three times again.
    Now once per step in every mode: the first call's batch, later calls at the step are
    no-ops (nothing drawn)."""
    model, data = _problem(steps=4 * 3)
    clock = [0.0]
    kwargs: dict = {"every": 1}
    if mode != "every":
        kwargs = {"every": 1 if mode == "budget_every" else None, "budget": 0.5}
    diag = Diagnostics(
        model, nn.CrossEntropyLoss(), ["loss", "trace_fisher"], clock=lambda: clock[0], **kwargs
    )
    got = []
    for step in range(4):
        for micro in range(3):
            clock[0] += 100.0  # training time between calls; a measurement takes none
            state = diag.generator.get_state()
            record = diag.step(step, *data[3 * step + micro])
            got.append(record is not None)
            if micro > 0:
                assert torch.equal(diag.generator.get_state(), state)  # nothing drawn
    assert got == [True, False, False] * 4
    assert [r["step"] for r in diag.records] == [0, 1, 2, 3]
    for step, record in enumerate(diag.records):
        want = _brute_loss(model, *data[3 * step])  # the step's first micro-batch
        assert abs(record["values"]["loss"] - want) <= 32 * EPS * abs(want)


def test_step_after_measure_at_the_same_step_does_nothing() -> None:
    """``measure`` measures when called (explicitly); a ``step`` call at the step it measured
    is one more call at that step: a no-op."""
    model, data = _problem()
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1)
    assert diag.measure(0, *data[0]) is not None
    assert diag.step(0, *data[1]) is None
    assert diag.step(1, *data[1]) is not None
    assert [r["step"] for r in diag.records] == [0, 1]


def test_steps_counted_by_the_diagnostics_are_each_measured() -> None:
    model, data = _problem()
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1)
    for s in range(3):
        diag.step(None, *data[s])
    assert [r["step"] for r in diag.records] == [0, 1, 2]


# ------------------------------------------------------------------ 3. the loss reassigned
def _trace_fisher_and_stderr(model: nn.Module, X: Tensor, reduction: str) -> tuple[float, float]:
    """Tr(F) of the cross-entropy, dense (``sum_i E_{c ~ p_i} ||grad l_i(c)||^2``, over N under
    ``"mean"``), and the standard deviation of its one-label-per-example Monte-Carlo estimate
    (the variance of ``||grad l_i(c)||^2`` over ``c ~ p_i``, exact over the 3 classes)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, x: Tensor, c: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), c[None])

    mean = var = 0.0
    for x in X:
        probs = torch.softmax(functional_call(model, params, (x[None],))[0], 0)
        sq = torch.stack(
            [
                sum(
                    (g**2).sum() for g in torch.func.grad(loss)(params, x, torch.tensor(c)).values()
                )
                for c in range(3)
            ]
        )
        e = float((probs * sq).sum())
        mean, var = mean + e, var + float((probs * sq**2).sum()) - e**2
    scale = 1.0 / len(X) if reduction == "mean" else 1.0
    return mean * scale, var**0.5 * scale


@pytest.mark.parametrize("how", ["assigned", "mutated"])
def test_the_explosion_check_follows_the_loss_reduction(how: str) -> None:
    """``diag.loss_fn = CrossEntropyLoss(reduction="sum")`` after 3 steps under ``"mean"``:
    the values followed (Tr(F) of the sum, N = 40 times the mean's) but the check kept
    comparing them as the mean's: a FisherExplosionWarning (51.8x) for a Tr(F) per loss term
    that did not change. Now the check reads the loss at each measurement (also a loss module
    changed in place)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 3).to(DT)
    X, y = torch.randn(40, 3, dtype=DT), torch.randint(0, 3, (40,))
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["trace_fisher"], every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FisherExplosionWarning)
        for s in range(3):
            diag.step(s, X, y)
        if how == "assigned":
            diag.loss_fn = nn.CrossEntropyLoss(reduction="sum")
        else:
            diag.loss_fn.reduction = "sum"
        for s in range(3, 5):
            diag.step(s, X, y)
    assert diag.events == []
    values = diag.history("trace_fisher")[1]
    # Monte-Carlo estimates (one label drawn per example): within 5 standard deviations
    for value, reduction in zip(values, ["mean"] * 3 + ["sum"] * 2):
        exact, sd = _trace_fisher_and_stderr(model, X, reduction)
        assert abs(value - exact) <= 5 * sd, (value, exact, sd)


def test_a_loss_assigned_mid_run_is_checked_when_assigned() -> None:
    model, data = _problem()
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1)
    with pytest.raises(ValueError, match="reduction"):
        diag.loss_fn = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(TypeError, match="unsupported loss"):
        diag.loss_fn = nn.L1Loss()
    assert diag.loss_fn.reduction == "mean"  # the refused ones were not taken
    assert diag.step(0, *data[0]) is not None
