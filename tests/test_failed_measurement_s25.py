"""A ``Diagnostics`` measurement that raises puts back what it advanced (review s25, FP-1).

A measurement that raised (``on_error="raise"``, or an interrupt under any ``on_error``) recorded
nothing, and the docs promise that the retry at its step measures it, but the Monte-Carlo
generator (``trace_fisher``'s labels, ``noise_scale_hessian``'s signs), the counts the probes of
``trace_hessian``, ``top_eigenvalues``, ``spectral_density`` and ``sharpness`` are seeded from,
and the sharpness warm start stayed advanced: the retry drew the next labels and probes
(``trace_fisher`` 1.7015 for the uninterrupted 1.2978, ``trace_hessian`` 1.7082 for 2.3759), every
later measurement was shifted by one, and so was the ``state_dict()`` a checkpoint saves. The
retry, the later steps and the state are now bitwise those of the run without the failure. The
HF and Lightning callbacks hold the same ``Diagnostics``: the state they carry on after a step
that raised is the restored one.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian

import curvlab as cl

QUANTITIES = [
    "loss",
    "grad_norm",
    "trace_fisher",
    "trace_hessian",
    "top_eigenvalues",
    "spectral_density",
    "sharpness",
    "noise_scale_hessian",
]
TIMES = ("time", "cost_s")  # wall-clock fields: the only ones two runs may differ in
STEPS, FAILS_AT = 4, 2


class Simulated(RuntimeError):
    """Stands in for an out-of-memory error inside a measurement's pass."""


def _model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(STEPS)
    ]


class _Failing:
    """A forward hook on the first layer: counts the measurement's (eval-mode) forward passes and,
    while armed, raises ``error`` from the ``at``-th of them on (a failing pass that a fast path
    hands over fails in the pass it hands over to as well)."""

    def __init__(self, at: int | None = None, error: type[BaseException] = Simulated) -> None:
        self.at, self.error, self.armed, self.seen = at, error, False, 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training:  # the training step's own forward
            return
        self.seen += 1
        if self.armed and self.at is not None and self.seen >= self.at:
            raise self.error("out of memory (simulated)")


def _state(diag: cl.Diagnostics) -> dict[str, Any]:
    """``diag.state_dict()`` without the token naming its saver (two Diagnostics differ there)."""
    return {k: v for k, v in diag.state_dict().items() if k != "records_of"}


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested records and states (tensors exactly, floats as bits)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) - set(TIMES) == set(b) - set(TIMES), where
        for k in set(a) - set(TIMES):
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def _run(
    hook: _Failing, on_error: str = "raise", retry: bool = True
) -> tuple[cl.Diagnostics, list[dict[str, Any]], dict[str, Any] | None, dict[str, Any] | None]:
    """Train ``STEPS`` SGD steps, measuring every step; at step ``FAILS_AT`` the hook is armed for
    the first attempt, whose exception is caught (the state before it and after it kept); the
    retry at that step follows (``retry``), and training goes on.

    Returns:
        The Diagnostics, the records of the steps, the state before and after the failed attempt.
    """
    model, batches = _model(), _batches()
    model[0].register_forward_hook(hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = cl.Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        QUANTITIES,
        every=1,
        seed=0,
        on_error=on_error,
        optimizer=opt,
        options={"num_probes": 4, "num_steps": 8, "num_probes_density": 2},
    )
    records, before, after = [], None, None
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        hook.seen = 0
        if step == FAILS_AT and hook.at is not None:
            before, hook.armed = _state(diag), True
            with pytest.raises(hook.error, match="simulated"):
                diag.step(step, x, y)
            hook.armed, after = False, _state(diag)
            if not retry:
                continue
        records.append(diag.step(step, x, y))
    return diag, records, before, after


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[cl.Diagnostics, list[dict[str, Any]], int]:
    counting = _Failing()
    diag, records, _, _ = _run(counting)
    return diag, records, counting.seen  # the last measurement's forward passes


