"""The backend choice and first-pass checks are paid once per signature (curvlab.backends._choice).

Repeated calls reuse them and give the same numbers; the memo keeps nothing of the user's alive;
a remembered backend that hands over all the same (a forward that changes behaviour between
calls) is forgotten and the result stays exact; fallbacks taken inside a call are reported.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl
import curvlab.quantities._sweep as sweep_mod
from curvlab.backends._choice import CHOICES, Choice, SignatureMemo


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _dense_empirical_diag(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Brute force: (1/N) sum_n g_n^2 with g_n the gradient of example n's loss (mean CE)."""
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(X.shape[0]):
        loss = F.cross_entropy(model(X[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), gs):
            out[n] += g.square() / X.shape[0]
    return out


def test_second_call_skips_the_choice_and_gives_the_same_numbers(monkeypatch):
    CHOICES.clear()
    model, (X, y) = _mlp(), _batch()
    calls = []
    real = sweep_mod.candidates
    monkeypatch.setattr(sweep_mod, "candidates", lambda *a: calls.append(a) or real(*a))
    first = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y))
    second = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y))
    assert len(calls) == 1, "the second call with the same signature chose the backend again"
    ref = _dense_empirical_diag(model, X, y)
    for n in ref:
        torch.testing.assert_close(first[n], ref[n], rtol=1e-10, atol=1e-12)
        assert torch.equal(first[n], second[n])
    assert first.backend == second.backend == "hooks"
    # another input signature (batch size) chooses again
    cl.diag_fisher(model, nn.CrossEntropyLoss(), _batch(5))
    assert len(calls) == 2


def test_memo_keeps_no_module_or_tensor_alive():
    CHOICES.clear()
    model, (X, y) = _mlp(), _batch()
    cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="mc", seed=0)
    ref = weakref.ref(model)
    refs = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert ref() is None and all(r() is None for r in refs), "the memo keeps the model alive"


class _Switch(nn.Module):
    """Uses its head's weight outside the head once ``outside`` is set (same structure)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.outside = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if self.outside:  # the same weight, not through its module: the hooks cannot see it
            return F.linear(h, self.head.weight, self.head.bias)
        return self.head(h)


def test_a_remembered_backend_that_hands_over_is_forgotten_and_the_result_stays_exact():
    CHOICES.clear()
    torch.manual_seed(0)
    model = _Switch().double()
    X, y = _batch()
    first = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y))
    assert first.backend == "hooks"
    model.outside = True  # same structure and inputs: the memo says "hooks", which cannot see it
    second = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y))
    assert second.backend != "hooks"
    ref = _dense_empirical_diag(model, X, y)
    for n in ref:
        torch.testing.assert_close(second[n], ref[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(first[n], ref[n], rtol=1e-10, atol=1e-12)


def test_mc_draws_do_not_depend_on_a_hand_over():
    """A restart with another backend starts from the same generator state."""
    CHOICES.clear()
    torch.manual_seed(0)
    model = _Switch().double()
    model.outside = True  # hooks hand over on the first forward (after nothing was drawn)
    X, y = _batch()
    a = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="mc", seed=3)
    b = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="mc", seed=3, backend="func")
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-12)


class _NoVmap(nn.Module):
    """A model whose forward calls .item() (no vmap rule): the func backend loops per example."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.0 * float(x.abs().max().item() > -1)  # data-dependent Python value
        return self.lin(x) * scale


def test_a_vmap_failure_is_reported_in_the_result_info():
    CHOICES.clear()
    torch.manual_seed(0)
    model = _NoVmap().double()
    X, y = _batch()
    res = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert any("vmap failed" in line for line in res.info["fallbacks"]), res.info
    ref = _dense_empirical_diag(model, X, y)
    for n in ref:
        torch.testing.assert_close(res[n], ref[n], rtol=1e-10, atol=1e-12)
    again = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert any("per-example loop" in line for line in again.info["fallbacks"]), again.info
    for n in ref:
        assert torch.equal(res[n], again[n])


def test_memo_is_bounded():
    memo = SignatureMemo(size=3)
    for i in range(5):
        memo.put((i,), Choice("func", (), None))
    assert memo.get((0,)) is None and memo.get((1,)) is None
    assert memo.get((4,)).backend == "func"


