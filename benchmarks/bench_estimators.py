"""Benchmark curvlab's matrix-free estimators on workloads W1 and W2 (see BENCHMARKS.md).

Measures on the first batch, float32, CPU, 2 threads:

* top-1 Hessian eigenvalue: Lanczos (``tol=1e-4``) against plain power iteration stopped by an oracle
  the moment its Rayleigh quotient is within 1e-4, 1e-5 or 1e-6 (relative) of the reference, so
  that each Lanczos run can be held against power iteration at the accuracy it reached;
* top-5: Lanczos against PyHessian's algorithm (power iteration with deflation, ``tol=1e-3``,
  ``maxIter=100``, re-implemented here; the real PyHessian is also timed when importable), and the
  floor of any Lanczos stopping rule: the first step at which unrestarted Lanczos' Ritz values are
  within 1e-4 of the reference (an oracle), for five random starts;
* Tr(H) to a relative standard error ``--rse`` (default 5%): the plain Hutchinson loop (one
  double-backward product per Rademacher probe on one reused graph, as PyHessian does) against
  curvlab's methods run to the same relative standard error;
* SLQ with 90 steps: its time against the time of its 90 products.

Every time is also printed as a multiple of one plain forward+backward on the same batch (median
of 10 after a warm-up; ``x fwd+bwd``). Then the peak memory of the main calls (curvlab's top-1
and top-5 Lanczos, ``trace`` with ``ggn_cv`` and ``hutchinson`` to ``--rse``, SLQ with 90 steps,
each including building its operator) and of the plain forward+backward: each in a fresh process
after one plain forward+backward, the peak resident set size during the call above the resident
size before it, with ``MALLOC_MMAP_THRESHOLD_=131072`` (``benchmarks/_common.py``; Linux, glibc;
``--no-memory`` skips it).

Usage: ``python benchmarks/bench_estimators.py [--workloads W1 W2] [--rse 0.05] [--no-memory]``.
Needs scikit-learn for W1. Timings on a shared machine vary by +-50%; matvec counts do not.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import curvlab.estimators as est
from benchmarks._common import CPU_PEAK_METHOD, cpu_memory_env, cpu_peak_mib
from curvlab.estimators._krylov import KrylovBasis
from curvlab.operators import CurvatureOperator, curvature_operator

REPEATS = 2  # timings are the fastest of this many runs
REFERENCE_TOP5 = {  # BENCHMARKS.md: scipy eigsh with tol 1e-8 on the first batch
    "W1": [0.819644, 0.684664, 0.672985, 0.659557, 0.652243],
    "W2": [8.178071, 6.124337, 4.838595, 4.094037, 3.563313],
}


def workload(name: str) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """Model and first batch of W1 (mlp-digits) or W2 (cnn-cifar-like)."""
    if name == "W1":
        from sklearn.datasets import load_digits

        digits = load_digits()
        X = torch.tensor(digits.data, dtype=torch.float32)
        X = (X - X.mean(0)) / X.std(0, unbiased=False).clamp_min(1e-12)
        y = torch.tensor(digits.target)
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
        X, y = X[perm], y[perm]
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        return model, (X[:256], y[:256])
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (1024,), generator=gen)
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2048, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    return model, (X[:128], y[:128])


class PlainHVP:
    """The baseline product: double backward through one graph built once (PyHessian's way)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        loss = loss_fn(model(batch[0]), batch[1])
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True)
        self.sizes = [p.numel() for p in self.params]
        self.count = 0

    def __call__(self, v: Tensor) -> Tensor:
        parts = [t.view_as(p) for t, p in zip(v.split(self.sizes), self.params)]
        hv = torch.autograd.grad(self.grads, self.params, parts, retain_graph=True)
        self.count += 1
        return torch.cat([h.reshape(-1) for h in hv])


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[object, float]:
    """Result and the fastest of ``repeats`` wall-clock times (robust to a busy machine)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def power_iteration_oracle(hvp: PlainHVP, dim: int, target: float, rel: float, cap: int) -> int:
    """HVPs plain power iteration needs until its Rayleigh quotient is within ``rel`` of target
    (``cap`` if it does not get there: float32 products limit how close it gets)."""
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    v /= v.norm()
    for it in range(1, cap + 1):
        hv = hvp(v)
        rq = float(v @ hv)
        if abs(rq - target) <= rel * abs(target):
            return it
        v = hv / hv.norm()
    return cap


def oracle_lanczos_steps(op: CurvatureOperator, ref: list[float], rel: float, seed: int) -> int:
    """Products after which unrestarted Lanczos' top-k Ritz values are first within ``rel`` of the
    reference: no stopping rule of a Krylov method from this random start can stop earlier."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(op.shape[0], generator=gen, dtype=op.dtype)
    kry = KrylovBasis(op, start, max_basis=200)
    k = len(ref)
    while kry.m < 200:
        kry.step()
        if kry.m >= k:
            theta = kry.ritz()[0].flip(0)[:k]
            if rel_err(theta, ref) <= rel:
                return kry.m
    return kry.m


