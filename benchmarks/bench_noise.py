"""Training-step cost of curvlab's noise samplers relative to a plain large-batch SGD step.

Workload: W2 of BENCHMARKS.md (cnn-cifar-like, 136,874 parameters) at batch 512, float32,
``torch.set_num_threads(2)``, CPU (and CUDA when available, with ``--device cuda``). Every variant
runs the same loop, ``zero_grad -> forward -> loss -> backward -> step``, through
``NoisyOptimizer.step(closure)`` (the one-pass path) unless marked "separate pass".
Variants are timed in interleaved rounds (each variant takes one step per round and is compared
with the same round's plain SGD step, so drifts of the machine's load cancel); the table shows the median and the mean ratio (the mean includes the
K-FAC recomputation every 10 steps, i.e. the amortised cost).

Run: ``python benchmarks/bench_noise.py [--rounds 20] [--batch 512] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.workloads import w2_model
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    MultiplicativeNoise,
    NoisyOptimizer,
)

TARGETS = {
    "DiagFisherNoise(empirical)": 1.5,
    "FullFisherNoise(true)": 2.2,
    "KFACNoise(empirical), every 10": 1.5,
}


def w2_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(max(batch, 1024), 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (max(batch, 1024),), generator=gen)
    return X[:batch], y[:batch]


def variants() -> dict[str, tuple[Callable[[], object] | None, dict, str]]:
    lb, sb = 512, 128
    return {
        "SGD (no noise)": (None, {}, "closure"),
        "DiagFisherNoise(empirical)": (
            lambda: DiagFisherNoise(large_batch=lb, small_batch=sb),
            {},
            "closure",
        ),
        "DiagFisherNoise(empirical), separate pass": (
            lambda: DiagFisherNoise(large_batch=lb, small_batch=sb),
            {},
            "inputs",
        ),
        "DiagFisherNoise(mc)": (
            lambda: DiagFisherNoise("mc", large_batch=lb, small_batch=sb),
            {},
            "closure",
        ),
        "FisherTraceNoise(empirical)": (
            lambda: FisherTraceNoise(large_batch=lb, small_batch=sb),
            {},
            "closure",
        ),
        "FullFisherNoise(true)": (
            lambda: FullFisherNoise("true", large_batch=lb, small_batch=sb),
            {},
            "closure",
        ),
        "FullFisherNoise(true), separate pass": (
            lambda: FullFisherNoise("true", large_batch=lb, small_batch=sb),
            {},
            "inputs",
        ),
        "FullFisherNoise(empirical)": (
            lambda: FullFisherNoise("empirical", large_batch=lb, small_batch=sb),
            {},
            "closure",
        ),
        "KFACNoise(empirical), every 10": (
            lambda: KFACNoise(large_batch=lb, small_batch=sb),
            {"recompute_every": 10},
            "closure",
        ),
        "KFACNoise(mc), every 10": (
            lambda: KFACNoise("mc", large_batch=lb, small_batch=sb),
            {"recompute_every": 10},
            "closure",
        ),
        "IsotropicNoise": (lambda: IsotropicNoise(0.01), {}, "closure"),
        "MultiplicativeNoise": (lambda: MultiplicativeNoise(0.1), {}, "closure"),
    }


class Runner:
    """One model + optimizer (+ NoisyOptimizer) that can run blocks of training steps."""

    def __init__(self, make_sampler, options: dict, path: str, X, y, device: torch.device) -> None:
        self.model = w2_model().to(device)
        self.loss_fn = nn.CrossEntropyLoss()
        self.X, self.y = X, y
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.noisy = None
        if make_sampler is not None:
            self.noisy = NoisyOptimizer(
                self.opt, make_sampler(), self.model, self.loss_fn, seed=0, **options
            )
        self.path = path

    def closure(self):
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(self.X), self.y)
        loss.backward()
        return loss

    def step(self) -> None:
        if self.noisy is None:
            self.closure()
            self.opt.step()
        elif self.path == "closure":
            self.noisy.step(self.closure)
        else:
            self.closure()
            self.noisy.step(inputs=self.X, targets=self.y)

    def block(self, steps: int, sync: Callable[[], None]) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    X, y = w2_batch(args.batch)
    X, y = X.to(device), y.to(device)
    runners = {name: Runner(*spec, X, y, device) for name, spec in variants().items()}
    for r in runners.values():  # warm-up
        r.block(2, sync)
    ratios: dict[str, list[float]] = {name: [] for name in runners}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):  # one step of every variant per round: load drifts cancel
        base = runners["SGD (no noise)"].block(1, sync)
        for name, r in runners.items():
            t = base if name == "SGD (no noise)" else r.block(1, sync)
            times[name].append(t)
            ratios[name].append(t / base)
    print(
        f"W2 cnn-cifar-like, batch {args.batch}, {device}, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds (every variant does one step per round, ratios to the "
        "same round's SGD step)"
    )
    print(f"{'variant':44s} {'ms/step':>8s} {'median':>7s} {'mean':>6s} {'target':>14s}")
    for name in runners:
        med, mean = statistics.median(ratios[name]), statistics.fmean(ratios[name])
        target = TARGETS.get(name)
        mark = ""
        if target is not None:
            # amortised targets (recomputation every k steps) use the mean over all steps
            value = mean if "every" in name else med
            mark = f"<= {target:.1f} " + ("ok" if value <= target else "MISSED")
        print(
            f"{name:44s} {1e3 * statistics.median(times[name]):8.1f} {med:7.2f} {mean:6.2f} "
            f"{mark:>14s}"
        )


if __name__ == "__main__":
    main()
