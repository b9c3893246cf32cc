"""Review s13, FSDP2: the gradient-norm penalties refuse a sharded model, and a process group that
does not fit the model's device mesh is refused before any communication (it hung).

Each test spawns gloo CPU ranks (one thread each) with a short timeout (:data:`TIMEOUT`), so that
a regression fails instead of hanging; the checks run inside the spawned world and report through
one JSON file per rank (failures are collected, not raised). References are brute force:
per-example gradients by autograd, one example at a time, on a plain copy of the model.
"""

from __future__ import annotations

import copy
import json
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import curvlab as cl
from curvlab import regularizers as R
from tests.distributed_checks import Checker, join_gloo, leave_process

try:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - builds without FSDP2
    fully_shard = None

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or fully_shard is None,
    reason="torch.distributed / FSDP2 (fully_shard) is not available",
)

TIMEOUT = 20
"""Seconds any collective may wait (the hang of review s13 waited for gloo's whole timeout)."""

N = 12
BOUNDS = {2: [(0, 5), (5, 12)], 3: [(0, 3), (3, 7), (7, 12)]}  # uneven shards


# --------------------------------------------------------------------------- models, brute force
def make_mlp(seed: int = 1) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.6)
    return model


def data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (N,), generator=gen
    )


def rows_of(ranks: list[int], world: int) -> list[int]:
    """The example indices of the shards of ``ranks``."""
    return [i for r in ranks for i in range(*BOUNDS[world][r])]


def shard_of(rank: int, world: int) -> tuple[Tensor, Tensor]:
    X, y = data()
    lo, hi = BOUNDS[world][rank]
    return X[lo:hi], y[lo:hi]


def brute_fisher(model: nn.Module, rows: list[int]) -> dict[str, Tensor]:
    """The empirical Fisher's diagonal of a mean cross-entropy over ``rows``: the mean squared
    per-example gradient, one example at a time."""
    X, y = data()
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for n in rows:
        loss = nn.functional.cross_entropy(model(X[n : n + 1]), y[n : n + 1])
        for k, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            total[k] += g.detach() ** 2
    return {k: v / len(rows) for k, v in total.items()}


def _raises(
    c: Checker, what: str, fn: Callable[[], Any], kind: type[Exception], *needles: str
) -> None:
    try:
        fn()
    except kind as exc:
        missing = [n for n in needles if n not in str(exc)]
        c.true(f"{what}: message", not missing, f"missing {missing} in: {exc}")
    except Exception as exc:  # noqa: BLE001 - recorded
        c.true(f"{what}: {kind.__name__}", False, f"{type(exc).__name__}: {exc}")
    else:
        c.true(f"{what}: raises", False, "no error")


# --------------------------------------------------------------------------- finding 1: penalties
PENALTY_NEEDLES = ("FSDP2", "pytorch#106637", "DistributedDataParallel", "gradient_penalty")


