"""curvlab.analysis.hf.diagnostics_callback inside a real transformers.Trainer.

A tiny GPT-2 on generated tokens (no download), CPU, four steps measured every two. The
callback must log its values with the step, leave training bitwise unchanged, measure the step's
own batch with the updated parameters, and give what curvlab gives when called directly; its
causal-LM objective must be the loss the HF model computes itself.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import curvlab as cl  # noqa: E402
from curvlab.analysis.hf import causal_lm_targets, diagnostics_callback  # noqa: E402
from curvlab.noise import DiagFisherNoise, NoisyOptimizer  # noqa: E402

VOCAB, SEQ, BATCH, STEPS, EVERY = 50, 16, 4, 4, 2
DEFAULT = ("loss", "grad_norm", "trace_fisher", "trace_empirical_fisher", "noise_scale")


def _config(**kw: Any) -> GPT2Config:
    return GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=16,
        vocab_size=VOCAB,
        n_positions=SEQ,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **kw,
    )


def _dataset(n: int = 32, classes: int | None = None) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    rows = []
    for i in range(n):
        mask = torch.ones(SEQ, dtype=torch.long)
        labels = ids[i].clone()
        if i % 3 == 0:  # right padding: masked, ignored
            mask[-5:] = 0
            labels[-5:] = -100
        if classes is not None:
            labels = torch.tensor(i % classes)
        rows.append({"input_ids": ids[i], "attention_mask": mask, "labels": labels})
    return rows


class Recorder(TrainerCallback):
    """Stands in for a reporting integration: records every on_log with the global step."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, Any]]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.logs.append((state.global_step, dict(logs)))


