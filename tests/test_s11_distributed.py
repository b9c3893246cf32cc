"""Review s11, distributed: a one-rank failure and what every rank says about it.

* A class label out of range on one rank only: every rank raises the same ``ValueError`` (the
  count travels in curvlab's all-reduce); before, the rank holding it raised after the all-reduce
  and the others returned numbers, and ``Diagnostics(on_error="warn")`` recorded a value on
  rank 0 for a step that rank 1 skipped.
* A repeated call with a NaN in one rank's inputs: the other ranks' ``NonFiniteError`` says that
  another rank's shard may hold it.
* ``fisher_norms`` when the hooks backend hands over to ``func`` on one rank only: the message
  names each rank's backend, not ``rank 1: []``.
* One process: the invalid labels are counted once per chunk (``func``'s exact GGN saw the first
  example's label only and returned numbers for a label out of range in the others;
  ``fisher_norms`` counted the first example's twice).

The spawned checks run in one gloo world of 2 CPU ranks (one thread each) and report through one
JSON file per rank; failures are collected, not raised, so both ranks keep issuing the same
collectives, every call has its own process group with a short timeout, and the test kills a world
that outlives its deadline.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.func import functional_call, grad

import curvlab as cl
from curvlab._losses import loss_spec
from curvlab.noise import DiagFisherNoise
from curvlab.quantities._gram_exchange import _unpaired
from curvlab.quantities._sweep import Counter
from tests.distributed_checks import Checker, join_gloo, leave_process

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
CALL_TIMEOUT_S = 10  # a collective left waiting fails after this, not the pytest run
DEADLINE_S = 300
INVALID = "target\\(s\\) are neither a class index"


# --------------------------------------------------------------------------- models and data
def make_model() -> nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    return model


def shard(rank: int, n: int = 0) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s shard: 4 examples on rank 0, 5 on rank 1 (``n`` > 0: that many)."""
    gen = torch.Generator().manual_seed(10 + rank)
    size = n or 4 + rank
    return torch.randn(size, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (size,), generator=gen
    )


def brute_rows(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Per-example gradients of ``NLL_n`` (one row per example), one example at a time."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = []
    for i in range(X.shape[0]):

        def nll(p: dict[str, Tensor], i: int = i) -> Tensor:
            out = functional_call(model, p, (X[i : i + 1],))
            return nn.functional.cross_entropy(out, y[i : i + 1], reduction="sum")

        g = grad(nll)(params)
        rows.append(torch.cat([g[n].reshape(-1) for n in names]))
    return torch.stack(rows)


class Branchy(nn.Module):
    """Runs its first layer twice for a batch holding a rare input: the hooks backend hands over
    to ``func`` on a rank whose shard holds one, and on that rank only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        rare = x[:, 0] > 2.5
        if bool(rare.any()):  # runs the layer twice, but each example's output is its own
            h = torch.where(rare[:, None], torch.tanh(self.a(h)), h)
        return self.b(h)


# --------------------------------------------------------------------------- spawned checks
def _group() -> Any:
    return dist.new_group(timeout=timedelta(seconds=CALL_TIMEOUT_S))


def _outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, str]:
    """``fn(*args, **kwargs)``'s exception type and message, or ``("returned", "")``."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - compared below
        return type(exc).__name__, str(exc)
    return "returned", ""


def _label_calls(X: Tensor, y: Tensor) -> dict[str, Callable[[Any], Any]]:
    """The entry points whose labels curvlab only counts, each taking a process group."""
    loss_fn = nn.CrossEntropyLoss()

    def diag(quantity: str, pg: Any) -> Any:
        d = cl.Diagnostics(
            make_model(),
            loss_fn,
            every=1,
            quantities=[quantity],
            on_error="raise",
            process_group=pg,
        )
        return d.step(0, X, y)

    return {
        "diag_fisher mc": lambda pg: cl.diag_fisher(
            make_model(), loss_fn, (X, y), kind="mc", seed=0, process_group=pg
        ),
        "diag_fisher exact func": lambda pg: cl.diag_fisher(
            make_model(), loss_fn, (X, y), kind="exact", backend="func", process_group=pg
        ),
        "kfac mc": lambda pg: cl.kfac(make_model(), loss_fn, (X, y), seed=0, process_group=pg),
        "kfac exact": lambda pg: cl.kfac(
            make_model(), loss_fn, (X, y), kind="exact", process_group=pg
        ),
        "fisher_norms mc": lambda pg: cl.fisher_norms(
            make_model(),
            loss_fn,
            [(X[:2], y[:2]), (X[2:], y[2:])],
            "mc",
            seed=0,
            process_group=pg,
        ),
        "Diagnostics trace_fisher": lambda pg: diag("trace_fisher", pg),
        "Diagnostics trace_fisher_batch": lambda pg: diag("trace_fisher_batch", pg),
        "DiagFisherNoise mc sample": lambda pg: DiagFisherNoise("mc", scale=0.1).sample(
            make_model(), loss_fn, X, y, seed=0, process_group=pg
        ),
    }


def check_invalid_label_raises_everywhere(c: Checker, rank: int) -> None:
    """A label 3 (C = 3) or -5 (not ignore_index) on rank 1 only: every rank raises."""
    for bad in (3, -5):
        X, y = shard(rank)
        if rank == 1:
            y[1] = bad
        for name, call in _label_calls(X, y).items():
            kind, message = _outcome(call, _group())
            what = f"label {bad} on rank 1, {name}"
            c.true(f"{what}: ValueError on rank {rank}", kind == "ValueError", f"{kind}: {message}")
            c.true(f"{what}: one label counted", message.startswith("1 target(s)"), message)
            where = "all of them in this rank's shard" if rank == 1 else "0 in this rank's shard"
            c.true(f"{what}: says where", where in message, message)
            dist.barrier()


def check_valid_labels_unchanged(c: Checker, rank: int) -> None:
    """Valid labels everywhere: the numbers of the paths that now reduce the invalid count too,
    against brute force (fisher_norms, diag_fisher: per-example gradients) and one process
    (K-FAC)."""
    loss_fn = nn.CrossEntropyLoss()
    X, y = shard(rank)
    union = [shard(r) for r in range(WORLD)]
    Xa, ya = torch.cat([u[0] for u in union]), torch.cat([u[1] for u in union])
    V = brute_rows(make_model(), Xa, ya)
    F = V.T @ V / V.shape[0]  # mean CE, one term per example
    got = cl.fisher_norms(make_model(), loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])])
    c.close(
        "fisher_norms empirical vs brute force",
        [got.frobenius, got.diag_frobenius, got.num_examples],
        [float(torch.linalg.matrix_norm(F)), float(torch.diagonal(F).norm()), V.shape[0]],
    )
    diag = cl.diag_fisher(make_model(), loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])])
    flat = torch.cat([diag[n].reshape(-1) for n, _ in make_model().named_parameters()])
    c.close("diag_fisher empirical vs brute force", flat, torch.diagonal(F))
    k = cl.kfac(make_model(), loss_fn, (X, y), kind="exact")
    ref = cl.kfac(make_model(), loss_fn, (Xa, ya), kind="exact", process_group="local")
    for name in ref:
        c.close(f"kfac exact {name}.A", k[name].A, ref[name].A)
        c.close(f"kfac exact {name}.G", k[name].G, ref[name].G)


