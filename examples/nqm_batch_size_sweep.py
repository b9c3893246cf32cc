"""Reproduce Zhang et al. (2019) Fig. 3a and Fig. 4 on the noisy quadratic model.

Steps to reach risk 0.01 vs batch size for preconditioning powers 0..1, plain SGD (dashed) vs
momentum (solid, Fig. 3a) and vs SGD + EMA (solid, Fig. 4), with the information-theoretic lower
bound; also the optimal learning rate vs batch size (Fig. 14a) and the critical batch sizes.

Usage: python examples/nqm_batch_size_sweep.py [--out examples/output/nqm] [--max-log2-batch 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from example_args import non_negative_int, positive_float

from curvlab.nqm import NQM, batch_size_sweep, critical_batch_size, plot_optimal_lr, plot_sweep

OUTPUT = Path(__file__).resolve().parent / "output"
"""Where the outputs go by default: ``examples/output/`` beside this script (ignored by git),
wherever it is run from."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=str(OUTPUT / "nqm"),
        help="folder for the PNGs and CSV (default examples/output/nqm)",
    )
    parser.add_argument(
        "--max-log2-batch",
        type=non_negative_int,
        default=20,
        help="batch sizes 1, 2, 4, ..., 2^this (default 20: the momentum curves' critical batch "
        "sizes, about 5e4, lie beyond 2^15; a critical batch size beyond the sweep prints inf)",
    )
    parser.add_argument(
        "--target",
        type=positive_float,
        default=0.01,
        help="the NQM loss to reach, steps counted until then (default 0.01)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    nqm = NQM.paper(d=10_000, bins=100)
    batch_sizes = [2**k for k in range(args.max_log2_batch + 1)]
    powers = (0.0, 0.25, 0.5, 0.75, 1.0)
    t0 = time.perf_counter()
    sweep = batch_size_sweep(nqm, batch_sizes, ("sgd", "momentum", "ema"), powers, args.target)
    print(f"sweep of {len(sweep.rows)} tuned configurations in {time.perf_counter() - t0:.1f} s")

    # the example's own outputs: a re-run replaces them (the library refuses unless asked)
    sweep.to_csv(out / "nqm_sweep.csv", overwrite=True)
    plot_sweep(
        sweep,
        out / "nqm_fig3a.png",
        solid="momentum",
        dashed="sgd",
        title="Fig. 3a: momentum (solid) vs SGD (dashed)",
        overwrite=True,
    )
    plot_sweep(
        sweep,
        out / "nqm_fig4_ema.png",
        solid="ema",
        dashed="sgd",
        title="Fig. 4: SGD + EMA (solid) vs SGD (dashed)",
        overwrite=True,
    )
    plot_optimal_lr(sweep, out / "nqm_optimal_lr.png", overwrite=True)
    print(f"{'power':>5} {'sgd':>10} {'momentum':>10} {'ema':>10}   (critical batch size)")
    for p in powers:
        crit = [critical_batch_size(sweep, o, p) for o in ("sgd", "momentum", "ema")]
        print(f"{p:5g} " + " ".join(f"{c:10.4g}" for c in crit))
    print(f"wrote {out}/nqm_fig3a.png, nqm_fig4_ema.png, nqm_optimal_lr.png, nqm_sweep.csv")


if __name__ == "__main__":
    main()
