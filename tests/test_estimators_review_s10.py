"""Review of the estimators (tenth sweep). Each case was wrong before:

* Hutchinson read a ``CurvatureOperator`` subclass's trace through the base class's
  ``quadratic_forms``, ignoring the subclass's ``matmat`` (a damped ``H + I/2``: ``Tr(H)``);
* a restarted Lanczos basis smaller than the number of distinct eigenvalues never became
  invariant, listed a repeated eigenvalue once and said ``converged=True``;
* Dropout refusals of ``trace(..., method="exact")`` and ``"ggn_cv"`` named ``fisher_trace``, and
  ``ggn_cv`` raised only after building its operator;
* ``cl.eigenvalues`` read the data before refusing a float32 ``tol`` below what float32 can
  certify, or a basis that cannot fit ``memory_budget``;
* ``fisher_trace(params=...)`` carried graphs of the other parameters (torch's "Converting a
  tensor with requires_grad=True to a scalar" warning);
* minor: a ``seed`` reported for deterministic exact traces; a memory refusal suggesting a
  ``max_basis`` that cannot help; ``max_matvecs < k`` overrun; a ``max_basis`` message that
  disagreed with the rule.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._losses import loss_spec
from curvlab.estimators import EstimatorMemoryError, TensorOperator, hutchinson
from curvlab.estimators._lanczos import lanczos_eigenvalues

DT = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _data(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _dense_hessian(model: nn.Module, loss_fn: nn.Module, X, Y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(torch.func.functional_call(model, parts, (X,)), Y)

    return torch.func.hessian(f)(flat)


class _Reads:
    """Data that records how many batches were read."""

    def __init__(self, batches: list) -> None:
        self.batches, self.read = batches, 0

    def __iter__(self):  # noqa: ANN204
        for b in self.batches:
            self.read += 1
            yield b


# ---------------------------------------------------------------- 1. Hutchinson on a subclass
def test_hutchinson_uses_a_subclass_matmat() -> None:
    model, (X, Y) = _mlp(), _data()
    loss_fn = nn.CrossEntropyLoss()
    op = cl.curvature_operator(model, loss_fn, (X, Y), matrix="hessian")

    class Damped(type(op)):  # type: ignore[misc, valid-type]
        def matmat(self, V: torch.Tensor) -> torch.Tensor:
            return super().matmat(V) + 0.5 * V

    op.__class__ = Damped
    dense = _dense_hessian(model, loss_fn, X, Y) + 0.5 * torch.eye(op.shape[0], dtype=DT)
    got = hutchinson(op, num_probes=40, seed=3)
    ref = hutchinson(TensorOperator(dense), num_probes=40, seed=3)  # the same probes
    assert got.value == pytest.approx(ref.value, rel=1e-10)
    assert got.stderr == pytest.approx(ref.stderr, rel=1e-8)


# ---------------------------------------------------------------- 2. restarted Lanczos
@pytest.mark.parametrize("max_basis", [5, 6, 8])
def test_restarted_basis_lists_a_repeated_eigenvalue_with_its_multiplicity(max_basis: int) -> None:
    ev = torch.linspace(-3, 5, 6, dtype=DT).repeat_interleave(3)  # six values, three times each
    A = torch.diag(ev)
    res = lanczos_eigenvalues(
        TensorOperator(A), k=3, tol=1e-8, max_basis=max_basis, seed=1, return_vectors=True
    )
    assert res.converged
    torch.testing.assert_close(res.values, torch.full((3,), 5.0, dtype=DT), atol=1e-7, rtol=0)
    assert res.num_restarts > 0 and res.info["locks"] >= 1
    # the residuals are the true ones, and within the tolerance
    true = torch.linalg.vector_norm(A @ res.vectors - res.vectors * res.values, dim=0)
    torch.testing.assert_close(res.residuals, true, rtol=1e-6, atol=1e-13)
    assert float(true.max()) <= 1e-8 * res.norm
    gram = res.vectors.T @ res.vectors
    torch.testing.assert_close(gram, torch.eye(3, dtype=DT), atol=1e-10, rtol=0)
    assert res.peak_vectors <= max_basis + 1


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_restarted_basis_kron_hessian(which: str) -> None:
    X = torch.randn(20, 5, generator=torch.Generator().manual_seed(0), dtype=DT)
    A = torch.kron(X.T @ X / 30, torch.eye(3, dtype=DT))  # every eigenvalue three times
    ev = torch.linalg.eigvalsh(A)
    ref = ev.flip(0)[:3] if which == "largest" else ev[:3]
    res = lanczos_eigenvalues(TensorOperator(A), k=3, which=which, tol=1e-8, max_basis=6)
    assert res.converged
    torch.testing.assert_close(res.values, ref, atol=1e-7 * float(ev.abs().max()), rtol=0)


def test_eigenvalues_with_a_memory_budget_finds_the_triple_eigenvalue() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 3, bias=False).to(DT)
    X, Y = torch.randn(40, 8, dtype=DT), torch.randn(40, 3, dtype=DT)
    loss_fn = nn.MSELoss()
    dense = _dense_hessian(model, loss_fn, X, Y)  # (2 / (N * 3)) X^T X kron I_3
    ref = torch.linalg.eigvalsh(dense).flip(0)[:3]
    res = cl.eigenvalues(model, loss_fn, (X, Y), k=3, tol=1e-6, memory_budget=6 * 24 * 8)
    assert res.max_basis == 5 and res.converged
    torch.testing.assert_close(res.values, ref, atol=1e-5 * float(ref[0]), rtol=0)


def test_restarted_basis_stays_within_max_matvecs() -> None:
    ev = torch.linspace(-3, 5, 6, dtype=DT).repeat_interleave(3)
    for limit in (12, 30, 45):
        res = lanczos_eigenvalues(
            TensorOperator(torch.diag(ev)), k=3, tol=1e-8, max_basis=5, seed=1, max_matvecs=limit
        )
        assert res.num_matvecs <= limit
        if not res.converged:
            continue
        torch.testing.assert_close(res.values, torch.full((3,), 5.0, dtype=DT), atol=1e-7, rtol=0)


def test_unrestarted_runs_take_the_same_products() -> None:
    # the default basis holds the whole run: no verification, the counts of before
    B = torch.randn(80, 80, generator=torch.Generator().manual_seed(123), dtype=DT)
    res = lanczos_eigenvalues(TensorOperator((B + B.T) / 2), k=3, tol=1e-8)
    assert (res.num_matvecs, res.num_restarts, res.info) == (47, 0, {})


# ---------------------------------------------------------------- 3. Dropout messages
def _dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.3), nn.ReLU(), nn.Linear(6, 2)).to(DT)


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"matrix": "hessian", "method": "ggn_cv"}, "trace(method='ggn_cv')"),
        ({"matrix": "ggn", "method": "exact"}, "trace(matrix='ggn', method='exact')"),
        (
            {"matrix": "empirical_fisher", "method": "exact"},
            "trace(matrix='empirical_fisher', method='exact')",
        ),
        ({"matrix": "fisher", "method": "exact"}, "trace(matrix='fisher', method='exact')"),
    ],
)
def test_dropout_refusals_name_the_call_before_reading_the_data(kw: dict, named: str) -> None:
    X, Y = _data(10)
    data = _Reads([(X, Y % 2)])
    with pytest.raises(ValueError, match=r"Dropout at '1' is in train mode") as info:
        cl.trace(_dropout_net(), nn.CrossEntropyLoss(), data, **kw)
    message = str(info.value)
    assert message.startswith(named) and "model.eval()" in message
    if kw["matrix"] != "fisher":
        assert "fisher_trace" not in message and "labels" not in message
    assert data.read == 0


# ---------------------------------------------------------------- 4. checks before the data
@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"tol": 1e-9}, ValueError, "below what float32 Lanczos vectors can certify"),
        ({"memory_budget": 4 * 31 * 3}, EstimatorMemoryError, "memory_budget"),
        (
            {"k": 2, "max_basis": 10, "memory_budget": 4 * 31 * 5},
            EstimatorMemoryError,
            "11 vectors",
        ),
        ({"k": 3, "max_basis": 4}, ValueError, r"at least k \+ 2 = 5"),
        ({"k": 3, "max_matvecs": 2}, ValueError, "max_matvecs=2 is fewer than k=3"),
    ],
)
def test_eigenvalues_refuses_what_the_arguments_decide_before_reading(kw, error, match) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))  # float32, D = 31
    g = torch.Generator().manual_seed(0)
    data = _Reads([(torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g))] * 3)
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(error, match=match):
            cl.eigenvalues(model, nn.CrossEntropyLoss(), data, **kw)
    finally:
        hook.remove()
    assert data.read == 0 and not forwards


# ---------------------------------------------------------------- 5. fisher_trace(params=)
def test_fisher_trace_of_a_subset_keeps_no_graph_and_matches_the_layer() -> None:
    model = _mlp().eval()
    X, Y = _data()
    loss_fn = nn.CrossEntropyLoss()
    full = cl.fisher_trace(model, loss_fn, (X, Y), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's requires_grad-to-scalar warning included
        part = cl.fisher_trace(model, loss_fn, (X, Y), seed=0, params=["2"])
    assert part.value == pytest.approx(full.by_layer["2"], rel=1e-12)
    # brute force: the labels drawn as the library draws them, per-example gradients of the last
    # layer by autograd
    with torch.no_grad():
        logits = model(X)
    labels = loss_spec(loss_fn).sample_targets(logits, torch.Generator().manual_seed(0), Y)
    total = 0.0
    for n in range(X.shape[0]):
        loss = nn.functional.cross_entropy(model(X[n : n + 1]), labels[n : n + 1], reduction="sum")
        gs = torch.autograd.grad(loss, [model[2].weight, model[2].bias])
        total += sum(float(g.pow(2).sum()) for g in gs)
    assert part.value == pytest.approx(total / X.shape[0], rel=1e-10)


# ---------------------------------------------------------------- 6. minor
def test_deterministic_exact_traces_report_no_seed() -> None:
    model, data = _mlp(), _data()
    loss_fn = nn.CrossEntropyLoss()
    for matrix in ("hessian", "ggn", "empirical_fisher"):
        assert cl.trace(model, loss_fn, data, matrix, method="exact", seed=2).seed is None
    assert cl.trace(model, loss_fn, data, "fisher", method="exact", seed=2).seed == 2


def test_memory_refusal_with_return_vectors_names_what_helps() -> None:
    op = TensorOperator(torch.eye(1000))
    with pytest.raises(EstimatorMemoryError) as info:
        lanczos_eigenvalues(op, k=20, max_basis=22, return_vectors=True, memory_budget=4000 * 30)
    message = str(info.value)
    assert "return_vectors=False" in message and "smaller max_basis" not in message
    # where a smaller basis helps, the hint names the smallest one and its need
    with pytest.raises(EstimatorMemoryError, match=r"at least k \+ 2 = 6, which needs 8 vectors"):
        lanczos_eigenvalues(op, k=4, max_basis=40, return_vectors=True, memory_budget=4000 * 20)


def test_max_matvecs_below_k_is_refused() -> None:
    A = TensorOperator(torch.diag(torch.arange(1.0, 41.0, dtype=DT)))
    with pytest.raises(ValueError, match="max_matvecs=2 is fewer than k=5"):
        lanczos_eigenvalues(A, k=5, max_matvecs=2)
    res = lanczos_eigenvalues(A, k=5, max_matvecs=5)
    assert res.num_matvecs == 5 and not res.converged


def test_max_basis_rule_and_message_agree_on_small_operators() -> None:
    B = TensorOperator(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=DT)))
    with pytest.raises(ValueError, match=r"at least min\(k \+ 2, D\) = 3, got 2"):
        lanczos_eigenvalues(B, k=2, max_basis=2)
    res = lanczos_eigenvalues(B, k=2, max_basis=3, tol=1e-10)
    torch.testing.assert_close(res.values, torch.tensor([3.0, 2.0], dtype=DT))


def test_a_restarted_top_one_run_is_not_verified_and_stays_exact() -> None:
    # k = 1: a missed copy of the top value changes nothing returned, so a restarted run takes
    # no verification products (review s10, GPT-2-sized models restart every run)
    B = torch.randn(80, 80, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    A = (B + B.T) / 2
    res = lanczos_eigenvalues(TensorOperator(A), k=1, tol=1e-10, max_basis=6)
    assert res.converged and res.num_restarts > 0 and "locks" not in res.info
    want = torch.linalg.eigvalsh(A)[-1]
    assert abs(float(res.values[0]) - float(want)) <= res.residuals[0] + 1e-12
