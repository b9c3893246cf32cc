"""``curvlab.analyze``: a model (and checkpoints) in, a :class:`Report` with numbers and plots out.

Example:
    >>> import torch, curvlab as cl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> report = cl.analyze(model, torch.nn.CrossEntropyLoss(), (X, y),
    ...                     quantities=["loss", "trace_fisher", "noise_scale"])
    >>> sorted(report.per_layer["trace_fisher"])
    ['0', '2']
"""

from __future__ import annotations

import numbers
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import (
    _shapes,
    call_model,
    iter_batches,
    num_examples,
    raise_if_part_failed,
    resource_error,
    slice_inputs,
    to_device,
)
from curvlab._finite import check_parameters_finite
from curvlab._losses import loss_spec, raise_invalid_labels
from curvlab._notrace import PASSING_CODES, buffer_snapshot, leave_no_trace, on_buffers
from curvlab._numbers import is_count, is_int, is_real
from curvlab._progress import ProgressBar
from curvlab._rng import SEED_RANGE
from curvlab._same_readings import same_readings
from curvlab._scan import model_device, scan_model
from curvlab._selection import refuse_complex_model
from curvlab._text import strip_ansi
from curvlab._warn import user_stacklevel
from curvlab.analysis._checkpoint import (
    check_fits,
    check_map_location,
    checkpoint_labels,
    checkpoint_type_message,
    folder_checkpoint_message,
    load_into,
    own_copies,
    resolve_state_dict,
    stand_ins,
)
from curvlab.analysis._data_parallel import refuse_one_process
from curvlab.analysis._diagnostics import given_values_text, measured_quantities
from curvlab.analysis._measures import ANALYZE_DEFAULT, check_quantities, measure
from curvlab.analysis._nqm_link import nqm_prediction
from curvlab.analysis._report import Report
from curvlab.analysis._sharpness import OPTIMIZER_QUANTITIES, refuse_distributed
from curvlab.distributed import collective

__all__ = ["analyze", "nqm_prediction", "AnalysisError", "AnalysisWarning"]


class AnalysisWarning(RuntimeWarning):
    """A quantity could not be computed; the report records why and holds the others."""


def _is_trajectory(checkpoint: Any) -> bool:
    return isinstance(checkpoint, (list, tuple))


class AnalysisError(RuntimeError):
    """Every requested quantity failed at every checkpoint; ``reasons`` says why, one per line.

    Attributes:
        reasons: ``"<quantity> at <checkpoint>: <error>"`` for each failure.
        given: the values the failed quantities gave beside them, per checkpoint label (e.g.
            ``{"model": {"trace_covariance": 0.0}}`` of a ``noise_scale`` that is 0/0, in the
            values' scaling of docs/analysis.md); no report holds them, so the message lists
            them. Empty when there are none.
    """

    def __init__(
        self, reasons: Sequence[str], given: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        self.reasons = [strip_ansi(r) for r in reasons]
        self.given = {str(k): dict(v) for k, v in (given or {}).items() if v}
        head = (
            "every requested quantity failed (no report; the values given beside them are "
            "listed last):\n"
            if self.given
            else "every requested quantity failed, nothing was measured:\n"
        )
        super().__init__(
            head
            + "\n".join(f"  {r}" for r in self.reasons)
            + "".join(
                f"\n  given beside them at {label}: {given_values_text(values)}"
                for label, values in self.given.items()
            )
        )


class FirstBatchError(ValueError):
    """The model failed on the first batch of the data (:func:`_first_output`): the data does not
    fit the model. A ``ValueError`` chained from the model's own error.

    Attributes:
        failure: what failed, without the advice (the command line names its ``--data``).
    """

    def __init__(self, failure: str) -> None:
        self.failure = failure
        super().__init__(f"{failure}; check that the data fits the model")


_CURVLAB_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
"""The folder of the curvlab package: an error raised by code in it is curvlab's own."""


def _curvlab_error(exc: BaseException) -> bool:
    """Whether ``exc`` is curvlab's own error, not the model's: of a curvlab class (a dtype
    mismatch named, a ``NonFiniteError``) or raised by curvlab's code (the refusal of an output
    that is no tensor, a device mismatch), judged by the innermost frame of its traceback."""
    if type(exc).__module__.split(".")[0] == "curvlab":
        return True
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    if tb.tb_frame.f_code in PASSING_CODES:  # the math-attention mode passed torch's call on
        return False
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_CURVLAB_DIR)


