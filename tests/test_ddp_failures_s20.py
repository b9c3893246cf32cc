"""Review s20, distributed: failures of one rank's shard raised on every rank, refusals up front.

* ``diag_hessian`` on its Hessian-columns route (the default for models BackPACK refuses: a layer
  called twice here), and every curvature operator (``trace``): a class label out of range or a
  non-finite input in one rank's shard raised on that rank alone while the operator was built,
  and the other rank waited in the counts' all-reduce until the process group's timeout. Now the
  ranks exchange a failure flag first: the failed rank raises its own error, the others the same
  type naming it ("on rank 1: ..."), and the ranks stay in step for the next call.
* ``Diagnostics(ddp_model, quantities=[..., "noise_scale_hessian" or "critical_sharpness"])``
  was accepted and refused at every measured step, after the other quantities' work. Now it is
  refused when it is made (the measurement's ``NotImplementedError``); ``process_group="local"``
  is still accepted.

Each world spawns 2 gloo ranks (one thread each, a short collective timeout), so a rank left
waiting fails its test after ``CALL_TIMEOUT_S`` instead of hanging the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

import curvlab as cl
from tests.distributed_checks import Checker, run_named_world

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
CALL_TIMEOUT_S = 8  # a collective left waiting fails after this
DEADLINE_S = 60  # a world running past this is killed and its test fails
EPS = torch.finfo(torch.float64).eps
NOT_REDUCED = "is not available under torch.distributed yet (its passes are not reduced"


class Twice(nn.Module):
    """A layer called twice: BackPACK refuses it, ``diag_hessian`` takes the Hessian columns."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (8,), generator=g)


def shard(rank: int, bad: str | None = None, where: int = 1) -> list[tuple[Tensor, Tensor]]:
    """Rank 0: batches of 3 and 2 examples; rank 1: 2 and 1. ``bad`` spoils rank 1's batch
    ``where``: ``"label"`` (class 7 of 3) or ``"nan"`` (a NaN input)."""
    X, y = data()
    X, y = X.clone(), y.clone()
    if rank == 1 and bad is not None:
        row = 5 if where == 0 else 7
        if bad == "label":
            y[row] = 7
        else:
            X[row, 0] = float("nan")
    if rank == 0:
        return [(X[:3], y[:3]), (X[3:5], y[3:5])]
    return [(X[5:7], y[5:7]), (X[7:], y[7:])]


def outcome(fn: Callable[[], Any]) -> tuple[str, str, Any]:
    """``fn()``'s exception type and message, or ``("returned", "", value)``."""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - compared by the checks
        return type(exc).__name__, str(exc), None
    return "returned", "", value


def check_raised_together(c: Checker, rank: int, what: str, got: tuple[str, str, Any]) -> None:
    """Rank 1 raised its own error; rank 0 a ``ValueError`` naming rank 1 (NonFiniteError and
    the label check are ValueErrors)."""
    kind, msg, _ = got
    if rank == 1:
        ok = kind in ("ValueError", "NonFiniteError") and not msg.startswith("on rank")
        c.true(f"{what}: rank 1 raises its own error", ok, f"{kind}: {msg[:300]}")
    else:
        ok = kind == "ValueError" and msg.startswith("on rank 1: ")
        c.true(f"{what}: rank 0 raises, naming rank 1", ok, f"{kind}: {msg[:300]}")


def brute_diag_hessian(model: nn.Module) -> dict[str, Tensor]:
    """The Hessian diagonal of the mean cross-entropy on all 8 examples (dense, torch.func)."""
    X, y = data()
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def loss(f: Tensor) -> Tensor:
        out, i = {}, 0
        for n in names:
            out[n] = f[i : i + params[n].numel()].view_as(params[n])
            i += params[n].numel()
        return nn.functional.cross_entropy(functional_call(model, out, (X,)), y)

    diag, out, i = torch.diagonal(hessian(loss)(flat)), {}, 0
    for n in names:
        out[n] = diag[i : i + params[n].numel()].view_as(params[n])
        i += params[n].numel()
    return out


