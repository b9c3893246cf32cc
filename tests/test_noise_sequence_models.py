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
from torch import Tensor

import curvlab as cl
from curvlab._rng import make_generator
from curvlab.noise import DiagFisherNoise, FisherTraceNoise, FullFisherNoise, KFACNoise
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
