"""Review s16 of checkpoints and resuming: a checkpoint list given as an iterable that is no
list (refused before the data is read, with the list form named), a ``Diagnostics`` state of
another device type's generator (a ``ValueError`` that changes nothing, and a way to continue),
and a run resumed into its own ``log_dir`` after it went on past its last saved state (the
later records moved aside, not written twice).

The resumed logs are compared with an uninterrupted run's, record for record.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.analysis import Diagnostics


# ---------------------------------------------------------------------- checkpoint iterables
def _small_model() -> nn.Module:
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g))
    return model


class _CountedData:
    """One batch, re-iterable, counting how often it is read."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.batch = (
            torch.randn(12, 4, dtype=torch.float64, generator=g),
            torch.randint(0, 3, (12,), generator=g),
        )
        self.reads = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.reads += 1
        yield self.batch


def _checkpoint_files(folder: Path) -> list[Path]:
    model = _small_model()
    paths = []
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        paths.append(folder / f"c{i}.pt")
        torch.save(model.state_dict(), paths[-1])
    return paths


@pytest.mark.parametrize("kind", ["glob", "generator", "dict_values", "set", "map"])
def test_an_iterable_of_checkpoints_is_refused_before_the_data_is_read(
    tmp_path: Path, kind: str
) -> None:
    """A ``Path.glob`` generator, a set or ``dict.values()`` was refused only after the data was
    read twice, with a message that left out the list form."""
    paths = _checkpoint_files(tmp_path)
    checkpoint: Any = {
        "glob": tmp_path.glob("*.pt"),
        "generator": (p for p in paths),
        "dict_values": {str(p): str(p) for p in paths}.values(),
        "set": {str(p) for p in paths},
        "map": map(str, paths),
    }[kind]
    data = _CountedData()
    with pytest.raises(TypeError, match=r"or a list of these \(a trajectory") as info:
        cl.analyze(_small_model(), nn.CrossEntropyLoss(), data, checkpoint, ["loss"], nqm=False)
    assert data.reads == 0
    assert 'sorted(Path(d).glob("*.pt"))' in str(info.value)
    assert "list(...)" in str(info.value)


def test_a_sorted_glob_is_the_trajectory_of_its_files(tmp_path: Path) -> None:
    """The advised form works: the losses are those of each file's state, in name order."""
    paths = _checkpoint_files(tmp_path)
    data = _CountedData()
    report = cl.analyze(
        _small_model(),
        nn.CrossEntropyLoss(),
        data,
        sorted(tmp_path.glob("*.pt")),
        ["loss"],
        nqm=False,
    )
    assert [e["label"] for e in report.entries] == ["c0.pt", "c1.pt", "c2.pt"]
    for entry, path in zip(report.entries, paths):
        model = _small_model()
        model.load_state_dict(torch.load(path, weights_only=True))
        with torch.no_grad():
            want = nn.CrossEntropyLoss()(model(data.batch[0]), data.batch[1]).item()
        assert entry["values"]["loss"] == pytest.approx(want, rel=1e-12)


def test_a_nested_list_names_its_place(tmp_path: Path) -> None:
    paths = _checkpoint_files(tmp_path)
    data = _CountedData()
    with pytest.raises(TypeError, match="checkpoint 1 of the list is a list"):
        cl.analyze(
            _small_model(),
            nn.CrossEntropyLoss(),
            data,
            [paths[0], paths[1:]],
            ["loss"],
            nqm=False,
        )
    assert data.reads == 0


# ---------------------------------------------------------------------- generator device
def _diag_problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g))
    X = torch.randn(8, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _comparable(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def test_a_generator_state_of_another_device_type_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """A CUDA generator's state (16 bytes) loaded on the CPU gave torch's "Expected a
    CPUGeneratorImplState of size 5056" and no advice; now a ValueError names the device types
    and the way on, before anything of the Diagnostics (or its log) is changed."""
    model, loss_fn, X, y = _diag_problem()
    saved = Diagnostics(model, loss_fn, ["trace_fisher"], every=1)
    for step in range(6):
        saved.step(step, X, y)
    state = _round_trip(saved.state_dict())
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    diag = Diagnostics(model, loss_fn, ["trace_fisher"], every=1, log_dir=tmp_path)
    for step in range(8):  # its log holds steps after the state's: not to be touched
        diag.step(step, X, y)
    before, log = _comparable(diag.state_dict()), (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match="a CUDA generator's state") as info:
        diag.load_state_dict(state)
    assert 'state["generator"] = None' in str(info.value)
    assert _comparable(diag.state_dict()) == before
    assert (tmp_path / "metrics.jsonl").read_bytes() == log
    assert not (tmp_path / "metrics.dropped.jsonl").exists()
    diag.close()


def test_a_state_without_its_generator_continues_with_a_fresh_one() -> None:
    """``state["generator"] = None``: the rest is restored, and the label draws come from a
    generator seeded from the seed and the step counter, not the first run's draws again."""
    model, loss_fn, X, y = _diag_problem()
    saved = Diagnostics(model, loss_fn, ["trace_fisher"], every=1, seed=3)
    for step in range(4):
        saved.step(step, X, y)
    state = _round_trip(saved.state_dict())
    resumed = Diagnostics(model, loss_fn, ["trace_fisher"], every=1, seed=3)
    resumed.load_state_dict({**state, "generator": None})
    got = resumed.state_dict()
    assert got["calls"] == 4 and got["last_step"] == 3 and got["seen_step"] == 3
    fresh = torch.Generator().manual_seed(3).get_state()
    assert not torch.equal(got["generator"], fresh)
    assert not torch.equal(got["generator"], state["generator"])
    record = resumed.step(4, X, y)
    assert record is not None and record["values"]["trace_fisher"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_state_on_the_cpu_and_back_is_refused() -> None:
    model, loss_fn, X, y = _diag_problem()
    on_gpu = Diagnostics(model.cuda(), loss_fn, ["trace_fisher"], every=1)
    on_gpu.step(0, X.cuda(), y.cuda())
    cuda_state = _round_trip(on_gpu.state_dict())
    cpu_model = _diag_problem()[0]
    on_cpu = Diagnostics(cpu_model, loss_fn, ["trace_fisher"], every=1)
    cpu_state = _round_trip(on_cpu.state_dict())
    with pytest.raises(ValueError, match="a CUDA generator's state"):
        on_cpu.load_state_dict(cuda_state)
    with pytest.raises(ValueError, match="a CPU generator's state"):
        on_gpu.load_state_dict(cpu_state)
    on_gpu.load_state_dict(cuda_state)  # the same device type loads


# ---------------------------------------------------------------------- the resumed log
_Q = ["loss", "trace_fisher"]


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(64, 4, dtype=torch.float64, generator=g),
        torch.randint(0, 3, (64,), generator=g),
    )


def _net() -> nn.Module:
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g))
    return model


