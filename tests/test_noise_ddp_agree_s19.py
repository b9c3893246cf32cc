"""Review s19: under DDP the ranks agree on NoisyOptimizer's captured curvature or its separate pass.

Each rank decided alone whether the curvature its capture recorded could be used. A rank whose
loss had another term on its data only (a z-loss), or whose model read a weight outside its layer
on its data only, measured in a separate pass, whose first collective (``all_gather_object``) met
the other ranks' all-reduce of their captured states: both ranks hung (found in review s19). Now a
rank without a usable capture sends zeros and a flag in that same all-reduce, and every rank then
measures in the separate pass (one collective on the usual path); a rank whose separate pass is
refused raises its error, the others a ``RuntimeError`` saying so, instead of waiting.

Each test spawns two gloo CPU ranks (one thread each) whose collectives time out after
:data:`TIMEOUT` seconds, under a deadline for the whole world (:data:`DEADLINE`), so a hang fails
the test instead of hanging it. The references are dense float64 brute force (``torch.func``): the
empirical Fisher diagonal ``(1/N) sum_n (grad NLL_n)^2`` of the global batch of ``N`` examples, each
shard's per-example gradients through the model's forward on that shard.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from curvlab.distributed import communication_stats
from curvlab.noise import DiagFisherNoise, FisherTraceNoise, NoisyOptimizer
from tests.distributed_checks import Checker, join_gloo, leave_process, same_on_all_ranks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

TIMEOUT = 10
"""Seconds any collective may wait: a rank left alone in one fails instead of hanging."""
DEADLINE = 90
"""Seconds the spawned world may take in all (start-up included) before the test fails."""

WORLD, SHARDS = 2, (3, 5)  # rank 0: three examples, rank 1: five (uneven shards)
U64 = 2.0**-53


class DirectUse(nn.Module):
    """An MLP whose forward reads the head's weight outside its layer (``F.linear``) on a batch
    whose first feature is positive, i.e. on rank 1's shard only."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        out = self.head(h)
        if bool(x[:, 0].min() > 0):
            out = out + 0.5 * F.linear(h, self.head.weight)
        return out


