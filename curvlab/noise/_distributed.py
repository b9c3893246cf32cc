"""Noise samplers inside a ``DistributedDataParallel`` training step.

Under DDP every rank holds a full replica, its own shard of the step's batch, and after the
backward pass the same averaged gradient. :class:`~curvlab.noise.NoisyOptimizer` keeps the replicas
bitwise identical by

* measuring the curvature of the *global* batch: a state captured in the user's backward pass is
  this rank's (:func:`reduce_captured`, one all-reduce of one flat buffer and one host read of
  whether every rank captured one); a state measured in a pass of its own comes from curvlab's
  quantities, which reduce over the ranks themselves (docs/distributed.md). The ranks decide
  *together* between the two: a rank whose capture cannot be used (another term of its loss, a
  weight used outside its layer, on its data only) sends zeros in the same all-reduce, and then
  every rank measures in the separate pass (each deciding alone, one rank waited in the
  all-reduce and another in the separate pass's first collective: a deadlock, found in review
  s19);
* drawing the noise from one generator seeded identically on every rank: equal states give equal
  draws, and every rank adds the same noise to the same gradient.

Samplers whose state is a diagonal or a trace (:class:`~curvlab.noise.DiagFisherNoise`,
:class:`~curvlab.noise.FisherTraceNoise`) or that need none (:class:`~curvlab.noise.IsotropicNoise`,
:class:`~curvlab.noise.MultiplicativeNoise`, which reads the synchronised gradient) are supported.
K-FAC and full-Fisher noise keep square-root factors or fold per-example vectors into the
backward pass, which do not add over ranks: :func:`curvlab.noise._base.check_supported` rejects them.
``process_group="local"`` (each rank's batch alone, the replicas drifting apart) serves K-FAC noise,
which is added after DDP's all-reduce, but not full-Fisher noise on a DDP model: folded into the
backward pass, it would be averaged over the ranks by that all-reduce (each rank's draw mixed with
the others', from the same seed, the replicas identical; found in review s23), so
:func:`curvlab.noise._base.sampler_model` and the capture refuse it
(:func:`curvlab.noise._base.folded_noise_reduced`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from curvlab._losses import LossSpec
from curvlab._precision import accumulation_dtype
from curvlab.distributed import _DIGITS, Comm, decode_counts, encode_counts

__all__ = ["Captured", "captured_layout", "reduce_captured"]


def _decode(flat: Tensor, num: int, digits: int = 4, bits: int = 11) -> list[Tensor]:
    """Summed base-2048 digits back to counts, as float64 tensors on the device (no sync)."""
    scale = torch.tensor(
        [float(1 << (bits * i)) for i in range(digits)], dtype=torch.float64, device=flat.device
    )
    return [(flat[j * digits : (j + 1) * digits].double() * scale).sum() for j in range(num)]


class Captured(NamedTuple):
    """What :func:`reduce_captured` agreed on, the same on every rank.

    Attributes:
        state: the global batch's state, or ``None`` where some rank had none (every rank then
            measures in the separate pass).
        missing: the number of ranks without a captured state.
        failed: the number of ranks whose capture raised (each raises its own error).
    """

    state: Any | None
    missing: int
    failed: int


def captured_layout(sampler: Any, params: dict[str, Any]) -> tuple[int, torch.dtype, torch.device]:
    """Size, dtype and device of the flat state a capture over ``params`` sends, known on every
    rank whether or not its capture succeeded: the sampler's state made from a diagonal
    (``_reduce``, on the meta device: nothing allocated), in the sums' dtype of the parameters
    (float32 for 16-bit ones), on the first parameter's device."""
    shaped = sampler._reduce({n: torch.empty(p.shape, device="meta") for n, p in params.items()})
    tensors = list(shaped.values()) if isinstance(shaped, dict) else [shaped]
    dtype = accumulation_dtype(next(iter(params.values())).dtype)
    for p in params.values():
        dtype = torch.promote_types(dtype, accumulation_dtype(p.dtype))
    return sum(t.numel() for t in tensors), dtype, next(iter(params.values())).device


def reduce_captured(
    state: Any | None,
    layout: tuple[int, torch.dtype, torch.device],
    spec: LossSpec,
    output: Tensor | None,
    targets: Any,
    num_examples: int,
    comm: Comm,
    *,
    failed: bool = False,
) -> Captured:
    """The empirical-Fisher state of the global batch from this rank's captured one, agreed on by
    every rank.

    With ``n_r`` examples and ``M_r`` loss terms on rank ``r`` and ``N``, ``M`` their totals, the
    captured empirical diagonal is ``F_r = (n_r / M_r^2) S_r`` under ``"mean"`` (``S_r`` the raw sum
    of squared per-example NLL gradients) and ``S_r`` under ``"sum"``; the global one is
    ``(N / M^2) sum_r S_r`` resp. ``sum_r S_r``. ``state`` is a dict of tensors (a diagonal) or a
    tensor (``Tr(F)/d``); both are linear in ``S``.

    Every rank calls this on a capturing step, also one whose capture cannot be used
    (``state=None``: the loss had other terms there, a weight was used outside its layer, ...) or
    raised (``failed=True``): it sends zeros of the ``layout`` (:func:`captured_layout`, the same
    on every rank) and its flags in the same all-reduce, so the ranks learn together whether
    every one captured (one host read of the summed flags). ``output``, ``targets`` and
    ``num_examples`` (this rank's loss output, targets and batch size) are read only with a
    ``state``.

    Returns:
        :class:`Captured`: the global state only where every rank captured one and none failed.
    """
    size, dtype, device = layout
    if state is None:
        parts = [torch.zeros(size + 2 * _DIGITS, dtype=dtype, device=device)]
    else:
        count = spec.count(output, targets) if isinstance(targets, Tensor) else num_examples
        is_dict = isinstance(state, dict)
        keys = list(state) if is_dict else [None]
        tensors = [state[k] for k in keys] if is_dict else [torch.as_tensor(state)]
        assert sum(t.numel() for t in tensors) == size  # the layout is the sampler's own
        m_r = torch.as_tensor(count, device=device).to(torch.float64)
        if spec.reduction == "mean":  # S_r = (M_r^2 / n_r) F_r
            coeff = (m_r * m_r / num_examples).to(dtype)
            parts = [(t.to(dtype) * coeff).reshape(-1) for t in tensors]
        else:
            parts = [t.to(dtype).reshape(-1) for t in tensors]
        parts.append(encode_counts([num_examples, count], dtype, device))
    flags = encode_counts([int(state is None), int(failed)], dtype, device)
    flat = torch.cat([*parts, flags])
    comm.all_reduce_(flat)
    # the one host read: whether every rank goes on with the captured state
    missing, broken = decode_counts(flat[size + 2 * _DIGITS :], 2)
    if state is None or missing or broken:
        return Captured(None, missing, broken)
    n_total, m_total = _decode(flat[size : size + 2 * _DIGITS], 2)
    weight = (n_total / (m_total * m_total)).to(dtype) if spec.reduction == "mean" else None
    out = []
    start = 0
    for t in tensors:
        v = flat[start : start + t.numel()].view(t.shape)
        out.append(v * weight if weight is not None else v.clone())
        start += t.numel()
    return Captured(dict(zip(keys, out)) if is_dict else out[0], 0, 0)
