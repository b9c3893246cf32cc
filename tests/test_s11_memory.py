"""Memory review s11 (fix_mem): what is held at once, and Monte-Carlo draws independent of chunks.

* M1: the exact GGN (func backend) checked one example's square-root factors against the memory
  available, then held a whole chunk's, concatenated them and squared the copy; it now sums the
  squares block by block, sizes the blocks by the memory available and counts what a block holds
  (and, for ``sqrt_ggn``, the chunk's factors it returns) before the first factor is built.
* M3: the hooks' batched per-example products ``(n, in', out)`` of sequence Linear and HF
  ``Conv1D`` layers below 2^20 entries were sized by the unfolded input, so short sequences put a
  whole chunk's gradients in one block (1 GB at 256 sequences for ``Linear(1000, 1000)``); blocks
  are now bounded by the product itself (4 MiB on a CPU, 256 MiB elsewhere).
* M4: ``mc_samples >= 2`` drew all of a chunk's first labels, then all its second, so the labels an
  example got depended on the chunk boundaries; draws are now example-major.
* M6: blocks of a tied parameter's per-example gradients were counted at 4 bytes per entry, so
  float64 blocks took twice the documented 256 MiB.

Every number is compared with a brute-force computation (autograd one example at a time).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvlab as cl
from curvlab._losses import loss_spec
from curvlab.backends import _func, _hooks, _layers
from curvlab.estimators import _memory
from curvlab.estimators._memory import EstimatorMemoryError
from curvlab.quantities import _kfac, _norms

# ----------------------------------------------------------------------------- helpers


def _mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _sum_grads(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> list[dict]:
    """Per example ``n`` the gradient of its share of the sum-reduced loss (autograd, one by one)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(X.shape[0]):
        out = model(X[i : i + 1])
        if isinstance(loss_fn, nn.CrossEntropyLoss) and out.dim() == 3:  # (1, T, C): classes last
            out = out.movedim(-1, 1)
        loss = loss_fn(out, y[i : i + 1])
        gs = torch.autograd.grad(loss, list(params.values()))
        rows.append(dict(zip(params, gs)))
    return rows


def _assert_close(got: dict, want: dict, rtol: float = 1e-10) -> None:
    assert set(got) == set(want)
    for k in want:
        scale = float(want[k].abs().max()) or 1.0
        err = float((got[k] - want[k]).abs().max())
        assert err <= rtol * scale, (k, err, scale)


def _brute_ggn_diag(model: nn.Module, X: Tensor) -> dict[str, Tensor]:
    """``diag sum_n J_n^T (diag p_n - p_n p_n^T) J_n`` of the summed cross-entropy."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(X.shape[0]):

        def f(p: dict, x: Tensor = X[i : i + 1]) -> Tensor:
            return functional_call(model, p, (x,))[0]

        J = jacrev(f)(params)  # (C, *shape) per parameter
        prob = f(params).softmax(-1)
        H = torch.diag(prob) - torch.outer(prob, prob)
        for k in params:
            Jk = J[k].reshape(J[k].shape[0], -1)
            total[k] += torch.einsum("ci,cd,di->i", Jk, H, Jk).reshape(params[k].shape)
    return total


class _OuterVmap:
    """Wraps ``_func.vmap``: records the bytes of every outermost call's result (one block)."""

    def __init__(self, vmap: Callable) -> None:
        self.vmap, self.depth, self.blocks = vmap, 0, []

    def __call__(self, fn: Callable, *args, **kwargs) -> Callable:
        mapped = self.vmap(fn, *args, **kwargs)

        def run(*a, **k):
            self.depth += 1
            try:
                res = mapped(*a, **k)
            finally:
                self.depth -= 1
            if self.depth == 0:
                leaves = res.values() if isinstance(res, dict) else [res]
                self.blocks.append(sum(t.numel() * t.element_size() for t in leaves))
            return res

        return run


