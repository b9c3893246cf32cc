"""Noise-scale edge cases (review s17).

* ``gradient_stats`` gave ``noise_scale = inf`` (and a layer's ``snr = inf``) for ``0/0``, every
  per-example gradient 0; ``Diagnostics``/``analyze`` gave ``inf`` too. Now NaN, and the
  measurement is not given (its error says why).
* The cancellation warnings advised a float64 copy to a float64 model.
* ``DataParallelNoiseScale.noise_scale`` was ``inf`` wherever the ``||G*||^2`` estimate was
  ``<= 0``, documented as the plain ratio; now the plain ratio (NaN for a zero estimate).
* ``noise_scale_from_gradients`` raised on a sparse ``.grad`` (``nn.Embedding(sparse=True)``), and
  summed the squares of an uncoalesced one's entries.

References are dense float64 brute force: ``torch.func`` per-example gradients, and McCandlish et
al.'s estimates written out from the ranks' dense gradients.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab.analysis import MeasurementFailedWarning

DT = torch.float64
EPS64 = torch.finfo(DT).eps


def _per_example(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-example gradients ``g_n = grad l_n`` of the mean-convention MSE, flattened, (N, d)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi[None],))
        return ((out - yi[None]) ** 2).mean()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([v.reshape(len(x), -1) for v in g.values()], dim=1)


def _exact_fit() -> tuple[nn.Linear, Tensor, Tensor]:
    """A float64 linear model that fits its targets exactly: every ``g_n`` is 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, generator=g, dtype=DT)
    w = torch.tensor([[1.0, -2.0]], dtype=DT)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w)
    return model, x, x @ w.T


def test_gradient_stats_of_zero_gradients_is_nan() -> None:
    model, x, y = _exact_fit()
    g = _per_example(model, x, y)
    assert torch.equal(g, torch.zeros_like(g))  # brute force: tr(Sigma) = ||mean||^2 = 0
    s = cl.gradient_stats(model, nn.MSELoss(), (x, y))
    assert s.trace_covariance == 0.0
    assert math.isnan(s.noise_scale)  # 0/0, was inf
    assert math.isnan(s.layers[""].snr)


def test_gradient_stats_noise_without_signal_is_inf() -> None:
    """``||mean||^2 = 0 < tr(Sigma)``: two examples with opposite gradients (exact in float64)."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 1.0]], dtype=DT))
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT)
    y = torch.ones(2, 1, dtype=DT)
    g = _per_example(model, x, y)
    assert torch.equal(g.mean(0), torch.zeros(2, dtype=DT)) and g.var(0, correction=0).sum() > 0
    s = cl.gradient_stats(model, nn.MSELoss(), (x, y))
    assert s.trace_covariance == pytest.approx(float(g.var(0, correction=0).sum()), rel=1e-14)
    assert s.noise_scale == math.inf and s.layers[""].snr == 0.0


@pytest.mark.parametrize("how", ["diagnostics", "analyze"])
def test_measured_noise_scale_of_zero_gradients_is_not_given(how: str) -> None:
    model, x, y = _exact_fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "diagnostics":
            diag = cl.Diagnostics(model, nn.MSELoss(), every=1, quantities=["loss", "noise_scale"])
            record = diag.measure(0, x, y)
            values, errors = record["values"], record.get("errors", {})
        else:
            report = cl.analyze(
                model, nn.MSELoss(), (x, y), quantities=["loss", "noise_scale"], nqm=False
            )
            entry = report.entries[-1]
            values, errors = entry["values"], entry.get("errors", {})
    assert values["trace_covariance"] == 0.0
    assert "noise_scale" not in values  # was inf
    assert "0/0" in errors["noise_scale"] and "gradient is 0" in errors["noise_scale"]


def _identical() -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 MLP on four copies of one example: ``tr(Sigma) = 0`` exactly, and the sums'
    cancellation leaves a rounding-level variance that both paths warn about."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(1, 3, dtype=DT).repeat(4, 1)
    return model, x, torch.full((4, 1), 3.0, dtype=DT)


def test_float64_cancellation_warnings_do_not_advise_float64() -> None:
    model, x, y = _identical()
    g = _per_example(model, x, y)
    assert torch.equal(g, g[:1].expand_as(g))  # brute force: identical rows, tr(Sigma) = 0
    with pytest.warns(RuntimeWarning, match="cancels") as caught:
        s = cl.gradient_stats(model, nn.MSELoss(), (x, y))
        cl.Diagnostics(model, nn.MSELoss(), every=1, quantities=["noise_scale"]).measure(0, x, y)
    texts = [str(w.message) for w in caught if "cancels" in str(w.message)]
    assert len(texts) == 2, texts
    for text in texts:
        assert "no float64 copy helps" in text or "a float64 copy does not help" in text, text
        assert "Recompute on a float64 copy" not in text and "Measure a float64 copy" not in text
        assert "rounding level" in text
    # what the warning promises: the reported spread is 0 to within the rounding bound
    # eps * E||g_n||^2 of each of the N-term sums (N - 1 additions, one subtraction)
    bound = len(x) * EPS64 * float((g**2).mean(0).sum())
    assert 0.0 <= s.trace_covariance <= bound


# ------------------------------------------------------- data parallel, two ranks in one process
class _Recorded(Exception):
    """Rank 1's call stops once its buffer is recorded."""