@pytest.mark.parametrize(
    "at, error, on_error",
    [
        (1, Simulated, "raise"),  # in the first pass
        (4, Simulated, "raise"),  # after the labels and the first probe count were drawn
        (-1, Simulated, "raise"),  # in the last pass: after sharpness replaced its warm start
        (-1, KeyboardInterrupt, "warn"),  # an interrupt propagates under on_error="warn" too
        (5, KeyboardInterrupt, "raise"),
    ],
)
def test_the_retry_and_every_later_step_are_the_uninterrupted_runs(
    uninterrupted: tuple[cl.Diagnostics, list[dict[str, Any]], int],
    at: int,
    error: type[BaseException],
    on_error: str,
) -> None:
    ref_diag, ref_records, passes = uninterrupted
    assert passes >= 5  # the fail points are inside the measurement
    hook = _Failing(passes if at == -1 else at, error)
    diag, records, before, after = _run(hook, on_error)
    _assert_same(after, before, "state after the failed attempt")  # state_dict() unshifted
    assert len(records) == len(ref_records) == STEPS and diag.events == []
    for mine, ref in zip(records, ref_records):
        _assert_same(mine, ref, f"step {ref['step']}")
    _assert_same(_state(diag), _state(ref_diag), "final state")


def test_a_state_saved_after_the_failure_resumes_the_uninterrupted_run(
    uninterrupted: tuple[cl.Diagnostics, list[dict[str, Any]], int],
) -> None:
    """The checkpoint a loop saves after the failed step (before the retry) resumes, in a new
    ``Diagnostics``, with the uninterrupted run's measurements of that step and the next."""
    _, ref_records, passes = uninterrupted
    hook = _Failing(passes, Simulated)
    _, _, _, after = _run(hook, retry=False)
    model, batches = _model(), _batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    resumed = cl.Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        QUANTITIES,
        every=1,
        seed=0,
        optimizer=opt,
        options={"num_probes": 4, "num_steps": 8, "num_probes_density": 2},
    )
    assert after is not None
    resumed.load_state_dict(after)
    records = []
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step >= FAILS_AT:
            records.append(resumed.step(step, x, y))
    for mine, ref in zip(records, ref_records[FAILS_AT:], strict=True):
        _assert_same(mine, ref, f"step {ref['step']}")


def test_the_retried_values_are_the_dense_float64_ones(
    uninterrupted: tuple[cl.Diagnostics, list[dict[str, Any]], int],
) -> None:
    """The retry's exact quantities against dense float64 brute force (torch.func)."""
    _, _, passes = uninterrupted
    _, records, _, _ = _run(_Failing(passes, Simulated))
    model, batches = _model(), _batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(batches):  # the parameters the step measures
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step == FAILS_AT:
            break
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    shapes = {k: v.shape for k, v in params.items()}

    def loss(flat: torch.Tensor) -> torch.Tensor:
        split, i = {}, 0
        for k, s in shapes.items():
            n = math.prod(s)
            split[k] = flat[i : i + n].view(s)
            i += n
        return nn.functional.cross_entropy(functional_call(model, split, (x,)), y)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    eig = torch.linalg.eigvalsh(hessian(loss)(flat)).flip(0)
    values = records[FAILS_AT]["values"]
    assert records[FAILS_AT]["step"] == FAILS_AT
    assert values["loss"] == pytest.approx(float(loss(flat)), rel=1e-12)
    assert values["grad_norm"] == pytest.approx(float(grad(loss)(flat).norm()), rel=1e-12)
    assert values["top_eigenvalues"] == pytest.approx(eig[:5].tolist(), rel=1e-8, abs=1e-10)
    residual = values["sharpness_residual"]  # |λ - λ_max| <= the Ritz residual
    assert abs(values["sharpness"] - float(eig[0])) <= residual * (1 + 1e-9)


def test_a_failure_recorded_under_warn_is_a_measured_step() -> None:
    """Under ``on_error="warn"`` a failure that is recorded (the record's ``"errors"``, a
    ``measurement_failed`` event) ends its step: the step is not measured again, and what the
    step drew stays drawn, the failed quantity's probe count too (docs/analysis.md)."""
    hook = _Failing(2, Simulated)  # trace_hessian's pass, after trace_fisher drew its labels
    model, (x, y) = _model(), _batches()[0]
    model[0].register_forward_hook(hook)
    quantities = ["trace_fisher", "trace_hessian"]
    diag = cl.Diagnostics(model, nn.CrossEntropyLoss(), quantities, every=1, seed=0)
    ref = cl.Diagnostics(_model(), nn.CrossEntropyLoss(), quantities, every=1, seed=0)
    diag.step(0, x, y), ref.step(0, x, y)  # the first measurement's one-off checks
    before = _state(diag)
    hook.seen, hook.armed = 0, True
    with pytest.warns(cl.analysis.MeasurementFailedWarning, match="simulated"):
        record = diag.step(1, x, y)
    hook.armed = False
    assert record is not None and set(record["errors"]) == {"trace_hessian"}
    assert record["values"]["trace_fisher"] == ref.step(1, x, y)["values"]["trace_fisher"]
    assert [e["event"] for e in diag.events] == ["measurement_failed"]
    assert diag.step(1, x, y) is None and len(diag.records) == 2  # the step is done
    after = _state(diag)
    assert after["seen_step"] == 1 and before["seen_step"] == 0
    assert not torch.equal(after["generator"], before["generator"])  # the labels stay drawn
    assert after["warm"] == {"seeds_drawn/trace_hessian": 2} == _state(ref)["warm"]
    assert torch.equal(after["generator"], _state(ref)["generator"])