def pyhessian_top_n(hvp: PlainHVP, dim: int, top_n: int, tol: float = 1e-3, max_iter: int = 100):
    """PyHessian's documented eigenvalue algorithm: power iteration with deflation."""
    gen = torch.Generator().manual_seed(0)
    values: list[float] = []
    vectors: list[Tensor] = []
    for _ in range(top_n):
        v = torch.randn(dim, generator=gen)
        v /= v.norm()
        value = None
        for _ in range(max_iter):
            for u in vectors:
                v = v - (v @ u) * u
            v = v / v.norm()
            hv = hvp(v)
            tmp = float(hv @ v)
            v = hv / hv.norm()
            if value is not None and abs(value - tmp) / (abs(value) + 1e-6) < tol:
                value = tmp
                break
            value = tmp
        values.append(float(value))
        vectors.append(v)
    return values


def real_pyhessian_top5(model: nn.Module, loss_fn: nn.Module, batch) -> tuple[list, float] | None:
    try:
        from pyhessian import hessian as pyh  # type: ignore[import-not-found]
    except ImportError:
        return None
    comp = pyh(copy.deepcopy(model), loss_fn, data=batch, cuda=False)  # it leaves .grad set
    (vals, _), t = timed(lambda: comp.eigenvalues(top_n=5))
    return list(vals), t


def plain_hutchinson(
    hvp: PlainHVP, dim: int, rse: float, cap: int = 4000
) -> tuple[float, float, int]:
    """The plain loop: Rademacher probes one by one until stderr <= rse * |mean|."""
    gen = torch.Generator().manual_seed(0)
    samples: list[float] = []
    while len(samples) < cap:
        z = torch.randint(0, 2, (dim,), generator=gen).float().mul_(2).sub_(1)
        samples.append(float(z @ hvp(z)))
        n = len(samples)
        if n >= 10 and n % 5 == 0:
            se = statistics.stdev(samples) / math.sqrt(n)
            if se <= rse * abs(statistics.fmean(samples)):
                break
    n = len(samples)
    return statistics.fmean(samples), statistics.stdev(samples) / math.sqrt(n), n


def rel_err(values: Tensor | list, ref: list[float]) -> float:
    vals = [float(v) for v in values]
    return max(abs(a - b) / abs(b) for a, b in zip(vals, ref))


def row(*cells: object) -> None:
    print(" | ".join(str(c) for c in cells))


def plain_step(model: nn.Module, loss_fn: nn.Module, batch) -> Callable[[], None]:  # noqa: ANN001
    """What a training loop runs: forward, loss, backward (gradients freed first)."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(batch[0]), batch[1]).backward()

    return run


def plain_ms(model: nn.Module, loss_fn: nn.Module, batch) -> float:  # noqa: ANN001
    """Median of 10 plain forward+backward passes after 3 warm-ups, in ms (gradients freed)."""
    step = plain_step(model, loss_fn, batch)
    for _ in range(3):
        step()
    t = statistics.median(timed(step)[1] for _ in range(10))
    model.zero_grad(set_to_none=True)
    return t * 1e3


MEMORY_CALLS: dict[str, Callable] = {
    "plain forward+backward": lambda m, lf, b, rse: plain_step(m, lf, b)(),
    "curvlab top-1 Lanczos tol=1e-4": lambda m, lf, b, rse: est.lanczos_eigenvalues(
        curvature_operator(m, lf, b), k=1, tol=1e-4, seed=0
    ),
    "curvlab top-5 Lanczos tol=1e-4": lambda m, lf, b, rse: est.lanczos_eigenvalues(
        curvature_operator(m, lf, b), k=5, tol=1e-4, seed=0
    ),
    "curvlab trace ggn_cv to the rse": lambda m, lf, b, rse: est.trace(
        m, lf, b, method="ggn_cv", num_probes=50, rtol=rse, seed=0
    ),
    "curvlab trace hutchinson to the rse": lambda m, lf, b, rse: est.trace(
        m, lf, b, method="hutchinson", num_probes=4000, rtol=rse, seed=0
    ),
    "curvlab SLQ 90 steps": lambda m, lf, b, rse: est.slq(
        curvature_operator(m, lf, b), num_steps=90, num_probes=1, seed=0
    ),
}
"""The calls whose CPU peak memory is measured, each in a fresh process (:func:`memory_one`)."""


def memory_one(name: str, call: str, rse: float) -> None:
    """Child process: one call's peak memory after one plain forward+backward, as JSON."""
    torch.set_num_threads(2)
    model, batch = workload(name)
    loss_fn = nn.CrossEntropyLoss()
    plain_step(model, loss_fn, batch)()  # the state of a training loop: gradients allocated
    mib = cpu_peak_mib(lambda: MEMORY_CALLS[call](model, loss_fn, batch, rse))
    print(json.dumps({"mib": mib}))


