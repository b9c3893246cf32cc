"""Time of each one-pass quantity as a ratio to a plain forward+backward and to BackPACK alone.

Workloads: W1 (MLP on digits) and W2 (small CNN) of shared/BENCHMARKS.md at batch 128, float32,
2 threads, CPU. Each ratio is the median over interleaved rounds of the ratio within the round (the
machine's load drifts between rounds). Run: ``python benchmarks/bench_quantities.py``.

The default ``backend="auto"`` takes curvlab's own layer hooks for the first-order quantities of
these models; the ``backend=backpack`` rows force BackPACK, to show the wrapper's own overhead
against calling BackPACK directly.
"""

from __future__ import annotations

import argparse
import statistics
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
from benchmarks.workloads import w1_mlp_digits, w2_cnn


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
    fns: dict[str, Callable[[], None]], repeats: int, budget: float = 3.0
) -> dict[str, list[float]]:
    """Times of each function over interleaved rounds (one call of each per round).

    ``repeats`` rounds at most, fewer (at least 3) where one round takes longer than
    ``budget / repeats`` seconds, so the slow quantities keep the whole run under two minutes.
    """
    round_time = 0.0
    for fn in fns.values():  # warm-up, and the time of one round
        fn()
        start = time.perf_counter()
        fn()
        round_time += time.perf_counter() - start
    repeats = max(3, min(repeats, int(budget / max(round_time, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    for wname, build in [("W1 mlp-digits", w1_mlp_digits), ("W2 cnn", w2_cnn)]:
        model, loss_fn, data = build(args.batch)
        base = statistics.median(
            measure({"plain": plain(model, loss_fn, data)}, args.repeats)["plain"]
        )
        print(f"\n{wname}: plain forward+backward {base * 1e3:.1f} ms")
        print(
            f"{'quantity':26s} {'curvlab ms':>10s} {'x fwd+bwd':>10s} {'BackPACK ms':>12s} {'x BackPACK':>11s}"
        )
        for label, ours, theirs in cases(model, loss_fn, data):
            fns = {"plain": plain(model, loss_fn, data), "ours": ours}
            if theirs == "gram":
                fns["bp"] = backpack_gram(model, loss_fn, data, sqrt=False)
            elif theirs == "sqrt":
                fns["bp"] = backpack_gram(model, loss_fn, data, sqrt=True)
            elif theirs is not None:
                fns["bp"] = backpack_direct(model, loss_fn, data, theirs)
            n_handles = len(CTX.hook_handles)
            times = measure(fns, args.repeats)
            t = {k: statistics.median(v) for k, v in times.items()}
            for h in CTX.hook_handles[n_handles:]:
                h.remove()
            del CTX.hook_handles[n_handles:]
            if "bp" in t:
                bp = f"{t['bp'] * 1e3:12.1f} {ratio(times, 'ours', 'bp'):11.2f}"
            else:
                bp = f"{'-':>12s} {'-':>11s}"
            x_plain = ratio(times, "ours", "plain")
            print(f"{label:26s} {t['ours'] * 1e3:10.1f} {x_plain:10.2f} {bp}", flush=True)


if __name__ == "__main__":
    main()
