"""Every call leaves the model untouched; every bad input gets a clear, early error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import curvlab as cl
from tests import reference as R
from tests.problems import Problem, ResBlock, make_problem

CALLS: dict[str, Callable] = {
    "diag_fisher-empirical": lambda m, l, d: cl.diag_fisher(m, l, d, kind="empirical"),
    "diag_fisher-empirical-backpack": lambda m, l, d: cl.diag_fisher(m, l, d, backend="backpack"),
    "diag_fisher-mc-backpack": lambda m, l, d: cl.diag_fisher(
        m, l, d, kind="mc", backend="backpack"
    ),
    "gradient_stats-backpack": lambda m, l, d: cl.gradient_stats(m, l, d, backend="backpack"),
    "diag_fisher-mc": lambda m, l, d: cl.diag_fisher(m, l, d, kind="mc", seed=1),
    "diag_fisher-exact": lambda m, l, d: cl.diag_fisher(m, l, d, kind="exact"),
    "diag_hessian": lambda m, l, d: cl.diag_hessian(m, l, d),
    "kfac-mc": lambda m, l, d: cl.kfac(m, l, d, kind="mc"),
    "kfac-exact": lambda m, l, d: cl.kfac(m, l, d, kind="exact"),
    "kfac-empirical": lambda m, l, d: cl.kfac(m, l, d, kind="empirical"),
    "gradient_stats": lambda m, l, d: cl.gradient_stats(m, l, d),
    "fisher_norms-empirical": lambda m, l, d: cl.fisher_norms(m, l, d, kind="empirical"),
    "fisher_norms-exact": lambda m, l, d: cl.fisher_norms(m, l, d, kind="exact"),
    "fisher_norms-mc": lambda m, l, d: cl.fisher_norms(m, l, d, kind="mc"),
}


def _busy_model() -> nn.Module:
    """Dropout in train mode, in-place ReLU, a user hook and existing .grad fields."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(48, 3),
    ).double()
    model.train()
    model[4].register_forward_hook(lambda m, i, o: None)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].bias.grad = None
    return model


@pytest.mark.parametrize("name", ["mlp-ce-mean-three", "res-mse-sum-one"])
def test_a_model_the_user_extended_with_backpack_keeps_its_extension(name: str) -> None:
    from backpack import backpack, extend, extensions

    p = make_problem(name)
    expected = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="exact")
    extend(p.model, use_converter=name.startswith("res"))
    before = R.snapshot(p.model)
    again = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="exact")
    R.assert_dicts_close(again, expected, rtol=1e-12)
    R.assert_untouched(p.model, before)
    assert all(m.__dict__.get("_backpack_extend") for m in p.model.modules() if not m._modules)
    if name.startswith("mlp"):  # the user's own BackPACK calls still work
        X, y = p.batches[0]
        with backpack(extensions.SumGradSquared()):
            extend(p.loss_fn)(p.model(X), y).backward()
        assert all(hasattr(q, "sum_grad_squared") for q in p.model.parameters())


@pytest.mark.parametrize("call", CALLS)
def test_calls_work_inside_no_grad(call: str) -> None:
    # curvature needs autograd: the calls enable it for themselves and restore the caller's mode
    p = make_problem("cnn-ce-mean-three")
    expected = CALLS[call](p.model, p.loss_fn, p.data)
    with torch.no_grad():
        got = CALLS[call](p.model, p.loss_fn, p.data)
        assert not torch.is_grad_enabled()
    _assert_same(got, expected)


def _assert_same(got: object, expected: object) -> None:
    """Equal results: tensors to 1e-12, recursing into dicts, lists and dataclasses."""
    import dataclasses

    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for k in expected:
            _assert_same(got[k], expected[k])
    elif dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            _assert_same(getattr(got, f.name), getattr(expected, f.name))
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-12)
    else:
        assert got == expected


