"""A Lightning callback fitted again after a ``fit()`` that raised reopens its own ``log_dir``
(sweep 13: a ``log_dir`` held by another open ``Diagnostics`` is now refused, and the callback's
second ``on_train_start`` met its own first one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


def test_a_refit_after_a_failed_fit_reopens_its_log_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import curvlab.analysis.lightning as lightning

    monkeypatch.setattr(lightning, "_callback_base", lambda: object)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (6,), generator=g)
    model = nn.Linear(3, 2).double()
    cb = lightning.diagnostics_callback(
        nn.CrossEntropyLoss(), every=1, quantities=["loss"], log_dir=str(tmp_path)
    )
    trainer = type("Trainer", (), {"global_step": 0, "optimizers": []})()
    cb.on_fit_start(trainer, model)
    cb.on_train_start(trainer, model)
    first = cb.diagnostics
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, model, None, (X, y), 0)
    # the fit raised here: no on_train_end; the same callback is fitted again
    trainer.global_step = 0
    cb.on_fit_start(trainer, model)
    cb.on_train_start(trainer, model)  # refused before the first one was closed
    assert cb.diagnostics is not first
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, model, None, (X, y), 0)
    cb.on_train_end(trainer, model)
    expected = nn.CrossEntropyLoss()(model(X), y).item()
    assert cb.diagnostics.records[-1]["values"]["loss"] == pytest.approx(expected, rel=1e-12)
