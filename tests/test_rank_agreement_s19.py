"""Review s19, distributed: decisions each rank took from its own shard, now taken together.

* ``diag_hessian``: BackPACK handed over to the Hessian columns on the rank whose shard is
  ``channels_last`` only; that rank ran the operator's collectives while the other waited in
  the sweep's all-reduce (gloo aborted on the mismatched sizes). Now every rank takes the columns.
  A forced backend that hands over on one rank's data raises on every rank.
* ``CrossEntropyLoss`` layouts: a rank whose sequences have length ``T == C`` read torch's layout,
  a rank with ``T != C`` the GPT layout, and the all-reduce added the two objectives (silently).
  Now every rank raises, as one process does on the two batches.
* ``Diagnostics`` sharpness: a memory refusal on one rank (its own free memory) left the other
  waiting in the first product's all-reduce. Now every rank records the refusal.
* FSDP2: a hook hand-over on one rank's data raised there alone. Now on every rank, naming it.
* K-FAC's ``info["left_out"]``: each rank gave its own reason for a layer left out; now the one
  reason one process gives on all the data.

Each check runs in a world of its own (2 gloo ranks, one thread each, a short collective
timeout), so a rank left waiting fails its test (after ``CALL_TIMEOUT_S``) rather than hanging
the suite, and a world that gloo aborts fails its test alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl
from curvlab._losses import AmbiguousLayoutWarning
from tests.distributed_checks import Checker, run_named_world

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # older torch
    fully_shard = None

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
CALL_TIMEOUT_S = 8  # a collective left waiting fails after this
DEADLINE_S = 40  # a world running past this is killed and its test fails
EPS = torch.finfo(torch.float64).eps


# --------------------------------------------------------------------------- brute force
def flat_params(model: nn.Module) -> tuple[list[str], dict[str, Tensor], Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    return list(params), params, torch.cat([p.reshape(-1) for p in params.values()])


def unflat(names: list[str], like: dict[str, Tensor], flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for n in names:
        out[n] = flat[i : i + like[n].numel()].view_as(like[n])
        i += like[n].numel()
    return out


def assert_close_dict(c: Checker, what: str, got: dict, want: dict[str, Tensor], ops: int) -> None:
    """``got`` equal to ``want`` up to ``ops`` roundings of the largest entry (float64)."""
    c.true(f"{what}: keys", list(got) == list(want), f"{list(got)} != {list(want)}")
    if list(got) != list(want):
        return
    scale = max(float(v.abs().max()) for v in want.values())
    err = max(float((got[k].double() - want[k]).abs().max()) for k in want)
    tol = ops * EPS * scale
    c.true(what, err <= tol, f"max error {err:.3g} > {tol:.3g} (scale {scale:.3g})")


def outcome(fn: Callable[[], Any]) -> tuple[str, str, Any]:
    """``fn()``'s exception type and message, or ``("returned", "", value)``."""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - compared by the checks
        return type(exc).__name__, str(exc), None
    return "returned", "", value


# --------------------------------------------------------------------------- 1. diag_hessian
def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()


def cnn_shards() -> list[tuple[Tensor, Tensor]]:
    """Rank 0: 3 images; rank 1: 5 images, channels_last (BackPACK hands over on it alone)."""
    g = torch.Generator().manual_seed(1)
    X0 = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    X1 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    y0, y1 = torch.randint(0, 3, (3,), generator=g), torch.randint(0, 3, (5,), generator=g)
    return [(X0, y0), (X1.contiguous(memory_format=torch.channels_last), y1)]


def check_diag_hessian_route(c: Checker, rank: int) -> None:
    model = cnn()
    shards = cnn_shards()
    X = torch.cat([s[0].contiguous() for s in shards])
    y = torch.cat([s[1] for s in shards])
    names, like, flat = flat_params(model)

    def loss(f: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, unflat(names, like, f), (X,)), y)

    want = unflat(names, like, torch.diagonal(hessian(loss)(flat)))
    ddp = nn.parallel.DistributedDataParallel(model)
    kind, msg, got = outcome(lambda: cl.diag_hessian(ddp, nn.CrossEntropyLoss(), shards[rank]))
    c.true("diag_hessian returns on every rank", kind == "returned", f"{kind}: {msg[:300]}")
    if got is None:
        return
    c.true("diag_hessian: every rank takes the columns", got.backend == "columns", got.backend)
    # each entry: a sum over 8 examples of second derivatives through ~50 parameters
    assert_close_dict(c, "diag_hessian of all shards vs torch.func", got, want, 8 * flat.numel())


