"""Wen et al. (AISTATS 2020) Table 2 and Fig. 5 on MNIST-1D, in the paper's own regime.

Claim (§5.4, Table 2): within the same number of epochs, large-batch training (LB) generalises
worse than small-batch (SB); adding Gaussian noise with the *diagonal* Fisher as covariance
(Algorithm 1: ``sqrt((M_L - M_S) / (M_L M_S)) * sqrt(diag F) * xi`` added to the gradient) recovers
much of the lost accuracy, more than isotropic noise of the same total variance (Fisher-trace noise).
Full-Fisher noise roughly matches SB (Table 2's caption, one network). Fig. 5a: ``||diag F||_F`` is
a small part of ``||F||_F`` along training. Fig. 5b: the top Hessian eigenvalue of the final LB
model, after a temperature calibration, is larger than that of LB + diagonal Fisher and of SB.

Regime (the paper's, scaled to MNIST-1D): the MNIST-1D paper's CNN (5,210 parameters), 3,500
training signals (the last 500 of the 4,000 are the validation set, the 1,000 test signals are
reported), M_S = 32, M_L = 512, **240 epochs for every method** (26,250 SB and 1,640 LB updates).
Batches are drawn by walking through a stream of fresh permutations of the training set: a batch
takes the next ``M`` indices, and a permutation's leftover (3,500 mod 512 = 428 indices for LB)
starts the next batch, which is completed from the next permutation; so no example is dropped, and
``floor(240 * 3500 / M)`` updates see every example 240 times except the last permutation's final
``240 * 3500 mod M`` indices (320 for LB, none for SB). Schedule (Wen et al. A.7, whose runs warm up
for 10 epochs and decay at epochs 100 and 150 of about 200): linear warm-up over the first 5% of the
updates, x0.1 at 50% and again at 75%, for every method. Noise (:class:`curvlab.noise.NoisyOptimizer`,
empirical Fisher of the training batch) on the first quarter of the updates only (A.7), so LB
methods run 410 noisy updates then 410 noise-free ones at the peak learning rate.

Optimiser: SGD with momentum 0.9 (``--momentum``). Momentum is **our addition**: Algorithm 1 is
plain SGD, ``theta <- theta - lr * grad + eps``, and the paper does not say what its network runs
used. The noise is added to the gradient before the momentum buffer, so it is scaled exactly as the
gradient is (``--momentum 0`` runs Algorithm 1 as written).

Protocol: the learning rate of each method is the best validation accuracy of its grid at seed 0;
then seeds 0-4 at that learning rate. Every LB method is also run at LB's own learning rate (the
convention of Wen et al.'s Fig. 3). LB + full Fisher runs once (seed 0, at LB + diag's learning
rate), as the paper's footnote. A seed sets the initialisation, the batch order and the
noise.

Curvature of every reported run: the top eigenvalue of the Hessian of the training loss on 512
training signals, after fitting a temperature ``T`` (the logits are divided by ``T``) that
minimises the cross-entropy on the 500 validation signals: Wen et al. §5.3 fit ``T`` on their test
set so that networks whose confidence differs can be compared; we use held-out validation data
instead, and also give the uncalibrated eigenvalue. Final ``||F||_F`` and ``||diag F||_F``
(empirical Fisher, same 512 signals); along training at seed 0 (Fig. 5a).

Verdict: preconditions LB train accuracy >= 0.99 and SB - LB >= 1 point and > 2 SE. Confirms if
LB + diag - LB >= half of SB - LB and > 2 SE; refutes if LB + diag - LB <= 1 SE; otherwise
inconclusive. SE of a difference of means: ``sqrt(s_a^2 / n_a + s_b^2 / n_b)`` over the seeds.

Run: ``python examples/mnist1d_wen_table2.py [--seeds 5] [--epochs 240] [--out DIR] [--quick]``.
Writes ``mnist1d_wen_table2.json``, ``mnist1d_wen_table2.md``, ``mnist1d_wen_table2.png`` and
``mnist1d_wen_fig5.png`` into ``--out`` (default ``docs/results/``). ``--replot FILE`` recomputes
the verdict, table and figures from a saved JSON without training, into the same four files beside
FILE unless ``--out``; it refuses (before any work) to replace any of them that exists, FILE itself
included, unless ``--overwrite``. A training run refuses the same way (before any work) an output
folder that holds an earlier run's ``mnist1d_wen_table2.json``, the committed ``docs/results/`` of a
full run without ``--out`` included, unless ``--overwrite``; it writes the JSON of its runs before
the verdict is drawn, so a failure after the training loses no run.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import mnist1d_common as common
import torch
from torch import Tensor, nn

import curvlab as cl
from curvlab.demo.mnist1d import mnist1d_cnn, train_reference_cnn
from curvlab.noise import DiagFisherNoise, FisherTraceNoise, FullFisherNoise, NoisyOptimizer

NAME = "mnist1d_wen_table2"
SB, LB = 32, 512
METHODS = ("SB", "LB", "LB+trace", "LB+diag")  # tuned and run over the seeds
FOOTNOTE = "LB+full"  # seed 0 only
FIG5 = "mnist1d_wen_fig5.png"
NOISE_STOP = 0.25
PENDING = (
    "(the runs are saved in the JSON; the summary was not written: rerun the script with "
    "--replot on the JSON and --overwrite)"
)
DEFAULT_GRIDS = {  # 0.05 for SB trained unstably in a pilot (train accuracy 0.77 at seed 0)
    "SB": (0.01, 0.02),
    "LB": (0.1, 0.2, 0.3),
    "LB+trace": (0.1, 0.2),
    "LB+diag": (0.05, 0.1, 0.2),
}


def parse_grid(text: str) -> tuple[float, ...]:
    """``"0.1,0.2"`` -> ``(0.1, 0.2)``: learning rates, each a finite number > 0 (an argparse
    type: a bad or empty entry is a usage error)."""
    return tuple(common.positive_floats(text))


def sampler_for(method: str):
    """The noise sampler of an LB method (``None`` for SB and LB)."""
    if method == "LB+trace":
        return FisherTraceNoise("empirical", large_batch=LB, small_batch=SB)
    if method == "LB+diag":
        return DiagFisherNoise("empirical", large_batch=LB, small_batch=SB)
    if method == "LB+full":
        return FullFisherNoise("empirical", large_batch=LB, small_batch=SB)
    return None


def lr_at(step: int, total: int, lr: float) -> float:
    """Linear warm-up over the first 5% of the updates, x0.1 at 50% and x0.01 at 75%."""
    warm = max(1, int(0.05 * total))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 ** (int(step >= total // 2) + int(step >= (3 * total) // 4)))


class Tempered(nn.Module):
    """``model(x) / temperature``; the temperature is a constant, not a parameter."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) / self.temperature