# ----------------------------------------------------------------------------- M1: exact GGN


def _ggn_sizes(model: nn.Module, K: int) -> tuple[int, int]:
    """(bytes per example of a block, one gradient's bytes): the pre-flight check's units (the
    K factors, one parameter's squares and the loss Hessian's K x K square root, review s14)."""
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    item = next(model.parameters()).element_size()
    return K * (sum(sizes) + max(sizes)) + K * K * item, sum(sizes)


def test_m1_exact_ggn_blocks_fit_the_memory_available(monkeypatch: pytest.MonkeyPatch) -> None:
    # memory for two examples' factors: the chunk of six is summed in blocks of two, exactly
    model = _mlp()
    X = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    unit, vector = _ggn_sizes(model, K=3)
    avail = 2 * unit + vector + 8
    recorder = _OuterVmap(_func.vmap)
    monkeypatch.setattr(_func, "vmap", recorder)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: avail)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    got = cl.diag_fisher(model, loss_fn, (X, y), kind="exact", backend="func")
    assert got.backend == "func"
    _assert_close(dict(got), _brute_ggn_diag(model, X))
    factors = 3 * vector  # one example's K factors
    assert recorder.blocks and max(recorder.blocks) <= 2 * factors  # was all six (6 x factors)
    assert len(recorder.blocks) == 3


def test_m1_exact_ggn_refuses_before_any_factor_with_the_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _mlp()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    unit, vector = _ggn_sizes(model, K=3)
    recorder = _OuterVmap(_func.vmap)
    monkeypatch.setattr(_func, "vmap", recorder)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: unit)  # under one block
    with pytest.raises(EstimatorMemoryError) as info:
        cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind="exact", backend="func")
    assert info.value.needed == unit + vector  # one example's block and one gradient
    assert info.value.allowed == unit
    message = str(info.value)
    assert "3 output entries per example" in message and "51 parameters" in message
    assert "block of 1 of the chunk's 5 examples" in message and "kind='mc'" in message
    assert recorder.blocks == []  # refused before any factor was built


def test_m1_sqrt_ggn_counts_the_chunk_it_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    # fisher_norms(kind="exact") keeps every example's factors: they are counted, not one example's
    model = _mlp()
    X = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    unit, vector = _ggn_sizes(model, K=3)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 3 * unit)
    spec = loss_spec(nn.CrossEntropyLoss(reduction="sum"))
    backend = _func.FuncBackend()
    with backend.extended(model, spec, True, cl._scan.scan_model(model)) as s:
        with pytest.raises(EstimatorMemoryError, match="all 6 examples' factors are kept"):
            backend.sqrt_ggn(s, X, y)
        monkeypatch.setattr(_memory, "available_bytes", lambda device: 6 * 3 * vector + 3 * unit)
        factors = backend.sqrt_ggn(s, X, y)  # (K, n, *shape): their squares sum to the diagonal
    _assert_close(
        {k: v.square().sum((0, 1)) for k, v in factors.items()}, _brute_ggn_diag(model, X)
    )


# ----------------------------------------------------------------------------- M3: products


