"""The analysis layer after review sweep 14: a failed ``critical_sharpness`` leaves no threshold
behind, ``Diagnostics.history`` refuses a name it does not measure, and ``noise_scale`` in
``Diagnostics`` and ``analyze`` warns where ``tr(Σ)`` cancels. Each test failed on the code before
the fix; the numbers are checked against brute force (float64 per-example gradients, dense
Hessians)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab.analysis._diagnostics import MeasurementFailedWarning
from curvlab.analysis._first_order import CANCELLATION_WARNING

DT = torch.float64


# ---------------------------------------------------------------------- helpers
def _mlp(dtype: torch.dtype = DT) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def _classes(n: int = 16, dtype: torch.dtype = DT) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _brute_noise_scale(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """``tr(Σ)/‖ḡ‖²`` from float64 per-example gradients of a float64 copy (mean convention)."""
    params = {n: p.detach().double() for n, p in model.named_parameters()}

    def one(p, xi, yi):
        out = functional_call(model, p, (xi[None].double(),))
        target = yi[None] if yi.dtype == torch.long else yi[None].double()
        return loss_fn(out, target)

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)
    mean = flat.mean(0)
    tr = float(((flat - mean) ** 2).sum(1).mean())
    return tr / float(mean.pow(2).sum()), tr


def _cancelling() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float32 linear regression on inputs ``1 ± 1e-3`` and targets ``5 ± 1e-3``: the examples'
    gradients nearly agree, and ``tr(Σ) = E‖g‖² − ‖ḡ‖²`` cancels in float32 (the reviewer's
    case: noise_scale 14% low)."""
    torch.manual_seed(0)
    x = 1 + 1e-3 * torch.randn(256, 8, dtype=DT)
    y = 5 + 1e-3 * torch.randn(256, 1, dtype=DT)
    return nn.Linear(8, 1), x.float(), y.float()


def _no_warning_of(caught: list[warnings.WarningMessage], text: str) -> bool:
    return not any(text in str(w.message) for w in caught)


# ------------------------------------------- 1. a failed critical_sharpness leaves nothing
def test_failed_critical_sharpness_alone_gives_no_record(tmp_path: Path) -> None:
    """The line search runs out of forward passes: no record (the threshold was left in one,
    and the warning said "the other quantities were measured" of a step where none was)."""
    model = _mlp(torch.float32)
    x, y = _classes(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = cl.Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        every=1,
        quantities=["critical_sharpness"],
        optimizer=opt,
        options={"critical_max_forwards": 2},
        log_dir=tmp_path,
    )
    with pytest.warns(MeasurementFailedWarning) as caught:
        assert diag.step(0, x, y) is None
    diag.close()
    assert diag.records == []
    assert _no_warning_of(list(caught), "the other quantities were measured")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("event") for line in lines] == ["measurement_failed"]
    with pytest.raises(KeyError):
        diag.history("critical_sharpness_thresholds")  # (and the real names are empty)
    assert diag.history("critical_sharpness_threshold") == ([], [])


def test_failed_critical_sharpness_beside_loss_keeps_only_the_loss() -> None:
    """A diverged model (a NaN weight): every quantity fails, so there is no record; with a
    finite model and a search out of forward passes the record holds the loss (checked against
    the loss computed directly) and no ``critical_sharpness_threshold``."""
    model = _mlp()
    x, y = _classes()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    diag = cl.Diagnostics(
        model,
        loss_fn,
        every=1,
        quantities=["loss", "critical_sharpness"],
        optimizer=opt,
        options={"critical_max_forwards": 2},
    )
    with pytest.warns(MeasurementFailedWarning, match="the other quantities were measured"):
        record = diag.step(0, x, y)
    assert record is not None
    assert set(record["values"]) == {"loss"}
    assert set(record["errors"]) == {"critical_sharpness"}
    with torch.no_grad():
        assert record["values"]["loss"] == pytest.approx(float(loss_fn(model(x), y)), rel=1e-12)

    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    diag = cl.Diagnostics(
        model, loss_fn, every=1, quantities=["loss", "critical_sharpness"], optimizer=opt
    )
    with pytest.warns(MeasurementFailedWarning) as caught:
        assert diag.step(0, x, y) is None
    assert diag.records == []
    assert _no_warning_of(list(caught), "the other quantities were measured")


