"""Zhang et al. (NeurIPS 2019) on MNIST-1D: steps to a validation target vs batch size, and the NQM.

Claims tested. (1) Steps to a target fall in proportion to the batch size up to a *critical batch
size* and then level off. (2) Momentum matches plain SGD at small batch sizes but raises the
critical batch size; preconditioning (Adam) raises it further and can help even at small batch
sizes. (3) The noisy quadratic model (NQM) predicts these effects. The NQM's absolute critical
batch size is arbitrary here (with gradient noise C = H it scales as 1/init_var, and the NQM's
target is not the network's), so only *ratios* are compared: critical batch size and steps of
momentum and of Adam relative to SGD.

Network. The MNIST-1D paper's CNN, trained on the first 3,500 training signals; the target is a
*validation* accuracy (the last 500 training signals held out), 0.7 and 0.8, checked after every
step up to 20 and then every 3% of the steps taken (at most ``--max-steps``); batch sizes
8, 16, ..., 1024 drawn by walking through fresh permutations. Optimisers at a constant learning
rate: SGD, SGD with heavy-ball momentum β = 0.9, Adam (β1 = 0.9, β2 = 0.999). Learning rate: a
grid of powers of √2, per optimiser and batch size at seed 0, starting from the previous batch
size's best; neighbours are tried until the best learning rate of *each* target has both
neighbours tried and worse (a 3-point window; a best on the grid's edge is flagged). A trial stops
once it has used the best-so-far steps to 0.8 (it can then no longer win for either target).
Seeds 1, 2, ... rerun the chosen learning rates. A seed sets the initialisation and the batch
order. Measured critical batch size per seed: where ``B * steps(B)`` has doubled from its
minimum (:func:`curvlab.nqm.critical_batch_from_steps`, log-log interpolation).

NQM. (a) From the measured spectrum: the seed-0 SGD model at batch 128 trained to validation
accuracy 0.8 is analysed with :func:`curvlab.analyze` (Hessian SLQ density, 4 probes x 40 steps,
1,000 training signals): C = H, near-flat nodes dropped, target 1% of the initial risk, batch
sizes 1 ... 65536. (b) The paper's own NQM (Fig. 3: h_i = 1/i, d = 10^4, C = H, target 0.01),
batch sizes 1 ... 2^22, for the qualitative claims. Each is swept for SGD and momentum with
preconditioner H^p, p in {0, 0.25, 0.5}, momentum β tuned either up to 0.9999 (the NQM's default
grid, the paper's "tuned momentum") or capped at 0.9 (matched to the network's β = 0.9). Adam is
bracketed by momentum + H^0.25 and momentum + H^0.5.

Ratios and verdicts. Critical batch size ratio momentum/SGD and Adam/SGD; steps ratio
momentum/SGD and Adam/SGD at the smallest and the largest batch size; all per seed, mean ±
standard error. The rule's critical batch size depends on the sweep's smallest batch size B_0
(B* + 2·B_0 for S(B) = S_min(1 + B*/B)), so the NQM is read like the network: every NQM curve
from the batch size b_0 at which b_0 / (NQM SGD critical batch size read from b_0) equals the
network's B_0 / (SGD critical batch size), and its steps ratios at the network's batch sizes
relative to SGD's critical batch size (:mod:`mnist1d_critical_batch_nqm`). The verdict of each
ratio compares the measured ratio with the matched-β NQM's (β ≤ 0.9; for Adam the p = 0.25 ...
0.5 bracket): confirms within a factor 1.5, refutes at a factor ≥ 2, else inconclusive.

Run: ``python examples/mnist1d_critical_batch.py [--seeds 5 (default)] [--out DIR] [--quick]``. Writes
``mnist1d_critical_batch.json`` and ``mnist1d_critical_batch.png`` into ``--out`` (default
``docs/results/``; ``examples/output/mnist1d_critical_batch/`` with ``--quick``); the table is
printed and kept in the JSON (``table_md``). The JSON is written once the training ends, before
the conclusions are drawn, so a failure after it loses no run (``--replot`` redoes the rest); a
figure panel leaves out the curves that reach no target, and says so. A run refuses (before any
work) an output folder that holds an earlier run's ``mnist1d_critical_batch.json``, the committed
``docs/results/`` of a full run without ``--out`` included, unless ``--overwrite``.
``--replot FILE`` recomputes the critical batch sizes, NQM predictions, verdicts and figure from
a saved JSON without training (beside it unless ``--out``); it refuses (before any work) to replace
an existing ``mnist1d_critical_batch.json`` or ``.png`` there, FILE itself included, unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mnist1d_common as common
import numpy as np
import torch
from mnist1d_critical_batch_nqm import (
    BETA_VARIANTS,
    POWERS,
    ExactSteps,
    InterpolatedSteps,
    StepsAt,
    measured_nqm,
    nqm_from_info,
    nqm_ratios,
    nqm_sweeps,
)
from torch import nn

from curvlab.demo.mnist1d import mnist1d_cnn
from curvlab.nqm import NQM, batch_size_sweep, critical_batch_from_steps, critical_batch_size

NAME = "mnist1d_critical_batch"
METHODS = ("SGD", "momentum", "Adam")
BETA = 0.9  # the network's momentum and Adam's β1
# learning rate = 2 ** (k / 2): first k tried at the smallest batch size, and the range searched
FIRST_K = {"SGD": -6, "momentum": -12, "Adam": -16}
K_RANGE = {"SGD": (-20, 8), "momentum": (-28, 2), "Adam": (-34, -2)}
MATCHED = "beta<=0.9"
MATCHING = (
    "NQM ratios read like the network's: every NQM curve's critical batch size from the NQM "
    "batch size b_0 = (B_0 / B*_SGD of the network) * (NQM SGD B* read from b_0), B_0 the "
    "network's smallest batch size; steps ratios at the network's B / B*_SGD times that NQM B*"
)
CONFIRM, REFUTE = 1.5, 2.0


def _accuracies(text: str) -> list[float]:
    """``--targets``: comma-separated validation accuracies in (0, 1)."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected accuracies like 0.7,0.8, got {text!r}"
        ) from None
    bad = [v for v in values if not 0 < v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"accuracies must lie in (0, 1), got {bad}")
    return values