def check_penalties(c: Checker, rank: int, world: int) -> None:
    """Every penalty refuses an FSDP2 model before any forward pass (review s13: with nested
    units ``gradient_penalty(output=)`` was 0.6185 for 1.8080, with the root alone sharded the
    penalty's backward failed inside FSDP); the training step goes on; DDP and a plain model
    are still penalised (against brute force)."""
    ce = nn.CrossEntropyLoss()
    x, t = shard_of(rank, world)
    plain = make_mlp()
    for case, nested in (("nested units", True), ("the root alone sharded", False)):
        model = copy.deepcopy(plain)
        if nested:
            fully_shard(model[0])
        fully_shard(model)
        forwards: list[int] = []
        model.register_forward_pre_hook(lambda *_, f=forwards: f.append(1))
        own: dict[str, Callable[[], Any]] = {
            "fisher_penalty": lambda m=model: R.fisher_penalty(m, ce, x, seed=0),
            "gradient_penalty": lambda m=model: R.gradient_penalty(m, ce, x, t),
            "random_label_penalty": lambda m=model: R.random_label_penalty(m, ce, x, seed=0),
            "input_gradient_penalty": lambda m=model: R.input_gradient_penalty(m, ce, x, t),
            "GradientNormPenalty": lambda m=model: R.GradientNormPenalty(m, ce, kind="gradient"),
            "FisherPenalty": lambda m=model: R.FisherPenalty(m, ce),
        }
        for name, fn in own.items():
            _raises(c, f"{case}: {name}", fn, NotImplementedError, *PENALTY_NEEDLES)
        c.true(f"{case}: no forward pass ran", not forwards, f"{len(forwards)} forward passes")
        out = model(x)  # the training step's forward; the penalties are given its output
        given: dict[str, Callable[[], Any]] = {
            "fisher_penalty(output=)": lambda m=model, o=out: R.fisher_penalty(m, ce, x, o, seed=0),
            "gradient_penalty(output=)": lambda m=model, o=out: R.gradient_penalty(m, ce, x, t, o),
            "random_label_penalty(output=)": lambda m=model, o=out: R.random_label_penalty(
                m, ce, x, o, seed=0
            ),
        }
        for name, fn in given.items():
            _raises(c, f"{case}: {name}", fn, NotImplementedError, *PENALTY_NEEDLES)
        if nested:  # a submodule that is not a unit: refused too
            _raises(
                c,
                f"{case}: a submodule",
                lambda m=model: R.gradient_penalty(
                    m[2], ce, torch.zeros_like(x[:, :1]).expand(-1, 5), t
                ),
                NotImplementedError,
                *PENALTY_NEEDLES,
            )
        # nothing left behind: the step's backward gives FSDP's averaged gradient
        ce(out, t).backward()
        names = [k for k, _ in plain.named_parameters()]
        grads = torch.autograd.grad(ce(plain(x), t), list(plain.parameters()))
        want = {k: g.detach() for k, g in zip(names, grads)}
        for g in want.values():
            dist.all_reduce(g)
            g /= world
        got = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
        c.close(f"{case}: the training step after", got, want, 1e-12)

    # a model sharded after the penalty object was made: its next call refuses
    model = copy.deepcopy(plain)
    gp = R.GradientNormPenalty(model, ce, kind="gradient", every=2)
    gp(x, t)
    fully_shard(model)
    _raises(c, "sharded afterwards", lambda: gp(x, t), NotImplementedError, *PENALTY_NEEDLES)

    # DDP and a plain model under torch.distributed: penalised, against brute force
    def brute_penalty(m: nn.Module) -> tuple[float, dict[str, Tensor]]:
        """``||grad L||^2`` and the gradient of ``L + ||grad L||^2`` (double backward)."""
        names, ps = zip(*m.named_parameters())
        grads = torch.autograd.grad(ce(m(x), t), ps, create_graph=True)
        value = sum((g**2).sum() for g in grads)
        total = torch.autograd.grad(ce(m(x), t) + value, ps)
        return float(value.detach()), {k: g.detach() for k, g in zip(names, total)}

    value, want = brute_penalty(copy.deepcopy(plain))
    got = R.gradient_penalty(copy.deepcopy(plain), ce, x, t)
    c.close("plain model: gradient_penalty", float(got), value, 1e-12)
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
    out = ddp(x)
    penalty = R.gradient_penalty(ddp, ce, x, t, output=out)
    c.close("DDP: gradient_penalty", float(penalty), value, 1e-12)
    (ce(out, t) + penalty).backward()
    for g in want.values():
        dist.all_reduce(g)
        g /= world
    got = {k: p.grad for k, p in ddp.module.named_parameters()}
    c.close("DDP: the penalised step's gradient", got, want, 1e-12)


# --------------------------------------------------------------------------- finding 2: groups
MESH_NEEDLES = ("process_group=", "FSDP2", "shard group", "docs/distributed.md")


def check_subgroup_of_mesh(c: Checker, rank: int, world: int) -> None:
    """A group of 2 of a 3-rank mesh (review s13: both waited in FSDP's all-gather for rank 2
    until gloo's timeout): refused on both, before any communication; the whole group after."""
    ce = nn.CrossEntropyLoss()
    plain = make_mlp()
    model = copy.deepcopy(plain)
    fully_shard(model)  # the world mesh
    sub = dist.new_group([0, 1], timeout=timedelta(seconds=TIMEOUT))
    batch = shard_of(rank, world)
    if rank in (0, 1):
        for name, fn in (
            ("diag_fisher", lambda: cl.diag_fisher(model, ce, batch, process_group=sub)),
            ("gradient_stats", lambda: cl.gradient_stats(model, ce, batch, process_group=sub)),
        ):
            _raises(c, f"{name}, group [0, 1]", fn, ValueError, *MESH_NEEDLES, "[0, 1, 2]")
        _raises(
            c,
            "diag_fisher, process_group='local'",
            lambda: cl.diag_fisher(model, ce, batch, process_group="local"),
            ValueError,
            "process_group='local'",
            "unsharded copy",
        )
    got = cl.diag_fisher(model, ce, batch)  # every rank: nothing pending, the model as it was
    c.close("diag_fisher, every rank after", dict(got), brute_fisher(plain, rows_of([0, 1, 2], 3)))


