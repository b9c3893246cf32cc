"""Training-step cost of curvlab's noise samplers relative to a plain large-batch SGD step.

Workload: W2 of BENCHMARKS.md (cnn-cifar-like, 136,874 parameters) at batch 512, float32,
``torch.set_num_threads(2)``, CPU (and CUDA when available, with ``--device cuda``). Every variant
runs the same loop, ``zero_grad -> forward -> loss -> backward -> step``, through
``NoisyOptimizer.step(closure)`` (the one-pass path) unless marked "separate pass".
Variants are timed in interleaved rounds (each variant takes one step per round and is compared
with the same round's plain SGD step, so drifts of the machine's load cancel); the table shows the median and the mean ratio (the mean includes the
K-FAC recomputation every 10 steps, i.e. the amortised cost).

Run: ``python benchmarks/bench_noise.py [--rounds 20] [--batch 512] [--device cpu]``.

Flags for the GPU training step:

* ``--device cuda``: every timed step is bracketed by ``torch.cuda.synchronize()``; the table then
  also shows each variant's memory: ``state MiB`` (its model, optimizer and sampler state, as
  allocated after its warm-up) and ``peak MiB`` (that plus the largest transient
  ``torch.cuda.max_memory_allocated`` of one of its steps). On the CPU these columns show ``-``.
* ``--autocast {none,bf16,fp16}`` (default none): every variant's forward and loss run under
  ``torch.autocast(device_type, dtype)`` (the backward and the step after it, as PyTorch
  recommends), and the baseline is then a plain autocast SGD step in the same rounds. Target:
  ``DiagFisherNoise(empirical)`` step under bf16 autocast <= 1.5x a plain autocast step. fp16 runs
  without a ``GradScaler`` (a timing run only).

The last lines are ``SUMMARY | ...`` lines (one per target) that ``benchmarks/gpu.sh`` collects.
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

from benchmarks._common import (
    add_device_args,
    autocast,
    precision,
    resolve_device,
    summary,
    synchronizer,
)
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

    def __init__(
        self,
        make_sampler,
        options: dict,
        path: str,
        X,
        y,
        device: torch.device,
        amp: str = "none",
    ) -> None:
        self.device, self.amp = device, amp
        self.peak_mib = 0.0  # the largest transient CUDA allocation of one step (above its start)
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
        with autocast(self.device, self.amp):  # the user's autocast region: forward and loss
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
        cuda = self.device.type == "cuda"
        sync()
        if cuda:  # host-side counters: nothing here waits for the device
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        elapsed = (time.perf_counter() - start) / steps
        if cuda:
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            self.peak_mib = max(self.peak_mib, peak)
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    add_device_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sync = synchronizer(device)
    X, y = w2_batch(args.batch)
    X, y = X.to(device), y.to(device)
    runners: dict[str, Runner] = {}
    state_mib: dict[str, float] = {}
    if cuda:  # a throwaway step first: cuBLAS/cuDNN workspaces count in no variant's state
        Runner(None, {}, "closure", X, y, device, args.autocast).block(2, sync)
    for name, spec in variants().items():
        sync()
        before = torch.cuda.memory_allocated() if cuda else 0
        runners[name] = r = Runner(*spec, X, y, device, args.autocast)
        r.block(2, sync)  # warm-up (and the sampler's state, allocated by its first steps)
        if cuda:
            state_mib[name] = (torch.cuda.memory_allocated() - before) / 2**20
            r.peak_mib = 0.0
    ratios: dict[str, list[float]] = {name: [] for name in runners}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):  # one step of every variant per round: load drifts cancel
        base = runners["SGD (no noise)"].block(1, sync)
        for name, r in runners.items():
            t = base if name == "SGD (no noise)" else r.block(1, sync)
            times[name].append(t)
            ratios[name].append(t / base)
    prec = precision(args.autocast)
    print(
        f"W2 cnn-cifar-like, batch {args.batch}, {device}, {prec}, {torch.get_num_threads()} "
        f"threads, {args.rounds} interleaved rounds (every variant does one step per round, "
        f"ratios to the same round's plain {prec} SGD step)"
    )
    print(
        f"{'variant':44s} {'ms/step':>8s} {'median':>7s} {'mean':>6s} {'target':>14s} "
        f"{'state MiB':>10s} {'peak MiB':>9s}"
    )
    for name, r in runners.items():
        med, mean = statistics.median(ratios[name]), statistics.fmean(ratios[name])
        target = TARGETS.get(name)
        mark = ""
        if target is not None:
            # amortised targets (recomputation every k steps) use the mean over all steps
            value = mean if "every" in name else med
            mark = f"<= {target:.1f} " + ("ok" if value <= target else "MISSED")
        if cuda:
            mem = f"{state_mib[name]:10.1f} {state_mib[name] + r.peak_mib:9.1f}"
        else:
            mem = f"{'-':>10s} {'-':>9s}"
        print(
            f"{name:44s} {1e3 * statistics.median(times[name]):8.1f} {med:7.2f} {mean:6.2f} "
            f"{mark:>14s} {mem}"
        )
    where = f"W2 batch {args.batch}, {device}"
    if args.autocast != "none":
        ratio = statistics.median(ratios["DiagFisherNoise(empirical)"])
        print(
            f"target: DiagFisherNoise(empirical) step under {args.autocast} autocast <= 1.5x a "
            f"plain {args.autocast} autocast SGD step: {ratio:.2f}x "
            + ("ok" if ratio <= 1.5 else "MISSED")
        )
    for name, target in TARGETS.items():
        agg = statistics.fmean if "every" in name else statistics.median
        summary(
            "bench_noise",
            f"{name} step / plain SGD step ({'mean' if 'every' in name else 'median'}) "
            f"[{where}, {prec}]",
            agg(ratios[name]),
            target,
        )


if __name__ == "__main__":
    main()
