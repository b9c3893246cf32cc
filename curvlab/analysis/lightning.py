"""An optional PyTorch Lightning callback that runs :class:`~curvlab.analysis.Diagnostics`.

Lightning is not a dependency of curvlab: :func:`diagnostics_callback` imports it when called and
raises a clear ``ImportError`` if neither ``lightning`` nor ``pytorch_lightning`` is installed.

Example:
    >>> cb = diagnostics_callback(torch.nn.CrossEntropyLoss(), every=50)  # doctest: +SKIP
    >>> trainer = lightning.Trainer(callbacks=[cb])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from curvlab._losses import loss_spec
from curvlab.analysis._callback_checks import callback_settings, check_options, materialise
from curvlab.analysis._diagnostics import Diagnostics, MeasurementFailedWarning
from curvlab.analysis._metrics_log import (
    check_log_dir,
    holds_saved_log,
    log_cut,
    same_log_dir,
    start_afresh_with_cut,
)
from curvlab.analysis._sharpness import check_optimizer_for

_EVERY = inspect.signature(Diagnostics).parameters["every"].default  # Diagnostics' default

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


def diagnostics_callback(
    loss_fn: nn.Module,
    model_attr: str | None = None,
    *,
    batch_fn: Callable[[Any], tuple[Any, Any]] | None = None,
    **kwargs: Any,
) -> Any:
    """A Lightning ``Callback`` that calls ``Diagnostics.step`` after every optimiser step.

    ``trainer.global_step`` (optimizer steps taken) is the step. With gradient accumulation
    (``accumulate_grad_batches``) the callback measures once per optimizer step, on its last
    micro-batch: a batch that ends without an optimizer step (``global_step`` unchanged since the
    previous call) is not measured. The batch is read on measured steps only: an
    ``(inputs, targets)`` pair (a tuple or list of two), or what ``batch_fn`` makes of it. Any
    other batch (a dict, ``(x, y, index)``) is not guessed at: that step is a failed measurement,
    a ``MeasurementFailedWarning`` naming the batch's structure and ``batch_fn`` (a ``TypeError``
    with ``on_error="raise"``), and training goes on.

    The ``Diagnostics`` state (:meth:`~curvlab.analysis.Diagnostics.state_dict`: the Monte-Carlo
    generator, the Fisher-explosion window, the sharpness warm starts) goes into Lightning's
    checkpoints through the callback's ``state_dict`` / ``load_state_dict`` hooks, so
    ``trainer.fit(..., ckpt_path=...)`` measures what the uninterrupted run would. The state is
    filed under the callback's ``state_key``, which holds its settings (the loss, ``model_attr``,
    ``quantities``, ``every``, ``budget``, ``seed``, ``max_examples``), as Lightning's
    ``ModelCheckpoint`` does: several callbacks in one Trainer must differ in one of them (else
    Lightning refuses the Trainer), and each resumes its own state. A run resumed (``global_step
    > 0``) from a checkpoint without this callback's state (saved without it, by an older
    curvlab, or with other settings) warns and starts the ``Diagnostics`` afresh. Where its log
    ended is also filed under a key that does not depend on the settings (the checkpoint's
    ``"curvlab_log_positions"``, keyed by the absolute ``log_dir``), so a run resumed with other
    settings (``every`` changed, say) still cuts the log there: the lines written after the
    checkpoint, by the run that went on, move to ``metrics.dropped.jsonl`` and the log holds
    each step once (it held them twice, found in review s20). The callback's state also names
    the absolute ``log_dir`` its log position is of: a run resumed with the same settings into
    another ``log_dir`` resumes the ``Diagnostics`` but cuts nothing there, with a warning (it
    cut that folder's log at the other log's position, moving another run's lines to
    ``metrics.dropped.jsonl``, found in review s20). Folders are compared resolved: the same
    folder through a symbolic link or ``..`` is the same log. A relative ``log_dir`` is taken
    against the working directory when the callback is made.

    A Trainer fitted again in its process, where its last fit stopped and without ``ckpt_path``
    (``trainer.fit_loop.epoch_loop.max_steps = 12; trainer.fit(model)``), continues its run, and
    so does the callback: the new ``Diagnostics`` takes over the last one's state, records and
    events, and appends to its log, so the continued fit measures what one uninterrupted fit
    would (it started afresh: the Monte-Carlo draws and probes of the first fit's steps again,
    its records dropped, with a warning naming a checkpoint none had loaded, found in review
    s22). With another network than before (another LightningModule, or ``model_attr``'s
    attribute replaced) it starts afresh, with a warning; a new Trainer (``global_step`` 0)
    starts afresh, silently. The callback logs nothing to the Trainer's logger by itself: pass
    Diagnostics' ``callback=`` option (each record, right after its measurement) to send
    values there (docs/training-loops.md).

    The options are checked here, before training, as ``Diagnostics`` checks them; only the
    sharpness measurements' check of the trainer's optimizer (``"preconditioned_sharpness"``
    reads Adam or AdamW, ``"critical_sharpness"`` SGD, Adam or AdamW) waits for
    ``on_fit_start`` (after ``configure_optimizers``, before the sanity validation) when no
    ``optimizer=`` is given here.

    Args:
        loss_fn: the training loss module (CrossEntropyLoss, MSELoss or BCEWithLogitsLoss).
        model_attr: the name of the LightningModule's attribute holding the network (``None``:
            the LightningModule itself, whose ``forward`` must map inputs to outputs: one without
            ``forward``, its network in ``self.net``, needs ``model_attr="net"``); checked in
            ``on_fit_start``, before the sanity validation.
        batch_fn: maps the training batch to the ``(inputs, targets)`` pair to measure on
            (``None``: the batch must be that pair), e.g. ``lambda b: (b[0], b[1])`` for
            ``(x, y, index)`` batches or ``lambda b: (b["x"], b["y"])`` for dict batches. It is
            called on measured steps only.
        **kwargs: passed to :class:`~curvlab.analysis.Diagnostics` (``every``,
            ``quantities``, ``log_dir``, ``budget``, ...). Without ``optimizer=`` the trainer's
            first optimizer (``trainer.optimizers[0]``) is passed, which the sharpness
            measurements read (``"preconditioned_sharpness"``, ``"critical_sharpness"``, the
            threshold of ``"sharpness"``).

    Returns:
        The callback; its ``diagnostics`` attribute holds the :class:`Diagnostics` once training
        starts.

    Raises:
        ImportError: if neither ``lightning`` nor ``pytorch_lightning`` is installed.
        TypeError: if ``batch_fn`` is not callable, ``model_attr`` not a ``str``, for an
            unknown option or an unsupported loss; in ``on_fit_start``, if ``model_attr``'s
            attribute is not a module, or, with ``model_attr=None``, if the LightningModule
            defines no ``forward`` (its own or inherited from a class other than
            ``LightningModule``; found in review s24: every measured step failed with torch's
            "missing the required 'forward' function"); the error names ``model_attr``, the
            LightningModule's class and its child modules.
        AttributeError: in ``on_fit_start``, if the LightningModule has no ``model_attr``
            attribute (named as above).
        ValueError: for an unknown quantity, a bad schedule (``every``, ``budget``) or a bad
            option value, as ``Diagnostics`` would raise it once training started.
    """
    base = _callback_base()
    if model_attr is not None and not isinstance(model_attr, str):
        raise TypeError(
            f"model_attr must be the name (a str) of the LightningModule's attribute holding "
            f"the network, or None for the LightningModule itself, got {model_attr!r}"
        )
    if batch_fn is not None and not callable(batch_fn):
        raise TypeError(f"batch_fn must be callable (batch -> (inputs, targets)), got {batch_fn!r}")
    kwargs = dict(kwargs)
    if "quantities" in kwargs:  # an iterator is read once, not by the check
        kwargs["quantities"] = materialise(kwargs["quantities"])
    loss_spec(loss_fn)
    every = kwargs.get("every", _EVERY)
    rest = {k: v for k, v in kwargs.items() if k not in ("quantities", "every")}
    names, cfg = check_options(loss_fn, every, kwargs.get("quantities"), rest)
    settings = callback_settings(loss_fn, names, every, cfg, model_attr=model_attr)  # state key
    log_dir = check_log_dir(kwargs.get("log_dir"))  # absolute, now: a later os.chdir moves nothing
    if log_dir is not None:
        kwargs["log_dir"] = log_dir  # the Diagnostics' folder and the key of its log position

    class DiagnosticsCallback(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.diagnostics: Diagnostics | None = None
            self._last_step: int | None = None  # global_step at the previous call
            # a checkpoint's Diagnostics state loaded before on_train_start made the Diagnostics
            self._pending: dict[str, Any] | None = None
            # the absolute log_dir that state's log position is of (_UNNAMED: a state saved by
            # a curvlab that did not file it, taken as this callback's)
            self._pending_log_dir: Any = _UNNAMED
            # where the checkpoint's log ended (its _LOG_CUTS entry for this log_dir): the cut
            # of a resume without this callback's state (saved with other settings)
            self._pending_cut: Any = None
            # whether this fit restored a checkpoint (on_load_checkpoint, after setup)
            self._restored = False

        @property
        def state_key(self) -> str:
            """The key of this callback's state in Lightning's checkpoints: the class and its
            settings (the format of Lightning's ``Callback._generate_state_key``)."""
            return f"{type(self).__qualname__}{settings!r}"

        def state_dict(self) -> dict[str, Any]:
            """The ``Diagnostics`` state and the absolute ``log_dir`` its log position is of
            (``"log_dir"``, ``None`` without a log), for Lightning's checkpoint (``{}`` before
            training)."""
            if self.diagnostics is not None:
                here = None if log_dir is None else str(log_dir)
                return {"diagnostics": self.diagnostics.state_dict(), _STATE_LOG_DIR: here}
            if self._pending is None:
                return {}
            saved = {"diagnostics": self._pending}
            if self._pending_log_dir is not _UNNAMED:  # saved again before training started
                saved[_STATE_LOG_DIR] = self._pending_log_dir
            return saved

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            """Resume the ``Diagnostics`` from a checkpoint's :meth:`state_dict`.

            Lightning restores callbacks from ``ckpt_path`` before ``on_train_start``, where
            the ``Diagnostics`` is made: the state is kept until then, and used there if the
            run resumes (``global_step > 0``; a ``validate(ckpt_path=...)`` restores callbacks
            too, and a fresh ``fit`` after it starts afresh).
            """
            mapping = isinstance(state_dict, Mapping)
            state = state_dict.get("diagnostics") if mapping else None
            self._pending = state  # None: saved before training started, or by an older curvlab
            self._pending_log_dir = (
                state_dict.get(_STATE_LOG_DIR, _UNNAMED) if mapping else _UNNAMED
            )

        def on_load_checkpoint(
            self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]
        ) -> None:
            """Read a checkpoint saved by an earlier curvlab, which filed the state of its one
            callback under the class name alone (:data:`_OLD_STATE_KEY`): taken when no state
            is filed under this callback's :attr:`state_key` (Lightning restores that after this
            hook, through :meth:`load_state_dict`) and this is the trainer's only curvlab
            callback (an old checkpoint holds one state)."""
            self._restored = True  # a checkpoint's run, not the Trainer's own continued
            cuts = checkpoint.get(_LOG_CUTS) if isinstance(checkpoint, Mapping) else None
            self._pending_cut = _cut_of(cuts, log_dir)
            states = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
            if not isinstance(states, Mapping) or self.state_key in states:
                return
            old = states.get(_OLD_STATE_KEY)
            ours = [
                cb
                for cb in getattr(trainer, "callbacks", None) or [self]
                if type(cb).__qualname__ == type(self).__qualname__
            ]
            if isinstance(old, Mapping) and len(ours) <= 1:
                self.load_state_dict(old)

        def on_save_checkpoint(
            self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]
        ) -> None:
            """File where the log ends under ``checkpoint["curvlab_log_positions"][log_dir]``
            (:data:`_LOG_CUTS`): a key of the log, not of the settings, read back by
            :meth:`on_load_checkpoint` when the run resumes with other settings (its
            :attr:`state_key` then finds no state, but the log is cut all the same)."""
            if log_dir is None or not isinstance(checkpoint, MutableMapping):
                return
            if self.diagnostics is not None:
                state: Any = self.diagnostics.state_dict()
            elif self._pending is not None and self._of_this_log(
                self._pending_log_dir, self._pending
            ):
                state = self._pending  # saved again before training started
            else:
                return
            cuts = checkpoint.get(_LOG_CUTS)
            cuts = dict(cuts) if isinstance(cuts, Mapping) else {}
            cuts[str(log_dir)] = log_cut(state)
            checkpoint[_LOG_CUTS] = cuts

        def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
            """A new ``fit``: no checkpoint restored yet (Lightning restores one after this
            hook, calling :meth:`on_load_checkpoint`)."""
            if stage in (None, "fit"):
                self._restored = False

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            """Refuse a ``model_attr`` that names no network, and a trainer's optimizer the
            sharpness measurements cannot read, before the sanity validation runs
            (``on_train_start`` comes after it)."""
            _network(pl_module)
            optimizer = _optimizer(trainer)  # what on_train_start gives the Diagnostics
            check_optimizer_for(names, cfg.optimizer if optimizer is None else optimizer)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            """Make the ``Diagnostics``: resumed from a checkpoint's state (``fit(ckpt_path=
            ...)``), continued from this callback's own (a Trainer fitted again, ``global_step
            > 0`` and no checkpoint loaded: :meth:`_continue`), else afresh."""
            model = _network(pl_module)
            options = dict(kwargs)
            options["optimizer"] = _optimizer(trainer)  # thresholds, Adam's state
            before, self.diagnostics = self.diagnostics, None
            if before is not None:  # the fit before (or one that raised): free its log_dir
                before.close()  # (no takeover warning for the callback's own folder)
            self.diagnostics = Diagnostics(model, loss_fn, **options)
            pending, self._pending = self._pending, None
            cut, self._pending_cut = self._pending_cut, None
            pending_log_dir, self._pending_log_dir = self._pending_log_dir, _UNNAMED
            restored, self._restored = self._restored, False
            step = int(trainer.global_step)
            fresh = ""  # why a continued fit cannot continue (a warning), if it cannot
            continued = step > 0 and step == self._last_step  # where the last fit stopped
            if continued and pending is None and cut is None and not restored:
                fresh = self._continue(before)
                if not fresh:  # the Trainer's run goes on, and so does the Diagnostics
                    self._last_step = step
                    return
            if step > 0 and pending is not None:  # fit(ckpt_path=...)
                if self._of_this_log(pending_log_dir, pending):
                    self.diagnostics.load_state_dict(pending)
                else:  # log_dir changed on resuming: its position is of the other folder's log
                    self.diagnostics.load_state_dict({**pending, "log_position": None})
                    warnings.warn(
                        f"curvlab diagnostics_callback: the checkpoint's Diagnostics state is of "
                        f"log_dir {pending_log_dir!r}, not this callback's {str(log_dir)!r}: the "
                        "Diagnostics resumes (its Monte-Carlo generator, Fisher-explosion window "
                        "and sharpness warm starts), but its log is not cut (the lines the run "
                        f"that went on wrote after the checkpoint stay in {pending_log_dir!r}; "
                        f"{str(log_dir)!r} is appended to as it is)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            elif fresh:  # a Trainer fitted again that this Diagnostics cannot continue
                warnings.warn(
                    f"curvlab diagnostics_callback: the Trainer's run goes on at step {step} "
                    f"(no checkpoint loaded), but {fresh}: the Diagnostics starts afresh: "
                    "Monte-Carlo labels are drawn as from the start (the same seed), the "
                    "Fisher-explosion window is empty and the sharpness measurements start "
                    "cold; its log is appended to",
                    RuntimeWarning,
                    stacklevel=2,
                )
            elif step > 0:
                said = ""
                if cut is not None:  # saved with other settings: the log is cut all the same
                    try:
                        start_afresh_with_cut(self.diagnostics, cut)
                    except ValueError as exc:
                        raise ValueError(
                            f"curvlab diagnostics_callback: the log position the checkpoint "
                            f"holds for log_dir {str(log_dir)!r} (under {_LOG_CUTS!r}) cannot "
                            f"be used: {exc}"
                        ) from exc
                    said = (
                        "its log was cut where it ended at the checkpoint (the lines written "
                        "after it, by the run that went on, moved to metrics.dropped.jsonl); "
                    )
                warnings.warn(
                    f"curvlab diagnostics_callback: training resumes at step "
                    f"{trainer.global_step} without this callback's Diagnostics state (the "
                    "checkpoint was saved without it, by an older curvlab, or with other "
                    f"settings: its state_key is {self.state_key!r}); {said}the Diagnostics "
                    "starts afresh: Monte-Carlo labels are drawn anew (other draws of the same "
                    "unbiased estimates), the Fisher-explosion window is empty and the sharpness "
                    "measurements start cold",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._last_step = step  # a resumed run starts where it was

        def _continue(self, before: Diagnostics | None) -> str:
            """Carry the ``Diagnostics`` of this callback's previous fit of the Trainer into the
            new one (a fit continued in its process, at the ``global_step`` the last one stopped
            at, no checkpoint loaded: ``tr.fit_loop.epoch_loop.max_steps = 12; tr.fit(model)``),
            so that it measures as the uninterrupted run would: its state
            (:meth:`~curvlab.analysis.Diagnostics.state_dict`: the Monte-Carlo generator and
            the counts the probes are seeded from, the Fisher-explosion window, the sharpness
            warm starts), its ``records`` and ``events``; its log is appended to and nothing of
            it is cut. It started afresh there: the draws of step 8 were step 2's, the first
            fit's records were dropped, with a warning naming a checkpoint none had loaded
            (found in review s22). The budget clock (``budget=``) starts anew, as on a resume.

            Returns:
                ``""`` when carried, else why not (for the warning): the LightningModule
                fitted now holds another network (the warm starts are of the first one's).
            """
            new = self.diagnostics
            assert new is not None
            if before is None:
                return "this callback has no Diagnostics of the earlier steps"
            if new.model is not before.model:
                return "the LightningModule fitted now holds another network than before"
            state = before.state_dict()
            new.records[:] = before.records  # those before the state's "seen_step": all kept
            new.events[:] = before.events
            new.load_state_dict({**state, "log_position": None})  # its log: nothing to cut
            return ""

        def _of_this_log(self, saved: Any, state: Any = None) -> bool:
            """Whether a state whose log position is of folder ``saved`` (its ``"log_dir"``;
            ``_UNNAMED``: not filed, an earlier curvlab's) may cut this callback's log: a state
            of another folder cut this one at that folder's position (another run's lines moved
            to ``metrics.dropped.jsonl``, found in review s20). The state's fingerprint of its
            log decides where it has one (:func:`holds_saved_log`: a run folder moved as a
            whole is the same log, and was not cut, as in the HF callback until review s22).
            ``None`` (saved without a log, its position ``None``) and no log here cut nothing
            either way."""
            if log_dir is None:
                return True
            held = holds_saved_log(state, Path(log_dir)) if state is not None else None
            if held is not None:
                return held
            if saved is _UNNAMED or saved is None:
                return True
            return same_log_dir(saved, log_dir)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            diag = self.diagnostics
            if diag is None:
                return
            step = int(trainer.global_step)
            if step == self._last_step:  # a micro-batch without an optimizer step after it
                return
            self._last_step = step
            if not diag.should_measure(step):  # the batch is not read on the other steps
                return
            try:
                inputs, targets = _inputs_targets(batch, batch_fn)
            except Exception as exc:  # a batch the measurement cannot read: a failed measurement
                if diag.config.on_error == "raise":
                    raise
                warnings.warn(
                    f"curvlab diagnostics_callback: step {step} was not measured ({exc}); "
                    "training continues",
                    MeasurementFailedWarning,
                    stacklevel=2,
                )
                return
            diag.step(step, inputs, targets)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.diagnostics is not None:
                self.diagnostics.close()

    def _network(pl_module: Any) -> nn.Module:
        """The network measured: the LightningModule, which must define ``forward``, or its
        ``model_attr`` attribute, which must be a module (an error naming ``model_attr``, the
        class and its child modules: it was a raw ``AttributeError``, or a ``TypeError``
        blaming "model", after the sanity validation, found in review s22; a LightningModule
        without ``forward`` failed every measured step with torch's "missing the required
        'forward' function", found in review s24)."""
        kind = type(pl_module).__name__
        children = (
            [name for name, _ in pl_module.named_children()]
            if isinstance(pl_module, nn.Module)
            else []
        )
        if model_attr is None:
            if _defines_forward(pl_module):
                return pl_module
            raise TypeError(
                f"diagnostics_callback(model_attr=None) measures the LightningModule {kind} "
                f"itself, but {kind} defines no forward (the network it trains must map inputs "
                f"to outputs); its child modules are {children}: pass the one holding the "
                "network as model_attr, or define forward"
            )
        model = getattr(pl_module, model_attr, _MISSING)
        if isinstance(model, nn.Module):
            return model
        hint = (
            f"its child modules are {children}; pass one of them as model_attr, or "
            "model_attr=None to measure the LightningModule itself (its forward must map "
            "inputs to outputs)"
        )
        if model is _MISSING:
            raise AttributeError(
                f"diagnostics_callback(model_attr={model_attr!r}): the LightningModule {kind} "
                f"has no attribute {model_attr!r}; {hint}"
            )
        raise TypeError(
            f"diagnostics_callback(model_attr={model_attr!r}): {kind}.{model_attr} is a "
            f"{type(model).__name__}, not a torch.nn.Module (the network to measure); {hint}"
        )

    def _optimizer(trainer: Any) -> Any:
        """``optimizer=`` if given, else the trainer's first optimizer (``None``: none)."""
        if kwargs.get("optimizer") is not None:
            return kwargs["optimizer"]
        optimizers = getattr(trainer, "optimizers", None) or []
        return optimizers[0] if optimizers else None

    return DiagnosticsCallback()


_LOG_CUTS = "curvlab_log_positions"
"""The checkpoint's key of where each curvlab callback's log ended (``{absolute log_dir:
{"log_position": ..., "seen_step": ...}}``): keyed by the log, not by the settings, so that a
run resumed with other settings, which finds no state under its ``state_key``, still cuts the
lines written after the checkpoint (it kept them: each such step twice, found in review s20)."""

_STATE_LOG_DIR = "log_dir"
"""The key of the callback's state that holds the absolute ``log_dir`` (``None``: no log) its
``Diagnostics`` state's log position is of: a run resumed into another folder (``log_dir``
changed, same settings) loads the state without cutting that folder's log, which it cut at the
other log's position (found in review s20)."""

_MISSING = object()
"""No such attribute (``model_attr`` naming none)."""


def _defines_forward(module: Any) -> bool:
    """Whether ``module`` has a ``forward`` of its own: one set on the instance, or defined by
    a class of its MRO other than ``torch.nn.Module`` (whose ``forward`` raises) and Lightning's
    ``LightningModule`` (whose ``forward`` calls ``nn.Module``'s)."""
    if "forward" in getattr(module, "__dict__", {}):
        return True
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            lightning = cls.__name__ == "LightningModule" and cls.__module__.split(".")[0] in (
                "lightning",
                "pytorch_lightning",
            )
            return cls is not nn.Module and not lightning
    return False


_UNNAMED = object()
"""No ``log_dir`` filed with the state (a curvlab before review s20): the position is taken as
this callback's log's, as it was."""


def _cut_of(cuts: Any, log_dir: Any) -> Any:
    """The cut filed under ``log_dir`` in a checkpoint's ``"curvlab_log_positions"`` (its key,
    else a key naming the same folder spelled another way: ``..``, a symbolic link), or
    ``None``."""
    if not isinstance(cuts, Mapping) or log_dir is None:
        return None
    if str(log_dir) in cuts:
        return cuts[str(log_dir)]
    same = next((cut for key, cut in cuts.items() if same_log_dir(key, log_dir)), None)
    if same is not None:
        return same
    # a run folder moved as a whole: the cut whose fingerprint is of this folder's log
    return next((cut for cut in cuts.values() if holds_saved_log(cut, Path(log_dir))), None)


_OLD_STATE_KEY = "diagnostics_callback.<locals>.DiagnosticsCallback"
"""The key earlier curvlab versions filed the callback's state under (Lightning's default, the
class's qualified name): read by ``on_load_checkpoint`` so their checkpoints still resume."""


def _inputs_targets(batch: Any, batch_fn: Callable[[Any], Any] | None) -> tuple[Any, Any]:
    """The ``(inputs, targets)`` of a training batch, or a ``TypeError`` naming its structure."""
    if batch_fn is not None:
        pair = batch_fn(batch)
        if isinstance(pair, (tuple, list)) and len(pair) == 2:
            return pair[0], pair[1]
        raise TypeError(f"batch_fn must return an (inputs, targets) pair, got {_describe(pair)}")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"the training batch is {_describe(batch)}, not an (inputs, targets) pair; pass "
        "diagnostics_callback(..., batch_fn=...), a function of the batch that returns "
        "(inputs, targets), e.g. batch_fn=lambda b: (b[0], b[1]) for (x, y, index) batches or "
        "batch_fn=lambda b: (b['x'], b['y']) for dict batches"
    )


def _describe(obj: Any, depth: int = 0) -> str:
    """A short description of a batch's structure: types, lengths, keys and tensor shapes."""
    if isinstance(obj, Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {sorted(map(str, obj))}"
    if isinstance(obj, (tuple, list)):
        kind = f"a {type(obj).__name__} of {len(obj)}"
        if depth > 0 or len(obj) > 8:
            return kind
        return f"{kind} ({', '.join(_describe(x, depth + 1) for x in obj)})"
    return f"a {type(obj).__name__}"
