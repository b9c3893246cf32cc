"""Review s19 (reviewer C): bad inputs to the NQM tools are refused with a ValueError naming the
argument, before any expensive work; SLQ's 2-D nodes and weights build an NQM.

Brute force here is dense float64 numpy written in the test: the Lyapunov equation solved by a
Kronecker system, and plain SGD's expected risk by its one-step second-moment recursion.
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import pytest
import torch

import curvlab.nqm._cli as nqm_cli
import curvlab.nqm._schedule as nqm_schedule
from curvlab.nqm import (
    NQM,
    OptimalResult,
    SweepResult,
    batch_size_sweep,
    critical_batch_from_steps,
    plot_sweep,
    sgd_stationary_covariance,
)
from curvlab.nqm._cli import add_subparser


def _small() -> NQM:
    return NQM.paper(d=100, bins=10)


def _sgd_risk(h, c, counts, v0, lr, batch_size, steps):
    """E[L(θ_t)] of plain SGD on a diagonal NQM, by the recursion E[θ²] ← (1 − αh)² E[θ²] + α²c/B."""
    m2 = np.full_like(h, v0, dtype=float)
    for _ in range(steps):
        m2 = (1.0 - lr * h) ** 2 * m2 + lr**2 * c / batch_size
    return float(np.sum(counts * 0.5 * h * m2))


# ---------------------------------------------------------------- 1: optimize_schedule(pieces)
def test_schedule_pieces_is_checked_before_the_search(monkeypatch) -> None:
    def no_search(*args, **kwargs):
        raise AssertionError("the constant-lr search ran before pieces was checked")

    monkeypatch.setattr(nqm_schedule, "optimal", no_search)
    for bad in (True, 2.5, "2", 0, np.float64(1.5)):
        with pytest.raises(ValueError, match=r"^pieces must be an integer >= 1"):
            nqm_schedule.optimize_schedule(_small(), 16, 0.05, pieces=bad)
    with pytest.raises(ValueError, match=r"^batch_size must be a finite number > 0"):
        nqm_schedule.optimize_schedule(_small(), True, 0.05, pieces=2)
    with pytest.raises(ValueError, match=r"^rel_tol must be a number in \(0, 1\)"):
        nqm_schedule.optimize_schedule(_small(), 16, 0.05, pieces=2, rel_tol="0.1")


def test_schedule_integral_float_pieces_runs_as_the_int() -> None:
    # pieces=2.0 passed the old check and crashed in np.full after the search (raw TypeError)
    nqm = _small()
    as_int = nqm.optimize_schedule(16, 0.05, pieces=2)
    for same in (2.0, np.int64(2)):
        res = nqm.optimize_schedule(16, 0.05, pieces=same)
        assert res.steps == as_int.steps
        np.testing.assert_array_equal(res.lrs, as_int.lrs)
        np.testing.assert_array_equal(res.boundaries, as_int.boundaries)


# ---------------------------------------------------------------- 2: critical_batch_from_steps
def test_critical_threshold_must_be_a_number_above_one() -> None:
    bs, st = [1, 2, 4], [100, 60, 50]
    for bad in ("3", True, None, 1.0, math.nan):
        with pytest.raises(ValueError, match=r"^threshold must be"):
            critical_batch_from_steps(bs, st, bad)
    # B·S = 100, 120, 200: 1.5 × 100 is reached between B = 2 and 4 (log-log interpolation)
    frac = (math.log(150) - math.log(120)) / (math.log(200) - math.log(120))
    want = math.exp(math.log(2) + frac * (math.log(4) - math.log(2)))
    for threshold in (1.5, np.float64(1.5)):
        assert critical_batch_from_steps(bs, st, threshold) == pytest.approx(want, rel=1e-12)
    assert critical_batch_from_steps(bs, st, math.inf) == math.inf  # never reached


# ---------------------------------------------------------------- 3: sgd_stationary_covariance
def test_stationary_covariance_refuses_non_finite_inputs_naming_them() -> None:
    H, C = np.diag([2.0, 0.5]), np.diag([0.3, 0.7])
    cases = [
        ((H, C, math.inf, 4), r"^lr must be a finite number > 0"),
        ((H, C, 0.1, math.inf), r"^batch_size must be a finite number > 0"),  # returned zeros
        ((H, C, 0.1, True), r"^batch_size must be a finite number > 0"),
        ((H, np.diag([math.nan, 1.0]), 0.1, 4), r"^C must be finite"),
        ((H, np.array([[1.0, 0.5], [0.0, 1.0]]), 0.1, 4), r"^C must be symmetric"),
        ((H, C, 1e300, 1e-300), r"^lr / batch_size .* overflows"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            sgd_stationary_covariance(*args)


def test_stationary_covariance_of_a_singular_c_solves_the_lyapunov_equation() -> None:
    H = np.array([[2.0, 0.4], [0.4, 0.5]])
    C = np.array([[0.3, 0.3], [0.3, 0.3]])  # PSD, rank 1: allowed
    lr, B = 0.1, 4.0
    eye = np.eye(2)
    # ΣH + HΣ = (α/B) C, row-major vec: (I ⊗ Hᵀ + H ⊗ I) vec Σ = vec((α/B) C)
    want = np.linalg.solve(np.kron(eye, H.T) + np.kron(H, eye), (lr / B) * C.reshape(-1))
    got = sgd_stationary_covariance(H, C, lr, B)
    np.testing.assert_allclose(got, want.reshape(2, 2), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- 4: output paths that are folders
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvlab")
    add_subparser(parser.add_subparsers(dest="command"))
    return parser


_SMALL = ["--dim", "50", "--bins", "5", "--batch-sizes", "1,4", "--powers", "0", "--target", "0.2"]


@pytest.mark.parametrize(
    "taken, extra",
    [
        ("nqm_fig3a.png", ["--overwrite"]),
        ("nqm_fig3a.png", []),
        ("nqm_sweep.csv", ["--overwrite"]),
        ("nqm_fig4_ema.png", ["--overwrite", "--no-ema"]),  # the stale figure --no-ema deletes
    ],
)
def test_cli_refuses_an_output_name_taken_by_a_folder_before_the_sweep(
    tmp_path, monkeypatch, taken, extra
) -> None:
    def no_sweep(*args, **kwargs):
        raise AssertionError("the sweep ran before the output names were checked")

    monkeypatch.setattr(nqm_cli, "batch_size_sweep", no_sweep)
    (tmp_path / taken).mkdir()
    args = _parser().parse_args(["nqm", "--out", str(tmp_path), *_SMALL, *extra])
    with pytest.raises(ValueError, match=f"{taken} exists and is a folder") as info:
        args.func(args)
    assert "with or without --overwrite" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken]  # nothing written


def test_cli_help_says_overwrite_no_ema_deletes_the_ema_figure(capsys) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["nqm", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with --no-ema an earlier run's nqm_fig4_ema.png is deleted" in text


def _sweep() -> SweepResult:
    row = OptimalResult(10.0, 0.5, 0.0, 0.0, "sgd", 1.0, 0.0, 0.1, False)
    return SweepResult([row], [1.0], 0.1, [5.0])


def test_csv_and_plot_refuse_a_folder_path_even_with_overwrite(tmp_path) -> None:
    folder = tmp_path / "taken.csv"
    folder.mkdir()
    for overwrite in (True, False):
        with pytest.raises(ValueError, match="taken.csv' .* exists and is a folder"):
            _sweep().to_csv(folder, overwrite=overwrite)
    figure = tmp_path / "taken.png"
    figure.mkdir()
    for overwrite in (True, False):
        with pytest.raises(ValueError, match="taken.png' .* exists and is a folder"):
            plot_sweep(_sweep(), figure, solid="sgd", dashed=None, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.csv", "taken.png"]
    assert not any(folder.iterdir()) and not any(figure.iterdir())


# ---------------------------------------------------------------- 5: from_spectrum of SLQ's 2-D output
_NODES = np.array([[2.0, 0.5, 0.1, 0.0], [1.5, 0.7, 0.05, 0.2]])
_WEIGHTS = np.array([[0.2, 0.3, 0.5, 0.0], [0.1, 0.4, 0.3, 0.2]])  # rows sum to 1; one pad


def test_from_spectrum_takes_rows_of_probes_pooled_as_nqm_prediction_does() -> None:
    dim = 40.0
    model = NQM.from_spectrum(_NODES, _WEIGHTS, dim=dim)
    # nqm_prediction's pooling: flatten the rows, drop weight 0, normalise over all, times dim
    ev, w = _NODES.reshape(-1), _WEIGHTS.reshape(-1)
    keep = w > 0
    h, counts = ev[keep], w[keep] / w[keep].sum() * dim
    np.testing.assert_array_equal(model.h, h)
    np.testing.assert_allclose(model.counts, counts, rtol=1e-15)
    np.testing.assert_array_equal(model.c, h)  # C = H
    for t in (0, 1, 7, 30):
        want = _sgd_risk(h, h, counts, 1.0, 0.3, 4.0, t)
        assert model.risk(t, 0.3, 4.0) == pytest.approx(want, rel=1e-12)


def test_from_spectrum_rows_without_dim_are_the_mean_spectrum() -> None:
    model = NQM.from_spectrum(_NODES, _WEIGHTS)
    keep = _WEIGHTS.reshape(-1) > 0
    np.testing.assert_allclose(model.counts, _WEIGHTS.reshape(-1)[keep] / 2, rtol=1e-15)
    assert model.dim == pytest.approx(1.0, rel=1e-15)  # as one row's SLQ weights
    # one row (spectral_density's shape for one probe) is that row as a 1-D spectrum
    one = NQM.from_spectrum(_NODES[1:], _WEIGHTS[1:], dim=10)
    flat = NQM.from_spectrum(_NODES[1], _WEIGHTS[1], dim=10)
    for name in ("h", "c", "counts", "init_var"):
        np.testing.assert_array_equal(getattr(one, name), getattr(flat, name))


def test_from_spectrum_rows_take_noise_and_init_var_of_their_shape() -> None:
    noise = 2.0 * _NODES
    iv = np.arange(1.0, 9.0).reshape(2, 4)
    model = NQM.from_spectrum(_NODES, _WEIGHTS, noise=noise, init_var=iv, dim=8)
    keep = _WEIGHTS.reshape(-1) > 0
    np.testing.assert_array_equal(model.c, noise.reshape(-1)[keep])
    np.testing.assert_array_equal(model.init_var, iv.reshape(-1)[keep])
    with pytest.raises(ValueError, match=r"^weights must have the shape of eigenvalues \(2, 4\)"):
        NQM.from_spectrum(_NODES, _WEIGHTS.reshape(-1))
    with pytest.raises(ValueError, match=r"^init_var must be a scalar or one value per node"):
        NQM.from_spectrum(_NODES, _WEIGHTS, init_var=np.ones(4))
    bad = _WEIGHTS.copy()
    bad[1, 2] = -0.1
    with pytest.raises(ValueError, match=r"got weights\[1, 2\] = -0.1"):
        NQM.from_spectrum(_NODES, bad)
    with pytest.raises(ValueError, match=r"1-D array, or 2-D with one row per SLQ probe"):
        NQM.from_spectrum(_NODES[None], _WEIGHTS[None])


def test_from_spectrum_of_a_spectral_density() -> None:
    import curvlab as cl

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2))
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    X = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (12,), generator=gen)
    sd = cl.spectral_density(
        model, torch.nn.CrossEntropyLoss(), (X, y), matrix="ggn", num_steps=6, num_probes=2, seed=0
    )
    assert sd.nodes.ndim == 2  # (num_probes, m)
    weights = torch.where(sd.nodes > 0, sd.weights, 0)  # the GGN's zero directions dropped
    D = sum(p.numel() for p in model.parameters())
    nqm = NQM.from_spectrum(sd.nodes, weights, dim=D)
    w = weights.numpy().reshape(-1)
    keep = w > 0
    np.testing.assert_array_equal(nqm.h, sd.nodes.numpy().reshape(-1)[keep])
    np.testing.assert_allclose(nqm.counts, w[keep] / w[keep].sum() * D, rtol=1e-14)


# ---------------------------------------------------------------- 6: bools, strings, arrays
def test_bools_strings_and_arrays_are_not_batch_sizes() -> None:
    nqm = _small()
    num = r"must be a finite number > 0, got "
    for call, match in [
        (lambda: nqm.optimal(True), r"^batch_size " + num + r"True \(bool"),
        (lambda: nqm.optimal("4"), r"^batch_size " + num + r"'4' \(str"),
        (lambda: nqm.risk(3, 0.5, np.array([4.0])), r"^batch_size " + num + r"an array"),
        (lambda: nqm.risk(3, "0.5", 4), r"^lr " + num + r"'0.5' \(str"),
        (lambda: nqm.optimal(4, lr_decades=True), r"^lr_decades " + num + "True"),
        (lambda: nqm.risk(3, 0.5, 4, momentum=False), r"^momentum must be in \[0, 1\)"),
        (lambda: batch_size_sweep(nqm, [True, 2]), r"^batch_sizes must be a non-empty list"),
        (lambda: batch_size_sweep(nqm, ["1", 2]), r"^batch_sizes must be a non-empty list"),
        (lambda: NQM.paper(d=True), r"^d must be an integer >= 1, got True"),
        (lambda: NQM.paper(d=10, bins="3"), r"^bins \(or None\) must be an integer >= 1"),
        (lambda: NQM.paper(d=10, bins=True), r"^bins \(or None\) must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_numpy_numbers_are_batch_sizes() -> None:
    nqm = _small()
    want = nqm.risk(5, 0.5, 4.0)
    for b in (4, np.int64(4), np.float32(4.0), np.array(4.0), torch.tensor(4.0)):
        assert nqm.risk(5, 0.5, b) == want
    assert nqm.optimal(np.int64(4), target=1.0) == nqm.optimal(4, target=1.0)
    sweep = batch_size_sweep(nqm, np.array([1, 4]), ("sgd",), target=1.0)
    assert sweep.batch_sizes == [1.0, 4.0]


def test_a_tiny_batch_size_leaks_no_overflow_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = _small().optimal(1e-300, target=1.0)
    assert res.steps == math.inf  # the noise floor is far above the target