@pytest.mark.parametrize("kind", ["empirical", "mc", "exact"])
def test_repeated_calls_on_a_transformer_are_identical(kind):
    """GPT layout (first-pass layout checks remembered): same numbers on every call."""
    CHOICES.clear()
    torch.manual_seed(0)
    V, T, d = 7, 5, 8

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, d), nn.Embedding(T, d)
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, V)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
            return self.head(self.ln(h))

    model = GPT().double()
    g = torch.Generator().manual_seed(0)
    ids, tgt = torch.randint(0, V, (4, T), generator=g), torch.randint(0, V, (4, T), generator=g)
    tgt[:, -1] = -100
    lf = nn.CrossEntropyLoss()
    runs = [cl.diag_fisher(model, lf, (ids, tgt), kind=kind, seed=0) for _ in range(3)]
    assert runs[0].backend == ("hooks" if kind != "exact" else runs[0].backend)
    for r in runs[1:]:
        for n in runs[0]:
            assert torch.equal(runs[0][n], r[n])


@pytest.mark.parametrize("where", ["parameter", "inputs"])
@pytest.mark.parametrize("fn", ["diag_fisher", "gradient_stats"])
def test_repeated_call_still_names_a_non_finite_culprit(where, fn):
    """A repeated call defers the up-front finiteness checks; the result check names the culprit."""
    CHOICES.clear()
    model, (X, y) = _mlp(), _batch()
    call = getattr(cl, fn)
    call(model, nn.CrossEntropyLoss(), (X, y))  # remembered: the next call defers its checks
    if where == "parameter":
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        match = "parameter '0.weight'"
    else:
        X = X.clone()
        X[2, 1] = float("inf")
        match = "inputs of batch 0"
    with pytest.raises(cl.NonFiniteError, match=match):
        call(model, nn.CrossEntropyLoss(), (X, y))


class _Branchy(nn.Module):
    """Uses ``fc.weight`` outside its module only when the input holds token 0."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.fc, self.head = nn.Embedding(5, 4), nn.Linear(4, 4), nn.Linear(4, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        h = self.fc(x)
        if bool((idx == 0).any()):  # a value-dependent branch
            h = h + x @ self.fc.weight.T
        return self.head(torch.tanh(h))


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.parametrize("batches", ["one", "two", "iterator"])
def test_a_parameter_used_outside_its_module_on_some_batches_only_is_caught(batches):
    """The parameter-use check runs on every forward pass, also after a memo hit; a later chunk
    that fails it restarts the sum with the next backend (the hooks gave a silent 2.8x error)."""
    torch.manual_seed(0)
    model = _Branchy().double()
    g = torch.Generator().manual_seed(0)
    X1 = torch.randint(1, 5, (3, 4), generator=g)
    y = torch.randint(0, 5, (3, 4), generator=g)
    X2 = X1.clone()
    X2[:, 0] = 0  # every example: token 0 in one example alone would make the batch branch
    # for all of them, which the examples-apart check now refuses as mixing the examples
    lf = nn.CrossEntropyLoss()
    CHOICES.clear()
    if batches == "one":  # call A is remembered (hooks), call B takes the branch
        assert cl.diag_fisher(model, lf, (X1, y)).backend == "hooks"
        data = (X2, y)
    else:  # within one call, the branch only in the second batch
        data = [(X1, y), (X2, y)]
    ref = cl.diag_fisher(model, lf, data, backend="func")
    if batches == "iterator":  # a one-shot iterator cannot be read again: a clear error
        with pytest.raises(ValueError, match="used outside its module"):
            cl.diag_fisher(model, lf, iter(data))
        return
    got = cl.diag_fisher(model, lf, data)
    assert _max_rel(got, ref) < 1e-12 and got.backend == "func"


def test_the_first_call_equals_a_remembered_one_with_dropout_in_train_mode():
    """The first call's one-example probe forward drew a Dropout mask from the global RNG, so
    the first call differed from the same call remembered (19.72 against 18.53)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 3)).double()
    model.train()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    batches = [(X[:6], y[:6]), (X[6:], y[6:])]
    CHOICES.clear()
    values = []
    for _ in range(3):
        torch.manual_seed(123)
        values.append(cl.diag_fisher(model, nn.CrossEntropyLoss(), batches))
    for k in values[0]:
        assert torch.equal(values[0][k], values[1][k]) and torch.equal(values[1][k], values[2][k])
