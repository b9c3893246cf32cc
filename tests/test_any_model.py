"""The public contract on any model: tests/zoo.py's cases against tests/bruteforce.py's dense references.

Every case is ``"<entry>-<reduction>-<batching>"``: GPTs (nanoGPT-style with a tied head, and
HuggingFace GPT-2 with dict inputs and padding), a torchvision-style residual block with eval
BatchNorm and in-place ReLU, LayerNorm/RMSNorm MLPs, a parameter owned by the model itself, shared
and repeated weights, multi-label BCE, sequence and per-pixel outputs for CE/MSE/BCE, an Embedding
classifier; reductions "mean" and "sum"; the same 8 examples as one batch or as batches (3, 1, 4).
"""

from __future__ import annotations

import copy
import functools
import math
from types import SimpleNamespace

import pytest
import torch

import curvlab as cl
from tests import bruteforce as B
from tests import reference as R
from tests.problems import make_problem
from tests.zoo import BATCHINGS, CASES, ENTRIES, REDUCTIONS, make_case

BACKENDS = ["auto", "func"]
MATRICES = ["hessian", "ggn", "empirical_fisher"]
GPTS = ("tiny_gpt", "hf_gpt2")  # ~600 parameters: the O(D) products of the library take seconds
slow = pytest.mark.slow


def cases(heavy: str = "") -> list:
    """All cases; for heavy tests the GPT cases are ``slow`` (``heavy="all"``: every GPT case,
    ``heavy="most"``: all but "mean-three", the hardest: ignored tokens across uneven batches)."""
    out = []
    for name in CASES:
        entry, rest = name.split("-", 1)
        is_slow = entry in GPTS and (heavy == "all" or (heavy == "most" and rest != "mean-three"))
        out.append(pytest.param(name, marks=slow) if is_slow else name)
    return out


@functools.cache
def dense(entry: str, reduction: str) -> B.Dense:
    """The references of a case; "one" and "three" hold the same examples (checked below)."""
    return B.Dense(make_case(f"{entry}-{reduction}-one"))


def case_and_ref(name: str) -> tuple:
    case = make_case(name)
    return case, dense(case.entry, case.reduction)


def check_backend(result: object, backend: str, allowed: tuple[str, ...] = ("func",)) -> None:
    """``.backend`` says who computed the result; with ``backend="func"`` it is torch.func."""
    who = getattr(result, "backend", None)
    assert isinstance(who, str), f".backend missing: {who!r}"
    if backend == "func":
        assert who in allowed, who


# ------------------------------------------------------------------------ the zoo and references


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_zoo_is_deterministic_and_batchings_hold_the_same_examples(entry: str) -> None:
    a, b = make_case(f"{entry}-mean-one"), make_case(f"{entry}-sum-three")
    assert [len(x[1]) for x in b.batches] == list(BATCHINGS["three"])
    assert isinstance(a.data, tuple) and isinstance(b.data, list)
    torch.testing.assert_close(B.flat_params(a.model), B.flat_params(b.model), rtol=0, atol=0)
    ia, ib = B.concat_inputs(a.batches), B.concat_inputs(b.batches)
    if isinstance(ia, dict):
        assert ia.keys() == ib.keys() and all(torch.equal(ia[k], ib[k]) for k in ia)
    else:
        assert torch.equal(ia, ib)
    assert torch.equal(B.concat_targets(a.batches), B.concat_targets(b.batches))
    assert B.flat_params(a.model).numel() < 700
    assert all(p.dtype == torch.float64 for p in a.model.parameters())


