"""Review s20: a plain tensor attribute that a model's forward reads, against a held operator.

An operator whose products run the model's forward pass again (several batches, graphs not
kept) refuses products after the model changed since its build: parameters and buffers
(:class:`~curvlab.operators._state.ModelState`), modules, hooks and plain attributes
(:class:`~curvlab.operators._structure.ModelStructure`). A tensor kept in a plain attribute (a
temperature ``self.temp = torch.tensor(1.0)``, an unregistered mask) was compared by neither:
changed in place after the build, the products were silently the new model's (a Hessian product
off by 1.2 in norm). Now the tensor attributes the structure walk visits are fingerprinted by
their bits and refused like a buffer change, except those the operator's own forward passes
write (an activation kept for inspection, a cache). Right numbers: dense float64 Hessians with
``torch.func``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import curvlab as cl
from curvlab.operators._state import ModelStateError

DT = torch.float64


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g)
    return [(X[:3], y[:3]), (X[3:], y[3:])]


def _dense_hessian(model: nn.Module, batches: int = 2) -> torch.Tensor:
    """The Hessian of the mean cross-entropy over the first ``batches`` batches together (3
    examples each)."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    names, shapes = list(named), [p.shape for p in named.values()]
    sizes = [p.numel() for p in named.values()]
    X = torch.cat([x for x, _ in _batches()[:batches]])
    y = torch.cat([t for _, t in _batches()[:batches]])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, (t.view(s) for t, s in zip(theta.split(sizes), shapes))))
        return nn.functional.cross_entropy(functional_call(model, params, (X,)), y)

    return hessian(loss)(torch.cat([p.reshape(-1) for p in named.values()]))


class _Tempered(nn.Module):
    """Logits divided by a temperature kept in a plain tensor attribute (not a buffer); with
    ``keep``, the forward also keeps its hidden activation and a running count in plain tensor
    attributes of its own (the model's own state, written at every pass)."""

    def __init__(self, keep: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4).to(DT)
        self.head = nn.Linear(4, 2).to(DT)
        self.temp = torch.tensor(2.0, dtype=DT)
        self.keep = keep
        self.count = torch.zeros((), dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        if self.keep:
            self.hidden = h  # an activation kept for inspection
            self.count.add_(1.0)  # in place, at every pass
        return self.head(h) / self.temp


def _set_temp_in_place(m: _Tempered) -> None:
    m.temp.fill_(3.0)


def _set_temp_through_data(m: _Tempered) -> None:
    m.temp.data.fill_(3.0)  # (moves no version counter)


def _replace_temp(m: _Tempered) -> None:
    m.temp = torch.tensor(3.0, dtype=DT)


_CHANGES = {
    "in place": _set_temp_in_place,
    "through .data": _set_temp_through_data,
    "replaced": _replace_temp,
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_a_plain_tensor_attribute_changed_after_the_build_is_refused(change):
    model = _Tempered()
    H = _dense_hessian(model)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches())
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    _CHANGES[change](model)
    assert not torch.allclose(_dense_hessian(model) @ v, H @ v)  # the change matters
    with pytest.raises(
        RuntimeError,
        match=r"changed since this operator was built: .*temp.*plain attribute",
    ):
        op @ v


def test_the_same_values_in_a_new_tensor_are_accepted():
    model = _Tempered()
    H = _dense_hessian(model)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches())
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    model.temp = model.temp.clone()
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)


def test_tensor_attributes_the_forward_writes_are_the_models_own_state():
    model = _Tempered(keep=True)
    H = _dense_hessian(_Tempered())  # (the same weights; the kept state changes no value)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches())
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    for _ in range(2):
        torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    model(torch.randn(5, 3, dtype=DT))  # the user's own forward: other hidden, count + 1
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)


def test_a_kept_graph_refuses_after_a_plain_tensor_attribute_changed_through_data():
    """One batch: the graph kept at construction holds the tensor, and its backward read the
    new value (a product neither the old matrix nor the new one, 0.2 off, accepted before)."""
    model = _Tempered()
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches()[0])
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    op @ v
    _set_temp_through_data(model)
    with pytest.raises(RuntimeError, match=r"values of 'temp \(a tensor in a plain attribute\)'"):
        op @ v


def test_a_kept_graph_refuses_after_a_plain_tensor_attribute_changed_in_place():
    """One batch: the graph kept at construction saved the temperature, and autograd raised
    its raw "modified by an inplace operation" error at the next product (and at every retry)
    in place of the ModelStateError promised for a changed attribute."""
    model = _Tempered()
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches()[0])
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(op @ v, _dense_hessian(model, 1) @ v, rtol=1e-10, atol=1e-12)
    _set_temp_in_place(model)
    for _ in range(2):  # refused before the product, the same at a retry
        with pytest.raises(
            ModelStateError,
            match=r"tensors changed since .*'temp \(a tensor in a plain attribute\)' changed in place",
        ):
            op @ v


def test_a_plain_tensor_attribute_rewritten_in_place_with_the_same_values_is_accepted():
    # the version counter moved, the values did not: the kept graph is built again (it saved
    # the old version), and the products are the matrix as built
    model = _Tempered()
    H = _dense_hessian(model, 1)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches()[0])
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    op @ v
    model.temp.fill_(2.0)
    for _ in range(2):
        torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)


class _Scaled(nn.Module):
    """Logits divided by a plain tensor attribute that the forward itself writes in place at
    every pass (the model's own state): a constant 2.0 (``stat=False``) or a statistic of the
    batch (``stat=True``), a per-batch constant either way; ``pure``: the same function with
    the divisor computed, no attribute (the brute force's)."""

    def __init__(self, stat: bool, pure: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4).to(DT)
        self.head = nn.Linear(4, 2).to(DT)
        self.scale = torch.ones((), dtype=DT)
        self.stat, self.pure = stat, pure

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        divisor = x.detach().abs().mean() if self.stat else torch.tensor(2.0, dtype=DT)
        if not self.pure:
            self.scale.copy_(divisor)
            divisor = self.scale
        return self.head(torch.tanh(self.lin(x))) / divisor


@pytest.mark.parametrize("stat", [False, True])
def test_a_kept_graph_after_a_forward_that_writes_its_own_tensor_attribute(stat):
    """One batch, the graph kept at construction saved ``scale``, which the forward writes in
    place: after the user's own forward (another batch) every product raised autograd's raw
    "modified by an inplace operation" error (review s20). The kept graph is built again: the
    product at the model's current state, as a fresh operator's and the dense Hessian's."""
    model = _Scaled(stat)
    H = _dense_hessian(_Scaled(stat, pure=True), 1)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches()[0])
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    model(torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=DT))
    for _ in range(2):
        torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    fresh = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches()[0])
    torch.testing.assert_close(op @ v, fresh @ v, rtol=1e-12, atol=1e-14)
    # the same over several batches (graphs not kept): every product runs the forward again
    two = cl.curvature_operator(model, nn.CrossEntropyLoss(), _batches())
    first = two @ v
    model(torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=DT))
    torch.testing.assert_close(two @ v, first, rtol=1e-12, atol=1e-14)
