"""A failure while curvlab installs its buffer copies leaves the model's own buffers in place.

``on_buffers`` swaps each buffer for a copy before its block; a copy that failed part-way (out of
memory, an interrupt) left the buffers already swapped as copies (the ``finally`` that puts them
back was not reached): the model's ``running_mean`` was another tensor afterwards, and the user's
references (an EMA copy, a compiled graph's static address) no longer followed the model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import _notrace


class _FailingCopy:
    def __init__(self, at: int, error: type[BaseException]) -> None:
        self.copy, self.at, self.n, self.error = _notrace._copy, at, 0, error

    def __call__(self, buf: torch.Tensor) -> torch.Tensor:
        self.n += 1
        if self.n == self.at:
            raise self.error("simulated failure while copying a buffer")
        return self.copy(buf)


@pytest.mark.parametrize("what", ["fisher_norms", "kfac"])  # they keep every buffer
@pytest.mark.parametrize("error", [torch.OutOfMemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("at", [2, 3])
def test_failed_buffer_copy_leaves_the_models_buffers(
    what: str, at: int, error: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model.eval()
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = {n: (b, b.clone()) for n, b in model.named_buffers()}
    monkeypatch.setattr(_notrace, "_copy", _FailingCopy(at, error))
    call = getattr(cl, what)
    with pytest.raises(error):
        call(model, nn.CrossEntropyLoss(), (X, y))
    monkeypatch.undo()
    for n, b in model.named_buffers():
        assert b is before[n][0], n
        assert torch.equal(b, before[n][1]), n
    assert _notrace._copy.__module__ == "curvlab._notrace"  # the patch is gone
