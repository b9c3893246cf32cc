"""Review s20: resuming a ``Diagnostics`` log.

* A HuggingFace callback resumed from a state saved with other settings (``every`` changed)
  started afresh without cutting its log: the lines written after the checkpoint (by the run
  that went on, then stopped) stayed, ``[2, 4, 4, 5, 6, 7, 8]`` for ``[2, 4, 5, 6, 7, 8]``. The
  Lightning callback found no state under its settings' ``state_key`` and cut nothing either.
* A relative ``log_dir`` was resolved against the working directory again after an
  ``os.chdir``: ``load_state_dict`` raised a raw ``FileNotFoundError`` (the log file then
  closed, the next step failing after measuring), or the records went to another folder's log.
* A truncated ``curvlab_diagnostics.pt`` made ``trainer.train(resume_from_checkpoint=...)``
  fail with torch's "PytorchStreamReader failed reading zip archive", naming no file.

The log's content is checked line by line; nothing numerical is compared here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import curvlab as cl


def _steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (6,), generator=g)
    torch.manual_seed(0)
    return nn.Linear(3, 2).double(), X, y


# ---------------------------------------------------------------------- relative log_dir
@pytest.mark.parametrize("csv", [False, True])
def test_a_relative_log_dir_stays_where_it_was_made_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, csv: bool
) -> None:
    """Made in ``a`` with ``log_dir="logs"``, rolled back after ``os.chdir`` into ``b`` (which
    has a ``logs`` folder of its own): the cut and every later record are ``a/logs``'s. It
    raised ``FileNotFoundError`` ('logs/metrics.jsonl'), or wrote steps 1, 2 to ``b/logs``."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "logs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    model, X, y = _problem()
    diag = cl.Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1, log_dir="logs", csv=csv)
    diag.step(0, X, y)
    state = diag.state_dict()
    diag.step(1, X, y)
    monkeypatch.chdir(tmp_path / "b")  # a library or a notebook cell changes the directory
    with warnings.catch_warnings(record=True) as caught:  # an error (the old one) goes through
        warnings.simplefilter("always")
        diag.load_state_dict(state)
    diag.step(1, X, y)
    diag.step(2, X, y)
    diag.close()
    logs = tmp_path / "a" / "logs"
    assert _steps(logs / "metrics.jsonl") == [0, 1, 2]
    assert _steps(logs / "metrics.dropped.jsonl") == [1]
    assert list((tmp_path / "b" / "logs").iterdir()) == []
    assert diag.log_dir == tmp_path / "a" / "logs"  # absolute, taken once
    assert any("later steps (1)" in str(w.message) for w in caught)
    if csv:
        rows = (logs / "metrics.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows] == ["step", "0", "1", "2"]
        dropped = (logs / "metrics.dropped.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in dropped] == ["step", "1"]


# ---------------------------------------------------------------------- HF Trainer
def _hf() -> Any:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    from tests import test_hf_s17 as hf

    return hf


def _train(hf: Any, out: Path, log: Path, every: int, stop: int | None, resume: str | None) -> None:
    from transformers import Trainer

    from curvlab.analysis.hf import diagnostics_callback

    cb = diagnostics_callback(every=every, quantities=["loss"], log_dir=log)
    extra = [hf._Stop(stop)] if stop else []
    trainer = Trainer(
        model=hf._lm(),
        args=hf._args(out, max_steps=8, save_strategy="steps", save_steps=3),
        train_dataset=hf._rows(),
        callbacks=[cb, *extra],
    )
    trainer.train(resume_from_checkpoint=resume)


def test_hf_resume_with_other_settings_still_cuts_the_log(tmp_path: Path) -> None:
    """Every 2 steps, stopped after step 5 (step 4 logged after checkpoint-3), resumed from
    checkpoint-3 every step: the log is ``[2, 4, 5, 6, 7, 8]``, step 4 in
    ``metrics.dropped.jsonl``; it was ``[2, 4, 4, 5, 6, 7, 8]``."""
    hf = _hf()
    log = tmp_path / "curv"
    _train(hf, tmp_path, log, every=2, stop=5, resume=None)
    assert _steps(log / "metrics.jsonl") == [2, 4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(hf, tmp_path, log, every=1, stop=None, resume=str(tmp_path / "checkpoint-3"))
    assert _steps(log / "metrics.jsonl") == [2, 4, 5, 6, 7, 8]
    assert _steps(log / "metrics.dropped.jsonl") == [4]
    said = [str(w.message) for w in caught if "other settings" in str(w.message)]
    assert len(said) == 1 and "its log was cut" in said[0] and "starts afresh" in said[0]


def test_hf_resume_with_other_settings_leaves_another_log_alone(tmp_path: Path) -> None:
    """A state saved with other settings for another ``log_dir`` (the callbacks reordered:
    another callback's file) does not cut this callback's log at its position."""
    hf = _hf()
    _train(hf, tmp_path, tmp_path / "first", every=2, stop=5, resume=None)
    other = tmp_path / "second"
    other.mkdir()
    lines = "".join(json.dumps({"step": s, "values": {}}) + "\n" for s in range(1, 9))
    (other / "metrics.jsonl").write_text(lines)  # longer than the state's position
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(hf, tmp_path, other, every=1, stop=None, resume=str(tmp_path / "checkpoint-3"))
    said = [str(w.message) for w in caught if "other settings" in str(w.message)]
    assert len(said) == 1 and "its log is not cut" in said[0]
    assert _steps(other / "metrics.jsonl") == [*range(1, 9), 4, 5, 6, 7, 8]
    assert not (other / "metrics.dropped.jsonl").exists()


def test_hf_a_damaged_state_file_is_named_before_training(tmp_path: Path) -> None:
    """A ``curvlab_diagnostics.pt`` cut in half: a ``ValueError`` naming the file and the fix
    (delete it), raised in ``on_train_begin`` before any step, its log folder freed; it was
    torch's "PytorchStreamReader failed reading zip archive", naming no file."""
    hf = _hf()
    log = tmp_path / "curv"
    _train(hf, tmp_path, log, every=2, stop=5, resume=None)
    path = tmp_path / "checkpoint-3" / "curvlab_diagnostics.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = (log / "metrics.jsonl").read_bytes()
    resume = str(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match=r"curvlab_diagnostics\.pt.*cannot be read.*Delete it"):
        _train(hf, tmp_path, log, every=2, stop=None, resume=resume)
    assert (log / "metrics.jsonl").read_bytes() == before  # nothing measured, nothing cut
    torch.save([1, 2], path)  # readable, but no Diagnostics state
    with pytest.raises(ValueError, match=r"curvlab_diagnostics\.pt.*not a Diagnostics state"):
        _train(hf, tmp_path, log, every=2, stop=None, resume=resume)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no takeover: the folder was freed
        model, X, y = _problem()
        cl.Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], log_dir=log).close()


# ---------------------------------------------------------------------- Lightning (stand-in)
def _lightning_fit(
    monkeypatch: pytest.MonkeyPatch,
    log: Path,
    every: int,
    steps: range,
    checkpoint: dict[str, Any] | None,
    save_at: int | None = None,
) -> dict[str, Any] | None:
    """One callback driven as Lightning drives it (``on_load_checkpoint``, then
    ``load_state_dict`` of the callback's ``state_key``, before ``on_train_start``; one
    optimizer step per batch); the checkpoint saved after step ``save_at`` as Lightning's
    ``dump_checkpoint`` makes it (callback states, then ``on_save_checkpoint``)."""
    import curvlab.analysis.lightning as lightning

    monkeypatch.setattr(lightning, "_callback_base", lambda: object)
    model, X, y = _problem()
    cb = lightning.diagnostics_callback(
        nn.CrossEntropyLoss(), every=every, quantities=["loss"], log_dir=log
    )
    trainer = type(
        "Trainer", (), {"global_step": steps[0] - 1, "optimizers": [], "callbacks": [cb]}
    )()
    if checkpoint is not None:
        cb.on_load_checkpoint(trainer, model, checkpoint)
        if checkpoint["callbacks"].get(cb.state_key):
            cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
    cb.on_fit_start(trainer, model)
    cb.on_train_start(trainer, model)
    saved = None
    for i, step in enumerate(steps):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, model, None, (X, y), i)
        if step == save_at:
            saved = {"callbacks": {cb.state_key: cb.state_dict()}}
            # Lightning's Callback has a no-op hook: a callback without its own saves nothing
            getattr(cb, "on_save_checkpoint", lambda *a: None)(trainer, model, saved)
            saved = torch.load(_saved(saved, log), weights_only=True)  # a round trip
    cb.on_train_end(trainer, model)
    return saved