def fit_temperature(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """The temperature ``T`` minimising the cross-entropy of ``model(X) / T`` on ``(X, y)``.

    The loss is convex in ``1 / T``; golden-section search on ``1 / T`` in ``[1e-3, 50]``.
    """
    with torch.no_grad():
        logits = model(X).double()

    def nll(beta: float) -> float:
        return float(nn.functional.cross_entropy(logits * beta, y))

    lo, hi = 1e-3, 50.0
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return 1.0 / ((lo + hi) / 2)


def train(
    method: str, lr: float, seed: int, cfg: dict[str, Any], data, norms_at: int
) -> tuple[dict[str, Any], nn.Module]:
    """One training run; returns its record and the final model.

    ``norms_at`` > 0 records ``||F||_F`` and ``||diag F||_F`` at that many points along training.
    """
    (X, y), (Xv, yv), (Xt, yt) = data
    batch = SB if method == "SB" else LB
    model, loss_fn = mnist1d_cnn(seed=seed), nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg["momentum"])
    total = cfg["epochs"] * X.shape[0] // batch
    sampler = sampler_for(method)
    noisy = (
        NoisyOptimizer(
            sgd,
            sampler,
            model,
            loss_fn,
            stop_fraction=NOISE_STOP,
            total_steps=total,
            seed=seed + 100,
        )
        if sampler is not None
        else None
    )
    batches = common.permutation_batches(
        X.shape[0], batch, torch.Generator().manual_seed(seed + 200)
    )
    probe = (X[: cfg["probe"]], y[: cfg["probe"]])
    marks = (
        sorted({round(k * total / max(norms_at - 1, 1)) for k in range(norms_at)})
        if norms_at
        else []
    )
    norms: dict[str, list[float]] = {"step": [], "epoch": [], "frobenius": [], "diag": []}

    def record(step: int) -> None:
        n = cl.fisher_norms(model, loss_fn, probe)
        norms["step"].append(step)
        norms["epoch"].append(step * batch / X.shape[0])
        norms["frobenius"].append(float(n.frobenius))
        norms["diag"].append(float(n.diag_frobenius))

    t0 = time.perf_counter()
    diverged = False
    for step in range(total):
        if step in marks:
            record(step)
        idx = next(batches)
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
        if not torch.isfinite(loss.detach()):  # non-finite weights show in the next loss
            diverged = True
            break
    diverged = diverged or not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if not diverged and total in marks:
        record(total)
    model.eval()
    result: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "lr": lr,
        "batch": batch,
        "updates": total,
        "noisy_updates": noisy.stop_step if noisy is not None else 0,
        "diverged": diverged,
        "train_accuracy": None if diverged else common.accuracy(model, X, y),
        "val_accuracy": None if diverged else common.accuracy(model, Xv, yv),
        "test_accuracy": None if diverged else common.accuracy(model, Xt, yt),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if norms_at:
        result["fisher_norms"] = norms
    return result, model