@pytest.mark.parametrize(
    "name",
    [
        "mlp-ce-mean-three",
        "cnn-mse-sum-one",
        "res-bce-mean-three",
        "cnnbn-ce-sum-one",
        "mlp-bce-sum-three",
        "cnn-ce-mean-one",
    ],
)
def test_bruteforce_equals_tests_reference_on_mlp_cnn_problems(name: str) -> None:
    """tests/reference.py's dense matrices (MLP/CNN, Tensor inputs) are what ours give there."""
    p = make_problem(name)
    d = B.Dense(p)
    close = functools.partial(torch.testing.assert_close, rtol=1e-10, atol=1e-13)
    close(d.hessian, R.dense_hessian(p))
    close(d.ggn, R.dense_ggn(p))
    close(d.empirical_fisher, R.dense_empirical_fisher(p))
    close(d.mean_grads, R.per_example_grads(p))
    close(d.value, float(R.objective(p)))


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bruteforce_is_consistent(entry: str, reduction: str) -> None:
    """Independent routes to the same references agree, so the references are right."""
    d = dense(entry, reduction)
    case = d.obj
    # contributions J_n^T dL/df_n == grad of c_n from reduction="none" one example at a time
    torch.testing.assert_close(
        d.contributions,
        B.contributions_by_definition(case),
        rtol=1e-10,
        atol=1e-13 * B.scale_of(d.contributions),
    )
    # they sum to the gradient of L, and the objective is what loss_fn computes on all data
    torch.testing.assert_close(d.contributions.sum(0), d.gradient, rtol=1e-10, atol=1e-14)
    # reverse- and forward-mode Jacobians agree
    Jf = torch.func.jacfwd(d._f)(d.theta).reshape(d.N, -1, d.D)
    torch.testing.assert_close(d.jacobian, Jf, rtol=1e-10, atol=1e-13 * B.scale_of(Jf))
    # the Hessian equals central differences of the (first-order) gradient along random directions
    gen = torch.Generator().manual_seed(0)
    grad = torch.func.grad(lambda t: B.objective(case, t))
    eps = 1e-5
    for _ in range(3):
        v = torch.randn(d.D, generator=gen, dtype=torch.float64)
        fd = (grad(d.theta + eps * v) - grad(d.theta - eps * v)) / (2 * eps)
        hv = d.hessian @ v
        assert float((hv - fd).norm()) <= 1e-6 * float(hv.norm()) + 1e-9
    torch.testing.assert_close(d.hessian, d.hessian.T, rtol=0, atol=1e-12 * B.scale_of(d.hessian))
    # the GGN is symmetric positive semi-definite; the Fisher matrices are PSD
    ev = torch.linalg.eigvalsh(d.ggn)
    assert float(ev.min()) >= -1e-10 * float(ev.abs().max())


