"""Penalties recomputed every ``every`` calls: :class:`GradientNormPenalty`, :class:`FisherPenalty`."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._compiled import compiled_note, strip_wrappers
from curvlab._losses import loss_spec
from curvlab._notrace import gradient_hooks_off
from curvlab._own_pass import own_pass
from curvlab._precision import without_autocast
from curvlab._rng import make_generator
from curvlab._scan import model_device
from curvlab._warn import user_stacklevel
from curvlab.regularizers._checks import check_not_sharded
from curvlab.regularizers._penalties import (
    DRAWN_PENALTIES,
    _drawn,
    _gradient,
    _input_gradient,
    check_alpha,
    retained_grads_kept,
    trainable,
)
from curvlab.regularizers._penalty_state import checked_penalty_state, named_cache

__all__ = ["PENALTIES", "GradientNormPenalty", "FisherPenalty"]


PENALTIES: dict[str, str] = {
    "fisher": "Fisher penalty: squared gradient norm at labels sampled from the model",
    "gradient": "GP: squared gradient norm at the data labels",
    "input": "GP_x: mean squared per-example input-gradient norm",
    "random": "GP_r: squared gradient norm at uniformly random labels",
}


class GradientNormPenalty:
    """A gradient-norm penalty recomputed every ``every`` calls (Jastrzębski et al., appendix C).

    On a recomputation step the penalty ``P(theta)`` and its gradient ``grad P`` are computed
    (one double-backward); the returned term is ``P + sum_p <grad P, p - stop_grad(p)>``, whose
    value is ``P`` and whose gradient with respect to the parameters is ``grad P``. On the other
    steps the same surrogate is built from the cached values, so the optimiser keeps receiving the
    most recently computed penalty gradient at the cost of nothing. ``every=1`` returns the exact
    differentiable penalty on every call.

    A sharded model (FSDP2 ``fully_shard``, FSDP1, DTensor parameters) is refused with a
    ``NotImplementedError``, at construction and at every call (a model sharded afterwards):
    the penalty's gradient is a double backward, which does not go through FSDP's hooks.

    A recomputation whose value or gradient is not finite is returned for its own step but not
    kept: the next call recomputes. (A batch whose every target is ``ignore_index`` under
    ``"mean"`` has the value NaN and the gradient 0, as torch's own loss; kept, it made the next
    ``every - 1`` steps' terms NaN. Found in review.) With ``every > 1`` each recomputation reads
    one flag on the host (a synchronisation on a GPU, once per ``every`` steps). A parameter of
    the cached gradient replaced since by a new ``nn.Parameter`` (a re-initialised layer) makes
    the next call recompute: the cached term gave the new parameter no gradient (found in
    review s19). So does a trainable parameter the last recomputation did not differentiate
    for: one unfrozen since (``requires_grad_(True)``, progressive unfreezing) or added since
    (a layer appended): the cached term gave it no penalty gradient until the next scheduled
    recomputation, ``every - 1`` calls later (found in review s23: ``None`` for the unfrozen
    layer's 0.1203). A parameter frozen since needs none: the cached term leaves it out.

    To resume a run, save :meth:`state_dict` beside the model's and the optimizer's and load it
    with :meth:`load_state_dict`: the generator, the ``every`` cycle and the cached gradient
    (by parameter name) go on as in the uninterrupted run.

    Args:
        model: the model being trained.
        loss_fn: a supported loss module (its reduction defines ``L``).
        kind: ``"fisher"`` (FP), ``"gradient"`` (GP), ``"input"`` (GP_x) or ``"random"`` (GP_r).
        alpha: coefficient (a Python float >= 0; a Tensor is a ``TypeError``: pass
            ``float(alpha)``).
        every: recompute period in calls (>= 1).
        seed: seed of the penalty's own generator (labels for ``"fisher"`` and ``"random"``).

    Attributes:
        last_value: the last recomputed penalty (a detached tensor; NaN for a batch whose every
            target is ignored under ``"mean"``), or ``None``.
        calls: the number of calls that returned (a call that raised is not counted).
        seed: the seed of its generator.
        info: how the penalty is computed where that is not the default (``"compiled"``: a
            ``torch.compile``d model, whose original module runs the penalty's forward eagerly,
            since compiled graphs have no double backward; docs/training-loops.md).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> gp = GradientNormPenalty(model, loss_fn, kind="gradient", alpha=0.01, every=5)
        >>> X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> out = model(X)
        >>> (loss_fn(out, y) + gp(X, y, output=out)).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        kind: str = "fisher",
        alpha: float = 1.0,
        every: int = 1,
        seed: int = 0,
    ) -> None:
        if kind not in PENALTIES:
            raise ValueError(f"kind must be one of {sorted(PENALTIES)}, got {kind!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.spec = loss_spec(loss_fn)
        check_not_sharded(strip_wrappers(model))  # FSDP: no double backward through its hooks
        if kind == "random" and self.spec.kind == "mse":
            raise ValueError(
                "kind='random' (GP_r) needs a finite label set: use CrossEntropyLoss or "
                "BCEWithLogitsLoss, not MSELoss"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.kind = kind
        self.alpha = check_alpha(alpha)
        self.every = every
        self.seed = seed
        self.generator = make_generator(seed=seed, device=model_device(model))
        self.calls = 0
        self.last_value: Tensor | None = None
        compiled = compiled_note(model)
        self.info: dict[str, str] = {} if compiled is None else {"compiled": compiled}
        # (parameter, its gradient) pairs of the last recomputation, by the parameter itself: the
        # trainable list can change in between (progressive freezing), and zipped by position
        # the gradients went to the wrong parameters; a parameter replaced since (a new
        # nn.Parameter) makes the next call recompute (_cache_stale)
        self._cached_grads: list[tuple[nn.Parameter, Tensor]] | None = None
        self._cached_value: Tensor | None = None  # the value that goes with _cached_grads
        # the parameters trainable at the last recomputation (those it differentiated for, the
        # unused ones included), by id with a weak reference that tells a new parameter at a
        # freed one's address apart: one trainable now and not among them makes the next call
        # recompute (_cache_stale; in memory only, not in state_dict)
        self._cached_over: dict[int, weakref.ref[nn.Parameter]] = {}

    def _compute(self, inputs: Tensor, targets: Tensor | None, output: Tensor | None) -> Tensor:
        """The penalty of this batch, with the loss validated again (:func:`loss_spec`, cheap: no
        host synchronisation), so that hooks, ``forward`` or options of the loss changed since
        construction are refused or followed, as by the penalty functions (a spec kept from
        construction computed the unhooked 0.895846 for the hooked 3.583384; found in review
        s17). The fresh spec shares the layout memory of :attr:`spec`, the one before: a batch
        of logits ``(B, T, C)`` with ``T == C`` after batches that fitted only the GPT layout is
        read in it, as by curvlab's other entry points (a fresh memory per call read it in
        torch's layout, with an ``AmbiguousLayoutWarning``; found in review s17). Global forward
        hooks of the user's are checked on each recomputation (one host read while any exist)."""
        self.spec = spec = loss_spec(self.loss_fn, layout_of=self.spec)
        model, alpha, gen = self.model, self.alpha, self.generator
        if self.kind in DRAWN_PENALTIES:
            return _drawn(self.kind, model, spec, inputs, output, alpha, gen, None, targets)
        if targets is None:
            raise ValueError(
                f"kind={self.kind!r} needs the batch targets: call penalty(inputs, targets)"
            )
        if self.kind == "gradient":
            return _gradient(model, spec, inputs, targets, output, alpha)
        return _input_gradient(model, spec, inputs, targets, alpha)

    @staticmethod
    def _surrogate(value: Tensor, grads: list[tuple[nn.Parameter, Tensor]]) -> Tensor:
        """``value + sum_p <g_p, p - stop_grad(p)>``: the value ``value``, the gradient ``g``."""
        term = value.clone()
        for p, g in grads:
            if p.requires_grad:  # frozen since: no gradient for it
                term = term + (g * (p - p.detach())).sum()
        return term

    @staticmethod
    def _identities(params: list[nn.Parameter]) -> dict[int, weakref.ref[nn.Parameter]]:
        """``params`` by ``id``, each with a weak reference (:meth:`_cache_stale`)."""
        return {id(p): weakref.ref(p) for p in params}

    def _cache_stale(self) -> bool:
        """Whether the cached gradient no longer covers the model's trainable parameters.

        Stale where a parameter of the cached gradient is no longer the model's (replaced by a
        new ``nn.Parameter``, e.g. a re-initialised layer: its cached surrogate gave the new
        parameter no penalty gradient and the old one's value; found in review s19), or where a
        trainable parameter of the model was not trainable at the last recomputation (unfrozen
        since, or added with a new layer: the cached surrogate gave it no penalty gradient;
        found in review s23). A parameter frozen since keeps the cache (no gradient is due to
        it). Identity checks only: no host synchronisation.
        """
        assert self._cached_grads is not None
        params = list(self.model.parameters())
        current = {id(p) for p in params}
        if any(id(p) not in current for p, _ in self._cached_grads):
            return True
        over = self._cached_over
        for p in params:
            if p.requires_grad:
                ref = over.get(id(p))
                if ref is None or ref() is not p:
                    return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to compute the penalty as the uninterrupted one would.

        The generator's state (the labels ``"fisher"`` and ``"random"`` draw), the call
        counter (where in the ``every`` cycle the run is), the last recomputed value, and the
        cached value and gradient that the calls until the next recomputation return, the
        gradient by parameter name (of the model inside any ``torch.compile``, DDP or
        ``DataParallel`` wrapper), with the ``kind`` and ``alpha`` it was computed with. Save
        it beside the model's and the optimizer's; without it a resumed run recomputes at its
        first call and draws other labels (its losses differed from the uninterrupted run's
        from the first step on: 0.560698 for 0.559766 with ``every=3``; found in review s19).

        Returns:
            A dict of tensors and Python values (``torch.save`` it; it loads with
            ``torch.load(..., weights_only=True)``).
        """
        cached = named_cache(strip_wrappers(self.model), self._cached_grads)
        return {
            "generator": self.generator.get_state(),
            "calls": self.calls,
            "kind": self.kind,
            "alpha": self.alpha,
            "last_value": self.last_value,
            "cached_value": None if cached is None else self._cached_value,
            "cached_grads": cached,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (of a penalty of the same ``kind``).

        Tensors mapped elsewhere by ``torch.load(map_location=...)`` are put back: the
        generator's state on the CPU (where torch keeps every generator's state), the cached
        gradient on its parameters' devices, the values on the model's. The cached gradient is
        restored when each of its names is a parameter of the model with the same shape and
        dtype and it was computed with this penalty's ``alpha``; otherwise a ``RuntimeWarning``
        says why and the next call recomputes (as a call after a parameter was replaced by a
        new ``nn.Parameter`` does).

        The generator's state is that of the device type it was saved on (a CUDA generator's is
        not a CPU one's): a state saved on another device type is refused. To continue on this
        one anyway, load it with ``state["generator"] = None``: the generator is then seeded
        from ``seed`` and the restored call counter, so the labels drawn from now on are other
        draws than the uninterrupted run's.

        Args:
            state: what :meth:`state_dict` returned, e.g. as ``torch.load`` gives it back.

        Raises:
            ValueError: if ``state`` is not a penalty state dict, is one of another ``kind``, or
                its generator state is one of another device type; raised before anything is
                changed.
        """
        model = strip_wrappers(self.model)
        loaded = checked_penalty_state(
            state,
            owner=type(self).__name__,
            kind=self.kind,
            alpha=self.alpha,
            seed=self.seed,
            model=model,
            generator_device=self.generator.device,
            device=model_device(model),
        )
        if loaded.dropped is not None:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: the saved cached penalty gradient is "
                f"not restored ({loaded.dropped}); the next call recomputes the penalty",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        self.generator.set_state(loaded.generator)
        self.calls = loaded.calls
        self.last_value = loaded.last_value
        self._cached_value, self._cached_grads = loaded.cached_value, loaded.cache
        # the parameters it was differentiated for are not saved: taken to be those trainable
        # now (the model as saved), so that the resumed run reuses the cache as the
        # uninterrupted one does
        self._cached_over = self._identities(
            [p for p in self.model.parameters() if p.requires_grad]
        )

    @torch.compiler.disable  # inside a compiled step: runs eagerly (docs/training-loops.md)
    def __call__(
        self, inputs: Tensor, targets: Tensor | None = None, output: Tensor | None = None
    ) -> Tensor:
        """The penalty term for this training step (add it to the loss before ``backward``).

        Args:
            inputs: the mini-batch inputs.
            targets: the labels (needed by ``"gradient"`` and ``"input"``).
            output: ``model(inputs)`` of this step, reused by ``"fisher"``, ``"gradient"`` and
                ``"random"`` on recomputation steps (``"input"`` always runs its own forward).
        """
        # ``calls`` counts the calls that returned: a call that raises (out of memory in the
        # double backward, a loop that then skips the batch) leaves the schedule as it was, so
        # the next call recomputes (it advanced first before, and the step after a failed
        # recomputation trained on a gradient ``every + 1`` steps old; found in review)
        check_not_sharded(strip_wrappers(self.model))  # sharded since: its cache is not valid
        recompute = (
            self.calls % self.every == 0 or self._cached_grads is None or self._cache_stale()
        )
        if not recompute:
            assert self._cached_value is not None and self._cached_grads is not None
            term = self._surrogate(self._cached_value, self._cached_grads)
            self.calls += 1
            return term
        state = self.generator.get_state()  # put back if the call raises: the labels it drew
        try:
            return self._recompute(inputs, targets, output)
        except BaseException:
            self.generator.set_state(state)
            raise

    def _recompute(self, inputs: Tensor, targets: Tensor | None, output: Tensor | None) -> Tensor:
        """A recomputation step of :meth:`__call__` (``calls`` advanced once it returns)."""
        params = trainable(self.model)
        if self.every == 1:  # its graph is part of the step's backward: through the step's
            # output a capture sees the penalty's part (and measures in a separate pass); a
            # forward of its own (GP_x, no output=) is marked as not the step's by the functions
            value = self._compute(inputs, targets, output)
            self.last_value = value.detach()
            self._cached_grads = self._cached_value = None
            self.calls += 1
            return value
        # the value and its gradient, then only cached numbers go into the step's loss: a noise
        # capture around the step must not take these passes for the step's own (its noise
        # would go into the cached gradient, its curvature would mix in the penalty's); the
        # .grad of an output= that retains it is put back after both gradients (review s23)
        with own_pass(self.model.parameters()), retained_grads_kept(output):
            value = self._compute(inputs, targets, output)
            # the user's parameter hooks off: the cache holds grad P, and their hooks act once,
            # in their own backward of the surrogate (found in review s20: a hook tripling a
            # gradient acted here and again there, 9x for 3x, so 3x the every=1 gradient)
            # and outside autocast, as the penalty's forward (found in review s21: its double
            # backward ran under the caller's region, in bfloat16: 3e-3 off the every=1 gradient)
            with gradient_hooks_off(self.model.parameters()), without_autocast():
                grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
        self.last_value = value.detach()
        computed = [(p, g.detach()) for p, g in zip(params, grads) if g is not None]
        device = self.last_value.device  # the flags on one device (a model split over several)
        finite = [self.last_value.isfinite().all()]
        finite += [g.isfinite().all().to(device) for _, g in computed]
        if bool(torch.stack(finite).all()):  # one host read per recomputation
            self._cached_value, self._cached_grads = self.last_value, computed
            self._cached_over = self._identities(params)
        else:  # not kept: the next call recomputes
            self._cached_value = self._cached_grads = None
        term = self._surrogate(self.last_value, computed)
        self.calls += 1
        return term


class FisherPenalty(GradientNormPenalty):
    """The Fisher penalty, recomputed every ``every`` steps (default 10, as in the paper).

    See :class:`GradientNormPenalty`; ``FisherPenalty(model, loss_fn, alpha, every, seed)`` is
    ``GradientNormPenalty(model, loss_fn, "fisher", alpha, every, seed)``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        alpha: float = 1.0,
        every: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(model, loss_fn, kind="fisher", alpha=alpha, every=every, seed=seed)
