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


# ---------------------------------------------------------------------- same settings, other log
# Review s20 (S2a): a resume with the SAME settings but another ``log_dir`` loaded the state's
# log position into that other folder's log, moving its lines to ``metrics.dropped.jsonl``
# (HF: ``[1, 2, 4, 6, 8]`` kept, ``[3, ..., 8]`` dropped, for ``[1, ..., 8, 4, 6, 8]``).


def _other_log(folder: Path) -> None:
    """A log folder holding another run's eight lines (longer than any saved position)."""
    folder.mkdir()
    lines = "".join(json.dumps({"step": s, "values": {"note": 1.0}}) + "\n" for s in range(1, 9))
    (folder / "metrics.jsonl").write_text(lines)


def _spelled(tmp_path: Path, log: Path, spelling: str) -> Path:
    """``log`` spelled another way: through ``..`` or through a symbolic link to it."""
    if spelling == "dotdot":
        (tmp_path / "sub").mkdir()
        return tmp_path / "sub" / ".." / log.name
    link = tmp_path / "link"
    link.symlink_to(log, target_is_directory=True)
    return link


def test_hf_resume_with_same_settings_leaves_another_log_alone(tmp_path: Path) -> None:
    """Every 2 steps into ``first``, stopped after step 5; resumed from checkpoint-3 with the
    same settings into ``second``, which holds another run's steps 1-8: those stay and the
    resumed run's 4, 6, 8 follow, nothing dropped, one warning. It cut ``second`` at the saved
    position: ``[1, 2, 4, 6, 8]``, with ``[3, ..., 8]`` in ``metrics.dropped.jsonl``."""
    hf = _hf()
    _train(hf, tmp_path, tmp_path / "first", every=2, stop=5, resume=None)
    other = tmp_path / "second"
    _other_log(other)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(hf, tmp_path, other, every=2, stop=None, resume=str(tmp_path / "checkpoint-3"))
    assert _steps(other / "metrics.jsonl") == [*range(1, 9), 4, 6, 8]
    assert not (other / "metrics.dropped.jsonl").exists()
    assert _steps(tmp_path / "first" / "metrics.jsonl") == [2, 4]  # the first log untouched
    said = [str(w.message) for w in caught if "its log is not cut" in str(w.message)]
    assert len(said) == 1 and str(tmp_path / "first") in said[0]


@pytest.mark.parametrize("every", [2, 1])  # the same settings, and other ones
@pytest.mark.parametrize("spelling", ["dotdot", "symlink"])
def test_hf_resume_into_the_same_log_spelled_otherwise_cuts_it(
    tmp_path: Path, spelling: str, every: int
) -> None:
    """The same folder through ``..`` or a symbolic link is the same log: it is cut at the
    checkpoint (step 4, logged after checkpoint-3 by the stopped run, is dropped)."""
    hf = _hf()
    log = tmp_path / "curv"
    _train(hf, tmp_path, log, every=2, stop=5, resume=None)
    again = _spelled(tmp_path, log, spelling)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(hf, tmp_path, again, every=every, stop=None, resume=str(tmp_path / "checkpoint-3"))
    assert _steps(log / "metrics.jsonl") == [2, *range(4, 9, every)]
    assert _steps(log / "metrics.dropped.jsonl") == [4]
    assert not any("its log is not cut" in str(w.message) for w in caught)


def test_hf_state_without_its_log_dir_still_cuts(tmp_path: Path) -> None:
    """A state file of an earlier curvlab (no ``callback_log_dir``) is cut as before."""
    hf = _hf()
    log = tmp_path / "curv"
    _train(hf, tmp_path, log, every=2, stop=5, resume=None)
    path = tmp_path / "checkpoint-3" / "curvlab_diagnostics.pt"
    state = torch.load(path, weights_only=True)
    del state["callback_log_dir"]
    torch.save(state, path)
    with pytest.warns(RuntimeWarning, match=r"later steps \(4\).*moved to"):
        _train(hf, tmp_path, log, every=2, stop=None, resume=str(tmp_path / "checkpoint-3"))
    assert _steps(log / "metrics.jsonl") == [2, 4, 6, 8]
    assert _steps(log / "metrics.dropped.jsonl") == [4]


def test_lightning_resume_with_same_settings_leaves_another_log_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every 2 steps into ``curv``, checkpoint after step 3; resumed from it with the same
    settings into ``other`` (another run's steps 1-8): those stay and step 4 follows, nothing
    dropped, one warning naming the state's folder. It was cut to ``[1, 2, 4]``."""
    checkpoint = _lightning_fit(monkeypatch, tmp_path / "curv", 2, range(1, 6), None, save_at=3)
    other = tmp_path / "other"
    _other_log(other)
    with pytest.warns(RuntimeWarning) as caught:
        _lightning_fit(monkeypatch, other, 2, range(4, 6), checkpoint)
    assert _steps(other / "metrics.jsonl") == [*range(1, 9), 4]
    assert not (other / "metrics.dropped.jsonl").exists()
    said = [str(w.message) for w in caught if "its log is not cut" in str(w.message)]
    assert len(said) == 1 and str(tmp_path / "curv") in said[0]


@pytest.mark.parametrize("every", [2, 1])  # the same settings, and other ones
@pytest.mark.parametrize("spelling", ["dotdot", "symlink"])
def test_lightning_resume_into_the_same_log_spelled_otherwise_cuts_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spelling: str, every: int
) -> None:
    """The same folder through ``..`` or a symbolic link is the same log: cut at the
    checkpoint (the stopped run's step 4 dropped), with the same settings and with others."""
    log = tmp_path / "curv"
    checkpoint = _lightning_fit(monkeypatch, log, 2, range(1, 6), None, save_at=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _lightning_fit(
            monkeypatch, _spelled(tmp_path, log, spelling), every, range(4, 6), checkpoint
        )
    assert _steps(log / "metrics.jsonl") == [2, *range(4, 6, every)]
    assert _steps(log / "metrics.dropped.jsonl") == [4]
    assert not any("its log is not cut" in str(w.message) for w in caught)


def test_lightning_state_without_its_log_dir_still_cuts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A callback state of an earlier curvlab (only ``"diagnostics"``) is cut as before."""
    log = tmp_path / "curv"
    checkpoint = _lightning_fit(monkeypatch, log, 2, range(1, 6), None, save_at=3)
    assert checkpoint is not None
    states = checkpoint["callbacks"]
    for key in states:
        states[key] = {"diagnostics": states[key]["diagnostics"]}
    with pytest.warns(RuntimeWarning, match=r"later steps \(4\).*moved to"):
        _lightning_fit(monkeypatch, log, 2, range(4, 6), checkpoint)
    assert _steps(log / "metrics.jsonl") == [2, 4]
    assert _steps(log / "metrics.dropped.jsonl") == [4]
