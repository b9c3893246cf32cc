"""Plot the Hessian spectrum of a small classifier: SLQ density plus converged top eigenvalues.

Trains an MLP briefly on synthetic 10-class data, then computes on one batch
the spectral density (stochastic Lanczos quadrature), the top-5 eigenvalues (Lanczos) and Tr(H),
and writes ``spectrum.png`` to ``--out``.

Usage: ``python examples/spectrum.py --out examples/output/spectrum``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from example_args import positive_int
from torch import nn

from curvlab.estimators import eigenvalues, spectral_density, trace

OUTPUT = Path(__file__).resolve().parent / "output"
"""Where the outputs go by default: ``examples/output/`` beside this script (ignored by git),
wherever it is run from."""


def make_problem(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(10, 20, generator=gen)
    y = torch.randint(0, 10, (512,), generator=gen)
    X = centers[y] + torch.randn(512, 20, generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        model = nn.Sequential(
            nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(100):
        idx = torch.arange(step * 32, step * 32 + 32) % 512
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    return model, (X[:256], y[:256])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        default=str(OUTPUT / "spectrum"),
        help="folder for the figure (default examples/output/spectrum)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=90,
        help="Lanczos steps per SLQ probe (default %(default)s)",
    )
    parser.add_argument(
        "--probes", type=positive_int, default=3, help="SLQ probe vectors (default 3)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, batch = make_problem()
    loss_fn = nn.CrossEntropyLoss()
    dens = spectral_density(model, loss_fn, batch, num_steps=args.steps, num_probes=args.probes)
    top = eigenvalues(model, loss_fn, batch, k=5, tol=1e-4)
    tr = trace(model, loss_fn, batch, method="ggn_cv", num_probes=10, rtol=0.01)
    print(
        f"top-5 eigenvalues {[round(v, 5) for v in top.values.tolist()]} "
        f"(converged={top.converged}, {top.num_matvecs} products)"
    )
    print(
        f"Tr(H) = {tr.value:.4f} +- {tr.stderr:.4f}; SLQ first moment x D = "
        f"{dens.moment(1) * sum(p.numel() for p in model.parameters()):.4f}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    dens.plot(ax=ax, label=f"SLQ ({args.probes} probes x {args.steps} steps)")
    for i, v in enumerate(top.values.tolist()):
        ax.axvline(v, color="C3", ls=":", lw=1, label="top-5 (Lanczos)" if i == 0 else None)
    ax.set_title(f"Hessian spectrum, Tr(H) = {tr.value:.3f}")
    ax.legend()
    fig.tight_layout()
    path = out / "spectrum.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
