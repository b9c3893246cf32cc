"""Review s19 (estimators as numerical algorithms): what the estimators accept, and their error bars.

Found in review:

* a complex (Hermitian) operator was accepted and its imaginary parts dropped by the float64
  inner products: Lanczos gave ``6.38`` for eigenvalues ``[0.5, 1, 3]`` with ``converged=True``;
  an integer operator raised raw torch errors; a 16-bit ``TensorOperator`` was refused by the
  trace estimators ("expected m1 and m2 to have the same dtype": float32 probes handed to a
  bfloat16 ``matmat``) while Lanczos and SLQ handed it vectors in its own dtype;
* the trace standard errors squared plain samples: 0 below ``||A|| ~ 1e-158`` and ``inf`` above
  ``1e154``, and ``rtol=`` stopped on them (10 probes instead of 17 at ``1e-170``, 30 at ``1e160``);
* Hutch++ with an empty block raised a raw ``TypeError`` after all its products;
* ``return_vectors="no"`` returned vectors, ``by_layer="no"`` per-layer traces, and
  ``block_hutchinson(offset=nan)`` silently turned ``rtol`` off;
* Hutch++ with ``k = D`` (exact) reported ``stderr = nan`` for ``D = 1``; overlapping blocks in
  ``block_hutchinson`` were counted twice (30 for a trace of 15).

Every reference is dense float64, computed here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.estimators import (
    TensorOperator,
    block_hutchinson,
    exact_trace,
    hutchinson,
    hutchpp,
    lanczos_eigenvalues,
    slq,
)

DT = torch.float64
EPS = torch.finfo(DT).eps


class Counting:
    """A duck-typed operator of any declared dtype that counts (and records) its products."""

    def __init__(self, matrix: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype if dtype is None else dtype
        self.device = matrix.device
        self.num_matvecs = 0
        self.inputs: list[torch.Tensor] = []

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += V.shape[1]
        self.inputs.append(V.clone())
        return self.matrix @ V


def _symmetric(D: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))
    return Q @ torch.diag(torch.linspace(-1, 2, D, dtype=DT)) @ Q.T


# ----------------------------------------------------------------- 1. the operator's dtype


def _all_estimators(op) -> list:
    return [
        lambda: lanczos_eigenvalues(op, k=1, tol=1e-6),
        lambda: slq(op, num_steps=2, num_probes=1),
        lambda: hutchinson(op, num_probes=3),
        lambda: hutchpp(op, num_matvecs=3),
        lambda: block_hutchinson(op, {"a": slice(0, 3)}, num_probes=2),
        lambda: exact_trace(op),
    ]


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64, torch.int64, torch.bool])
def test_an_operator_that_is_not_real_floating_is_refused_before_any_product(
    dtype: torch.dtype,
) -> None:
    A = torch.tensor([[2, 1j, 0], [-1j, 2, 0], [0, 0, 0.5]], dtype=torch.complex128)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(TypeError, match=name):
        TensorOperator(A.to(dtype) if dtype.is_complex else A.real.to(dtype))
    op = Counting(A, dtype)
    for run in _all_estimators(op):
        with pytest.raises(TypeError, match=name):
            run()
    assert op.num_matvecs == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_sixteen_bit_operator_gets_its_own_dtype_from_every_estimator(
    dtype: torch.dtype,
) -> None:
    """Lanczos and SLQ hand ``matmat`` vectors in the operator's dtype; so do the trace
    estimators now. On a diagonal matrix of small integers Rademacher probes and their products
    are exact in 16 bits, so Hutchinson and block Hutchinson give the trace exactly."""
    d = torch.tensor([1.0, 2.0, 3.0, -1.0, 5.0], dtype=DT)
    want = float(d.sum())
    op = Counting(torch.diag(d).to(dtype))
    assert hutchinson(op, num_probes=4, seed=0).value == want
    blocks = {"a": slice(0, 2), "b": slice(2, 5)}
    res = hutchinson(op, num_probes=4, seed=0, blocks=blocks)
    assert res.by_layer == {"a": 3.0, "b": 7.0}
    assert block_hutchinson(op, blocks, num_probes=3, seed=0).value == want
    assert exact_trace(op).value == want
    # Hutch++ with k = D is exact up to the 16-bit rounding of Q (in) and of the products (out):
    # each of the D terms q_i^T A q_i is within 2 * u * ||A|| (u the unit roundoff), with slack 2
    u = torch.finfo(dtype).eps / 2
    got = hutchpp(op, num_matvecs=3 * 5, seed=0).value
    assert abs(got - want) <= 2 * 5 * 2 * u * float(d.abs().max())
    assert lanczos_eigenvalues(op, k=1, tol=1e-2).values.shape == (1,)
    assert {V.dtype for V in op.inputs} == {dtype}


# ----------------------------------------------------------------- 2. stderr at every scale


def _stderr(x: torch.Tensor) -> float:
    return float(x.std(unbiased=True)) / math.sqrt(x.numel())


def _stop_count(x: torch.Tensor, rtol: float, least: int) -> int:
    for j in range(max(least, 2), x.numel() + 1):
        if _stderr(x[:j]) <= rtol * abs(float(x[:j].mean())):
            return j
    return x.numel()


@pytest.mark.parametrize("scale", [1.0, 1e-170, 1e160])
def test_trace_stderr_and_rtol_stop_do_not_depend_on_the_scale(scale: float) -> None:
    A0 = _symmetric(8, 0)
    rec = Counting(A0)  # the probes, recorded at scale 1
    hutchinson(rec, num_probes=30, seed=1, batch_size=30)
    Z = rec.inputs[0]
    samples = ((A0 @ Z) * Z).sum(0)  # z_j^T A0 z_j, dense float64
    want_se10 = _stderr(samples[:10])
    want_stop = _stop_count(samples, 0.2, 10)
    assert 10 < want_stop < 30  # the rule stops, and not at once: the test can tell

    # scaled samples carry relative errors ~ 8 eps |sample|; their stderr then within
    # 64 * 8 eps * max |sample| (slack 64) of the plain one
    tol = 64 * 8 * EPS * float(samples.abs().max())
    op = TensorOperator(A0 * scale)
    res = hutchinson(op, num_probes=10, seed=1)
    assert abs(res.stderr / scale - want_se10) <= tol
    res = hutchinson(op, num_probes=30, seed=1, rtol=0.2)
    assert res.num_probes == want_stop
    assert abs(res.value / scale - float(samples[:want_stop].mean())) <= tol

    # Hutch++ and block Hutchinson: their stderr at this scale is that at scale 1, times scale
    ref_pp = hutchpp(TensorOperator(A0), num_matvecs=6, seed=1).stderr
    ref_bl = block_hutchinson(
        TensorOperator(A0), {"a": slice(0, 3), "b": slice(3, 8)}, num_probes=10, seed=1
    )
    got_pp = hutchpp(op, num_matvecs=6, seed=1).stderr / scale
    got_bl = block_hutchinson(op, {"a": slice(0, 3), "b": slice(3, 8)}, num_probes=10, seed=1)
    assert ref_pp > 0 and abs(got_pp - ref_pp) <= 1e-10 * ref_pp
    assert ref_bl.stderr > 0 and abs(got_bl.stderr / scale - ref_bl.stderr) <= tol
    for n in ("a", "b"):
        assert abs(got_bl.by_layer_stderr[n] / scale - ref_bl.by_layer_stderr[n]) <= tol
    # block Hutchinson's rtol stop: the same probe count at every scale
    bl = {"a": slice(0, 3), "b": slice(3, 8)}
    count = block_hutchinson(TensorOperator(A0), bl, num_probes=40, seed=1, rtol=0.1).num_probes
    assert 10 < count < 40
    assert block_hutchinson(op, bl, num_probes=40, seed=1, rtol=0.1).num_probes == count


# ----------------------------------------------------------------- 3. Hutch++ with an empty block


def test_hutchpp_with_an_empty_block_gives_zero_like_the_others() -> None:
    d = torch.arange(1.0, 6.0, dtype=DT)
    blocks = {"a": slice(0, 5), "empty": slice(3, 3)}
    res = hutchpp(TensorOperator(torch.diag(d)), num_matvecs=6, blocks=blocks, seed=0)
    assert res.by_layer["empty"] == 0.0 and res.by_layer_stderr["empty"] == 0.0
    # diagonal matrix, Rademacher probes: z^T Pi A Pi z summed over all rows is the estimate
    assert abs(res.by_layer["a"] - res.value) <= 16 * 5 * EPS * float(d.sum())


# ----------------------------------------------------------------- 4. flags


def _problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(3, 2).to(DT)
    X = torch.randn(8, 3, generator=g, dtype=DT)
    return model, (X, torch.randint(0, 2, (8,), generator=g))


@pytest.mark.parametrize("flag", ["no", 0, 1, None])
def test_bool_flags_must_be_bools_before_the_data(flag: object) -> None:
    model, data = _problem()
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="return_vectors must be True or False"):
        cl.eigenvalues(model, loss, data, return_vectors=flag)
    with pytest.raises(ValueError, match="by_layer must be True or False"):
        cl.trace(model, loss, data, by_layer=flag, num_probes=3)
    assert calls == []
    op = Counting(torch.eye(3, dtype=DT))
    with pytest.raises(ValueError, match="return_vectors must be True or False"):
        lanczos_eigenvalues(op, return_vectors=flag)
    assert op.num_matvecs == 0


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), "1", True])
def test_block_hutchinson_offset_must_be_finite(offset: object) -> None:
    op = Counting(torch.eye(4, dtype=DT))
    with pytest.raises(ValueError, match="offset must be a finite number"):
        block_hutchinson(op, {"a": slice(0, 4)}, num_probes=20, rtol=0.1, offset=offset)
    assert op.num_matvecs == 0


# ----------------------------------------------------------------- minor


@pytest.mark.parametrize("D", [1, 2, 4])
def test_hutchpp_with_a_sketch_of_the_whole_space_is_exact_with_stderr_zero(D: int) -> None:
    A = _symmetric(D, 3) + 3 * torch.eye(D, dtype=DT)
    blocks = {"first": slice(0, 1), "rest": slice(1, D)}
    res = hutchpp(TensorOperator(A), num_matvecs=3 * D, seed=0, blocks=blocks)
    # Q^T A Q for an orthogonal Q: D terms each within ~D eps ||A||, slack 16
    tol = 16 * D * D * EPS * float(torch.linalg.matrix_norm(A, 2))
    assert res.stderr == 0.0 and abs(res.value - float(torch.trace(A))) <= tol
    assert res.by_layer_stderr == {"first": 0.0, "rest": 0.0}
    assert abs(res.by_layer["first"] - float(A[0, 0])) <= tol


@pytest.mark.parametrize(
    "blocks",
    [
        {"a": slice(0, 5), "b": slice(0, 5)},  # the same block twice
        {"a": [slice(0, 3), slice(2, 5)]},  # index 2 twice within one block
        {"a": slice(0, 6, 2), "b": slice(2, 3)},  # 0 2 4 and 2
        {"a": slice(1, 6, 2), "b": slice(2, 6, 3)},  # 1 3 5 and 2 5
    ],
)
def test_block_hutchinson_refuses_overlapping_blocks_before_any_product(blocks: dict) -> None:
    op = Counting(torch.eye(6, dtype=DT))
    with pytest.raises(ValueError, match="overlap"):
        block_hutchinson(op, blocks, num_probes=2)
    assert op.num_matvecs == 0


def test_block_hutchinson_accepts_interleaved_disjoint_blocks() -> None:
    d = torch.arange(1.0, 7.0, dtype=DT)
    blocks = {"even": slice(0, 6, 2), "odd": [slice(1, 2), slice(3, 6, 2)], "none": slice(4, 4)}
    res = block_hutchinson(TensorOperator(torch.diag(d)), blocks, num_probes=2, seed=0)
    assert res.value == float(d.sum())  # diagonal, Rademacher: exact
    assert res.by_layer == {"even": 9.0, "odd": 12.0, "none": 0.0}


@pytest.mark.parametrize("estimator", ["hutchinson", "hutchpp", "exact_trace"])
def test_a_block_whose_slices_overlap_is_refused_before_any_product(estimator):
    """``by_layer`` of hutchinson, hutchpp and exact_trace counted an index in two slices of one
    block twice (30 for a block trace of 15, found in review s19): refused, naming the slices,
    before any product. Two blocks may still overlap: each block's trace stands on its own, and
    the exact one equals the dense matrix's diagonal sum."""
    A = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    calls = []

    class Counting(TensorOperator):
        def matmat(self, V):
            calls.append(V.shape[1])
            return super().matmat(V)

    op = Counting(A)
    fn = getattr(cl.estimators, estimator)
    kwargs = {} if estimator == "exact_trace" else {"seed": 0}
    with pytest.raises(ValueError, match=r"share indices.*a block's trace"):
        fn(op, blocks={"a": [slice(0, 4), slice(2, 5)]}, **kwargs)
    assert calls == []
    both = cl.estimators.exact_trace(op, blocks={"a": slice(0, 4), "b": slice(2, 6)})
    assert both.by_layer == {"a": 10.0, "b": 18.0}
