"""Review sweep 15, memory: K-FAC's peak, its no-layer-fits refusal, Hutch++'s budget check.

K-FAC's factors are compared with their definition computed here example by example; the memory
K-FAC holds is counted independently, as the bytes of the large storages alive at every aten
call (a dispatch mode); Hutch++'s budget boundary is checked to the byte, with the trace of a
rank-one matrix (exact for a sketch of one vector) and the unbudgeted run as references.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import curvlab as cl
import curvlab.estimators as est
from curvlab.estimators import EstimatorMemoryError
from curvlab.estimators._protocol import TensorOperator
from curvlab.estimators._trace import PROBE_VECTORS


class _PeakBytes(TorchDispatchMode):
    """The peak of the bytes held by storages of at least ``least`` bytes that aten calls inside
    the mode allocate (an output whose storage none of the call's inputs has), each counted
    until the storage is freed."""

    def __init__(self, least: int) -> None:
        super().__init__()
        self.least = least
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size >= self.least and key not in self.live and key not in given:
                self.live[key] = size
                self.current += size
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._freed, key)
        return out


W, C = 48, 3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(W, W), nn.Tanh(), nn.Linear(W, W), nn.Tanh(), nn.Linear(W, C)
    ).double()


def _data(n: int = 6) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, W, dtype=torch.float64, generator=gen), torch.randint(
        0, C, (n,), generator=gen
    )


def _empirical_brute_force(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, tuple]:
    """``A = (1/N) sum_n x_n x_n^T`` (with the bias column left out: kfac's ``A`` is the
    weight's) and ``G = (1/N) sum_n d_n d_n^T``, ``d_n`` the gradient of example ``n``'s
    negative log-likelihood with respect to the layer output (empirical Fisher, "mean")."""
    names = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    A = {n: 0.0 for n in names}
    G = {n: 0.0 for n in names}
    for x, label in zip(X, y):
        h, outs, ins = x[None], {}, {}
        for i, m in enumerate(model):
            if isinstance(m, nn.Linear):
                ins[str(i)] = h.detach()[0]
                h = m(h)
                outs[str(i)] = h
            else:
                h = m(h)
        nll = nn.functional.cross_entropy(h, label[None], reduction="sum")
        grads = torch.autograd.grad(nll, [outs[n] for n in names])
        for n, g in zip(names, grads):
            A[n] = A[n] + torch.outer(ins[n], ins[n]) / len(X)
            G[n] = G[n] + torch.outer(g[0], g[0]) / len(X)
    return {n: (A[n], G[n]) for n in names}


# --- 1. kfac holds its factors and one temporary of the largest factor's size ------------------


@pytest.mark.parametrize(
    "kind, approx", [("empirical", "expand"), ("empirical", "reduce"), ("exact", "expand")]
)
def test_kfac_holds_the_factors_and_one_temporary(kind: str, approx: str) -> None:
    """The documented peak: the factors plus one temporary of the largest factor's size (before,
    the scaled copies of every raw sum were made while the sums were alive, twice the factors;
    and ``A``'s product and its division were two temporaries at once). Three chunks, so the
    later ones add temporaries to the sums."""
    torch.set_num_threads(1)
    model, (X, y) = _mlp(), _data()
    largest = W * W * 8  # A of every layer, G of the hidden ones (float64)
    mode = _PeakBytes(largest)
    with mode:
        f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind=kind, approx=approx, chunk_size=2)
    total = f.info["factor_bytes"]
    assert mode.peak <= total + largest, (mode.peak, total, largest)
    assert mode.current <= total  # what is left is the result
    if kind == "empirical":
        for name, (A, G) in _empirical_brute_force(model, X, y).items():
            torch.testing.assert_close(f[name].A, A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(f[name].G, G, rtol=1e-12, atol=1e-14)


# --- 2. no layer fits the budget: say so instead of suggesting an empty selection --------------


class _Forwards:
    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *args: Any) -> None:
        self.count += 1


def test_kfac_budget_below_every_layer_names_the_smallest_and_the_budget_it_needs() -> None:
    torch.set_num_threads(1)
    model, (X, y) = _mlp(), _data()
    loss_fn = nn.CrossEntropyLoss()
    seen = _Forwards(model)
    smallest = (W * W + C * C) * 8  # layer '4': A 48x48, G 3x3
    total = 2 * (2 * W * W * 8) + smallest
    try:
        with pytest.raises(ValueError) as err:
            cl.kfac(model, loss_fn, (X, y), kind="empirical", memory_budget=100)
        msg = str(err.value)
        assert seen.count == 0, "refused before any forward pass"
        assert "no selected layer's K-FAC factors fit memory_budget=100 bytes" in msg
        assert "'4' (Linear, weight '4.weight')" in msg and f"{smallest:,} bytes" in msg
        assert f"{total:,} bytes (all selected layers)" in msg
        assert "params=lambda" not in msg  # the selection that left out every layer
        # following it: that layer alone at that budget
        f = cl.kfac(model, loss_fn, (X, y), kind="empirical", memory_budget=smallest, params="4")
        assert list(f) == ["4"] and f.info["factor_bytes"] == smallest
        A, G = _empirical_brute_force(model, X, y)["4"]
        torch.testing.assert_close(f["4"].A, A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(f["4"].G, G, rtol=1e-12, atol=1e-14)
        # one byte more than the smallest block: the usual message, whose selection works
        with pytest.raises(ValueError, match=r"params=lambda name, p: name not in") as err:
            cl.kfac(model, loss_fn, (X, y), kind="empirical", memory_budget=smallest + 1)
        assert "no selected layer" not in str(err.value)
    finally:
        seen.handle.remove()


def test_kfac_budget_below_a_single_selected_layer() -> None:
    torch.set_num_threads(1)
    model, (X, y) = _mlp(), _data()
    with pytest.raises(ValueError, match=r"the one selected layer, '2' \(Linear"):
        cl.kfac(model, nn.CrossEntropyLoss(), (X, y), params="2", memory_budget=1000)
    for bad in (0, -5, True):  # not a budget: the usual validation
        with pytest.raises(ValueError, match="memory_budget must be"):
            cl.kfac(model, nn.CrossEntropyLoss(), (X, y), memory_budget=bad)


# --- 3. Hutch++: one check of its whole peak against the caller's own budget -------------------


class _Counting(TensorOperator):
    def __init__(self, matrix: Tensor) -> None:
        super().__init__(matrix)
        self.products = 0

    def matmat(self, V: Tensor) -> Tensor:
        self.products += 1
        return super().matmat(V)


def _rank_one(dim: int = 50) -> Tensor:
    v = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return torch.outer(v, v)


def test_hutchpp_budget_boundary_is_the_whole_peak_and_quoted_as_passed() -> None:
    """``k = 1``: the sketch and a batch of one probe take ``k + 4 = 5`` vectors (more than the
    ``2k`` of the QR); before, ``memory_budget = 5`` vectors - 1 byte was refused as more than
    ``memory_budget - k`` vectors (a budget the caller never passed) for a need of 4."""
    torch.set_num_threads(1)
    A = _rank_one()
    vec = 8 * A.shape[0]
    need = (1 + PROBE_VECTORS) * vec
    res = est.hutchpp(_Counting(A), num_matvecs=3, seed=0, memory_budget=need)
    assert res.value == pytest.approx(float(torch.trace(A)), rel=1e-12)  # rank one: exact
    op = _Counting(A)
    with pytest.raises(EstimatorMemoryError) as err:
        est.hutchpp(op, num_matvecs=3, seed=0, memory_budget=need - 1)
    assert op.products == 0
    assert err.value.needed == need and err.value.allowed == need - 1
    msg = str(err.value)
    assert f"({need:,} bytes), more than memory_budget={need - 1:,}" in msg
    assert "= 5 vectors" in msg and "raise memory_budget" in msg


def test_hutchpp_budget_boundary_when_the_qr_or_a_given_batch_dominates() -> None:
    torch.set_num_threads(1)
    A = _rank_one()
    vec = 8 * A.shape[0]
    ref = est.hutchpp(TensorOperator(A), num_matvecs=30, seed=2)
    # k = 10: 2k = 20 vectors for the QR; a budget of 20 holds batches of 2 beside the sketch
    op = _Counting(A)
    res = est.hutchpp(op, num_matvecs=30, seed=2, memory_budget=20 * vec)
    assert res.value == pytest.approx(ref.value, rel=1e-12) and op.products == 15
    with pytest.raises(EstimatorMemoryError, match=r"= 20 vectors") as err:
        est.hutchpp(_Counting(A), num_matvecs=30, seed=2, memory_budget=20 * vec - 1)
    assert err.value.needed == 20 * vec and err.value.allowed == 20 * vec - 1
    # batch_size=5: k + 4 * 5 = 30 vectors
    res = est.hutchpp(TensorOperator(A), 30, seed=2, batch_size=5, memory_budget=30 * vec)
    assert res.value == pytest.approx(ref.value, rel=1e-12)
    op = _Counting(A)
    with pytest.raises(EstimatorMemoryError) as err:
        est.hutchpp(op, 30, seed=2, batch_size=5, memory_budget=30 * vec - 1)
    assert op.products == 0
    assert err.value.needed == 30 * vec and err.value.allowed == 30 * vec - 1
    msg = str(err.value)
    assert f"more than memory_budget={30 * vec - 1:,}" in msg and "batch_size" in msg


def test_trace_hutchpp_budget_boundary_on_a_model() -> None:
    """The reviewer's case: ``D = 114`` float64 parameters, ``num_probes=3``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (40,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    vec = 8 * sum(p.numel() for p in model.parameters())
    ref = cl.trace(model, loss_fn, (X, y), method="hutch++", num_probes=3)
    res = cl.trace(model, loss_fn, (X, y), method="hutch++", num_probes=3, memory_budget=5 * vec)
    assert res.value == pytest.approx(ref.value, rel=1e-12)
    for budget in (2 * vec, 5 * vec - 1):
        with pytest.raises(EstimatorMemoryError) as err:
            cl.trace(model, loss_fn, (X, y), method="hutch++", num_probes=3, memory_budget=budget)
        assert err.value.needed == 5 * vec and err.value.allowed == budget
        assert f"more than memory_budget={budget:,}" in str(err.value)


def test_a_fractional_budget_is_quoted_as_passed():
    # found in review: memory_budget=0.001 was quoted as "memory_budget=0 bytes"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match=r"memory_budget=0\.001 bytes"):
        cl.kfac(model, nn.CrossEntropyLoss(), (X, y), memory_budget=0.001)
    with pytest.raises(ValueError, match=r"memory_budget=100 bytes"):
        cl.kfac(model, nn.CrossEntropyLoss(), (X, y), memory_budget=100)
