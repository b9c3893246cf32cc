"""W5 (GPT-2 small, 124M parameters): time and extra peak memory of each curvlab call.

Workload W5 of shared/BENCHMARKS.md: HF ``GPT2LMHeadModel(GPT2Config(n_positions=128))`` in eval
mode, random init after ``torch.manual_seed(0)``, ``ids = torch.randint(0, 50257, (4, 64))``,
labels = ids with the first 8 positions of each row -100, ``CrossEntropyLoss()`` on the logits
``(4, 64, 50257)`` (GPT layout; a cost benchmark, the labels are not shifted). Every call runs in
its own process (``--one NAME``), so its peak resident memory is its own; "extra" is that peak
minus the peak of a process that runs the plain forward+backward. Times are one call, the first
of its process (cold: one-time costs of a first call, such as touching fresh memory and setting
up what the plain pass did not use, are included; on a GPU it follows one warm-up
forward+backward, for CUDA's start-up), against the plain
forward+backward's median of 3 after one warm-up (warm); the printed header says so. Every row's
ratio (the naive loop's and hessian-eigenthings' too) therefore includes those first-call costs;
one call per process is BENCHMARKS.md's rule for W5, so that each peak is the call's own.

Rows: the one-pass quantities, a naive per-sequence ``torch.func.grad`` loop (what a user writes
by hand for the empirical diagonal), K-FAC (which refuses from shapes, before any pass: the tied
head's 50,257² factor is 10 GB), one Hessian-vector product, Hutchinson's trace (10 probes),
stochastic Lanczos quadrature (20 steps) and the top-1 and top-5 eigenvalues (tol 1e-3); with
hessian-eigenthings installed (not a dependency), its Lanczos at k=1 and 20 steps.

Run: ``python benchmarks/bench_scale.py [--only NAME ...] [--device cuda]`` (about 20 minutes on 2
CPU cores). ``--device cuda`` runs W5's GPU shape, 8 x 1024 tokens (``n_positions=1024``), and
reports the peak allocated GPU memory (not yet run: no GPU was lent to the sessions so far).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

CALLS = [
    "plain",
    "diag_fisher_empirical",
    "naive_func_grad",
    "diag_fisher_mc",
    "gradient_stats",
    "fisher_norms",
    "kfac_mc",
    "hvp",
    "trace_hutchinson_10",
    "spectral_density_20",
    "eigenvalues_k1",
    "eigenvalues_k5",
    "he_lanczos_k1",
]

# rows whose cost is counted in products on the kept graph (the hvp row's product_s)
PRODUCT_ROWS = (
    "trace_hutchinson_10",
    "spectral_density_20",
    "eigenvalues_k1",
    "eigenvalues_k5",
    "he_lanczos_k1",
)


SHAPES = {"cpu": (4, 64, 128), "cuda": (8, 1024, 1024)}
"""Sequences, tokens and ``n_positions`` of W5 per device (BENCHMARKS.md: 4 x 64 on a CPU, 8 x 1024
on a GPU)."""


def w5(
    device: str = "cpu",
) -> tuple[nn.Module, nn.Module, tuple[dict[str, torch.Tensor], torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    n, t, positions = SHAPES[device]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=positions)).eval()
    ids = torch.randint(0, 50257, (n, t))
    labels = ids.clone()
    labels[:, :8] = -100
    model.to(device)
    return model, nn.CrossEntropyLoss(), ({"input_ids": ids.to(device)}, labels.to(device))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float:
    """This process's peak: resident memory on a CPU, allocated GPU memory on a GPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def run_one(name: str, threads: int = 2, device: str = "cpu") -> dict:
    import curvlab as cl

    torch.set_num_threads(threads)
    model, lf, data = w5(device)
    (inputs, labels) = data

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        out = model(**inputs).logits
        lf(out.flatten(0, 1), labels.flatten()).backward()

    info: dict = {}
    if name == "plain":
        plain()
        times = []
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            plain()
            _sync(device)
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        elapsed = statistics.median(times)
    else:
        if device == "cuda":  # CUDA's and cuBLAS's start-up outside the timed call
            plain()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        if name == "diag_fisher_empirical":
            cl.diag_fisher(model, lf, data)
        elif name == "diag_fisher_mc":
            cl.diag_fisher(model, lf, data, kind="mc", seed=0)
        elif name == "gradient_stats":
            cl.gradient_stats(model, lf, data)
        elif name == "fisher_norms":
            cl.fisher_norms(model, lf, data)
        elif name == "kfac_mc":
            try:
                cl.kfac(model, lf, data, kind="mc", seed=0)
            except (ValueError, MemoryError) as e:
                info["refused"] = str(e).splitlines()[0][:160]
        elif name == "naive_func_grad":
            from torch.func import functional_call, grad

            params = {k: p.detach() for k, p in model.named_parameters()}
            total = {k: torch.zeros_like(p) for k, p in params.items()}

            def loss_of(p: dict, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                out = functional_call(model, p, (), {"input_ids": ids}).logits
                return nn.functional.cross_entropy(out[0], y[0], reduction="sum")

            g_fn = grad(loss_of)
            for i in range(labels.shape[0]):
                g = g_fn(params, inputs["input_ids"][i : i + 1], labels[i : i + 1])
                for k in total:
                    total[k].add_(g[k].square())
        elif name == "hvp":
            op = cl.curvature_operator(model, lf, data)
            v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0)).to(device)
            op @ v
        elif name == "trace_hutchinson_10":
            r = cl.trace(model, lf, data, num_probes=10, seed=0)
            info["matvecs"] = r.num_matvecs
        elif name == "spectral_density_20":
            r = cl.spectral_density(model, lf, data, num_steps=20, seed=0)
        elif name == "eigenvalues_k1":
            r = cl.eigenvalues(model, lf, data, k=1, tol=1e-3, seed=0)
            info["matvecs"], info["values"] = r.num_matvecs, [float(x) for x in r.values]
        elif name == "eigenvalues_k5":
            r = cl.eigenvalues(model, lf, data, k=5, tol=1e-3, seed=0)
            info["matvecs"], info["values"] = r.num_matvecs, [float(x) for x in r.values]
        elif name == "he_lanczos_k1":  # hessian-eigenthings 1.0 (not a dependency), 20 steps
            import hessian_eigenthings as he

            def loss_of(m: nn.Module, batch: tuple) -> torch.Tensor:
                logits = m(input_ids=batch[0]).logits
                return lf(logits.flatten(0, 1), batch[1].flatten())

            from torch.nn.attention import SDPBackend, sdpa_kernel

            # its double backward needs the math attention kernel (curvlab switches it itself)
            with sdpa_kernel(SDPBackend.MATH):
                op = he.HessianOperator(model, [(inputs["input_ids"], labels)], loss_of)
                res = he.lanczos(op, k=1, max_iter=20, which="LA", seed=0)
            info["values"] = [float(x) for x in res.eigenvalues]
        else:
            raise ValueError(name)
        _sync(device)
        elapsed = time.perf_counter() - t0
        if name == "hvp":  # the unit of the estimator rows: a product on the kept graph
            again = []
            for _ in range(2):
                _sync(device)
                t1 = time.perf_counter()
                op @ v
                _sync(device)
                again.append(time.perf_counter() - t1)
            info["product_s"] = round(statistics.median(again), 3)
    return {"name": name, "seconds": elapsed, "peak_gib": _peak_gib(device), **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=CALLS, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--device",
        choices=sorted(SHAPES),
        default="cpu",
        help="cpu: 4 x 64 tokens, peak resident memory; cuda: 8 x 1024 tokens (n_positions "
        "1024), peak allocated GPU memory",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.one:
        print(json.dumps(run_one(args.one, args.threads, args.device)))
        return
    names = args.only or [
        c for c in CALLS if c != "he_lanczos_k1" or importlib.util.find_spec("hessian_eigenthings")
    ]
    if "plain" not in names:
        names = ["plain", *names]
    rows = {}
    for name in names:
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                name,
                "--threads",
                str(args.threads),
                "--device",
                args.device,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            rows[name] = {"name": name, "error": done.stderr.strip().splitlines()[-1][:200]}
        else:
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {name}: {rows[name]}", flush=True)
    base = rows["plain"]
    n, t, _ = SHAPES[args.device]
    where = f"CPU, {args.threads} thread(s)" if args.device == "cpu" else "CUDA"
    print(
        f"\nW5 GPT-2 small, {n} x {t} tokens, {where}; plain forward+backward "
        f"{base['seconds']:.2f} s, peak {base['peak_gib']:.2f} GiB"
    )
    print(
        "times: each call is the first call of its own process (cold"
        + (
            ", after a warm-up forward+backward for CUDA's start-up"
            if args.device == "cuda"
            else ""
        )
        + "); the plain forward+backward is the median of 3 calls after one warm-up (warm). "
        "Peaks: "
        + (
            "torch.cuda.max_memory_allocated of the process"
            if args.device == "cuda"
            else "the process's peak resident set size (ru_maxrss), model and data included"
        )
        + "; extra = the call's peak minus the plain forward+backward's"
    )
    print("| call | seconds | x forward+backward | extra peak GiB | notes |")
    print("|---|---|---|---|---|")
    for name in names:
        r = rows[name]
        if "error" in r:
            print(f"| {name} | - | - | - | failed: {r['error']} |")
            continue
        keys = ("matvecs", "values", "refused", "product_s")
        notes = [f"{k}={r[k]}" for k in keys if k in r]
        unit = rows.get("hvp", {}).get("product_s")
        if unit and name in PRODUCT_ROWS:
            notes.append(f"{r['seconds'] / unit:.1f} product-times")
        print(
            f"| {name} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f} | "
            f"{r['peak_gib'] - base['peak_gib']:+.2f} | {', '.join(notes)} |"
        )


if __name__ == "__main__":
    main()
