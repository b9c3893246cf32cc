"""Review s22 (R3) of this sweep's own changes: each test failed before its fix.

* ``diag.step()`` with no step number after a baseline ``diag.measure(0, ...)`` never measured
  again (every call computed step 0, "called at this step already"): ``[None] * 5``.
* A call that raised at step ``s`` made the retry at ``s`` a silent no-op: ``diag.step(s)``
  without the batch on a measured step, and a measurement that raised under
  ``on_error="raise"``, recorded the step before failing.
* ``curvlab demo --overwrite`` with ``out/diagnostics`` a symbolic link onto another file system
  failed after all the training with a raw ``EXDEV`` error naming a hidden staging path; a user's
  own log in a linked ``diagnostics/`` was replaced (and lost) without the refusal a plain folder
  gets.
* The HF callback compared the log folder's name alone: a run folder moved as a whole and
  resumed from a checkpoint logged a step twice (``[2, 4, 4, 6, 8]`` for ``[2, 4, 6, 8]``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import curvlab.analysis._report as report_module
import curvlab.demo._train as train
from curvlab.analysis import Diagnostics
from curvlab.analysis._report import Report

DT = torch.float64
EPS = torch.finfo(DT).eps


def _problem(steps: int = 6) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    data = [
        (torch.randn(5, 3, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g))
        for _ in range(steps)
    ]
    return model, data


def _brute_loss(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Mean cross-entropy, written out: log-sum-exp of the logits minus the label's logit."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    logits = functional_call(model, params, (X,))
    return float((torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]).mean())


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= 32 * EPS * abs(want)  # a few roundings of a 5-term mean


# ------------------------------------------------- 1. step() counted after a measure(0)
def test_counted_steps_after_a_baseline_measurement_are_each_measured() -> None:
    """A baseline ``measure(0)`` before training, then ``step()`` once per optimizer step: each
    call is a step of its own (0, 1, 2, ...), measured on its batch. It returned ``None`` at
    every call (the count stuck at 0, the step "measured already")."""
    model, data = _problem()
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1)
    assert diag.measure(0, *data[0]) is not None
    got = [diag.step(None, *data[s + 1]) for s in range(5)]
    assert [None if r is None else r["step"] for r in got] == [0, 1, 2, 3, 4]
    for s, record in enumerate(got):
        assert record is not None and _close(
            record["values"]["loss"], _brute_loss(model, *data[s + 1])
        )
    assert [r["step"] for r in diag.records] == [0, 0, 1, 2, 3, 4]


def test_explicit_steps_keep_the_at_most_once_rule() -> None:
    model, data = _problem()
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1)
    assert diag.measure(0, *data[0]) is not None
    assert diag.step(0, *data[1]) is None  # the step measured already
    assert diag.step(1, *data[1]) is not None


# ------------------------------------------------- 2. a retry after a call that raised
@pytest.mark.parametrize("counted", [False, True])
def test_a_step_without_its_batch_is_measured_by_the_retry(counted: bool) -> None:
    model, data = _problem()
    diag = Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=2)
    step = None if counted else 0
    with pytest.raises(ValueError, match="needs the batch on measured steps"):
        diag.step(step)
    record = diag.step(step, *data[0])  # it returned None: the step "measured already"
    assert record is not None and record["step"] == 0
    assert _close(record["values"]["loss"], _brute_loss(model, *data[0]))
    assert diag.step(step if step is None else 1, *data[1]) is None  # the count moved on once


@pytest.mark.parametrize("schedule", [{"every": 1}, {"every": 2, "budget": 0.5}])
def test_a_measurement_that_raised_is_measured_by_the_retry(schedule: dict[str, Any]) -> None:
    """``on_error="raise"``: a float32 batch for a float64 model raises; the retry at the step
    with the right batch measures (with ``budget``, the spacing from the last measured step is
    not taken from the one that raised)."""
    model, data = _problem()
    clock = [0.0]  # training time passes between calls; a measurement takes none
    diag = Diagnostics(
        model, nn.CrossEntropyLoss(), ["loss"], on_error="raise", clock=lambda: clock[0], **schedule
    )
    X, y = data[0]
    for call in (diag.step, diag.measure):
        clock[0] += 100.0
        with pytest.raises(Exception, match="float32"):
            call(0, X.float(), y)
        assert diag.records == []
    clock[0] += 100.0
    record = diag.step(0, X, y)
    assert record is not None and _close(record["values"]["loss"], _brute_loss(model, X, y))
    assert diag.step(0, X, y) is None  # measured now: at most once


# ------------------------------------------------- 3. demo --overwrite through a linked folder
@pytest.fixture
def fast_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo with tiny data and no training: each run writes one log line into the log
    folder it is given and returns a linear model; the analysis is a stub."""
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 40, generator=g), torch.randint(0, 10, (8,), generator=g))
    monkeypatch.setattr(train, "load_mnist1d", lambda *a, **k: (data, data))

    def run(name: str, cfg: Any, data: Any, log_dir: Path, show: bool) -> Any:
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "metrics.jsonl", "a") as f:  # as Diagnostics appends
            f.write(json.dumps({"new": name}) + "\n")
        return nn.Linear(40, 10), {"series": {"loss": {"step": [0, 1], "value": [2.0, 1.0]}}}

    def analyze(*args: Any, labels: list[str], **kwargs: Any) -> Report:
        entries = [{"label": label, "values": {"loss": 1.0}} for label in labels]
        return Report(entries=[{**e, "per_layer": {}, "arrays": {}, "errors": {}} for e in entries])

    monkeypatch.setattr(train, "_train_run", run)
    monkeypatch.setattr(train, "analyze", analyze)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _linked_demo(tmp_path: Path, target: Path) -> Path:
    """An earlier demo's ``out`` whose ``diagnostics/`` is a link to ``target``."""
    out = tmp_path / "demo"
    out.mkdir()
    target.mkdir()
    (target / ".curvlab-demo").write_text("marker")
    (target / "SB").mkdir()
    (target / "SB" / "metrics.jsonl").write_text('{"earlier": "SB"}\n')
    (out / "diagnostics").symlink_to(target, target_is_directory=True)
    (out / "report.json").write_text(json.dumps({"meta": {"demo_config": "{}"}, "figures": []}))
    return out