def _saved(checkpoint: dict[str, Any], log: Path) -> Path:
    path = log.parent / "step.ckpt"
    torch.save(checkpoint, path)
    return path


def test_lightning_resume_with_other_settings_still_cuts_the_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every 2 steps, checkpoint after step 3, stopped after step 5 (step 4 logged); resumed
    from it every step: the log is ``[2, 4, 5]``, the stopped run's step 4 in
    ``metrics.dropped.jsonl``. The ``state_key`` (made of the settings) finds no state, and the
    log was kept whole: ``[2, 4, 4, 5]``."""
    log = tmp_path / "curv"
    checkpoint = _lightning_fit(monkeypatch, log, 2, range(1, 6), None, save_at=3)
    assert checkpoint is not None and _steps(log / "metrics.jsonl") == [2, 4]
    with pytest.warns(RuntimeWarning) as caught:
        _lightning_fit(monkeypatch, log, 1, range(4, 6), checkpoint)
    assert _steps(log / "metrics.jsonl") == [2, 4, 5]
    assert _steps(log / "metrics.dropped.jsonl") == [4]
    said = [str(w.message) for w in caught if "without this callback's" in str(w.message)]
    assert len(said) == 1 and "its log was cut" in said[0]


def test_lightning_log_position_key_is_the_log_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another ``log_dir`` finds no position for it: nothing is cut there."""
    checkpoint = _lightning_fit(monkeypatch, tmp_path / "curv", 2, range(1, 6), None, save_at=3)
    other = tmp_path / "other"
    other.mkdir()
    lines = "".join(json.dumps({"step": s, "values": {}}) + "\n" for s in range(1, 9))
    (other / "metrics.jsonl").write_text(lines)
    with pytest.warns(RuntimeWarning) as caught:
        _lightning_fit(monkeypatch, other, 1, range(4, 6), checkpoint)
    assert not any("its log was cut" in str(w.message) for w in caught)
    assert _steps(other / "metrics.jsonl") == [*range(1, 9), 4, 5]