def test_measured_critical_sharpness_keeps_its_threshold() -> None:
    """A successful search still writes the threshold ``2/η`` beside ``λ_c``, and ``λ_c`` is the
    quadratic's ``gᵀHg / gᵀg`` for SGD (a linear regression, dense Hessian as brute force)."""
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(3, 1).to(DT)
    x = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.randn(20, 1, generator=g, dtype=DT)
    loss_fn = nn.MSELoss()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    diag = cl.Diagnostics(model, loss_fn, every=1, quantities=["critical_sharpness"], optimizer=opt)
    record = diag.step(0, x, y)
    assert record is not None
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].reshape(-1) for n in names])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, [t.reshape(s) for t, s in zip(flat.split(sizes), shapes)]))
        return loss_fn(functional_call(model, parts, (x,)), y)

    hess = torch.autograd.functional.hessian(loss_of, theta)
    gvec = torch.autograd.functional.jacobian(loss_of, theta)
    expected = float(gvec @ hess @ gvec / (gvec @ gvec))
    assert record["values"]["critical_sharpness_threshold"] == pytest.approx(2 / lr, rel=1e-15)
    assert record["values"]["critical_sharpness"] == pytest.approx(expected, rel=1e-2)
    steps, thresholds = diag.history("critical_sharpness_threshold")
    assert steps == [0] and thresholds == [pytest.approx(2 / lr, rel=1e-15)]


# ------------------------------------------------- 2. history refuses a name it does not measure
def test_history_refuses_a_name_it_does_not_measure() -> None:
    model = _mlp()
    x, y = _classes()
    diag = cl.Diagnostics(
        model, nn.CrossEntropyLoss(), every=1, quantities=["loss", "noise_scale", "fisher_norms"]
    )
    # valid names before the first measurement: empty, not an error
    assert diag.history("loss") == ([], [])
    assert diag.history("trace_covariance") == ([], [])
    diag.step(0, x, y)
    with pytest.raises(KeyError, match="available") as info:
        diag.history("los")  # misspelt: gave ([], [])
    for name in ("loss", "noise_scale", "trace_covariance", "fisher_frobenius"):
        assert name in str(info.value)
    with pytest.raises(KeyError, match="sharpness"):
        diag.history("sharpness")  # a quantity, but not one this Diagnostics measures
    with pytest.raises(KeyError, match="fisher_frobenius"):
        diag.history("fisher_norms")  # recorded under its two value names
    steps, values = diag.history("noise_scale")
    brute, brute_tr = _brute_noise_scale(model, nn.CrossEntropyLoss(), x, y)
    assert steps == [0] and values == [pytest.approx(brute, rel=1e-10)]
    assert diag.history("trace_covariance")[1] == [pytest.approx(brute_tr, rel=1e-10)]
    assert diag.history("fisher_frobenius")[0] == [0]


def test_history_of_an_array_quantity_gives_its_arrays() -> None:
    """``spectral_density`` records arrays only: its history gave ``([], [])`` at every step."""
    model = _mlp()
    x, y = _classes()
    diag = cl.Diagnostics(
        model,
        nn.CrossEntropyLoss(),
        every=1,
        quantities=["spectral_density"],
        options={"num_steps": 5, "num_probes_density": 1},
    )
    diag.step(0, x, y)
    diag.step(1, x, y)
    steps, arrays = diag.history("spectral_density")
    assert steps == [0, 1]
    assert arrays[0] == diag.records[0]["arrays"]["spectral_density"]
    assert math.isclose(sum(arrays[0]["weights"]), 1.0, rel_tol=1e-9)


# -------------------------------------------------- 3. noise_scale's cancellation is reported
def test_diagnostics_and_analyze_warn_where_trace_covariance_cancels() -> None:
    model, x, y = _cancelling()
    loss_fn = nn.MSELoss()
    brute, _ = _brute_noise_scale(model, loss_fn, x, y)
    diag = cl.Diagnostics(model, loss_fn, every=1, quantities=["noise_scale"])
    with pytest.warns(RuntimeWarning, match="noise_scale: tr\\(Sigma\\)") as caught:
        record = diag.step(0, x, y)
    assert record is not None
    measured = record["values"]["noise_scale"]
    assert abs(measured / brute - 1) > 0.01  # what the warning is about: more than 1% off
    assert any(w.filename == __file__ for w in caught)  # attributed to the caller's line
    with pytest.warns(RuntimeWarning, match="float64 copy"):
        report = cl.analyze(model, loss_fn, (x, y), quantities=["noise_scale"], nqm=False)
    assert report["noise_scale"] == pytest.approx(measured, rel=1e-6)


