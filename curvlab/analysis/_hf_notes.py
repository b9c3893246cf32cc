"""What the HF Trainer callback notes about the Trainer's step that the measurement does not model.

Gradient accumulation (how the Trainer's accumulated gradient relates to the measured objective)
and gradient clipping (``critical_sharpness`` models the unclipped update); plus the model's own
``forward`` without accelerate's autocast wrapper, which the measurements call. Used by
:mod:`curvlab.analysis.hf`; docs/training-loops.md explains the cases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from curvlab._notrace import leave_no_trace

__all__ = ["accumulation_note", "clipping_note", "honours_num_items"]


def accumulation_note(
    model: nn.Module | None,
    calls: list[dict[str, Any]],
    loss_targets: list[Any],
    scaled_for_ga: bool | None,
) -> tuple[str, bool]:
    """How the Trainer's accumulated gradient relates to the measured objective, the mean over the
    ``k`` concatenated micro-batches. transformers' ``training_step`` divides each micro-batch's
    loss by ``k`` unless it is "scaled for gradient accumulation": its ``loss_is_scaled_for_ga`` (``scaled_for_ga``; ``None``: not found), else when the model is
    given ``num_items_in_batch`` or a ``compute_loss_func`` computes the loss.

    Returns:
        the note, and whether the gradient may not be the measured objective's (then warn).
    """
    k = len(calls)
    # the model computed the loss (the Trainer removes labels for compute_loss_func)
    own = all("labels" in kw for kw in calls) or not loss_targets
    normalised = all(kw.get("num_items_in_batch") is not None for kw in calls)
    scaled = scaled_for_ga
    if scaled is None:
        scaled = normalised or not own
    # the model's loss divides its sum by num_items_in_batch (None: not known)
    honours = honours_num_items(model, calls[0]) if own and normalised else False
    name = type(model).__name__
    ratio = (
        "the measured objective's gradient times (tokens scored) / num_items_in_batch "
        "(1 where the Trainer counts the tokens the loss scores; for some causal LMs it "
        "counts all labels)"
    )
    means = (
        f"the gradient of the mean of the {k} micro-batch means (the measured "
        "objective's gradient when they count equally many tokens or examples)"
    )
    differs = True  # the gradient may not be the measured objective's: warn
    if not own and scaled:
        how = (
            f"the Trainer does not divide compute_loss_func's loss by {k}: unless that "
            "loss is a sum divided by num_items_in_batch (a per-micro-batch mean such as "
            f"nn.CrossEntropyLoss()'s is not), the gradient is {k} x {means}"
        )
    elif not own:
        how = (
            f"the Trainer divides compute_loss_func's loss by {k} "
            f"(loss_is_scaled_for_ga=False): for a per-micro-batch mean the gradient is "
            f"{means}"
        )
        differs = False
    elif scaled and honours:
        how = f"{name} divides its summed loss by num_items_in_batch: the gradient is {ratio}"
        differs = False
    elif scaled and honours is False:
        how = (
            f"{name}'s loss is a per-micro-batch mean (it ignores num_items_in_batch) "
            f"and the Trainer does not divide it by {k}: the gradient is {k} x {means}"
        )
    elif scaled:
        how = (
            f"the Trainer does not divide {name}'s loss by {k}, and whether that loss "
            "divides its sum by num_items_in_batch could not be told: the gradient is "
            f"{ratio} if it does, else {k} x {means}"
        )
    elif honours:
        how = (
            f"{name} divides its summed loss by num_items_in_batch and the Trainer "
            f"divides it by {k} too (loss_is_scaled_for_ga=False): the gradient is 1/{k} "
            f"x {ratio}"
        )
    elif honours is False:
        how = f"the Trainer divides each micro-batch's loss by {k}: the gradient is {means}"
        differs = False
    else:
        how = (
            f"the Trainer divides {name}'s loss by {k}, and whether that loss divides "
            f"its sum by num_items_in_batch could not be told: the gradient is 1/{k} x "
            f"{ratio} if it does, else {means}"
        )
    return f"gradient_accumulation_steps={k}: {how}", differs


def honours_num_items(model: nn.Module | None, kw: dict[str, Any]) -> bool | None:
    """Whether the model's own loss is its sum divided by ``num_items_in_batch``: the loss
    of one micro-batch at twice the count halves (two forward passes, eval mode, no
    gradient, once per run; ``None`` if it cannot be told)."""
    n = kw.get("num_items_in_batch")
    if model is None or n is None:
        return None
    call = {key: v for key, v in kw.items() if key != "num_items_in_batch"}
    try:
        with leave_no_trace(model, mode=False), torch.no_grad():
            one = model(**call, num_items_in_batch=n).loss
            two = model(**call, num_items_in_batch=2 * n).loss
        ratio = float(two) / float(one)
    except Exception:  # a model call that fails here: not known
        return None
    if math.isclose(ratio, 0.5, rel_tol=1e-4):
        return True
    return False if math.isclose(ratio, 1.0, rel_tol=1e-6) else None


def clipping_note(args: Any, quantities: Iterable[str]) -> str | None:
    """``critical_sharpness`` models the optimizer's update from the unclipped gradient;
    the Trainer clips it to ``max_grad_norm`` (default 1.0): the note saying so (``None``: no
    clipping or no ``critical_sharpness``)."""
    clip = getattr(args, "max_grad_norm", None)
    if "critical_sharpness" not in quantities or not clip or clip <= 0:
        return None
    note = (
        "critical_sharpness models the optimizer's update from the unclipped gradient, "
        f"but the Trainer clips the gradient to max_grad_norm={clip:g}: where its norm g "
        "exceeds that, the step of SGD without momentum or weight decay is "
        f"c = {clip:g}/g times the modelled update and raises the batch loss iff "
        "c·critical_sharpness > 2/lr (g: curvlab's grad_norm at the measured parameters); "
        "with momentum, weight decay or Adam the clipped step is not a multiple of the "
        "modelled update and critical_sharpness does not describe it. "
        "max_grad_norm=0 turns clipping off (docs/analysis.md)"
    )
    return note
