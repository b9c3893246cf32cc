"""Review s11 of ``Diagnostics``: resuming (the explosion window, the HF and Lightning
callbacks' checkpoints, a generator state mapped to a device), logs cut short by a crash, and
the options' checks.

Every resumed run is compared with the uninterrupted one, bit for bit; the logs' values with the
records and the loss computed directly.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.analysis import Diagnostics, DiagnosticsConfig, FisherExplosionWarning

# ---------------------------------------------------------------------- the explosion window
SCALES = [1.0, 1.0, 1.0, 1.0, 5.0]  # Tr(F) 13.1, 15.3, 7.7, 9.8, 227: an explosion at step 4


def _explosion_problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 4, dtype=torch.float64, generator=g)
    y = torch.randn(16, 3, dtype=torch.float64, generator=g)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, dtype=torch.float64, generator=g))
        model.bias.zero_()
    return model, nn.MSELoss(), X, y


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _explosion_run(save_at: int | None, drop: str | None = None) -> tuple[list, list, list]:
    """Steps 0-4 with ``every=1``; at ``save_at`` the Diagnostics is replaced by a new one
    loaded from the old one's state (without its ``drop`` entry). Returns the Tr(F) values,
    the explosion warnings' steps and the events (without their times)."""
    model, loss_fn, X, y = _explosion_problem()
    kw: dict[str, Any] = {"quantities": ["trace_fisher"], "every": 1, "seed": 0}
    diag = Diagnostics(model, loss_fn, **kw)
    values, warned = [], []
    for step, scale in enumerate(SCALES):
        if step == save_at:
            state = _round_trip(diag.state_dict())
            if drop is not None:
                del state[drop]  # a state saved by an earlier curvlab
            diag.close()
            diag = Diagnostics(model, loss_fn, **kw)
            diag.load_state_dict(state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values.append(diag.step(step, X * scale, y)["values"]["trace_fisher"])
        warned += [step for w in caught if issubclass(w.category, FisherExplosionWarning)]
    events = [{k: v for k, v in e.items() if k != "time"} for e in diag.events]
    diag.close()
    return values, warned, events


def test_uninterrupted_run_sees_the_explosion() -> None:
    values, warned, events = _explosion_run(None)
    low = min(values[:4])
    assert values[4] >= 10 * low  # the problem does explode (brute-force check of the set-up)
    assert warned == [4]
    assert events == [
        {
            "event": "fisher_explosion",
            "step": 4,
            "trace_fisher": values[4],
            "window_min": low,
            "factor": values[4] / low,
        }
    ]


@pytest.mark.parametrize("save_at", [1, 2, 3, 4])
def test_a_resumed_run_warns_where_the_uninterrupted_one_does(save_at: int) -> None:
    """The window of Tr(F) values is part of the state: resumed before the explosion, the run
    warns at the same step with the same event (it never warned: the window started empty)."""
    assert _explosion_run(save_at) == _explosion_run(None)


def test_a_state_without_the_window_still_loads() -> None:
    """A state saved by an earlier curvlab (no window) loads; the window then starts empty."""
    values, warned, events = _explosion_run(4, drop="fisher_window")
    assert values == _explosion_run(None)[0]
    assert warned == [] and events == []  # one value in the window: nothing to compare


def test_the_window_holds_explosion_window_values_only() -> None:
    model, loss_fn, X, y = _explosion_problem()
    diag = Diagnostics(model, loss_fn, ["trace_fisher"], every=1, explosion_window=3)
    got = [diag.step(s, X, y)["values"]["trace_fisher"] for s in range(5)]
    assert diag.state_dict()["fisher_window"] == got[-3:]
    diag.close()


# ---------------------------------------------------------------------- the generator state
class _MappedState(torch.Tensor):
    """A generator state as ``torch.load(map_location="cuda")`` gives it back: only ``.cpu()``
    makes it a CPU tensor again (no GPU here, so a subclass stands for the device tensor)."""

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone()


def test_load_state_dict_puts_the_generator_state_on_the_cpu() -> None:
    model, loss_fn, X, y = _explosion_problem()
    first = Diagnostics(model, loss_fn, ["trace_fisher"], every=1, seed=3)
    first.step(0, X, y)
    state = first.state_dict()
    state["generator"] = state["generator"].as_subclass(_MappedState)
    second = Diagnostics(model, loss_fn, ["trace_fisher"], every=1, seed=3)
    real = second.generator
    given: list[Any] = []

    class _Generator:  # the real generator, seeing what it is given
        def set_state(self, s: torch.Tensor) -> None:
            given.append(s)
            real.set_state(s)

    second.generator = _Generator()  # type: ignore[assignment]
    second.load_state_dict(state)
    second.generator = real
    assert len(given) == 1 and type(given[0]) is torch.Tensor and given[0].device.type == "cpu"
    want, got = first.step(1, X, y), second.step(1, X, y)
    assert got["values"] == want["values"]


def test_load_state_dict_refuses_a_foreign_state() -> None:
    model, loss_fn, _, _ = _explosion_problem()
    diag = Diagnostics(model, loss_fn, ["trace_fisher"], every=1)
    state = diag.state_dict()
    with pytest.raises(ValueError, match="'generator' is a list"):
        diag.load_state_dict({**state, "generator": [1, 2]})
    with pytest.raises(ValueError, match="'fisher_window'"):
        diag.load_state_dict({**state, "fisher_window": ["a"]})


# ---------------------------------------------------------------------- logs cut short
def _log_problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():  # the same model at every call (not the global RNG's)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g))
    X = torch.randn(8, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


_Q = ["loss", "trace_empirical_fisher"]


def _log_steps(log_dir: Path, steps: range, scale: float = 1.0) -> list[dict[str, Any]]:
    model, loss_fn, X, y = _log_problem()
    with Diagnostics(model, loss_fn, _Q, every=1, log_dir=log_dir, csv=True) as diag:
        return [diag.step(s, X * (s + 1) * scale, y) for s in steps]


def _cut(path: Path, keep: int) -> bytes:
    """Cut ``path``'s last line to its first ``keep`` bytes (its line end gone); returns the
    complete lines before it."""
    data = path.read_bytes()
    head, last = data[:-1].rsplit(b"\n", 1)
    path.write_bytes(head + b"\n" + last[:keep])
    return head + b"\n"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_logs_cut_inside_their_last_line_are_repaired_on_open(tmp_path: Path) -> None:
    """A write cut short (the process killed, the disk full) left a partial last line: the
    resumed run drops it (with a warning) and appends whole lines; every complete line is kept
    byte for byte. Before, the next record was glued to it: step 3's loss landed in step 2's
    ``trace_empirical_fisher`` column, and the JSONL line could not be read."""
    first = _log_steps(tmp_path, range(3))
    kept = {
        name: _cut(tmp_path / name, 20) for name in ("metrics.jsonl", "metrics.csv")
    }  # step 2's line cut after 20 bytes
    with pytest.warns(RuntimeWarning, match="cut short") as caught:
        resumed = _log_steps(tmp_path, range(3, 5))
    cut = [str(w.message) for w in caught if "cut short" in str(w.message)]
    assert sorted(m.split("'")[1].rsplit("/", 1)[1] for m in cut) == [
        "metrics.csv",
        "metrics.jsonl",
    ]
    for name, head in kept.items():
        assert (tmp_path / name).read_bytes().startswith(head)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line reads
    assert [r["step"] for r in records] == [0, 1, 3, 4]
    assert [r["values"] for r in records] == [r["values"] for r in first[:2] + resumed]
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "3", "4"]
    model, loss_fn, X, y = _log_problem()
    for row, record in zip(rows, first[:2] + resumed):
        assert set(row) == {"step", *_Q}  # no value outside a column
        step = int(row["step"])
        with torch.no_grad():  # brute force: the loss computed directly
            want = float(loss_fn(model(X * (step + 1)), y))
        assert float(row["loss"]) == pytest.approx(want, rel=1e-12)
        for name in _Q:
            assert float(row[name]) == record["values"][name]


def test_a_last_line_missing_only_its_line_end_is_kept(tmp_path: Path) -> None:
    """A whole record whose line end was not written (a JSON line that parses, a CSV row cut
    between ``\\r`` and ``\\n``) is kept and ended; nothing is dropped, no warning."""
    first = _log_steps(tmp_path, range(3))
    for name in ("metrics.jsonl", "metrics.csv"):  # the CSV's row then ends in "\r"
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = _log_steps(tmp_path, range(3, 5))
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["values"] for r in records] == [r["values"] for r in first + resumed]
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [float(r["loss"]) for r in rows] == [r["values"]["loss"] for r in first + resumed]


