"""Review s17, second pass: the ``log_dir`` registry and the resume cut of ``curvlab.Diagnostics``.

* A constructor that failed after claiming its ``log_dir`` kept the claim while its traceback
  lived (a notebook's last exception): the retry was refused as "already written by another
  open curvlab Diagnostics", a ``Diagnostics`` that never existed.
* A notebook cell ``diag = Diagnostics(..., log_dir=d)`` run again was refused (the old object
  still bound); now the new one takes the folder over, the old one's files are closed and its
  later calls raise, so two writers still never write one file.
* A resume from a state saved before the first call moved an earlier run's records of the same
  folder to ``metrics.dropped.jsonl`` (the cut was by step number); now the log is cut where it
  ended when the state was saved, and the lines written before stay.

The measured losses are checked against the loss computed here with ``torch.func`` in float64.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvlab import Diagnostics

# every value below is one float64 forward pass of a 15-parameter model: rounding ~1e-16
# relative, times the few dozen operations of the loss
_RTOL = 1e-12


def _problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g))
    X = torch.randn(8, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def _brute_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    logits = functional_call(model, params, (X,))
    return float(torch.nn.functional.cross_entropy(logits, y))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _csv_steps(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return [row["step"] for row in csv.DictReader(f)]


def _check_losses(records: list[dict[str, Any]], want: float) -> None:
    for r in records:  # the model is not trained here: every record is the loss at one point
        assert math.isclose(r["values"]["loss"], want, rel_tol=_RTOL)


# ------------------------------------------------------------------ a failed constructor


def test_a_failed_constructor_frees_its_log_dir(tmp_path: Path) -> None:
    """``metrics.csv`` is a folder: the constructor fails after claiming the folder and opening
    ``metrics.jsonl``. With the exception kept (as a notebook keeps the last one), the retry
    after the fix must work quietly (it was refused with a ValueError), and the half-made log's
    ``metrics.jsonl`` handle must be closed."""
    model, loss_fn, X, y = _problem()
    (tmp_path / "metrics.csv").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    (tmp_path / "metrics.csv").rmdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no takeover of a Diagnostics that never existed
        diag = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    halves = [  # the half-made log the kept traceback holds
        frame.f_locals["self"]
        for frame, _ in traceback.walk_tb(info.value.__traceback__)
        if type(frame.f_locals.get("self")).__name__ == "MetricsLog"
    ]
    assert halves and halves[0]._jsonl is not None and halves[0]._jsonl.closed
    diag.step(0, X, y)
    diag.close()
    _check_losses(_jsonl(tmp_path / "metrics.jsonl"), _brute_loss(model, X, y))
    assert _csv_steps(tmp_path / "metrics.csv") == ["0"]
    del info


# ------------------------------------------------------------------ takeover


def test_a_cell_run_again_takes_the_log_dir_over(tmp_path: Path) -> None:
    """``diag = Diagnostics(..., log_dir=d)`` run twice: the second takes the folder over with
    a warning naming it; the first one's later calls raise (it never writes the files again),
    and its close() does not free the folder the second one writes."""
    model, loss_fn, X, y = _problem()
    want = _brute_loss(model, X, y)
    cell = {"diag": Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)}
    first = cell["diag"]
    first.step(0, X, y)
    with pytest.warns(RuntimeWarning, match="takes it over") as caught:
        cell["diag"] = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    assert str(tmp_path.resolve()) in str(caught[0].message)
    second = cell["diag"]
    taken = r"taken over by a newer Diagnostics.*its own log_dir"
    with pytest.raises(RuntimeError, match=taken):
        first.step(1, X, y)
    with pytest.raises(RuntimeError, match=taken):
        first.measure(1, X, y)
    with pytest.raises(RuntimeError, match=taken):  # a resume would rewrite the other's files
        first.load_state_dict(first.state_dict())
    second.step(1, X, y)
    first.close()  # leaves the second one's folder alone
    second.step(2, X, y)
    with pytest.warns(RuntimeWarning, match="takes it over"):  # the second still held it
        third = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    third.step(3, X, y)
    second.close()
    third.close()
    got = _jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1, 2, 3]  # one writer at a time, nothing lost
    _check_losses(got, want)
    assert _csv_steps(tmp_path / "metrics.csv") == ["0", "1", "2", "3"]  # one header
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all closed: the folder is free, quietly
        Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path).close()


# ------------------------------------------------------------------ the resume cut


def test_a_resume_keeps_an_earlier_runs_records(tmp_path: Path) -> None:
    """Run A logs steps 0..3 and ends; run B appends to the same folder, saves its state before
    its first call, logs 0 and 1 and stops. Resumed from B's state, only B's two lines were
    written after it: A's [0, 1, 2, 3] stay (they were moved to metrics.dropped.jsonl)."""
    model, loss_fn, X, y = _problem()
    want = _brute_loss(model, X, y)
    with Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True) as a:
        for s in range(4):
            a.step(s, X, y)
    run_a = (tmp_path / "metrics.jsonl").read_text().splitlines()
    b = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    saved = copy.deepcopy(b.state_dict())
    for s in range(2):
        b.step(s, X, y)
    b.close()
    run_b = (tmp_path / "metrics.jsonl").read_text().splitlines()[len(run_a) :]
    assert [json.loads(line)["step"] for line in run_b] == [0, 1]

    resumed = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    with pytest.warns(RuntimeWarning, match=r"2 line\(s\).*\(0, 1\) were written after it was"):
        resumed.load_state_dict(saved)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == run_a
    assert (tmp_path / "metrics.dropped.jsonl").read_text().splitlines() == run_b
    assert _csv_steps(tmp_path / "metrics.csv") == ["0", "1", "2", "3"]
    assert _csv_steps(tmp_path / "metrics.dropped.csv") == ["0", "1"]
    for s in range(2):
        resumed.step(s, X, y)
    resumed.close()
    got = _jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1, 2, 3, 0, 1]
    _check_losses(got, want)


