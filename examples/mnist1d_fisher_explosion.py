"""Catastrophic Fisher explosion (Jastrzębski et al., 2021) on MNIST-1D, in the paper's regime.

Claims tested (the paper's Table 1 and Table 3, "w/o aug." settings): with a learning rate 10×
smaller than the tuned one (η*/10), a network that still fits its training set (≈ 100% training
accuracy, Table 5) generalises worse than with η* and reaches a larger maximum of Tr(F); at
η*/10, the Fisher penalty FP (``α‖(1/B) Σ g(x_i, ŷ_i)‖²``, ŷ_i sampled from the model; eq. 2)
lowers the maximum Tr(F) and closes the test-accuracy gap to η*; GP_r (uniformly random labels)
acts like FP; GP (data labels) helps less.

Regime (the paper's appendix E.1): the MNIST-1D paper's CNN, 3,500 training signals (the last
500 of the 4,000 are the validation set), 1,000 test signals; SGD with momentum 0.9, batch 128
(batches drawn by walking through fresh permutations: no example dropped), the same number of
epochs in every run, learning rate ×0.1 at 50% and 75% of the updates, no augmentation, no weight
decay. η*: the best final validation accuracy at seed 0 on a log grid (factor 2), extended past
its edge while the best lies on it (the paper tunes once, not per seed). Penalties
(:class:`curvlab.regularizers.GradientNormPenalty`, recomputed every 10 updates as in the paper's
appendix C) at η*/10, from the first update; α the best validation accuracy at seed 0: FP and
GP_r on the 5-point grid ``v·10^{-1..1}`` with v = 0.01 (the paper's v; one more point, ×√10, past
an edge if the best lies on it), GP on 2 points (GP_x, the paper's input-gradient penalty, is left
out to fit the time limit). Each chosen setting then runs with every seed
(initialisation, batch order, sampled labels). Tr(F) (:func:`curvlab.fisher_trace`: labels
sampled from the model, explicit seed) on 128 training signals (the training batch size, as in the
paper) every 27 updates (≈ one epoch); its maximum is taken from the end of the first epoch on
(the paper's appendix A.1).

Verdict: the preconditions are that every baseline run (η* and η*/10, every seed) ends with
training accuracy ≥ 0.99 and that η* beats η*/10 on test accuracy by more than 2 SE (SE =
std/sqrt(n) over seeds, combined in quadrature for a difference). **Confirms** if FP at its best α
lowers the mean maximum Tr(F) by ≥ 30% and closes ≥ half the test-accuracy gap; **refutes** if the
preconditions hold and no penalty at its chosen α raises test accuracy over η*/10 by more than
2 SE; otherwise the verdict says which part holds.

Run: ``python examples/mnist1d_fisher_explosion.py [--seeds 3] [--epochs 250] [--out DIR] [--quick]``.
A full run writes ``mnist1d_fisher_explosion.json`` and ``mnist1d_fisher_explosion.png`` into
docs/results/ (``--quick``: into examples/output/mnist1d_fisher_explosion/), unless ``--out``. It
refuses (before any work) an output folder that holds an earlier run's
``mnist1d_fisher_explosion.json``, the committed docs/results/ included, unless ``--overwrite``;
the JSON of the runs is written before the verdict is drawn, so a failure after the training loses
no run.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mnist1d_common as common
import numpy as np
import torch
from torch import Tensor, nn

import curvlab as cl
from curvlab.demo.mnist1d import mnist1d_cnn
from curvlab.regularizers import GradientNormPenalty

NAME = "mnist1d_fisher_explosion"
BATCH = 128
MOMENTUM = 0.9
SMALL_FACTOR = 10  # small lr = eta* / 10 (the paper's appendix E.1)
LR_GRID = (0.025, 0.05, 0.1, 0.2, 0.4)  # log grid, factor 2; extended past an edge
ALPHA_V = 0.01  # the paper's v: alpha in v * 10^[-1, 1]
ALPHA_GRID5 = tuple(round(ALPHA_V * 10 ** (k / 2), 6) for k in (-2, -1, 0, 1, 2))
PENALTIES = {  # name -> (GradientNormPenalty kind, alpha grid, extend past an edge)
    "FP": ("fisher", ALPHA_GRID5, True),
    "GP_r": ("random", ALPHA_GRID5, True),
    "GP": ("gradient", (0.001, 0.01), False),
}
PENALTY_EVERY = 10  # the paper's appendix C
PROBE = 128  # Tr(F) on the first 128 training signals
MAX_EXTEND = 3  # at most this many lr-grid extensions per side
MAX_EXTEND_ALPHA = 1  # alpha grids (FP, GP_r): one more point past an edge, the time limit
EPOCHS = (
    250  # the pilot: eta*/10 = 0.01 fits 0.975 of the training set in 200 epochs, 0.9994 in 300
)


def train(
    lr: float,
    penalty: str | None,
    alpha: float,
    seed: int,
    epochs: float,
    data: tuple[tuple[Tensor, Tensor], ...],
) -> dict[str, Any]:
    """One run: momentum SGD with step decay, optionally a penalty; Tr(F) about once per epoch.

    Args:
        lr: the initial learning rate (×0.1 at 50% and at 75% of the updates).
        penalty: a key of ``PENALTIES`` or ``None``.
        alpha: the penalty coefficient (ignored without a penalty).
        seed: initialisation (``seed``), batch order (``seed + 200``), penalty labels
            (``seed + 300``) and Tr(F) labels (``10_000 * seed + k`` at the k-th measurement).
        epochs: passes over the training set (updates = round(epochs * n / BATCH)).
        data: ``(train, val, test)`` splits.

    Returns:
        The run's record (accuracies, Tr(F) history and its maximum after the first epoch).
    """
    (X, y), (Xv, yv), (Xt, yt) = data
    n = X.shape[0]
    updates = round(epochs * n / BATCH)
    per_epoch = round(n / BATCH)  # Tr(F) every ~epoch
    decays = (updates // 2, (3 * updates) // 4)
    model, loss_fn = mnist1d_cnn(seed=seed), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    reg = None
    if penalty is not None:
        kind = PENALTIES[penalty][0]
        reg = GradientNormPenalty(
            model, loss_fn, kind=kind, alpha=alpha, every=PENALTY_EVERY, seed=seed + 300
        )
    probe = (X[:PROBE], y[:PROBE])
    steps: list[int] = []
    trace_f: list[float] = []

    def measure(step: int) -> None:
        value = cl.fisher_trace(model, loss_fn, probe, seed=10_000 * seed + len(steps)).value
        steps.append(step)
        trace_f.append(value if math.isfinite(value) else math.inf)

    t0 = time.perf_counter()
    stream = common.permutation_batches(n, BATCH, torch.Generator().manual_seed(seed + 200))
    diverged = False
    measure(0)
    for step in range(updates):
        if step in decays:
            for group in opt.param_groups:
                group["lr"] *= 0.1
        idx = next(stream)
        opt.zero_grad()
        out = model(X[idx])
        loss = loss_fn(out, y[idx])
        if reg is not None:
            loss = loss + reg(X[idx], y[idx], output=out)
        if not torch.isfinite(loss.detach()):
            diverged = True
            break
        loss.backward()
        opt.step()
        if (step + 1) % per_epoch == 0 or step + 1 == updates:
            measure(step + 1)
    model.eval()
    after_first = [v for s, v in zip(steps, trace_f) if s >= per_epoch]
    acc = (lambda X_, y_: 0.0) if diverged else common.accuracy
    return {
        "method": method_name(penalty),
        "seed": seed,
        "lr": lr,
        "alpha": alpha if penalty is not None else 0.0,
        "penalty_kind": PENALTIES[penalty][0] if penalty is not None else None,
        "epochs": epochs,
        "updates": updates if not diverged else step,
        "diverged": diverged,
        "train_accuracy": acc(model, X, y),
        "val_accuracy": acc(model, Xv, yv),
        "test_accuracy": acc(model, Xt, yt),
        "max_trace_fisher": max(after_first) if after_first and not diverged else None,
        "final_trace_fisher": trace_f[-1] if not diverged else None,
        "trace_fisher_steps": steps,
        "trace_fisher": [round(v, 5) if math.isfinite(v) else None for v in trace_f],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def method_name(penalty: str | None) -> str:
    return "baseline" if penalty is None else penalty


def tune(
    grid: Sequence[float],
    run_one,
    factor: float,
    extend: bool,
    max_extend: int = MAX_EXTEND,
) -> tuple[float, dict[float, dict[str, Any]]]:
    """Grid search on validation accuracy, extended by ``factor`` past an edge while the best is on it.

    Diverged runs count as validation accuracy 0. Ties go to the first (smallest) value.
    """
    trials = {v: run_one(v) for v in grid}
    ups = downs = 0
    while True:
        vals = sorted(trials)
        best = max(vals, key=lambda v: trials[v]["val_accuracy"])
        if not extend:
            return best, trials
        if best == vals[-1] and ups < max_extend:
            new, ups = vals[-1] * factor, ups + 1
        elif best == vals[0] and downs < max_extend:
            new, downs = vals[0] / factor, downs + 1
        else:
            return best, trials
        new = float(f"{new:.6g}")
        trials[new] = run_one(new)


def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std and SE = std / sqrt(n)."""
    a = np.asarray(values, dtype=float)
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "se": std / math.sqrt(a.size), "n": int(a.size)}


