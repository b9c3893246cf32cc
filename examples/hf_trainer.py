"""Curvature diagnostics and Fisher noise inside a HuggingFace ``Trainer`` (tiny GPT-2, no download).

Part 1 trains a tiny GPT-2 on generated tokens with
:func:`curvlab.analysis.hf.diagnostics_callback` and prints the ``curvlab/...`` values from
``trainer.state.log_history``. Part 2 trains the same model with
:class:`curvlab.noise.NoisyOptimizer` (diagonal-Fisher noise, Wen et al.) as the Trainer's
optimizer. Needs ``pip install transformers accelerate``; runs in seconds on a CPU.

Run: ``python examples/hf_trainer.py``
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from curvlab.analysis.hf import causal_lm_targets, diagnostics_callback
from curvlab.noise import DiagFisherNoise, NoisyOptimizer

VOCAB, SEQ, BATCH, STEPS = 64, 16, 16, 40


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def token_dataset(n: int = 512) -> list[dict[str, torch.Tensor]]:
    """Sequences that count up by a random stride modulo VOCAB: learnable next-token structure."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(SEQ)) % VOCAB
    mask = torch.ones(SEQ, dtype=torch.long)
    return [{"input_ids": x, "attention_mask": mask, "labels": x.clone()} for x in ids]


def training_args(out: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=3e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],  # e.g. ["tensorboard"]: the curvlab/... values go there too
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )


def print_curvlab(trainer: Trainer) -> None:
    rows = [e for e in trainer.state.log_history if "curvlab/loss" in e]
    names = ["loss", "grad_norm", "trace_fisher", "trace_empirical_fisher", "noise_scale"]
    print("step  " + "  ".join(f"{n:>22s}" for n in names))
    for e in rows:
        print(f"{e['step']:4d}  " + "  ".join(f"{e['curvlab/' + n]:22.4g}" for n in names))


# ---------------------------------------------------------------------------- part 1
def diagnostics(out: str) -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    # loss_fn=None: the causal-LM loss the model computes itself from `labels`
    cb = diagnostics_callback(every=5)
    trainer = Trainer(
        model=model, args=training_args(out), train_dataset=token_dataset(), callbacks=[cb]
    )
    trainer.train()
    print("\n== curvlab values from trainer.state.log_history (parameters after each step)")
    print_curvlab(trainer)
    record = cb.diagnostics.records[-1]  # per-layer values, keyed by the model's module names
    top = sorted(record["per_layer"]["trace_fisher"].items(), key=lambda kv: -kv[1])[:3]
    print("largest per-layer Tr(F) at the last measurement:", [(k, round(v, 3)) for k, v in top])


# ---------------------------------------------------------------------------- part 2
class NoiseCapture(TrainerCallback):
    """Opens ``noisy.capture()`` around each step's forward and backward pass.

    The Trainer calls ``optimizer.step()`` without arguments; inside ``capture()``
    NoisyOptimizer records the step's model inputs and the call of its loss module, and measures
    the curvature from them when ``step()`` comes. One model call per step: no gradient
    accumulation with this recipe.

    A step that raises between the two callbacks (out of memory, a bad batch, Ctrl-C) ends
    ``train()`` with the block still open: its hooks on the model, ``force_eager`` on.
    ``noisy.abort_capture()`` closes it (and rewinds the noise generator); ``on_train_begin``
    calls it, so a new ``train()`` or Trainer with the same ``noisy`` recovers by itself. Call it
    yourself in the ``except`` around ``trainer.train()`` before using the model otherwise.
    """

    def __init__(self, noisy: NoisyOptimizer) -> None:
        self.noisy = noisy
        self._open: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.noisy.abort_capture()  # a block that a raising step of an earlier train() left open
        self._open = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.noisy.abort_capture()  # (a no-op unless a step raised inside its block)
        self._open = self.noisy.capture()
        self._open.__enter__()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None


def noisy_training(out: str) -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    loss_fn = nn.CrossEntropyLoss()  # the module NoisyOptimizer watches

    def causal_lm_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None):
        # the model's own causal-LM loss, computed with loss_fn so that NoisyOptimizer sees it
        logits = outputs.logits
        return loss_fn(logits.flatten(0, 1), causal_lm_targets(labels).flatten())

    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    noisy = NoisyOptimizer(
        inner,
        DiagFisherNoise(large_batch=BATCH, small_batch=4),  # mimic batch-4 gradient noise
        model,
        loss_fn,
        stop_fraction=0.25,  # noise on the first quarter of training (Wen et al.)
        total_steps=STEPS,
        seed=0,
    )
    scheduler = get_linear_schedule_with_warmup(inner, 0, STEPS)  # built on the inner optimizer
    trainer = Trainer(
        model=model,
        args=training_args(out),
        train_dataset=token_dataset(),
        optimizers=(noisy, scheduler),
        compute_loss_func=causal_lm_loss,
        # the Trainer calls the model without `labels` here (compute_loss_func takes them):
        # the diagnostics read the targets loss_fn is called with
        callbacks=[NoiseCapture(noisy), diagnostics_callback(loss_fn, every=5)],
    )
    trainer.model_accepts_loss_kwargs = False  # keep num_items_in_batch out of the model inputs
    trainer.train()
    print(f"\n== NoisyOptimizer: {noisy.steps_taken} steps, noise active: {noisy.noise_active}")
    print_curvlab(trainer)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line (only ``--help``) and run both parts in a temporary folder."""
    parser = argparse.ArgumentParser(
        prog="python examples/hf_trainer.py",
        description=(
            "Curvature diagnostics and Fisher noise inside a HuggingFace Trainer, on a tiny GPT-2 "
            "(no download). Part 1 trains it with curvlab.analysis.hf.diagnostics_callback and "
            "prints the curvlab/... values (loss, gradient norm, Tr(F), Tr(empirical F), noise "
            "scale) from trainer.state.log_history and the layers with the largest Tr(F). "
            f"Part 2 trains it with curvlab.noise.NoisyOptimizer (diagonal-Fisher noise on the "
            f"first quarter of {STEPS} steps, Wen et al.) as the Trainer's optimizer. Needs "
            "'pip install transformers accelerate'; runs in seconds on a CPU and writes "
            "nothing outside a temporary folder."
        ),
    )
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        diagnostics(f"{tmp}/diagnostics")
        noisy_training(f"{tmp}/noisy")


if __name__ == "__main__":
    main()
