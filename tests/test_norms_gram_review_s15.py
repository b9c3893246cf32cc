"""``fisher_norms`` bounds its Gram blocks, not only its rows (fifteenth review).

``_rechunk`` limited a chunk's rows to 256 MiB of rows x parameters but never counted the chunk's
``R x R`` Gram matrix and its two float64 copies: ``Linear(4, 40)`` in float64 with 1024 examples
and ``kind="exact"`` held 62.5 MiB of rows and asked for a 12.5 GiB Gram matrix, failing with
torch's allocator error after the passes. Now a chunk holds at most :func:`_gram_rows` rows, and
the rows of one example beyond that are paired that many rows at a time (the squared Gram entries
add over blocks: the same number). Here the Gram budget is patched down to a few rows, every
Gram product is recorded (all go through ``curvlab.quantities._gram._products``), and the norms
are compared with dense float64 brute force.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

import curvlab as cl
import curvlab.quantities._gram as gram_module
import curvlab.quantities._norms as norms_module
from curvlab.quantities._gram import DenseRows, LayerRows, OuterRows

DT = torch.float64
SIDE = 5  # rows a side of a Gram block under the patched budget


def _small_gram_budget(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Patch the Gram budget to ``SIDE`` float64 rows a side; the shapes of all Gram products."""
    # raising=False: the old module had no Gram budget (the products' sizes then fail the test)
    monkeypatch.setattr(norms_module, "_GRAM_BUDGET_BYTES", SIDE * SIDE * 24, raising=False)
    shapes: list[tuple[int, int]] = []
    products = gram_module._products

    def spy(P: Tensor, Q: Tensor) -> Tensor:
        out = products(P, Q)
        shapes.append((out.shape[0], out.shape[1]))
        return out

    monkeypatch.setattr(gram_module, "_products", spy)
    return shapes


def _model(classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, classes)).to(DT)


def _per_example_grads(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Rows ``(N, D)``: gradients of each example's cross-entropy, by ``torch.func``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p: dict, x: Tensor, t: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    per = vmap(grad(nll), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g.reshape(X.shape[0], -1) for g in per.values()], dim=1)


def _norms_of(F: Tensor) -> tuple[float, float]:
    return float(torch.linalg.matrix_norm(F)), float(torch.linalg.vector_norm(F.diagonal()))


def test_frob_sq_in_blocks_is_that_of_the_whole_gram() -> None:
    torch.manual_seed(1)
    n, draws = 4, 3
    A = torch.randn(n, 3, dtype=DT)
    G = torch.randn(draws * n, 2, dtype=DT)
    P = torch.randn(draws * n, 5, dtype=DT)
    V = LayerRows([OuterRows(A, G, bias=True), DenseRows(P)])
    # dense rows: [g_r a_r^T, g_r] of row r = m n + k (input k), then the dense part
    outer = torch.einsum("ro,ri->roi", G, A.repeat(draws, 1)).flatten(1)
    dense = torch.cat([outer, G, P], dim=1)
    W = LayerRows([OuterRows(A[:2], G.view(draws, n, 2)[:, :2].reshape(-1, 2), True)])
    W_dense = dense.view(draws, n, -1)[:, :2, : outer.shape[1] + 2].reshape(draws * 2, -1)
    for side in (1, 2, 5, 12):  # 5: ranges across two label draws (rows gathered)
        got = norms_module._frob_sq(V, V, side)
        assert float(got) == pytest.approx(float((dense @ dense.T).square().sum()), rel=1e-12)
        cross = norms_module._frob_sq(V, W, side)
        ref = (dense[:, : W_dense.shape[1]] @ W_dense.T).square().sum()
        assert float(cross) == pytest.approx(float(ref), rel=1e-12)


@pytest.mark.parametrize("backend", ["auto", "func"])
def test_exact_rows_of_one_example_over_the_budget_in_blocks(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    classes, N = 7, 9  # 7 rows an example > SIDE: one example a chunk, its Gram in blocks
    model = _model(classes)
    X, y = torch.randn(N, 4, dtype=DT), torch.randint(0, classes, (N,))
    shapes = _small_gram_budget(monkeypatch)
    got = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y), kind="exact", backend=backend)
    assert shapes and max(max(s) for s in shapes) <= SIDE, max(shapes)  # (63, 63) before

    # brute force: G = (1/N) sum_n J_n^T Lambda_n J_n
    names = [k for k, _ in model.named_parameters()]
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = vmap(jacrev(lambda p, x: functional_call(model, p, (x[None],))[0]), (None, 0))(params, X)
    J = torch.cat([J[k].reshape(N, classes, -1) for k in names], 2)
    p = torch.softmax(model(X), -1).detach()
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    frob, diag = _norms_of(torch.einsum("ncd,nce,nef->df", J, Lam, J) / N)
    assert got.frobenius == pytest.approx(frob, rel=1e-10)
    assert got.diag_frobenius == pytest.approx(diag, rel=1e-10)


def test_one_streamed_chunk_over_the_gram_budget_is_split(monkeypatch: pytest.MonkeyPatch) -> None:
    N = 12  # one batch for curvlab's hooks: its whole 12 x 12 Gram matrix was formed
    model = _model(3)
    X, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))
    shapes = _small_gram_budget(monkeypatch)
    got = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y))
    assert got.backend == "hooks"
    assert shapes and max(max(s) for s in shapes) <= SIDE, max(shapes)  # (12, 12) before
    rows = _per_example_grads(model, X, y)
    frob, diag = _norms_of(rows.T @ rows / N)
    assert got.frobenius == pytest.approx(frob, rel=1e-10)
    assert got.diag_frobenius == pytest.approx(diag, rel=1e-10)