def measure(model: nn.Module, seed: int, cfg: dict[str, Any], data) -> dict[str, Any]:
    """Fig. 5b's top Hessian eigenvalue (temperature-calibrated and raw) and the Fisher norms."""
    (X, y), (Xv, yv), _ = data
    loss_fn = nn.CrossEntropyLoss()
    probe = (X[: cfg["probe"]], y[: cfg["probe"]])
    temperature = fit_temperature(model, Xv, yv)
    cal = cl.eigenvalues(Tempered(model, temperature), loss_fn, probe, k=1, tol=1e-3, seed=seed)
    raw = cl.eigenvalues(model, loss_fn, probe, k=1, tol=1e-3, seed=seed)
    with torch.no_grad():
        train_loss = float(loss_fn(model(X), y))
    norms = cl.fisher_norms(model, loss_fn, probe)
    return {
        "train_loss": train_loss,
        "temperature": temperature,
        "top_hessian_eigenvalue": float(cal.values[0]),
        "top_hessian_eigenvalue_uncalibrated": float(raw.values[0]),
        "eigenvalues_converged": bool(cal.converged and raw.converged),
        "fisher_frobenius": float(norms.frobenius),
        "diag_fisher_frobenius": float(norms.diag_frobenius),
    }


def se_diff(a: list[float], b: list[float]) -> float:
    """Standard error of ``mean(a) - mean(b)``: ``sqrt(s_a^2 / n_a + s_b^2 / n_b)`` (NaN if empty)."""
    if not a or not b:
        return math.nan
    return math.sqrt(common.mean_std(a)[1] ** 2 / len(a) + common.mean_std(b)[1] ** 2 / len(b))


