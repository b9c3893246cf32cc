"""A non-finite curvature product of a float64 operator is not answered with "use float64"."""

from __future__ import annotations

import pytest
import torch

import curvlab.estimators as est
from curvlab._finite import NonFiniteError


class Overflowing:
    """A diagonal operator whose products overflow (entries near the float's largest)."""

    def __init__(self, dtype: torch.dtype) -> None:
        big = torch.finfo(dtype).max / 2
        self.d = torch.tensor([big, big / 3, 1.0], dtype=dtype)
        self.shape, self.dtype, self.device = (3, 3), dtype, torch.device("cpu")

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return (self.d[:, None] * V) * 4  # inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overflow_message_names_the_right_way_out(dtype: torch.dtype) -> None:
    for call in (
        lambda op: est.lanczos_eigenvalues(op, k=1, seed=0),
        lambda op: est.slq(op, num_steps=3, num_probes=1, seed=0),
    ):
        with pytest.raises(NonFiniteError) as info:
            call(Overflowing(dtype))
        msg = str(info.value)
        if dtype == torch.float64:
            assert "overflows float64" in msg and "Use float64" not in msg
            assert "divide it by a constant" in msg
        else:
            assert "Use float64" in msg