def test_cancellation_warning_is_shown_once_per_place_in_a_loop() -> None:
    """Its text is constant, so Python's default filter shows it once for a loop's line."""
    model, x, y = _cancelling()
    diag = cl.Diagnostics(model, nn.MSELoss(), every=1, quantities=["noise_scale"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for step in range(3):
            with torch.no_grad():
                model.bias.add_(1e-3)  # other numbers at each step
            diag.step(step, x, y)
    shown = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert [str(w.message) for w in shown] == [CANCELLATION_WARNING]
    assert len(diag.records) == 3


def test_no_cancellation_warning_where_the_noise_scale_is_good() -> None:
    """A float32 MLP on a classification batch (noise scale within 1e-4 of float64 brute force)
    and the cancelling problem in float64: no warning."""
    model = _mlp(torch.float32)
    x, y = _classes(dtype=torch.float32)
    brute, _ = _brute_noise_scale(model, nn.CrossEntropyLoss(), x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        diag = cl.Diagnostics(model, nn.CrossEntropyLoss(), every=1, quantities=["noise_scale"])
        record = diag.step(0, x, y)
        assert record is not None
        assert record["values"]["noise_scale"] == pytest.approx(brute, rel=1e-4)
        model64, x32, y32 = _cancelling()
        model64 = model64.double()
        x64, y64 = x32.double(), y32.double()
        brute64, _ = _brute_noise_scale(model64, nn.MSELoss(), x64, y64)
        report = cl.analyze(
            model64, nn.MSELoss(), (x64, y64), quantities=["noise_scale"], nqm=False
        )
        assert report["noise_scale"] == pytest.approx(brute64, rel=1e-6)


def test_history_of_fisher_norms_names_its_two_values() -> None:
    """Review s14: ``history("fisher_norms")`` said it was not measured while it was."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    diag = cl.Diagnostics(model, nn.CrossEntropyLoss(), quantities=["fisher_norms"], every=1)
    X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    diag.step(0, X, y)
    with pytest.raises(KeyError, match="writes its values under other names.*fisher_frobenius"):
        diag.history("fisher_norms")
    steps, values = diag.history("fisher_frobenius")
    assert steps == [0] and values[0] == pytest.approx(
        cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y)).frobenius
    )


class _Centering(nn.Module):
    """Feature centering over the batch: no per-example gradients, a whole-batch loss."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.h = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x)
        return self.h(torch.tanh(z - z.mean(0, keepdim=True)))


def test_diagnostics_keeps_loss_and_grad_norm_of_a_model_that_mixes_the_examples(tmp_path):  # type: ignore[no-untyped-def]
    """Review s14: the whole batch's loss and gradient norm were dropped with the per-example
    quantities (no record at all with the defaults); they now come from a plain pass."""
    torch.manual_seed(0)
    model = _Centering().double()
    loss_fn = nn.CrossEntropyLoss()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    diag = cl.Diagnostics(model, loss_fn, quantities=["loss", "grad_norm", "noise_scale"], every=1)
    with pytest.warns(MeasurementFailedWarning, match="noise_scale.*mixes the examples"):
        record = diag.step(0, X, y)
    assert record is not None and "noise_scale" not in record["values"]
    loss = loss_fn(model(X), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    loss = loss.detach()
    assert record["values"]["loss"] == pytest.approx(float(loss), rel=1e-12)
    norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    assert record["values"]["grad_norm"] == pytest.approx(norm, rel=1e-12)
    assert all(p.grad is None for p in model.parameters())
    with pytest.warns(Warning, match="noise_scale.*mixes the examples"):  # analyze: omitted
        report = cl.analyze(model, loss_fn, (X, y), quantities=["loss", "noise_scale"])
    assert report["loss"] == pytest.approx(float(loss), rel=1e-12)


def test_whole_batch_fallback_sums_bf16_gradients_in_float32_and_names_all_ignored() -> None:
    """Review s14: the fallback summed a bfloat16 model's batch gradients in bfloat16 (grad_norm
    1.7% off over 128 batches) and raised ZeroDivisionError when every label was ignored."""
    torch.manual_seed(0)
    model = _Centering().to(torch.bfloat16)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 3, generator=g).to(torch.bfloat16), torch.randint(0, 2, (4,), generator=g))
        for _ in range(64)
    ]
    with pytest.warns(Warning, match="mixes the examples"):
        report = cl.analyze(model, loss_fn, batches, quantities=["grad_norm", "noise_scale"])
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for X, y in batches:
        out = model(X).float()
        nll = nn.functional.cross_entropy(out, y, reduction="sum")
        count += y.numel()
        for t, gr in zip(total, torch.autograd.grad(nll, params)):
            t.add_(gr)
    ref = float(sum(((t.double() / count) ** 2).sum() for t in total)) ** 0.5
    assert report["grad_norm"] == pytest.approx(ref, rel=2e-3)
    X, y = batches[0]
    with pytest.raises(ValueError, match="every target of the data is ignore_index"):
        cl.analyze(
            model.double(),
            loss_fn,
            (X.double(), torch.full_like(y, -100)),
            quantities=["loss", "noise_scale"],
            on_error="raise",
        )
