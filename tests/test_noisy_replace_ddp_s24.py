"""Review s24: a NoisyOptimizer under DDP whose parameter objects are replaced on one rank.

Since review s23 a step measures the curvature anew where the trainable parameters are other
objects than those of the cached state (a layer re-initialised by a new ``nn.Parameter``). That
test is each rank's alone: rank 0 reloading with ``load_state_dict(sd, assign=True)`` (new
Parameter objects, the same values) and rank 1 in place, rank 0 measured anew and waited in the
all-reduce of the captured state while rank 1 reused its cache and made no collective call: both
waited until gloo's timeout (30 min by default; found in review s24). Now only the names and
shapes, the same on every rank, decide under a group of several ranks; a rank that sees its
objects replaced says so once (a ``RuntimeWarning``) and keeps the cached curvature until the
next scheduled re-measurement. Since the reload keeps the values, the run is bitwise that of a
run without it, on every rank, whether one rank or both replaced their objects.

Each world spawns two gloo CPU ranks (one thread each) whose collectives time out after
:data:`CALL_TIMEOUT_S` seconds, under a deadline for the whole world (:data:`DEADLINE_S`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from curvlab.noise import DiagFisherNoise, NoisyOptimizer
from tests.distributed_checks import Checker, run_named_world, same_on_all_ranks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
CALL_TIMEOUT_S, DEADLINE_S = 10, 90
STEPS, RELOAD_AT = 3, 1


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def shard(rank: int, step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    X = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return X, torch.randint(0, 2, (6,), generator=gen)


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(rank: int, assign_on: tuple[int, ...]) -> tuple[Tensor, list[str]]:
    """Three captured steps of DiagFisherNoise (recompute_every=5: measured at step 0 only),
    reloading the model's own state before step 1: with ``assign=True`` (new Parameter objects)
    on the ranks ``assign_on``, in place on the others. The parameters after the steps and the
    texts of the RuntimeWarnings NoisyOptimizer gave."""
    ddp_cls = nn.parallel.DistributedDataParallel
    model = make()
    ce = nn.CrossEntropyLoss()
    ddp = ddp_cls(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noisy = NoisyOptimizer(
        opt, DiagFisherNoise("empirical", scale=0.5), ddp, ce, seed=3, recompute_every=5
    )
    said: list[str] = []
    for step in range(STEPS):
        X, y = shard(rank, step)
        if step == RELOAD_AT:
            sd = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(sd, assign=rank in assign_on)
            opt.param_groups[0]["params"] = list(model.parameters())
            ddp = ddp_cls(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            noisy.zero_grad()
            with noisy.capture():
                ce(ddp(X), y).backward()
            noisy.step()
        said += [
            str(w.message)
            for w in caught
            if issubclass(w.category, RuntimeWarning) and "NoisyOptimizer" in str(w.message)
        ]
    return flat(model), said


def check_replaced(c: Checker, rank: int) -> None:
    """No rank waits; the replicas stay identical and bitwise those of a run without the
    reload; the ranks that replaced their objects (and only those) are told why their cached
    curvature is kept."""
    want, said = run(rank, ())
    c.true("no reload: no warning", not said, str(said))
    for assign_on in ((0,), (0, 1)):
        got, said = run(rank, assign_on)
        c.true(f"assign on {assign_on}: replicas identical", same_on_all_ranks(got))
        c.true(
            f"assign on {assign_on}: bitwise the run without the reload",
            torch.equal(got, want),
            f"max difference {float((got - want).abs().max()):.3g}",
        )
        if rank in assign_on:
            parts = ("this rank", "recompute_every", "every rank alike")
            ok = len(said) >= 1 and all(p in said[0] for p in parts)
            c.true(f"assign on {assign_on}: the warning says why and what to do", ok, str(said))
        else:
            c.true(f"assign on {assign_on}: in place, no warning", not said, str(said))


CHECKS: dict[str, Callable[[Checker, int], None]] = {
    "replaced_on_one_rank": check_replaced,  # one world: spawning costs seconds
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_parameters_replaced_on_one_rank(name: str, tmp_path: Path) -> None:
    run_named_world(
        "tests.test_noisy_replace_ddp_s24", name, tmp_path, WORLD, CALL_TIMEOUT_S, DEADLINE_S
    )
