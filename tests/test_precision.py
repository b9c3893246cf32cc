"""The precision policy (curvlab._precision): autocast, 16-bit parameters, GradScaler.

* curvlab's own passes compute as outside any autocast region: every entry point called inside a
  CPU bfloat16 autocast region returns float32 and equals the call outside (1e-5);
* a bfloat16-parameter model gives float32 results within 5e-2 of the float64 computation on the
  same (upcast) weights;
* ``NoisyOptimizer`` inside an autocast step (closure and ``capture()``) moves the parameters as
  the float32 run does (5e-2 relative);
* under ``GradScaler`` (torch's AMP recipe) every sampler's run equals the run without a scaler,
  and a step with an inf gradient is skipped without drawing noise.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._losses import loss_spec
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    MultiplicativeNoise,
    NoisyOptimizer,
)
from tests.test_noise_samplers import _one_thread  # noqa: F401 (fixture)

BF16 = torch.bfloat16


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(n: int = 24, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def _tensors(result: Any) -> dict[str, torch.Tensor]:
    """The numbers of a result, by name (dicts of tensors, K-FAC factors, estimator objects)."""
    if isinstance(result, dict):
        out = {}
        for k, v in result.items():
            if isinstance(v, torch.Tensor):
                out[k] = v
            elif hasattr(v, "A"):
                out[f"{k}.A"], out[f"{k}.G"] = v.A, v.G
        return out
    for attr in ("values", "value", "frobenius", "density"):
        if hasattr(result, attr):
            return {attr: torch.as_tensor(getattr(result, attr))}
    if hasattr(result, "variance"):
        return {f"var.{k}": v for k, v in result.variance.items()}
    raise TypeError(type(result))


LF = nn.CrossEntropyLoss()
ENTRY_POINTS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "diag_fisher_empirical": lambda m, d: cl.diag_fisher(m, LF, d),
    "diag_fisher_mc": lambda m, d: cl.diag_fisher(m, LF, d, kind="mc", seed=0),
    "diag_fisher_exact": lambda m, d: cl.diag_fisher(m, LF, d, kind="exact"),
    "diag_hessian": lambda m, d: cl.diag_hessian(m, LF, d),
    "kfac": lambda m, d: cl.kfac(m, LF, d, kind="exact"),
    "gradient_stats": lambda m, d: cl.gradient_stats(m, LF, d),
    "fisher_norms": lambda m, d: cl.fisher_norms(m, LF, d),
    "trace_hutchinson": lambda m, d: cl.trace(m, LF, d, num_probes=4, seed=0),
    "trace_exact_fisher": lambda m, d: cl.trace(m, LF, d, matrix="fisher", method="exact"),
    "eigenvalues": lambda m, d: cl.eigenvalues(m, LF, d, k=2, seed=0),
    "spectral_density": lambda m, d: cl.spectral_density(m, LF, d, num_steps=8, seed=0),
    "operator": lambda m, d: {
        "Hv": cl.curvature_operator(m, LF, d) @ torch.linspace(-1, 1, 83, dtype=torch.float32)
    },
}


def _float_results(result: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in _tensors(result).items() if v.is_floating_point()}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_inside_autocast_equals_outside_and_is_float32(name):
    model, data = _mlp(), _data()
    outside = _float_results(ENTRY_POINTS[name](model, data))
    with torch.autocast("cpu", dtype=BF16):
        inside = _float_results(ENTRY_POINTS[name](model, data))
        assert torch.is_autocast_enabled("cpu"), "the caller's autocast region was switched off"
    assert inside.keys() == outside.keys()
    for k in outside:
        assert inside[k].dtype in (torch.float32, torch.float64), (k, inside[k].dtype)
        torch.testing.assert_close(inside[k], outside[k], rtol=1e-5, atol=1e-7, msg=k)


def test_operator_built_outside_autocast_multiplies_inside_it():
    model, data = _mlp(), _data()
    op = cl.curvature_operator(model, LF, data, matrix="ggn")
    v = torch.linspace(-1, 1, op.shape[0])
    ref = op @ v
    with torch.autocast("cpu", dtype=BF16):
        got = op @ v
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_analyze_and_diagnostics_inside_autocast():
    model, data = _mlp(), _data()
    names = ["trace_fisher", "grad_norm", "loss", "top_eigenvalues"]
    ref = cl.analyze(model, LF, data, quantities=names).values
    with torch.autocast("cpu", dtype=BF16):
        got = cl.analyze(model, LF, data, quantities=names).values
    assert set(ref) >= {"trace_fisher", "grad_norm", "loss"}
    for k in ref:
        torch.testing.assert_close(
            torch.as_tensor(got[k]), torch.as_tensor(ref[k]), rtol=1e-5, atol=1e-7, msg=k
        )
    diag = cl.Diagnostics(model, LF, every=1, quantities=["trace_empirical_fisher", "loss"])
    outside = diag.measure(0, *data)["values"]
    with torch.autocast("cpu", dtype=BF16):
        inside = diag.measure(1, *data)["values"]
    for k in ("trace_empirical_fisher", "loss"):
        assert inside[k] == pytest.approx(outside[k], rel=1e-5)


BF16_POINTS = [n for n in sorted(ENTRY_POINTS) if n not in ("operator", "spectral_density")]


@pytest.mark.parametrize("name", BF16_POINTS)
def test_bf16_parameters_give_float32_results_near_float64(name):
    """A bfloat16 model: float32 results within 5e-2 of float64 on the same upcast weights."""
    m16 = _mlp(BF16)
    m64 = copy.deepcopy(m16).double()
    X, y = _data()
    got = _float_results(ENTRY_POINTS[name](m16, (X.to(BF16), y)))
    ref = _float_results(ENTRY_POINTS[name](m64, (X.to(BF16).double(), y)))
    for k in ref:  # float32 (float64 where the estimator's small projected problem is float64)
        assert got[k].dtype in (torch.float32, torch.float64), (k, got[k].dtype)
        err = float((got[k].double() - ref[k].double()).norm() / ref[k].double().norm())
        assert err <= 5e-2, (k, err)


def _train(
    sampler_fn, steps=5, autocast=False, form="capture", scaler=None, inf_at=None, skip=None
):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    noisy = NoisyOptimizer(opt, sampler_fn(), model, LF, seed=1)
    g = torch.Generator().manual_seed(5)
    for t in range(steps):
        X, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        if t == skip:
            continue
        if t == inf_at:
            X[0, 0] = float("inf")
        ctx = (
            torch.autocast("cpu", dtype=BF16) if autocast else torch.autocast("cpu", enabled=False)
        )
        if form == "closure":

            def closure(X=X, y=y, ctx=ctx) -> torch.Tensor:  # noqa: N803 (bound per step)
                noisy.zero_grad()
                with ctx:
                    loss = LF(model(X), y)
                loss.backward()
                return loss

            noisy.step(closure)
            continue
        noisy.zero_grad()
        with noisy.capture():
            with ctx:
                loss = LF(model(X), y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(noisy)
            scaler.update()
        else:
            noisy.step()
    end = torch.cat([p.detach().flatten() for p in model.parameters()])
    return start, end, noisy


SAMPLERS = {
    "diag_empirical": lambda: DiagFisherNoise(large_batch=16, small_batch=4),
    "diag_mc": lambda: DiagFisherNoise("mc", large_batch=16, small_batch=4),
    "kfac": lambda: KFACNoise(large_batch=16, small_batch=4),
    "kfac_mc": lambda: KFACNoise("mc", large_batch=16, small_batch=4),
    "full_true": lambda: FullFisherNoise("true", large_batch=16, small_batch=4),
    "full_empirical": lambda: FullFisherNoise("empirical", large_batch=16, small_batch=4),
    "trace": lambda: FisherTraceNoise(large_batch=16, small_batch=4),
    "multiplicative": lambda: MultiplicativeNoise(0.1),
    "isotropic": lambda: IsotropicNoise(0.01),
}


@pytest.mark.parametrize("form", ["capture", "closure"])
@pytest.mark.parametrize("name", ["diag_empirical", "diag_mc", "kfac", "full_true", "trace"])
def test_noisy_optimizer_inside_autocast_moves_like_float32(name, form):
    start, ref, _ = _train(SAMPLERS[name], form=form)
    start16, got, _ = _train(SAMPLERS[name], form=form, autocast=True)
    assert torch.equal(start, start16)
    err = float((got - start - (ref - start)).norm() / (ref - start).norm())
    assert err <= 5e-2, err


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_grad_scaler_gives_the_unscaled_run(name):
    """AMP recipe with GradScaler(init_scale=2**10): the run of no scaler; an inf step skipped."""
    _, ref, _ = _train(SAMPLERS[name], steps=8)
    _, got, _ = _train(
        SAMPLERS[name], steps=8, scaler=torch.amp.GradScaler("cpu", init_scale=2**10)
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    # step 3 has an inf input: the scaler skips it, nothing stays open, no noise is drawn, and the
    # run equals the run without that batch
    scaler = torch.amp.GradScaler("cpu", init_scale=2**10)
    _, skipped, noisy = _train(SAMPLERS[name], steps=8, scaler=scaler, inf_at=3)
    _, without, _ = _train(SAMPLERS[name], steps=8, skip=3)
    assert noisy.steps_taken == 7
    assert scaler.get_scale() == 2**9
    torch.testing.assert_close(skipped, without, rtol=1e-5, atol=1e-7)


def test_grad_scaler_captured_state_is_that_of_the_unscaled_loss():
    """The captured diagonal under a scaler equals cl.diag_fisher on the same batch (not S^2 x)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = _data(16)
    sampler = DiagFisherNoise(large_batch=16, small_batch=4)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, LF, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2**10)
    with noisy.capture():
        scaler.scale(LF(model(X), y)).backward()
    captured = noisy._pending.result()
    ref = cl.diag_fisher(model, LF, (X, y))
    for k in ref:
        torch.testing.assert_close(captured[k], ref[k], rtol=1e-5, atol=1e-9)


