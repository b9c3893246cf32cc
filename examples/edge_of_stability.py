"""The edge of stability on MNIST-1D (Cohen et al., 2021 and 2022), measured by curvlab.Diagnostics.

Claims: (1) under full-batch gradient descent with step size η the sharpness λ_max(H) rises
("progressive sharpening") until it reaches the stability threshold 2/η and then hovers there
while the loss keeps falling, non-monotonically ("the edge of stability"), at every η; (2) under
full-batch Adam the *preconditioned* sharpness λ_max(P⁻¹H), P Adam's preconditioner, rises to
Adam's own threshold (2 + 2β₁)/((1 − β₁)η) = 38/η for β₁ = 0.9 and hovers there ("adaptive edge of
stability"); (3) along the way the critical sharpness λ_c = 2/η_c (Kalra et al., 2026; η_c the
step size along the optimizer's update at which the loss starts to rise, found by forward passes
only) sits at 2/η once the step size is at the edge.

Setting: the MNIST-1D paper's CNN (``curvlab.demo.mnist1d.mnist1d_cnn``, 5,210 parameters) on the
first ``--examples`` (default 1,000) training signals, cross-entropy, full-batch gradient descent
at the learning rates ``--lrs`` (default 2/30, 0.1, 0.2: thresholds 30, 20, 10) and full-batch
Adam (β = (0.9, 0.999), ``--adam-lr``, default 1e-3: threshold 38,000), ``--steps`` steps each
(default 800). ``Diagnostics`` measures every ``--every`` steps (default 8): ``sharpness``
(warm-started Lanczos, relative tolerance 1e-3) and ``critical_sharpness`` for gradient descent,
``preconditioned_sharpness`` and ``critical_sharpness`` for Adam, all with ``optimizer=`` the
run's optimizer, which they read and never change. The verdict compares the last half of each
run with the threshold: the median and the maximum of measured / threshold and the fraction of
measurements within ±20% of it.

Run: ``python examples/edge_of_stability.py [--steps 800] [--out DIR] [--quick]`` (``--quick``: a
few dozen steps, about a minute, into ``examples/output/edge_of_stability/quick/`` unless
``--out`` is given, so that it never replaces a full run's outputs; the defaults take about 5
minutes on one CPU thread, most of it measuring). Writes ``edge_of_stability.json`` (every measurement), ``edge_of_stability.md`` (the
table) and ``edge_of_stability.png`` (sharpness against steps with the thresholds dashed, and the
losses).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import mnist1d_common as common
import torch
from torch import nn

from curvlab.analysis import Diagnostics
from curvlab.demo.mnist1d import mnist1d_cnn

NAME = "edge_of_stability"


def parse() -> argparse.Namespace:
    parser = common.base_parser(
        __doc__.splitlines()[0],
        NAME,
        seeds=None,
        out_help=f"output folder (default: examples/output/{NAME}; with --quick "
        f"examples/output/{NAME}/quick, so a quick check keeps a full run's outputs)",
    )
    parser.add_argument(
        "--steps",
        type=common.positive_int,
        default=800,
        help="full-batch steps per run (default %(default)s, quick 30)",
    )
    parser.add_argument(
        "--examples",
        type=common.positive_int,
        default=1000,
        help="training signals used (default %(default)s, quick 200)",
    )
    parser.add_argument(
        "--lrs",
        type=common.positive_float,
        nargs="+",
        default=[2 / 30, 0.1, 0.2],
        help="gradient-descent learning rates (finite, > 0; default 2/30 0.1 0.2, quick too)",
    )
    parser.add_argument(
        "--adam-lr",
        type=common.positive_float,
        default=1e-3,
        help="Adam's learning rate (finite, > 0; default %(default)s, quick too)",
    )
    parser.add_argument(
        "--every",
        type=common.positive_int,
        default=8,
        help="steps between measurements (default %(default)s, quick 5)",
    )
    args = parser.parse_args()
    common.quick(parser, args, steps=30, examples=200, every=5)
    if args.quick and "out" not in parser.given:
        # its own folder: a quick check after a full run left the full run's outputs (review
        # s27: both wrote examples/output/edge_of_stability/, the quick one over the full one)
        args.out = args.out / "quick"
    return args


def train(kind: str, lr: float, steps: int, every: int, data, seed: int) -> dict[str, Any]:
    """One full-batch run; returns its measured series and losses."""
    X, y = data
    model, loss_fn = mnist1d_cnn(seed=seed), nn.CrossEntropyLoss()
    if kind == "gd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        quantities = ["sharpness", "critical_sharpness"]
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        quantities = ["preconditioned_sharpness", "critical_sharpness"]
    losses = []
    t0 = time.perf_counter()
    with Diagnostics(model, loss_fn, quantities, every=every, optimizer=opt, seed=seed) as diag:
        for step in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            diag.step(step, X, y)
            if not torch.isfinite(loss):
                break
    series = {}
    for name in [
        *quantities,
        *(f"{q}_threshold" for q in quantities),
        "sharpness_hvps",
        "preconditioned_sharpness_hvps",
        "critical_sharpness_forwards",
    ]:
        try:
            s, v = diag.history(name)
        except KeyError:  # a value of a quantity this run does not measure (SGD vs Adam)
            continue
        if s:
            series[name] = {"step": s, "value": v}
    return {
        "kind": kind,
        "lr": lr,
        "losses": losses,
        "series": series,
        "events": diag.events,
        "seconds": time.perf_counter() - t0,
        "measure_seconds": sum(r["cost_s"] for r in diag.records),
    }


def at_edge(run: dict[str, Any], name: str) -> dict[str, float] | None:
    """Over the last half of the run: median of measured / threshold, the share within ±20%."""
    s = run["series"].get(name)
    t = run["series"].get(f"{name}_threshold")
    if not s or not t:
        return None
    half = len(s["value"]) // 2
    ratios = [v / th for v, th in zip(s["value"][half:], t["value"][half:])]
    if not ratios:
        return None
    return {
        "median_ratio": statistics.median(ratios),
        "within_20pct": sum(0.8 <= r <= 1.2 for r in ratios) / len(ratios),
        "max_ratio": max(ratios),
    }


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| run | threshold | measured / threshold: median | within ±20% | max | "
        "λ_c / (2/η): median | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        name = "sharpness" if run["kind"] == "gd" else "preconditioned_sharpness"
        edge = at_edge(run, name)
        crit = at_edge(run, "critical_sharpness")
        thr = run["series"].get(f"{name}_threshold", {}).get("value", [float("nan")])[0]
        label = f"GD η = {run['lr']:.4g}" if run["kind"] == "gd" else f"Adam η = {run['lr']:.4g}"
        cells = [label, f"{thr:.4g}"]
        if edge:
            cells += [
                f"{edge['median_ratio']:.2f}",
                f"{edge['within_20pct']:.0%}",
                f"{edge['max_ratio']:.2f}",
            ]
        else:
            cells += ["–", "–", "–"]
        cells.append(f"{crit['median_ratio']:.2f}" if crit else "–")
        cells.append(f"{run['losses'][-1]:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gd = [r for r in runs if r["kind"] == "gd"]
    adam = [r for r in runs if r["kind"] == "adam"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for i, run in enumerate(gd):
        s, t = run["series"].get("sharpness"), run["series"].get("sharpness_threshold")
        c = run["series"].get("critical_sharpness")
        if s:
            ax.plot(
                s["step"], s["value"], color=f"C{i}", lw=1.2, label=f"λ_max(H), η = {run['lr']:.4g}"
            )
        if c:
            ax.plot(c["step"], c["value"], color=f"C{i}", lw=0.7, ls=":", alpha=0.8)
        if t:
            ax.axhline(t["value"][0], color=f"C{i}", ls="--", lw=0.9)
    ax.set_xlabel("step (full-batch gradient descent)")
    ax.set_ylabel("sharpness")
    ax.set_title("GD: λ_max(H) (solid), λ_c (dotted), 2/η (dashed)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, run in enumerate(adam):
        s = run["series"].get("preconditioned_sharpness")
        t = run["series"].get("preconditioned_sharpness_threshold")
        if s:
            ax.plot(
                s["step"],
                s["value"],
                color=f"C{len(gd) + i}",
                lw=1.2,
                label=f"λ_max(P⁻¹H), η = {run['lr']:.4g}",
            )
        if t:
            ax.axhline(t["value"][0], color=f"C{len(gd) + i}", ls="--", lw=0.9)
    ax.set_yscale("log")  # the first steps' preconditioner is tiny: a transient spike
    ax.set_xlabel("step (full-batch Adam)")
    ax.set_ylabel("preconditioned sharpness")
    ax.set_title("Adam: λ_max(P⁻¹H) (solid), 38/η (dashed)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    for i, run in enumerate(runs):
        label = f"GD η = {run['lr']:.4g}" if run["kind"] == "gd" else f"Adam η = {run['lr']:.4g}"
        ax.semilogy(run["losses"], color=f"C{i}", lw=0.9, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (full batch)")
    ax.set_title("the loss keeps falling, non-monotonically", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    (X, y), _, _ = common.load_splits(0, args.cache_dir)
    data = (X[: args.examples], y[: args.examples])
    runs = []
    for lr in args.lrs:
        runs.append(train("gd", lr, args.steps, args.every, data, seed=args.seed))
        print(f"GD lr={lr:.4g}: {runs[-1]['seconds']:.0f} s", flush=True)
    runs.append(train("adam", args.adam_lr, args.steps, args.every, data, seed=args.seed))
    print(f"Adam lr={args.adam_lr:g}: {runs[-1]['seconds']:.0f} s", flush=True)
    md = table(runs)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(runs, args.out / f"{NAME}.png")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    common.save_outputs(args.out, NAME, {"settings": settings, "runs": runs}, md, started)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
