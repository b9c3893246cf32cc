"""Review s27 (MU): tests for two mutations the suite let survive.

1. ``collate_owners`` unwraps a partial of a partial with a ``while`` loop; ``if`` survived,
   because CPython flattens ``partial(partial(f))`` into one partial, so no test nested two.
   An inner partial that carries an attribute (``inner.__name__ = "collate"``, given for
   logging) is not flattened: on the mutant a call moved the bound method's generator and the
   next epoch's augmentation changed (max diff 0.33).
2. The endless ``itertools`` refusal was tested only end to end: with the refusal removed the
   test read ``itertools.repeat(batch)`` forever (a hung job, not a failure). Here the refusal is
   asserted directly, and the end-to-end calls read through a counter that raises after a few
   batches, so that a missing refusal fails in milliseconds.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
import curvlab._data as _data
from curvlab._unreadable_data import refuse_unreadable

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore")


# ------------------------------------------- 1. a partial of a named (unflattened) partial
class _Aug:
    """An augmenting collator whose noise comes from a generator its object holds."""

    def __init__(self) -> None:
        self.g = torch.Generator().manual_seed(0)

    def collate(self, items, scale: float = 0.1):  # noqa: ANN001, ANN201
        xb = torch.stack([a for a, _ in items])
        yb = torch.stack([b for _, b in items])
        return xb + scale * torch.randn(xb.shape, generator=self.g, dtype=xb.dtype), yb


def _nested_collate() -> functools.partial:
    inner = functools.partial(_Aug().collate)
    inner.__name__ = "collate"  # a partial with a __dict__: CPython keeps the nesting
    return functools.partial(inner, scale=0.1)


def test_partial_of_named_partial_collate_generator_kept() -> None:
    """A call leaves the next epoch's augmentation bit-identical when the ``collate_fn`` is a
    partial of a partial of a bound method (mutant: the call moved the generator, max diff
    0.33); the value is the dense float64 brute force ``(1/N) sum_n g_n^2`` on the batches
    that epoch reads."""
    fn = _nested_collate()
    # the nesting is really kept (else this test would not reach the loop's second pass)
    assert isinstance(fn.func, functools.partial)
    assert not isinstance(fn.func.func, functools.partial)
    assert isinstance(fn.func.func.__self__, _Aug)

    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (8,), generator=g)
    ds = TensorDataset(X, y)

    def make() -> DataLoader:
        return DataLoader(ds, batch_size=4, collate_fn=_nested_collate())

    expected = [(xb.clone(), yb.clone()) for xb, yb in make()]
    # the augmentation draws: a second epoch of a fresh loader differs from its first
    fresh = make()
    list(fresh)
    assert not torch.equal(next(iter(fresh))[0], expected[0][0])

    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    loader = make()
    got = cl.diag_fisher(model, nn.CrossEntropyLoss(), loader, kind="empirical")
    after = [(xb.clone(), yb.clone()) for xb, yb in loader]
    assert len(after) == len(expected)
    for (a, b), (u, v) in zip(after, expected):
        assert torch.equal(a, u) and torch.equal(b, v)

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    per = [
        torch.func.vmap(torch.func.grad(loss), (None, 0, 0))(params, xb, yb) for xb, yb in expected
    ]
    for k in params:
        want = torch.cat([p[k] for p in per]).square().mean(0)
        torch.testing.assert_close(got[k], want, rtol=1e-10, atol=1e-14)


# ------------------------------------------------- 2. endless itertools: fail, never hang
_ENDLESS = [
    pytest.param(lambda b: itertools.cycle([b]), "cycle", id="cycle"),
    pytest.param(lambda b: itertools.repeat(b), "repeat", id="repeat"),
    pytest.param(lambda b: itertools.count(), "count", id="count"),
]
_LIMIT = 5  # batches a mutant without the refusal may read before the counter stops it


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, dtype=DT, generator=g), torch.arange(4) % 3


@pytest.mark.parametrize(("endless", "name"), _ENDLESS)
def test_refuse_unreadable_refuses_endless_directly(endless, name: str) -> None:
    """The refusal itself, with nothing read: a ``TypeError`` naming the iterator's kind and
    the way out (``itertools.islice``); the iterator is left unread."""
    data = endless(_batch())
    with pytest.raises(TypeError, match=rf"endless itertools\.{name}\b.*itertools\.islice"):
        refuse_unreadable(data)
    if name == "count":
        assert next(data) == 0  # nothing was drawn from it
    # finite versions are accepted
    refuse_unreadable(itertools.islice(endless(_batch()), 3))
    refuse_unreadable(itertools.repeat(_batch(), 3))


@pytest.mark.parametrize(("endless", "name"), _ENDLESS)
@pytest.mark.parametrize("entry", ["diag_fisher", "trace"])
def test_endless_refused_end_to_end_bounded(
    endless, name: str, entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The public entry points refuse an endless iterator before its first batch is read. Every
    batch read goes through ``_check_batch``; a counter there fails the test after a few
    batches, so that a reader without the refusal fails instead of reading forever."""
    read = []
    check = _data._check_batch

    def counted(batch, index, finite=True):  # noqa: ANN001, ANN202
        read.append(index)
        if len(read) > _LIMIT:
            raise AssertionError(f"read {len(read)} batches of an endless {name}: not refused")
        return check(batch, index, finite)

    monkeypatch.setattr(_data, "_check_batch", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    data = endless(_batch())
    with pytest.raises(TypeError, match=rf"endless itertools\.{name}\b.*itertools\.islice"):
        if entry == "diag_fisher":
            cl.diag_fisher(model, nn.CrossEntropyLoss(), data)
        else:
            cl.trace(model, nn.CrossEntropyLoss(), data, num_probes=2, seed=0)
    assert read == []  # refused before anything was read
