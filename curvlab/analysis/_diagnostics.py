"""In-loop diagnostics: track curvature quantities every k steps without changing the training.

:class:`Diagnostics` is called once per training step, after the optimiser step. On the steps it
measures, it evaluates the chosen quantities on the step's batch with the model in eval mode inside
:func:`curvlab._notrace.leave_no_trace` (parameters, ``.grad``, train/eval flags and the global RNG
are restored), drawing labels from its own generator. On the other steps it only increments a
counter and reads the clock: no tensor is touched, so nothing synchronises with the device.
Training with and without it therefore computes bitwise-identical parameters.

Each measurement is written as one JSON line to ``log_dir/metrics.jsonl`` and flushed at once, so a
crash loses nothing already measured. Events (Fisher explosion, failed measurements) are JSON lines
in the same file with an ``"event"`` key.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import time
import uuid
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._compiled import compiled_note
from curvlab._data import Inputs, _check_batch, _described, slice_inputs
from curvlab._fsdp import check_quantities as check_fsdp2_quantities
from curvlab._fsdp import fsdp2_allowed
from curvlab._losses import loss_spec
from curvlab._notrace import leave_no_trace
from curvlab._numbers import is_count
from curvlab._scan import model_device
from curvlab._selection import refuse_complex_model
from curvlab._warn import user_stacklevel
from curvlab.analysis._data_parallel import refuse_one_process
from curvlab.analysis._diagnostics_config import DiagnosticsConfig, check_top_k, resolve_config
from curvlab.analysis._diagnostics_state import NO_POSITION, checked_state, kept_entries
from curvlab.analysis._explosion import ExplosionWatch, FisherExplosionWarning, loss_terms
from curvlab.analysis._measures import DIAGNOSTICS_DEFAULT, check_quantities, measure
from curvlab.analysis._metrics_log import MetricsLog, check_log_dir
from curvlab.analysis._optimizer_state import record_grads
from curvlab.analysis._sharpness import check_optimizer_for, refuse_distributed
from curvlab.distributed import active, group_scope, unwrap_model

__all__ = ["Diagnostics", "FisherExplosionWarning", "MeasurementFailedWarning"]


def _step_number(step: Any) -> int:
    """``step`` as a Python int (numpy integers and 0-dim integer tensors accepted), checked
    before any measurement: a numpy step reached the JSON log only after the work and failed
    there, leaving the record out of ``metrics.jsonl``."""
    if isinstance(step, Tensor) and step.ndim == 0 and not step.is_floating_point():
        return int(step)
    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
        return int(step)
    raise TypeError(
        f"step must be an integer (the training step), got {type(step).__name__} {step!r}"
    )


def _no_data_parallel(process_group: Any) -> None:
    """Refuse ``"noise_scale_dp"`` where :class:`Diagnostics` is made without a group of at
    least 2 processes (``torch.distributed`` not initialised, a group of one, or
    ``process_group="local"``): it failed at every measured step, after the other quantities'
    work, and the ``curvlab`` command refuses it up front (found in review s18). Decided when the
    ``Diagnostics`` is made, as its rank-0 logging and its ``budget=`` check are: make it after
    ``torch.distributed.init_process_group`` (the HuggingFace and Lightning callbacks make theirs
    when training starts, after the trainer has initialised it).

    Raises:
        ValueError: the data-parallel noise scale's own message, with the one-process way out.
    """
    with group_scope(process_group):
        refuse_one_process(
            "Diagnostics", "make the Diagnostics after torch.distributed.init_process_group"
        )


LOCAL_ONLY = ("noise_scale_hessian", "critical_sharpness")
"""Quantities whose passes are not reduced over the ranks: refused under ``torch.distributed``
(:func:`~curvlab.analysis._sharpness.refuse_distributed`), when the :class:`Diagnostics` is made."""


def _refuse_local_only(quantities: tuple[str, ...], process_group: Any) -> None:
    """Refuse the quantities of :data:`LOCAL_ONLY` where :class:`Diagnostics` is made with a
    group of at least 2 processes: their measurements refused at every measured step, after the
    other quantities' work (found in review s20; ``"noise_scale_dp"`` without a group was
    refused up front in review s18). Decided when the ``Diagnostics`` is made, as its rank-0
    logging is; ``process_group="local"`` measures each rank's shard.

    Raises:
        NotImplementedError: the measurement's own message, with the way out.
    """
    with group_scope(process_group):
        for name in quantities:
            if name in LOCAL_ONLY:
                refuse_distributed(name)


def _checked_batch(inputs: Any, targets: Any) -> tuple[Inputs, Tensor]:
    """The step's batch, checked as every entry point checks a batch of its data
    (:func:`curvlab._data.iter_batches`): inputs a Tensor or a dict of Tensors, targets a
    Tensor, with the examples in their first dimension. Metadata only: no host
    synchronisation (the values are checked by the measurement's own pass). A list of inputs
    or NumPy targets raised a raw ``AttributeError`` from ``.detach()`` (found in review s18).

    Raises:
        TypeError: naming what was passed instead, with the conversion to make.
        ValueError: for a batch without examples or with mismatched batch sizes.
    """
    if isinstance(inputs, (tuple, list)):  # several positional inputs, as iter_batches says
        raise TypeError(
            f"the inputs of the step's batch (inputs, targets) are {_described(inputs)}; "
            "inputs must be one Tensor or a dict of tensors: pass several inputs as a dict "
            "keyed by the forward's argument names, diag.step(step, {'a': a, 'b': b}, y)"
        )
    return _check_batch((inputs, targets), 0, finite=False)


class MeasurementFailedWarning(RuntimeWarning):
    """A diagnostics measurement raised; training continues (``on_error="warn"``)."""


class Diagnostics:
    """Measure curvature quantities every ``every`` steps of a training loop.

    Args:
        model: the model being trained.
        loss_fn: its loss (``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``, mean or sum);
            quantities are those of ``L = loss_fn(model(inputs), targets)`` on the step's batch.
        quantities: names from :data:`curvlab.analysis.QUANTITIES`; default
            ``("loss", "grad_norm", "trace_fisher", "trace_empirical_fisher", "noise_scale")``
            (two BackPACK passes per measurement). ``"top_eigenvalues"`` with
            ``options={"k": k}`` (default 5) above the model's trainable parameters is a
            ``ValueError`` here (as in ``analyze``), and at a measurement after parameters
            were frozen.
        every: measure on steps divisible by ``every``. With ``budget`` it is the minimum number
            of steps between measurements (``None``: no minimum).
        log_dir: folder for ``metrics.jsonl`` (and ``metrics.csv`` / TensorBoard files); created
            if missing, appended to if it holds a log already. ``None`` keeps records in memory.
            A ``str`` or ``os.PathLike`` (else a ``TypeError``; an existing file is a
            ``NotADirectoryError``). One open ``Diagnostics`` writes a folder in a process: one
            made on a folder another open one writes takes it over (a notebook cell run again),
            with a ``RuntimeWarning`` naming it; the other's files are closed and its later
            :meth:`step`, :meth:`measure` and :meth:`load_state_dict` raise a ``RuntimeError``
            (give each its own ``log_dir``; closing one and opening another in sequence, as a
            resumed run does, is quiet).
        config: a :class:`DiagnosticsConfig` with the options below (``None``: its defaults).
        **overrides: any field of :class:`DiagnosticsConfig` as a keyword (``budget``, ``seed``,
            ``max_examples``, ``csv``, ``tensorboard``, ``on_error``, ``explosion_factor``,
            ``explosion_window``, ``explosion_until``, ``options``, ``clock``, ``callback``);
            it overrides ``config``'s.
        process_group: as every entry point's (see :class:`DiagnosticsConfig`); overrides
            ``config.process_group`` unless ``None``. Add ``"noise_scale_dp"`` to
            ``quantities`` for McCandlish's B_simple from data-parallel ranks' plain gradients
            (docs/distributed.md): made without a group of at least 2 processes (before
            ``torch.distributed.init_process_group``, or with ``process_group="local"``) it is
            a ``ValueError`` here, as it would fail at every measured step. Made with such a
            group, ``"noise_scale_hessian"`` and ``"critical_sharpness"`` (whose passes are
            not reduced over the ranks) are a ``NotImplementedError`` here, for the same
            reason (until review s20 they failed at every measured step).
        optimizer: the training loop's optimizer (``torch.optim.SGD``, ``Adam`` or ``AdamW``),
            only read: it gives ``"sharpness"`` its threshold and is needed by
            ``"preconditioned_sharpness"`` (Adam/AdamW) and ``"critical_sharpness"``
            (:mod:`curvlab.analysis._sharpness`); overrides ``config.optimizer`` unless ``None``.
            An object that is no optimizer (an LR scheduler, a string, a list of parameters) is a
            ``TypeError`` here, whatever the quantities. An optimizer whose ``step()`` runs
            step hooks (``register_step_pre_hook``/``_post_hook``, or torch's global ones) is
            refused for ``"critical_sharpness"`` and its thresholds are left out with a
            ``RuntimeWarning``, unless ``options={"ignore_optimizer_hooks": True}``
            (docs/analysis.md).

    Attributes:
        loss_fn: the loss; it may be reassigned during a run (checked when assigned), and the
            measurements and the explosion check read it (its reduction) at each measurement.
        records: the measurements so far (dicts as written to the JSONL file).
        events: the events so far.
        info: how it measures where that is not the default (``"compiled"``: a ``torch.compile``d
            model, whose original module is measured eagerly, keyed by its names;
            docs/training-loops.md).

    Example:
        >>> import torch, curvlab as cl
        >>> model = torch.nn.Linear(4, 3)
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> with cl.Diagnostics(model, loss_fn, every=5) as diag:
        ...     for step in range(10):
        ...         opt.zero_grad()
        ...         loss_fn(model(X), y).backward()
        ...         opt.step()
        ...         _ = diag.step(step, X, y)  # the record, or None between measurements
        >>> [r["step"] for r in diag.records]
        [0, 5]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        quantities: Iterable[str] | None = None,
        every: int | None = 50,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        config: DiagnosticsConfig | None = None,
        process_group: Any = None,
        optimizer: Any = None,
        **overrides: Any,
    ) -> None:
        if process_group is not None:  # every entry point names it (docs/distributed.md)
            overrides["process_group"] = process_group
        if optimizer is not None:
            overrides["optimizer"] = optimizer
        cfg = resolve_config(config, overrides)
        log_path = check_log_dir(log_dir)  # a TypeError naming log_dir, before any work
        budget, process_group, callback = cfg.budget, cfg.process_group, cfg.callback
        compiled = compiled_note(model)  # the model as passed: a torch.compile wrapper?
        with fsdp2_allowed():  # a fully_shard model: first-order quantities only (below)
            model = unwrap_model(model)  # a DDP or compile wrapper: measure (and key by) its module
        with group_scope(process_group):
            comm = active()
        if comm is not None and budget is not None:
            raise ValueError(
                "budget= schedules measurements by each rank's clock, so ranks would disagree "
                "on which steps to measure under torch.distributed; use every= instead"
            )
        self.writes = comm is None or comm.rank == 0  # under torch.distributed rank 0 logs
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable (record -> None), got {callback!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        loss_spec(loss_fn)  # a TypeError or ValueError naming the loss, before any work
        self.quantities = check_quantities(quantities, DIAGNOSTICS_DEFAULT)
        if "noise_scale_dp" in self.quantities and comm is None:
            _no_data_parallel(process_group)
        # FSDP2 first: its refusal is the right one there (the local-only quantities' hint,
        # process_group="local", is refused on an FSDP2 model too; found in review s20)
        check_fsdp2_quantities(model, self.quantities)
        if comm is not None:
            _refuse_local_only(self.quantities, process_group)
        check_top_k(model, self.quantities, cfg.options or {})  # as analyze (review s25)
        # crashed or wrong for every quantity (review s27)
        refuse_complex_model(model, diagnostics=True)
        check_optimizer_for(self.quantities, cfg.optimizer, cfg.options)
        _check_schedule(every, budget, cfg.on_error)  # seed, max_examples, explosion_*: cfg's
        self.model = model
        self._loss_fn = loss_fn  # checked above (loss_spec); read at each measurement
        self.every = None if every is None else int(every)
        # the options, normalised: every method reads them from here
        self.config = dataclasses.replace(
            cfg, budget=None if budget is None else float(budget), options=dict(cfg.options or {})
        )
        self.generator = torch.Generator(device=model_device(model))
        self.generator.manual_seed(cfg.seed)
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._token = uuid.uuid4().hex  # whose records a state's counts are (os.urandom)
        self.info: dict[str, str] = {} if compiled is None else {"compiled": compiled}
        self._calls = 0
        self._start: float | None = None
        self._measure_time = 0.0
        self._costs: list[float] = []
        self._last_step: int | None = None
        self._seen_step: int | None = None  # the last step step() or measure() was called at
        self._explosion = ExplosionWatch(
            cfg.explosion_factor, cfg.explosion_window, cfg.explosion_until
        )
        self._closed = False
        self._state: dict[str, Any] = {}  # kept between measurements (warm starts)
        self.log_dir = log_path
        self._log = MetricsLog(
            self.log_dir if self.writes else None, csv=cfg.csv, tensorboard=cfg.tensorboard
        )
        if self.log_dir is None and (cfg.csv or cfg.tensorboard):
            raise ValueError("csv=True and tensorboard=True need a log_dir")

    @property
    def loss_fn(self) -> nn.Module:
        """The loss the quantities are of. It may be reassigned during a run (checked when
        assigned); the measurements and the Fisher-explosion check read it at each measurement,
        so a module changed in place (``diag.loss_fn.reduction = "sum"``) is followed too.

        Raises:
            TypeError, ValueError: on assignment, for a loss curvlab does not support (as the
                constructor's ``loss_fn``); the loss in use is then kept.
        """
        return self._loss_fn

    @loss_fn.setter
    def loss_fn(self, loss_fn: nn.Module) -> None:
        # the explosion check kept the reduction the Diagnostics was made with, so a
        # CrossEntropyLoss(reduction="sum") assigned after "mean" read Tr(F) of the sum as that
        # of the mean: a FisherExplosionWarning of 51.8x for a Tr(F) per loss term that did not
        # change (found in review s22); it reads the loss at each measurement now
        loss_spec(loss_fn)
        self._loss_fn = loss_fn

    # ------------------------------------------------------------------ scheduling
    @property
    def overhead(self) -> float:
        """Time spent measuring as a fraction of the training time so far (excluding it)."""
        if self._start is None:
            return 0.0
        train = self.config.clock() - self._start - self._measure_time
        return self._measure_time / train if train > 0 else 0.0

    def should_measure(self, step: int) -> bool:
        """Whether :meth:`step` would measure at ``step`` now (reads only the clock): never at
        the step it was last called at (a step is measured at most once)."""
        return step != self._seen_step and self._scheduled(step)

    def _scheduled(self, step: int) -> bool:
        """Whether the schedule (``every``, ``budget``) measures at ``step`` now."""
        if self.config.budget is None:
            assert self.every is not None
            return step % self.every == 0
        if (
            self.every is not None
            and self._last_step is not None
            and step - self._last_step < self.every
        ):
            return False
        if not self._costs:
            return True
        assert self._start is not None
        train = self.config.clock() - self._start - self._measure_time
        expected = sum(self._costs[-5:]) / len(self._costs[-5:])
        return self._measure_time + expected <= self.config.budget * train

    # ------------------------------------------------------------------ the hook
    @torch.compiler.disable  # inside a compiled step: runs eagerly (docs/training-loops.md)
    def step(
        self, step: int | None = None, inputs: Tensor | None = None, targets: Tensor | None = None
    ) -> dict[str, Any] | None:
        """Call after the optimiser step; measures on the scheduled steps.

        Inside a ``torch.compile``d training step the call is a graph break: it runs eagerly,
        untraced, as does :meth:`measure` (docs/training-loops.md).

        A step is measured at most once: a later call at the step of the call before (one per
        micro-batch under gradient accumulation, or after :meth:`measure` at that step) does
        nothing and returns ``None``, whether it is scheduled by ``every`` or by ``budget``
        (with ``budget`` and ``every=None``, and with ``every`` alone, each call measured: a
        record per micro-batch, each with labels drawn anew, found in review s22). The first
        call at a step measures, on its batch: call it once per optimizer step, after
        ``optimizer.step()``. With ``step=None`` every call is a step of its own (counted from
        0), measured as ``every`` or ``budget`` schedules it, also after a :meth:`measure` at
        the step the count has reached (a baseline ``measure(0, ...)`` before training stopped
        every later call from measuring, found in review s22).

        A call that raises records nothing: a measured step without its batch (``ValueError``),
        or a measurement that raised under ``on_error="raise"``, is measured by the retry at
        that step (it was a no-op, found in review s22). It draws nothing either: a measurement
        that raises (under ``on_error="raise"``, or an interrupt, any ``BaseException`` that is
        no ``Exception``, under either) puts back the generator, the probe counts and the
        sharpness warm starts, so the retry, every later measurement and :meth:`state_dict`
        are the uninterrupted run's, bit for bit (they drew the next labels and probes until
        review s25). A failure under ``on_error="warn"`` is a measured step: its draws stay
        drawn.

        Args:
            step: the training step, a Python ``int`` (``None``: count calls from 0). A numpy
                integer or a 0-dim integer tensor is accepted, but a tensor is read with
                ``int()`` on every call, measured or not: a step counter kept on an
                accelerator synchronises the host at every step: keep the counter a Python
                ``int``, or pass ``None``.
            inputs, targets: the step's batch (the measurement's data).

        Returns:
            The record written on a measured step, else ``None``.
        """
        if self._closed:
            raise RuntimeError("Diagnostics is closed; create a new one to keep measuring")
        self._log.check_writable()  # its log_dir taken over by a newer Diagnostics
        now = self.config.clock()
        if self._start is None:
            self._start = now
        counted = step is None  # each call a step of its own: the repeat rule is for numbers
        step = self._calls if counted else _step_number(step)
        if not counted and step == self._seen_step:  # called at this step: measured at most once
            return None
        if not self._scheduled(step):
            self._seen(step, call=True)
            return None
        if inputs is None or targets is None:  # before the step is recorded: a retry measures it
            raise ValueError("diag.step(step, inputs, targets) needs the batch on measured steps")
        return self._measure(step, inputs, targets, call=True)

    def _seen(self, step: int, call: bool) -> None:
        """Record a call at ``step`` as done (``call``: a :meth:`step` call, one more counted)."""
        if call:
            self._calls += 1
        self._seen_step = step

    @torch.compiler.disable  # inside a compiled step: runs eagerly (docs/training-loops.md)
    def measure(self, step: int, inputs: Tensor, targets: Tensor) -> dict[str, Any] | None:
        """Measure now on ``(inputs, targets)``, log and return the record (whatever the
        schedule, and at a step measured already too: a :meth:`step` call at this step after it
        does nothing). A measurement that raises (``on_error="raise"``, or an interrupt under
        either) records and draws nothing: a retry at its step measures what it would have (it
        made the retry a no-op, found in review s22, and drew the next labels and probes until
        review s25; :meth:`step`).

        Raises:
            RuntimeError: after :meth:`close` (as :meth:`step`), or when its ``log_dir`` was
                taken over by a newer ``Diagnostics``; before any work.
            TypeError: with ``on_error="raise"``, for a batch that is not a Tensor (or a dict
                of Tensors) and a target Tensor, named as every entry point names it (with
                ``on_error="warn"`` the measurement fails with it: a warning and an event).
        """
        if self._closed:  # before any work: a measurement whose record could not be logged
            raise RuntimeError("Diagnostics is closed; create a new one to keep measuring")
        return self._measure(_step_number(step), inputs, targets, call=False)

    def _measure(
        self, step: int, inputs: Tensor, targets: Tensor, call: bool
    ) -> dict[str, Any] | None:
        """:meth:`measure` at ``step`` (``call``: for a :meth:`step` call, counted). The
        step is recorded as done (:meth:`_seen`, and as the last measured one) once the
        measurement succeeded or failed under ``on_error="warn"``: one that raised leaves
        neither, so a retry at the step measures, and puts back what it advanced
        (:meth:`_drawn`), so that the retry draws what it drew."""
        self._log.check_writable()  # before any work: its log_dir taken over
        t0 = self.config.clock()
        if self._start is None:
            self._start = t0
        record: dict[str, Any] | None = None
        drawn = self._drawn()  # put back should the measurement raise
        try:
            # a complex parameter unfrozen since the construction's check: named before any
            # work, as on_error says (review s27: every quantity failed with torch's dtype errors)
            refuse_complex_model(self.model, diagnostics=True)
            inputs, targets = _checked_batch(inputs, targets)  # before reading them
            if self.config.max_examples is not None:
                inputs = slice_inputs(inputs, 0, self.config.max_examples)
                targets = targets[: self.config.max_examples]
            detached = (
                inputs.detach()
                if isinstance(inputs, Tensor)
                else {k: v.detach() for k, v in inputs.items()}
            )
            batch = (detached, targets.detach())
            with (
                # which parameters hold a .grad (leave_no_trace sets them to None): step()
                # moves those, frozen ones too (critical_sharpness's would-be update)
                record_grads(self.model),
                # its passes are curvlab's own: a noise capture around the step leaves them alone
                leave_no_trace(self.model, mode=False),
                group_scope(self.config.process_group),
            ):
                spec = loss_spec(self.loss_fn)  # the loss now (reassigned, or changed in place)
                terms = (
                    loss_terms(spec, batch[1], model_device(self.model))
                    if spec.reduction == "sum" and "trace_fisher" in self.quantities
                    else None
                )
                m = measure(
                    self.model,
                    self.loss_fn,
                    batch,
                    self.quantities,
                    generator=self.generator,
                    seed=self.config.seed,
                    chunk_size=None,
                    options=self.config.options,
                    optimizer=self.config.optimizer,
                    state=self._state,
                    on_error="raise" if self.config.on_error == "raise" else "skip",
                )
            # "measured" on the requested quantities' own outputs: the values a failed one gives
            # beside it (trace_covariance of a failed noise_scale) are none (until review s23
            # they made such a step a record, "the other quantities were measured")
            measured = measured_quantities(
                self.quantities, m.values, m.per_layer, m.arrays, m.errors
            )
            if m.errors and not measured:
                raise _AllFailed(
                    "; ".join(f"{k}: {v}" for k, v in m.errors.items()) + _given_text(m.values)
                )
        except BaseException as exc:
            if self.config.on_error == "raise" or not isinstance(exc, Exception):
                # it raises (an interrupt whatever on_error): it records nothing, so it draws
                # nothing either. The retry at the step and every later measurement are then
                # the uninterrupted run's, and so is state_dict(); they drew the next labels and
                # probes until review s25 (trace_fisher 1.7015 for 1.2978 on the retry)
                self._undraw(drawn)
                raise
            self._done(step, call)  # failed, and said so: the step is done, its draws drawn
            message = str(exc) if isinstance(exc, _AllFailed) else f"{type(exc).__name__}: {exc}"
            self._failed(step, message, f"measurement at step {step} failed ({message})")
        else:
            self._done(step, call)  # measured: a later call at the step does nothing
            cost = self.config.clock() - t0
            record = {
                "step": step,
                "time": time.time(),
                "cost_s": cost,
                "values": m.values,
                "per_layer": m.per_layer,
            }
            if m.arrays:
                record["arrays"] = m.arrays
            if m.errors:  # some quantities failed, the others (at least one) are kept
                record["errors"] = dict(m.errors)
                message = "; ".join(f"{k}: {v}" for k, v in m.errors.items())
                others = ", ".join(measured)
                self._failed(
                    step,
                    message,
                    f"at step {step} {message}; the other quantities were measured ({others})",
                )
            self.records.append(record)
            compared = self._explosion.add(m.values.get("trace_fisher"), terms)
            self._write(record)
            if self.config.callback is not None and self.writes:
                self.config.callback(record)
            if compared:
                event = self._explosion.check(step, m.values["trace_fisher"], terms)
                if event is not None:
                    self._event(event)
        finally:
            elapsed = self.config.clock() - t0
            self._measure_time += elapsed
            self._costs.append(elapsed)
        return record

    def _drawn(self) -> tuple[Tensor, dict[str, Any]]:
        """What a measurement advances, as it is now (for :meth:`_undraw`): the Monte-Carlo
        generator's state (``trace_fisher``'s labels, ``noise_scale_hessian``'s signs) and the
        state kept between measurements (the ``"seeds_drawn/<name>"`` counts the probes of
        ``trace_hessian``, ``top_eigenvalues``, ``spectral_density`` and the sharpness
        measurements are seeded from, and the sharpness warm starts). A shallow copy: the
        measurements replace its entries, never change them in place. Host-side only (a CUDA
        generator's state is its seed and offset): no device synchronisation."""
        return self.generator.get_state(), dict(self._state)

    def _undraw(self, drawn: tuple[Tensor, dict[str, Any]]) -> None:
        """Put back what :meth:`_drawn` kept: a measurement that raised advanced nothing."""
        generator, state = drawn
        self.generator.set_state(generator)
        self._state = state

    def _done(self, step: int, call: bool) -> None:
        """A measurement at ``step`` is over (measured, or failed under ``on_error="warn"``)."""
        self._seen(step, call)
        self._last_step = step

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to measure as the uninterrupted one would.

        The Monte-Carlo generator's state (``trace_fisher``'s and the MC quantities' label
        draws), the step counter, the last measured step (for ``every`` with ``budget``) and the
        last step it was called at (``"seen_step"``; ``None`` before the first call), where
        the log ends (``"log_position"``: the bytes of ``metrics.jsonl`` and the rows of
        ``metrics.csv``, ``None`` without a log; where a resumed run's log is cut), the log's
        absolute folder (``"log_dir"``) and a fingerprint of its last bytes before that position
        (``"log_tail"``, the SHA-256 of up to 4096 bytes: one small read of the file here), which
        say which log the position is of (both ``None`` without a log), whether the
        Fisher explosion was reported and the last ``explosion_window`` values of Tr(F) per
        loss term it compares, and the warm starts of ``sharpness``, ``preconditioned_sharpness`` and
        ``critical_sharpness``. Save it beside the model's and the optimizer's; without it a
        resumed run draws its labels anew (other draws of the same unbiased estimates), starts
        the sharpness measurements cold and the explosion window empty. Records, timings and
        the log are not part of it (the log files are appended to): only how many records and
        events there were (``"num_records"``, ``"num_events"``) and of which ``Diagnostics``
        (``"records_of"``), where :meth:`load_state_dict` cuts ``records`` and ``events`` of this
        ``Diagnostics`` rolled back in its process. ``"settings"`` says which measurements the
        state is of (:meth:`load_state_dict` refuses a state of others): the model's parameter
        names and shapes, the loss's kind and reduction, ``seed`` and the quantities.

        Returns:
            A dict of tensors and Python values (``torch.save`` it; it loads with
            ``torch.load(..., weights_only=True)``).
        """
        position = self._log.position()
        return {
            "generator": self.generator.get_state(),
            "calls": self._calls,
            "last_step": self._last_step,
            "seen_step": self._seen_step,
            "log_position": position,
            "log_dir": None if self.log_dir is None else str(self.log_dir),  # absolute
            "log_tail": self._log.tail(position),
            "exploded": self._explosion.exploded,
            "fisher_window": list(self._explosion.window),
            "fisher_window_per_term": True,
            "warm": dict(self._state),
            "num_records": len(self.records),
            "num_events": len(self.events),
            "records_of": self._token,
            "settings": self._settings(),
        }

    def _settings(self) -> dict[str, Any]:
        """What the measurements are of (``state_dict()["settings"]``, compared by
        :func:`~curvlab.analysis._diagnostics_state.checked_state`): the model's parameters by
        name (their shapes; ``None`` for an uninitialized lazy one), the loss's kind and
        reduction, the seed and the quantities. Metadata only: no tensor is read."""
        spec = loss_spec(self.loss_fn)
        return {
            "parameters": {
                name: None if nn.parameter.is_lazy(p) else [int(n) for n in p.shape]
                for name, p in self.model.named_parameters()
            },
            "loss": {"kind": spec.kind, "reduction": spec.reduction},
            "seed": int(self.config.seed),
            "quantities": list(self.quantities),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (of a ``Diagnostics`` with the same quantities).

        The state must be of the same measurements: its ``"settings"`` (the model's parameter
        names and shapes, the loss's kind and reduction, ``seed`` and the quantities, in any
        order) must be this ``Diagnostics``' own. A state of another model, loss, seed or set of
        quantities is refused, naming each field that differs (it loaded silently until review
        s24: another model's Tr(F) window raised a false Fisher-explosion warning at the first
        measurement, its ``exploded`` flag suppressed a real one, and another seed's generator
        mixed two label streams). Which parameters are trainable is not compared (a layer
        unfrozen during the run is the same model). A state without ``"settings"`` (of curvlab
        before review s24) is not checked.

        Tensors mapped elsewhere by ``torch.load(map_location=...)`` are put back: the
        generator's state on the CPU (where torch keeps every generator's state), the
        sharpness warm starts on the model's device. A state saved before the Fisher-explosion
        window was part of it loads with an empty window (the check then starts afresh), and so
        does one under ``reduction="sum"`` saved before the window held Tr(F) per loss term (its
        values were batch totals).

        The generator's state is that of the device type it was saved on (a CUDA generator's is
        not a CPU one's): a state saved on another device type is refused. To continue on this
        one anyway, load it with ``state["generator"] = None``: the generator is then seeded
        from ``seed`` and the restored step counter, so the label draws from now on are other
        draws of the same unbiased estimates than the uninterrupted run's (the probes of
        ``trace_hessian``, ``top_eigenvalues`` and ``spectral_density`` are seeded from counts
        of measurements that are restored: they stay the uninterrupted run's).

        With a ``log_dir``, the lines of the log written after the state was saved (by a run
        that went on and stopped: the resumed run measures those steps again) are moved from
        ``metrics.jsonl`` (and ``metrics.csv``) to ``metrics.dropped.jsonl`` (and
        ``metrics.dropped.csv``), with a warning naming their steps; TensorBoard hides its
        scalars from the first moved step on (``purge_step``). The cut is at the state's
        ``"log_position"`` (where the log ended when it was saved), so every line written
        before, by this run or an earlier one appended to the same folder, stays (a cut by step
        number moved an earlier run's records of later steps, found in review s17). A state
        saved without a log (``"log_position"`` ``None``) cuts nothing, and a state saved
        without ``csv=True`` leaves ``metrics.csv`` as it is. The position is applied only to
        the log it was taken of: where the state's fingerprint (``"log_tail"``) matches the
        bytes before the position (a run folder moved or copied as a whole is cut too); without
        a fingerprint (a state saved at an empty log), where its ``"log_dir"`` is this
        ``log_dir`` (compared resolved: ``logs/../logs`` or a symbolic link to it is the same
        folder). A state of another folder's log, or of a log replaced in this folder since,
        cuts nothing, with a ``RuntimeWarning`` saying why (another folder was cut at the
        saved byte position, another run's lines moved to ``metrics.dropped.jsonl`` with a
        warning that they "were written after it was saved", until review s22); the rest of the
        state is loaded. A state of curvlab before review s22 (a position without
        ``"log_dir"``) is taken as this log's, as it was. A state of an earlier curvlab
        (no ``"log_position"``) is cut by step: the lines with a step after its ``"seen_step"``
        (of one without it: its last measured step), every line with a step when that is
        ``None``.

        ``records`` and ``events`` (and so :meth:`history`) are cut too: a state this
        ``Diagnostics`` saved (its ``"records_of"``) keeps the first ``"num_records"`` and
        ``"num_events"``, those there were when it was saved, which a rollback in its own
        process measures again (they held both the dropped and the re-measured steps until
        review s18); any other state (saved by another ``Diagnostics``, e.g. in the process a
        run resumed from, or by an earlier curvlab without the counts) drops those with a step
        after its ``"seen_step"`` (every one with a step when that is ``None``), as its log is
        cut: a resumed ``Diagnostics`` that rolls back to the checkpoint it resumed from keeps
        none of what it measured since.

        Args:
            state: what :meth:`state_dict` returned, e.g. as ``torch.load`` gives it back.

        Raises:
            ValueError: if ``state`` is not a Diagnostics state dict, is one of other settings
                (naming each that differs), or its generator state is one of another device
                type; raised before anything is changed.
            RuntimeError: if its ``log_dir`` was taken over by a newer ``Diagnostics``.
        """
        self._log.check_writable()
        loaded = checked_state(
            state, self.config.seed, model_device(self.model), settings=self._settings()
        )
        window = loaded.window
        if loss_spec(self.loss_fn).reduction == "sum" and not loaded.per_term:
            window = []  # batch totals, not comparable with the values per loss term
        seen = loaded.seen_step
        # the last change: the log's lines written after the state was saved
        if loaded.log_position is NO_POSITION:  # an earlier curvlab's: by step (None: every step)
            self._log.drop_after(seen)
        else:
            self._log.drop_from(loaded.log_position, seen, of=loaded.log_dir, tail=loaded.log_tail)
        mine = loaded.records_of == self._token  # the counts are of these lists
        self.records[:] = kept_entries(self.records, loaded.num_records if mine else None, seen)
        self.events[:] = kept_entries(self.events, loaded.num_events if mine else None, seen)
        self.generator.set_state(loaded.generator)
        self._calls = loaded.calls
        self._last_step = loaded.last_step
        self._seen_step = seen
        self._explosion.load(loaded.exploded, window)
        self._state = loaded.warm

    def _failed(self, step: int, message: str, what: str) -> None:
        """Warn (``MeasurementFailedWarning``) and log a ``measurement_failed`` event."""
        warnings.warn(
            f"curvlab.Diagnostics: {what}; training continues",
            MeasurementFailedWarning,
            stacklevel=user_stacklevel(),
        )
        self._event({"event": "measurement_failed", "step": step, "error": message})

    # ------------------------------------------------------------------ writers
    def _event(self, event: dict[str, Any]) -> None:
        event.setdefault("time", time.time())
        self.events.append(event)
        self._log.event(event)

    def _write(self, record: dict[str, Any]) -> None:
        self._log.write(record)

    def history(self, name: str) -> tuple[list[int], list[Any]]:
        """Steps and values of ``name`` over the measurements so far.

        Args:
            name: a value name of the records: a quantity being measured or one it writes
                beside it (``"trace_covariance"``, ``"sharpness_threshold"``, ...; docs/analysis.md);
                ``"fisher_norms"`` writes ``"fisher_frobenius"`` and ``"fisher_diag_frobenius"``
                only (its own name is a ``KeyError`` that names them).
                A quantity that records arrays only (``"spectral_density"``) gives its arrays.

        Returns:
            ``(steps, values)`` of the records that hold it (both empty before the first, or
            when it failed at every measurement so far).

        Raises:
            KeyError: for a name that none of this ``Diagnostics``' quantities writes (a
                misspelt one gave ``([], [])``, found in review); the message lists those that
                are.
        """
        available = self._value_names()
        if name in self.quantities and name not in available:  # fisher_norms: two values
            raise KeyError(
                f"{name!r} writes its values under other names: ask for one of "
                f"{sorted(_WRITES.get(name, ()))}"
            )
        if name not in available:
            raise KeyError(
                f"{name!r} is not measured by this Diagnostics (quantities "
                f"{list(self.quantities)}); available: {sorted(available)}"
            )
        where = "values" if name not in _ARRAYS_ONLY else "arrays"
        held = [r for r in self.records if name in r.get(where, {})]
        return [r["step"] for r in held], [r[where][name] for r in held]

    def _value_names(self) -> set[str]:
        """The names :meth:`history` accepts: the value names the quantities write (their own,
        those beside them, and any a record holds: a quantity registered later writes names of
        its own)."""
        names: set[str] = set()
        for q in self.quantities:
            names.update(_WRITES.get(q, (q,)))
        for r in self.records:
            names.update(r["values"])
        return names

    def close(self) -> None:
        """Flush and close the log files (idempotent)."""
        self._closed = True
        self._log.close()

    def __getstate__(self) -> dict[str, Any]:
        """The attributes ``copy.deepcopy`` and ``pickle`` copy; refused while it has a log.

        A copy of a ``Diagnostics`` that writes a ``log_dir`` would be a second writer of its
        log files (one ``Diagnostics`` writes a folder): it raised Python's raw "cannot pickle
        '_io.TextIOWrapper'" (found in review s24). One without a log copies as it is.

        Raises:
            TypeError: for a ``Diagnostics`` with a ``log_dir`` (open or closed), with the way
                to carry its state over (:meth:`state_dict`).
        """
        if self._log._jsonl is not None:  # its log files (opened on log_dir, on rank 0)
            raise TypeError(
                f"a Diagnostics that writes log_dir {str(self.log_dir)!r} cannot be copied or "
                "pickled: its log files have one writer (one Diagnostics per log_dir). To carry "
                "its measurements on, save diag.state_dict() and load it into a new Diagnostics "
                "(with a log_dir of its own, or this one's after diag.close())"
            )
        return self.__dict__.copy()

    def __enter__(self) -> Diagnostics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Diagnostics(quantities={list(self.quantities)}, every={self.every}, "
            f"budget={self.config.budget}, measurements={len(self.records)}, log_dir={self.log_dir})"
        )


_WRITES: dict[str, tuple[str, ...]] = {
    "noise_scale": ("noise_scale", "trace_covariance"),
    "trace_hessian": ("trace_hessian", "trace_hessian_stderr"),
    "fisher_norms": ("fisher_frobenius", "fisher_diag_frobenius"),
    "noise_scale_dp": ("noise_scale_dp", "trace_covariance_dp", "grad_norm_sq_dp"),
    "sharpness": ("sharpness", "sharpness_threshold", "sharpness_hvps", "sharpness_residual"),
    "preconditioned_sharpness": (
        "preconditioned_sharpness",
        "preconditioned_sharpness_threshold",
        "preconditioned_sharpness_hvps",
        "preconditioned_sharpness_residual",
    ),
    "critical_sharpness": (
        "critical_sharpness",
        "critical_sharpness_threshold",
        "critical_sharpness_forwards",
    ),
    "noise_scale_hessian": (
        "noise_scale_hessian",
        "noise_scale_hessian_stderr",
        "noise_scale_hessian_hvps",
        "trace_hessian_covariance",
        "trace_hessian_covariance_stderr",
        "grad_hessian_grad",
    ),
}
"""The value names a built-in quantity writes where they are not just its own name (the
``"+"`` names of docs/analysis.md's table)."""
_ARRAYS_ONLY = frozenset({"spectral_density"})
"""Quantities whose records hold arrays (``record["arrays"]``), no value."""
_OWN: dict[str, tuple[str, ...]] = {"fisher_norms": ("fisher_frobenius", "fisher_diag_frobenius")}
"""A quantity's own output names where they are not its own name (of :data:`_WRITES`, without
the values written beside it: ``trace_covariance`` is no measured ``noise_scale``)."""


def measured_quantities(
    names: Iterable[str],
    values: dict[str, Any],
    per_layer: dict[str, Any],
    arrays: dict[str, Any],
    errors: dict[str, str],
) -> list[str]:
    """The quantities of ``names`` (the requested ones) that one measurement measured.

    A quantity counts when its own output is there: its name in ``values`` (``arrays`` for
    ``spectral_density``, ``per_layer`` alike), ``fisher_frobenius`` or
    ``fisher_diag_frobenius`` for ``fisher_norms`` (:data:`_OWN`); the values a failed quantity
    gives beside it (``trace_covariance`` of a ``noise_scale`` that is 0/0,
    ``grad_hessian_grad`` of such a ``noise_scale_hessian``) are not its measurement. A quantity
    not named among the failures (``errors``' keys, which join with ``", "`` the names of a pass
    that failed as one) counts too: one registered later may write under other names.

    ``analyze`` raises :class:`~curvlab.analysis.AnalysisError` and ``Diagnostics`` writes no
    record when this is empty at every checkpoint / for the step (until review s23 any value
    counted, so a run that measured none of its quantities read as a partial success).
    """
    failed = {n for key in errors for n in key.split(", ")}
    return [
        q
        for q in names
        if q not in failed
        or any(k in values or k in per_layer or k in arrays for k in _OWN.get(q, (q,)))
    ]


def given_values_text(values: dict[str, Any]) -> str:
    """``values`` as ``"name = value, ..."`` (floats to 6 significant digits), for the error of a
    run whose requested quantities all failed, where the values given beside them are kept."""

    def one(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(one(x) for x in v) + "]"
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k} = {one(v)}" for k, v in values.items())


def _given_text(values: dict[str, Any]) -> str:
    """The values of a step whose requested quantities all failed, for its event ("" if none)."""
    if not values:
        return ""
    return (
        "; given beside them (no record, as no requested quantity was measured): "
        + given_values_text(values)
    )


class _AllFailed(Exception):
    """Every quantity of a measurement failed (their messages, joined)."""


def _check_schedule(every: Any, budget: Any, on_error: str) -> None:
    if every is not None and not is_count(every):  # numpy integers too, never a bool
        raise ValueError(f"every must be an int >= 1 (or None with budget=), got {every!r}")
    if every is None and budget is None:
        raise ValueError("every=None needs budget=: say how often to measure")
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget < 1):
        raise ValueError(f"budget must be a fraction in (0, 1), e.g. 0.05, got {budget!r}")
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