def test_a_csv_cut_inside_its_header_gets_a_new_one(tmp_path: Path) -> None:
    _log_steps(tmp_path, range(1))
    path = tmp_path / "metrics.csv"
    path.write_bytes(path.read_bytes()[:7])  # "step,lo": the first record never written
    with pytest.warns(RuntimeWarning, match="cut short"):
        resumed = _log_steps(tmp_path, range(1, 2))
    rows = _csv_rows(path)
    assert [r["step"] for r in rows] == ["1"]
    assert float(rows[0]["loss"]) == resumed[0]["values"]["loss"]


# ---------------------------------------------------------------------- the options' checks
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_examples": True}, "max_examples must be a positive int"),
        ({"max_examples": 0}, "max_examples must be a positive int"),
        ({"max_examples": 1.5}, "max_examples must be a positive int"),
        ({"explosion_until": -1.5}, "explosion_until must be a step number"),
        ({"explosion_until": -1}, "explosion_until must be a step number"),
        ({"explosion_until": True}, "explosion_until must be a step number"),
        ({"seed": "a"}, "seed must be an int"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"seed": None}, "seed must be an int"),
        ({"seed": True}, "seed must be an int"),
        ({"seed": 2**64}, "seed must be an int"),
        ({"explosion_factor": "x"}, "explosion_factor must be a number > 1"),
        ({"explosion_factor": True}, "explosion_factor must be a number > 1"),
        ({"explosion_window": True}, "explosion_window must be an int >= 2"),
    ],
)
def test_bad_options_are_clear_errors_when_made(kwargs: dict[str, Any], match: str) -> None:
    """Refused when the Diagnostics is made, as a keyword, in a config, and by the HF
    callback before training (``max_examples=True`` measured one example; ``seed='a'`` gave
    torch's ``manual_seed expected a long``)."""
    model, loss_fn = nn.Linear(3, 2), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=match):
        Diagnostics(model, loss_fn, every=1, **kwargs)
    with pytest.raises(ValueError, match=match):
        Diagnostics(model, loss_fn, every=1, config=DiagnosticsConfig(**kwargs))
    pytest.importorskip("transformers")
    from curvlab.analysis.hf import diagnostics_callback

    with pytest.raises(ValueError, match=match):
        diagnostics_callback(every=1, **kwargs)


