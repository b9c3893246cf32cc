"""Any model: each quantity and backend as a ratio to a plain forward+backward, with peak memory.

Workloads W4 (tiny GPT: token + position embeddings, LayerNorm, causal SDPA, GELU, a head tied to
the embedding, padded targets with ``ignore_index``) and W2 (small CNN) of shared/BENCHMARKS.md.
Every ratio is the median over interleaved rounds of the ratio within the round. Peak memory is
measured per quantity in a fresh process (CPU: the peak resident set size during the call above
the resident size before it, after one plain forward+backward, on Linux; CUDA: ``torch.cuda.max_memory_allocated`` above the same point).

Also: one Hessian-vector product through ``curvature_operator`` against a plain double backward
on one graph, and the top-5 Hessian eigenvalues (error against the reference values of
BENCHMARKS.md, products, time) against hessian-eigenthings 1.0's Lanczos at 40 steps when it is
installed (``pip install hessian-eigenthings``; not a dependency of curvlab).

Run: ``python benchmarks/bench_any_model.py [--device cuda] [--workloads W4 W2] [--no-memory]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import curvlab as cl
from benchmarks.workloads import w2_cnn, w4_gpt

REFERENCE_TOP5 = {
    "W4": [5.669972, 5.263085, 4.894871, 4.605016, 4.390922],
    "W2": [8.178071, 6.124337, 4.838595, 4.094037, 3.563313],
}

# (label, backend) -> call; every call computes on the workload's one batch
QUANTITIES: dict[str, Callable] = {
    "diag_fisher empirical (auto)": lambda m, L, d: cl.diag_fisher(m, L, d),
    "diag_fisher empirical (func)": lambda m, L, d: cl.diag_fisher(m, L, d, backend="func"),
    "diag_fisher mc (auto)": lambda m, L, d: cl.diag_fisher(m, L, d, kind="mc"),
    "diag_fisher mc (func)": lambda m, L, d: cl.diag_fisher(m, L, d, kind="mc", backend="func"),
    "gradient_stats (auto)": lambda m, L, d: cl.gradient_stats(m, L, d),
    "gradient_stats (func)": lambda m, L, d: cl.gradient_stats(m, L, d, backend="func"),
    "kfac mc (auto)": lambda m, L, d: cl.kfac(m, L, d, kind="mc"),
    "fisher_norms empirical (auto)": lambda m, L, d: cl.fisher_norms(m, L, d),
    "diag_fisher exact (auto)": lambda m, L, d: cl.diag_fisher(m, L, d, kind="exact"),
}
SKIP = {
    # the exact GGN diagonal of W4 needs one vector-Jacobian product per output entry of each
    # sequence (32 positions x 256 classes): 131,072 products; see docs/models.md
    "W4": {"diag_fisher exact (auto)"},
    "W2": set(),
}


def build(name: str, device: str) -> tuple[nn.Module, nn.Module, tuple[Tensor, Tensor]]:
    model, loss_fn, (X, y) = w4_gpt() if name == "W4" else w2_cnn()
    return model.to(device), loss_fn, (X.to(device), y.to(device))


def plain_step(model: nn.Module, loss_fn: nn.Module, data: tuple[Tensor, Tensor]) -> Callable:
    """What a training loop runs: forward, the loss on flattened logits, backward."""
    X, y = data

    def run() -> None:
        model.zero_grad(set_to_none=True)
        out = model(X)
        loss_fn(out.reshape(-1, out.shape[-1]) if out.ndim == 3 else out, y.reshape(-1)).backward()

    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable], rounds: int, device: str) -> dict[str, float]:
    """Median over rounds of each function's time relative to ``fns['plain']`` in that round."""
    for f in fns.values():  # warm up (vmap and allocator caches)
        f()
        f()
    ratios: dict[str, list[float]] = {k: [] for k in fns}
    base: list[float] = []
    for _ in range(rounds):
        times = {}
        for k, f in fns.items():
            sync(device)
            start = time.perf_counter()
            f()
            sync(device)
            times[k] = time.perf_counter() - start
        base.append(times["plain"])
        for k in fns:
            ratios[k].append(times[k] / times["plain"])
    out = {k: statistics.median(v) for k, v in ratios.items()}
    out["plain_ms"] = statistics.median(base) * 1e3
    return out


def peak_memory(workload: str, label: str, device: str) -> float:
    """MiB above the plain forward+backward, measured in a fresh process."""
    proc = subprocess.run(
        [sys.executable, __file__, "--one", workload, label, "--device", device],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    if proc.returncode != 0:
        return float("nan")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["mib"])


def one(workload: str, label: str, device: str) -> None:
    """Child process of :func:`peak_memory`: print the peak memory of one quantity."""
    torch.set_num_threads(2)
    model, loss_fn, data = build(workload, device)
    step = plain_step(model, loss_fn, data)
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
        (step if label == "plain" else lambda: QUANTITIES[label](model, loss_fn, data))()
        torch.cuda.synchronize()
        mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the
        # current one, so the peak of the call alone is measured, not the import's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        (step if label == "plain" else lambda: QUANTITIES[label](model, loss_fn, data))()
        mib = max(_status_kib("VmHWM") - before, 0) / 1024
    print(json.dumps({"mib": mib}))


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``: resident now, ``VmHWM``: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def hvp_ratio(model: nn.Module, loss_fn: nn.Module, data, device: str, rounds: int) -> float:
    """One product through curvature_operator against a plain double backward on one graph."""
    X, y = data
    op = cl.curvature_operator(model, loss_fn, data, matrix="hessian")
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = model(X)
        loss = loss_fn(out.reshape(-1, out.shape[-1]) if out.ndim == 3 else out, y.reshape(-1))
        grads = torch.autograd.grad(loss, params, create_graph=True)
    sizes = [p.numel() for p in params]
    parts = [t.view_as(p) for t, p in zip(v.split(sizes), params)]

    def plain() -> None:
        torch.autograd.grad(grads, params, parts, retain_graph=True)

    r = interleaved({"plain": plain, "op": lambda: op.matvec(v)}, rounds, device)
    return r["op"]