def verdict(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The verdict rule of issue 23 on the tuned-learning-rate runs (``table[method]``: the
    accuracies of its runs that did not diverge)."""

    def acc(m: str, key: str = "test_accuracy") -> list[float]:
        return list(table[m][key])

    sb, lb, diag, trace = acc("SB"), acc("LB"), acc("LB+diag"), acc("LB+trace")
    gap, gap_se = common.mean_std(sb)[0] - common.mean_std(lb)[0], se_diff(sb, lb)
    gain, gain_se = common.mean_std(diag)[0] - common.mean_std(lb)[0], se_diff(diag, lb)
    lb_train = acc("LB", "train_accuracy")
    pre = {
        "lb_train_accuracy_mean": common.mean_std(lb_train)[0],
        "lb_train_accuracy_min": min(lb_train) if lb_train else math.nan,
        "lb_fits": common.mean_std(lb_train)[0] >= 0.99,
        "sb_minus_lb": gap,
        "sb_minus_lb_se": gap_se,
        "gap_ok": gap >= 0.01 and gap > 2 * gap_se,
    }
    out: dict[str, Any] = {
        "rule": (
            "preconditions: LB train accuracy >= 0.99 (mean over seeds) and SB - LB >= 0.01 and "
            "> 2 SE; confirms if LB+diag - LB >= (SB - LB) / 2 and > 2 SE; refutes if "
            "LB+diag - LB <= 1 SE; otherwise inconclusive. SE = sqrt(s_a^2/n_a + s_b^2/n_b)."
        ),
        "preconditions": pre,
        "diag_minus_lb": gain,
        "diag_minus_lb_se": gain_se,
        "trace_minus_lb": common.mean_std(trace)[0] - common.mean_std(lb)[0],
        "trace_minus_lb_se": se_diff(trace, lb),
        "diag_minus_trace": common.mean_std(diag)[0] - common.mean_std(trace)[0],
        "diag_minus_trace_se": se_diff(diag, trace),
    }
    # a method whose every run diverged has no accuracy: nothing to compare
    gone = [m for m in ("LB", "SB", "LB+diag") if not table[m]["test_accuracy"]]
    if gone:
        out["outcome"] = "untestable"
        out["reason"] = "; ".join(f"every {m} run diverged" for m in gone) + (
            " at its tuned learning rate, so there is no accuracy to compare"
        )
    elif not pre["lb_fits"]:
        out["outcome"] = "untestable"
        out["reason"] = (
            f"LB does not fit the training set (train accuracy {pre['lb_train_accuracy_mean']:.4f} "
            "< 0.99), so SB - LB would be partly an optimisation gap"
        )
    elif not pre["gap_ok"]:
        out["outcome"] = "untestable"
        out["reason"] = (
            f"no generalisation gap to close here: SB - LB = {100 * gap:.2f} points "
            f"(SE {100 * gap_se:.2f}), under 1 point or within 2 SE"
        )
    elif gain >= gap / 2 and gain > 2 * gain_se:
        out["outcome"] = "confirms"
        out["reason"] = (
            f"LB+diag - LB = {100 * gain:.2f} points (SE {100 * gain_se:.2f}) closes at least "
            f"half of the {100 * gap:.2f}-point gap"
        )
    elif gain <= gain_se:
        out["outcome"] = "refutes"
        out["reason"] = (
            f"LB+diag - LB = {100 * gain:.2f} points is at most 1 SE ({100 * gain_se:.2f}), "
            f"while SB - LB = {100 * gap:.2f} points"
        )
    else:
        out["outcome"] = "inconclusive"
        out["reason"] = (
            f"LB+diag - LB = {100 * gain:.2f} points (SE {100 * gain_se:.2f}) is above 1 SE but "
            f"not both >= half the {100 * gap:.2f}-point gap and > 2 SE"
        )
    return out


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0], NAME, seeds=5, results=True)
    parser.add_argument(
        "--epochs", type=common.positive_int, default=240, help="default 240 (quick 3)"
    )
    parser.add_argument(
        "--momentum",
        type=common.unit_interval,
        default=0.9,
        help="SGD momentum, in [0, 1); 0: Algorithm 1 as written (default %(default)s, quick too)",
    )
    parser.add_argument(
        "--sb-grid",
        type=parse_grid,
        default=DEFAULT_GRIDS["SB"],
        help="learning rates for small-batch SGD, comma-separated (default 0.01,0.02; quick 0.05)",
    )
    parser.add_argument(
        "--lb-grid",
        type=parse_grid,
        default=DEFAULT_GRIDS["LB"],
        help="learning rates for large-batch SGD (default 0.1,0.2,0.3; quick 0.2)",
    )
    parser.add_argument(
        "--trace-grid",
        type=parse_grid,
        default=DEFAULT_GRIDS["LB+trace"],
        help="learning rates for large batch + trace noise (default 0.1,0.2; quick 0.1)",
    )
    parser.add_argument(
        "--diag-grid",
        type=parse_grid,
        default=DEFAULT_GRIDS["LB+diag"],
        help="learning rates for large batch + diagonal Fisher noise (default 0.05,0.1,0.2; "
        "quick 0.1,0.2)",
    )
    parser.add_argument(
        "--reference-seeds",
        type=common.non_negative_int,
        default=0,
        help="also the MNIST-1D paper's Adam recipe for the CNN, with this many seeds (>= 0)",
    )
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="recompute the verdict, table and figures from this saved JSON (no training; "
        "written beside it unless --out; refuses to replace existing outputs unless --overwrite)",
    )
    args = parser.parse_args()
    common.quick(parser, args, epochs=3, seeds=2)
    if args.quick:  # the grids too, where not given
        common.quick(
            parser, args, sb_grid=(0.05,), lb_grid=(0.2,), trace_grid=(0.1,), diag_grid=(0.1, 0.2)
        )
    if args.replot is not None and args.out is None:  # figures beside the JSON replotted
        args.out = args.replot.parent
    args.out = common.out_folder(args, NAME)
    if args.replot is not None:
        problem = replot_problem(args.replot, args.out, args.overwrite)
        if problem:
            parser.error(problem)
        replot(args.replot, args.out)
        return
    problem = common.rerun_problem(args.out, NAME, replot_outputs(args.out), args.overwrite)
    if problem:
        parser.error(problem)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    grids = {"SB": args.sb_grid, "LB": args.lb_grid}
    grids.update({"LB+trace": args.trace_grid, "LB+diag": args.diag_grid})
    cfg = {"epochs": args.epochs, "momentum": args.momentum, "probe": 128 if args.quick else 512}
    norms_at, seeds = (3 if args.quick else 9), list(range(args.seeds))
    data = common.load_splits(val=500, cache_dir=args.cache_dir)
    (X, _), (Xv, _), (Xt, _) = data
    models: dict[tuple[str, float, int], nn.Module] = {}
    records: dict[tuple[str, float, int], dict[str, Any]] = {}

    def run(method: str, lr: float, seed: int) -> dict[str, Any]:
        key = (method, lr, seed)
        if key not in records:
            r, model = train(method, lr, seed, cfg, data, norms_at if seed == 0 else 0)
            records[key], models[key] = r, copy.deepcopy(model)
            acc = "diverged" if r["diverged"] else f"val {r['val_accuracy']:.3f} "
            if not r["diverged"]:
                acc += f"train {r['train_accuracy']:.4f} test {r['test_accuracy']:.3f}"
            print(f"{method:9s} lr {lr:<6g} seed {seed}: {acc} ({r['seconds']:.1f} s)", flush=True)
        return records[key]

    # 1. learning rate per method: best validation accuracy at seed 0
    chosen: dict[str, float] = {}
    for method in METHODS:
        grid = [run(method, lr, 0) for lr in grids[method]]
        ok = [r for r in grid if not r["diverged"]]
        chosen[method] = max(ok, key=lambda r: r["val_accuracy"])["lr"] if ok else grid[0]["lr"]
    lb_lr = chosen["LB"]
    # 2. every seed at the chosen learning rate; LB methods also at LB's learning rate
    plan: list[tuple[str, float, int]] = [(m, chosen[m], s) for m in METHODS for s in seeds]
    plan += [(m, lb_lr, s) for m in ("LB+trace", "LB+diag") for s in seeds]
    plan += [(FOOTNOTE, chosen["LB+diag"], 0)]
    for key in plan:
        run(*key)
    runs = []
    for key in dict.fromkeys(plan):
        method, lr, seed = key
        r = dict(records[key])
        r["tuned_lr"] = method in chosen and lr == chosen[method]
        r["lr_at_lb"] = method != "SB" and lr == lb_lr
        if not r["diverged"]:
            r.update(measure(models[key], seed, cfg, data))
        runs.append(r)
    tuning = [
        {k: v for k, v in records[(m, lr, 0)].items() if k != "fisher_norms"}
        for m in METHODS
        for lr in grids[m]
    ]

    reference = []
    if args.reference_seeds:
        (Xtr, ytr), (Xva, yva), test = data
        full_train = (torch.cat([Xtr, Xva]), torch.cat([ytr, yva]))
        steps = 60 if args.quick else 6000
        reference = [
            dict(train_reference_cnn((full_train, test), seed=s, steps=steps), seed=s, steps=steps)
            for s in range(args.reference_seeds)
        ]
    results = {
        "settings": {
            "epochs": cfg["epochs"],
            "seeds": seeds,
            "lb_updates": cfg["epochs"] * X.shape[0] // LB,
            "sb_updates": cfg["epochs"] * X.shape[0] // SB,
            "small_batch": SB,
            "large_batch": LB,
            "momentum": cfg["momentum"],
            "momentum_note": "our addition: Algorithm 1 is plain SGD; noise enters the gradient "
            "before the momentum buffer",
            "batches": "a stream of fresh permutations; a permutation's leftover is completed "
            "from the next one (no example dropped)",
            "schedule": "linear warm-up over 5% of the updates, x0.1 at 50% and at 75%",
            "noise": "empirical Fisher of the training batch, scale sqrt((M_L-M_S)/(M_L M_S)), "
            f"first {NOISE_STOP:.0%} of the updates",
            "grids": {m: list(g) for m, g in grids.items()},
            "chosen_lr": chosen,
            "lb_lr": lb_lr,
            "selection": "best validation accuracy at seed 0",
            "train/val/test": [X.shape[0], Xv.shape[0], Xt.shape[0]],
            "probe_examples": cfg["probe"],
            "curvature": "top Hessian eigenvalue (Lanczos, tol 1e-3) of the cross-entropy of "
            "model(x)/T on the probe training signals, T fitted on the validation set; also "
            "uncalibrated; empirical-Fisher norms on the same signals",
        },
        "runs": runs,
        "tuning": tuning,
    }
    if reference:
        results["reference_cnn"] = reference
    # the runs first: whatever the summary meets, the training is kept (--replot redoes the rest)
    common.save_outputs(args.out, NAME, results, PENDING, started)
    text = summarise(results)  # with the reference's line, as --replot writes it
    print(text)
    common.save_outputs(args.out, NAME, results, text, started)
    plot(results, args.out)
    print(f"wrote {args.out}")


def replot_outputs(out: Path) -> list[Path]:
    """The files :func:`replot` writes into ``out``."""
    return [out / f"{NAME}.json", out / f"{NAME}.md", out / f"{NAME}.png", out / FIG5]


def replot_problem(saved: Path, out: Path, overwrite: bool) -> str | None:
    """:func:`mnist1d_common.replot_problem` for this script's outputs in ``out``."""
    return common.replot_problem(saved, replot_outputs(out), overwrite)


def replot(saved: Path, out: Path) -> None:
    """Rewrite the verdict, the Markdown table and the figures from a saved JSON's runs.

    The runs, settings, wall time and environment are kept as saved; ``"replotted"`` says so.
    """
    results = json.loads(saved.read_text())
    results.pop("verdict", None)
    text = summarise(results)
    results["replotted"] = "verdict, table and figures recomputed from these runs by --replot"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(results, indent=1))
    (out / f"{NAME}.md").write_text(text + f"\n\n(wall time {results['seconds']:.0f} s)\n")
    plot(results, out)


