"""The memo keys follow the switches users keep (review s26, RX5-1..3).

- ``NoisyOptimizer``'s captured-step check (its own examples-apart memo, ``_call_key``) keys on
  the same plain attributes as the backend-choice memo: a ``self.mix`` flipped after a first
  step drew noise from undefined per-example diagonals (RX5-1).
- The plain attributes of a module include its private ones (``self._mix``, not nn.Module's
  own internals), the plain values of its dicts (``self.opts["mix"]``) and one level of plain
  attributes of a config object it holds (``self.config.mix``; each distinct object read once
  per call): a switch kept there was skipped (``diag_fisher`` gave numbers, RX5-2).
- A forward that differentiates only with gradient is refused by ``NoisyOptimizer.step(closure)``
  with ``DifferentiatingForwardError``, as by ``sample()``: it said ``MixedExamplesError``
  (RX5-3).
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._differentiating_forward import DifferentiatingForwardError
from curvlab._layout import MixedExamplesError
from curvlab._losses import loss_spec
from curvlab._scan import scan_model
from curvlab.backends._choice import CHOICES, signature
from curvlab.operators._structure import plain_attributes
from curvlab.quantities._sweep import _APART
from tests.test_memo_keys_s26 import _brute_empirical_diag

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_modes2_s26 import _pinn_data  # noqa: E402


@dataclasses.dataclass
class _Options:
    mix: bool = False


class Net(nn.Module):
    """Mixes the examples (``h - h.mean(0)``) when its switch is on; ``how`` says where the
    switch is kept."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 3)
        self.how = how
        if how == "public":
            self.mix = False
        elif how == "private":
            self._mix = False
        elif how == "namespace":
            self.config = types.SimpleNamespace(mix=False, hidden=4)
        elif how == "dataclass":
            self.config = _Options()
        elif how == "dict":
            self.opts = {"mix": False, "weights": torch.ones(2)}

    def set_mix(self, value: bool) -> None:
        if self.how == "public":
            self.mix = value
        elif self.how == "private":
            self._mix = value
        elif self.how in ("namespace", "dataclass"):
            self.config.mix = value
        else:
            self.opts["mix"] = value

    def mixing(self) -> bool:
        if self.how == "public":
            return self.mix
        if self.how == "private":
            return self._mix
        if self.how in ("namespace", "dataclass"):
            return self.config.mix
        return self.opts["mix"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if self.mixing():
            h = h - h.mean(0)
        return self.l2(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (8,), generator=g)
    return X, Y


def _model(how: str) -> Net:
    torch.manual_seed(0)
    return Net(how).double()


@pytest.fixture(autouse=True)
def _fresh_memo():
    CHOICES.clear()
    _APART.clear()
    yield
    CHOICES.clear()
    _APART.clear()


SWITCHES = ["private", "namespace", "dataclass", "dict"]


@pytest.mark.parametrize("how", SWITCHES)
def test_switch_kept_privately_in_a_config_or_a_dict_is_checked_again(how: str) -> None:
    """Before: after the flip ``diag_fisher`` gave ``[0.02725, 0.03526]`` for ``l1.weight[0, :2]``
    (RX5-2) where a fresh model raises ``MixedExamplesError``."""
    model, (X, Y) = _model(how), _data()
    loss = nn.CrossEntropyLoss()
    first = cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    want = _brute_empirical_diag(model, X, Y)
    for n, v in want.items():
        torch.testing.assert_close(first[n], v, rtol=1e-10, atol=1e-12)
    entries = (len(_APART._entries), len(CHOICES._entries))
    again = cl.diag_fisher(model, loss, (X, Y), kind="empirical")  # unchanged: the memo is hit
    assert (len(_APART._entries), len(CHOICES._entries)) == entries
    model.set_mix(True)
    with pytest.raises(MixedExamplesError):
        cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    model.set_mix(False)  # back as before: exact again
    back = cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    for n, v in want.items():
        torch.testing.assert_close(again[n], v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(back[n], v, rtol=1e-10, atol=1e-12)


def _key(model: nn.Module, X: torch.Tensor, Y: torch.Tensor):
    scan = scan_model(model)
    return signature(scan, loss_spec(nn.CrossEntropyLoss()), frozenset({"grad"}), "auto", X, Y)


@pytest.mark.parametrize("how", SWITCHES)
def test_signature_follows_the_switch(how: str) -> None:
    model, (X, Y) = _model(how), _data()
    k0 = _key(model, X, Y)
    assert _key(model, X, Y) == k0
    model.set_mix(True)
    assert _key(model, X, Y) != k0
    model.set_mix(False)
    assert _key(model, X, Y) == k0


def test_torch_internals_and_non_plain_values_are_not_attributes() -> None:
    """nn.Module's own entries and torch's private names are not switches; tensors, modules and
    nested containers in a dict are left out; a dict or object without plain values is too."""
    linear = plain_attributes(nn.Linear(2, 2))
    assert linear == (("in_features", 2), ("out_features", 2))
    for m in (nn.Conv2d(1, 1, 3), nn.GRU(2, 2), nn.MultiheadAttention(4, 2), nn.Dropout()):
        assert not any(k.startswith("_") for k, _ in plain_attributes(m))
    m = nn.Linear(2, 2)
    m.compile()  # sets _compiled_call_impl: not a switch
    assert plain_attributes(m) == linear
    m = nn.Linear(2, 2)
    m._flag = True
    m.opts = {"a": 1, "t": torch.ones(1), "nested": {"b": 2}}
    m.empty = {"t": torch.ones(1)}
    m.cfg = types.SimpleNamespace(x=1, t=torch.ones(1))
    found = dict(plain_attributes(m))
    assert found["_flag"] is True
    assert "empty" not in found
    assert found["opts"] != dict(plain_attributes(nn.Linear(2, 2))).get("opts")
    m.opts["t"] = torch.zeros(1)  # a tensor value is not part of it
    assert dict(plain_attributes(m)) == found
    m.opts["a"] = 2
    assert dict(plain_attributes(m))["opts"] != found["opts"]


class _CountingConfig:
    """A config object counting the reads of its ``__dict__``."""

    reads = 0

    def __init__(self) -> None:
        self.mix = False
        self.hidden = 4

    def __getattribute__(self, name: str):
        if name == "__dict__":
            type(self).reads += 1
        return object.__getattribute__(self, name)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = _CountingConfig()
        self.config = cfg
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
        for layer in self.layers:
            layer.config = cfg
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
            if self.config.mix:
                x = x - x.mean(0)
        return self.head(x)


def test_config_shared_by_modules_is_read_once_per_call() -> None:
    torch.manual_seed(0)
    model = _Shared().double()
    X, Y = _data()
    _CountingConfig.reads = 0
    k0 = _key(model, X, Y)
    assert _CountingConfig.reads == 1  # 6 modules hold it: read once
    assert _key(model, X, Y) == k0
    model.config.mix = True
    assert _key(model, X, Y) != k0
    loss = nn.CrossEntropyLoss()
    model.config.mix = False
    cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    model.config.mix = True
    with pytest.raises(MixedExamplesError):
        cl.diag_fisher(model, loss, (X, Y), kind="empirical")


def test_hf_pretrained_config_switch() -> None:
    transformers = pytest.importorskip("transformers")
    model, (X, Y) = _model("namespace"), _data()
    model.config = transformers.PretrainedConfig(mix=False)
    loss = nn.CrossEntropyLoss()
    first = cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    want = _brute_empirical_diag(model, X, Y)
    for n, v in want.items():
        torch.testing.assert_close(first[n], v, rtol=1e-10, atol=1e-12)
    model.config.mix = True
    with pytest.raises(MixedExamplesError):
        cl.diag_fisher(model, loss, (X, Y), kind="empirical")


def _noisy(model: nn.Module, X, Y):
    loss = nn.CrossEntropyLoss()
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        cl.noise.DiagFisherNoise(kind="empirical", large_batch=64, small_batch=8),
        model,
        loss,
        recompute_every=1,
        seed=0,
    )

    def closure():
        noisy.zero_grad()
        value = loss(model(X), Y)
        value.backward()
        return value

    return noisy, closure


@pytest.mark.parametrize("how", ["public", "private", "namespace", "dict"])
def test_noisy_optimizer_checks_a_flipped_switch_again(how: str) -> None:
    """Before: ``['ok', 'ok', 'ok']`` with the flag flipped after step 0 (noise from undefined
    per-example diagonals) where a model mixing from the start is refused at every step."""
    model, (X, Y) = _model(how), _data()
    noisy, closure = _noisy(model, X, Y)
    noisy.step(closure)
    assert len(noisy._apart._entries) == 1
    noisy.step(closure)  # unchanged: the remembered check, no new entry
    assert len(noisy._apart._entries) == 1
    model.set_mix(True)
    for _ in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(MixedExamplesError):
            noisy.step(closure)
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model.set_mix(False)
    noisy.step(closure)  # the first entry again
    assert len(noisy._apart._entries) == 1


def test_noisy_optimizer_refuses_a_cheap_inference_forward_by_name() -> None:
    """Before: ``MixedExamplesError`` ("the output of examples 0 and 5 ... differs") from the
    captured step, where ``sample()`` raises ``DifferentiatingForwardError``."""
    m, X, y = _pinn_data()
    loss = nn.MSELoss()
    sampler = cl.noise.DiagFisherNoise(kind="empirical", large_batch=64, small_batch=6)
    with pytest.raises(DifferentiatingForwardError, match="torch.autograd.grad"):
        sampler.sample(m, loss, X, y, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    noisy = cl.noise.NoisyOptimizer(opt, sampler, m, loss, recompute_every=1, seed=0)

    def closure():
        noisy.zero_grad()
        value = loss(m(X), y)
        value.backward()
        return value

    before = [p.detach().clone() for p in m.parameters()]
    for _ in range(2):
        with pytest.raises(DifferentiatingForwardError, match="torch.autograd.grad"):
            noisy.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