def test_bf16_spectral_density_moments_near_float64():
    """SLQ on a bfloat16 model (float32 vectors, bf16 products through ``product_parts``): the
    quadrature's low moments (the estimates of tr(H^j)/D) within 5e-2 of the float64 model's with
    the same probes. (The nodes themselves are not compared: the recurrence amplifies the bf16
    products' rounding into the Ritz values of the interior.)"""
    m16 = _mlp(BF16)
    m64 = copy.deepcopy(m16).double()
    X, y = _data()
    got = cl.spectral_density(m16, LF, (X.to(BF16), y), num_steps=8, num_probes=3, seed=0)
    ref = cl.spectral_density(m64, LF, (X.to(BF16).double(), y), num_steps=8, num_probes=3, seed=0)
    assert got.nodes.dtype == torch.float64 and got.num_matvecs == 24
    for j in (1, 2):
        assert got.moment(j) == pytest.approx(ref.moment(j), rel=5e-2), j
    assert float(torch.trapezoid(got.density, got.grid)) == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------- float16 autocast under GradScaler (review fixes)
def _small_gradient_mlp(n_out: int) -> nn.Module:
    """A small-init head (as in many transformers): the unscaled output gradients are tiny."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, n_out))
    with torch.no_grad():
        model[2].weight.mul_(0.005)
    return model


@pytest.mark.parametrize("sampler", ["diag", "kfac"])
def test_fp16_grad_scaler_captured_state_is_that_of_the_unscaled_loss(sampler):
    """Under float16 autocast the captured output gradients are upcast before the scale is divided
    out; divided in float16 the small values the scaler protects fell to zero again (the first
    layer's diagonal 21% off, K-FAC's output factor 66%, on a larger batch)."""
    n = 4096
    model = _small_gradient_mlp(50)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 16, generator=g), torch.randint(0, 50, (n,), generator=g)
    make = DiagFisherNoise if sampler == "diag" else KFACNoise
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        make(large_batch=n, small_batch=32),
        model,
        LF,
        seed=1,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with noisy.capture():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = LF(model(X), y)
        scaler.scale(loss).backward()
    captured = noisy._pending.result()
    if sampler == "diag":
        ref = cl.diag_fisher(model, LF, (X, y))
        for k in ref:
            err = float((captured[k] - ref[k]).norm() / ref[k].norm())
            assert err <= 5e-3, (k, err)
    else:  # the output side: B B^T against the float32 K-FAC factor G
        ref = cl.kfac(model, LF, (X, y), kind="empirical")
        for k in ref:
            B = captured[k]["B"]
            G = (B @ B.T) if B.shape[0] == ref[k].G.shape[0] else None
            assert G is not None, (k, B.shape)
            ratio = float(G.trace() / ref[k].G.trace())
            G = G / ratio  # the sampler's own scaling of the factor
            err = float((G - ref[k].G).norm() / ref[k].G.norm())
            assert err <= 5e-3, (k, err)


def test_fp16_grad_scaler_full_true_fold_adds_the_float32_noise():
    """FullFisherNoise("true") folds S * delta into the float16 logits' gradient: delta is
    computed in float32 and scaled before it meets float16 (it underflowed: 5% off, 10% zeros)."""
    n, v = 1024, 200
    model = _small_gradient_mlp(v)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 16, generator=g), torch.randint(0, v, (n,), generator=g)
    sampler = FullFisherNoise("true", large_batch=n, small_batch=32)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, LF, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    seen: dict[str, torch.Tensor] = {}
    state = noisy.generator.get_state()
    with noisy.capture():
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(X)
            out.register_hook(lambda g: seen.__setitem__("before", g.clone()))  # before the fold
            loss = LF(out, y)
            out.register_hook(lambda g: seen.__setitem__("after", g.clone()))  # after it
        scaler.scale(loss).backward()
    S = scaler.get_scale()
    applied = (seen["after"].float() - seen["before"].float()) / S
    gen = torch.Generator()
    gen.set_state(state)
    leaf = out.detach().float().requires_grad_(True)
    (want,) = torch.autograd.grad(sampler._objective(loss_spec(LF), leaf, y, gen), leaf)
    err = float((applied - want).norm() / want.norm())
    assert err <= 2e-3, err


@pytest.mark.parametrize("name", ["kfac", "kfac_mc", "diag_empirical", "full_true", "trace"])
def test_sample_and_step_inside_autocast_draw_in_float32(name):
    """A draw inside the caller's autocast region equals the one outside it (K-FAC's factor
    products ran in bfloat16 there), by ``sample`` and by a ``NoisyOptimizer`` step."""
    model, (X, y) = _mlp(), _data()
    sampler = SAMPLERS[name]()
    outside = sampler.sample(model, LF, X, y, seed=3)
    with torch.autocast("cpu", dtype=BF16):
        inside = sampler.sample(model, LF, X, y, seed=3)
    for k in outside:
        assert inside[k].dtype == torch.float32, (k, inside[k].dtype)
        torch.testing.assert_close(inside[k], outside[k], rtol=1e-5, atol=1e-7, msg=k)

    def added_noise(autocast: bool) -> dict[str, torch.Tensor]:
        m = _mlp()
        noisy = NoisyOptimizer(torch.optim.SGD(m.parameters(), lr=0.0), SAMPLERS[name](), m, LF)
        grads: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            noisy.zero_grad()
            with torch.autocast("cpu", enabled=False):  # the same float32 pass either way
                loss = LF(m(X), y)
                loss.backward()
            grads.update({n: p.grad.clone() for n, p in m.named_parameters()})
            return loss

        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            noisy.step(closure)
        return {n: p.grad - grads[n] for n, p in m.named_parameters()}

    plain, inside = added_noise(False), added_noise(True)
    for k in plain:
        torch.testing.assert_close(inside[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)


def test_bf16_model_loss_measurement_is_summed_in_float32():
    """``measure(..., ["loss"])`` on a bfloat16 model: the logits are upcast before the loss is
    summed (summed in bfloat16 it came back as a bfloat16 number, 4e-4 off float64 here)."""
    from curvlab.analysis._measures import measure

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4096, 16, generator=g), torch.randint(0, 10, (4096,), generator=g)
    want = measure(copy.deepcopy(model).double(), LF, (X.double(), y), ["loss"]).values["loss"]
    got = measure(model.to(BF16), LF, (X.to(BF16), y), ["loss"]).values["loss"]
    assert abs(got - want) <= 1e-4 * want, (got, want)


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("scaler", [False, True])
def test_full_fisher_fold_under_gradient_accumulation(kind: str, scaler: bool) -> None:
    """Two micro-batches of ``loss / 2`` (under a GradScaler or not), the capture around the last
    with ``loss_factor=1/2``: the noise added is the separate pass's on that micro-batch (it was
    half of it, the fold scaled by the loop's factor); without ``loss_factor`` a clear error."""
    X, y = _data(32)
    lf = nn.CrossEntropyLoss()
    micro = [(X[:16], y[:16]), (X[16:], y[16:])]

    def run(capture: bool, factor: float | None) -> torch.Tensor:
        model = _mlp()
        noisy = NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            FullFisherNoise(kind, scale=0.5),
            model,
            lf,
            seed=3,
        )
        amp = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None
        for i, (xb, yb) in enumerate(micro):
            last = capture and i == len(micro) - 1
            with noisy.capture(loss_factor=factor) if last else contextlib.nullcontext():
                loss = lf(model(xb), yb) / len(micro)
                (amp.scale(loss) if amp else loss).backward()
        if amp is not None and capture:
            amp.step(noisy)
        elif capture:
            noisy.step()
        else:
            if amp is not None:
                amp.unscale_(noisy)
            noisy.step(inputs=micro[-1][0], targets=micro[-1][1])
        return _flat_grad(model)

    plain = _mlp()
    for xb, yb in micro:
        (lf(plain(xb), yb) / len(micro)).backward()
    base = _flat_grad(plain)
    separate = run(False, None) - base
    folded = run(True, 1 / len(micro)) - base
    torch.testing.assert_close(folded, separate, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="loss_factor="):
        run(True, None)