def check_diagnostics_warn_in_step(c: Checker, rank: int) -> None:
    """DDP loop, ``on_error="warn"``, a bad label at step 1 on rank 1 only: every rank warns and
    records nothing for step 1 (rank 0 recorded a value before), and steps 0, 2 agree."""
    net = make_model()
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    d = cl.Diagnostics(model, loss_fn, every=1, quantities=["trace_fisher"], on_error="warn")
    values = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            gen = torch.Generator().manual_seed(100 * step + rank)
            X = torch.randn(6, 4, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 3, (6,), generator=gen)
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()
            yd = y.clone()
            if rank == 1 and step == 1:
                yd[0] = 3
            record = d.step(step, X, yd)
            values.append(None if record is None else record["values"]["trace_fisher"])
    failed = [str(w.message) for w in caught if "measurement at step 1 failed" in str(w.message)]
    c.true("warn: step 1 warned on this rank", len(failed) == 1, str(failed))
    c.true("warn: no record of step 1", values[1] is None, str(values))
    c.true(
        "warn: a measurement_failed event at step 1",
        [e["step"] for e in d.events if e.get("event") == "measurement_failed"] == [1],
        str(d.events),
    )
    t = torch.tensor([values[0], values[2]], dtype=torch.float64)
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(gathered, t)
    c.true("warn: steps 0 and 2 agree on every rank", torch.equal(*gathered), str(gathered))


def check_repeated_nan_message(c: Checker, rank: int) -> None:
    """A repeated call (finiteness checks deferred) with a NaN in rank 1's inputs only."""
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    X, y = shard(rank, 6)
    for name, fn in (
        ("diag_fisher", lambda Z, pg: cl.diag_fisher(model, loss_fn, (Z, y), process_group=pg)),
        (
            "gradient_stats",
            lambda Z, pg: cl.gradient_stats(model, loss_fn, (Z, y), process_group=pg).variance,
        ),
    ):
        fn(X, _group())  # a clean first call: the signature is remembered
        Xb = X.clone()
        if rank == 1:
            Xb[2, 1] = float("nan")
        kind, message = _outcome(fn, Xb, _group())
        c.true(f"{name}: NonFiniteError on rank {rank}", kind == "NonFiniteError", message)
        if rank == 0:
            c.true(
                f"{name}: rank 0 points to another rank's shard",
                "another rank's shard may hold the non-finite value" in message
                and "this rank's parameters and inputs are finite" in message,
                message,
            )
        else:
            c.true(f"{name}: rank 1 names its inputs", "the inputs of batch 0" in message, message)
        dist.barrier()


