"""Benchmark of the NQM tools (curvlab.nqm) on the paper's model (d = 10^4, 100 bins, target 0.01).

Prints:
1. timing of one ``optimal()`` per optimizer (median of repeats) at several batch sizes;
2. timing of the full Fig. 3a sweep: 5 powers × {SGD, momentum} × 16 batch sizes 2^0..2^15,
   lr (and β) tuned on fine grids (acceptance: < 10 s on 2 CPU cores);
3. critical batch sizes per power (B·steps reaches 2× its minimum) from a sweep extended to
   ``--max-log2-batch`` so that the larger powers leave perfect scaling inside the sweep.

Usage: python benchmarks/bench_nqm.py [--max-log2-batch 26] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from curvlab.nqm import NQM, batch_size_sweep, critical_batch_size

POWERS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-log2-batch", type=int, default=26)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    nqm = NQM.paper()
    nqm.optimal(1)  # warm-up (imports, caches)

    print(f"## one optimal() call (median of {args.repeats})")
    head = ("optimizer", "power", "batch", "ms", "steps", "lr", "beta/gamma")
    print("{:>9} {:>5} {:>6} {:>8} {:>10} {:>10} {:>10}".format(*head))
    for opt in ("sgd", "momentum", "ema"):
        for b in (1, 256, 32768):
            dt, res = _time(lambda o=opt, b=b: nqm.optimal(b, optimizer=o), args.repeats)
            dec = res.momentum if opt == "momentum" else res.ema
            ms = dt * 1e3
            print(f"{opt:>9} {0:5g} {b:6d} {ms:8.1f} {res.steps:10.0f} {res.lr:10.3g} {dec:10.4g}")

    print("\n## full Fig. 3a sweep: 5 powers x {sgd, momentum} x 16 batch sizes 2^0..2^15")
    bs = [2**k for k in range(16)]
    cpu = time.process_time()
    dt, sweep = _time(lambda: batch_size_sweep(nqm, bs, ("sgd", "momentum"), POWERS), 1)
    cpu = time.process_time() - cpu
    print(f"wall time: {dt:.2f} s (CPU time {cpu:.2f} s) for {len(sweep.rows)} optimal() calls")

    print("\n## EMA sweep (Fig. 4): 5 powers x {ema} x 16 batch sizes")
    dt_e, _ = _time(lambda: batch_size_sweep(nqm, bs, ("ema",), POWERS), 1)
    print(f"wall time: {dt_e:.2f} s")

    print(f"\n## critical batch sizes (sweep 2^0..2^{args.max_log2_batch}; B*steps = 2x minimum)")
    big = [2**k for k in range(args.max_log2_batch + 1)]
    ext = batch_size_sweep(nqm, big, ("sgd", "momentum", "ema"), POWERS)
    print(f"{'power':>5} {'sgd':>12} {'momentum':>12} {'ema':>12}")
    for p in POWERS:
        crit = [critical_batch_size(ext, o, p) for o in ("sgd", "momentum", "ema")]
        print(f"{p:5g} " + " ".join(f"{c:12.4g}" for c in crit))

    print("\n## steps at selected batch sizes (Fig. 3a values)")
    print(f"{'power':>5} {'opt':>9} " + " ".join(f"{'B=2^' + str(k):>9}" for k in (0, 5, 10, 15)))
    for p in POWERS:
        for o in ("sgd", "momentum"):
            s = sweep.steps(o, p)
            print(f"{p:5g} {o:>9} " + " ".join(f"{s[k]:9.3g}" for k in (0, 5, 10, 15)))


if __name__ == "__main__":
    main()
