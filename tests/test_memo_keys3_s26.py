"""The memo keys of review s26's RX7 findings.

- A forward that changes its own plain attribute (a call counter) missed both memos at every
  call, since curvlab's own check passes moved it: the examples-apart check re-ran at every
  ``Diagnostics`` and ``NoisyOptimizer`` step (4 forwards per step for 1, RX7-2). The attributes
  a call's forwards change are now state, left out of the keys.
- numpy scalars, ``functools.partial``, sets, long lists and big dicts kept as switches were not
  in the key (a flip measured a mixing model, RX7-1); they are keyed now, and a value that
  cannot be keyed makes the call unmemoised.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._layout import MixedExamplesError
from curvlab._losses import loss_spec
from curvlab._scan import scan_model
from curvlab.backends._choice import CHOICES, signature
from curvlab.quantities._sweep import _APART
from tests.test_memo_keys_s26 import _brute_empirical_diag

FORWARDS = [0]


@pytest.fixture(autouse=True)
def _fresh_memo():
    CHOICES.clear()
    _APART.clear()
    yield
    CHOICES.clear()
    _APART.clear()


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (n,), generator=g)
    return X, Y


class Counting(nn.Module):
    """Counts its forward passes in a plain attribute when ``count`` (a schedule's step)."""

    def __init__(self, count: bool) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 8)
        self.l2 = nn.Linear(8, 3)
        self.count = count
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FORWARDS[0] += 1
        if self.count:
            self.calls += 1
        return self.l2(torch.tanh(self.l1(x)))


def _forwards_per_call(count: bool) -> tuple[list[int], nn.Module, dict]:
    torch.manual_seed(0)
    model = Counting(count).double()
    X, Y = _data(16)
    per, last = [], None
    for _ in range(10):
        before = FORWARDS[0]
        last = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, Y), kind="empirical")
        per.append(FORWARDS[0] - before)
    return per, model, last


def test_counter_in_forward_hits_the_memo_after_the_first_call() -> None:
    """Before: [4, 4, 4, ...] forwards per call with the counter where [4, 1, 1, ...] without."""
    plain, _, _ = _forwards_per_call(False)
    CHOICES.clear()
    _APART.clear()
    counted, model, found = _forwards_per_call(True)
    assert counted == plain, (counted, plain)
    assert counted[0] > counted[1] and len(set(counted[1:])) == 1
    assert len(_APART._entries) == 1
    X, Y = _data(16)
    want = _brute_empirical_diag(model, X, Y)
    for name, value in want.items():
        torch.testing.assert_close(found[name], value, rtol=1e-10, atol=1e-13)


def test_counter_is_state_but_a_flag_next_to_it_is_still_a_switch() -> None:
    """The learned state is the counter alone: a flag flipped later is checked again."""
    torch.manual_seed(0)
    model = Counting(True).double()
    model.mix = False
    orig = model.forward

    def forward(x):
        out = orig(x)
        return out - out.mean(0) if model.mix else out

    model.forward = forward
    X, Y = _data()
    loss = nn.CrossEntropyLoss()
    cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    model.mix = True
    with pytest.raises(MixedExamplesError):
        cl.diag_fisher(model, loss, (X, Y), kind="empirical")


def test_noisy_optimizer_counter_checked_once() -> None:
    """Before: [5, 4, 4, ...] forwards per step and a new memo entry at every step."""
    per = {}
    for count in (False, True):
        torch.manual_seed(0)
        model = Counting(count).double()
        X, Y = _data(16)
        loss = nn.CrossEntropyLoss()
        noisy = cl.noise.NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.01),
            cl.noise.DiagFisherNoise(kind="empirical", large_batch=64, small_batch=16),
            model,
            loss,
            recompute_every=1,
            seed=0,
        )

        def closure(model=model, noisy=noisy, X=X, Y=Y, loss=loss):
            noisy.zero_grad()
            value = loss(model(X), Y)
            value.backward()
            return value

        per[count] = []
        for _ in range(10):
            before = FORWARDS[0]
            noisy.step(closure)
            per[count].append(FORWARDS[0] - before)
        assert len(noisy._apart._entries) == 1
    assert per[True] == per[False], per


def _ident(h):
    return h


def _center(h):
    return h - h.mean(0)