def _check_data(model: nn.Module, spec: Any, data: Any, device: torch.device) -> int:
    """Read ``data`` once and return its number of examples, before any expensive work.

    Every batch is validated (structure, batch sizes, finite values: :func:`~curvlab._data.
    iter_batches`); one forward pass on a few examples of the first batch, without gradients
    and in eval mode, checks that the model takes the inputs (device, dtype) and the loss the
    targets (shape, dtype), and gives the number of classes, against which the class indices of
    every batch are checked (:func:`_check_labels`). Where that first batch fits both layouts of
    ``CrossEntropyLoss`` (``T == C``, read in torch's), the model also runs on one example of
    each later batch of another sequence length, whose layout must agree (:func:`_check_layout`).
    """
    total, output, bad, where = 0, None, 0, -1
    decided: set[tuple[int, ...]] = set()  # the target shapes whose layout is decided
    for index, batch in enumerate(iter_batches(data)):
        total += num_examples(batch[0])
        if output is None:  # the first batch: the model's output gives the classes
            output = _first_output(model, spec, batch, device)
            decided.add(tuple(batch[1].shape[1:]))
        elif _layout_open(spec, batch[1], decided):
            _check_layout(model, spec, batch, device, index)
            decided.add(tuple(batch[1].shape[1:]))
        n = spec.invalid_labels(output, batch[1])
        if n is not None and int(n):
            bad += int(n)
            where = index if where < 0 else where
    assert output is not None  # iter_batches raises on empty data
    _check_labels(spec, output, bad, where)
    _check_rereadable(data)
    return total


def _first_output(model: nn.Module, spec: Any, batch: Any, device: torch.device) -> Tensor:
    """The model's output (in curvlab's layout: classes in axis 1) on a few examples of
    ``batch``, which the loss is checked to take (shapes, dtypes) at the batch's own size.

    Only the forward pass is sliced: the targets' shapes and dtypes are checked against the
    batch's own targets and the output of its first example expanded to the batch's size (a
    view, no copy), so that an error names the shapes the user passed. It named those of the
    probe of 8 examples ("outputs (8, 3) ... targets of shape (8,)" for batches of 12, found in
    review s20). The global-hook check of :meth:`~curvlab._losses.LossSpec.prepare` reads the
    probe, as before. An output without the probe's batch axis is checked against the targets
    sliced alike.
    """
    inputs, targets = to_device(batch, device)
    n = num_examples(inputs)
    few = min(n, 8)
    snapshot = buffer_snapshot(model.modules())  # a call counter too
    with leave_no_trace(model, mode=False), on_buffers(snapshot), torch.no_grad():
        probe = slice_inputs(inputs, 0, few)
        try:
            output = call_model(model, probe)
        except Exception as exc:
            _first_batch_failed(model, inputs, targets, probe, exc)
            raise
        if output.ndim and output.shape[0] == few and targets.ndim and targets.shape[0] == n:
            full = output[:1].expand(n, *output.shape[1:])  # the layout decided on these shapes
            spec._check_targets(
                full.movedim(-1, 1) if spec.gpt_layout(full, targets) else full, targets
            )
        return spec.prepare(output, targets[:few])


def _first_batch_failed(
    model: nn.Module, inputs: Any, targets: Tensor, probe: Any, exc: Exception
) -> None:
    """Raise :class:`FirstBatchError` for the model's own error ``exc`` on ``probe`` (a few
    examples of the first batch, ``inputs``), naming the batch's shapes and the error: torch's
    raw message named no culprit ("mat1 and mat2 shapes cannot be multiplied (4x5 and 3x4)" for
    inputs of 5 features into ``Linear(3, 4)``, found in review s21). A model that runs on the
    whole batch but not on the probe raises :func:`~curvlab._data.part_failed` (a batch without
    a batch axis). curvlab's own errors (:func:`_curvlab_error`) and resource errors
    (:func:`~curvlab._data.resource_error`: an out-of-memory error was a ``FirstBatchError``
    until review s26) return, for the caller to re-raise unchanged; ``KeyboardInterrupt`` is no
    ``Exception`` and is not caught.

    Raises:
        FirstBatchError: chained from ``exc``.
        ValueError: :func:`~curvlab._data.part_failed`, chained from ``exc``.
    """
    if _curvlab_error(exc) or resource_error(exc):  # an OOM is no fault of the batch (s26)
        return
    if num_examples(probe) < num_examples(inputs):
        raise_if_part_failed(model, inputs, probe, exc)
    reason = (strip_ansi(str(exc)).strip().splitlines() or [""])[0]
    error = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
    try:  # a model that differentiates inside its forward fails only because the probe ran
        with torch.enable_grad():  # without gradients: that is no fault of the data
            call_model(model, probe)
    except Exception:  # noqa: BLE001 - it fails with gradients too: the data's doing, below
        pass
    else:  # (found in review s21: it was told to check its data)
        raise ValueError(
            f"the model fails on the first batch of the data under torch.no_grad() but runs with "
            f"gradients enabled ({error}): analyze's check of the first batch runs its forward "
            "without gradients; a forward that differentiates (torch.autograd.grad inside it) "
            "must enable them itself: wrap that part in `with torch.enable_grad():`"
        ) from exc
    raise FirstBatchError(
        f"the model failed on the first batch of the data (inputs {_shapes(inputs)}, targets "
        f"{tuple(targets.shape)}): {error}"
    ) from exc


