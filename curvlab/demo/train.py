"""``curvlab demo``: small-batch vs large-batch training with Fisher noise, diagnosed and analysed.

Four runs of the same small CNN from the same initialisation on :func:`make_dataset`, for the same
number of epochs (Wen et al., 2020):

* ``SB``: small batch ``small_batch``;
* ``LB``: large batch ``large_batch``, same learning rate;
* ``LB+diag-Fisher``: large batch plus Gaussian noise with the diagonal empirical Fisher as
  covariance, scaled by ``sqrt((M_L - M_S) / (M_L M_S))`` (:class:`curvlab.noise.DiagFisherNoise`);
* ``LB+full-Fisher``: the same with the full empirical Fisher
  (:class:`curvlab.noise.FullFisherNoise`).

As in Wen et al.'s Fig. 3, all four runs use the same learning rate and the training loss is
shown per parameter update (their generalisation results need a tuned, larger learning rate and
warm-up for the large batch, which the demo does not attempt). Every run is tracked by :class:`curvlab.Diagnostics` (loss, gradient norm, Tr(F), noise scale);
the final models are analysed with :func:`curvlab.analyze` and everything is written as one report.

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

from curvlab.analysis.analyze import analyze
from curvlab.analysis.hooks import Diagnostics
from curvlab.analysis.report import Report
from curvlab.demo.dataset import make_dataset
from curvlab.progress import ProgressBar

__all__ = ["DemoConfig", "small_cnn", "run_demo", "RUNS"]

RUNS = ("SB", "LB", "LB+diag-Fisher", "LB+full-Fisher")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (the defaults run in about two minutes on 2 CPU cores).

    Attributes:
        n_train, n_test: dataset sizes.
        epochs: passes over the training set for every run.
        small_batch, large_batch: ``M_S`` and ``M_L``.
        lr: SGD learning rate (all runs).
        diag_points: about this many Diagnostics measurements per run.
        analyze_examples: training examples the final analysis uses.
        num_probes, lanczos_steps: Hutchinson probes and Lanczos steps of the analysis.
        seed: seed of the data, the initialisation, the batch order and the noise.
    """

    n_train: int = 2048
    n_test: int = 1024
    epochs: int = 30
    small_batch: int = 32
    large_batch: int = 512
    lr: float = 0.05
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


def small_cnn(classes: int = 4, seed: int = 0) -> nn.Module:
    """Conv(1,8,3)-ReLU-MaxPool-Conv(8,16,3)-ReLU-MaxPool-Linear(144,32)-ReLU-Linear(32,classes).

    Initialised from its own generator (the global RNG is not used).
    """
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 32),
        nn.ReLU(),
        nn.Linear(32, classes),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.zero_()
    return model


def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def _train_run(
    name: str,
    cfg: DemoConfig,
    train: tuple[Tensor, Tensor],
    log_dir: Path,
    show: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    from curvlab.noise import DiagFisherNoise, FullFisherNoise, NoisyOptimizer

    X, y = train
    batch = cfg.small_batch if name == "SB" else cfg.large_batch
    model = small_cnn(classes=int(y.max()) + 1, seed=cfg.seed + 1)
    loss_fn = nn.CrossEntropyLoss()
    opt: Any = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    if name in ("LB+diag-Fisher", "LB+full-Fisher"):
        sampler = (
            DiagFisherNoise("empirical", large_batch=batch, small_batch=cfg.small_batch)
            if name == "LB+diag-Fisher"
            else FullFisherNoise("empirical", large_batch=batch, small_batch=cfg.small_batch)
        )
        opt = NoisyOptimizer(opt, sampler, model, loss_fn, seed=cfg.seed)
    steps_per_epoch = max(X.shape[0] // batch, 1)
    total = steps_per_epoch * cfg.epochs
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
        "seconds": time.perf_counter() - t0,
    }
    return model, history


def run_demo(
    out: str | Path,
    config: DemoConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """Train the four runs, analyse the final models and save the report into ``out``.

    Returns:
        The :class:`~curvlab.analysis.report.Report` (also written to ``out``).

    Raises:
        FileExistsError: if ``out`` exists and ``overwrite`` is False (checked before training).
    """
    cfg = config or DemoConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output folder '{out}' already exists; pass --overwrite or choose another --out"
        )
    t_start = time.perf_counter()
    train, test = make_dataset(n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, nn.Module] = {}
    histories: dict[str, Any] = {}
    for name in RUNS:
        models[name], histories[name] = _train_run(
            name, cfg, train, out / "diagnostics" / name.replace("+", "_"), progress
        )
    if progress:
        print(
            "analysing the final models (Tr(H), Tr(F), eigenvalues, spectrum, NQM) ...",
            file=sys.stderr,
            flush=True,
        )
    loss_fn = nn.CrossEntropyLoss()
    n = min(cfg.analyze_examples, train[0].shape[0])
    data = (train[0][:n], train[1][:n])
    reference = small_cnn(classes=int(train[1].max()) + 1, seed=cfg.seed + 1)
    report = analyze(
        reference,
        loss_fn,
        data,
        checkpoint=[models[r].state_dict() for r in RUNS],
        labels=list(RUNS),
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
    report.histories = histories
    report.meta["demo_config"] = json.dumps(asdict(cfg))
    report.meta["demo_seconds"] = round(time.perf_counter() - t_start, 1)
    report.save(out, overwrite=True)
    return report
