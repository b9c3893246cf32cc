"""``fisher_norms(kind="mc")`` on a random forward (review s26, FX9).

The Monte-Carlo labels were drawn once per chunk, ahead, from one forward, and the rows taken
from another: on a train-mode Dropout model the labels of one mask were paired with the
gradients of another (``||F||_F`` 5.77 where its expectation is 3.58). Brute force: every
Dropout mask fixed in turn (float64, ``torch.func``), the exact expectation over masks and
labels of ``||F_hat||_F^2`` and ``||diag F_hat||_F^2`` for the rows the call draws; the
tolerance is the standard error of the mean over seeds (each seed: new masks and new labels).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.func import grad

import curvlab as cl

DT = torch.float64
H = 5  # hidden units: 2^5 Dropout masks, enumerated


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, H), nn.Dropout(0.5), nn.Tanh(), nn.Linear(H, 3)).to(DT)
    with torch.no_grad():
        m[3].weight.mul_(6)
    return m.train()


def _outcomes(m: nn.Sequential, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over every mask ``k`` (fixed, scale 2) and class ``c``: ``p(c | k)`` ``(K, 3)`` and the
    flattened gradient of ``NLL(c)`` ``(K, 3, d)``."""
    params = {k: p.detach() for k, p in m.named_parameters()}

    def logits(p: dict, mask: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(x0, p["0.weight"], p["0.bias"]) * mask * 2
        return nn.functional.linear(torch.tanh(h), p["3.weight"], p["3.bias"])

    probs, grads = [], []
    for bits in itertools.product([0.0, 1.0], repeat=H):
        mask = torch.tensor(bits, dtype=DT)
        probs.append(torch.softmax(logits(params, mask), -1)[0])
        row = []
        for c in range(3):

            def nll(p: dict, mask: torch.Tensor = mask, c: int = c) -> torch.Tensor:
                return nn.functional.cross_entropy(logits(p, mask), torch.tensor([c]))

            row.append(torch.cat([v.reshape(-1) for v in grad(nll)(params).values()]))
        grads.append(torch.stack(row))
    return torch.stack(probs), torch.stack(grads)


def _one_draw(q: torch.Tensor, G: torch.Tensor, N: int) -> tuple[float, float]:
    """``E ||F_hat||_F^2`` and ``E ||diag F_hat||_F^2`` for ``F_hat = (1/N) sum_n v_n v_n^T``,
    ``v_n`` independent, equal to row ``G[a]`` with probability ``q[a]``."""
    gram = G @ G.T
    frob = N * (q * gram.diagonal() ** 2).sum() + N * (N - 1) * (q @ gram**2 @ q)
    sq = G**2
    diag = N * (q @ sq**2).sum() + N * (N - 1) * ((q @ sq) ** 2).sum()
    return float(frob) / N**2, float(diag) / N**2


def _two_draws(P: torch.Tensor, L: torch.Tensor, G: torch.Tensor) -> tuple[float, float]:
    """One example, two labels: ``F_hat = (v_1 v_1^T + v_2 v_2^T) / 2``; the labels are drawn
    from ``P[k]`` (mask ``k`` of the label forward) and ``v_i = G[k', y_i]`` (mask ``k'`` of the
    differentiated forward): ``L`` pairs them, ``L[k, k']`` the probability of the pair."""
    frob = diag = 0.0
    for k, kk in itertools.product(range(P.shape[0]), repeat=2):
        w = float(L[k, kk])
        if w == 0.0:
            continue
        p, g = P[k], G[kk]
        gram = g @ g.T
        sq = g**2
        frob += w * float(2 * (p * gram.diagonal() ** 2).sum() + 2 * (p @ gram**2 @ p))
        diag += w * float(2 * (p @ sq**2).sum() + 2 * ((p @ sq) ** 2).sum())
    return frob / 4, diag / 4


def _seeds(m: nn.Module, X: torch.Tensor, K: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``||F_hat||_F^2`` and ``||diag F_hat||_F^2`` over ``K`` seeds (new masks, new labels)."""
    frob, diag = [], []
    for k in range(K):
        torch.manual_seed(1000 + k)
        r = cl.fisher_norms(
            m, nn.CrossEntropyLoss(), (X, torch.zeros(len(X), dtype=torch.long)), "mc", seed=k, **kw
        )
        frob.append(r.frobenius**2)
        diag.append(r.diag_frobenius**2)
    return torch.tensor(frob, dtype=DT), torch.tensor(diag, dtype=DT)


def _close(got: torch.Tensor, want: float, wrong: float) -> None:
    se = float(got.std()) / len(got) ** 0.5
    assert abs(wrong - want) > 7 * se  # the test tells the mismatch
    assert abs(float(got.mean()) - want) < 4.5 * se, (float(got.mean()), want, wrong, se)


@pytest.mark.parametrize(
    ("backend", "N", "chunk_size"),
    [("hooks", 1, 64), ("func", 1, 64), ("hooks", 4, 2), ("func", 4, 2), ("hooks", 4, 64)],
)
def test_dropout_mc_norms_match_mask_expectation(backend, N, chunk_size):
    """One label per example: hooks streamed (one chunk), hooks' rows (chunks of two), func's
    dense rows; the expectation of both squared norms over masks and labels."""
    m = _model()
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    P, G = _outcomes(m, x0)
    w = torch.full((P.shape[0], 1), 1 / P.shape[0], dtype=DT)
    q = (w * P).reshape(-1)
    q_wrong = (w * P.mean(0)).reshape(-1)  # labels of one mask, gradients of another
    Gf = G.reshape(-1, G.shape[-1])
    (frob, diag), (frob_w, diag_w) = _one_draw(q, Gf, N), _one_draw(q_wrong, Gf, N)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    got_f, got_d = _seeds(m, x0.expand(N, 3).clone(), 800, backend=backend, chunk_size=chunk_size)
    _close(got_f, frob, frob_w)
    _close(got_d, diag, diag_w)
    assert m.training and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    cl.fisher_norms(m, nn.CrossEntropyLoss(), (x0, torch.zeros(1, dtype=torch.long)), "mc", seed=0)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("backend", ["hooks", "func"])
def test_dropout_mc_norms_two_labels_from_one_forward(backend):
    """``mc_samples=2``: both labels of an example from the forward whose gradients are taken."""
    m = _model()
    x0 = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    P, G = _outcomes(m, x0)
    K = P.shape[0]
    frob, diag = _two_draws(P, torch.eye(K, dtype=DT) / K, G)
    frob_w, diag_w = _two_draws(P, torch.full((K, K), 1 / K**2, dtype=DT), G)
    got_f, got_d = _seeds(m, x0, 800, backend=backend, mc_samples=2)
    _close(got_f, frob, frob_w)
    _close(got_d, diag, diag_w)


def test_deterministic_forward_keeps_its_draws():
    """An eval-mode model draws its labels once per chunk, as before: the same norms on both
    backends and for any chunking."""
    m = _model().eval()
    X = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    lf = nn.CrossEntropyLoss()
    ref = cl.fisher_norms(m, lf, (X, y), "mc", seed=3, mc_samples=2, backend="hooks")
    for backend, cs in (("func", 64), ("hooks", 2), ("func", 4)):
        r = cl.fisher_norms(
            m, lf, (X, y), "mc", seed=3, mc_samples=2, backend=backend, chunk_size=cs
        )
        assert r.frobenius == pytest.approx(ref.frobenius, rel=1e-10)
        assert r.diag_frobenius == pytest.approx(ref.diag_frobenius, rel=1e-10)


def test_backpack_draws_from_its_forward_and_refuses_two_labels():
    """BackPACK (one label set per forward): one draw gives the hooks backend's number for the
    same masks and labels; two draws per example on a random forward are refused by name."""
    pytest.importorskip("backpack")
    m = _model()
    X = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    data = (X, torch.tensor([0, 1, 2]))
    lf = nn.CrossEntropyLoss()
    for k in range(4):
        got = []
        for backend in ("backpack", "hooks"):
            torch.manual_seed(k)
            got.append(cl.fisher_norms(m, lf, data, "mc", seed=k, backend=backend).frobenius)
        assert got[0] == pytest.approx(got[1], rel=1e-10)
    with pytest.raises(ValueError, match=r"mc_samples=2, backend='backpack'.*backend='hooks'"):
        cl.fisher_norms(m, lf, data, "mc", seed=0, backend="backpack", mc_samples=2)
