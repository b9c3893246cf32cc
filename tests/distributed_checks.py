"""What each spawned process of tests/test_distributed.py checks (gloo, CPU, one thread each).

Every rank holds an uneven shard (two uneven batches) of one data set and a DDP-wrapped copy of one
model; it compares curvlab's distributed results with the single-process result on all the data,
computed locally (``process_group="local"``). Failures are collected, not raised, so that every rank
keeps issuing the same collectives; each rank writes its list to ``out/rank<r>.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

import curvlab as cl
from curvlab.analysis._data_parallel import data_parallel_noise_scale, noise_scale_from_gradients
from curvlab.distributed import communication_stats
from curvlab.noise import DiagFisherNoise, FisherTraceNoise, KFACNoise, NoisyOptimizer

SIZES = {2: [9, 14], 3: [5, 8, 10], 4: [3, 5, 7, 8]}
RTOL, ATOL = 1e-6, 1e-9


def shard_bounds(world: int, rank: int) -> tuple[int, int]:
    sizes = SIZES[world]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def make_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    return model


def make_data(n: int, seed: int = 1, ignore: bool = False) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    if ignore:
        y[torch.arange(n) % 3 == 1] = -100
    return X, y


def batches(X: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Two uneven batches (or one for a single example)."""
    cut = max(1, (2 * X.shape[0]) // 3)
    out = [(X[:cut], y[:cut])]
    if cut < X.shape[0]:
        out.append((X[cut:], y[cut:]))
    return out


class Checker:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failures: list[str] = []
        self.count = 0

    def close(self, what: str, got: Any, want: Any, rtol: float = RTOL) -> None:
        self.count += 1
        try:
            _close(got, want, rtol)
        except AssertionError as exc:
            self.failures.append(f"rank {self.rank}: {what}: {exc}")

    def true(self, what: str, ok: bool, detail: str = "") -> None:
        self.count += 1
        if not ok:
            self.failures.append(f"rank {self.rank}: {what}: {detail}")

    def ref(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` (a one-process reference, ``process_group="local"``) computed on rank 0 once
        and sent to every rank; an error there is raised on every rank."""
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except Exception:  # noqa: BLE001 - re-raised on every rank below
                box[0] = ("error", traceback.format_exc())
        dist.broadcast_object_list(box, 0)
        status, value = box[0]
        if status == "error":
            raise RuntimeError(f"the reference failed on rank 0:\n{value}")
        return value

    def run(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - recorded, the other checks go on
            self.failures.append(f"rank {self.rank}: {what} raised:\n{traceback.format_exc()}")


def _close(got: Any, want: Any, rtol: float) -> None:
    if isinstance(want, dict):
        assert list(got) == list(want), f"keys {list(got)} != {list(want)}"
        for k in want:
            _close(got[k], want[k], rtol)
        return
    g = torch.as_tensor(got, dtype=torch.float64)
    w = torch.as_tensor(want, dtype=torch.float64)
    assert g.shape == w.shape, f"shape {tuple(g.shape)} != {tuple(w.shape)}"
    scale = float(w.abs().max()) if w.numel() else 0.0
    err = float((g - w).abs().max()) if w.numel() else 0.0
    assert err <= rtol * max(scale, 1e-12) + ATOL, f"max error {err:.3g} (scale {scale:.3g})"


def same_on_all_ranks(t: Tensor) -> bool:
    t = t.detach().double().reshape(-1)
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# --------------------------------------------------------------------------- the checks
LOCAL = {"process_group": "local"}


def _one_pass(
    c: Checker,
    label: str,
    loss_fn: nn.Module,
    ddp: nn.Module,
    inner: nn.Module,
    full: list,
    mine: list,
) -> None:
    def ref(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return c.ref(partial(fn, inner, loss_fn, full, *args, **kwargs, **LOCAL))

    names = [k for k, _ in inner.named_parameters()]
    for kind in ("empirical", "exact"):
        got = cl.diag_fisher(ddp, loss_fn, mine, kind=kind)
        c.close(f"{label} diag_fisher {kind}", got, ref(cl.diag_fisher, kind=kind))
        c.true(f"{label} diag_fisher keys", list(got) == names, str(list(got)))
    c.close(f"{label} diag_hessian", cl.diag_hessian(ddp, loss_fn, mine), ref(cl.diag_hessian))
    s, r = cl.gradient_stats(ddp, loss_fn, mine), ref(cl.gradient_stats)
    c.close(f"{label} gradient_stats mean", s.mean, r.mean)
    c.close(f"{label} gradient_stats variance", s.variance, r.variance)
    c.close(
        f"{label} noise_scale",
        [s.trace_covariance, s.noise_scale, s.num_examples],
        [r.trace_covariance, r.noise_scale, r.num_examples],
    )
    for kind in ("exact", "empirical"):
        k, kr = cl.kfac(ddp, loss_fn, mine, kind=kind), ref(cl.kfac, kind=kind)
        c.close(
            f"{label} kfac {kind} A",
            {m: f.A for m, f in k.items()},
            {m: f.A for m, f in kr.items()},
        )
        c.close(
            f"{label} kfac {kind} G",
            {m: f.G for m, f in k.items()},
            {m: f.G for m, f in kr.items()},
        )
    for kind in ("empirical", "exact"):
        fn, fr = cl.fisher_norms(ddp, loss_fn, mine, kind=kind), ref(cl.fisher_norms, kind=kind)
        c.close(
            f"{label} fisher_norms {kind}",
            [fn.frobenius, fn.diag_frobenius],
            [fr.frobenius, fr.diag_frobenius],
        )


def _products(
    model: nn.Module, loss_fn: nn.Module, data: Any, matrix: str, V: Tensor, **kw: Any
) -> tuple:
    op = cl.curvature_operator(model, loss_fn, data, matrix, **kw)
    return op @ V, op.matvec(V[:, 0])


def _operators(
    c: Checker,
    label: str,
    loss_fn: nn.Module,
    ddp: nn.Module,
    inner: nn.Module,
    full: list,
    mine: list,
) -> None:
    def ref(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return c.ref(partial(fn, inner, loss_fn, full, *args, **kwargs, **LOCAL))

    V = torch.randn(43, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for matrix in ("hessian", "ggn", "empirical_fisher"):
        got, want = _products(ddp, loss_fn, mine, matrix, V), ref(_products, matrix, V)
        c.close(f"{label} {matrix} product", got[0], want[0])
        c.close(f"{label} {matrix} matvec", got[1], want[1])
    estimators = ("exact", "hutchinson", "hutch++", "block", "ggn_cv")
    for method in estimators if label == "mean" else ("exact", "hutchinson"):
        t = cl.trace(ddp, loss_fn, mine, method=method, num_probes=9, seed=3)
        tr = ref(cl.trace, method=method, num_probes=9, seed=3)
        se = (t.stderr, tr.stderr) if method != "exact" else (0.0, 0.0)
        c.close(f"{label} trace {method}", [t.value, se[0]], [tr.value, se[1]])
    t = cl.trace(ddp, loss_fn, mine, matrix="ggn", method="exact")
    c.close(f"{label} trace ggn exact", t.value, ref(cl.trace, matrix="ggn", method="exact").value)
    e = cl.eigenvalues(ddp, loss_fn, mine, k=2, tol=1e-8)
    er = ref(cl.eigenvalues, k=2, tol=1e-8)
    c.true(f"{label} eigenvalues converged", bool(e.converged and er.converged))
    c.close(f"{label} eigenvalues", e.values, er.values)
    if label != "mean":  # the other estimators once (they share the products checked above)
        return
    d = cl.spectral_density(ddp, loss_fn, mine, num_steps=12, num_probes=2, seed=1)
    dr = ref(cl.spectral_density, num_steps=12, num_probes=2, seed=1)
    c.close(f"{label} density nodes", d.nodes, dr.nodes, rtol=1e-5)
    c.close(f"{label} density weights", d.weights, dr.weights, rtol=1e-5)


def _analysis(
    c: Checker,
    label: str,
    loss_fn: nn.Module,
    ddp: nn.Module,
    inner: nn.Module,
    full: list,
    mine: list,
) -> None:
    q = (
        "loss",
        "grad_norm",
        "trace_empirical_fisher",
        "noise_scale",
        "trace_hessian",
        "top_eigenvalues",
    )
    opts = {"quantities": q, "num_probes": 6, "k": 2, "on_error": "raise"}
    got = cl.analyze(ddp, loss_fn, mine, **opts).entries[0]["values"]
    want = c.ref(lambda: cl.analyze(inner, loss_fn, full, **opts, **LOCAL).entries[0]["values"])
    c.close(f"{label} analyze values", {k: got[k] for k in want}, want, rtol=1e-5)


def check_deterministic(c: Checker, world: int, rank: int) -> None:
    """Every deterministic quantity, operator product, exact trace and eigenvalue."""
    lo, hi = shard_bounds(world, rank)
    n = sum(SIZES[world])
    for label, loss_fn, ignore in (
        ("mean", nn.CrossEntropyLoss(), False),
        ("sum", nn.CrossEntropyLoss(reduction="sum"), False),
        ("ignore_index", nn.CrossEntropyLoss(), True),
    ):
        X, y = make_data(n, ignore=ignore)
        args = (label, loss_fn, nn.parallel.DistributedDataParallel(make_model()), make_model())
        args += (batches(X, y), batches(X[lo:hi], y[lo:hi]))
        c.run(f"{label} one-pass", lambda args=args: _one_pass(c, *args))
        c.run(f"{label} operators", lambda args=args: _operators(c, *args))
        if label == "mean":
            c.run(f"{label} analyze", lambda args=args: _analysis(c, *args))


def check_monte_carlo(c: Checker, world: int, rank: int) -> None:
    """MC Fisher diagonals are unbiased for the GGN diagonal; identical on every rank."""
    lo, hi = shard_bounds(world, rank)
    X, y = make_data(sum(SIZES[world]))
    inner = make_model()
    loss_fn = nn.CrossEntropyLoss()
    exact = float(
        sum(
            v.sum()
            for v in cl.diag_fisher(
                inner, loss_fn, (X, y), kind="exact", process_group="local"
            ).values()
        )
    )
    traces = []
    for seed in range(40):
        d = cl.diag_fisher(inner, loss_fn, (X[lo:hi], y[lo:hi]), kind="mc", seed=seed)
        traces.append(float(sum(v.sum() for v in d.values())))
    t = torch.tensor(traces, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(traces)))
    c.true(
        "mc diag unbiased",
        abs(float(t.mean()) - exact) <= 4 * se + 1e-9,
        f"{float(t.mean())} vs {exact} (se {se})",
    )
    c.true("mc diag identical on every rank", same_on_all_ranks(t))
    op = cl.curvature_operator(inner, loss_fn, (X[lo:hi], y[lo:hi]), "fisher", seed=0)
    c.true(
        "mc operator identical on every rank",
        same_on_all_ranks(op @ torch.ones(43, 1, dtype=torch.float64)),
    )
    # the sampled labels differ between ranks: identical shards give different label draws
    same = cl.curvature_operator(inner, loss_fn, (X[:6], y[:6]), "fisher", seed=0)
    labels = same.sampled_targets[0] if same.sampled_targets else None
    gathered = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(gathered, labels)
    c.true("mc labels differ per rank", any(not torch.equal(g, gathered[0]) for g in gathered[1:]))
    ft = cl.fisher_trace(inner, loss_fn, batches(X[lo:hi], y[lo:hi]), seed=0)
    c.true("fisher_trace identical on every rank", same_on_all_ranks(torch.tensor([ft.value])))
    c.true("fisher_trace counts all examples", ft.num_examples == len(X), str(ft.num_examples))
    c.true("fisher_trace gathers every batch", len(ft.per_batch) == 2 * world, str(ft.per_batch))


def check_noise_scale_dp(c: Checker, world: int, rank: int) -> None:
    """The data-parallel B_simple estimates of tr(Sigma) and ||G||^2 are unbiased."""
    X, y = make_data(20, seed=7)
    inner = make_model()
    loss_fn = nn.CrossEntropyLoss()
    ref = cl.gradient_stats(inner, loss_fn, (X, y), process_group="local")
    true_tr = ref.trace_covariance
    true_g2 = float(sum((m**2).sum() for m in ref.mean.values()))
    trs, g2s = [], []
    b = SIZES[world][rank]
    for trial in range(120):
        gen = torch.Generator().manual_seed(1000 * trial + rank)
        idx = torch.randint(0, 20, (b,), generator=gen)
        est = data_parallel_noise_scale(inner, loss_fn, (X[idx], y[idx]))
        trs.append(est.trace_covariance)
        g2s.append(est.grad_norm_sq)
    # the same estimate from gradients in hand (each rank's mean gradient before averaging)
    Xs, ys = X[idx], y[idx]
    grads = torch.autograd.grad(loss_fn(inner(Xs), ys), list(inner.parameters()))
    est = noise_scale_from_gradients(grads, b)
    c.close(
        "noise_scale_from_gradients",
        [est.trace_covariance, est.grad_norm_sq],
        [trs[-1], g2s[-1]],
    )
    for what, vals, truth in (("tr(Sigma)", trs, true_tr), ("|G|^2", g2s, true_g2)):
        t = torch.tensor(vals, dtype=torch.float64)
        se = float(t.std() / math.sqrt(len(vals)))
        c.true(
            f"dp noise scale {what} unbiased",
            abs(float(t.mean()) - truth) <= 4 * se,
            f"{float(t.mean())} vs {truth} (se {se})",
        )


def _noisy_run(c: Checker, label: str, sampler: Any, capture: bool, world: int, rank: int) -> None:
    lo, hi = shard_bounds(world, rank)
    loss_fn = nn.CrossEntropyLoss()
    ddp = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    noisy = NoisyOptimizer(opt, sampler, ddp, loss_fn, seed=11)

    def closure(Xs: Tensor, ys: Tensor) -> Tensor:
        noisy.zero_grad()
        loss = loss_fn(ddp(Xs), ys)
        loss.backward()
        return loss

    for step in range(10):
        X, y = make_data(sum(SIZES[world]), seed=50 + step)
        Xs, ys = X[lo:hi], y[lo:hi]
        before = {k: v.detach().clone() for k, v in ddp.module.named_parameters()}
        if capture:
            noisy.step(lambda Xs=Xs, ys=ys: closure(Xs, ys))
        else:
            closure(Xs, ys)
            noisy.step(inputs=Xs, targets=ys)
        if step == 0 and capture:  # the captured state is that of the global batch
            ref_model = make_model()
            with torch.no_grad():
                for k, p in ref_model.named_parameters():
                    p.copy_(before[k])
            ref = cl.diag_fisher(ref_model, loss_fn, (X, y), process_group="local")
            if isinstance(sampler, FisherTraceNoise):
                ref = sum(v.sum() for v in ref.values()) / sum(v.numel() for v in ref.values())
            c.close(f"noisy {label} state", noisy._state, ref)
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    c.true(f"noisy {label}: replicas bitwise identical after 10 steps", same_on_all_ranks(flat))


def check_noisy_optimizer(c: Checker, world: int, rank: int) -> None:
    """One noise draw for all ranks, curvature of the global batch: replicas stay identical."""
    for label, sampler, capture in (
        ("diag empirical (captured)", DiagFisherNoise("empirical", scale=0.3), True),
        ("diag mc (own pass)", DiagFisherNoise("mc", scale=0.3), False),
        ("fisher trace (captured)", FisherTraceNoise(scale=0.3), True),
    ):
        c.run(f"noisy {label}", lambda a=(label, sampler, capture): _noisy_run(c, *a, world, rank))
    model = make_model()
    try:
        NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), KFACNoise(scale=0.1), model, nn.MSELoss()
        )
        c.true("KFACNoise rejected under torch.distributed", False, "no error")
    except NotImplementedError as exc:
        c.true("KFACNoise error names the supported samplers", "DiagFisherNoise" in str(exc))
    # a sampler's sample(): the curvature of all shards, one draw: that of one process on all data
    lo, hi = shard_bounds(world, rank)
    X, y = make_data(sum(SIZES[world]), seed=9)
    ddp = nn.parallel.DistributedDataParallel(make_model())
    loss_fn = nn.CrossEntropyLoss()
    for sampler in (DiagFisherNoise("empirical", scale=0.3), FisherTraceNoise(scale=0.3)):
        got = sampler.sample(ddp, loss_fn, X[lo:hi], y[lo:hi], seed=4)
        want = sampler.sample(make_model(), loss_fn, X, y, seed=4, process_group="local")
        c.close(f"{type(sampler).__name__}.sample", got, want)
    try:
        KFACNoise(scale=0.1).sample(ddp, loss_fn, X[lo:hi], y[lo:hi])
        c.true("KFACNoise.sample rejected under torch.distributed", False, "no error")
    except NotImplementedError:
        c.true("KFACNoise.sample rejected under torch.distributed", True)


def check_diagnostics(c: Checker, world: int, rank: int, log_dir: Path) -> None:
    """Every rank measures its shard, all get the global values, rank 0 alone writes the log."""
    lo, hi = shard_bounds(world, rank)
    loss_fn = nn.CrossEntropyLoss()
    ddp = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    q = (
        "loss",
        "grad_norm",
        "trace_empirical_fisher",
        "noise_scale",
        "trace_fisher",
        "noise_scale_dp",
    )
    with cl.Diagnostics(
        ddp, loss_fn, quantities=q, every=2, log_dir=log_dir, on_error="raise"
    ) as diag:
        for step in range(4):
            X, y = make_data(sum(SIZES[world]), seed=80 + step)
            opt.zero_grad()
            loss_fn(ddp(X[lo:hi]), y[lo:hi]).backward()
            opt.step()
            ref = None
            if step % 2 == 0:
                ref = cl.analyze(
                    ddp.module,
                    loss_fn,
                    (X, y),
                    quantities=q[:4],
                    on_error="raise",
                    process_group="local",
                )
            rec = diag.step(step, X[lo:hi], y[lo:hi])
            if ref is not None:
                got = rec["values"]
                want = ref.entries[0]["values"]
                c.close(f"diagnostics step {step}", {k: got[k] for k in want}, want)
                c.true("diagnostics noise_scale_dp present", math.isfinite(got["noise_scale_dp"]))
    dist.barrier()
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    c.true("diagnostics: one log, written once", len(lines) == 2, f"{len(lines)} lines")
    c.true("diagnostics: only rank 0 writes", diag.writes == (rank == 0))


def check_groups(c: Checker, world: int, rank: int) -> None:
    """process_group= selects a group; "local" communicates nothing."""
    loss_fn = nn.CrossEntropyLoss()
    X, y = make_data(sum(SIZES[world]))
    lo, hi = shard_bounds(world, rank)
    inner = make_model()
    before = communication_stats()["calls"]
    got = cl.diag_fisher(inner, loss_fn, (X[lo:hi], y[lo:hi]), process_group="local")
    c.true("local: no collective", communication_stats()["calls"] == before)
    c.close(
        "local: this rank's shard",
        got,
        cl.diag_fisher(inner, loss_fn, (X[lo:hi], y[lo:hi]), process_group="local"),
    )
    members = [0, world - 1]
    sub = dist.new_group(members)
    if rank in members:
        union = torch.cat([torch.arange(*shard_bounds(world, r)) for r in members])
        got = cl.diag_fisher(inner, loss_fn, (X[lo:hi], y[lo:hi]), process_group=sub)
        c.close(
            "subgroup",
            got,
            cl.diag_fisher(inner, loss_fn, (X[union], y[union]), process_group="local"),
        )
    dist.barrier()


def check_fsdp(c: Checker) -> None:
    try:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(make_model())
    except Exception:  # noqa: BLE001 - FSDP2 on this CPU build unavailable: nothing to check
        return
    try:  # first-order quantities run under FSDP2 (tests/test_fsdp2.py); second order does not
        cl.diag_hessian(model, nn.CrossEntropyLoss(), make_data(4))
        c.true("FSDP rejected", False, "no error")
    except NotImplementedError as exc:
        c.true("FSDP error says what is supported", "first-order" in str(exc), str(exc))


# --------------------------------------------------------------------------- the worker
def check_review_cases(c: Checker, world: int, rank: int) -> None:
    """Two review findings: bfloat16 gradients give the noise scale of their float32 values
    (summed in bfloat16 |G|^2 came out a third low), and fisher_norms with a rank whose labels
    are all ignore_index equals one process on all the data (that rank raised alone and left
    the others waiting in the collective)."""
    inner = make_model()
    loss_fn = nn.CrossEntropyLoss()
    X, y = make_data(sum(SIZES[world]), seed=11)
    b = SIZES[world][rank]
    lo, hi = shard_bounds(world, rank)
    Xs, ys = X[lo:hi], y[lo:hi]
    grads = torch.autograd.grad(loss_fn(inner(Xs), ys), list(inner.parameters()))
    g16 = [g.bfloat16() for g in grads]
    est16 = noise_scale_from_gradients(g16, b)
    est32 = noise_scale_from_gradients([g.float() for g in g16], b)
    c.close(
        "bf16 gradients: the noise scale of their float32 values",
        [est16.trace_covariance, est16.grad_norm_sq],
        [est32.trace_covariance, est32.grad_norm_sq],
        rtol=1e-6,
    )
    Xa, ya = make_data(sum(SIZES[world]), seed=3)
    ya = ya.clone()
    ya[: SIZES[world][0]] = -100  # rank 0's labels are all ignored
    want = c.ref(lambda: cl.fisher_norms(inner, loss_fn, (Xa, ya), **LOCAL))
    got = cl.fisher_norms(inner, loss_fn, (Xa[lo:hi], ya[lo:hi]))
    c.close(
        "fisher_norms with a rank whose labels are all ignored",
        [got.frobenius, got.diag_frobenius],
        [want.frobenius, want.diag_frobenius],
    )


def _dp_reference(
    model: nn.Module, loss_fn: nn.Module, shards: list[tuple[Tensor, Tensor]]
) -> list[float]:
    """``[tr(Sigma), ||G*||^2, R, N]`` of the data-parallel estimator by its definitions, from
    each shard's gradient in one process; shards without a counted target are left out."""
    ii = loss_fn.ignore_index
    raws, counts, sizes = [], [], []
    for X, y in shards:
        m = int((y != ii).sum())
        if m == 0:
            continue
        nll = nn.functional.cross_entropy(model(X), y, reduction="sum", ignore_index=ii)
        raws.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(nll, model.parameters())])
        )
        counts.append(m)
        sizes.append(X.shape[0])
    R, N = len(raws), sum(sizes)
    S = sum(float((r / m).pow(2).sum()) for r, m in zip(raws, counts)) / R
    big_sq = float((sum(raws) / sum(counts)).pow(2).sum())
    h = sum(1.0 / b for b in sizes) / R
    tr = (S - big_sq) / (h - 1.0 / N)
    return [tr, big_sq - tr / N, R, N]


def check_review_s8(c: Checker, world: int, rank: int) -> None:
    """Review s8: counts next to bfloat16 values decode exactly (bfloat16 digits rounded 301 to
    300), trace_fisher_batch of a bfloat16 model sums in float32, and the data-parallel noise
    scale leaves out a rank whose targets are all ignored (0/0 gave NaN, then inf)."""
    from curvlab._losses import loss_spec
    from curvlab.analysis._first_order import _trace_fisher_batch
    from curvlab.distributed import active, rank_generator

    comm = active()
    assert comm is not None
    for dtype in (torch.bfloat16, torch.float16):
        sums, counts = comm.reduce_sums(
            {"v": torch.full((3,), 1.0, dtype=dtype)}, [301 + rank, 1001 + 2 * rank]
        )
        want = [301 * world + world * (world - 1) // 2, 1001 * world + world * (world - 1)]
        c.true(f"reduce_sums counts beside {dtype}", counts == want, f"{counts} != {want}")
        c.true(
            f"reduce_sums {dtype} value",
            sums["v"].dtype == dtype and bool((sums["v"] == world).all()),
        )

    # trace_fisher_batch of a bfloat16 model: 301 examples per rank in chunks of 32
    model = nn.Sequential(nn.Linear(4, 3)).bfloat16()
    gen = torch.Generator().manual_seed(40 + rank)
    Xb = torch.randn(301, 4, generator=gen).bfloat16()
    yb = torch.randint(0, 3, (301,), generator=gen)
    spec = loss_spec(nn.CrossEntropyLoss())
    got = _trace_fisher_batch(model, spec, (Xb, yb), torch.Generator().manual_seed(7), 32)
    draw = rank_generator(torch.Generator().manual_seed(7))  # the same labels, chunk by chunk
    total = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for i in range(0, 301, 32):
        out = spec.prepare(model(Xb[i : i + 32]), yb[i : i + 32])
        yhat = spec.sample_targets(out, draw, yb[i : i + 32])
        grads = torch.autograd.grad(spec.nll_sum(out, yhat, drawn=True), list(model.parameters()))
        total += torch.cat([g.double().reshape(-1) for g in grads])
    dist.all_reduce(total)
    c.close("trace_fisher_batch bf16", got, float(total.pow(2).sum()) / (301 * world) ** 2, 1e-5)

    # the data-parallel noise scale with rank 0's targets all ignored
    X, y = make_data(20, seed=7)
    inner = make_model()
    ddp = nn.parallel.DistributedDataParallel(inner)
    b = SIZES[world][rank]
    Xa, ya = make_data(sum(SIZES[world]), seed=12)
    ya[: SIZES[world][0]] = -100
    lo, hi = shard_bounds(world, rank)
    shards = [
        (Xa[slice(*shard_bounds(world, r))], ya[slice(*shard_bounds(world, r))])
        for r in range(world)
    ]
    for reduction in ("mean", "sum"):
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        if world == 2:  # one rank left: nothing to compare, on every rank the same error
            try:
                data_parallel_noise_scale(ddp, loss_fn, (Xa[lo:hi], ya[lo:hi]))
                c.true(f"dp noise scale, one counted rank ({reduction}): raises", False, "no error")
            except ValueError as exc:
                c.true(
                    f"dp noise scale, one counted rank ({reduction}): message",
                    "ignore_index" in str(exc) and "at least 2" in str(exc),
                    str(exc),
                )
            continue
        est = data_parallel_noise_scale(ddp, loss_fn, (Xa[lo:hi], ya[lo:hi]))
        want = c.ref(lambda loss_fn=loss_fn: _dp_reference(inner, loss_fn, shards))
        c.close(
            f"dp noise scale, rank 0 all ignored ({reduction}) vs definitions",
            [est.trace_covariance, est.grad_norm_sq, est.num_ranks, est.num_examples],
            want,
        )
        c.true("dp noise scale: ranks left out", est.info.get("ranks_left_out") == 1, str(est.info))
    if world == 2:
        return
    # unbiased over draws: rank 0's examples all ignored, the others sample the data set
    loss_fn = nn.CrossEntropyLoss()
    ref = cl.gradient_stats(inner, loss_fn, (X, y), process_group="local")
    truth = [ref.trace_covariance, float(sum((m**2).sum() for m in ref.mean.values()))]
    draws = []
    for trial in range(120):
        gen = torch.Generator().manual_seed(5000 + 1000 * trial + rank)
        idx = torch.randint(0, 20, (b,), generator=gen)
        yt = torch.full_like(y[idx], -100) if rank == 0 else y[idx]
        est = data_parallel_noise_scale(inner, loss_fn, (X[idx], yt))
        draws.append([est.trace_covariance, est.grad_norm_sq])
    t = torch.tensor(draws, dtype=torch.float64)
    for j, what in enumerate(("tr(Sigma)", "|G|^2")):
        se = float(t[:, j].std() / math.sqrt(len(draws)))
        c.true(
            f"dp noise scale, rank 0 all ignored: {what} unbiased",
            abs(float(t[:, j].mean()) - truth[j]) <= 4 * se,
            f"{float(t[:, j].mean())} vs {truth[j]} (se {se})",
        )


class _TwoHeads(nn.Module):
    """A multi-task model: a shared body and one head per task (inputs carry the task)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.body = nn.Linear(4, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 3), nn.Linear(5, 3)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.task = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.heads[self.task](torch.tanh(self.body(x)))


def check_review_s9(c: Checker, world: int, rank: int) -> None:
    """Review s9: fisher_norms on the hooks backend paired the ranks' Gram rows layer by layer by
    position, so ranks running different heads (a multi-task model) were paired head 0 with
    head 1; now every rank raises the same clear error (func, whose rows are all parameters,
    stays exact)."""
    model = _TwoHeads()
    model.task = rank % 2
    gen = torch.Generator().manual_seed(60 + rank)
    X, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    try:
        cl.fisher_norms(model, loss_fn, (X, y), kind="empirical", backend="hooks")
        c.true("fisher_norms, other heads on other ranks: raises", False, "no error")
    except ValueError as exc:
        c.true("fisher_norms, other heads: message", "different layers" in str(exc), str(exc))
    got = cl.fisher_norms(model, loss_fn, (X, y), kind="empirical", backend="func")
    # brute force: every rank's per-example gradients (zeros for the head it does not run)
    rows = []
    for i in range(6):
        model.zero_grad()
        loss_fn(model(X[i : i + 1]), y[i : i + 1]).backward()
        rows.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).double().reshape(-1)
                    for p in model.parameters()
                ]
            )
        )
    model.zero_grad(set_to_none=True)
    mine = torch.stack(rows)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    V = torch.cat(every)
    F = V.T @ V / V.shape[0]
    c.close(
        "fisher_norms func, other heads on other ranks",
        [got.frobenius, got.diag_frobenius],
        [float(torch.linalg.matrix_norm(F)), float(torch.diagonal(F).norm())],
        1e-6,
    )


def join_gloo(rank: int, world: int, init_file: str, timeout_s: float) -> None:
    """Join a gloo world through ``init_file`` with one thread (two cores: one per rank)."""
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    join_gloo(rank, world, init_file, 90)
    c = Checker(rank)
    out = Path(out_dir)
    seconds: dict[str, float] = {}
    checks: list[tuple[str, Callable[[], None]]] = [
        ("deterministic", lambda: check_deterministic(c, world, rank)),
        ("monte carlo", lambda: check_monte_carlo(c, world, rank)),
        ("noise scale dp", lambda: check_noise_scale_dp(c, world, rank)),
        ("noisy optimizer", lambda: check_noisy_optimizer(c, world, rank)),
        ("diagnostics", lambda: check_diagnostics(c, world, rank, out / "diag")),
        ("groups", lambda: check_groups(c, world, rank)),
        ("fsdp", lambda: check_fsdp(c)),
        ("review cases", lambda: check_review_cases(c, world, rank)),
        ("review s8", lambda: check_review_s8(c, world, rank)),
        ("review s9", lambda: check_review_s9(c, world, rank)),
    ]
    try:
        for name, fn in checks:
            t0 = time.perf_counter()
            c.run(name, fn)
            seconds[name] = round(time.perf_counter() - t0, 2)
    finally:
        report = {"checks": c.count, "failures": c.failures, "seconds": seconds}
        report["collectives"] = communication_stats()["calls"]
        (out / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
    leave_process()


def leave_process() -> NoReturn:
    """End a spawned gloo worker whose report is written, without the interpreter's teardown,
    where gloo's threads were occasionally destroyed while joinable ("terminate called without
    an active exception", SIGABRT, about 1 run in 13 on two cores, after the report was written).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def named_check_worker(
    rank: int, module: str, name: str, world: int, timeout_s: float, init_file: str, out_dir: str
) -> None:
    """A spawned rank that runs ``CHECKS[name]`` of the test module ``module`` (collecting its
    failures), writes its report to ``out_dir/rank<r>.json`` and leaves without teardown."""
    import importlib

    join_gloo(rank, world, init_file, timeout_s)
    c = Checker(rank)
    try:
        importlib.import_module(module).CHECKS[name](c, rank)
    except Exception:  # noqa: BLE001 - reported below
        c.failures.append(f"rank {rank}: {name} raised:\n{traceback.format_exc()[-2000:]}")
    finally:
        report = {"checks": c.count, "failures": c.failures}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        try:
            dist.destroy_process_group()
        finally:
            leave_process()  # report written: no interpreter teardown


def run_named_world(
    module: str, name: str, tmp_path: Path, world: int, timeout_s: float, deadline_s: float
) -> None:
    """Spawn ``world`` gloo ranks running ``CHECKS[name]`` of ``module``
    (:func:`named_check_worker`), kill them past ``deadline_s`` (a rank left waiting fails the
    test), and fail with every rank's failures (a rank without a report: gloo aborted it)."""
    import signal

    import pytest
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.start_processes(
        named_check_worker,
        args=(module, name, world, timeout_s, str(tmp_path / "init"), str(out)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + deadline_s
    try:
        while not all(not p.is_alive() for p in ctx.processes):
            if time.monotonic() > deadline:
                pytest.fail(f"{name}: the spawned world ran past {deadline_s} s (a rank waiting)")
            time.sleep(0.2)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
    failures = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        if not path.exists():  # gloo aborted it (a mismatched collective), or it was killed
            code = ctx.processes[rank].exitcode
            failures.append(f"rank {rank}: no report (exit code {code})")
            continue
        report = json.loads(path.read_text())
        assert report["checks"] >= 1, report
        failures += report["failures"]
    assert not failures, "\n".join(failures)
