"""The math kernel of ``scaled_dot_product_attention`` for a block of the user's code: public
(:func:`math_attention`), for the backward pass of a penalty through a checkpointed attention
block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from curvlab._notrace import math_attention as _math_attention

__all__ = ["math_attention"]


@contextmanager
def math_attention() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` on its math kernel inside the block, also where
    the model's forward opens an ``sdpa_kernel`` context of its own, and in the recomputation
    of a non-reentrant ``torch.utils.checkpoint`` block by a backward pass started inside it.

    A penalty (:mod:`curvlab.regularizers`) is a gradient norm: its gradient differentiates the
    model twice, which only the math kernel supports (the fused kernels have no double
    backward). The penalty's own forward runs under this context. Your later
    ``penalty.backward()`` (or the total loss's backward) recomputes a checkpointed attention
    block once more, outside curvlab: run it under this context too, else the recomputation
    takes the default kernel, or the kernel that the block selects itself, and torch raises its
    ``CheckpointError`` (the recomputed tensors differ from the forward's). Unlike
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, it overrides a kernel the model
    chooses inside its forward (``with sdpa_kernel(SDPBackend.FLASH_ATTENTION): ...``, common
    in attention blocks). Around a ``penalty(..., output=out)`` call on such a model, compute
    ``out`` under it as well. The kernel flags, which are process-wide, are put back when the
    block ends; other threads' blocks wait for it. The numbers are the math kernel's (the same
    function as the fused kernels, to rounding).

    Example:
        >>> import curvlab
        >>> from curvlab.regularizers import gradient_penalty
        >>> penalty = gradient_penalty(model, loss_fn, x, y)  # doctest: +SKIP
        >>> with curvlab.math_attention():  # doctest: +SKIP
        ...     (loss_fn(model(x), y) + 0.1 * penalty).backward()
    """
    with _math_attention():
        yield