class Spy(TrainerCallback):
    """Records each training batch (own pre-hook) and what the callback hands to Diagnostics."""

    def __init__(self, cb: Any) -> None:
        self.cb = cb
        self.batches: list[dict[str, torch.Tensor]] = []
        self.calls: list[dict[str, Any]] = []
        self._handle: Any = None
        self._in_step = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        diag, spy = self.cb.diagnostics, self
        original = diag.step

        def step(s: int, inputs: Any, targets: Any) -> Any:
            spy.calls.append(
                {
                    "step": s,
                    "inputs": {k: v.clone() for k, v in inputs.items()},
                    "targets": targets.clone(),
                    "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "training": model.training,
                }
            )
            return original(s, inputs, targets)

        diag.step = step

        def pre(module: nn.Module, a: Any, kwargs: dict[str, Any]) -> None:
            if module.training and spy._in_step:  # the step's own forward passes only
                spy.batches.append(
                    {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
                )

        self._handle = model.register_forward_pre_hook(pre, with_kwargs=True)

    def on_step_begin(self, *a: Any, **kw: Any) -> None:
        self._in_step = True

    def on_pre_optimizer_step(self, *a: Any, **kw: Any) -> None:
        self._in_step = False  # an optimizer's own passes (NoisyOptimizer's) are not the batch

    def on_train_end(self, *a: Any, **kw: Any) -> None:
        self._handle.remove()


def _train(
    tmp: Any,
    callbacks: list[Any],
    model_cls: type = GPT2LMHeadModel,
    data: Any = None,
    compute_loss_func: Any = None,
    setup: Any = None,
    strict: bool = True,
    **kw: Any,
) -> Trainer:
    with torch.random.fork_rng():  # the Trainer seeds the global RNG; leave the test's as it was
        torch.manual_seed(0)
        model = model_cls(_config(num_labels=3) if model_cls is not GPT2LMHeadModel else _config())
        args = TrainingArguments(
            output_dir=str(tmp),
            use_cpu=True,
            report_to=[],
            max_steps=kw.pop("max_steps", STEPS),
            per_device_train_batch_size=BATCH,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
            **kw,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data or _dataset(),
            callbacks=callbacks,
            compute_loss_func=compute_loss_func,
        )
        if setup is not None:
            setup(trainer)
        with warnings.catch_warnings():
            if strict:
                warnings.simplefilter("error", cl.analysis.MeasurementFailedWarning)
            trainer.train()
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("hf")
    cb = diagnostics_callback(every=EVERY)
    spy, recorder = Spy(cb), Recorder()
    # integrations come before user callbacks in the Trainer's list: so does the recorder
    measured = _train(tmp / "with", [recorder, cb, spy])
    plain = _train(tmp / "without", [])
    return {"cb": cb, "spy": spy, "recorder": recorder, "measured": measured, "plain": plain}


def _curvlab_entries(trainer: Trainer) -> list[dict[str, Any]]:
    return [e for e in trainer.state.log_history if any(k.startswith("curvlab/") for k in e)]


def _trainer_logs(trainer: Trainer) -> list[dict[str, Any]]:
    return [e for e in trainer.state.log_history if not any(k.startswith("curvlab/") for k in e)]


def test_values_are_logged_with_their_step(runs: dict[str, Any]) -> None:
    entries = _curvlab_entries(runs["measured"])
    assert [e["step"] for e in entries] == [2, 4]
    for e in entries:
        for q in DEFAULT:
            assert math.isfinite(e[f"curvlab/{q}"]), (q, e)
        assert all(isinstance(v, float) for k, v in e.items() if k.startswith("curvlab/"))
    # the integrations' on_log saw the same values, at the measured global step
    seen = [(s, logs) for s, logs in runs["recorder"].logs if "curvlab/loss" in logs]
    assert [s for s, _ in seen] == [2, 4]
    for (_, logs), e in zip(seen, entries):
        assert logs == {k: v for k, v in e.items() if k != "step"}
    # the Trainer's own logs: every step's loss, as without the callback
    assert [e.get("step") for e in _trainer_logs(runs["measured"])] == [
        e.get("step") for e in _trainer_logs(runs["plain"])
    ]
    # per-layer values stay in the Diagnostics records, keyed by the model's own module names
    per_layer = runs["cb"].diagnostics.records[0]["per_layer"]["trace_fisher"]
    names = {n for n, _ in runs["measured"].model.named_modules()}
    assert per_layer and set(per_layer) <= names


def test_training_is_bitwise_unchanged(runs: dict[str, Any]) -> None:
    measured, plain = runs["measured"], runs["plain"]
    keys = ("loss", "grad_norm", "learning_rate", "step")
    a = [{k: e.get(k) for k in keys} for e in _trainer_logs(measured)]
    b = [{k: e.get(k) for k in keys} for e in _trainer_logs(plain)]
    assert a == b
    sa, sb = measured.model.state_dict(), plain.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert measured.model.training == plain.model.training
    assert not measured.model._forward_pre_hooks  # the capture hook is gone
    for m in measured.model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_it_measures_the_steps_own_batch_after_the_update(runs: dict[str, Any]) -> None:
    spy = runs["spy"]
    assert [c["step"] for c in spy.calls] == [2, 4]
    for c in spy.calls:
        batch = spy.batches[c["step"] - 1]  # one model call per step: step s is call s
        assert set(c["inputs"]) == {"input_ids", "attention_mask"}
        for k, v in c["inputs"].items():
            assert torch.equal(v, batch[k])
        assert torch.equal(c["targets"], causal_lm_targets(batch["labels"]))
    final = runs["measured"].model.state_dict()
    last = spy.calls[-1]["params"]
    assert all(torch.equal(last[k], final[k]) for k in final)  # step 4 is the last update


def _model_at(params: dict[str, torch.Tensor], cls: type = GPT2LMHeadModel) -> nn.Module:
    with torch.random.fork_rng():
        model = cls(_config(num_labels=3) if cls is not GPT2LMHeadModel else _config())
    model.load_state_dict(params)
    return model.eval()


def test_values_equal_direct_curvlab_calls(runs: dict[str, Any]) -> None:
    spy, entries = runs["spy"], _curvlab_entries(runs["measured"])
    # a Diagnostics of our own, fed the same batches and parameters in the same order (its
    # label generator advances the same way), gives the same numbers
    model = _model_at(spy.calls[0]["params"])
    with cl.Diagnostics(model, nn.CrossEntropyLoss(), every=1) as direct:
        for c, e in zip(spy.calls, entries):
            model.load_state_dict(c["params"])
            record = direct.step(c["step"], c["inputs"], c["targets"])
            for q in DEFAULT:
                assert math.isclose(record["values"][q], e[f"curvlab/{q}"], rel_tol=1e-6), q
    # and the loss is the HF model's own loss on that batch with those parameters
    for c, e in zip(spy.calls, entries):
        model = _model_at(c["params"])
        labels = spy.batches[c["step"] - 1]["labels"]
        with torch.no_grad():
            hf = model(**c["inputs"], labels=labels).loss
        assert math.isclose(e["curvlab/loss"], float(hf), rel_tol=1e-6)


def test_causal_lm_objective_is_the_models_own_loss_float64(runs: dict[str, Any]) -> None:
    spy = runs["spy"]
    c = spy.calls[0]
    model = _model_at(c["params"]).double()
    inputs, targets = c["inputs"], c["targets"]
    labels = spy.batches[c["step"] - 1]["labels"]
    assert (labels == -100).any()  # padded rows: ignored labels are part of the check
    with cl.Diagnostics(model, nn.CrossEntropyLoss(), DEFAULT, every=1) as d:
        values = d.step(0, inputs, targets)["values"]
    out = model(**inputs, labels=labels)
    # HF computes its loss from float32 logits (ForCausalLMLoss casts them): 1e-6 against it...
    assert math.isclose(values["loss"], out.loss.item(), rel_tol=1e-6)
    # ...and to float64 precision against its convention written out: logits[:, :-1] against
    # labels[:, 1:], -100 ignored, the mean over the remaining tokens
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    loss = nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(values["loss"] - loss.item()) < 1e-12
    grads = torch.autograd.grad(loss, list(model.parameters()))
    grad_norm = torch.sqrt(sum((g * g).sum() for g in grads)).item()
    assert math.isclose(values["grad_norm"], grad_norm, rel_tol=1e-10)
    # Tr of the empirical Fisher, example by example: l_n = (N / M) * NLL_n (docs/conventions.md)
    n, m = labels.shape[0], int((labels[:, 1:] != -100).sum())
    total = 0.0
    for i in range(n):
        x = {k: v[i : i + 1] for k, v in inputs.items()}
        logits = model(**x).logits[0, :-1]
        nll = nn.functional.cross_entropy(logits, labels[i, 1:], ignore_index=-100, reduction="sum")
        g = torch.autograd.grad(nll * n / m, list(model.parameters()))
        total += sum(float((t * t).sum()) for t in g)
    assert math.isclose(values["trace_empirical_fisher"], total / n, rel_tol=1e-10)


def test_explicit_loss_fn_uses_the_labels_as_they_are(tmp_path: Any) -> None:
    cb = diagnostics_callback(nn.CrossEntropyLoss(), every=EVERY, quantities=["loss", "grad_norm"])
    spy = Spy(cb)
    trainer = _train(
        tmp_path, [cb, spy], model_cls=GPT2ForSequenceClassification, data=_dataset(classes=3)
    )
    entries = _curvlab_entries(trainer)
    assert [e["step"] for e in entries] == [2, 4]
    for c, e in zip(spy.calls, entries):
        assert c["targets"].shape == (BATCH,)
        model = _model_at(c["params"], GPT2ForSequenceClassification)
        with torch.no_grad():
            hf = model(**c["inputs"], labels=c["targets"]).loss
        assert math.isclose(e["curvlab/loss"], float(hf), rel_tol=1e-6)


class NoiseCapture(TrainerCallback):
    """The recipe of docs/training-loops.md (HF Trainer): noisy.capture() around each step's forward/backward."""

    def __init__(self, noisy: NoisyOptimizer) -> None:
        self.noisy = noisy
        self._open: Any = None

    def on_step_begin(self, *a: Any, **kw: Any) -> None:
        self._open = self.noisy.capture()
        self._open.__enter__()

    def on_pre_optimizer_step(self, *a: Any, **kw: Any) -> None:
        self._open.__exit__(None, None, None)
        self._open = None


def test_compute_loss_func_and_noisy_optimizer(tmp_path: Any) -> None:
    # the Trainer pops `labels` for compute_loss_func; the callback reads the targets its loss
    # module is called with, and ignores the model calls NoisyOptimizer makes inside its step
    loss_fn = nn.CrossEntropyLoss()

    def causal_lm_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None):
        return loss_fn(outputs.logits.flatten(0, 1), causal_lm_targets(labels).flatten())

    cb = diagnostics_callback(loss_fn, every=EVERY, quantities=["loss"])
    spy = Spy(cb)
    seen: dict[str, Any] = {}

    def setup(trainer: Trainer) -> None:
        inner = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
        sampler = DiagFisherNoise(large_batch=BATCH, small_batch=2)
        noisy = NoisyOptimizer(inner, sampler, trainer.model, loss_fn, seed=0)
        # the scheduler is built on the inner optimizer (NoisyOptimizer is not a torch Optimizer)
        trainer.optimizer = noisy
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1.0)
        trainer.add_callback(NoiseCapture(noisy))
        trainer.model_accepts_loss_kwargs = False
        seen["noisy"] = noisy

    trainer = _train(tmp_path, [cb, spy], compute_loss_func=causal_lm_loss, setup=setup)
    assert seen["noisy"].steps_taken == STEPS
    entries = _curvlab_entries(trainer)
    assert [e["step"] for e in entries] == [2, 4]
    for c, e in zip(spy.calls, entries):
        batch = spy.batches[c["step"] - 1]
        assert "labels" not in batch
        assert set(c["inputs"]) == {"input_ids", "attention_mask"}
        assert torch.equal(c["inputs"]["input_ids"], batch["input_ids"])
        model = _model_at(c["params"])
        with torch.no_grad():
            own = model(**c["inputs"], labels=_dataset_labels(batch["input_ids"])).loss
        assert math.isclose(e["curvlab/loss"], float(own), rel_tol=1e-6)