class _TwoRanks:
    """The all-reduce (a sum) of two ranks played in one process: rank 1's call records its
    buffer and stops, rank 0's call adds it to its own, the sum gloo would give (two ranks
    spawned took 6 s here, for the same arithmetic)."""

    rank, size = 0, 2

    def __init__(self) -> None:
        self.other: Tensor | None = None

    def all_reduce_(self, buffer: Tensor) -> Tensor:
        if self.other is None:
            self.other = buffer.clone()
            raise _Recorded
        return buffer.add_(self.other)


def _two_ranks(monkeypatch: pytest.MonkeyPatch, gradients: list, batch: list[int]) -> Any:
    """``noise_scale_from_gradients`` as rank 0 sees it, rank ``r`` passing ``gradients[r]``."""
    from curvlab.analysis import _data_parallel, noise_scale_from_gradients

    comm = _TwoRanks()
    monkeypatch.setattr(_data_parallel, "_need_comm", lambda: comm)
    with pytest.raises(_Recorded):
        noise_scale_from_gradients(gradients[1], batch[1])
    return noise_scale_from_gradients(gradients[0], batch[0])


def _estimates(gs: list[Tensor], bs: list[int]) -> tuple[float, float]:
    """McCandlish et al.'s unbiased ``tr(Sigma)`` and ``||G*||^2`` from the ranks' dense float64
    mean gradients ``gs`` over ``bs`` examples (docs/distributed.md)."""
    n = sum(bs)
    big = sum(b * g for g, b in zip(gs, bs)) / n
    s = sum(float(g @ g) for g in gs) / len(gs)
    h = sum(1 / b for b in bs) / len(gs)
    tr = (s - float(big @ big)) / (h - 1 / n)
    return tr, float(big @ big) - tr / n


def test_data_parallel_noise_scale_is_the_plain_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opposite rank gradients: the ||G*||^2 estimate is -1, tr(Sigma)'s 4 (exact)."""
    gs = [torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([-1.0, 0.0], dtype=DT)]
    tr, g2 = _estimates(gs, [2, 2])
    est = _two_ranks(monkeypatch, [{"w": g} for g in gs], [2, 2])
    assert (est.trace_covariance, est.grad_norm_sq) == (tr, g2) == (4.0, -1.0)
    assert est.noise_scale == tr / g2 == -4.0  # was inf


def test_data_parallel_noise_scale_of_a_zero_estimate_is_nan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gs = [torch.tensor([1.0, 0.0], dtype=DT), torch.zeros(2, dtype=DT)]
    tr, g2 = _estimates(gs, [1, 1])
    est = _two_ranks(monkeypatch, [[g] for g in gs], [1, 1])
    assert (est.trace_covariance, est.grad_norm_sq) == (tr, g2) == (0.5, 0.0)
    assert math.isnan(est.noise_scale)  # was inf


def test_noise_scale_from_a_sparse_embedding_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 1 looked up twice on rank 0: an uncoalesced sparse .grad (reshape raised; its
    squared entries would have summed to sum a_i^2, not (sum a_i)^2)."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3, sparse=True).double()
    ids, batch = [torch.tensor([1, 1, 2]), torch.tensor([3, 1])], [3, 2]
    grads, dense = [], []
    for r_ids in ids:
        emb.weight.grad = None
        emb(r_ids).pow(2).mean().backward()
        grads.append({"emb.weight": emb.weight.grad})
        w = emb.weight.detach().clone().requires_grad_(True)  # brute force: dense, from w
        (g,) = torch.autograd.grad(w[r_ids].pow(2).mean(), w)
        dense.append(g.reshape(-1))
    assert grads[0]["emb.weight"].is_sparse and not grads[0]["emb.weight"].is_coalesced()
    tr, g2 = _estimates(dense, batch)
    est = _two_ranks(monkeypatch, grads, batch)
    small = sum(float(d @ d) for d in dense) / 2
    big = float(est.big_batch_sq)
    # float64 sums of a few dozen terms: each of S and ||G||^2 within 8 eps of itself, so
    # tr = (S - ||G||^2) / (h - 1/N) within 8 eps (S + ||G||^2) / (h - 1/N), and
    # ||G*||^2 = ||G||^2 - tr / N within 8 eps ||G||^2 + that / N (N = 5)
    h_less = (1 / 3 + 1 / 2) / 2 - 1 / 5
    atol_tr = 8 * EPS64 * (small + big) / h_less
    assert est.small_batch_sq == pytest.approx(small, rel=8 * EPS64)
    assert est.trace_covariance == pytest.approx(tr, abs=atol_tr)
    assert est.grad_norm_sq == pytest.approx(g2, abs=8 * EPS64 * big + atol_tr / 5)


def test_measured_noise_scale_hessian_of_zero_gradients_is_not_given() -> None:
    """Every example fitted exactly (MSE on the model's own outputs): tr(HΣ) = GᵀHG = 0, so
    B_noise is 0/0; it was inf, as if the noise dominated. The zero parts are still given."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        Y = model(X)
    diag = cl.Diagnostics(model, nn.MSELoss(), quantities=["loss", "noise_scale_hessian"], every=1)
    with pytest.warns(MeasurementFailedWarning, match="B_noise is 0/0"):
        diag.step(1, X, Y)
    values = diag.records[-1]["values"]
    assert "noise_scale_hessian" not in values and "noise_scale_hessian_stderr" not in values
    assert values["trace_hessian_covariance"] == 0.0 and values["grad_hessian_grad"] == 0.0
