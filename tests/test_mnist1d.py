"""MNIST-1D: offline generation and cache, the reference models, the demo on it, and the three
reproduction scripts' --quick modes (examples/mnist1d_*.py)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlab.demo.mnist1d import load_mnist1d, mnist1d_cnn, mnist1d_mlp

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mnist1d")
    load_mnist1d(folder)
    return folder


def test_generated_offline_cached_and_global_rng_untouched(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D must be generated without network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    import requests

    monkeypatch.setattr(requests, "get", no_network)
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    (X, y), (Xt, yt) = load_mnist1d(tmp_path)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert X.shape == (4000, 40) and Xt.shape == (1000, 40)
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    assert abs(float(torch.cat([X, Xt]).mean())) < 0.05  # the package standardises the signals
    path = tmp_path / "mnist1d_seed42.npz"
    assert path.is_file()
    (X2, y2), (Xt2, yt2) = load_mnist1d(tmp_path)  # from the cache
    assert torch.equal(X, X2) and torch.equal(y, y2) and torch.equal(Xt, Xt2)
    path.write_bytes(b"corrupt")  # a broken cache is rebuilt, not fatal
    (X3, _), _ = load_mnist1d(tmp_path)
    assert torch.equal(X, X3)


def test_models_are_seeded_locally():
    state = torch.random.get_rng_state()
    a, b, c = mnist1d_cnn(seed=0), mnist1d_cnn(seed=0), mnist1d_cnn(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert pa.numel() == 5210 and torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a(torch.zeros(2, 40)).shape == (2, 10)
    assert mnist1d_mlp(seed=0)(torch.zeros(2, 40)).shape == (2, 10)


@pytest.mark.parametrize("kind", ["diag", "trace", "full"])
def test_noisy_training_releases_its_model(kind):
    """A finished NoisyOptimizer run must not keep its model, graphs and activations alive (the
    captured loss output used to close an uncollectable cycle through the autograd graph: 15 GB
    over the 48 noisy runs of mnist1d_wen_table2.py)."""
    import gc
    import weakref

    from torch import nn

    from curvlab.noise import DiagFisherNoise, FisherTraceNoise, FullFisherNoise, NoisyOptimizer

    def run() -> weakref.ref:
        model, loss_fn = mnist1d_cnn(seed=0), nn.CrossEntropyLoss()
        sampler = {"diag": DiagFisherNoise, "trace": FisherTraceNoise, "full": FullFisherNoise}[
            kind
        ]("empirical", large_batch=64, small_batch=8)
        sgd = torch.optim.SGD(model.parameters(), lr=0.01)
        noisy = NoisyOptimizer(sgd, sampler, model, loss_fn, seed=0)
        X, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
        for _ in range(3):

            def closure():
                noisy.zero_grad()
                loss = loss_fn(model(X), y)
                loss.backward()
                return loss

            noisy.step(closure)
        return weakref.ref(model)

    ref = run()
    gc.collect()
    assert ref() is None


def test_demo_on_mnist1d_reports_settings_and_spread(tmp_path, cache, monkeypatch):
    from dataclasses import replace

    from curvlab.demo import DemoConfig, run_demo

    torch.set_num_threads(1)
    cfg = replace(DemoConfig.quick(), seeds=2, data_dir=str(cache))
    report = run_demo(tmp_path / "demo", cfg, progress=False)
    for entry in report.entries:
        v = entry["values"]
        assert 0 <= v["test_accuracy_mean"] <= 1 and v["test_accuracy_std"] >= 0
    assert "MNIST-1D" in report.meta["demo_data"] and "256 training" in report.meta["demo_data"]
    assert "M_S = 32" in report.meta["demo_settings"]
    head = report.meta["demo_headline"]
    assert head.startswith("test accuracy (mean ± std over 2 seeds)")
    assert all(name in head for name in ("SB", "LB", "LB+diag-Fisher", "LB+full-Fisher"))
    assert report.histories["LB"]["lr"] == cfg.lb_lr and report.histories["SB"]["lr"] == cfg.lr
    assert (tmp_path / "demo" / "diagnostics" / "seed1" / "SB" / "metrics.jsonl").exists()
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["meta"]["demo_headline"] == head


def _run_script(name: str, out: Path, cache: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--quick", "--out", str(out)]
        + ["--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_wen_table2_quick(tmp_path, cache):
    out = tmp_path / "wen"
    stdout = _run_script("mnist1d_wen_table2.py", out, cache)
    assert "| LB + diag Fisher |" in stdout
    d = json.loads((out / "wen_table2.json").read_text())
    assert set(d["chosen"]) == {
        "SB",
        "LB",
        "LB + Fisher trace",
        "LB + diag Fisher",
        "LB + full Fisher",
    }
    for c in d["chosen"].values():
        assert len(c["test_accuracy"]) == 2 and c["lr"] > 0
        assert all(np.isfinite(c["top_hessian_eigenvalue"]))
    run = d["runs"][0]
    assert len(run["fisher_norms"]["frobenius"]) >= 2
    assert all(
        f >= g for f, g in zip(run["fisher_norms"]["frobenius"], run["fisher_norms"]["diag"])
    )
    assert len(d["reference_cnn"]) == 2
    for f in ("wen_table2.png", "wen_fig5.png", "wen_table2.md"):
        assert (out / f).stat().st_size > 100


def test_fisher_explosion_quick(tmp_path, cache):
    out = tmp_path / "fe"
    stdout = _run_script("mnist1d_fisher_explosion.py", out, cache)
    assert "small lr + GP_x" in stdout
    d = json.loads((out / "fisher_explosion.json").read_text())
    assert len(d["summary"]) == 6  # small lr, tuned lr, FP, GP, GP_x, GP_r
    for s in d["summary"].values():
        assert len(s["test_accuracy"]) == 2 and all(v > 0 for v in s["early_peak_trace_fisher"])
    for f in ("fisher_explosion.png", "fisher_explosion.md"):
        assert (out / f).stat().st_size > 100


def test_critical_batch_quick(tmp_path, cache):
    out = tmp_path / "cb"
    stdout = _run_script("mnist1d_critical_batch.py", out, cache)
    assert "measured critical batch size" in stdout
    d = json.loads((out / "critical_batch.json").read_text())
    assert set(d["steps"]) == {"SGD", "SGD + momentum 0.9", "Adam"}
    assert set(d["nqm"]["predicted"]) == set(d["steps"])
    assert all(v > 0 for v in d["nqm"]["predicted"].values())
    assert d["nqm"]["analyze_critical_batch_size"]  # the NQM prediction cl.analyze makes
    for f in ("critical_batch.png", "critical_batch.md"):
        assert (out / f).stat().st_size > 100
