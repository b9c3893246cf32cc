"""Wen et al. Fig. 2 and 3 at small scale: gradient variance and training loss per update.

Four regimes train an MLP 64-128-128-10 (workload W1 of the project's benchmarks) on
scikit-learn's digits with the same SGD learning rate: small batch (SB, 32), large batch (LB, 512), LB + diagonal empirical-Fisher noise and LB + full
empirical-Fisher noise (both with Wen et al.'s scale sqrt((M_L - M_S) / (M_L M_S)), through
``NoisyOptimizer``). Fig. 2: freeze a partially trained network and estimate, per layer, the variance
of each regime's (noisy) gradient over mini-batches, averaged over the layer's parameters. Fig. 3:
training loss on the whole training set per parameter update.

Wen et al.'s claims: SB, LB + full Fisher and LB + diagonal Fisher have about the same gradient
variance, LB much less (Fig. 2); yet LB + diagonal Fisher trains about as fast per update as LB, and
LB + full Fisher about as slowly as SB (Fig. 3).

Run: ``python examples/wen_fig23_classifier.py [--out DIR] [--steps 300] [--threads 2]`` (needs scikit-learn for
the data; about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from example_args import positive_float, positive_int

from curvlab.noise import DiagFisherNoise, FullFisherNoise, NoisyOptimizer

SB, LB = 32, 512
LR = 0.3
REGIMES = ("SB", "LB", "LB + diag Fisher", "LB + full Fisher")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return X[perm], y[perm]


def mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )


def sampler_for(regime: str):
    if regime == "LB + diag Fisher":
        return DiagFisherNoise("empirical", large_batch=LB, small_batch=SB)
    if regime == "LB + full Fisher":
        return FullFisherNoise("empirical", large_batch=LB, small_batch=SB)
    return None


def train(regime: str, X, y, steps: int, log_every: int = 10) -> tuple[list[int], list[float]]:
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sampler = sampler_for(regime)
    noisy = NoisyOptimizer(opt, sampler, model, loss_fn, seed=0) if sampler else None
    batch = SB if regime == "SB" else LB
    gen = torch.Generator().manual_seed(2)
    xs, losses = [], []
    for step in range(steps + 1):
        if step % log_every == 0 or step == steps:  # the final loss too (--steps 55)
            with torch.no_grad():
                xs.append(step)
                losses.append(float(loss_fn(model(X), y)))
        if step == steps:
            break
        idx = torch.randperm(len(X), generator=gen)[:batch]

        def closure(idx=idx):
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            return loss

        if noisy is None:
            closure()
            opt.step()
        else:
            noisy.step(closure)
    return xs, losses


def gradient_variances(X, y, warmup: int = 100, draws: int = 100) -> dict[str, np.ndarray]:
    """Per layer: the variance over mini-batches of each regime's gradient, mean over weights."""
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(3)
    for _ in range(warmup):  # partially train with LB
        idx = torch.randperm(len(X), generator=gen)[:LB]
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    params = dict(model.named_parameters())
    weights = [n for n in params if n.endswith("weight")]
    out = {}
    for regime in REGIMES:
        sampler = sampler_for(regime)
        batch = SB if regime == "SB" else LB
        rows = []
        for _ in range(draws):
            idx = torch.randperm(len(X), generator=gen)[:batch]
            Xb, yb = X[idx], y[idx]
            grads = torch.autograd.grad(loss_fn(model(Xb), yb), list(params.values()))
            g = dict(zip(params, grads))
            if sampler is not None:
                eps = sampler.sample(model, loss_fn, Xb, yb, generator=gen)
                g = {n: g[n] + eps[n] for n in g}
            rows.append([g[n].reshape(-1) for n in weights])
        out[regime] = np.array(
            [torch.stack([r[i] for r in rows]).var(0).mean().item() for i in range(len(weights))]
        )
    return out


def plot(curves, variances, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.2
    layers = np.arange(len(next(iter(variances.values()))))
    for i, (regime, var) in enumerate(variances.items()):
        ax1.bar(layers + (i - 1.5) * width, var, width, label=regime)
    ax1.set_yscale("log")
    ax1.set_xticks(layers, [f"layer {k + 1}" for k in layers])
    ax1.set_ylabel("mean gradient variance")
    ax1.set_title("Fig. 2: gradient variance per layer")
    ax1.legend(fontsize=8)
    for regime, (xs, losses) in curves.items():
        ax2.plot(xs, losses, label=regime)
    ax2.set_yscale("log")
    ax2.set_xlabel("parameter updates")
    ax2.set_ylabel("training loss (all data)")
    ax2.set_title(f"Fig. 3: training loss per update (lr {LR})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "wen_fig23_classifier.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_marks(steps: int) -> list[int]:
    """The updates whose training loss Fig. 3's printout lists: 50, 100, 200 and ``steps``, each
    once (``--steps 50`` printed ``k=50`` twice)."""
    return sorted({k for k in (50, 100, 200, steps) if k <= steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "output" / "wen",
        help="folder for the figures (default examples/output/wen)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=300, help="training updates per regime (default 300)"
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=LR,
        help="the same SGD step for all regimes (finite, > 0; default %(default)s)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="torch CPU threads (default: 2)"
    )
    args = parser.parse_args()
    globals()["LR"] = args.lr
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    X, y = digits()
    variances = gradient_variances(X, y)
    print("Fig. 2: mean gradient variance per layer (x 1e-4)")
    for regime, var in variances.items():
        print(f"  {regime:18s} " + "  ".join(f"{1e4 * v:8.3f}" for v in var))
    curves = {regime: train(regime, X, y, args.steps) for regime in REGIMES}
    print("Fig. 3: training loss after k updates")
    marks = loss_marks(args.steps)
    for regime, (xs, losses) in curves.items():
        vals = "  ".join(f"k={k}: {losses[xs.index(k)]:.4f}" for k in marks if k in xs)
        print(f"  {regime:18s} {vals}")
    print("wrote", plot(curves, variances, args.out))


if __name__ == "__main__":
    main()
