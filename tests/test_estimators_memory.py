"""Bounded memory of the estimators, against brute force on dense float64 matrices.

Restarted Lanczos with a basis far smaller than its number of steps still finds the top of the
spectrum; the vectors held are counted both by the estimator and independently (live tensors at
every product); SLQ runs on three vectors and gives the density of the stored-basis recurrence and
of the matrix; Hutchinson's estimate does not depend on how its probes are batched; a computation
that cannot fit is refused with the numbers before anything is allocated.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

import curvlab._precision as precision_module
import curvlab.estimators as est
import curvlab.estimators._krylov as krylov_module
import curvlab.estimators._memory as memory
from curvlab._rng import make_generator
from curvlab.estimators import EstimatorMemoryError
from curvlab.estimators._krylov import KrylovBasis
from curvlab.estimators._lanczos import _basis_size
from curvlab.estimators._protocol import TensorOperator
from curvlab.estimators._trace import PROBE_VECTORS, draw_probes


def _with_spectrum(ev: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(ev.numel(), ev.numel(), generator=gen, dtype=torch.float64))
    return (Q * ev) @ Q.T


def _clustered(dim: int = 400) -> torch.Tensor:
    """Five top eigenvalues 0.01 apart, above a bulk reaching 9: 10% gaps at most."""
    top = torch.tensor([10.0, 9.99, 9.98, 9.97, 9.96], dtype=torch.float64)
    return _with_spectrum(torch.cat([top, torch.linspace(0, 9, dim - 5, dtype=torch.float64)]), 0)


def _live_vectors(dim: int, ignore: list[torch.Tensor]) -> float:
    """Parameter-vectors (float64, ``dim`` entries) held by tensors alive in Python now: the
    distinct storages of tensors with an axis of length ``dim`` (vectors, blocks of them), other
    than those of ``ignore`` (allocated before the call)."""
    skip = {t.untyped_storage().data_ptr() for t in ignore}
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor and dim in obj.shape:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / (8 * dim)


class CountingOperator(TensorOperator):
    """A dense operator that counts the vectors alive besides its matrix and the tensors alive
    when it was built, before every ``every``-th product (before the product's output exists;
    a scan of all Python objects takes a fraction of a second)."""

    def __init__(self, matrix: torch.Tensor, every: int = 1) -> None:
        super().__init__(matrix)
        self._before = [o for o in gc.get_objects() if type(o) is torch.Tensor]
        self.every = every
        self.peak = 0.0
        self.widths: list[int] = []

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        if len(self.widths) % self.every == 0:
            self.peak = max(self.peak, _live_vectors(self.shape[0], self._before))
        self.widths.append(V.shape[1])
        return super().matmat(V)


class HugeOperator:
    """A ``D x D`` operator far too large for any machine; a product is a test failure."""

    def __init__(self, dim: int = 10**12, dtype: torch.dtype = torch.float32) -> None:
        self.shape = (dim, dim)
        self.dtype = dtype
        self.device = torch.device("cpu")

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise AssertionError("no product may run: the computation cannot fit")


# ---------------------------------------------------------------- restarted Lanczos
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_restarted_lanczos_with_a_basis_of_12_vectors_matches_eigvalsh(which: str) -> None:
    A = _clustered() if which == "largest" else -_clustered()
    truth = torch.linalg.eigvalsh(A)
    ref = truth.flip(0)[:5] if which == "largest" else truth[:5]
    vec = 8 * A.shape[0]
    op = CountingOperator(A, every=5)  # every 5th product: all phases of the 3-step cycles
    res = est.lanczos_eigenvalues(op, k=5, tol=1e-8, which=which, seed=0, memory_budget=12 * vec)
    assert res.converged and res.max_basis == 11
    assert res.num_matvecs > 5 * 12 and res.num_restarts >= 5  # far more steps than vectors
    # |theta - lambda| <= residual <= tol * ||A||
    assert float((res.values - ref).abs().max()) <= 1e-8 * res.norm
    assert res.peak_vectors <= 12  # the estimator's own count ...
    assert op.peak <= 12  # ... and the live tensors at every product
    assert op.num_matvecs == res.num_matvecs


def test_restarted_lanczos_vectors_and_residuals_keep_their_meaning() -> None:
    A = _clustered()
    res = est.lanczos_eigenvalues(
        TensorOperator(A), k=5, tol=1e-9, max_basis=11, return_vectors=True
    )
    resid = torch.linalg.vector_norm(A @ res.vectors - res.vectors * res.values, dim=0)
    assert float(resid.max()) <= 1e-9 * res.norm * 1.01
    torch.testing.assert_close(res.residuals, resid, rtol=1e-2, atol=1e-12)
    gram = res.vectors.T @ res.vectors
    torch.testing.assert_close(gram, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    assert res.peak_vectors <= 12


def test_basis_grows_one_vector_per_step_and_never_past_the_budget() -> None:
    A = _clustered(200)
    op = CountingOperator(A)
    res = est.lanczos_eigenvalues(op, k=2, tol=1e-14, max_matvecs=8)  # stops at 8 products
    assert not res.converged and res.num_matvecs == 8
    assert res.peak_vectors == 9 and op.peak <= 8  # nothing reserved beyond what was used
    kry = KrylovBasis(TensorOperator(A), torch.ones(200, dtype=torch.float64), max_basis=6)
    counts = []
    for _ in range(6):
        kry.step()
        counts.append(kry.num_vectors)
    assert counts == [2, 3, 4, 5, 6, 7]
    theta, S, _ = kry.ritz()
    kry.restart(torch.tensor([5, 4, 3]), theta, S)
    assert kry.num_vectors == 4 and kry.m == 3
    V = torch.stack(kry.V)  # still orthonormal after the in-place rotation
    torch.testing.assert_close(V @ V.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_default_basis_keeps_todays_size_on_small_problems_and_shrinks_with_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    GiB = 2**30
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * GiB)
    assert (
        _basis_size(HugeOperator(5000), 3, None, None, 1000, False, torch.device("cpu")) == 120
    )  # max(120, 3k) (60 before review s10)
    assert _basis_size(HugeOperator(5000), 30, None, None, 1000, False, torch.device("cpu")) == 120
    big = HugeOperator(2**26)  # 256 MiB per float32 vector: 61 of them would take 15 GiB
    assert _basis_size(big, 1, None, None, 1000, False, torch.device("cpu")) == 15  # 4 GiB
    assert _basis_size(big, 12, None, None, 1000, False, torch.device("cpu")) == 26
    # GPT-2 small (124M float32 parameters) on a 139 GiB GPU: 10 vectors (the floor), not 61
    gpt2 = HugeOperator(124_439_808)
    assert _basis_size(gpt2, 1, None, None, 30, False, torch.device("cpu")) == 10
    # with 4 GiB available the default takes at most half of it
    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * GiB)
    assert _basis_size(big, 1, None, None, 1000, False, torch.device("cpu")) == 7
    # an explicit budget sets the size; an explicit max_basis must fit it
    assert _basis_size(big, 1, None, 12 * 2**28, 1000, False, torch.device("cpu")) == 11
    with pytest.raises(EstimatorMemoryError, match="more than memory_budget"):
        _basis_size(big, 1, 20, 12 * 2**28, 1000, False, torch.device("cpu"))


def test_lanczos_basis_dtype_follows_the_parameters() -> None:
    A = _clustered(120)
    f32 = TensorOperator(A.float())
    kry = KrylovBasis(f32, torch.ones(120), max_basis=10)
    for _ in range(4):
        kry.step()
    assert {v.dtype for v in kry.V} == {torch.float32} and kry.H.dtype == torch.float64
    res = est.lanczos_eigenvalues(f32, k=2, tol=1e-5, return_vectors=True, basis_device="cpu")
    assert res.values.dtype == torch.float64 and res.vectors.dtype == torch.float32
    torch.testing.assert_close(res.values, torch.linalg.eigvalsh(A).flip(0)[:2], rtol=1e-5, atol=0)

    class Recording(TensorOperator):
        seen: set[torch.dtype] = set()

        def matmat(self, V: torch.Tensor) -> torch.Tensor:
            self.seen.add(V.dtype)
            return super().matmat(V)

    bf16 = Recording(A.to(torch.bfloat16))
    kry = KrylovBasis(bf16, torch.ones(120), max_basis=10)
    kry.step()
    assert kry.V[-1].dtype == torch.float32 and bf16.seen == {torch.bfloat16}
    res = est.lanczos_eigenvalues(bf16, k=1, tol=1e-2)
    exact = torch.linalg.eigvalsh(A.to(torch.bfloat16).double()).max()
    assert res.converged and abs(float(res.values[0] - exact)) <= 2e-2 * float(exact)


# ---------------------------------------------------------------- SLQ on three vectors
def _stored_basis_slq(A: torch.Tensor, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
    """SLQ's recurrence as it was before bounded memory: all ``steps + 1`` vectors stored in one
    matrix, each product orthogonalised against the previous two by one matrix-vector product."""
    V = torch.zeros(steps + 1, A.shape[0], dtype=A.dtype)
    H = torch.zeros(steps, steps, dtype=torch.float64)
    V[0] = v / torch.linalg.vector_norm(v)
    scale, m = 0.0, 0
    for j in range(steps):
        w = A @ V[j]
        start = max(0, j - 1)
        basis = V[start : j + 1]
        h = basis @ w
        w = torch.addmv(w, basis.T, h, alpha=-1)
        beta = float(torch.linalg.vector_norm(w))
        H[start : j + 1, j] = h
        m = j + 1
        V[m] = w / beta
        scale = max(scale, abs(float(H[j, j])), beta)
        if beta <= 10 * torch.finfo(A.dtype).eps * scale:
            break
    upper = torch.triu(H[:m, :m])
    theta, S = torch.linalg.eigh(upper + torch.triu(upper, 1).T)
    return theta, S[0] ** 2


def test_three_vector_slq_equals_the_stored_basis_recurrence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    A = _with_spectrum(torch.linspace(-1, 3, 80, dtype=torch.float64) ** 3, 11)
    res = est.slq(TensorOperator(A), num_steps=30, num_probes=3, seed=5, sigma=0.05)
    gen = make_generator(seed=5)
    for row in range(3):
        v = draw_probes(80, 1, gen, "rademacher", dtype=torch.float64)[:, 0]
        theta, tau = _stored_basis_slq(A, v, 30)
        torch.testing.assert_close(res.nodes[row], theta, rtol=0, atol=1e-12)
        torch.testing.assert_close(res.weights[row], tau, rtol=0, atol=1e-12)
    # the large-problem path (the fused updates and float64 reductions in chunks of 7 entries)
    monkeypatch.setattr(precision_module, "FUSED_CHUNK", 7)
    chunked = est.slq(TensorOperator(A), num_steps=30, num_probes=3, seed=5, sigma=0.05)
    torch.testing.assert_close(chunked.grid, res.grid, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked.density, res.density, rtol=0, atol=1e-9)
    for j in (1, 2, 3, 4):
        assert chunked.moment(j) == pytest.approx(res.moment(j), rel=1e-10, abs=1e-12)


def test_slq_holds_three_vectors_and_reorthogonalisation_its_basis() -> None:
    A = _with_spectrum(torch.linspace(0, 1, 150, dtype=torch.float64), 2)
    op = CountingOperator(A, every=7)
    plain = est.slq(op, num_steps=60, num_probes=2, seed=0)
    assert plain.num_matvecs == 120 and op.peak <= 2  # v_{j-1}, v_j (the product comes next)
    assert float(torch.trapezoid(plain.density, plain.grid)) == pytest.approx(1.0, abs=1e-9)
    op = CountingOperator(A, every=59)
    full = est.slq(op, num_steps=60, num_probes=1, seed=0, reorth_passes=2)
    assert (
        op.peak == 60
    )  # the basis of one probe at its last product  # the basis of one probe: up to 60 vectors at the last product
    with pytest.raises(EstimatorMemoryError, match=r"reorth_passes=0 \(the three-term"):
        est.slq(TensorOperator(A), num_steps=60, reorth_passes=2, memory_budget=10 * 8 * 150)
    assert float(torch.trapezoid(full.density, full.grid)) == pytest.approx(1.0, abs=1e-9)


def _exact_density(ev: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float):
    z = (grid[None, :] - ev[:, None]) / sigma
    dens = (weights[:, None] * torch.exp(-0.5 * z**2)).sum(0) / (sigma * math.sqrt(2 * math.pi))
    return dens / torch.trapezoid(dens, grid)


def test_slq_density_is_the_exact_spectral_density() -> None:
    ev = torch.linspace(-1, 2, 30, dtype=torch.float64) ** 3
    A = _with_spectrum(ev, 4)
    lam, U = torch.linalg.eigh(A)
    # deterministic: with m = D steps each probe's quadrature is its exact spectral measure
    res = est.slq(TensorOperator(A), num_steps=30, num_probes=2, seed=1, sigma=0.2)
    gen = make_generator(seed=1)
    per_probe = []
    for _ in range(2):
        v = draw_probes(30, 1, gen, "rademacher", dtype=torch.float64)[:, 0] / math.sqrt(30)
        per_probe.append(_exact_density(lam, (U.T @ v) ** 2, res.grid, 0.2))
    torch.testing.assert_close(res.density, torch.stack(per_probe).mean(0), rtol=0, atol=1e-8)
    # statistical: the probe average is the matrix's density within its standard error
    P = 300
    res = est.slq(TensorOperator(A), num_steps=30, num_probes=P, seed=2, sigma=0.2)
    exact = _exact_density(lam, torch.full_like(lam, 1 / 30), res.grid, 0.2)
    z = (res.density - exact).abs() / res.stderr
    assert float(z.max()) < 5
    assert float(torch.trapezoid(res.density, res.grid)) == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------- Hutchinson, Hutch++, block
def test_hutchinson_does_not_depend_on_the_batching_and_holds_one_batch() -> None:
    A = _with_spectrum(torch.linspace(-1, 3, 100, dtype=torch.float64), 3)
    ref = est.hutchinson(TensorOperator(A), num_probes=25, seed=4)
    for batch in (1, 7):
        res = est.hutchinson(TensorOperator(A), num_probes=25, seed=4, batch_size=batch)
        assert res.value == pytest.approx(ref.value, rel=1e-13)
        assert res.stderr == pytest.approx(ref.stderr, rel=1e-10)
    vec = 8 * 100
    op = CountingOperator(A)
    res = est.hutchinson(op, num_probes=25, seed=4, memory_budget=2 * PROBE_VECTORS * vec)
    assert res.value == pytest.approx(ref.value, rel=1e-13) and res.num_matvecs == 25
    assert max(op.widths) == 2 and op.peak <= 2  # one block of two probes at a time
    with pytest.raises(EstimatorMemoryError, match="batch_size"):
        est.hutchinson(TensorOperator(A), num_probes=25, batch_size=10, memory_budget=4 * vec)


def test_hutchpp_and_block_hutchinson_do_not_depend_on_the_batching() -> None:
    A = _with_spectrum(torch.linspace(-1, 3, 50, dtype=torch.float64), 5)
    blocks = {"a": [slice(0, 10)], "b": [slice(10, 25), slice(40, 50)], "c": [slice(25, 40)]}
    ref = est.hutchpp(TensorOperator(A), num_matvecs=30, seed=1, blocks=blocks)
    op = CountingOperator(A)
    res = est.hutchpp(op, num_matvecs=30, seed=1, blocks=blocks, batch_size=3)
    assert max(op.widths) == 3 and res.num_matvecs == 30 == op.num_matvecs
    assert res.value == pytest.approx(ref.value, rel=1e-12)
    for name in blocks:
        assert res.by_layer[name] == pytest.approx(ref.by_layer[name], rel=1e-10, abs=1e-12)
    assert sum(ref.by_layer.values()) == pytest.approx(ref.value, rel=1e-12)
    ref = est.block_hutchinson(TensorOperator(A), blocks, num_probes=6, seed=2)
    op = CountingOperator(A)
    res = est.block_hutchinson(op, blocks, num_probes=6, seed=2, memory_budget=PROBE_VECTORS * 400)
    assert max(op.widths) == 1 and res.num_matvecs == 18
    assert res.value == pytest.approx(ref.value, rel=1e-13)


def test_float64_accumulation_of_long_float32_dot_products() -> None:
    # 2^22 entries of 1 + 2^-20: a float32 BLAS dot or norm loses the small part (torch.dot gives
    # 4194304.5 instead of 4194308 here); float64 accumulation keeps it
    D = 2**22
    diag = torch.full((D,), 1 + 2**-20)

    class Diagonal:
        shape, dtype, device = (D, D), torch.float32, torch.device("cpu")

        def matmat(self, V: torch.Tensor) -> torch.Tensor:
            return diag[:, None] * V

    exact = D * (1 + 2**-20)
    res = est.hutchinson(Diagonal(), num_probes=2, seed=0)
    assert res.value == pytest.approx(exact, rel=1e-9)
    assert float(krylov_module.norm(diag) ** 2) == pytest.approx(D * (1 + 2**-20) ** 2, rel=1e-12)
    h = krylov_module.inner([diag, torch.ones(D)], torch.ones(D))
    assert h.tolist() == pytest.approx([exact, D], rel=1e-12)


# ---------------------------------------------------------------- refusals before allocating
def test_computations_that_cannot_fit_are_refused_with_the_numbers() -> None:
    op = HugeOperator()
    with pytest.raises(EstimatorMemoryError, match=r"1,000,000,000,000 float32 entries.*available"):
        est.lanczos_eigenvalues(op, k=1, tol=1e-2, max_matvecs=30)
    with pytest.raises(EstimatorMemoryError, match="max_basis") as info:
        est.lanczos_eigenvalues(op, k=1, max_basis=5)
    assert isinstance(info.value, MemoryError) and info.value.needed == 6 * 4 * 10**12
    with pytest.raises(EstimatorMemoryError, match="memory_budget"):
        est.lanczos_eigenvalues(HugeOperator(1000), k=4, memory_budget=5 * 4000)
    with pytest.raises(EstimatorMemoryError, match=r"3 vectors"):
        est.slq(op, num_steps=20)
    with pytest.raises(EstimatorMemoryError, match="reorth_passes=0"):
        est.slq(op, num_steps=20, reorth_passes=2)
    with pytest.raises(
        EstimatorMemoryError, match="one probe, its product and the operator.s buffers"
    ):
        est.hutchinson(op, num_probes=10)
    with pytest.raises(EstimatorMemoryError, match="batch_size"):
        est.hutchinson(op, num_probes=10, batch_size=10)
    with pytest.raises(EstimatorMemoryError, match="method='hutchinson'"):
        est.hutchpp(op, num_matvecs=30)


class OtherRank:
    """Stands in for the process group of a distributed operator (``op._comm``): the other rank
    reports ``other`` for every memory-dependent decision."""

    def __init__(self, other: tuple) -> None:
        self.other = other

    def all_gather_object(self, obj: tuple) -> list[tuple]:
        return [obj, self.other]


def test_memory_dependent_decisions_are_the_same_on_every_rank() -> None:
    # every product of a distributed operator is a collective: all ranks must batch alike
    A = _with_spectrum(torch.linspace(-1, 3, 100, dtype=torch.float64), 3)
    ref = est.hutchinson(TensorOperator(A), num_probes=6, seed=0)
    op = CountingOperator(A)
    op._comm = OtherRank((1, None))  # the other rank can take one probe at a time
    res = est.hutchinson(op, num_probes=6, seed=0)
    assert op.widths == [1] * 6 and res.value == pytest.approx(ref.value, rel=1e-13)
    op = TensorOperator(A)
    op._comm = OtherRank((11, None))
    assert est.lanczos_eigenvalues(op, k=2, tol=1e-8).max_basis == 11
    op._comm = OtherRank((0, ("a basis of 61 vectors needs 1 GiB", 2**30, 2**20)))
    with pytest.raises(EstimatorMemoryError, match="on rank 1: a basis of 61") as info:
        est.lanczos_eigenvalues(op, k=2)
    assert info.value.needed == 2**30 and info.value.allowed == 2**20
    with pytest.raises(EstimatorMemoryError, match="on rank 1"):
        est.slq(op, num_steps=5)


def test_exact_ggn_diagonal_of_a_language_model_refused_before_any_factor(monkeypatch) -> None:
    """The exact GGN needs every output entry's vector per example (K = T x V): a model whose
    factors cannot fit is refused with the numbers and the cheaper kinds, before it allocates."""
    import curvlab as cl

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    idx = torch.randint(0, 50, (3, 6), generator=gen)
    data = (idx, torch.randint(0, 50, (3, 6), generator=gen))
    loss_fn = torch.nn.CrossEntropyLoss()
    # one example's block: its K x D factors, one parameter's squares of them (K x 400 here),
    # the loss Hessian's K x K square root (review s14) and one gradient being written (D), float32
    sizes = [p.numel() for p in model.parameters()]
    D, widest, K = sum(sizes), max(sizes), 6 * 50
    need = (K * (D + widest) + K * K + D) * 4
    monkeypatch.setattr(memory, "available_bytes", lambda device: need // 2)
    with pytest.raises(EstimatorMemoryError, match="kind='mc'") as err:
        cl.diag_fisher(model, loss_fn, data, kind="exact")
    assert err.value.needed == need and "300 output entries" in str(err.value)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * 2**30)
    assert cl.diag_fisher(model, loss_fn, data, kind="exact").backend == "func"