def test_numpy_numbers_are_accepted_as_python_ones() -> None:
    model, loss_fn, X, y = _log_problem()
    diag = Diagnostics(
        model,
        loss_fn,
        ["loss"],
        every=1,
        seed=np.int64(3),
        max_examples=np.int64(2),
        explosion_window=np.int32(4),
        explosion_until=np.int64(0),
        explosion_factor=np.float32(5.0),
    )
    cfg = diag.config
    assert (cfg.seed, cfg.max_examples, cfg.explosion_window, cfg.explosion_until) == (3, 2, 4, 0)
    assert all(type(v) is int for v in (cfg.seed, cfg.max_examples, cfg.explosion_window))
    assert type(cfg.explosion_factor) is float
    with torch.no_grad():
        want = float(loss_fn(model(X[:2]), y[:2]))  # the first two examples, by hand
    assert diag.step(0, X, y)["values"]["loss"] == pytest.approx(want, rel=1e-12)
    diag.close()


# ---------------------------------------------------------------------- Lightning
def _lightning_run(
    monkeypatch: pytest.MonkeyPatch, steps: range, state: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import curvlab.analysis.lightning as lightning

    monkeypatch.setattr(lightning, "_callback_base", lambda: object)
    model, loss_fn, X, y = _explosion_problem()
    cb = lightning.diagnostics_callback(loss_fn, quantities=["trace_fisher"], every=1, seed=0)
    assert cb.state_dict() == {}  # nothing to save before training
    trainer = type("Trainer", (), {"global_step": steps[0] - 1, "optimizers": []})()
    if state is not None:  # Lightning restores callbacks before on_train_start
        cb.load_state_dict(state)
    cb.on_train_start(trainer, model)
    for i, step in enumerate(steps):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, model, None, (X * SCALES[step - 1], y), i)
    out = _round_trip(cb.state_dict())
    records = [r["values"] for r in cb.diagnostics.records]
    cb.on_train_end(trainer, model)
    return records, out


