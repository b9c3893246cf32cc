"""cl.Diagnostics: exact values, bitwise-identical training, crash-safe JSONL, explosion, budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab.analysis._diagnostics as hooks
from curvlab._losses import loss_spec
from curvlab.analysis import Diagnostics, FisherExplosionWarning, MeasurementFailedWarning

ROOT = Path(__file__).resolve().parents[1]


def _cnn(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _data(n: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model, diag=None, steps: int = 12, seed: int = 0):
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(seed)  # dropout draws from the global RNG in the training loop
    for step in range(steps):
        idx = slice((step * 16) % 64, (step * 16) % 64 + 16)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
        if diag is not None:
            diag.step(step, X[idx], y[idx])
    return model


def test_training_is_bitwise_identical_with_and_without_diagnostics(tmp_path):
    plain = _train(_cnn())
    model = _cnn()
    with Diagnostics(model, nn.CrossEntropyLoss(), every=3, log_dir=tmp_path) as diag:
        _train(model, diag)
    assert len(diag.records) == 4
    for (n, a), b in zip(plain.named_parameters(), model.parameters()):
        assert torch.equal(a, b), n
    assert model.training  # mode restored
    assert all(m._forward_hooks == {} and m._backward_hooks == {} for m in model.modules())


def _brute_force(model, loss_fn, X, y):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, x, t):
        return loss_fn(functional_call(model, p, (x.unsqueeze(0),)), t.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([v.reshape(X.shape[0], -1) for v in g.values()], dim=1).double()
    mean = G.mean(0)
    trace_emp = G.pow(2).sum(1).mean()
    trace_cov = (G - mean).pow(2).sum(1).mean()
    return G, float(mean.norm()), float(trace_emp), float(trace_cov / mean.pow(2).sum())


def test_measured_values_match_brute_force():
    model = _cnn().eval()
    loss_fn = nn.CrossEntropyLoss()
    X, y = _data(20)
    diag = Diagnostics(model, loss_fn, every=1, seed=7)
    rec = diag.step(0, X, y)
    _, gnorm, trace_emp, noise = _brute_force(model, loss_fn, X, y)
    v = rec["values"]
    assert v["loss"] == pytest.approx(float(loss_fn(model(X), y).detach()), rel=1e-5)
    assert v["grad_norm"] == pytest.approx(gnorm, rel=1e-4)
    assert v["trace_empirical_fisher"] == pytest.approx(trace_emp, rel=1e-4)
    assert v["noise_scale"] == pytest.approx(noise, rel=1e-3)
    # Tr(F): the same labels drawn from a generator seeded like the Diagnostics' one
    gen = torch.Generator().manual_seed(7)
    sampled = loss_spec(loss_fn).sample_targets(model(X), gen)
    _, _, trace_fisher, _ = _brute_force(model, loss_fn, X, sampled)
    assert v["trace_fisher"] == pytest.approx(trace_fisher, rel=1e-4)
    assert sum(rec["per_layer"]["trace_fisher"].values()) == pytest.approx(trace_fisher, rel=1e-4)
    assert set(rec["per_layer"]["trace_fisher"]) == {"0", "4"}


def test_jsonl_is_complete_after_a_crash(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        from torch import nn
        sys.path.insert(0, {str(ROOT)!r})
        from curvlab.analysis import Diagnostics
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        loss_fn = nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        X, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
        diag = Diagnostics(model, loss_fn, every=2, log_dir={str(tmp_path)!r}, csv=True)
        for step in range(100):
            opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
            diag.step(step, X, y)
            if step == 7:
                os._exit(3)  # a hard crash: no cleanup, no close()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert all("trace_fisher" in r["values"] for r in records)
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,") and len(csv_lines) == 5


def test_fisher_explosion_warns_and_logs_an_event(tmp_path):
    model = nn.Linear(4, 2, bias=False)
    loss_fn = nn.MSELoss()  # Tr(F) = (2/(N c)) sum ||J_n||^2 grows with ||x||^2 for a linear model
    X = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(16, 2)
    diag = Diagnostics(model, loss_fn, every=1, log_dir=tmp_path, explosion_factor=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diag.step(0, X, y)
        diag.step(1, 2 * X, y)  # 4x: below the factor
    with pytest.warns(FisherExplosionWarning, match="Fisher explosion at step 2"):
        diag.step(2, 10 * X, y)  # 100x the first measurement
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diag.step(3, 30 * X, y)  # warned once only
    diag.close()
    events = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    explosions = [e for e in events if e.get("event") == "fisher_explosion"]
    assert len(explosions) == 1 and explosions[0]["step"] == 2
    assert explosions[0]["factor"] >= 20.0  # a Monte-Carlo estimate of a 100x rise
    assert explosions[0]["trace_fisher"] == diag.records[2]["values"]["trace_fisher"]


def test_explosion_until_limits_the_check_to_early_training():
    model, loss_fn = nn.Linear(4, 2), nn.MSELoss()
    X, y = torch.randn(16, 4), torch.zeros(16, 2)
    diag = Diagnostics(model, loss_fn, every=1, explosion_until=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diag.step(0, X, y)
        diag.step(1, X, y)
        diag.step(2, 10 * X, y)
    assert diag.events == []


class _FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_budget_schedules_measurements_within_the_overhead(monkeypatch):
    clock = _FakeClock()
    real = hooks.measure

    def slow_measure(*args, **kwargs):
        clock.t += 2.0  # each measurement costs 2 s, each training step 1 s
        return real(*args, **kwargs)

    monkeypatch.setattr(hooks, "measure", slow_measure)
    model = nn.Linear(4, 3)
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    diag = Diagnostics(model, nn.CrossEntropyLoss(), every=None, budget=0.1, clock=clock)
    for step in range(400):
        clock.t += 1.0
        diag.step(step, X, y)
    # 400 s of training at 10% allow 40 s of measuring = 20 measurements of 2 s
    assert 18 <= len(diag.records) <= 21
    assert diag.overhead <= 0.1 + 1e-9
    steps = [r["step"] for r in diag.records]
    gaps = [b - a for a, b in zip(steps[1:], steps[2:])]
    assert min(gaps) >= 19  # spread out, not bunched


def test_non_measured_steps_do_not_touch_the_batch(monkeypatch):
    calls = []
    monkeypatch.setattr(hooks, "measure", lambda *a, **k: calls.append(a))
    diag = Diagnostics(nn.Linear(2, 2), nn.CrossEntropyLoss(), every=10)
    sentinel = object()  # would fail on any tensor operation
    for step in range(1, 10):
        assert diag.step(step, sentinel, sentinel) is None
    assert calls == []


def test_failing_measurement_warns_and_training_continues(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(hooks, "measure", broken)
    model = _cnn()
    with (
        pytest.warns(MeasurementFailedWarning, match="boom"),
        Diagnostics(model, nn.CrossEntropyLoss(), every=4, log_dir=tmp_path) as diag,
    ):
        _train(model, diag, steps=6)
    assert [e["step"] for e in diag.events] == [0, 4]
    logged = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["event"] == "measurement_failed" and "boom" in logged[0]["error"]
    strict = Diagnostics(model, nn.CrossEntropyLoss(), every=1, on_error="raise")
    with pytest.raises(RuntimeError, match="boom"):
        strict.step(0, *_data(4))


def test_bad_arguments_get_clear_errors(tmp_path):
    model, loss_fn = nn.Linear(2, 2), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="every must be"):
        Diagnostics(model, loss_fn, every=0)
    with pytest.raises(ValueError, match="budget must be"):
        Diagnostics(model, loss_fn, budget=2.0)
    with pytest.raises(ValueError, match="unknown quantities"):
        Diagnostics(model, loss_fn, quantities=["trace_fishr"])
    with pytest.raises(ValueError, match="reduction"):
        Diagnostics(model, nn.CrossEntropyLoss(reduction="none"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        Diagnostics(model, loss_fn, log_dir=tmp_path / "file")
    diag = Diagnostics(model, loss_fn, every=1)
    with pytest.raises(ValueError, match="needs the batch"):
        diag.step(0)
    diag.close()
    with pytest.raises(RuntimeError, match="closed"):
        diag.step(1)


def test_lightning_callback_without_and_with_a_lightning_module(monkeypatch, tmp_path):
    import types

    from curvlab.analysis.lightning import diagnostics_callback

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # make the import fail
    with pytest.raises(ImportError, match="pip install lightning"):
        diagnostics_callback(nn.CrossEntropyLoss())
    fake = types.ModuleType("lightning.pytorch")
    fake.Callback = object
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake)
    cb = diagnostics_callback(nn.CrossEntropyLoss(), every=2, log_dir=tmp_path)
    model = _cnn()
    trainer = types.SimpleNamespace(global_step=0)
    cb.on_train_start(trainer, model)
    for step in range(4):
        trainer.global_step = step + 1  # Lightning counts the optimizer step before the batch ends
        cb.on_train_batch_end(trainer, model, None, _data(8), step)
    cb.on_train_end(trainer, model)
    assert [r["step"] for r in cb.diagnostics.records] == [2, 4]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_seed_reaches_the_estimators():
    """``seed=`` seeds the estimators' probes too (it reached only the label draws): Hutchinson's
    Tr(H) in a Diagnostics equals ``cl.trace`` with that seed."""
    import curvlab as cl

    model = _cnn().eval()
    loss_fn = nn.CrossEntropyLoss()
    X, y = _data(20)
    opts = {"num_probes": 3}
    got = {}
    for seed in (0, 5):
        diag = Diagnostics(model, loss_fn, ["trace_hessian"], every=1, seed=seed, options=opts)
        got[seed] = diag.step(0, X, y)["values"]["trace_hessian"]
        want = cl.trace(model, loss_fn, (X, y), matrix="hessian", num_probes=3, seed=seed)
        assert got[seed] == pytest.approx(float(want.value), rel=1e-6)
    assert got[0] != got[5]


def test_lightning_callback_measures_once_per_optimizer_step(monkeypatch):
    """Under gradient accumulation Lightning ends every micro-batch, but ``global_step`` moves
    only with the optimizer: the callback measures once per step, on its last micro-batch (it
    measured every micro-batch, the first ones before the step), and a resumed run starts at its
    own step."""
    import curvlab.analysis.lightning as lightning

    monkeypatch.setattr(lightning, "_callback_base", lambda: object)
    model, loss_fn = _cnn().eval(), nn.CrossEntropyLoss()
    X, y = _data(16)
    micro = [(X[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    for start in (0, 40):
        callback = lightning.diagnostics_callback(loss_fn, quantities=["loss"], every=1)
        trainer = type("Trainer", (), {"global_step": start})()
        callback.on_train_start(trainer, model)
        for i, batch in enumerate(micro):  # accumulate_grad_batches=2
            trainer.global_step = start + (i + 1) // 2  # the step after micro-batches 1 and 3
            callback.on_train_batch_end(trainer, model, None, batch, i)
        records = callback.diagnostics.records
        assert [r["step"] for r in records] == [start + 1, start + 2]
        for r, (xb, yb) in zip(records, (micro[1], micro[3])):
            assert r["values"]["loss"] == pytest.approx(float(loss_fn(model(xb), yb)), rel=1e-6)
        callback.on_train_end(trainer, model)


def test_csv_appended_by_a_run_with_other_quantities_keeps_its_columns(tmp_path):
    """A second run into the same log_dir with other quantities: the CSV gets the union of the
    columns and every value stays under its own name (it was written under the old header)."""
    import csv

    model, loss_fn = _cnn().eval(), nn.CrossEntropyLoss()
    X, y = _data(8)
    with Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True) as d:
        first = d.step(0, X, y)["values"]["loss"]
    with Diagnostics(model, loss_fn, ["grad_norm"], every=1, log_dir=tmp_path, csv=True) as d:
        second = d.step(1, X, y)["values"]["grad_norm"]
    with Diagnostics(model, loss_fn, ["loss"], every=1, log_dir=tmp_path, csv=True) as d:
        third = d.step(2, X, y)["values"]["loss"]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert float(rows[0]["loss"]) == first and rows[0]["grad_norm"] == ""
    assert float(rows[1]["grad_norm"]) == second and rows[1]["loss"] == ""
    assert float(rows[2]["loss"]) == third and rows[2]["grad_norm"] == ""


def test_metrics_csv_gains_the_columns_of_later_records(tmp_path) -> None:
    """A first record without some quantity (it failed, or a threshold left out at lr 0): a
    later record's new columns are added (the file rewritten with the union), not dropped."""
    import csv

    from curvlab.analysis._metrics_log import MetricsLog

    log = MetricsLog(tmp_path, csv=True)
    log.write({"step": 0, "values": {"loss": 1.0}})
    log.write({"step": 1, "values": {"loss": 0.5, "sharpness": 3.0}})
    log.write({"step": 2, "values": {"sharpness": 2.0}})
    log.close()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert [r["loss"] for r in rows] == ["1.0", "0.5", ""]
    assert [r["sharpness"] for r in rows] == ["", "3.0", "2.0"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sharpnes_tol": 1e-9}, "unknown name 'sharpnes_tol'"),
        ({"num_probes": 2.5}, r"options\['num_probes'\] must be a positive int"),
        ({"k": 0}, r"options\['k'\] must be a positive int"),
        ({"sharpness_tol": 1.5}, r"options\['sharpness_tol'\] must be a number in \(0, 1\)"),
        ({"critical_max_forwards": 1}, "must be an int >= 2"),
        ({"optimizer": object()}, r"pass it as Diagnostics\(\.\.\., optimizer=opt\)"),
    ],
)
def test_measurement_options_are_checked_when_diagnostics_is_made(options, message) -> None:
    """A misspelt option was ignored (sharpness ran at its default tolerance) and a bad value
    failed inside a measurement, or was truncated (num_probes=2.5 ran 2 probes): found in review."""
    from curvlab.analysis.hf import diagnostics_callback

    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message):
        Diagnostics(model, nn.CrossEntropyLoss(), quantities=["loss"], options=options)
    with pytest.raises(ValueError, match=message):  # the Trainer's callback: before training
        diagnostics_callback(nn.CrossEntropyLoss(), options=options)


def test_measurement_options_take_numpy_numbers() -> None:
    import numpy as np

    diag = Diagnostics(
        nn.Linear(3, 2),
        nn.CrossEntropyLoss(),
        quantities=["loss"],
        options={"num_probes": np.int64(4), "sharpness_tol": np.float32(1e-3)},
    )
    assert diag.config.options["num_probes"] == 4 and type(diag.config.options["num_probes"]) is int
    assert type(diag.config.options["sharpness_tol"]) is float
