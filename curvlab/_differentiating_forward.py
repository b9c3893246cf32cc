"""A model whose forward pass differentiates: refused by the per-example quantities.

A forward that calls the autograd engine (``torch.autograd.grad``, ``torch.autograd.backward``
or ``Tensor.backward``, also through ``torch.func`` or ``torch.autograd.functional``), typically
with ``create_graph=True``, makes the parameters enter the loss a second time, through the
graph of that derivative: a physics-informed network returning ``u`` and ``du/dx``, an energy
model returning forces ``-dE/dx``, a MAML inner step. For a Linear layer ``h = W x`` the
derivative's graph multiplies by ``W^T``, a use of ``W`` that no call of the layer shows. The
per-example passes do not follow it: curvlab's layer hooks build each example's gradient from
the layers' calls alone (before review s24, which detached inputs that require grad, a gradient
mean entry -0.0086 for -0.2364 and an empirical Fisher diagonal entry 0.0822 for 0.2099 on a small
physics-informed network, not refused), and BackPACK's extensions and ``torch.func``'s ``vmap``
do not run such a forward (torch's "element 0 of tensors does not require grad"). The Hessian,
GGN and Fisher products differentiate the whole batch's loss by double backward and are exact
for such a model, as are the whole batch's loss and gradient.

:func:`derivatives_refused` watches the forward passes of the examples-apart check that every
per-example quantity runs before any per-example work (once per call signature where the caller
remembers one) with :class:`~curvlab._notrace.EngineCalls`, a ``TorchFunctionMode`` that records
the engine's calls and changes nothing else, and adds one forward pass with gradient on the first
example, watched the same way: the check's passes run without gradient, and a forward may
differentiate only with it, as the per-example passes run (``create_graph=torch.is_grad_enabled()``,
or a "cheap inference" branch that skips the derivative under ``no_grad``; review s26).
:func:`watched_finding` hands the refusal on as a finding of that check, which every rank raises
under ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

import torch
from torch import nn

from curvlab._data import Inputs, call_model, inputs_to_device, slice_inputs
from curvlab._layout import NotSplittable
from curvlab._notrace import EngineCalls, buffer_snapshot, on_buffers
from curvlab._rng import global_rng_kept
from curvlab._scan import model_device

__all__ = [
    "DifferentiatingForwardError",
    "derivatives_refused",
    "refuse_differentiating_forward",
    "watched_finding",
]


class DifferentiatingForwardError(ValueError):
    """The model's forward pass calls the autograd engine: its per-example gradients are not the
    layers' (:mod:`curvlab._differentiating_forward`)."""


def _message(seen: str) -> str:
    """The refusal for a forward pass seen calling ``seen`` (the engine function's name)."""
    return (
        f"the model's forward pass differentiates (it calls {seen}: a physics-informed "
        "network's du/dx, by reverse-mode AD with create_graph=True or by forward-mode AD's "
        "dual numbers, forces -dE/dx, a MAML inner step), so its parameters also enter the "
        "loss through that derivative's graph, which curvlab's per-example passes "
        "(gradient_stats, diag_fisher of every kind, fisher_norms, kfac, fisher_trace, "
        "trace(method='ggn_cv'), the per-example measurements of analyze and Diagnostics, "
        "DiagFisherNoise, FisherTraceNoise and KFACNoise) cannot follow: their numbers would be "
        "wrong. Exact for this model: the curvature products of the whole batch (trace with "
        "the other methods, eigenvalues, spectral_density and curvature_operator, with "
        "matrix='hessian', 'ggn', 'fisher' or 'empirical_fisher'), diag_hessian, and the whole "
        "batch's loss and gradient (analyze's and Diagnostics' 'loss' and 'grad_norm')"
    )