def test_lightning_checkpoints_carry_the_diagnostics_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fit(ckpt_path=...)``: the callback's state_dict goes into the checkpoint and
    load_state_dict (called before on_train_start) resumes the generator and the window: the
    values and the explosion are those of the uninterrupted run (before, a fresh Diagnostics
    redrew steps 1-2's labels and never warned)."""
    with pytest.warns(FisherExplosionWarning, match="step 5"):
        whole, _ = _lightning_run(monkeypatch, range(1, 6), None)
    first, state = _lightning_run(monkeypatch, range(1, 3), None)
    # since review s20 the state also names its (absolute) log folder, so that a resume into
    # another folder does not cut that folder's log at this one's position
    assert set(state) == {"diagnostics", "log_dir"}
    with pytest.warns(FisherExplosionWarning, match="step 5"):
        resumed, _ = _lightning_run(monkeypatch, range(3, 6), state)
    assert first + resumed == whole


# ---------------------------------------------------------------------- HF Trainer
_VOCAB, _SEQ = 50, 16


def _hf_train(
    out: Path, max_steps: int, resume: Any = None, **cb_kw: Any
) -> tuple[dict[int, float], Any]:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from curvlab.analysis.hf import diagnostics_callback

    class _Values(TrainerCallback):
        def __init__(self) -> None:
            self.values: dict[int, float] = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any):
            if logs and "curvlab/trace_fisher" in logs:
                self.values[state.global_step] = logs["curvlab/trace_fisher"]

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, _VOCAB, (32, _SEQ), generator=g)
    data = [{"input_ids": ids[i], "labels": ids[i].clone()} for i in range(32)]
    with torch.random.fork_rng():  # the Trainer seeds the global RNG
        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=1,
            n_head=2,
            n_embd=16,
            vocab_size=_VOCAB,
            n_positions=_SEQ,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(config)
        cb = diagnostics_callback(every=1, quantities=["trace_fisher"], seed=0, **cb_kw)
        values = _Values()
        args = TrainingArguments(
            output_dir=str(out),
            use_cpu=True,
            report_to=[],
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, values])
        trainer.train(resume_from_checkpoint=resume)
    return values.values, cb


def test_hf_checkpoints_carry_the_diagnostics_state(tmp_path: Path) -> None:
    """``train(resume_from_checkpoint=...)`` measures what the uninterrupted run does, bit for
    bit (before, the Monte-Carlo labels of steps 3-4 repeated those of steps 1-2: other values),
    with the checkpoint copied elsewhere and found through ``resume_from_checkpoint=True``; a
    checkpoint without the state warns and starts afresh."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    whole, _ = _hf_train(tmp_path / "a", 4)
    assert sorted(whole) == [1, 2, 3, 4]
    saved = tmp_path / "a" / "checkpoint-2" / "curvlab_diagnostics.pt"
    assert saved.is_file()
    state = torch.load(saved, weights_only=True)
    assert set(state) >= {"generator", "fisher_window"} and len(state["fisher_window"]) == 2
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed, _ = _hf_train(tmp_path / "b", 4, resume=True)
    assert resumed == {3: whole[3], 4: whole[4]}
    # a checkpoint saved without the callback: a warning, and other (unbiased) draws
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "c" / "checkpoint-2")
    (tmp_path / "c" / "checkpoint-2" / "curvlab_diagnostics.pt").unlink()
    with pytest.warns(RuntimeWarning, match="holds no curvlab_diagnostics.pt"):
        afresh, _ = _hf_train(tmp_path / "c", 4, resume=str(tmp_path / "c" / "checkpoint-2"))
    assert sorted(afresh) == [3, 4] and afresh != resumed
