"""``diagnostics_callback``: ``loss_fn=None`` measures the model's own loss or refuses, and a
compiled loss gets the encoder-decoder layout marking (review s17).

Brute force: the loss written out here, in float64, from a float64 copy of the model.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from curvlab.analysis.hf import diagnostics_callback  # noqa: E402

# float32 model, float64 truth: a few float32 roundings through a one-layer model
REL = 1e-5


def _train(model: nn.Module, loss_fn: nn.Module | None, rows: list[dict], tmp_path) -> tuple:
    """One step at learning rate 0 (the measured parameters are the ones given)."""
    cb = diagnostics_callback(loss_fn, every=1, quantities=["loss"])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(rows), learning_rate=0.0,
        report_to="none", use_cpu=True, save_strategy="no", max_steps=1, disable_tqdm=True,
        seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = trainer.train()
    return out.training_loss, cb.diagnostics.records[0]["values"]["loss"]


def _logits64(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(**inputs).logits


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def _xlnet() -> tuple[nn.Module, list[dict], torch.Tensor]:
    V, T = 12, 8
    torch.manual_seed(0)
    cfg = transformers.XLNetConfig(
        vocab_size=V, d_model=8, n_layer=1, n_head=2, d_inner=16, dropout=0.0, pad_token_id=0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (4, T), generator=g)
    rows = [{"input_ids": ids[i], "labels": ids[i].clone()} for i in range(4)]
    return transformers.XLNetLMHeadModel(cfg), rows, ids


def test_xlnet_unshifted_loss_is_refused_with_both_numbers(tmp_path) -> None:
    """XLNetLMHeadModel is in transformers' causal-LM mapping but scores position t against
    labels[t]: curvlab measured the shifted objective (2.49134) while the model trained on the
    unshifted one (2.36625). Now the first step compares and refuses, naming both."""
    model, rows, ids = _xlnet()
    logits = _logits64(model, input_ids=ids)
    unshifted = _ce(logits, ids)
    shifted = _ce(logits[:, :-1], ids[:, 1:])
    assert abs(shifted - unshifted) > 1e-2 * unshifted  # the two objectives differ here
    with pytest.raises(ValueError, match=r"without the causal shift") as info:
        _train(model, None, rows, tmp_path)
    msg = str(info.value)
    ours = float(re.search(r"labels\[t \+ 1\]\): ([0-9.]+) on the first", msg).group(1))
    own = float(re.search(r"returned its own loss ([0-9.]+)", msg).group(1))
    assert ours == pytest.approx(shifted, rel=REL)  # six significant digits printed
    assert own == pytest.approx(unshifted, rel=REL)
    assert "loss_fn=torch.nn.CrossEntropyLoss()" in msg


def test_xlnet_with_its_loss_measures_what_it_trains(tmp_path) -> None:
    """The fix the refusal names: loss_fn=nn.CrossEntropyLoss() measures the unshifted loss."""
    model, rows, ids = _xlnet()
    want = _ce(_logits64(model, input_ids=ids), ids)
    trained, measured = _train(model, nn.CrossEntropyLoss(), rows, tmp_path)
    assert measured == pytest.approx(want, rel=REL)
    assert trained == pytest.approx(want, rel=REL)


def test_gpt2_double_heads_model_is_measured_as_a_causal_lm(tmp_path) -> None:
    """GPT2DoubleHeadsModel's loss is the shifted causal-LM loss (its multiple-choice loss is
    the separate mc_loss): it was refused with loss_fn=None; now it is measured, and the value
    is the shifted cross-entropy."""
    V, T = 11, 6
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
    )  # fmt: skip
    model = transformers.GPT2DoubleHeadsModel(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (4, T), generator=g)
    rows = [{"input_ids": ids[i], "labels": ids[i].clone()} for i in range(4)]
    want = _ce(_logits64(model, input_ids=ids)[:, :-1], ids[:, 1:])
    trained, measured = _train(model, None, rows, tmp_path)
    assert measured == pytest.approx(want, rel=REL)
    assert trained == pytest.approx(want, rel=REL)


def test_t5_compiled_loss_gets_the_classes_last_marking(tmp_path) -> None:
    """A torch.compile'd CrossEntropyLoss skipped the encoder-decoder classes-last marking
    (an isinstance test on the wrapper): with T == V curvlab read the decoder positions as
    classes (2.786972 for the trainer's 2.458616). Now it measures T5's own loss."""
    V = T = 8
    g = torch.Generator().manual_seed(0)
    ids, lab = torch.randint(1, V, (4, 5), generator=g), torch.randint(1, V, (4, T), generator=g)
    rows = [{"input_ids": ids[i], "labels": lab[i]} for i in range(4)]
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=V, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(cfg)
    want = _ce(_logits64(model, input_ids=ids, labels=lab), lab)  # classes last, unshifted
    loss_fn = torch.compile(nn.CrossEntropyLoss(), backend="eager")
    trained, measured = _train(model, loss_fn, rows, tmp_path)
    assert measured == pytest.approx(want, rel=REL)
    assert trained == pytest.approx(want, rel=REL)
