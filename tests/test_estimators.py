"""Trace, Lanczos and SLQ estimators on explicit matrices: identities and statistical checks."""

from __future__ import annotations

import io
import math

import pytest
import torch

import curvlab._precision as precision_module
import curvlab.estimators as est
from curvlab._progress import ProgressBar, progress
from curvlab._rng import make_generator
from curvlab.estimators._protocol import TensorOperator
from curvlab.estimators._trace import draw_probes, probe_rows


def _random_sym(dim: int, seed: int, spd: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    ev = torch.rand(dim, generator=gen, dtype=torch.float64) * 3
    if not spd:
        ev = ev - 1.0
    ev[:3] += torch.tensor([20.0, 15.0, 12.0], dtype=torch.float64)  # a few outliers
    return Q @ torch.diag(ev) @ Q.T


BLOCKS = {"a": [slice(0, 10)], "b": [slice(10, 25), slice(40, 50)], "c": [slice(25, 40)]}


# ---------------------------------------------------------------- trace: deterministic identities
def test_rademacher_hutchinson_is_exact_on_diagonal_matrices() -> None:
    d = torch.linspace(-2, 5, 50, dtype=torch.float64)
    op = TensorOperator(torch.diag(d))
    res = est.hutchinson(op, num_probes=3, seed=7, blocks=BLOCKS)
    assert res.value == pytest.approx(float(d.sum()), abs=1e-12)
    assert res.stderr == pytest.approx(0.0, abs=1e-12)
    assert res.num_matvecs == 3 and op.num_matvecs == 3 and res.seed == 7
    assert res.by_layer["b"] == pytest.approx(float(d[10:25].sum() + d[40:50].sum()))


def test_exact_and_hutchpp_identities() -> None:
    A = _random_sym(50, 0, spd=False)
    res = est.exact_trace(TensorOperator(A), blocks=BLOCKS)
    assert res.value == pytest.approx(float(torch.trace(A)), rel=1e-12)
    assert res.by_layer["c"] == pytest.approx(float(torch.diagonal(A)[25:40].sum()), rel=1e-12)
    # Hutch++ is exact when the sketch captures the whole range
    gen = torch.Generator().manual_seed(1)
    U = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    low = U @ U.T
    pp = est.hutchpp(TensorOperator(low), num_matvecs=15, seed=0, blocks=BLOCKS)
    assert pp.value == pytest.approx(float(torch.trace(low)), rel=1e-10)
    diag = torch.diagonal(low)
    assert pp.by_layer["b"] == pytest.approx(float(diag[10:25].sum() + diag[40:50].sum()), rel=1e-9)
    assert pp.num_matvecs == 15


def test_block_hutchinson_is_exact_on_block_diagonal_of_diagonals() -> None:
    A = _random_sym(50, 3, spd=False)
    mask = torch.zeros(50, 50, dtype=torch.float64)
    for sl in BLOCKS.values():
        idx = torch.cat([torch.arange(s.start, s.stop) for s in sl])
        mask[idx.unsqueeze(1), idx] = 1
    # couplings between blocks do not change block Hutchinson's samples at all
    diag_plus_cross = torch.diag(torch.diagonal(A)) + A * (1 - mask)
    res = est.block_hutchinson(TensorOperator(diag_plus_cross), BLOCKS, num_probes=4, seed=0)
    assert res.value == pytest.approx(float(torch.trace(A)), rel=1e-12)
    assert res.stderr == pytest.approx(0.0, abs=1e-10)
    assert res.num_matvecs == 12


# ---------------------------------------------------------------- trace: statistics
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_the_predicted_variance(distribution: str) -> None:
    A = _random_sym(60, 1, spd=False)
    K = 4000
    res = est.hutchinson(
        TensorOperator(A), num_probes=K, distribution=distribution, seed=2, batch_size=500
    )
    off = A - torch.diag(torch.diagonal(A))
    var = 2 * float((off**2).sum()) if distribution == "rademacher" else 2 * float((A**2).sum())
    se_theory = math.sqrt(var / K)
    assert abs(res.value - float(torch.trace(A))) < 4 * se_theory
    # the standard error of a standard error with K samples is about 1/sqrt(2K) relative
    assert res.stderr == pytest.approx(se_theory, rel=8 / math.sqrt(2 * K))


def test_hutchpp_and_block_are_unbiased_on_indefinite_matrices() -> None:
    A = _random_sym(50, 4, spd=False)
    truth = float(torch.trace(A))
    pp = [est.hutchpp(TensorOperator(A), num_matvecs=12, seed=s).value for s in range(200)]
    bl = [
        est.block_hutchinson(TensorOperator(A), BLOCKS, num_probes=2, seed=s).value
        for s in range(200)
    ]
    for values in (pp, bl):
        t = torch.tensor(values)
        se = float(t.std() / math.sqrt(t.numel()))
        assert abs(float(t.mean()) - truth) < 4.5 * se


def test_rtol_stops_early_and_meets_the_target() -> None:
    A = _random_sym(60, 5, spd=True)
    res = est.hutchinson(TensorOperator(A), num_probes=5000, rtol=0.02, seed=0, batch_size=10)
    assert res.num_probes < 5000
    assert res.stderr <= 0.02 * abs(res.value)


def test_probe_distributions() -> None:
    gen = make_generator(seed=0)
    Z = draw_probes(1000, 3, gen, "rademacher", dtype=torch.float64)
    assert set(Z.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="distribution"):
        draw_probes(3, 1, gen, "uniform")


@pytest.mark.parametrize("dim", [1, 7, 8, 13, 4099])
def test_rademacher_probes_are_draws_in_order_and_balanced(dim: int) -> None:
    """Probe j is the j-th draw however the probes are batched (the byte-table draw keeps that,
    also for lengths that are not a multiple of 8), and the signs are fair: over 200,000 signs the
    mean of +-1 has standard error 1/sqrt(n); 5 standard errors is the tolerance."""
    together = probe_rows(dim, 3, make_generator(seed=4))
    gen = make_generator(seed=4)
    apart = torch.cat([probe_rows(dim, 1, gen), probe_rows(dim, 2, gen)])
    assert torch.equal(together, apart)
    assert set(together.unique().tolist()) <= {-1.0, 1.0}
    n = 200_000
    signs = probe_rows(n, 1, make_generator(seed=dim), dtype=torch.float64)[0]
    assert abs(float(signs.mean())) < 5 / math.sqrt(n)
    pairs = signs[:-1] * signs[1:]  # neighbouring bits of a byte and across bytes: independent
    assert abs(float(pairs.mean())) < 5 / math.sqrt(n - 1)


# ---------------------------------------------------------------- Lanczos
@pytest.mark.parametrize(("which", "k"), [("largest", 1), ("largest", 12), ("smallest", 5)])
def test_lanczos_matches_eigvalsh(which: str, k: int) -> None:
    A = _random_sym(120, 6, spd=False)
    true = torch.linalg.eigvalsh(A)
    ref = true.flip(0)[:k] if which == "largest" else true[:k]
    res = est.lanczos_eigenvalues(
        TensorOperator(A), k=k, tol=1e-10, which=which, seed=0, return_vectors=True, max_basis=30
    )
    assert res.converged
    if k == 12:  # a basis of 30 vectors cannot hold the answer: thick restarts are exercised
        assert res.num_restarts >= 1
    torch.testing.assert_close(res.values, ref, rtol=1e-9, atol=1e-9)
    resid = torch.linalg.vector_norm(A @ res.vectors - res.vectors * res.values, dim=0)
    assert float(resid.max()) <= 1e-10 * res.norm * 1.01
    torch.testing.assert_close(res.residuals, resid, rtol=1e-2, atol=1e-12)


def test_lanczos_is_deterministic_and_reports_non_convergence() -> None:
    A = _random_sym(300, 7, spd=True)
    a = est.lanczos_eigenvalues(TensorOperator(A), k=3, tol=1e-8, seed=4)
    b = est.lanczos_eigenvalues(TensorOperator(A), k=3, tol=1e-8, seed=4)
    assert torch.equal(a.values, b.values) and a.num_matvecs == b.num_matvecs
    short = est.lanczos_eigenvalues(TensorOperator(A), k=3, tol=1e-12, max_matvecs=5)
    assert not short.converged and short.num_matvecs == 5
    assert float(short.relative_residuals.max()) > 1e-12


def test_lanczos_handles_repeated_eigenvalues_and_small_operators() -> None:
    A = torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 3.0], dtype=torch.float64))
    res = est.lanczos_eigenvalues(TensorOperator(A), k=4, tol=1e-10)
    torch.testing.assert_close(res.values, torch.tensor([3.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="k must be"):
        est.lanczos_eigenvalues(TensorOperator(A), k=7)


# ---------------------------------------------------------------- SLQ
def test_slq_density_and_exact_moments() -> None:
    A = _random_sym(40, 8, spd=False)
    res = est.slq(TensorOperator(A), num_steps=12, num_probes=3, seed=1, reorth_passes=2)
    assert float(torch.trapezoid(res.density, res.grid)) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(res.weights.sum(1), torch.ones(3, dtype=torch.float64))
    assert res.nodes.shape == (3, 12) and res.num_matvecs == 36
    assert bool(torch.isfinite(res.stderr).all())
    # Gauss quadrature with m nodes is exact for degree < 2m: check v^T A^j v per probe
    gen = make_generator(seed=1)
    for row in range(3):
        v = draw_probes(40, 1, gen, "rademacher", dtype=torch.float64)[:, 0]
        v = v / v.norm()
        for j in (1, 2, 5, 9):
            quad = float((res.weights[row] * res.nodes[row] ** j).sum())
            exact = float(v @ torch.linalg.matrix_power(A, j) @ v)
            assert quad == pytest.approx(exact, rel=1e-8, abs=1e-8)


def test_slq_without_reorthogonalisation_gives_the_same_low_moments() -> None:
    A = _random_sym(80, 11, spd=False)
    full = est.slq(TensorOperator(A), num_steps=40, num_probes=2, seed=0, reorth_passes=2)
    plain = est.slq(TensorOperator(A), num_steps=40, num_probes=2, seed=0, reorth_passes=0)
    for j in (1, 2, 3, 4):
        assert plain.moment(j) == pytest.approx(full.moment(j), rel=1e-6)


def test_slq_moments_estimate_normalised_traces() -> None:
    A = _random_sym(60, 9, spd=True)
    P = 100
    res = est.slq(TensorOperator(A), num_steps=4, num_probes=P, seed=3)
    for j in (1, 2):
        per_probe = (res.weights * res.nodes**j).sum(1)
        se = float(per_probe.std() / math.sqrt(P))
        truth = float(torch.trace(torch.linalg.matrix_power(A, j))) / 60
        assert abs(res.moment(j) - truth) < 4 * se


def test_density_plot_writes_png(tmp_path) -> None:
    A = _random_sym(30, 10, spd=False)
    res = est.slq(TensorOperator(A), num_steps=10, num_probes=1)
    assert bool(torch.isnan(res.stderr).all())
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # the user's own backend
    try:
        ax = res.plot()
        assert matplotlib.get_backend() == "svg"  # not switched (it was, to Agg)
        path = tmp_path / "density.png"
        ax.figure.savefig(path)
        plt.close(ax.figure)
    finally:
        matplotlib.use(backend)
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------- progress, errors
def test_progress_bar_is_silent_by_default_and_writes_when_enabled() -> None:
    assert list(progress(range(4), desc="x")) == [0, 1, 2, 3]
    stream = io.StringIO()
    assert list(progress(range(4), desc="probes", enable=True, stream=stream)) == [0, 1, 2, 3]
    assert "probes" in stream.getvalue() and "4/4" in stream.getvalue()
    quiet = io.StringIO()
    bar = ProgressBar(total=2, enable=False, stream=quiet)
    bar.update()
    bar.close()
    assert quiet.getvalue() == ""


def test_estimator_errors_are_clear() -> None:
    op = TensorOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_probes"):
        est.hutchinson(op, num_probes=0)
    with pytest.raises(ValueError, match="num_matvecs"):
        est.hutchpp(op, num_matvecs=2)
    with pytest.raises(ValueError, match="num_steps"):
        est.slq(op, num_steps=0)
    with pytest.raises(ValueError, match="which"):
        est.lanczos_eigenvalues(op, which="LM")
    with pytest.raises(TypeError, match="not an operator"):
        est.hutchinson(torch.eye(3))


@pytest.mark.parametrize("chunk", [3, 2**18])
@pytest.mark.parametrize("tensor_coef", [False, True])
def test_fused_update_and_float64_reduction_over_uneven_parts(
    chunk: int, tensor_coef: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``axpy_dot``: ``u <- u - c x`` in place, then ``y^T u`` (``||u||^2`` for ``y=None``) summed
    in float64, over parts of uneven lengths and chunks that split them anywhere."""
    monkeypatch.setattr(precision_module, "FUSED_CHUNK", chunk)
    gen = torch.Generator().manual_seed(8)
    sizes = [1, 10, 7, 64, 5]

    def parts() -> list[torch.Tensor]:
        return [torch.randn(n, generator=gen) for n in sizes]

    u, x, y = parts(), parts(), parts()
    coef = 0.37
    want_u = [a.double() - coef * b.double() for a, b in zip(u, x)]
    want_dot = sum(float(a @ b.double()) for a, b in zip(want_u, y))
    c = torch.tensor(coef, dtype=torch.float64) if tensor_coef else coef
    got = precision_module.axpy_dot(u, c, x, y)
    assert got.dtype == torch.float64
    for a, b in zip(u, want_u):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
    exact = sum(float(a.double() @ b.double()) for a, b in zip(u, y))  # of the float32 result
    assert float(got) == pytest.approx(exact, rel=1e-12, abs=1e-12)
    assert float(got) == pytest.approx(want_dot, rel=1e-5, abs=1e-5)
    squares = precision_module.axpy_dot(u, 0.0, None, None)
    assert float(squares) == pytest.approx(sum(float(a.double() @ a.double()) for a in u), 1e-12)


def test_slq_uses_a_subclass_matmat_not_the_parts() -> None:
    """A CurvatureOperator subclass that changes matmat (here a damping ``A + I/2``) gets SLQ of
    its own matrix: the per-parameter products are only taken for the operator's own matmat."""
    from curvlab.operators import curvature_operator
    from tests.problems import make_problem
    from tests.reference import dense_hessian

    p = make_problem("mlp-ce-mean-one")
    op = curvature_operator(p.model, p.loss_fn, p.data, matrix="hessian")

    class Damped(type(op)):  # type: ignore[misc, valid-type]
        def matmat(self, V: torch.Tensor) -> torch.Tensor:
            return super().matmat(V) + 0.5 * V

    op.__class__ = Damped
    A = dense_hessian(p) + 0.5 * torch.eye(op.shape[0], dtype=torch.float64)
    res = est.slq(op, num_steps=6, num_probes=2, seed=4)
    gen = make_generator(seed=4)
    for row in range(2):
        v = draw_probes(op.shape[0], 1, gen, "rademacher", dtype=torch.float64)[:, 0]
        v = v / v.norm()
        for j in (1, 2, 3):
            quad = float((res.weights[row] * res.nodes[row] ** j).sum())
            assert quad == pytest.approx(float(v @ torch.linalg.matrix_power(A, j) @ v), rel=1e-8)


def test_lanczos_refuses_a_tolerance_its_vectors_cannot_certify():
    """float32 vectors at tol=1e-9 reported residuals of 1e-9 while the true ones were 1.4e-7:
    a tolerance below five eps of the vectors' dtype is a clear error; float64 takes it."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0.1, 2.0, 40, dtype=torch.float64)) @ Q.T
    with pytest.raises(ValueError, match="below what float32 Lanczos vectors can certify"):
        est.lanczos_eigenvalues(TensorOperator(A.float()), k=2, tol=1e-9)
    res = est.lanczos_eigenvalues(TensorOperator(A.float()), k=2, tol=2e-6)
    assert res.converged and float(res.values[0]) == pytest.approx(2.0, rel=1e-5)
    assert est.lanczos_eigenvalues(TensorOperator(A), k=2, tol=1e-12).converged


def test_bf16_slq_does_not_take_a_small_bulk_for_rounding():
    """A bfloat16 operator with a top eigenvalue 100 over a bulk in [-3, 3]: the invariance test
    at 10 eps of bfloat16 (7.8%) took the bulk for rounding and SLQ stopped after 3 steps with 2
    bulk nodes; the test is at eps for 16-bit products now (float32 uses about 31)."""
    g = torch.Generator().manual_seed(0)
    D = 400
    ev = torch.tensor([100.0] + torch.linspace(-3, 3, D - 1).tolist(), dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    A = (Q @ torch.diag(ev) @ Q.T).to(torch.bfloat16)
    d = est.slq(TensorOperator(A), num_steps=40, num_probes=3, seed=0)
    bulk = ((d.weights > 0) & (d.nodes.abs() < 10)).sum(1)
    assert int(bulk.min()) >= 20, bulk.tolist()
