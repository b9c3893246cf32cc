"""Follow-ups of review s19's fixes (reviewer R).

* The NQM's number checks take 0-d torch tensors that ``float`` reads (bfloat16, one that
  requires gradient), as before review s19; bools, complex numbers and tensors of more entries
  stay refused.
* A reentrant-checkpointed block (``use_reentrant=True``) whose own parameters are frozen, after
  trainable layers: their gradient must pass through its backward node, which
  ``torch.autograd.grad`` cannot run. One clear ``ValueError`` naming them and
  ``use_reentrant=False``, at the call's first backward pass, in place of torch's raw error; a
  call about the later layers alone (``params=``) is computed.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian
from torch.utils.checkpoint import checkpoint

import curvlab as cl
from curvlab.nqm import NQM

# ---------------------------------------------------------------- NQM numbers given as tensors


@pytest.mark.parametrize(
    "make",
    [
        lambda v: torch.tensor(v, dtype=torch.bfloat16),
        lambda v: torch.tensor(v, dtype=torch.float16),
        lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True),
    ],
    ids=["bfloat16", "float16", "requires_grad"],
)
def test_nqm_takes_a_zero_dim_tensor_float_reads(make):
    nqm = NQM.paper(d=100, bins=10)
    # 0.5, 0.25 and 8 are exact in every dtype here: the same numbers as the floats
    want = nqm.risk(3, lr=0.5, batch_size=8, momentum=0.25)
    got = nqm.risk(3, lr=make(0.5), batch_size=make(8.0), momentum=make(0.25))
    assert got == want


@pytest.mark.parametrize(
    "value, shown",
    [
        (torch.tensor(True), "not a number"),
        (torch.tensor(0.5 + 0j), "not a number"),
        (torch.tensor([0.5]), "shape (1,)"),
        (torch.tensor([0.5, 0.25], dtype=torch.bfloat16), "shape (2,)"),
        (np.array([0.5]), "shape (1,)"),
        ("0.5", "not a number"),
    ],
)
def test_nqm_still_refuses_what_is_not_one_real_number(value, shown):
    nqm = NQM.paper(d=100, bins=10)
    with pytest.raises(ValueError, match="lr must be a finite number > 0") as e:
        nqm.risk(3, lr=value, batch_size=8)
    assert shown in str(e.value)


# ---------------------------------------------------------------- reentrant checkpoint, frozen


class _Frozen(nn.Module):
    """``Linear(3, 4) -> tanh -> [frozen Linear(4, 4), checkpointed] -> tanh -> Linear(4, 2)``."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.l0, self.blk, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.reentrant = reentrant
        self.blk.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l0(x))
        h = checkpoint(self.blk, h, use_reentrant=self.reentrant)
        return self.head(torch.tanh(h))


def _setup(reentrant: bool) -> tuple[_Frozen, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = _Frozen(reentrant).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g)
    return model, (x, torch.randint(0, 2, (6,), generator=g))


CALLS = {
    "trace": lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, method="exact").value,
    "gradient_stats": lambda m, d: cl.gradient_stats(m, nn.CrossEntropyLoss(), d).noise_scale,
    "diag_fisher": lambda m, d: cl.diag_fisher(m, nn.CrossEntropyLoss(), d),
    "kfac": lambda m, d: cl.kfac(m, nn.CrossEntropyLoss(), d),
    "eigenvalues": lambda m, d: cl.eigenvalues(m, nn.CrossEntropyLoss(), d).values,
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_frozen_reentrant_checkpoint_after_trainable_layers_is_refused_clearly(name):
    model, data = _setup(reentrant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own use_reentrant notes)
        with pytest.raises(ValueError, match="use_reentrant=False") as e:
            CALLS[name](model, data)
    assert "'l0.weight', 'l0.bias'" in str(e.value)  # the culprits, not torch's .grad() error
    assert "head" not in str(e.value)
    assert all(p.grad is None for p in model.parameters())


def _hessian_trace(model: _Frozen, x: Tensor, y: Tensor, names: list[str]) -> float:
    """Tr(H) of the mean cross-entropy over the parameters ``names``, dense, by torch.func, on
    the model's function written out (no checkpoint: the same values)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    theta = torch.cat([params[n].reshape(-1) for n in names])
    shapes = [params[n].shape for n in names]

    def loss(t: Tensor) -> Tensor:
        pieces = torch.split(t, [s.numel() for s in shapes])
        p = {**params, **{n: v.view(s) for n, v, s in zip(names, pieces, shapes)}}
        h = torch.tanh(F.linear(x, p["l0.weight"], p["l0.bias"]))
        h = torch.tanh(F.linear(h, p["blk.weight"], p["blk.bias"]))
        return F.cross_entropy(F.linear(h, p["head.weight"], p["head.bias"]), y)

    return float(hessian(loss)(theta).trace())


def test_frozen_layers_before_it_or_the_non_reentrant_form_are_measured():
    # the check refuses only what torch.autograd.grad cannot do: a pass about the head alone
    # prunes the checkpoint's node
    model, (x, y) = _setup(reentrant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = cl.trace(model, nn.CrossEntropyLoss(), (x, y), method="exact", params="head")
        with pytest.raises(ValueError, match="use_reentrant=False"):
            cl.trace(model, nn.CrossEntropyLoss(), (x, y), method="exact", params="l0")
    want = _hessian_trace(model, x, y, ["head.weight", "head.bias"])
    assert float(got.value) == pytest.approx(want, rel=1e-10)
    model.l0.requires_grad_(False)  # the checkpoint then lies on no path to a trainable one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = cl.trace(model, nn.CrossEntropyLoss(), (x, y), method="exact").value
    want = _hessian_trace(model, x, y, ["head.weight", "head.bias"])
    assert float(got) == pytest.approx(want, rel=1e-10)
    model, (x, y) = _setup(reentrant=False)
    got = cl.trace(model, nn.CrossEntropyLoss(), (x, y), method="exact").value
    want = _hessian_trace(model, x, y, ["l0.weight", "l0.bias", "head.weight", "head.bias"])
    assert float(got) == pytest.approx(want, rel=1e-10)