def memory_table(name: str, rse: float) -> None:
    """The peak memory of :data:`MEMORY_CALLS` on workload ``name``, each in a fresh process."""
    print(f"\npeak memory ({CPU_PEAK_METHOD}, after one plain forward+backward there):\n")
    row("call", "peak MiB")
    row("---", "---")
    for call in MEMORY_CALLS:
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-one", name, call, "--rse", str(rse)],
            capture_output=True,
            text=True,
            timeout=900,
            env=cpu_memory_env(threads=2),
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            row(call, f"failed: {last}")
            continue
        row(call, f"{json.loads(proc.stdout.strip().splitlines()[-1])['mib']:.1f}")


def bench(name: str, rse: float, real_pyhessian: bool, memory: bool = True) -> None:
    model, batch = workload(name)
    loss_fn = nn.CrossEntropyLoss()
    ref = REFERENCE_TOP5[name]
    t_fb = plain_ms(model, loss_fn, batch) / 1e3

    def fb(t: float) -> str:
        """A time as a multiple of one plain forward+backward."""
        r = t / t_fb
        return f"{r:.1f}" if r < 100 else f"{r:.0f}"

    op: CurvatureOperator = curvature_operator(model, loss_fn, batch)
    dim = op.shape[0]
    hvp = PlainHVP(model, loss_fn, batch)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        hvp(v)
    times = []
    for _ in range(10):
        times.append(timed(lambda: hvp(v))[1])
    t_hvp = statistics.median(times)
    print(
        f"\n## {name}: D={dim}, plain forward+backward = {t_fb * 1e3:.2f} ms, one HVP (double "
        f"backward, reused graph) = {t_hvp * 1e3:.1f} ms = {fb(t_hvp)} x fwd+bwd\n"
    )
    row("task", "method", "HVPs", "time [s]", "x fwd+bwd", "result", "rel. error vs reference")
    row("---", "---", "---", "---", "---", "---", "---")

    # top-1
    res, t = timed(lambda: est.lanczos_eigenvalues(op, k=1, tol=1e-4, seed=0), REPEATS)
    row(
        "top-1",
        "curvlab Lanczos tol=1e-4",
        res.num_matvecs,
        f"{t:.2f}",
        fb(t),
        f"{float(res.values[0]):.6f} (converged={res.converged})",
        f"{rel_err(res.values, ref):.1e}",
    )
    res, t = timed(
        lambda: est.lanczos_eigenvalues(op, k=1, tol=1e-4, seed=0, criterion="eigenvalue"),
        REPEATS,
    )
    row(
        "top-1",
        "curvlab Lanczos tol=1e-4, eigenvalue criterion",
        res.num_matvecs,
        f"{t:.2f}",
        fb(t),
        f"{float(res.values[0]):.6f} (converged={res.converged})",
        f"{rel_err(res.values, ref):.1e}",
    )
    # power iteration to 1e-4 (Lanczos' eigenvalue test) and to the accuracy of the residual test
    cap = 300
    for acc in (1e-4, 1e-5, 1e-6):
        it, t = timed(lambda a=acc: power_iteration_oracle(hvp, dim, ref[0], a, cap))
        row(
            "top-1",
            f"power iteration, oracle stop at {acc:.0e}",
            it if it < cap else f"> {cap} (not reached)",
            f"{t:.2f}",
            fb(t),
            "-",
            f"<= {acc:.0e}" if it < cap else "-",
        )

    # top-5
    res5, t5 = timed(lambda: est.lanczos_eigenvalues(op, k=5, tol=1e-4, seed=0), REPEATS)
    row(
        "top-5",
        "curvlab Lanczos tol=1e-4",
        res5.num_matvecs,
        f"{t5:.2f}",
        fb(t5),
        " ".join(f"{float(x):.5f}" for x in res5.values) + f" (converged={res5.converged})",
        f"{rel_err(res5.values, ref):.1e}",
    )
    res5e, t5e = timed(
        lambda: est.lanczos_eigenvalues(op, k=5, tol=1e-4, seed=0, criterion="eigenvalue"),
        REPEATS,
    )
    row(
        "top-5",
        "curvlab Lanczos tol=1e-4, eigenvalue criterion",
        res5e.num_matvecs,
        f"{t5e:.2f}",
        fb(t5e),
        " ".join(f"{float(x):.5f}" for x in res5e.values) + f" (converged={res5e.converged})",
        f"{rel_err(res5e.values, ref):.1e}",
    )
    floors = [oracle_lanczos_steps(op, ref, 1e-4, seed) for seed in range(5)]
    row(
        "top-5",
        "Lanczos floor: first step with error <= 1e-4 (oracle, no restart), seeds 0-4",
        " ".join(map(str, floors)),
        "-",
        "-",
        "-",
        "<= 1e-4",
    )
    hvp.count = 0
    vals, tp = timed(lambda: pyhessian_top_n(hvp, dim, 5), REPEATS)
    row(
        "top-5",
        "PyHessian algorithm (deflated power it., tol 1e-3)",
        hvp.count // REPEATS,
        f"{tp:.2f}",
        fb(tp),
        " ".join(f"{x:.5f}" for x in vals),
        f"{rel_err(vals, ref):.1e}",
    )
    print(
        f"\ntop-5 time ratio curvlab / PyHessian-algorithm: {t5 / tp:.2f} (residual "
        f"criterion), {t5e / tp:.2f} (eigenvalue criterion)"
    )
    if real_pyhessian:
        out = real_pyhessian_top5(model, loss_fn, batch)
        if out is not None:
            row(
                "top-5",
                "PyHessian 0.1 eigenvalues(top_n=5)",
                "-",
                f"{out[1]:.2f}",
                fb(out[1]),
                " ".join(f"{x:.5f}" for x in out[0]),
                f"{rel_err(out[0], ref):.1e}",
            )
            print(f"top-5 time ratio curvlab / real PyHessian: {t5 / out[1]:.2f}")

    # Tr(H) to a relative standard error
    print(f"\nTr(H) to relative standard error {rse:.0%}:\n")
    row("method", "products", "time [s]", "x fwd+bwd", "Tr(H) +- stderr", "time / plain loop")
    row("---", "---", "---", "---", "---", "---")
    hvp.count = 0
    (mean, se, n), t_plain = timed(lambda: plain_hutchinson(hvp, dim, rse))
    row(
        "plain Hutchinson loop (Rademacher)",
        n,
        f"{t_plain:.2f}",
        fb(t_plain),
        f"{mean:.3f} +- {se:.3f}",
        "1.00",
    )
    for method, probes in (("ggn_cv", 50), ("block", 400), ("hutchinson", 4000)):
        r, t = timed(
            lambda m=method, k=probes: est.trace(
                model, loss_fn, batch, method=m, num_probes=k, rtol=rse, seed=0
            )
        )
        extra = f" (exact Tr(G)={r.extra['ggn_trace']:.3f})" if method == "ggn_cv" else ""
        row(
            f"curvlab {method}",
            r.num_matvecs,
            f"{t:.2f}",
            fb(t),
            f"{r.value:.3f} +- {r.stderr:.3f}{extra}",
            f"{t / t_plain:.2f}",
        )
    r, t = timed(lambda: est.trace(model, loss_fn, batch, method="hutch++", num_probes=90, seed=0))
    row(
        "curvlab hutch++ (90 products, no early stop)",
        r.num_matvecs,
        f"{t:.2f}",
        fb(t),
        f"{r.value:.3f} +- {r.stderr:.3f}",
        "-",
    )

    # SLQ
    op.num_matvecs = 0
    base = curvature_operator(model, loss_fn, batch)
    V = torch.randn(dim, 90, generator=torch.Generator().manual_seed(1))
    t_slq = t_prod = math.inf
    for _ in range(3):  # interleaved, fastest of three: the machine's load drifts
        dens, t = timed(lambda: est.slq(op, num_steps=90, num_probes=1, seed=0))
        t_slq = min(t_slq, t)
        _, t = timed(lambda: [base.matvec(V[:, j]) for j in range(90)])
        t_prod = min(t_prod, t)
    print(
        f"\nSLQ 90 steps: {t_slq:.2f} s ({fb(t_slq)} x fwd+bwd) for {dens.num_matvecs} products; "
        f"the same 90 products alone: {t_prod:.2f} s; overhead ratio {t_slq / t_prod:.3f}"
    )
    if memory:
        memory_table(name, rse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=["W1", "W2"])
    parser.add_argument("--rse", type=float, default=0.05, help="target relative standard error")
    parser.add_argument("--no-real-pyhessian", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    parser.add_argument(
        "--memory-one", nargs=2, metavar=("WORKLOAD", "CALL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_one:
        memory_one(args.memory_one[0], args.memory_one[1], args.rse)
        return
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    for name in args.workloads:
        bench(name, args.rse, not args.no_real_pyhessian, not args.no_memory)
    print(f"\ntotal benchmark time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
