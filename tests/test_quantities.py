"""One-pass quantities against brute-force references on the shared tiny problems."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from tests import reference as R
from tests.problems import EXTRA_PROBLEMS, PROBLEMS, SMALL_PROBLEMS, Problem, make_problem

ALL = PROBLEMS + EXTRA_PROBLEMS


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("backend", ["auto", "backpack"])
def test_diag_fisher_empirical(name: str, backend: str) -> None:
    p = make_problem(name)
    result = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="empirical", backend=backend)
    R.assert_dicts_close(result, R.as_dict(p.model, R.dense_empirical_fisher(p)))
    # "auto" takes curvlab's own hooks: every parameter is in a Linear/Conv/eval-BatchNorm layer
    expected = "hooks" if backend == "auto" else "backpack"
    assert result.backend == expected


@pytest.mark.parametrize("name", ALL)
def test_diag_fisher_exact_is_ggn_diagonal(name: str) -> None:
    p = make_problem(name)
    result = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="exact")
    R.assert_dicts_close(result, R.as_dict(p.model, R.dense_ggn(p)))


@pytest.mark.parametrize("name", ALL)
def test_diag_hessian(name: str) -> None:
    p = make_problem(name)
    result = cl.diag_hessian(p.model, p.loss_fn, p.data)
    R.assert_dicts_close(result, R.as_dict(p.model, R.dense_hessian(p)))
    # BackPACK where it applies; exact Hessian columns for residual blocks and BatchNorm
    expected = "columns" if name.startswith(("res", "cnnbn")) else "backpack"
    assert result.backend == expected


@pytest.mark.parametrize("name", ["mlp-ce-mean-three", "cnn-mse-sum-one"])
def test_diag_hessian_columns_equal_backpack(name: str) -> None:
    p = make_problem(name)
    a = cl.diag_hessian(p.model, p.loss_fn, p.data, backend="columns", block_size=7)
    b = cl.diag_hessian(p.model, p.loss_fn, p.data, backend="backpack")
    R.assert_dicts_close(a, b, rtol=1e-9)


def test_diag_hessian_backpack_on_residual_is_a_clear_error() -> None:
    p = make_problem("res-ce-mean-one")
    with pytest.raises(ValueError, match="residual"):
        cl.diag_hessian(p.model, p.loss_fn, p.data, backend="backpack")


@pytest.mark.parametrize("name", SMALL_PROBLEMS)
def test_diag_fisher_mc_deterministic_given_seed(name: str) -> None:
    p = make_problem(name)
    a = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="mc", seed=3)
    b = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="mc", seed=3)
    c = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="mc", seed=4)
    R.assert_dicts_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_diag_fisher_mc_backends_agree_given_labels() -> None:
    """Both backends draw the same labels from the same seed, so they agree to rounding."""
    for name in SMALL_PROBLEMS:
        p = make_problem(name)
        a = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="mc", seed=5, backend="hooks")
        b = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="mc", seed=5, backend="backpack")
        R.assert_dicts_close(a, b, rtol=1e-10)


def test_hooks_backend_rejects_what_it_cannot_do() -> None:
    p = make_problem("cnnbn-ce-mean-three")
    model = nn.Sequential(nn.Linear(2, 3), nn.PReLU(), nn.Linear(3, 2))  # PReLU: no hooks rule
    data = (torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="backend='hooks' cannot compute this model exactly"):
        cl.diag_fisher(model, nn.CrossEntropyLoss(), data, backend="hooks")
    with pytest.raises(ValueError, match="first-order quantities only"):
        cl.diag_fisher(p.model, p.loss_fn, p.data, kind="exact", backend="hooks")


@pytest.mark.parametrize("name", SMALL_PROBLEMS)
def test_diag_fisher_mc_is_unbiased(name: str) -> None:
    """Mean of independent MC estimates is within 5 standard errors of the GGN diagonal."""
    p = make_problem(name)
    reps = [
        torch.cat(
            [
                v.reshape(-1)
                for v in cl.diag_fisher(
                    p.model, p.loss_fn, p.data, kind="mc", mc_samples=4, seed=s
                ).values()
            ]
        )
        for s in range(30)
    ]
    reps = torch.stack(reps)
    mean, se = reps.mean(0), reps.std(0) / len(reps) ** 0.5
    target = torch.diagonal(R.dense_ggn(p))
    z = (mean - target).abs() / (se + 1e-12)
    assert (z < 5).all(), f"max z-score {z.max():.2f}"
    # and the estimator is not trivially equal to the target (the test can fail)
    assert reps.std(0).max() > 0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("backend", ["auto", "backpack"])
def test_gradient_stats(name: str, backend: str) -> None:
    p = make_problem(name)
    stats = cl.gradient_stats(p.model, p.loss_fn, p.data, backend=backend)
    G = R.per_example_grads(p)
    mean, var, second = G.mean(0), G.var(0, unbiased=False), (G**2).mean(0)
    R.assert_dicts_close(stats.mean, R.split_diag(p.model, mean))
    R.assert_dicts_close(stats.second_moment, R.split_diag(p.model, second))
    R.assert_dicts_close(stats.variance, R.split_diag(p.model, var), atol=1e-9)
    assert stats.trace_covariance == pytest.approx(float(var.sum()), rel=1e-6)
    assert stats.noise_scale == pytest.approx(float(var.sum() / mean.pow(2).sum()), rel=1e-6)
    assert stats.num_examples == p.X.shape[0]
    # per-layer summaries add up to the totals
    assert sum(s.trace_covariance for s in stats.layers.values()) == pytest.approx(
        stats.trace_covariance, rel=1e-9
    )
    for module_name, layer in stats.layers.items():
        assert module_name in dict(p.model.named_modules())
        assert layer.snr == pytest.approx(layer.grad_norm**2 / layer.trace_covariance, rel=1e-9)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_fisher_norms(name: str, kind: str) -> None:
    p = make_problem(name)
    dense = R.dense_empirical_fisher(p) if kind == "empirical" else R.dense_ggn(p)
    # chunk_size=2 forces several chunks and the blockwise Gram identity
    norms = cl.fisher_norms(p.model, p.loss_fn, p.data, kind=kind, chunk_size=2)
    assert norms.frobenius == pytest.approx(float(dense.norm()), rel=1e-6)
    assert norms.diag_frobenius == pytest.approx(float(dense.diagonal().norm()), rel=1e-6)
    assert norms.ratio <= 1 + 1e-12


@pytest.mark.parametrize("name", ["mlp-ce-mean-three", "cnn-bce-sum-one", "conv1d-mse-sum-one"])
@pytest.mark.parametrize("kind", ["empirical", "mc"])
def test_fisher_norms_hooks_equal_backpack(name: str, kind: str) -> None:
    # the hooks keep Linear rows as factors (a_n, g_n) and convolution rows dense; with the same
    # label draws (made before either backend runs) both give the same norms
    p = make_problem(name)
    kw = dict(kind=kind, mc_samples=2, seed=4, chunk_size=3)
    hooks = cl.fisher_norms(p.model, p.loss_fn, p.data, backend="hooks", **kw)
    bp = cl.fisher_norms(p.model, p.loss_fn, p.data, backend="backpack", **kw)
    assert (hooks.backend, bp.backend) == ("hooks", "backpack")
    assert hooks.frobenius == pytest.approx(bp.frobenius, rel=1e-10)
    assert hooks.diag_frobenius == pytest.approx(bp.diag_frobenius, rel=1e-10)
    assert cl.fisher_norms(p.model, p.loss_fn, p.data, **kw).backend == "hooks"  # the default


def test_fisher_norms_mc_is_reproducible_and_converges() -> None:
    p = make_problem("mlp-ce-mean-one")
    a = cl.fisher_norms(p.model, p.loss_fn, p.data, kind="mc", seed=1, mc_samples=3)
    b = cl.fisher_norms(p.model, p.loss_fn, p.data, kind="mc", seed=1, mc_samples=3)
    assert a == b
    ggn = R.dense_ggn(p)
    est = cl.fisher_norms(p.model, p.loss_fn, p.data, kind="mc", seed=0, mc_samples=100)
    # many draws: the MC Fisher approaches the GGN, so its norm does too
    assert est.frobenius == pytest.approx(float(ggn.norm()), rel=0.1)
    assert est.diag_frobenius == pytest.approx(float(ggn.diagonal().norm()), rel=0.1)


@pytest.mark.parametrize("name", ["cnn-ce-mean-three", "conv1d-mse-sum-one"])
def test_hooks_in_blocks_of_examples_are_exact(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # on a CPU the hooks unfold convolution inputs a few examples at a time; one byte per block
    # forces one example per block
    from curvlab.backends import _layers as layers

    p = make_problem(name)
    whole = cl.gradient_stats(p.model, p.loss_fn, p.data)
    monkeypatch.setitem(layers._BLOCK_BYTES, "cpu", 1)
    assert len(layers._example_blocks(p.model[0], p.X, p.model[0](p.X))) == p.X.shape[0]
    blocks = cl.gradient_stats(p.model, p.loss_fn, p.data)
    fisher = cl.diag_fisher(p.model, p.loss_fn, p.data)
    R.assert_dicts_close(fisher, R.as_dict(p.model, R.dense_empirical_fisher(p)))
    R.assert_dicts_close(blocks.second_moment, whole.second_moment, rtol=1e-12)
    R.assert_dicts_close(blocks.mean, whole.mean, rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp-ce-mean-one", "cnn-mse-sum-three"])
def test_chunking_is_exact(name: str) -> None:
    p = make_problem(name)
    whole = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="exact", chunk_size=None)
    pieces = cl.diag_fisher(p.model, p.loss_fn, p.data, kind="exact", chunk_size=1)
    R.assert_dicts_close(pieces, whole, rtol=1e-10)


def test_float32_agrees_with_float64() -> None:
    p64 = make_problem("cnn-ce-mean-three")
    p32 = make_problem("cnn-ce-mean-three", dtype=torch.float32)
    a = cl.diag_fisher(p32.model, p32.loss_fn, p32.data, kind="exact")
    b = cl.diag_fisher(p64.model, p64.loss_fn, p64.data, kind="exact")
    for k in a:
        assert a[k].dtype == torch.float32
        torch.testing.assert_close(a[k].double(), b[k], rtol=1e-4, atol=1e-6)


def test_data_loader_is_accepted() -> None:
    p = make_problem("mlp-ce-mean-three")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(p.X, p.y), batch_size=4, shuffle=False
    )
    R.assert_dicts_close(
        cl.diag_fisher(p.model, p.loss_fn, loader), cl.diag_fisher(p.model, p.loss_fn, p.data)
    )


class _InPlace(nn.Module):
    """Changes a layer's output in place (``modify="output"``) or a layer's input after use."""

    def __init__(self, modify: str) -> None:
        super().__init__()
        self.modify = modify
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.modify == "output":
            h += 1.5 * x
            h.mul_(2.0)
            return self.b(torch.tanh(h))
        out = self.b(h)
        h.mul_(2.0)  # b's input, after b used it
        return out


def _inplace_problem(modify: str) -> Problem:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = _InPlace(modify).double()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    return Problem("inplace", model, nn.CrossEntropyLoss(), (X, y), X, y)


def test_hooks_see_the_layer_output_before_an_in_place_change() -> None:
    p = _inplace_problem("output")
    dense = R.dense_empirical_fisher(p)
    fisher = cl.diag_fisher(p.model, p.loss_fn, p.data, backend="hooks")
    R.assert_dicts_close(fisher, R.as_dict(p.model, dense))
    norms = cl.fisher_norms(p.model, p.loss_fn, p.data, backend="hooks")
    assert norms.frobenius == pytest.approx(float(dense.norm()), rel=1e-9)
    stats = cl.gradient_stats(p.model, p.loss_fn, p.data, backend="hooks")
    R.assert_dicts_close(stats.second_moment, fisher, rtol=1e-12)


def test_hooks_reject_a_layer_input_changed_in_place_after_use() -> None:
    p = _inplace_problem("input")
    with pytest.raises(ValueError, match="input of module 'b' was modified in place"):
        cl.diag_fisher(p.model, p.loss_fn, p.data, backend="hooks")
    # under "auto" the hooks hand over; the model is not differentiable for autograd either
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        cl.diag_fisher(p.model, p.loss_fn, p.data)


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Conv2d(3, 4, 3), (5, 3, 8, 8)),
        (nn.Linear(6, 7), (5, 9, 6)),
        (nn.Conv1d(2, 3, 2), (5, 2, 7)),
    ],
)
def test_example_blocks_follow_the_budget(module: nn.Module, shape: tuple, monkeypatch) -> None:
    # a block holds as many examples as their unfolded inputs (in' x positions) fit the budget
    from curvlab.backends import _layers as layers

    a = torch.randn(shape, dtype=torch.float64)
    g = module.double()(a)
    per_example = module.weight[0].numel() * (g[0].numel() // module.weight.shape[0]) * 8
    for k in (1, 2, 3, 5):
        monkeypatch.setitem(layers._BLOCK_BYTES, "cpu", k * per_example)
        blocks = layers._example_blocks(module, a, g)
        assert blocks == [(lo, min(lo + k, shape[0])) for lo in range(0, shape[0], k)]
