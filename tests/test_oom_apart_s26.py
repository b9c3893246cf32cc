"""Review s26 (RX3-1): an out-of-memory error in a forward of the examples-apart check was taken
for a forward that needs the whole batch; the check then found no coupling, was remembered as
passed, and a model mixing its examples was measured (a ``gradient_stats`` mean entry 0.0457
where the batch gradient is 0.2158). The error now passes through unchanged and the next call
still runs the check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._layout import MixedExamplesError

N = 8


class _Mix(nn.Module):
    """Subtracts half the batch mean (mixes the examples); the first ``ooms`` forwards on fewer
    than ``N`` examples raise an out-of-memory error."""

    def __init__(self, ooms: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 3).double()
        self.ooms = [ooms]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < N and self.ooms[0] > 0:
            self.ooms[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        h = self.lin(x)
        return h - 0.5 * h.mean(0, keepdim=True)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(N, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (N,), generator=g),
        )
    ]


CALLS: dict[str, Callable[[nn.Module], Any]] = {
    "gradient_stats": lambda m: cl.gradient_stats(m, nn.CrossEntropyLoss(), _data()),
    "diag_fisher": lambda m: cl.diag_fisher(m, nn.CrossEntropyLoss(), _data(), kind="empirical"),
    "fisher_norms": lambda m: cl.fisher_norms(m, nn.CrossEntropyLoss(), _data()),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_out_of_memory_in_the_check_passes_through_and_the_check_runs_again(name: str) -> None:
    call = CALLS[name]
    model = _Mix(ooms=1)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        call(model)
    assert model.ooms == [0]  # the error came from the check's forward
    with pytest.raises(MixedExamplesError, match="mixes the examples"):
        call(model)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_without_the_error_the_mixing_model_is_refused(name: str) -> None:
    with pytest.raises(MixedExamplesError, match="mixes the examples"):
        CALLS[name](_Mix(ooms=0))
