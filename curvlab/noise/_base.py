"""The shared interface of curvlab's noise samplers and Wen et al.'s scale rule.

Every sampler draws a random perturbation ``eps`` shaped like the model's trainable parameters
(``dict`` name -> Tensor, keyed as in ``model.named_parameters()``) with mean zero and a documented
covariance, usually ``scale**2 * F`` for some curvature matrix ``F`` of the objective ``L`` on the
batch (:mod:`curvlab._losses`: ``L = w * sum_n NLL_n`` with ``w = 1/(N c)`` under ``"mean"`` and
``w = 1`` under ``"sum"``). Added to the gradient, it turns large-batch SGD into Wen et al.'s
Eq. 2, ``theta <- theta - lr * (grad L + eps)``.

``scale`` is either given directly or derived from the batch sizes with Wen et al.'s Eq. 5/6 rule
``scale = sqrt((M_L - M_S) / (M_L * M_S))``: the gradient of a small batch of ``M_S`` examples has
(approximately, with the empirical Fisher standing in for the gradient covariance) the covariance
of the large-batch gradient plus ``scale**2 * F``. The rule is for ``reduction="mean"``: under
``"sum"`` the gradient and ``F`` carry the batch's size, and the rule's noise is about
``sqrt(M_L)`` times too small against that gradient; pass ``scale=`` there (docs/noise.md).

A sampler splits its work in two, so that curvature can be measured once and reused for ``k`` steps:

* ``estimate(model, loss_fn, inputs, targets, generator)`` measures what the noise needs (a
  diagonal, K-FAC factors, ...) in a pass of its own (through the engine, :func:`curvlab.diag_fisher`
  or :func:`curvlab.kfac`, for the curvature samplers) and leaves no trace on the model;
* ``draw(model, state, generator)`` turns that state into one sample (cheap, on the device, no host
  synchronisation).

``sample(...)`` is both in one call. Samplers whose curvature can come out of the user's own backward
pass also offer ``capture(model, loss_fn, generator)``, a context manager wrapped around the user's
forward and backward (see :class:`curvlab.noise.NoisyOptimizer`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvlab._compiled import strip_wrappers
from curvlab._data import check_batch_shapes, check_has_examples
from curvlab._losses import LossSpec, loss_spec
from curvlab._numbers import is_real
from curvlab._own_pass import own_pass
from curvlab._precision import without_autocast
from curvlab._rng import make_generator
from curvlab._scan import model_device
from curvlab._selection import refuse_complex, refuse_complex_model
from curvlab._vocabulary import sampler_kind
from curvlab.noise._capture import ConfirmedLayouts

__all__ = [
    "NoiseSampler",
    "KindedSampler",
    "check_supported",
    "sampler_model",
    "wen_scale",
    "trainable_params",
]

State = Any


def wen_scale(large_batch: int, small_batch: int) -> float:
    """Wen et al.'s noise scale ``sqrt((M_L - M_S) / (M_L * M_S))`` (Eqs. 5 and 6).

    Args:
        large_batch: ``M_L``, the batch size actually trained with.
        small_batch: ``M_S``, the batch size whose gradient noise is imitated (``<= M_L``).

    Example:
        >>> round(wen_scale(4096, 128), 6)
        0.086996
    """
    for label, value in (("large_batch", large_batch), ("small_batch", small_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if small_batch > large_batch:
        raise ValueError(
            f"small_batch ({small_batch}) must not exceed large_batch ({large_batch}): the noise "
            "imitates the extra gradient noise of a smaller batch"
        )
    return math.sqrt((large_batch - small_batch) / (large_batch * small_batch))


def resolve_scale(scale: float | None, large_batch: int | None, small_batch: int | None) -> float:
    """``scale`` itself, or :func:`wen_scale` of the batch sizes; exactly one way must be used."""
    sizes = (large_batch, small_batch)
    if scale is not None:
        if any(s is not None for s in sizes):
            raise ValueError("pass either scale= or large_batch=/small_batch=, not both")
        if not is_real(scale) or scale < 0:
            raise ValueError(f"scale must be a finite float >= 0, got {scale!r}")
        return float(scale)
    if any(s is None for s in sizes):
        raise ValueError(
            "give the noise scale: scale=<float>, or both large_batch= and small_batch= for "
            "Wen et al.'s sqrt((M_L - M_S) / (M_L * M_S))"
        )
    return wen_scale(large_batch, small_batch)  # type: ignore[arg-type]


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """``name -> parameter`` for the trainable parameters, in ``named_parameters()`` order.

    Raises:
        ValueError: if nothing is trainable.
        TypeError: for a complex parameter (:func:`~curvlab._selection.refuse_complex`: the
            samplers' noise and Fisher are those of real coordinates; review s27).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    refuse_complex(params, has_params=False)
    return params


def check_kind(kind: str, allowed: tuple[str, ...], owner: str) -> str:
    """Validate a ``kind=`` argument."""
    if kind not in allowed:
        raise ValueError(f"{owner}: kind must be one of {allowed}, got {kind!r}")
    return kind


def check_batch(inputs: object, targets: object, needs_targets: bool) -> None:
    """Raise a clear error for inputs/targets that are not tensors (or a dict of tensors), and
    for a batch that is empty, has no batch axis or whose inputs and targets differ in number,
    with the messages the data's batches get everywhere else (:func:`curvlab._data.iter_batches`;
    a sampler's separate pass said "every target is ignore_index" or raised an ``IndexError``
    from inside the loss on an empty batch: review s26). No host read (finiteness is not
    checked here)."""
    if not (
        isinstance(inputs, Tensor)
        or (
            isinstance(inputs, dict)
            and inputs
            and all(isinstance(v, Tensor) for v in inputs.values())
        )
    ):
        raise TypeError(
            f"inputs must be a Tensor or a dict of Tensors, got {type(inputs).__name__}"
        )
    if needs_targets and not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor for this sampler, got {type(targets).__name__}")
    if isinstance(targets, Tensor):
        check_batch_shapes(inputs, targets)  # type: ignore[arg-type]
    else:
        check_has_examples(inputs, "batch 0 of data")


class NoiseSampler:
    """Base class: a random perturbation of the gradient with a documented covariance.

    Subclasses implement :meth:`estimate` and :meth:`draw` (and optionally :meth:`capture`).
    Their ``model`` argument arrives unwrapped: a ``torch.compile``, DDP or ``DataParallel``
    wrapper is replaced by the module it wraps (:func:`curvlab._compiled.strip_wrappers`), so
    states and draws are keyed by the user's parameter names and separate passes run the
    original module eagerly (docs/training-loops.md).

    Attributes:
        scale: the factor ``scale`` of the covariance ``scale**2 * F``.
        uses_curvature: whether :meth:`estimate` needs a batch (False for data-free noise).
        reusable: whether the state of :meth:`estimate` may be reused for several draws (False
            where every draw needs its own backward pass, e.g. :class:`FullFisherNoise`).
        uses_gradient: whether :meth:`draw` reads the current ``.grad`` (multiplicative noise).
        folds: whether :meth:`capture` adds the noise inside the step's backward pass (so to
            every parameter's gradient) instead of leaving it to :meth:`draw`.
        per_example: whether the curvature is built from per-example quantities, which a
            BatchNorm in train mode makes undefined (refused before a step that measures it).
    """

    uses_curvature: ClassVar[bool] = True
    reusable: ClassVar[bool] = True
    uses_gradient: ClassVar[bool] = False
    folds: ClassVar[bool] = False
    per_example: ClassVar[bool] = True
    adds_over_ranks: ClassVar[bool] = False
    """Whether the curvature state of the ranks' shards combines exactly into that of all the data
    (diagonals, traces: sums do; square-root factors and per-example vectors do not)."""
    fsdp2: ClassVar[bool] = False
    """Whether the sampler runs on an FSDP2 (``fully_shard``) model: its state comes from
    :func:`curvlab.diag_fisher`'s FSDP2 route (or it needs none) and its draws are full tensors,
    identical on every rank, that each rank places like its sharded gradients
    (:func:`curvlab._fsdp.place_like`; checked by :func:`sampler_model`). Not inherited: a
    subclass (which may change ``estimate`` or ``draw``) sets it itself."""

    def __init__(
        self,
        *,
        scale: float | None = None,
        large_batch: int | None = None,
        small_batch: int | None = None,
    ) -> None:
        self.scale = resolve_scale(scale, large_batch, small_batch)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Hand every subclass's model-taking methods the module inside any wrapper."""
        super().__init_subclass__(**kwargs)
        if "fsdp2" not in cls.__dict__:  # each class vouches for FSDP2 itself, never inherits it
            cls.fsdp2 = False
        for name in _MODEL_METHODS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_unwraps_model", False):
                setattr(cls, name, _unwrapping(method))

    @property
    def reads_labels(self) -> bool:
        """Whether the state depends on the targets' values, not only on their shape and ignored
        positions (the empirical kinds; the Monte-Carlo and exact kinds draw or integrate labels)."""
        return False

    def layouts(self) -> ConfirmedLayouts:
        """The layer layouts a capture confirmed (``Taps(layouts=)``), per model: a forward pass
        on one or two examples per model, input signature and arrangement of the tapped layers'
        inputs and outputs, not per step (:class:`~curvlab.noise._capture.ConfirmedLayouts`;
        ``layouts().clear()`` makes the next capture of each model probe again)."""
        return self.__dict__.setdefault("_confirmed_layouts", ConfirmedLayouts())

    # ------------------------------------------------------------------ interface
    def estimate(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor | None,
        generator: torch.Generator,
    ) -> State:
        """Measure what :meth:`draw` needs on one batch (own passes, no trace left)."""
        return None

    def draw(self, model: nn.Module, state: State, generator: torch.Generator) -> dict[str, Tensor]:
        """One sample from the state of :meth:`estimate`."""
        raise NotImplementedError

    def capture(
        self, model: nn.Module, loss_fn: nn.Module, generator: torch.Generator
    ) -> Any | None:
        """A context manager that measures the state during the user's own forward/backward.

        Returns ``None`` where the sampler cannot do so; then a separate :meth:`estimate` pass is
        needed.
        """
        return None

    def sample(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        *,
        process_group: Any = None,
    ) -> dict[str, Tensor]:
        """Measure the curvature on ``(inputs, targets)`` and draw one sample.

        Args:
            model: the network; left exactly as it was (parameters, ``.grad``, mode, hooks,
                global RNG).
            loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
            inputs: the batch's inputs.
            targets: the batch's targets (labels are only read by the empirical kinds).
            generator: a ``torch.Generator`` on the model's device (else one from ``seed``).
            seed: used when no generator is given (``None`` means 0).
            process_group: under ``torch.distributed`` the batch is this rank's shard and the
                curvature that of all shards; pass the same seed on every rank for one shared
                draw (``"local"``: this rank alone; see docs/distributed.md).

        Returns:
            ``dict`` name -> Tensor shaped like each trainable parameter (the wrapped module's
            names for a DDP-wrapped model). On an FSDP2 (``fully_shard``) model, with each rank
            passing its shard of the batch (:class:`DiagFisherNoise`, :class:`FisherTraceNoise`,
            :class:`IsotropicNoise`), the draws are plain tensors of each parameter's *full*
            shape, identical on every rank (with the same seed), keyed by the user's names; place
            one like its parameter ``p`` with ``distribute_tensor(eps[name], p.device_mesh,
            p.placements, src_data_rank=None)`` (no communication; docs/distributed.md, "FSDP2").
        """
        from curvlab.distributed import active, group_scope

        model, _ = sampler_model(
            self, model, process_group, f"{type(self).__name__}.sample", in_step=False
        )
        if self.uses_curvature:
            loss_spec(loss_fn)
        with group_scope(process_group):
            if active() is not None and self.uses_curvature:
                check_supported(self)
                if self.uses_gradient:
                    raise NotImplementedError(
                        f"{type(self).__name__}.sample would use this rank's gradient only under "
                        "torch.distributed; use NoisyOptimizer, which reads the DDP-averaged "
                        "gradient, or pass process_group='local'"
                    )
                if targets is None:
                    raise ValueError(
                        f"{type(self).__name__}.sample under torch.distributed needs targets= "
                        "(the curvature of all ranks' batches is measured with them)"
                    )
            gen = make_generator(seed=seed, generator=generator, device=model_device(model))
            state = (
                self.estimate(model, loss_fn, inputs, targets, gen) if self.uses_curvature else None
            )
            with without_autocast():  # a float32 draw inside the caller's autocast region
                return self.draw(model, state, gen)

    # ------------------------------------------------------------------ caching
    def state_to_dict(self, state: State) -> Any:
        """A ``torch.save``-able copy of a state (default: the state itself, tensors cloned)."""
        return _clone(state)

    def state_from_dict(self, saved: Any, model: nn.Module) -> State:
        """The inverse of :meth:`state_to_dict`, with tensors moved to the model's device."""
        return _to(saved, model_device(model))

    def _state_tag(self) -> dict[str, str]:
        """What gives a cached state its meaning, saved with it by ``NoisyOptimizer.state_dict``:
        the sampler's class and, where it has kinds, its kind (the scale is applied at the draw
        and is not part of it)."""
        tag = {"class": type(self).__name__}
        kind = getattr(self, "kind", None)
        if isinstance(kind, str):
            tag["kind"] = kind
        return tag

    def _saved_problem(self, saved: Any, model: nn.Module) -> str | None:
        """Why ``saved`` (from :meth:`state_to_dict`) cannot be this sampler's cached state for
        ``model``'s trainable parameters now, or ``None``. Only the structure is read (types,
        keys, shapes; no values). The base class knows only that samplers which cache nothing
        (data-free, or a new draw every step) have no state; a subclass with a state of its own
        checks it."""
        if saved is not None and (not self.uses_curvature or not self.reusable):
            return f"{describe_saved(saved)}, but {type(self).__name__} caches no state"
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale:.6g})"