def _other_disk(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """``os.replace`` between ``target`` and anywhere else fails as across file systems."""
    replace = os.replace
    inside = str(target.resolve()) + os.sep

    def across(src: Any, dst: Any) -> None:
        a, b = (os.path.realpath(os.path.dirname(p)) + os.sep for p in (src, dst))
        if a.startswith(inside) != b.startswith(inside):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(report_module.os, "replace", across)


def _new_logs(target: Path) -> dict[str, str]:
    return {
        p.relative_to(target).as_posix(): p.read_text()
        for p in sorted(target.rglob("metrics.jsonl"))
    }


_WANT = {
    "LB/metrics.jsonl": json.dumps({"new": "LB"}) + "\n",
    "LB_diag-Fisher/metrics.jsonl": json.dumps({"new": "LB+diag-Fisher"}) + "\n",
    "SB/metrics.jsonl": json.dumps({"new": "SB"}) + "\n",
}


def test_demo_overwrite_into_a_diagnostics_folder_on_another_disk(
    tmp_path: Path, fast_demo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It failed after the training with ``OSError: [Errno 18] Invalid cross-device link``
    naming ``.curvlab-demo-*/diagnostics/.curvlab-demo``."""
    target = tmp_path / "disk2"
    out = _linked_demo(tmp_path, target)
    _other_disk(monkeypatch, target)
    train.run_demo(out, train.DemoConfig.quick(), overwrite=True, progress=False)
    assert (out / "diagnostics").is_symlink()
    assert _new_logs(target) == _WANT
    assert (target / ".curvlab-demo").read_text() != "marker"  # this demo's marker
    assert "demo_config" in json.loads((out / "report.json").read_text())["meta"]
    assert not [p for p in [*out.iterdir(), *target.rglob("*")] if ".curvlab-" in p.name[1:]]


def test_a_failed_swap_onto_another_disk_puts_the_earlier_demo_back(
    tmp_path: Path, fast_demo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "disk2"
    out = _linked_demo(tmp_path, target)
    before_out, before_target = _snapshot(out), _snapshot(target)
    _other_disk(monkeypatch, target)
    across = os.replace

    def fails_on_the_report(src: Any, dst: Any) -> None:
        if Path(dst) == out / "report.json" and report_module._ASIDE not in Path(src).parts:
            raise OSError("disk full")  # the new report.json, after every log moved in
        across(src, dst)

    monkeypatch.setattr(report_module.os, "replace", fails_on_the_report)
    with pytest.raises(OSError, match="disk full"):
        train.run_demo(out, train.DemoConfig.quick(), overwrite=True, progress=False)
    assert _snapshot(out) == before_out and _snapshot(target) == before_target


def test_demo_overwrite_onto_a_real_second_file_system(tmp_path: Path, fast_demo: None) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no /dev/shm to stand for another file system")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the file system of tmp_path")
    target = shm / f"curvlab-test-{os.getpid()}-{tmp_path.name}"
    try:
        out = _linked_demo(tmp_path, target)
        train.run_demo(out, train.DemoConfig.quick(), overwrite=True, progress=False)
        assert _new_logs(target) == _WANT
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_a_users_log_in_a_linked_diagnostics_folder_is_refused(
    tmp_path: Path, fast_demo: None
) -> None:
    """No marker, no demo report: the log is the user's, refused as in a plain folder (it was
    replaced by the demo's and deleted with the staging folder)."""
    out, target = tmp_path / "demo", tmp_path / "elsewhere"
    out.mkdir()
    (target / "SB").mkdir(parents=True)
    (target / "SB" / "metrics.jsonl").write_text("the user's\n")
    (out / "diagnostics").symlink_to(target, target_is_directory=True)
    with pytest.raises(FileExistsError, match="no curvlab demo wrote"):
        train.run_demo(out, train.DemoConfig.quick(), overwrite=True, progress=False)
    assert (target / "SB" / "metrics.jsonl").read_text() == "the user's\n"


# ------------------------------------------------- 4. HF: a run folder moved as a whole
def _hf_train(out: Path, stop: int | None, resume: str | None) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    from transformers import Trainer

    from curvlab.analysis.hf import diagnostics_callback
    from tests import test_hf_s17 as hf

    cb = diagnostics_callback(every=2, quantities=["loss"], log_dir=out / "curv")
    trainer = Trainer(
        model=hf._lm(),
        args=hf._args(out, max_steps=8, save_strategy="steps", save_steps=3),
        train_dataset=hf._rows(),
        callbacks=[cb, *([hf._Stop(stop)] if stop else [])],
    )
    trainer.train(resume_from_checkpoint=resume)


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_hf_a_run_folder_moved_as_a_whole_is_cut_on_resuming(tmp_path: Path) -> None:
    """Every 2 steps, stopped after step 5 (step 4 logged after checkpoint-3), the output
    folder moved, resumed from its checkpoint-3: ``[2, 4, 6, 8]``, step 4 dropped. It was
    ``[2, 4, 4, 6, 8]`` (the folder's name differed: not cut)."""
    first, moved = tmp_path / "run", tmp_path / "moved"
    _hf_train(first, stop=5, resume=None)
    assert _steps(first / "curv" / "metrics.jsonl") == [2, 4]
    shutil.move(str(first), str(moved))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _hf_train(moved, stop=None, resume=str(moved / "checkpoint-3"))
    assert _steps(moved / "curv" / "metrics.jsonl") == [2, 4, 6, 8]
    assert _steps(moved / "curv" / "metrics.dropped.jsonl") == [4]
    assert not any("not cut" in str(w.message) for w in caught)


def test_hf_a_log_replaced_in_the_same_folder_is_not_cut(tmp_path: Path) -> None:
    """The fingerprint decides in the same folder too: a log replaced since the checkpoint
    (another run's eight lines) is appended to, not cut at the saved position."""
    run = tmp_path / "run"
    _hf_train(run, stop=5, resume=None)
    lines = "".join(json.dumps({"step": s, "values": {}}) + "\n" for s in range(1, 9))
    (run / "curv" / "metrics.jsonl").write_text(lines)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _hf_train(run, stop=None, resume=str(run / "checkpoint-3"))
    assert _steps(run / "curv" / "metrics.jsonl") == [*range(1, 9), 4, 6, 8]
    assert not (run / "curv" / "metrics.dropped.jsonl").exists()
    said = [str(w.message) for w in caught if "not cut" in str(w.message)]
    assert len(said) == 1 and "replaced" in said[0]
