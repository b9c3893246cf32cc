"""``NoisyOptimizer``: add a noise sampler's draws to the gradient before any optimizer's step.

Wen et al.'s Eq. 2, ``theta <- theta - lr * (grad L + C xi)``, for any ``torch.optim`` optimizer whose
``step()`` needs no closure: the noise is added to ``.grad`` by :meth:`NoisyOptimizer.step`, right
before ``optimizer.step()``, so it passes through momentum, Adam's moments and weight decay exactly
as a gradient would, and anything the loop does to ``.grad`` between its backward pass and
``step()`` (clipping, logging its norm) sees the gradient alone. The one exception is
:class:`~curvlab.noise.FullFisherNoise` on the one-pass paths (a closure or :meth:`capture`): it
folds its noise into the backward pass itself, so ``.grad`` holds gradient plus noise as soon as
``backward()`` returns, and clipping clips both (docs/noise.md, "Gradient clipping").
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch._C._dynamo.eval_frame import set_eval_frame as _set_eval_frame

from curvlab._compiled import COMPILED_STEP_NOTE, compiled_note, strip_wrappers
from curvlab._differentiating_forward import derivatives_refused
from curvlab._finite import NonFiniteError
from curvlab._fsdp import place_like
from curvlab._generator_state import StateWording, generator_state
from curvlab._layout import ExamplesApart, finding_error, first_tensor, fresh_call
from curvlab._losses import classes_last, loss_spec
from curvlab._notrace import buffers_kept, leave_no_trace
from curvlab._numbers import is_count, is_int
from curvlab._precision import without_autocast
from curvlab._rng import make_generator
from curvlab._scan import model_device
from curvlab._warn import warn_once
from curvlab.backends._choice import Held, SignatureMemo, modules_signature
from curvlab.backends._validation import check_no_train_batchnorm
from curvlab.distributed import Comm, active, group_scope
from curvlab.noise._base import NoiseSampler, check_supported, sampler_model, trainable_params
from curvlab.noise._capture import Taps
from curvlab.noise._distributed import captured_layout, reduce_captured
from curvlab.noise._optim_checks import (
    check_left_out,
    check_saved_sampler,
    check_steps_model,
    fold_left,
    grad_versions,
    needs_closure,
    signature,
    stop_step,
)
from curvlab.noise._sixteen_bit import warn_if_noise_lost

__all__ = ["NoisyOptimizer"]

_SHARED_DRAW = (
    "the noise is one full-size draw shared by every rank, each adding its part to its sharded "
    ".grad"
)
FSDP2_NOTE = (
    "FSDP2 (fully_shard) model: the curvature is measured in a separate pass (diag_fisher's FSDP2 "
    "route, not captured in the training backward) on each rank's shard of the step's batch, "
    "combined over the ranks; " + _SHARED_DRAW
)
"""``info["fsdp2"]`` of a curvature sampler on an FSDP2 model."""

FSDP2_DRAW_NOTE = "FSDP2 (fully_shard) model: " + _SHARED_DRAW
"""``info["fsdp2"]`` of a data-free sampler (:class:`IsotropicNoise`) on an FSDP2 model."""


class NoisyOptimizer:
    """Wrap ``optimizer`` so that every ``step()`` adds a sample of ``sampler`` to the gradients.

    Three ways to run a step (all leave no hooks behind):

    1. ``noisy.step(closure)``, with a closure that zeroes the gradients, computes
       ``loss_fn(model(inputs), targets)``, calls ``backward()`` and returns the loss. On steps that
       need curvature the closure runs inside :meth:`capture`, so the empirical diagonal
       (:class:`DiagFisherNoise`, :class:`FisherTraceNoise`) and K-FAC factors (:class:`KFACNoise`)
       come out of the same backward pass that produces the gradient, and :class:`FullFisherNoise`
       folds its vector into that backward pass: no second pass. Other kinds (``"mc"``,
       ``"exact"``, models with layers the hooks do not cover) run one extra pass on the batch the
       closure used.
    2. ``with noisy.capture(): loss_fn(model(x), y).backward()`` followed by ``noisy.step()``: the
       same, without a closure.
    3. Your own ``loss.backward()`` followed by ``noisy.step(inputs=x, targets=y)``: curvature, when
       due, is measured in a separate forward/backward pass on ``(x, y)`` (twice the cost of 1 and 2
       on those steps).

    The one-pass paths measure the curvature of ``loss_fn(model(inputs), targets)`` with the
    ``loss_fn`` module given here, called once per step on the model's output. Other terms of the
    loss that reach the model's output or hidden layers (a z-loss, an activation penalty, an
    auxiliary loss) move a curvature step to the separate pass of 3; so does the loss module
    called more than once (mixup), or, where that pass could not tell which call's targets to
    use, :meth:`step` raises before anything is drawn (docs/noise.md).

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (some of) ``model``'s parameters whose
            ``step()`` needs no closure (``LBFGS``, which re-evaluates the loss and gradient
            itself inside its step, is refused). Noise goes only into the gradients of the
            parameters it steps (their part of the draw over all trainable parameters); a
            parameter another optimizer trains keeps its gradient. An optimizer that steps
            none of ``model``'s parameters (built on a copy of it) is refused; tensors it
            steps outside ``model`` get no noise, and a ``UserWarning`` names them.
        sampler: a noise sampler from :mod:`curvlab.noise`.
        model: the model whose ``named_parameters()`` the sampler's draws are keyed by.
        loss_fn: the loss module, needed by the samplers that measure curvature on the step's
            batch (``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``, mean or sum);
            :class:`IsotropicNoise` and :class:`MultiplicativeNoise` (which reads the step's
            ``.grad``) never call it and may leave it ``None``.
        stop_after: add noise on the first ``stop_after`` steps only (``None``: always).
        stop_fraction: alternatively, stop after ``floor(stop_fraction * total_steps)`` steps,
            of the fraction as written (``0.29`` of ``100``: 29 steps, where the float product
            ``28.999999999999996`` lost one); Wen et al. stop the noise after a quarter of
            training, ``stop_fraction=0.25``. A number in ``[0, 1]``, not a ``bool``.
        total_steps: the planned number of steps, with ``stop_fraction``.
        recompute_every: measure the curvature every ``k`` steps and reuse it in between (for
            samplers whose state can be reused; :class:`FullFisherNoise` and
            :class:`MultiplicativeNoise` draw from the current step's pass every step). A step
            on which the trainable parameters differ from those the cached state was measured
            for measures anew: other names or shapes (layers frozen or unfrozen), or other
            parameter objects of the same names and shapes (a layer replaced or re-initialised
            by a new ``nn.Parameter``, ``model.head = nn.Linear(...)``; the objects are
            compared in memory only, never saved; under a process group of several ranks only
            the names and shapes decide, see ``process_group``). Values changed in place in the same
            parameter objects (``model.load_state_dict(ckpt)`` mid-run) are not seen: an
            optimizer step changes them in place too, so nothing cheap (no host
            synchronisation) tells a reload from a step, and the cached curvature is kept
            until the next due measurement. After such a reload load the ``NoisyOptimizer``'s
            state saved with the checkpoint too (:meth:`load_state_dict`: its curvature is the
            checkpoint's), or measure anew at the next step with
            ``noisy.load_state_dict({**noisy.state_dict(), "sampler_state": None})``.
        seed: seed of the noise generator (default 0), on the model's device.
        generator: alternatively a ``torch.Generator`` on the model's device.
        process_group: under ``torch.distributed`` (a DDP-wrapped ``model`` is accepted), the
            curvature is that of all ranks' batches and the noise one draw shared by every rank,
            so replicas stay bitwise identical; ``None`` is the default group, ``"local"`` keeps
            each rank on its own batch (docs/distributed.md), refused for
            :class:`FullFisherNoise` on a DDP model (its noise, folded into the backward pass,
            would be averaged by DDP's all-reduce; review s23). Use the same ``seed`` on every
            rank.
            The ranks decide together whether a step's captured curvature is used: where one
            rank's capture cannot be (another term of its loss, a weight used outside its layer,
            on its data only), every rank measures in the separate pass, and where one rank's
            separate pass is refused, every rank raises (that rank its own error).
            Under a group of several ranks, whether a step measures anew is decided by what is
            the same on every rank: none cached, due (``recompute_every``), or other trainable
            names or shapes. Parameter objects replaced with the same names and shapes (a
            layer re-initialised by a new ``nn.Parameter``, ``load_state_dict(...,
            assign=True)``) are seen by each rank alone, so they do not trigger a measurement
            there (a rank measuring alone waited for the others in the all-reduce of the
            captured state: a hang, found in review s24): a ``RuntimeWarning`` says so once, and
            the cached curvature is used until the next scheduled re-measurement. Replace layers
            on every rank alike; to measure anew at the next step, load
            ``{**noisy.state_dict(), "sampler_state": None}`` on every rank.
            A ``fully_shard`` (FSDP2) model is accepted with :class:`DiagFisherNoise` (any kind),
            :class:`FisherTraceNoise` and :class:`IsotropicNoise`, each rank passing its shard of
            the step's batch: the curvature, that of all ranks' shards, is measured in a separate
            pass on the step's batch (``diag_fisher``'s FSDP2 route; a closure or
            :meth:`capture` only records the batch), and every rank adds its part of the one
            shared full-size draw to its sharded ``.grad`` (``info["fsdp2"]``). There
            ``"local"`` is refused: a rank alone cannot measure a sharded model's curvature.
            For a mean loss FSDP2's averaged gradient is that of the whole batch when the
            shards are equal-sized.

    The noise is added by :meth:`step`, after whatever the loop did to ``.grad`` since its
    backward pass (``clip_grad_norm_``, a GradScaler's ``unscale_``), except for
    :class:`FullFisherNoise` on paths 1 and 2, whose noise is in ``.grad`` from the backward pass
    on: a clip then clips gradient plus noise (docs/noise.md, "Gradient clipping"; path 3 adds it
    at :meth:`step`).

    Parameters whose ``.grad`` is ``None`` at step time get no noise (a layer the step's forward
    skipped, after ``zero_grad()`` with its default ``set_to_none=True``); a stale zero ``.grad``
    (``zero_grad(set_to_none=False)``) is a gradient and gets noise. :class:`FisherTraceNoise`
    spreads its total variance ``scale**2 * Tr(F)`` over the coordinates that get noise, so the
    total is the same either way; :class:`IsotropicNoise` adds ``std**2`` per coordinate that
    gets noise. A sparse gradient (an ``Embedding(sparse=True)``) is made dense where dense noise is added to it (the noise reaches
    every row), so an optimizer that takes sparse gradients only (``SparseAdam``) is refused,
    except with :class:`MultiplicativeNoise`, whose noise keeps the gradient's rows. A
    ``torch.compile``d model or training step is accepted: the steps that capture curvature run
    the step eagerly, the others compiled, and the noise is the eager run's
    (docs/training-loops.md); ``info["compiled"]`` says so. Inside a compiled whole step,
    :meth:`step` (its closure included), :meth:`zero_grad` and the entry and exit of
    :meth:`capture`'s block are graph breaks that run eagerly, and training is bitwise the eager
    loop's.

    Attributes:
        info: how the noise is measured where that is not the default (``"compiled"``,
            ``"fsdp2"``).

    Example:
        >>> import torch
        >>> from curvlab.noise import DiagFisherNoise
        >>> model, loss_fn = torch.nn.Linear(3, 2), torch.nn.CrossEntropyLoss()
        >>> X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                        DiagFisherNoise(large_batch=16, small_batch=4), model, loss_fn,
        ...                        stop_fraction=0.25, total_steps=8, recompute_every=2)
        >>> def closure():
        ...     noisy.zero_grad()
        ...     loss = loss_fn(model(X), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(8):
        ...     _ = noisy.step(closure)
        >>> noisy.steps_taken, noisy.noise_active
        (8, False)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sampler: NoiseSampler,
        model: nn.Module,
        loss_fn: nn.Module | None = None,
        *,
        stop_after: int | None = None,
        stop_fraction: float | None = None,
        total_steps: int | None = None,
        recompute_every: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        process_group: Any = None,
    ) -> None:
        compiled = compiled_note(model)  # the model as passed: compiled (docs/training-loops.md)?
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)!r}")
        if needs_closure(optimizer):
            raise TypeError(
                f"NoisyOptimizer cannot wrap {type(optimizer).__name__}: its step() needs a "
                "closure, which re-evaluates the loss and gradient inside the step (LBFGS: "
                "several times, with a line search), so the noise NoisyOptimizer adds to .grad "
                "before optimizer.step() would be discarded or mixed into its curvature pairs. "
                "Use an optimizer whose step() needs no closure (SGD, Adam, AdamW, ...)"
            )
        if not isinstance(sampler, NoiseSampler):
            raise TypeError(
                f"sampler must be a curvlab.noise sampler (e.g. DiagFisherNoise), got {sampler!r}"
            )
        # a DDP or compile wrapper: its module's names key the noise; a fully_shard model: checked
        model, self._fsdp2 = sampler_model(
            sampler, model, process_group, f"NoisyOptimizer with {type(sampler).__name__}"
        )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # only samplers that measure a state on the step's batch run a curvature pass here;
        # MultiplicativeNoise reads the step's .grad (its sample() alone computes a gradient),
        # so its loss_fn is never called (it was required and checked before review s18)
        if sampler.uses_curvature and not sampler.uses_gradient:
            if loss_fn is None:
                raise ValueError(
                    f"{type(sampler).__name__} needs loss_fn=, the training loss module"
                )
            loss_spec(loss_fn)
        if not is_count(recompute_every):
            raise ValueError(f"recompute_every must be an int >= 1, got {recompute_every!r}")
        stop = stop_step(stop_after, stop_fraction, total_steps)
        check_steps_model(optimizer, model)
        _check_sparse_only(optimizer, sampler, model)
        self.optimizer = optimizer
        self.sampler = sampler
        self.model = model
        self.loss_fn = loss_fn
        self.recompute_every = int(recompute_every)
        self.stop_step = stop
        self.generator = make_generator(seed=seed, generator=generator, device=model_device(model))
        # what load_state_dict seeds from for a state saved without its generator's (None)
        self._seed = self.generator.initial_seed() if seed is None else int(seed)
        self.steps_taken = 0
        self._state: Any = None
        self._state_step: int | None = None
        # the trainable parameters (names, shapes) the cached state was measured for
        self._state_params: tuple[tuple[str, tuple[int, ...]], ...] | None = None
        # and the very parameter objects (weak references, in memory only: never saved, taken
        # from the model by load_state_dict): a layer replaced or re-initialised with the same
        # names and shapes (a new nn.Parameter) is measured anew (found in review s23)
        self._state_objects: tuple[weakref.ref[nn.Parameter], ...] | None = None
        self._pending: Taps | None = None
        # the signatures of captured model calls found to keep the examples apart
        # (_check_captured_apart: once per signature)
        self._apart: SignatureMemo[bool] = SignatureMemo()
        # the capture() block entered and not yet exited (abort_capture() closes it)
        self._open_block: _CaptureBlock | None = None
        self.info: dict[str, str] = {} if compiled is None else {"compiled": COMPILED_STEP_NOTE}
        if self._fsdp2:
            self.info["fsdp2"] = FSDP2_NOTE if sampler.uses_curvature else FSDP2_DRAW_NOTE
        trainable_params(model)
        self.process_group = process_group
        with group_scope(process_group):
            if active() is not None:  # under torch.distributed (docs/distributed.md)
                check_supported(sampler)

    # ------------------------------------------------------------------ schedule
    @property
    def noise_active(self) -> bool:
        """Whether the next step adds noise."""
        return self.stop_step is None or self.steps_taken < self.stop_step

    def _needs_pass(self, params: dict[str, nn.Parameter] | None = None) -> bool:
        """Whether the next step must measure the sampler's state on its batch: none cached, due
        (``recompute_every``), or cached for other trainable parameters (``params``: the
        trainable ones now, read if not given)."""
        if not self.noise_active or not self.sampler.uses_curvature:
            return False
        if self.sampler.uses_gradient:
            return False
        if not self.sampler.reusable or self._state is None or self._state_step is None:
            return True
        if self.steps_taken - self._state_step >= self.recompute_every:
            return True
        # layers frozen or unfrozen since (progressive unfreezing): the cached state has no
        # entry for a newly trainable parameter (KFACNoise would add it no noise)
        params = trainable_params(self.model) if params is None else params
        if signature(params) != self._state_params:
            return True
        # a layer replaced by one of the same names and shapes (a re-initialised head): the
        # cached state is the old layer's curvature (0.2306 for the new one's 125.4, found in
        # review s23); identity checks only, no host synchronisation
        if _same_objects(self._state_objects, params):
            return False
        with group_scope(self.process_group):
            several = active() is not None
        if not several:
            return True
        # under several ranks the identity test is this rank's alone: a rank that measured
        # anew went into the all-reduce of the captured state while one that kept its objects
        # made no collective call, and both waited (found in review s24). Only the names and
        # shapes (the same on every rank) decide there; the objects replaced here are said
        warn_once(_REPLACED_ON_RANK, RuntimeWarning)
        return False

    # ------------------------------------------------------------------ delegation
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups (e.g. to change the learning rate)."""
        return self.optimizer.param_groups

    @torch.compiler.disable  # inside a compiled step: runs eagerly (docs/training-loops.md)
    def zero_grad(self, set_to_none: bool = True) -> None:
        """``optimizer.zero_grad``; also forgets a closed capture whose step never ran (a step a
        GradScaler skipped), rewinding the noise generator, as the next :meth:`capture` would."""
        if self._pending is not None and not self._pending._active:
            self._discard_pending()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ one-pass capture
    def capture(self, loss_factor: float | None = None) -> AbstractContextManager[None]:
        """Wrap the next step's forward and backward pass so its curvature is measured in it.

        Does nothing on steps that need no curvature (noise stopped, or a cached state reused).
        Under ``torch.amp.GradScaler`` (``scaler.scale(loss).backward()`` inside the block,
        ``scaler.step(noisy)`` after it) the captured curvature is that of the unscaled loss; a
        step the scaler skips (inf or NaN gradients) never calls :meth:`step`, and the next
        :meth:`zero_grad` or ``capture()`` discards what it captured and rewinds the noise
        generator, so a skipped step draws and adds no noise, also under gradient accumulation
        (the earlier micro-batches of the next step refill the cleared gradients before its
        capture).

        Args:
            loss_factor: the factor the loop puts on ``loss_fn``'s value before ``backward``
                inside the block, e.g. ``1 / accumulation_steps`` for the last micro-batch of
                gradient accumulation (default: 1). Captured curvature never needs it (it is
                read off the backward pass); :class:`FullFisherNoise`, which folds its noise into
                that backward pass, does: it refuses to fold into gradients that already hold
                earlier micro-batches without it, and a step whose backward pass gives the loss
                another gradient than a GradScaler's scale (a factor on the loss, found in the
                autograd graph) draws in a separate pass without it. A factor of 0 (or one that
                is not finite) leaves the captured samplers nothing to divide by: a step whose
                graph shows one (``loss * 0.0``, a warm-up weight ``w = 0`` as a Python number or
                a CPU tensor) measures in the separate pass, every sampler, also with
                ``loss_factor=`` (docs/noise.md, "Where the work happens"). It must be the
                factor the loss actually carries (``n_last / N`` for a token-weighted loop): one
                the autograd graph contradicts without a host read is a ``ValueError`` before
                the backward pass.

        Inside a ``torch.compile``d training step the block's entry and exit are graph breaks
        and run eagerly, and on the steps that capture curvature the block itself (your forward
        and backward) runs eagerly too, untraced (dynamo does not guard on the capture's module
        hooks). Training is bitwise the eager loop's (docs/training-loops.md).

        An exception inside a ``with`` block closes it (and rewinds the noise generator); a block
        entered by hand (``block.__enter__()`` in one callback, ``block.__exit__(None, None,
        None)`` in another, the HuggingFace Trainer recipe) that a raising step leaves open is
        closed by :meth:`abort_capture`.
        """
        return _CaptureBlock(self, loss_factor)

    @contextmanager
    def _capture(self, loss_factor: float | None) -> Iterator[None]:
        """The work of :meth:`capture`'s block (run eagerly: :class:`_CaptureBlock`)."""
        if loss_factor is not None and not (
            isinstance(loss_factor, (int, float))
            and not isinstance(loss_factor, bool)
            and math.isfinite(loss_factor)
            and loss_factor > 0
        ):
            raise ValueError(f"loss_factor must be a finite number > 0, got {loss_factor!r}")
        if self._pending is not None:
            if self._pending._active:
                raise RuntimeError(
                    "capture() is already open: close it and call step() first (a block "
                    "entered by hand and left open by a step that raised inside it: "
                    "noisy.abort_capture() closes it)"
                )
            if self._pending.noise_added and fold_left(self._pending.folded_into):
                raise RuntimeError(
                    "capture() was opened again before step(), and the gradients still hold "
                    "the noise the last capture folded into its backward pass (untouched since): "
                    "with gradient accumulation wrap only the LAST micro-batch in "
                    "`noisy.capture(loss_factor=1 / accumulation_steps)` (the earlier ones "
                    "without a capture), else each micro-batch adds a noise of its own"
                )
            # its step never ran (a GradScaler skipped it; the loop cleared the gradients since)
            self._discard_pending()
        if not self._needs_pass():
            yield
            return
        assert self.loss_fn is not None
        if self.sampler.per_example:
            # also where the hooks never see the BatchNorm (one without parameters): refused
            # before the step runs, as the separate pass would refuse it
            check_no_train_batchnorm(self.model)
        rewind = self.generator.get_state()
        taps = None
        # under FSDP2 hooks would see sharded parameters: a pass of its own; a fold into the
        # backward pass (FullFisherNoise) reaches every parameter, also those another optimizer
        # steps: then the draw of a separate pass, added where this optimizer steps
        if not self._fsdp2 and (not self.sampler.folds or self._steps_every_parameter()):
            taps = self.sampler.capture(self.model, self.loss_fn, self.generator)
        if taps is None:  # only record the batch for a second pass
            taps = Taps(self.model, self.loss_fn)
        taps.rewind = rewind
        taps.loss_factor = None if loss_factor is None else float(loss_factor)
        self._pending = taps
        keep = self._keep_output(taps)
        try:
            with taps:
                yield
        except BaseException:
            if self._pending is taps:  # (not a later capture's)
                self._discard_pending()
            raise
        finally:
            if keep is not None:
                keep.remove()
        if taps.noise_added:  # the gradients holding the fold, as the block left them
            taps.folded_into = grad_versions(self.model)
        # the examples-apart check at the parameters of the captured pass, before any step (a
        # second NoisyOptimizer's step moves the parameters they share: a false refusal, found
        # in review s24); raised by step(), where the ranks agree on errors
        try:
            taps.scratch["apart_finding"] = self._apart_finding(taps)
        except Exception as exc:  # noqa: BLE001 - raised by step() (every rank there)
            taps.scratch["apart_finding"] = exc

    @torch.compiler.disable  # inside a compiled step: runs eagerly (docs/training-loops.md)
    def abort_capture(self) -> bool:
        """Close a :meth:`capture` block left open by a step that raised inside it.

        For a block entered by hand, ``block.__enter__()`` and ``block.__exit__(...)`` in
        separate callbacks (the HuggingFace ``Trainer`` recipe, docs/training-loops.md): where
        the forward or backward pass between them raises (out of memory, a bad batch,
        ``KeyboardInterrupt``), nothing exits the block, and its hooks stay on the model and the
        loss module, ``torch.compiler.set_stance("force_eager")`` stays on, the model's next
        call raises (a second call inside one capturing step) and the next ``capture()``,
        :meth:`zero_grad` and :meth:`load_state_dict` refuse the open capture. This closes it
        as an exception inside a ``with noisy.capture():`` block would: the hooks are removed,
        the stance is restored, what it captured is forgotten and the noise generator rewound
        to where the block began, so the next step draws what it would have drawn had the
        failed one never run (``steps_taken`` is unchanged). Afterwards exiting the old block
        object is a no-op. The gradients may hold part of the failed step (and, with
        :class:`FullFisherNoise`, part of its folded noise): zero them before the next step, as
        after any failed step.

        Call it from eager code, after the exception left the step (a compiled step that raised
        has already restored dynamo's frame evaluation). A capture that was closed but whose
        :meth:`step` has not run is not open: it is left for that step (the next
        :meth:`zero_grad` or ``capture()`` forgets it, as before).

        Returns:
            Whether a block was open (``False``: nothing was changed).
        """
        block, self._open_block = self._open_block, None
        if block is None:
            return False
        block._abort()
        return True

    def _discard_pending(self) -> None:
        """Forget a capture whose step never ran; the generator goes back to where it began."""
        taps, self._pending = self._pending, None
        if taps is not None and taps.rewind is not None:
            self.generator.set_state(taps.rewind)

    # ------------------------------------------------------------------ the step
    @torch.compiler.disable  # inside a compiled step: runs eagerly (docs/training-loops.md)
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        loss_factor: float | None = None,
    ) -> Any:
        """Add noise to ``.grad`` (if active) and take the optimizer's step.

        A step that raises (in the closure, the curvature pass, the noise draw or the wrapped
        optimizer's ``step()``) leaves ``steps_taken``, the noise generator and the cached
        curvature as they were before it, so a loop that skips the batch (an out-of-memory
        error caught) goes on exactly as a run without it. The gradients may hold noise then,
        and parameters the optimizer changed before it raised stay changed.

        Args:
            closure: optional; re-evaluates the model and returns the loss (see the class docs).
            inputs: the step's batch, for a separate curvature pass when no capture was made.
            targets: its targets.
            loss_factor: with ``closure``, the factor the closure puts on ``loss_fn``'s value
                before ``backward`` (``loss = 0.25 * loss_fn(...)``), as for :meth:`capture`.
                Only :class:`FullFisherNoise`, which folds its noise into the closure's backward
                pass, reads it: without it a step whose loss carries a factor (found in the
                autograd graph) draws in a separate pass instead, since the fold would scale the
                noise by that factor; one the graph contradicts is a ``ValueError``, as for
                :meth:`capture`.

        Inside a ``torch.compile``d training step the call is a graph break: it runs eagerly,
        untraced, closure included, as :meth:`capture`'s block does on the steps that capture
        curvature; training is bitwise the eager loop's (docs/training-loops.md).

        Returns:
            What the closure returned (``None`` without closure).
        """
        if self._pending is not None and self._pending._active:
            raise RuntimeError("call step() after the `with noisy.capture():` block, not inside it")
        if loss_factor is not None and closure is None:
            raise ValueError(
                "step(loss_factor=) goes with a closure; around your own backward pass pass it "
                "to the capture: `with noisy.capture(loss_factor=...):`"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad(), self.capture(loss_factor):
                loss = closure()
        taps, self._pending = self._pending, None
        # a step that raises past the capture (in the curvature pass, the draw, the optimizer's
        # step) leaves the generator and the cached state as a run without this batch has them,
        # as one raising inside the capture does (found in review: an OOM in the draw left the
        # generator advanced, and a reusable sampler the failed step's curvature)
        rewind = taps.rewind if taps is not None and taps.rewind is not None else None
        if rewind is None and self.noise_active:
            rewind = self.generator.get_state()
        cached = (self._state, self._state_step, self._state_params, self._state_objects)
        try:
            if self.noise_active:
                with group_scope(self.process_group):
                    self._add_noise(taps, inputs, targets)
            self.optimizer.step()
        except BaseException:
            if rewind is not None:
                self.generator.set_state(rewind)
            self._state, self._state_step, self._state_params, self._state_objects = cached
            raise
        self.steps_taken += 1
        return loss

    def _add_noise(self, taps: Taps | None, inputs: Tensor | None, targets: Tensor | None) -> None:
        params = trainable_params(self.model)
        if self.sampler.uses_gradient:
            state: Any = {n: p.grad for n, p in params.items() if p.grad is not None}
        elif self._needs_pass(params):
            if taps is not None and taps.folded and taps.noise_added:
                return  # the noise went into the gradient during the backward pass
            if taps is not None and taps.nonfinite:
                raise NonFiniteError(
                    f"{type(self.sampler).__name__}: this step's model outputs (logits) hold NaN "
                    "or inf (a float16 overflow?), so no noise can be drawn from them; use a "
                    "torch.amp.GradScaler (it skips such steps) or float32/bfloat16"
                )
            comm = active()
            batch = None
            if comm is not None and taps is not None and taps._finish is not None:
                # the ranks agree on the captured state or the separate pass (never one each)
                state, batch = self._agreed_state(taps, inputs, targets, comm)
            else:
                if taps is not None:
                    self._check_captured_apart(taps)
                state = taps.result() if taps is not None else None
            if state is None:
                if batch is None:
                    batch = self._separate_batch(taps, inputs, targets, comm)
                inputs, targets, loss_fn = batch
                state = self.sampler.estimate(self.model, loss_fn, inputs, targets, self.generator)
            if self.sampler.reusable:
                self._state, self._state_step = state, self.steps_taken
                self._state_params = signature(params)
                self._state_objects = _objects(params)
        else:
            state = self._state
        with without_autocast():  # a step inside the caller's autocast region draws in float32
            if getattr(self.sampler, "counts_receivers", False):
                # FisherTraceNoise: Tr(F) spread over the coordinates that get noise (a .grad
                # now), not over every trainable one: a layer the forward skipped (None .grad)
                # took its share of the total with it (43/58 of scale^2 Tr(F), review s23)
                receives = [n for n, p in params.items() if p.grad is not None]
                noise = self.sampler.draw(self.model, state, self.generator, receives=receives)
            else:
                noise = self.sampler.draw(self.model, state, self.generator)
        owned = self._owned()
        if not getattr(self, "_rounding_checked", False):
            # the first noisy step: is the noise rounded away in 16-bit .grad? (one host read,
            # that step only; what is added is not changed; review s27)
            self._rounding_checked = True
            warn_if_noise_lost(
                (p.grad, noise[n])
                for n, p in params.items()
                if p.grad is not None and id(p) in owned and n in noise and not self._fsdp2
            )
        for name, p in params.items():
            # only where this optimizer steps: a parameter another optimizer trains keeps its
            # gradient (the noise of the rest is the full draw's marginal, as documented)
            if p.grad is None or id(p) not in owned:
                continue
            eps = noise[name]
            if p.grad.is_sparse and not eps.is_sparse:
                # an Embedding(sparse=True): the noise reaches every row, not only the rows the
                # batch looked up, so the sum is dense (torch has no sparse + dense in place;
                # found in review s18: every such step raised add(sparse, dense))
                p.grad = p.grad.to_dense().add_(eps)
            else:  # FSDP2: this rank's part of the full draw (no communication)
                p.grad.add_(place_like(eps, p.grad) if self._fsdp2 else eps)

    def _agreed_state(
        self, taps: Taps, inputs: Any, targets: Any, comm: Comm
    ) -> tuple[Any, tuple[Any, Any, nn.Module] | None]:
        """Under torch.distributed, the captured state of all ranks' batches, or (on every rank,
        where some rank's capture cannot be used) ``None`` and the batch of the separate pass
        (:meth:`_separate_batch`). The ranks decide together, in the all-reduce that combines
        the captured states (:func:`reduce_captured`), and on the separate pass's path together
        again whether every rank can run it (a second all-reduce of one flag). Each rank deciding
        alone, one whose loss had another term on its data (a weight used outside its layer, a
        missed gradient, ...) went into the separate pass's collectives while the others waited
        in the all-reduce: a deadlock (found in review s19).

        Raises:
            RuntimeError: on every rank, where one rank's capture or its separate pass was
                refused (that rank raises its own error).
        """
        assert self.loss_fn is not None
        name = type(self.sampler).__name__
        error: Exception | None = None
        state = None
        try:
            self._check_captured_apart(taps)  # (this rank's batch; refused by all ranks below)
            state = taps.result()
        except Exception as exc:  # noqa: BLE001 - raised below, once the other ranks know
            error = exc
        has = state is not None
        layout = captured_layout(self.sampler, taps._params or trainable_params(self.model))
        agreed = reduce_captured(
            state,
            layout,
            loss_spec(self.loss_fn),
            taps.loss_output if has else None,
            taps.loss_target if has else None,
            taps.batch_size() if has else 0,
            comm,
            failed=error is not None,
        )
        if error is not None:
            raise error
        if agreed.failed:
            raise RuntimeError(
                f"{name}: the noise capture raised on {agreed.failed} other rank(s) of "
                f"{comm.size} (see that rank's error), so no rank draws noise this step"
            )
        if agreed.state is not None:
            return agreed.state, None
        # every rank measures in the separate pass: first all agree that each can
        batch = None
        try:
            batch = self._separate_batch(taps, inputs, targets, comm)
        except Exception as exc:  # noqa: BLE001 - raised below, once the other ranks know
            error = exc
        flag = torch.full((1,), float(error is not None), dtype=layout[1], device=layout[2])
        refused = round(float(comm.all_reduce_(flag)[0]))  # a host read, on this path only
        if error is not None:
            raise error
        if refused:
            raise RuntimeError(
                f"{name}: the separate curvature pass was refused on {refused} other rank(s) of "
                f"{comm.size} (see that rank's error), so no rank draws noise this step"
            )
        return None, batch

    def _keep_output(self, taps: Taps) -> Any:
        """A forward hook on the model keeping the step's output (detached) for
        :meth:`_check_captured_apart`, the batch pass of its check, where a per-example sampler
        measures in the step and the call's signature is not yet checked; ``None`` otherwise (its
        handle, else)."""
        if not self.sampler.per_example or taps._finish is None:
            return None

        def keep_call(module: nn.Module, args: Any, kwargs: Any) -> None:
            if not taps._active or taps.in_own_pass() or "apart_key" in taps.scratch:
                return
            # the key as the step's call began (a forward that changes its own plain
            # attributes, a call counter, would give another one at the block's end)
            key = taps.scratch["apart_key"] = _call_key(self.model, (args, kwargs))
            if key in self._apart:
                return  # checked: nothing kept, nothing copied
            # a copy of the inputs as the call received them: a forward that writes into its
            # input (x.div_(2)) left the recorded ones changed, and the check compared the
            # step's output with a pass on other inputs (a false refusal, review s24)
            taps.scratch["apart_call"] = fresh_call(args, kwargs)

        def keep(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not taps._active or taps.in_own_pass() or "apart_output" in taps.scratch:
                return
            if "apart_call" not in taps.scratch:
                return  # checked: nothing kept, nothing copied
            out = first_tensor(output)
            if isinstance(out, Tensor):  # a copy: the loop may change its output in place
                taps.scratch["apart_output"] = out.detach().clone()

        return _Handles(
            self.model.register_forward_pre_hook(keep_call, with_kwargs=True),
            self.model.register_forward_hook(keep, with_kwargs=True),
        )

    def _check_captured_apart(self, taps: Taps) -> None:
        """Refuse a captured step of a model that mixes the examples of its batch, before the
        captured state is used, as the separate pass and ``sample()`` refuse it.

        The per-example samplers read each example's gradient off the step's backward pass,
        which a model that mixes the examples (``F.batch_norm(x, None, None, training=True)``,
        ``z - z.mean(0)``, in-batch contrastive logits) does not have: found in review s24, the
        capture of a functional batch norm gave a diagonal of no definition (``0.0043`` where
        the per-example squares through the coupling give ``0.0031``) while ``sample()`` raised.
        The model's call as the step made it (recorded by the capture's forward pre-hook) runs
        again without gradient on two of its examples alone, compared with the step's own output
        (kept by :meth:`_keep_output`; else a pass on the batch without gradient)
        (:class:`~curvlab._layout.ExamplesApart`, RNG and buffers put back), where the capture
        block ends (at the parameters of the captured pass: a second optimizer stepping shared
        parameters first made the comparison fail, review s24), once per signature of the call (its tensors' shapes, dtypes and devices, the modules' train/eval modes):
        later steps of that signature read no value and synchronise nothing. A step that
        measures nothing here (the separate pass checks itself) is not checked.

        Raises:
            MixedExamplesError: naming where the examples mix and the way out; the step then
                leaves the optimizer, the noise generator and the cached state as they were.
            DifferentiatingForwardError: for a forward that calls the autograd engine (also
                only with gradient), as ``sample()`` (review s26, RX5-3), the step left alike.
        """
        found = taps.scratch.pop("apart_finding", _UNCHECKED)
        if found is _UNCHECKED:  # a block that did not reach its end's check
            found = self._apart_finding(taps)
        if isinstance(found, Exception):
            raise found
        if found is None:
            return
        key, why = found
        if why is not None:
            raise finding_error(why)
        self._apart.put(key, True)

    def _apart_finding(self, taps: Taps) -> tuple[Hashable, str | None] | None:
        """The check of :meth:`_check_captured_apart`, run where the capture block ends: the
        call's signature and what mixes (``None``: apart), or ``None`` where there is nothing to
        check (a signature checked before, a sampler that reads no example, no recorded call)."""
        kept = taps.scratch.pop("apart_call", None)  # the inputs as the step's call got them
        call = taps._call if kept is None else kept
        if not self.sampler.per_example or taps._finish is None or call is None:
            return None
        inputs = taps.model_input
        if inputs is None:
            return None
        key = taps.scratch.pop("apart_key", _UNCHECKED)
        if key is _UNCHECKED:  # no call seen by the pre-hook
            key = _call_key(self.model, call)
        if self._apart.get(key):  # (refreshed: least recently used first out)
            return None
        plain = strip_wrappers(self.model)
        # on copies of the buffers: a forward that updates them (running means, a call counter)
        # leaves them as the training forward left them; a forward that differentiates (also
        # only with gradient, which the check's passes lack: a misleading MixedExamplesError
        # before, review s26, RX5-3) is refused by name, as sample() refuses it
        with leave_no_trace(plain), buffers_kept(plain), derivatives_refused(plain, inputs):
            probe = ExamplesApart(plain, inputs, call=call, autocast=taps._autocast)
            # a model that fails on some examples alone though the step ran on the batch: the
            # capture's own layout checks decide (nothing to compare here)
            full = taps.scratch.pop("apart_output", None)  # the step's own pass, if kept
            why = (
                probe.check(probe.full_output() if full is None else full) if probe.picks else None
            )
        return key, why

    def _separate_batch(
        self, taps: Taps | None, inputs: Any, targets: Any, comm: Comm | None
    ) -> tuple[Any, Any, nn.Module]:
        """The batch and loss module of a separate curvature pass: ``inputs`` and ``targets``
        given to :meth:`step`, else those the capture recorded (raising where they cannot
        be told)."""
        assert self.loss_fn is not None
        name = type(self.sampler).__name__
        loss_fn = self.loss_fn
        if inputs is None and taps is not None and taps.calls and taps.loss_output is None:
            raise RuntimeError(
                f"{name}: the model ran inside the capture but the loss module given to "
                "NoisyOptimizer was never called there, so the step's targets (and ignored "
                "positions) are unknown. Compute the loss with that same module instance (not "
                "a copy, not F.cross_entropy) inside the capture, or call "
                "noisy.step(inputs=..., targets=...)"
            )
        if inputs is None and taps is not None:
            self._check_loss_calls(taps)
            check_left_out(taps.left_out, name)
            inputs = taps.model_input
            # the loss call's targets in the model output's order (a time-major flatten took
            # them time-major); raises if the loss input is no rearrangement of it
            targets = taps.step_targets(name)
            if taps.classes_last():  # (B*T, C) or (B, C, T) from (B, T, C): say so
                loss_fn = classes_last(self.loss_fn)
        if inputs is None:
            raise ValueError(
                f"{name} needs this step's batch: call step(inputs=..., targets=...), pass a "
                "closure, or run the forward and backward pass inside `with noisy.capture():`"
            )
        if comm is not None and targets is None:
            raise ValueError(
                f"{name} under torch.distributed needs the step's targets (step(inputs=..., "
                "targets=...)) to measure all ranks' batch"
            )
        return inputs, targets, loss_fn

    def _check_loss_calls(self, taps: Taps) -> None:
        """Refuse a separate pass on the captured batch when the loss module was called more than
        once inside the capture on different outputs, or on different targets that the sampler
        reads (its empirical kinds): the pass measures ``loss_fn(model(inputs), targets)``, and
        which call's is the objective cannot be told (mixup, one loss per head)."""
        differ = taps.loss_calls_differ
        if taps.loss_calls < 2 or differ is None:
            return
        if differ == "targets" and not self.sampler.reads_labels:
            return  # the Monte-Carlo kinds read the targets' shape and ignored positions only
        raise RuntimeError(
            f"{type(self.sampler).__name__}: the loss module was called {taps.loss_calls} times "
            f"inside the noise-capturing step, on different {differ} (mixup's lam * "
            "loss_fn(out, ya) + (1 - lam) * loss_fn(out, yb), one loss per head?). The captured "
            "curvature would mix the calls (the empirical Fisher of neither), and a separate "
            "pass of loss_fn(model(inputs), targets) cannot tell which call's targets to use. "
            "Call the loss module once per step inside the capture, or run your forward and "
            "backward outside it and call noisy.step(inputs=..., targets=...) with the targets "
            "whose curvature the noise should have"
        )

    def _owned(self) -> set[int]:
        """The ``id`` of every parameter the wrapped optimizer steps (its param groups now)."""
        return {id(p) for group in self.optimizer.param_groups for p in group["params"]}

    def _steps_every_parameter(self) -> bool:
        """Whether the wrapped optimizer steps all of the model's trainable parameters."""
        owned = self._owned()
        return all(id(p) in owned for p in trainable_params(self.model).values())

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state plus the noise generator, step count and cached curvature."""
        cached = None
        if self._state is not None:
            cached = self.sampler.state_to_dict(self._state)
        # a capture whose step never ran (a GradScaler skipped it) is undone by the next
        # capture(), which puts the generator back: save that state, so a resumed run draws
        # what the uninterrupted one draws
        pending = self._pending
        generator = (
            pending.rewind
            if pending is not None and not pending._active and pending.rewind is not None
            else self.generator.get_state()
        )
        return {
            "optimizer": self.optimizer.state_dict(),
            "steps_taken": self.steps_taken,
            "generator": generator,
            "sampler": self.sampler._state_tag(),  # what the cached state means
            "sampler_state": cached,
            "sampler_state_step": self._state_step,
            "sampler_state_params": self._state_params,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the run then continues bitwise as if uninterrupted.

        A state saved on another device type (a CUDA run resumed on CPU, or the other way) holds
        a generator state this one cannot take: load it with ``state["generator"] = None`` to
        go on with the noise generator seeded from ``seed`` (a ``generator=`` passed: its
        ``initial_seed()``) and the saved ``steps_taken``: other draws of the same noise, not
        the uninterrupted run's, and not the first steps' draws again.

        Raises:
            ValueError: before anything is loaded, for a generator state of another device type
                or one that is no generator state (naming both device types and the way out
                above; torch's own error named only the sizes after the optimizer's state and
                the step count were loaded, found in review s19), for a ``steps_taken`` that is
                no step count, for a torch optimizer's own ``state_dict()``
                (``"state"`` and ``"param_groups"``; load that into the wrapped optimizer,
                ``noisy.optimizer.load_state_dict(state)``, and the noise starts fresh), for a
                state without one of :meth:`state_dict`'s entries, for the state of another
                model (a parameter the cached curvature was measured for that this model does
                not have or has in another shape, or a moment of the wrapped optimizer of
                another shape than the parameter it would go to: named with both shapes; the
                next step raised torch's size error, found in review s24; parameters frozen
                or unfrozen since are no difference), for a state saved with
                another sampler (its class or kind, ``state_dict["sampler"]``), or, in a
                checkpoint from before that entry existed, a cached state that is not this
                sampler's (types, keys, shapes).
                Two kinds of one sampler cache states of the same shape, so only the entry
                tells them apart. To go on with another sampler on purpose, drop the saved
                one's entries: ``load_state_dict({**state, "sampler": None,
                "sampler_state": None})`` (the curvature is then measured anew).
        """
        if self._pending is not None and self._pending._active:
            raise RuntimeError(
                "load_state_dict() inside an open capture(): close it first (one left open "
                "by a step that raised inside it: noisy.abort_capture())"
            )
        _check_noisy_state(state_dict)
        _check_same_model(self.optimizer, self.model, state_dict)
        check_saved_sampler(self.sampler, self.model, state_dict)
        # everything is checked and converted first, so that a refused state changes nothing
        # (found in review s19: a CUDA generator's state loaded the optimizer's moments and the
        # step count, then failed with torch's size error)
        steps = state_dict["steps_taken"]
        if (
            isinstance(steps, Tensor)
            and steps.numel() == 1
            and not steps.is_floating_point()
            and steps.dtype != torch.bool
        ):
            steps = int(steps)  # a checkpoint format that stores numbers as tensors
        if not (is_int(steps) and int(steps) >= 0):
            raise ValueError(
                f"NoisyOptimizer.load_state_dict: its 'steps_taken' is {steps!r}, not a step "
                "count (pass the dict of NoisyOptimizer.state_dict())"
            )
        steps = int(steps)
        # checked on a scratch generator, so that a refused one changes nothing; None: seeded
        # from the seed and the step count (another stream of the same noise, never the first
        # steps' draws again)
        generator = generator_state(
            self.generator.device,
            state_dict["generator"],
            self._seed,
            steps,
            "NoisyOptimizer",
            salt="noise",
            wording=_WORDING,
        )
        saved = state_dict["sampler_state"]
        cached = None if saved is None else self.sampler.state_from_dict(saved, self.model)
        # the parameter objects are not saved: those of the model now, so that a resumed run
        # reuses the state as the uninterrupted one does (bitwise); a signature of other
        # parameters is measured anew at the next step anyway
        objects = _objects(trainable_params(self.model))
        measured = state_dict.get("sampler_state_params")  # absent in older checkpoints: taken
        if cached is not None and measured is None:  # to be the trainable parameters now
            measured = signature(trainable_params(self.model))
        params = None if measured is None else tuple((n, tuple(shape)) for n, shape in measured)
        # torch checks the optimizer's state (its groups and their sizes) before it loads it
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._pending = None  # a capture whose step never ran belongs to the state left behind
        self.steps_taken = steps
        self.generator.set_state(generator)
        self._state, self._state_step = cached, state_dict["sampler_state_step"]
        self._state_params, self._state_objects = params, objects

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` (``torch.save(noisy)``) copy: the attributes,
        the weak references to the parameter objects of the cached state made strong, so that
        a copy made with its model maps them onto the copied parameters (a weak reference
        cannot be pickled, and a deep copy kept the original's: the copy measured anew at its
        next step, found in review s24). The captured-step check's memo is not copied: its keys
        hold the model weakly (they cannot be pickled) and are the original's alone; the copy
        checks its model's calls anew (once per signature)."""
        state = self.__dict__.copy()
        state["_apart"] = SignatureMemo(self._apart.size)
        objects = state["_state_objects"]
        if objects is not None:
            strong = tuple(ref() for ref in objects)
            # a parameter freed since is no parameter of the model: measured anew, as here
            state["_state_objects"] = None if any(p is None for p in strong) else strong
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore :meth:`__getstate__`'s attributes, the parameter objects as weak references
        again."""
        objects = state.get("_state_objects")
        if objects is not None:
            state = {**state, "_state_objects": tuple(weakref.ref(p) for p in objects)}
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"NoisyOptimizer({type(self.optimizer).__name__}, {self.sampler!r}, "
            f"stop_step={self.stop_step}, recompute_every={self.recompute_every})"
        )


class _CaptureBlock:
    """The block :meth:`NoisyOptimizer.capture` returns: its entry and exit run eagerly, also
    inside a ``torch.compile``d training step, and so does the block itself on the steps that
    capture curvature.

    Called from code that dynamo traces (a compiled whole step), ``__enter__`` and ``__exit__``
    are graph breaks (``torch.compiler.disable(recursive=False)``: their own frames are never
    traced). On a step that captures curvature, ``__enter__`` turns dynamo's frame evaluation
    off until ``__exit__`` (torch's own ``torch.compiler.disable`` does that around a call), so
    the user's forward and backward run eagerly with the capture's hooks, as in the eager loop:
    ``torch.compiler.set_stance("force_eager")``, which the capture uses from eager code
    (:func:`curvlab._compiled.eager_code`), cannot be set inside a compiled region, and compiled
    code does not guard on module hooks (a block compiled on a step without them would skip them
    on a capturing step). Traced, the capture's hooks crashed dynamo (``NameError:
    ___tuple_iterator_getitem`` in the backward pass's roots check), and ``step(closure)`` with
    :class:`FullFisherNoise` drew its fold's labels without adding its noise, then drew again
    (found in review s21). On the other steps frame evaluation stays as it is (a compiled model
    called in the block runs compiled).

    Both methods call nothing in Python before the frame evaluation is off: a Python function
    called from a non-recursively disabled frame is traced.
    """

    __slots__ = ("_block", "_loss_factor", "_noisy", "_prior")

    def __init__(self, noisy: NoisyOptimizer, loss_factor: float | None) -> None:
        self._noisy = noisy
        self._loss_factor = loss_factor
        self._block: AbstractContextManager[None] | None = None
        self._prior: Any = None

    @torch.compiler.disable(recursive=False)
    def __enter__(self) -> None:
        # the callback of the compiled region this block was opened in (None from eager code)
        prior = _set_eval_frame(None)
        try:
            block = self._noisy._capture(self._loss_factor)
            block.__enter__()
        except BaseException:
            if prior is not None:
                _set_eval_frame(prior)
            raise
        self._block = block
        self._noisy._open_block = self  # (until __exit__ or abort_capture())
        if prior is not None and self._noisy._pending is None:
            _set_eval_frame(prior)  # nothing captured: the block runs as dynamo runs it
            prior = None
        self._prior = prior

    @torch.compiler.disable(recursive=False)
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        now = _set_eval_frame(None)  # None where __enter__ turned it off
        prior = self._prior if self._prior is not None else now
        block, self._block, self._prior = self._block, None, None
        if self._noisy._open_block is self:
            self._noisy._open_block = None
        try:
            return bool(block is not None and block.__exit__(exc_type, exc, tb))
        finally:
            if prior is not None:
                _set_eval_frame(prior)

    def _abort(self) -> None:
        """Close the block as an exception inside it would (:meth:`NoisyOptimizer.abort_capture`),
        from eager code: dynamo's frame evaluation is left as it is (where ``__enter__`` turned
        it off inside a compiled region, that region's exit restored it)."""
        block, self._block, self._prior = self._block, None, None
        if block is not None:
            error = _CaptureAborted("noisy.abort_capture()")
            block.__exit__(_CaptureAborted, error, None)


class _CaptureAborted(Exception):
    """Thrown into an open capture block by :meth:`NoisyOptimizer.abort_capture` (never raised
    out of it)."""


_WORDING = StateWording(
    not_tensor=(
        "NoisyOptimizer.load_state_dict: its 'generator' is a {kind}, not a generator state "
        "tensor (pass the dict of NoisyOptimizer.state_dict(), or "
        'state["generator"] = None to seed the noise from seed and steps_taken)'
    ),
    other_device=(
        "NoisyOptimizer.load_state_dict: its 'generator' is {got}{origin}, but this "
        "NoisyOptimizer draws its noise on {here} (a {size}-byte state; torch: {exc}). Nothing "
        "was loaded. Resume on the device type the state was saved on for the uninterrupted "
        "run's noise; or load it with "
        'state["generator"] = None to continue here: the noise '
        "generator is then seeded from seed (a generator= passed: its initial_seed()) and the "
        "saved steps_taken (other draws of the same noise distribution)"
    ),
)
"""How :meth:`NoisyOptimizer.load_state_dict` words a refused generator state (a CUDA
generator's state is 16 bytes, a CPU one's thousands: torch's error only named the sizes, found
in review s19)."""


class _Handles:
    """Hook handles removed together (:meth:`NoisyOptimizer._keep_output`)."""

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


_UNCHECKED = object()
"""No examples-apart finding stored by the capture block (:meth:`NoisyOptimizer._check_captured_apart`)."""


def _call_key(model: nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]]) -> Hashable:
    """The signature of a captured model call (:meth:`NoisyOptimizer._check_captured_apart`):
    the model (held weakly), its modules' names, classes, train/eval modes and plain attributes
    (:func:`~curvlab.backends._choice.modules_signature`, as the backend-choice memo: a
    ``self.mix`` flipped after a first step was not in it and the check was skipped, noise drawn
    from undefined per-example diagonals; review s26, RX5-1), and each argument's shape, dtype
    and device (its type for a non-tensor). Read on the host alone; ``None`` (never remembered)
    where an attribute's value cannot be hashed."""

    def sig(v: Any) -> Hashable:
        if isinstance(v, Tensor):
            return (tuple(v.shape), v.dtype, v.device)
        return type(v)

    args, kwargs = call
    key = (
        Held(model),
        modules_signature(model.named_modules()),
        tuple(sig(a) for a in args),
        tuple((k, sig(v)) for k, v in kwargs.items()),
    )
    try:
        hash(key)
    except TypeError:  # an enum member or function object that refuses hashing
        return None
    return key


def _objects(params: dict[str, nn.Parameter]) -> tuple[weakref.ref[nn.Parameter], ...]:
    """Weak references to ``params``, in order: the objects a cached state was measured for (a
    weak reference, unlike an ``id``, does not take a new parameter at a freed one's address
    for it)."""
    return tuple(weakref.ref(p) for p in params.values())


def _same_objects(
    objects: tuple[weakref.ref[nn.Parameter], ...] | None, params: dict[str, nn.Parameter]
) -> bool:
    """Whether ``params`` are, in order, the very objects of ``objects`` (:func:`_objects`)."""
    if objects is None or len(objects) != len(params):
        return False
    return all(ref() is p for ref, p in zip(objects, params.values()))


_REPLACED_ON_RANK = (
    "NoisyOptimizer: the trainable parameters are other objects (of the same names and shapes) "
    "than those its cached curvature was measured for: a layer replaced or re-initialised by a "
    "new nn.Parameter, or load_state_dict(..., assign=True), on this rank. Under a process group "
    "of several ranks that is this rank's alone to see (the ranks decide together whether a step "
    "measures), so the cached curvature is used until the next scheduled re-measurement "
    "(recompute_every). Replace layers on every rank alike; to measure anew at the next step, "
    "on every rank: noisy.load_state_dict({**noisy.state_dict(), 'sampler_state': None})"
)
"""The warning of :meth:`NoisyOptimizer._needs_pass` for parameter objects replaced under a
process group of several ranks (found in review s24: a rank measuring anew alone waited in the
all-reduce of the captured state for the others)."""


_SAVED = ("optimizer", "steps_taken", "generator", "sampler_state", "sampler_state_step")
"""The entries of :meth:`NoisyOptimizer.state_dict` every checkpoint has (``"sampler"`` and
``"sampler_state_params"`` came later: older checkpoints load without them)."""


_ELEMENTWISE = frozenset(
    {
        "momentum_buffer",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "square_avg",
        "acc_delta",
        "grad_avg",
        "sum",
        "ax",
        "prev",
        "step_size",
        "variance",
    }
)
"""The per-parameter state of ``torch.optim``'s optimizers that has each parameter's shape
(:func:`_check_same_model`; ``Adafactor``'s factored ``row_var``/``col_var`` and scalar counts
have other shapes by design)."""


def _shown(items: list[str], most: int = 6) -> str:
    """``items`` joined, the first ``most`` of them and how many more."""
    more = f"; and {len(items) - most} more" if len(items) > most else ""
    return "; ".join(items[:most]) + more


def _check_same_model(
    optimizer: torch.optim.Optimizer, model: nn.Module, state_dict: Mapping[str, Any]
) -> None:
    """Refuse the state of another model before anything is loaded: the trainable parameters'
    names and shapes the cached curvature was measured for (``"sampler_state_params"``) against
    this model's parameters, and the shapes of the wrapped optimizer's saved per-parameter
    moments against the parameters its groups hold now (torch compares only how many each
    group has).

    A state of another model (hidden width 4 loaded into width 5) loaded whole, and the next
    step raised torch's size error inside the optimizer, after the curvature pass and the
    noise draw (found in review s24). Names the saved state has trainable and this model holds
    frozen, or the other way (progressive unfreezing), are not differences: the curvature is
    then measured anew at the next step. A state without the entry (an older checkpoint) is
    compared by its optimizer's moments alone.

    Raises:
        ValueError: naming each parameter whose saved shape differs from this model's, or that
            this model does not have.
    """
    here = dict(model.named_parameters())
    wrong: list[str] = []
    measured = state_dict.get("sampler_state_params")
    if isinstance(measured, (list, tuple)):
        for entry in measured:
            name, shape = entry[0], tuple(entry[1])
            if name not in here:
                wrong.append(f"{name}: saved {shape}, no such parameter here")
            elif tuple(here[name].shape) != shape:
                wrong.append(f"{name}: saved {shape}, here {tuple(here[name].shape)}")
    wrong += _optimizer_shapes(optimizer, model, state_dict.get("optimizer"))
    if not wrong:
        return
    raise ValueError(
        "NoisyOptimizer.load_state_dict: the state is another model's (or this model's layers "
        f"were resized since it was saved): {_shown(wrong)}. Nothing was loaded: the wrapped "
        "optimizer's moments and the cached curvature would not fit these parameters (the next "
        "step failed inside the optimizer). Load the state saved with this model, built as "
        "then; to start this model's noise and optimizer afresh, do not load it"
    )


def _optimizer_shapes(optimizer: torch.optim.Optimizer, model: nn.Module, saved: Any) -> list[str]:
    """The saved per-parameter moments of a ``torch.optim`` optimizer (:data:`_ELEMENTWISE`)
    whose shapes differ from the parameters they would be loaded onto, paired as
    ``Optimizer.load_state_dict`` pairs them (group by group, in order); nothing where torch's
    own checks refuse the state (other group sizes) or the optimizer is another library's."""
    if not type(optimizer).__module__.startswith("torch.optim"):
        return []
    if not isinstance(saved, Mapping):
        return []
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        return []
    if len(groups) != len(optimizer.param_groups):
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    wrong = []
    for saved_group, group in zip(groups, optimizer.param_groups):
        ids = saved_group.get("params") if isinstance(saved_group, Mapping) else None
        if not isinstance(ids, (list, tuple)) or len(ids) != len(group["params"]):
            return []  # torch's own error names the group sizes
        for key, p in zip(ids, group["params"]):
            entry = state.get(key)
            if not isinstance(entry, Mapping):
                continue
            for what, value in entry.items():
                if (
                    what in _ELEMENTWISE
                    and isinstance(value, Tensor)
                    and value.dim() > 0
                    and tuple(value.shape) != tuple(p.shape)
                ):
                    name = names.get(id(p), "a tensor outside the model")
                    wrong.append(
                        f"{name}: the optimizer's saved {what!r} {tuple(value.shape)}, the "
                        f"parameter here {tuple(p.shape)}"
                    )
                    break
    return wrong


def _check_noisy_state(state_dict: Any) -> None:
    """Refuse what is not a :meth:`NoisyOptimizer.state_dict` before anything is loaded: a torch
    optimizer's own state (a checkpoint from before the noise was switched on gave a bare
    ``KeyError('optimizer')``), or a state without one of its entries."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "NoisyOptimizer.load_state_dict takes the dict of NoisyOptimizer.state_dict(), got "
            f"{type(state_dict).__name__}"
        )
    missing = [key for key in _SAVED if key not in state_dict]
    if not missing:
        return
    if "state" in state_dict and "param_groups" in state_dict:
        raise ValueError(
            "NoisyOptimizer.load_state_dict: this is a torch optimizer's own state_dict() (its "
            "entries 'state' and 'param_groups'), not a NoisyOptimizer's, which holds one under "
            "'optimizer' beside the noise generator, step count and cached curvature. To go on "
            "from it, load it into the wrapped optimizer: noisy.optimizer.load_state_dict(state) "
            "(the noise then starts fresh: its generator as seeded, steps_taken 0 for "
            "stop_after/stop_fraction, the curvature measured at the next step). The other way, "
            "a plain optimizer takes noisy.state_dict()['optimizer']"
        )
    raise ValueError(
        f"NoisyOptimizer.load_state_dict: the state has no {', '.join(map(repr, missing))} "
        f"(it has {', '.join(map(repr, state_dict)) or 'nothing'}); pass the dict of "
        "NoisyOptimizer.state_dict()"
    )


def _check_sparse_only(
    optimizer: torch.optim.Optimizer, sampler: NoiseSampler, model: nn.Module
) -> None:
    """Refuse an optimizer that takes sparse gradients only (``torch.optim.SparseAdam``) with a
    sampler whose noise is dense: :meth:`NoisyOptimizer.step` adds it to every row of an
    ``Embedding(sparse=True)``'s gradient, which makes that gradient dense, and such an optimizer
    would raise at every step (after the curvature pass and the draw). ``MultiplicativeNoise``
    scales the gradient itself, so its noise is sparse where the gradient is."""
    if not isinstance(optimizer, torch.optim.SparseAdam) or sampler.uses_gradient:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = [n for n, p in trainable_params(model).items() if id(p) in stepped]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise TypeError(
        f"NoisyOptimizer cannot wrap {type(optimizer).__name__} with {type(sampler).__name__}: "
        f"it takes sparse gradients only, and the noise added to the gradient of {shown} is "
        "dense (it reaches every row of an Embedding(sparse=True), not only the rows the batch "
        "looked up), so every step would fail. Step these parameters with an optimizer that "
        "takes dense gradients (torch.optim.Adam, SGD: NoisyOptimizer adds the noise to a sparse "
        "gradient as a dense one), or use MultiplicativeNoise, which keeps the gradient's rows"
    )
