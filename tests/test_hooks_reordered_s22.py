"""A layer applied twice, once to a reordered view of the batch (a MoCo/SimSiam-style shuffle of a
shared encoder, undone afterwards), keeps the examples apart and every leading size, but the
hooks add the two calls' row ``i`` together as example ``i``: after the shuffle that row belongs
to another example, so different examples' gradients were summed before squaring (review s22 FZ:
``diag_fisher`` 0.59 off, ``trace_covariance`` 0.5439 for 0.5800). The hooks backend now checks on
its first chunk that every call of a repeated parameter holds example ``n`` at row ``n`` and hands
over where one does not; a layer applied twice to the batch in order stays on the hooks.

Against dense float64 brute force: per-example gradients of the batch's own per-example losses
(``torch.func.jacrev``, no assumption about the model).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvlab as cl
from curvlab.backends._choice import CHOICES
from curvlab.noise import DiagFisherNoise, NoisyOptimizer
from curvlab.quantities._sweep import _APART
from tests.zoo import TinyGPT

DT = torch.float64
# float64 sums of a few dozen products of O(1) numbers: rounding ~1e-15 relative; the defect's
# errors are 6% and more, so any tolerance in between separates them
RTOL, ATOL = 1e-10, 1e-13


def _forget() -> None:
    CHOICES.clear()
    _APART.clear()


def _order(kind: str, n: int) -> Tensor:
    """The reordering of the batch: reversed, rotated by one, or a fixed scramble."""
    if kind == "reverse":
        return torch.arange(n - 1, -1, -1)
    if kind == "roll":
        return torch.roll(torch.arange(n), 1)
    return torch.argsort(torch.sin(torch.arange(n, dtype=DT) * 2.3 + 0.4))


class _Shuffled(nn.Module):
    """A shared encoder on the batch and on a reordered view of it, the order put back:
    ``out_n`` depends on ``x_n`` alone. ``how``: the reordering ("reverse", "roll", "scramble")
    or ``None`` (the encoder applied twice to the batch in order)."""

    def __init__(self, how: str | None) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 3).to(DT)
        self.head = nn.Linear(3, 2).to(DT)
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        q = torch.tanh(self.enc(x))
        if self.how is None:
            k = torch.tanh(self.enc(0.5 * x + 0.1))
        else:
            perm = _order(self.how, x.shape[0])
            k = torch.tanh(self.enc(x[perm]))[torch.argsort(perm)]
        return self.head(q * k)


class _HiddenShuffle(nn.Module):
    """The reordering of a hidden activation (it requires grad) by ``flip``, the encoder applied
    to it and to the plain activation, the order put back by ``flip``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 3).to(DT)
        self.enc = nn.Linear(3, 3).to(DT)
        self.head = nn.Linear(3, 2).to(DT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.head(torch.tanh(self.enc(h)) * self.enc(h.flip(0)).flip(0))


class _RandomShuffle(_Shuffled):
    """MoCo's own shuffle: a fresh ``torch.randperm`` each forward pass (global RNG)."""

    def forward(self, x: Tensor) -> Tensor:
        perm = torch.randperm(x.shape[0])
        q = torch.tanh(self.enc(x))
        k = torch.tanh(self.enc(x[perm]))[torch.argsort(perm)]
        return self.head(q * k)


def _problem(model: nn.Module, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def _brute(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Any]:
    """Per-example gradients of ``NLL_n`` (rows of the batch pass's per-example losses), and
    the per-example output Jacobians with the softmax probabilities (for the GGN)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (X,)), y, reduction="none")

    def outputs(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, p, (X,))

    with torch.random.fork_rng():  # a randperm model's draws leave the global RNG as it was
        per = jacrev(losses)(params)
    with torch.random.fork_rng():
        jac = jacrev(outputs)(params)  # name -> (n, C, *shape): output of row m vs parameter
        probs = outputs(params).softmax(1).detach()
    return {"g": dict(per), "J": dict(jac), "p": probs, "n": X.shape[0]}


def _empirical(ref: dict) -> dict[str, Tensor]:
    return {k: (g**2).mean(0) for k, g in ref["g"].items()}


def _ggn_diag(ref: dict) -> dict[str, Tensor]:
    n, p = ref["n"], ref["p"]
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, C, C): CE Hessian per example
    out = {}
    for k, J in ref["J"].items():  # J: (n, C, *shape), output row m of the batch pass
        Jf = J.reshape(n, J.shape[1], -1)
        out[k] = torch.einsum("mcp,mcd,mdp->p", Jf, H, Jf).div(n).reshape(J.shape[2:])
    return out


def _close(got: dict, want: dict) -> None:
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=k)


MODELS = [
    ("reverse", 4),
    ("reverse", 2),  # one pass: row 0 must stay 0
    ("roll", 3),
    ("scramble", 5),
    ("scramble", 8),
]


@pytest.mark.parametrize(("how", "n"), MODELS)
def test_diag_fisher_of_a_shared_encoder_on_a_reordered_batch(how: str, n: int) -> None:
    _forget()
    model = _Shuffled(how)
    X, y = _problem(model, n)
    ref = _brute(model, X, y)
    ce = nn.CrossEntropyLoss()
    F_emp = cl.diag_fisher(model, ce, (X, y))
    _close(F_emp, _empirical(ref))  # enc.weight[0,0] 3.2218e-04 for 5.4209e-04 before (n=4)
    assert F_emp.backend == "func" and F_emp.info["handed_over"][0].startswith("hooks")
    _close(cl.diag_fisher(model, ce, (X, y), kind="exact"), _ggn_diag(ref))
    if n > 2:  # chunks of n - 1 and 1: the first chunk's own reordering decides
        _forget()
        chunked = cl.diag_fisher(model, ce, (X, y), chunk_size=n - 1)
        _close(chunked, _empirical(ref))
        in_order = bool(torch.equal(_order(how, n - 1), torch.arange(n - 1)))
        assert chunked.backend == ("hooks" if in_order else "func")


def test_a_hidden_activation_flipped_for_the_second_call() -> None:
    _forget()
    model = _HiddenShuffle()
    X, y = _problem(model, 4)
    ref = _brute(model, X, y)
    F_emp = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y))
    _close(F_emp, _empirical(ref))
    assert F_emp.backend == "func"


def test_a_fresh_random_shuffle_each_pass() -> None:
    _forget()
    torch.manual_seed(3)
    model = _RandomShuffle("reverse")
    X, y = _problem(model, 6)
    ref = _brute(model, X, y)  # out_n depends on x_n alone, whatever the draw
    F_emp = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y))
    _close(F_emp, _empirical(ref))
    assert F_emp.backend == "func"


@pytest.mark.parametrize(("how", "n"), [("reverse", 4), ("scramble", 5)])
def test_gradient_stats_and_fisher_norms_of_a_reordered_batch(how: str, n: int) -> None:
    _forget()
    model = _Shuffled(how)
    X, y = _problem(model, n)
    ref = _brute(model, X, y)
    ce = nn.CrossEntropyLoss()
    gs = cl.gradient_stats(model, ce, (X, y))
    mean = {k: g.mean(0) for k, g in ref["g"].items()}
    var = {k: g.var(0, unbiased=False) for k, g in ref["g"].items()}
    _close(gs.mean, mean)
    _close(gs.variance, var)
    _close(gs.second_moment, _empirical(ref))
    tc = sum(float(v.sum()) for v in var.values())
    assert gs.trace_covariance == pytest.approx(tc, rel=RTOL)  # 0.5439 for 0.5800 before (n=4)
    assert gs.backend == "func"

    fn = cl.fisher_norms(model, ce, (X, y))
    G = torch.cat([g.reshape(n, -1) for g in ref["g"].values()], 1)
    Fm = G.T @ G / n
    assert fn.frobenius == pytest.approx(float(torch.linalg.norm(Fm)), rel=RTOL)  # 0.65885/0.67997
    assert fn.diag_frobenius == pytest.approx(float(torch.linalg.norm(Fm.diagonal())), rel=RTOL)
    assert fn.backend == "func"


def test_a_noisy_step_on_a_shared_encoder_on_a_reordered_batch() -> None:
    _forget()
    model = _Shuffled("reverse")
    X, y = _problem(model, 4)
    ref = _brute(model, X, y)
    ce = nn.CrossEntropyLoss()
    sampler = DiagFisherNoise(scale=1.0)
    want = sampler.draw(model, _empirical(ref), torch.Generator().manual_seed(0))
    assert all(bool(w.ne(0).any()) for w in want.values())
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), sampler, model, ce)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    noisy.zero_grad()
    with noisy.capture():  # the encoder runs twice: the capture leaves it to the separate pass
        ce(model(X), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    noisy.step()
    got = {k: before[k] - p.detach() - grads[k] for k, p in model.named_parameters()}
    _close(got, want)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_layer_applied_twice_in_order_stays_on_the_hooks(n: int) -> None:
    _forget()
    model = _Shuffled(None)
    X, y = _problem(model, n)
    ref = _brute(model, X, y)
    ce = nn.CrossEntropyLoss()
    F_emp = cl.diag_fisher(model, ce, (X, y))
    assert F_emp.backend == "hooks" and F_emp.info["handed_over"] == ()
    _close(F_emp, _empirical(ref))
    gs = cl.gradient_stats(model, ce, (X, y))
    assert gs.backend == "hooks"
    _close(gs.variance, {k: g.var(0, unbiased=False) for k, g in ref["g"].items()})
    fn = cl.fisher_norms(model, ce, (X, y))
    G = torch.cat([g.reshape(n, -1) for g in ref["g"].values()], 1)
    assert fn.backend == "hooks"
    assert fn.frobenius == pytest.approx(float(torch.linalg.norm(G.T @ G / n)), rel=RTOL)


def test_a_tied_embedding_and_head_stay_on_the_hooks() -> None:
    """The common repeated parameter: a head tied to the token embedding (GPT layout)."""
    _forget()
    torch.manual_seed(0)
    model = TinyGPT().double()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 11, (3, 6), generator=g)
    X, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    ce = nn.CrossEntropyLoss()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(p: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, p, (X,))
        return F.cross_entropy(out.movedim(-1, 1), y, reduction="none").sum(1)

    per = jacrev(losses)(params)
    # docs/conventions.md: L = w sum_n NLL_n with w = 1/M (M tokens); the empirical Fisher of L
    # is (1/N) sum_n (N w grad NLL_n)^2 = N w^2 sum_n (grad NLL_n)^2
    n, w = X.shape[0], 1.0 / y.numel()
    want = {k: n * w**2 * (v**2).sum(0) for k, v in per.items()}
    got = cl.diag_fisher(model, ce, (X, y))
    assert got.backend == "hooks"
    _close(got, want)


def test_a_tied_embedding_and_head_cost_no_order_check(monkeypatch) -> None:
    """The embedding runs on the token ids as the model got them and the head's output is the
    model's output: both calls are evidently in order, so the check's backward passes are not
    run (a tied GPT-2 paid ceil(log2 n) extra backward passes on a first call otherwise)."""
    import curvlab.backends._hook_session as session

    torch.manual_seed(0)
    model = TinyGPT().double()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 11, (4, 6), generator=g)
    X, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    calls = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    counts = {}
    for exempt in (True, False):
        if not exempt:
            monkeypatch.setattr(session, "_same_rows", lambda a, b, n: False)
        _forget()
        calls.clear()
        got = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y))
        assert got.backend == "hooks"
        counts[exempt] = len(calls)
    assert counts[True] < counts[False], counts