def _train(
    log_dir: Path, steps: range, start: dict[str, Any] | None = None, save_after: int = -1
) -> dict[str, Any] | None:
    """SGD steps with a Diagnostics measuring every 3 steps into ``log_dir`` (``csv=True``);
    from ``start``'s states if given. Returns the states saved after step ``save_after``."""
    X, y = _batches()
    loss_fn = nn.CrossEntropyLoss()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = Diagnostics(model, loss_fn, _Q, every=3, log_dir=log_dir, csv=True)
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["opt"])
        diag.load_state_dict(start["diag"])
    saved = None
    for s in steps:
        xb, yb = X[s * 8 : (s + 1) * 8], y[s * 8 : (s + 1) * 8]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        diag.step(s, xb, yb)
        if s == save_after:
            saved = _round_trip(
                {"model": model.state_dict(), "opt": opt.state_dict(), "diag": diag.state_dict()}
            )
    diag.close()
    return saved


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _csv_steps(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return [row["step"] for row in csv.DictReader(f)]


@pytest.mark.parametrize("earlier_curvlab", [False, True])
def test_a_run_resumed_into_its_log_dir_writes_each_step_once(
    tmp_path: Path, earlier_curvlab: bool
) -> None:
    """Measuring every 3 steps, the state saved after step 4, the run went on to step 7 and was
    resumed from step 5 into the same log_dir: the log held steps [0, 3, 6, 6]. Now the crashed
    run's step 6 is moved to metrics.dropped.jsonl / .csv (with a warning naming it) and the log
    equals the uninterrupted run's. A state of an earlier curvlab (no ``seen_step``) is cut at
    its last measured step, the same here."""
    whole = tmp_path / "whole"
    _train(whole, range(8))
    log = tmp_path / "log"
    state = _train(log, range(8), save_after=4)
    assert state is not None
    crashed = (log / "metrics.jsonl").read_text().splitlines()
    if earlier_curvlab:
        del state["diag"]["seen_step"]
    with pytest.warns(RuntimeWarning, match=r"later steps \(6\)"):
        _train(log, range(5, 8), start=state)
    got, want = _jsonl(log / "metrics.jsonl"), _jsonl(whole / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 3, 6]
    assert [r["values"] for r in got] == [r["values"] for r in want]
    assert (log / "metrics.dropped.jsonl").read_text().splitlines() == crashed[2:]
    assert _csv_steps(log / "metrics.csv") == ["0", "3", "6"]
    assert _csv_steps(log / "metrics.dropped.csv") == ["6"]


def test_a_resume_with_nothing_later_in_the_log_leaves_it_alone(tmp_path: Path) -> None:
    """Resumed right after the saved state (no crash past it): nothing is moved, no warning."""
    log = tmp_path / "log"
    state = _train(log, range(5), save_after=4)
    before = (log / "metrics.jsonl").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(log, range(5, 8), start=state)
    assert (log / "metrics.jsonl").read_bytes().startswith(before)
    assert [r["step"] for r in _jsonl(log / "metrics.jsonl")] == [0, 3, 6]
    assert not (log / "metrics.dropped.jsonl").exists()
    assert not (log / "metrics.dropped.csv").exists()


class _FakeWriter:
    """Stands for TensorBoard's ``SummaryWriter`` (not installed here): records its options."""

    made: list[int | None] = []

    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        self.log_dir = str(log_dir)
        _FakeWriter.made.append(purge_step)

    def get_logdir(self) -> str:
        return self.log_dir

    def add_scalar(self, *args: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_tensorboard_hides_the_later_steps(tmp_path: Path, monkeypatch: Any) -> None:
    """TensorBoard's event files are not rewritten: its writer is reopened with ``purge_step``
    one after the saved state's step, which hides the crashed run's later scalars."""
    from curvlab.analysis import _metrics_log

    monkeypatch.setattr(_FakeWriter, "made", [])
    monkeypatch.setattr(
        _metrics_log,
        "_tensorboard",
        lambda log_dir, purge_step=None: _FakeWriter(log_dir, purge_step),
    )
    model, loss_fn, X, y = _diag_problem()
    first = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, tensorboard=True)
    for step in range(5):
        first.step(step, X, y)
        if step == 2:
            state = _round_trip(first.state_dict())
    first.close()
    resumed = Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, tensorboard=True)
    with pytest.warns(RuntimeWarning, match=r"later steps \(3, 4\)"):
        resumed.load_state_dict(state)
    resumed.close()
    assert _FakeWriter.made == [None, None, 3]