def plain() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def make(cls: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().double()


def shards(step: int) -> list[tuple[Tensor, Tensor]]:
    """Both ranks' shards of a step (rank 0's first feature negative, rank 1's positive)."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for rank, n in enumerate(SHARDS):
        X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        X[:, 0] = X[:, 0].abs() + 0.1 if rank == 1 else -X[:, 0].abs() - 0.1
        out.append((X, torch.randint(0, 3, (n,), generator=gen)))
    return out


def brute_diag(model: nn.Module, step: int) -> tuple[dict[str, Tensor], Tensor]:
    """The empirical Fisher diagonal of the step's global batch, ``(1/N) sum_n (grad NLL_n)^2``
    (each shard through the model's forward on that shard), and a bound on its rounding error."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for X, y in shards(step):
        jac = jacrev(
            lambda p, X=X, y=y: F.cross_entropy(
                functional_call(model, p, (X,)), y, reduction="none"
            )
        )(params)
        for k in total:
            total[k] += jac[k].pow(2).sum(0)
    n = sum(SHARDS)
    diag = {k: v / n for k, v in total.items()}
    # each entry: a sum of n squares of gradients of a few dozen float64 operations each
    scale = max(float(v.abs().max()) for v in diag.values())
    return diag, torch.tensor((64 + 4 * n) * U64 * scale)


def close(c: Checker, what: str, got: dict[str, Tensor], want: dict[str, Tensor], tol) -> None:
    c.true(f"{what}: keys", list(got) == list(want), f"{list(got)} != {list(want)}")
    err = max(float((got[k].double() - want[k]).abs().max()) for k in want)
    c.true(what, err <= float(tol), f"max error {err:.3g} > {float(tol):.3g}")


def check_zloss_on_one_rank(c: Checker, rank: int) -> None:
    """DiagFisherNoise, recompute_every=2: step 0 captured on both ranks (one collective), step 1
    reuses it, step 2 adds a z-loss on rank 1 only: both ranks measure in the separate pass."""
    model = make(plain)
    ddp = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    noisy = NoisyOptimizer(
        opt, DiagFisherNoise("empirical", scale=0.5), ddp, loss_fn, seed=7, recompute_every=2
    )
    for step in range(3):
        X, y = shards(step)[rank]
        want, tol = brute_diag(model, step)

        def closure(X: Tensor = X, y: Tensor = y, step: int = step) -> Tensor:
            noisy.zero_grad()
            out = ddp(X)
            loss = loss_fn(out, y)
            if step == 2 and rank == 1:  # another term of the loss, on this rank's data only
                loss = loss + 1e-3 * out.pow(2).mean()
            loss.backward()
            return loss

        calls = communication_stats()["calls"]
        noisy.step(closure)
        issued = communication_stats()["calls"] - calls
        if step == 0:
            c.true("captured on every rank: one collective", issued == 1, f"{issued}")
        if step != 1:  # measured on this step: the global batch's diagonal before the update
            c.true(f"step {step}: measured now", noisy._state_step == step, f"{noisy._state_step}")
            close(c, f"step {step}: Fisher diagonal of the global batch", noisy._state, want, tol)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    c.true("replicas bitwise identical after 3 steps", same_on_all_ranks(flat))


def check_weight_outside_its_layer_on_one_rank(c: Checker, rank: int) -> None:
    """FisherTraceNoise (a 0-dim state): rank 1's forward reads the head's weight outside its layer,
    so its capture is refused and both ranks measure Tr(F)/d in the separate pass."""
    model = make(DirectUse)
    ddp = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    noisy = NoisyOptimizer(opt, FisherTraceNoise(scale=0.5), ddp, loss_fn, seed=7)
    X, y = shards(0)[rank]
    want, tol = brute_diag(model, 0)
    d = sum(v.numel() for v in want.values())
    trace = sum(v.sum() for v in want.values()) / d

    def closure() -> Tensor:
        noisy.zero_grad()
        loss = loss_fn(ddp(X), y)
        loss.backward()
        return loss

    noisy.step(closure)
    err = abs(float(noisy._state) - float(trace))
    c.true("Tr(F)/d of the global batch", err <= float(tol), f"{float(noisy._state)} vs {trace}")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    c.true("replicas bitwise identical", same_on_all_ranks(flat))


def check_separate_pass_refused_on_one_rank(c: Checker, rank: int) -> None:
    """Mixup on rank 1 only (the loss module called twice on different targets): its capture is
    inexact and its separate pass refused. Rank 1 raises that error, rank 0 a RuntimeError naming
    it, neither waits; the step leaves both as they were and the next step runs on both."""
    model = make(plain)
    ddp = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    noisy = NoisyOptimizer(opt, DiagFisherNoise("empirical", scale=0.5), ddp, loss_fn, seed=7)
    X, y = shards(0)[rank]

    def closure(mixup: bool) -> Tensor:
        noisy.zero_grad()
        out = ddp(X)
        loss = loss_fn(out, y)
        if mixup:
            loss = 0.5 * loss + 0.5 * loss_fn(out, y.roll(1))
        loss.backward()
        return loss

    generator = noisy.generator.get_state()
    before = [p.detach().clone() for p in model.parameters()]
    started = time.monotonic()
    try:
        noisy.step(lambda: closure(rank == 1))
        c.true("the refused step raises on every rank", False, "no error")
    except RuntimeError as exc:
        want = "loss module was called 2 times" if rank == 1 else "refused on 1 other rank(s)"
        c.true("the error says why", want in str(exc), str(exc)[:300])
    c.true("no wait", time.monotonic() - started < TIMEOUT / 2, "waited for a timeout")
    c.true("steps_taken unchanged", noisy.steps_taken == 0, f"{noisy.steps_taken}")
    c.true("generator unchanged", torch.equal(noisy.generator.get_state(), generator))
    c.true(
        "parameters unchanged", all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    )
    noisy.step(lambda: closure(False))  # the ranks are still in step
    want, tol = brute_diag(make(plain), 0)
    close(c, "the next step: Fisher diagonal of the global batch", noisy._state, want, tol)


CHECKS: dict[str, tuple[Callable[[Checker, int], None], int]] = {
    # name: (check, least number of checks on a rank)
    "zloss": (check_zloss_on_one_rank, 8),
    "direct": (check_weight_outside_its_layer_on_one_rank, 2),
    "refused": (check_separate_pass_refused_on_one_rank, 7),
}


def worker(rank: int, name: str, init_file: str, out_dir: str) -> None:
    join_gloo(rank, WORLD, init_file, TIMEOUT)
    c = Checker(rank)
    try:
        CHECKS[name][0](c, rank)
    except Exception:  # noqa: BLE001 - reported below
        c.failures.append(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        report = {"checks": c.count, "failures": c.failures}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        leave_process()  # report written: no interpreter teardown


@pytest.mark.parametrize("name", list(CHECKS))
def test_spawned(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.spawn(worker, args=(name, str(tmp_path / "init"), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the spawned world did not finish within {DEADLINE} s (a hang)")
    failures = []
    for rank in range(WORLD):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["checks"] >= CHECKS[name][1], report
        failures += report["failures"]
    assert not failures, "\n".join(failures)