def check_group_beyond_mesh(c: Checker, rank: int, world: int) -> None:
    """Ranks 0 and 1 shard a model over the mesh [0, 1], rank 2 another model over [2]: the
    default group (all three) is refused on every rank (the sums would mix the two models);
    the group of the mesh's ranks is measured."""
    ce = nn.CrossEntropyLoss()
    mesh01 = DeviceMesh("cpu", [0, 1])  # every rank makes every mesh (a collective)
    mesh2 = DeviceMesh("cpu", [2])
    sub = dist.new_group([0, 1], timeout=timedelta(seconds=TIMEOUT))
    plain = make_mlp(seed=1 if rank < 2 else 2)
    model = copy.deepcopy(plain)
    fully_shard(model, mesh=mesh01 if rank < 2 else mesh2)
    batch = shard_of(rank, world)
    _raises(
        c,
        "default group beyond the mesh",
        lambda: cl.diag_fisher(model, ce, batch),
        ValueError,
        *MESH_NEEDLES[:2],
        "hold no shard",
        "[2]" if rank < 2 else "[0, 1]",
    )
    if rank < 2:
        got = cl.diag_fisher(model, ce, batch, process_group=sub)
        c.close("the mesh's group", dict(got), brute_fisher(plain, rows_of([0, 1], 3)))
    else:
        got = cl.diag_fisher(model, ce, batch, process_group="local")  # a mesh of one rank
        c.close(
            "rank 2's own mesh of one, 'local'", dict(got), brute_fisher(plain, rows_of([2], 3))
        )


def check_hsdp(c: Checker, rank: int, world: int) -> None:
    """HSDP (a 2-D (replicate, shard) mesh): any set of whole replicas is measured, a group
    that cuts a replica is refused."""
    ce = nn.CrossEntropyLoss()
    plain = make_mlp()
    batch = shard_of(rank, world)
    sub = dist.new_group([0, 1], timeout=timedelta(seconds=TIMEOUT))
    # three replicas of one rank each
    model = copy.deepcopy(plain)
    fully_shard(model, mesh=init_device_mesh("cpu", (3, 1), mesh_dim_names=("rep", "shard")))
    got = cl.diag_fisher(model, ce, batch)
    c.close(
        "replicas of one rank: every rank", dict(got), brute_fisher(plain, rows_of([0, 1, 2], 3))
    )
    if rank < 2:
        got = cl.diag_fisher(model, ce, batch, process_group=sub)
        c.close(
            "replicas of one rank: group [0, 1]", dict(got), brute_fisher(plain, rows_of([0, 1], 3))
        )
    got = cl.diag_fisher(model, ce, batch, process_group="local")
    c.close("replicas of one rank: 'local'", dict(got), brute_fisher(plain, rows_of([rank], 3)))
    # one replica sharded over three ranks: the group [0, 1] cuts it
    model = copy.deepcopy(plain)
    fully_shard(model, mesh=init_device_mesh("cpu", (1, 3), mesh_dim_names=("rep", "shard")))
    if rank < 2:
        _raises(
            c,
            "one replica of three ranks: group [0, 1]",
            lambda: cl.diag_fisher(model, ce, batch, process_group=sub),
            ValueError,
            *MESH_NEEDLES,
            "[2]",
        )
    got = cl.diag_fisher(model, ce, batch)
    c.close(
        "one replica of three ranks: every rank",
        dict(got),
        brute_fisher(plain, rows_of([0, 1, 2], 3)),
    )


# --------------------------------------------------------------------------- the worker
CHECKS: dict[str, tuple[Callable[[Checker, int, int], None], int, int]] = {
    # name: (check, world, least number of checks on a rank)
    "penalties": (check_penalties, 2, 25),
    "subgroup of the mesh": (check_subgroup_of_mesh, 3, 1),
    "group beyond the mesh": (check_group_beyond_mesh, 3, 2),
    "hsdp": (check_hsdp, 3, 3),
}


def worker(rank: int, name: str, world: int, init_file: str, out_dir: str) -> None:
    join_gloo(rank, world, init_file, TIMEOUT)
    # groups made later without a timeout (a DeviceMesh's) take torch's default, 30 minutes:
    # this process's groups wait TIMEOUT seconds at most, so a regression fails, not hangs
    dist.distributed_c10d.default_pg_timeout = timedelta(seconds=TIMEOUT)
    c = Checker(rank)
    try:
        CHECKS[name][0](c, rank, world)
    except Exception:  # noqa: BLE001 - reported below
        c.failures.append(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        report = {"checks": c.count, "failures": c.failures}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        leave_process()  # report written: no interpreter teardown


@pytest.mark.parametrize("name", list(CHECKS))
def test_spawned(name: str, tmp_path: Path) -> None:
    _, world, least = CHECKS[name]
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(worker, args=(name, world, str(tmp_path / "init"), str(out)), nprocs=world, join=True)
    failures = []
    for rank in range(world):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["checks"] >= least, report
        failures += report["failures"]
    assert not failures, "\n".join(failures)
