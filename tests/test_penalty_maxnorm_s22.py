"""A penalty's own forward pass on a model with an ``nn.Embedding(max_norm=...)`` (or
``EmbeddingBag``) computes at the renormalised rows, puts the user's weight back and warns, as
every other curvlab call does (docs/models.md). Review s22: ``fisher_penalty``,
``gradient_penalty``, ``random_label_penalty`` and ``GradientNormPenalty`` left the weight
renormalised in place (largest row norm 6.6 -> 0.5), with no warning.

The value and the gradient of the penalty (differentiated by the user's own backward, after the
weight was put back) are checked against dense float64 brute force at the renormalised rows;
where the penalty's graph itself reads the weight (a tied head) the weight cannot be put back
without breaking the user's backward: it is left renormalised, with a warning saying so."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab.regularizers as R

ALPHA = 0.3
MAX_NORM = 0.5
# float64, 43 parameters: the value and the gradient are sums of a few hundred rounded products
# of entries of order 1 (unit roundoff 1.1e-16); 1e-10 is far above that and far below the
# difference the unrenormalised rows make (their norms are up to 15x max_norm)
TOL = 1e-10


class _Model(nn.Module):
    """An embedding with ``max_norm`` (rows far longer than it), a tanh layer and a head; with
    ``tied`` the logits are ``h @ emb.weight.T`` (the weight read outside the embedding too)."""

    def __init__(self, tied: bool = False, bag: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        kind = nn.EmbeddingBag if bag else nn.Embedding
        self.emb = kind(5, 3, max_norm=MAX_NORM).double()
        self.mid = nn.Linear(3, 3).double()
        self.head = nn.Linear(3, 5).double()
        self.tied = tied
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
            self.emb.weight.mul_(3.0)  # row norms 2.5 to 7.5: every row is renormalised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = torch.tanh(self.mid(e if isinstance(self.emb, nn.EmbeddingBag) else e.mean(1)))
        return h @ self.emb.weight.T if self.tied else self.head(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[0, 1], [2, 3], [1, 4], [0, 2]]), torch.tensor([0, 3, 1, 4])


def _renormalised(model: _Model, x: torch.Tensor) -> torch.Tensor:
    """The weight after torch's renormalisation of the rows ``x`` looks up (on a copy)."""
    w = model.emb.weight.detach().clone()
    F.embedding(x, w, max_norm=MAX_NORM)
    return w


def _brute(
    model: _Model, weight: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``P = alpha * ||grad L||^2`` at the data labels, the gradient of ``P`` and that of
    ``L + P``, with the embedding's weight set to ``weight`` and read as is (no max_norm: torch
    renormalises under ``no_grad``, so autograd's derivative is that of a lookup of the
    renormalised rows)."""
    x, y = _data()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    start["emb.weight"] = weight.clone()

    def loss(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        e = F.embedding(x, ps["emb.weight"]).mean(1)
        h = torch.tanh(e @ ps["mid.weight"].T + ps["mid.bias"])
        out = h @ ps["emb.weight"].T if model.tied else h @ ps["head.weight"].T + ps["head.bias"]
        return F.cross_entropy(out, y)

    def penalty(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        g = torch.func.grad(loss)(ps)
        return ALPHA * sum((gi**2).sum() for gi in g.values())

    def total(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss(ps) + penalty(ps)

    return penalty(start), torch.func.grad(penalty)(start), torch.func.grad(total)(start)


def _fisher(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return R.fisher_penalty(m, nn.CrossEntropyLoss(), x, alpha=ALPHA)


def _gradient(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return R.gradient_penalty(m, nn.CrossEntropyLoss(), x, y, alpha=ALPHA)


def _random(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return R.random_label_penalty(m, nn.CrossEntropyLoss(), x, alpha=ALPHA)


def _class(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return R.GradientNormPenalty(m, nn.CrossEntropyLoss(), kind="gradient", alpha=ALPHA)(x, y)


def _renorm_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, RuntimeWarning) and "max_norm" in str(w.message)
    ]


@pytest.mark.parametrize("call", [_fisher, _gradient, _random, _class])
def test_own_forward_puts_the_weight_back_and_warns(call: Callable[..., torch.Tensor]) -> None:
    model = _Model()
    x, y = _data()
    before = model.emb.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = call(model, x, y)
    assert torch.equal(model.emb.weight.detach(), before)  # was renormalised in place
    said = _renorm_warnings(caught)
    assert len(said) == 1 and "'emb'" in said[0]
    assert torch.isfinite(value)


def test_value_and_gradient_at_the_renormalised_rows() -> None:
    """The penalty first, then the user's own loss (whose forward renormalises again): one
    backward of both, against brute force at the renormalised rows; putting the weight back in
    place does not trip autograd's check of in-place changes."""
    model = _Model()
    x, y = _data()
    before = model.emb.weight.detach().clone()
    expected_value, _, expected_grads = _brute(model, _renormalised(model, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        penalty = _gradient(model, x, y)
    assert torch.equal(model.emb.weight.detach(), before)
    torch.testing.assert_close(penalty.detach(), expected_value, rtol=TOL, atol=0)
    loss = F.cross_entropy(model(x), y)  # the user's forward: torch renormalises the rows
    (loss + penalty).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=TOL, atol=TOL)


def test_penalty_alone_backward_matches_brute_force() -> None:
    """The penalty's own backward, with the weight put back before it."""
    model = _Model()
    x, y = _data()
    value, grads, _ = _brute(model, _renormalised(model, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        penalty = _gradient(model, x, y)
    penalty.backward()
    torch.testing.assert_close(penalty.detach(), value, rtol=TOL, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=TOL, atol=TOL)


def test_rows_already_renormalised_no_warning() -> None:
    """The usual step (the user's forward first) changes no row: nothing to put back, no
    warning."""
    model = _Model()
    x, y = _data()
    with torch.no_grad():
        model(x)
    before = model.emb.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _gradient(model, x, y)
    assert _renorm_warnings(caught) == []
    assert torch.equal(model.emb.weight.detach(), before)


def test_tied_weight_left_renormalised_and_backward_works() -> None:
    """The penalty's graph reads the weight (``h @ emb.weight.T``): putting it back in place
    would make the user's backward fail; it is left renormalised, with a warning saying so, and
    the value and gradient are those at the renormalised rows."""
    model = _Model(tied=True)
    x, y = _data()
    renormed = _renormalised(model, x)
    expected_value, expected_grads, _ = _brute(model, renormed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        penalty = _gradient(model, x, y)
    said = _renorm_warnings(caught)
    assert len(said) == 1 and "left" in said[0] and "'emb'" in said[0]
    assert torch.equal(model.emb.weight.detach(), renormed)
    torch.testing.assert_close(penalty.detach(), expected_value, rtol=TOL, atol=0)
    penalty.backward()  # no in-place error
    for name in ("emb.weight", "mid.weight", "mid.bias"):
        torch.testing.assert_close(
            model.get_parameter(name).grad, expected_grads[name], rtol=TOL, atol=TOL
        )


def test_embedding_bag_refused_weight_put_back() -> None:
    """An EmbeddingBag has no double backward: the penalty is refused after its forward, and the
    weight that forward renormalised is put back."""
    model = _Model(bag=True)
    x, y = _data()
    before = model.emb.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(NotImplementedError):
            _gradient(model, x, y)
    assert torch.equal(model.emb.weight.detach(), before)