def _dataset_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """The labels the dataset holds for these rows (looked up by their token ids)."""
    rows = {tuple(r["input_ids"].tolist()): r["labels"] for r in _dataset()}
    return torch.stack([rows[tuple(x.tolist())] for x in input_ids])


def test_gradient_accumulation_and_bf16(tmp_path: Any) -> None:
    # two micro-batches per step are measured together; under bf16=True accelerate wraps
    # model.forward in autocast, and the measurement (and training) must still be exact
    cb = diagnostics_callback(every=1, quantities=["loss", "trace_fisher"])
    spy = Spy(cb)
    kw: dict[str, Any] = {"max_steps": 2, "gradient_accumulation_steps": 2, "bf16": True}
    trainer = _train(tmp_path / "ga", [cb, spy], **kw)
    plain = _train(tmp_path / "plain", [], **kw)
    entries = _curvlab_entries(trainer)
    assert [e["step"] for e in entries] == [1, 2]
    assert all(math.isfinite(e["curvlab/trace_fisher"]) for e in entries)
    for c, e in zip(spy.calls, entries):
        micro = spy.batches[2 * (c["step"] - 1) : 2 * c["step"]]
        assert torch.equal(c["inputs"]["input_ids"], torch.cat([b["input_ids"] for b in micro]))
        labels = torch.cat([b["labels"] for b in micro])
        model = _model_at(c["params"])  # float32, no autocast: the model's own loss
        with torch.no_grad():
            own = model(**c["inputs"], labels=labels).loss
        assert math.isclose(e["curvlab/loss"], float(own), rel_tol=1e-6)
    assert "forward" in trainer.model.__dict__  # accelerate's autocast wrapper is back
    sa, sb = trainer.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _trainer_logs(trainer) == _trainer_logs(plain)[:-1] + [_trainer_logs(trainer)[-1]]