def test_full_fisher_fold_with_a_factor_on_the_loss() -> None:
    """``(loss * 0.25).backward()`` inside ``capture(loss_factor=0.25)``: the folded noise equals
    the separate pass's (it was a quarter of it)."""
    X, y = _data(16)
    lf = nn.CrossEntropyLoss()
    for kind in ("true", "empirical"):
        grads = []
        for capture in (True, False):
            model = _mlp()
            noisy = NoisyOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.0),
                FullFisherNoise(kind, scale=0.5),
                model,
                lf,
                seed=3,
            )
            if capture:
                with noisy.capture(loss_factor=0.25):
                    (lf(model(X), y) * 0.25).backward()
                noisy.step()
            else:
                (lf(model(X), y) * 0.25).backward()
                noisy.step(inputs=X, targets=y)
            grads.append(_flat_grad(model))
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "1"])
def test_capture_loss_factor_is_checked(bad: Any) -> None:
    model = _mlp()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        FullFisherNoise(scale=0.5),
        model,
        nn.CrossEntropyLoss(),
        seed=0,
    )
    with pytest.raises(ValueError, match="loss_factor"), noisy.capture(loss_factor=bad):
        pass


class _CustomMLP(nn.Module):  # not a Sequential: diag_hessian takes Hessian-product columns
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_diag_hessian_columns_of_16bit_parameters_are_float32(dtype) -> None:
    """Found in review: the columns backend returned the parameters' 16-bit dtype."""
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    model = _CustomMLP()
    want = cl.diag_hessian(copy.deepcopy(model).double(), lf, (X.double(), y))
    got = cl.diag_hessian(model.to(dtype), lf, (X.to(dtype), y))
    assert got.backend == "columns"
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        scale = want[name].abs().max()
        assert (value.double() - want[name]).abs().max() <= 0.05 * scale, name


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_fold_on_a_step_the_grad_scaler_skips(kind: str) -> None:
    """float16 autocast overflows one batch's logits: the GradScaler skips that step, and the
    loop goes on exactly as without noise-capturing (the parameters after three steps equal a run
    whose first step is absent). Found in review: FullFisherNoise("true") raised NonFiniteError
    from inside the user's loss call."""
    X, y = _data(16)

    def run(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        model = _mlp()
        lf = nn.CrossEntropyLoss()
        noisy = NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            FullFisherNoise(kind, scale=0.1),
            model,
            lf,
            seed=0,
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for xb in batches:
            noisy.zero_grad()
            with noisy.capture():
                with torch.autocast("cpu", dtype=torch.float16):
                    out = model(xb)
                scaler.scale(lf(out.float(), y)).backward()
            scaler.step(noisy)
            scaler.update()
        return [p.detach().clone() for p in model.parameters()]

    with_skip = run([X * 1e6, X, X])
    without = run([X, X])
    for a, b in zip(with_skip, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_full_fisher_true_fold_on_non_finite_logits_without_a_scaler_is_an_error() -> None:
    """No GradScaler to skip the step: a clear NonFiniteError at step(), no silent NaN step."""
    X, y = _data(16)
    model = _mlp()
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        FullFisherNoise("true", scale=0.1),
        model,
        lf,
        seed=0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    with noisy.capture():
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(X * 1e6)
        lf(out.float(), y).backward()
    with pytest.raises(cl.NonFiniteError, match="logits"):
        noisy.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
