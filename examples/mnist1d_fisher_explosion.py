"""Catastrophic Fisher explosion (Jastrzębski et al., 2021) on MNIST-1D, with seeds and error bars.

Claims: (1) training with a small learning rate gives a large early peak of Tr(F) and generalises
worse than training with the tuned (larger) learning rate; (2) at the small learning rate, the
Fisher penalty FP (``alpha * ||grad L(x, y_hat)||^2``, y_hat sampled from the model) limits the early
Tr(F) and recovers much of the lost generalisation; the random-label penalty GP_r acts like FP;
GP (data labels) and GP_x (input gradients) reduce early Tr(F) too but help less.

Setting: the MNIST-1D paper's CNN, 3,500 training signals (the last 500 of the 4,000 are the
validation set), SGD with momentum 0.9 and batch 32, a constant learning rate, the same number
of epochs in every run, no augmentation, no weight decay. Runs: ``small lr`` (0.005); ``tuned lr``
(the best validation accuracy of the grid 0.02, 0.05, 0.1 at seed 0); ``small lr + FP / GP / GP_x / GP_r``
(:class:`curvlab.regularizers.GradientNormPenalty`, recomputed every 10 steps as in the paper's
appendix C; alpha tuned on validation at seed 0 over 0.003, 0.03 (GP_x: 0.1, 1)). Each
chosen setting then runs with every seed (initialisation, batch order, sampled labels).
:class:`curvlab.Diagnostics` measures Tr(F) (one sampled label per example, a fixed set of 256
training signals) every 25 updates; the early peak is the maximum over the first quarter of
training. The table reports mean ± std over seeds of the early peak, the final Tr(F), the final
train and test accuracies (1,000 test signals) and the gap train − test.

Run: ``python examples/mnist1d_fisher_explosion.py [--seeds 3] [--epochs 40] [--out DIR] [--quick]``.
Writes ``fisher_explosion.json``, ``fisher_explosion.md`` and ``fisher_explosion.png``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import mnist1d_common as common
import torch
from torch import nn

from curvlab.analysis import Diagnostics, FisherExplosionWarning
from curvlab.demo.mnist1d import mnist1d_cnn
from curvlab.regularizers import GradientNormPenalty

BATCH = 32
MOMENTUM = 0.9
SMALL_LR = 0.005
LR_GRID = (0.02, 0.05, 0.1)
PENALTIES = {  # name -> (kind, alpha grid)
    "FP": ("fisher", (0.003, 0.03)),
    "GP": ("gradient", (0.003, 0.03)),
    "GP_x": ("input", (0.1, 1.0)),
    "GP_r": ("random", (0.003, 0.03)),
}
EVERY = 25


def train(lr: float, penalty: str | None, alpha: float, seed: int, epochs: int, data) -> dict:
    (X, y), (Xv, yv), (Xt, yt) = data
    model, loss_fn = mnist1d_cnn(seed=seed), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    reg = (
        GradientNormPenalty(
            model, loss_fn, kind=PENALTIES[penalty][0], alpha=alpha, every=10, seed=seed + 300
        )
        if penalty is not None
        else None
    )
    order = torch.Generator().manual_seed(seed + 200)
    probe = (X[:256], y[:256])
    step, diverged = 0, False
    t0 = time.perf_counter()
    with Diagnostics(
        model, loss_fn, quantities=["trace_fisher"], every=EVERY, seed=seed, explosion_factor=1e9
    ) as diag:
        for _ in range(epochs):
            for idx in common.epoch_batches(X.shape[0], BATCH, order):
                opt.zero_grad()
                out = model(X[idx])
                loss = loss_fn(out, y[idx])
                if reg is not None:
                    loss = loss + reg(X[idx], y[idx], output=out)
                loss.backward()
                opt.step()
                diag.step(step, *probe)
                step += 1
                if not torch.isfinite(loss.detach()):
                    diverged = True
                    break
            if diverged:
                break
    steps, trace_f = diag.history("trace_fisher")
    model.eval()
    train_acc, test_acc = common.accuracy(model, X, y), common.accuracy(model, Xt, yt)
    early = trace_f[: max(2, len(trace_f) // 4)]
    return {
        "lr": lr,
        "penalty": penalty,
        "alpha": alpha,
        "seed": seed,
        "updates": step,
        "diverged": diverged,
        "steps": steps,
        "trace_fisher": trace_f,
        "early_peak_trace_fisher": float(max(early)) if early else float("nan"),
        "final_trace_fisher": float(trace_f[-1]) if trace_f else float("nan"),
        "train_accuracy": train_acc,
        "val_accuracy": 0.0 if diverged else common.accuracy(model, Xv, yv),
        "test_accuracy": test_acc,
        "gap": train_acc - test_acc,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "fisher_explosion")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", FisherExplosionWarning)  # the table shows the peaks
    started = time.perf_counter()
    epochs, seeds = (1, min(args.seeds, 2)) if args.quick else (args.epochs, args.seeds)
    lr_grid = LR_GRID[:1] if args.quick else LR_GRID
    penalties = (
        {k: (kind, grid[:1]) for k, (kind, grid) in PENALTIES.items()} if args.quick else PENALTIES
    )
    data = common.load_splits(val=500, cache_dir=args.cache_dir)
    runs: list[dict[str, Any]] = []

    def run(lr, penalty, alpha, seed):
        r = train(lr, penalty, alpha, seed, epochs, data)
        runs.append(r)
        print(
            f"lr {lr:<5g} {penalty or '-':5s} alpha {alpha:<6g} seed {seed}: "
            f"early Tr(F) {r['early_peak_trace_fisher']:.3g} val {r['val_accuracy']:.3f} "
            f"test {r['test_accuracy']:.3f} ({r['seconds']:.1f} s)",
            flush=True,
        )
        return r

    # tuning at seed 0 on the validation set
    tuned = {lr: run(lr, None, 0.0, 0) for lr in lr_grid}
    best_lr = max(tuned, key=lambda lr: tuned[lr]["val_accuracy"])
    best_alpha = {}
    for name, (_, grid) in penalties.items():
        trial = {a: run(SMALL_LR, name, a, 0) for a in grid}
        best_alpha[name] = max(trial, key=lambda a: trial[a]["val_accuracy"])
    settings = {
        f"small lr ({SMALL_LR:g})": (SMALL_LR, None, 0.0),
        f"tuned lr ({best_lr:g})": (best_lr, None, 0.0),
    }
    for name in penalties:
        settings[f"small lr + {name} (alpha={best_alpha[name]:g})"] = (
            SMALL_LR,
            name,
            best_alpha[name],
        )
    chosen: dict[str, list[dict[str, Any]]] = {}
    for label, (lr, pen, alpha) in settings.items():
        rows = []
        for seed in range(seeds):
            done = next(
                (
                    r
                    for r in runs
                    if r["lr"] == lr
                    and r["penalty"] == pen
                    and r["alpha"] == alpha
                    and r["seed"] == seed
                ),
                None,
            )
            rows.append(done or run(lr, pen, alpha, seed))
        chosen[label] = rows

    keys = (
        "early_peak_trace_fisher",
        "final_trace_fisher",
        "train_accuracy",
        "test_accuracy",
        "gap",
    )
    lines = [
        f"MNIST-1D CNN, {data[0][0].shape[0]} training signals, SGD + momentum {MOMENTUM}, batch "
        f"{BATCH}, {epochs} epochs, "
        f"{seeds} seed(s); mean ± std over seeds. Tr(F): sampled labels, 256 training signals.",
        "",
        "| run | early peak Tr(F) | final Tr(F) | train acc | test acc | gap (train − test) |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for label, rows in chosen.items():
        summary[label] = {k: [r[k] for r in rows] for k in keys}
        cells = [
            common.fmt_ms(summary[label]["early_peak_trace_fisher"], 1),
            common.fmt_ms(summary[label]["final_trace_fisher"], 2),
            common.fmt_ms(summary[label]["train_accuracy"]),
            common.fmt_ms(summary[label]["test_accuracy"]),
            common.fmt_ms(summary[label]["gap"]),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Tuning at seed 0 (validation accuracy): lr "
        + ", ".join(f"{lr:g} → {r['val_accuracy']:.3f}" for lr, r in tuned.items())
        + "; "
        + "; ".join(
            f"{name} "
            + ", ".join(
                f"{a:g} → {r['val_accuracy']:.3f}"
                for r in runs
                for a in [r["alpha"]]
                if r["penalty"] == name and r["seed"] == 0
            )
            for name in penalties
        ),
    ]
    table = "\n".join(lines)
    print(table)
    results = {
        "settings": {
            "epochs": epochs,
            "seeds": seeds,
            "batch": BATCH,
            "momentum": MOMENTUM,
            "small_lr": SMALL_LR,
            "lr_grid": list(lr_grid),
            "penalties": {
                k: {"kind": v[0], "alpha_grid": list(v[1])} for k, v in penalties.items()
            },
            "penalty_every": 10,
            "trace_fisher_every": EVERY,
            "tuning": "seed 0, validation accuracy (last 500 training signals)",
        },
        "chosen": {k: v for k, v in settings.items()},
        "summary": summary,
        "runs": runs,
    }
    common.save_outputs(args.out, "fisher_explosion", results, table, started)
    plot(chosen, args.out)
    print(f"wrote {args.out}")


def plot(chosen: dict[str, list[dict]], out: Path) -> None:
    plt = common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(chosen)
    for i, name in enumerate(names):
        r = chosen[name][0]
        a1.semilogy(r["steps"], r["trace_fisher"], color=f"C{i}", lw=1, label=name)
    a1.set_xlabel("update")
    a1.set_ylabel("Tr(F) (seed 0)")
    a1.set_title("Tr(F) along training")
    a1.legend(fontsize=7)
    stats = [common.mean_std([r["test_accuracy"] for r in chosen[n]]) for n in names]
    a2.bar(
        range(len(names)),
        [m for m, _ in stats],
        yerr=[s for _, s in stats],
        capsize=4,
        color=[f"C{i}" for i in range(len(names))],
    )
    a2.set_xticks(
        range(len(names)), [n.split(" (")[0].replace("small lr + ", "+") for n in names], fontsize=8
    )
    lo = min(m - s for m, s in stats)
    a2.set_ylim(max(0.0, lo - 0.05), 1.0)
    a2.set_ylabel("test accuracy (mean ± std)")
    fig.tight_layout()
    fig.savefig(out / "fisher_explosion.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