def test_a_call_without_labels_is_a_measurement_failure(tmp_path: Any) -> None:
    # label smoothing: the Trainer computes the loss itself and calls the model without labels
    cb = diagnostics_callback(every=1, quantities=["loss"])
    with pytest.warns(cl.analysis.MeasurementFailedWarning, match="loss module"):
        trainer = _train(tmp_path, [cb], max_steps=2, label_smoothing_factor=0.1, strict=False)
    assert not _curvlab_entries(trainer)  # nothing measured, training went on
    assert trainer.state.global_step == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"nonsense": 1}, TypeError, "unknown option"),
        ({"quantities": ["nope"]}, ValueError, "unknown quantities"),
        ({"every": 0}, ValueError, "every must be"),
        ({"loss_fn": nn.NLLLoss()}, (TypeError, ValueError), "NLLLoss"),
        ({"csv": True}, ValueError, "log_dir"),
        ({"on_error": "ignore"}, ValueError, "on_error"),
    ],
)
def test_bad_options_fail_before_training(kwargs: dict, error: Any, match: str) -> None:
    with pytest.raises(error, match=match):
        diagnostics_callback(**kwargs)


def test_causal_lm_targets_rejects_classification_labels() -> None:
    with pytest.raises(ValueError, match="loss_fn=torch.nn.CrossEntropyLoss"):
        causal_lm_targets(torch.tensor([0, 1, 2]))


