"""Any model: each quantity and backend as a ratio to a plain forward+backward, with peak memory.

Workloads W4 (tiny GPT: token + position embeddings, LayerNorm, causal SDPA, GELU, a head tied to
the embedding, padded targets with ``ignore_index``) and W2 (small CNN) of shared/BENCHMARKS.md.
Every ratio is the median over interleaved rounds of the ratio within the round. Peak memory
(CPU) is measured per quantity in a fresh process: the peak resident set size during the call
above the resident size before it, after one plain forward+backward, on Linux, with
``MALLOC_MMAP_THRESHOLD_=131072`` in that process so that the memory the plain forward+backward
freed cannot hide the call's peak (``benchmarks/_common.py``; CUDA: see below).

Also: one Hessian-vector product through ``curvature_operator`` against a plain double backward
on one graph, and the top-5 Hessian eigenvalues (products, time, and the error against a float64
reference, :data:`REFERENCE_TOP5`) against hessian-eigenthings 1.0's Lanczos when it is installed
(``pip install hessian-eigenthings``; not a dependency of curvlab): at 40 steps (BENCHMARKS.md's
setting), its error beside curvlab's, and, from one 50-step run of its recurrence (seed 0), the
fewest steps at which it reaches 1e-4 and each curvlab run's accuracy, timed at that step count
too, so that the two libraries are also compared at the same accuracy.

Run: ``python benchmarks/bench_any_model.py [--device cuda] [--autocast bf16] [--workloads W4 W2]
[--rounds 15] [--no-memory] [--no-eigen] [--recompute-reference]``.

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
    CPU_PEAK_METHOD,
    add_device_args,
    cpu_memory_env,
    cpu_peak_mib,
    cuda_peak_mib,
    in_autocast,
    precision,
    resolve_device,
    summary,
)
from benchmarks.workloads import w2_cnn, w4_gpt

REFERENCE_TOP5 = {
    "W4": [5.6700988, 5.2630976, 4.8949145, 4.6050253, 4.3908692],
    "W2": [8.1780708, 6.1243370, 4.8385955, 4.0940375, 3.5633128],
}
"""Top-5 Hessian eigenvalues of the first batch, computed here in float64: the workload as
``benchmarks/workloads.py`` builds it, converted to float64 (model and float inputs), math SDPA,
products by double backward through one graph, ``scipy.sparse.linalg.eigsh(which="LA",
tol=1e-10, v0=ones)`` (:func:`float64_top5`; ``--recompute-reference`` runs it again). The same
run in float32 (eigsh tol 1e-8, from ones and from a random start, and in single-precision ARPACK)
agrees to 1e-6."""

BENCHMARKS_TOP5 = {
    "W4": [5.669972, 5.263085, 4.894871, 4.605016, 4.390922],
    "W2": [8.178071, 6.124337, 4.838595, 4.094037, 3.563313],
}
"""The reference values of shared/BENCHMARKS.md. W2's agree with :data:`REFERENCE_TOP5` to 1e-7;
W4's are 2.2e-5 (relative) off it, although the workload matches BENCHMARKS.md's definition
parameter for parameter (checked against a build written from its text: bitwise equal parameters
and logits), so errors are measured against the float64 values and this distance is printed."""

HE_STEPS = 40
"""hessian-eigenthings' Lanczos steps in BENCHMARKS.md's W4 row (its default, 10, is 97% off)."""

HE_SCAN = 50
"""Steps of the one run that gives hessian-eigenthings' error after every step count: its
``lanczos`` reorthogonalises fully up to 50 steps by default, so each prefix of this run is what
``lanczos(max_iter=m, seed=0)`` computes."""

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
    """CPU: MiB of one call's peak above the resident size before it, in a fresh process.

    The child runs with ``MALLOC_MMAP_THRESHOLD_`` set (:func:`benchmarks._common.cpu_memory_env`);
    a child that fails prints its last error line here and gives ``nan``.
    """
    proc = subprocess.run(
        [sys.executable, __file__, "--one", workload, label, "--device", device, "--autocast", amp],
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_memory_env(threads=2),
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  (peak memory of {label!r} failed: {last})", file=sys.stderr)
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
    # the peak of the call alone is measured, not the import's; MALLOC_MMAP_THRESHOLD_ (set by
    # peak_memory) keeps the memory the plain step above freed from hiding the call's peak
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


def rel_err(values: list[float], ref: list[float]) -> float:
    """Largest relative error of ``values`` (descending) against ``ref``."""
    return max(abs(a - b) / abs(b) for a, b in zip(values, ref))


def float64_top5(name: str, device: str) -> list[float]:
    """The top-5 Hessian eigenvalues of workload ``name`` in float64 (:data:`REFERENCE_TOP5`).

    The model and float inputs converted to float64, math SDPA, one graph kept for products by
    double backward, ``scipy.sparse.linalg.eigsh(which="LA", tol=1e-10, v0=ones)``; about 75
    products (W4: 10-15 s on 1-2 CPU threads).
    """
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    model, loss_fn, (X, y) = build(name, device)
    model = model.double()  # in place: the tied head keeps sharing the embedding's weight
    X = X.double() if X.is_floating_point() else X
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = model(X)
        loss = loss_fn(out.reshape(-1, out.shape[-1]) if out.ndim == 3 else out, y.reshape(-1))
        grads = torch.autograd.grad(loss, params, create_graph=True)
    sizes = [p.numel() for p in params]

    def matvec(v: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(v).ravel(), dtype=torch.float64, device=device)
        parts = [u.view_as(p) for u, p in zip(t.split(sizes), params)]
        hv = torch.autograd.grad(grads, params, parts, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).cpu().numpy()

    dim = sum(sizes)
    op = LinearOperator((dim, dim), matvec=matvec, dtype=np.float64)
    vals = eigsh(op, k=5, which="LA", tol=1e-10, v0=np.ones(dim))[0]
    return sorted((float(v) for v in vals), reverse=True)


def he_errors_by_steps(
    he: object, op: object, ref: list[float], steps: int = HE_SCAN
) -> dict[int, float]:
    """hessian-eigenthings' top-5 error after each step count ``m <= steps``, from one run.

    ``he.lanczos(op, k=5, max_iter=m, which="LA", seed=0)`` runs ``m`` steps of the recurrence
    from ``randn(n, generator seeded 0)`` with full reorthogonalisation (its default up to 50
    steps) and returns the top eigenvalues of the ``m x m`` tridiagonal matrix: the leading
    block of this ``steps``-step run's matrix, decomposed as there (``torch.linalg.eigh`` in the
    operator's dtype), so the errors are those of its ``lanczos`` calls.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0)
    v0 = torch.randn(op.size, dtype=op.dtype, generator=gen).to(op.device)
    td = he.lanczos_tridiagonal(op, v0, steps, reorthogonalize=True)
    alphas, betas = td.alphas, td.betas
    errors = {}
    for m in range(5, alphas.shape[0] + 1):
        tri = torch.zeros(m, m, dtype=alphas.dtype, device=alphas.device)
        tri.diagonal().copy_(alphas[:m])
        tri.diagonal(1).copy_(betas[: m - 1])
        tri.diagonal(-1).copy_(betas[: m - 1])
        # eigh, as hessian-eigenthings calls it: in float32, eigvalsh's values differ by up to 1e-6
        theta = torch.linalg.eigh(tri)[0].flip(0)[:5]
        errors[m] = rel_err([float(x) for x in theta], ref)
    return errors


