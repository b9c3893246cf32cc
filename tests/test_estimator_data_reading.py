"""How the estimators read ``data`` and check their arguments (found in review):

* a shuffling ``DataLoader`` without a generator drew its order from the global RNG: every call
  moved it, and two calls with the same ``seed`` attached the Monte-Carlo labels to differently
  ordered batches (1.953 vs 2.240);
* ``trace(method="ggn_cv")`` read the data twice (the GGN part and the residual's operator), so a
  loader whose readings differ mixed two subsets;
* a loader that refills the same tensors left every kept batch holding the last one (14.93 for a
  true 16.71), silently;
* bad estimator arguments were refused only after the operator had read (and spent) the data;
  ``rtol`` was ignored by Hutch++, NaN/inf tolerances accepted;
* ``fisher_trace`` returned 0 (stderr 0) when every target was ignored under ``"mean"`` (0/0),
  and counted an all-ignored batch's undefined proxy as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab.estimators import fisher_trace
from tests.bruteforce import autograd_hessian, flat_params, forward
from tests.test_noise_samplers import _one_thread  # noqa: F401 (fixture)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _xy(n: int = 24, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


CALLS = {
    "operator": lambda m, L, d: cl.curvature_operator(m, L, d, "fisher", seed=0),
    "trace": lambda m, L, d: cl.trace(m, L, d, matrix="fisher", method="hutch++", num_probes=9),
    "eigenvalues": lambda m, L, d: cl.eigenvalues(m, L, d, k=2),
    "spectral_density": lambda m, L, d: cl.spectral_density(m, L, d, num_steps=5),
    "fisher_trace": lambda m, L, d: fisher_trace(m, L, d, seed=0),
    "diag_fisher": lambda m, L, d: cl.diag_fisher(m, L, d, kind="mc", seed=0),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_shuffling_loader_leaves_the_global_rng_and_gives_the_same_answer(call: str) -> None:
    X, y = _xy()
    model, lf = _mlp(), nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = CALLS[call](model, lf, loader)
    assert torch.equal(torch.get_rng_state(), state)
    if call == "trace":  # the same seed: the same labels on the same batches
        assert CALLS[call](model, lf, loader).value == first.value


class _ReadOnce:
    """An iterable of batches that can be read once (a stream): a second ``iter`` raises."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches, self.reads = batches, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.reads += 1
        if self.reads > 1:
            raise RuntimeError("this stream was read already")
        return iter(self.batches)


def test_ggn_cv_reads_the_data_once_and_is_exact_where_the_residual_vanishes() -> None:
    """A linear model under MSE: H = G, so ggn_cv's value is the exact Tr(H), from one reading."""
    torch.manual_seed(0)
    model, lf = nn.Linear(4, 2).double(), nn.MSELoss()
    X, _ = _xy(9)
    Y = torch.randn(9, 2, dtype=torch.float64)
    data = _ReadOnce([(X[:4], Y[:4]), (X[4:], Y[4:])])
    res = cl.trace(model, lf, data, method="ggn_cv", num_probes=3)
    assert data.reads == 1
    theta = flat_params(model)
    H = autograd_hessian(lambda t: lf(forward(model, t, X), Y), theta)
    assert res.value == pytest.approx(float(torch.trace(H)), rel=1e-12)


class _RefillingLoader:
    """Yields the same two tensors each time, refilled in place (as some prefetching loaders do)."""

    def __init__(self, X: Tensor, y: Tensor, size: int) -> None:
        self.X, self.y, self.size = X, y, size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        bx, by = self.X[: self.size].clone(), self.y[: self.size].clone()
        for i in range(0, self.X.shape[0], self.size):
            bx.copy_(self.X[i : i + self.size])
            by.copy_(self.y[i : i + self.size])
            yield bx, by


def test_a_loader_that_refills_its_tensors_is_refused_where_batches_are_kept() -> None:
    X, y = _xy(15)
    model, lf = _mlp(), nn.CrossEntropyLoss()
    loader = _RefillingLoader(X, y, 5)
    with pytest.raises(ValueError, match="batch 0 of data was overwritten in place by batch 1"):
        cl.trace(model, lf, loader, matrix="ggn", method="hutch++", num_probes=9)
    # a streaming computation reads each batch before the next: exact as it is
    got = cl.trace(model, lf, loader, matrix="ggn", method="exact").value
    assert got == pytest.approx(cl.trace(model, lf, (X, y), matrix="ggn", method="exact").value)
    # the same batch object listed twice (unchanged) is fine: it counts twice
    twice = cl.trace(model, lf, [(X, y), (X, y)], matrix="ggn", num_probes=2, seed=0).value
    copies = [(X, y), (X.clone(), y.clone())]
    assert twice == cl.trace(model, lf, copies, matrix="ggn", num_probes=2, seed=0).value


def _counting(batches: list[tuple[Tensor, Tensor]], seen: list[int]) -> Iterator:
    for b in batches:
        seen.append(1)
        yield b


