"""Wen et al. (AISTATS 2020) Table 2 and Fig. 5 at small scale, on MNIST-1D.

Claim (§5.4, Table 2): large-batch training (LB) generalises worse than small-batch (SB) within the
same number of epochs; adding Gaussian noise with the *diagonal* Fisher as covariance
(``sqrt((M_L - M_S) / (M_L M_S)) * sqrt(diag F) * xi``) recovers much of the lost accuracy, more
than isotropic noise of the same total variance (Fisher trace noise); full Fisher noise about
matches SB. Fig. 5a: ``||diag F||_F`` is a small part of ``||F||_F`` along training. Fig. 5b: the
top Hessian eigenvalue of the final LB model is larger than that of SB and of LB + diagonal Fisher.

Setting: the MNIST-1D paper's CNN (5,210 parameters), 3,500 training signals (the last 500 of the
4,000 are the validation set), SGD with momentum 0.9 (noise is added to the gradient before the
momentum buffer, as in Algorithm 1), M_S = 32, M_L = 512, the same number of
epochs for every method, linear warm-up over the first 5% of the updates and a x0.1 decay at 50%
and 75% (Wen et al.'s schedule shape), noise from the empirical Fisher of the training batch
(:class:`curvlab.noise.NoisyOptimizer`), switched off after a quarter of training (their A.7). The
learning rate of each method is the one of its grid with the best validation accuracy averaged
over the seeds; the table reports test accuracy (1,000 signals) at that learning rate, mean ± std
over the seeds. A seed sets the initialisation, the batch order and the noise.

Also the MNIST-1D paper's CNN recipe on all 4,000 training signals (Adam, lr 1e-2, batch 100,
6,000 steps) as the reference that should land near the paper's ≈ 94%.

Run: ``python examples/mnist1d_wen_table2.py [--seeds 3] [--epochs 60] [--out DIR] [--quick]``.
Writes ``wen_table2.json`` (every run), ``wen_table2.md``, ``wen_table2.png`` and ``wen_fig5.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mnist1d_common as common
import torch
from torch import nn

import curvlab as cl
from curvlab.demo.mnist1d import mnist1d_cnn, train_reference_cnn
from curvlab.noise import DiagFisherNoise, FisherTraceNoise, FullFisherNoise, NoisyOptimizer

SB, LB = 32, 512
MOMENTUM = 0.9
METHODS = ("SB", "LB", "LB + Fisher trace", "LB + diag Fisher", "LB + full Fisher")
GRIDS = {
    "SB": (0.01, 0.02, 0.05, 0.1),
    "LB": (0.05, 0.1, 0.2, 0.3),
}


def grid_for(method: str) -> tuple[float, ...]:
    return GRIDS["SB"] if method == "SB" else GRIDS["LB"]


def sampler_for(method: str):
    if method == "LB + Fisher trace":
        return FisherTraceNoise("empirical", large_batch=LB, small_batch=SB)
    if method == "LB + diag Fisher":
        return DiagFisherNoise("empirical", large_batch=LB, small_batch=SB)
    if method == "LB + full Fisher":
        return FullFisherNoise("empirical", large_batch=LB, small_batch=SB)
    return None


def lr_at(step: int, total: int, lr: float) -> float:
    """Linear warm-up over the first 5% of the updates, x0.1 at 50% and x0.01 at 75%."""
    warm = max(1, int(0.05 * total))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 ** (int(step >= total // 2) + int(step >= (3 * total) // 4)))


def train(
    method: str, lr: float, seed: int, epochs: int, data, norm_points: int, probe: int
) -> dict[str, Any]:
    (X, y), (Xv, yv), (Xt, yt) = data
    batch = SB if method == "SB" else LB
    model, loss_fn = mnist1d_cnn(seed=seed), nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    steps_per_epoch = X.shape[0] // batch
    total = steps_per_epoch * epochs
    sampler = sampler_for(method)
    noisy = (
        NoisyOptimizer(
            sgd, sampler, model, loss_fn, stop_fraction=0.25, total_steps=total, seed=seed + 100
        )
        if sampler is not None
        else None
    )
    order = torch.Generator().manual_seed(seed + 200)
    probe_data = (X[:probe], y[:probe])
    marks = sorted({round(k * total / max(norm_points - 1, 1)) for k in range(norm_points)})
    norms: dict[str, list[float]] = {"step": [], "epoch": [], "frobenius": [], "diag": []}

    def record(step: int) -> None:
        n = cl.fisher_norms(model, loss_fn, probe_data)
        norms["step"].append(step)
        norms["epoch"].append(step / steps_per_epoch)
        norms["frobenius"].append(float(n.frobenius))
        norms["diag"].append(float(n.diag_frobenius))

    step = 0
    t0 = time.perf_counter()
    diverged = False
    for _ in range(epochs):
        for idx in common.epoch_batches(X.shape[0], batch, order):
            if step in marks:
                record(step)
            for group in sgd.param_groups:
                group["lr"] = lr_at(step, total, lr)

            def closure(idx=idx):
                sgd.zero_grad()
                loss = loss_fn(model(X[idx]), y[idx])
                loss.backward()
                return loss

            if noisy is None:
                loss = closure()
                sgd.step()
            else:
                loss = noisy.step(closure)
            step += 1
            if not torch.isfinite(loss.detach()):
                diverged = True
                break
        if diverged:
            break
    seconds = time.perf_counter() - t0
    model.eval()
    result: dict[str, Any] = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "batch": batch,
        "updates": step,
        "diverged": diverged,
        "seconds": round(seconds, 2),
    }
    if diverged:
        result.update(train_accuracy=0.1, val_accuracy=0.0, test_accuracy=0.0)
        return result
    if total in marks:
        record(total)
    top = cl.eigenvalues(model, loss_fn, probe_data, k=1, tol=1e-3, seed=seed)
    result.update(
        train_accuracy=common.accuracy(model, X, y),
        val_accuracy=common.accuracy(model, Xv, yv),
        test_accuracy=common.accuracy(model, Xt, yt),
        top_hessian_eigenvalue=float(top.values[0]),
        fisher_norms=norms,
    )
    return result


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0], "wen_table2")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    epochs, seeds = (2, min(args.seeds, 2)) if args.quick else (args.epochs, args.seeds)
    if args.quick:
        GRIDS.update(SB=(0.1,), LB=(0.4,))
    norm_points, probe = (3, 128) if args.quick else (9, 512)
    data = common.load_splits(val=500, cache_dir=args.cache_dir)
    runs: list[dict[str, Any]] = []
    for method in METHODS:
        for lr in grid_for(method):
            for seed in range(seeds):
                r = train(method, lr, seed, epochs, data, norm_points, probe)
                runs.append(r)
                print(
                    f"{method:18s} lr {lr:<6g} seed {seed}: val {r['val_accuracy']:.3f} "
                    f"test {r['test_accuracy']:.3f} ({r['seconds']:.1f} s)",
                    flush=True,
                )
    chosen: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        by_lr = {
            lr: [r for r in runs if r["method"] == method and r["lr"] == lr]
            for lr in grid_for(method)
        }
        lr = max(by_lr, key=lambda v: common.mean_std([r["val_accuracy"] for r in by_lr[v]])[0])
        sel = by_lr[lr]
        chosen[method] = {
            "lr": lr,
            "val_accuracy": [r["val_accuracy"] for r in sel],
            "test_accuracy": [r["test_accuracy"] for r in sel],
            "train_accuracy": [r["train_accuracy"] for r in sel],
            "top_hessian_eigenvalue": [r.get("top_hessian_eigenvalue", float("nan")) for r in sel],
            "final_fisher_frobenius": [
                r["fisher_norms"]["frobenius"][-1] if "fisher_norms" in r else float("nan")
                for r in sel
            ],
            "final_diag_fisher_frobenius": [
                r["fisher_norms"]["diag"][-1] if "fisher_norms" in r else float("nan") for r in sel
            ],
            "updates": sel[0]["updates"],
        }
    ref_steps = 60 if args.quick else 6000
    (X, y), (Xv, yv), test = data
    full_train = (torch.cat([X, Xv]), torch.cat([y, yv]))
    reference = [
        train_reference_cnn((full_train, test), seed=s, steps=ref_steps) for s in range(seeds)
    ]
    ref_test = [r["test_accuracy"] for r in reference]
    print(f"reference CNN recipe (Adam): test {common.fmt_ms(ref_test)}", flush=True)

    lines = [
        f"MNIST-1D CNN, {X.shape[0]} training signals, {epochs} epochs for every method, "
        f"M_S = {SB}, M_L = {LB}, SGD + momentum {MOMENTUM}, {seeds} seed(s); mean ± std over seeds.",
        "",
        "| method | lr (tuned) | updates | test accuracy | train accuracy | top Hessian eigenvalue | ‖F‖_F / ‖diag F‖_F (final) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, c in chosen.items():
        ratio = [
            f / d for f, d in zip(c["final_fisher_frobenius"], c["final_diag_fisher_frobenius"])
        ]
        lines.append(
            f"| {method} | {c['lr']:g} | {c['updates']} | {common.fmt_ms(c['test_accuracy'])} | "
            f"{common.fmt_ms(c['train_accuracy'])} | {common.fmt_ms(c['top_hessian_eigenvalue'], 2)} | "
            f"{common.fmt_ms(ratio, 2)} |"
        )
    lines.append(
        f"| reference: paper's CNN recipe (Adam 1e-2, batch 100, {ref_steps} steps, 4,000 signals) "
        f"| - | {ref_steps} | {common.fmt_ms(ref_test)} | "
        f"{common.fmt_ms([r['train_accuracy'] for r in reference])} | - | - |"
    )
    lines += [
        "",
        "Learning-rate grids (validation accuracy, mean over seeds): "
        + "; ".join(
            f"{m}: "
            + ", ".join(
                f"{lr:g} → {common.mean_std([r['val_accuracy'] for r in runs if r['method'] == m and r['lr'] == lr])[0]:.3f}"
                for lr in grid_for(m)
            )
            for m in METHODS
        ),
    ]
    table = "\n".join(lines)
    print(table)
    results = {
        "settings": {
            "epochs": epochs,
            "seeds": seeds,
            "small_batch": SB,
            "momentum": MOMENTUM,
            "large_batch": LB,
            "grids": {m: list(grid_for(m)) for m in METHODS},
            "schedule": "linear warm-up 5% of updates, x0.1 at 50% and 75%",
            "noise": "empirical Fisher, scale sqrt((M_L-M_S)/(M_L M_S)), stopped after 25%",
            "train/val/test": [X.shape[0], Xv.shape[0], test[0].shape[0]],
            "probe_examples": probe,
        },
        "chosen": chosen,
        "reference_cnn": reference,
        "runs": runs,
    }
    common.save_outputs(args.out, "wen_table2", results, table, started)
    plot(chosen, runs, reference, args.out)
    print(f"wrote {args.out}")


def plot(chosen, runs, reference, out: Path) -> None:
    plt = common.pyplot()
    names = list(chosen)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    means = [common.mean_std(chosen[m]["test_accuracy"]) for m in names]
    ax.bar(range(len(names)), [m for m, _ in means], yerr=[s for _, s in means], capsize=4)
    ref = common.mean_std([r["test_accuracy"] for r in reference])[0]
    ax.axhline(ref, color="k", ls="--", lw=1, label=f"Adam reference {ref:.3f}")
    ax.set_xticks(range(len(names)), [n.replace("LB + ", "LB+\n") for n in names], fontsize=8)
    lo = min(m - s for m, s in means)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel("test accuracy (mean ± std)")
    ax.set_title("Wen et al. Table 2 on MNIST-1D (tuned lr per method)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "wen_table2.png", dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(names):
        r = next(
            (
                r
                for r in runs
                if r["method"] == m and r["lr"] == chosen[m]["lr"] and "fisher_norms" in r
            ),
            None,
        )
        if r is None:
            continue
        fn = r["fisher_norms"]
        a1.semilogy(fn["epoch"], fn["frobenius"], color=f"C{i}", label=f"{m}: ‖F‖_F")
        a1.semilogy(fn["epoch"], fn["diag"], color=f"C{i}", ls="--", label=f"{m}: ‖diag F‖_F")
    a1.set_xlabel("epoch")
    a1.set_ylabel("Frobenius norm (empirical Fisher)")
    a1.set_title("Fig. 5a: full vs diagonal Fisher (seed 0)")
    a1.legend(fontsize=6)
    means = [common.mean_std(chosen[m]["top_hessian_eigenvalue"]) for m in names]
    a2.bar(range(len(names)), [m for m, _ in means], yerr=[s for _, s in means], capsize=4)
    a2.set_xticks(range(len(names)), [n.replace("LB + ", "LB+\n") for n in names], fontsize=8)
    a2.set_ylabel("top Hessian eigenvalue (final model)")
    a2.set_title("Fig. 5b")
    fig.tight_layout()
    fig.savefig(out / "wen_fig5.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
