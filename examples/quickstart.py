"""Quick start: every curvature quantity of curvlab on a small classifier, printed and plotted.

Run: ``python examples/quickstart.py --out examples/output/quickstart``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import curvlab as cl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("examples/output/quickstart"))
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

    emp = cl.diag_fisher(model, loss_fn, batches, kind="empirical")
    ggn = cl.diag_fisher(model, loss_fn, batches, kind="exact")
    hess = cl.diag_hessian(model, loss_fn, batches)
    for name in emp:
        print(
            f"{name:10s} sum diag: empirical F {emp[name].sum():.4f}  GGN {ggn[name].sum():.4f}  "
            f"Hessian {hess[name].sum():.4f}"
        )
    stats = cl.gradient_stats(model, loss_fn, batches)
    print(f"gradient noise scale B_simple = {stats.noise_scale:.1f}")
    for layer, s in stats.layers.items():
        print(
            f"  layer {layer}: tr(cov) {s.trace_covariance:.3e}  |g| {s.grad_norm:.3e}  SNR {s.snr:.3e}"
        )
    norms = cl.fisher_norms(model, loss_fn, batches, kind="empirical")
    print(f"||F||_F = {norms.frobenius:.4f}, ||diag F||_F = {norms.diag_frobenius:.4f}")
    factors = cl.kfac(model, loss_fn, batches, kind="exact")
    for layer, f in factors.items():
        print(f"K-FAC {layer}: A {tuple(f.A.shape)}, G {tuple(f.G.shape)}")

    if hasattr(cl, "trace"):
        tr = cl.trace(model, loss_fn, batches, matrix="hessian", method="hutch++", seed=0)
        print(f"Tr(H) = {tr.value:.4f} +- {tr.stderr:.4f} ({tr.num_matvecs} products)")
        top = cl.eigenvalues(model, loss_fn, batches, k=3, tol=1e-6)
        print("top Hessian eigenvalues:", [round(float(v), 5) for v in top.values])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    a = torch.cat([v.flatten() for v in ggn.values()])
    b = torch.cat([v.flatten() for v in emp.values()])
    ax.loglog(a.clamp_min(1e-12), b.clamp_min(1e-12), ".", alpha=0.5)
    ax.set_xlabel("GGN (true Fisher) diagonal")
    ax.set_ylabel("empirical Fisher diagonal")
    ax.set_title("diagonal Fisher: true vs empirical")
    fig.tight_layout()
    fig.savefig(args.out / "fisher_diagonals.png", dpi=120)
    print(f"wrote {args.out / 'fisher_diagonals.png'}")


if __name__ == "__main__":
    main()
