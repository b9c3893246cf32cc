"""Inputs that gave a number or nothing where they should have given an error (review s15).

* ``Diagnostics(..., optimizer=X)`` with ``X`` no optimizer (an LR scheduler, a string, a list of
  parameters) was accepted, and every record lacked ``sharpness_threshold`` without a word.
* ``FullFisherNoise`` gave noise 0 (``"true"``) where every label is ignored under ``"mean"``
  (the other samplers raise), and NaN (``"empirical"``) folded into a step.
* ``gradient_stats`` and the ``noise_scale`` measurement reported ``noise_scale = inf`` under
  ``"sum"`` where every label is ignored: their ``g_n = grad NLL_n / c`` has ``c = 0`` there.

Numbers are compared with dense float64 brute force (``torch.func`` per-example gradients).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab.analysis import Diagnostics, DiagnosticsConfig, MeasurementFailedWarning

DT = torch.float64
V, D, H, T = 5, 3, 4, 4
ALL_IGNORED = "every target of the data is ignore_index=0"


class _Seq(nn.Module):
    """Embedding -> causal cumulative mean -> Linear -> tanh -> Linear head: (N, T) -> (N, T, V)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.lin = nn.Linear(D, H)
        self.head = nn.Linear(H, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        steps = torch.arange(1, x.shape[1] + 1, dtype=e.dtype).view(1, -1, 1)
        return self.head(torch.tanh(self.lin(torch.cumsum(e, 1) / steps)))


def _seq(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Seq().to(DT)


def _tokens(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (n, T), generator=g)
    Y = torch.randint(1, V, (n, T), generator=g)  # 0 is the pad (ignored) label
    Y[torch.rand(n, T, generator=g) < 0.35] = 0
    return X, Y


def _lm_loss(reduction: str) -> nn.Module:
    return nn.CrossEntropyLoss(ignore_index=0, reduction=reduction)


class _LM(nn.Module):
    """The model with its output moved to ``(N, V, T)``, torch's layout for ``(N, T)`` labels."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).transpose(1, 2)


# ---------------------------------------------------------------------- 1. optimizer=
def _linear_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(8, 4, dtype=DT, generator=g), torch.randint(0, 3, (8,), generator=g)


_NOT_OPTIMIZERS = {
    "StepLR": (
        lambda opt, m: torch.optim.lr_scheduler.StepLR(opt, 1),
        r"got StepLR, a learning-rate scheduler.*optimizer=scheduler\.optimizer",
    ),
    "ReduceLROnPlateau": (
        lambda opt, m: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
        r"got ReduceLROnPlateau, a learning-rate scheduler",
    ),
    "str": (lambda opt, m: "sgd", r"got str 'sgd': pass the optimizer object itself"),
    "list": (lambda opt, m: list(m.parameters()), r"got list \(its parameters\?\)"),
    "generator": (lambda opt, m: m.parameters(), r"got generator \(its parameters\?\)"),
}


@pytest.mark.parametrize("quantities", [["sharpness"], ["loss"]])
@pytest.mark.parametrize("kind", sorted(_NOT_OPTIMIZERS))
def test_an_object_that_is_no_optimizer_is_refused_when_diagnostics_is_built(kind, quantities):
    torch.set_num_threads(1)
    model, _, _ = _linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make, message = _NOT_OPTIMIZERS[kind]
    with pytest.raises(TypeError, match="optimizer= must be the training loop's optimizer"):
        Diagnostics(model, nn.CrossEntropyLoss(), quantities, every=1, optimizer=make(opt, model))
    with pytest.raises(TypeError, match=message):  # through the config too
        Diagnostics(
            model,
            nn.CrossEntropyLoss(),
            quantities,
            config=DiagnosticsConfig(optimizer=make(opt, model)),
        )


def test_an_unknown_object_holding_an_optimizer_names_its_attribute():
    torch.set_num_threads(1)
    model, _, _ = _linear_problem()

    class Holder:  # neither an optimizer nor a known wrapper
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    holder = Holder(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(
        TypeError, match=r"holds a SGD as \.optimizer.*optimizer=<Holder>\.optimizer"
    ):
        Diagnostics(model, nn.CrossEntropyLoss(), ["sharpness"], every=1, optimizer=holder)


def test_optimizers_and_known_wrappers_are_still_accepted():
    """Any ``torch.optim.Optimizer``, curvlab's ``NoisyOptimizer`` and Accelerate's wrapper (by
    module and name), and an object with an optimizer's ``param_groups`` (DeepSpeed's)."""
    torch.set_num_threads(1)
    model, X, y = _linear_problem()
    loss_fn = nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)

    class Custom(torch.optim.Optimizer):  # a subclass: no threshold, but no error
        def __init__(self, params) -> None:  # noqa: ANN001
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):  # noqa: ANN001, ANN202
            return None

    accelerated = type(
        "AcceleratedOptimizer",
        (),
        {
            "__module__": "accelerate.optimizer",
            "__init__": lambda self, o: setattr(self, "optimizer", o),
        },
    )

    class DuckTyped:  # DeepSpeed's ZeRO optimizers are no torch.optim.Optimizer
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.param_groups = inner.param_groups
            self.state = inner.state

    noisy = cl.noise.NoisyOptimizer(sgd, cl.noise.IsotropicNoise(1e-3), model)
    for opt, threshold in [
        (sgd, 2 / 0.1),  # plain gradient descent: 2 / lr
        (noisy, 2 / 0.1),
        (accelerated(sgd), 2 / 0.1),
        (torch.optim.Adam(model.parameters(), lr=0.1), None),
        (Custom(model.parameters()), None),
        (DuckTyped(sgd), None),
    ]:
        diag = Diagnostics(model, loss_fn, ["sharpness"], every=1, optimizer=opt, on_error="raise")
        values = diag.step(0, X, y)["values"]
        if threshold is None:
            assert "sharpness_threshold" not in values, type(opt).__name__
        else:
            assert values["sharpness_threshold"] == pytest.approx(threshold, rel=1e-12)


def test_hf_callback_refuses_a_scheduler_given_as_optimizer():
    pytest.importorskip("transformers")
    from curvlab.analysis.hf import diagnostics_callback

    torch.set_num_threads(1)
    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(sgd, 1)
    with pytest.raises(TypeError, match="a learning-rate scheduler"):
        diagnostics_callback(quantities=["loss"], optimizer=sched)


# ---------------------------------------------------------------------- 2. FullFisherNoise
def _all_ignored(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    X, _ = _tokens(n)
    return X, torch.zeros(n, T, dtype=torch.long)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_noise_refuses_a_batch_whose_labels_are_all_ignored_under_mean(kind):
    torch.set_num_threads(1)
    model, (X, Y) = _LM(_seq()), _all_ignored()
    sampler = cl.noise.FullFisherNoise(kind, scale=1.0)
    with pytest.raises(ValueError, match=ALL_IGNORED):
        sampler.sample(model, _lm_loss("mean"), X, Y, seed=0)
    # the separate pass of NoisyOptimizer: nothing moves, no step is counted
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noisy = cl.noise.NoisyOptimizer(opt, sampler, model, _lm_loss("mean"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=ALL_IGNORED):
        noisy.step(inputs=X, targets=Y)
    assert noisy.steps_taken == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_noise_folded_into_a_step_of_all_ignored_labels_adds_zero(kind):
    """Folded into the step's backward pass, which never waits for the host (docs/noise.md), the
    count cannot be read to raise: the noise is 0 there, as torch's gradient of its NaN loss.
    The "empirical" fold wrote NaN into every gradient, and SGD made every parameter NaN. The
    brute force is the step without noise: zero gradients, parameters unchanged."""
    from tests.test_host_sync_cpu import _record_syncs

    torch.set_num_threads(1)
    loss_fn = _lm_loss("mean")
    X0, Y0 = _all_ignored()
    X1, Y1 = _tokens(3, seed=2)
    model = _LM(_seq())
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        cl.noise.FullFisherNoise(kind, scale=1.0),
        model,
        loss_fn,
        seed=3,
    )

    def step(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        noisy.zero_grad()
        with noisy.capture():
            loss = loss_fn(model(X), Y)
            loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    step(X1, Y1)  # a counted batch folds finite noise (and the first step may probe the layout)
    noisy.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    before = [p.detach().clone() for p in model.parameters()]
    with _record_syncs() as hits:
        loss = step(X0, Y0)
        grads = [p.grad.clone() for p in model.parameters()]
        noisy.step()
    # no host read in a step, this one included (the CPU label draw's finiteness read has a
    # device-side path on a GPU: tests/test_host_sync_cpu.py leaves it out too)
    hits = [h for h in hits if "(_inverse_cdf_draws)" not in h]
    assert hits == [], hits
    assert torch.isnan(loss)  # torch's own mean of nothing
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_noise_of_all_ignored_labels_under_sum_is_zero(kind):
    """Under "sum" the objective is a sum of nothing: its Fisher is 0, and so is the noise."""
    torch.set_num_threads(1)
    model, (X, Y) = _LM(_seq()), _all_ignored()
    eps = cl.noise.FullFisherNoise(kind, scale=1.0).sample(model, _lm_loss("sum"), X, Y, seed=0)
    assert eps and all(torch.equal(v, torch.zeros_like(v)) for v in eps.values())


# ---------------------------------------------------------------------- 3. noise scale, "sum"
def _brute_stats(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> dict[str, float]:
    """Mean-convention statistics of ``g_n = (N/M) grad NLL_n`` (dense, float64)."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def nll(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x[None],))
        return nn.functional.cross_entropy(out, y[None], ignore_index=0, reduction="sum")

    per = vmap(grad(nll), in_dims=(None, 0, 0))(params, X, Y)
    n, m = X.shape[0], int((Y != 0).sum())
    G = torch.cat([v.reshape(n, -1) for v in per.values()], 1) * (n / m)
    mean = G.mean(0)
    trace = float(((G - mean) ** 2).mean(0).sum())
    return {"trace_covariance": trace, "noise_scale": trace / float(mean @ mean)}


def test_gradient_stats_under_sum_refuses_all_ignored_labels():
    torch.set_num_threads(1)
    model, (X, Y) = _LM(_seq()), _all_ignored(4)
    with pytest.raises(ValueError, match=ALL_IGNORED + ".*c = M/N = 0"):
        cl.gradient_stats(model, _lm_loss("sum"), (X, Y))
    with pytest.raises(ValueError, match=ALL_IGNORED):  # as under "mean"
        cl.gradient_stats(model, _lm_loss("mean"), (X, Y))


def test_gradient_stats_under_sum_with_one_chunk_all_ignored_matches_brute_force():
    """One chunk of two examples has no counted label, the others have: exact numbers."""
    torch.set_num_threads(1)
    model = _LM(_seq())
    X, Y = _tokens(6)
    Y[:2] = 0
    assert int((Y[2:] != 0).sum()) > 0
    want = _brute_stats(model, X, Y)
    for reduction in ("sum", "mean"):
        got = cl.gradient_stats(model, _lm_loss(reduction), (X, Y), chunk_size=2)
        assert got.trace_covariance == pytest.approx(want["trace_covariance"], rel=1e-10)
        assert got.noise_scale == pytest.approx(want["noise_scale"], rel=1e-10)


def test_noise_scale_under_sum_fails_alone_where_every_label_is_ignored():
    """The loss, gradient and empirical Fisher of a sum of nothing are 0 (kept); the noise scale
    is a measurement failure (warned, recorded), or raises under on_error="raise"."""
    torch.set_num_threads(1)
    model, (X, Y) = _LM(_seq()), _all_ignored(4)
    quantities = ["loss", "grad_norm", "trace_empirical_fisher", "noise_scale"]
    diag = Diagnostics(model, _lm_loss("sum"), quantities, every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = diag.step(0, X, Y)
    values = record["values"]
    assert values["loss"] == 0.0 and values["grad_norm"] == 0.0
    assert values["trace_empirical_fisher"] == 0.0
    assert "noise_scale" not in values and "trace_covariance" not in values
    assert ALL_IGNORED in record["errors"]["noise_scale"]
    assert any(issubclass(w.category, MeasurementFailedWarning) for w in caught)
    raising = Diagnostics(model, _lm_loss("sum"), ["noise_scale"], every=1, on_error="raise")
    with pytest.raises(ValueError, match=ALL_IGNORED):
        raising.step(0, X, Y)
    alone = Diagnostics(model, _lm_loss("sum"), ["noise_scale"], every=1)
    with pytest.warns(MeasurementFailedWarning, match=ALL_IGNORED):
        assert alone.step(0, X, Y) is None


def test_noise_scale_under_sum_with_some_labels_ignored_matches_brute_force():
    torch.set_num_threads(1)
    model = _LM(_seq())
    X, Y = _tokens(6)
    want = _brute_stats(model, X, Y)
    diag = Diagnostics(model, _lm_loss("sum"), ["noise_scale"], every=1, on_error="raise")
    values = diag.step(0, X, Y)["values"]
    assert values["trace_covariance"] == pytest.approx(want["trace_covariance"], rel=1e-10)
    assert values["noise_scale"] == pytest.approx(want["noise_scale"], rel=1e-10)


def test_a_dict_of_settings_given_as_optimizer_is_named_as_such():
    # found in review: {"lr": 0.1} was described as "dict (its parameters?)"
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="not its settings or state_dict"):
        cl.Diagnostics(model, nn.CrossEntropyLoss(), ["sharpness"], optimizer={"lr": 0.1})