# ---------------------------------------------------------------- the callbacks


def test_lightning_callback_carries_the_restored_state(tmp_path: Any) -> None:
    """A Lightning fit whose measurement raises stops with the callback's ``Diagnostics`` state
    as it was before that measurement (what an ``OnExceptionCheckpoint`` saves and a continued
    fit carries on)."""
    L = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from curvlab.analysis.lightning import diagnostics_callback

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = diagnostics_callback(
        nn.CrossEntropyLoss(),
        model_attr="net",
        every=1,
        quantities=["trace_fisher", "trace_hessian", "sharpness"],
        seed=0,
        on_error="raise",
        options={"num_probes": 4},
    )
    hook = _Failing(3, Simulated)  # the third pass: sharpness's, after the others drew
    seen: dict[str, Any] = {}

    class Before(L.Callback):  # runs before the curvlab callback: the state before its step
        def on_train_batch_end(self, trainer: Any, module: Any, *a: Any) -> None:
            hook.seen = 0
            if trainer.global_step == 3:
                seen["before"] = _state(cb.diagnostics)
                hook.armed = True

    class After(L.Callback):  # runs after it: the continued fit's Diagnostics as made
        def on_train_start(self, trainer: Any, module: Any) -> None:
            if "before" in seen:
                seen["continued"] = _state(cb.diagnostics)

    net = Net()
    net.net[0].register_forward_hook(hook)
    x, y = _batches()[0]
    loader = DataLoader(TensorDataset(x.repeat(3, 1), y.repeat(3)), batch_size=4)
    trainer = L.Trainer(
        callbacks=[Before(), cb, After()],
        max_steps=4,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with pytest.raises(Simulated):
        trainer.fit(net, loader)
    hook.armed = False
    assert [r["step"] for r in cb.diagnostics.records] == [1, 2]
    _assert_same(_state(cb.diagnostics), seen["before"], "after the failed step")
    _assert_same(
        cb.state_dict()["diagnostics"] | {"records_of": None}, seen["before"] | {"records_of": None}
    )
    trainer.fit_loop.epoch_loop.max_steps = 5  # the Trainer's run goes on
    trainer.fit(net, loader)
    _assert_same(seen["continued"], seen["before"], "the continued fit's Diagnostics")


def test_hf_callback_keeps_the_restored_state(tmp_path: Any) -> None:
    """A transformers Trainer whose measured step raises stops with the callback's
    ``Diagnostics`` state as it was before that step's measurement."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from curvlab.analysis.hf import diagnostics_callback

    cb = diagnostics_callback(
        every=1,
        quantities=["trace_fisher", "trace_hessian"],
        seed=0,
        on_error="raise",
        options={"num_probes": 2},
    )
    seen: dict[str, Any] = {}
    hook = _Failing(2, Simulated)  # trace_hessian's pass, after trace_fisher drew its labels

    class Before(TrainerCallback):  # runs before the curvlab callback
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            hook.seen = 0
            if state.global_step == 2:
                seen["before"] = _state(cb.diagnostics)
                hook.armed = True

    def fail(module: nn.Module, args: Any, kwargs: Any) -> None:
        hook(module, args, None)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (12, 8), generator=g)
    data = [{"input_ids": r, "labels": r.clone()} for r in ids]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=1,
            n_head=2,
            n_embd=8,
            vocab_size=50,
            n_positions=8,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(config)
        model.register_forward_pre_hook(fail, with_kwargs=True)
        args = TrainingArguments(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to=[],
            max_steps=3,
            per_device_train_batch_size=4,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Before(), cb])
        with pytest.raises(Simulated):
            trainer.train()
    assert [r["step"] for r in cb.diagnostics.records] == [1]
    _assert_same(_state(cb.diagnostics), seen["before"], "after the failed step")
