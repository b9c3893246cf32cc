"""Forwards that call random operations, and how per-example maps may run them.

``torch.func.vmap`` over the examples of a chunk must decide what a random operation of the
forward draws: ``randomness="different"`` gives every example draws of its own. That is the
forward's own behaviour where it draws from the global RNG (a train-mode ``Dropout``: each
example its own mask, the result random as documented), and another function where the draws
are the same on every call: a forward that draws from a freshly seeded generator (fixed random
features, a fixed random attention bias or float mask:
``torch.randn(4, 4, generator=torch.Generator().manual_seed(0))``) is deterministic, but under
``vmap`` every example got another matrix (the exact Fisher diagonal 3% off in sum, 17% in
norm, the mean gradient 132%, found in review). Such a forward needs the exact per-example loop,
which runs the real forward once per example.

The per-example maps therefore run with ``randomness="error"`` first; only where that raises
(:func:`random_op_refused`) does :func:`loop_needed` look at the forward, once (the func backend
remembers the finding with the call's signature).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvlab._reading_rngs import held_states
from curvlab._rng import drew, global_rng_kept, host_states, seed_global

__all__ = ["host_draws", "loop_needed", "random_op_refused"]

_REFUSED = "randomness error mode"
"""What ``vmap(..., randomness="error")`` says when the mapped function calls a random op."""

_SEEDS = (0x5EED_0001, 0x5EED_0002)
"""Two different states of the global RNG for the two probe passes (then put back)."""


def random_op_refused(e: BaseException) -> bool:
    """Whether ``e`` is ``vmap``'s refusal of a random operation under ``randomness="error"``
    (any other failure: no batching rule, data-dependent control flow)."""
    return isinstance(e, RuntimeError) and _REFUSED in str(e)


class OpSeen(TorchFunctionMode):
    """Records whether an operation for which ``seen(func, args, kwargs)`` holds ran inside the
    block (``.found``); every operation runs as it would without the mode."""

    def __init__(self, seen: Callable[[Callable, tuple, dict], bool]) -> None:
        super().__init__()
        self.seen = seen
        self.found = False

    def __torch_function__(
        self,
        func: Callable,
        types: Any,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if not self.found and self.seen(func, args, kwargs):
            self.found = True
        return func(*args, **kwargs)


def _own_generator(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether an operation runs with a ``torch.Generator`` of its own (``generator=``)."""
    return isinstance(kwargs.get("generator"), torch.Generator) or any(
        isinstance(a, torch.Generator) for a in args
    )


def _global_states(device: torch.device) -> list[Tensor]:
    """The global RNG's states: the CPU generator's and, for a GPU, ``device``'s."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        states.append(torch.cuda.get_rng_state(index))
    return states


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def host_draws(
    run: Callable[[int], Any], device: torch.device, modules: Iterable[nn.Module] = ()
) -> str | None:
    """Why a forward that draws from numpy's or Python's RNG once per example must take the
    per-example loop, or ``None`` where it does not.

    ``vmap`` sees torch operations only: ``np.random.choice(size=(x.shape[0], 1))`` or a
    ``random.random()`` per example runs once per mapped block at the shape of one example, so
    every example of the block got the same draw (``randomness="different"`` cannot reach
    them; review s26: a per-example random sign gave ``noise_scale`` 1.7e-17 for 1.57). So does
    a numpy ``Generator`` or ``RandomState``, or a ``random.Random``, that one of ``modules``
    holds itself (``self.rng = np.random.default_rng(seed)``:
    :func:`~curvlab._reading_rngs.held_generators`; review s26: ``trace_covariance`` 9.6e-17
    for 8.016). The loop runs the real forward once per example, each its own draws, as the
    batch's forward gives them. A forward that draws as much for one example as for two (a
    LayerDrop's one decision per forward) is left to ``vmap``: one decision for the block, as
    the batch's forward makes one for the batch.

    ``run(k)`` (the forward on the first ``k`` examples) runs twice without gradients, on one
    example and on two, from one seeded state of the global RNGs and one state of the held
    generators, all put back after (:func:`~curvlab._rng.global_rng_kept`): their draws differ
    in number where the forward draws per example. A forward that fails on it is left to
    ``vmap``, which names or works around its error.
    """
    held = held_states(modules, torch_too=False)
    start = [h.get() for h in held]
    try:
        with torch.no_grad(), global_rng_kept(device):
            after = []
            for k in (1, 2):
                seed_global(device, _SEEDS[0])
                for h, state in zip(held, start):
                    h.put(state)
                try:
                    run(k)
                except Exception:
                    return None
                after.append(host_states() + [h.get() for h in held])
            if drew(after[0], after[1]):  # none, or one draw per forward: the same states
                return (
                    "its forward draws from numpy's or Python's RNG (global, or a generator a "
                    "module holds) for every example"
                )
        return None
    finally:
        for h, state in zip(held, start):
            h.put(state)


def loop_needed(run: Callable[[], Any], device: torch.device) -> str | None:
    """Why a forward that calls random operations must not be mapped with
    ``randomness="different"``, or ``None`` where that is its own behaviour.

    ``run()`` is the forward on a slice of one or two examples; it runs twice, without
    gradients, from two different states of the global RNG (the CPU's and ``device``'s), which
    is put back after. ``randomness="different"`` is the forward's own behaviour only where its
    draws come from the global RNG as a source of randomness: each run moves it on, and to
    states that differ between the two runs (a train-mode ``Dropout``'s masks). The per-example
    loop is needed where an operation draws from a ``torch.Generator`` of its own (``vmap``
    would give each example other draws from it than the forward draws), and where the global
    RNG is left as it was (``fork_rng`` around a re-seeded draw) or in a state that does not
    depend on the one the forward found (``torch.manual_seed`` in the forward): its draws are
    fixed. Read from the generators' states, not the outputs, so a Dropout that drops no unit
    of the probe's examples is still seen as random. A forward that cannot run on the slice
    takes the loop too (which then names its error). A random forward taken for one with fixed
    draws costs speed only: the loop is exact for both.
    """
    with torch.no_grad(), global_rng_kept(device):
        found, after = [], []
        for seed in _SEEDS:
            seed_global(device, seed)
            before = _global_states(device)
            with OpSeen(_own_generator) as seen:
                try:
                    run()
                except Exception as e:
                    return f"its forward calls random operations and failed on a probe ({type(e).__name__})"
            if seen.found:
                return "its forward draws from a torch.Generator of its own"
            found.append(before)
            after.append(_global_states(device))
    if _same(found[0], after[0]) or _same(after[0], after[1]):
        return "its forward calls random operations whose draws do not depend on the global RNG"
    return None
