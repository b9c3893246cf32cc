"""Noise samplers on sequence models: the GPT layout (logits ``(B, T, C)``, targets ``(B, T)``) of a
nanoGPT-style transformer with a tied head, and HF GPT-2 (dict inputs, attention mask, padded labels
``-100``).

Deterministic states equal dense float64 brute force (tests/bruteforce.py) or curvlab's K-FAC
factors; the covariance of many draws equals the one docs/noise.md states, within ``Z`` Monte-Carlo
standard errors per entry (the helpers of tests/test_noise_samplers.py), on a subset of coordinates
(a K-FAC layer's weight and bias, and parameters outside Linear layers).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import curvlab as cl
from curvlab._rng import make_generator
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    KFACNoise,
    NoisyOptimizer,
)
from tests.bruteforce import Dense, assert_dicts_close, assert_float_close
from tests.test_noise_samplers import _one_thread, assert_moments  # noqa: F401 (fixture)
from tests.zoo import make_case

SCALE = 0.5
# coordinates whose joint covariance is checked: a K-FAC layer (weight and bias) and a
# parameter outside Linear layers
WATCH = {
    "tiny_gpt": ["blocks.0.fc.weight", "blocks.0.fc.bias", "ln_f.weight"],
    "hf_gpt2": ["transformer.h.0.mlp.c_proj.bias", "transformer.ln_f.weight"],
}


def _case(entry: str, reduction: str = "mean"):
    case = make_case(f"{entry}-{reduction}-one")
    (X, y) = case.batches[0]
    return case, X, y


def _names(case: Any) -> list[str]:
    return [n for n, p in case.model.named_parameters() if p.requires_grad]


def _index(case: Any, watch: list[str]) -> Tensor:
    """Flat indices (in named_parameters order) of the watched parameters."""
    idx, start = [], 0
    for n, p in case.model.named_parameters():
        if n in watch:
            idx.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    return torch.cat(idx)


def _flat(sample: dict[str, Tensor], case: Any) -> Tensor:
    return torch.cat([sample[n].reshape(-1) for n in _names(case)])


def _draws(
    sampler: Any, case: Any, X: Any, y: Tensor, m: int, idx: Tensor, reuse: bool = False
) -> Tensor:
    """``m`` samples, each with a fresh estimate (so Monte-Carlo labels vary too) unless
    ``reuse`` (a state that does not depend on random labels)."""
    gen = make_generator(seed=11)
    rows = []
    state = sampler.estimate(case.model, case.loss_fn, X, y, gen) if reuse else None
    for _ in range(m):
        if not reuse:
            state = sampler.estimate(case.model, case.loss_fn, X, y, gen)
        rows.append(_flat(sampler.draw(case.model, state, gen), case)[idx])
    return torch.stack(rows)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("entry", ["tiny_gpt", "hf_gpt2"])
def test_deterministic_states_equal_bruteforce(entry: str, reduction: str) -> None:
    case, X, y = _case(entry, reduction)
    dense = Dense(case)
    gen = make_generator(seed=0)
    for kind, matrix in (("empirical", "empirical_fisher"), ("exact", "ggn")):
        diag = DiagFisherNoise(kind, scale=SCALE).estimate(case.model, case.loss_fn, X, y, gen)
        assert_dicts_close(diag, dense.diag(matrix))
        tr = FisherTraceNoise(kind, scale=SCALE).estimate(case.model, case.loss_fn, X, y, gen)
        assert_float_close(float(tr), float(dense.matrix(matrix).trace()) / dense.D)
    # K-FAC noise: kron(G, A) of every covered layer is curvlab.kfac's, the rest its diagonal
    state = KFACNoise("empirical", scale=SCALE).estimate(case.model, case.loss_fn, X, y, gen)
    factors = cl.kfac(case.model, case.loss_fn, (X, y), kind="empirical")
    for layer, s in state.items():
        if layer == "__diagonal__":
            expected = dense.diag("empirical_fisher")
            assert_dicts_close(s, {n: expected[n] for n in s})
            continue
        f = factors[layer]
        torch.testing.assert_close(s["B"] @ s["B"].T, f.G, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(s["C"].T @ s["C"], f.A, rtol=1e-6, atol=1e-12)


def _kfac_covariance(case: Any, X: Any, y: Tensor, kind: str, idx: Tensor) -> Tensor:
    """``scale^2`` times the K-FAC noise's documented covariance, on the watched indices."""
    dense = Dense(case)
    matrix = "empirical_fisher" if kind == "empirical" else "ggn"
    full = torch.diag(torch.diagonal(dense.matrix(matrix)))
    # "mc": over the label draws too, E[G_mc] = G of kind="exact" (A does not depend on labels)
    factors = cl.kfac(case.model, case.loss_fn, (X, y), kind="exact" if kind == "mc" else kind)
    offsets, start = {}, 0
    for n, p in case.model.named_parameters():
        offsets[n] = slice(start, start + p.numel())
        start += p.numel()
    state = KFACNoise(kind, scale=SCALE).estimate(case.model, case.loss_fn, X, y, make_generator(0))
    for layer in state:
        if layer == "__diagonal__":
            continue
        f = factors[layer]
        w = offsets[f"{layer}.weight"]
        full[w, w] = f.weight_block()  # kron(G, A); kron(A, G) for HF Conv1D's (in, out) weight
        if f.has_bias:
            b = offsets[f"{layer}.bias"]
            full[b, b] = f.G
    return SCALE**2 * full[idx][:, idx]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["empirical", "mc"])
