"""Wen et al. Fig. 1: one-step update clouds in a 2-D linear regression.

From one parameter point, draw many one-step updates ``theta - lr * (gradient + noise)`` of:
small-batch SGD (the noise comes from sampling a mini-batch), full-batch gradient + isotropic noise
(its sigma set to give the same total variance as the Fisher noises; the paper uses sigma = 0.1
on its own scale), + full empirical-Fisher noise and + diagonal empirical-Fisher noise (both with Wen et
al.'s scale for large batch = all N examples and the SGD batch size as small batch). The full-Fisher
cloud should almost recover the SGD cloud; the diagonal-Fisher cloud is axis-aligned.

Run: ``python examples/wen_fig1_update_clouds.py [--out DIR]`` (a few seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from curvlab.noise import DiagFisherNoise, FullFisherNoise, IsotropicNoise

N, SMALL, LR, DRAWS = 512, 8, 0.1, 600


def problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    X = torch.randn(N, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    theta_star = torch.tensor([0.4, 0.3], dtype=torch.float64)
    y = (X @ theta_star + 1.0 * torch.randn(N, generator=gen, dtype=torch.float64)).unsqueeze(1)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0]]))
    return model, nn.MSELoss(), X, y


def gradient(
    model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    loss = loss_fn(model(X), y)
    (g,) = torch.autograd.grad(loss, [model.weight])
    return g.reshape(-1)


def clouds() -> dict[str, np.ndarray]:
    model, loss_fn, X, y = problem()
    theta = model.weight.detach().reshape(-1).clone()
    full_grad = gradient(model, loss_fn, X, y)
    gen = torch.Generator().manual_seed(1)
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("SGD", "isotropic", "full Fisher", "diag Fisher")
    }
    for _ in range(DRAWS):
        idx = torch.randint(0, N, (SMALL,), generator=gen)
        out["SGD"].append(theta - LR * gradient(model, loss_fn, X[idx], y[idx]))
    diag_f = DiagFisherNoise("empirical", large_batch=N, small_batch=SMALL)
    total = sum(v.sum() for v in diag_f.estimate(model, loss_fn, X, y, gen).values())
    sigma = float(diag_f.scale * torch.sqrt(total / 2))
    samplers = {
        "isotropic": IsotropicNoise(sigma),
        "full Fisher": FullFisherNoise("empirical", large_batch=N, small_batch=SMALL),
        "diag Fisher": DiagFisherNoise("empirical", large_batch=N, small_batch=SMALL),
    }
    for name, sampler in samplers.items():
        state = sampler.estimate(model, loss_fn, X, y, gen) if sampler.reusable else None
        for _ in range(DRAWS):
            if sampler.reusable:
                eps = sampler.draw(model, state, gen)
            else:
                eps = sampler.estimate(model, loss_fn, X, y, gen)
            out[name].append(theta - LR * (full_grad + eps["weight"].reshape(-1)))
    return {k: torch.stack(v).numpy() for k, v in out.items()}


def loss_grid(lo: np.ndarray, hi: np.ndarray):
    model, loss_fn, X, y = problem()
    w1, w2 = np.meshgrid(np.linspace(lo[0], hi[0], 80), np.linspace(lo[1], hi[1], 80))
    W = torch.tensor(np.stack([w1.ravel(), w2.ravel()], 1))
    losses = ((X @ W.T - y) ** 2).mean(0).reshape(w1.shape).numpy()
    return w1, w2, losses


def plot(data: dict[str, np.ndarray], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allpts = np.concatenate(list(data.values()))
    lo, hi = allpts.min(0) - 0.05, allpts.max(0) + 0.05
    w1, w2, losses = loss_grid(lo, hi)
    fig, axes = plt.subplots(2, 2, figsize=(8, 7), sharex=True, sharey=True)
    for ax, (name, pts) in zip(axes.ravel(), data.items()):
        ax.contour(w1, w2, losses, levels=15, cmap="viridis", linewidths=0.7)
        ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.5, color="tab:red")
        ax.scatter([0.0], [0.0], marker="*", s=80, color="k")
        ax.set_title(f"one-step update: {name}")
        ax.set_xlabel("W1")
        ax.set_ylabel("W2")
    fig.tight_layout()
    path = out_dir / "wen_fig1_update_clouds.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "output" / "wen",
        help="folder for the figure (default examples/output/wen)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = clouds()
    sgd_cov = np.cov(data["SGD"].T)
    print("update-cloud covariances (x 1e4), and relative Frobenius distance to the SGD cloud's:")
    for name, pts in data.items():
        cov = np.cov(pts.T)
        dist = np.linalg.norm(cov - sgd_cov) / np.linalg.norm(sgd_cov)
        corr = cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1])
        print(
            f"  {name:12s} var = ({1e4 * cov[0, 0]:7.2f}, {1e4 * cov[1, 1]:7.2f})  "
            f"corr = {corr:+.2f}  distance to SGD = {dist:.2f}"
        )
    print("wrote", plot(data, args.out))


if __name__ == "__main__":
    main()
