"""The hooks backend's routes for large layers, forced onto tiny models and checked by brute force.

GPT-2-sized layers take other code paths than the tests' tiny models: weights of at least
``PER_EXAMPLE_PRODUCTS`` entries get their per-example gradients one example at a time (Linear on
sequences, HF ``Conv1D``), and parameters used several times (a tied embedding and head) are built
in blocks of examples, the embedding adding into the head's tensor. Here both thresholds are set
so low that every layer of the zoo's sequence models takes those routes, and the results must
still equal the dense float64 references of tests/bruteforce.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.backends import _hooks, _layers, _rules
from curvlab.quantities import _norms
from tests import bruteforce as B
from tests.test_any_model import case_and_ref

ENTRIES = ("tiny_gpt", "hf_gpt2", "seq_ce_gpt", "shared_linear", "twice_linear", "embedding_clf")
NAMES = [f"{e}-{r}-{b}" for e in ENTRIES for r in ("mean", "sum") for b in ("one", "three")]


@pytest.fixture(params=[1, 2**40], ids=["one-example-blocks", "one-block"])
def large_routes(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.setattr(_layers, "PER_EXAMPLE_PRODUCTS", 1)
    monkeypatch.setattr(_rules, "PER_EXAMPLE_PRODUCTS", 1)
    # one example per block, or all examples in one block (summed one example at a time)
    monkeypatch.setattr(_hooks, "_SHARED_BLOCK_BYTES", request.param)
    monkeypatch.setattr(_norms, "_POSITIONS_ALWAYS", True)  # fisher_norms' position Gram route


@pytest.mark.parametrize("name", NAMES)
def test_empirical_diagonal_and_gradient_stats(name: str, large_routes: None) -> None:
    case, ref = case_and_ref(name)
    result = cl.diag_fisher(case.model, case.loss_fn, case.data, kind="empirical")
    assert result.backend == "hooks"
    B.assert_dicts_close(result, ref.diag("empirical_fisher"))
    stats = cl.gradient_stats(case.model, case.loss_fn, case.data)  # squares with gradients
    assert stats.backend == "hooks"
    B.assert_dicts_close(stats.mean, ref.split(ref.grad_mean))
    B.assert_dicts_close(stats.variance, ref.split(ref.grad_variance))
    norms = cl.fisher_norms(case.model, case.loss_fn, case.data)  # one chunk: streamed Gram
    F = ref.matrix("empirical_fisher")
    B.assert_float_close(norms.frobenius, float(torch.linalg.matrix_norm(F)))
    B.assert_float_close(norms.diag_frobenius, float(torch.diagonal(F).norm()))


@pytest.mark.parametrize("entry", ["tiny_gpt", "hf_gpt2"])
def test_mc_diagonal_equals_the_default_routes(entry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case, _ = case_and_ref(f"{entry}-mean-three")
    default = cl.diag_fisher(case.model, case.loss_fn, case.data, kind="mc", seed=3)
    monkeypatch.setattr(_layers, "PER_EXAMPLE_PRODUCTS", 1)
    monkeypatch.setattr(_rules, "PER_EXAMPLE_PRODUCTS", 1)
    monkeypatch.setattr(_hooks, "_SHARED_BLOCK_BYTES", 1)
    forced = cl.diag_fisher(case.model, case.loss_fn, case.data, kind="mc", seed=3)
    assert forced.backend == default.backend == "hooks"
    B.assert_dicts_close(forced, dict(default), rtol=1e-10)


class TiedPadded(nn.Module):
    """Token embedding with ``padding_idx`` tied to the output head, a Linear on the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(9, 5, padding_idx=0)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, 9, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.tok(idx))))


def _per_example_squares(model: nn.Module, idx: torch.Tensor, y: torch.Tensor) -> dict:
    """``sum_n grad NLL_n ** 2`` by torch.func, one example at a time (the brute force)."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def nll(p: dict, i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (i[None],))
        return nn.functional.cross_entropy(out[0], t, reduction="sum")

    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(idx.shape[0]):
        g = torch.func.grad(nll)(params, idx[n], y[n])
        for k in total:
            total[k] += g[k] ** 2
    return total


@pytest.mark.parametrize("forced", [False, True])
def test_tied_embedding_with_padding_idx(forced: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if forced:
        monkeypatch.setattr(_layers, "PER_EXAMPLE_PRODUCTS", 1)
        monkeypatch.setattr(_rules, "PER_EXAMPLE_PRODUCTS", 1)
        monkeypatch.setattr(_hooks, "_SHARED_BLOCK_BYTES", 1)
    gen = torch.Generator().manual_seed(0)
    model = TiedPadded().double()
    with torch.no_grad():  # a padding row that is not zero: the head still uses it
        model.tok.weight[0] = torch.randn(5, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 9, (6, 4), generator=gen)
    idx[:, -1] = 0  # padding tokens in every sequence
    y = torch.randint(0, 9, (6, 4), generator=gen)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    result = cl.diag_fisher(model, loss_fn, (idx, y), kind="empirical")
    assert result.backend == "hooks"
    expected = _per_example_squares(model, idx, y)
    # the tied weight appears once, under its first name
    B.assert_dicts_close(result, {k: expected[k] for k in result}, rtol=1e-10)


@pytest.mark.parametrize("entry", ["tiny_gpt", "hf_gpt2", "seq_ce_gpt"])
def test_fisher_norms_by_positions_equal_the_default_route(
    entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several label draws (Gram blocks between draws) and the empirical kind, same seed."""
    case, _ = case_and_ref(f"{entry}-mean-one")
    args = (case.model, case.loss_fn, case.data)
    default = [cl.fisher_norms(*args), cl.fisher_norms(*args, kind="mc", mc_samples=3, seed=5)]
    monkeypatch.setattr(_norms, "_POSITIONS_ALWAYS", True)
    forced = [cl.fisher_norms(*args), cl.fisher_norms(*args, kind="mc", mc_samples=3, seed=5)]
    for a, b in zip(default, forced):
        assert a.backend == b.backend == "hooks"
        assert math.isclose(a.frobenius, b.frobenius, rel_tol=1e-5)
        assert math.isclose(a.diag_frobenius, b.diag_frobenius, rel_tol=1e-5)
