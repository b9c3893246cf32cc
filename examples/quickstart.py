"""Quick start: the README's quick-start calls on a small trained classifier, printed and plotted.

The calls are the README's, with the same arguments (``diag_fisher`` empirical and exact,
``diag_hessian``, ``kfac`` (MC), ``gradient_stats``, ``fisher_norms``, ``trace`` (Hutch++),
``eigenvalues`` and ``spectral_density``); the data are four batches of 128 rather than one.
Writes ``fisher_diagonals.png`` (the diagonals, and the spectral density) into ``--out``.

Run: ``python examples/quickstart.py --out examples/output/quickstart``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import curvlab as cl

OUTPUT = Path(__file__).resolve().parent / "output"
"""Where the outputs go by default: ``examples/output/`` beside this script (ignored by git),
wherever it is run from."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=OUTPUT / "quickstart",
        help="folder for the outputs (default examples/output/quickstart)",
    )
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(512, 10, generator=gen)
    y = (X[:, :3].argmax(1) + (torch.rand(512, generator=gen) < 0.1).long()) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    batches = list(zip(X.split(128), y.split(128)))  # several batches: exact weighting

    # the README's quick-start calls, with the same arguments, on several batches
    data = batches
    F = cl.diag_fisher(model, loss_fn, data, kind="empirical")  # dict name -> Tensor
    G = cl.diag_fisher(model, loss_fn, data, kind="exact")  # GGN = true Fisher diagonal
    H = cl.diag_hessian(model, loss_fn, data)
    factors = cl.kfac(model, loss_fn, data, kind="mc", seed=0)  # module -> .A, .G
    stats = cl.gradient_stats(model, loss_fn, data)  # mean, variance, noise scale, per layer
    norms = cl.fisher_norms(model, loss_fn, data)  # ||F||_F and ||diag F||_F
    tr = cl.trace(model, loss_fn, data, matrix="hessian", method="hutch++", seed=0)
    top = cl.eigenvalues(model, loss_fn, data, k=5, tol=1e-4)
    density = cl.spectral_density(model, loss_fn, data, num_steps=90)

    for name in F:
        print(
            f"{name:10s} sum diag: empirical F {F[name].sum():.4f}  GGN {G[name].sum():.4f}  "
            f"Hessian {H[name].sum():.4f}"
        )
    print(f"gradient noise scale B_simple = {stats.noise_scale:.1f}")
    for layer, s in stats.layers.items():
        print(
            f"  layer {layer}: tr(cov) {s.trace_covariance:.3e}  |g| {s.grad_norm:.3e}  SNR {s.snr:.3e}"
        )
    print(f"||F||_F = {norms.frobenius:.4f}, ||diag F||_F = {norms.diag_frobenius:.4f}")
    for layer, f in factors.items():
        print(f"K-FAC (MC) {layer}: A {tuple(f.A.shape)}, G {tuple(f.G.shape)}")
    print(f"Tr(H) = {tr.value:.4f} +- {tr.stderr:.4f} ({tr.num_matvecs} products)")
    print("top-5 Hessian eigenvalues:", [round(float(v), 5) for v in top.values])
    peak = float(density.grid[int(density.density.argmax())])
    print(f"Hessian spectral density: {density.num_matvecs} products, highest at {peak:.3g}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    a = torch.cat([v.flatten() for v in G.values()])
    b = torch.cat([v.flatten() for v in F.values()])
    ax.loglog(a.clamp_min(1e-12), b.clamp_min(1e-12), ".", alpha=0.5)
    ax.set_xlabel("GGN (true Fisher) diagonal")
    ax.set_ylabel("empirical Fisher diagonal")
    ax.set_title("diagonal Fisher: true vs empirical")
    ax2.semilogy(density.grid, density.density.clamp_min(1e-12))
    ax2.set_xlabel("Hessian eigenvalue")
    ax2.set_ylabel("density (SLQ, 1 probe)")
    ax2.set_title("Hessian spectral density")
    fig.tight_layout()
    fig.savefig(args.out / "fisher_diagonals.png", dpi=120)
    print(f"wrote {args.out / 'fisher_diagonals.png'}")


if __name__ == "__main__":
    main()