def fewest_steps(errors: dict[int, float], target: float) -> int | None:
    """The fewest steps whose error is at or below ``target`` (None: none of them)."""
    return next((m for m in sorted(errors) if errors[m] <= target), None)


def eigen(
    model: nn.Module, loss_fn: nn.Module, data, ref: list[float], device: str, reps: int = 5
) -> dict:
    """curvlab's top-5 against hessian-eigenthings' Lanczos (if installed), errors against ``ref``.

    hessian-eigenthings runs at :data:`HE_STEPS` steps and at the fewest steps (at most
    :data:`HE_SCAN`) at which it reaches each curvlab run's accuracy, found from one untimed
    :data:`HE_SCAN`-step run (:func:`he_errors_by_steps`). Times are medians over ``reps``
    interleaved repetitions.
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

    def theirs(steps: int):  # noqa: ANN202
        def run():  # noqa: ANN202
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                op = he.HessianOperator(model, [(X, y)], loss_of)
                return he.lanczos(op, k=5, max_iter=steps, which="LA", seed=0)

        return run

    def timed(fn):  # noqa: ANN001, ANN202
        sync(device)
        start = time.perf_counter()
        res = fn()
        sync(device)
        return res, time.perf_counter() - start

    out: dict[str, object] = {}
    for key, fn in (("curvlab", ours), ("curvlab_values", ours_values)):
        res = fn()  # warm-up, and the accuracy that hessian-eigenthings is matched to
        out[f"{key}_err"] = rel_err([float(v) for v in res.values], ref)
        out[f"{key}_hvps"] = res.num_matvecs
    runs = {"curvlab": ours, "curvlab_values": ours_values}
    if he is not None:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            errors = he_errors_by_steps(he, he.HessianOperator(model, [(X, y)], loss_of), ref)
        out["he_best"] = min(errors.items(), key=lambda kv: kv[1])
        out["he_steps_1e-4"] = fewest_steps(errors, 1e-4)
        runs[f"he{HE_STEPS}"] = theirs(HE_STEPS)
        for key in ("curvlab", "curvlab_values"):
            m = fewest_steps(errors, out[f"{key}_err"])
            out[f"he_steps_{key}"] = m
            if m is not None:
                runs.setdefault(f"he{m}", theirs(m))
        runs[f"he{HE_STEPS}"]()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    results = {}
    for _ in range(reps):
        for key, fn in runs.items():
            results[key], t = timed(fn)
            times[key].append(t)
    for key in runs:
        out[f"{key}_s"] = statistics.median(times[key])
    if he is not None:
        he_vals = sorted((float(v) for v in results[f"he{HE_STEPS}"].eigenvalues), reverse=True)
        out["he_err"] = rel_err(he_vals, ref)
        scanned = errors.get(HE_STEPS)
        out["he_scan_agrees"] = (
            scanned is not None and abs(scanned - out["he_err"]) <= 0.1 * out["he_err"] + 1e-9
        )
    return out


def print_eigen(e: dict, name: str, ref_note: str, where: str) -> None:
    """The eigenvalue lines of :func:`bench` and their SUMMARY lines."""
    print(f"top-5 Hessian eigenvalues (tol=1e-4), errors against {ref_note}:")
    he_s = e.get(f"he{HE_STEPS}_s")
    for key, what in [("curvlab", "default"), ("curvlab_values", 'criterion="eigenvalue"')]:
        line = (
            f"  curvlab {what}: {e[key + '_hvps']} HVPs, {e[key + '_s']:.2f} s, max rel. error "
            f"{e[key + '_err']:.1e}"
        )
        if he_s:
            line += (
                f"; time / hessian-eigenthings at {HE_STEPS} steps (error {e['he_err']:.1e}): "
                f"{e[key + '_s'] / he_s:.2f}"
            )
        print(line)
    summary(
        "bench_any_model",
        f"top-5 eigenvalues, max rel. error vs float64 reference ({e['curvlab_hvps']} HVPs, "
        f"{e['curvlab_s']:.2f} s) [{where}]",
        e["curvlab_err"],
        unit="",
    )
    if he_s is None:
        print("  hessian-eigenthings not installed: no comparison")
        return
    print(
        f"  hessian-eigenthings Lanczos, {HE_STEPS} steps (BENCHMARKS.md's setting), seed 0: "
        f"{HE_STEPS} HVPs, {he_s:.2f} s, max rel. error {e['he_err']:.1e}"
    )
    n1 = e["he_steps_1e-4"]
    best_m, best = e["he_best"]
    print(
        "  hessian-eigenthings (seed 0) error <= 1e-4 first at "
        + (f"{n1} steps" if n1 else f"no step count <= {HE_SCAN}")
        + f"; its smallest error in {HE_SCAN} steps: {best:.1e} at {best_m}"
    )
    for key, what in [("curvlab", "default"), ("curvlab_values", 'criterion="eigenvalue"')]:
        m = e[f"he_steps_{key}"]
        acc = e[f"{key}_err"]
        if m is None:
            print(
                f"  at curvlab {what}'s accuracy ({acc:.1e}): hessian-eigenthings does not get "
                f"there in {HE_SCAN} steps (its best: {best:.1e}), so the ratio above compares "
                "curvlab at the better accuracy"
            )
            continue
        ratio = e[f"{key}_s"] / e[f"he{m}_s"]
        print(
            f"  at curvlab {what}'s accuracy ({acc:.1e}): hessian-eigenthings needs {m} steps, "
            f"{e[f'he{m}_s']:.2f} s; time curvlab / hessian-eigenthings at the same accuracy: "
            f"{ratio:.2f}"
        )
        summary(
            "bench_any_model",
            f"top-5 eigenvalues, curvlab {what} / hessian-eigenthings at its accuracy "
            f"({e[key + '_hvps']} HVPs vs {m} steps) [{where}]",
            ratio,
        )
    if not e["he_scan_agrees"]:
        print(
            f"  NOTE: the {HE_SCAN}-step scan's error at {HE_STEPS} steps differs from the timed "
            f"{HE_STEPS}-step run's: its step counts above may be off by a step or two"
        )


def bench(
    name: str,
    device: str,
    rounds: int,
    memory: bool,
    amp: str = "none",
    eigs: bool = True,
    reference: list[float] | None = None,
) -> None:
    """One workload's table, its HVP and eigenvalue lines (``reference``: computed in the run)."""
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

    if memory:
        print(
            "peak MiB: "
            + (
                "CUDA peak: torch.cuda.max_memory_allocated during one call above "
                "memory_allocated before it, in this process, after the timed rounds"
                if device == "cuda"
                else CPU_PEAK_METHOD + ", after one plain forward+backward in that process"
            )
        )
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
    ref = reference if reference is not None else REFERENCE_TOP5[name]
    off = rel_err(BENCHMARKS_TOP5[name], ref)
    ref_note = (
        f"the float64 reference ({'computed in this run' if reference else 'REFERENCE_TOP5'}; "
        f"BENCHMARKS.md's values are {off:.1e} from it)"
    )
    e = eigen(model, loss_fn, data, ref, device)
    print_eigen(e, name, ref_note, where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["W4", "W2"], choices=["W4", "W2"])
    add_device_args(parser)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--no-eigen", action="store_true", help="skip the HVP and eigenvalue comparisons"
    )
    parser.add_argument(
        "--recompute-reference",
        action="store_true",
        help="compute the float64 top-5 reference in this run (scipy eigsh; W4 about 15 s) "
        "instead of taking REFERENCE_TOP5, and print both",
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
        reference = None
        if args.recompute_reference and not args.no_eigen and args.autocast == "none":
            torch.set_num_threads(2)
            reference = float64_top5(name, device)
            print(
                f"\n{name}: float64 top-5 computed in this run "
                + ", ".join(f"{v:.7f}" for v in reference)
                + f"; REFERENCE_TOP5 {rel_err(REFERENCE_TOP5[name], reference):.1e} from it, "
                f"BENCHMARKS.md's {rel_err(BENCHMARKS_TOP5[name], reference):.1e}"
            )
        bench(
            name,
            device,
            args.rounds,
            not args.no_memory,
            args.autocast,
            not args.no_eigen,
            reference,
        )


if __name__ == "__main__":
    main()