def eigen(
    model: nn.Module, loss_fn: nn.Module, data, ref: list[float], device: str, reps: int = 5
) -> dict:
    """curvlab's top-5 (and hessian-eigenthings' Lanczos at 40 steps, if installed).

    Times are medians over ``reps`` interleaved repetitions (curvlab, then hessian-eigenthings).
    """
    try:
        import hessian_eigenthings as he
    except ImportError:
        he = None
    X, y = data

    def loss_of(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        o = m(batch[0])
        return loss_fn(o.reshape(-1, o.shape[-1]) if o.ndim == 3 else o, batch[1].reshape(-1))

    def ours():  # noqa: ANN202
        return cl.eigenvalues(model, loss_fn, data, k=5, tol=1e-4)

    def ours_values():  # noqa: ANN202  (stops when the values, not the vectors, meet tol)
        return cl.eigenvalues(model, loss_fn, data, k=5, tol=1e-4, criterion="eigenvalue")

    def theirs():  # noqa: ANN202
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            op = he.HessianOperator(model, [(X, y)], loss_of)
            return he.lanczos(op, k=5, max_iter=40, which="LA", seed=0)

    def timed(fn):  # noqa: ANN001, ANN202
        sync(device)
        start = time.perf_counter()
        res = fn()
        sync(device)
        return res, time.perf_counter() - start

    runs = {"curvlab": (ours, []), "curvlab_values": (ours_values, []), "he": (theirs, [])}
    if he is None:
        del runs["he"]
    for fn, _ in runs.values():
        fn()  # warm-up
    results = {}
    for _ in range(reps):
        for key, (fn, times) in runs.items():
            results[key], t = timed(fn)
            times.append(t)
    out: dict[str, object] = {}
    for key in ("curvlab", "curvlab_values"):
        res = results[key]
        vals = [float(v) for v in res.values]
        out[f"{key}_s"] = statistics.median(runs[key][1])
        out[f"{key}_err"] = max(abs(a - b) / abs(b) for a, b in zip(vals, ref))
        out[f"{key}_hvps"] = res.num_matvecs
    if "he" in runs:
        he_vals = sorted((float(v) for v in results["he"].eigenvalues), reverse=True)
        out["he_s"] = statistics.median(runs["he"][1])
        out["he_err"] = max(abs(a - b) / abs(b) for a, b in zip(he_vals, ref))
    return out


def bench(name: str, device: str, rounds: int, memory: bool) -> None:
    torch.set_num_threads(2)
    model, loss_fn, data = build(name, device)
    labels = [q for q in QUANTITIES if q not in SKIP[name]]
    fns = {"plain": plain_step(model, loss_fn, data)}
    backends = {}
    for q in labels:
        fns[q] = lambda q=q: QUANTITIES[q](model, loss_fn, data)
        backends[q] = getattr(QUANTITIES[q](model, loss_fn, data), "backend", "?")
    r = interleaved(fns, rounds, device)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n## {name} ({params:,} parameters, {device}): plain forward+backward {r['plain_ms']:.2f} ms"
    )
    mem_plain = peak_memory(name, "plain", device) if memory else float("nan")
    print(f"| quantity | backend used | x forward+backward | peak MiB (plain: {mem_plain:.1f}) |")
    print("|---|---|---|---|")
    for q in labels:
        mib = peak_memory(name, q, device) if memory else float("nan")
        print(f"| {q} | {backends[q]} | {r[q]:.2f} | {mib:.1f} |")
    for q in SKIP[name]:
        print(f"| {q} | - | skipped (see the source) | - |")
    print(
        f"\none Hessian-vector product, curvature_operator / plain double backward: "
        f"{hvp_ratio(model, loss_fn, data, device, rounds):.2f}"
    )
    e = eigen(model, loss_fn, data, REFERENCE_TOP5[name], device)
    for key, what in [("curvlab", "default"), ("curvlab_values", 'criterion="eigenvalue"')]:
        line = (
            f"top-5 Hessian eigenvalues, curvlab {what}: {e[key + '_hvps']} HVPs, "
            f"{e[key + '_s']:.2f} s, max rel. error {e[key + '_err']:.1e}"
        )
        if "he_s" in e:
            line += f"; time / hessian-eigenthings: {e[key + '_s'] / e['he_s']:.2f}"
        print(line)
    if "he_s" in e:
        print(
            f"hessian-eigenthings Lanczos, 40 steps: {e['he_s']:.2f} s, max rel. error "
            f"{e['he_err']:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["W4", "W2"], choices=["W4", "W2"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "LABEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], args.one[1], args.device)
        return
    for name in args.workloads:
        bench(name, args.device, args.rounds, not args.no_memory)


if __name__ == "__main__":
    main()