BAD = {
    "num_probes=0": (lambda m, L, d: cl.trace(m, L, d, num_probes=0), "num_probes must be"),
    "ggn_cv num_probes=0": (
        lambda m, L, d: cl.trace(m, L, d, method="ggn_cv", num_probes=0),
        "num_probes must be",
    ),
    "hutch++ 2 probes": (
        lambda m, L, d: cl.trace(m, L, d, method="hutch++", num_probes=2),
        "num_probes must be >= 3",
    ),
    "hutch++ rtol": (
        lambda m, L, d: cl.trace(m, L, d, method="hutch++", rtol=0.1),
        "rtol is not supported by method='hutch\\+\\+'",
    ),
    "exact rtol": (
        lambda m, L, d: cl.trace(m, L, d, method="exact", rtol=0.1),
        "method='exact' has none",
    ),
    "rtol nan": (lambda m, L, d: cl.trace(m, L, d, rtol=math.nan), "rtol must be a finite"),
    "rtol negative": (lambda m, L, d: cl.trace(m, L, d, rtol=-1.0), "rtol must be a finite"),
    "k too large": (lambda m, L, d: cl.eigenvalues(m, L, d, k=10**6), r"k must be .* \[1, 43\]"),
    "tol 0": (lambda m, L, d: cl.eigenvalues(m, L, d, tol=0), "tol must be a finite"),
    "tol inf": (lambda m, L, d: cl.eigenvalues(m, L, d, tol=math.inf), "tol must be a finite"),
    "max_matvecs 0": (
        lambda m, L, d: cl.eigenvalues(m, L, d, max_matvecs=0),
        "max_matvecs must be a positive int",
    ),
    "num_steps 0": (
        lambda m, L, d: cl.spectral_density(m, L, d, num_steps=0),
        "num_steps must be a positive int",
    ),
    "chunk_size 0": (
        lambda m, L, d: fisher_trace(m, L, d, chunk_size=0),
        "chunk_size must be a positive int",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_are_refused_before_the_data_is_read(case: str) -> None:
    call, message = BAD[case]
    X, y = _xy(10)
    seen: list[int] = []
    with pytest.raises(ValueError, match=message):
        call(_mlp(), nn.CrossEntropyLoss(), _counting([(X[:5], y[:5]), (X[5:], y[5:])], seen))
    assert not seen


def test_fisher_trace_refuses_all_ignored_targets_and_leaves_undefined_batch_proxies_out() -> None:
    X, y = _xy(10)
    model = _mlp()
    lf = nn.CrossEntropyLoss()  # ignore_index -100
    ignored = torch.full_like(y, -100)
    with pytest.raises(ValueError, match="every target of the data is ignore_index=-100"):
        fisher_trace(model, lf, (X, ignored))
    with pytest.raises(ValueError, match="every target of the data is ignore_index=-100"):
        cl.trace(model, lf, (X, ignored), matrix="fisher", method="exact")
    both = fisher_trace(model, lf, [(X[:5], y[:5]), (X[5:], ignored[5:])], seed=0)
    alone = fisher_trace(model, lf, (X[:5], y[:5]), seed=0)
    assert math.isnan(both.per_batch[1])
    assert both.batch_value == pytest.approx(alone.batch_value, rel=1e-12)
    # under "sum" an all-ignored batch is a zero term: defined
    summed = fisher_trace(model, nn.CrossEntropyLoss(reduction="sum"), (X, ignored))
    assert summed.value == 0.0


def test_batches_drawn_from_the_global_rng_continue_its_stream() -> None:
    """A generator of random batches (or a dataset's random augmentation) draws from the global
    RNG: each batch continues that stream as in the user's own loop (a first fix put the state
    back before every batch, so all batches came out the same), and the caller's state is left."""
    model, lf = _mlp(), nn.CrossEntropyLoss()

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(4):
            yield torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))

    torch.manual_seed(7)
    seen = list(batches())  # what the user's loop gets
    torch.manual_seed(7)
    state = torch.get_rng_state()
    got = cl.diag_fisher(model, lf, batches())
    assert torch.equal(torch.get_rng_state(), state)
    want = cl.diag_fisher(model, lf, seen)
    assert not torch.equal(seen[0][0], seen[1][0])
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_views_of_one_tensor_changed_later_and_inference_tensors_are_read() -> None:
    """Only a kept batch overwritten by a later one is refused: batches that are views of one
    tensor share a version counter, so a transform of a later view must not count; tensors made
    under inference mode (no version counter, not savable for backward) are used as copies."""
    X, y = _xy(12)
    model, lf = _mlp(), nn.CrossEntropyLoss()
    want = cl.trace(model, lf, [(X[:6].clone(), y[:6]), ((X[6:] - 1) / 2, y[6:])], method="exact")

    def loader() -> Iterator[tuple[Tensor, Tensor]]:
        base = X.clone()
        yield base[:6], y[:6]
        later = base[6:]
        later.sub_(1).div_(2)  # the user's own in-place transform of the next view
        yield later, y[6:]

    assert cl.trace(model, lf, loader(), method="exact").value == pytest.approx(want.value)
    hutch = cl.trace(model, lf, loader(), matrix="ggn", num_probes=3, seed=0)
    again = cl.trace(model, lf, list(loader()), matrix="ggn", num_probes=3, seed=0)
    assert hutch.value == again.value
    with torch.inference_mode():
        Xi, yi = X.clone(), y.clone()
    got = cl.eigenvalues(model, lf, (Xi, yi), k=1).values
    torch.testing.assert_close(got, cl.eigenvalues(model, lf, (X, y), k=1).values)


def test_numpy_scalars_are_numbers_to_the_argument_checks() -> None:
    import numpy as np

    X, y = _xy(10)
    model, lf = _mlp(), nn.CrossEntropyLoss()
    a = cl.eigenvalues(model, lf, (X, y), k=np.int64(2), tol=np.float32(1e-4))
    b = cl.eigenvalues(model, lf, (X, y), k=2, tol=1e-4)
    torch.testing.assert_close(a.values, b.values)
    got = cl.trace(model, lf, (X, y), num_probes=np.int64(4), rtol=np.float32(0.5))
    want = cl.trace(model, lf, (X, y), num_probes=4, rtol=0.5)
    assert (got.value, got.num_probes) == (want.value, want.num_probes)
    assert fisher_trace(model, lf, (X, y), chunk_size=np.int64(4)).value == pytest.approx(
        fisher_trace(model, lf, (X, y)).value
    )