def test_a_resume_mid_run_keeps_an_earlier_runs_later_steps(tmp_path: Path) -> None:
    """Run A logged steps 0..5; run B, in the same folder, logs 0 and 1, saves its state (at
    step 1, as the HF callback saves the checkpoint's step), logs 2 and 3 and stops. Resumed,
    B's 2 and 3 are moved, and A's 2..5 stay (a cut after step 1 moved them too)."""
    model, loss_fn, X, y = _problem()
    want = _brute_loss(model, X, y)
    with Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True) as a:
        for s in range(6):
            a.step(s, X, y)
    b = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    for s in range(2):
        b.step(s, X, y)
    saved = copy.deepcopy({**b.state_dict(), "seen_step": 1})  # hf.py's on_save
    for s in range(2, 4):
        b.step(s, X, y)
    b.close()
    resumed = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    with pytest.warns(RuntimeWarning, match=r"saved at step 1, 2 line\(s\).*\(2, 3\)"):
        resumed.load_state_dict(saved)
    for s in range(2, 4):
        resumed.step(s, X, y)
    resumed.close()
    got = _jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    _check_losses(got, want)
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.dropped.jsonl")] == [2, 3]
    assert _csv_steps(tmp_path / "metrics.csv") == [str(s) for s in [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert _csv_steps(tmp_path / "metrics.dropped.csv") == ["2", "3"]


def test_the_saved_position_survives_a_csv_rewrite_and_torch_save(tmp_path: Path) -> None:
    """The CSV position is a row count: a record with a new column rewrites metrics.csv (its
    bytes change) after the save, and the cut still keeps exactly the rows written before. The
    state goes through torch.save / torch.load(weights_only=True)."""
    model, loss_fn, X, y = _problem()
    diag = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    diag.step(0, X, y)
    torch.save(diag.state_dict(), tmp_path / "state.pt")
    diag.close()
    wider = Diagnostics(model, loss_fn, ["loss", "grad_norm"], every=1, log_dir=tmp_path, csv=True)
    wider.step(1, X, y)  # a new column: metrics.csv rewritten with the union of the columns
    wider.close()
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    with pytest.warns(RuntimeWarning, match=r"1 line\(s\).*\(1\)"):
        resumed.load_state_dict(saved)
    resumed.close()
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [0]
    assert _csv_steps(tmp_path / "metrics.csv") == ["0"]
    assert _csv_steps(tmp_path / "metrics.dropped.csv") == ["1"]


def test_a_state_saved_without_a_log_cuts_nothing(tmp_path: Path) -> None:
    """A state of a Diagnostics without log_dir wrote no line after it was saved: loading it
    into one with a log moves nothing (the step cut moved every line with a later step)."""
    model, loss_fn, X, y = _problem()
    with Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path) as a:
        for s in range(3):
            a.step(s, X, y)
    saved = Diagnostics(model, loss_fn, ["loss"], every=1).state_dict()
    assert saved["log_position"] is None
    resumed = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(saved)
    resumed.close()
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    assert not (tmp_path / "metrics.dropped.jsonl").exists()


@pytest.mark.parametrize("bad", [-1, "12", {"jsonl": 3}, {"jsonl": 3, "csv": -2}])
def test_a_bad_log_position_is_refused_before_anything_changes(tmp_path: Path, bad: Any) -> None:
    model, loss_fn, X, y = _problem()
    diag = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path)
    diag.step(0, X, y)
    state = {**diag.state_dict(), "log_position": bad}
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="'log_position'"):
        diag.load_state_dict(state)
    diag.close()
    assert (tmp_path / "metrics.jsonl").read_text() == before
