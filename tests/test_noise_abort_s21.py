"""``NoisyOptimizer.abort_capture()``: a capture block entered by hand (the HF Trainer recipe's
callback) and left open by a step that raised inside it (review s21 H).

Before, nothing could close such a block: the capture's hooks stayed on the model and the loss
module, ``torch.compiler.set_stance("force_eager")`` stayed on process-wide, the next model call
raised "called more than once inside one noise-capturing step" and the next ``capture()``
"capture() is already open"."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from curvlab.noise import DiagFisherNoise, FullFisherNoise, NoisyOptimizer

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _stance() -> str:
    import torch._dynamo.eval_frame as eval_frame

    return eval_frame._stance.stance


def _hooks(*modules: nn.Module) -> list[tuple[int, str, tuple[int, ...]]]:
    """Every hook table of ``modules`` and their descendants (the handles' ids)."""
    out = []
    for top in modules:
        for i, m in enumerate(top.modules()):
            out += [(i, name, tuple(getattr(m, name))) for name in HOOKS]
    glob = torch.nn.modules.module
    out.append(
        (-1, "global", tuple(glob._global_forward_hooks) + tuple(glob._global_forward_pre_hooks))
    )
    return out


def _problem(
    sampler: Any,
) -> tuple[nn.Module, nn.Module, NoisyOptimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), sampler, model, loss_fn, seed=0
    )
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, loss_fn, noisy, X, y


def _step(
    noisy: NoisyOptimizer, model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor
) -> None:
    noisy.zero_grad()
    with noisy.capture():
        loss_fn(model(X), y).backward()
    noisy.step()


SAMPLERS = [
    lambda: DiagFisherNoise(large_batch=8, small_batch=2),
    lambda: FullFisherNoise(large_batch=8, small_batch=2),
]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["diag", "full"])
@pytest.mark.parametrize("where", ["forward", "loss", "backward"])
def test_abort_capture_after_a_raise_leaves_no_trace_and_training_goes_on(sampler, where) -> None:
    # the run that never raised: two steps
    model, loss_fn, noisy, X, y = _problem(sampler())
    _step(noisy, model, loss_fn, X, y)
    _step(noisy, model, loss_fn, X, y)
    expected = [p.detach().clone() for p in model.parameters()]

    model, loss_fn, noisy, X, y = _problem(sampler())
    _step(noisy, model, loss_fn, X, y)
    hooks, stance, state = _hooks(model, loss_fn), _stance(), noisy.generator.get_state()
    assert stance == "default"
    noisy.zero_grad()
    block = noisy.capture()  # as the Trainer callback opens it: entered, never in a `with`
    block.__enter__()
    assert _stance() == "force_eager" and _hooks(model, loss_fn) != hooks  # a capture is open
    handle = None
    with pytest.raises(torch.OutOfMemoryError):
        out = model(X)
        if where == "forward":
            raise torch.OutOfMemoryError("simulated OOM in the forward")
        loss = loss_fn(out, y)
        if where == "loss":
            raise torch.OutOfMemoryError("simulated OOM after the loss")

        def oom(grad: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("simulated OOM in the backward")

        handle = model[2].weight.register_hook(oom)  # raises after the last layer's hooks ran
        loss.backward()
    if handle is not None:
        handle.remove()  # the test's own tensor hook (not the capture's)

    assert noisy.abort_capture() is True
    assert _hooks(model, loss_fn) == hooks  # the capture's hooks are gone
    assert _stance() == stance  # force_eager switched off
    assert torch.equal(noisy.generator.get_state(), state)  # rewound as the block's error path
    assert noisy.steps_taken == 1
    assert noisy.abort_capture() is False  # nothing open any more: a no-op
    block.__exit__(None, None, None)  # the callback closing the aborted block: a no-op
    assert _stance() == stance and _hooks(model, loss_fn) == hooks

    model(X), model(X)  # the model runs as before (no "called more than once" error)
    _step(noisy, model, loss_fn, X, y)  # the batch again (zero_grad clears a partial fold)
    assert noisy.steps_taken == 2
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), q)  # bitwise the run that never raised
    assert _hooks(model, loss_fn) == hooks and _stance() == stance


def test_abort_capture_without_an_open_capture_changes_nothing() -> None:
    model, loss_fn, noisy, X, y = _problem(DiagFisherNoise(large_batch=8, small_batch=2))
    state = noisy.generator.get_state()
    assert noisy.abort_capture() is False
    # a closed capture whose step has not run yet is not an open one: its step still uses it
    with noisy.capture():
        loss_fn(model(X), y).backward()
    assert noisy.abort_capture() is False
    assert torch.equal(noisy.generator.get_state(), state)
    noisy.step()
    assert noisy.steps_taken == 1 and not torch.equal(noisy.generator.get_state(), state)


def test_an_aborted_block_closed_late_leaves_the_next_capture_open() -> None:
    """The old block object, closed (or collected) after a new capture was opened, must not
    close or rewind the new one."""
    model, loss_fn, noisy, X, y = _problem(DiagFisherNoise(large_batch=8, small_batch=2))
    old = noisy.capture()
    old.__enter__()
    model(X)  # the step raised after this
    noisy.abort_capture()
    new = noisy.capture()
    new.__enter__()
    old.__exit__(None, None, None)
    del old
    loss_fn(model(X), y).backward()  # the new capture still records
    new.__exit__(None, None, None)
    state = noisy.generator.get_state()
    noisy.step()
    assert noisy.steps_taken == 1 and not torch.equal(noisy.generator.get_state(), state)


def test_the_hf_example_callback_recovers_from_a_raising_step() -> None:
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(
        "_hf_trainer_example_s21", ROOT / "examples" / "hf_trainer.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    model, loss_fn, noisy, X, y = _problem(DiagFisherNoise(large_batch=8, small_batch=2))
    _step(noisy, model, loss_fn, X, y)
    _step(noisy, model, loss_fn, X, y)
    expected = [p.detach().clone() for p in model.parameters()]

    model, loss_fn, noisy, X, y = _problem(DiagFisherNoise(large_batch=8, small_batch=2))
    hooks, stance = _hooks(model, loss_fn), _stance()
    cb = example.NoiseCapture(noisy)

    def trainer_step(raise_: bool = False) -> None:  # what the Trainer does around the callback
        cb.on_step_begin(None, None, None)
        loss = loss_fn(model(X), y)
        if raise_:
            raise torch.OutOfMemoryError("simulated OOM")
        loss.backward()
        cb.on_pre_optimizer_step(None, None, None)
        noisy.step()
        model.zero_grad()  # as the Trainer does after the step

    cb.on_train_begin(None, None, None)
    trainer_step()
    with pytest.raises(torch.OutOfMemoryError):  # train() raised: on_train_end never comes
        trainer_step(raise_=True)
    cb2 = example.NoiseCapture(noisy)  # a new Trainer, a new callback, the same NoisyOptimizer
    cb2.on_train_begin(None, None, None)
    assert _hooks(model, loss_fn) == hooks and _stance() == stance
    cb = cb2
    trainer_step()
    cb.on_train_end(None, None, None)
    assert noisy.steps_taken == 2
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), q)
    assert _hooks(model, loss_fn) == hooks and _stance() == stance
