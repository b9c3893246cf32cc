"""Argument checks of the public surface (review s11, area "docstr", findings 1, 2, 4-8).

* ``exact_trace(batch_size=-1)`` returned the sum of uninitialised memory (2e-309 for a trace of
  10), and ``trace(method="exact")`` ignored any ``batch_size``;
* ``trace`` and ``spectral_density`` read ``memory_budget`` only after the data (NaN, ``"x"``,
  ``-1`` and ``inf`` failed after a forward pass or were taken as budgets);
* ``eigenvalues`` and ``spectral_density`` checked ``seed`` after a forward pass, ``seed=True`` gave
  torch's ``RuntimeError`` and ``generator=5`` an ``AttributeError``; deterministic kinds took any;
* bools were taken as counts (``mc_samples``, ``chunk_size``, ``block_size``), ``min_probes=-1.5``
  was accepted, and ``diag_hessian``'s columns ignored ``chunk_size``;
* ``fisher_penalty`` / ``random_label_penalty`` on an empty batch raised ``IndexError``, the other
  penalties returned NaN;
* ``blocks={"a": slice(0, 2)}`` (one slice per name, as documented) raised ``TypeError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import curvlab as cl
from curvlab import regularizers as R
from curvlab.estimators import (
    TensorOperator,
    block_hutchinson,
    exact_trace,
    hutchinson,
    hutchpp,
    lanczos_eigenvalues,
    slq,
)
from curvlab.estimators import fisher_trace as fisher_trace_fn
from tests.bruteforce import autograd_hessian, flat_params, forward


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _xy(n: int = 7) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _hessian(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """The dense Hessian of the mean cross-entropy by double backward (brute force)."""
    loss = nn.CrossEntropyLoss()
    return autograd_hessian(lambda t: loss(forward(model, t, X), y), flat_params(model))


class _Forwards:
    """Counts the model's forward passes and the examples of the largest one."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.largest = 0
        self.largest_with_grad = 0  # the passes that hold a graph (the memory bound's)
        self.handle = model[0].register_forward_pre_hook(self._seen)

    def _seen(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.count += 1
        self.largest = max(self.largest, int(args[0].shape[0]))
        if torch.is_grad_enabled():
            self.largest_with_grad = max(self.largest_with_grad, int(args[0].shape[0]))

    def reset(self) -> None:
        self.count = self.largest = self.largest_with_grad = 0


class _Widths(TensorOperator):
    """A dense operator that records the width of every product."""

    def __init__(self, matrix: Tensor) -> None:
        super().__init__(matrix)
        self.widths: list[int] = []

    def matmat(self, V: Tensor) -> Tensor:
        self.widths.append(int(V.shape[1]))
        return super().matmat(V)


def _sym(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    return M + M.T


# ------------------------------------------------------------------ 1: exact_trace's batch_size


@pytest.mark.parametrize("bad", [-1, -64, 0, 2.5, True, "3"])
def test_exact_trace_refuses_a_batch_size_that_is_not_a_positive_int(bad: object) -> None:
    op = _Widths(2 * torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch_size must be a positive int or None"):
        exact_trace(op, batch_size=bad)  # type: ignore[arg-type]
    assert op.widths == []  # refused before any product


def test_exact_trace_takes_batch_size_unit_vectors_at_a_time() -> None:
    A = _sym(7)
    op = _Widths(A)
    res = exact_trace(op, batch_size=np.int64(3))  # type: ignore[arg-type]
    assert op.widths == [3, 3, 1]
    assert res.value == pytest.approx(float(A.trace()), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True])
def test_trace_exact_refuses_a_bad_batch_size_before_the_data(bad: object) -> None:
    model, (X, y) = _mlp(), _xy()
    seen = _Forwards(model)
    for matrix in ("hessian", "ggn"):
        with pytest.raises(ValueError, match="batch_size must be a positive int or None"):
            cl.trace(model, nn.CrossEntropyLoss(), (X, y), matrix, "exact", batch_size=bad)  # type: ignore[arg-type]
    assert seen.count == 0


def test_trace_exact_on_the_hessian_honours_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from curvlab.estimators import _api

    model, (X, y) = _mlp(), _xy()
    widths: list[int] = []
    original = _api.exact_trace

    class Recording:  # the operator, its products' widths recorded
        def __init__(self, op: Any) -> None:
            self.op, self.shape, self.dtype, self.device = op, op.shape, op.dtype, op.device

        def matmat(self, V: Tensor) -> Tensor:
            widths.append(int(V.shape[1]))
            return self.op.matmat(V)

    def recorded(op: Any, *args: Any, **kwargs: Any) -> Any:
        return original(Recording(op), *args, **kwargs)

    monkeypatch.setattr(_api, "exact_trace", recorded)
    res = cl.trace(model, nn.CrossEntropyLoss(), (X, y), method="exact", batch_size=4)
    dim = sum(p.numel() for p in model.parameters())
    assert widths == [4] * (dim // 4) + ([dim % 4] if dim % 4 else [])
    expected = float(_hessian(model, X, y).trace())
    assert res.value == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------- 2: memory_budget


BAD_BUDGETS = [math.nan, "x", -1, 0, True, -math.inf]


def _estimator_calls() -> dict[str, Callable[..., Any]]:
    L = nn.CrossEntropyLoss()
    return {
        "trace-hutchinson": lambda m, d, b: cl.trace(m, L, d, num_probes=3, memory_budget=b),
        "trace-hutch++": lambda m, d, b: cl.trace(
            m, L, d, method="hutch++", num_probes=3, memory_budget=b
        ),
        "trace-block": lambda m, d, b: cl.trace(
            m, L, d, method="block", num_probes=2, memory_budget=b
        ),
        "trace-ggn_cv": lambda m, d, b: cl.trace(
            m, L, d, method="ggn_cv", num_probes=2, memory_budget=b
        ),
        "trace-exact": lambda m, d, b: cl.trace(m, L, d, method="exact", memory_budget=b),
        "trace-exact-ggn": lambda m, d, b: cl.trace(
            m, L, d, "ggn", method="exact", memory_budget=b
        ),
        "trace-exact-fisher": lambda m, d, b: cl.trace(
            m, L, d, "fisher", method="exact", memory_budget=b
        ),
        "eigenvalues": lambda m, d, b: cl.eigenvalues(m, L, d, k=1, tol=1e-6, memory_budget=b),
        "spectral_density": lambda m, d, b: cl.spectral_density(
            m, L, d, num_steps=4, memory_budget=b
        ),
    }


@pytest.mark.parametrize("bad", BAD_BUDGETS, ids=repr)
@pytest.mark.parametrize("call", sorted(_estimator_calls()))
def test_a_memory_budget_that_is_not_bytes_is_refused_before_the_data(
    call: str, bad: object
) -> None:
    model, data = _mlp(), _xy()
    seen = _Forwards(model)
    with pytest.raises(ValueError, match="memory_budget must be a number of bytes > 0"):
        _estimator_calls()[call](model, data, bad)
    assert seen.count == 0


@pytest.mark.parametrize(
    "call", ["trace-hutchinson", "trace-hutch++", "trace-exact", "spectral_density"]
)
def test_an_infinite_memory_budget_is_no_budget(call: str) -> None:
    """``inf`` gives what the default gives on a problem this small (the probes are the same
    draws however they are batched)."""
    fn = _estimator_calls()[call]
    model, data = _mlp(), _xy()
    free, default = fn(model, data, math.inf), fn(model, data, None)
    if call == "spectral_density":
        torch.testing.assert_close(free.density, default.density, rtol=1e-10, atol=1e-12)
    else:
        assert free.value == pytest.approx(default.value, rel=1e-10)


def test_an_infinite_memory_budget_in_eigenvalues_is_exact() -> None:
    model, (X, y) = _mlp(), _xy()
    res = cl.eigenvalues(
        model, nn.CrossEntropyLoss(), (X, y), k=2, tol=1e-8, memory_budget=math.inf
    )
    top = torch.linalg.eigvalsh(_hessian(model, X, y)).flip(0)[:2]
    assert res.converged
    torch.testing.assert_close(res.values, top, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bad", BAD_BUDGETS, ids=repr)
def test_the_operator_estimators_refuse_a_budget_that_is_not_bytes(bad: object) -> None:
    A = _sym(6)
    calls = {
        "hutchinson": lambda op: hutchinson(op, 4, memory_budget=bad),
        "block_hutchinson": lambda op: block_hutchinson(
            op, {"a": [slice(0, 3)], "b": [slice(3, 6)]}, 2, memory_budget=bad
        ),
        "hutchpp": lambda op: hutchpp(op, 6, memory_budget=bad),
        "exact_trace": lambda op: exact_trace(op, memory_budget=bad),
        "lanczos": lambda op: lanczos_eigenvalues(op, k=1, tol=1e-6, memory_budget=bad),
        "slq": lambda op: slq(op, num_steps=3, memory_budget=bad),
    }
    for name, call in calls.items():
        op = _Widths(A)
        with pytest.raises(ValueError, match="memory_budget must be"):
            call(op)
        assert op.widths == [], name


def test_the_operator_estimators_take_an_infinite_budget() -> None:
    A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    assert hutchinson(TensorOperator(A), 4, memory_budget=math.inf).value == pytest.approx(36.0)
    assert exact_trace(TensorOperator(A), memory_budget=math.inf).value == pytest.approx(36.0)
    assert hutchpp(TensorOperator(A), 24, memory_budget=math.inf).value == pytest.approx(36.0)
    top = lanczos_eigenvalues(TensorOperator(A), k=2, tol=1e-10, memory_budget=math.inf)
    assert top.values.tolist() == pytest.approx([8.0, 7.0])
    dens = slq(TensorOperator(A), num_steps=8, memory_budget=math.inf)
    assert float(torch.trapezoid(dens.density, dens.grid)) == pytest.approx(1.0)


# ------------------------------------------------------------- 4/5: seed and generator


BAD_SEEDS = ["a", True, 1.5, 2**64, -(2**63) - 1]


@pytest.mark.parametrize("bad", BAD_SEEDS, ids=repr)
@pytest.mark.parametrize("call", ["trace", "eigenvalues", "spectral_density", "diag_fisher"])
def test_a_bad_seed_is_refused_before_any_forward(call: str, bad: object) -> None:
    model, data = _mlp(), _xy()
    L = nn.CrossEntropyLoss()
    seen = _Forwards(model)
    calls = {
        "trace": lambda: cl.trace(model, L, data, num_probes=2, seed=bad),
        "eigenvalues": lambda: cl.eigenvalues(model, L, data, seed=bad),
        "spectral_density": lambda: cl.spectral_density(model, L, data, num_steps=3, seed=bad),
        "diag_fisher": lambda: cl.diag_fisher(model, L, data, kind="mc", seed=bad),
    }
    with pytest.raises(ValueError, match="seed must be an int"):
        calls[call]()
    assert seen.count == 0


@pytest.mark.parametrize("bad", [5, np.random.default_rng(0), "g"], ids=["int", "numpy", "str"])
def test_a_generator_that_is_not_a_torch_generator_is_named(bad: object) -> None:
    model, (X, y) = _mlp(), _xy()
    L = nn.CrossEntropyLoss()
    seen = _Forwards(model)
    calls = {
        "diag_fisher-mc": lambda: cl.diag_fisher(model, L, (X, y), kind="mc", generator=bad),
        "diag_fisher-empirical": lambda: cl.diag_fisher(model, L, (X, y), generator=bad),
        "fisher_trace": lambda: fisher_trace_fn(model, L, (X, y), generator=bad),
        "operator": lambda: cl.curvature_operator(model, L, (X, y), "fisher", generator=bad),
        "fisher_penalty": lambda: R.fisher_penalty(model, L, X, generator=bad),
        "random_label_penalty": lambda: R.random_label_penalty(model, L, X, generator=bad),
        "hutchinson": lambda: hutchinson(TensorOperator(_sym(4)), 2, generator=bad),
        "lanczos": lambda: lanczos_eigenvalues(TensorOperator(_sym(4)), generator=bad),
        "slq": lambda: slq(TensorOperator(_sym(4)), num_steps=2, generator=bad),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="generator must be a torch.Generator") as info:
            call()
        if isinstance(bad, np.random.Generator):
            assert "numpy.Generator" in str(info.value) and "torch.Generator()" in str(info.value)
        assert seen.count == 0, name


def test_deterministic_kinds_refuse_a_seed_of_the_wrong_type_and_take_a_good_one() -> None:
    model, data = _mlp(), _xy()
    L = nn.CrossEntropyLoss()
    seen = _Forwards(model)
    with pytest.raises(ValueError, match="seed must be an int"):
        cl.diag_fisher(model, L, data, kind="empirical", seed="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed must be an int"):
        cl.diag_fisher(model, L, data, kind="exact", seed=True)
    assert seen.count == 0
    plain = cl.diag_fisher(model, L, data, kind="exact")
    seeded = cl.diag_fisher(model, L, data, kind="exact", seed=3, generator=torch.Generator())
    for n in plain:
        torch.testing.assert_close(seeded[n], plain[n], rtol=0, atol=0)


def test_a_numpy_integer_seed_is_that_seed() -> None:
    model, data = _mlp(), _xy()
    L = nn.CrossEntropyLoss()
    a = cl.diag_fisher(model, L, data, kind="mc", seed=np.int64(5))  # type: ignore[arg-type]
    b = cl.diag_fisher(model, L, data, kind="mc", seed=5)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    t = cl.trace(model, L, data, num_probes=3, seed=np.int64(5))  # type: ignore[arg-type]
    assert t.value == cl.trace(model, L, data, num_probes=3, seed=5).value
    assert t.seed == 5 and type(t.seed) is int


def test_a_penalty_refuses_a_bad_seed_before_its_forward() -> None:
    model, (X, _) = _mlp(), _xy()
    seen = _Forwards(model)
    for fn in (R.fisher_penalty, R.random_label_penalty):
        with pytest.raises(ValueError, match="seed must be an int"):
            fn(model, nn.CrossEntropyLoss(), X, seed=True)
        with pytest.raises(ValueError, match="either seed= or generator="):
            fn(model, nn.CrossEntropyLoss(), X, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed must be an int"):
        R.GradientNormPenalty(model, nn.CrossEntropyLoss(), seed=True)  # type: ignore[arg-type]
    assert seen.count == 0


# ------------------------------------------------------------------------ 6: counts


@pytest.mark.parametrize("bad", [True, 0, 1.5])
def test_counts_refuse_bools_and_non_integers(bad: object) -> None:
    model, data = _mlp(), _xy()
    L = nn.CrossEntropyLoss()
    seen = _Forwards(model)
    with pytest.raises(ValueError, match="mc_samples must be an int >= 1"):
        cl.diag_fisher(model, L, data, kind="mc", mc_samples=bad)  # type: ignore[arg-type]
    for call in (cl.diag_fisher, cl.gradient_stats, cl.diag_hessian):
        with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
            call(model, L, data, chunk_size=bad)  # type: ignore[operator]
    for backend in ("auto", "columns"):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            cl.diag_hessian(model, L, data, block_size=bad, backend=backend)  # type: ignore[arg-type]
    assert seen.count == 0


@pytest.mark.parametrize("bad", [-1.5, 0, True, -1])
def test_min_probes_must_be_a_positive_int(bad: object) -> None:
    op = _Widths(_sym(4))
    with pytest.raises(ValueError, match="min_probes must be a positive int"):
        hutchinson(op, 4, rtol=0.1, min_probes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_probes must be a positive int"):
        block_hutchinson(op, {"a": slice(0, 4)}, 4, rtol=0.1, min_probes=bad)  # type: ignore[arg-type]
    assert op.widths == []


@pytest.mark.parametrize("chunk_size", [None, 100, 7, 3, 1, np.int64(2)])
@pytest.mark.parametrize("how", ["columns", "params"])
def test_diag_hessian_columns_hold_at_most_chunk_size_examples(chunk_size: Any, how: str) -> None:
    """The column backend (``backend="columns"``, or a small ``params=`` selection under
    ``"auto"``) runs at most ``chunk_size`` examples at once, and stays exact."""
    model, (X, y) = _mlp(), _xy(7)
    H = _hessian(model, X, y).diagonal()
    seen = _Forwards(model)
    kwargs: dict[str, Any] = {"backend": "columns"} if how == "columns" else {"params": ["2"]}
    d = cl.diag_hessian(model, nn.CrossEntropyLoss(), (X, y), chunk_size=chunk_size, **kwargs)
    assert d.backend == "columns"
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    expected = dict(zip(names, H.split(sizes)))
    for n in d:
        torch.testing.assert_close(d[n].reshape(-1), expected[n], rtol=1e-10, atol=1e-12)
    bound = 7 if chunk_size is None else min(7, int(chunk_size))
    assert seen.largest_with_grad == bound
    # without a graph: the mixed-examples check before a batch is split (two examples at least,
    # review s24)
    assert seen.largest == max(bound, 2)
    if chunk_size is None or chunk_size >= 7:  # the graph is kept: one forward in all
        assert seen.count == 1


# -------------------------------------------------------------- 7: penalties, empty batch


def test_every_penalty_refuses_an_empty_batch_before_its_forward() -> None:
    model, (X, y) = _mlp(), _xy()
    L = nn.CrossEntropyLoss()
    seen = _Forwards(model)
    calls = {
        "fisher": lambda: R.fisher_penalty(model, L, X[:0]),
        "random": lambda: R.random_label_penalty(model, L, X[:0]),
        "gradient": lambda: R.gradient_penalty(model, L, X[:0], y[:0]),
        "input": lambda: R.input_gradient_penalty(model, L, X[:0], y[:0]),
        "gradient-sum": lambda: R.gradient_penalty(
            model, nn.CrossEntropyLoss(reduction="sum"), X[:0], y[:0]
        ),
    }
    for kind in ("fisher", "random", "gradient", "input"):
        penalty = R.GradientNormPenalty(model, L, kind=kind)
        calls[f"class-{kind}"] = lambda p=penalty: p(X[:0], y[:0])
    for name, call in calls.items():
        with pytest.raises(ValueError, match="the batch has no examples"):
            call()
        assert seen.count == 0, name


def test_a_penalty_of_a_batch_still_works() -> None:
    """The check leaves a non-empty batch alone: GP equals ``||grad L||^2`` by brute force."""
    model, (X, y) = _mlp(), _xy()
    L = nn.CrossEntropyLoss()
    value = R.gradient_penalty(model, L, X, y)
    theta = flat_params(model).requires_grad_(True)
    (g,) = torch.autograd.grad(L(forward(model, theta, X), y), theta)
    assert float(value.detach()) == pytest.approx(float(g.pow(2).sum()), rel=1e-10)


# ---------------------------------------------------------------------------- 8: blocks


def test_blocks_take_a_slice_or_a_list_of_slices() -> None:
    A = _sym(6)
    one = {"a": slice(0, 2), "b": slice(2, 6)}
    listed = {"a": [slice(0, 2)], "b": (slice(2, 4), slice(4, 6))}
    truth = {"a": float(A.diagonal()[:2].sum()), "b": float(A.diagonal()[2:].sum())}
    for blocks in (one, listed):
        ex = exact_trace(TensorOperator(A), blocks=blocks)
        assert ex.by_layer == pytest.approx(truth)
        hp = hutchpp(TensorOperator(A), 18, blocks=blocks)  # sketch of all 6: exact
        assert hp.by_layer == pytest.approx(truth)
    a = hutchinson(TensorOperator(A), 5, seed=2, blocks=one)
    b = hutchinson(TensorOperator(A), 5, seed=2, blocks=listed)
    assert a.by_layer == pytest.approx(b.by_layer) and a.value == b.value
    c = block_hutchinson(TensorOperator(A), one, 5, seed=2)
    d = block_hutchinson(TensorOperator(A), listed, 5, seed=2)
    assert c.by_layer == pytest.approx(d.by_layer) and c.value == pytest.approx(d.value)


def test_blocks_with_steps_are_those_indices_in_hutchpp() -> None:
    """A slice with a step is its own indices in every estimator (Hutch++'s row chunks took
    ``slice(0, None, 2)`` as all the rows)."""
    A = _sym(7)
    blocks = {"even": [slice(0, None, 2)], "odd": [slice(1, None, 2)], "some": [slice(1, 6, 3)]}
    diag = A.diagonal()
    truth = {"even": float(diag[[0, 2, 4, 6]].sum()), "odd": float(diag[[1, 3, 5]].sum())}
    truth["some"] = float(diag[[1, 4]].sum())
    hp = hutchpp(TensorOperator(A), 21, blocks=blocks)  # sketch of all 7: exact
    assert hp.by_layer == pytest.approx(truth)
    assert exact_trace(TensorOperator(A), blocks=blocks).by_layer == pytest.approx(truth)


def test_a_negative_step_is_refused_with_the_block() -> None:
    op = _Widths(_sym(4))
    with pytest.raises(ValueError, match=r"blocks\['a'\] holds slice\(3, 0, -1\)"):
        hutchpp(op, 6, blocks={"a": slice(3, 0, -1)})
    assert op.widths == []


@pytest.mark.parametrize("bad", [3, [slice(0, 2), 4], "0:2", None])
def test_blocks_of_another_kind_are_refused_with_the_name(bad: object) -> None:
    op = _Widths(_sym(4))
    with pytest.raises(TypeError, match=r"blocks\['a'\] must be a slice or a list of slices"):
        hutchinson(op, 2, blocks={"a": bad})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"blocks\['a'\] must be a slice or a list of slices"):
        exact_trace(op, blocks={"a": bad})  # type: ignore[dict-item]
    assert op.widths == []