class Switched(nn.Module):
    """Mixes the examples once its switch, kept as ``how`` says, is flipped."""

    MIX = False

    def __init__(self, how: str) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 3)
        self.how = how
        if how == "np_bool":
            self.mix = np.bool_(False)
        elif how == "np_int":
            self.mode = np.int64(0)
        elif how == "partial_keywords":
            self.post = functools.partial(torch.sub, alpha=0.0)
        elif how == "partial_func":
            self.post = functools.partial(_ident)
        elif how == "set":
            self.mixing = set()
        elif how == "long_list":
            self.flags = [False] * 24
        elif how == "big_dict":
            self.opts = {f"k{i}": i for i in range(300)}
            self.opts["mix"] = False

    def flip(self) -> None:
        how = self.how
        if how == "np_bool":
            self.mix = np.bool_(True)
        elif how == "np_int":
            self.mode = np.int64(1)
        elif how == "partial_keywords":
            self.post = functools.partial(torch.sub, alpha=1.0)
        elif how == "partial_func":
            self.post = functools.partial(_center)
        elif how == "set":
            self.mixing.add("l1")
        elif how == "long_list":
            self.flags[20] = True
        elif how == "big_dict":
            self.opts["mix"] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        how = self.how
        mix = (
            (how == "np_bool" and self.mix)
            or (how == "np_int" and self.mode == 1)
            or (how == "set" and "l1" in self.mixing)
            or (how == "long_list" and self.flags[20])
            or (how == "big_dict" and self.opts["mix"])
        )
        if mix:
            h = h - h.mean(0)
        if how == "partial_keywords":
            h = self.post(h, h.mean(0, keepdim=True))
        if how == "partial_func":
            h = self.post(h)
        return self.l2(h)


KINDS = ["np_bool", "np_int", "partial_keywords", "partial_func", "set", "long_list", "big_dict"]


@pytest.mark.parametrize("how", KINDS)
def test_switch_of_other_kinds_is_checked_again(how: str) -> None:
    """Before: after the flip ``diag_fisher`` gave ``[0.01186, 0.00914]`` for
    ``l1.weight[0, :2]`` where a fresh model raises ``MixedExamplesError``."""
    torch.manual_seed(0)
    model = Switched(how).double()
    X, Y = _data()
    loss = nn.CrossEntropyLoss()
    found = cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    want = _brute_empirical_diag(model, X, Y)
    for name, value in want.items():
        torch.testing.assert_close(found[name], value, rtol=1e-10, atol=1e-13)
    again = cl.diag_fisher(model, loss, (X, Y), kind="empirical")  # a memo hit, same numbers
    for name, value in want.items():
        torch.testing.assert_close(again[name], value, rtol=1e-10, atol=1e-13)
    model.flip()
    with pytest.raises(MixedExamplesError):
        cl.diag_fisher(model, loss, (X, Y), kind="empirical")


def _key(model: nn.Module):
    X, Y = _data()
    return signature(scan_model(model), loss_spec(nn.CrossEntropyLoss()), frozenset(), "auto", X, Y)


def test_unkeyable_value_leaves_the_call_unmemoised() -> None:
    """A partial of an object that is not a plain value cannot be keyed: no signature (the
    call checks again), never a key without it."""
    model = Switched("np_bool").double()
    assert _key(model) is not None and _key(model) == _key(model)
    model.post = functools.partial(_ident, object())
    assert _key(model) is None
    model.post = functools.partial(_ident, 2.0, scale=np.float32(1.5), names=frozenset({"a"}))
    assert _key(model) is not None and _key(model) == _key(model)


class _DictOptions(nn.Module):
    """Options in one dict: a switch beside a call counter the forward moves."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 3)
        self.opts = {"mix": False, "calls": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.opts["calls"] += 1
        h = torch.tanh(self.l1(x))
        if self.opts["mix"]:
            h = h - h.mean(0)
        return self.l2(h)


def test_a_dict_holding_a_counter_is_not_learned_as_state() -> None:
    """Review s26 (RX8-1): the dict moved with its counter and was learned as state as a whole,
    so a later flip of its switch left the key unchanged and a mixing model was measured."""
    model = _DictOptions().double()
    X, Y = _data()
    got = cl.diag_fisher(model, nn.CrossEntropyLoss(), [(X, Y)], kind="empirical")
    want = _brute_empirical_diag(model, X, Y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)
    model.opts["mix"] = True
    with pytest.raises(MixedExamplesError):
        cl.diag_fisher(model, nn.CrossEntropyLoss(), [(X, Y)], kind="empirical")
