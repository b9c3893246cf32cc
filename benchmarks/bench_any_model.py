"""Any model: each quantity and backend as a ratio to a plain forward+backward, with peak memory.

Workloads W4 (tiny GPT: token + position embeddings, LayerNorm, causal SDPA, GELU, a head tied to
the embedding, padded targets with ``ignore_index``) and W2 (small CNN) of shared/BENCHMARKS.md.
Every ratio is the median over interleaved rounds of the ratio within the round. Peak memory
(CPU) is measured per quantity in a fresh process: the peak resident set size during the call
above the resident size before it, after one plain forward+backward, on Linux (CUDA: see below).

Also: one Hessian-vector product through ``curvature_operator`` against a plain double backward
on one graph, and the top-5 Hessian eigenvalues (error against the reference values of
BENCHMARKS.md, products, time) against hessian-eigenthings 1.0's Lanczos at 40 steps when it is
installed (``pip install hessian-eigenthings``; not a dependency of curvlab).

Run: ``python benchmarks/bench_any_model.py [--device cuda] [--autocast bf16] [--workloads W4 W2]
[--rounds 15] [--no-memory] [--no-eigen]``.

On a GPU (``--device cuda``): every timed call is bracketed by ``torch.cuda.synchronize()``; peak
memory is measured in this process (``torch.cuda.max_memory_allocated`` during one call above
``memory_allocated`` before it, after a plain forward+backward), not in a fresh process per row
(each would pay CUDA's start-up); TF32 is switched off (``torch.backends.cuda.matmul.allow_tf32``
and ``torch.backends.cudnn.allow_tf32``), so the eigenvalues are float32's and comparable with the
reference values.

``--autocast {none,bf16,fp16}``: the plain forward+backward and every quantity of the table run
inside ``torch.autocast(device_type, dtype)`` (curvlab's own passes switch it off, so the ratios
show what a call inside a user's autocast region costs against an autocast training pass). The
Hessian-vector product and the eigenvalues are float32 comparisons and are skipped then, as with
``--no-eigen``.

The last lines of each workload are ``SUMMARY | ...`` lines that ``benchmarks/gpu.sh`` collects.
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
from benchmarks._common import (
    add_device_args,
    cpu_peak_mib,
    cuda_peak_mib,
    in_autocast,
    precision,
    resolve_device,
    summary,
)
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
    "naive vmap(grad), empirical diagonal": lambda m, L, d: naive_vmap_diag(m, L, d),
}


def naive_vmap_diag(model: nn.Module, loss_fn: nn.Module, data: tuple[Tensor, Tensor]) -> dict:
    """What a user writes by hand: ``vmap(grad)`` of each sequence's (example's) NLL sum over the
    batch, squared and summed (the empirical Fisher diagonal up to its scale)."""
    X, y = data
    params = {k: p.detach() for k, p in model.named_parameters()}

    def nll(p: dict, x: Tensor, t: Tensor) -> Tensor:
        out = torch.func.functional_call(model, p, (x[None],))
        return nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), t.reshape(-1), ignore_index=-100, reduction="sum"
        )

    grads = torch.func.vmap(torch.func.grad(nll), in_dims=(None, 0, 0))(params, X, y)
    return {k: g.square().sum(0) for k, g in grads.items()}


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


def peak_memory(workload: str, label: str, device: str, amp: str = "none") -> float:
    """MiB above the plain forward+backward, measured in a fresh process."""
    proc = subprocess.run(
        [sys.executable, __file__, "--one", workload, label, "--device", device, "--autocast", amp],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    if proc.returncode != 0:
        return float("nan")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["mib"])


def one(workload: str, label: str, device: str, amp: str = "none") -> None:
    """Child process of :func:`peak_memory`: print the peak memory of one quantity."""
    torch.set_num_threads(2)
    model, loss_fn, data = build(workload, device)
    step = in_autocast(plain_step(model, loss_fn, data), device, amp)
    step()
    fn = step if label == "plain" else lambda: QUANTITIES[label](model, loss_fn, data)
    fn = in_autocast(fn, device, amp)
    # CPU (Linux): clear_refs resets the peak resident set size (VmHWM) to the current one, so
    # the peak of the call alone is measured, not the import's
    mib = cuda_peak_mib(fn) if device == "cuda" else cpu_peak_mib(fn)
    print(json.dumps({"mib": mib}))


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


def bench(
    name: str, device: str, rounds: int, memory: bool, amp: str = "none", eigs: bool = True
) -> None:
    torch.set_num_threads(2)
    model, loss_fn, data = build(name, device)
    labels = [q for q in QUANTITIES if q not in SKIP[name]]
    fns = {"plain": in_autocast(plain_step(model, loss_fn, data), device, amp)}
    backends = {}
    for q in labels:
        fns[q] = in_autocast(lambda q=q: QUANTITIES[q](model, loss_fn, data), device, amp)
        backends[q] = getattr(fns[q](), "backend", "?")
    r = interleaved(fns, rounds, device)
    params = sum(p.numel() for p in model.parameters())
    prec = precision(amp)
    print(
        f"\n## {name} ({params:,} parameters, {device}, {prec}): plain forward+backward "
        f"{r['plain_ms']:.2f} ms"
    )

    def mem(label: str) -> float:
        if not memory:
            return float("nan")
        if device == "cuda":  # in this process: a fresh one per row would pay CUDA's start-up
            return cuda_peak_mib(fns[label])
        return peak_memory(name, label, device, amp)

    mem_plain = mem("plain")
    print(f"| quantity | backend used | x forward+backward | peak MiB (plain: {mem_plain:.1f}) |")
    print("|---|---|---|---|")
    for q in labels:
        print(f"| {q} | {backends[q]} | {r[q]:.2f} | {mem(q):.1f} |")
    for q in SKIP[name]:
        print(f"| {q} | - | skipped (see the source) | - |")
    where = f"{name}, {device}, {prec}"
    for q in ("diag_fisher empirical (auto)", "kfac mc (auto)", "gradient_stats (auto)"):
        summary("bench_any_model", f"{q} / plain fwd+bwd [{where}]", r[q])
    naive = "naive vmap(grad), empirical diagonal"
    if naive in r:
        ratio = r["diag_fisher empirical (auto)"] / r[naive]
        print(f"\ndiag_fisher empirical (auto) / naive vmap(grad): {ratio:.2f}")
        summary(
            "bench_any_model", f"diag_fisher empirical / naive vmap(grad) [{where}]", ratio, 0.6
        )
    if not eigs or amp != "none":
        why = "--no-eigen" if not eigs else "float32 comparisons, not run under --autocast"
        print(f"\nHessian-vector product and eigenvalues skipped ({why})")
        return
    hvp = hvp_ratio(model, loss_fn, data, device, rounds)
    print(f"\none Hessian-vector product, curvature_operator / plain double backward: {hvp:.2f}")
    summary(
        "bench_any_model", f"one HVP, curvature_operator / plain double backward [{where}]", hvp
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
    summary(
        "bench_any_model",
        f"top-5 eigenvalues, max rel. error vs reference ({e['curvlab_hvps']} HVPs, "
        f"{e['curvlab_s']:.2f} s) [{where}]",
        e["curvlab_err"],
        unit="",
    )
    if "he_s" in e:
        print(
            f"hessian-eigenthings Lanczos, 40 steps: {e['he_s']:.2f} s, max rel. error "
            f"{e['he_err']:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["W4", "W2"], choices=["W4", "W2"])
    add_device_args(parser)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--no-eigen", action="store_true", help="skip the HVP and eigenvalue comparisons"
    )
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "LABEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve_device(args.device).type
    if device == "cuda":  # float32 products: comparable with the reference eigenvalues
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.one:
        one(args.one[0], args.one[1], device, args.autocast)
        return
    for name in args.workloads:
        bench(name, device, args.rounds, not args.no_memory, args.autocast, not args.no_eigen)


if __name__ == "__main__":
    main()
