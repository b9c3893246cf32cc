"""A LightningModule without ``forward`` under the callback's default ``model_attr=None``.

The network in a child module (``self.net``), used only in ``training_step``, is the common
layout; with ``model_attr=None`` the callback measured the LightningModule itself, and every
measured step failed with torch's raw ``Module [LM] is missing the required "forward" function``
(a ``MeasurementFailedWarning``, or raised at step 2 with ``on_error="raise"``), found in review
s24. It is now a ``TypeError`` in ``on_fit_start``, before the sanity validation and any training
step, naming ``model_attr`` and the child modules.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from curvlab.analysis import MeasurementFailedWarning  # noqa: E402
from curvlab.analysis.lightning import diagnostics_callback  # noqa: E402


class NoForward(L.LightningModule):
    """The network in ``self.net``, called from ``training_step`` only: no ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        self.validated = 0
        self.trained = 0

    def training_step(self, batch, batch_idx):
        self.trained += 1
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.validated += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Forwarding(NoForward):
    """The same module whose ``forward`` maps inputs to outputs (inherited by :class:`Sub`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Sub(Forwarding):
    """A subclass inheriting a user's ``forward``: measurable as it is."""


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (8,), generator=g
    )


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data()), batch_size=4)  # 2 steps, in order


def _fit(model: L.LightningModule, model_attr: str | None, on_error: str = "warn"):
    cb = diagnostics_callback(
        nn.CrossEntropyLoss(), model_attr, every=1, quantities=["loss"], on_error=on_error
    )
    trainer = L.Trainer(
        callbacks=[cb],
        max_steps=2,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")  # its num_workers hint and such
        warnings.simplefilter("error", MeasurementFailedWarning)
        trainer.fit(model, _loader(), _loader())
    return cb, trainer


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_no_forward_is_refused_before_the_sanity_validation(on_error):
    model = NoForward()
    with pytest.raises(TypeError, match=r"model_attr=None") as info:
        _fit(model, None, on_error)
    message = str(info.value)
    assert "NoForward" in message and "forward" in message and "['net']" in message
    assert "missing the required" not in message  # not torch's raw error
    assert model.validated == 0 and model.trained == 0  # before the sanity validation


@pytest.mark.parametrize(
    ("model", "model_attr"), [(NoForward(), "net"), (Forwarding(), None), (Sub(), None)]
)
def test_a_network_with_forward_is_measured(model, model_attr):
    """The refusal's fix (``model_attr="net"``) and a LightningModule whose ``forward`` is
    the user's (its own, or inherited) measure every step, with no failed measurement; step 2's
    loss is the network's after the second update on the second batch (float64, the same sum)."""
    cb, trainer = _fit(model, model_attr)
    assert trainer.global_step == 2
    assert [r["step"] for r in cb.diagnostics.records] == [1, 2]
    x, y = _data()
    with torch.no_grad():
        want = nn.functional.cross_entropy(model.net(x[4:]), y[4:]).item()
    assert cb.diagnostics.records[-1]["values"]["loss"] == pytest.approx(want, rel=1e-12)
