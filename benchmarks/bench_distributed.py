"""Scaling of curvlab under torch.distributed: W3 ``diag_fisher`` and a 30-probe Hutchinson trace.

Workload: W3 of BENCHMARKS.md (the wide CIFAR-like CNN, 1,070,794 parameters), 1024 examples in
all, float32, CPU, gloo. The data is split evenly over ``P`` processes (1 and 2 by default); each
process gets ``threads // P`` torch threads so that every run uses the same cores. Per call:

* ``diag_fisher(kind="empirical")`` over the process's shard (chunks of 256 examples);
* ``trace(matrix="hessian", method="hutchinson", num_probes=30)`` (Hessian products on the shard,
  reduced once per product).

Printed per process count: seconds per call (median of ``--repeats``, after one warm-up); with
``--threads-per-proc N`` (strong scaling, P processes on P times the cores) the scaling efficiency
``B t_B / (P t_P)``, else (every run on the same ``--threads`` cores) the speed-up ``t_B / t_P``,
where ``B`` is the smallest process count run (1 by default; the baseline reads 1.00); the
collectives issued and the bytes one rank sends per call, and those bytes in parameter-vectors
(bytes / (parameters x 4)) next to the parameter count. Targets: a one-pass
quantity moves at most 2 parameter-vectors per call, an operator product at most 1.

Run: ``python benchmarks/bench_distributed.py [--procs 1,2] [--threads-per-proc 1]``;
``--workload tiny --examples 32 --probes 3`` checks that it runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import curvlab as cl  # noqa: E402
from benchmarks.workloads import cifar_like, w3_cnn_wide  # noqa: E402
from curvlab.distributed import communication_stats, reset_communication_stats  # noqa: E402


def _workload(name: str, examples: int) -> tuple[nn.Module, nn.Module, tuple]:
    if name == "w3":
        model, loss_fn, _ = w3_cnn_wide()
        return model, loss_fn, cifar_like(examples)
    torch.manual_seed(1)  # tiny: a small CNN on the same kind of data
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(64, 10),
    )  # fmt: skip
    return model, nn.CrossEntropyLoss(), cifar_like(examples)


def _timed(fn, repeats: int) -> tuple[float, dict[str, int]]:  # noqa: ANN001
    fn()  # warm-up
    times = []
    stats = {}
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        reset_communication_stats()
        t0 = time.perf_counter()
        fn()
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - t0)
        stats = communication_stats()
    return statistics.median(times), stats


def _worker(rank: int, procs: int, args: argparse.Namespace, init: str, out: str) -> None:
    per_proc = args.threads_per_proc or max(1, args.threads // procs)
    torch.set_num_threads(per_proc)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=procs,
        timeout=timedelta(minutes=30),
    )  # fmt: skip
    model, loss_fn, (X, y) = _workload(args.workload, args.examples)
    per = args.examples // procs
    shard = (X[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
    chunk = min(256, per)
    data = [(shard[0][i : i + chunk], shard[1][i : i + chunk]) for i in range(0, per, chunk)]
    if procs > 1:
        model = nn.parallel.DistributedDataParallel(model)
    results = {}
    t, s = _timed(lambda: cl.diag_fisher(model, loss_fn, data), args.repeats)
    results["diag_fisher"] = {"seconds": t, **s, "products": 1}
    t, s = _timed(
        lambda: cl.trace(model, loss_fn, data, num_probes=args.probes, seed=0), args.repeats
    )
    results["hutchinson"] = {"seconds": t, **s, "products": args.probes}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def scaling(rows: dict[int, dict], call: str, strong: bool) -> dict[int, float]:
    """Per process count ``P``: ``B t_B / (P t_P)`` (``strong``) or ``t_B / t_P``.

    ``B`` is the smallest process count in ``rows``, so the baseline's own entry is 1.0 whatever
    ``B`` is (the equal-cores speed-up used to read ``B``, e.g. 2.00, for the baseline itself).
    """
    base = min(rows)
    t_base = rows[base][call]["seconds"]
    return {
        procs: (base * t_base) / (procs * res[call]["seconds"])
        if strong
        else t_base / res[call]["seconds"]
        for procs, res in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("w3", "tiny"), default="w3")
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--threads-per-proc",
        type=int,
        default=0,
        help="torch threads of every process (strong scaling: P processes use P times the "
        "cores); default 0: --threads split over the processes (every run on the same cores)",
    )
    args = parser.parse_args()
    model, _, _ = _workload(args.workload, 1)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vector_bytes = params * 4
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (int(p) for p in args.procs.split(",")):
            out = Path(tmp) / f"p{procs}.json"
            init = Path(tmp) / f"init{procs}"
            mp.spawn(_worker, args=(procs, args, str(init), str(out)), nprocs=procs, join=True)
            rows[procs] = json.loads(out.read_text())
    print(
        f"workload {args.workload}: {params:,} parameters ({vector_bytes:,} bytes per "
        f"parameter-vector), {args.examples} examples, {args.probes} probes, "
        + (
            f"{args.threads_per_proc} thread(s) per process (strong scaling: efficiency "
            f"B t_B / (P t_P) against B = {min(rows)} process(es), 1.0 is perfect)"
            if args.threads_per_proc
            else f"{args.threads} threads in all, split over the processes (equal cores: "
            f"speed-up t_B / t_P against B = {min(rows)} process(es), 1.0 means data "
            "parallelism costs as much as intra-op threads)"
        )
    )
    header = (
        f"{'call':<12}{'procs':>6}{'seconds':>10}"
        f"{'efficiency' if args.threads_per_proc else 'speed-up':>12}{'collectives':>13}"
        f"{'bytes/call':>14}{'vectors/call':>14}{'vectors/product':>17}"
    )
    print(header)
    for call in ("diag_fisher", "hutchinson"):
        factor = scaling(rows, call, strong=bool(args.threads_per_proc))
        for procs, res in sorted(rows.items()):
            r = res[call]
            eff = factor[procs]
            vectors = r["bytes"] / vector_bytes
            per_product = vectors / r["products"] if call == "hutchinson" else float("nan")
            print(
                f"{call:<12}{procs:>6}{r['seconds']:>10.3f}{eff:>12.2f}{r['calls']:>13}"
                f"{r['bytes']:>14,}{vectors:>14.3f}{per_product:>17.3f}"
            )
    print(
        "targets: one-pass quantity <= 2 parameter-vectors per call; operator product <= 1 "
        "(a matrix-vector product; Hutchinson applies its probes in blocks of 10 products)"
    )


if __name__ == "__main__":
    main()