@pytest.mark.parametrize("entry", ["tiny_gpt", "hf_gpt2", "shared_linear"])
def test_bruteforce_keeps_tied_weights_tied(entry: str) -> None:
    """functional_call with each unique name once (tie_weights=True) moves every use of a tie."""
    case = make_case(f"{entry}-mean-one")
    X = B.concat_inputs(case.batches)
    theta = B.flat_params(case.model)
    gen = torch.Generator().manual_seed(1)
    theta2 = theta + 0.1 * torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
    moved = copy.deepcopy(case.model)
    with torch.no_grad():
        for name, value in B.unflatten(moved, theta2).items():
            moved.get_parameter(name).copy_(value)  # copies into the shared tensor: both uses move
        out = moved(**X) if isinstance(X, dict) else moved(X)
        out = out if isinstance(out, torch.Tensor) else out.logits
    torch.testing.assert_close(B.forward(case.model, theta2, X), out, rtol=1e-12, atol=1e-12)
    # the gradient through functional_call is autograd's gradient on the real model (both uses)
    model = copy.deepcopy(case.model)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = model(**X) if isinstance(X, dict) else model(X)
    out = out if isinstance(out, torch.Tensor) else out.logits
    loss = B.loss_value(case.loss_fn, out, B.concat_targets(case.batches))
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
    torch.testing.assert_close(dense(entry, "mean").gradient, g, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------- one-pass quantities


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_diag_fisher_empirical(name: str, backend: str) -> None:
    case, ref = case_and_ref(name)
    result = cl.diag_fisher(case.model, case.loss_fn, case.data, kind="empirical", backend=backend)
    B.assert_dicts_close(result, ref.diag("empirical_fisher"))
    check_backend(result, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", cases("most"))
def test_diag_fisher_exact_is_ggn_diagonal(name: str, backend: str) -> None:
    case, ref = case_and_ref(name)
    result = cl.diag_fisher(case.model, case.loss_fn, case.data, kind="exact", backend=backend)
    B.assert_dicts_close(result, ref.diag("ggn"))
    check_backend(result, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", cases("all"))
def test_diag_hessian(name: str, backend: str) -> None:
    case, ref = case_and_ref(name)
    result = cl.diag_hessian(case.model, case.loss_fn, case.data, backend=backend)
    B.assert_dicts_close(result, ref.diag("hessian"))
    check_backend(result, backend, allowed=("func", "columns"))  # "func" is "columns"' alias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_gradient_stats(name: str, backend: str) -> None:
    case, ref = case_and_ref(name)
    stats = cl.gradient_stats(case.model, case.loss_fn, case.data, backend=backend)
    B.assert_dicts_close(stats.mean, ref.split(ref.grad_mean))
    B.assert_dicts_close(stats.variance, ref.split(ref.grad_variance))
    scale = float(ref.grad_variance.abs().max()) * ref.D
    B.assert_float_close(stats.trace_covariance, ref.trace_covariance, scale=scale)
    B.assert_float_close(stats.noise_scale, ref.noise_scale)
    check_backend(stats, backend)


def _check_norms(name: str, kind: str, backend: str) -> None:
    case, ref = case_and_ref(name)
    norms = cl.fisher_norms(case.model, case.loss_fn, case.data, kind=kind, backend=backend)
    F = ref.matrix("empirical_fisher" if kind == "empirical" else "ggn")
    B.assert_float_close(norms.frobenius, float(torch.linalg.matrix_norm(F)))
    B.assert_float_close(norms.diag_frobenius, float(torch.diagonal(F).norm()))
    check_backend(norms, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_fisher_norms_empirical(name: str, backend: str) -> None:
    _check_norms(name, "empirical", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", cases("most"))
def test_fisher_norms_exact(name: str, backend: str) -> None:
    _check_norms(name, "exact", backend)


# ----------------------------------------------------------------------- operators, estimators


@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("name", cases("all"))
def test_curvature_operator_to_dense_and_matvec(name: str, matrix: str) -> None:
    case, ref = case_and_ref(name)
    op = cl.curvature_operator(case.model, case.loss_fn, case.data, matrix=matrix)
    expected = ref.matrix(matrix)
    B.assert_close(op.to_dense(), expected, what=matrix)
    v = torch.randn(ref.D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Mv = op.matvec(v)
    assert Mv.shape == (ref.D,)
    B.assert_close(Mv, expected @ v, what=f"{matrix} matvec")


@pytest.mark.parametrize("name", cases("all"))
def test_exact_hessian_trace(name: str) -> None:
    case, ref = case_and_ref(name)
    result = cl.trace(case.model, case.loss_fn, case.data, matrix="hessian", method="exact")
    diag = torch.diagonal(ref.hessian)
    B.assert_float_close(result.value, float(diag.sum()), scale=float(diag.abs().sum()))


@pytest.mark.parametrize("name", cases("most"))
def test_top_hessian_eigenvalues(name: str) -> None:
    case, ref = case_and_ref(name)
    result = cl.eigenvalues(case.model, case.loss_fn, case.data, matrix="hessian", k=3, tol=1e-8)
    ev = torch.linalg.eigvalsh(ref.hessian)
    expected = ev.flip(0)[:3]
    values = torch.as_tensor(result.values, dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-10 * float(ev.abs().max()))


# ----------------------------------------------------------------------------------- MC Fisher

MC_ENTRIES = ["seq_ce_gpt", "multilabel_bce", "seq_mse"]  # categorical, Bernoulli, Gaussian
MC_REPEATS = 20  # independent repeats (seeds 0..19) give the standard error
MC_SAMPLES = 100  # label draws per example in each repeat (2000 per example in all)


@pytest.mark.parametrize("entry", MC_ENTRIES)
def test_diag_fisher_mc_is_unbiased_for_the_ggn_diagonal(entry: str) -> None:
    """The mean of independent repeats lies within 5 estimated standard errors of diag(GGN)."""
    case = make_case(f"{entry}-mean-one")
    exact = B.diag_dict(case.model, dense(entry, "mean").ggn)
    runs = [
        cl.diag_fisher(
            case.model, case.loss_fn, case.data, kind="mc", mc_samples=MC_SAMPLES, seed=s
        )
        for s in range(MC_REPEATS)
    ]
    scale = B.scale_of(exact)
    for k, truth in exact.items():
        draws = torch.stack([r[k] for r in runs])
        mean = draws.mean(0)
        stderr = draws.std(0, unbiased=True) / math.sqrt(MC_REPEATS)
        assert float(stderr.max()) <= 0.05 * scale, "the test has no power: too few samples"
        err = (mean - truth).abs()
        bad = err > 5 * stderr + 1e-12 * scale
        assert not bool(bad.any()), (k, float((err / stderr.clamp_min(1e-300)).max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name",
    [
        "seq_ce_gpt-mean-three",
        "multilabel_bce-sum-one",
        "tiny_gpt-mean-three",
        "pixel_mse-sum-three",
    ],
)
def test_diag_fisher_mc_same_seed_same_result(name: str, backend: str) -> None:
    case = make_case(name)

    def run(seed: int) -> dict:
        return cl.diag_fisher(
            case.model, case.loss_fn, case.data, kind="mc", seed=seed, backend=backend
        )

    a, b, c = run(3), run(3), run(4)
    assert set(a) == set(b) == set(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert set(a) == set(B.param_shapes(case.model))
    check_backend(a, backend)


# ------------------------------------------------------------- regressions that were silently wrong


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batching", list(BATCHINGS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("entry", ["shared_linear", "twice_linear"])
def test_regression_shared_weight_fisher(
    entry: str, reduction: str, batching: str, backend: str
) -> None:
    """A weight used at two places: per-example gradients are summed over its uses before squaring."""
    case, ref = case_and_ref(f"{entry}-{reduction}-{batching}")
    model, loss_fn, data = case.model, case.loss_fn, case.data
    emp = cl.diag_fisher(model, loss_fn, data, kind="empirical", backend=backend)
    B.assert_dicts_close(emp, ref.diag("empirical_fisher"))
    exact = cl.diag_fisher(model, loss_fn, data, kind="exact", backend=backend)
    B.assert_dicts_close(exact, ref.diag("ggn"))
    for kind, matrix in [("empirical", "empirical_fisher"), ("exact", "ggn")]:
        norms = cl.fisher_norms(model, loss_fn, data, kind=kind, backend=backend)
        F = ref.matrix(matrix)
        B.assert_float_close(norms.frobenius, float(torch.linalg.matrix_norm(F)))
        B.assert_float_close(norms.diag_frobenius, float(torch.diagonal(F).norm()))
    if entry == "shared_linear":
        assert "b.weight" not in emp and "a.weight" in emp  # the shared weight once, first name


IGNORE_CASES = [
    c
    for c in cases("most")
    if str(getattr(c, "values", [c])[0]).startswith(("tiny_gpt-", "seq_ce_"))
]


@pytest.mark.parametrize("name", IGNORE_CASES)
def test_regression_ignore_index_trace_and_gradient_mean(name: str) -> None:
    """CrossEntropyLoss with -100 labels: the objective counts only the non-ignored tokens."""
    case, ref = case_and_ref(name)
    reduction, batching = case.reduction, case.batching
    targets = B.concat_targets(case.batches)
    assert bool((targets == -100).any()) and bool((targets != -100).any())
    if batching == "three" and reduction == "mean":  # the mean of batch means would be wrong
        per_batch = [
            B.objective(SimpleNamespace(model=case.model, loss_fn=case.loss_fn, batches=[b]))
            for b in case.batches
        ]
        assert abs(float(sum(per_batch)) / len(per_batch) - ref.value) > 1e-3 * abs(ref.value)
    tr = cl.trace(case.model, case.loss_fn, case.data, matrix="hessian", method="exact")
    diag = torch.diagonal(ref.hessian)
    B.assert_float_close(tr.value, float(diag.sum()), scale=float(diag.abs().sum()))
    stats = cl.gradient_stats(case.model, case.loss_fn, case.data)
    B.assert_dicts_close(stats.mean, ref.split(ref.grad_mean))
    if reduction == "mean":  # under "mean" the gradient mean is the gradient of L itself
        B.assert_dicts_close(stats.mean, ref.split(ref.gradient))


# ------------------------------------------------------------------------------ leave no trace

CALLS = {
    "diag_fisher_empirical": lambda m, l, d: cl.diag_fisher(m, l, d),
    "diag_fisher_exact": lambda m, l, d: cl.diag_fisher(m, l, d, kind="exact"),
    "diag_fisher_mc": lambda m, l, d: cl.diag_fisher(m, l, d, kind="mc", seed=1),
    "diag_fisher_func": lambda m, l, d: cl.diag_fisher(m, l, d, backend="func"),
    "diag_hessian": lambda m, l, d: cl.diag_hessian(m, l, d),
    "gradient_stats": lambda m, l, d: cl.gradient_stats(m, l, d),
    "fisher_norms_exact": lambda m, l, d: cl.fisher_norms(m, l, d, kind="exact"),
    "operator_matvec": lambda m, l, d: cl.curvature_operator(m, l, d, matrix="ggn").matvec(
        torch.ones(sum(p.numel() for p in m.parameters() if p.requires_grad), dtype=torch.float64)
    ),
    "eigenvalues": lambda m, l, d: cl.eigenvalues(m, l, d, k=1, tol=1e-6),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("name", ["tiny_gpt-mean-three", "resblock-sum-three"])
def test_leave_no_trace(name: str, call: str) -> None:
    case = make_case(name)
    model = case.model
    gen = torch.Generator().manual_seed(5)
    for i, p in enumerate(model.parameters()):  # some .grad set, some None
        if i % 2 == 0:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    before = R.snapshot(model)
    CALLS[call](model, case.loss_fn, case.data)
    R.assert_untouched(model, before)
    if name.startswith("resblock"):
        assert model.relu.inplace and not model.training