@pytest.mark.parametrize("entry", ["tiny_gpt", "hf_gpt2"])
def test_kfac_noise_covariance(entry: str, kind: str) -> None:
    case, X, y = _case(entry)
    idx = _index(case, WATCH[entry])
    sampler = KFACNoise(kind, scale=SCALE)
    mc = kind == "mc"
    samples = _draws(sampler, case, X, y, 1500 if mc else 3000, idx, reuse=not mc)
    assert_moments(samples, _kfac_covariance(case, X, y, kind, idx))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("entry", ["tiny_gpt", "hf_gpt2"])
def test_full_fisher_noise_covariance(entry: str, kind: str) -> None:
    case, X, y = _case(entry)
    idx = _index(case, WATCH[entry])
    samples = _draws(FullFisherNoise(kind, scale=SCALE), case, X, y, 3000, idx)
    dense = Dense(case)
    matrix = dense.ggn if kind == "true" else dense.empirical_fisher
    assert_moments(samples, SCALE**2 * matrix[idx][:, idx])


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["tiny_gpt", "hf_gpt2"])
def test_diag_mc_noise_covariance(entry: str) -> None:
    """Over the label draws too: ``scale^2 diag(GGN)``."""
    case, X, y = _case(entry)
    idx = _index(case, WATCH[entry])
    samples = _draws(DiagFisherNoise("mc", scale=SCALE), case, X, y, 2000, idx)
    ggn = Dense(case).ggn
    assert_moments(samples, SCALE**2 * torch.diag(torch.diagonal(ggn)[idx]))


@pytest.mark.parametrize("kind", ["exact", "mc"])
def test_separate_pass_of_a_flattened_loop_with_length_equal_to_classes(kind):
    """A GPT loop flattening ``(B, T, C)`` logits for the loss, with ``T == C``: the separate
    pass gets the targets back as ``(B, T)``, which fit torch's layout too; it is told the
    classes are last (it scored the positions as classes: zero noise for the output bias)."""
    torch.manual_seed(0)
    B, T, C = 4, 5, 5

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(torch.tanh(self.l1(x)))

    class ClassesAxis1(nn.Module):  # the same function, (B, C, T): torch's layout, unambiguous
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x).transpose(1, 2)

    m, lf = Seq().double(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(B, T, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B, T), generator=g)
    noisy = NoisyOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.0), DiagFisherNoise(kind, scale=0.5), m, lf, seed=0
    )

    def closure() -> torch.Tensor:
        noisy.zero_grad()
        loss = lf(m(X).reshape(-1, C), y.reshape(-1))
        loss.backward()
        return loss

    noisy.step(closure)
    want = cl.diag_fisher(ClassesAxis1(m), lf, (X, y), kind=kind, seed=0)
    for name, value in noisy._state.items():
        torch.testing.assert_close(value, want["m." + name], rtol=1e-10, atol=1e-14, msg=name)


class _TinySeq(nn.Module):
    """``(B, T, 3) -> (B, T, C)`` logits."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> Any:
        out = self.l2(torch.tanh(self.l1(x)))
        return out


def _masked_batch(B: int = 3, T: int = 5, C: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(B, T, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B, T), generator=g)
    y[0, :2] = -100
    y[2, 4] = -100
    return X, y, y != -100


def _captured_noise(m: nn.Module, lf: nn.Module, loss_of: Any, draws: int) -> Tensor:
    """``draws`` FullFisherNoise("empirical") vectors folded into the step's own backward pass."""
    noisy = NoisyOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.0),
        FullFisherNoise("empirical", scale=SCALE),
        m,
        lf,
        seed=0,
    )
    m.zero_grad()
    loss_of().backward()
    clean = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    rows = []
    for _ in range(draws):

        def closure() -> Tensor:
            noisy.zero_grad()
            loss = loss_of()
            loss.backward()
            return loss

        noisy.step(closure)
        rows.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]) - clean)
    return torch.stack(rows)


