"""Review s21 of ``curvlab.analyze`` and ``curvlab analyze``: each test failed before its fix.

1. A checkpoint of another model (or with NaN) was refused only after the whole data had been
   read and checked (51 batch reads of a 50-batch iterable); on the command line, after the
   ``--data`` factory ran. Every checkpoint is now read and checked against the model first,
   one at a time, nothing loaded into the model.
2. Inputs the model cannot take (``(4, 5)`` into ``Linear(3, 4)``) raised torch's raw "mat1 and
   mat2 shapes cannot be multiplied" with no culprit named. The probe forward on the first
   batch now raises a ``ValueError`` naming the batch's shapes and the model's error (chained),
   and the command line names its ``--data``.

No number is computed here: every check happens before any measurement.
"""

from __future__ import annotations

import textwrap
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._finite import NonFiniteError
from curvlab.analysis import _analyze
from curvlab.analysis._analyze import FirstBatchError
from curvlab.analysis._checkpoint import CheckpointMismatchError
from curvlab.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(hidden: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()


class _Counted:
    """A re-iterable data set of 5 batches that counts the batches read."""

    def __init__(self, features: int = 3) -> None:
        self.read = 0
        g = torch.Generator().manual_seed(1)
        self.batches = [
            (torch.randn(4, features, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
            for _ in range(5)
        ]

    def __iter__(self):
        for batch in self.batches:
            self.read += 1
            yield batch


def _state(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    return [(t.detach().clone(), t._version) for t in model.state_dict(keep_vars=True).values()]


def _untouched(model: nn.Module, before: list[tuple[torch.Tensor, int]]) -> bool:
    now = model.state_dict(keep_vars=True).values()
    return all(torch.equal(t, v) and t._version == n for t, (v, n) in zip(now, before))


# ------------------------------------------------------------------ 1. checkpoints first
@pytest.mark.parametrize("form", ["state_dict", "file", "trajectory"])
def test_a_checkpoint_of_another_model_is_refused_before_the_data_is_read(
    tmp_path: Path, form: str
) -> None:
    model, data = _model(), _Counted()
    other = _model(hidden=5).state_dict()
    path = tmp_path / "other.pt"
    torch.save(other, path)
    checkpoint: Any = {
        "state_dict": other,
        "file": str(path),
        "trajectory": [_model().state_dict(), str(path)],
    }[form]
    before = _state(model)
    with pytest.raises(CheckpointMismatchError, match="does not fit the model: mis-shaped"):
        cl.analyze(model, nn.CrossEntropyLoss(), data, checkpoint=checkpoint, quantities=["loss"])
    assert data.read == 0  # was 6: every batch, then one of a second reading
    assert _untouched(model, before)  # nothing was loaded into the model, no counter moved


def test_a_non_finite_checkpoint_is_refused_before_the_data_is_read() -> None:
    model, data = _model(), _Counted()
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["2.bias"][1] = float("nan")
    with pytest.raises(NonFiniteError, match="parameter '2.bias' of checkpoint"):
        cl.analyze(model, nn.CrossEntropyLoss(), data, checkpoint=[None, bad], quantities=["loss"])
    assert data.read == 0


def test_checkpoint_files_are_checked_one_at_a_time_before_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each checkpoint read before the data is released before the next is read."""
    model, data = _model(), _Counted()
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"step{i}.pt"))
        torch.save(_model().state_dict(), paths[-1])
    alive: list[weakref.ref] = []
    early: list[int] = []  # for each reading before the data: earlier checkpoints still held
    resolve = _analyze.resolve_state_dict

    def counting(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        sd = resolve(*args, **kwargs)
        if data.read == 0:
            early.append(sum(r() is not None for r in alive))
            alive.extend(weakref.ref(t) for t in sd.values())
        return sd

    monkeypatch.setattr(_analyze, "resolve_state_dict", counting)
    cl.analyze(model, nn.CrossEntropyLoss(), data, checkpoint=paths, quantities=["loss"])
    assert early == [0, 0, 0]  # was []: no checkpoint was read before the data


MODULE = textwrap.dedent(
    """
    from pathlib import Path
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()

    def data():
        Path(__file__).with_name("data_factory_ran").write_text("")
        return torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])

    def wrongshape():
        return torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    """
)


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_the_cli_refuses_a_checkpoint_of_another_model_before_the_data_factory_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "an_s21_model.py"
    path.write_text(MODULE)
    ck = tmp_path / "other.pt"
    torch.save(_model(hidden=5).state_dict(), ck)
    argv = ["analyze", "--model", f"{path}:model", "--data", f"{path}:data"]
    argv += ["--checkpoint", str(ck), "--out", str(tmp_path / "o"), "--no-progress"]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint '{ck}' does not fit the model" in err[0], err
    assert not (tmp_path / "data_factory_ran").exists()  # it ran before the checkpoint was read


# ------------------------------------------------------------------ 2. the first batch
def test_inputs_the_model_cannot_take_are_named_with_the_model_error() -> None:
    model = nn.Linear(3, 4).double()
    X, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError) as info:
        cl.analyze(model, nn.CrossEntropyLoss(), (X, y), quantities=["loss"])
    assert str(info.value) == (  # was torch's "mat1 and mat2 shapes cannot be multiplied ..."
        "the model failed on the first batch of the data (inputs of shape (4, 5), targets (4,)): "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x5 and 3x4); check that the "
        "data fits the model"
    )
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_batch_without_a_batch_axis_is_named_as_such() -> None:
    """The model runs on the whole batch (one example of 10 features) but not on the probe's
    first 8 "examples": the batch-axis message of the other probes, not the model's raw error."""
    model = nn.Linear(10, 1).double()
    x = torch.randn(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^the model ran on the batch \(inputs of shape \(10,\)"):
        cl.analyze(
            model, nn.MSELoss(), (x, torch.zeros(10, dtype=torch.float64)), quantities=["loss"]
        )


class _Tuple(nn.Linear):
    def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
        return (super().forward(x),)


class _Interrupted(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("model", "dtype", "error", "match"),
    [
        (_Tuple(3, 4).double(), torch.float64, TypeError, "^the model returned a tuple"),
        (nn.Linear(3, 4).double(), torch.float32, TypeError, "^the inputs are float32"),
        (_Interrupted(3, 4).double(), torch.float64, KeyboardInterrupt, None),
    ],
)
def test_curvlab_errors_and_interrupts_pass_unchanged(
    model: nn.Module, dtype: torch.dtype, error: type[BaseException], match: str | None
) -> None:
    """A guard of the fix (passes on the code before it too): curvlab's own errors of the probe
    forward and a ``KeyboardInterrupt`` are not turned into the first batch's ``ValueError``."""
    X, y = torch.randn(4, 3, dtype=dtype), torch.tensor([0, 1, 2, 3])
    with pytest.raises(error, match=match) as info:
        cl.analyze(model, nn.CrossEntropyLoss(), (X, y), quantities=["loss"])
    assert type(info.value) is not ValueError and "first batch" not in str(info.value)


def test_the_cli_names_the_data_the_model_cannot_take(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "an_s21_model2.py"
    path.write_text(MODULE)
    argv = ["analyze", "--model", f"{path}:model", "--data", f"{path}:wrongshape"]
    assert _exit_code([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [  # was "curvlab: error: RuntimeError: mat1 and mat2 shapes cannot be ..."
        "curvlab: error: the model failed on the first batch of the data (inputs of shape (4, 5), "
        "targets (4,)): RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x5 and 3x4); "
        f"check that --data {path}:wrongshape gives batches that --model {path}:model takes"
    ]


class _DifferentiatingForward(nn.Module):
    """A forward that takes a gradient inside itself (a force / PINN model) without enabling
    gradients: it fails under ``torch.no_grad()`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        h = self.lin(x)
        (d,) = torch.autograd.grad(h.sum(), x, create_graph=True)
        return h + d[:, :2]


def test_a_model_failing_only_without_gradients_is_not_blamed_on_the_data() -> None:
    """Review s21 (R): the first-batch error told such a model to check its data."""
    torch.manual_seed(0)
    model = _DifferentiatingForward()
    data = (torch.randn(10, 3), torch.randint(0, 2, (10,)))
    with pytest.raises(ValueError, match="enable_grad") as info:
        cl.analyze(model, nn.CrossEntropyLoss(), data, quantities=["loss"], nqm=False)
    assert not isinstance(info.value, FirstBatchError)
    assert "torch.no_grad()" in str(info.value)


def test_checkpoint_files_are_mapped_on_the_cpu_by_the_check_before_the_data(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s21 (R): the check before the data read every file once more, into memory (and
    onto the model's device); it maps it now, and the measurement's own read is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    path = tmp_path / "ck.pt"
    torch.save(model.state_dict(), path)
    calls: list[dict] = []
    real = torch.load

    def load(*args, **kwargs):
        calls.append(dict(kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    data = [(torch.randn(6, 3), torch.randint(0, 2, (6,)))]
    cl.analyze(
        model, nn.CrossEntropyLoss(), data, checkpoint=str(path), quantities=["loss"], nqm=False
    )
    assert len(calls) == 2
    assert calls[0].get("mmap") is True and str(calls[0].get("map_location")) == "cpu"
    assert not calls[1].get("mmap")
