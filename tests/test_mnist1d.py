"""MNIST-1D: offline generation and cache, the reference models, the demo on it, and the three
reproduction scripts' --quick modes (examples/mnist1d_*.py)."""

from __future__ import annotations

import html
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
    from curvlab.demo._train import RUNS

    cfg = replace(DemoConfig.quick(), seeds=2, data_dir=str(cache), runs=RUNS)  # full Fisher too
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
    # 2 epochs: LB cannot fit the data, and the regime says so (the report's top says the same)
    regime = report.meta["demo_regime"]
    assert "means over 2 seeds" in regime and "not expected to help" in regime
    assert "LB+full-Fisher - LB test accuracy" in regime
    page = (tmp_path / "demo" / "report.html").read_text()
    assert html.escape(regime) in page and html.escape(head) in page


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
    assert "| LB+diag |" in stdout and "Verdict:" in stdout
    d = json.loads((out / "mnist1d_wen_table2.json").read_text())
    s = d["settings"]
    assert s["seeds"] == [0, 1] and s["lb_updates"] == 3 * 3500 // 512
    methods = {"SB", "LB", "LB+trace", "LB+diag"}
    assert set(s["chosen_lr"]) == methods
    for m in methods:  # every method at its tuned lr, every seed
        rs = [r for r in d["runs"] if r["method"] == m and r["tuned_lr"]]
        assert sorted(r["seed"] for r in rs) == [0, 1] and all(r["lr"] > 0 for r in rs)
    for m in ("LB+trace", "LB+diag"):  # and at LB's lr (the Fig. 3 convention)
        rs = [r for r in d["runs"] if r["method"] == m and r["lr_at_lb"]]
        assert sorted(r["seed"] for r in rs) == [0, 1] and rs[0]["lr"] == s["lb_lr"]
    full = [r for r in d["runs"] if r["method"] == "LB+full"]  # once: seed 0, LB+diag's lr
    assert [(r["seed"], r["lr"]) for r in full] == [(0, s["chosen_lr"]["LB+diag"])]
    for r in d["runs"]:
        assert r["updates"] == (s["sb_updates"] if r["method"] == "SB" else s["lb_updates"])
        assert 0 <= r["train_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1
        assert np.isfinite(r["top_hessian_eigenvalue"]) and r["temperature"] > 0
        assert r["noisy_updates"] == (int(0.25 * r["updates"]) if "+" in r["method"] else 0)
    assert {t["method"] for t in d["tuning"]} == methods and all(
        t["seed"] == 0 for t in d["tuning"]
    )
    run = next(r for r in d["runs"] if r["seed"] == 0)
    assert len(run["fisher_norms"]["frobenius"]) >= 2
    assert all(
        f >= g for f, g in zip(run["fisher_norms"]["frobenius"], run["fisher_norms"]["diag"])
    )
    v = d["verdict"]
    assert v["outcome"] in ("confirms", "refutes", "inconclusive", "untestable")
    assert "sb_minus_lb" in v["preconditions"] and "diag_minus_lb_se" in v
    for f in ("mnist1d_wen_table2.png", "mnist1d_wen_fig5.png", "mnist1d_wen_table2.md"):
        assert (out / f).stat().st_size > 100


def test_fisher_explosion_quick(tmp_path, cache):
    out = tmp_path / "fe"
    stdout = _run_script("mnist1d_fisher_explosion.py", out, cache)
    assert "| eta*/10 + FP |" in stdout and "verdict:" in stdout
    d = json.loads((out / "mnist1d_fisher_explosion.json").read_text())
    assert d["settings"]["seeds"] == [0, 1] and d["settings"]["batch"] == 128
    assert d["settings"]["small_lr"] == pytest.approx(d["settings"]["eta_star"] / 10)
    methods = {r["method"] for r in d["runs"]}
    assert methods == {"baseline", "FP", "GP_r", "GP"}
    assert len(d["runs"]) == 5 * 2  # eta*, eta*/10, FP, GP_r, GP at seeds 0 and 1
    for r in d["runs"]:
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1
        assert r["max_trace_fisher"] > 0 and len(r["trace_fisher"]) >= 3
    assert {r["tuned"] for r in d["tuning"]} == {"lr", "FP", "GP_r", "GP"}
    v = d["verdict"]
    assert v["outcome"] in {"confirms", "refutes", "partly", "untestable"}
    assert set(v["penalties"]) == {"FP", "GP_r", "GP"}
    assert (out / "mnist1d_fisher_explosion.png").stat().st_size > 100


def test_critical_batch_quick(tmp_path, cache):
    out = tmp_path / "cb"
    stdout = _run_script("mnist1d_critical_batch.py", out, cache)
    assert "measured critical batch size" in stdout
    d = json.loads((out / "mnist1d_critical_batch.json").read_text())
    assert d["settings"]["seeds"] == [0, 1]
    targets = [f"{t:g}" for t in d["settings"]["targets_validation_accuracy"]]
    assert len(targets) == 2
    methods = {"SGD", "momentum", "Adam"}
    assert {r["method"] for r in d["runs"]} == methods
    for r in d["runs"]:  # chosen settings only: every run is chosen for some target
        assert r["chosen_for"] and r["lr"] > 0 and r["seed"] in (0, 1)
        assert set(r["steps_to_target"]) == set(targets)
    for m in methods:  # every (method, batch size, seed, target) has exactly one run
        for b in d["settings"]["batch_sizes"]:
            for seed in (0, 1):
                for t in targets:
                    hits = [
                        r
                        for r in d["runs"]
                        if (r["method"], r["batch_size"], r["seed"]) == (m, b, seed)
                        and t in r["chosen_for"]
                    ]
                    assert len(hits) == 1
    # the lr search: seed 0 only, and at least a 3-point window per method and batch size
    assert all(r["seed"] == 0 for r in d["tuning"])
    for m in methods:
        for b in d["settings"]["batch_sizes"]:
            assert (
                len({r["lr"] for r in d["tuning"] if (r["method"], r["batch_size"]) == (m, b)}) >= 3
            )
    ms = d["nqm"]["measured_spectrum"]
    assert ms["analyze_critical_batch_size"]  # the NQM prediction cl.analyze makes
    for sw in (ms["sweep"], d["nqm"]["paper"]["sweep"]):
        for p in ("0", "0.25", "0.5"):
            for label in ("sgd", "momentum beta<=0.9999", "momentum beta<=0.9"):
                curve = sw["curves"][f"{label} p={p}"]
                assert len(curve["steps"]) == len(sw["batch_sizes"])
            assert max(sw["curves"][f"momentum beta<=0.9 p={p}"]["momentum"]) <= 0.9 + 1e-12
    assert set(d["verdict"]) == set(targets)
    for v in d["verdict"].values():  # a verdict with its numbers, or why there is none
        if "note" in v:
            continue
        for entry in v["measured spectrum, beta<=0.9"].values():
            assert entry["verdict"] in {"confirms", "refutes", "inconclusive", "untestable"} or (
                entry["verdict"].startswith("inconclusive")
            )
            assert "factor" in entry and "predicted" in entry
    assert (out / "mnist1d_critical_batch.png").stat().st_size > 100


def test_edge_of_stability_quick_honours_seed_and_explicit_options(tmp_path, cache):
    """--quick keeps options given explicitly (it replaced them) and --seed reaches the runs (it
    was ignored)."""
    outs = []
    for seed in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
        out = tmp_path / f"eos{seed}"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "edge_of_stability.py"), "--quick"]
            + ["--out", str(out), "--cache-dir", str(cache), "--seed", str(seed)]
            + ["--steps", "12", "--lrs", "0.1"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout)
        settings = json.loads((out / "edge_of_stability.json").read_text())["settings"]
        assert (settings["seed"], settings["steps"], settings["lrs"]) == (seed, 12, [0.1])
        assert (settings["examples"], settings["every"]) == (200, 5)  # the quick values
    assert outs[0] != outs[1]  # another seed, another model
