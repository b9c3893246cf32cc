"""``params=`` of the one-pass quantities: the selected block of each quantity, against brute force.

A selection (parameter names, module prefixes or a predicate ``(name, param) -> bool``, as for
``curvature_operator``) asks for one diagonal block ``S`` of a matrix. The diagonal of that block
is the block of the diagonal, so ``diag_fisher`` / ``diag_hessian`` equal the dense float64
references restricted to ``S``; ``gradient_stats``' totals are those of ``S`` alone
(``Tr Cov_S / ||mean_S||^2``); ``kfac`` gives the factors of the selected layers only, equal to the
whole-model call's (each layer's factors depend on the model, not on the selection).
"""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from tests.bruteforce import Dense, assert_close, assert_dicts_close, assert_float_close
from tests.zoo import make_case

# (case, selection): a prefix, a predicate, a list of names; tied and shared weights included
CASES = [
    ("tiny_gpt-mean-three", "blocks.0"),
    ("tiny_gpt-sum-one", lambda name, p: name.startswith(("tok.", "ln_f."))),
    ("resblock-mean-three", ["conv1.weight", "bn1"]),
    ("shared_linear-mean-three", "a"),
    ("hf_gpt2-mean-one", "transformer.h.0.attn"),
]


def _selected(model: torch.nn.Module, sel) -> list[str]:  # noqa: ANN001
    """The names a selection means, spelled out independently of curvlab."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if callable(sel):
        return [n for n, p in model.named_parameters() if p.requires_grad and sel(n, p)]
    entries = [sel] if isinstance(sel, str) else sel
    return [n for n in names if any(n == e or n.startswith(e + ".") for e in entries)]


def _restrict(d: dict, keys: list[str]) -> dict:
    return {k: d[k] for k in keys}


@pytest.mark.parametrize(("name", "sel"), CASES, ids=[c for c, _ in CASES])
def test_diagonals_of_a_selection_equal_the_dense_block(name: str, sel) -> None:  # noqa: ANN001
    case = make_case(name)
    dense = Dense(case)
    keys = _selected(case.model, sel)
    assert keys and len(keys) < len(dict(case.model.named_parameters()))  # a real sub-block
    emp = cl.diag_fisher(case.model, case.loss_fn, case.data, "empirical", params=sel)
    assert list(emp) == keys
    assert_dicts_close(emp, _restrict(dense.diag("empirical_fisher"), keys))
    ggn = cl.diag_fisher(case.model, case.loss_fn, case.data, "exact", params=sel)
    assert_dicts_close(ggn, _restrict(dense.diag("ggn"), keys))
    hess = cl.diag_hessian(case.model, case.loss_fn, case.data, params=sel)
    assert list(hess) == keys and hess.backend == "columns"
    assert_dicts_close(hess, _restrict(dense.diag("hessian"), keys))


@pytest.mark.parametrize(("name", "sel"), CASES, ids=[c for c, _ in CASES])
def test_gradient_stats_of_a_selection_are_those_of_the_block(name: str, sel) -> None:  # noqa: ANN001
    case = make_case(name)
    dense = Dense(case)
    keys = _selected(case.model, sel)
    stats = cl.gradient_stats(case.model, case.loss_fn, case.data, params=sel)
    assert list(stats.mean) == keys and list(stats.variance) == keys
    mean = _restrict(dense.split(dense.grad_mean), keys)
    var = _restrict(dense.split(dense.grad_variance), keys)
    assert_dicts_close(stats.mean, mean)
    assert_dicts_close(stats.variance, var)
    tr = float(sum(v.sum() for v in var.values()))
    g2 = float(sum(m.square().sum() for m in mean.values()))
    assert_float_close(stats.trace_covariance, tr)
    assert_float_close(stats.noise_scale, tr / g2)
    owners = {k.rsplit(".", 1)[0] if "." in k else "" for k in keys}
    assert set(stats.layers) <= owners


@pytest.mark.parametrize(
    ("name", "sel", "layers"),
    [
        (
            "tiny_gpt-mean-three",
            "blocks.0",
            ["blocks.0.qkv", "blocks.0.proj", "blocks.0.fc", "blocks.0.out"],
        ),
        ("tiny_gpt-mean-three", lambda n, p: n == "tok.weight", ["head"]),  # tied head
        ("shared_linear-mean-three", "a.weight", ["a"]),  # a and b share it: one block, "a"
        ("resblock-sum-one", ["conv2.weight"], ["conv2"]),
    ],
)
def test_kfac_of_a_selection_is_the_selected_layers_of_the_full_call(
    name: str,
    sel,  # noqa: ANN001
    layers: list[str],
) -> None:
    case = make_case(name)
    full = cl.kfac(case.model, case.loss_fn, case.data, kind="exact")
    part = cl.kfac(case.model, case.loss_fn, case.data, kind="exact", params=sel)
    assert sorted(part) == sorted(layers)
    for layer in layers:
        assert_close(part[layer].A, full[layer].A)
        assert_close(part[layer].G, full[layer].G)


def test_a_selection_that_matches_nothing_is_an_error_before_any_work() -> None:
    case = make_case("tiny_gpt-mean-one")

    class Boom:  # data that fails when read: the error must come first
        def __iter__(self):  # noqa: ANN204
            raise AssertionError("data was read before params= was checked")

    for fn in (
        lambda **kw: cl.diag_fisher(case.model, case.loss_fn, Boom(), **kw),
        lambda **kw: cl.diag_hessian(case.model, case.loss_fn, Boom(), **kw),
        lambda **kw: cl.gradient_stats(case.model, case.loss_fn, Boom(), **kw),
        lambda **kw: cl.kfac(case.model, case.loss_fn, Boom(), **kw),
    ):
        with pytest.raises(ValueError, match="'blocks.7' matches no trainable parameter"):
            fn(params="blocks.7")
    with pytest.raises(ValueError, match="selects no Linear/Conv1d/Conv2d weight"):
        cl.kfac(case.model, case.loss_fn, Boom(), params="ln_f")