def lr_of(k: int) -> float:
    """Learning rate of grid index ``k``: 2^(k/2)."""
    return 2.0 ** (k / 2)


def make_optimizer(method: str, params, lr: float) -> torch.optim.Optimizer:
    """SGD, SGD + heavy-ball momentum 0.9, or Adam with betas (0.9, 0.999)."""
    if method == "SGD":
        return torch.optim.SGD(params, lr=lr)
    if method == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=BETA)
    return torch.optim.Adam(params, lr=lr, betas=(BETA, 0.999))


def train_to_targets(
    method: str,
    batch: int,
    lr: float,
    seed: int,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    targets: Sequence[float],
    limit: int,
    growth: float,
    return_model: bool = False,
) -> dict[str, Any]:
    """Train until the validation accuracy has reached every target, or ``limit`` steps.

    Returns:
        ``steps_to_target`` (target -> first checked step with validation accuracy >= target,
        ``inf`` if not reached), ``steps_run``, ``diverged``, ``test_accuracy_at_last_target``
        and, with ``return_model``, the model.
    """
    X, y = data["train"]
    Xv, yv = data["val"]
    model, loss_fn = mnist1d_cnn(seed=seed), nn.CrossEntropyLoss()
    opt = make_optimizer(method, model.parameters(), lr)
    stream = common.permutation_batches(
        X.shape[0], batch, torch.Generator().manual_seed(seed + 200)
    )
    reached: dict[float, float] = {t: math.inf for t in targets}
    next_check, diverged, step = 1, False, 0
    for step in range(1, limit + 1):
        idx = next(stream)
        opt.zero_grad()
        loss = loss_fn(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        if not torch.isfinite(loss.detach()):
            diverged = True
            break
        if step >= next_check:
            next_check = step + 1 if step < 20 else math.ceil(step * (1 + growth))
            acc = common.accuracy(model, Xv, yv)
            for t in targets:
                if acc >= t and not math.isfinite(reached[t]):
                    reached[t] = float(step)
            if all(math.isfinite(s) for s in reached.values()):
                break
    done = all(math.isfinite(s) for s in reached.values())
    out = {
        "steps_to_target": {f"{t:g}": s for t, s in reached.items()},
        "steps_run": step,
        "diverged": diverged,
        "test_accuracy_at_last_target": (
            common.accuracy(model, *data["test"]) if done and not diverged else None
        ),
    }
    if return_model:
        out["model"] = model
    return out


def tune(
    method: str,
    batches: Sequence[int],
    data,
    targets: Sequence[float],
    cap: int,
    growth: float,
    log,
) -> tuple[dict[int, dict], list[dict]]:
    """Seed 0: per batch size, the grid lr with the fewest steps to each target (3-point window).

    Returns:
        ``chosen[b] = {"k": {target: k}, "edge": {target: bool}, "trial": {target: run}}`` and the
        list of every trial run.
    """
    k_lo, k_hi = K_RANGE[method]
    hard = targets[-1]
    keys = [f"{t:g}" for t in targets]
    chosen: dict[int, dict] = {}
    trials: list[dict] = []
    start = FIRST_K[method]
    for b in batches:
        tried: dict[int, dict] = {}

        def steps(k: int, key: str, tried=tried) -> float:
            return tried[k]["steps_to_target"][key]

        def best(key: str, tried=tried) -> int:
            others = [o for o in keys if o != key]
            return min(tried, key=lambda kk: (steps(kk, key), *(steps(kk, o) for o in others), kk))

        def trial(k: int, tried=tried, b=b) -> None:
            finite = [r["steps_to_target"][f"{hard:g}"] for r in tried.values()]
            finite = [s for s in finite if math.isfinite(s)]
            limit = int(min(finite)) if finite else cap
            r = train_to_targets(method, b, lr_of(k), 0, data, targets, limit, growth)
            r.update(method=method, batch_size=b, seed=0, lr=lr_of(k), k=k, limit=limit)
            tried[k] = r
            trials.append(r)
            log(
                f"  tune {method:8s} B {b:5d} lr {lr_of(k):<9.4g} steps "
                + " ".join(f"{key}: {r['steps_to_target'][key]:g}" for key in keys)
                + (" (diverged)" if r["diverged"] else "")
            )

        for k in (start, start + 1, start - 1):
            if k_lo <= k <= k_hi:
                trial(k)
        while True:
            need = [  # neighbours of each target's best (none while it is not reached)
                nb
                for key in keys[::-1]
                if math.isfinite(steps(best(key), key))
                for nb in (best(key) - 1, best(key) + 1)
                if k_lo <= nb <= k_hi and nb not in tried
            ]
            if not need:
                break
            trial(need[0])
        pick = {key: best(key) for key in keys}
        chosen[b] = {
            "k": pick,
            "lr": {key: lr_of(k) for key, k in pick.items()},
            "edge": {key: k in (k_lo, k_hi) for key, k in pick.items()},
            "trial": {key: tried[k] for key, k in pick.items()},
        }
        if math.isfinite(steps(pick[keys[-1]], keys[-1])):
            start = pick[keys[-1]]
    return chosen, trials


# ------------------------------------------------------------------------------- statistics
def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and standard error of the finite values (nan, nan, 0 if none)."""
    a = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan, 0
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan
    return float(a.mean()), se, int(a.size)


def factor_off(measured: float, lo: float, hi: float | None = None) -> float:
    """How far a measured ratio is from a prediction (a point, or the bracket [lo, hi]): >= 1."""
    hi = lo if hi is None else hi
    lo, hi = min(lo, hi), max(lo, hi)
    if not (math.isfinite(measured) and measured > 0 and lo > 0):
        return math.nan
    if lo <= measured <= hi:
        return 1.0
    return lo / measured if measured < lo else measured / hi


def judge(factor: float) -> str:
    if not math.isfinite(factor):
        return "untestable"
    if factor <= CONFIRM:
        return "confirms"
    return "refutes" if factor >= REFUTE else "inconclusive"


def verdict_entry(
    ratios: list[float], lower_bound: bool, lo: float, hi: float | None = None
) -> dict[str, Any]:
    """Verdict of one measured ratio (per-seed values) against a prediction or bracket."""
    m, se, n = mean_se(ratios)
    f = factor_off(m, lo, hi)
    verdict = judge(f)
    if lower_bound:  # some seed's B* exceeded the largest batch size: m is only a lower bound
        verdict = "refutes" if lo * REFUTE <= m else "inconclusive (measured is a lower bound)"
    ends = [judge(factor_off(m + d, lo, hi)) for d in (-se, se)] if math.isfinite(se) else []
    return {
        "measured": m,
        "measured_se": se,
        "seeds": n,
        "per_seed": ratios,
        "predicted": lo if hi is None else [min(lo, hi), max(lo, hi)],
        "factor": f,
        "verdict": verdict,
        "verdict_at_measured_pm_se": ends,
        "robust_to_1se": bool(ends) and all(e == verdict for e in ends),
    }


# ------------------------------------------------------------------------------------ main
def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0], NAME, seeds=5, results=True)
    parser.add_argument(
        "--targets",
        type=_accuracies,
        default="0.7,0.8",
        help="validation accuracies to reach (default %(default)s, quick 0.2,0.3)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=common.positive_ints,
        default="8,16,32,64,128,256,512,1024",
        help="batch sizes to measure steps-to-target at, comma-separated (default "
        "%(default)s, quick 16,64,256)",
    )
    parser.add_argument(
        "--max-steps",
        type=common.positive_int,
        default=8000,
        help="give up on a run after this many steps (default 8000, quick 100)",
    )
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="recompute critical batch sizes, NQM predictions, verdicts, table and figure from "
        "this saved JSON (no training; written beside it unless --out; refuses to replace "
        "existing outputs unless --overwrite)",
    )
    args = parser.parse_args()
    common.quick(
        parser, args, batch_sizes=[16, 64, 256], seeds=2, max_steps=100, targets=[0.2, 0.3]
    )
    torch.set_num_threads(args.threads)
    if args.replot is not None:
        out = args.replot.parent if args.out is None else Path(args.out)
        problem = replot_problem(args.replot, out, args.overwrite)
        if problem:
            parser.error(problem)
        replot(args.replot, out)
        return
    out = common.out_folder(args, NAME)
    problem = common.rerun_problem(out, NAME, outputs(out), args.overwrite)
    if problem:
        parser.error(problem)
    started, cpu0 = time.perf_counter(), time.process_time()
    targets = sorted(args.targets)
    batches = list(args.batch_sizes)
    seeds, cap, growth = args.seeds, args.max_steps, 0.03
    nqm_bs = [2.0**k for k in range(0, 17)]
    paper_bs = [2.0**k for k in range(0, 23)]
    paper, grid = _paper_nqm(args.quick)
    if args.quick:
        growth = 0.1
        nqm_bs, paper_bs = [2.0**k for k in range(0, 13, 2)], [2.0**k for k in range(0, 13, 2)]
    keys = [f"{t:g}" for t in targets]
    train, val, test = common.load_splits(val=500, cache_dir=args.cache_dir)
    data = {"train": train, "val": val, "test": test}

    def log(msg: str) -> None:
        print(msg, flush=True)

    # ---- network: tuning at seed 0, then the other seeds at the chosen learning rates
    chosen, tuning = {}, []
    for m in METHODS:
        chosen[m], trials = tune(m, batches, data, targets, cap, growth, log)
        tuning += trials
    runs: list[dict] = []
    for m in METHODS:
        for b in batches:
            ch = chosen[m][b]
            for k in sorted(set(ch["k"].values())):
                uses = [key for key in keys if ch["k"][key] == k]
                for seed in range(seeds):
                    if seed == 0:
                        r = ch["trial"][uses[0]]
                    else:
                        s0 = max(ch["trial"][key]["steps_to_target"][key] for key in uses)
                        limit = min(cap, int(4 * s0)) if math.isfinite(s0) else cap
                        r = train_to_targets(m, b, lr_of(k), seed, data, targets, limit, growth)
                        r.update(method=m, batch_size=b, seed=seed, lr=lr_of(k), k=k, limit=limit)
                    runs.append(
                        dict(r, chosen_for=uses, lr_on_grid_edge=[ch["edge"][u] for u in uses])
                    )
                    log(
                        f"{m:8s} B {b:5d} seed {seed} lr {lr_of(k):<9.4g} (for {','.join(uses)}) "
                        + " ".join(f"{key}: {r['steps_to_target'][key]:g}" for key in keys)
                    )

    crit = critical_sizes(runs, keys, batches, seeds)

    # ---- NQM: from the measured spectrum (SGD, batch 128 or the middle one, trained to the target)
    ref_b = 128 if 128 in batches else batches[len(batches) // 2]
    ref_k = chosen["SGD"][ref_b]["k"][keys[-1]]
    ref = train_to_targets(
        "SGD", ref_b, lr_of(ref_k), 0, data, targets, cap, growth, return_model=True
    )
    t_nqm = time.perf_counter()
    meas = measured_nqm(ref.pop("model"), *train, args.quick)
    nqm_m: NQM = meas["nqm"]
    sw_measured = nqm_sweeps(nqm_m, nqm_bs, 0.01 * nqm_m.initial_risk(), grid)
    # C = H: the critical batch size scales as 1/init_var (same target relative to initial risk)
    scaled = NQM.from_spectrum(nqm_m.h, nqm_m.counts, init_var=4.0)
    sw_scaled = batch_size_sweep(scaled, nqm_bs, ("sgd",), (0.0,), 0.01 * scaled.initial_risk())
    sw_paper = nqm_sweeps(paper, paper_bs, 0.01, grid)

    results = {
        "settings": {
            "data": "MNIST-1D, train on the first 3,500 training signals, target on the last 500",
            "targets_validation_accuracy": targets,
            "batch_sizes": batches,
            "seeds": list(range(seeds)),
            "max_steps": cap,
            "check_every": f"every step up to 20, then every {growth:.0%} of the steps taken",
            "methods": {
                "SGD": "torch.optim.SGD",
                "momentum": f"torch.optim.SGD(momentum={BETA})",
                "Adam": f"torch.optim.Adam(betas=({BETA}, 0.999))",
            },
            "lr_grid": "2^(k/2), tuned at seed 0 per method and batch size, 3-point window",
            "lr_range": {m: [lr_of(a), lr_of(b)] for m, (a, b) in K_RANGE.items()},
            "nqm_reference_model": f"SGD, batch {ref_b}, seed 0, lr {lr_of(ref_k):.4g}, "
            f"trained to validation accuracy {targets[-1]:g} "
            f"(step {ref['steps_to_target'][keys[-1]]:g})",
            "nqm_target": "1% of the initial risk (measured spectrum); 0.01 (paper NQM)",
            "nqm_batch_sizes": {"measured spectrum": nqm_bs, "paper NQM": paper_bs},
            "nqm_beta_variants": {
                "beta<=0.9999": "NQM default grid: beta = 0 and 1-beta log-spaced in [1e-4, 0.9]",
                "beta<=0.9": "1-beta in [0.1, 0.9] (decay_min=0.1): matched to the network",
            },
            "nqm_adam": "bracketed by momentum + H^0.25 and momentum + H^0.5",
            "nqm_matching": MATCHING,
            "verdict_rule": f"factor measured vs NQM (or its bracket): <= {CONFIRM} confirms, "
            f">= {REFUTE} refutes, else inconclusive; ratios per seed, mean ± SE",
            "quick": bool(args.quick),
        },
        "runs": runs,
        "tuning": tuning,
        "measured_critical_batch_size": crit,
        "nqm": {
            "measured_spectrum": {**meas["info"], "sweep": sw_measured},
            "init_var_check": {
                "sgd critical batch size, init_var 1": sw_measured["curves"]["sgd p=0"][
                    "critical_batch_size"
                ],
                "sgd critical batch size, init_var 4": float(
                    critical_batch_size(sw_scaled, "sgd", 0.0)
                ),
            },
            "paper": {"model": repr(paper), "sweep": sw_paper},
        },
    }
    results["nqm"]["seconds"] = round(time.perf_counter() - t_nqm, 1)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    results["environment"] = common.environment()
    # the runs first: whatever the conclusions meet, the training is kept (--replot redoes them)
    save_json(results, out)
    conclude(results, ExactSteps(nqm_m, sw_measured, grid), ExactSteps(paper, sw_paper, grid))
    wrote = write(results, out)
    print(f"wall time {results['seconds']:.0f} s; wrote {', '.join(str(p) for p in wrote)}")


def steps_of(runs: Sequence[dict], m: str, b: int, seed: int, key: str) -> float:
    """Steps to target ``key`` of the run chosen for it (method, batch size, seed)."""
    for r in runs:
        if (r["method"], r["batch_size"], r["seed"]) == (m, b, seed) and key in r["chosen_for"]:
            return r["steps_to_target"][key]
    raise KeyError((m, b, seed, key))


def critical_sizes(
    runs: Sequence[dict], keys: Sequence[str], batches: Sequence[int], seeds: int
) -> dict[str, dict[str, list[float]]]:
    """Measured critical batch size per target, method and seed (inf: beyond the sweep)."""
    return {
        key: {
            m: [
                critical_batch_from_steps(batches, [steps_of(runs, m, b, s, key) for b in batches])
                for s in range(seeds)
            ]
            for m in METHODS
        }
        for key in keys
    }


def conclude(results: dict[str, Any], at_measured: StepsAt, at_paper: StepsAt) -> None:
    """Set the measured ratios, the NQMs' predictions, the verdicts, the claims and the table.

    Reads ``settings``, ``runs``, ``measured_critical_batch_size`` and the two NQM sweeps of
    ``results``; ``at_measured`` and ``at_paper`` give the NQMs' steps off their sweeps' grids
    (the matched start, :mod:`mnist1d_critical_batch_nqm`).
    """
    s = results["settings"]
    keys = [f"{t:g}" for t in s["targets_validation_accuracy"]]
    batches, seeds = list(s["batch_sizes"]), len(s["seeds"])
    runs, crit = results["runs"], results["measured_critical_batch_size"]
    sw_measured = results["nqm"]["measured_spectrum"]["sweep"]
    sw_paper = results["nqm"]["paper"]["sweep"]

    def steps(m: str, b: int, seed: int, key: str) -> float:
        return steps_of(runs, m, b, seed, key)

    b_small, b_large = batches[0], batches[-1]
    verdict: dict[str, Any] = {}
    measured_ratios: dict[str, Any] = {}
    predictions: dict[str, Any] = {}
    for key in keys:
        b_sgd, _, _ = mean_se(crit[key]["SGD"])
        rel = {
            "largest B": b_large / b_sgd if math.isfinite(b_sgd) else math.nan,
            "smallest B": b_small / b_sgd if math.isfinite(b_sgd) else math.nan,
        }
        ok = all(math.isfinite(v) for v in rel.values())
        pred = {
            "measured spectrum": _predict(sw_measured, rel, at_measured) if ok else None,
            "paper NQM": _predict(sw_paper, rel, at_paper) if ok else None,
            "relative batch sizes (B / measured SGD B*)": rel,
        }
        predictions[key] = pred
        mr: dict[str, Any] = {}
        v: dict[str, Any] = {}
        for m, den in (("momentum", "SGD"), ("Adam", "SGD"), ("Adam", "momentum")):
            per_seed = []
            lower = False
            for sd in range(seeds):
                a, c = crit[key][m][sd], crit[key][den][sd]
                if math.isinf(a) and math.isfinite(c):  # B* beyond the largest batch size
                    lower = True
                    per_seed.append(b_large / c)
                else:
                    per_seed.append(a / c if math.isfinite(a) and math.isfinite(c) else math.nan)
            mr[f"critical {m}/{den}"] = {"per_seed": per_seed, "lower_bound": lower}
        for m in ("momentum", "Adam"):
            for where, b in (("largest B", b_large), ("smallest B", b_small)):
                mr[f"steps {m}/SGD at {where}"] = {
                    "per_seed": [  # nan where either did not reach the target
                        _ratio(steps(m, b, sd, key), steps("SGD", b, sd, key))
                        for sd in range(seeds)
                    ],
                    "lower_bound": False,
                    "batch_size": b,
                }
        measured_ratios[key] = mr
        if pred["measured spectrum"] is None:
            verdict[key] = {"note": "SGD's critical batch size not measured: no ratio to test"}
            continue
        if "error" in pred["measured spectrum"]:
            verdict[key] = {
                "note": "no NQM prediction to test: " + pred["measured spectrum"]["error"]
            }
            continue
        # the verdicts: the NQM of this network's measured spectrum (the paper's NQM is a
        # different quadratic; its ratios are in nqm.predicted_ratios, its claims below)
        for variant in BETA_VARIANTS:
            p = pred["measured spectrum"][variant]
            vv = {}
            for name in (
                "critical {}/SGD",
                "steps {}/SGD at largest B",
                "steps {}/SGD at smallest B",
            ):
                mom, ad = name.format("momentum"), name.format("Adam")
                ad25, ad50 = name.format("Adam p=0.25"), name.format("Adam p=0.5")
                vv[mom] = verdict_entry(mr[mom]["per_seed"], mr[mom]["lower_bound"], p[mom])
                vv[ad] = verdict_entry(mr[ad]["per_seed"], mr[ad]["lower_bound"], p[ad25], p[ad50])
            am = "critical Adam/momentum"
            vv[am] = verdict_entry(
                mr[am]["per_seed"],
                mr[am]["lower_bound"],
                p["critical Adam p=0.25/momentum"],
                p["critical Adam p=0.5/momentum"],
            )
            v[f"measured spectrum, {variant}"] = vv
        v["summary (matched beta <= 0.9)"] = {
            ratio: f"{e['verdict']} (measured {_fmt(e['measured'], e['measured_se'])}, NQM "
            f"{_fmt_pred(e['predicted'])}, factor {e['factor']:.2f})"
            for ratio, e in v[f"measured spectrum, {MATCHED}"].items()
        }
        verdict[key] = v

    # qualitative claims of the NQMs (each read from its own sweep, from B = 1), and the same
    # read off the network
    qual: dict[str, Any] = {}
    for name, sw in (("paper NQM", sw_paper), ("measured-spectrum NQM", sw_measured)):
        c = sw["curves"]
        q = {}
        for variant in BETA_VARIANTS:
            order = [c["sgd p=0"]["critical_batch_size"]] + [
                c[f"momentum {variant} p={p:g}"]["critical_batch_size"] for p in POWERS
            ]
            q[variant] = {
                "critical: SGD, momentum, momentum+H^0.25, momentum+H^0.5": order,
                "ordering holds": bool(all(a < b for a, b in zip(order, order[1:]))),
                "steps momentum/SGD at B=1": c[f"momentum {variant} p=0"]["steps"][0]
                / c["sgd p=0"]["steps"][0],
                "steps momentum+H^0.5/SGD at B=1": c[f"momentum {variant} p=0.5"]["steps"][0]
                / c["sgd p=0"]["steps"][0],
                "steps momentum+H^0.25/SGD at B=1": c[f"momentum {variant} p=0.25"]["steps"][0]
                / c["sgd p=0"]["steps"][0],
                "largest beta used at p=0": max(c[f"momentum {variant} p=0"]["momentum"]),
            }
        q["SGD+H^0.5/SGD critical"] = (
            c["sgd p=0.5"]["critical_batch_size"] / c["sgd p=0"]["critical_batch_size"]
        )
        qual[name] = q
    net_q = {}
    for key in keys:
        means = {m: mean_se(crit[key][m]) for m in METHODS}
        net_q[key] = {
            "critical batch size mean, se, finite seeds": means,
            "ordering SGD < momentum < Adam (means)": bool(
                means["SGD"][0] < means["momentum"][0] < means["Adam"][0]
            ),
            "steps momentum/SGD at smallest B": mean_se(
                measured_ratios[key]["steps momentum/SGD at smallest B"]["per_seed"]
            )[:2],
            "steps Adam/SGD at smallest B": mean_se(
                measured_ratios[key]["steps Adam/SGD at smallest B"]["per_seed"]
            )[:2],
        }
    qual["network"] = net_q
    qual["claims"] = qualitative_claims(qual, measured_ratios, crit, keys)
    results["measured_ratios"] = measured_ratios
    results["nqm"]["predicted_ratios"] = predictions
    results["qualitative"] = qual
    results["verdict"] = verdict
    results["table_md"] = summary_table(results, keys, batches, seeds)


def _predict(sw: dict[str, Any], rel: dict[str, float], at: StepsAt) -> dict[str, Any]:
    """:func:`nqm_ratios`, or ``{"error": why}`` where the NQM's sweep cannot be read like the
    network's (the runs are kept and written all the same)."""
    try:
        return nqm_ratios(sw, rel, at)
    except ValueError as err:
        return {"error": str(err)}


def outputs(out: Path) -> list[Path]:
    """The files a run (or :func:`replot`) writes into ``out``."""
    return [out / f"{NAME}.json", out / f"{NAME}.png"]


def save_json(results: dict[str, Any], out: Path) -> Path:
    """Write ``results`` as ``{NAME}.json`` into ``out`` (non-finite numbers as strings)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.json"
    path.write_text(json.dumps(_clean(results), indent=1, default=common._json_default))
    return path


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """Print the table; write ``{NAME}.json`` (with the table, ``table_md``) and ``{NAME}.png``
    into ``out`` (the figure unless nothing in it can be drawn: :func:`plot`).

    Returns:
        The files written.
    """
    s = results["settings"]
    keys = [f"{t:g}" for t in s["targets_validation_accuracy"]]
    print(results["table_md"])
    wrote = [save_json(results, out)]
    png = out / f"{NAME}.png"
    if plot(results, keys, list(s["batch_sizes"]), png):
        wrote.append(png)
    return wrote


def _paper_nqm(quick: bool) -> tuple[NQM, dict[str, Any]]:
    """The paper's NQM and the NQM search grid of a full (or ``--quick``) run."""
    if quick:
        return NQM.paper(d=1000, bins=20), {
            "lr_points_per_decade": 4,
            "decay_points": 5,
            "refine": 1,
        }
    return NQM.paper(), {}


def replot_problem(saved: Path, out: Path, overwrite: bool) -> str | None:
    """:func:`mnist1d_common.replot_problem` for ``{NAME}.json`` and ``{NAME}.png`` in ``out``."""
    return common.replot_problem(saved, outputs(out), overwrite)


def replot(saved: Path, out: Path) -> None:
    """Recompute the critical batch sizes, ratios, verdicts, table and figure from a saved JSON.

    No training: the runs are the saved ones. The paper's NQM, when it rebuilds to the saved
    one, is swept again with this library's search (seconds); the measured spectrum's sweep is
    the saved one. Steps off the grids come from the NQM solved again where it can be rebuilt
    (the measured spectrum when the JSON holds it, the paper's NQM when it rebuilds to the saved
    one), else from the saved sweep by log-log interpolation (each prediction's ``evaluation``
    says which). Settings,
    wall time and environment are kept as saved; ``"replotted"`` says what was recomputed.
    """
    results = _unclean(json.loads(saved.read_text()))
    s = results["settings"]
    keys = [f"{t:g}" for t in s["targets_validation_accuracy"]]
    results["measured_critical_batch_size"] = critical_sizes(
        results["runs"], keys, list(s["batch_sizes"]), len(s["seeds"])
    )
    paper, grid = _paper_nqm(bool(s.get("quick")))
    nqm = results["nqm"]
    ms, pp = nqm["measured_spectrum"], nqm["paper"]
    at_measured: StepsAt = (
        ExactSteps(nqm_from_info(ms), ms["sweep"], grid)
        if "spectrum" in ms
        else InterpolatedSteps(ms["sweep"])
    )
    resolved = repr(paper) == pp["model"]
    if resolved:  # the paper's NQM rebuilds: sweep it again with this library's search
        old = pp["sweep"]
        pp["sweep"] = nqm_sweeps(paper, old["batch_sizes"], old["target"], grid)
    at_paper: StepsAt = (
        ExactSteps(paper, pp["sweep"], grid) if resolved else InterpolatedSteps(pp["sweep"])
    )
    s["nqm_matching"] = MATCHING
    conclude(results, at_measured, at_paper)
    results["replotted"] = (
        "measured critical batch sizes, NQM predictions (matched start), verdicts, claims, "
        "table and figure recomputed from these runs and NQM sweeps by --replot"
        + ("; the paper's NQM swept again with this library's search" if resolved else "")
    )
    wrote = write(results, out)
    print(f"wrote {', '.join(str(p) for p in wrote)}")


def _clean(obj: Any) -> Any:
    """JSON without NaN/inf tokens: non-finite floats become strings ("inf", "nan")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _unclean(obj: Any) -> Any:
    """Undo :func:`_clean`: the strings "inf", "-inf" and "nan" become floats again."""
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _unclean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unclean(v) for v in obj]
    return obj


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def _fmt_pred(p: float | list[float]) -> str:
    return f"{p[0]:.2f}–{p[1]:.2f}" if isinstance(p, list) else f"{p:.2f}"


def qualitative_claims(
    qual: dict, ratios: dict, crit: dict, keys: list[str]
) -> list[dict[str, Any]]:
    """The paper's qualitative claims (Sections 3.7.1, 4.1): the NQMs' numbers and the network's.

    The network "holds" a claim when the measured ratio is 2 SE clear of 1 in the claimed
    direction ("matches" claims: within a factor 1.25 of 1); "fails" when 2 SE clear the other
    way (or outside 1.25×); "not resolved" otherwise; "not measured" when no seed reached the
    target at the batch sizes compared.
    """
    paper, meas = qual["paper NQM"], qual["measured-spectrum NQM"]

    def side(ratio: str, key: str, direction: str) -> dict[str, Any]:
        m, se, n = mean_se(ratios[key][ratio]["per_seed"])
        se2 = 2 * se if math.isfinite(se) else math.inf
        if not math.isfinite(m):  # no seed reached the target at the batch sizes compared
            return {"measured": m, "se": se, "seeds": n, "network": "not measured"}
        if direction == "=1":
            ok = 1 / 1.25 <= m <= 1.25
            verdict = "holds" if ok else "fails"
        else:
            lo, hi = m - se2, m + se2
            up = direction == ">1"
            if (lo > 1) if up else (hi < 1):
                verdict = "holds"
            elif (hi < 1) if up else (lo > 1):
                verdict = "fails"
            else:
                verdict = "not resolved"
        return {"measured": m, "se": se, "seeds": n, "network": verdict}

    def nqm(q: dict, field: str | tuple[str, ...], idx: tuple[int, int] | None) -> dict:
        out = {}
        for variant in BETA_VARIANTS:
            if isinstance(field, tuple):
                out[variant] = [q[variant][f] for f in field]
                continue
            val = q[variant][field]
            out[variant] = val if idx is None else val[idx[1]] / val[idx[0]]
        return out

    crit_field = "critical: SGD, momentum, momentum+H^0.25, momentum+H^0.5"
    claims = [
        (
            "momentum needs the same steps as SGD at small batch sizes",
            "steps momentum/SGD at smallest B",
            "=1",
            "steps momentum/SGD at B=1",
            None,
        ),
        (
            "momentum raises the critical batch size",
            "critical momentum/SGD",
            ">1",
            crit_field,
            (0, 1),
        ),
        (
            "preconditioning (Adam) raises it beyond momentum",
            "critical Adam/momentum",
            ">1",
            crit_field,
            (1, 3),
        ),
        (
            "preconditioning (Adam) needs fewer steps even at small batch sizes",
            "steps Adam/SGD at smallest B",
            "<1",
            ("steps momentum+H^0.25/SGD at B=1", "steps momentum+H^0.5/SGD at B=1"),
            None,
        ),
    ]
    out = []
    for text, ratio, direction, field, idx in claims:
        out.append(
            {
                "claim": text,
                "measured ratio": ratio,
                "paper NQM": nqm(paper, field, idx),
                "measured-spectrum NQM": nqm(meas, field, idx),
                "network": {key: side(ratio, key, direction) for key in keys},
            }
        )
    doubled = {
        key: {m: sum(math.isfinite(c) for c in crit[key][m]) for m in METHODS} for key in keys
    }
    out.insert(
        0,
        {
            "claim": "perfect scaling, then diminishing returns (B * steps doubles within the sweep)",
            "network": {
                key: {
                    "seeds whose B*steps doubled": doubled[key],
                    "network": "holds"
                    if all(n == len(crit[key]["SGD"]) for n in doubled[key].values())
                    else "not resolved",
                }
                for key in keys
            },
        },
    )
    return out


def _fmt(m: float, se: float, digits: int = 2) -> str:
    if not math.isfinite(m):
        return "—"
    return f"{m:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")


def summary_table(res: dict, keys: list[str], batches: list[int], seeds: int) -> str:
    """Markdown: steps per batch size, critical batch sizes, and the ratios with verdicts."""
    runs = res["runs"]
    lines = []
    for key in keys:
        lines += [
            f"Target validation accuracy {key}: steps (mean ± SE over {seeds} seeds; lr at seed 0)",
            "",
            "| batch size | " + " | ".join(METHODS) + " |",
            "|---|" + "---|" * len(METHODS),
        ]
        for b in batches:
            cells = []
            for m in METHODS:
                rs = [
                    r
                    for r in runs
                    if r["method"] == m and r["batch_size"] == b and key in r["chosen_for"]
                ]
                vals = [r["steps_to_target"][key] for r in rs]
                mm, se, n = mean_se(vals)
                cell = _fmt(mm, se, 0) if n else "not reached"
                if 0 < n < len(vals):
                    cell += f" ({len(vals) - n} not reached)"
                edge = " edge" if any(r["lr_on_grid_edge"][0] for r in rs[:1]) else ""
                cells.append(f"{cell} ({rs[0]['lr']:.3g}{edge})")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        crit = res["measured_critical_batch_size"][key]
        lines += [
            "",
            "measured critical batch size: "
            + "; ".join(
                f"{m} {_fmt(*mean_se(crit[m])[:2], 0)}"
                + (
                    f" ({sum(math.isinf(c) for c in crit[m])} seed(s) > {batches[-1]})"
                    if any(math.isinf(c) for c in crit[m])
                    else ""
                )
                for m in METHODS
            ),
            "",
        ]
        v = res["verdict"].get(key, {})
        if "note" in v:
            lines += [v["note"], ""]
            continue
        pred = res["nqm"]["predicted_ratios"][key]
        rel = pred["relative batch sizes (B / measured SGD B*)"]
        for src, label in (
            ("measured spectrum", "measured-spectrum NQM"),
            ("paper NQM", "paper's NQM"),
        ):
            p = pred[src]
            if "error" in p:
                lines.append(f"{label}: not read like the network ({p['error']})")
                continue
            cb = p["critical batch sizes from the matched start"]
            lines.append(
                f"{label} read from b_0 = {p['matched_start']:.4g} (b_0 / B*_SGD = "
                f"{p['matched_start'] / p['sgd_critical_batch_size']:.3f}, the network's "
                f"{batches[0]} / B*_SGD = {rel['smallest B']:.3f}): B* SGD "
                f"{p['sgd_critical_batch_size']:.4g}, momentum (β ≤ 0.9) "
                f"{cb[f'momentum {MATCHED} p=0']:.4g}, + H^0.25 "
                f"{cb[f'momentum {MATCHED} p=0.25']:.4g}, + H^0.5 "
                f"{cb[f'momentum {MATCHED} p=0.5']:.4g}; off-grid steps: {p['evaluation']}"
            )
        lines += [
            "",
            "| ratio | measured | NQM (source, β) | factor | verdict |",
            "|---|---|---|---|---|",
        ]
        for src_var, vv in v.items():
            if src_var.startswith("summary"):
                continue
            for ratio, e in vv.items():
                pr = e["predicted"]
                p = f"{pr[0]:.2f}–{pr[1]:.2f}" if isinstance(pr, list) else f"{pr:.2f}"
                rob = "" if e["robust_to_1se"] else " (not robust to ±1 SE)"
                if not math.isfinite(e["measured_se"]):
                    rob = f" ({e['seeds']} seed(s))"
                lines.append(
                    f"| {ratio} | {_fmt(e['measured'], e['measured_se'])} | {p} ({src_var}) "
                    f"| {e['factor']:.2f} | {e['verdict']}{rob} |"
                )
        lines.append("")
    lines += ["Qualitative claims (network: holds / fails / not resolved at 2 SE):", ""]
    for c in res["qualitative"]["claims"]:
        net = "; ".join(
            f"{key}: {d['network']}"
            + (f" ({_fmt(d['measured'], d['se'])})" if "measured" in d else "")
            for key, d in c["network"].items()
        )
        nq = ""
        if "paper NQM" in c:
            nq = " | paper NQM " + json.dumps(_clean(c["paper NQM"]), default=str)
            nq += " | measured-spectrum NQM " + json.dumps(_clean(c["measured-spectrum NQM"]))
        lines.append(f"* {c['claim']}: {net}{nq}")
    lines.append("")
    iv = res["nqm"]["init_var_check"]
    lines.append(
        "NQM SGD critical batch size (measured spectrum): init_var 1 → "
        f"{iv['sgd critical batch size, init_var 1']:.3g}, init_var 4 → "
        f"{iv['sgd critical batch size, init_var 4']:.3g} (absolute values are arbitrary)."
    )
    return "\n".join(lines)


def _drawable(y: float) -> bool:
    """Whether a value has a place on a log axis (finite and > 0; not reached is inf or NaN)."""
    return math.isfinite(y) and y > 0


def _say(ax: Any, text: str, alone: bool) -> None:
    """Write ``text`` on ``ax``: in its middle, without ticks, when the panel has nothing else
    (``alone``), else small in its lower left corner (the curves left out of a drawn panel)."""
    if alone:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set(xticks=[], yticks=[])
    else:
        ax.text(0.02, 0.02, text, ha="left", va="bottom", transform=ax.transAxes, fontsize=6)


def plot(res: dict, keys: list[str], batches: list[int], path: Path) -> bool:
    """Network steps vs B, the two NQM sweeps, and measured vs predicted ratios.

    A curve with no point on its log axes (no seed reached the target at any batch size; an
    NQM curve that never reaches its risk) is left out, and its panel says so; a panel with
    nothing left says why. When no panel has anything to draw, the figure is not written (a
    message says so).

    Returns:
        Whether the figure was written.
    """
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    a1, a2, a3, a4 = axes.ravel()
    drawn: dict[Any, bool] = {}
    unreached: list[str] = []
    for i, m in enumerate(METHODS):
        for key, ls in zip(keys, (":", "-")):
            ms = []
            for b in batches:
                vals = [
                    r["steps_to_target"][key]
                    for r in res["runs"]
                    if r["method"] == m and r["batch_size"] == b and key in r["chosen_for"]
                ]
                ms.append(mean_se(vals)[:2])
            mean, se = zip(*ms)
            if not any(_drawable(v) for v in mean):
                unreached.append(f"{m}, val acc {key}")
                continue
            drawn[a1] = True
            a1.errorbar(
                batches,
                mean,
                yerr=se,
                color=f"C{i}",
                ls=ls,
                marker="o",
                ms=3,
                capsize=2,
                label=f"{m}, val acc {key}",
            )
    a1.set(xlabel="batch size", ylabel="steps to target")
    a1.set_title("MNIST-1D CNN (mean ± SE over seeds)")
    if unreached:
        _say(
            a1,
            "not reached at any batch size (left out):\n" + "\n".join(unreached),
            alone=not drawn.get(a1),
        )
    if drawn.get(a1):
        a1.set(xscale="log", yscale="log")
        a1.legend(fontsize=7)
    for ax, name, title in (
        (a2, "measured_spectrum", "NQM from the measured Hessian spectrum"),
        (a3, "paper", "the paper's NQM (h_i = 1/i, d = 10^4)"),
    ):
        sw = res["nqm"][name]["sweep"]
        bs = sw["batch_sizes"]
        never = []
        for label, curve in sw["curves"].items():
            if "0.9999" in label and "p=0.25" in label:
                continue
            if not any(_drawable(v) for v in curve["steps"]):
                never.append(label)
                continue
            drawn[ax] = True
            ls = "--" if label.startswith("sgd") else ("-" if "<=0.9 " in label + " " else ":")
            ax.plot(bs, curve["steps"], ls=ls, marker=".", ms=3, label=label)
        ax.set(xlabel="batch size", ylabel="steps to target risk", title=title)
        if never:
            text = "target risk not reached at any batch size (left out):\n" + "\n".join(never)
            _say(ax, text, alone=not drawn.get(ax))
        if drawn.get(ax):
            ax.set(xscale="log", yscale="log")
            ax.legend(fontsize=6)
    names, meas, se, preds = [], [], [], []
    key = keys[-1]
    v = res["verdict"].get(key, {})
    for src in ("measured spectrum, beta<=0.9", "measured spectrum, beta<=0.9999"):
        for ratio, e in v.get(src, {}).items():
            if src.endswith("0.9999"):
                preds[[n for n in names].index(ratio)].append(e["predicted"])
                continue
            names.append(ratio)
            meas.append(e["measured"])
            se.append(e["measured_se"] if math.isfinite(e["measured_se"]) else 0.0)
            preds.append([e["predicted"]])
    x = np.arange(len(names))
    flat = [y for p in preds for q in p for y in (q if isinstance(q, list) else [q])]
    drawn[a4] = any(_drawable(v) for v in [*meas, *flat])
    if not drawn[a4]:  # no ratio on a log axis: say why instead
        note = v.get("note") or "no measured ratio and no NQM prediction"
        _say(a4, f"val acc {key}: {note}", alone=True)
        a4.set_title("ratios to SGD")
        return _finish(fig, plt, path, drawn)
    a4.errorbar(x, meas, yerr=se, fmt="ko", capsize=4, label=f"measured (val acc {key})")
    for xi, (p09, *rest) in zip(x, preds):
        for p, color, lab in (
            (p09, "C3", "NQM β ≤ 0.9"),
            (rest[0] if rest else None, "C0", "NQM β ≤ 0.9999"),
        ):
            if p is None:
                continue
            lo, hi = (p, p) if not isinstance(p, list) else p
            a4.plot(
                [xi + 0.15, xi + 0.15] if color == "C3" else [xi + 0.3, xi + 0.3],
                [lo, hi],
                color=color,
                marker="_",
                ms=14,
                lw=3,
                label=lab if xi == 0 else None,
            )
    for xi, mv in zip(x, meas):
        if math.isfinite(mv):
            a4.fill_between([xi - 0.3, xi + 0.45], mv / CONFIRM, mv * CONFIRM, color="0.85")
    a4.set_yscale("log")
    a4.set_xticks(x, [n.replace(" at ", "\nat ") for n in names], fontsize=6, rotation=30)
    a4.set_title("ratios to SGD (grey: measured ÷/× 1.5)")
    a4.legend(fontsize=7)
    return _finish(fig, plt, path, drawn)


def _finish(fig: Any, plt: Any, path: Path, drawn: dict[Any, bool]) -> bool:
    """Write the figure unless no panel has anything drawn (then say so); close it."""
    try:
        if not any(drawn.values()):
            print(f"nothing to plot (no curve reached its target): {path} not written")
            return False
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return True
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
