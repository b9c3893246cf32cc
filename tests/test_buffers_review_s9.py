"""Buffers inside curvlab's passes (review s9, own changes reviewed): only the buffers a forward
pass updates in place (norm layers' running statistics, spectral_norm's vectors) run on copies;
other buffers (frozen weights, rotary tables) are the user's own tensors, untouched."""

from __future__ import annotations

import sys
import types

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab.analysis._optimizer_state import (
    preconditioned_threshold,
    sharpness_threshold,
    unwrap_optimizer,
)
from curvlab.regularizers import gradient_penalty

DT = torch.float64


class _DynamicScale(nn.Module):
    """State in a buffer *and* an attribute, like HF's dynamic NTK rotary embedding: a longer
    input than seen so far re-registers the buffer scaled and raises the attribute."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(width, dtype=DT))
        self.seen = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.seen:
            self.register_buffer("scale", self.scale * 0.5)
            self.seen = x.shape[1]
        return x * self.scale[: x.shape[1]]


class _FrozenBase(nn.Module):
    """A frozen weight kept as a buffer (a quantised base under LoRA) and a trainable adapter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("base", torch.randn(4, 4, dtype=DT))
        self.adapter = nn.Linear(4, 3).to(DT)
        self.seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add(id(self.base))
        return self.adapter(torch.tanh(x @ self.base))


def test_a_module_with_state_in_a_buffer_and_an_attribute_stays_consistent():
    torch.manual_seed(1)
    model = nn.Sequential(_DynamicScale(8), nn.Linear(8, 3)).to(DT)
    X, y = torch.randn(6, 8, dtype=DT), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    reference = nn.Sequential(_DynamicScale(8), nn.Linear(8, 3)).to(DT)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference(X)  # has seen such an input: scaled once, as the model's own forward does
    params = dict(reference.named_parameters())

    def one(p, x, t):
        return loss_fn(functional_call(reference, p, (x[None],)), t[None])

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, X, y)
    got = cl.gradient_stats(model, loss_fn, (X, y), chunk_size=2)
    for k in per:
        assert torch.allclose(got.mean[k], per[k].mean(0), rtol=1e-10, atol=1e-14), k
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))


def test_frozen_weights_kept_as_buffers_are_not_copied():
    model = _FrozenBase()
    X, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y))
    cl.trace(model, nn.CrossEntropyLoss(), (X, y), matrix="ggn", num_probes=2, seed=0)
    gradient_penalty(model, nn.CrossEntropyLoss(), X, y).backward()  # its own forward
    assert model.seen == {id(model.base)}


def _fake_module(monkeypatch, name: str, source: str) -> types.ModuleType:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    mod = sys.modules[name]
    exec(compile(source, name.replace(".", "/") + ".py", "exec"), mod.__dict__)
    return mod


_SWAPPING_WRAPPER = """
class {cls}:
    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type("{prefix}" + type(optimizer).__name__, (self.__class__, type(optimizer)), {{}})

    def __getattr__(self, key):
        return getattr(self.__dict__["_optimizer"], key)

    @property
    def param_groups(self):
        return self._optimizer.param_groups

    @property
    def state(self):
        return self._optimizer.state
"""


def test_lightning_and_fabric_wrappers_that_swap_their_class_are_unwrapped(monkeypatch):
    """LightningOptimizer and Fabric's wrapper make a class per instance ("LightningSGD", bases
    (LightningOptimizer, SGD)): the first version of the wrapper list looked at that class's own
    name and refused them."""
    model = nn.Linear(3, 2)
    lightning = _fake_module(
        monkeypatch,
        "lightning.pytorch.core.optimizer",
        _SWAPPING_WRAPPER.format(cls="LightningOptimizer", prefix="Lightning"),
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = lightning.LightningOptimizer(sgd)
    assert type(wrapped).__name__ == "LightningSGD" and unwrap_optimizer(wrapped) is sgd
    assert sharpness_threshold(wrapped) == 20.0
    fabric = _fake_module(
        monkeypatch,
        "lightning.fabric.wrappers",
        _SWAPPING_WRAPPER.format(cls="_FabricOptimizer", prefix="Fabric"),
    )
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    assert unwrap_optimizer(fabric._FabricOptimizer(adam)) is adam
    assert abs(preconditioned_threshold(fabric._FabricOptimizer(adam)) - 380.0) < 1e-9
