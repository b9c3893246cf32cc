"""Review s17: ``curvlab.analysis.hf.diagnostics_callback`` in a real ``transformers.Trainer``.

* A checkpoint saved before the first measurement held ``seen_step`` ``None``, so the resumed
  run cut nothing from ``metrics.jsonl``: ``[4, 4, 8]`` for the uninterrupted ``[4, 8]``.
* ``loss_fn=None`` shifted the labels of a token-classification model as for a causal LM: the
  measured loss was another objective (1.62018 against the model's own 1.61202).
* Two callbacks on one ``log_dir`` wrote one file (a resume left one writing to an unlinked
  file); now the second takes the folder over and the first writes no more, and a callback
  frees its folder at the end of training.
* ``log_dir=123`` (or an existing file) was accepted, then failed in ``train()``.
* A ``compute_loss_func`` calling the loss module twice was told to call it.

Tiny GPT-2 models on generated tokens, CPU; losses are checked against the ones computed here in
float64 with ``torch.func``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from curvlab import Diagnostics  # noqa: E402
from curvlab.analysis.hf import causal_lm_targets, diagnostics_callback  # noqa: E402

VOCAB, SEQ, LABELS = 12, 8, 5


def _config(**kw: Any) -> GPT2Config:
    return GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=VOCAB,
        n_positions=SEQ,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **kw,
    )


def _rows(n: int = 16, labels: int | None = None) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    tags = torch.randint(0, labels or VOCAB, (n, SEQ), generator=g)
    return [
        {"input_ids": ids[i], "labels": tags[i] if labels else ids[i].clone()} for i in range(n)
    ]


def _args(out: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=100,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _lm(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(_config())


class _Stop(TrainerCallback):
    """Stops training after step ``at`` (a crash, as far as the log is concerned)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.at:
            control.should_training_stop = True


class _Batches(TrainerCallback):
    """Keeps the model's training-mode keyword inputs of each step."""

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self._handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        def pre(module: nn.Module, a: Any, kwargs: dict[str, Any]) -> None:
            if module.training:
                self.calls.append({k: v.clone() for k, v in kwargs.items() if v is not None})

        self._handle = model.register_forward_pre_hook(pre, with_kwargs=True)

    def on_train_end(self, *a: Any, **kw: Any) -> None:
        self._handle.remove()


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_checkpoint_before_the_first_measurement_cuts_the_resumed_log(tmp_path: Path) -> None:
    """Every 4 steps, checkpoints every 3: the run stopped after step 5 (having logged step 4)
    and resumed from checkpoint-3, saved before the first measurement. The log must be the
    uninterrupted run's [4, 8]; it was [4, 4, 8]."""
    log = tmp_path / "curv"

    def run(stop: int | None, resume: str | None) -> Trainer:
        cb = diagnostics_callback(every=4, quantities=["loss"], log_dir=log)
        extra = [_Stop(stop)] if stop else []
        trainer = Trainer(
            model=_lm(),
            args=_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=3),
            train_dataset=_rows(),
            callbacks=[cb, *extra],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    run(stop=5, resume=None)
    assert _steps(log / "metrics.jsonl") == [4]
    saved = torch.load(tmp_path / "checkpoint-3" / "curvlab_diagnostics.pt", weights_only=True)
    assert saved["seen_step"] == 3
    with pytest.warns(RuntimeWarning, match=r"saved at step 3.*later steps \(4\)"):
        run(stop=None, resume=str(tmp_path / "checkpoint-3"))
    assert _steps(log / "metrics.jsonl") == [4, 8]
    assert _steps(log / "metrics.dropped.jsonl") == [4]


def test_loss_fn_none_refuses_a_token_classification_model(tmp_path: Path) -> None:
    """GPT2ForTokenClassification scores position t against labels[t]; loss_fn=None shifted
    them (1.62018 against the model's own 1.61202). Refused before any step, naming the class
    and the fix; with loss_fn=CrossEntropyLoss() the measured loss is the model's own."""
    torch.manual_seed(0)
    model = GPT2ForTokenClassification(_config(num_labels=LABELS, classifier_dropout=0.0))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = _rows(labels=LABELS)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=rows,
        callbacks=[diagnostics_callback(every=1, quantities=["loss"])],
    )
    with pytest.raises(ValueError, match=r"GPT2ForTokenClassification is not a causal") as info:
        trainer.train()
    assert "loss_fn=torch.nn.CrossEntropyLoss()" in str(info.value)
    assert trainer.state.global_step == 0
    for k, v in model.state_dict().items():  # nothing trained
        assert torch.equal(v, start[k])

    cb = diagnostics_callback(nn.CrossEntropyLoss(), every=1, quantities=["loss"])
    batches = _Batches()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1, learning_rate=0.0),
        train_dataset=rows,
        callbacks=[cb, batches],
    )
    trainer.train()
    (call,) = batches.calls
    # the model's own objective in float64: cross-entropy of each position against its label
    model64 = GPT2ForTokenClassification(_config(num_labels=LABELS, classifier_dropout=0.0))
    model64 = model64.double().eval()
    params = {k: v.double() for k, v in start.items()}
    logits = functional_call(model64, params, (), {"input_ids": call["input_ids"]}).logits
    want = float(nn.functional.cross_entropy(logits.flatten(0, 1), call["labels"].flatten()))
    shifted = float(
        nn.functional.cross_entropy(
            logits.flatten(0, 1), causal_lm_targets(call["labels"]).flatten()
        )
    )
    got = cb.diagnostics.records[0]["values"]["loss"]
    # float32 measurement of a float64 value: a few float32 roundings (~6e-8) per operation
    # of a one-layer model; the shifted objective differs by ~1e-2
    assert math.isclose(got, want, rel_tol=1e-5)
    assert not math.isclose(shifted, want, rel_tol=1e-3)