class _SeqLinear(nn.Module):
    """``(n, T, 256) -> (n, T, 5)`` through a layer below 2^20 entries (nn.Linear or HF Conv1D)."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.a = Conv1D(300, 256)
        else:
            self.a = nn.Linear(256, 300)
        self.b = nn.Linear(300, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class _BmmSizes:
    """Wraps ``torch.bmm``: records the bytes of each result."""

    def __init__(self) -> None:
        self.bmm, self.sizes = torch.bmm, []

    def __call__(self, *args, **kwargs) -> Tensor:
        res = self.bmm(*args, **kwargs)
        self.sizes.append(res.numel() * res.element_size())
        return res


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "hf_conv1d"])
@pytest.mark.parametrize("what", ["diag_fisher", "gradient_stats"])
def test_m3_sequence_layers_bound_their_per_example_products(
    conv1d: bool, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if conv1d:
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _SeqLinear(conv1d).double()
    assert model.a.weight.numel() < _layers.PER_EXAMPLE_PRODUCTS  # the batched route
    gen = torch.Generator().manual_seed(2)
    N, T = 16, 3
    X = torch.randn(N, T, 256, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 5, (N, T), generator=gen)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    sizes = _BmmSizes()
    monkeypatch.setattr(torch, "bmm", sizes)
    if what == "diag_fisher":
        got = cl.diag_fisher(model, loss_fn, (X, y))
        values = dict(got)
    else:
        got = cl.gradient_stats(model, loss_fn, (X, y))
        values = dict(got.second_moment)
    monkeypatch.undo()
    assert got.backend == "hooks"
    # one example's product is 256 x 300 float64 = 614 kB: six examples per 4 MiB block (all
    # sixteen in one block before: 9.8 MB)
    assert sizes.sizes and max(sizes.sizes) <= 4 * 2**20
    grads = _sum_grads(model, loss_fn, X, y)
    if what == "diag_fisher":
        want = {k: sum(g[k].square() for g in grads) for k in grads[0]}
    else:  # statistics of the "mean" convention's per-example gradients: s_n / T
        want = {k: sum((g[k] / T).square() for g in grads) / N for k in grads[0]}
    _assert_close(values, want)


def test_m3_blocks_off_the_cpu_are_bounded_by_the_product() -> None:
    # on a GPU the blocks were all examples at once: 1024 x Linear(1000, 1000) = 4 GB float32
    module = nn.Linear(1000, 1000, device="meta")
    a = torch.empty(1024, 4, 1000, device="meta")
    g = torch.empty(1024, 4, 1000, device="meta")
    blocks = _layers._example_blocks(module, a, g)
    assert blocks[0][0] == 0 and blocks[-1][1] == 1024
    assert all(b[0] == c[1] for b, c in zip(blocks[1:], blocks))
    assert max(hi - lo for lo, hi in blocks) * 1000 * 1000 * 4 <= 256 * 2**20


# ----------------------------------------------------------------------------- M4: draws


class _SeqCE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def _seq_data(loss: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(3)
    model = _SeqCE().double()
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(7, 3, 5, dtype=torch.float64, generator=gen)
    if loss == "ce":
        y = torch.randint(0, 4, (7, 3), generator=gen)
        y[1, 0] = y[4, 2] = -100  # ignored positions stay ignored
        return model, nn.CrossEntropyLoss(), X, y
    y = torch.randint(0, 2, (7, 3, 4), generator=gen).double()
    return model, nn.BCEWithLogitsLoss(reduction="sum"), X, y


def _splits(X: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    return [(X[:2], y[:2]), (X[2:3], y[2:3]), (X[3:], y[3:])]


def _invariant(results: list[dict[str, Tensor]]) -> None:
    for r in results[1:]:
        _assert_close(r, results[0], rtol=1e-12)


@pytest.mark.parametrize(
    "backend",
    [
        "hooks",
        "func",
        pytest.param(
            "backpack",
            marks=pytest.mark.xfail(
                not hasattr(cl.backends._backpack, "draw_labels"),
                reason="needs the _backpack.py patch of the fix_mem report",
                strict=True,
            ),
        ),
    ],
)
@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_m4_mc_diag_fisher_does_not_depend_on_chunking(backend: str, loss: str) -> None:
    model, loss_fn, X, y = _seq_data(loss)

    def run(data: object, chunk: int | None = None) -> dict[str, Tensor]:
        kw = dict(kind="mc", mc_samples=3, seed=11, backend=backend, chunk_size=chunk)
        res = cl.diag_fisher(model, loss_fn, data, **kw)
        assert res.backend == backend
        return dict(res)

    _invariant([run((X, y)), run((X, y), 1), run((X, y), 2), run(_splits(X, y))])


@pytest.mark.xfail(
    not hasattr(_kfac, "draw_labels"),
    reason="needs the _kfac.py patch of the fix_mem report",
    strict=True,
)
def test_m4_mc_kfac_does_not_depend_on_chunking() -> None:
    model, loss_fn, X, y = _seq_data("ce")
    runs = [
        cl.kfac(model, loss_fn, data, kind="mc", mc_samples=3, seed=11, chunk_size=chunk)
        for data, chunk in (((X, y), None), ((X, y), 1), ((X, y), 3), (_splits(X, y), None))
    ]
    _invariant([{f"{k}.G": f.G for k, f in r.items()} for r in runs])


@pytest.mark.xfail(
    not hasattr(_norms, "draw_labels"),
    reason="needs the _norms.py patch of the fix_mem report",
    strict=True,
)
def test_m4_mc_fisher_norms_does_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    model, loss_fn, X, y = _seq_data("ce")

    def run(data: object, chunk: int | None = None) -> dict[str, Tensor]:
        r = cl.fisher_norms(
            model, loss_fn, data, kind="mc", mc_samples=3, seed=11, chunk_size=chunk
        )
        return {"f": torch.tensor(r.frobenius), "d": torch.tensor(r.diag_frobenius)}

    runs = [run((X, y)), run((X, y), 1), run((X, y), 3), run(_splits(X, y))]
    monkeypatch.setattr(_norms, "_FACTOR_BUDGET_BYTES", 1)  # its own rechunking, one by one
    monkeypatch.setattr(_norms, "_CACHE_BUDGET_BYTES", 1)
    runs.append(run((X, y)))
    _invariant(runs)


def test_m4_draws_are_example_major_and_one_draw_is_unchanged() -> None:
    model, loss_fn, X, y = _seq_data("ce")
    spec = loss_spec(loss_fn)
    with torch.no_grad():
        out = spec.prepare(model(X), y)
    one = _layers.draw_labels(spec, out, torch.Generator().manual_seed(5), y, 1)
    assert len(one) == 1
    assert torch.equal(one[0], spec.sample_targets(out, torch.Generator().manual_seed(5), y))
    got = _layers.draw_labels(spec, out, torch.Generator().manual_seed(5), y, 3)
    gen = torch.Generator().manual_seed(5)  # example by example, each example's three in a row
    want = [
        [spec.sample_targets(out[i : i + 1], gen, y[i : i + 1]) for _ in range(3)] for i in range(7)
    ]
    for s in range(3):
        assert torch.equal(got[s], torch.cat([want[i][s] for i in range(7)]))
        assert got[s].is_contiguous()


# ----------------------------------------------------------------------------- M6: tied blocks


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.head = nn.Linear(5, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(idx)))


def test_m6_tied_blocks_count_float64_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(6)
    model = _Tied().double()
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 11, (8, 4), generator=gen)
    y = torch.randint(0, 11, (8, 4), generator=gen)
    per_example = 11 * 5 * 8  # the tied weight's per-example gradient in float64
    monkeypatch.setattr(_hooks, "_SHARED_BLOCK_BYTES", 3 * per_example)
    seen: list[tuple[int, int]] = []
    original = _hooks.HooksBackend.per_example

    def recording(taps, outs, lo=0, hi=None, spare=None):  # noqa: ANN001, ANN202
        seen.append((lo, hi))
        return original(taps, outs, lo, hi, spare)

    monkeypatch.setattr(_hooks.HooksBackend, "per_example", staticmethod(recording))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    got = cl.diag_fisher(model, loss_fn, (idx, y))
    assert got.backend == "hooks"
    assert seen == [(0, 3), (3, 6), (6, 8)]  # six examples per block (twice the budget) before
    grads = _sum_grads(model, loss_fn, idx, y)
    _assert_close(dict(got), {k: sum(g[k].square() for g in grads) for k in got})
