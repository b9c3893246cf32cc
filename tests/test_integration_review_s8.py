"""Review s8 of the training-loop integrations (``curvlab.analysis.hf`` and ``.lightning``).

* ``loss_fn=None`` on an encoder-decoder model (T5) measured the causal-LM objective (labels
  shifted by one), 4.0497 against T5's own 4.0767: now refused before any step; with
  ``loss_fn=nn.CrossEntropyLoss()`` the measured loss is T5's own, also when the batch has no
  ``decoder_input_ids`` (the measurement derives them as the model does).
* Under gradient accumulation the Trainer's gradient can be ``k`` times the measured
  objective's (a ``compute_loss_func``, a head whose loss ignores ``num_items_in_batch``): the
  callback says so (a warning and ``diagnostics.info``), and the documented factors are checked
  against the Trainer's own accumulated gradient.
* ``critical_sharpness`` does not model gradient clipping: the callback warns when the Trainer
  clips, and the documented reading (``c λ_c`` for SGD) is checked by brute force.
* The Lightning callback unpacked every step's batch as ``(inputs, targets)`` outside its error
  handling: a ``(x, y, index)`` batch stopped training at step 1 even with ``every=1000``.
* docs/training-loops.md: where the recording hook lives, and packed batches (one example).
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.analysis import MeasurementFailedWarning

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 50, 16


# ---------------------------------------------------------------------- HF helpers
def _hf() -> Any:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    import transformers

    return transformers


def _gpt2_config(**kw: Any) -> Any:
    tf = _hf()
    return tf.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        **kw,
    )


def _t5_config(vocab: int = 40) -> Any:
    tf = _hf()
    return tf.T5Config(
        vocab_size=vocab,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        dropout_rate=0.0,
    )


def _lm_rows(n: int = 16, classes: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Unpadded rows: every micro-batch counts equally many tokens (the documented factors are
    then exact)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    rows = []
    for i in range(n):
        labels = torch.tensor(i % classes) if classes else ids[i].clone()
        mask = torch.ones(SEQ, dtype=torch.long)
        rows.append({"input_ids": ids[i], "attention_mask": mask, "labels": labels})
    return rows


def _t5_rows(
    n: int = 16, decoder_inputs: bool = True, vocab: int = 40, length: int = 6
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        labels = torch.randint(1, vocab, (length,), generator=g)
        if i % 3 == 0:
            labels[-2:] = -100  # padded targets, ignored
        row = {
            "input_ids": torch.randint(1, vocab, (10,), generator=g),
            "attention_mask": torch.ones(10, dtype=torch.long),
            "labels": labels,
        }
        if decoder_inputs:  # what DataCollatorForSeq2Seq(model=...) adds
            start = torch.zeros(1, dtype=torch.long)
            row["decoder_input_ids"] = torch.cat([start, labels[:-1].clamp(min=0)])
        rows.append(row)
    return rows


class _Spy:
    """Records what the callback hands to Diagnostics.step, with the parameters it measures at."""

    def __init__(self, cb: Any) -> None:
        self.cb = cb
        self.calls: list[dict[str, Any]] = []

    def callback(self) -> Any:
        tf, spy = _hf(), self

        class SpyCallback(tf.TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw):
                original = spy.cb.diagnostics.step

                def step(s: int, inputs: Any, targets: Any) -> Any:
                    spy.calls.append(
                        {
                            "inputs": {k: v.clone() for k, v in inputs.items()},
                            "targets": targets.clone(),
                            "params": copy.deepcopy(model.state_dict()),
                        }
                    )
                    return original(s, inputs, targets)

                spy.cb.diagnostics.step = step

        return SpyCallback()


class _GradGrab:
    """The Trainer's accumulated gradient of step 1 (before the optimizer step) and the
    parameters it belongs to."""

    def callback(self) -> Any:
        tf, grab = _hf(), self

        class Grab(tf.TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw):
                if state.global_step == 0:
                    grab.params = copy.deepcopy(model.state_dict())

            def on_pre_optimizer_step(self, args, state, control, model: Any = None, **kw):
                if state.global_step == 0:
                    grab.grads = {
                        n: p.grad.detach().clone()
                        for n, p in model.named_parameters()
                        if p.grad is not None
                    }

        return Grab()


def _trainer(
    tmp: Path,
    model: nn.Module,
    rows: list[dict[str, torch.Tensor]],
    callbacks: list[Any],
    setup: Any = None,
    compute_loss_func: Any = None,
    **kw: Any,
) -> Any:
    tf = _hf()
    args = tf.TrainingArguments(
        output_dir=str(tmp),
        use_cpu=True,
        report_to=[],
        max_steps=kw.pop("max_steps", 1),
        per_device_train_batch_size=kw.pop("per_device_train_batch_size", 4),
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kw,
    )
    trainer = tf.Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        callbacks=callbacks,
        compute_loss_func=compute_loss_func,
    )
    if setup is not None:
        setup(trainer)
    return trainer


def _entries(trainer: Any) -> list[dict[str, Any]]:
    return [e for e in trainer.state.log_history if "curvlab/loss" in e]


# ---------------------------------------------------------------------- 1. encoder-decoder
def test_loss_fn_none_refuses_an_encoder_decoder_model_before_any_step(tmp_path: Path) -> None:
    tf = _hf()
    from curvlab.analysis.hf import diagnostics_callback

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tf.T5ForConditionalGeneration(_t5_config())
        before = copy.deepcopy(model.state_dict())
        trainer = _trainer(tmp_path, model, _t5_rows(), [diagnostics_callback(every=1)])
        with pytest.raises(ValueError, match="encoder-decoder") as info:
            trainer.train()
    assert "loss_fn=torch.nn.CrossEntropyLoss()" in str(info.value)
    assert "T5ForConditionalGeneration" in str(info.value)
    assert trainer.state.global_step == 0  # no step was taken
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("decoder_inputs", "vocab", "length"),
    [(True, 40, 6), (False, 40, 6), (True, 8, 8)],
    ids=["decoder_input_ids", "labels", "length equals vocabulary"],
)
def test_cross_entropy_on_t5_is_its_own_loss(
    tmp_path: Path, decoder_inputs: bool, vocab: int, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``loss_fn=nn.CrossEntropyLoss()`` measures T5's own loss; without ``decoder_input_ids``
    in the batch (the model derives them from ``labels``) the measurement failed, and with as
    many decoder positions as classes torch's layout fits too (the callback says the classes are
    last for an encoder-decoder model)."""
    tf = _hf()
    from curvlab.analysis.hf import diagnostics_callback

    cb = diagnostics_callback(nn.CrossEntropyLoss(), every=1, quantities=["loss", "grad_norm"])
    spy = _Spy(cb)
    rows = _t5_rows(decoder_inputs=decoder_inputs, vocab=vocab, length=length)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tf.T5ForConditionalGeneration(_t5_config(vocab))
        trainer = _trainer(tmp_path, model, rows, [cb, spy.callback()])
        with warnings.catch_warnings():
            warnings.simplefilter("error", MeasurementFailedWarning)
            trainer.train()
    (entry,) = _entries(trainer)
    (call,) = spy.calls
    inputs, targets = call["inputs"], call["targets"]
    assert set(inputs) == {"input_ids", "attention_mask", "decoder_input_ids"}
    assert (targets == -100).any()  # ignored labels are part of the check
    # T5's own loss on the measured batch at the measured (updated) parameters
    with torch.random.fork_rng():
        check = tf.T5ForConditionalGeneration(_t5_config(vocab))
    check.load_state_dict(call["params"])
    check.eval()
    encoder = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    with torch.no_grad():
        own = check(**encoder, labels=targets)
        torch.testing.assert_close(own.logits, check(**inputs).logits)  # same decoder inputs
    assert math.isclose(entry["curvlab/loss"], own.loss.item(), rel_tol=1e-6)
    # float64: the loss and its gradient, written out, to 1e-12. T5LayerNorm computes its
    # variance in float32 whatever the dtype (the gradient norms then differ by 2e-9): here in
    # float64, so that the comparison is one of float64 computations
    from transformers.models.t5 import modeling_t5

    def layer_norm(self: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return (
            self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", layer_norm)
    check = check.double()
    loss_fn = cb.diagnostics.loss_fn  # the callback's (classes in the last axis)
    with cl.Diagnostics(check, loss_fn, ["loss", "grad_norm"], every=1) as d:
        values = d.step(0, inputs, targets)["values"]
    logits = check(**inputs).logits
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert abs(values["loss"] - loss.item()) < 1e-12
    assert abs(check(**encoder, labels=targets).loss.item() - loss.item()) < 1e-12
    grads = torch.autograd.grad(loss, [p for p in check.parameters() if p.requires_grad])
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    assert math.isclose(values["grad_norm"], norm, rel_tol=1e-10)


def test_t5_with_gradient_accumulation_says_its_loss_ignores_the_count(tmp_path: Path) -> None:
    tf = _hf()
    from curvlab.analysis.hf import diagnostics_callback

    cb = diagnostics_callback(nn.CrossEntropyLoss(), every=1, quantities=["loss"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tf.T5ForConditionalGeneration(_t5_config())
        trainer = _trainer(
            tmp_path, model, _t5_rows(), [cb], gradient_accumulation_steps=2, max_grad_norm=0
        )
        with pytest.warns(RuntimeWarning, match="T5ForConditionalGeneration's loss is a per-micro"):
            trainer.train()
    assert "2 x" in cb.diagnostics.info["gradient_accumulation"]


# ---------------------------------------------------------------------- 2. accumulation
def _accumulation_run(tmp: Path, setup_name: str) -> tuple[Any, Any, _Spy, _GradGrab, Any]:
    tf = _hf()
    from curvlab.analysis.hf import causal_lm_targets, diagnostics_callback

    ce = nn.CrossEntropyLoss()
    compute_loss_func = setup = None
    loss_fn: nn.Module | None = ce
    classes = None
    model_cls = tf.GPT2LMHeadModel
    if setup_name in ("compute_loss_func", "compute_loss_func, not scaled"):

        def compute_loss_func(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
            return ce(outputs.logits.flatten(0, 1), causal_lm_targets(labels).flatten())

        if setup_name == "compute_loss_func, not scaled":

            def setup(trainer: Any) -> None:
                trainer.loss_is_scaled_for_ga = False

    elif setup_name == "sequence classification":
        classes, model_cls = 3, tf.GPT2ForSequenceClassification
    else:  # the causal LM's own loss
        loss_fn = None
    cb = diagnostics_callback(loss_fn, every=1, quantities=["loss"])
    spy, grab = _Spy(cb), _GradGrab()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_cls(_gpt2_config(num_labels=classes) if classes else _gpt2_config())
        trainer = _trainer(
            tmp,
            model,
            _lm_rows(classes=classes),
            [grab.callback(), cb, spy.callback()],
            setup=setup,
            compute_loss_func=compute_loss_func,
            gradient_accumulation_steps=2,
            max_grad_norm=0,  # the accumulated gradient as it is
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    return trainer, cb, spy, grab, caught


def _objective_gradient(model: nn.Module, params: dict, inputs: dict, targets: torch.Tensor):
    """``∇L`` of the measured objective (the mean over the concatenated micro-batches)."""
    model.load_state_dict(params)
    model.eval()
    logits = model(**inputs).logits
    if logits.ndim == 3:
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    loss = nn.functional.cross_entropy(logits, targets)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


@pytest.mark.parametrize(
    ("setup_name", "factor", "warns"),
    [
        ("compute_loss_func", 2.0, "compute_loss_func's loss by 2"),
        ("sequence classification", 2.0, "ignores num_items_in_batch"),
        ("compute_loss_func, not scaled", 1.0, None),
        ("causal LM", 15 / 16, None),  # (shifted tokens) / (all labels) for GPT2LMHeadModel
    ],
)
def test_accumulated_gradient_against_the_measured_objective(
    tmp_path: Path, setup_name: str, factor: float, warns: str | None
) -> None:
    """docs/training-loops.md, "Gradient accumulation: what the Trainer trains": the Trainer's
    accumulated gradient is ``factor`` times the gradient of the measured objective (the mean
    over the concatenated micro-batches), element by element; the callback warns exactly where
    the factor is not the documented 1 (or the causal LM's count ratio)."""
    trainer, cb, spy, grab, caught = _accumulation_run(tmp_path, setup_name)
    (call,) = spy.calls
    assert call["inputs"]["input_ids"].shape[0] == 8  # two micro-batches of 4, concatenated
    model = copy.deepcopy(trainer.model)
    want = _objective_gradient(model, grab.params, call["inputs"], call["targets"])
    assert set(want) == set(grab.grads)
    for n, g in want.items():
        torch.testing.assert_close(grab.grads[n], factor * g, rtol=1e-4, atol=1e-7)
    notes = [str(w.message) for w in caught if "gradient_accumulation_steps=2" in str(w.message)]
    info = cb.diagnostics.info["gradient_accumulation"]
    if warns is None:
        assert notes == []
        assert "2 x" not in info
    else:
        assert len(notes) == 1 and warns in notes[0] and "2 x" in notes[0]
        assert warns in info


# ---------------------------------------------------------------------- 4. clipping
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_critical_sharpness_under_the_trainers_clipping_is_flagged(
    tmp_path: Path, max_grad_norm: float
) -> None:
    tf = _hf()
    from curvlab.analysis.hf import diagnostics_callback

    cb = diagnostics_callback(nn.CrossEntropyLoss(), every=1, quantities=["critical_sharpness"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tf.GPT2ForSequenceClassification(_gpt2_config(num_labels=3))
        trainer = _trainer(tmp_path, model, _lm_rows(classes=3), [cb], max_grad_norm=max_grad_norm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    flagged = [str(w.message) for w in caught if "max_grad_norm" in str(w.message)]
    if max_grad_norm > 0:
        assert len(flagged) == 1 and "max_grad_norm=1" in flagged[0]
        assert "c·critical_sharpness > 2/lr" in cb.diagnostics.info["gradient_clipping"]
    else:
        assert flagged == [] and "gradient_clipping" not in cb.diagnostics.info


def test_clipped_sgd_step_is_read_by_c_times_critical_sharpness() -> None:
    """docs/analysis.md: for SGD the clipped step is ``c = max_norm/‖g‖`` times the modelled
    update; ``λ_c`` along it is ``c λ_c`` (brute force: the first rise of the loss along the
    clipped update), and that, not ``λ_c``, says whether the step raises the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    X, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    loss_fn, clip, lr = nn.CrossEntropyLoss(), 0.1, 18.0
    opt = torch.optim.SGD(model.parameters(), lr=3.0)

    def step(m: nn.Module, o: torch.optim.Optimizer) -> float:
        o.zero_grad()
        loss_fn(m(X), y).backward()
        norm = float(nn.utils.clip_grad_norm_(m.parameters(), clip))
        o.step()
        return norm

    for _ in range(3):
        step(model, opt)
    for group in opt.param_groups:
        group["lr"] = lr
    with cl.Diagnostics(
        model, loss_fn, ["critical_sharpness", "grad_norm"], every=1, optimizer=opt
    ) as diag:
        values = diag.step(0, X, y)["values"]
    lam, threshold = values["critical_sharpness"], values["critical_sharpness_threshold"]
    c = min(1.0, clip / values["grad_norm"])
    assert c < 1 and lam > threshold > c * lam  # unclipped reading: "the step raises the loss"
    # brute force: the first step size along the clipped update at which the loss rises
    params = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))
    direction = [-c * g for g in grads]  # the clipped step per unit learning rate
    flat = torch.func.functional_call

    def loss_at(eta: float) -> float:
        names = [n for n, _ in model.named_parameters()]
        moved = {n: p + eta * d for n, p, d in zip(names, params, direction)}
        with torch.no_grad():
            return float(loss_fn(flat(model, moved, (X,)), y))

    l0 = loss_at(0.0)
    grid = [i * 0.05 for i in range(1, 2000)]
    eta_c = next(e for e in grid if loss_at(e) > l0)
    lo, hi = eta_c - 0.05, eta_c
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if loss_at(mid) > l0 else (mid, hi)
    assert math.isclose(2.0 / hi, c * lam, rel_tol=2e-2)
    # the step the loop takes (clipped) lowers the loss, as c·λ_c < 2/η says
    clone, clone_opt = copy.deepcopy((model, opt))
    step(clone, clone_opt)
    with torch.no_grad():
        assert float(loss_fn(clone(X), y)) < l0


# ---------------------------------------------------------------------- 5. Lightning
def _lightning_callback(monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Any:
    import curvlab.analysis.lightning as lightning

    monkeypatch.setattr(lightning, "_callback_base", lambda: object)
    return lightning.diagnostics_callback(nn.CrossEntropyLoss(), **kw)


def _lightning_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Any]:
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    trainer = type("Trainer", (), {"global_step": 0, "optimizers": []})()
    return net, X, y, trainer


@pytest.mark.parametrize(
    ("batch_of", "structure"),
    [
        (lambda X, y: (X, y, torch.arange(len(y))), "a tuple of 3 (Tensor(8, 3), Tensor(8,)"),
        (lambda X, y: {"x": X, "y": y}, "a dict with keys ['x', 'y']"),
    ],
    ids=["(x, y, index)", "dict"],
)
def test_lightning_reads_the_batch_on_measured_steps_only(
    monkeypatch: pytest.MonkeyPatch, batch_of: Any, structure: str
) -> None:
    net, X, y, trainer = _lightning_problem()
    batch = batch_of(X, y)
    cb = _lightning_callback(monkeypatch, every=1000)
    cb.on_train_start(trainer, net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # step 1 is not measured: nothing at all happens
        trainer.global_step = 1
        cb.on_train_batch_end(trainer, net, None, batch, 0)
    trainer.global_step = 1000
    with pytest.warns(MeasurementFailedWarning, match="batch_fn") as caught:
        cb.on_train_batch_end(trainer, net, None, batch, 1)
    assert structure in str(caught[0].message)
    assert cb.diagnostics.records == []  # nothing measured, training goes on
    # on_error="raise": the same, as an error, on the measured step only
    cb = _lightning_callback(monkeypatch, every=1000, on_error="raise")
    trainer.global_step = 0
    cb.on_train_start(trainer, net)
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, net, None, batch, 0)
    trainer.global_step = 1000
    with pytest.raises(TypeError, match="not an \\(inputs, targets\\) pair"):
        cb.on_train_batch_end(trainer, net, None, batch, 1)


def test_lightning_batch_fn_gives_the_pair_on_measured_steps(monkeypatch: pytest.MonkeyPatch):
    net, X, y, trainer = _lightning_problem()
    seen: list[Any] = []

    def batch_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(batch)
        return batch["x"], batch["y"]

    cb = _lightning_callback(monkeypatch, every=2, quantities=["loss"], batch_fn=batch_fn)
    cb.on_train_start(trainer, net)
    for step in range(1, 5):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, net, None, {"x": X, "y": y}, step - 1)
    assert [r["step"] for r in cb.diagnostics.records] == [2, 4]
    assert len(seen) == 2  # called on the measured steps only
    with torch.no_grad():
        want = float(nn.functional.cross_entropy(net(X), y))
    assert abs(cb.diagnostics.records[0]["values"]["loss"] - want) < 1e-12
    with pytest.raises(TypeError, match="batch_fn must be callable"):
        _lightning_callback(monkeypatch, batch_fn="x")


# ---------------------------------------------------------------------- 3, 6. the HF doc
def _doc() -> str:
    return " ".join((ROOT / "docs" / "training-loops.md").read_text(encoding="utf-8").split())


def test_the_recording_hook_lives_through_a_measured_step_only(tmp_path: Path) -> None:
    """docs/training-loops.md said the hook was installed in ``on_train_begin`` and removed in
    ``on_train_end``; it is installed in ``on_step_begin`` of a measured step and removed in
    ``on_pre_optimizer_step``."""
    tf = _hf()
    from curvlab.analysis.hf import diagnostics_callback

    counts: dict[str, list[int]] = {"train_begin": [], "step_begin": [], "pre_optimizer": []}

    class Count(tf.TrainerCallback):  # runs after the callback in each event
        def on_train_begin(self, args, state, control, model: Any = None, **kw):
            counts["train_begin"].append(len(model._forward_pre_hooks))

        def on_step_begin(self, args, state, control, model: Any = None, **kw):
            counts["step_begin"].append(len(model._forward_pre_hooks))

        def on_pre_optimizer_step(self, args, state, control, model: Any = None, **kw):
            counts["pre_optimizer"].append(len(model._forward_pre_hooks))

    cb = diagnostics_callback(every=2, quantities=["loss"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(_gpt2_config())
        _trainer(tmp_path, model, _lm_rows(), [cb, Count()], max_steps=4).train()
    assert counts == {"train_begin": [0], "step_begin": [0, 1, 0, 1], "pre_optimizer": [0] * 4}
    doc = _doc()
    assert "in `on_train_begin` and removes it in `on_train_end`" not in doc
    assert "on the model in `on_step_begin` and removes it in `on_pre_optimizer_step`" in doc


def test_a_packed_batch_is_one_example(tmp_path: Path) -> None:
    """``DataCollatorWithFlattening`` packs the step's sequences into one row: one example, whose
    empirical Fisher trace is ``grad_norm²`` (the doc said each sequence was one example)."""
    tf = _hf()
    from curvlab.analysis.hf import diagnostics_callback

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        n = int(torch.randint(5, SEQ, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    cb = diagnostics_callback(every=1, quantities=["loss", "grad_norm", "trace_empirical_fisher"])
    spy = _Spy(cb)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(_gpt2_config())
        trainer = tf.Trainer(
            model=model,
            args=tf.TrainingArguments(
                output_dir=str(tmp_path),
                use_cpu=True,
                report_to=[],
                max_steps=1,
                per_device_train_batch_size=4,
                save_strategy="no",
                disable_tqdm=True,
                remove_unused_columns=False,
            ),
            train_dataset=rows,
            data_collator=tf.DataCollatorWithFlattening(),
            callbacks=[cb, spy.callback()],
        )
        trainer.train()
    (call,) = spy.calls
    assert call["inputs"]["input_ids"].shape[0] == 1  # N = 1
    (entry,) = _entries(trainer)
    fisher, norm = entry["curvlab/trace_empirical_fisher"], entry["curvlab/grad_norm"]
    assert math.isclose(fisher, norm**2, rel_tol=1e-5)
    doc = _doc()
    assert "treat each sequence as one example" not in doc
    assert "**Packed batches are one example.**" in doc
