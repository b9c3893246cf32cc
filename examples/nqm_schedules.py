"""Optimised piecewise-constant learning-rate schedules on the NQM (Zhang et al. 2019, Fig. 3b/c).

For each batch size: the fewest steps with the best constant learning rate, with an optimised
50-piece schedule (dynamic programming of eq. 3 + BFGS + bisection on the number of steps), and
the information-theoretic bound. Plots steps vs batch size (3b) and the schedules (3c).

Usage: python examples/nqm_schedules.py [--out examples/output/nqm] [--pieces 50]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from example_args import positive_float, positive_int

from curvlab.nqm import NQM

OUTPUT = Path(__file__).resolve().parent / "output"
"""Where the outputs go by default: ``examples/output/`` beside this script (ignored by git),
wherever it is run from."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=str(OUTPUT / "nqm"),
        help="folder for the PNGs (default examples/output/nqm)",
    )
    parser.add_argument(
        "--pieces",
        type=positive_int,
        default=50,
        help="pieces of the schedule (>= 1; default %(default)s)",
    )
    parser.add_argument(
        "--target",
        type=positive_float,
        default=0.01,
        help="target risk (finite, > 0; default %(default)s)",
    )
    args = parser.parse_args()
    nqm = NQM.paper()
    if args.target >= nqm.initial_risk():  # before any work: every schedule would take 0 steps
        parser.error(
            f"--target {args.target:g} is at or above the NQM's initial risk "
            f"{nqm.initial_risk():.4g}: no step is needed; pass a target below it (default 0.01)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = [2**k for k in range(0, 16, 3)]
    results = []
    print(f"{'batch':>6} {'constant':>10} {'schedule':>10} {'bound':>10}")
    for b in batch_sizes:
        res = nqm.optimize_schedule(b, args.target, pieces=args.pieces)
        results.append(res)
        bound = nqm.lower_bound(args.target, b)
        print(f"{b:6d} {res.constant.steps:10.4g} {res.steps:10.4g} {bound:10.4g}")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax1.plot(batch_sizes, [r.constant.steps for r in results], "--o", label="constant lr")
    ax1.plot(batch_sizes, [r.steps for r in results], "-o", label=f"{args.pieces}-piece schedule")
    ax1.plot(
        batch_sizes,
        [nqm.lower_bound(args.target, b) for b in batch_sizes],
        "k--",
        label="lower bound",
    )
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="steps to target",
        title="Fig. 3b: optimised schedules (p = 0)",
    )
    ax1.legend()
    for b, r in zip(batch_sizes, results):
        x = r.boundaries / r.boundaries[-1]
        ax2.step(x, np.append(r.lrs, r.lrs[-1]), where="post", label=f"B = {b}")
    ax2.set(
        ylim=(1e-7, 5.0),
        yscale="log",
        xlabel="fraction of training",
        ylabel="learning rate",
        title="Fig. 3c: optimised schedules",
    )
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "nqm_fig3bc_schedules.png", dpi=120)
    print(f"wrote {out / 'nqm_fig3bc_schedules.png'}")


if __name__ == "__main__":
    main()
