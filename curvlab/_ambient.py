"""The ambient state around curvlab's own passes that is not the model's: the thread's default
saved-tensor hooks (set aside for the passes: :func:`saved_tensors_hooks_off`) and torch's
process-wide global RNG and attention-kernel flags (changed by the passes only while they hold
one process-wide lock: :func:`process_state_held`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["PROCESS_STATE_LOCK", "process_state_held", "saved_tensors_hooks_off"]

_autograd = torch._C._autograd

PROCESS_STATE_LOCK = threading.RLock()
"""Held by a thread while curvlab's passes change process-wide state: the global RNG (saved,
re-seeded per pass so that Dropout masks repeat, put back: :func:`curvlab._rng.global_rng_kept`)
and ``scaled_dot_product_attention``'s kernel flags (saved, set to the math kernel, put back:
:func:`curvlab._notrace.math_attention`). Re-entrant: a thread's nested blocks take it again.

Without it two threads calling curvlab at once interleaved those saves and restores (found in
review s25): the flags were left math-only for the rest of the program (A saves "all on", B
saves "math", A restores, B restores "math"), and one thread's re-seeding changed the other's
Dropout masks between the passes of one operator, whose "Hessian" was then not symmetric
(0.14 off). Concurrent curvlab calls now run one after the other. A thread that is *not* in
curvlab (a training loop drawing Dropout masks, calling SDPA) still shares torch's process-wide
state with a curvlab call running in another thread: docs/conventions.md."""


@contextmanager
def process_state_held() -> Iterator[None]:
    """Run the block holding :data:`PROCESS_STATE_LOCK` (a thread waits here while another is
    inside a curvlab call that holds it)."""
    with PROCESS_STATE_LOCK:
        yield


@contextmanager
def saved_tensors_hooks_off() -> Iterator[None]:
    """Run the block without the thread's default saved-tensor hooks, and push them back after
    (in their order, also when the block raises).

    A user's ``torch.autograd.graph.saved_tensors_hooks(pack, unpack)`` context around the
    training step (activation compression to bfloat16 or fp8, offloading) packs every tensor a
    forward pass saves for its backward, curvlab's passes' too: a lossy pack made every curvlab
    number that of the compressed activations, about 1e-3 relative off on a float64 model with
    no warning (found in review s25: an exact Hessian trace 2.6535 for 2.6613). The hooks are
    thread-local, like grad mode; curvlab's passes run without them. The user's own passes (the
    training step whose gradients a noise capture reads) keep them. The hooks a non-reentrant
    ``torch.utils.checkpoint`` stores on its graph nodes are not default hooks and stay.
    """
    top = _autograd._top_saved_tensors_default_hooks
    popped: list[tuple[Any, Any]] = []
    while (hooks := top(False)) is not None:
        popped.append(hooks)
        _autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(popped):
            _autograd._push_saved_tensors_default_hooks(pack, unpack)
