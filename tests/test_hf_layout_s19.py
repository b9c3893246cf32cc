"""Review s19: ``diagnostics_callback(loss_fn=nn.CrossEntropyLoss())`` on a transformers token
classifier whose sequence length equals its number of labels.

The logits ``(B, T, C)`` against the labels ``(B, T)`` fit torch's layout (classes in axis 1)
as well when ``T == C``; the callback said the classes are last only for encoder-decoder models,
so the token classifier was scored with positions as classes (1.790252 against the model's own
1.798421, with an ``AmbiguousLayoutWarning``). A transformers model's logits hold the classes
last: the callback now marks any ``PreTrainedModel``'s ``CrossEntropyLoss`` with
``classes_last``. Checked against the model's own objective computed here in float64 with
``torch.func``.
"""

from __future__ import annotations

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
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from curvlab._losses import AmbiguousLayoutWarning  # noqa: E402
from curvlab.analysis.hf import diagnostics_callback  # noqa: E402

VOCAB, SEQ, LABELS = 13, 6, 6  # as many positions as labels: both layouts fit


class _Batches(TrainerCallback):
    """Keeps the model's training-mode keyword inputs."""

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


def _config() -> GPT2Config:
    return GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=VOCAB,
        n_positions=SEQ,
        num_labels=LABELS,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        classifier_dropout=0.0,
        attn_implementation="eager",
    )


def test_token_classifier_with_as_many_positions_as_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2ForTokenClassification(_config()).to(torch.float64)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    tags = torch.randint(0, LABELS, (4, SEQ), generator=g)
    rows = [{"input_ids": ids[i], "labels": tags[i]} for i in range(4)]
    cb = diagnostics_callback(nn.CrossEntropyLoss(), every=1, quantities=["loss"])
    batches = _Batches()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=0.0,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=100,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb, batches])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    (call,) = batches.calls
    # the model's own objective in float64: each position's logits against its label
    model64 = GPT2ForTokenClassification(_config()).to(torch.float64).eval()
    logits = functional_call(model64, start, (), {"input_ids": call["input_ids"]}).logits
    want = float(nn.functional.cross_entropy(logits.flatten(0, 1), call["labels"].flatten()))
    positions_as_classes = float(nn.functional.cross_entropy(logits, call["labels"]))
    got = cb.diagnostics.records[0]["values"]["loss"]
    # float64 throughout: the same operations in another order, ~1e-15 relative; the wrong
    # layout is 5e-3 off
    assert math.isclose(got, want, rel_tol=1e-12)
    assert not math.isclose(positions_as_classes, want, rel_tol=1e-3)
    assert not [w for w in seen if issubclass(w.category, AmbiguousLayoutWarning)]