@contextmanager
def derivatives_refused(model: nn.Module, inputs: Inputs | None) -> Iterator[None]:
    """Run the block (the examples-apart check's passes of ``model`` on ``inputs``) watching
    for calls of the autograd engine, and refuse a forward pass that makes one.

    After the block (the check's passes run without gradient, and a forward may differentiate
    only with it): one forward pass of the model on the first example, with gradient (as the
    per-example passes run), watched; also where the check's finding is a coupling (its
    finding is then the refusal: a forward that differentiates only with gradient differs
    from the passes without it). The check runs once per call signature, so this costs one
    forward pass of one example per signature. Run it inside the caller's
    :func:`~curvlab._notrace.leave_no_trace`; that pass leaves the global RNG and the buffers
    as they were, and runs no backward pass (``.grad`` untouched).

    Raises:
        DifferentiatingForwardError: after the block, where a forward pass called
            ``torch.autograd.grad``, ``torch.autograd.backward`` or ``Tensor.backward``; also
            where the block raised then (a forward that needs gradients fails in the check's
            passes without them: its error is chained).
    """
    watch = EngineCalls()
    try:
        with watch:
            yield
    except Exception as exc:
        if watch.seen is not None:
            raise DifferentiatingForwardError(_message(watch.seen)) from exc
        raise
    if watch.seen is not None:
        raise DifferentiatingForwardError(_message(watch.seen))
    if inputs is not None:
        # always (once per call signature, as the check): the check's passes run without
        # gradient, and a forward may differentiate only with it, the per-example passes'
        # mode: create_graph=torch.is_grad_enabled() (review s26, RB-1: a gradient mean entry
        # -0.2401 for -0.4401, not refused), or no derivative at all without gradient ("cheap
        # inference"; review s26, RX2-1: fisher_norms' Frobenius norm 1.1052 for 1.2028, a
        # ggn_cv trace 3.31 +- 0.11 for 3.0475, not refused; the deferred check raised a
        # misleading MixedExamplesError, BackPACK its raw AttributeError)
        refuse_differentiating_forward(model, inputs)


T = TypeVar("T")


def watched_finding(
    model: nn.Module, inputs: Inputs | None, check: Callable[[], T]
) -> T | NotSplittable:
    """``check()`` (an examples-apart check's finding on ``inputs``) under
    :func:`derivatives_refused`, or for a forward pass that differentiates a
    :class:`~curvlab._layout.NotSplittable` finding holding the
    :class:`DifferentiatingForwardError`: :func:`~curvlab._layout.raise_if_mixed` raises it as
    it is in one process, and under ``torch.distributed`` gathers it with the other ranks'
    findings, so that every rank raises (a rank without data waited in the gather before)."""
    try:
        with derivatives_refused(model, inputs):
            return check()
    except DifferentiatingForwardError as exc:
        return NotSplittable.of(exc)


def refuse_differentiating_forward(model: nn.Module, inputs: Inputs) -> None:
    """The with-gradient part of :func:`derivatives_refused` (which calls it after the
    examples-apart check's passes, or in their place for a first batch of one example): one
    forward pass of ``model`` on the first example of
    ``inputs``, with gradient (as the per-example passes run), watched. Inside the caller's
    :func:`~curvlab._notrace.leave_no_trace`; the global RNG and the buffers are left as they
    were.

    Raises:
        DifferentiatingForwardError: where that pass calls the autograd engine.
    """
    watch = _one_pass(model, inputs)
    if watch.seen is not None:
        raise DifferentiatingForwardError(_message(watch.seen))


def _one_pass(model: nn.Module, inputs: Inputs) -> EngineCalls:
    """One forward pass of ``model`` on the first example of ``inputs``, with gradient, under a
    fresh :class:`EngineCalls` (returned). A forward that fails without calling the engine is
    not this check's to report: the per-example passes raise its error."""
    device = model_device(model)
    part = inputs_to_device(slice_inputs(inputs, 0, 1), device)
    watch = EngineCalls()
    with (
        torch.enable_grad(),
        global_rng_kept(device),
        on_buffers(buffer_snapshot(model.modules())),  # a call counter too
        watch,
        suppress(Exception),  # the model's own error: see the docstring
    ):
        call_model(model, part)
    return watch
