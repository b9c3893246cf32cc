"""Warm-started against cold ``"sharpness"`` measurements at the same parameters and tolerance.

``bench_hooks --quantities sharpness`` compares the loop's first measurement (cold, at
initialisation) with the later, warm-started ones: different parameters, a different spectrum.
This script measures what the warm start saves where it is used: the W2 training loop of
``bench_hooks`` (SGD, lr 0.01, momentum 0.9, batch 128, the 8 batches of the 1024 examples in
turn) with one ``Diagnostics(quantities=["sharpness"], every=50)`` that lives through the run and
warm-starts each measurement from the previous one; right after each of its measurements a
fresh ``Diagnostics`` measures the same batch at the same parameters from a cold start (same
``sharpness_tol``, basis size and seed). Leave-no-trace makes the two measurements independent
of each other and of the training. Products only, no timing: the figures do not depend on the
machine's load.

Usage:
    python benchmarks/bench_sharpness_warm.py [--steps 600] [--every 50] [--tol 1e-3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks._common import summary
from benchmarks.workloads import cifar_like, w2_model
from curvlab.analysis import Diagnostics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--tol", type=float, default=1e-3, help="sharpness_tol of both")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    X, y = cifar_like()
    batch = 128
    batches = [(X[i : i + batch], y[i : i + batch]) for i in range(0, X.shape[0], batch)]
    model, loss_fn = w2_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    options = {"sharpness_tol": args.tol}
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        warm = Diagnostics(
            model,
            loss_fn,
            quantities=["sharpness"],
            every=args.every,
            optimizer=opt,
            log_dir=f"{logs}/warm",
            options=options,
        )
        print(f"{'step':>5} {'sharpness':>11} {'warm':>5} {'cold':>5}  (products)")
        for step in range(args.steps + 1):
            xb, yb = batches[step % len(batches)]
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            if not warm.step(step, xb, yb):
                continue
            w = warm.records[-1]["values"]
            cold = Diagnostics(
                model,
                loss_fn,
                quantities=["sharpness"],
                every=1,
                optimizer=opt,
                log_dir=f"{logs}/cold{step}",
                options=options,
            )
            cold.measure(step, xb, yb)
            c = cold.records[-1]["values"]
            cold.close()
            rows.append((step, w["sharpness_hvps"], c["sharpness_hvps"]))
            print(
                f"{step:>5} {w['sharpness']:>11.4f} {w['sharpness_hvps']:>5} "
                f"{c['sharpness_hvps']:>5}  (cold: {c['sharpness']:.4f})"
            )
        warm.close()
    later = rows[1:]  # the first measurement has nothing to warm-start from
    if not later:
        raise SystemExit("one measurement only: raise --steps or lower --every")
    ratios = [w / c for _, w, c in later]
    total = sum(w for _, w, _ in later) / sum(c for _, _, c in later)
    print(
        f"\nwarm / cold products at the same parameters, {len(later)} measurements after the "
        f"first: median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-"
        f"{max(ratios):.2f}x, in total {total:.2f}x (issue target <= 0.33x)"
    )
    summary(
        "bench_sharpness_warm",
        "sharpness warm-started / cold products, same parameters [W2]",
        total,
        1 / 3,
    )


if __name__ == "__main__":
    main()
