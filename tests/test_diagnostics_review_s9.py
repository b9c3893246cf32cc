"""Diagnostics in unusual training loops (review s9): resuming, step numbers, a second optimizer,
measuring inside a noise capture."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.analysis import Diagnostics

DT = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _batches(steps: int = 6, n: int = 10):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for _ in range(steps)
    ]


QUANTITIES = ["loss", "trace_fisher", "sharpness", "critical_sharpness"]


def _run(model, opt, diag, batches, start: int = 0):
    loss_fn = nn.CrossEntropyLoss()
    for t, (X, y) in enumerate(batches[start:], start):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        diag.step(t, X, y)


def test_a_resumed_run_measures_what_the_uninterrupted_one_does():
    """The Monte-Carlo draws and the warm starts continue from ``state_dict()``: without it the
    resumed run's trace_fisher at step 3 was 2.5258 against the uninterrupted 2.7069."""
    loss_fn, data = nn.CrossEntropyLoss(), _batches()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    whole = Diagnostics(model, loss_fn, QUANTITIES, every=1, optimizer=opt, on_error="raise")
    _run(model, opt, whole, data)

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = Diagnostics(model, loss_fn, QUANTITIES, every=1, optimizer=opt, on_error="raise")
    _run(model, opt, first, data[:3])
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "diag": first.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model = _mlp(5)
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(saved["opt"])
    resumed = Diagnostics(model, loss_fn, QUANTITIES, every=1, optimizer=opt, on_error="raise")
    resumed.load_state_dict(saved["diag"])
    _run(model, opt, resumed, data, start=3)
    for a, b in zip(whole.records[3:], resumed.records):
        assert a["step"] == b["step"]
        for k in ("loss", "trace_fisher", "sharpness", "sharpness_hvps", "critical_sharpness"):
            assert a["values"][k] == b["values"][k], (k, a["values"][k], b["values"][k])
    # without the state: other draws (the same unbiased estimate), cold starts
    model = _mlp()
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(saved["opt"])
    fresh = Diagnostics(model, loss_fn, QUANTITIES, every=1, optimizer=opt, on_error="raise")
    _run(model, opt, fresh, data, start=3)
    assert fresh.records[0]["values"]["trace_fisher"] != whole.records[3]["values"]["trace_fisher"]
    with pytest.raises(ValueError, match="state_dict"):
        fresh.load_state_dict({"calls": 3})


@pytest.mark.parametrize("step", [np.int64(4), torch.tensor(4)])
def test_numpy_and_tensor_step_numbers_are_logged(step, tmp_path):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _batches(1)[0]
    diag = Diagnostics(model, loss_fn, ["loss"], every=2, log_dir=tmp_path, on_error="raise")
    record = diag.step(step, X, y)
    assert record is not None and record["step"] == 4 and type(record["step"]) is int
    with pytest.raises(TypeError, match="step must be an integer"):
        diag.step(2.5, X, y)
    diag.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("step") == 4 for line in lines)


def test_no_sgd_threshold_when_another_optimizer_trains_part_of_the_model():
    """The Hessian covers the head too, trained by a second optimizer at another learning rate:
    the body optimizer's 2/η says nothing about the step taken."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _batches(1)[0]
    body = torch.optim.SGD(model[0].parameters(), lr=0.01)
    diag = Diagnostics(model, loss_fn, ["sharpness"], every=1, optimizer=body, on_error="raise")
    record = diag.step(0, X, y)
    assert "sharpness" in record["values"] and "sharpness_threshold" not in record["values"]
    both = torch.optim.SGD(model.parameters(), lr=0.01)
    diag = Diagnostics(model, loss_fn, ["sharpness"], every=1, optimizer=both, on_error="raise")
    assert diag.step(0, X, y)["values"]["sharpness_threshold"] == pytest.approx(200.0)
    # a frozen part needs no optimizer
    model[2].requires_grad_(False)
    diag = Diagnostics(model, loss_fn, ["sharpness"], every=1, optimizer=body, on_error="raise")
    assert diag.step(0, X, y)["values"]["sharpness_threshold"] == pytest.approx(200.0)


def test_diagnostics_inside_a_noise_capture_measures_and_leaves_the_step_alone():
    """Its own passes inside ``noisy.capture()`` were taken for a second model call of the step
    (every measurement failed); now they are curvlab's own and the step is as without it."""
    loss_fn, data = nn.CrossEntropyLoss(), _batches(3)

    def run(inside: bool):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sampler = cl.noise.DiagFisherNoise(scale=0.1)
        noisy = cl.noise.NoisyOptimizer(opt, sampler, model, loss_fn, seed=0)
        diag = Diagnostics(model, loss_fn, ["loss", "grad_norm"], every=1, on_error="raise")
        want = []
        for t, (X, y) in enumerate(data):
            noisy.zero_grad()
            with noisy.capture():
                loss = loss_fn(model(X), y)
                loss.backward()
                if inside:
                    diag.step(t, X, y)
                    want.append(float(loss))
            noisy.step()
        return [p.detach().clone() for p in model.parameters()], diag.records, want

    (pa, _, _), (pb, records, want) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert [r["values"]["loss"] for r in records] == pytest.approx(want, rel=1e-12)
