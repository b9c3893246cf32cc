"""Review s22 (fixer AX): promises of the public API that the code broke.

1. ``cl.trace``, ``cl.eigenvalues``, ``cl.spectral_density`` take ``generator=`` (DESIGN.md:
   "Randomness comes from a seed= or generator= argument"); ``seed=None`` (the default) is 0.
2. ``cl.CurvatureOperator`` takes the matrix aliases and its own default ``matrix=None``.
3. ``curvlab.estimators.exact_trace_per_example`` takes the matrix aliases.
4. ``"true"`` (the GGN for ``matrix=``) is accepted by the quantities' and samplers' ``kind=``.
5. ``Report.save`` writes into an existing empty folder without ``overwrite=True``.

Every expected curvature is written here from its definition (dense float64 by torch.func);
nothing is imported from the package's own reference code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl
from curvlab.analysis import Report
from curvlab.estimators import (
    exact_trace_per_example,
    hutchinson,
    hutchpp,
    lanczos_eigenvalues,
    slq,
)

# float64 sums of a few dozen O(1) terms round at ~1e-15 relative; 1e-10 leaves a wide margin
# and still tells any other matrix apart (they differ by O(1e-2) relative here)
RTOL = 1e-10


def _problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    X = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


def _dense(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Hessian, GGN and empirical Fisher of the mean cross-entropy, in
    ``named_parameters`` order, from their definitions."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = t[i : i + k].reshape(s)
            i += k
        return out

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflat(t), (x,))

    def loss(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(f(t, X), y)

    N = X.shape[0]
    H = hessian(loss)(theta)
    J = jacrev(f)(theta, X)  # (N, C, D)
    p = f(theta, X).softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("ncd,nce,nef->df", J, lam, J) / N
    grads = torch.stack(
        [
            torch.func.grad(
                lambda t, n=n: nn.functional.cross_entropy(f(t, X[n : n + 1]), y[n : n + 1])
            )(theta)
            for n in range(N)
        ]
    )
    EF = grads.T @ grads / N
    return {
        "hessian": H,
        "ggn": G,
        "empirical_fisher": EF,
        "names": names,
        "sizes": [s.numel() for s in shapes],
    }


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense_of(op) -> torch.Tensor:
    return op.matmat(torch.eye(op.shape[0], dtype=torch.float64))


class _Unreadable:
    """Data that fails when read: an argument refused before the data is read never gets here."""

    def __iter__(self):
        raise AssertionError("the data was read before the arguments were checked")


# ------------------------------------------------------------- 1. generator= on the entry points
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "block", "ggn_cv"])
def test_trace_generator_seeded_with_s_is_seed_s(method: str) -> None:
    """No drawn labels (the Hessian): the probes from a generator seeded with s are those of
    seed=s, as for curvature_operator and the estimators themselves."""
    model, loss_fn, data = _problem()
    a = cl.trace(model, loss_fn, data, method=method, num_probes=6, seed=7)
    b = cl.trace(model, loss_fn, data, method=method, num_probes=6, generator=_gen(7))
    assert a.value == b.value and a.stderr == b.stderr
    assert a.seed == 7 and b.seed is None


def test_trace_generator_is_one_stream_labels_then_probes() -> None:
    """The Monte-Carlo Fisher: the operator draws its labels from the generator, then the
    probes continue the same stream, and the generator is left past both."""
    model, loss_fn, data = _problem()
    g = _gen(3)
    res = cl.trace(model, loss_fn, data, matrix="fisher", num_probes=8, generator=g)
    ref_gen = _gen(3)
    op = cl.curvature_operator(model, loss_fn, data, matrix="fisher", generator=ref_gen)
    # the labels are those of seed=3 (the operator's own rule)
    same = cl.curvature_operator(model, loss_fn, data, matrix="fisher", seed=3)
    assert torch.equal(_dense_of(op), _dense_of(same))
    ref = hutchinson(op, 8, generator=ref_gen)
    assert res.value == ref.value and res.stderr == ref.stderr
    assert torch.equal(g.get_state(), ref_gen.get_state())  # advanced past labels and probes


def test_exact_fisher_trace_with_generator_is_seed_s() -> None:
    model, loss_fn, data = _problem()
    a = cl.trace(model, loss_fn, data, matrix="fisher", method="exact", seed=4)
    b = cl.trace(model, loss_fn, data, matrix="fisher", method="exact", generator=_gen(4))
    assert a.value == b.value == cl.fisher_trace(model, loss_fn, data, seed=4).value
    assert a.seed == 4 and b.seed is None


def test_eigenvalues_and_density_take_a_generator() -> None:
    model, loss_fn, data = _problem()
    H = _dense(model, *data)["hessian"]
    top = torch.linalg.eigvalsh(H)[-1].item()
    a = cl.eigenvalues(model, loss_fn, data, tol=1e-8, seed=2)
    b = cl.eigenvalues(model, loss_fn, data, tol=1e-8, generator=_gen(2))
    assert torch.equal(a.values, b.values) and b.converged
    # converged at tol * ||A||: the eigenvalue is within that of the dense one (Bauer-Fike)
    assert abs(b.values[0].item() - top) <= 1e-8 * torch.linalg.matrix_norm(H, 2).item()
    c = cl.spectral_density(model, loss_fn, data, num_steps=8, num_probes=2, seed=5)
    d = cl.spectral_density(model, loss_fn, data, num_steps=8, num_probes=2, generator=_gen(5))
    assert torch.equal(c.nodes, d.nodes) and torch.equal(c.weights, d.weights)
    assert c.seed == 5 and d.seed is None


def test_default_seed_is_zero_bit_for_bit() -> None:
    """seed=None (the new default) is the old default seed=0: the same numbers as the operator
    and the estimator each seeded with 0 (what the old code ran)."""
    model, loss_fn, data = _problem()
    for matrix in ("hessian", "fisher"):
        op = cl.curvature_operator(model, loss_fn, data, matrix=matrix, seed=0)
        old = hutchinson(op, 30, seed=0)
        for res in (
            cl.trace(model, loss_fn, data, matrix=matrix),
            cl.trace(model, loss_fn, data, matrix=matrix, seed=0),
        ):
            assert res.value == old.value and res.stderr == old.stderr and res.seed == 0
        op = cl.curvature_operator(model, loss_fn, data, matrix=matrix, seed=0)
        pp = hutchpp(op, 12, seed=0)
        assert (
            cl.trace(model, loss_fn, data, matrix=matrix, method="hutch++", num_probes=12).value
            == pp.value
        )
        op = cl.curvature_operator(model, loss_fn, data, matrix=matrix, seed=0)
        ev = lanczos_eigenvalues(op, k=1, tol=1e-4, seed=0)
        assert torch.equal(cl.eigenvalues(model, loss_fn, data, matrix=matrix).values, ev.values)
        op = cl.curvature_operator(model, loss_fn, data, matrix=matrix, seed=0)
        sd = slq(op, num_steps=8, seed=0)
        got = cl.spectral_density(model, loss_fn, data, matrix=matrix, num_steps=8)
        assert torch.equal(got.nodes, sd.nodes) and got.seed == 0
    ggn_cv = cl.trace(model, loss_fn, data, method="ggn_cv", num_probes=4)
    assert ggn_cv.seed == 0  # the seed used, not the None passed


@pytest.mark.parametrize(
    "call",
    [
        lambda m, lf, d, **kw: cl.trace(m, lf, d, **kw),
        lambda m, lf, d, **kw: cl.trace(m, lf, d, matrix="fisher", method="exact", **kw),
        lambda m, lf, d, **kw: cl.eigenvalues(m, lf, d, **kw),
        lambda m, lf, d, **kw: cl.spectral_density(m, lf, d, **kw),
    ],
)
def test_seed_and_generator_together_are_refused_before_the_data(call) -> None:
    model, loss_fn, _ = _problem()
    with pytest.raises(ValueError, match="either seed= or generator=, not both"):
        call(model, loss_fn, _Unreadable(), seed=1, generator=_gen(1))
    with pytest.raises(TypeError, match="torch.Generator"):
        call(model, loss_fn, _Unreadable(), generator=np.random.default_rng(0))


def test_a_trace_that_draws_nothing_leaves_the_generator_alone() -> None:
    """method="exact" on the Hessian or the GGN draws nothing: seed= and generator= together
    are accepted there, as by the one-pass quantities of a deterministic kind, and the
    generator is not advanced."""
    model, loss_fn, data = _problem()
    dense = _dense(model, *data)
    g = _gen(9)
    state = g.get_state()
    for matrix in ("hessian", "ggn"):
        res = cl.trace(model, loss_fn, data, matrix=matrix, method="exact", seed=1, generator=g)
        want = dense[matrix].trace().item()
        assert abs(res.value - want) <= RTOL * abs(want) and res.seed is None
    assert torch.equal(g.get_state(), state)


# ---------------------------------------------------- 2. the class CurvatureOperator's aliases
@pytest.mark.parametrize(
    "alias,matrix",
    [(None, "hessian"), ("exact", "ggn"), ("true", "ggn"), ("empirical", "empirical_fisher")],
)
def test_curvature_operator_class_takes_the_aliases(alias, matrix) -> None:
    model, loss_fn, data = _problem()
    dense = _dense(model, *data)
    op = cl.CurvatureOperator(model, loss_fn, data, matrix=alias)
    assert op.matrix == matrix
    torch.testing.assert_close(_dense_of(op), dense[matrix], rtol=RTOL, atol=RTOL)
    # positionally too, and on the subclass itself
    assert cl.CurvatureOperator(model, loss_fn, data, alias).matrix == matrix
    assert type(op)(model, loss_fn, data, matrix=alias).matrix == matrix


def test_curvature_operator_class_errors_list_the_aliases() -> None:
    model, loss_fn, data = _problem()
    with pytest.raises(ValueError, match=r"'hessian'.*aliases.*'exact'.*got 'hesian'"):
        cl.CurvatureOperator(model, loss_fn, data, matrix="hesian")
    with pytest.raises(ValueError, match="GGNOperator is matrix 'ggn', not 'hessian'"):
        cl.operators.GGNOperator(model, loss_fn, data, matrix="hessian")


# ----------------------------------------------------- 3. exact_trace_per_example's aliases
@pytest.mark.parametrize(
    "alias,matrix", [("exact", "ggn"), ("true", "ggn"), ("empirical", "empirical_fisher")]
)
def test_exact_trace_per_example_takes_the_aliases(alias: str, matrix: str) -> None:
    model, loss_fn, data = _problem()
    want = _dense(model, *data)[matrix].trace().item()
    value, _ = exact_trace_per_example(model, loss_fn, data, alias)
    assert abs(value - want) <= RTOL * abs(want)


def test_exact_trace_per_example_mc_is_the_fisher() -> None:
    model, loss_fn, data = _problem()
    a, _ = exact_trace_per_example(model, loss_fn, data, "mc", seed=2)
    b, _ = exact_trace_per_example(model, loss_fn, data, "fisher", seed=2)
    assert a == b
    with pytest.raises(ValueError, match=r"aliases.*'exact'.*not 'hessian'"):
        exact_trace_per_example(model, loss_fn, data, "hessian")


# -------------------------------------------------------------------- 4. kind="true" everywhere
def test_kind_true_is_the_ggn_for_the_quantities() -> None:
    model, loss_fn, data = _problem()
    dense = _dense(model, *data)
    diag = cl.diag_fisher(model, loss_fn, data, kind="true")
    got = torch.cat([diag[n].reshape(-1) for n in dense["names"]])
    torch.testing.assert_close(got, dense["ggn"].diagonal(), rtol=RTOL, atol=RTOL)
    a = cl.kfac(model, loss_fn, data, kind="true")
    b = cl.kfac(model, loss_fn, data, kind="exact")
    assert all(torch.equal(a[k].G, b[k].G) and torch.equal(a[k].A, b[k].A) for k in b)
    na = cl.fisher_norms(model, loss_fn, data, kind="true")
    nb = cl.fisher_norms(model, loss_fn, data, kind="exact")
    assert na.frobenius == nb.frobenius


def test_kind_true_for_the_samplers() -> None:
    assert cl.noise.DiagFisherNoise("true", scale=1.0).kind == "exact"
    assert cl.noise.FisherTraceNoise("true", scale=1.0).kind == "exact"
    assert cl.noise.FullFisherNoise("true", scale=1.0).kind == "true"
    with pytest.raises(ValueError, match=r"'ggn', 'fisher', 'empirical_fisher', 'true'"):
        cl.noise.DiagFisherNoise("truth", scale=1.0)
    with pytest.raises(ValueError, match=r"\(or \('ggn', 'fisher', 'empirical_fisher', 'true'\)\)"):
        cl.diag_fisher(*_problem(), kind="truth")


# --------------------------------------------------------- 5. Report.save into an empty folder
def _report() -> Report:
    entry = {
        "label": "ck",
        "values": {"trace_hessian": 12.0, "trace_hessian_stderr": 0.5},
        "per_layer": {},
        "arrays": {},
        "errors": {},
        "seconds": 0.1,
    }
    return Report(entries=[entry])


def test_report_save_writes_into_an_existing_empty_folder(tmp_path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert _report().save(out) == out
    assert json.loads((out / "report.json").read_text())["entries"][0]["label"] == "ck"
    assert not any(p.name.startswith(".curvlab-report-") for p in out.iterdir())


def test_report_save_still_refuses_a_folder_with_files(tmp_path) -> None:
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _report().save(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_cli_analyze_writes_into_an_existing_empty_out(tmp_path, capsys) -> None:
    """`curvlab analyze --out <empty folder>` is not told to pass --overwrite (as Report.save);
    a folder with a file in it still is."""
    from curvlab import cli

    def run(out) -> str:
        args = [
            "analyze",
            "--model",
            "torch.nn:Identity",
            "--out",
            str(out),
            "--quantities",
            "loss",
        ]
        try:
            cli.main(args)
        except SystemExit:
            pass
        except Exception as exc:  # noqa: BLE001  (fails later: no data given)
            return str(exc) + capsys.readouterr().err
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "already exists" not in run(empty)
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("mine")
    assert "already exists" in run(full)