def _layout_open(spec: Any, targets: Tensor, decided: set[tuple[int, ...]]) -> bool:
    """Whether a batch of ``targets`` could conflict with the layout the first batches decided:
    class-index sequences of an unmarked ``CrossEntropyLoss`` after a batch that fitted both
    layouts (``T == C``, read in torch's) and before any that fitted only the GPT layout, whose
    shape past the batch axis no checked batch had. Shapes only: no forward pass, no host
    synchronisation."""
    layout = spec._layout
    return (
        "ambiguous" in layout
        and not layout.get("gpt")
        and not targets.is_floating_point()
        and targets.ndim >= 2
        and tuple(targets.shape[1:]) not in decided
    )


def _check_layout(
    model: nn.Module, spec: Any, batch: Any, device: torch.device, index: int
) -> None:
    """Decide the layout of ``batch`` (batch ``index`` of the data) on the model's output for
    its first example (as :func:`_first_output`: no gradients, eval mode, the model left as it
    was). A batch that fits only the GPT layout after one read in torch's layout raised the same
    ``ValueError`` in every quantity at every checkpoint, after all the work (an
    :class:`AnalysisError` of as many identical reasons, found in review); it is raised here,
    once, before any measurement.

    Raises:
        ValueError: from :meth:`~curvlab._losses.LossSpec.gpt_layout`, naming both batches and
            ``curvlab.classes_last``.
    """
    inputs, targets = to_device(batch, device)
    snapshot = buffer_snapshot(model.modules())
    with leave_no_trace(model, mode=False), on_buffers(snapshot), torch.no_grad():
        output = call_model(model, slice_inputs(inputs, 0, 1))
    if output.ndim and output.shape[0] == 1:  # the whole batch's shape, as the message names
        output = output.expand(targets.shape[0], *output.shape[1:])
    else:
        targets = targets[:1]
    try:
        spec.gpt_layout(output, targets)
    except ValueError as exc:
        raise ValueError(f"{exc} (batch {index} of data)") from None


def _check_labels(spec: Any, output: Tensor, bad: int, where: int) -> None:
    """Refuse ``bad`` class indices out of ``[0, C)`` that are not ``ignore_index`` (``C`` from
    ``output``), counted over every batch, the first in batch ``where``: before, every quantity
    failed with that error at every checkpoint (an :class:`AnalysisError` of as many identical
    reasons, or exit code 1 on the command line, found in review).

    Raises:
        ValueError: naming how many targets, the range, ``ignore_index`` and the fix.
    """
    if not bad:
        return
    try:
        raise_invalid_labels(spec, bad, output.shape[1])
    except ValueError as exc:
        raise ValueError(f"{exc} (the first in batch {where} of data)") from None