def verdict(chosen: dict[str, list[dict[str, Any]]], threshold: float = 0.99) -> dict[str, Any]:
    """The verdict rule of the module docstring, with every number it uses."""
    eta, small = chosen["eta*"], chosen["eta*/10"]
    test = {k: stats([r["test_accuracy"] for r in rows]) for k, rows in chosen.items()}
    trace = {
        k: stats(
            [r["max_trace_fisher"] if r["max_trace_fisher"] is not None else math.inf for r in rows]
        )
        for k, rows in chosen.items()
    }
    fits = {
        k: [r["train_accuracy"] for r in rows] for k, rows in (("eta*", eta), ("eta*/10", small))
    }
    all_fit = all(v >= threshold for vals in fits.values() for v in vals)
    gap = test["eta*"]["mean"] - test["eta*/10"]["mean"]
    gap_se = math.hypot(test["eta*"]["se"], test["eta*/10"]["se"])
    gap_exists = gap > 2 * gap_se and gap > 0
    penalties = {}
    for name in PENALTIES:
        key = f"eta*/10 + {name}"
        if key not in chosen:
            continue
        gain = test[key]["mean"] - test["eta*/10"]["mean"]
        gain_se = math.hypot(test[key]["se"], test["eta*/10"]["se"])
        penalties[name] = {
            "alpha": chosen[key][0]["alpha"],
            "test_gain": gain,
            "test_gain_se": gain_se,
            "gain_over_2se": gain > 2 * gain_se,
            "fraction_of_gap_closed": gain / gap if gap > 0 else None,
            "max_trace_fisher_reduction": 1 - trace[key]["mean"] / trace["eta*/10"]["mean"],
        }
    fp = penalties.get("FP")
    fp_trace = fp is not None and fp["max_trace_fisher_reduction"] >= 0.30
    fp_closes = (
        fp is not None
        and fp["fraction_of_gap_closed"] is not None
        and gap_exists
        and fp["fraction_of_gap_closed"] >= 0.5
    )
    any_gain = any(p["gain_over_2se"] for p in penalties.values())
    preconditions = all_fit and gap_exists
    if preconditions and fp_trace and fp_closes:
        outcome = "confirms"
        because = "FP lowers the maximum Tr(F) by >= 30% and closes >= half the test gap"
    elif preconditions and not any_gain:
        outcome = "refutes"
        because = "preconditions hold and no penalty raises test accuracy by > 2 SE"
    elif not preconditions:
        outcome = "untestable"
        because = (
            ("a baseline run ends below 0.99 training accuracy; " if not all_fit else "")
            + ("eta* does not beat eta*/10 by > 2 SE; " if not gap_exists else "")
            + "so the gap the penalties should close is not the paper's"
        )
    else:
        outcome = "partly"
        because = (
            "a penalty raises test accuracy by > 2 SE, but FP "
            + ("lowers" if fp_trace else "does not lower")
            + " the maximum Tr(F) by >= 30% and "
            + ("closes" if fp_closes else "does not close")
            + " half the gap"
        )
    return {
        "outcome": outcome,
        "because": because,
        "preconditions": {
            "baselines_fit": all_fit,
            "train_accuracy": fits,
            "threshold": threshold,
            "gap_exists": gap_exists,
            "test_gap": gap,
            "test_gap_se": gap_se,
        },
        "small_lr_max_trace_over_eta_star": trace["eta*/10"]["mean"] / trace["eta*"]["mean"],
        "fp_lowers_max_trace_30pct": fp_trace,
        "fp_closes_half_gap": fp_closes,
        "penalties": penalties,
        "test_accuracy": test,
        "max_trace_fisher": trace,
    }


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0], NAME, seeds=3, results=True)
    parser.add_argument(
        "--epochs",
        type=common.positive_float,
        default=EPOCHS,
        help="epochs of every run (a finite number > 0; default %(default)s, quick 2)",
    )
    args = parser.parse_args()
    common.quick(parser, args, epochs=2.0, seeds=2)
    args.out = common.out_folder(args, NAME)
    outputs = [args.out / f"{NAME}.json", args.out / f"{NAME}.png"]
    problem = common.rerun_problem(args.out, NAME, outputs, args.overwrite)
    if problem:
        parser.error(problem)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.quick:
        epochs, seeds, lr_grid = args.epochs, args.seeds, (0.05, 0.1)
        penalties = {
            k: (kind, grid[: 2 if k != "GP" else 1], False)
            for k, (kind, grid, _) in PENALTIES.items()
        }
        extend_lr = False
    else:
        epochs, seeds, lr_grid, penalties, extend_lr = (
            args.epochs,
            args.seeds,
            LR_GRID,
            PENALTIES,
            True,
        )
    data = common.load_splits(val=500, cache_dir=args.cache_dir)
    log: list[dict[str, Any]] = []

    def run(lr: float, penalty: str | None, alpha: float, seed: int) -> dict[str, Any]:
        for r in log:  # a setting already run (seed 0 of the tuning)
            if (r["lr"], r["method"], r["alpha"], r["seed"]) == (
                lr,
                method_name(penalty),
                alpha,
                seed,
            ):
                return r
        r = train(lr, penalty, alpha, seed, epochs, data)
        log.append(r)
        print(
            f"lr {lr:<8.4g} {penalty or '-':5s} alpha {alpha:<8.4g} seed {seed}: "
            f"train {r['train_accuracy']:.3f} val {r['val_accuracy']:.3f} "
            f"test {r['test_accuracy']:.3f} max Tr(F) {r['max_trace_fisher'] or float('nan'):.4g}"
            f"{' DIVERGED' if r['diverged'] else ''} ({r['seconds']:.1f} s)",
            flush=True,
        )
        return r

    # tuning at seed 0 on the validation set
    best_lr, lr_trials = tune(lr_grid, lambda lr: run(lr, None, 0.0, 0), 2.0, extend_lr)
    small_lr = float(f"{best_lr / SMALL_FACTOR:.6g}")
    tuning = {"lr": lr_trials}
    best_alpha = {}
    for name, (_, grid, extend) in penalties.items():
        best_alpha[name], tuning[name] = tune(
            grid,
            lambda a, name=name: run(small_lr, name, a, 0),
            math.sqrt(10),
            extend,
            MAX_EXTEND_ALPHA,
        )
    settings = {"eta*": (best_lr, None, 0.0), "eta*/10": (small_lr, None, 0.0)}
    for name in penalties:
        settings[f"eta*/10 + {name}"] = (small_lr, name, best_alpha[name])
    chosen = {
        label: [run(lr, pen, a, seed) for seed in range(seeds)]
        for label, (lr, pen, a) in settings.items()
    }
    chosen_ids = {id(r) for rows in chosen.values() for r in rows}
    results = {
        "settings": {
            "paper": "Jastrzębski et al. 2021, Catastrophic Fisher explosion (Table 1, 3, 5; appendix C, E.1)",
            "data": "MNIST-1D, 3,500 training / 500 validation / 1,000 test signals",
            "model": "MNIST-1D CNN (5,210 parameters)",
            "epochs": epochs,
            "updates": chosen["eta*"][0]["updates"],
            "batch": BATCH,
            "batches": "walk through fresh permutations, no example dropped",
            "momentum": MOMENTUM,
            "schedule": "lr x0.1 at 50% and 75% of the updates",
            "weight_decay": 0.0,
            "augmentation": None,
            "seeds": list(range(seeds)),
            "lr_grid": list(lr_grid),
            "lr_grid_extended_past_edges": extend_lr,
            "eta_star": best_lr,
            "small_lr": small_lr,
            "small_lr_factor": SMALL_FACTOR,
            "penalties": {
                k: {
                    "kind": kind,
                    "alpha_grid": list(g),
                    "extended_past_edges": ext,
                    "alpha": best_alpha[k],
                }
                for k, (kind, g, ext) in penalties.items()
            },
            "penalty_every": PENALTY_EVERY,
            "trace_fisher": f"curvlab.fisher_trace, labels sampled from the model, first {PROBE} "
            f"training signals, every {round(data[0][0].shape[0] / BATCH)} updates (~1 epoch) "
            "and at the end; max over measurements from the end of the first epoch on",
            "tuning": "seed 0, final validation accuracy; eta* on the lr grid (x2 past an edge), "
            "alpha at eta*/10 (one more point, x sqrt(10), past an edge for FP and GP_r)",
            "se": "std / sqrt(n) over seeds (sample std); differences: SEs in quadrature",
        },
        "runs": [dict(r, setting=label) for label, rows in chosen.items() for r in rows],
        "tuning": [
            dict(r, tuned=key, chosen=id(r) in chosen_ids)
            for key, trials in tuning.items()
            for r in trials.values()
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["environment"] = common.environment()
    # the runs first: whatever the verdict meets, the training is kept
    (args.out / f"{NAME}.json").write_text(dump(results) + "\n")
    result = verdict(chosen)
    table = markdown_table(chosen, result, epochs, seeds)
    print(table)
    results.update(verdict=result, table=table)
    (args.out / f"{NAME}.json").write_text(dump(results) + "\n")
    plot(chosen, tuning, args.out)
    print(f"verdict: {result['outcome']} ({result['because']})")
    print(f"wrote {args.out / (NAME + '.json')} ({results['seconds']:.0f} s)")


def dump(obj: Any) -> str:
    """JSON with one level of indentation and lists of numbers on one line; a non-finite number
    (the maximum Tr(F) of a diverged run, a ratio of two) is written as the string ``"inf"``,
    ``"-inf"`` or ``"nan"`` (standard JSON has no token for it)."""
    text = json.dumps(_finite_json(obj), indent=1, allow_nan=False, default=float)
    return re.sub(
        r"\[\s*((?:-?[0-9.eE+-]+|null)(?:,\s*(?:-?[0-9.eE+-]+|null))*)\s*\]",
        lambda m: "[" + re.sub(r",\s*", ", ", m.group(1)) + "]",
        text,
    )


def _finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by its string (``"inf"``, ``"nan"``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def markdown_table(
    chosen: dict[str, list[dict[str, Any]]], result: dict[str, Any], epochs: float, seeds: int
) -> str:
    """The chosen settings: mean ± std over seeds (and SE of the test accuracy)."""
    lines = [
        f"MNIST-1D CNN, batch {BATCH}, SGD + momentum {MOMENTUM}, {epochs:g} epochs "
        f"(lr ×0.1 at 50% and 75%), {seeds} seed(s); mean ± std (test: ± SE too).",
        "",
        "| run | lr | α | train acc | test acc (± std) | test SE | max Tr(F) | final Tr(F) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in chosen.items():
        t = result["test_accuracy"][label]
        final = [r["final_trace_fisher"] for r in rows if r["final_trace_fisher"] is not None]
        mx = [r["max_trace_fisher"] for r in rows if r["max_trace_fisher"] is not None]
        lines.append(
            f"| {label} | {rows[0]['lr']:g} | {rows[0]['alpha']:g} | "
            f"{common.fmt_ms([r['train_accuracy'] for r in rows])} | "
            f"{common.fmt_ms([r['test_accuracy'] for r in rows])} | {t['se']:.3f} | "
            f"{common.fmt_ms(mx, 1)} | {common.fmt_ms(final, 2)} |"
        )
    return "\n".join(lines)


def plot(
    chosen: dict[str, list[dict[str, Any]]],
    tuning: dict[str, dict[float, dict[str, Any]]],
    out: Path,
) -> None:
    """Tr(F) along training (mean over seeds), test accuracy (mean ± SE), the tuning curves."""
    plt = common.pyplot()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.4))
    names = list(chosen)
    for i, name in enumerate(names):
        rows = [r for r in chosen[name] if not r["diverged"]]
        if not rows:
            continue
        per_epoch = (
            rows[0]["trace_fisher_steps"][1] if len(rows[0]["trace_fisher_steps"]) > 1 else 1
        )
        length = min(len(r["trace_fisher"]) for r in rows)
        curve = np.mean([[v or np.nan for v in r["trace_fisher"][:length]] for r in rows], axis=0)
        epochs = np.asarray(rows[0]["trace_fisher_steps"][:length]) / per_epoch
        a1.semilogy(epochs, curve, color=f"C{i}", lw=1.2, label=name)
    a1.set_xlabel("epoch (≈ 27 updates)")
    a1.set_ylabel("Tr(F), 128 training signals (mean over seeds)")
    a1.set_title("Tr(F) along training")
    a1.legend(fontsize=8)
    st = [stats([r["test_accuracy"] for r in chosen[n]]) for n in names]
    a2.bar(
        range(len(names)),
        [s["mean"] for s in st],
        yerr=[s["se"] for s in st],
        capsize=4,
        color=[f"C{i}" for i in range(len(names))],
    )
    a2.set_xticks(range(len(names)), [n.replace("eta*/10 + ", "+") for n in names], fontsize=8)
    lo = min(s["mean"] - s["se"] for s in st)
    hi = max(s["mean"] + s["se"] for s in st)
    a2.set_ylim(max(0.0, lo - 0.03), min(1.0, hi + 0.02))
    a2.set_ylabel(f"test accuracy (mean ± SE, {len(chosen[names[0]])} seeds)")
    a2.set_title("final test accuracy")
    for i, (key, trials) in enumerate(tuning.items()):
        if key == "lr":
            continue
        xs = sorted(trials)
        a3.semilogx(xs, [trials[x]["val_accuracy"] for x in xs], "o-", color=f"C{i + 1}", label=key)
    a3.set_xlabel("α (at η*/10)")
    a3.set_ylabel("validation accuracy (seed 0)")
    small = chosen["eta*/10"][0]["val_accuracy"]
    a3.axhline(small, color="C1", ls=":", lw=1, label="η*/10 alone")
    a3.axhline(chosen["eta*"][0]["val_accuracy"], color="C0", ls=":", lw=1, label="η*")
    a3.set_title("α tuning")
    a3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
