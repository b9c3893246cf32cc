"""Training-time overhead of ``curvlab.Diagnostics`` (default quantities, every 50 steps).

Workload W2 of shared BENCHMARKS.md (a small CNN on CIFAR-like random data, batch 128, float32,
2 threads): the same SGD training loop with and without Diagnostics, interleaved repeats, median
wall-clock ratio. Target: <= 1.10x. Diagnostics measures Tr(F) (sampled labels), Tr(empirical F),
the gradient norm, the loss and the gradient noise scale on the step's batch every 50 steps.

Usage:
    python benchmarks/bench_hooks.py [--steps 200] [--repeats 3] [--every 50] [--budget 0.05]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import curvlab as cl
from benchmarks.workloads import cifar_like, w2_model
from curvlab.analysis import Diagnostics


def train(steps: int, diag_kwargs: dict | None, batch: int = 128) -> tuple[float, int, list[float]]:
    X, y = cifar_like()
    model = w2_model()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    diag = None
    with tempfile.TemporaryDirectory() as tmp:
        if diag_kwargs is not None:
            diag = Diagnostics(model, loss_fn, log_dir=tmp, **diag_kwargs)
        t0 = time.perf_counter()
        for step in range(steps):
            i = (step * batch) % X.shape[0]
            xb, yb = X[i : i + batch], y[i : i + batch]
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            if diag is not None:
                diag.step(step, xb, yb)
        elapsed = time.perf_counter() - t0
        n = 0 if diag is None else len(diag.records)
        costs = [] if diag is None else [r["cost_s"] for r in diag.records]
        if diag is not None:
            diag.close()
    return elapsed, n, costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(10, None)  # warm up
    train(2, {"every": 1})
    configs = {
        "without": None,
        f"every={args.every}": {"every": args.every},
        f"budget={args.budget}": {"every": None, "budget": args.budget},
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    counts: dict[str, int] = {}
    costs: list[float] = []
    names = list(configs)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            kwargs = configs[name]
            t, n, c = train(args.steps, kwargs)
            times[name].append(t)
            counts[name] = n
            if name == f"every={args.every}":
                costs += c
    base = statistics.median(times["without"])
    print(
        f"W2 small CNN, batch 128, {args.steps} SGD steps, {args.threads} threads, "
        f"median of {args.repeats}; curvlab {cl.__version__}"
    )
    best = min(times["without"])
    print(f"{'loop':<16}{'median s':>10}{'ratio':>8}{'min s':>9}{'ratio':>8}{'measurements':>14}")
    for name in configs:
        med, low = statistics.median(times[name]), min(times[name])
        print(
            f"{name:<16}{med:>10.2f}{med / base:>7.3f}x{low:>9.2f}{low / best:>7.3f}x"
            f"{counts[name]:>14}"
        )
    step_s = base / args.steps
    cost = statistics.median(costs)
    predicted = 1 + cost / (args.every * step_s)
    print(
        f"one measurement: {cost * 1e3:.0f} ms = {cost / step_s:.1f} training steps "
        f"({step_s * 1e3:.1f} ms each) -> expected ratio at every={args.every}: {predicted:.3f}x"
    )
    wall = statistics.median(times[f"every={args.every}"]) / base
    print(
        f"target <= 1.10x for every={args.every}: wall-clock {wall:.3f}x, cost-based "
        f"{predicted:.3f}x (trust the wall-clock ratio only on an otherwise idle machine)"
    )


if __name__ == "__main__":
    main()