def signed_shard(rank: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5 + rank)
    X = torch.randn(3 + rank, 3, generator=g, dtype=torch.float64)
    X[:, 0] = X[:, 0].abs() + 0.1 if rank == 1 else -X[:, 0].abs() - 0.1
    return X, torch.randint(0, 3, (3 + rank,), generator=g)


# --------------------------------------------------------------------------- 2. layouts
C = 4


class Tiny(nn.Module):
    """Logits ``(B, T, C)``: the classes last (a GPT-style model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(C, 3), nn.Linear(3, C)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(x)))


def token_shards() -> list[tuple[Tensor, Tensor]]:
    """Rank 0: length 4 == C (both layouts fit); rank 1: length 6 (the GPT layout only)."""
    g = torch.Generator().manual_seed(3)
    x0, y0 = torch.randint(0, C, (2, 4), generator=g), torch.randint(0, C, (2, 4), generator=g)
    x1, y1 = torch.randint(0, C, (3, 6), generator=g), torch.randint(0, C, (3, 6), generator=g)
    return [(x0, y0), (x1, y1)]


def check_layouts_agree(c: Checker, rank: int) -> None:
    import warnings

    model = Tiny()
    ddp = nn.parallel.DistributedDataParallel(model)
    mine = token_shards()[rank]
    lf = nn.CrossEntropyLoss()
    calls = {
        "diag_fisher": lambda: cl.diag_fisher(ddp, lf, mine, kind="exact"),
        "gradient_stats": lambda: cl.gradient_stats(ddp, lf, mine),
        "fisher_trace": lambda: cl.fisher_trace(ddp, lf, mine, seed=0),
        "kfac": lambda: cl.kfac(ddp, lf, mine, kind="exact"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AmbiguousLayoutWarning)
        for name, call in calls.items():
            kind, msg, got = outcome(call)
            shown = msg[:200] if got is None else f"returned {type(got).__name__}"
            c.true(f"{name}: mixed layouts raise", kind == "ValueError", f"{kind}: {shown}")
            c.true(f"{name}: names classes_last", "classes_last" in msg, msg[:200])
    # the way out gives the GPT layout's numbers on all tokens: the mean gradient
    names, like, flat = flat_params(model)

    def loss(f: Tensor) -> Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for x, y in token_shards():
            out = functional_call(model, unflat(names, like, f), (x,))
            total = total + nn.functional.cross_entropy(
                out.reshape(-1, C), y.reshape(-1), reduction="sum"
            )
        return total / 26  # 8 + 18 tokens

    want = unflat(names, like, jacrev(loss)(flat))
    got = cl.gradient_stats(ddp, cl.classes_last(lf), mine).mean
    assert_close_dict(c, "classes_last: mean gradient vs torch.func", got, want, 26 * 64)


# --------------------------------------------------------------------------- 3. sharpness
def check_sharpness_refusal_on_one_rank(c: Checker, rank: int) -> None:
    import warnings

    import curvlab.estimators._memory as mem

    saved = mem.available_bytes
    if rank == 1:  # another job holds this rank's memory: a basis of 24 x 31 float64 needs 5,952
        mem.available_bytes = lambda device: 2000
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        ddp = nn.parallel.DistributedDataParallel(model)
        X, y = signed_shard(rank)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            diag = cl.Diagnostics(ddp, nn.CrossEntropyLoss(), every=1, quantities=("sharpness",))
            records = [diag.step(s, X, y) for s in range(2)]
            diag.close()
    finally:
        mem.available_bytes = saved
    said = [str(x.message) for x in w if "EstimatorMemoryError" in str(x.message)]
    c.true(
        "sharpness refusal warned at both steps", len(said) == 2, f"{[str(x.message) for x in w]}"
    )
    c.true("the refusal names rank 1", all("on rank 1" in s for s in said), f"{said}")
    c.true(
        "no sharpness recorded",
        all(r is None or "sharpness" not in r["values"] for r in records),
        f"{records}",
    )


# --------------------------------------------------------------------------- 4. FSDP2
class DirectUse(nn.Module):
    """On a batch whose first inputs are all positive (rank 1's) the head weight is also read
    outside its layer (``F.linear``): the layer hooks hand over on that rank only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        out = self.head(h)
        if bool(x[:, 0].min() > 0):
            out = out + 0.5 * nn.functional.linear(h, self.head.weight)
        return out


def check_fsdp2_hand_over_on_one_rank(c: Checker, rank: int) -> None:
    model = DirectUse()
    fully_shard(model.body)
    fully_shard(model)
    kind, msg, _ = outcome(lambda: cl.diag_fisher(model, nn.CrossEntropyLoss(), signed_shard(rank)))
    c.true("FSDP2: NotImplementedError on every rank", kind == "NotImplementedError", kind)
    c.true("FSDP2: the message names rank 1", "rank(s) [1]" in msg, msg[:300])


def check_forced_backend_hands_over_on_one_rank(c: Checker, rank: int) -> None:
    ddp = nn.parallel.DistributedDataParallel(DirectUse())
    kind, msg, _ = outcome(
        lambda: cl.diag_fisher(ddp, nn.CrossEntropyLoss(), signed_shard(rank), backend="hooks")
    )
    c.true("forced hooks: ValueError on every rank", kind == "ValueError", f"{kind}: {msg[:300]}")
    if rank == 0:
        c.true("forced hooks: rank 0 names rank 1", "on rank 1" in msg, msg[:300])


# --------------------------------------------------------------------------- 5. K-FAC left_out
class Gate(nn.Module):
    """``expert`` runs on no rows on a batch whose second inputs are all positive (rank 0's),
    and is not called at all on the others (rank 1's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.expert, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        if bool(x[:, 1].sum() > 0):
            sel = x[:, 0] > 100  # no row selected
            h = h.index_put((sel,), self.expert(h[sel]))
        return self.head(h)


def gate_shards() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    X0 = torch.randn(3, 3, generator=g, dtype=torch.float64)
    X0[:, 1] = X0[:, 1].abs() + 0.1
    X1 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    X1[:, 1] = -X1[:, 1].abs() - 0.1
    return [
        (X0, torch.randint(0, 3, (3,), generator=g)),
        (X1, torch.randint(0, 3, (5,), generator=g)),
    ]


def check_kfac_left_out_reason(c: Checker, rank: int) -> None:
    model = Gate()
    lf = nn.CrossEntropyLoss()
    one = cl.kfac(model, lf, gate_shards(), kind="exact", process_group="local")
    got = cl.kfac(nn.parallel.DistributedDataParallel(model), lf, gate_shards()[rank], kind="exact")
    want = dict(one.info["left_out"])
    c.true("kfac: layers", sorted(got) == sorted(one), f"{sorted(got)} != {sorted(one)}")
    c.true(
        "kfac left_out: the one-process reason",
        dict(got.info["left_out"]) == want,
        f"{dict(got.info['left_out'])} != {want}",
    )


def check_kfac_then_forced_backend(c: Checker, rank: int) -> None:
    """Two checks in one world (a world costs seconds): the old code returned from the first
    and hung in the second."""
    check_kfac_left_out_reason(c, rank)
    check_forced_backend_hands_over_on_one_rank(c, rank)


CHECKS: dict[str, Callable[[Checker, int], None]] = {
    "diag_hessian": check_diag_hessian_route,
    "layouts": check_layouts_agree,
    "sharpness": check_sharpness_refusal_on_one_rank,
    "fsdp2": check_fsdp2_hand_over_on_one_rank,
    "kfac_left_out_and_forced_backend": check_kfac_then_forced_backend,
}


def run_world(name: str, tmp_path: Path) -> None:
    run_named_world(
        "tests.test_rank_agreement_s19", name, tmp_path, WORLD, CALL_TIMEOUT_S, DEADLINE_S
    )


@pytest.mark.parametrize("name", [n for n in CHECKS if n != "fsdp2"])
def test_ranks_agree(name: str, tmp_path: Path) -> None:
    run_world(name, tmp_path)


@pytest.mark.skipif(fully_shard is None, reason="FSDP2 (fully_shard) is not available")
def test_fsdp2_hand_over_on_one_rank_raises_everywhere(tmp_path: Path) -> None:
    run_world("fsdp2", tmp_path)