def check_backends_differ_message(c: Checker, rank: int) -> None:
    """fisher_norms: the hooks backend hands over to func on rank 1 only (its shard holds the
    rare input): every rank raises, naming each rank's backend."""
    gen = torch.Generator().manual_seed(3)
    model = Branchy().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    X = torch.randn(9, 3, generator=gen, dtype=torch.float64).clamp(-2, 2)
    y = torch.randint(0, 2, (9,), generator=gen)
    X[7, 0] = 3.0  # in rank 1's shard
    part = slice(0, 4) if rank == 0 else slice(4, 9)
    kind, message = _outcome(
        cl.fisher_norms, model, nn.CrossEntropyLoss(), (X[part], y[part]), process_group=_group()
    )
    c.true(f"branchy: ValueError on rank {rank}", kind == "ValueError", f"{kind}: {message}")
    c.true("branchy: names the backends", "different backends" in message, message)
    c.true("branchy: rank 0 hooks", "rank 0 (hooks backend): layers ['a', 'b']" in message, message)
    c.true(
        "branchy: rank 1 func", "rank 1 (func backend): rows of all parameters" in message, message
    )
    c.true("branchy: no bare []", "[]" not in message, message)
    dist.barrier()


CHECKS = {
    "invalid label": check_invalid_label_raises_everywhere,
    "valid labels": check_valid_labels_unchanged,
    "diagnostics warn": check_diagnostics_warn_in_step,
    "repeated nan": check_repeated_nan_message,
    "backends differ": check_backends_differ_message,
}


def worker(rank: int, init_file: str, out_dir: str) -> None:
    join_gloo(rank, WORLD, init_file, 60)
    c = Checker(rank)
    try:
        for name, check in CHECKS.items():
            try:
                check(c, rank)
            except Exception:  # noqa: BLE001 - reported below; the next check goes on
                c.failures.append(f"rank {rank}: {name} raised:\n{traceback.format_exc()}")
                dist.barrier()
    finally:
        report = {"checks": c.count, "failures": c.failures}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        leave_process()  # report written: no interpreter teardown


def test_spawned_world(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.start_processes(
        worker,
        args=(str(tmp_path / "init"), str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the spawned world ran past {DEADLINE_S} s (a rank left waiting)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
    failures = []
    for rank in range(WORLD):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["checks"] >= 60, report
        failures += report["failures"]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- one process
def test_func_exact_counts_every_label_of_a_chunk() -> None:
    """func's exact GGN runs the model on a chunk's first example only: a label out of range in
    another example was never counted and diag_fisher returned numbers."""
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    X, y = shard(1, 7)
    y[1], y[5] = 3, -5
    with pytest.raises(ValueError, match=f"^2 {INVALID}"):
        cl.diag_fisher(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])], "exact", backend="func")


def test_fisher_norms_counts_a_label_once() -> None:
    """The probe forward on a batch's first example and the Monte-Carlo draw's forward both
    counted its label: "4 target(s)" for two."""
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    X, y = shard(1, 6)
    y[0], y[3] = 3, -5  # the first example of each batch
    with pytest.raises(ValueError, match=f"^2 {INVALID}"):
        cl.fisher_norms(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])], "mc", seed=0)


def test_counter_counts_each_chunk_once_whatever_the_forwards() -> None:
    spec = loss_spec(nn.CrossEntropyLoss(ignore_index=-1))
    counter = Counter(spec)
    y = torch.tensor([0, 3, -1, -2, 2])
    for _ in range(3):  # three forwards of one example (probes) count nothing
        counter.on_output(torch.zeros(1, 3), y[:1])
    counter.add(torch.zeros(5, 4), y)
    assert int(counter.invalid) == 2  # 3 and -2; -1 is ignored
    with pytest.raises(ValueError, match=f"^2 {INVALID}.*\\[0, 3\\)"):
        counter.terms_per_example()


def test_unpaired_message_names_backends_and_layers() -> None:
    gathered = [(1, ("a", "b"), "hooks"), (1, (), "func")]
    message = _unpaired(0, 1, gathered)
    assert "different backends" in message and "backend='func'" in message
    assert "rank 1 (func backend): rows of all parameters at once" in message
    heads = [(1, ("body", "head_a"), "hooks"), (1, ("body", "head_b"), "hooks")]
    message = _unpaired(0, 1, heads)
    assert "different layers" in message and "['body', 'head_b']" in message