@collective
def analyze(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    checkpoint: Any = None,
    quantities: Sequence[str] | None = None,
    *,
    map_location: Any = None,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    num_probes: int = 30,
    k: int | None = None,
    num_steps: int = 60,
    density_probes: int = 4,
    chunk_size: int | None = 256,
    nqm: bool = True,
    nqm_target: float = 0.01,
    precond_power: float = 0.5,
    independent: bool = False,
    on_error: str = "warn",
    progress: bool | None = None,
) -> Report:
    """Measure curvature quantities of ``model`` (at one checkpoint or along a trajectory).

    All quantities are those of ``L = loss_fn(model(X), y)`` on all of ``data``, measured in eval
    mode (BatchNorm uses its running statistics, as in Jastrzębski et al.); see
    :mod:`curvlab.analysis._measures` for each quantity's definition and scaling. The model is left
    exactly as it was: parameters, buffers, ``.grad``, modes and the global RNG are restored, also
    after loading checkpoints into it, which load into stand-ins of the model's tensors (the same
    memory): the user's parameters and buffers come back bit-identical with their version
    counters untouched, so that a loss computed before the call can still run backward and an
    operator built before it still takes products.

    Args:
        model: the network (its architecture must match the checkpoints).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        data: one ``(inputs, targets)`` batch, or a re-iterable collection of batches (a list or a
            DataLoader; a one-shot iterator cannot be read several times, and an iterable whose
            second reading yields nothing, e.g. a DataLoader over a one-shot IterableDataset, is
            refused with a ``TypeError`` after one batch of that second reading).
        checkpoint: ``None`` (the model as it is), a file path, a state_dict, a wrapper dict
            (``{"state_dict": ...}``, ``{"model": ...}``), or a list of these (a trajectory, in
            its order: ``sorted(Path(d).glob("*.pt"))``, not the generator itself).
        quantities: names from :data:`~curvlab.analysis.QUANTITIES`; default all of
            ``loss, grad_norm, trace_hessian, trace_fisher, trace_empirical_fisher,
            top_eigenvalues, spectral_density, noise_scale, fisher_norms``. ``noise_scale_dp``
            needs a group of at least 2 processes (``process_group``): in one process it is a
            ``ValueError`` before the data is read (measure ``noise_scale`` there).
        map_location: where tensors of checkpoint files are loaded (default the model's device);
            files are read with ``weights_only=True``.
        labels: names of the checkpoints in the report (default the file names); numbers
            (e.g. the steps) are written with ``str()``.
        seed: seed of every random draw (probes, sampled labels): an int in
            ``[-2**63, 2**64 - 1]``, the seeds ``torch.Generator.manual_seed`` takes.
        num_probes, k, num_steps: Hutchinson probes for Tr(H), number of top eigenvalues
            (default 5; a ``k`` given, or ``top_eigenvalues`` asked for by name, above the
            model's trainable parameters is a ``ValueError`` before anything is read, while the
            default set on a model of fewer than 5 parameters lists ``top_eigenvalues`` as
            failed), Lanczos steps of the spectral density.
        density_probes: SLQ probes of the spectral density (each costs ``num_steps`` Hessian
            products); the NQM prediction uses all of them and reports its spread over them.
        chunk_size: examples per BackPACK pass.
        nqm: feed the spectral density of the last checkpoint (of every checkpoint with
            ``independent=True``) into the NQM and predict critical batch sizes.
        nqm_target: NQM target risk as a fraction of its initial risk.
        precond_power: power p of the preconditioner ``H^p`` for the preconditioned prediction.
        independent: the checkpoints are independent runs (e.g. different batch sizes), not one
            trajectory: the report draws them as separate series and predicts the NQM of each.
        on_error: what a failing quantity does. ``"warn"`` (default): the report records it
            (``entry["errors"]``, listed in the summary and the HTML page), an
            :class:`AnalysisWarning` names it, and the other quantities go on; but when every
            requested quantity fails at every checkpoint, :class:`AnalysisError` is raised with
            all the reasons (an empty report never looks like success), also where a failed
            one gave values beside it (``trace_covariance`` of a ``noise_scale`` that is 0/0:
            in the error's ``given``). ``"raise"``: the first failure raises.
        progress: a progress bar over the checkpoints on stderr; ``None`` (default): when stderr
            is a terminal.
        process_group: under ``torch.distributed`` ``data`` is this rank's shard and every value
            is that of all shards, on every rank (``None``: the default group; a group; or
            ``"local"``); see docs/distributed.md.

    Returns:
        A :class:`~curvlab.analysis.Report`.

    Raises:
        FileNotFoundError, CheckpointError, CheckpointMismatchError: for unusable checkpoints
            (before the data is read: every checkpoint is read and checked against the model,
            one at a time, nothing loaded into it).
        curvlab.NonFiniteError: for NaN or inf in a checkpoint's parameters (before the data
            is read) or in the data (before any measurement).
        ValueError, TypeError: for data the model or the loss cannot take (inputs the model
            fails on: a ``ValueError`` naming the first batch's shapes and the model's error,
            chained from it; target shapes, dtypes, devices, class indices neither in
            ``[0, C)`` nor ``ignore_index`` in any batch) or can read only once, for labels
            that are not one name (a string or a number) per checkpoint, for an estimator
            option that is not a positive int (``num_probes``, at least 2, ``k``,
            ``num_steps``, ``density_probes``, ``chunk_size``), a ``seed`` out of range, an NQM
            option out of range (``nqm_target`` in (0, 1), ``precond_power`` in [0, 1]), a
            ``map_location`` that is no device of this machine, a model with uninitialized
            (lazy) parameters (before any forward pass) or batches of ``CrossEntropyLoss``
            whose layouts conflict (a first batch of ``T == C`` read in torch's layout, a
            later one that fits only the GPT layout; all before any measurement),
            for a checkpoint of another type, e.g. a ``Path.glob`` generator or a set (before
            the data is read; the message says to pass ``sorted(...)`` or ``list(...)``), and
            for data that gives other batches when read again than at its first reading (an
            augmentation drawing from a generator curvlab cannot reach; whatever ``on_error``
            says, naming the ways out: a list of batches, or seeding inside the dataset).
        AnalysisError: when every requested quantity failed at every checkpoint (with
            ``on_error="warn"``), also where a failed one gave values beside it
            (``trace_covariance`` of a ``noise_scale`` that is 0/0): they are in its ``given``
            and its message, not a report.
    """
    _check_arguments(model, data, on_error)
    refuse_complex_model(model)  # every quantity crashed or was wrong for them (review s27)
    k_given = k is not None
    k = 5 if k is None else k
    num_probes, k, num_steps, density_probes, chunk_size, seed = _check_options(
        num_probes, k, num_steps, density_probes, chunk_size, seed
    )
    if nqm:
        _check_nqm_options(nqm_target, precond_power)
    check_map_location(map_location)
    spec = loss_spec(loss_fn)
    names = check_quantities(quantities, ANALYZE_DEFAULT, unoffered=OPTIMIZER_QUANTITIES)
    need_optimizer = [q for q in names if q in OPTIMIZER_QUANTITIES]
    if need_optimizer:
        raise ValueError(
            f"{need_optimizer} read the training loop's optimizer, which analyze has not: "
            "measure them with cl.Diagnostics(model, loss_fn, quantities=[...], optimizer=opt)"
        )
    if "noise_scale_hessian" in names:  # its passes are not reduced over the ranks: refused
        refuse_distributed("noise_scale_hessian")  # before any work (review s20; it was at
        # every checkpoint, after the other quantities' work)
    if "noise_scale_dp" in names:  # in one process: refused before the data is read, as
        # Diagnostics and the command do (review s25; it failed at every checkpoint)
        refuse_one_process("analyze", "call analyze after torch.distributed.init_process_group")
    _check_probes(num_probes, names)
    if k_given or quantities is not None:  # not the default k in the default set: that one
        _check_top_k(model, k, names, k_given)  # lists top_eigenvalues as failed on a tiny model
    if labels is not None and not isinstance(labels, (str, bytes, Mapping)):
        labels = list(labels) if hasattr(labels, "__len__") else labels  # a NumPy array too
    checkpoints = _check_checkpoints(checkpoint, labels)  # before the data is read
    device = model_device(model)
    location = device if map_location is None else map_location
    _check_checkpoints_fit(model, checkpoints, location)  # read and checked before the data too
    options = {
        "num_probes": num_probes,
        "k": k,
        "num_steps": num_steps,
        "num_probes_density": density_probes,
    }
    measure_kw = {"seed": seed, "chunk_size": chunk_size, "options": options}
    # every reading of the data (one per quantity and checkpoint) against the first, the check's:
    # a loader drawing from a generator a reading cannot keep gave each quantity and checkpoint
    # other data (identical checkpoints: losses 1.105 / 1.098 / 1.141; review s25)
    # checkpoints are loaded into stand-ins of the model's tensors (stand_ins): the user's
    # tensors come back with their values and version counters as they were
    loads = any(c is not None for c in checkpoints)
    with same_readings(data) as readings:
        n_examples = _check_data(model, spec, data, device)
        with stand_ins(model) if loads else nullcontext({}) as original:
            states, labels = _load(model, checkpoints, labels, location)
            rest = (states, labels, measure_kw, on_error, progress, original)
            entries = _measure_all(model, loss_fn, data, names, *rest)
    readings.raise_if_failed()  # (a failure a computation caught and recorded as its own)
    reasons = [
        f"{what} at {e['label']}: {why}" for e in entries for what, why in e["errors"].items()
    ]
    # "measured" on the requested quantities' own outputs: the values a failed one gives beside
    # it (trace_covariance of a failed noise_scale) are none (until review s23 they made a run
    # that measured nothing it was asked for a report)
    if reasons and not any(
        measured_quantities(names, e["values"], e["per_layer"], e["arrays"], e["errors"])
        for e in entries
    ):
        raise AnalysisError(
            reasons, given={e["label"]: e["values"] for e in entries if e["values"]}
        )
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = (
        "one model" if len(entries) == 1 else ("independent runs" if independent else "trajectory")
    )
    meta = {
        "quantities": list(names),
        "loss": type(loss_fn).__name__,
        "reduction": spec.reduction,
        "examples": n_examples,
        "parameters": dim,
        "checkpoints": len(entries),
        "checkpoints_are": kind,
        "seed": seed,
        "num_probes": num_probes,
        "top_k": k,
        "lanczos_steps": num_steps,
        "density_probes": density_probes,
        "chunk_size": chunk_size,
        "nqm_target": nqm_target,
        "precond_power": precond_power,
        **_model_meta(model, device),
    }
    report = Report(entries=entries, meta=meta)
    if nqm:
        for entry in entries if independent else entries[-1:]:
            _predict(entry, dim, nqm_target, precond_power, on_error, reasons)
    report.nqm = entries[-1].get("nqm")
    for reason in reasons:  # a partial failure: the report lists it, the caller is warned
        warnings.warn(
            f"curvlab.analyze: {reason} (the report lists it and omits the value)",
            AnalysisWarning,
            stacklevel=user_stacklevel(),
        )
    return report


