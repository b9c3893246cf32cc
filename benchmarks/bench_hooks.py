"""Training-time overhead of ``curvlab.Diagnostics`` (default quantities, every 50 steps).

Workload W2 of shared BENCHMARKS.md (a small CNN on CIFAR-like random data, batch 128, float32,
2 threads): the same SGD training loop with and without Diagnostics, interleaved repeats, median
wall-clock ratio. Target: <= 1.10x. Diagnostics measures Tr(F) (sampled labels), Tr(empirical F),
the gradient norm, the loss and the gradient noise scale on the step's batch every 50 steps.

Each loop (without Diagnostics, ``every=50``, ``budget=0.05``) has its own model and optimizer,
built once, and one Diagnostics that lives through all its rounds, as in a training run;
``--warmup`` steps of each (its Diagnostics measures on the first of them) run before any timing,
then the loops take turns in ``--repeats`` rounds of ``--steps`` steps, each round in a rotated
order, the step count running on across rounds. The batches are the 8 contiguous batches of the
1024 examples. With ``--quantities sharpness`` the first measurement (in the warm-up) starts
Lanczos cold and the later ones warm-start from the previous one; the products of each are
printed. Then one more measurement gives its peak memory above the memory before it. CUDA: the
allocated memory (``torch.cuda.max_memory_allocated``), in this process, on the ``every`` loop
after the timed loops. CPU: the resident set size, in a fresh process run with
``MALLOC_MMAP_THRESHOLD_=131072`` (so that memory freed by the training steps cannot hide the
measurement's peak; ``benchmarks/_common.py``), on a loop of its own after its ``--warmup`` steps
(whose first one is measured), the same flags as here; ``--no-memory`` skips it.

Flags for the real training step:

* ``--device cuda``: data and model on the GPU; each timed loop is bracketed by
  ``torch.cuda.synchronize()`` (Diagnostics itself does not synchronise between measurements).
* ``--autocast {none,bf16,fp16}``: the forward and loss run under
  ``torch.autocast(device_type, dtype)`` in every loop; Diagnostics is called after the step,
  outside it, as in a user's loop (its own passes run in float32 anyway).
* ``--compile``: the W2 model is ``torch.compile(model)`` (``--backend``, default inductor) in
  every loop, and Diagnostics receives the compiled model; the target is then the compiled loop
  with Diagnostics against the same compiled loop without it. ``--compile-step`` also compiles
  the whole training step (zero_grad, forward, loss, backward, optimizer step) as one function.
  The warm-up (default 30 steps when compiling, 10 otherwise) absorbs the compilation, including
  any recompilation after Diagnostics' first measurement; the printout says how many warm-up steps
  ran, how long they took, and how many graphs were compiled during the timed loops (should be 0).

Usage:
    python benchmarks/bench_hooks.py [--steps 200] [--repeats 3] [--every 50] [--budget 0.05]
        [--device cuda] [--autocast bf16] [--compile [--compile-step] [--backend inductor]]
        [--warmup N]

The last line is a ``SUMMARY | ...`` line that ``benchmarks/gpu.sh`` collects.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import curvlab as cl
from benchmarks._common import (
    CPU_PEAK_METHOD,
    add_device_args,
    autocast,
    cpu_memory_env,
    cpu_peak_mib,
    cuda_peak_mib,
    precision,
    resolve_device,
    summary,
    synchronizer,
)
from benchmarks.workloads import cifar_like, w2_model
from curvlab.analysis import Diagnostics


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled so far in this process (0 when dynamo is not loaded)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Loop:
    """One W2 training loop: its own model (compiled or not), optimizer and batches."""

    def __init__(
        self,
        device: torch.device,
        batch: int = 128,
        amp: str = "none",
        compile_model: bool = False,
        compile_step: bool = False,
        backend: str = "inductor",
    ) -> None:
        X, y = cifar_like()
        X, y = X.to(device), y.to(device)
        # contiguous batches of their own: a compiled graph sees the same input layout every step
        self.batches = [
            (X[i : i + batch].contiguous(), y[i : i + batch].contiguous())
            for i in range(0, X.shape[0] - batch + 1, batch)
        ]
        self.device, self.amp = device, amp
        model = w2_model().to(device)
        self.model = torch.compile(model, backend=backend) if compile_model else model
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.train_step = (
            torch.compile(self._train_step, backend=backend) if compile_step else self._train_step
        )
        self.sync = synchronizer(device)
        self.hvps: list[int] = []  # of every "sharpness" measurement of this loop, in order
        self.diag: Diagnostics | None = None  # one per loop, as in a training run
        self.steps_done = 0
        self._logs = tempfile.TemporaryDirectory()

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.opt.zero_grad()
        with autocast(self.device, self.amp):
            loss = self.loss_fn(self.model(xb), yb)
        loss.backward()
        self.opt.step()

    def run(
        self, steps: int, diag_kwargs: dict | None, persist: bool = True
    ) -> tuple[float, int, list[float]]:
        """``steps`` training steps, measured by this loop's Diagnostics if ``diag_kwargs`` is given.

        The loop's Diagnostics is created on its first run and kept (``persist``), as one
        Diagnostics lives through a whole training run: the first measurement (in the warm-up)
        starts cold, the later ones warm-start from it. ``persist=False``: a throwaway
        Diagnostics for this run alone. Returns the wall-clock seconds, the number of
        measurements in this run and their costs; the products of each ``"sharpness"``
        measurement are appended to :attr:`hvps`.
        """
        diag = None
        if diag_kwargs is not None:
            if not persist:
                diag = Diagnostics(self.model, self.loss_fn, log_dir=self._logs.name, **diag_kwargs)
            else:
                if self.diag is None:
                    self.diag = Diagnostics(
                        self.model, self.loss_fn, log_dir=self._logs.name, **diag_kwargs
                    )
                diag = self.diag
        before = 0 if diag is None else len(diag.records)
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step = self.steps_done
            xb, yb = self.batches[step % len(self.batches)]
            self.train_step(xb, yb)
            if diag is not None:
                diag.step(step, xb, yb)
            self.steps_done += 1
        self.sync()
        elapsed = time.perf_counter() - t0
        new = [] if diag is None else diag.records[before:]
        for r in new:
            if r["values"].get("sharpness_hvps") is not None:
                self.hvps.append(r["values"]["sharpness_hvps"])
        if diag is not None and not persist:
            diag.close()
        return elapsed, len(new), [r["cost_s"] for r in new]

    def close(self) -> None:
        if self.diag is not None:
            self.diag.close()
        self._logs.cleanup()


def diag_extra(args: argparse.Namespace) -> dict:
    """The Diagnostics keywords besides the schedule (``optimizer`` is set per loop)."""
    extra: dict = {} if args.quantities is None else {"quantities": args.quantities}
    if args.quantities is not None and any("sharpness" in q for q in args.quantities):
        extra["optimizer"] = None  # set per loop (the loop's own optimizer)
    return extra


def memory_child(args: argparse.Namespace, warmup: int) -> None:
    """CPU, in a process run with ``cpu_memory_env``: one measurement's peak memory, as JSON.

    A loop of its own with the ``every`` configuration runs ``warmup`` steps (its Diagnostics
    measures on the first, and compiles with ``--compile``), then one more measurement is taken
    on the first batch.
    """
    torch.set_num_threads(args.threads)
    loop = Loop(
        torch.device("cpu"),
        args.batch,
        args.autocast,
        args.compile,
        args.compile_step,
        args.backend,
    )
    kwargs = {"every": args.every, **diag_extra(args)}
    if "optimizer" in kwargs:
        kwargs["optimizer"] = loop.opt
    loop.run(warmup, kwargs)
    xb, yb = loop.batches[0]
    peak = cpu_peak_mib(lambda: loop.diag.measure(loop.steps_done, xb, yb))
    loop.close()
    print(json.dumps({"mib": peak}))


def cpu_measurement_peak(warmup: int) -> float:
    """:func:`memory_child` run in a fresh process with this run's flags (``nan`` if it fails)."""
    proc = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--memory-child"],
        capture_output=True,
        text=True,
        timeout=900,
        env=cpu_memory_env(),
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  (the peak-memory process failed: {last})", file=sys.stderr)
        return float("nan")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--quantities",
        nargs="+",
        default=None,
        help="Diagnostics quantities (default: its defaults), e.g. --quantities sharpness",
    )
    add_device_args(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the W2 model")
    parser.add_argument(
        "--compile-step",
        action="store_true",
        help="with --compile: also torch.compile the whole training step",
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps of each loop first (default 30 with --compile, else 10)",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the measurement's peak memory"
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_step and not args.compile:
        parser.error("--compile-step needs --compile")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    warmup = args.warmup if args.warmup is not None else (30 if args.compile else 10)
    if args.memory_child:
        memory_child(args, warmup)
        return
    extra = diag_extra(args)
    configs = {
        "without": None,
        f"every={args.every}": {"every": args.every, **extra},
        f"budget={args.budget}": {"every": None, "budget": args.budget, **extra},
    }
    loops = {
        name: Loop(device, args.batch, args.autocast, args.compile, args.compile_step, args.backend)
        for name in configs
    }
    for name, kwargs in configs.items():
        if kwargs is not None and "optimizer" in kwargs:
            kwargs["optimizer"] = loops[name].opt
    t_warm = time.perf_counter()
    graphs_start = graphs_compiled()
    for name, kwargs in configs.items():  # compilation, caches, the first measurement
        loops[name].run(warmup, kwargs)
    if not args.compile:  # the measurement's own code paths once more
        loops["without"].run(2, {"every": 1}, persist=False)
    t_warm = time.perf_counter() - t_warm
    graphs_before = graphs_compiled()
    times: dict[str, list[float]] = {k: [] for k in configs}
    counts: dict[str, int] = {}
    costs: list[float] = []
    names = list(configs)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            t, n, c = loops[name].run(args.steps, configs[name])
            times[name].append(t)
            counts[name] = n
            if name == f"every={args.every}":
                costs += c
    recompiled = graphs_compiled() - graphs_before
    if args.compile:
        loop_kind = f"torch.compile(model, backend={args.backend!r})" + (
            " + compiled training step" if args.compile_step else ""
        )
    else:
        loop_kind = "eager"
    prec = precision(args.autocast)
    base = statistics.median(times["without"])
    print(
        f"W2 small CNN, batch {args.batch}, {args.steps} SGD steps, {device}, {prec}, "
        f"{loop_kind}, {args.threads} threads, median of {args.repeats}; curvlab {cl.__version__}"
    )
    print(
        f"warm-up: {warmup} untimed steps of each of the {len(configs)} loops before timing "
        f"({t_warm:.1f} s in all{', compilation included' if args.compile else ''})"
    )
    if args.compile:
        print(
            f"graphs compiled: {graphs_before - graphs_start} during the warm-up, "
            f"{recompiled} during the timed loops "
            + (
                "(none: the warm-up absorbed all compilation)"
                if recompiled == 0
                else "(RECOMPILED: TORCH_LOGS=recompiles says why)"
            )
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
    cost = statistics.median(costs) if costs else float("nan")
    predicted = 1 + cost / (args.every * step_s)
    print(
        f"one measurement: {cost * 1e3:.0f} ms = {cost / step_s:.1f} training steps "
        f"({step_s * 1e3:.1f} ms each) -> expected ratio at every={args.every}: {predicted:.3f}x"
    )
    measured = loops[f"every={args.every}"]
    if args.no_memory:
        pass
    elif device.type == "cuda" and measured.diag is not None:  # one more measurement, in here
        xb, yb = measured.batches[0]

        def one() -> None:
            measured.diag.measure(measured.steps_done, xb, yb)

        peak = cuda_peak_mib(one)
        print(
            f"one measurement's peak memory: {peak:.1f} MiB above the memory before it (CUDA: "
            "torch.cuda.max_memory_allocated, in this process, after the timed loops)"
        )
    elif device.type == "cpu":
        peak = cpu_measurement_peak(warmup)
        print(
            f"one measurement's peak memory: {peak:.1f} MiB above the memory before it "
            f"({CPU_PEAK_METHOD}, after {warmup} training steps of its own loop there)"
        )
    hvps = measured.hvps
    if len(hvps) > 1:  # "sharpness": the loop's first measurement is cold, the later ones warm
        cold, warm = hvps[0], statistics.median(hvps[1:])
        print(
            f"sharpness products: cold (the loop's first measurement) {cold}, warm-started "
            f"median {warm:.0f} over {len(hvps) - 1} -> {warm / cold:.2f}x (target <= 0.33x); "
            f"all: {hvps} (against cold starts at the same parameters: "
            "benchmarks/bench_sharpness_warm.py)"
        )
        summary("bench_hooks", "sharpness warm-started / cold products [W2]", warm / cold, 1 / 3)
    wall = statistics.median(times[f"every={args.every}"]) / base
    print(
        f"target <= 1.10x for every={args.every}: wall-clock {wall:.3f}x, cost-based "
        f"{predicted:.3f}x (trust the wall-clock ratio only on an otherwise idle machine)"
    )
    summary(
        "bench_hooks",
        f"Diagnostics every={args.every} / same loop without [W2 batch {args.batch}, {device}, "
        f"{prec}, {'compiled' if args.compile else 'eager'}"
        f"{' step' if args.compile_step else ''}]",
        wall,
        1.10,
    )
    for loop in loops.values():
        loop.close()


if __name__ == "__main__":
    main()
