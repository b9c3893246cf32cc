"""Argument and state checks of :class:`~curvlab.noise.NoisyOptimizer` (kept apart from the step).

* :func:`check_steps_model`: the wrapped optimizer must step some of the model's parameters;
* :func:`stop_step` and :func:`needs_closure`: the noise schedule and the optimizer's ``step()``;
* :func:`grad_versions` and :func:`fold_left`: whether the gradients still hold the noise a
  ``FullFisherNoise`` capture folded into them (a capture opened again before ``step()``);
* :func:`check_left_out`: a separate pass on a captured batch must see the whole model call;
* :func:`check_saved_sampler`: a saved state must be the sampler's own
  (``state_dict()["sampler"]``, or, in older checkpoints, the cached state's structure).
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from curvlab._numbers import is_count, is_real
from curvlab._warn import user_stacklevel
from curvlab.noise._base import NoiseSampler, trainable_params

__all__ = [
    "check_left_out",
    "check_saved_sampler",
    "check_steps_model",
    "fold_left",
    "grad_versions",
    "needs_closure",
    "signature",
    "stop_step",
    "tag_text",
]


def check_saved_sampler(
    sampler: NoiseSampler, model: nn.Module, state_dict: dict[str, Any]
) -> None:
    """Refuse a state saved with another sampler, or a cached state ``sampler`` cannot read,
    before ``NoisyOptimizer.load_state_dict`` loads anything (see there): a ``DiagFisherNoise``
    diagonal read as K-FAC factors gave exactly zero noise until the next measurement, a K-FAC
    state read as a diagonal an ``AttributeError``.

    Raises:
        ValueError: naming the saved sampler and this one, and how to switch on purpose.
    """
    tag, saved = state_dict.get("sampler"), state_dict.get("sampler_state")
    mine = sampler._state_tag()
    drop = (
        "to go on with this sampler on purpose (its curvature measured anew), drop the saved "
        'one\'s entries: noisy.load_state_dict({**state, "sampler": None, '
        '"sampler_state": None})'
    )
    if tag is not None and dict(tag) != mine:
        raise ValueError(
            f"NoisyOptimizer.load_state_dict: the state was saved with {tag_text(tag)}, "
            f"this NoisyOptimizer has {tag_text(mine)}; its cached curvature and noise "
            "would not be those of the saved run. Build the NoisyOptimizer with the sampler "
            f"the run was saved with, or, {drop}"
        )
    if saved is None:
        return
    now = signature(trainable_params(model))
    measured = state_dict.get("sampler_state_params")
    if measured is not None and tuple((n, tuple(s)) for n, s in measured) != now:
        return  # measured for other parameters: the next step measures anew, unread
    problem = sampler._saved_problem(saved, model)
    if problem is not None:
        origin = (
            f"saved with {tag_text(tag)}"
            if tag is not None
            else "from a checkpoint that does not say which sampler saved it"
        )
        raise ValueError(
            f"NoisyOptimizer.load_state_dict: the cached curvature state ({origin}) is "
            f"{problem}, which {tag_text(mine)} cannot use: was the run saved with another "
            f"sampler? Build the NoisyOptimizer with that sampler, or, {drop}"
        )


def tag_text(tag: Any) -> str:
    """``DiagFisherNoise(kind='mc')`` for a sampler's ``_state_tag``."""
    if not isinstance(tag, dict):
        return repr(tag)
    kind = f"(kind={tag['kind']!r})" if "kind" in tag else ""
    return f"{tag.get('class', '?')}{kind}"


