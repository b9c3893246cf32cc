"""Review s23: FullFisherNoise with ``process_group="local"`` under DDP.

FullFisherNoise folds its noise into the step's own backward pass, whose gradients DDP
all-reduces (averages): with ``process_group="local"`` (each rank's batch alone, replicas that
drift apart, as docs/distributed.md promised) every rank's draw was averaged with the other
ranks', drawn from the same seed, and the replicas stayed identical (2 gloo ranks, scale 0.5:
``E|eps|^2 = 0.584`` on both ranks where each rank's own batch gives ``scale^2 Tr(F_r)`` 1.156 and
1.488; found in review s23). Now NoisyOptimizer refuses the combination before any backward pass:
on a DDP-wrapped model when it is made, and in the forward of a capture that runs through a DDP
wrapper (the model passed unwrapped), on every rank, without a wait. Without DDP (or in
``sample()``, whose draw no all-reduce touches) ``"local"`` still gives each rank its own batch's
noise, checked against dense float64 brute force (``torch.func``):
``eps = scale * sqrt(e) * sum_n r_n grad NLL_n`` with ``e = 1/N`` (mean cross-entropy) and the
Rademacher signs ``r_n`` the sampler draws first from its generator.

Each world spawns two gloo CPU ranks (one thread each) whose collectives time out after
:data:`CALL_TIMEOUT_S` seconds, under a deadline for the whole world (:data:`DEADLINE_S`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from curvlab.noise import DiagFisherNoise, FisherTraceNoise, FullFisherNoise, NoisyOptimizer
from tests.distributed_checks import Checker, run_named_world, same_on_all_ranks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD, SHARDS = 2, (3, 5)
CALL_TIMEOUT_S, DEADLINE_S = 10, 90
SCALE, SEED = 0.5, 7
U64 = 2.0**-53


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def shard(rank: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100)
    out = []
    for n in SHARDS:
        out.append(
            (
                torch.randn(n, 3, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (n,), generator=gen),
            )
        )
    return out[rank]


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def brute_noise(model: nn.Module, X: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor, float]:
    """``grad L`` and the empirical FullFisherNoise draw ``scale / sqrt(N) sum_n r_n grad NLL_n``
    (flattened, float64 brute force), ``r_n`` the first ``N`` signs of a generator seeded with
    ``seed``, and a bound on their rounding error."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: F.cross_entropy(functional_call(model, p, (X,)), y, reduction="none"))(
        params
    )
    n = X.shape[0]
    per = torch.cat([jac[k].reshape(n, -1) for k in params], dim=1)  # (N, d): grad NLL_n
    bits = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed))
    signs = bits.double() * 2 - 1
    eps = SCALE / n**0.5 * (signs[:, None] * per).sum(0)
    grad = per.mean(0)
    # sums of N products of gradients of a few dozen float64 operations each
    tol = (64 + 8 * n) * U64 * float(per.abs().max())
    return grad, eps, tol


def expect_error(c: Checker, what: str, fn: Callable[[], object], kind: type, *parts: str) -> None:
    started = time.monotonic()
    try:
        fn()
        c.true(what, False, "no error")
    except kind as exc:
        msg = str(exc)
        missing = [p for p in parts if p not in msg]
        c.true(f"{what}: the message says why and what to use", not missing, f"{missing}: {msg}")
    except Exception as exc:  # noqa: BLE001 - reported
        c.true(what, False, f"{type(exc).__name__}: {exc}")
    c.true(f"{what}: no wait", time.monotonic() - started < CALL_TIMEOUT_S / 2, "waited")


