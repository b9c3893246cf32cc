"""The process-wide memos (backend choice, examples-apart check) are keyed by the model's plain
attributes and by the model and parameters held weakly (review s26, LK-1 and LK-2).

A flag flipped on the same model object after a first call (``self.mix = True`` turning on
``h - h.mean(0)``) used to hit the memo and skip the examples-apart check: ``diag_fisher`` gave
0.2875 (hooks) or 0.0 (func) for the first layer where a fresh process raises
``MixedExamplesError``.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab._layout import MixedExamplesError
from curvlab._losses import loss_spec
from curvlab._scan import scan_model
from curvlab.backends._choice import CHOICES, signature
from curvlab.quantities._sweep import _APART


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 3)
        self.mix = False
        self.note = "a"  # a plain attribute the forward does not read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if self.mix:
            h = h - h.mean(0)
        return self.l2(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (8,), generator=g)
    return X, Y


def _model() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _brute_empirical_diag(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> dict:
    """(1/N) sum_n g_n^2, g_n the gradient of example n's cross-entropy (float64, torch.func)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, x, y):
        out = functional_call(model, p, (x[None],))
        return nn.functional.cross_entropy(out, y[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, X, Y)
    return {n: (v**2).mean(0) for n, v in g.items()}


@pytest.fixture(autouse=True)
def _fresh_memo():
    CHOICES.clear()
    _APART.clear()
    yield
    CHOICES.clear()
    _APART.clear()


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_flag_flipped_after_a_first_call_is_checked_again(kind: str) -> None:
    model, (X, Y) = _model(), _data()
    loss = nn.CrossEntropyLoss()
    first = cl.diag_fisher(model, loss, (X, Y), kind=kind)
    if kind == "empirical":
        want = _brute_empirical_diag(model, X, Y)
        for n, v in want.items():
            torch.testing.assert_close(first[n], v, rtol=1e-10, atol=1e-12)
    model.mix = True  # the forward now mixes the examples of a batch
    with pytest.raises(MixedExamplesError):
        cl.diag_fisher(model, loss, (X, Y), kind=kind)
    model.mix = False  # back as before: the same numbers (the first entry is hit again)
    again = cl.diag_fisher(model, loss, (X, Y), kind=kind)
    for n in want if kind == "empirical" else first.keys():
        torch.testing.assert_close(again[n], first[n], rtol=1e-12, atol=1e-14)


def test_gradient_stats_after_the_flag_flips_refuses() -> None:
    model, (X, Y) = _model(), _data()
    loss = nn.CrossEntropyLoss()
    cl.gradient_stats(model, loss, (X, Y))
    model.mix = True
    with pytest.raises(MixedExamplesError):
        cl.gradient_stats(model, loss, (X, Y))


def _key(model: nn.Module, X: torch.Tensor, Y: torch.Tensor):
    scan = scan_model(model)
    return signature(scan, loss_spec(nn.CrossEntropyLoss()), frozenset({"grad"}), "auto", X, Y)


def test_signature_follows_plain_attributes() -> None:
    """Design: any change of a public plain attribute is a new signature (the check runs again,
    harmless where the forward does not read it: ``note``); the same attributes give the same
    signature, so a repeated call, or one after a flag is set back, still hits the memo."""
    model, (X, Y) = _model(), _data()
    k0 = _key(model, X, Y)
    assert _key(model, X, Y) == k0  # repeated call: a hit
    model.mix = True
    assert _key(model, X, Y) != k0
    model.mix = False
    assert _key(model, X, Y) == k0
    model.note = "b"  # not read by the forward: still a new signature (checked again)
    assert _key(model, X, Y) != k0
    model.note = "a"
    model.l1.some_setting = 3  # a submodule's attribute counts too
    assert _key(model, X, Y) != k0


def test_repeated_call_hits_the_memo() -> None:
    model, (X, Y) = _model(), _data()
    loss = nn.CrossEntropyLoss()
    cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    n_apart, n_choices = len(_APART._entries), len(CHOICES._entries)
    assert n_apart == 1 and n_choices == 1
    cl.diag_fisher(model, loss, (X, Y), kind="empirical")
    assert (len(_APART._entries), len(CHOICES._entries)) == (n_apart, n_choices)


def test_signature_of_a_freed_model_matches_nothing() -> None:
    """The model and its parameters are held weakly in the key and compared by identity: an
    entry of a freed model is never hit by a later model, even one given the same ``id``."""
    model, (X, Y) = _model(), _data()
    k0, k1 = _key(model, X, Y), _key(model, X, Y)
    assert k0 == k1 and hash(k0) == hash(k1)
    del model
    gc.collect()
    assert k0 != k1  # the referent is gone: equal only to itself
    assert k0 == k0


def test_parameter_replaced_is_a_new_signature() -> None:
    model, (X, Y) = _model(), _data()
    k0 = _key(model, X, Y)
    old = model.l1.weight
    model.l1.weight = nn.Parameter(old.detach().clone())
    del old
    gc.collect()
    assert _key(model, X, Y) != k0


def test_a_bound_method_attribute_does_not_keep_the_model_alive() -> None:
    """Functions in plain attributes are in the key by weak reference: the process-wide memo
    keeps no closure or bound method (and the model it holds) alive."""
    import weakref

    model, (X, Y) = _model(), _data()
    model.act = model.extra_repr  # a bound method of the model itself
    k0 = _key(model, X, Y)
    assert _key(model, X, Y) == k0
    model.act = model.__repr__
    assert _key(model, X, Y) != k0
    cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, Y), kind="empirical")
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
