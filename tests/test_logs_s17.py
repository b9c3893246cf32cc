"""Review s17: the log files of ``curvlab.Diagnostics`` on resume and with two writers.

* A state saved before the ``Diagnostics`` was first called (``seen_step`` ``None``) cut nothing
  on resume: the crashed run's records and the resumed run's of the same steps were both in
  ``metrics.jsonl`` (``[2, 2, 4]`` for the uninterrupted ``[2, 4]``).
* Two ``Diagnostics`` on one ``log_dir`` put a second CSV header in the middle of
  ``metrics.csv`` (the header was decided by the handle's position); now a folder another open
  ``Diagnostics`` writes is taken over by the new one (the old one writes no more), and the
  header is decided by the file's size on disk.
* ``log_dir=123`` failed in ``os.fspath`` with no mention of ``log_dir``.

The measured loss is checked against the loss computed here with ``torch.func`` in float64.
"""

from __future__ import annotations

import copy
import csv
import gc
import json
import math
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


def test_a_state_saved_before_the_first_call_cuts_the_whole_log(tmp_path: Path) -> None:
    """Saved before step 1, the run measured step 2 and stopped at 3; resumed from the saved
    state it measures 2 and 4 again: the log must hold [2, 4] once each (it held [2, 2, 4]),
    the crashed run's step 2 moved to metrics.dropped.jsonl / .csv."""
    model, loss_fn, X, y = _problem()
    want = _brute_loss(model, X, y)
    diag = Diagnostics(model, loss_fn, ["loss"], every=2, log_dir=tmp_path, csv=True)
    saved = copy.deepcopy(diag.state_dict())
    assert saved["seen_step"] is None
    for s in range(1, 4):
        diag.step(s, X, y)
    diag.close()
    crashed = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in crashed] == [2]

    resumed = Diagnostics(model, loss_fn, ["loss"], every=2, log_dir=tmp_path, csv=True)
    with pytest.warns(RuntimeWarning, match=r"before its first step.*later steps \(2\)"):
        resumed.load_state_dict(saved)
    for s in range(1, 5):
        resumed.step(s, X, y)
    resumed.close()
    got = _jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [2, 4]
    for r in got:  # the model is not trained here: every record is the loss at the same point
        assert math.isclose(r["values"]["loss"], want, rel_tol=_RTOL)
    assert (tmp_path / "metrics.dropped.jsonl").read_text().splitlines() == crashed
    with (tmp_path / "metrics.csv").open(newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["2", "4"]
    with (tmp_path / "metrics.dropped.csv").open(newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["2"]


def test_an_earlier_curvlabs_state_without_seen_step_before_a_measurement(
    tmp_path: Path,
) -> None:
    """A state of an earlier curvlab (no ``seen_step``) whose ``last_step`` is ``None`` was
    saved before its first measurement: every record of the log is later, and is moved."""
    model, loss_fn, X, y = _problem()
    diag = Diagnostics(model, loss_fn, ["loss"], every=2, log_dir=tmp_path)
    diag.step(1, X, y)  # called, not measured
    saved = copy.deepcopy(diag.state_dict())
    del saved["seen_step"], saved["log_position"]  # neither was saved then: cut by step
    assert saved["last_step"] is None
    diag.step(2, X, y)
    diag.close()
    resumed = Diagnostics(model, loss_fn, ["loss"], every=2, log_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match=r"later steps \(2\)"):
        resumed.load_state_dict(saved)
    resumed.step(2, X, y)
    resumed.close()
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [2]


def test_a_second_open_diagnostics_on_one_log_dir_takes_it_over(tmp_path: Path) -> None:
    """Two writers of one folder never write it at once: the second takes it over (a warning
    naming the folder and the fix; it was refused until the second pass of review s17, which
    refused a notebook cell run again), the first one's later step() raises and writes
    nothing. The folder is free again, quietly, after close() and after garbage collection."""
    model, loss_fn, X, y = _problem()
    first = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    first.step(0, X, y)
    other_spelling = tmp_path / "." / ".." / tmp_path.name  # the same folder, resolved
    with pytest.warns(RuntimeWarning, match="takes it over") as caught:
        second = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=other_spelling, csv=True)
    message = str(caught[0].message)
    assert str(tmp_path.resolve()) in message and "its own log_dir" in message
    with pytest.raises(RuntimeError, match="taken over by a newer Diagnostics"):
        first.step(1, X, y)
    second.step(1, X, y)
    second.close()
    first.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # closed: free without a takeover
        third = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
        third.step(2, X, y)
        del third
        gc.collect()
        fourth = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    fourth.step(3, X, y)
    fourth.close()
    with (tmp_path / "metrics.csv").open(newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["0", "1", "2", "3"]
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_the_csv_header_is_decided_by_the_file_on_disk(tmp_path: Path) -> None:
    """Another process (here: a plain write) adds a header and a row to metrics.csv after this
    log opened it empty: the first record must go under that header, not add a second one in
    the middle of the file (its handle's position was still 0)."""
    model, loss_fn, X, y = _problem()
    want = _brute_loss(model, X, y)
    diag = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True)
    with (tmp_path / "metrics.csv").open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss"])
        writer.writeheader()
        writer.writerow({"step": 0, "loss": 1.5})
    diag.step(1, X, y)
    diag.close()
    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["step"] for row in rows] == ["0", "1"]
    assert math.isclose(float(rows[1]["loss"]), want, rel_tol=_RTOL)


@pytest.mark.parametrize("bad", [123, 1.5, b"logs"])
def test_a_log_dir_that_is_no_path_is_a_type_error_naming_it(bad: Any) -> None:
    model, loss_fn, _, _ = _problem()
    with pytest.raises(TypeError, match="log_dir must be a folder path"):
        Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=bad)


def test_a_log_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    model, loss_fn, _, _ = _problem()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NotADirectoryError, match="is not a folder"):
            Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=afile)
    assert afile.read_text() == "x"