def summarise(results: dict[str, Any]) -> str:
    """Set ``results["verdict"]`` from its runs and return the Markdown table.

    Diverged runs (non-finite loss) have no accuracies; they are left out of every mean and
    counted in the table.
    """
    runs, tuning, settings = results["runs"], results["tuning"], results["settings"]
    chosen, lb_lr = settings["chosen_lr"], settings["lb_lr"]

    def rows(method: str, lr: float) -> list[dict[str, Any]]:
        return [r for r in runs if r["method"] == method and r["lr"] == lr]

    def col(rs: list[dict[str, Any]], key: str) -> list[float]:
        return [r[key] for r in rs if not r["diverged"]]

    table = {
        m: {k: col(rows(m, chosen[m]), k) for k in ("train_accuracy", "test_accuracy")}
        for m in METHODS
    }
    result_verdict = verdict(table)
    at_lb = {
        m: {k: col(rows(m, lb_lr), k) for k in ("train_accuracy", "test_accuracy")} for m in METHODS
    }
    result_verdict["at_lb_lr"] = {
        "diag_minus_lb": common.mean_std(at_lb["LB+diag"]["test_accuracy"])[0]
        - common.mean_std(at_lb["LB"]["test_accuracy"])[0],
        "diag_minus_lb_se": se_diff(
            at_lb["LB+diag"]["test_accuracy"], at_lb["LB"]["test_accuracy"]
        ),
        "trace_minus_lb": common.mean_std(at_lb["LB+trace"]["test_accuracy"])[0]
        - common.mean_std(at_lb["LB"]["test_accuracy"])[0],
        "trace_minus_lb_se": se_diff(
            at_lb["LB+trace"]["test_accuracy"], at_lb["LB"]["test_accuracy"]
        ),
    }
    eig = {m: common.mean_std(col(rows(m, chosen[m]), "top_hessian_eigenvalue")) for m in METHODS}
    result_verdict["fig5b"] = {m: {"mean": v[0], "std": v[1]} for m, v in eig.items()} | {
        "lb_sharper_than_sb": eig["LB"][0] > eig["SB"][0],
        "diag_flatter_than_lb": eig["LB+diag"][0] < eig["LB"][0],
    }

    # the Markdown table
    lines = [
        f"MNIST-1D CNN, {settings['train/val/test'][0]} training signals, {settings['epochs']} "
        f"epochs for every method (SB {settings['sb_updates']} updates, LB "
        f"{settings['lb_updates']}), M_S = {SB}, M_L = {LB}, SGD + momentum "
        f"{settings['momentum']}, seeds {settings['seeds']}; mean ± std over seeds (diverged runs "
        "left out).",
        "",
        "| method | lr | seeds | train accuracy | test accuracy | top Hessian eigenvalue "
        "(calibrated) | uncalibrated | temperature | ‖F‖_F / ‖diag F‖_F |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    shown = [(m, chosen[m], "tuned") for m in METHODS]
    shown += [(m, lb_lr, "LB's lr") for m in ("LB+trace", "LB+diag") if chosen[m] != lb_lr]
    shown += [(FOOTNOTE, chosen["LB+diag"], "LB+diag's lr, seed 0")]
    for m, lr, how in shown:
        rs = rows(m, lr)
        ratio = [
            r["fisher_frobenius"] / r["diag_fisher_frobenius"] for r in rs if not r["diverged"]
        ]
        bad = sum(r["diverged"] for r in rs)
        lines.append(
            f"| {m} | {lr:g} ({how}) | {len(rs)}{f' ({bad} diverged)' if bad else ''} | {common.fmt_ms(col(rs, 'train_accuracy'), 4)} | "
            f"{common.fmt_ms(col(rs, 'test_accuracy'))} | "
            f"{common.fmt_ms(col(rs, 'top_hessian_eigenvalue'), 2)} | "
            f"{common.fmt_ms(col(rs, 'top_hessian_eigenvalue_uncalibrated'), 2)} | "
            f"{common.fmt_ms(col(rs, 'temperature'), 2)} | {common.fmt_ms(ratio, 2)} |"
        )
    lines += [
        "",
        "Learning-rate search (seed 0, validation accuracy): "
        + "; ".join(
            f"{m}: "
            + ", ".join(
                f"{r['lr']:g} → " + ("diverged" if r["diverged"] else f"{r['val_accuracy']:.3f}")
                for r in tuning
                if r["method"] == m
            )
            for m in METHODS
        ),
        "",
        f"Verdict: {result_verdict['outcome']} — {result_verdict['reason']}.",
    ]
    results["verdict"] = result_verdict
    text = "\n".join(lines)
    if results.get("reference_cnn"):
        text += "\n" + reference_line(results["reference_cnn"])
    return text


def reference_line(reference: list[dict[str, Any]]) -> str:
    """The Markdown line of the MNIST-1D paper's CNN recipe (``--reference-seeds``)."""
    steps = sorted({r["steps"] for r in reference if "steps" in r})
    if not steps:  # saved before the step count was recorded
        how = "steps not recorded"
    elif len(steps) == 1 and all("steps" in r for r in reference):
        how = f"{steps[0]} steps"
    else:
        how = f"steps {steps}"
    return (
        f"Reference: the MNIST-1D paper's CNN recipe (Adam 1e-2, batch 100, {how}, "
        f"4,000 signals): test {common.fmt_ms([r['test_accuracy'] for r in reference])}."
    )


def plot(results: dict[str, Any], out: Path) -> None:
    """``mnist1d_wen_table2.png`` (test accuracy) and ``mnist1d_wen_fig5.png`` (Fig. 5a/5b)."""
    plt = common.pyplot()
    runs, chosen, lb_lr = (
        results["runs"],
        results["settings"]["chosen_lr"],
        results["settings"]["lb_lr"],
    )

    def vals(method: str, lr: float, key: str) -> list[float]:
        return [
            r[key]
            for r in runs
            if r["method"] == method and r["lr"] == lr and r.get(key) is not None
        ]

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, m in enumerate(METHODS):
        bars = [(chosen[m], False)]
        if m in ("LB+trace", "LB+diag") and chosen[m] != lb_lr:
            bars.append((lb_lr, True))
        for j, (lr, at_lb) in enumerate(bars):
            v = vals(m, lr, "test_accuracy")
            if not v:
                continue
            x = i + (0.2 * (2 * j - 1) if len(bars) == 2 else 0.0)
            mean, std = common.mean_std(v)
            ax.bar(
                x,
                mean,
                width=0.38,
                yerr=std,
                capsize=3,
                color=f"C{i}",
                hatch="//" if at_lb else None,
                alpha=0.6 if at_lb else 1.0,
            )
            ax.text(x, mean + std + 0.002, f"lr {lr:g}", ha="center", fontsize=7)
    ax.set_xticks(range(len(METHODS)), METHODS)
    accs = [r["test_accuracy"] for r in runs if r.get("test_accuracy") is not None]
    ax.set_ylim(max(0.0, min(accs) - 0.03), min(1.0, max(accs) + 0.02))
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(
        f"Wen et al. Table 2 on MNIST-1D: {results['settings']['epochs']} epochs, "
        f"{results['settings']['lb_updates']} LB updates"
    )
    ax.text(
        0.01, 0.02, "hatched: at LB's lr (Fig. 3 convention)", transform=ax.transAxes, fontsize=7
    )
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(METHODS):
        r = next(
            (
                r
                for r in runs
                if r["method"] == m
                and r["lr"] == chosen[m]
                and r["seed"] == 0
                and "fisher_norms" in r
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
    a1.set_title("Fig. 5a: full vs diagonal Fisher (seed 0, tuned lr)")
    a1.legend(fontsize=6)
    for j, key in enumerate(("top_hessian_eigenvalue", "top_hessian_eigenvalue_uncalibrated")):
        ms = [common.mean_std(vals(m, chosen[m], key)) for m in METHODS]
        a2.bar(
            [i + (0.2 if j else -0.2) for i in range(len(METHODS))],
            [v[0] for v in ms],
            width=0.38,
            yerr=[v[1] for v in ms],
            capsize=3,
            color="C0" if j == 0 else "C7",
            label="temperature-calibrated (T fitted on validation)" if j == 0 else "uncalibrated",
        )
    a2.set_xticks(range(len(METHODS)), METHODS)
    a2.set_yscale("log")
    a2.set_ylabel("top Hessian eigenvalue (final model, tuned lr)")
    a2.set_title("Fig. 5b")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / FIG5, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