_ONE_SHOT = (
    "analyze reads the data several times; pass one batch, a list of batches or a "
    "DataLoader, not a one-shot iterator or generator"
)


def _check_rereadable(data: Any) -> None:
    """Refuse data whose second reading yields nothing after a first that yielded batches: an
    iterable whose ``__iter__`` returns one shared iterator, or a DataLoader over a one-shot
    ``IterableDataset``. Every quantity then failed with "data is empty", as if the data had
    none (found in review). Reads one batch (with the caller's RNG kept, as every reading)."""
    if isinstance(data, (list, tuple)):  # a batch or a list of batches: read again at will
        return
    again = iter_batches(data, finite=False)
    try:
        next(again)
    except ValueError as exc:
        if str(exc).startswith("data is empty"):
            raise TypeError(
                f"{_ONE_SHOT}: a second reading of data ({type(data).__name__}) yielded no "
                "batch after the first yielded some (an iterable whose __iter__ returns one "
                "shared iterator, or a DataLoader over a one-shot IterableDataset)"
            ) from None
        raise
    finally:
        again.close()


def _check_arguments(model: Any, data: Any, on_error: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # lazy modules: refused before this by the entry point's wrapper (collective's refuse_lazy)
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
    if isinstance(data, Iterator):
        raise TypeError(_ONE_SHOT)


def _check_top_k(model: nn.Module, k: int, names: Sequence[str], given: bool = True) -> None:
    """``k`` at most the trainable parameters' count where ``top_eigenvalues`` is measured and
    ``k`` was given or the quantity named, before anything is read: a larger one failed at
    every checkpoint, after the other quantities' work (review s18, with ``--top-k``). In the
    default set of quantities with the default ``k=5``, a model with fewer parameters is
    measured as before: ``top_eigenvalues`` is listed as failed, with this message, beside the
    others. ``given``: ``k`` was passed (otherwise the message says it is the default)."""
    if "top_eigenvalues" not in names:
        return
    dim = sum(p.numel() for p in scan_model(model).trainable.values())
    if k > dim:
        what = f"k={k}" if given else f"k={k} (the default)"
        raise ValueError(
            f"{what} top eigenvalues (--top-k) asked of a model with {dim} trainable parameters: "
            f"pass k <= {dim}, or leave top_eigenvalues out of quantities"
        )


def _check_options(
    num_probes: Any, k: Any, num_steps: Any, density_probes: Any, chunk_size: Any, seed: Any
) -> tuple[int, int, int, int, int | None, int]:
    """The estimators' options, refused before anything is read or measured (a bad one used to
    fail every estimate that reads it, after the cheap ones were measured, and the report was
    written as if it were a partial failure). Returns them as ``int``."""
    # Tr(H) and B_noise come with their standard error over probes, which one probe has not:
    # num_probes=1 was accepted and both failed after the other quantities were measured (B_noise
    # "needs num_probes >= 2", Tr(H)'s NaN standard error blamed on an overflow)
    options = {
        "num_probes": (
            num_probes,
            "Hutchinson probes for Tr(H), random-sign probes for B_noise; --num-probes",
            1,  # at least 2 where a quantity that reads it is asked for (_check_probes)
        ),
        "k": (k, "top eigenvalues; --top-k", 1),
        "num_steps": (num_steps, "Lanczos steps of the spectral density; --lanczos-steps", 1),
        "density_probes": (
            density_probes,
            "SLQ probes of the spectral density; --density-probes",
            1,
        ),
        "chunk_size": (chunk_size, "examples per pass; None for all at once", 1),
    }
    out = []
    for name, (value, what, least) in options.items():
        if value is None and name == "chunk_size":
            out.append(None)
            continue
        if not is_count(value, least):
            must = (
                "a positive int"
                if least == 1
                else f"a positive int >= {least} (their standard error needs {least} probes)"
            )
            raise ValueError(f"{name} ({what}) must be {must}, got {value!r}")
        out.append(int(value))
    # the range torch.Generator.manual_seed takes, as every entry point checks it
    # (check_randomness): a seed of 2**64 passed here and failed inside the first measurement
    # with torch's "Overflow when unpacking long long", after the data and the checkpoints were
    # read (found in review)
    if not (is_int(seed) and SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1]):
        why = "an int" if not is_int(seed) else f"an int in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"
        raise ValueError(
            f"seed must be {why}, got {seed!r}"
            + (" (a bool is not a seed)" if isinstance(seed, bool) else "")
        )
    return out[0], out[1], out[2], out[3], out[4], int(seed)


