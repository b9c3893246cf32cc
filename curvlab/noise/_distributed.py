"""Noise samplers inside a ``DistributedDataParallel`` training step.

Under DDP every rank holds a full replica, its own shard of the step's batch, and after the
backward pass the same averaged gradient. :class:`~curvlab.noise.NoisyOptimizer` keeps the replicas
bitwise identical by

* measuring the curvature of the *global* batch: a state captured in the user's backward pass is
  this rank's (:func:`reduce_captured`, one all-reduce of one flat buffer, no host
  synchronisation); a state measured in a pass of its own comes from curvlab's quantities, which
  reduce over the ranks themselves (docs/distributed.md);
* drawing the noise from one generator seeded identically on every rank: equal states give equal
  draws, and every rank adds the same noise to the same gradient.

Samplers whose state is a diagonal or a trace (:class:`~curvlab.noise.DiagFisherNoise`,
:class:`~curvlab.noise.FisherTraceNoise`) or that need none (:class:`~curvlab.noise.IsotropicNoise`,
:class:`~curvlab.noise.MultiplicativeNoise`, which reads the synchronised gradient) are supported.
K-FAC and full-Fisher noise keep square-root factors or fold per-example vectors into the
backward pass, which do not add over ranks: :func:`curvlab.noise._base.check_supported` rejects them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab._losses import LossSpec
from curvlab.distributed import Comm, encode_counts

__all__ = ["reduce_captured"]


def _decode(flat: Tensor, num: int, digits: int = 4, bits: int = 11) -> list[Tensor]:
    """Summed base-2048 digits back to counts, as float64 tensors on the device (no sync)."""
    scale = torch.tensor(
        [float(1 << (bits * i)) for i in range(digits)], dtype=torch.float64, device=flat.device
    )
    return [(flat[j * digits : (j + 1) * digits].double() * scale).sum() for j in range(num)]


def reduce_captured(
    state: Any, spec: LossSpec, output: Tensor, targets: Any, num_examples: int, comm: Comm
) -> Any:
    """The empirical-Fisher state of the global batch from this rank's captured one.

    With ``n_r`` examples and ``M_r`` loss terms on rank ``r`` and ``N``, ``M`` their totals, the
    captured empirical diagonal is ``F_r = (n_r / M_r^2) S_r`` under ``"mean"`` (``S_r`` the raw sum
    of squared per-example NLL gradients) and ``S_r`` under ``"sum"``; the global one is
    ``(N / M^2) sum_r S_r`` resp. ``sum_r S_r``. ``state`` is a dict of tensors (a diagonal) or a
    tensor (``Tr(F)/d``); both are linear in ``S``.
    """
    count = spec.count(output, targets) if isinstance(targets, Tensor) else num_examples
    is_dict = isinstance(state, dict)
    keys = list(state) if is_dict else [None]
    tensors = [state[k] for k in keys] if is_dict else [torch.as_tensor(state)]
    dtype, device = tensors[0].dtype, tensors[0].device
    m_r = torch.as_tensor(count, device=device).to(torch.float64)
    if spec.reduction == "mean":  # S_r = (M_r^2 / n_r) F_r
        coeff = (m_r * m_r / num_examples).to(dtype)
        parts = [(t * coeff).reshape(-1) for t in tensors]
    else:
        parts = [t.reshape(-1) for t in tensors]
    flat = torch.cat([*parts, encode_counts([num_examples, count], dtype, device)])
    comm.all_reduce_(flat)
    size = sum(t.numel() for t in tensors)
    n_total, m_total = _decode(flat[size:], 2)
    weight = (n_total / (m_total * m_total)).to(dtype) if spec.reduction == "mean" else None
    out = []
    start = 0
    for t in tensors:
        v = flat[start : start + t.numel()].view(t.shape)
        out.append(v * weight if weight is not None else v.clone())
        start += t.numel()
    return dict(zip(keys, out)) if is_dict else out[0]