def check_diag_hessian_columns(c: Checker, rank: int) -> None:
    model = Twice()
    ddp = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    for bad, where in (("label", 1), ("nan", 1), ("nan", 0), ("label", 0)):
        mine = shard(rank, bad, where)
        got = outcome(lambda mine=mine: cl.diag_hessian(ddp, loss_fn, mine))
        check_raised_together(c, rank, f"diag_hessian, {bad} in rank 1's batch {where}", got)
    # the ranks are still in step: the clean shards give the diagonal of all the data
    kind, msg, got = outcome(lambda: cl.diag_hessian(ddp, loss_fn, shard(rank)))
    c.true("diag_hessian returns", kind == "returned", f"{kind}: {msg[:300]}")
    if got is None:
        return
    c.true("diag_hessian took the columns", got.backend == "columns", got.backend)
    want = brute_diag_hessian(model)
    c.true("keys", list(got) == list(want), f"{list(got)}")
    # each entry: a sum over 8 examples of second derivatives through 24 parameters, float64
    scale = max(float(v.abs().max()) for v in want.values())
    err = max(float((got[k] - want[k]).abs().max()) for k in want)
    tol = 8 * 24 * EPS * scale
    c.true("diag_hessian vs torch.func", err <= tol, f"max error {err:.3g} > {tol:.3g}")


def check_operator(c: Checker, rank: int) -> None:
    model = Twice()
    ddp = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    for bad, where in (("label", 1), ("nan", 1), ("nan", 0)):
        mine = shard(rank, bad, where)
        got = outcome(lambda mine=mine: cl.trace(ddp, loss_fn, mine, num_probes=2))
        check_raised_together(c, rank, f"trace, {bad} in rank 1's batch {where}", got)
    got = outcome(
        lambda: cl.curvature_operator(ddp, loss_fn, shard(rank, "label"), keep_graph=True)
    )
    check_raised_together(c, rank, "operator (graphs kept), label in rank 1's batch 1", got)
    # still in step: the exact trace of all the data (a sum of the brute-force diagonal)
    kind, msg, op = outcome(lambda: cl.curvature_operator(ddp, loss_fn, shard(rank)))
    c.true("operator built", kind == "returned", f"{kind}: {msg[:300]}")
    if op is None:
        return
    got = float(torch.diagonal(op.matmat(torch.eye(op.shape[0], dtype=torch.float64))).sum())
    want = float(sum(v.sum() for v in brute_diag_hessian(model).values()))
    tol = 8 * 24 * 24 * EPS * abs(want)  # 24 diagonal entries, each as in the check above
    c.true("operator trace vs torch.func", abs(got - want) <= tol, f"{got} vs {want}")


def check_diagnostics_refusals(c: Checker, rank: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    ddp = nn.parallel.DistributedDataParallel(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for q in ("noise_scale_hessian", "critical_sharpness"):
        kind, msg, diag = outcome(
            lambda q=q: cl.Diagnostics(ddp, loss_fn, quantities=["loss", q], every=1, optimizer=opt)
        )
        ok = kind == "NotImplementedError" and msg.startswith(f"{q} {NOT_REDUCED}")
        c.true(f"Diagnostics refuses {q} when made", ok, f"{kind}: {msg[:300]}")
        kind, msg, diag = outcome(
            lambda q=q: cl.Diagnostics(
                ddp, loss_fn, quantities=["loss", q], optimizer=opt, process_group="local"
            )
        )
        c.true(f"{q} with process_group='local' accepted", kind == "returned", f"{kind}: {msg}")
    kind, msg, _ = outcome(lambda: cl.Diagnostics(ddp, loss_fn, quantities=["loss", "sharpness"]))
    c.true("the other quantities accepted", kind == "returned", f"{kind}: {msg}")

    # analyze: refused before anything is read (it raised at every checkpoint, after the other
    # quantities' work; review s20) -- a data iterable that fails when read proves "before"
    class Unread:
        def __iter__(self) -> Any:
            raise AssertionError("data was read")

    kind, msg, _ = outcome(
        lambda: cl.analyze(ddp, loss_fn, Unread(), quantities=["loss", "noise_scale_hessian"])
    )
    ok = kind == "NotImplementedError" and msg.startswith(f"noise_scale_hessian {NOT_REDUCED}")
    c.true("analyze refuses noise_scale_hessian up front", ok, f"{kind}: {msg[:300]}")


def check_failures_together(c: Checker, rank: int) -> None:
    check_diag_hessian_columns(c, rank)
    check_operator(c, rank)


CHECKS: dict[str, Callable[[Checker, int], None]] = {
    "failures_together": check_failures_together,  # one world: spawning costs seconds
    "diagnostics": check_diagnostics_refusals,
}


def run_world(name: str, tmp_path: Path) -> None:
    run_named_world(
        "tests.test_ddp_failures_s20", name, tmp_path, WORLD, CALL_TIMEOUT_S, DEADLINE_S
    )


@pytest.mark.parametrize("name", list(CHECKS))
def test_one_rank_failures_and_refusals(name: str, tmp_path: Path) -> None:
    run_world(name, tmp_path)
