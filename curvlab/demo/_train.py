"""``curvlab demo``: small-batch vs large-batch training with Fisher noise, diagnosed and analysed.

Runs of the MNIST-1D paper's CNN (:func:`curvlab.demo.mnist1d.mnist1d_cnn`, 5,210 parameters)
from the same initialisation on MNIST-1D (Greydanus & Kobak, 2024; 4,000 training and 1,000 test
signals generated offline by the ``mnist1d`` package and cached, :func:`load_mnist1d`), in the
regime of Wen et al. (2020), Table 2: every run gets the same number of epochs, so the large-batch
runs make ``large_batch / small_batch`` times fewer updates:

* ``SB``: small batch ``small_batch``;
* ``LB``: large batch ``large_batch``;
* ``LB+diag-Fisher``: large batch plus Gaussian noise with the diagonal empirical Fisher as
  covariance, scaled by ``sqrt((M_L - M_S) / (M_L M_S))`` (:class:`curvlab.noise.DiagFisherNoise`);
* ``LB+full-Fisher`` (not run by default; add it to ``DemoConfig.runs``): the same with the full
  empirical Fisher (:class:`curvlab.noise.FullFisherNoise`); Wen et al. report it only once, as
  too slow to train.

SGD with momentum 0.9, linear warm-up over the first 5% of the updates and a x0.1 decay at 50% and
75%; the noise stops after a quarter of the updates and the rest of the run is plain LB (Wen et
al., A.7). Batches walk through random permutations of the training set, so no example is dropped
(the last batch of an epoch continues into the next permutation). The default 80 epochs let LB fit
the training set (train accuracy >= 0.99), the precondition of Wen et al.'s claim that the noise
closes a *generalisation* gap; with fewer epochs LB under-fits and the gap is an optimisation gap,
which the noise is not expected to close. The learning rates are tuned for this budget
(:class:`DemoConfig`). The report and the terminal state the regime, whether its preconditions
held, and what the noise did (:func:`regime_text`): one seed is an illustration, not a test of the
claim (docs/reproductions.md tests it with several seeds).

With ``seeds > 1`` every run is repeated with seeds ``seed, seed + 1, ...`` and the report gives
the test accuracy's mean and standard deviation (the analysis uses the first seed's models). Every
run is tracked by :class:`curvlab.Diagnostics` (loss, gradient norm, Tr(F), noise scale); the
final models are analysed with :func:`curvlab.analyze` and everything is written as one report.

Example:
    >>> cfg = DemoConfig.quick()
    >>> cfg.epochs < DemoConfig().epochs
    True
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._progress import ProgressBar, progress_enabled
from curvlab._rng import SEED_RANGE
from curvlab.analysis._analyze import analyze
from curvlab.analysis._diagnostics import Diagnostics
from curvlab.analysis._report import (
    _ASIDE,
    Report,
    _missing_folders,
    _swap_in,
    check_matplotlib,
    check_report_names,
)
from curvlab.demo._logs import (
    check_earlier_logs,
    check_log_targets,
    earlier_logs,
    mark_logs,
    remove_empty_log_folders,
    run_log_dir,
)
from curvlab.demo.mnist1d import load_mnist1d, mnist1d_cnn

__all__ = ["DemoConfig", "run_demo", "check_demo_out", "RUNS", "regime_text"]

RUNS = ("SB", "LB", "LB+diag-Fisher", "LB+full-Fisher")
"""Every run the demo knows (``DemoConfig.runs`` picks from these)."""

MNIST1D_TRAIN, MNIST1D_TEST = 4000, 1000
"""The training and test signals MNIST-1D has (the most ``n_train`` and ``n_test`` may ask)."""

FIT_THRESHOLD = 0.99
"""LB train accuracy from which LB counts as having fitted the training set."""

MIN_GAP = 0.01
"""SB - LB test accuracy from which there is a generalisation gap for the noise to close."""


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (the defaults run in under a minute on 2 idle CPU cores).

    The default learning rates were tuned for the default budget (80 epochs, M_S = 64, M_L = 512):
    best validation accuracy at seed 0, training on the first 3,500 training signals and
    validating on the last 500 (SB: 0.05 -> 0.940, 0.1 -> 0.942, 0.2 -> 0.588; LB: 0.1 -> 0.836,
    0.2 -> 0.902, 0.3 -> 0.928, 0.4 -> 0.866; LB + diagonal Fisher: 0.05 -> 0.660, 0.1 -> 0.874,
    0.2 -> 0.912, 0.3 -> 0.103, diverged). Other budgets need their own.

    Attributes:
        n_train, n_test: how many MNIST-1D training / test signals to use (1 to 4,000 / 1 to
            1,000).
        epochs: passes over the training set for every run (Wen et al.'s equal epoch budget).
        small_batch, large_batch: ``M_S`` and ``M_L`` (``1 <= M_S <= M_L``).
        lr, lb_lr, noise_lr: peak learning rates of SB, LB and the LB + noise runs.
        momentum: SGD momentum (all runs).
        noise_stop_fraction: the noise is switched off after this fraction of the updates (in
            [0, 1]).
        runs: which runs to train, in order (from :data:`RUNS`).
        seeds: repetitions of every run (seeds ``seed``, ``seed + 1``, ...).
        data_dir: MNIST-1D cache folder (``None``: ``~/.cache/curvlab/mnist1d``).
        diag_points: about this many Diagnostics measurements per run.
        analyze_examples: training examples the final analysis uses (>= 2).
        num_probes, lanczos_steps: Hutchinson probes (>= 2) and Lanczos steps of the analysis.
        seed: seed of the initialisation, the batch order and the noise (MNIST-1D is fixed); the
            runs seed torch with ``seed + k + 1`` and ``seed + k + 2`` for ``k < seeds``, so it
            must be in ``[-2**63, 2**64 - 2 - seeds]`` (the seeds torch takes).
    """

    n_train: int = 4000
    n_test: int = 1000
    epochs: int = 80
    small_batch: int = 64
    large_batch: int = 512
    lr: float = 0.1
    lb_lr: float = 0.3
    noise_lr: float = 0.2
    momentum: float = 0.9
    noise_stop_fraction: float = 0.25
    runs: tuple[str, ...] = ("SB", "LB", "LB+diag-Fisher")
    seeds: int = 1
    data_dir: str | None = None
    diag_points: int = 24
    analyze_examples: int = 512
    num_probes: int = 20
    lanczos_steps: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        """Check every setting, before any folder is made or any run trained.

        Raises:
            ValueError: naming the setting, its allowed range and the value given. Unchecked,
                ``n_train=8000`` trained on the 4,000 signals there are for twice the epochs it
                stated, ``n_train=0`` trained forever, ``small_batch=0`` divided by zero after
                the folder was made, ``epochs=0`` claimed one update of training, and
                ``seed=2**64`` failed with torch's "Overflow when unpacking long long" inside
                training (found in review).
        """
        if isinstance(self.runs, str) or not isinstance(self.runs, tuple):
            raise ValueError(f"runs must be a tuple of names from {RUNS}, got {self.runs!r}")
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown or not self.runs or len(set(self.runs)) != len(self.runs):
            raise ValueError(f"runs must be distinct names from {RUNS}, got {self.runs!r}")
        bounds = {  # name: (least, most or None); MNIST-1D has 4,000 / 1,000 signals
            "n_train": (1, MNIST1D_TRAIN),
            "n_test": (1, MNIST1D_TEST),
            "epochs": (1, None),
            "small_batch": (1, None),
            "large_batch": (1, None),
            "seeds": (1, None),
            "diag_points": (1, None),
            "analyze_examples": (2, None),  # the noise scales need two examples
            "num_probes": (2, None),  # Tr(H)'s standard error needs two probes
            "lanczos_steps": (1, None),
            "seed": (SEED_RANGE[0], None),  # the top depends on seeds: checked below
        }
        for name, (least, most) in bounds.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if (least is not None and v < least) or (most is not None and v > most):
                allowed = f">= {least}" if most is None else f"in [{least}, {most:,}]"
                raise ValueError(f"{name} must be {allowed}, got {v!r}")
        if self.seed + self.seeds + 1 > SEED_RANGE[1]:
            # torch.Generator.manual_seed takes seeds up to 2**64 - 1, and the runs seed it with
            # seed + k + 1 and seed + k + 2 for k < seeds: seed=2**64 was taken and failed with
            # torch's "Overflow when unpacking long long" inside training (found in review)
            raise ValueError(
                f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1] - self.seeds - 1}] with "
                f"seeds={self.seeds} (the runs seed torch with seed + k + 1 and seed + k + 2 for "
                f"k < seeds, and torch takes seeds up to 2**64 - 1), got {self.seed!r}"
            )
        if self.small_batch > self.large_batch:
            raise ValueError(
                f"small_batch (M_S) must be at most large_batch (M_L), got {self.small_batch} > "
                f"{self.large_batch}"
            )
        for name in ("lr", "lb_lr", "noise_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        checks = (("momentum", 0.0, 1.0, "[0, 1)"), ("noise_stop_fraction", 0.0, 1.0, "[0, 1]"))
        for name, low, high, shown in checks:
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and low <= v <= high
            if not ok or (name == "momentum" and v == 1):
                raise ValueError(f"{name} must be a number in {shown}, got {v!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, PathLike)):
            raise ValueError(f"data_dir must be a folder path or None, got {self.data_dir!r}")

    @classmethod
    def quick(cls) -> DemoConfig:
        """A shortened run for tests and a first look (a few seconds; LB does not fit the data)."""
        return cls(
            n_train=256,
            n_test=128,
            epochs=2,
            small_batch=32,
            large_batch=128,
            diag_points=4,
            analyze_examples=128,
            num_probes=4,
            lanczos_steps=12,
        )

    def with_steps(self, steps: int) -> DemoConfig:
        """These settings with the epochs set so that the SB run takes about ``steps`` updates."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}")
        per_epoch = self.n_train / self.small_batch
        return replace(self, epochs=max(1, round(steps / per_epoch)))

    def updates(self, batch: int) -> int:
        """Updates of a run with this batch size: ``ceil(epochs * n_train / batch)``."""
        return max(1, math.ceil(self.epochs * self.n_train / batch))


def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def headline(test_accuracy: dict[str, list[float]]) -> str:
    """``"test accuracy: SB 0.948, LB 0.863, ..."`` (mean ± std over seeds when there are several).

    Example:
        >>> headline({"SB": [0.9, 0.8], "LB": [0.7, 0.7]})
        'test accuracy (mean ± std over 2 seeds): SB 0.850 ± 0.071, LB 0.700 ± 0.000'
    """
    n = len(next(iter(test_accuracy.values())))
    if n == 1:
        return "test accuracy: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in test_accuracy.items())
    return f"test accuracy (mean ± std over {n} seeds): " + ", ".join(
        f"{k} {_mean(v):.3f} ± {_std(v):.3f}" for k, v in test_accuracy.items()
    )


def settings_text(cfg: DemoConfig) -> str:
    """The runs' settings in one sentence."""
    lrs = [f"SB lr {cfg.lr:g}", f"LB lr {cfg.lb_lr:g}"]
    if any(r.startswith("LB+") for r in cfg.runs):
        lrs.append(f"LB + noise lr {cfg.noise_lr:g}")
    return (
        f"MNIST-1D CNN, {cfg.epochs} epochs per run (SB {cfg.updates(cfg.small_batch):,} "
        f"updates, LB {cfg.updates(cfg.large_batch):,}), SGD momentum {cfg.momentum:g}, "
        f"M_S = {cfg.small_batch}, M_L = {cfg.large_batch}, {', '.join(lrs)}, "
        "warm-up 5% and x0.1 at 50%/75% of the updates, "
        f"empirical-Fisher noise stopped after {cfg.noise_stop_fraction:g} of the updates, "
        + (
            f"seed {cfg.seed}"
            if cfg.seeds == 1
            else f"seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}"
        )
    )


def _points(x: float) -> str:
    return f"{100 * x:+.1f} points"


def regime_text(
    cfg: DemoConfig, train_accuracy: dict[str, list[float]], test_accuracy: dict[str, list[float]]
) -> str:
    """The regime the runs were in, whether Wen et al.'s preconditions held, and what noise did.

    Wen et al. (2020) claim that, at an equal epoch budget, diagonal-Fisher noise in the first
    part of large-batch training recovers much of the test accuracy LB loses to SB. That claim
    is about a *generalisation* gap: LB has fitted the training set (train accuracy at least
    :data:`FIT_THRESHOLD`) and still tests at least :data:`MIN_GAP` below SB. Where either
    fails, the text says that the method is not expected to help here. Accuracies are means
    over the seeds.

    Example:
        >>> cfg = DemoConfig.quick()
        >>> text = regime_text(cfg, {"SB": [0.9], "LB": [0.6]}, {"SB": [0.8], "LB": [0.5]})
        >>> "not expected to help" in text
        True
    """
    n = len(next(iter(train_accuracy.values())))
    over = "" if n == 1 else f" (means over {n} seeds)"
    head = (
        f"Regime: Wen et al. (2020) Table 2 at small scale, the same {cfg.epochs} epochs for "
        f"every run (SB {cfg.updates(cfg.small_batch):,} updates of {cfg.small_batch}, LB "
        f"{cfg.updates(cfg.large_batch):,} of {cfg.large_batch}), noise for the first "
        f"{cfg.noise_stop_fraction:.0%} of the updates, then plain LB."
    )
    default = DemoConfig()
    own_budget = (cfg.epochs, cfg.n_train, cfg.small_batch, cfg.large_batch) != (
        default.epochs,
        default.n_train,
        default.small_batch,
        default.large_batch,
    )
    lrs_tuned = (cfg.lr, cfg.lb_lr, cfg.noise_lr) == (default.lr, default.lb_lr, default.noise_lr)
    if own_budget and lrs_tuned:
        head += (
            f" The learning rates are those tuned for the default budget ({default.epochs} "
            f"epochs of {default.n_train:,} signals, M_S = {default.small_batch}, M_L = "
            f"{default.large_batch}), not for this one."
        )
    if "SB" not in test_accuracy or "LB" not in test_accuracy:
        return head + " Without both SB and LB runs the claim's preconditions cannot be checked."
    lb_train = _mean(train_accuracy["LB"])
    gap = _mean(test_accuracy["SB"]) - _mean(test_accuracy["LB"])
    fitted = lb_train >= FIT_THRESHOLD
    has_gap = gap >= MIN_GAP
    pre = (
        f" The claim is about a generalisation gap: it presupposes that LB fits the training set "
        f"(here LB train accuracy {lb_train:.3f}{over}; needs >= {FIT_THRESHOLD:g}: "
        f"{'holds' if fitted else 'does NOT hold'}) and still tests worse than SB (SB - LB test "
        f"accuracy {_points(gap)}; needs >= {_points(MIN_GAP)}: "
        f"{'holds' if has_gap else 'does NOT hold'})."
    )
    if not fitted:
        pre += (
            " LB has not fitted the training set, so the SB - LB gap is (partly) an optimisation "
            "gap: the noise is not expected to help in this regime (train longer"
            + (f"; the defaults train {default.epochs} epochs" if own_budget else "")
            + ")."
        )
    elif not has_gap:
        pre += " There is no gap for the noise to close: it is not expected to help here."
    effects = []
    for name in cfg.runs:
        if name.startswith("LB+") and name in test_accuracy:
            delta = _mean(test_accuracy[name]) - _mean(test_accuracy["LB"])
            share = f", {delta / gap:.0%} of the SB - LB gap" if fitted and has_gap else ""
            effects.append(f"{name} - LB test accuracy {_points(delta)}{share}")
    tail = ""
    if effects:
        tail = " Measured: " + "; ".join(effects) + "."
        if fitted and has_gap:
            tail += (
                " Wen et al. expect a positive share (LB + diagonal Fisher closing much of the "
                "gap)."
            )
    note = (
        " One small run is an illustration, not a test of the claim: docs/reproductions.md "
        "tests it over several seeds."
    )
    return head + pre + tail + note


def _lr_for(name: str, cfg: DemoConfig) -> float:
    return cfg.lr if name == "SB" else cfg.lb_lr if name == "LB" else cfg.noise_lr


def _scheduled_lr(step: int, total: int, lr: float) -> float:
    """Linear warm-up over the first 5% of the updates, x0.1 at 50% and again at 75%."""
    warm = max(1, int(0.05 * total))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.1 ** (int(step >= total // 2) + int(step >= (3 * total) // 4))


def _noise_description(name: str, cfg: DemoConfig) -> str:
    """The gradient noise a run adds, in words, with its scale."""
    from curvlab.noise import wen_scale

    if name not in ("LB+diag-Fisher", "LB+full-Fisher"):
        return "none"
    scale = wen_scale(cfg.large_batch, cfg.small_batch)
    which = "diagonal" if name == "LB+diag-Fisher" else "full"
    return (
        f"Gaussian, covariance = {which} empirical Fisher x {scale:.3g}^2 "
        f"(scale sqrt((M_L - M_S) / (M_L M_S)), M_L = {cfg.large_batch}, M_S = {cfg.small_batch})"
    )


def _optimizer(
    name: str,
    cfg: DemoConfig,
    sgd: torch.optim.Optimizer,
    model: nn.Module,
    loss_fn: nn.Module,
    batch: int,
    total: int,
) -> Any:
    """The run's optimiser: plain SGD, or SGD with diagonal / full empirical-Fisher noise."""
    from curvlab.noise import DiagFisherNoise, FullFisherNoise, NoisyOptimizer

    if name not in ("LB+diag-Fisher", "LB+full-Fisher"):
        return sgd
    noise = DiagFisherNoise if name == "LB+diag-Fisher" else FullFisherNoise
    return NoisyOptimizer(
        sgd,
        noise("empirical", large_batch=batch, small_batch=cfg.small_batch),
        model,
        loss_fn,
        stop_fraction=cfg.noise_stop_fraction,
        total_steps=total,
        seed=cfg.seed,
    )


def _batches(n: int, batch: int, total: int, generator: torch.Generator) -> Iterator[Tensor]:
    """``total`` index batches of ``batch`` walking through random permutations of ``range(n)``.

    No example is dropped: a batch that runs past the end of a permutation continues into the
    next one, so every epoch's examples are all used (``batch`` may exceed ``n``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> [b.tolist() for b in _batches(3, 2, 3, g)]  # permutations [2, 0, 1], [2, 1, 0]
        [[2, 0], [1, 2], [1, 0]]
    """
    buffer = torch.empty(0, dtype=torch.long)
    for _ in range(total):
        while buffer.numel() < batch:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
        yield buffer[:batch]
        buffer = buffer[batch:]


def _train_run(
    name: str,
    cfg: DemoConfig,
    train: tuple[Tensor, Tensor],
    log_dir: Path,
    show: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    X, y = train
    batch = cfg.small_batch if name == "SB" else cfg.large_batch
    model = mnist1d_cnn(seed=cfg.seed + 1)
    loss_fn = nn.CrossEntropyLoss()
    lr = _lr_for(name, cfg)
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    total = cfg.updates(batch)
    opt = _optimizer(name, cfg, sgd, model, loss_fn, batch, total)
    every = max(1, total // cfg.diag_points)
    order_gen = torch.Generator().manual_seed(cfg.seed + 2)
    losses: list[Tensor] = []
    bar = ProgressBar(total=total, desc=f"{name:>15}", enable=show)
    t0 = time.perf_counter()
    step = 0
    with Diagnostics(model, loss_fn, every=every, log_dir=log_dir, max_examples=256) as diag:
        for idx in _batches(X.shape[0], batch, total, order_gen):
            xb, yb = X[idx], y[idx]
            for group in sgd.param_groups:
                group["lr"] = _scheduled_lr(step, total, lr)

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            loss = opt.step(closure)
            losses.append(loss.detach())
            diag.step(step, xb, yb)
            step += 1
            if show and step % 8 == 0:
                bar.update(8, postfix=f"loss {float(loss.detach()):.3f}")
    if bar.count < step:
        bar.update(step - bar.count)
    bar.close()
    steps, trace_f = diag.history("trace_fisher")
    history = {
        "series": {
            "loss": {"step": list(range(len(losses))), "value": [float(v) for v in losses]},
            "trace_fisher": {"step": steps, "value": trace_f},
        },
        "batch_size": batch,
        "updates": step,
        "epochs": cfg.epochs,
        "lr": lr,
        "momentum": cfg.momentum,
        "noise": _noise_description(name, cfg),
        "seconds": time.perf_counter() - t0,
    }
    return model, history


def _train_all(
    cfg: DemoConfig,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    logs: Path,
    progress: bool,
) -> tuple[dict[str, nn.Module], dict[str, Any], dict[str, list[float]], dict[str, list[float]]]:
    """Every run for every seed, its training log in :func:`~curvlab.demo._logs.run_log_dir` of
    ``logs`` (:func:`run_demo`'s staging folder): the first seed's models and histories, all
    train and test accuracies."""
    models: dict[str, nn.Module] = {}
    histories: dict[str, Any] = {}
    train_acc: dict[str, list[float]] = {name: [] for name in cfg.runs}
    test_acc: dict[str, list[float]] = {name: [] for name in cfg.runs}
    for k in range(cfg.seeds):
        cfg_k = replace(cfg, seed=cfg.seed + k)
        for name in cfg.runs:
            log_dir = run_log_dir(logs, name, k, cfg_k.seed)
            model, history = _train_run(name, cfg_k, train, log_dir, progress)
            model.eval()
            train_acc[name].append(_accuracy(model, *train))
            test_acc[name].append(_accuracy(model, *test))
            if k == 0:
                models[name], histories[name] = model, history
    return models, histories, train_acc, test_acc


def check_demo_out(out: str | Path, config: DemoConfig, overwrite: bool = False) -> None:
    """Refuse an ``out`` that :func:`run_demo` could not write with ``config``, before anything
    is made or trained; touches nothing.

    What ``overwrite`` would not get past is checked first (a file given as the folder, an output
    name taken by a folder, training logs no demo wrote): ``curvlab demo`` said "pass
    --overwrite" for a file, which ``--overwrite`` then refused as no folder (found in review
    s22); then the clash with an existing ``out``.

    Raises:
        NotADirectoryError: if ``out`` is a file, or a folder a run's training log goes into
            (``diagnostics/``, ``diagnostics/seed<N>/``, ``diagnostics/<run>/``) is a file: it
            was refused only when that run's Diagnostics opened, after the runs before it had
            trained (found in review s22).
        ValueError: if a file the demo writes (the report's, a training log, the demo's marker)
            is taken by a folder or anything else that is neither a file nor a symbolic link.
        FileExistsError: if ``out`` holds training logs in the demo's run folders that no demo
            wrote; or if ``out`` exists and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output folder '{out}' exists and is not a folder")
    check_report_names(out, "curvlab demo")
    check_log_targets(out, config.runs, config.seeds, config.seed)
    check_earlier_logs(out, RUNS)  # the user's own logs: refused before anything is written
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output folder '{out}' already exists; pass --overwrite or choose another --out"
        )


def run_demo(
    out: str | Path,
    config: DemoConfig | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Report:
    """Train the runs (``config.runs``), analyse the final models and save the report into ``out``.

    The final models are independent runs: the report draws them as separate series and
    predicts the NQM critical batch size of each run from its own Hessian spectrum.

    The runs' training logs are written into a staging folder inside ``out`` and moved into
    ``out/diagnostics/`` together with the report once everything is done, replacing an earlier
    demo's logs and report there all at once (:func:`_save`). A demo that fails or is
    interrupted leaves an earlier demo's files in ``out`` as they were: the earlier logs were
    removed before training, so an interrupted ``--overwrite`` left the earlier report beside
    this run's partial logs and lost the earlier logs (found in review s22).

    Args:
        out: the output folder.
        config: the settings (default :class:`DemoConfig`).
        overwrite: write into an existing folder (an earlier demo's training logs and report
            files are replaced; every other file there is kept, and training logs in the
            demo's run folders that no demo wrote are refused: see
            :mod:`curvlab.demo._logs`).
        progress: progress bars on stderr (``None``: when stderr is a terminal).

    Returns:
        The :class:`~curvlab.analysis.Report` (also written to ``out``). Should training,
        analysis or saving fail (or be interrupted), ``out`` is left as it was: a folder ``out``
        this call created is removed again, with everything in it, and an earlier demo's logs
        and report in an existing one are kept.

    Raises:
        NotADirectoryError, ValueError, FileExistsError: from :func:`check_demo_out`, for an
            ``out`` the demo cannot write, or an existing one without ``overwrite`` (before
            training). :class:`DemoConfig` raises ``ValueError`` for an invalid setting when it
            is made.
        ImportError: when matplotlib, which draws the report, cannot be imported (checked
            before training).
    """
    cfg = config or DemoConfig()
    out = Path(out)
    check_demo_out(out, cfg, overwrite)
    progress = progress_enabled(progress)
    t_start = time.perf_counter()
    check_matplotlib()  # the report's figures: before training, not after (found in review)
    (X_all, y_all), (Xt_all, yt_all) = load_mnist1d(cfg.data_dir)
    train = (X_all[: cfg.n_train], y_all[: cfg.n_train])
    test = (Xt_all[: cfg.n_test], yt_all[: cfg.n_test])
    created = _missing_folders(out)  # deepest first (after the data: a cache inside stays)
    out.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".curvlab-demo-", dir=out))
        swapped = False
        try:
            mark_logs(staging)  # the logs are a demo's: a later --overwrite may replace them
            report = _train_and_analyse(cfg, train, test, staging, progress, t_start)
            swapped = _save(report, staging, out)
        finally:
            aside = staging / _ASIDE  # kept only if an earlier file could not be put back
            if swapped or not (aside.is_dir() and any(_files(aside))):
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        if created:  # a failed demo leaves no folder of its own behind (an interrupt too)
            shutil.rmtree(created[0], ignore_errors=True)
            for folder in created[1:]:
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise
    return report


def _files(folder: Path) -> list[Path]:
    """The files (and symbolic links) anywhere under ``folder``, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_symlink() or p.is_file())


def _save(report: Report, staging: Path, out: Path) -> bool:
    """Swap the report and the training logs in ``staging`` into ``out``, all of them or none.

    The report's files are written beside the logs (``staging/diagnostics/``); then an earlier
    demo's logs (:func:`~curvlab.demo._logs.earlier_logs`), marker and report files are moved
    aside and the new ones moved in (:func:`curvlab.analysis._report._swap_in`), every earlier
    file put back should a move fail (or be interrupted). Once all are in, the earlier logs this
    demo does not replace (of another ``--seeds`` or another run) go with the staging folder,
    and the run folders they leave empty are removed. Returns ``True`` once swapped in.
    """
    written = report._stage(staging)
    logs = [p.relative_to(staging).as_posix() for p in _files(staging / "diagnostics")]
    earlier = [p.relative_to(out).as_posix() for p in earlier_logs(out, RUNS)]
    stale = report._stale(out, written) | (set(earlier) - set(logs))
    _swap_in(staging, out, [*logs, *written], stale, what="curvlab demo")
    remove_empty_log_folders(out, [out / name for name in earlier])
    return True


def _train_and_analyse(
    cfg: DemoConfig,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    staging: Path,
    progress: bool,
    t_start: float,
) -> Report:
    """:func:`run_demo` from the training on: train (the logs into ``staging``) and analyse."""
    models, histories, train_acc, test_acc = _train_all(cfg, train, test, staging, progress)
    if progress:
        print(
            "analysing the final models (Tr(H), Tr(F), eigenvalues, spectrum, NQM) ...",
            file=sys.stderr,
            flush=True,
        )
    loss_fn = nn.CrossEntropyLoss()
    n = min(cfg.analyze_examples, train[0].shape[0])
    data = (train[0][:n], train[1][:n])
    reference = mnist1d_cnn(seed=cfg.seed + 1)
    report = analyze(
        reference,
        loss_fn,
        data,
        checkpoint=[models[r].state_dict() for r in cfg.runs],
        labels=list(cfg.runs),
        independent=True,
        seed=cfg.seed,
        num_probes=cfg.num_probes,
        num_steps=cfg.lanczos_steps,
        progress=progress,
    )
    for entry, name in zip(report.entries, cfg.runs):
        entry["values"]["train_accuracy"] = train_acc[name][0]
        entry["values"]["test_accuracy"] = test_acc[name][0]
        entry["values"]["generalization_gap"] = (
            entry["values"]["train_accuracy"] - entry["values"]["test_accuracy"]
        )
        if cfg.seeds > 1:
            entry["values"]["test_accuracy_mean"] = _mean(test_acc[name])
            entry["values"]["test_accuracy_std"] = _std(test_acc[name])
    report.histories = histories
    report.meta["demo_data"] = (
        f"MNIST-1D (mnist1d package, generated offline): {train[0].shape[0]} training / "
        f"{test[0].shape[0]} test signals of length 40, 10 classes"
    )
    report.meta["demo_settings"] = settings_text(cfg)
    report.meta["demo_headline"] = headline(test_acc)
    report.meta["demo_regime"] = regime_text(cfg, train_acc, test_acc)
    report.meta["demo_config"] = json.dumps(asdict(cfg))
    report.meta["demo_seconds"] = round(time.perf_counter() - t_start, 1)
    return report
