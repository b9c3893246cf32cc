"""Noise rounded away in a 16-bit ``.grad``: a warning on the first noisy step.

:class:`~curvlab.noise.NoisyOptimizer` adds its float32 draw in place to each parameter's own
``.grad``. For a bfloat16 or float16 parameter that sum is rounded to the gradient's 16 bits: an
entry of the noise below half a unit in the last place of the gradient entry it is added to,
``|eps| < eps_dtype * |g| / 2``, is lost, and larger ones are rounded to a multiple of it, so the
covariance that reaches ``optimizer.step()`` is not the documented one (review s27: a bfloat16
``Linear(8, 1)`` with gradients of about 10 and ``IsotropicNoise(1e-3)`` got no noise at all in
7 of its 8 coordinates; at ``scale=1e-3`` ``DiagFisherNoise``'s delivered variance was 1.19
times the documented one, ``FullFisherNoise``'s 2.65 times). What is added is not changed: on
the first noisy step the share of such entries is measured (one host read, that step only) and
a warning names it and the ways out (float32 parameters with ``torch.autocast``, or a larger
noise).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from curvlab._warn import warn_once

__all__ = ["LOST_SHARE", "lost_noise_share", "warn_if_noise_lost"]

LOST_SHARE = 0.1
"""The share of a 16-bit gradient's noise entries below half its ulp above which the first
noisy step warns."""


def lost_noise_share(pairs: Iterable[tuple[Tensor, Tensor]]) -> float | None:
    """The share of the noise entries that adding to their 16-bit gradient loses: ``|eps| <
    finfo(g.dtype).eps * |g| / 2`` over every ``(g, eps)`` pair whose ``g`` is bfloat16 or
    float16 and strided (``None`` where there is none). One host read."""
    lost: Tensor | None = None
    total = 0
    for g, eps in pairs:
        if g.dtype not in (torch.bfloat16, torch.float16) or g.layout != torch.strided:
            continue
        if eps.layout != torch.strided or eps.shape != g.shape:
            continue
        half_ulp = g.detach().float().abs() * (torch.finfo(g.dtype).eps / 2)
        n = (eps.detach().float().abs() < half_ulp).sum()
        lost = n if lost is None else lost + n
        total += g.numel()
    if lost is None or total == 0:
        return None
    return float(lost) / total


def warn_if_noise_lost(pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Warn (once per text) where more than :data:`LOST_SHARE` of the noise that is about to be
    added to 16-bit gradients is below half their ulp (see the module docstring)."""
    share = lost_noise_share(pairs)
    if share is None or share <= LOST_SHARE:
        return
    warn_once(
        f"NoisyOptimizer: {share:.0%} of the noise entries added to this step's 16-bit .grad are "
        "below half the gradient's unit in the last place and are lost in the sum (the rest is "
        "rounded), so the noise that reaches optimizer.step() is not the documented one; keep "
        "float32 parameters (with torch.autocast for the forward) or use a larger noise "
        "(docs/noise.md, 16-bit gradients)"
    )