def test_loss_fn_none_accepts_a_causal_lm(tmp_path: Path) -> None:
    """The causal LM's measured loss is its own (labels shifted inside the model)."""
    model = _lm()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cb = diagnostics_callback(every=1, quantities=["loss"])
    batches = _Batches()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1, learning_rate=0.0),
        train_dataset=_rows(),
        callbacks=[cb, batches],
    )
    trainer.train()
    (call,) = batches.calls
    model64 = GPT2LMHeadModel(_config()).double().eval()
    own = dict(model64.named_parameters())  # lm_head.weight is tied to wte: passed once
    params = {k: v.double() for k, v in start.items() if k in own}
    logits = functional_call(model64, params, (), {"input_ids": call["input_ids"]}).logits
    labels = call["labels"]
    want = float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))
    assert math.isclose(cb.diagnostics.records[0]["values"]["loss"], want, rel_tol=1e-5)


@pytest.mark.parametrize("bad", [123, ["logs"]])
def test_a_log_dir_that_is_no_path_is_refused_at_construction(bad: Any) -> None:
    with pytest.raises(TypeError, match="log_dir must be a folder path"):
        diagnostics_callback(every=1, quantities=["loss"], log_dir=bad)


def test_a_log_dir_that_is_a_file_is_refused_at_construction(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        diagnostics_callback(every=1, quantities=["loss"], log_dir=afile)


def test_two_callbacks_on_one_log_dir_never_write_it_at_once_and_free_it_at_train_end(
    tmp_path: Path,
) -> None:
    """Two callbacks of one Trainer on one folder are refused when training starts, before any
    step (the takeover would have failed the first one's first measured step, after training
    had started). One after the other (the first's training ended), the folder is free."""
    log = tmp_path / "curv"
    first = diagnostics_callback(every=1, quantities=["loss"], log_dir=log)
    second = diagnostics_callback(every=2, quantities=["grad_norm"], log_dir=log)
    trainer = Trainer(
        model=_lm(),
        args=_args(tmp_path, max_steps=1),
        train_dataset=_rows(),
        callbacks=[first, second],
    )
    with pytest.raises(ValueError, match="two curvlab callbacks of this Trainer write"):
        trainer.train()  # refused when training starts, before any step
    assert trainer.state.global_step == 0
    assert not (log / "metrics.jsonl").exists() or not (log / "metrics.jsonl").read_text()
    if first.diagnostics is not None:  # the train() that raised may have left one open
        first.diagnostics.close()
    trainer = Trainer(
        model=_lm(), args=_args(tmp_path, max_steps=1), train_dataset=_rows(), callbacks=[first]
    )
    trainer.train()
    assert _steps(log / "metrics.jsonl") == [1]
    # on_train_end freed the folder: another writer opens it quietly while the callback exists
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Diagnostics(nn.Linear(2, 2), nn.MSELoss(), ["loss"], every=1, log_dir=log).close()


def test_a_loss_module_called_twice_is_named_as_the_cause(tmp_path: Path) -> None:
    """compute_loss_func calling the loss module twice per micro-batch: the warning said the
    model call had no labels and to call the module (which it did)."""
    loss_fn = nn.CrossEntropyLoss()

    def twice(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> Any:
        logits, t = outputs.logits.flatten(0, 1), causal_lm_targets(labels).flatten()
        return loss_fn(logits, t) + 0.0 * loss_fn(logits, t)

    cb = diagnostics_callback(loss_fn, every=1, quantities=["loss"])
    trainer = Trainer(
        model=_lm(),
        args=_args(tmp_path, max_steps=1),
        train_dataset=_rows(),
        callbacks=[cb],
        compute_loss_func=twice,
    )
    trainer.model_accepts_loss_kwargs = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "diagnostics_callback" in str(w.message)]
    assert any("loss module was called 2 times for 1 model call" in m for m in messages), messages
    assert cb.diagnostics.records == []


def test_loss_fn_none_warns_for_a_model_that_is_no_transformers_model() -> None:
    """A module of the user's own cannot be told a causal LM or not: measured as one, with a
    warning that says how to pass its loss (it was silent)."""
    cb = diagnostics_callback(every=1, quantities=["loss"])
    with pytest.warns(RuntimeWarning, match=r"Sequential is not a transformers model.*loss_fn="):
        cb.on_train_begin(None, None, None, model=nn.Sequential(nn.Linear(3, 4)))
    try:
        assert cb.diagnostics is not None
    finally:
        cb.on_train_end(None, None, None)
