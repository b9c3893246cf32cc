"""An optional PyTorch Lightning callback that runs :class:`~curvlab.analysis.Diagnostics`.

Lightning is not a dependency of curvlab: :func:`diagnostics_callback` imports it when called and
raises a clear ``ImportError`` if neither ``lightning`` nor ``pytorch_lightning`` is installed.

Example:
    >>> cb = diagnostics_callback(torch.nn.CrossEntropyLoss(), every=50)  # doctest: +SKIP
    >>> trainer = lightning.Trainer(callbacks=[cb])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from curvlab.analysis._diagnostics import Diagnostics

__all__ = ["diagnostics_callback"]


def _callback_base() -> type:
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(module).Callback
        except ImportError:
            continue
    raise ImportError(
        "diagnostics_callback needs PyTorch Lightning: pip install lightning (or use "
        "curvlab.Diagnostics directly in your training loop)"
    )


def diagnostics_callback(loss_fn: nn.Module, model_attr: str | None = None, **kwargs: Any) -> Any:
    """A Lightning ``Callback`` that calls ``Diagnostics.step`` after every optimiser step.

    Args:
        loss_fn: the training loss module (CrossEntropyLoss, MSELoss or BCEWithLogitsLoss).
        model_attr: attribute of the LightningModule holding the network (``None``: the
            LightningModule itself, whose ``forward`` must map inputs to outputs).
        **kwargs: passed to :class:`~curvlab.analysis.Diagnostics` (``every``,
            ``quantities``, ``log_dir``, ``budget``, ...). Without ``optimizer=`` the trainer's
            first optimizer (``trainer.optimizers[0]``) is passed, which the sharpness
            measurements read (``"preconditioned_sharpness"``, ``"critical_sharpness"``, the
            threshold of ``"sharpness"``).

    The batch must be an ``(inputs, targets)`` pair. ``trainer.global_step`` (optimizer steps
    taken) is the step. With gradient accumulation (``accumulate_grad_batches``) the callback
    measures once per optimizer step, on its last micro-batch: a batch that ends without an
    optimizer step (``global_step`` unchanged since the previous call) is not measured.
    The callback's ``diagnostics`` attribute holds the :class:`Diagnostics` once training starts.
    """
    base = _callback_base()

    class DiagnosticsCallback(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.diagnostics: Diagnostics | None = None
            self._last_step: int | None = None  # global_step at the previous call

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            model = pl_module if model_attr is None else getattr(pl_module, model_attr)
            options = dict(kwargs)
            optimizers = getattr(trainer, "optimizers", None) or []
            if options.get("optimizer") is None and optimizers:  # thresholds, Adam's state
                options["optimizer"] = optimizers[0]
            self.diagnostics = Diagnostics(model, loss_fn, **options)
            self._last_step = int(trainer.global_step)  # a resumed run starts where it was

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if self.diagnostics is None:
                return
            step = int(trainer.global_step)
            if step == self._last_step:  # a micro-batch without an optimizer step after it
                return
            self._last_step = step
            inputs, targets = batch
            self.diagnostics.step(step, inputs, targets)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.diagnostics is not None:
                self.diagnostics.close()

    return DiagnosticsCallback()
