"""Review s22 (O): a restarted Lanczos run whose newest segment lost its Ritz vectors at every
restart, and non-finite product messages that named the wrong dtype and a loss on plain matrices.

The right answers come from ``torch.linalg.eigvalsh`` on the dense float64 matrices written here.
"""

from __future__ import annotations

import pytest
import torch

import curvlab.estimators as est
from curvlab._finite import NonFiniteError


def _rotated(eigenvalues: list[float], seed: int) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` for a random orthogonal ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


def _check_against_dense(A: torch.Tensor, res: est.EigenResult, k: int, which: str) -> None:
    """Converged, and each value within its residual of the dense answer (the residual test's
    promise ``|theta - lambda| <= r``), plus the rounding of the float64 products."""
    ev = torch.linalg.eigvalsh(A)
    want = ev.flip(0)[:k] if which == "largest" else ev[:k]
    assert res.converged, res.info
    slack = res.residuals + 1e3 * torch.finfo(torch.float64).eps * float(ev.abs().max())
    assert bool(((res.values - want).abs() <= slack).all()), (res.values, want)


def test_k1_smallest_basis_converges_after_an_invariant_subspace() -> None:
    """diag(3, 1, 1, -1, -1), k=1, max_basis=3 (the least allowed, k + 2): the start's Krylov
    space is invariant exactly when the basis is full; each restart kept the two old Ritz
    vectors and threw away the one vector of the fresh segment, which never settled: 1000
    products, converged=False (max_basis=4: 6 products). The fresh segment's best Ritz vector
    is now kept; its remaining space (eigenvalues 1, -1) has 2 dimensions, so it settles within
    a handful of products."""
    A = torch.diag(torch.tensor([3.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64))
    res = est.lanczos_eigenvalues(est.TensorOperator(A), k=1, tol=1e-4, max_basis=3)
    _check_against_dense(A, res, 1, "largest")
    # the two segments span 3 + 2 dimensions: about D products, and well under 2 D (was 1000)
    assert res.num_matvecs <= 2 * A.shape[0], res.num_matvecs


# cases of the reviewer's random scan (D from 4 to 12, 2 to 4 distinct values, max_basis = k + 2)
# that ran to max_matvecs=300 unconverged, with correct values
SCAN_FAILURES = [
    ([-1, -1, -1, -1, 0, -1, 0, 0, -1, -2], "smallest"),
    ([2, 1, 2, 2, 2, -2, 1, -2, 1], "largest"),
    ([1, 2, 2, 2, 1, 2, -2, 2, 2, -2], "largest"),
    ([0, 0, 0, 3, 3, 0, 3, 3, 3, 3, 0, -1], "smallest"),
    ([2, 2, -2, -1, -1, -1, -1, 2, -1, -1], "smallest"),
    ([2, -2, -2, 1, -2, 1], "largest"),
    ([0, 0, 0, 3, -1, 0, 0, 3], "smallest"),
    ([-2, 2, 3, 3, 3, 2], "smallest"),
]


@pytest.mark.parametrize(("diagonal", "which"), SCAN_FAILURES)
def test_k1_smallest_basis_on_few_distinct_values(diagonal: list[int], which: str) -> None:
    A = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    for seed in range(3):
        res = est.lanczos_eigenvalues(
            est.TensorOperator(A),
            k=1,
            tol=1e-6,
            max_basis=3,
            which=which,
            max_matvecs=300,
            seed=seed,
        )
        _check_against_dense(A, res, 1, which)


@pytest.mark.parametrize("k", [2, 3])
def test_full_basis_at_the_invariant_subspace_with_k_above_one(k: int) -> None:
    """D = 12, eigenvalues 0..7 with 0..3 twice, max_basis = 8 = the distinct values: the
    start's space is invariant when the basis fills; the restarts kept the five best old Ritz
    vectors and none of the fresh segment (whose values, the copies of 0..3, are below them),
    which cycled between two states: converged=False after max_matvecs=400 (the same cause)."""
    A = _rotated([float(i % 8) for i in range(12)], seed=0)
    res = est.lanczos_eigenvalues(
        est.TensorOperator(A), k=k, tol=1e-6, max_basis=8, max_matvecs=400
    )
    _check_against_dense(A, res, k, "largest")
    # the segments span 8 + 4 = D dimensions: about D products, and well under 2 D (was 400)
    assert res.num_matvecs <= 2 * A.shape[0], res.num_matvecs


def test_unconverged_new_segment_message_names_what_was_seen() -> None:
    """A run stopped by max_matvecs while a fresh segment was pending blamed "a dense bulk of
    eigenvalues" below the wanted ones; here there is none (3 is 2 above the next value, 1),
    the fresh segment had no Ritz value yet: the message says so and names no bulk."""
    A = torch.diag(torch.tensor([3.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64))
    res = est.lanczos_eigenvalues(est.TensorOperator(A), k=1, tol=1e-4, max_basis=3, max_matvecs=4)
    assert not res.converged and res.values.tolist() == pytest.approx([3.0])
    why = res.info["unconverged"]
    assert "bulk" not in why and "max_matvecs=4" in why, why


def test_unconverged_new_segment_message_gives_its_best_value() -> None:
    """A pending segment with a Ritz value: its value and residual are named, not a bulk."""
    A = _rotated([float(i % 8) for i in range(12)], seed=0)
    res = est.lanczos_eigenvalues(est.TensorOperator(A), k=2, tol=1e-6, max_basis=8, max_matvecs=10)
    assert not res.converged
    why = res.info["unconverged"]
    assert "bulk" not in why and "max_matvecs=10" in why, why


# --- non-finite products of plain operators -------------------------------------------------


def _overflowing(dtype: torch.dtype) -> torch.Tensor:
    """A finite matrix whose products with +-1 vectors overflow ``dtype`` (4 entries near the
    largest float per row)."""
    return torch.full((4, 4), torch.finfo(dtype).max * 0.9, dtype=dtype)


TRACE_CALLS = {
    "hutchinson": lambda op: est.hutchinson(op, num_probes=3, seed=0),
    "block_hutchinson": lambda op: est.block_hutchinson(
        op, {"a": slice(0, 2), "b": slice(2, 4)}, num_probes=2, seed=0
    ),
    "hutchpp": lambda op: est.hutchpp(op, num_matvecs=3, seed=0),
    "lanczos": lambda op: est.lanczos_eigenvalues(op, k=1, seed=0),
    "slq": lambda op: est.slq(op, num_steps=3, num_probes=1, seed=0),
    "exact_trace": lambda op: est.exact_trace(op),
}


@pytest.mark.parametrize("name", ["hutchinson", "block_hutchinson", "hutchpp", "lanczos"])
def test_float32_overflow_names_float32_and_no_loss(name: str) -> None:
    """A finite float32 matrix whose products overflow float32: Hutchinson said "the curvature
    overflows float64. Rescale the loss" (it checked its float64 samples ``z^T A z``), and every
    estimator spoke of "inputs and parameters", which a matrix does not have."""
    A = _overflowing(torch.float32)
    assert bool(torch.isfinite(A).all())
    with pytest.raises(NonFiniteError) as info:
        TRACE_CALLS[name](est.TensorOperator(A))
    msg = str(info.value)
    assert "float32" in msg and "float64" in msg, msg  # overflows float32; float64 the way out
    assert "overflows float64" not in msg, msg
    assert "inputs and parameters" not in msg and "loss" not in msg, msg
    assert "TensorOperator" in msg, msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(TRACE_CALLS))
def test_nan_entry_is_named_not_an_overflow(dtype: torch.dtype, name: str) -> None:
    """A matrix with one NaN entry (every product with a vector that is not 0 at its column,
    ``NaN * 0`` being NaN, holds one): blamed on an overflow of float64 and the loss before."""
    A = torch.eye(4, dtype=dtype)
    A[1, 2] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        TRACE_CALLS[name](est.TensorOperator(A))
    msg = str(info.value)
    assert "NaN or inf entry" in msg, msg
    assert "inputs and parameters" not in msg and "Rescale the loss" not in msg, msg
    assert ("Use float64" in msg) == (dtype != torch.float64), msg


def test_curvature_operator_message_keeps_the_loss_advice() -> None:
    """The product of a model's operator, whose inputs and parameters were checked, is still
    said to overflow its (float64) dtype with the loss to rescale; so is curvlab's
    preconditioned wrapper of one."""
    import curvlab as cl
    from curvlab._finite import raise_product
    from curvlab.analysis._sharpness import PreconditionedOperator

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(2, 1).double()
    X = torch.randn(4, 2, generator=g, dtype=torch.float64)
    data = (X, torch.randn(4, 1, generator=g, dtype=torch.float64))
    H = cl.curvature_operator(model, torch.nn.MSELoss(), data)
    wrapped = PreconditionedOperator(H, torch.ones(H.shape[0], dtype=torch.float64))
    for op in (H, wrapped):
        with pytest.raises(NonFiniteError) as info:
            raise_product("the curvature product at Lanczos step", 3, op=op)
        msg = str(info.value)
        assert "step 3" in msg and "overflows float64" in msg and "Rescale the loss" in msg