def _check_nqm_options(target: Any, precond_power: Any) -> None:
    """The NQM prediction's options, refused before the spectrum is measured."""
    if not (is_real(target) and 0 < target < 1):
        raise ValueError(
            f"nqm_target (the NQM's target risk as a fraction of its initial risk) must be a "
            f"number in (0, 1), got {target!r}; or pass nqm=False"
        )
    if not (is_real(precond_power) and 0 <= precond_power <= 1):
        raise ValueError(
            f"precond_power (p of the NQM's preconditioner P = H^p) must be a number in [0, 1], "
            f"got {precond_power!r}; or pass nqm=False"
        )


_PROBED = ("trace_hessian", "noise_scale_hessian")
"""The quantities that read ``num_probes`` and give a standard error over the probes."""


def _check_probes(num_probes: int, names: Sequence[str]) -> None:
    """Tr(H) and B_noise come with their standard error over probes, which one probe has not:
    ``num_probes=1`` was accepted and both failed after the other quantities were measured
    (B_noise "needs num_probes >= 2", Tr(H)'s NaN standard error blamed on an overflow). Refused
    up front where one of them is asked for (found in review), accepted otherwise."""
    probed = [q for q in names if q in _PROBED]
    if probed and num_probes < 2:
        raise ValueError(
            f"num_probes must be a positive int >= 2 for {probed} (their standard error over "
            f"probes; --num-probes), got {num_probes}"
        )