def test_full_fisher_empirical_capture_with_selected_tokens() -> None:
    """``loss_fn(logits[mask], y[mask])`` (the tokens selected before the loss): one sign per
    sequence, as with ``ignore_index`` on the flattened logits. On the loss input's rows each
    selected token got its own sign: the per-token, not per-example, covariance (E|eps|^2 0.150
    against 0.176, 34 standard errors off)."""
    torch.manual_seed(0)
    C = 4
    m, lf = _TinySeq(C).double(), nn.CrossEntropyLoss()
    X, y, mask = _masked_batch(C=C)
    selected = _captured_noise(m, lf, lambda: lf(m(X)[mask], y[mask]), 2000)
    flat = _captured_noise(m, lf, lambda: lf(m(X).reshape(-1, C), y.reshape(-1)), 2000)
    torch.testing.assert_close(selected, flat, rtol=1e-10, atol=1e-14)  # the same signs, same sums
    # brute force: per-sequence gradients g_n = N grad c_n; Cov = scale^2 (1/N) sum g_n g_n^T
    names = [n for n, _ in m.named_parameters()]
    params = {k: v.detach() for k, v in m.named_parameters()}
    B, M = X.shape[0], int(mask.sum())

    def share(p: dict, x: Tensor, t: Tensor) -> Tensor:
        out = torch.func.functional_call(m, p, (x[None],))[0]
        return nn.functional.cross_entropy(out, t, ignore_index=-100, reduction="sum") / M

    G = torch.stack(
        [
            torch.cat(
                [
                    v.reshape(-1)
                    for v in (lambda d: [d[k] for k in names])(
                        torch.func.grad(share)(params, X[n], y[n])
                    )
                ]
            )
            * B
            for n in range(B)
        ]
    )
    want = SCALE**2 * (G * G).sum() / B
    sq = selected.pow(2).sum(1)
    z = (sq.mean() - want) / (sq.std() / sq.numel() ** 0.5)
    assert abs(float(z)) < 5, (float(sq.mean()), float(want), float(z))


def test_full_fisher_empirical_capture_refuses_rows_it_cannot_assign() -> None:
    """An output changed in place before the loss cannot carry the signs (its gradient hook would
    see the gradient before the change); the loss on 12 selected tokens of 3 sequences, not a
    reshape of the output, cannot be split by sequence: a clear error, no silent noise (with 11
    tokens, or 12, which blocks of 4 would have split wrongly)."""
    torch.manual_seed(0)
    C = 4
    m, lf = _TinySeq(C).double(), nn.CrossEntropyLoss()
    X, y, mask = _masked_batch(C=C)
    assert int(mask.sum()) % X.shape[0] == 0  # 12 tokens: a multiple of the sequences
    noisy = NoisyOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.1),
        FullFisherNoise("empirical", scale=SCALE),
        m,
        lf,
        seed=0,
    )
    before = [p.detach().clone() for p in m.parameters()]

    def closure() -> Tensor:
        noisy.zero_grad()
        loss = lf(m(X).mul_(0.5)[mask], y[mask])
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="which rows are whose"):
        noisy.step(closure)
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.detach(), b)  # no step was taken


@pytest.mark.parametrize("kind", ["mc", "exact"])
def test_separate_pass_refuses_a_loss_on_selected_tokens(kind: str) -> None:
    """A closure computing ``loss_fn(logits[mask], y[mask])`` leaves a separate pass no way to
    rebuild the ``(B, T)`` targets: with 12 selected tokens of 3 sequences and ``T == 5``,
    ``C == 4`` the reshaped ``(3, 4)`` targets fit the ``(3, 5, 4)`` logits in torch's class-axis-1
    layout, and the pass scored positions as classes (the output bias's diagonal 1e-32).
    Now a clear error before the optimizer's step; the empirical captures, which need no
    separate pass, equal those of the flattened loop with ``ignore_index``."""
    torch.manual_seed(0)
    C = 4
    m, lf = _TinySeq(C).double(), nn.CrossEntropyLoss()
    X, y, mask = _masked_batch(C=C)
    assert int(mask.sum()) % X.shape[0] == 0
    before = [p.detach().clone() for p in m.parameters()]
    noisy = NoisyOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.1), DiagFisherNoise(kind, scale=SCALE), m, lf, seed=0
    )

    def closure() -> Tensor:
        noisy.zero_grad()
        loss = lf(m(X)[mask], y[mask])
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="selected or shifted tokens"):
        noisy.step(closure)
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("sampler", ["diag", "kfac"])
def test_empirical_captures_of_selected_tokens_equal_the_flattened_loop(sampler: str) -> None:
    torch.manual_seed(0)
    C = 4
    m, lf = _TinySeq(C).double(), nn.CrossEntropyLoss()
    X, y, mask = _masked_batch(C=C)
    states = []
    for loss_of in (
        lambda: lf(m(X)[mask], y[mask]),
        lambda: lf(m(X).reshape(-1, C), y.reshape(-1)),
    ):
        made = DiagFisherNoise if sampler == "diag" else KFACNoise
        noisy = NoisyOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.0), made("empirical", scale=SCALE), m, lf, seed=0
        )
        with noisy.capture():
            loss_of().backward()
        noisy.step()
        states.append(noisy._state)
    got, want = states
    for name in want:
        if isinstance(want[name], dict):
            for key in want[name]:
                torch.testing.assert_close(got[name][key], want[name][key], rtol=1e-10, atol=0)
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=0)