_MODEL_METHODS = ("estimate", "draw", "capture", "sample")


def _unwrapping(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method(self, model, ...)`` called with ``model`` out of its compile/DDP wrappers; an
    ``estimate`` (a pass of the sampler's own) marked as curvlab's own pass
    (:mod:`curvlab._own_pass`), so a noise capture open around it (``sampler.sample`` inside
    ``noisy.capture()`` or a closure) leaves it alone and stays the step's, exact."""
    own = method.__name__ == "estimate"

    @functools.wraps(method)
    def call(self: NoiseSampler, model: Any, *args: Any, **kwargs: Any) -> Any:
        model = strip_wrappers(model)
        if isinstance(model, nn.Module):  # before any work, for every sampler (review s27)
            refuse_complex_model(model)
        if not own or not isinstance(model, nn.Module):
            return method(self, model, *args, **kwargs)
        with own_pass(model.parameters()):
            return method(self, model, *args, **kwargs)

    call._unwraps_model = True  # type: ignore[attr-defined]
    return call


def describe_saved(saved: Any) -> str:
    """A short description of a saved state's structure, for error messages."""
    if isinstance(saved, Tensor):
        return f"a tensor of shape {tuple(saved.shape)}"
    if isinstance(saved, dict):
        keys = list(saved)
        more = f", ... ({len(keys)} in all)" if len(keys) > 4 else ""
        return f"a dict with keys {', '.join(repr(k) for k in keys[:4])}{more}"
    return f"a {type(saved).__name__}"


def diagonal_problem(
    saved: Any, params: dict[str, nn.Parameter], what: str, every: bool = True
) -> str | None:
    """Why ``saved`` is not a ``name -> Tensor`` dict shaped like each of ``params`` (a Fisher
    diagonal over those trainable parameters; ``every=False``: over some of them), or ``None``;
    ``what`` names the expected state."""
    if not isinstance(saved, dict) or not all(isinstance(v, Tensor) for v in saved.values()):
        return f"{describe_saved(saved)}, not {what}"
    missing = [n for n in params if n not in saved] if every else []
    extra = [n for n in saved if n not in params]
    if missing or extra:
        return (
            f"{describe_saved(saved)}, not {what}: missing {missing[:4]}, not parameters of the "
            f"model {extra[:4]}"
        )
    for n, p in params.items():
        if n in saved and tuple(saved[n].shape) != tuple(p.shape):
            return (
                f"{what} whose entry {n!r} has shape {tuple(saved[n].shape)}, not the "
                f"parameter's {tuple(p.shape)}"
            )
    return None


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def batch_targets(
    model: nn.Module, loss_fn: nn.Module, inputs: Any, targets: Tensor | None, owner: str
) -> Tensor:
    """``targets`` or, for the Monte-Carlo kinds called without them, stand-in targets that
    ignore nothing (only their shape is read: the labels are drawn from the model).

    Raises:
        ValueError: for cross-entropy outputs with sequence or spatial axes, whose class axis
            (1, or the last in the GPT layout) only the targets can tell.
    """
    if targets is not None:
        return targets
    from curvlab._data import call_model

    with torch.no_grad():
        output = call_model(model, inputs)
    return stand_in_targets(loss_spec(loss_fn), output, owner)


def stand_in_targets(spec: LossSpec, output: Any, owner: str) -> Tensor:
    """Targets shaped for the model ``output`` that ignore nothing (see :func:`batch_targets`)."""
    if not isinstance(output, Tensor):
        raise TypeError(f"{owner}: the model returned {type(output).__name__}, not a Tensor")
    if spec.kind != "cross_entropy":
        return torch.zeros_like(output)
    if output.ndim != 2:
        raise ValueError(
            f"{owner} got logits of shape {tuple(output.shape)} and no targets: pass the batch's "
            "targets (only their shape and ignored positions are used), so that the class axis "
            "(1, or the last one in the GPT layout (B, T, C)) is known"
        )
    fill = 1 if spec.ignore_index == 0 else 0  # any class that is not ignored
    return torch.full((output.shape[0],), fill, dtype=torch.long, device=output.device)


def objective_gradient(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Any,
    targets: Tensor | None,
    objective: Any,
    owner: str,
) -> dict[str, Tensor]:
    """The gradient of ``objective(spec, output, targets)`` (a scalar of the prepared batch
    output) w.r.t. the trainable parameters, from one forward and one backward pass that leave no
    trace. ``targets=None``: stand-in targets from that same forward (:func:`stand_in_targets`).

    The batch is data (:func:`curvlab._data.as_data`): targets or inputs that carry an autograd
    graph into the parameters are held fixed, with a ``RuntimeWarning`` (before review s23 the
    gradient followed the targets' graph: ``MultiplicativeNoise`` and ``FullFisherNoise``
    measured another function than the other samplers on self-distillation targets)."""
    from curvlab._data import as_data, call_model
    from curvlab._notrace import batchnorm_stats_kept, leave_no_trace

    inputs, targets = as_data(inputs, targets, "the step's batch")
    spec = loss_spec(loss_fn)
    params = trainable_params(model)
    # the step's own forward updates train-mode BatchNorm statistics; this one must not again
    with leave_no_trace(model), batchnorm_stats_kept(model):
        raw = call_model(model, inputs)
        if targets is None:
            targets = stand_in_targets(spec, raw, owner)
        output = spec.prepare(raw, targets)
        grads = torch.autograd.grad(
            objective(spec, output, targets), list(params.values()), allow_unused=True
        )
    return {
        n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(params.items(), grads)
    }


def standard_normal_like(t: Tensor, generator: torch.Generator) -> Tensor:
    """``N(0, 1)`` entries shaped like ``t``, on its device, from ``generator``."""
    return torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)


def sampler_model(
    sampler: NoiseSampler, model: Any, process_group: Any, what: str, *, in_step: bool = True
) -> tuple[Any, bool]:
    """``model`` out of its wrappers, and whether it is an FSDP2 (``fully_shard``) model.

    A sampler that folds its noise into the training step's backward pass
    (:attr:`NoiseSampler.folds`, :class:`~curvlab.noise.FullFisherNoise`) is refused on a model
    wrapped by ``DistributedDataParallel`` over several processes under ``process_group="local"``
    (or a group of this rank alone): DDP all-reduces that backward pass, and with it the noise
    (:func:`folded_noise_reduced`). Under a group of several ranks :func:`check_supported`
    refuses it.

    :func:`curvlab.distributed.unwrap_model` lets an FSDP2 model through here
    (:func:`curvlab._fsdp.fsdp2_allowed`), and this checks it at once: only a sampler with
    :attr:`NoiseSampler.fsdp2` takes one, and, when it measures curvature, only together with
    every rank (``process_group`` not ``"local"``): each rank holds a shard of every parameter,
    so the curvature is that of all ranks' shards (``diag_fisher``'s FSDP2 route) and the noise
    one draw shared by every rank.

    Args:
        sampler: the sampler that will run on the model.
        model: the model as the user passed it.
        process_group: the call's ``process_group=``.
        what: the call, for the messages (e.g. ``"KFACNoise.sample"``).
        in_step: whether the sampler runs inside :class:`~curvlab.noise.NoisyOptimizer`'s
            training step, where a folding sampler adds its noise in the step's backward pass
            (``False`` for :meth:`NoiseSampler.sample`, whose draw is returned to the caller).

    Raises:
        NotImplementedError: for an FSDP2 model and a sampler that does not run on one (and, from
            ``unwrap_model``, for FSDP1 and other DTensor models).
        ValueError: for a curvature sampler on an FSDP2 model under ``process_group="local"``
            (or a group of this rank alone) with several ranks; for a folding sampler in a
            training step on a DDP model of several ranks under ``"local"``.
    """
    from curvlab._fsdp import fsdp2_allowed, fsdp_kind, unsupported_message
    from curvlab.distributed import active, group_scope, unwrap_model

    if in_step and sampler.folds and all_reducing_ddp(model) is not None:
        with group_scope(process_group):
            alone = active() is None
        if alone:  # (a group of several ranks: check_supported refuses it)
            raise folded_noise_reduced(what, "is wrapped by DistributedDataParallel")
    with fsdp2_allowed():  # the model is checked right below
        model = unwrap_model(model)
    if not isinstance(model, nn.Module) or fsdp_kind(model) != "fsdp2":
        return model, False
    if not sampler.fsdp2:
        raise NotImplementedError(unsupported_message("fsdp2", what))
    with group_scope(process_group):
        alone = active() is None and torch.distributed.get_world_size() > 1
    if alone and sampler.uses_curvature:
        raise ValueError(
            f"{what}: process_group='local' cannot be used with an FSDP2 (fully_shard) model: "
            "each rank holds only a shard of every parameter, so the curvature is measured by "
            "all ranks together (each passing its shard of the batch) and the noise is one "
            "draw shared by every rank. Leave process_group=None (the default group) and pass "
            "the same seed on every rank"
        )
    return model, True


def check_supported(sampler: NoiseSampler) -> None:
    """Raise for a sampler whose state cannot be combined over ranks exactly.

    Raises:
        NotImplementedError: naming the sampler and the supported ones; for a sampler that
            folds its noise into the step's backward pass (:class:`~curvlab.noise.FullFisherNoise`)
            saying where ``process_group="local"`` is no way out (a DDP model).
    """
    if sampler.adds_over_ranks:
        return
    name = type(sampler).__name__
    if sampler.folds:
        local = (
            f"process_group='local' measures each rank's shard alone in {name}.sample(), or in "
            "NoisyOptimizer on a model trained without DistributedDataParallel (the replicas "
            "then drift apart), but not under DDP: NoisyOptimizer folds this noise into the "
            "step's backward pass, which DDP's all-reduce averages over the ranks"
        )
    else:
        local = (
            "or pass process_group='local' to NoisyOptimizer to measure each rank's shard alone "
            "(the replicas then drift apart unless you synchronise them yourself)"
        )
    raise NotImplementedError(
        f"{name} is not supported under torch.distributed: its curvature state (square-root "
        "factors or per-example vectors) does not add over ranks. Supported: DiagFisherNoise, "
        f"FisherTraceNoise, IsotropicNoise, MultiplicativeNoise; {local}"
    )


def all_reducing_ddp(model: Any) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper in ``model``'s nest of wrappers (DDP,
    ``DataParallel``, ``torch.compile``, in any order) whose backward pass all-reduces over
    several processes, or ``None``."""
    from curvlab._compiled import wrapper_chain

    ddp = nn.parallel.DistributedDataParallel
    return next((m for m in wrapper_chain(model) if isinstance(m, ddp) and ddp_reduces(m)), None)


def ddp_reduces(ddp: nn.parallel.DistributedDataParallel) -> bool:
    """Whether ``ddp``'s backward pass all-reduces over several processes."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(getattr(ddp, "process_group", None)) > 1