def test_mc_draws_of_one_example_over_the_budget_in_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    N, M = 4, 11  # 11 draws an example: ranges of 5 rows across draws, and a 1-row range
    model = _model(3)
    X, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))
    shapes = _small_gram_budget(monkeypatch)
    drawn: list[Tensor] = []
    draw = norms_module.draw_labels

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = draw(*args, **kwargs)
        drawn.append(torch.stack(out))  # (M, examples of the chunk), in the chunks' order
        return out

    monkeypatch.setattr(norms_module, "draw_labels", spy)
    got = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y), kind="mc", mc_samples=M, seed=0)
    assert got.backend == "hooks"
    assert shapes and max(max(s) for s in shapes) <= SIDE, max(shapes)  # (44, 44) before

    labels = torch.cat(drawn, dim=1)  # (M, N)
    assert labels.shape == (M, N)
    rows = torch.cat([_per_example_grads(model, X, labels[m]) for m in range(M)])
    frob, diag = _norms_of(rows.T @ rows / (N * M))
    assert got.frobenius == pytest.approx(frob, rel=1e-10)
    assert got.diag_frobenius == pytest.approx(diag, rel=1e-10)


def test_one_example_whose_draws_pass_the_budget_is_not_streamed_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # found in review: data of one example is one chunk, which took the streamed path and
    # formed its whole (11, 11) Gram matrix past the budget
    M = 11
    model = _model(3)
    X, y = torch.randn(1, 4, dtype=DT), torch.randint(0, 3, (1,))
    ref = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y), kind="mc", mc_samples=M, seed=0)
    shapes = _small_gram_budget(monkeypatch)
    streamed = norms_module._streamed_gram

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        gram, diag = streamed(*args, **kwargs)
        shapes.append(tuple(gram.shape))
        return gram, diag

    monkeypatch.setattr(norms_module, "_streamed_gram", spy)
    got = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y), kind="mc", mc_samples=M, seed=0)
    assert shapes and max(max(s) for s in shapes) <= SIDE, max(shapes)
    assert got.frobenius == pytest.approx(ref.frobenius, rel=1e-12)  # the same draws
    assert got.diag_frobenius == pytest.approx(ref.diag_frobenius, rel=1e-12)


def test_gram_rows_fit_the_budget() -> None:
    budget = norms_module._GRAM_BUDGET_BYTES
    for itemsize, per_entry in ((2, 20), (4, 20), (8, 24)):  # float32 blocks for 16-bit rows
        side = norms_module._gram_rows(itemsize)
        assert side * side * per_entry <= budget < (side + 1) ** 2 * per_entry


def _data(N: int = 24) -> tuple[nn.Module, Tensor, Tensor]:
    model = _model(3)
    g = torch.Generator().manual_seed(2)
    return model, torch.randn(N, 4, generator=g, dtype=DT), torch.randint(0, 3, (N,), generator=g)


def _rank_worker(
    rank: int, world: int, init_file: str, out_dir: str, kind: str = "empirical"
) -> None:
    """One rank of a gloo world: its shard's norms under the patched Gram budget (this process
    alone), and the largest Gram product it formed, to ``out_dir/rank{rank}.json``."""
    import json
    from pathlib import Path

    from tests.distributed_checks import join_gloo

    join_gloo(rank, world, init_file, 90)
    norms_module._GRAM_BUDGET_BYTES = SIDE * SIDE * 24  # type: ignore[attr-defined]
    largest = [0]
    products = gram_module._products

    def spy(P: Tensor, Q: Tensor) -> Tensor:
        out = products(P, Q)
        largest[0] = max(largest[0], *out.shape)
        return out

    gram_module._products = spy
    model, X, y = _data() if kind == "empirical" else _exact_data()
    shard = slice(rank * len(X) // world, (rank + 1) * len(X) // world)
    got = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X[shard], y[shard]), kind=kind)
    report = {"frobenius": got.frobenius, "diag": got.diag_frobenius, "largest": largest[0]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def _exact_data() -> tuple[nn.Module, Tensor, Tensor]:
    """7 rows an example (> SIDE): one example a chunk, its Gram blocks in pieces."""
    model = _model(7)
    g = torch.Generator().manual_seed(3)
    return model, torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 7, (6,), generator=g)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_exact_rows_between_ranks_in_blocks(tmp_path) -> None:  # noqa: ANN001
    # found in review: one example's rows past the budget formed the whole (7, 7) block between
    # ranks, where one process splits it
    import json

    import torch.multiprocessing as mp

    world = 2
    mp.spawn(
        _rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path), "exact"), nprocs=world
    )
    model, X, y = _exact_data()
    one = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["largest"] <= SIDE, report  # 7 before
        assert report["frobenius"] == pytest.approx(one.frobenius, rel=1e-10)
        assert report["diag"] == pytest.approx(one.diag_frobenius, rel=1e-10)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_gram_blocks_between_ranks_within_the_budget(tmp_path) -> None:  # noqa: ANN001
    import json

    import torch.multiprocessing as mp

    world = 2  # 12 examples a rank: chunks of SIDE rows, so every block between ranks is too
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    model, X, y = _data()
    rows = _per_example_grads(model, X, y)
    frob, diag = _norms_of(rows.T @ rows / len(X))
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["largest"] <= SIDE, report  # 12 before
        assert report["frobenius"] == pytest.approx(frob, rel=1e-10)
        assert report["diag"] == pytest.approx(diag, rel=1e-10)
