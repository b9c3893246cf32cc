"""curvlab inside a DistributedDataParallel training loop (CPU, gloo).

Every rank trains a DDP replica on its shard of each batch; curvlab is called exactly as in one
process and returns, on every rank, the values of all ranks' data together:

* ``Diagnostics`` measures loss, gradient norm, Tr(F), the noise scale from per-example gradients and
  McCandlish's B_simple from the ranks' plain gradients (``noise_scale_dp``); rank 0 alone writes
  ``metrics.jsonl``;
* ``NoisyOptimizer`` adds diagonal-Fisher noise measured on the global batch, one draw shared by all
  ranks, so the replicas stay identical;
* after training, ``trace``, ``eigenvalues`` and ``diag_fisher`` of the final model on each rank's
  shard give the numbers of the whole data set.

Run: ``torchrun --nproc-per-node 2 examples/ddp_diagnostics.py [--out examples/output/ddp]
[--overwrite]`` (one process without torchrun works too: then nothing is communicated).

Every run starts a fresh log: ``Diagnostics`` appends to an existing ``metrics.jsonl``, so if
``--out`` already holds one (an earlier run's) the script stops before any work, on every rank;
``--overwrite`` deletes that file first (nothing else in ``--out``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from example_args import positive_int
from torch import nn

import curvlab as cl
from curvlab.noise import DiagFisherNoise, NoisyOptimizer

OUTPUT = Path(__file__).resolve().parent / "output"
"""Where the outputs go by default: ``examples/output/`` beside this script (ignored by git),
wherever it is run from."""

LOG = "metrics.jsonl"


def fresh_log(out: Path, overwrite: bool, rank: int) -> None:
    """Make sure this run's records go into a new ``out/metrics.jsonl``; call before any work.

    Every rank checks (so all stop together); with ``overwrite`` rank 0 deletes the earlier log.

    Args:
        out: ``--out``, the Diagnostics ``log_dir``.
        overwrite: ``--overwrite``: delete an existing ``metrics.jsonl`` (nothing else).
        rank: this process's rank (``RANK`` of torchrun; 0 without it).

    Raises:
        FileExistsError: if ``out/metrics.jsonl`` exists and ``overwrite`` is False.
    """
    log = out / LOG
    if not (log.exists() or log.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{log} holds an earlier run's log, which Diagnostics would append to; pass "
            "--overwrite to delete it first, or choose another --out"
        )
    if rank == 0:
        log.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=OUTPUT / "ddp",
        help="folder for the Diagnostics log (default examples/output/ddp)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=20, help="training steps per rank (default 20)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's metrics.jsonl in --out first (without it the script "
        "refuses to append this run to it)",
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    try:  # before the process group: a refusal stops every rank alike
        fresh_log(args.out, args.overwrite, int(os.environ.get("RANK", "0")))
    except FileExistsError as err:
        parser.error(str(err))
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    gen = torch.Generator().manual_seed(0)  # the same data set on every rank ...
    X = torch.randn(1024, 10, generator=gen)
    y = (X[:, :3].argmax(1) + (torch.rand(1024, generator=gen) < 0.1).long()) % 3
    torch.manual_seed(0)  # ... and the same initial model
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    noisy = NoisyOptimizer(
        opt, DiagFisherNoise(large_batch=128, small_batch=32), model, loss_fn, seed=0
    )
    quantities = ["loss", "grad_norm", "trace_fisher", "noise_scale"]
    if world > 1:
        quantities.append("noise_scale_dp")
    diag = cl.Diagnostics(model, loss_fn, quantities=quantities, every=5, log_dir=args.out)

    batch = 128
    for step in range(args.steps):
        start = (step * batch) % 1024
        xb, yb = X[start : start + batch], y[start : start + batch]
        xs, ys = xb[rank::world], yb[rank::world]  # this rank's shard of the batch

        def closure(xs: torch.Tensor = xs, ys: torch.Tensor = ys) -> torch.Tensor:
            noisy.zero_grad()
            loss = loss_fn(model(xs), ys)
            loss.backward()
            return loss

        noisy.step(closure)
        record = diag.step(step, xs, ys)
        if record is not None and rank == 0:
            values = record["values"]
            line = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, float))
            print(f"step {step:3d}: {line}", flush=True)
    diag.close()

    shard = (X[rank::world], y[rank::world])  # all 1024 examples, split over the ranks
    tr = cl.trace(model, loss_fn, shard, num_probes=10, seed=0)
    top = cl.eigenvalues(model, loss_fn, shard, k=2, tol=1e-3)
    fisher = cl.diag_fisher(model, loss_fn, shard)
    if rank == 0:
        total = sum(float(v.sum()) for v in fisher.values())
        print(f"Tr(H) = {tr.value:.4g} +- {tr.stderr:.2g} over {world} rank(s), 1024 examples")
        print(f"top Hessian eigenvalues: {[round(float(v), 4) for v in top.values]}")
        print(f"Tr(empirical Fisher) = {total:.4g}; parameters keyed {list(fisher)[:2]}...")
        print(f"log written by rank 0: {args.out / 'metrics.jsonl'}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
