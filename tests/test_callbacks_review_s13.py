"""Review s13 of the training-loop callbacks (``curvlab.analysis.hf`` and ``.lightning``).

* Several HF callbacks in one Trainer wrote one checkpoint file (the last writer's state) and
  each resumed from it: each now has its own file, and resumes its own measurements, bit for bit.
* ``quantities=`` given as an iterator was consumed by the HF callback's check: training then
  failed with "quantities is empty".
* Two Lightning callbacks could not share a Trainer (no ``state_key``): they now can, and each
  resumes its own state.
* The Lightning callback checked nothing when built: a misspelt quantity, an unknown option,
  ``every=0`` or an unsupported loss failed only once training had started.

Lightning is not installed in the test environment: its callback is tested against stand-in
trainers that call its hooks in Lightning's order (as the other Lightning tests do), and once
against the real Lightning when it is importable.
"""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from curvlab.analysis import Diagnostics


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------- HF Trainer
_VOCAB, _SEQ = 50, 16


def _hf_run(
    out: Path, settings: list[dict[str, Any]], resume: Any = None, max_steps: int = 4
) -> list[dict[int, float]]:
    """A tiny GPT-2 trained ``max_steps`` steps with one curvlab callback per ``settings``
    (checkpoints every 2 steps); each callback's ``trace_fisher`` by step."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from curvlab.analysis.hf import diagnostics_callback

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
        callbacks = [diagnostics_callback(quantities=["trace_fisher"], **kw) for kw in settings]
        args = TrainingArguments(
            output_dir=str(out),
            use_cpu=True,
            report_to=[],
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=2,
            logging_steps=100,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
    return [
        {r["step"]: r["values"]["trace_fisher"] for r in cb.diagnostics.records} for cb in callbacks
    ]


_TWO = [{"every": 1, "seed": 1}, {"every": 2, "seed": 2}]


def test_two_hf_callbacks_each_resume_their_own_state(tmp_path: Path) -> None:
    """Two callbacks in one Trainer: each checkpoint holds a state file per callback, and the
    resumed run measures what the uninterrupted one did, callback by callback, bit for bit
    (before, both wrote ``curvlab_diagnostics.pt``, the last writer won and both resumed from
    it: the first callback's Tr(F) at steps 3-4 were the second's Monte-Carlo draws)."""
    whole = _hf_run(tmp_path / "a", _TWO)
    assert [sorted(v) for v in whole] == [[1, 2, 3, 4], [2, 4]]
    folder = tmp_path / "a" / "checkpoint-2"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing is said: both states found
        resumed = _hf_run(tmp_path / "a", _TWO, resume=str(folder))
    assert resumed == [{3: whole[0][3], 4: whole[0][4]}, {4: whole[1][4]}]
    first = torch.load(folder / "curvlab_diagnostics.pt", weights_only=True)
    second = torch.load(folder / "curvlab_diagnostics-1.pt", weights_only=True)
    assert (first["calls"], second["calls"]) == (2, 1)  # each its own state
    assert not torch.equal(first["generator"], second["generator"])


def test_hf_state_saved_with_other_settings_or_by_an_older_curvlab(tmp_path: Path) -> None:
    """The state at a callback's position saved with other settings (the callbacks reordered,
    say) is not loaded: a warning, and the Diagnostics starts afresh. A file of an earlier
    curvlab (one for all callbacks, no settings) loads for a single callback, as before, and
    warns for several (it may be another callback's state)."""
    whole = _hf_run(tmp_path / "a", _TWO)
    folder = tmp_path / "a" / "checkpoint-2"
    with pytest.warns(RuntimeWarning, match="other settings") as caught:
        swapped = _hf_run(tmp_path / "a", _TWO[::-1], resume=str(folder))
    assert len([w for w in caught if "other settings" in str(w.message)]) == 2
    assert swapped[1] != {3: whole[0][3], 4: whole[0][4]}  # afresh: other draws
    assert sorted(swapped[0]) == [4] and sorted(swapped[1]) == [3, 4]

    # a single callback and a checkpoint file of an earlier curvlab (no settings in it)
    single = _hf_run(tmp_path / "b", _TWO[:1])
    old = tmp_path / "b" / "checkpoint-2" / "curvlab_diagnostics.pt"
    state = torch.load(old, weights_only=True)
    del state["callback_settings"]
    torch.save(state, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        resumed = _hf_run(tmp_path / "b", _TWO[:1], resume=str(old.parent))
    assert resumed == [{3: single[0][3], 4: single[0][4]}]
    shutil.copy(old, folder / "curvlab_diagnostics.pt")  # and with two callbacks
    with pytest.warns(RuntimeWarning, match="older curvlab.*may be another callback's"):
        _hf_run(tmp_path / "a", _TWO, resume=str(folder))


def test_hf_quantities_may_be_an_iterator() -> None:
    """A generator of names is read once (the check consumed it, and training failed with
    "quantities is empty"); a single name is one quantity (it was split into characters)."""
    pytest.importorskip("transformers")
    from curvlab.analysis.hf import diagnostics_callback

    wanted = ["loss", "trace_fisher", "grad_norm"]
    cb = diagnostics_callback(every=2, quantities=(q for q in wanted))
    assert cb.quantities == tuple(wanted)
    model = nn.Sequential(nn.Linear(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no Trainer around: no callback handler to find
        cb.on_train_begin(None, None, None, model=model)
    try:
        assert cb.diagnostics.quantities == tuple(wanted)
    finally:
        cb.on_train_end(None, None, None)
    assert diagnostics_callback(quantities="loss").quantities == ("loss",)
    with pytest.raises(ValueError, match="unknown quantities"):
        diagnostics_callback(quantities=(q for q in ["loss", "trace_fishr"]))


def test_hf_optimizer_given_is_checked_when_built() -> None:
    """``optimizer=`` that the sharpness measurements cannot read is refused at once."""
    pytest.importorskip("transformers")
    from curvlab.analysis.hf import diagnostics_callback

    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="Adam or AdamW"):
        diagnostics_callback(quantities=["preconditioned_sharpness"], optimizer=sgd)


# ---------------------------------------------------------------------- Lightning (stand-in)
def _lightning(monkeypatch: pytest.MonkeyPatch) -> Any:
    import curvlab.analysis.lightning as lightning

    monkeypatch.setattr(lightning, "_callback_base", lambda: object)
    return lightning


def _lightning_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (12,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    return model, X, y


_PL = [
    {"quantities": ["loss", "trace_fisher"], "every": 1, "seed": 1},
    {"quantities": ["trace_fisher"], "every": 2, "seed": 2},
]


def _lightning_run(
    monkeypatch: pytest.MonkeyPatch, steps: range, checkpoint: dict[str, Any] | None
) -> tuple[list[dict[int, float]], dict[str, Any]]:
    """Two callbacks driven as Lightning drives them: states restored by ``state_key`` before
    ``on_train_start``, one optimizer step per batch; the checkpoint's callback states after."""
    lightning = _lightning(monkeypatch)
    model, X, y = _lightning_problem()
    callbacks = [lightning.diagnostics_callback(nn.CrossEntropyLoss(), **kw) for kw in _PL]
    keys = [cb.state_key for cb in callbacks]
    assert len(set(keys)) == 2  # Lightning refuses stateful callbacks with one key
    trainer = type("Trainer", (), {"global_step": steps[0] - 1, "optimizers": []})()
    if checkpoint is not None:  # Lightning's _call_callbacks_load_state_dict
        for cb in callbacks:
            if checkpoint.get(cb.state_key):
                cb.load_state_dict(checkpoint[cb.state_key])
    for cb in callbacks:
        cb.on_fit_start(trainer, model)
        cb.on_train_start(trainer, model)
    for i, step in enumerate(steps):
        trainer.global_step = step
        for cb in callbacks:
            cb.on_train_batch_end(trainer, model, None, (X * (1 + step / 10), y), i)
    saved = _round_trip({cb.state_key: cb.state_dict() for cb in callbacks})
    for cb in callbacks:
        cb.on_train_end(trainer, model)
    values = [
        {r["step"]: r["values"]["trace_fisher"] for r in cb.diagnostics.records} for cb in callbacks
    ]
    return values, saved


def test_two_lightning_callbacks_each_resume_their_own_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each callback's state is filed under its own ``state_key`` (there was none: Lightning
    refused a second callback) and ``fit(ckpt_path=...)`` resumes each one's measurements, bit
    for bit."""
    whole, _ = _lightning_run(monkeypatch, range(1, 6), None)
    assert [sorted(v) for v in whole] == [[1, 2, 3, 4, 5], [2, 4]]
    first, checkpoint = _lightning_run(monkeypatch, range(1, 3), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # both states found: nothing is said
        resumed, _ = _lightning_run(monkeypatch, range(3, 6), checkpoint)
    assert [{**a, **b} for a, b in zip(first, resumed)] == whole


def test_lightning_state_key_holds_the_settings_and_is_stable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key is the same for the same settings in another run (no object's repr in it), as
    Lightning's ``Callback._generate_state_key`` formats it, and differs with the settings."""
    lightning = _lightning(monkeypatch)
    loss = nn.CrossEntropyLoss()
    key = lightning.diagnostics_callback(loss, every=1, quantities=["loss"]).state_key
    assert key == lightning.diagnostics_callback(loss, every=1, quantities=("loss",)).state_key
    assert key.startswith("diagnostics_callback.<locals>.DiagnosticsCallback{")
    assert "'quantities': ['loss']" in key and "'every': 1" in key and "0x" not in key
    others = [
        lightning.diagnostics_callback(loss, every=2, quantities=["loss"]),
        lightning.diagnostics_callback(loss, every=1, quantities=["grad_norm"]),
        lightning.diagnostics_callback(loss, every=1, quantities=["loss"], seed=3),
        lightning.diagnostics_callback(loss, "net", every=1, quantities=["loss"]),
        lightning.diagnostics_callback(nn.MSELoss(), every=1, quantities=["loss"]),
    ]
    assert len({key, *(cb.state_key for cb in others)}) == 6


def test_lightning_resume_without_this_callbacks_state_warns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run resumed (global_step > 0) with no state for this callback (saved without it, or
    with other settings) says it starts afresh (it did so silently); a fresh run says nothing."""
    lightning = _lightning(monkeypatch)
    model, X, y = _lightning_problem()
    cb = lightning.diagnostics_callback(nn.CrossEntropyLoss(), every=1, quantities=["loss"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_train_start(type("Trainer", (), {"global_step": 0, "optimizers": []})(), model)
    with pytest.warns(RuntimeWarning, match="resumes at step 7 without this callback's"):
        cb.on_train_start(type("Trainer", (), {"global_step": 7, "optimizers": []})(), model)


@pytest.mark.parametrize(
    ("loss", "kwargs", "error", "match"),
    [
        (nn.CrossEntropyLoss(), {"quantities": ["trace_fishr"]}, ValueError, "unknown quantities"),
        (nn.CrossEntropyLoss(), {"bogus_option": 1}, TypeError, "unknown option"),
        (nn.CrossEntropyLoss(), {"every": 0}, ValueError, "every"),
        (nn.CrossEntropyLoss(), {"seed": -1.5}, ValueError, "seed"),
        (nn.CrossEntropyLoss(), {"csv": True}, ValueError, "log_dir"),
        (nn.NLLLoss(), {}, TypeError, "unsupported loss NLLLoss"),
        (
            nn.CrossEntropyLoss(),
            {"quantities": ["preconditioned_sharpness"], "optimizer": "sgd"},
            TypeError,
            "Adam or AdamW",
        ),
    ],
    ids=["quantity", "option", "every", "seed", "csv", "loss", "optimizer"],
)
def test_lightning_options_are_checked_when_built(
    monkeypatch: pytest.MonkeyPatch, loss: nn.Module, kwargs: dict, error: type, match: str
) -> None:
    """What ``Diagnostics`` refuses is refused when the callback is made, before the Trainer
    runs (it was refused in on_train_start, after the sanity validation)."""
    lightning = _lightning(monkeypatch)
    if kwargs.get("optimizer") == "sgd":
        kwargs = {**kwargs, "optimizer": torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)}
    with pytest.raises(error, match=match):
        lightning.diagnostics_callback(loss, **kwargs)


def test_lightning_refuses_the_trainers_optimizer_at_fit_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trainer's optimizer is known once ``configure_optimizers`` ran: ``on_fit_start``
    (before the sanity validation) refuses one the sharpness measurements cannot read."""
    lightning = _lightning(monkeypatch)
    model, X, y = _lightning_problem()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    cb = lightning.diagnostics_callback(
        nn.CrossEntropyLoss(), quantities=["preconditioned_sharpness"]
    )
    with pytest.raises(TypeError, match="Adam or AdamW"):
        cb.on_fit_start(type("Trainer", (), {"optimizers": [sgd]})(), model)
    cb.on_fit_start(type("Trainer", (), {"optimizers": [adam]})(), model)  # accepted


def test_lightning_quantities_may_be_an_iterator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generator of names is read once: the check and the Diagnostics see the same names."""
    lightning = _lightning(monkeypatch)
    model, X, y = _lightning_problem()
    wanted = ["loss", "grad_norm"]
    cb = lightning.diagnostics_callback(
        nn.CrossEntropyLoss(), every=1, quantities=(q for q in wanted)
    )
    trainer = type("Trainer", (), {"global_step": 0, "optimizers": []})()
    cb.on_train_start(trainer, model)
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, model, None, (X, y), 0)
    cb.on_train_end(trainer, model)
    assert cb.diagnostics.quantities == tuple(wanted)
    with torch.no_grad():
        want = float(nn.functional.cross_entropy(model(X), y))
    assert cb.diagnostics.records[0]["values"]["loss"] == pytest.approx(want, rel=1e-12)
    with Diagnostics(model, nn.CrossEntropyLoss(), wanted, every=1) as direct:
        assert direct.quantities == cb.diagnostics.quantities


# ---------------------------------------------------------------------- real Lightning
def test_two_callbacks_in_a_real_lightning_trainer(tmp_path: Path) -> None:
    """With Lightning installed: two callbacks in one Trainer fit, and ``fit(ckpt_path=...)``
    resumes each one's measurements bit for bit (Lightning refused the Trainer before)."""
    L = pytest.importorskip("lightning.pytorch")
    from curvlab.analysis.lightning import diagnostics_callback

    model0, X, y = _lightning_problem()
    data = torch.utils.data.TensorDataset(X, y)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()
            self.net.load_state_dict(model0.state_dict())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt_path: str | None = None) -> list[dict[int, float]]:
        callbacks = [diagnostics_callback(nn.CrossEntropyLoss(), **kw) for kw in _PL]
        saver = L.callbacks.ModelCheckpoint(  # at each epoch's end: each step (one batch)
            dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}"
        )
        trainer = L.Trainer(
            max_steps=max_steps,
            callbacks=[*callbacks, saver],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=tmp_path,
        )
        # one batch an epoch: a resumed fit replays a plain loader's epoch from its start
        loader = torch.utils.data.DataLoader(data, batch_size=12)
        trainer.fit(Module(), loader, ckpt_path=ckpt_path)
        return [
            {r["step"]: r["values"]["trace_fisher"] for r in cb.diagnostics.records}
            for cb in callbacks
        ]

    whole = fit(4)
    assert [sorted(v) for v in whole] == [[1, 2, 3, 4], [2, 4]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        resumed = fit(4, str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert resumed == [{3: whole[0][3], 4: whole[0][4]}, {4: whole[1][4]}]


def test_lightning_resumes_a_checkpoint_of_an_earlier_curvlab(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint saved before the callback had its own ``state_key`` filed the state under
    the class name alone: it still resumes (it started afresh), bit for bit."""
    whole, _ = _lightning_run(monkeypatch, range(1, 6), None)
    first, checkpoint = _lightning_run(monkeypatch, range(1, 3), None)
    lightning = _lightning(monkeypatch)
    model, X, y = _lightning_problem()
    cb = lightning.diagnostics_callback(nn.CrossEntropyLoss(), **_PL[0])
    old = {
        "callbacks": {"diagnostics_callback.<locals>.DiagnosticsCallback": checkpoint[cb.state_key]}
    }
    trainer = type("Trainer", (), {"global_step": 2, "optimizers": [], "callbacks": [cb]})()
    cb.on_load_checkpoint(trainer, model, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cb.on_fit_start(trainer, model)
        cb.on_train_start(trainer, model)
    for i, step in enumerate(range(3, 6)):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, model, None, (X * (1 + step / 10), y), i)
    resumed = {r["step"]: r["values"]["trace_fisher"] for r in cb.diagnostics.records}
    assert {**first[0], **resumed} == whole[0]
