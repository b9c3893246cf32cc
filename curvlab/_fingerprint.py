"""A cheap fingerprint of a tensor's contents: its sum and a few of its entries.

Enough to tell a tensor refilled in place or read again with other values (an augmentation
drawing afresh) from the same one, at the cost of a sum and a gather on the tensor's device, with
no host synchronisation until two fingerprints are compared.

Example:
    >>> import torch
    >>> from curvlab._fingerprint import fingerprint, same_fingerprint
    >>> x = torch.arange(6.0)
    >>> same_fingerprint(fingerprint(x), fingerprint(x.clone()))
    True
    >>> same_fingerprint(fingerprint(x), fingerprint(x + 1))
    False
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fingerprint", "same_fingerprint"]

_FINGERPRINT_ENTRIES = 64


def fingerprint(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t``'s sum and up to 64 of its entries spread over it (all of a small tensor), on its
    device: no host synchronisation (a sum and a gather)."""
    t = t.detach()
    flat = t.reshape(-1)
    if flat.numel() > _FINGERPRINT_ENTRIES:
        # integer positions: float32 linspace rounds n - 1 up to n past 2^24 entries (an
        # IndexError on a 3x224x224 batch of 128 or a GPT-2-sized embedding, found in review)
        n = flat.numel()
        idx = (
            torch.arange(_FINGERPRINT_ENTRIES, device=t.device)
            * (n - 1)
            // (_FINGERPRINT_ENTRIES - 1)
        )
        flat = flat[idx]
    else:
        flat = flat.clone()
    total = t.sum(dtype=torch.float64) if t.is_floating_point() else t.sum()
    return flat, total


def same_fingerprint(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> bool:
    """Whether two fingerprints agree (NaN equal to NaN: unchecked data may hold it; ``torch.equal``
    first, the NaN-aware comparison only where it fails)."""
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        if torch.equal(x, y):
            continue
        if x.is_floating_point() or x.is_complex():
            if not bool(torch.isclose(x, y, rtol=0, atol=0, equal_nan=True).all()):
                return False
        else:
            return False
    return True