@pytest.mark.parametrize("call", CALLS)
def test_calls_leave_no_trace(call: str) -> None:
    model = _busy_model()
    X = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    before = R.snapshot(model)
    CALLS[call](model, nn.CrossEntropyLoss(), (X, y))
    R.assert_untouched(model, before)


@pytest.mark.parametrize("call", CALLS)
def test_calls_leave_no_trace_on_converted_residual_model(call: str) -> None:
    p = make_problem("res-mse-mean-three")
    before = R.snapshot(p.model)
    CALLS[call](p.model, p.loss_fn, p.data)
    R.assert_untouched(p.model, before)


def test_dropout_train_mode_results_are_random_but_rng_untouched() -> None:
    model = _busy_model()
    X = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    state = torch.get_rng_state()
    a = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y))
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.isfinite(v).all() for v in a.values())


class Counter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self)

    def __call__(self, *args: object) -> None:
        self.calls += 1


def _errors_early(fn: Callable, model: nn.Module, exc: type, match: str) -> None:
    counter = Counter(model)
    with pytest.raises(exc, match=match):
        fn()
    assert counter.calls == 0, "the error came after a forward pass"


FORCED = {
    "diag_fisher-empirical-hooks": lambda m, l, d: cl.diag_fisher(m, l, d, backend="hooks"),
    "diag_fisher-empirical-backpack": CALLS["diag_fisher-empirical-backpack"],
    "diag_fisher-mc-backpack": CALLS["diag_fisher-mc-backpack"],
    "diag_fisher-exact-backpack": lambda m, l, d: cl.diag_fisher(
        m, l, d, kind="exact", backend="backpack"
    ),
    "gradient_stats-backpack": CALLS["gradient_stats-backpack"],
    "diag_hessian-backpack": lambda m, l, d: cl.diag_hessian(m, l, d, backend="backpack"),
    "fisher_norms-backpack": lambda m, l, d: cl.fisher_norms(m, l, d, backend="backpack"),
}


@pytest.mark.parametrize("call", FORCED)
def test_forced_backend_names_the_module_it_cannot_do(call: str) -> None:
    """A backend forced with backend= on a model it cannot do: a clear error, before any work."""
    if "backpack" in call:  # BackPACK has no LayerNorm
        model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.LayerNorm(5)), nn.Linear(5, 3))
        match = r"'1\.0'.*LayerNorm"
    else:  # the hooks have no rule for PReLU's weight
        model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3))
        match = r"backend='hooks' cannot.*Linear"
    data = (torch.randn(3, 4), torch.tensor([0, 1, 2]))
    _errors_early(
        lambda: FORCED[call](model, nn.CrossEntropyLoss(), data),
        model,
        ValueError,
        match,
    )


