"""Zhang et al. (NeurIPS 2019) at small scale on MNIST-1D: steps to a target vs batch size.

Claim: steps to a target fall in proportion to the batch size up to a *critical batch size* and
then level off; momentum and preconditioning (Adam) raise the critical batch size over plain SGD
(SGD < SGD + momentum < Adam), as the noisy quadratic model (NQM) predicts.

Setting: the MNIST-1D paper's CNN, all 4,000 training signals, the target is a test accuracy
(1,000 signals; ``--target``, default 0.7) checked after every step up to 20 and then every 5% of
the steps taken (at most ``--max-steps``, default 4,000), for batch sizes 8, 16, ..., 512.
Batches are drawn by walking through fresh permutations of the training set.
Optimisers: SGD, SGD with momentum 0.9, Adam (default betas), each at a constant learning rate.
For every optimiser and batch size the learning rate minimising the steps to target at seed 0 is
searched on a grid of powers of 2 (starting from the best of the previous batch size and walking
up or down while it improves; a trial stops once it has used as many steps as the best so far);
seeds 1, 2, ... then run at that learning rate. A seed sets the initialisation and the batch order.
The measured critical batch size is, per seed, where ``B * steps(B)`` has doubled from its minimum
(log-log interpolation; :func:`curvlab.nqm.critical_batch_size`'s rule); mean ± std over seeds.

NQM prediction: the model trained with SGD at batch 128 (seed 0, its tuned learning rate) until it
reaches the target is analysed with :func:`curvlab.analyze` (Hessian spectral density by SLQ on
1,000 training signals, 4 probes x 40 steps), which builds the NQM from the measured spectrum
(gradient noise C = H, near-flat directions dropped, target 1% of the initial risk) and predicts the
critical batch sizes of SGD and of SGD preconditioned by H^0.5; the same NQM (same nodes, same
threshold) is swept here also for momentum (β tuned by the NQM) and for momentum + H^0.5 (the
NQM's stand-in for Adam).

Run: ``python examples/mnist1d_critical_batch.py [--seeds 3] [--out DIR] [--quick]``.
Writes ``critical_batch.json``, ``critical_batch.md`` and ``critical_batch.png``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mnist1d_common as common
import numpy as np
import torch
from torch import nn

import curvlab as cl
from curvlab.demo.mnist1d import mnist1d_cnn
from curvlab.nqm import NQM, batch_size_sweep, critical_batch_from_steps, critical_batch_size

OPTIMIZERS = ("SGD", "SGD + momentum 0.9", "Adam")
FIRST_LR = {"SGD": 2.0**-3, "SGD + momentum 0.9": 2.0**-6, "Adam": 2.0**-8}
LR_RANGE = {
    "SGD": (2.0**-8, 2.0**3),
    "SGD + momentum 0.9": (2.0**-11, 2.0**0),
    "Adam": (2.0**-14, 2.0**-2),
}
NQM_LABELS = {
    "SGD": ("sgd", 0.0),
    "SGD + momentum 0.9": ("momentum", 0.0),
    "Adam": ("momentum", 0.5),
}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr)
    if name == "SGD + momentum 0.9":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def batch_stream(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Consecutive batches of a walk through fresh permutations (no example dropped)."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while buf.numel() < batch:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch]
        buf = buf[batch:]


def steps_to_target(
    opt_name: str,
    batch: int,
    lr: float,
    seed: int,
    data,
    target: float,
    cap: int,
    return_model: bool = False,
) -> tuple[float, nn.Module | None]:
    """Steps until the test accuracy first reaches ``target`` (``inf`` if not within ``cap``)."""
    (X, y), (Xt, yt) = data
    model, loss_fn = mnist1d_cnn(seed=seed), nn.CrossEntropyLoss()
    opt = make_optimizer(opt_name, model.parameters(), lr)
    stream = batch_stream(X.shape[0], batch, torch.Generator().manual_seed(seed + 200))
    next_check = 1
    for step in range(1, cap + 1):
        idx = next(stream)
        opt.zero_grad()
        loss = loss_fn(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        if not torch.isfinite(loss.detach()):
            return math.inf, None
        if step >= next_check:
            next_check = step + 1 if step < 20 else math.ceil(step * 1.05)
            if common.accuracy(model, Xt, yt) >= target:
                return float(step), (model if return_model else None)
    return math.inf, None


def tune(opt_name: str, batches, data, target: float, cap: int, log) -> dict[int, dict]:
    """Seed 0: the learning rate (powers of 2) with the fewest steps, per batch size."""
    lo, hi = LR_RANGE[opt_name]
    out: dict[int, dict] = {}
    start = FIRST_LR[opt_name]
    for b in batches:
        tried: dict[float, float] = {}

        def trial(lr: float, tried=tried, b=b) -> float:
            if lr in tried:
                return tried[lr]
            finite = [s for s in tried.values() if math.isfinite(s)]
            limit = int(min(finite)) if finite else cap
            s, _ = steps_to_target(opt_name, b, lr, 0, data, target, limit)
            tried[lr] = s
            log(f"  {opt_name:18s} B {b:5d} lr {lr:<10.4g} steps {s}")
            return s

        a, c = trial(start), trial(min(2 * start, hi))
        lr, direction = (2 * start, 2.0) if c < a or (math.isinf(a) and c <= a) else (start, 0.5)
        while True:
            nxt = lr * direction
            if not lo <= nxt <= hi:
                break
            if trial(nxt) < tried[lr]:
                lr = nxt
            else:
                break
        best = min(tried, key=lambda v: (tried[v], v))
        out[b] = {"lr": best, "steps": tried[best], "tried": dict(sorted(tried.items()))}
        if math.isfinite(tried[best]):
            start = best
    return out


def nqm_predictions(model: nn.Module, data, num_steps: int, probes: int) -> dict[str, Any]:
    (X, y), _ = data
    loss_fn = nn.CrossEntropyLoss()
    report = cl.analyze(
        model,
        loss_fn,
        (X[:1000], y[:1000]),
        quantities=["spectral_density", "top_eigenvalues"],
        num_steps=num_steps,
        density_probes=probes,
        k=1,
        seed=0,
        progress=False,
    )
    entry = report.entries[-1]
    density = entry["arrays"]["spectral_density"]
    analyze_curves = {
        label: curve["critical_batch_size"]
        for label, curve in ((report.nqm or {}).get("curves") or {}).items()
    }
    ev = np.asarray(density["nodes"], dtype=float).reshape(-1)
    w = np.asarray(density["weights"], dtype=float).reshape(-1)
    ok = np.isfinite(ev) & np.isfinite(w) & (w > 0)
    ev, w = ev[ok], w[ok] / w[ok].sum()
    # the same NQM as cl.analyze's: nodes above its flatness threshold, C = H, dim * weight each
    flat_below = (report.nqm or {}).get("flat_below", 1e-12 * np.abs(ev).max())
    keep = ev > flat_below
    dim = sum(p.numel() for p in model.parameters())
    nqm = NQM.from_spectrum(ev[keep], w[keep] * dim)
    bs = [2.0**k for k in range(0, 17)]
    sweep = batch_size_sweep(
        nqm, bs, ("sgd", "momentum"), (0.0, 0.5), target=0.01 * nqm.initial_risk()
    )
    predicted = {
        name: float(critical_batch_size(sweep, kind, power))
        for name, (kind, power) in NQM_LABELS.items()
    }
    predicted_sgd_h05 = float(critical_batch_size(sweep, "sgd", 0.5))
    return {
        "analyze_critical_batch_size": analyze_curves,
        "predicted": predicted,
        "predicted_sgd_precond_h05": predicted_sgd_h05,
        "top_eigenvalue": entry["values"].get("top_eigenvalues"),
        "positive_mass": float(w[keep].sum()),
        "flat_below": float(flat_below),
        "sweep": {
            f"{kind} p={power:g}": [float(r.steps) for r in sweep.select(kind, power)]
            for kind in ("sgd", "momentum")
            for power in (0.0, 0.5)
        },
        "sweep_batch_sizes": bs,
        "parameters": dim,
    }


def fmt_b(values) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "—"
    if len(vals) < len(values):
        return common.fmt_ms(vals, 0) + f" ({len(values) - len(vals)} seed(s) > largest B)"
    return common.fmt_ms(vals, 0)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "critical_batch")
    parser.add_argument("--target", type=float, default=0.7, help="test accuracy to reach")
    parser.add_argument("--batch-sizes", default="8,16,32,64,128,256,512")
    parser.add_argument("--max-steps", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    seeds, cap, target = args.seeds, args.max_steps, args.target
    num_steps, probes = 40, 4
    if args.quick:
        batches, seeds, cap, target, num_steps, probes = [16, 64], min(seeds, 2), 60, 0.2, 10, 1
    (X, y), _, test = common.load_splits(val=0, cache_dir=args.cache_dir)
    data = ((X, y), test)

    def log(msg: str) -> None:
        print(msg, flush=True)

    tuned = {}
    for name in OPTIMIZERS:
        tuned[name] = tune(name, batches, data, target, cap, log)
    steps: dict[str, dict[int, list[float]]] = {}
    for name in OPTIMIZERS:
        steps[name] = {}
        for b in batches:
            row = [tuned[name][b]["steps"]]
            s0 = row[0]
            for seed in range(1, seeds):
                limit = min(cap, int(3 * s0)) if math.isfinite(s0) else cap
                s, _ = steps_to_target(name, b, tuned[name][b]["lr"], seed, data, target, limit)
                row.append(s)
            steps[name][b] = row
            log(f"{name:18s} B {b:5d} lr {tuned[name][b]['lr']:<8.4g} steps {row}")
    critical = {
        name: [
            critical_batch_from_steps(batches, [steps[name][b][k] for b in batches])
            for k in range(seeds)
        ]
        for name in OPTIMIZERS
    }
    ref_b = 128 if 128 in batches else batches[len(batches) // 2]
    _, model = steps_to_target(
        "SGD", ref_b, tuned["SGD"][ref_b]["lr"], 0, data, target, cap, return_model=True
    )
    if model is None:
        model = mnist1d_cnn(seed=0)
    nqm = nqm_predictions(model, data, num_steps, probes)

    lines = [
        f"MNIST-1D CNN, 4,000 training signals, target test accuracy {target:g}, "
        f"{seeds} seed(s), learning rate tuned per optimiser and batch size at seed 0; "
        "steps: mean ± std over seeds.",
        "",
        "| batch size | " + " | ".join(f"{n}: steps (lr)" for n in OPTIMIZERS) + " |",
        "|---|" + "---|" * len(OPTIMIZERS),
    ]
    for b in batches:
        cells = []
        for n in OPTIMIZERS:
            vals = steps[n][b]
            finite = [v for v in vals if math.isfinite(v)]
            cell = common.fmt_ms(finite, 0) if finite else "not reached"
            if 0 < len(finite) < len(vals):
                cell += f" ({len(vals) - len(finite)} not reached)"
            cells.append(f"{cell} ({tuned[n][b]['lr']:.3g})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| optimiser | measured critical batch size | NQM prediction (measured spectrum) | NQM / measured |",
        "|---|---|---|---|",
    ]
    for n in OPTIMIZERS:
        pred = nqm["predicted"][n]
        kind, power = NQM_LABELS[n]
        finite = [c for c in critical[n] if math.isfinite(c)]
        ratio = f"{pred / np.mean(finite):.2g}" if finite and math.isfinite(pred) else "—"
        lines.append(
            f"| {n} | {fmt_b(critical[n])} | {pred:.3g} ({kind}, P = H^{power:g}) | {ratio} |"
        )
    means = {  # a seed whose B * steps never doubled counts as the largest batch size
        n: float(np.nanmean([max(batches) if c == math.inf else c for c in critical[n]]))
        for n in OPTIMIZERS
    }
    order = means["SGD"] <= means["SGD + momentum 0.9"] <= means["Adam"]
    lines += [
        "",
        f"Measured ordering SGD ≤ momentum ≤ Adam: {'holds' if order else 'does not hold'} "
        f"(means {', '.join(f'{n} {means[n]:.0f}' for n in OPTIMIZERS)}; a seed whose B·steps never "
        "doubled counts as the largest batch size). "
        f"curvlab.analyze's own NQM numbers: "
        + ", ".join(f"{k} {v:.3g}" for k, v in nqm["analyze_critical_batch_size"].items())
        + f"; NQM SGD + H^0.5: {nqm['predicted_sgd_precond_h05']:.3g}.",
    ]
    table = "\n".join(lines)
    print(table)
    results = {
        "settings": {
            "target_test_accuracy": target,
            "batch_sizes": batches,
            "seeds": seeds,
            "max_steps": cap,
            "lr_search": "powers of 2, seed 0, per optimiser and batch size",
            "lr_range": {k: list(v) for k, v in LR_RANGE.items()},
            "nqm_reference_model": f"SGD, batch {ref_b}, seed 0, trained to the target",
            "slq_steps": num_steps,
            "slq_probes": probes,
        },
        "tuning": {n: {str(b): v for b, v in t.items()} for n, t in tuned.items()},
        "steps": {n: {str(b): v for b, v in s.items()} for n, s in steps.items()},
        "measured_critical_batch_size": critical,
        "ordering_holds": bool(order),
        "nqm": nqm,
    }
    common.save_outputs(args.out, "critical_batch", results, table, started)
    plot(batches, steps, critical, nqm, args.out)
    print(f"wrote {args.out}")


def plot(batches, steps, critical, nqm, out: Path) -> None:
    plt = common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, n in enumerate(OPTIMIZERS):
        m, s = zip(
            *[
                common.mean_std([v for v in steps[n][b] if math.isfinite(v)] or [math.nan])
                for b in batches
            ]
        )
        a1.errorbar(batches, m, yerr=s, color=f"C{i}", marker="o", capsize=3, label=n)
        finite = [c for c in critical[n] if math.isfinite(c)]
        if finite:
            a1.axvline(float(np.mean(finite)), color=f"C{i}", ls=":", lw=1)
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("batch size")
    a1.set_ylabel("steps to target (measured)")
    a1.set_title("MNIST-1D CNN (dotted: measured critical B)")
    a1.legend(fontsize=8)
    bs = nqm["sweep_batch_sizes"]
    for key, vals in nqm["sweep"].items():
        a2.loglog(bs, vals, marker=".", label=f"NQM {key}")
    a2.set_xlabel("batch size")
    a2.set_ylabel("steps to 1% of initial risk (NQM)")
    a2.set_title("NQM from the measured Hessian spectrum")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "critical_batch.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