def test_missing_transformers_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # make the import fail
    with pytest.raises(ImportError, match="pip install transformers"):
        diagnostics_callback()


def test_importing_curvlab_does_not_import_transformers() -> None:
    code = (
        "import sys, curvlab, curvlab.analysis, curvlab.analysis.hf\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_causal_lm_loss_says_the_vocabulary_is_last_when_length_equals_vocabulary() -> None:
    """``loss_fn=None``: logits ``(B, T, V)`` with ``T == V`` fit torch's layout too, and positions
    were scored as classes (the logged loss 2.47 against the model's 2.50, B_simple 4.9 against
    3.8). The callback's loss says the classes are last; a plain loss keeps torch's reading."""
    from curvlab.analysis.hf import _causal_lm_loss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=12, n_positions=12)
    ).double()
    model.eval()  # Diagnostics measures in eval mode (no dropout)
    ids = torch.randint(0, 12, (3, 12), generator=torch.Generator().manual_seed(1))
    targets = causal_lm_targets(ids)
    own = model(input_ids=ids, labels=ids).loss.item()
    with cl.Diagnostics(model, _causal_lm_loss(), ["loss"], every=1) as d:
        got = d.step(0, {"input_ids": ids}, targets)["values"]["loss"]
    assert abs(got - own) < 1e-6 * own  # HF casts the logits to float32 for its loss
    with cl.Diagnostics(model, nn.CrossEntropyLoss(), ["loss"], every=1) as d:
        torch_reading = d.step(0, {"input_ids": ids}, targets)["values"]["loss"]
    assert abs(torch_reading - own) > 1e-3  # torch's layout: axis 1 (positions) as classes


def test_a_run_that_raises_holds_no_batches_and_hooks_only_briefly(tmp_path: Any) -> None:
    """Trainer.train() raising inside a measured step skips on_train_end: the callback's hook
    stays only until the model's next training-mode call beyond the step's micro-batches, and
    holds none of the user's later inputs (found in review: the hook stayed for good, keeping
    every later call's inputs)."""
    bad = _dataset()
    for row in bad:
        row["input_ids"] = row["input_ids"].clone()
        row["input_ids"][0] = VOCAB + 5  # an id outside the vocabulary: the step raises
    cb = diagnostics_callback(every=1, quantities=["loss"])
    with pytest.raises(IndexError):
        _train(tmp_path, [cb], data=bad, max_steps=2)
    model = cb._model
    assert model is not None and len(model._forward_pre_hooks) <= 1
    model.train()
    x = torch.randint(1, VOCAB, (2, SEQ))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            model(input_ids=x, labels=x)
    assert cb._calls == [] and len(model._forward_pre_hooks) == 0