def _check_checkpoints(checkpoint: Any, labels: Any) -> list[Any]:
    """The list of checkpoints, with what can be checked without reading them refused before the
    data is read (a misspelt path was found only after the whole data was read, found in review):
    an empty list, checkpoints of a type that is none, files that do not exist, labels that do
    not fit. A ``Path.glob`` generator, a set or ``dict.values()`` was refused only after the
    data was read twice, with a message that left out the list (found in review).

    Raises:
        ValueError: an empty list, or as many labels as checkpoints missing.
        FileNotFoundError: naming a checkpoint file that does not exist (or is a folder).
        TypeError: a checkpoint of another type (an iterable that is no list: the message says
            to wrap it in ``sorted(...)`` or ``list(...)``), or labels that are not a list of
            names (strings or numbers).
    """
    checkpoints = list(checkpoint) if _is_trajectory(checkpoint) else [checkpoint]
    if not checkpoints:
        raise ValueError("checkpoint is an empty list; pass at least one checkpoint or None")
    for i, ckpt in enumerate(checkpoints):
        if not isinstance(ckpt, (str, os.PathLike, Mapping, nn.Module, type(None))):
            what = f"checkpoint {i} of the list" if _is_trajectory(checkpoint) else "checkpoint"
            raise TypeError(checkpoint_type_message(ckpt, what))
        if isinstance(ckpt, (str, os.PathLike)):
            path = Path(ckpt)
            if not path.exists():
                raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
            if path.is_dir():
                raise FileNotFoundError(folder_checkpoint_message(path))
    if labels is not None:
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise TypeError(
                f"labels must be a list of names, one per checkpoint, got {type(labels).__name__}"
                + (f" {labels!r}" if isinstance(labels, (str, bytes)) else "")
            )
        if len(labels) != len(checkpoints):
            raise ValueError(f"labels has {len(labels)} names for {len(checkpoints)} checkpoints")
        bad = [x for x in labels if isinstance(x, bool) or not isinstance(x, (str, numbers.Real))]
        if bad:
            raise TypeError(
                f"labels must be strings (or numbers, written with str()), got {bad[0]!r} of "
                f"type {type(bad[0]).__name__}"
            )
    return checkpoints


def _source(checkpoint: Any, index: int, count: int) -> str:
    """How messages name checkpoint ``index`` of ``count``: its path quoted, its place in the
    trajectory, or ``"(state_dict)"``."""
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        return f"'{checkpoint}'"
    return f"{index} of the trajectory" if count > 1 else "(state_dict)"


def _check_checkpoints_fit(model: nn.Module, checkpoints: list[Any], location: Any) -> None:
    """Read every checkpoint (:func:`_check_checkpoints`' list) and check it as :func:`_load` does
    (a state dict inside, finite values, the model's keys and shapes), before the data is read: a
    checkpoint of another model was refused only after the whole data had been read and checked
    (51 batches of 50 read, found in review s21). One at a time: each is released before the
    next is read, and nothing is loaded into the model (:func:`~curvlab.analysis._checkpoint.
    check_fits`). ``None`` (the model as it is): its parameters are checked to be finite.

    Raises:
        FileNotFoundError, CheckpointError, CheckpointMismatchError: for unusable checkpoints.
        curvlab.NonFiniteError: for NaN or inf in a checkpoint's (or the model's) parameters.
        ValueError: for a ``location`` the first file fails with but loads on the CPU without.
    """
    check_map_location(location)  # (the files are mapped on the CPU here; _load uses it)
    # a dict or a function map_location is torch.load's own: the first file is read with it,
    # so that one that fails is named here (review s23: it was blamed on the file as "corrupt",
    # after the data was read twice)
    probe = callable(location) or isinstance(location, Mapping)
    for i, ckpt in enumerate(checkpoints):
        if ckpt is None:
            check_parameters_finite(dict(model.named_parameters()))
            continue
        source = _source(ckpt, i, len(checkpoints))
        # a file is mapped, not read into memory or copied to the model's device: its checks
        # stream over the mapping (found in review s21: the check read every file once more,
        # to the GPU where the model was there)
        mapped = "cpu"
        if probe and isinstance(ckpt, (str, os.PathLike)):
            mapped, probe = location, False
        sd = resolve_state_dict(ckpt, map_location=mapped, source=source, mmap=True)
        check_parameters_finite(sd, where=f"checkpoint {source}")
        check_fits(model, sd, source=source)
        del sd  # released before the next is read


