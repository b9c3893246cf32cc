"""Time of each one-pass quantity as a ratio to a plain forward+backward and to BackPACK alone.

Workloads: W1 (MLP on digits, batch 256) and W2 (small CNN, batch 128) of shared/BENCHMARKS.md,
float32, 2 threads, CPU (``--batch N`` sets one batch for both; every header line prints it). Each
ratio is the median over interleaved rounds of the ratio within the round (the machine's load drifts
between rounds). Run: ``python benchmarks/bench_quantities.py``.

The default ``backend="auto"`` takes curvlab's own layer hooks for the first-order quantities of
these models; the ``backend=backpack`` rows force BackPACK, to show the wrapper's own overhead
against calling BackPACK directly.

Flags for a GPU and mixed precision:

* ``--device cuda``: models and data on the GPU; every timed call is bracketed by
  ``torch.cuda.synchronize()``.
* ``--autocast {none,bf16,fp16}``: the plain forward+backward and every curvlab call run inside
  ``torch.autocast(device_type, dtype)``, as in a user's autocast region. curvlab's own passes
  switch autocast off, so the extra column ``x outside`` (the call inside the region over the same
  call outside it, same rounds) should read about 1.00. The BackPACK columns call BackPACK outside
  autocast (float32), as before.
* ``--budget S``: seconds of timing per quantity (default 3; fewer rounds for slow quantities).
* Peak memory, beside the time: MiB above the memory before the call. CUDA: the peak
  ``torch.cuda.max_memory_allocated`` during one call above ``memory_allocated`` before it, in
  this process. CPU: the peak resident set size during one call above the resident size before
  it, in a fresh process per row after one plain forward+backward there, run with
  ``MALLOC_MMAP_THRESHOLD_=131072`` so that the memory that forward+backward freed cannot hide the
  call's peak (Linux, glibc; ``--no-memory`` skips it, which saves a few seconds per row).

The last lines are ``SUMMARY | ...`` lines that ``benchmarks/gpu.sh`` collects.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from backpack import backpack, extend
from backpack import extensions as bext
from backpack.context import CTX

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import curvlab as cl
from benchmarks._common import (
    CPU_PEAK_METHOD,
    add_device_args,
    cpu_memory_env,
    cpu_peak_mib,
    cuda_peak_mib,
    in_autocast,
    precision,
    resolve_device,
    summary,
    synchronizer,
)
from benchmarks.workloads import w1_mlp_digits, w2_cnn

WORKLOADS = {"W1": ("W1 mlp-digits", w1_mlp_digits), "W2": ("W2 cnn", w2_cnn)}
BATCH = {"W1": 256, "W2": 128}  # BENCHMARKS.md's batch of each workload (the default)


def plain(model, loss_fn, data) -> Callable[[], None]:  # noqa: ANN001
    X, y = data

    def run() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    return run


def backpack_direct(model, loss_fn, data, ext_factory) -> Callable[[], None]:  # noqa: ANN001
    """The same quantity by calling BackPACK directly on an extended copy (the user's way)."""
    import copy

    m = extend(copy.deepcopy(model))
    lf = extend(copy.deepcopy(loss_fn))
    X, y = data

    def run() -> None:
        m.zero_grad(set_to_none=True)
        with backpack(*ext_factory()):
            lf(m(X), y).backward()

    return run


def backpack_gram(model, loss_fn, data, sqrt: bool) -> Callable[[], None]:  # noqa: ANN001
    """BackPACK's per-example factors plus the Gram-matrix norm, done by hand."""
    import copy

    m = extend(copy.deepcopy(model))
    lf = extend(copy.deepcopy(loss_fn))
    X, y = data

    def run() -> None:
        m.zero_grad(set_to_none=True)
        with backpack(bext.SqrtGGNExact() if sqrt else bext.BatchGrad()):
            lf(m(X), y).backward()
        if sqrt:
            V = torch.cat([p.sqrt_ggn_exact.flatten(2) for p in m.parameters()], 2).flatten(0, 1)
        else:
            V = torch.cat([p.grad_batch.flatten(1) for p in m.parameters()], 1)
        ((V @ V.T) ** 2).sum().sqrt()
        (V**2).sum(0).norm()

    return run


def measure(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    budget: float = 3.0,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Times of each function over interleaved rounds (one call of each per round).

    ``repeats`` rounds at most, fewer (at least 3) where one round takes longer than
    ``budget / repeats`` seconds, so the slow quantities keep the whole run under two minutes.
    ``sync`` is called before each clock reading (``torch.cuda.synchronize`` on a GPU).
    """
    round_time = 0.0
    for fn in fns.values():  # warm-up, and the time of one round
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        round_time += time.perf_counter() - start
    repeats = max(3, min(repeats, int(budget / max(round_time, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of the per-round ratio: robust to the machine's load drifting."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def cases(model, loss_fn, data):  # noqa: ANN001, ANN201
    m, l, d = model, loss_fn, data
    return [
        ("diag_fisher empirical", lambda: cl.diag_fisher(m, l, d), lambda: [bext.SumGradSquared()]),
        (
            "  ... backend=backpack",
            lambda: cl.diag_fisher(m, l, d, backend="backpack"),
            lambda: [bext.SumGradSquared()],
        ),
        (
            "diag_fisher mc",
            lambda: cl.diag_fisher(m, l, d, kind="mc"),
            lambda: [bext.DiagGGNMC(mc_samples=1)],
        ),
        (
            "diag_fisher exact",
            lambda: cl.diag_fisher(m, l, d, kind="exact"),
            lambda: [bext.DiagGGNExact()],
        ),
        ("diag_hessian", lambda: cl.diag_hessian(m, l, d), lambda: [bext.DiagHessian()]),
        ("kfac mc", lambda: cl.kfac(m, l, d, kind="mc"), lambda: [bext.KFAC(mc_samples=1)]),
        ("kfac exact", lambda: cl.kfac(m, l, d, kind="exact"), lambda: [bext.KFLR()]),
        ("kfac empirical", lambda: cl.kfac(m, l, d, kind="empirical"), None),
        ("gradient_stats", lambda: cl.gradient_stats(m, l, d), lambda: [bext.Variance()]),
        (
            "  ... backend=backpack",
            lambda: cl.gradient_stats(m, l, d, backend="backpack"),
            lambda: [bext.Variance()],
        ),
        ("fisher_norms empirical", lambda: cl.fisher_norms(m, l, d), "gram"),
        ("fisher_norms exact", lambda: cl.fisher_norms(m, l, d, kind="exact"), "sqrt"),
    ]


def build(workload: str, batch: int, device: torch.device):  # noqa: ANN201
    model, loss_fn, (X, y) = WORKLOADS[workload][1](batch)
    return model.to(device), loss_fn, (X.to(device), y.to(device))


def peak_memory(workload: str, row: str, batch: int, args: argparse.Namespace) -> float:
    """CPU: MiB of one call's peak resident set above the resident size before, in a fresh process.

    ``row`` is ``"plain"`` or the index of a case in :func:`cases`. The child runs with
    ``MALLOC_MMAP_THRESHOLD_`` set (:func:`benchmarks._common.cpu_memory_env`); a child that
    fails prints its last error line here and gives ``nan``.
    """
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--one",
            workload,
            row,
            "--batch",
            str(batch),
            "--autocast",
            args.autocast,
            "--threads",
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_memory_env(threads=args.threads),
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  (peak memory of row {row} failed: {last})", file=sys.stderr)
        return float("nan")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["mib"])


def one(workload: str, row: str, args: argparse.Namespace) -> None:
    """Child process of :func:`peak_memory` (CPU): print one row's peak memory as JSON."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    device = torch.device("cpu")
    model, loss_fn, data = build(workload, args.batch or BATCH[workload], device)
    base = in_autocast(plain(model, loss_fn, data), device, args.autocast)
    base()  # the state of a training loop: gradients allocated, caches warm (its freed memory is
    # unmapped at once: MALLOC_MMAP_THRESHOLD_ is set in this process, see peak_memory)
    fn = base if row == "plain" else cases(model, loss_fn, data)[int(row)][1]
    print(json.dumps({"mib": cpu_peak_mib(in_autocast(fn, device, args.autocast))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="one batch for every workload (default: BENCHMARKS.md's, W1 256 and W2 128)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--budget", type=float, default=3.0, help="seconds of timing per quantity at most"
    )
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=list(WORKLOADS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    add_device_args(parser)
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], args.one[1], args)
        return
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sync = synchronizer(device)
    amp = args.autocast != "none"
    prec = precision(args.autocast)
    memory = not args.no_memory
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    batches = ", ".join(f"{w} {args.batch or BATCH[w]}" for w in args.workloads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {batches}, "
        f"{device}, {prec} (plain forward+backward and curvlab calls inside the region)"
    )
    if memory:
        print(
            "peak MiB: "
            + (
                "CUDA: torch.cuda.max_memory_allocated during one call above memory_allocated "
                "before it, in this process"
                if cuda
                else CPU_PEAK_METHOD + ", after one plain forward+backward in that process"
            )
        )
    for workload in args.workloads:
        wname = WORKLOADS[workload][0]
        batch = args.batch or BATCH[workload]
        model, loss_fn, data = build(workload, batch, device)
        base_fn = in_autocast(plain(model, loss_fn, data), device, args.autocast)
        base = statistics.median(
            measure({"plain": base_fn}, args.repeats, args.budget, sync)["plain"]
        )
        if not memory:
            mem_plain = float("nan")
        elif cuda:
            mem_plain = cuda_peak_mib(base_fn)
        else:
            mem_plain = peak_memory(workload, "plain", batch, args)
        print(
            f"\n{wname}, batch {batch} ({device}, {prec}): plain forward+backward "
            f"{base * 1e3:.2f} ms, "
            f"peak {mem_plain:.1f} MiB above the memory before it"
        )
        header = (
            f"{'quantity':26s} {'curvlab ms':>10s} {'x fwd+bwd':>10s} {'peak MiB':>9s} "
            f"{'BackPACK ms':>12s} {'x BackPACK':>11s}"
        )
        print(header + (f" {'x outside':>10s}" if amp else ""))
        key: dict[str, float] = {}
        in_out: dict[str, float] = {}
        name = ""
        for index, (label, ours, theirs) in enumerate(cases(model, loss_fn, data)):
            # a unique name: "  ... backend=backpack" rows belong to the row above them
            name = f"{name} {label.strip()[4:]}" if label.startswith("  ...") else label
            fns = {
                "plain": in_autocast(plain(model, loss_fn, data), device, args.autocast),
                "ours": in_autocast(ours, device, args.autocast),
            }
            if amp:
                fns["outside"] = ours  # the same call outside the autocast region
            if theirs == "gram":
                fns["bp"] = backpack_gram(model, loss_fn, data, sqrt=False)
            elif theirs == "sqrt":
                fns["bp"] = backpack_gram(model, loss_fn, data, sqrt=True)
            elif theirs is not None:
                fns["bp"] = backpack_direct(model, loss_fn, data, theirs)
            n_handles = len(CTX.hook_handles)
            times = measure(fns, args.repeats, args.budget, sync)
            t = {k: statistics.median(v) for k, v in times.items()}
            for h in CTX.hook_handles[n_handles:]:
                h.remove()
            del CTX.hook_handles[n_handles:]
            if not memory:
                mib = float("nan")
            elif cuda:
                mib = cuda_peak_mib(fns["ours"])
            else:
                mib = peak_memory(workload, str(index), batch, args)
            if "bp" in t:
                bp = f"{t['bp'] * 1e3:12.1f} {ratio(times, 'ours', 'bp'):11.2f}"
            else:
                bp = f"{'-':>12s} {'-':>11s}"
            x_plain = ratio(times, "ours", "plain")
            key[name] = x_plain
            line = f"{label:26s} {t['ours'] * 1e3:10.2f} {x_plain:10.2f} {mib:9.1f} {bp}"
            if amp:
                in_out[name] = ratio(times, "ours", "outside")
                line += f" {in_out[name]:10.2f}"
            print(line, flush=True)
        where = f"{workload} batch {batch}, {device}, {prec}"
        for label in ("diag_fisher empirical", "kfac mc", "gradient_stats"):
            summary("bench_quantities", f"{label} / plain fwd+bwd [{where}]", key[label])
        if amp:
            worst = max(in_out, key=in_out.get)
            summary(
                "bench_quantities",
                f"call inside autocast / outside, median of {len(in_out)} [{where}]",
                statistics.median(in_out.values()),
            )
            summary(
                "bench_quantities",
                f"call inside autocast / outside, worst: {worst} [{where}]",
                in_out[worst],
            )


if __name__ == "__main__":
    main()
