"""The Lightning callback in a real ``lightning.pytorch.Trainer`` (review s22, reviewer LT).

A Trainer fitted again (``tr.fit_loop.epoch_loop.max_steps = 12; tr.fit(m)``) continues its run:
the callback's ``Diagnostics`` went on afresh there (the Monte-Carlo draws of step 8 were step
2's, the first fit's records dropped, a false warning naming a checkpoint). A wrong
``model_attr`` was a raw ``AttributeError`` (or a ``TypeError`` blaming "model") after the
sanity validation.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from curvlab.analysis.lightning import diagnostics_callback  # noqa: E402

QUANTITIES = ["loss", "trace_fisher", "trace_hessian", "sharpness"]
TIMES = ("time", "cost_s")  # wall-clock fields: the only ones two runs may differ in


class Net(L.LightningModule):
    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        self.scale = 3.0  # a float attribute (a wrong model_attr)
        self.validated = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.validated += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)  # 6 steps an epoch, in order


def _trainer(cb, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        callbacks=[cb],
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=kw.pop("logger", False),
        enable_model_summary=False,
        **kw,
    )


def _callback(log_dir=None, **kw):
    return diagnostics_callback(
        nn.CrossEntropyLoss(),
        model_attr="net",
        every=2,
        quantities=QUANTITIES,
        seed=0,
        log_dir=log_dir,
        **kw,
    )


def _untimed(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in TIMES}


def _log(folder) -> list[dict]:
    with open(folder / "metrics.jsonl") as f:
        return [_untimed(json.loads(line)) for line in f]


def _curvlab_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "curvlab" in str(w.message)]


def test_continued_fit_measures_as_the_uninterrupted_fit(tmp_path):
    """Fit to step 6, fit the same Trainer on to 12: the records and the log equal those of
    one fit to 12 (bitwise but for the wall-clock fields), nothing warned. It started afresh:
    step 8's trace_hessian probes and trace_fisher labels were step 2's, the records of steps
    2-6 dropped from ``cb.diagnostics``, the sharpness started cold, and it warned of a
    checkpoint never loaded."""
    whole = _callback(tmp_path / "whole")
    model_w = Net()
    _trainer(whole, 12).fit(model_w, _loader())

    parts = _callback(tmp_path / "parts")
    model_p = Net()
    trainer = _trainer(parts, 6)
    trainer.fit(model_p, _loader())
    trainer.fit_loop.epoch_loop.max_steps = 12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model_p, _loader())

    assert trainer.global_step == 12
    assert _curvlab_warnings(caught) == []
    # the training itself is the same: the comparison below is of the measurements alone
    for a, b in zip(model_w.parameters(), model_p.parameters()):
        assert torch.equal(a, b)
    assert [r["step"] for r in parts.diagnostics.records] == [2, 4, 6, 8, 10, 12]
    assert [_untimed(r) for r in parts.diagnostics.records] == [
        _untimed(r) for r in whole.diagnostics.records
    ]
    assert _log(tmp_path / "parts") == _log(tmp_path / "whole")
    assert not (tmp_path / "parts" / "metrics.dropped.jsonl").exists()
    steps, _ = parts.diagnostics.history("trace_fisher")
    assert steps == [2, 4, 6, 8, 10, 12]


def test_a_new_trainer_starts_afresh():
    """The same callback in a new Trainer (``global_step`` 0) measures a new run: its first
    records are those of a fresh callback (the generator from ``seed``), the earlier run's
    records are not kept, and nothing is warned."""
    cb = _callback()
    _trainer(cb, 4).fit(Net(), _loader())
    first = [_untimed(r) for r in cb.diagnostics.records]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(cb, 4).fit(Net(), _loader())
    assert _curvlab_warnings(caught) == []
    assert [_untimed(r) for r in cb.diagnostics.records] == first


def test_continued_fit_of_another_model_warns_without_naming_a_checkpoint():
    """A fitted Trainer fitted on with another LightningModule: the Diagnostics of the other
    network cannot continue (its warm starts are of the first), so it starts afresh, with a
    warning that says so (it blamed a checkpoint that was never loaded)."""
    cb = _callback()
    trainer = _trainer(cb, 4)
    trainer.fit(Net(), _loader())
    trainer.fit_loop.epoch_loop.max_steps = 6
    with pytest.warns(RuntimeWarning, match="another network") as caught:
        trainer.fit(Net(seed=2), _loader())
    said = _curvlab_warnings(caught)
    assert len(said) == 1 and "no checkpoint loaded" in said[0]
    assert "the checkpoint was saved without it" not in said[0]
    assert [r["step"] for r in cb.diagnostics.records] == [6]


@pytest.mark.parametrize(
    ("attr", "error", "said"),
    [("nett", AttributeError, "has no attribute 'nett'"), ("scale", TypeError, "is a float")],
)
def test_wrong_model_attr_is_named_before_the_sanity_validation(attr, error, said):
    """``model_attr`` naming no attribute, or one that is not a module: an error naming
    ``model_attr=``, the LightningModule's class and its child modules, in ``on_fit_start``
    before the sanity validation (a raw ``AttributeError``, or ``TypeError: model must be a
    torch.nn.Module, got float``, after it)."""
    cb = diagnostics_callback(nn.CrossEntropyLoss(), model_attr=attr, every=1, quantities=["loss"])
    model = Net()
    trainer = _trainer(cb, 2, num_sanity_val_steps=2)
    with pytest.raises(error, match=f"model_attr={attr!r}") as info:
        trainer.fit(model, _loader(), _loader())
    message = str(info.value)
    assert said in message and "Net" in message and "['net']" in message
    assert model.validated == 0  # refused before the sanity validation


def test_model_attr_must_be_a_name():
    with pytest.raises(TypeError, match="model_attr"):
        diagnostics_callback(nn.CrossEntropyLoss(), model_attr=nn.Linear(2, 2))


def test_records_reach_lightnings_logger_through_callback(tmp_path):
    """The callback writes nothing to Lightning's logger by itself; Diagnostics' ``callback=``
    option, as docs/training-loops.md shows it, sends each record there."""
    logger = L.loggers.CSVLogger(tmp_path, name="run")
    trainer: L.Trainer | None = None

    def to_logger(record: dict) -> None:
        values = {k: v for k, v in record["values"].items() if isinstance(v, (int, float))}
        trainer.logger.log_metrics({f"curvlab/{k}": v for k, v in values.items()}, record["step"])

    cb = diagnostics_callback(
        nn.CrossEntropyLoss(), model_attr="net", every=2, quantities=["loss"], callback=to_logger
    )
    trainer = _trainer(cb, 4, logger=logger)
    trainer.fit(Net(), _loader())
    assert not any(k.startswith("curvlab") for k in trainer.logged_metrics)  # nothing by itself
    logger.save()
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [line.strip().split(",") for line in f]
    header, rows = rows[0], rows[1:]
    got = {int(r[header.index("step")]): float(r[header.index("curvlab/loss")]) for r in rows}
    assert got == {r["step"]: r["values"]["loss"] for r in cb.diagnostics.records}
    assert sorted(got) == [2, 4]


def test_a_run_folder_moved_as_a_whole_is_cut_on_resuming(tmp_path) -> None:
    """Stop after step 5 with a checkpoint at step 3, move the whole run folder, resume from the
    moved checkpoint: the log holds each step once, as the uninterrupted run's (a moved folder
    was taken for another log and not cut: step 4 twice; the HF callback likewise, review s22)."""
    run = tmp_path / "run"
    cb = _callback(log_dir=run / "logs")
    tr = _trainer(cb, 3)
    tr.fit(Net(), _loader())
    tr.save_checkpoint(run / "ckpt.ckpt")
    tr.fit_loop.epoch_loop.max_steps = 5  # the run went on past the checkpoint, then stopped
    tr.fit(tr.lightning_module, _loader())
    cb.diagnostics.close()
    moved = tmp_path / "moved"
    run.rename(moved)
    cb2 = _callback(log_dir=moved / "logs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(cb2, 8).fit(Net(), _loader(), ckpt_path=moved / "ckpt.ckpt")
    cb2.diagnostics.close()
    lines = (moved / "logs" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [2, 4, 6, 8], steps
