"""The estimator measurements after review sweep 15: the successive measurements of a
``Diagnostics`` draw new probes (``trace_hessian``, ``top_eigenvalues``, ``spectral_density``
reused the probes of the config's ``seed`` at every measurement), and ``noise_scale_hessian``
under ``reduction="sum"`` with every label ignored names the cause (a misleading
``NonFiniteError`` about the operator's product came out). Each test failed on the code before
the fix; numbers are checked against brute force (dense float64 Hessians by ``torch.func``)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

import curvlab as cl
from curvlab.analysis import _estimator_measures as em
from curvlab.analysis._diagnostics import MeasurementFailedWarning
from curvlab.analysis._registry import Context

DT = torch.float64


# ---------------------------------------------------------------------- helpers
def _mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _classes(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _flat_loss(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """``L`` as a function of the flat parameter vector, and that vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = v[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def loss(v: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, unflat(v), (X,)), y)

    return loss, flat, unflat


def _dense_hessian(model: nn.Module, loss_fn: nn.Module, X, y) -> torch.Tensor:
    loss, flat, _ = _flat_loss(model, loss_fn, X, y)
    return hessian(loss)(flat)


def _diag(model, loss_fn, quantities, seed=0, **options) -> cl.Diagnostics:
    return cl.Diagnostics(
        model, loss_fn, quantities, every=1, seed=seed, on_error="raise", options=options
    )


# ------------------------------------------------- finding 1: new probes at every measurement
def test_measurement_seed_is_the_seed_first_then_new_for_every_count_and_name():
    """The seeding rule itself: ``seed`` at a quantity's first measurement (as ``cl.trace(...,
    seed=seed)``), then a new seed per count, another per quantity, kept in the state."""
    ctx = Context(nn.Linear(1, 1), nn.MSELoss(), None, None, 7, torch.Generator(), None, {})
    seeds = [em.measurement_seed(ctx, "trace_hessian") for _ in range(50)]
    assert seeds[0] == 7
    assert len(set(seeds)) == 50
    assert all(0 <= s < 2**63 for s in seeds)
    assert em.measurement_seed(ctx, "spectral_density") == 7
    assert em.measurement_seed(ctx, "spectral_density") not in seeds
    assert ctx.state["seeds_drawn/trace_hessian"] == 50
    # the rule depends on the seed, the name and the count only: a fresh state repeats it
    again = Context(nn.Linear(1, 1), nn.MSELoss(), None, None, 7, torch.Generator(), None, {})
    assert [em.measurement_seed(again, "trace_hessian") for _ in range(50)] == seeds