def _load(
    model: nn.Module, checkpoints: list[Any], labels: Sequence[Any] | None, location: Any
) -> tuple[list[dict[str, Tensor] | None], list[str]]:
    """Read and check every checkpoint (:func:`_check_checkpoints`' list) before any measurement:
    the state dicts (``None``: the model as it is) and their labels (numbers as ``str``: the page
    and the figures print them).

    Every checkpoint is read before any is loaded, and a tensor of one that shares memory with the
    model (a live ``model.state_dict()``, the model itself) is copied (:func:`own_copies`): loading
    an earlier checkpoint overwrote it (found in review). Each is then loaded once to check it, in
    the block of :func:`~curvlab.analysis._checkpoint.stand_ins`, which puts the model back.
    """
    states: list[dict[str, Tensor] | None] = []
    sources: list[str] = []
    for i, ckpt in enumerate(checkpoints):
        if ckpt is None:
            check_parameters_finite(dict(model.named_parameters()))
            states.append(None)
            sources.append("")
            continue
        source = _source(ckpt, i, len(checkpoints))
        sd = resolve_state_dict(ckpt, map_location=location, source=source)
        check_parameters_finite(sd, where=f"checkpoint {source}")
        states.append(own_copies(model, sd))
        sources.append(source)
    for sd, source in zip(states, sources):
        if sd is not None:
            load_into(model, sd, source=source)
    if labels is None:
        return states, checkpoint_labels(checkpoints)
    # numbers (labels=[100, 200] for steps) crashed Report.save after all the work, found in review
    return states, [str(x) for x in labels]


def _measure_all(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    names: Sequence[str],
    states: list[dict[str, Tensor] | None],
    labels: list[str],
    measure_kw: dict[str, Any],
    on_error: str,
    progress: bool | None,
    original: dict[str, Tensor],
) -> list[dict[str, Any]]:
    """One report entry per checkpoint, each measured in eval mode. ``original``: the model's
    state as given (loaded for a ``None`` checkpoint after another; :func:`stand_ins` puts the
    model back after)."""
    entries = []
    bar = ProgressBar(total=len(states), desc="curvlab analyze", enable=progress, unit="checkpoint")
    # whether the model holds a checkpoint's state now (_load checked each by loading it)
    loaded = any(sd is not None for sd in states)
    try:
        for sd, label in zip(states, labels):
            if sd is not None:
                load_into(model, sd)
                loaded = True
            elif loaded:  # None: the model as it was given, not the previous checkpoint's state
                load_into(model, original)
                loaded = False
            t0 = time.perf_counter()
            with leave_no_trace(model, mode=False):
                m = measure(
                    model,
                    loss_fn,
                    data,
                    names,
                    on_error="raise" if on_error == "raise" else "skip",
                    **measure_kw,
                )
            seconds = time.perf_counter() - t0
            entries.append(
                {
                    "label": label,
                    "values": m.values,
                    "per_layer": m.per_layer,
                    "arrays": m.arrays,
                    "errors": m.errors,
                    "seconds": seconds,
                }
            )
            bar.update(postfix=f"{label}: {seconds:.1f} s")
    finally:
        bar.close()
    return entries


def _model_meta(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """The report's facts about the model and the software."""
    return {
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "mode": "eval (restored afterwards)",
        "layer_types": {  # readable layer names in the figures
            name: type(m).__name__
            for name, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        },
    }


def _predict(
    entry: dict[str, Any],
    dim: int,
    target: float,
    precond_power: float,
    on_error: str,
    reasons: list[str],
) -> None:
    """The NQM prediction of one entry's spectral density, into ``entry["nqm"]`` (a failure is
    recorded in the entry and in ``reasons`` under ``on_error="warn"``)."""
    density = entry["arrays"].get("spectral_density")
    if not density:
        return
    try:
        scale = density.get("mean_scale", 1.0)  # a "sum" loss's Hessian / M
        if scale is None:
            raise ValueError(
                "every target of the data is ignore_index: no loss term, so no per-example "
                "Hessian for the NQM"
            )
        prediction = nqm_prediction(
            [scale * v for v in density["nodes"]],
            density["weights"],
            dim,
            target=target,
            precond_power=precond_power,
            num_probes=int(density.get("num_probes", 1)),
            terms_per_example=density.get("terms_per_example") or None,
        )
    except Exception as exc:  # noqa: BLE001 - the NQM is an extra; the report stays useful
        if on_error == "raise":
            raise
        entry["errors"]["nqm"] = f"{type(exc).__name__}: {exc}"
        reasons.append(f"nqm at {entry['label']}: {entry['errors']['nqm']}")
        return
    prediction["checkpoint"] = entry["label"]
    entry["nqm"] = prediction