@pytest.mark.parametrize("call", CALLS)
def test_modules_outside_backpack_work_under_auto(call: str) -> None:
    """What BackPACK refuses (here LayerNorm) is computed by another backend under "auto"."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.LayerNorm(5)), nn.Linear(5, 3))
    data = (torch.randn(3, 4), torch.tensor([0, 1, 2]))
    if "backpack" in call:
        with pytest.raises(ValueError, match=r"'1\.0'.*LayerNorm"):
            CALLS[call](model, nn.CrossEntropyLoss(), data)
        return
    result = CALLS[call](model, nn.CrossEntropyLoss(), data)
    assert result is not None


@pytest.mark.parametrize("call", CALLS)
def test_batchnorm_in_train_mode(call: str) -> None:
    p = make_problem("cnnbn-ce-mean-three")
    p.model.train()
    _errors_early(
        lambda: CALLS[call](p.model, p.loss_fn, p.data), p.model, ValueError, r"model\.eval\(\)"
    )


@pytest.mark.parametrize("call", CALLS)
def test_reduction_none(call: str) -> None:
    p = make_problem("mlp-mse-mean-one")
    _errors_early(
        lambda: CALLS[call](p.model, nn.MSELoss(reduction="none"), p.data),
        p.model,
        ValueError,
        'reduction="none"',
    )


@pytest.mark.parametrize("call", CALLS)
def test_unsupported_loss(call: str) -> None:
    p = make_problem("mlp-mse-mean-one")
    _errors_early(
        lambda: CALLS[call](p.model, nn.L1Loss(), p.data),
        p.model,
        TypeError,
        "unsupported loss L1Loss",
    )


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("data", [[], iter(())])
def test_empty_data(call: str, data: object) -> None:
    p = make_problem("mlp-ce-mean-one")
    with pytest.raises(ValueError, match="data is empty"):
        CALLS[call](p.model, p.loss_fn, data)


def test_batch_with_no_examples_and_mismatched_targets() -> None:
    p = make_problem("mlp-ce-mean-one")
    with pytest.raises(ValueError, match="no examples"):
        cl.diag_fisher(p.model, p.loss_fn, (p.X[:0], p.y[:0]))
    with pytest.raises(ValueError, match="leading dimensions must match"):
        cl.diag_fisher(p.model, p.loss_fn, (p.X, p.y[:2]))
    with pytest.raises(TypeError, match="inputs, targets"):
        cl.diag_fisher(p.model, p.loss_fn, [p.X])


@pytest.mark.parametrize(
    "call", ["diag_fisher-empirical", "diag_fisher-exact", "diag_hessian", "gradient_stats"]
)
def test_non_finite_result_names_parameter(call: str) -> None:
    p = make_problem("mlp-ce-mean-one")
    with torch.no_grad():
        p.model[2].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="'2.weight'|'2.bias'|'0."):
        CALLS[call](p.model, p.loss_fn, p.data)


def test_bad_options() -> None:
    p = make_problem("mlp-ce-mean-one")
    args = (p.model, p.loss_fn, p.data)
    with pytest.raises(ValueError, match="kind must be one of"):
        cl.diag_fisher(*args, kind="truth")
    with pytest.raises(ValueError, match="mc_samples must be an int >= 1, got 0"):
        cl.diag_fisher(*args, kind="mc", mc_samples=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        cl.diag_fisher(*args, chunk_size=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        cl.fisher_norms(*args, kind="full")
    with pytest.raises(ValueError, match="either seed= or generator="):
        cl.diag_fisher(*args, kind="mc", seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="unknown backend"):
        cl.diag_fisher(*args, backend="jax")


def test_multi_logit_bce_second_order_is_exact() -> None:
    """BackPACK handles one BCE logit per example; the engine hands over and stays exact."""
    model = nn.Linear(4, 3).double()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (5, 3)).double()
    p = Problem("bce3", model, nn.BCEWithLogitsLoss(), (X, y), X, y)
    result = cl.diag_fisher(model, p.loss_fn, p.data, kind="exact")
    assert result.backend == "func"
    R.assert_dicts_close(result, R.as_dict(model, R.dense_ggn(p)))
    with pytest.raises(ValueError, match="one BCE logit"):
        cl.diag_fisher(model, p.loss_fn, p.data, kind="exact", backend="backpack")


def test_module_with_direct_parameters_is_exact() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(1))
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.alpha * self.lin(x)

    model = Scale().double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    p = Problem("scale", model, nn.CrossEntropyLoss(), (X, y), X, y)
    R.assert_dicts_close(
        cl.diag_fisher(model, p.loss_fn, p.data, kind="exact"), R.as_dict(model, R.dense_ggn(p))
    )
    R.assert_dicts_close(
        cl.diag_fisher(model, p.loss_fn, p.data), R.as_dict(model, R.dense_empirical_fisher(p))
    )
    with pytest.raises(ValueError, match=r"owns parameters \['alpha'\]"):
        cl.diag_fisher(model, p.loss_fn, p.data, backend="backpack")


def test_frozen_parameters_are_excluded() -> None:
    model = ResBlock().double()
    model.lin1.requires_grad_(False)
    data = (torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    result = cl.diag_fisher(model, nn.CrossEntropyLoss(), data, kind="exact")
    assert "lin1.weight" not in result and "head.weight" in result