def check_refused(c: Checker, rank: int) -> None:
    """On a DDP-wrapped model ``process_group="local"`` is refused when the NoisyOptimizer is
    made (both kinds), and a capture whose forward runs through DDP (the model passed unwrapped)
    raises in that forward, before any backward pass; the ranks stay in step."""
    model = make()
    ddp = nn.parallel.DistributedDataParallel(model)
    ce = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    X, y = shard(rank)
    why = ("all-reduce", "DiagFisherNoise", "FisherTraceNoise", "process_group='local'")
    for kind in ("true", "empirical"):
        expect_error(
            c,
            f"{kind}: NoisyOptimizer(ddp, process_group='local')",
            lambda kind=kind: NoisyOptimizer(
                opt, FullFisherNoise(kind, scale=SCALE), ddp, ce, seed=SEED, process_group="local"
            ),
            ValueError,
            *why,
        )
    # the default group: refused as before, without offering "local" as the way out under DDP
    expect_error(
        c,
        "NoisyOptimizer(ddp), the default group",
        lambda: NoisyOptimizer(opt, FullFisherNoise(scale=SCALE), ddp, ce, seed=SEED),
        NotImplementedError,
        "all-reduce",
        "DiagFisherNoise",
    )
    # the samplers whose noise is added after the all-reduce stay accepted with "local"
    for sampler in (DiagFisherNoise("empirical", scale=SCALE), FisherTraceNoise(scale=SCALE)):
        NoisyOptimizer(opt, sampler, ddp, ce, seed=SEED, process_group="local")
    before = flat(model)
    for kind in ("true", "empirical"):
        noisy = NoisyOptimizer(
            opt, FullFisherNoise(kind, scale=SCALE), model, ce, seed=SEED, process_group="local"
        )

        def step(noisy: NoisyOptimizer = noisy) -> None:
            noisy.zero_grad()
            with noisy.capture():
                ce(ddp(X), y).backward()
            noisy.step()

        expect_error(c, f"{kind}: a capture through DDP", step, ValueError, *why)
        c.true(f"{kind}: no backward pass ran", all(p.grad is None for p in model.parameters()))
    c.true("parameters unchanged", torch.equal(flat(model), before))
    c.true("replicas in step", same_on_all_ranks(flat(model)))


def check_local_without_ddp(c: Checker, rank: int) -> None:
    """Without DDP, ``"local"`` folds each rank's own batch's noise into its step (the replicas
    drift apart); ``sample(process_group="local")`` on a DDP-wrapped model draws each rank's own
    batch's noise too. Both equal the brute-force draw on the rank's shard."""
    X, y = shard(rank)
    ce = nn.CrossEntropyLoss()
    model = make()
    grad, eps, tol = brute_noise(model, X, y, SEED)
    before = flat(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    noisy = NoisyOptimizer(
        opt, FullFisherNoise("empirical", scale=SCALE), model, ce, seed=SEED, process_group="local"
    )
    noisy.zero_grad()
    with noisy.capture():
        ce(model(X), y).backward()
    noisy.step()
    got = before - flat(model) - grad  # lr = 1: theta' = theta - (grad L + eps)
    err = float((got - eps).abs().max())
    c.true(
        "the folded noise is this rank's own batch's", err <= tol, f"error {err:.3g} > {tol:.3g}"
    )
    c.true("the replicas drift apart", not same_on_all_ranks(flat(model)))

    model = make()
    ddp = nn.parallel.DistributedDataParallel(model)
    draw = FullFisherNoise("empirical", scale=SCALE).sample(
        ddp, ce, X, y, seed=SEED, process_group="local"
    )
    got = torch.cat([draw[k].reshape(-1) for k, _ in model.named_parameters()])
    err = float((got - eps).abs().max())
    c.true("sample(local) on a DDP model: this rank's draw", err <= tol, f"error {err:.3g}")


def check_all(c: Checker, rank: int) -> None:
    check_refused(c, rank)
    check_local_without_ddp(c, rank)


CHECKS: dict[str, Callable[[Checker, int], None]] = {
    "local_under_ddp": check_all,  # one world: spawning costs seconds
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_full_noise_local_under_ddp(name: str, tmp_path: Path) -> None:
    run_named_world(
        "tests.test_full_noise_ddp_s23", name, tmp_path, WORLD, CALL_TIMEOUT_S, DEADLINE_S
    )


def test_refusal_needs_several_ranks() -> None:
    """No process group: a FullFisherNoise NoisyOptimizer with ``"local"`` is made as before."""
    assert not dist.is_initialized()
    model = make()
    NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        FullFisherNoise(scale=SCALE),
        model,
        nn.CrossEntropyLoss(),
        process_group="local",
    )
