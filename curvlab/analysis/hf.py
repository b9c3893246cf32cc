"""An optional HuggingFace ``transformers.Trainer`` callback that runs :class:`Diagnostics`.

``transformers`` is not a dependency of curvlab: importing this module imports nothing from it;
:func:`diagnostics_callback` imports it when called and raises a clear ``ImportError`` if it is
missing.

How it measures (docs/training-loops.md, "HF Trainer", has the whole story):

* **The step's own batch.** A Trainer callback receives no batch, and drawing one from the
  dataloader would change training, so a forward pre-hook on the model (installed in
  ``on_step_begin`` of a step that will be measured, removed in ``on_pre_optimizer_step`` and
  ``on_step_end``) keeps references to the keyword tensors of the model's training-mode calls of
  that step's forward and backward passes: no hook, copy or host synchronisation on the other
  steps, and a run that raises leaves at most that step's hook (removed by the next step or
  ``train()``). With gradient accumulation the step's micro-batches are
  concatenated.
* **After the optimizer step.** ``on_step_end`` (after ``optimizer.step()``, the scheduler and
  ``zero_grad``) measures, so every value is that of the **updated** parameters on the batch the
  step was computed from, in eval mode, exactly as ``Diagnostics.step`` in a hand-written loop
  called after ``optimizer.step()``. Step ``s`` is ``state.global_step`` after the update
  (``1, 2, ...``); steps divisible by ``every`` are measured.
* **The objective.** ``loss_fn=None``: the causal-LM loss an HF model computes itself from
  ``labels`` (logits at position ``t`` against the label at ``t + 1``, ``-100`` ignored, the mean
  over the remaining tokens of the step's batch). It is measured as ``CrossEntropyLoss()`` on the
  model's logits against :func:`causal_lm_targets` (the labels shifted left by one and padded
  with ``-100``: the last position has no next token), the same function of the parameters.
  An encoder-decoder model (``config.is_encoder_decoder``: T5, BART, ...) scores decoder position
  ``t`` against ``labels[t]``, so ``loss_fn=None`` refuses it in ``on_train_begin``, before any
  step: pass ``loss_fn=nn.CrossEntropyLoss()``. So does any transformers model that is not a
  causal LM curvlab recognises (its class one of transformers'
  ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` or named ``*ForCausalLM``, or its ``config.loss_type``
  ``"ForCausalLM"``), such as a token-classification or masked-LM model, whose labels are not
  shifted (found in review s17: they were, and the measured loss was another objective's): pass
  its loss; for a causal LM that is not recognised, set
  ``model.config.loss_type = "ForCausalLM"``. ``GPT2DoubleHeadsModel`` and
  ``OpenAIGPTDoubleHeadsModel`` (a shifted LM ``loss``) are recognised too. Recognised is not
  enough (``XLNetLMHeadModel``, ``BartForCausalLM``, ... of the mapping score ``labels[t]``
  unshifted): on the first step of each ``train()`` the model's own ``loss`` of its first
  training call is compared with curvlab's causal-LM loss of the same logits, and a difference
  beyond rounding raises a ``ValueError`` naming both (:func:`_refuse_other_loss`). A model that is no ``transformers``
  ``PreTrainedModel`` cannot be told: it is measured as a causal LM, with a warning. An explicit ``loss_fn`` is applied to the model's
  logits and ``labels`` as they are (no shift); an encoder-decoder call with ``labels`` but no
  ``decoder_input_ids`` gets the ones the model derives from ``labels`` itself
  (``prepare_decoder_input_ids_from_labels``). A ``CrossEntropyLoss`` takes the classes from
  the logits' last axis for every transformers model (``classes_last``: ``T == C`` fits torch's
  layout too, and a token classifier with as many positions as labels was scored with positions
  as classes, found in review s19), but a segmentation model's (classes in axis 1). When the Trainer calls the
  model without ``labels`` (``compute_loss_func``), the targets that ``loss_fn`` itself is called
  with are used.
* **What is not modelled** (a warning, once, and a note in ``diagnostics.info``): under
  gradient accumulation the Trainer's gradient may be ``k`` times the measured objective's
  (docs/training-loops.md), and ``critical_sharpness`` ignores the Trainer's gradient clipping
  (``max_grad_norm``). Measured values are never rescaled.
* **Resuming.** ``on_save`` writes the ``Diagnostics`` state (:meth:`Diagnostics.state_dict`:
  the Monte-Carlo generator, the Fisher-explosion window, the sharpness warm starts) into the
  checkpoint folder the Trainer has just written, as ``curvlab_diagnostics.pt`` (one
  ``curvlab_diagnostics_<rank>.pt`` per process under ``torch.distributed``), and
  ``train(resume_from_checkpoint=...)`` loads it back in ``on_train_begin``, so the resumed run
  measures what the uninterrupted one would; the log's lines written after the checkpoint was
  saved (by the run that went on, then stopped) are moved to ``metrics.dropped.jsonl``
  (:meth:`Diagnostics.load_state_dict`: the state holds where the log ended), also for a
  checkpoint saved before the first measurement, and the lines written before it stay, an
  earlier run's in the same folder included. Several curvlab callbacks in one Trainer each have
  their own file, keyed by their position among the Trainer's curvlab callbacks (the first
  ``curvlab_diagnostics.pt``, the second ``curvlab_diagnostics-1.pt``, ...; with the rank:
  ``curvlab_diagnostics-1_<rank>.pt``); the file also holds the callback's settings (loss,
  quantities, ``every``, ``budget``, ``seed``, ``max_examples``), and a state saved with other
  settings is not loaded. The checkpoint folder is read from the Trainer's ``train`` call on the
  call stack (a callback is not told it); a resumed run whose folder is unknown, holds no such
  file, or one saved with other settings, warns and starts the ``Diagnostics`` afresh. A state
  saved with other settings (``every`` changed, say) for the same ``log_dir`` (the file names
  it) still cuts the log where it ended at the checkpoint, so the log holds each step once (it
  kept the stopped run's later lines: ``[2, 4, 4, 5, ...]``, found in review s20). Which log a
  state is of is told by its fingerprint of the log's last bytes before the saved position
  (``"log_tail"``, as :meth:`Diagnostics.load_state_dict` tells it): a run folder moved or
  copied as a whole, ``output_dir`` and log together, is the same log and is cut (the folder's
  name was compared, so it logged a step twice, ``[2, 4, 4, 6, 8]``, found in review s22). A
  state of another log (``log_dir`` changed on resuming, a log replaced since) cuts nothing in
  this callback's folder, with a warning: with the same settings the ``Diagnostics`` resumes,
  its log appended to as it is (it was cut at the other log's position, another run's lines
  moved to ``metrics.dropped.jsonl``, found in review s20). A state without a fingerprint
  (saved before the first measurement, or by curvlab before review s22) is told by its folder,
  compared resolved: the same folder through a symbolic link or ``..`` is the same log. A
  state file that cannot be read or
  loaded (cut short) is a ``ValueError`` naming it, before any step: delete it to resume with
  the ``Diagnostics`` started afresh.
* **Logging.** Scalars go to ``state.log_history`` as ``{"curvlab/<name>": value, ...,
  "epoch": ..., "step": s}`` and to every callback's ``on_log`` (the reporting integrations:
  TensorBoard, W&B, MLflow, ... and the progress printer), as ``Trainer.log`` does for the
  Trainer's own logs, through the Trainer's callback handler (found on the call stack: a callback
  gets no reference to it). ``control`` is not touched, so the Trainer's own loss logs keep their
  cadence and values.

Example:
    >>> from curvlab.analysis.hf import diagnostics_callback
    >>> cb = diagnostics_callback(every=50, quantities=["loss", "trace_fisher"])  # doctest: +SKIP
    >>> trainer = transformers.Trainer(model, args, train_dataset=ds, callbacks=[cb])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> [e for e in trainer.state.log_history if "curvlab/trace_fisher" in e]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._losses import classes_last, loss_module
from curvlab.analysis._callback_checks import callback_settings, check_options, materialise
from curvlab.analysis._diagnostics import Diagnostics, MeasurementFailedWarning
from curvlab.analysis._hf_frames import find_handler, find_trainer, resume_folder
from curvlab.analysis._hf_notes import accumulation_note, clipping_note
from curvlab.analysis._metrics_log import (
    check_log_dir,
    holds_saved_log,
    same_log_dir,
    start_afresh_with_cut,
)

__all__ = ["diagnostics_callback", "causal_lm_targets"]

_PREFIX = "curvlab/"
# in each checkpoint folder: <name>.pt for the first curvlab callback, <name>-<i>.pt for the
# i-th (from 0) after it; with the process's rank: <name>_<rank>.pt, <name>-<i>_<rank>.pt
_STATE_FILE = "curvlab_diagnostics"
_SETTINGS = "callback_settings"  # the key of the callback's settings in the saved state
# the key of the (absolute) log_dir the saved state's log position is of: a state cuts this
# callback's log only when it is of the same folder (compared resolved: same_log_dir). Another
# folder (log_dir changed on resuming; the callbacks reordered: another callback's file) is not
# cut at a position of another log (with the same settings it was, found in review s20)
_LOG_DIR = "callback_log_dir"
_UNNAMED = object()  # a state file of a curvlab before _LOG_DIR: its position is taken as ours
_IGNORE_INDEX = -100  # HuggingFace's ignored label
# keyword arguments the Trainer passes to the model that are not model inputs
_NOT_INPUTS = frozenset({"labels", "shift_labels", "num_items_in_batch", "return_loss"})


def _refuse_a_shared_log_dir(callback: Any, handler: Any) -> None:
    """Refuse, when training starts, a ``log_dir`` that another curvlab callback of the same
    Trainer also writes: the second one's ``Diagnostics`` would take the folder over and the
    first one's first measured step would raise, after training had started (found in review
    s17, once the takeover replaced the refusal)."""
    mine = callback.options.get("log_dir")
    if mine is None or handler is None:
        return
    here = Path(mine).expanduser().resolve()
    for other in getattr(handler, "callbacks", None) or ():
        theirs = getattr(other, "options", {}).get("log_dir") if other is not callback else None
        if (
            theirs is not None
            and type(other).__name__ == type(callback).__name__
            and Path(theirs).expanduser().resolve() == here
        ):
            raise ValueError(
                f"diagnostics_callback: two curvlab callbacks of this Trainer write log_dir "
                f"{str(here)!r}; they would overwrite each other's metrics files. Give each "
                "callback its own log_dir (e.g. log_dir='curvlab/cheap' and 'curvlab/costly')"
            )


def diagnostics_callback(
    loss_fn: nn.Module | None = None,
    every: int | None = 50,
    quantities: Iterable[str] | None = None,
    **options: Any,
) -> Any:
    """A ``transformers.TrainerCallback`` that measures curvature every ``every`` steps.

    Args:
        loss_fn: ``None`` (the default) for a causal language model trained on ``labels``: the
            objective is the loss the HF model computes itself (labels shifted by one inside the
            model, ``-100`` ignored, the mean over the batch's remaining tokens); refused when
            training starts for an encoder-decoder model and for a transformers model that is
            not a causal LM curvlab recognises (token classification, masked LM, ...: pass its
            loss; a causal LM that is not recognised is declared by
            ``model.config.loss_type = "ForCausalLM"``); a model of another kind is measured as
            a causal LM, with a warning. On the first step the model's own returned loss is
            compared with that objective on the same logits: a model whose loss is another
            (unshifted, as ``XLNetLMHeadModel``'s, or with extra terms) is refused there.
            Else a ``CrossEntropyLoss``,
            ``MSELoss`` or ``BCEWithLogitsLoss`` applied to the model's logits against the
            batch's ``labels`` as they are (e.g. sequence or token classification, or
            ``nn.CrossEntropyLoss()`` for an encoder-decoder model such as T5); for a
            transformers model (but a segmentation one) a ``CrossEntropyLoss`` reads the
            classes from the logits' last axis, as the model's own loss does, also when the
            length equals the number of classes.
        every: measure the steps whose ``state.global_step`` (after the update) is divisible by
            ``every``; with ``budget=`` the minimum spacing (``None``: none).
        quantities: names from :data:`curvlab.analysis.QUANTITIES` (``None``: Diagnostics'
            defaults ``loss``, ``grad_norm``, ``trace_fisher``, ``trace_empirical_fisher``,
            ``noise_scale``).
        **options: :class:`~curvlab.analysis.Diagnostics`' options as keywords (``log_dir``,
            ``config``, ``process_group`` and every :class:`~curvlab.analysis.DiagnosticsConfig`
            field: ``seed``, ``max_examples``, ``budget``, ``on_error``, ``options``,
            ``callback``, ...). They are checked here, before training (``log_dir`` a path
            that is no existing file; a relative one is taken against the working directory
            here, once, so a later ``os.chdir`` does not move the log). One open ``Diagnostics`` per ``log_dir`` in a process:
            two curvlab callbacks of one Trainer on one folder are refused when training
            starts (a ``ValueError``, before any step); of a callback and another
            ``Diagnostics`` on one folder, the later takes it over (a ``RuntimeWarning`` naming
            it), and the earlier one's next measurement raises a ``RuntimeError`` (give each its
            own ``log_dir``); the callback frees its folder at the end of
            training (``on_train_end``; after a ``train()`` that raised,
            ``cb.diagnostics.close()`` or the next ``train()`` of this callback does). ``optimizer`` defaults
            to the Trainer's own (handed to ``on_train_begin``), which the sharpness
            measurements read (``"preconditioned_sharpness"``, ``"critical_sharpness"``): an
            optimizer of a kind they cannot read is refused here when given as ``optimizer=``,
            else when training starts (``on_train_begin``, before any step).

    Returns:
        A ``TrainerCallback``; pass it as ``Trainer(..., callbacks=[cb])``. Its ``diagnostics``
        attribute holds the :class:`~curvlab.analysis.Diagnostics` of the current (or last)
        ``train()`` call (``records`` with per-layer values keyed by the model's module names),
        ``None`` before training.

    Raises:
        ImportError: if ``transformers`` is not installed.
        TypeError, ValueError: for an unknown option, quantity or loss, a bad schedule, or a
            ``log_dir`` that is no path (``NotADirectoryError``: an existing file). When
            training starts (``on_train_begin``), ``ValueError`` for ``loss_fn=None`` with an
            encoder-decoder model or one that is not a causal LM (``TypeError`` for the sharpness
            measurements' refusal of the Trainer's optimizer), and a checkpoint's
            ``curvlab_diagnostics.pt`` that cannot be read or loaded (cut short: named, with the
            fix, delete it); at the end of the first step
            (``on_step_end``), ``ValueError`` for ``loss_fn=None`` with a model whose own loss
            is not the causal-LM one. ``RuntimeError`` at a measured step if a newer
            ``Diagnostics`` (or callback) took its ``log_dir`` over.

    Example:
        >>> from curvlab.analysis.hf import diagnostics_callback
        >>> cb = diagnostics_callback(every=2, quantities=["loss", "trace_fisher"])
        >>> cb.diagnostics is None  # created when training starts
        True
    """
    base = _trainer_callback_base()
    quantities = materialise(quantities)  # an iterator is read once, not by the check
    names, cfg = check_options(loss_fn, every, quantities, options)
    if options.get("log_dir") is not None:  # absolute, now: a later os.chdir moves nothing
        options = {**options, "log_dir": check_log_dir(options["log_dir"])}
    cls = _callback_class(base)
    return cls(loss_fn, every, quantities, options, callback_settings(loss_fn, names, every, cfg))


def causal_lm_targets(labels: Tensor) -> Tensor:
    """The targets of the causal-LM objective, position by position: ``labels`` shifted left.

    ``CrossEntropyLoss()(logits, causal_lm_targets(labels))`` (classes on the last axis, curvlab's
    GPT layout) is the loss a HuggingFace causal LM returns for ``labels``: position ``t`` is
    scored against ``labels[:, t + 1]``; the last position, which has no next token, and every
    ``-100`` label are ignored.

    Args:
        labels: integer labels ``(batch, seq)`` as given to the model.

    Returns:
        ``(batch, seq)`` targets: ``labels[:, 1:]`` followed by ``-100``.

    Example:
        >>> causal_lm_targets(torch.tensor([[5, 6, 7], [8, -100, 9]]))
        tensor([[   6,    7, -100],
                [-100,    9, -100]])
    """
    if not isinstance(labels, Tensor) or labels.ndim != 2 or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"loss_fn=None expects causal-LM labels: integer token ids of shape (batch, seq), "
            f"got {shape}; for another head pass the loss, e.g. "
            "diagnostics_callback(loss_fn=torch.nn.CrossEntropyLoss())"
        )
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=_IGNORE_INDEX)


# ---------------------------------------------------------------------- construction
def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError(
            "curvlab.analysis.hf.diagnostics_callback needs HuggingFace transformers: "
            "pip install transformers (or call curvlab.Diagnostics in your own training loop)"
        ) from exc
    return TrainerCallback


@functools.cache
def _callback_class(base: type) -> type:
    """The callback class, a subclass of ``transformers.TrainerCallback`` (made once)."""

    class CurvlabDiagnosticsCallback(base):  # type: ignore[misc, valid-type]
        """Runs :class:`curvlab.Diagnostics` on the Trainer's own batches (see the module doc)."""

        def __init__(
            self,
            loss_fn: nn.Module | None,
            every: int | None,
            quantities: Iterable[str] | None,
            options: dict[str, Any],
            settings: dict[str, Any],
        ) -> None:
            super().__init__()
            self.loss_fn = loss_fn
            self.settings = settings  # saved with the state: a resume needs the same
            self.every = every
            self.quantities = None if quantities is None else tuple(quantities)
            self.options = dict(options)
            self.diagnostics: Diagnostics | None = None
            self._model: nn.Module | None = None
            self._handles: list[Any] = []
            self._handler: Any = None
            self._armed = False  # this step will be measured
            self._recording = False  # its forward/backward passes are running: keep the calls
            self._calls: list[dict[str, Any]] = []
            self._loss_targets: list[Any] = []
            self._max_calls = 1  # the step's micro-batches (gradient_accumulation_steps)
            self._encoder_decoder = False
            # loss_fn=None: the first training-mode call's own loss against the causal-LM one
            self._verify_pending = False
            self._verify: dict[str, Any] | None = None
            self._scaled_for_ga: bool | None = None  # the Trainer's loss_is_scaled_for_ga
            self._warned: set[str] = set()
            # position among the Trainer's curvlab callbacks (keys the state file), and how many
            self._index, self._instances = 0, 1

        # ------------------------------------------------------------ training events
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs.get("model")
            if not isinstance(model, nn.Module):
                raise TypeError(
                    "diagnostics_callback: the Trainer passed no model to on_train_begin; "
                    "it needs a torch.nn.Module model"
                )
            if self.loss_fn is None and _is_encoder_decoder(model):
                raise ValueError(
                    f"diagnostics_callback(loss_fn=None) measures the causal-LM objective "
                    f"(logits at position t against labels[t + 1]), but "
                    f"{type(model).__name__} is an encoder-decoder model "
                    "(config.is_encoder_decoder), whose loss scores decoder position t against "
                    "labels[t]; pass diagnostics_callback(loss_fn=torch.nn.CrossEntropyLoss()), "
                    "which scores the logits against the labels as they are (the model's own loss)"
                )
            causal = _is_causal_lm(model) if self.loss_fn is None else True
            if causal is None:
                self._warn(
                    "causal",
                    f"diagnostics_callback(loss_fn=None): {_model_name(model)} is not a "
                    "transformers model, so curvlab cannot tell whether it is a causal LM; it "
                    "measures the causal-LM objective (logits at position t against "
                    "labels[t + 1]). If the model scores position t against labels[t] (token "
                    "classification, a model fed pre-shifted labels), pass its loss, e.g. "
                    "diagnostics_callback(loss_fn=torch.nn.CrossEntropyLoss())",
                )
            elif not causal:
                raise ValueError(
                    f"diagnostics_callback(loss_fn=None) measures the causal-LM objective "
                    f"(logits at position t against labels[t + 1]), but {_model_name(model)} is "
                    "not a causal language model curvlab recognises (one of transformers' "
                    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, a *ForCausalLM class, or "
                    "config.loss_type 'ForCausalLM'); a token-classification or masked-LM "
                    "model scores position t against labels[t]. Pass the loss it is trained "
                    "with, e.g. diagnostics_callback(loss_fn=torch.nn.CrossEntropyLoss()) "
                    "(applied to the logits and the labels as they are); for a causal LM that is "
                    "not recognised, set model.config.loss_type = 'ForCausalLM'"
                )
            handler = find_handler(self)
            _refuse_a_shared_log_dir(self, handler)  # before any step
            self._remove_hooks()
            if self.diagnostics is not None:
                self.diagnostics.close()  # its log_dir is free for the new one
            loss_fn = self.loss_fn if self.loss_fn is not None else _causal_lm_loss()
            if _classes_last_logits(model) and isinstance(
                loss_module(loss_fn), nn.CrossEntropyLoss
            ):
                # logits (B, T, C) against labels (B, T): with T == C torch's layout fits as
                # well, and positions were scored as classes (an encoder-decoder's decoder, and
                # a token classifier, found in review s19: 1.790252 for its own 1.798421); say
                # the classes are last
                loss_fn = classes_last(loss_fn)
            options = dict(self.options)
            if options.get("optimizer") is None and kwargs.get("optimizer") is not None:
                options["optimizer"] = kwargs["optimizer"]  # read by the sharpness measurements
            self.diagnostics = Diagnostics(
                model, loss_fn, quantities=self.quantities, every=self.every, **options
            )
            self._model = model  # its recording hooks live only through a measured step
            self._verify_pending, self._verify = self.loss_fn is None, None
            self._encoder_decoder = _is_encoder_decoder(model)
            self._max_calls = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
            self._handler = handler
            if self._handler is None:
                self._warn(
                    "handler",
                    "diagnostics_callback could not find the Trainer's callback handler; its "
                    "values go to state.log_history only, not to the reporting integrations",
                )
            callbacks = getattr(self._handler, "callbacks", None) or ()
            ours = [cb for cb in callbacks if isinstance(cb, CurvlabDiagnosticsCallback)]
            self._index = next((i for i, cb in enumerate(ours) if cb is self), 0)
            self._instances = max(1, len(ours))
            trainer = find_trainer(self._handler)
            self._scaled_for_ga = getattr(trainer, "loss_is_scaled_for_ga", None)
            self._note_clipping(args)
            self._resume(args, state, resume_folder(trainer))

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """Write the ``Diagnostics`` state into the checkpoint folder just saved."""
            if self.diagnostics is None:
                return
            folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
            if not os.path.isdir(folder):  # a hyperparameter search's run folder, say
                self._warn(
                    "save",
                    f"diagnostics_callback: the checkpoint folder {folder!r} was not found, so "
                    "the Diagnostics state was not saved with the checkpoint; a run resumed "
                    "from it starts the Diagnostics afresh",
                )
                return
            path = os.path.join(folder, _state_file_name(args, self._index))
            tmp = path + ".tmp"
            # the state holds where the log ends now ("log_position"; every measurement up to
            # this step is in it), where a resume cuts it; "seen_step" is the checkpoint's step
            # (the Diagnostics is called on measured steps only, so its own last step was None
            # before the first measurement: found in review)
            saved = {**self.diagnostics.state_dict(), "seen_step": int(state.global_step)}
            log_dir = self.diagnostics.log_dir
            saved[_LOG_DIR] = None if log_dir is None else str(log_dir)  # absolute
            torch.save({**saved, _SETTINGS: self.settings}, tmp)
            os.replace(tmp, path)  # never a half-written state file in a checkpoint

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._calls, self._loss_targets = [], []
            diag = self.diagnostics
            # the step about to run is global_step + 1 once the optimizer has stepped
            self._armed = diag is not None and diag.should_measure(state.global_step + 1)
            self._recording = self._armed
            self._remove_step_hooks()  # a measured step that raised left its hooks behind
            if self._armed and self._model is not None:
                self._handles.append(
                    self._model.register_forward_pre_hook(self._capture, with_kwargs=True)
                )
                if self.loss_fn is not None:  # a compute_loss_func that calls it: its targets
                    self._handles.append(self.loss_fn.register_forward_pre_hook(self._capture_loss))
            if self._verify_pending and self._model is not None:  # the run's first step
                self._handles.append(
                    self._model.register_forward_hook(self._check_own_loss, with_kwargs=True)
                )

        def _resume(self, args: Any, state: Any, folder: str | None) -> None:
            """Load the ``Diagnostics`` state saved in ``folder`` (the checkpoint resumed from)."""
            assert self.diagnostics is not None
            afresh = (
                "the Diagnostics starts afresh: Monte-Carlo labels are drawn anew (other draws "
                "of the same unbiased estimates), the Fisher-explosion window is empty and the "
                "sharpness measurements start cold"
            )
            if folder is None:
                if int(getattr(state, "global_step", 0) or 0) > 0:
                    self._warn(
                        "resume",
                        f"diagnostics_callback: training resumes at step {state.global_step} "
                        f"from a checkpoint folder the callback could not find; {afresh}",
                    )
                return
            path = os.path.join(folder, _state_file_name(args, self._index))
            name = os.path.basename(path)
            if not os.path.isfile(path):
                self._warn(
                    "resume",
                    f"diagnostics_callback: the checkpoint {folder!r} holds no {name} (it was "
                    f"saved without this callback, or by an older curvlab); {afresh}",
                )
                return
            try:
                state = _read_state_file(path)
            except ValueError:
                self.diagnostics.close()  # its log_dir freed: no step was measured
                raise
            saved = state.pop(_SETTINGS, None) if isinstance(state, dict) else None
            log_dir = state.pop(_LOG_DIR, _UNNAMED) if isinstance(state, dict) else _UNNAMED
            mine = self.diagnostics.log_dir
            # whether the state's log position is of this callback's log: by its fingerprint
            # where it has one (a run folder moved or copied as a whole is the same log; only
            # the folder's name was compared, so a moved output_dir resumed from a checkpoint
            # logged a step twice: [2, 4, 4, 6, 8], found in review s22), else by the folder
            held = None if mine is None else holds_saved_log(state, mine)
            ours = mine is not None and (same_log_dir(log_dir, mine) if held is None else held)
            if saved is None and self._instances > 1:
                # an earlier curvlab wrote one file for all its callbacks (the last one's state)
                self._warn(
                    "resume",
                    f"diagnostics_callback: {name} in {folder!r} was saved by an older curvlab, "
                    f"which kept one state for all {self._instances} curvlab callbacks of the "
                    f"Trainer, so it may be another callback's; {afresh}",
                )
                return
            if saved is not None and saved != self.settings:
                # its measurements cannot go on, but the log lines written after the checkpoint
                # are measured again: the log is cut at the saved position all the same (it
                # was not, and held those steps twice, found in review s20), when the state is
                # of this log (the callbacks reordered: another callback's file)
                cut = ""
                if ours:
                    self._load(path, lambda: start_afresh_with_cut(self.diagnostics, state))
                    cut = (
                        "its log was cut where it ended at the checkpoint (the lines written "
                        "after it, by the run that went on, moved to metrics.dropped.jsonl); "
                    )
                elif mine is not None:
                    named = isinstance(log_dir, str)
                    of = f"is of log_dir {log_dir!r}" if named else "names no log_dir"
                    if held is False:  # its fingerprint decided
                        of = (
                            "was taken of another log: the bytes before its log position are "
                            "not those of this callback's metrics.jsonl (a log replaced since, "
                            "or another run's)"
                        )
                    cut = (
                        f"its log is not cut (the state {of}, not this callback's "
                        f"{str(mine)!r}): steps it logged after the checkpoint may appear twice; "
                    )
                self._warn(
                    "resume",
                    f"diagnostics_callback: {name} in {folder!r} was saved by the curvlab "
                    f"callback at this position (number {self._index + 1} of the Trainer's "
                    f"curvlab callbacks) with other settings ({saved}, now {self.settings}); "
                    f"{cut}{afresh}",
                )
                return
            if mine is not None and log_dir is not _UNNAMED and not ours:
                # the same settings, another log (log_dir changed on resuming; a log replaced
                # since): the state's measurements go on, but its log position is of the other
                # log, which cut this one there (another run's lines moved to
                # metrics.dropped.jsonl, found in review s20); None: nothing is cut
                state = {**state, "log_position": None}
                self._load(path, lambda: self.diagnostics.load_state_dict(state))
                if log_dir is not None:  # saved with a log: what it would have cut is said
                    of = f"is of log_dir {log_dir!r}, not this callback's {str(mine)!r}"
                    if same_log_dir(log_dir, mine):  # its fingerprint decided
                        of = (
                            f"is of the log {str(mine)!r} held before it was replaced (the bytes "
                            "before its log position are not those of metrics.jsonl now)"
                        )
                    self._warn(
                        "resume",
                        f"diagnostics_callback: {name} in {folder!r} {of}: the Diagnostics "
                        "resumes (its Monte-Carlo generator, Fisher-explosion window and "
                        "sharpness warm starts), but its log is not cut (the lines the run that "
                        f"went on wrote after the checkpoint stay in {log_dir!r}; "
                        f"{str(mine)!r} is appended to as it is)",
                    )
                return
            self._load(path, lambda: self.diagnostics.load_state_dict(state))

        def _load(self, path: str, load: Callable[[], None]) -> None:
            """Run ``load`` (a ``Diagnostics.load_state_dict``); a state file it refuses is named
            in the error, with the fix, and the ``Diagnostics`` is closed (its log_dir freed)."""
            assert self.diagnostics is not None
            try:
                load()
            except ValueError as exc:
                self.diagnostics.close()
                raise ValueError(
                    f"diagnostics_callback: the Diagnostics state {path!r} of the checkpoint "
                    f"resumed from cannot be loaded: {exc}. Delete the file to resume the "
                    "training with the Diagnostics started afresh (other draws of the same "
                    "unbiased estimates, cold sharpness starts)"
                ) from exc

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
            # the step's forward and backward passes are over: model calls from here on (an
            # optimizer's own curvature pass, say) are not the step's batch
            self._recording = False
            self._remove_step_hooks()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            armed, calls, loss_targets = self._armed, self._calls, self._loss_targets
            self._armed = self._recording = False
            self._remove_step_hooks()
            self._calls, self._loss_targets = [], []
            verify, self._verify, self._verify_pending = self._verify, None, False
            if verify is not None and self._model is not None:
                _refuse_other_loss(verify, _model_name(self._model), int(state.global_step))
            if not armed or self.diagnostics is None:
                return None
            step = int(state.global_step)
            if not calls:
                self._warn(
                    "nobatch",
                    f"diagnostics_callback: no training-mode call of the model was seen at step "
                    f"{step}, so nothing was measured (a model called through nn.DataParallel "
                    "replicas is not seen; use one process per device)",
                )
                return None
            try:
                inputs, targets = self._batch(calls, loss_targets, step)
            except ValueError as exc:  # a batch the measurement cannot read: as a failure
                if self.diagnostics.config.on_error == "raise":
                    raise
                self._warn("batch", f"{exc}; training continues", MeasurementFailedWarning)
                return None
            if len(calls) > 1:
                self._note_accumulation(calls, loss_targets)
            assert self._model is not None
            # accelerate's autocast wrapper of forward is taken off in curvlab's own passes
            # (curvlab._notrace.leave_no_trace), so the measurement is in float32
            record = self.diagnostics.step(step, inputs, targets)
            if record is None:
                return None
            return self._log(record, args, state, control)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._remove_hooks()
            self._handler = None
            self._armed = self._recording = self._verify_pending = False
            self._verify = None
            self._calls, self._loss_targets = [], []
            if self.diagnostics is not None:
                self.diagnostics.close()

        # ------------------------------------------------------------ the batch
        def _capture(
            self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> None:
            # references only (no copy, no host sync); only the model itself in training mode
            if self._recording and module.training and module is self._model:
                if len(self._calls) >= self._max_calls:
                    # more training-mode calls than the step has micro-batches: the step raised
                    # (its hooks stayed) or the loop calls the model more than once per
                    # micro-batch; keep no batch (on_step_end says so) and hold nothing
                    self._recording = self._armed = False
                    self._calls, self._loss_targets = [], []
                    self._remove_step_hooks()
                    self._warn(
                        "calls",
                        "diagnostics_callback: the model was called more often in training mode "
                        "than the step has micro-batches; that step is not measured",
                    )
                    return
                if args:
                    self._warn(
                        "positional",
                        "diagnostics_callback: the model was called with positional arguments; "
                        "it reads keyword inputs (model(**batch), as the Trainer calls it)",
                    )
                self._calls.append(dict(kwargs))

        def _check_own_loss(
            self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            """``loss_fn=None``: keep the first training-mode call's own loss and curvlab's
            causal-LM loss of the same logits (0-dim tensors: no host synchronisation here),
            which ``on_step_end`` compares (:func:`_refuse_other_loss`)."""
            if self._verify_pending and module.training and module is self._model:
                self._verify_pending = False  # the first call only
                self._verify = _own_loss_probe(kwargs, output)

        def _capture_loss(self, module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._recording and len(args) >= 2:
                self._loss_targets.append(args[1])

        def _batch(
            self, calls: list[dict[str, Any]], loss_targets: list[Any], step: int
        ) -> tuple[dict[str, Tensor], Tensor]:
            """The step's ``(inputs, targets)`` from its model calls (micro-batches)."""
            aligned = len(loss_targets) == len(calls)
            parts = [
                self._micro_batch(
                    kw, loss_targets[i] if aligned else None, step, len(loss_targets), len(calls)
                )
                for i, kw in enumerate(calls)
            ]
            return parts[0] if len(parts) == 1 else _concatenate(parts, self._warn)

        def _micro_batch(
            self, kw: dict[str, Any], loss_target: Any, step: int, loss_calls: int, calls: int
        ) -> tuple[dict[str, Tensor], Tensor]:
            """One model call's ``(inputs, targets)``; ``loss_calls`` and ``calls``: how often
            the loss module and the model were called at the step (to name the cause when the
            targets cannot be told)."""
            labels = kw.get("labels")
            if self.loss_fn is None:
                targets = kw.get("shift_labels")
                if targets is None and isinstance(labels, Tensor):
                    targets = causal_lm_targets(labels)
            else:
                targets = labels if labels is not None else loss_target
            if not isinstance(targets, Tensor):
                if self.loss_fn is not None and loss_calls > calls:
                    # the loss module was called, but more often than the model: whose targets?
                    raise ValueError(
                        f"diagnostics_callback: at step {step} the loss module was called "
                        f"{loss_calls} times for {calls} model call(s) (micro-batches), so the "
                        "targets of each micro-batch cannot be told (the model call had no "
                        "'labels': the Trainer removes them when compute_loss_func computes the "
                        "loss); call the loss module passed to diagnostics_callback once per "
                        "micro-batch in compute_loss_func (an extra term with another instance "
                        "of the loss, e.g. nn.CrossEntropyLoss(), is not seen)"
                    )
                fix = (
                    "pass diagnostics_callback(loss_fn=...) the loss module your "
                    "compute_loss_func calls (its targets are then used)"
                    if self.loss_fn is None
                    else "call this loss module in compute_loss_func on the model's logits"
                )
                raise ValueError(
                    f"diagnostics_callback: the model call at step {step} had no 'labels' "
                    f"(keywords: {sorted(kw)}): the Trainer removes them when it computes the "
                    f"loss itself (compute_loss_func, label_smoothing_factor); {fix}"
                )
            n = _batch_size(kw, targets)
            if targets.ndim >= 1 and targets.shape[0] != n and targets.numel() % n == 0:
                targets = targets.reshape(n, -1)  # a loss called on flattened (B*T,) tokens
            inputs: dict[str, Tensor] = {}
            dropped = []
            for k, v in kw.items():
                if k in _NOT_INPUTS or v is None:
                    continue
                if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == n:
                    inputs[k] = v.detach()
                else:
                    dropped.append(k)
            if dropped:
                self._warn(
                    "dropped",
                    f"diagnostics_callback: model keywords {sorted(dropped)} are not per-example "
                    "tensors; the measurement calls the model without them",
                )
            if (
                self._encoder_decoder
                and isinstance(labels, Tensor)
                and "decoder_input_ids" not in inputs
                and "decoder_inputs_embeds" not in inputs
            ):
                # the model derived its decoder inputs from the labels, which the measurement
                # does not pass: derive them the same way
                prepare = getattr(self._model, "prepare_decoder_input_ids_from_labels", None)
                if callable(prepare):
                    inputs["decoder_input_ids"] = prepare(labels=labels).detach()
            return inputs, targets.detach()

        # ------------------------------------------------------------ what is not modelled
        def _note_accumulation(self, calls: list[dict[str, Any]], loss_targets: list[Any]) -> None:
            """Note (and warn, once, where they differ) how the Trainer's accumulated gradient
            relates to the measured objective (:func:`curvlab.analysis._hf_notes.accumulation_note`)."""
            diag = self.diagnostics
            if diag is None or "gradient_accumulation" in diag.info:
                return
            note, differs = accumulation_note(self._model, calls, loss_targets, self._scaled_for_ga)
            if differs:
                self._warn(
                    "accumulation-scale",
                    f"diagnostics_callback: {note}. Compare sharpness with the threshold at the "
                    "learning rate this gradient amounts to on the measured objective, or make "
                    "the Trainer's gradient the objective's (docs/training-loops.md, 'Gradient "
                    "accumulation'); measured values are not rescaled",
                )
            diag.info["gradient_accumulation"] = note

        def _note_clipping(self, args: Any) -> None:
            """Note (and warn, once) that ``critical_sharpness`` does not model clipping."""
            diag = self.diagnostics
            note = None if diag is None else clipping_note(args, diag.quantities)
            if note is not None:
                diag.info["gradient_clipping"] = note
                self._warn("clipping", f"diagnostics_callback: {note}")

        # ------------------------------------------------------------ logging
        def _log(self, record: dict[str, Any], args: Any, state: Any, control: Any) -> Any:
            logs = _scalars(record["values"])
            if not logs:
                return None
            if state.epoch is not None:
                logs["epoch"] = state.epoch
            state.log_history.append({**logs, "step": int(state.global_step)})
            if self._handler is None:
                return None
            # call_event, not handler.on_log: that one resets control.should_log, which would
            # drop the Trainer's own log at this step
            return self._handler.call_event("on_log", args, state, control, logs=dict(logs))

        # ------------------------------------------------------------ helpers
        def _remove_step_hooks(self) -> None:
            for handle in self._handles:
                handle.remove()
            self._handles = []

        def _remove_hooks(self) -> None:
            self._remove_step_hooks()
            self._model = None

        def _warn(self, key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
            if key not in self._warned:  # once per kind of problem, not every step
                self._warned.add(key)
                warnings.warn(message, category, stacklevel=3)

        def __repr__(self) -> str:
            return (
                f"CurvlabDiagnosticsCallback(loss_fn={self.loss_fn!r}, every={self.every}, "
                f"quantities={self.quantities}, options={sorted(self.options)})"
            )

    return CurvlabDiagnosticsCallback


def _read_state_file(path: str) -> Any:
    """``torch.load`` of a checkpoint's Diagnostics state file, or an error naming the file.

    Raises:
        ValueError: if the file cannot be read (cut short, not written by ``torch.save``, or
            holding what ``weights_only=True`` refuses): torch's own error named no file (a
            truncated file gave "PytorchStreamReader failed reading zip archive", found in
            review s20); this one says how to resume without it.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        why = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]  # its first sentence
        raise ValueError(
            f"diagnostics_callback: the Diagnostics state {path!r} of the checkpoint resumed "
            f"from cannot be read ({type(exc).__name__}: {why}); "
            "it is damaged (cut short when the checkpoint was written or copied?) or not a "
            "file curvlab wrote. Delete it to resume the training with the Diagnostics "
            "started afresh (other draws of the same unbiased estimates, cold sharpness "
            "starts), or resume from another checkpoint"
        ) from exc


def _state_file_name(args: Any, index: int = 0) -> str:
    """The Diagnostics state's file in a checkpoint folder: one per process, as the Trainer's
    own RNG states (``rng_state.pth``, ``rng_state_<rank>.pth``), and one per curvlab callback
    (``index``: its position among the Trainer's curvlab callbacks; the first keeps the name of
    the files of a single callback, which earlier curvlab versions wrote)."""
    stem = _STATE_FILE if index == 0 else f"{_STATE_FILE}-{index}"
    if int(getattr(args, "world_size", 1) or 1) <= 1:
        return f"{stem}.pt"
    return f"{stem}_{int(args.process_index)}.pt"


def _model_name(model: nn.Module) -> str:
    """The class name of an HF model, through the wrappers :func:`_unwrapped` looks into."""
    names = [type(m).__name__ for m in _unwrapped(model)]
    return names[0] if len(names) == 1 else f"{names[0]} (of {names[-1]})"


def _unwrapped(model: nn.Module) -> list[nn.Module]:
    """``model`` and the modules it wraps: a ``torch.compile`` wrapper's ``_orig_mod``, a
    DDP-style ``module``, a PEFT model's base model (``get_base_model()``)."""
    chain = [model]
    for _ in range(4):
        m = chain[-1]
        inner = getattr(m, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(m, "module", None)
        if not isinstance(inner, nn.Module):
            get_base = getattr(m, "get_base_model", None)
            inner = get_base() if callable(get_base) else None
        if not isinstance(inner, nn.Module) or inner is m:
            break
        chain.append(inner)
    return chain


_SHIFTED_LM_HEADS = frozenset({"GPT2DoubleHeadsModel", "OpenAIGPTDoubleHeadsModel"})
"""Models outside transformers' causal-LM mapping whose ``loss`` is the shifted causal-LM loss
(their multiple-choice loss is the separate ``mc_loss``, which the Trainer does not train on)."""


def _is_causal_lm(model: nn.Module) -> bool | None:
    """Whether ``model`` (or a model it wraps) is an HF causal language model, whose loss
    scores position ``t`` against ``labels[t + 1]``: its class is one of transformers'
    ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` or of :data:`_SHIFTED_LM_HEADS`, or its name ends with
    ``ForCausalLM`` (remote-code and PEFT models), or its loss type (``config.loss_type``, else the model's ``loss_type``)
    is one transformers computes with its causal-LM loss (``ForCausalLM``,
    ``ForConditionalGeneration``). A token-classification or masked-LM model (the same logits'
    shape, labels unshifted) is none of these (found in review: its labels were shifted). Being
    recognised is not enough: a few of these models score their labels unshifted
    (``XLNetLMHeadModel``, ``BartForCausalLM``, ...), which the first step's check of the model's
    own loss refuses (:func:`_refuse_other_loss`).
    ``None``: neither recognised nor a ``transformers.PreTrainedModel`` (a model of the user's
    own), which cannot be told."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - a transformers without the auto mappings
        known: set[str] = set()
    else:
        known = set()
        for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            known.update((v,) if isinstance(v, str) else v)
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # transformers < 4.46: no loss types
        LOSS_MAPPING = {}
    causal_loss = LOSS_MAPPING.get("ForCausalLM")
    for m in _unwrapped(model):
        name = type(m).__name__
        if name in known or name in _SHIFTED_LM_HEADS or name.endswith("ForCausalLM"):
            return True
        loss_type = getattr(getattr(m, "config", None), "loss_type", None)
        if loss_type is None:
            loss_type = getattr(m, "loss_type", None)
        if isinstance(loss_type, str) and (
            loss_type == "ForCausalLM"
            or (causal_loss is not None and LOSS_MAPPING.get(loss_type) is causal_loss)
        ):
            return True
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - the callback needs transformers
        return None
    return False if any(isinstance(m, PreTrainedModel) for m in _unwrapped(model)) else None


def _own_loss_probe(kwargs: dict[str, Any], output: Any) -> dict[str, Any] | None:
    """What :func:`_refuse_other_loss` compares, from one model call's keywords and output: the
    model's own ``loss``, and the cross-entropy sums and counts of its ``logits`` against
    curvlab's causal-LM targets (``shift_labels``, else :func:`causal_lm_targets` of ``labels``)
    and against ``labels`` as they are (0-dim tensors, no host synchronisation; one
    cross-entropy pass over the logits, as the model's own loss). ``None`` when the call cannot
    tell (no loss, logits or labels, or other shapes: the measurement names what it cannot read).
    """

    def get(obj: Any, key: str) -> Any:
        if isinstance(obj, dict):  # a transformers ModelOutput is an OrderedDict
            return obj.get(key)
        return getattr(obj, key, None)

    loss, logits = get(output, "loss"), get(output, "logits")
    labels, shifted = kwargs.get("labels"), kwargs.get("shift_labels")
    if not (isinstance(loss, Tensor) and isinstance(logits, Tensor) and loss.numel() == 1):
        return None
    if not isinstance(shifted, Tensor):
        if not isinstance(labels, Tensor) or labels.ndim != 2 or labels.is_floating_point():
            return None
        shifted = causal_lm_targets(labels)
    if logits.ndim != 3 or tuple(shifted.shape) != tuple(logits.shape[:-1]):
        return None
    with torch.no_grad():
        flat = logits.detach().flatten(0, 1)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))

        def ce(targets: Tensor) -> tuple[Tensor, Tensor]:
            t = targets.detach().flatten().to(flat.device)
            total = nn.functional.cross_entropy(
                flat, t, ignore_index=_IGNORE_INDEX, reduction="sum"
            )
            return total, (t != _IGNORE_INDEX).sum()

        probe: dict[str, Any] = {
            "loss": loss.detach(),
            "shifted": ce(shifted),
            "dtype": logits.dtype,
            "items": kwargs.get("num_items_in_batch"),
        }
        same = isinstance(labels, Tensor) and tuple(labels.shape) == tuple(shifted.shape)
        if same and not labels.is_floating_point():
            probe["unshifted"] = ce(labels)
    return probe


def _host_values(probe: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``probe`` (:func:`_own_loss_probe`) that :func:`_refuse_other_loss`
    compares, read from the device together: one host synchronisation.

    The model's loss (``"own"``), the shifted cross-entropy sum and count (``"total"``,
    ``"count"``), the unshifted ones (``"plain_total"``, ``"plain_count"``, where the probe has
    them) and ``num_items_in_batch`` (``"items"``, where given) are stacked into one tensor on
    the logits' device (float64; float32 on MPS, which has none, far inside the comparison's
    ``1e-4``) and read with one ``tolist()``. A Python number or a CPU tensor beside logits on
    an accelerator is read on the host, without waiting for the device. Before review s20 each
    was read by its own ``float()``: six host synchronisations where the docs promised one.
    """
    total, count = probe["shifted"]
    device = total.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    named: dict[str, Any] = {"own": probe["loss"], "total": total, "count": count}
    if probe.get("unshifted") is not None:
        named["plain_total"], named["plain_count"] = probe["unshifted"]
    items = probe["items"]
    if isinstance(items, Tensor):
        # DataParallel's copies of one count: the first (an empty tensor counts nothing)
        items = items.flatten()[0] if items.numel() else None
    if items is not None:
        named["items"] = items
    read: dict[str, float] = {}
    stacked: dict[str, Tensor] = {}
    for key, value in named.items():
        if isinstance(value, Tensor) and (value.device == device or value.device.type != "cpu"):
            stacked[key] = value.detach().reshape(()).to(device=device, dtype=dtype)
        else:  # on the host already: no device to wait for
            read[key] = float(value)
    read.update(zip(stacked, torch.stack(list(stacked.values())).tolist()))
    return read


def _refuse_other_loss(probe: dict[str, Any], model: str, step: int) -> None:
    """Raise ``ValueError`` unless the model's own loss of its first training call is curvlab's
    causal-LM objective of the same logits (``loss_fn=None``), to rounding.

    The model's loss is a cross-entropy sum divided by the tokens it scores (a mean) or by the
    Trainer's ``num_items_in_batch``; both divisions are tried, each cross-entropy divided by its
    own count of scored tokens (the unshifted one also scores each sequence's first label:
    before review s20 it was divided by the shifted count, so a model returning the unshifted
    mean without ``num_items_in_batch`` was told it returned neither objective). The two are
    computed in float32 at least from the same logits, so they agree to summation-order
    rounding (``rtol=1e-4``, far above ``log2(tokens) * 6e-8``); logits of 16 bits allow
    ``1e-2`` (a model that scores them in their own dtype). Found in review s17:
    ``XLNetLMHeadModel`` and ``XLMWithLMHeadModel`` (in transformers' causal-LM mapping) and the
    ``*ForCausalLM`` decoders of encoder-decoder families (``BartForCausalLM``, ...) score
    position ``t`` against ``labels[t]``, unshifted: curvlab measured 2.49134 while the model
    trained on 2.36625. One host synchronisation, once per ``train()`` (:func:`_host_values`).
    """
    read = _host_values(probe)
    own, total, count = read["own"], read["total"], read["count"]
    if not math.isfinite(own) or count == 0:
        return  # nothing scored (every label ignored), or a diverged step: cannot tell
    items = read.get("items", 0.0)
    extra = [items] if items > 0 else []
    rtol = 1e-2 if probe["dtype"].itemsize < 4 else 1e-4

    def close(s: float | None, n: float | None) -> float | None:
        if s is None or n is None:
            return None
        divisors = ([n] if n > 0 else []) + extra
        return next((s / d for d in divisors if abs(own - s / d) <= rtol * abs(own)), None)

    if close(total, count) is not None:
        return
    ours = total / count
    plain = close(read.get("plain_total"), read.get("plain_count"))
    if plain is not None:
        why = (
            f"the cross-entropy of its logits against the labels as they are ({plain:.6g}): it "
            "scores position t against labels[t], without the causal shift. Pass "
            "diagnostics_callback(loss_fn=torch.nn.CrossEntropyLoss()), which scores the logits "
            "against the labels as they are (the model's own loss)"
        )
    else:
        why = (
            "neither the shifted nor the unshifted cross-entropy of its logits (extra terms, "
            "such as a mixture-of-experts router loss, or another loss): curvlab would measure "
            "another objective than the one trained. Pass the loss the model is trained with as "
            "diagnostics_callback(loss_fn=...), applied to the logits and the labels as they are"
        )
    raise ValueError(
        f"diagnostics_callback(loss_fn=None) measures the causal-LM objective (logits at "
        f"position t against labels[t + 1]): {ours:.6g} on the first training batch of step "
        f"{step}, but {model} returned its own loss {own:.6g} for that batch, {why}"
    )


def _classes_last_logits(model: nn.Module) -> bool:
    """Whether ``model`` (or a model it wraps: :func:`_unwrapped`) is a transformers
    ``PreTrainedModel`` whose logits hold the classes in the last axis: every one but the
    segmentation models (``*ForSemanticSegmentation``, ``*ForUniversalSegmentation``, ...),
    whose mask logits ``(B, C, H, W)`` hold them in axis 1. Its own loss then scores
    ``logits.view(-1, C)`` against ``labels.view(-1)`` (token classification, an
    encoder-decoder's decoder, a causal LM), which an explicit ``CrossEntropyLoss`` measures as
    ``classes_last(loss_fn)``: unmarked, a batch whose length equals the number of classes fits
    torch's layout too and was read in it."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - the callback needs transformers
        return _is_encoder_decoder(model)
    return any(
        isinstance(m, PreTrainedModel) and "Segmentation" not in type(m).__name__
        for m in _unwrapped(model)
    ) or _is_encoder_decoder(model)


def _is_encoder_decoder(model: nn.Module) -> bool:
    """Whether an HF model is an encoder-decoder one (``config.is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _batch_size(kw: dict[str, Any], targets: Tensor) -> int:
    """The number of examples of a model call: ``input_ids``' (else the first tensor's) rows."""
    first = kw.get("input_ids")
    if not isinstance(first, Tensor):
        first = next(
            (v for k, v in kw.items() if k not in _NOT_INPUTS and isinstance(v, Tensor)), None
        )
    if isinstance(first, Tensor) and first.ndim >= 1:
        return int(first.shape[0])
    return int(targets.shape[0])


def _concatenate(
    parts: list[tuple[dict[str, Tensor], Tensor]], warn: Any
) -> tuple[dict[str, Tensor], Tensor]:
    """The micro-batches of one step as one batch, if their shapes allow it (else the last)."""
    inputs0, targets0 = parts[0]
    fits = all(
        set(inputs) == set(inputs0)
        and all(inputs[k].shape[1:] == inputs0[k].shape[1:] for k in inputs0)
        and targets.shape[1:] == targets0.shape[1:]
        for inputs, targets in parts
    )
    if not fits:
        warn(
            "accumulation",
            "diagnostics_callback: the micro-batches of a gradient-accumulation step differ in "
            "shape (e.g. padded to different lengths); only the last one is measured",
        )
        return parts[-1]
    inputs = {k: torch.cat([p[0][k] for p in parts]) for k in inputs0}
    return inputs, torch.cat([p[1] for p in parts])


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    """``curvlab/<name>`` -> float for every scalar value; a list of numbers as ``<name>/<i>``."""
    logs: dict[str, float] = {}
    for name, v in values.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)):
            logs[_PREFIX + name] = float(v)
        elif isinstance(v, (list, tuple)) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        ):
            for i, x in enumerate(v):
                logs[f"{_PREFIX}{name}/{i}"] = float(x)
    return logs


def _causal_lm_loss() -> nn.Module:
    """The causal-LM loss: ``CrossEntropyLoss()`` whose logits hold the vocabulary in the last
    axis, said explicitly (:data:`curvlab._losses.CLASSES_LAST`): with a batch whose length equals
    the vocabulary size torch's layout would fit as well, and positions were scored as classes."""
    return classes_last(nn.CrossEntropyLoss())
