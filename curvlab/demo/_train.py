"""``curvlab demo``: small-batch vs large-batch training with Fisher noise, diagnosed and analysed.

Four runs of the MNIST-1D paper's CNN (:func:`curvlab.demo.mnist1d.mnist1d_cnn`, 5,210 parameters)
from the same initialisation on MNIST-1D (Greydanus & Kobak, 2024; 4,000 training and 1,000 test
signals generated offline by the ``mnist1d`` package and cached, :func:`load_mnist1d`), for the same
number of epochs (Wen et al., 2020):

* ``SB``: small batch ``small_batch``;
* ``LB``: large batch ``large_batch``;
* ``LB+diag-Fisher``: large batch plus Gaussian noise with the diagonal empirical Fisher as
  covariance, scaled by ``sqrt((M_L - M_S) / (M_L M_S))`` (:class:`curvlab.noise.DiagFisherNoise`);
* ``LB+full-Fisher``: the same with the full empirical Fisher
  (:class:`curvlab.noise.FullFisherNoise`).

SGD with momentum 0.9, linear warm-up over the first 5% of the updates and a x0.1 decay at 50% and
75%; each run uses the learning rate that examples/mnist1d_wen_table2.py tuned for it (SB 0.05,
LB 0.2, LB + noise 0.1) and the noise stops after a quarter of training (Wen et al., A.7). With
``seeds > 1`` every run is repeated with seeds ``seed, seed + 1, ...`` and the report gives the
test accuracy's mean and standard deviation (the analysis uses the first seed's models). Every
run is tracked by :class:`curvlab.Diagnostics` (loss, gradient norm, Tr(F), noise scale); the
final models are analysed with :func:`curvlab.analyze` and everything is written as one report.

Example:
    >>> cfg = DemoConfig.quick()
    >>> cfg.epochs < DemoConfig().epochs
    True
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._progress import ProgressBar, progress_enabled
from curvlab.analysis._analyze import analyze
from curvlab.analysis._diagnostics import Diagnostics
from curvlab.analysis._report import Report
from curvlab.demo.mnist1d import load_mnist1d, mnist1d_cnn

__all__ = ["DemoConfig", "run_demo", "RUNS"]

RUNS = ("SB", "LB", "LB+diag-Fisher", "LB+full-Fisher")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (the defaults run in well under a minute on 2 idle CPU cores).

    Attributes:
        n_train, n_test: how many MNIST-1D training / test signals to use (at most 4,000 / 1,000).
        epochs: passes over the training set for every run.
        small_batch, large_batch: ``M_S`` and ``M_L``.
        lr, lb_lr, noise_lr: peak learning rates of SB, LB and the two LB + noise runs.
        momentum: SGD momentum (all runs).
        noise_stop_fraction: the noise is switched off after this fraction of the updates.
        seeds: repetitions of every run (seeds ``seed``, ``seed + 1``, ...).
        data_dir: MNIST-1D cache folder (``None``: ``~/.cache/curvlab/mnist1d``).
        diag_points: about this many Diagnostics measurements per run.
        analyze_examples: training examples the final analysis uses.
        num_probes, lanczos_steps: Hutchinson probes and Lanczos steps of the analysis.
        seed: seed of the initialisation, the batch order and the noise (MNIST-1D is fixed).
    """

    n_train: int = 4000
    n_test: int = 1000
    epochs: int = 30
    small_batch: int = 32
    large_batch: int = 512
    lr: float = 0.05
    lb_lr: float = 0.2
    noise_lr: float = 0.1
    momentum: float = 0.9
    noise_stop_fraction: float = 0.25
    seeds: int = 1
    data_dir: str | None = None
    diag_points: int = 24
    analyze_examples: int = 512
    num_probes: int = 20
    lanczos_steps: int = 40
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """A shortened run for tests and a first look (a few seconds)."""
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
        per_epoch = max(self.n_train // self.small_batch, 1)
        return replace(self, epochs=max(1, round(steps / per_epoch)))


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
    return (
        f"MNIST-1D CNN, {cfg.epochs} epochs per run, SGD momentum {cfg.momentum:g}, "
        f"M_S = {cfg.small_batch} (lr {cfg.lr:g}), M_L = {cfg.large_batch} (LB lr {cfg.lb_lr:g}, "
        f"LB + noise lr {cfg.noise_lr:g}), warm-up 5% and x0.1 at 50%/75% of the updates, "
        f"empirical-Fisher noise stopped after {cfg.noise_stop_fraction:g} of training, "
        + (
            f"seed {cfg.seed}"
            if cfg.seeds == 1
            else f"seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}"
        )
    )


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
    steps_per_epoch = max(X.shape[0] // batch, 1)
    total = steps_per_epoch * cfg.epochs
    opt = _optimizer(name, cfg, sgd, model, loss_fn, batch, total)
    every = max(1, total // cfg.diag_points)
    order_gen = torch.Generator().manual_seed(cfg.seed + 2)
    losses: list[Tensor] = []
    bar = ProgressBar(total=total, desc=f"{name:>15}", enable=show)
    t0 = time.perf_counter()
    step = 0
    with Diagnostics(model, loss_fn, every=every, log_dir=log_dir, max_examples=256) as diag:
        for _ in range(cfg.epochs):
            perm = torch.randperm(X.shape[0], generator=order_gen)
            for i in range(steps_per_epoch):
                idx = perm[i * batch : (i + 1) * batch]
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
    out: Path,
    progress: bool,
) -> tuple[dict[str, nn.Module], dict[str, Any], dict[str, list[float]]]:
    """Every run for every seed: the first seed's models and histories, all test accuracies."""
    models: dict[str, nn.Module] = {}
    histories: dict[str, Any] = {}
    test_acc: dict[str, list[float]] = {name: [] for name in RUNS}
    for k in range(cfg.seeds):
        cfg_k = replace(cfg, seed=cfg.seed + k)
        for name in RUNS:
            log_dir = out / "diagnostics" / name.replace("+", "_")
            if k > 0:
                log_dir = out / "diagnostics" / f"seed{cfg_k.seed}" / name.replace("+", "_")
            model, history = _train_run(name, cfg_k, train, log_dir, progress)
            test_acc[name].append(_accuracy(model.eval(), *test))
            if k == 0:
                models[name], histories[name] = model, history
    return models, histories, test_acc


def run_demo(
    out: str | Path,
    config: DemoConfig | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Report:
    """Train the four runs, analyse the final models and save the report into ``out``.

    The final models are independent runs: the report draws them as separate series and
    predicts the NQM critical batch size of each run from its own Hessian spectrum.

    Args:
        out: the output folder.
        config: the settings (default :class:`DemoConfig`).
        overwrite: write into an existing folder.
        progress: progress bars on stderr (``None``: when stderr is a terminal).

    Returns:
        The :class:`~curvlab.analysis.Report` (also written to ``out``).

    Raises:
        FileExistsError: if ``out`` exists and ``overwrite`` is False (checked before training).
    """
    cfg = config or DemoConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output folder '{out}' already exists; pass --overwrite or choose another --out"
        )
    progress = progress_enabled(progress)
    t_start = time.perf_counter()
    if cfg.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {cfg.seeds!r}")
    (X_all, y_all), (Xt_all, yt_all) = load_mnist1d(cfg.data_dir)
    train = (X_all[: cfg.n_train], y_all[: cfg.n_train])
    test = (Xt_all[: cfg.n_test], yt_all[: cfg.n_test])
    out.mkdir(parents=True, exist_ok=True)
    models, histories, test_acc = _train_all(cfg, train, test, out, progress)
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
        checkpoint=[models[r].state_dict() for r in RUNS],
        labels=list(RUNS),
        independent=True,
        seed=cfg.seed,
        num_probes=cfg.num_probes,
        num_steps=cfg.lanczos_steps,
        progress=progress,
    )
    for entry, name in zip(report.entries, RUNS):
        model = models[name].eval()
        entry["values"]["train_accuracy"] = _accuracy(model, *train)
        entry["values"]["test_accuracy"] = _accuracy(model, *test)
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
    report.meta["demo_config"] = json.dumps(asdict(cfg))
    report.meta["demo_seconds"] = round(time.perf_counter() - t_start, 1)
    report.save(out, overwrite=True)
    return report