def test_every_estimator_measurement_gets_a_new_seed_at_every_step(monkeypatch):
    """``trace_hessian``, ``top_eigenvalues`` and ``spectral_density`` were all called with the
    config's seed at every measurement."""
    calls: dict[str, list[int]] = {"trace": [], "eigenvalues": [], "spectral_density": []}
    for name in calls:
        original = getattr(em, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name].append(kwargs["seed"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(em, name, spy)
    model, (X, y) = _mlp(), _classes()
    diag = _diag(
        model,
        nn.CrossEntropyLoss(),
        ["trace_hessian", "top_eigenvalues", "spectral_density"],
        seed=3,
        num_probes=2,
        k=1,
        num_steps=4,
    )
    for step in range(4):
        diag.step(step, X, y)
    for name, seeds in calls.items():
        assert seeds[0] == 3, name  # the first measurement: seed itself
        assert len(set(seeds)) == 4, (name, seeds)


def test_measurements_of_one_batch_differ_and_average_to_the_exact_trace():
    """Forty measurements of one batch: each an unbiased Hutchinson estimate, independent of the
    others, so their spread is the reported standard error and their mean converges to the
    dense ``Tr(H)`` (before: forty bit-identical values, spread 0)."""
    model, (X, y) = _mlp(), _classes()
    loss_fn = nn.CrossEntropyLoss()
    exact = float(_dense_hessian(model, loss_fn, X, y).trace())
    diag = _diag(model, loss_fn, ["trace_hessian"], seed=0, num_probes=4)
    recs = [diag.step(i, X, y)["values"] for i in range(40)]
    values = torch.tensor([r["trace_hessian"] for r in recs], dtype=DT)
    stderr = torch.tensor([r["trace_hessian_stderr"] for r in recs], dtype=DT)
    assert len(set(values.tolist())) == 40
    # each measurement's standard error estimates the spread of the measurements (RMS: unbiased
    # for the variance); independent draws have that spread, shared probes had none
    rms = float(stderr.pow(2).mean().sqrt())
    assert 0.6 < float(values.std()) / rms < 1.6
    se_mean = rms / math.sqrt(len(values))
    assert abs(float(values.mean()) - exact) <= 4 * se_mean, (float(values.mean()), exact)
    # the first measurement is cl.trace's with the seed, as documented
    first = cl.trace(model, loss_fn, (X, y), num_probes=4, seed=0)
    assert recs[0]["trace_hessian"] == pytest.approx(float(first.value), rel=1e-12)


def test_density_probes_differ_between_measurements():
    model, (X, y) = _mlp(), _classes()
    diag = _diag(model, nn.CrossEntropyLoss(), ["spectral_density"], num_steps=5)
    nodes = [tuple(diag.step(i, X, y)["arrays"]["spectral_density"]["weights"]) for i in range(3)]
    assert len(set(nodes)) == 3


def test_a_run_is_reproduced_by_its_seed_and_continued_by_state_dict():
    """The same seed gives the same values bit for bit; a resumed run (state_dict through
    torch.save / torch.load(weights_only=True)) continues the sequence of probes; the values do
    not depend on what else is measured; the global RNG is not drawn from."""
    model, (X, y) = _mlp(), _classes()
    loss_fn = nn.CrossEntropyLoss()

    def run(quantities, steps, diag=None):
        diag = diag or _diag(model, loss_fn, quantities, seed=5, num_probes=3)
        return diag, [diag.step(i, X, y)["values"]["trace_hessian"] for i in steps]

    _, once = run(["trace_hessian"], range(4))
    _, twice = run(["trace_hessian"], range(4))
    assert once == twice
    assert len(set(once)) == 4
    rng = torch.get_rng_state()
    _, mixed = run(["trace_fisher", "trace_hessian", "noise_scale_hessian"], range(4))
    assert torch.equal(rng, torch.get_rng_state())
    assert mixed == once
    first, head = run(["trace_hessian"], range(2))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _diag(model, loss_fn, ["trace_hessian"], seed=5, num_probes=3)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _, tail = run(["trace_hessian"], range(2, 4), resumed)
    assert head + tail == once


def test_analyze_keeps_the_seed_for_every_checkpoint():
    """``analyze`` measures each checkpoint with ``seed`` (its state is fresh per checkpoint): as
    ``cl.trace(..., seed=seed)``, unchanged by the fix (and equal to one process on all data
    under torch.distributed)."""
    model, (X, y) = _mlp(), _classes()
    loss_fn = nn.CrossEntropyLoss()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    report = cl.analyze(
        model,
        loss_fn,
        (X, y),
        checkpoint=[sd, sd],
        quantities=["trace_hessian"],
        num_probes=3,
        seed=2,
        nqm=False,
        progress=False,
    )
    want = float(cl.trace(model, loss_fn, (X, y), num_probes=3, seed=2).value)
    for entry in report.entries:
        assert entry["values"]["trace_hessian"] == pytest.approx(want, rel=1e-12)


# -------------------------- finding 2: noise_scale_hessian, "sum", every label ignored
def _sequence_data(ignore: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Tanh(), nn.Linear(4, 5)).to(DT)
    X = torch.randint(0, 5, (3, 4), generator=g)
    return model, X, torch.full((3, 4), ignore, dtype=torch.long)


class _Flat(nn.Module):
    """(N, T, V) logits against (N, T) labels through CrossEntropyLoss's (N, V, T) layout."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).transpose(1, 2)


@pytest.mark.parametrize("ignore", [0, -100])
def test_noise_scale_hessian_all_ignored_under_sum_names_the_cause(monkeypatch, ignore):
    """It raised ``NonFiniteError`` ("the curvature operator's product is not finite") from its
    first Hessian product of the 0/0 mean gradient; now the ``ValueError`` of ``noise_scale``,
    before any product."""
    from curvlab.analysis import _noise_scale_hessian as nsh

    products = []
    original = nsh.curvature_operator

    def counting(*args, **kwargs):
        op = original(*args, **kwargs)
        matvec = op.matvec
        op.matvec = lambda v: (products.append(1), matvec(v))[1]
        return op

    monkeypatch.setattr(nsh, "curvature_operator", counting)
    inner, X, Y = _sequence_data(ignore)
    model = _Flat(inner)
    loss_fn = nn.CrossEntropyLoss(ignore_index=ignore, reduction="sum")
    msg = rf"every target of the data is ignore_index={ignore}: noise_scale_hessian"
    with pytest.raises(ValueError, match=msg):
        _diag(model, loss_fn, ["noise_scale_hessian"]).step(0, X, Y)
    with pytest.raises(ValueError, match=msg):
        cl.analyze(
            model,
            loss_fn,
            (X, Y),
            quantities=["noise_scale_hessian"],
            on_error="raise",
            nqm=False,
            progress=False,
        )
    assert products == []
    # under on_error="warn" it fails alone: the loss of a sum of nothing, 0, is kept
    diag = cl.Diagnostics(model, loss_fn, ["loss", "noise_scale_hessian"], every=1)
    with pytest.warns(MeasurementFailedWarning, match="ignore_index"):
        rec = diag.step(0, X, Y)
    assert rec["values"]["loss"] == 0.0
    assert "noise_scale_hessian" not in rec["values"]
    assert "ignore_index" in rec["errors"]["noise_scale_hessian"]


def test_noise_scale_hessian_under_sum_with_some_labels_ignored_matches_brute_force():
    """The check reads the count only: with one counted label per few ignored ones the value is
    unchanged, within its standard error of the dense ``tr(HΣ)/(GᵀHG)``."""
    model, (X, y) = _mlp(), _classes(10)
    y = y.clone()
    y[::3] = 0
    loss_fn = nn.CrossEntropyLoss(ignore_index=0, reduction="sum")
    loss, flat, unflat = _flat_loss(model, loss_fn, X, y)
    m = int((y != 0).sum())
    n = len(y)
    c = m / n

    def nll(v, x, t):
        out = functional_call(model, unflat(v), (x[None],))
        return nn.functional.cross_entropy(out, t[None], ignore_index=0, reduction="sum")

    g = vmap(grad(nll), in_dims=(None, 0, 0))(flat, X, y) / c  # mean-convention g_n
    mean = g.mean(0)
    sigma = (g - mean).T @ (g - mean) / n
    h = hessian(loss)(flat) / m  # the Hessian of the mean loss
    want = float(torch.trace(h @ sigma) / (mean @ h @ mean))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values = _diag(model, loss_fn, ["noise_scale_hessian"], num_probes=200).step(0, X, y)
    values = values["values"]
    # 10 examples <= 200 probes: tr(HΣ) computed exactly (review s21), its stderr 0
    assert values["noise_scale_hessian"] == pytest.approx(want, rel=1e-9)
    assert values["noise_scale_hessian_stderr"] == 0.0
    assert values["grad_hessian_grad"] == pytest.approx(float(mean @ h @ mean), rel=1e-9)


def test_every_sharpness_measurement_gets_a_new_random_part(monkeypatch):
    # the warm start's random part z came from the config seed at every measurement: the same z
    # every time, so a top eigenvector the kept vectors miss was missed the same way each time
    import curvlab.analysis._sharpness as sh

    seeds: list[int] = []
    real = sh.warm_top_eigenvalue

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sh, "warm_top_eigenvalue", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    diag = _diag(model, loss_fn, ["sharpness"], seed=3)
    values = [diag.step(i, x, y)["values"]["sharpness"] for i in range(3)]
    assert seeds[0] == 3 and len(set(seeds)) == 3
    ref = float(torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, x, y))[-1])
    for v in values:
        assert abs(v - ref) <= 1e-3 * abs(ref)