def folded_noise_reduced(what: str, how: str) -> ValueError:
    """The error for noise folded into a backward pass that DDP all-reduces (``how``: what shows
    it, e.g. ``"is wrapped by DistributedDataParallel"``), raised before that pass.

    Under ``process_group="local"`` the noise is to be each rank's own batch's, the replicas
    drifting apart (docs/distributed.md); folded into the backward pass, DDP averaged it with the
    other ranks' draws (from the same seed) and the replicas stayed identical: ``E|eps|^2`` 0.584
    on both of 2 gloo ranks where their own batches give ``scale^2 Tr(F_r)`` 1.156 and 1.488
    (:class:`~curvlab.noise.FullFisherNoise`, ``"empirical"``, scale 0.5; found in review s23).
    """
    return ValueError(
        f"{what}: the model {how}, and FullFisherNoise folds its noise into the training "
        "step's backward pass, whose gradients DDP's all-reduce averages over the ranks: with "
        "process_group='local' each rank's draw would be averaged with the other ranks' draws "
        "(from the same seed) instead of being its own batch's noise, and the replicas would "
        "stay identical. Use DiagFisherNoise or FisherTraceNoise with process_group='local' "
        "(their noise is added after the all-reduce: each rank's own batch, the replicas drift "
        "apart) or with the default group (the global batch's noise, the replicas identical), "
        "or FullFisherNoise with process_group='local' on a model trained without the DDP "
        "wrapper"
    )


class KindedSampler(NoiseSampler):
    """A sampler whose curvature comes in kinds (``kinds``; ``default_kind`` when none is given).

    Its constructor is the one of every such sampler: ``Sampler(kind, *, scale=None,
    large_batch=None, small_batch=None)``.
    """

    kinds: ClassVar[tuple[str, ...]] = ()
    default_kind: ClassVar[str] = ""

    def __init__(
        self,
        kind: str | None = None,
        *,
        scale: float | None = None,
        large_batch: int | None = None,
        small_batch: int | None = None,
    ) -> None:
        super().__init__(scale=scale, large_batch=large_batch, small_batch=small_batch)
        owner = type(self).__name__
        chosen = self.default_kind if kind is None else sampler_kind(kind, self.kinds, owner)
        self.kind = check_kind(chosen, self.kinds, owner)

    @property
    def reads_labels(self) -> bool:
        """``kind == "empirical"``: the data's labels enter the Fisher."""
        return self.kind == "empirical"