def signature(params: dict[str, nn.Parameter]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """What a cached sampler state was measured for: each trainable parameter's name and shape
    (saved with the state; the parameter objects themselves are compared apart, in memory only:
    ``NoisyOptimizer._state_objects``)."""
    return tuple((n, tuple(p.shape)) for n, p in params.items())


def check_steps_model(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Refuse an optimizer that steps none of ``model``'s parameters; warn about the tensors it
    steps outside ``model``.

    The sampler's draws are keyed by ``model``'s parameters and added only where the optimizer
    steps (:meth:`NoisyOptimizer._owned`): an optimizer built on a copy of the model (before
    ``copy.deepcopy``, a reload, or a layer replaced after it was built) would train without any
    noise, and without a word. Tensors the optimizer steps outside ``model`` (a learnable
    temperature of the loss, an old layer) get no noise.

    Raises:
        ValueError: if no tensor the optimizer steps is a parameter of ``model``.
    """
    mine = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    outside = [p for p in held if id(p) not in mine]
    if not outside:
        return
    shapes = ", ".join(str(tuple(p.shape)) for p in outside[:4]) + (
        f", ... ({len(outside)} in all)" if len(outside) > 4 else ""
    )
    if len(outside) == len(held):
        raise ValueError(
            f"NoisyOptimizer: the optimizer steps none of the parameters of model= (a "
            f"{type(model).__name__}): it holds {len(held)} tensor(s) of shapes {shapes}, none "
            "of them one of model's parameters (the very objects), so the noise, drawn for "
            "model's parameters, would reach no step and training would run without it. Pass "
            "the model the optimizer was built on, or build the optimizer on "
            "model.parameters() of the model you pass (not on a copy: copy.deepcopy, a model "
            "loaded again, or a layer replaced after the optimizer was built)"
        )
    warnings.warn(
        f"NoisyOptimizer: the optimizer steps {len(outside)} tensor(s) that are not parameters "
        f"of model= (shapes {shapes}); they get no noise, which is drawn for model's "
        "parameters only. If they belong to the model (an optimizer built before a layer was "
        "replaced, or on a copy), build the optimizer on model.parameters()",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` has a ``closure`` argument without a default (LBFGS)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: assume a plain step()
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def grad_versions(model: nn.Module) -> list[tuple[nn.Parameter, Any, int]]:
    """Each trainable parameter with a ``.grad``: a weak reference to that tensor and its version
    counter (no host synchronisation)."""
    return [
        (p, weakref.ref(p.grad), p.grad._version)
        for p in model.parameters()
        if p.requires_grad and p.grad is not None
    ]


def check_left_out(left_out: list[str], sampler: str) -> None:
    """Refuse a separate pass on the batch a capture recorded where the step's model call had
    more than that pass passes the model (``Taps.left_out``): the pass would measure the
    curvature of another call (a dropped ``position_ids`` or mask, a broadcast tensor), silently
    (``DiagFisherNoise("exact")`` was 24% off where it dropped ``position_ids`` that default to
    none).

    Raises:
        ValueError: naming what the pass would leave out, and the fixes.
    """
    if not left_out:
        return
    raise ValueError(
        f"{sampler} measures this step's curvature in a separate pass of "
        "loss_fn(model(inputs), targets) on the step's batch, which passes the model its first "
        "positional tensor, or its keyword tensors with the examples in their first dimension, "
        f"and nothing else; the step's model call also had {'; '.join(left_out)}, which that "
        "pass would leave out (the curvature of another call). Call the model on such inputs "
        "alone (expand a tensor broadcast over the batch, e.g. position_ids.expand(B, -1); give "
        "constants through a default of its forward or an attribute), or run your forward and "
        "backward outside the capture and call noisy.step(inputs=..., targets=...) with inputs a "
        "tensor or a dict of tensors with the examples in their first dimension"
    )


def fold_left(marks: list[tuple[nn.Parameter, Any, int]] | None) -> bool:
    """Whether some gradient is still the very tensor a fold left, unchanged since
    (:func:`_grad_versions`): the loop did not clear it (``zero_grad``, either way) and nothing
    accumulated into it or unscaled it. A gradient cleared since, and then refilled by earlier
    micro-batches of the next step (a step a GradScaler skipped), holds no noise."""
    for p, ref, version in marks or ():
        g = p.grad
        if g is not None and g is ref() and g._version == version:
            return True
    return False


def stop_step(
    stop_after: int | None, stop_fraction: float | None, total_steps: int | None
) -> int | None:
    """The number of steps that add noise (``None``: all), from the schedule's arguments.

    Raises:
        ValueError: for both ways at once, half of the second, or a value of the wrong kind (a
            ``bool`` is no number here: ``stop_fraction=True`` would stop at ``total_steps``).
    """
    if stop_after is not None:
        if stop_fraction is not None or total_steps is not None:
            raise ValueError(
                "pass either stop_after= or stop_fraction= with total_steps=, not both"
            )
        if not is_count(stop_after, least=0):
            raise ValueError(f"stop_after must be an int >= 0, got {stop_after!r}")
        return int(stop_after)
    if stop_fraction is None and total_steps is None:
        return None
    if stop_fraction is None or total_steps is None:
        raise ValueError("stop_fraction= and total_steps= go together (e.g. 0.25 and 10000)")
    if not is_real(stop_fraction) or not 0.0 <= float(stop_fraction) <= 1.0:
        raise ValueError(f"stop_fraction must be a number in [0, 1], got {stop_fraction!r}")
    if not is_count(total_steps, least=0):
        raise ValueError(f"total_steps must be an int >= 0, got {total_steps!r}")
    return _floor_product(stop_fraction, int(total_steps))


def _floor_product(fraction: float, total: int) -> int:
    """``floor(fraction * total)`` of the fraction as written, safe from float rounding.

    The float product loses a step where the fraction's binary value lies just below the decimal
    one (``0.29 * 100`` is ``28.999999999999996``): the fraction is read as the shortest decimal
    that gives it back (``str``, for floats and NumPy scalars alike), multiplied exactly, and the
    float product is kept where it reaches a larger whole number (``(1 / 3) * 3`` is ``1.0``).
    """
    try:
        exact = Fraction(str(fraction))
    except ValueError:  # a numbers.Real whose str is no decimal
        exact = Fraction(float(fraction))
    return min(total, max(math.floor(exact * total), int(float(fraction) * total)))
