"""Review s10, distributed: FSDP2 mixed precision below an unsharded root, a submodule that is not
a ``fully_shard`` unit, and a one-rank failure of the data-parallel noise scale.

Each test spawns 2 gloo CPU ranks (one thread each); the checks run inside the spawned world and
report through one JSON file per rank (failures are collected, not raised, so both ranks keep
issuing the same collectives). References are brute force: per-example gradients by autograd,
one example at a time, on a plain model that computes what FSDP's forward computes.
"""

from __future__ import annotations

import copy
import json
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import curvlab as cl
from curvlab.analysis._data_parallel import data_parallel_noise_scale
from tests.distributed_checks import Checker, join_gloo, leave_process

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - builds without FSDP2
    fully_shard = None

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or fully_shard is None,
    reason="torch.distributed / FSDP2 (fully_shard) is not available",
)

WORLD = 2
N = 12
CUT = 5  # rank 0: examples [0, 5) in two batches; rank 1: [5, 12) in one


# --------------------------------------------------------------------------- models, brute force
def make_mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.6)
    return model.to(dtype)


class Scaled(nn.Module):
    """An unsharded root that computes on the raw inputs before its network."""

    def __init__(self, net: nn.Module, scale: float = 0.1, shift: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.scale, self.shift = scale, shift

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.shift) * self.scale)


class Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.extra = nn.Linear(3, 3).double()
        with torch.no_grad():
            self.extra.weight.copy_(torch.eye(3, dtype=torch.float64) * 0.9)
            self.extra.bias.fill_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.extra(self.net(x))


class Emulated(nn.Module):
    """A plain model computing what FSDP computes: ``parts`` in order, each ``(module, dtype)``
    fed its input cast to ``dtype`` (a unit's ``param_dtype``) or as it comes (``None``)."""

    def __init__(self, parts: list[tuple[str, nn.Module, torch.dtype | None]], pre: Any) -> None:
        super().__init__()
        self.names = [n for n, _, _ in parts]
        self.dtypes = [d for _, _, d in parts]
        self.parts = nn.ModuleList([m for _, m, _ in parts])
        self.pre = pre

    def forward(self, x: Tensor) -> Tensor:
        h = self.pre(x)
        for module, dtype in zip(self.parts, self.dtypes):
            h = module(h if dtype is None else h.to(dtype))
        return h

    def named_for(self) -> dict[str, nn.Parameter]:
        """The parameters under the names of the model they emulate."""
        out = {}
        for name, module in zip(self.names, self.parts):
            for a, p in module.named_parameters():
                out[f"{name}{a}"] = p
        return out


def brute(model: nn.Module, params: dict[str, Tensor], X: Tensor, y: Tensor) -> dict[str, Any]:
    """Per-example gradients of a CrossEntropyLoss (mean) one example at a time: the empirical
    Fisher's diagonal, the mean loss and the noise scale ``tr(Sigma) / ||G||^2``, in float64."""
    names = list(params)
    rows, losses = [], []
    for n in range(X.shape[0]):
        loss = nn.functional.cross_entropy(model(X[n : n + 1]), y[n : n + 1])
        grads = torch.autograd.grad(loss, [params[k] for k in names])
        rows.append([g.detach().double() for g in grads])
        losses.append(float(loss.detach()))
    fisher = {k: sum(r[i] ** 2 for r in rows) / len(rows) for i, k in enumerate(names)}
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(len(names))]
    var = sum(
        float(sum((r[i] - mean[i]) ** 2 for r in rows).sum()) / len(rows) for i in range(len(names))
    )
    norm2 = sum(float((m**2).sum()) for m in mean)
    return {"fisher": fisher, "loss": sum(losses) / len(losses), "noise_scale": var / norm2}


def data(dtype: torch.dtype = torch.float32, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = shift + torch.randn(N, 4, generator=gen, dtype=torch.float64)
    return X.to(dtype), torch.randint(0, 3, (N,), generator=gen)


def my_shard(X: Tensor, y: Tensor, rank: int) -> list[tuple[Tensor, Tensor]]:
    if rank == 0:
        return [(X[:2], y[:2]), (X[2:CUT], y[2:CUT])]
    return [(X[CUT:], y[CUT:])]


def _measure(
    c: Checker, label: str, model: nn.Module, X: Tensor, y: Tensor, want: dict, rtol: float
) -> None:
    """diag_fisher, gradient_stats' noise scale and Diagnostics' loss against ``want``."""
    ce = nn.CrossEntropyLoss()
    rank = dist.get_rank()
    mine = my_shard(X, y, rank)
    try:
        got = cl.diag_fisher(model, ce, mine)
        c.close(
            f"{label}: diag_fisher", {k: v.double() for k, v in got.items()}, want["fisher"], rtol
        )
        stats = cl.gradient_stats(model, ce, mine)
        c.close(f"{label}: noise_scale", stats.noise_scale, want["noise_scale"], rtol)
        lo, hi = (0, CUT) if rank == 0 else (CUT, N)
        with cl.Diagnostics(model, ce, quantities=("loss",), every=1, on_error="raise") as dg:
            loss = dg.step(0, X[lo:hi], y[lo:hi])["values"]["loss"]
        c.close(f"{label}: Diagnostics loss", loss, want["loss"], rtol)
    except Exception as exc:  # noqa: BLE001 - recorded (the defect: a refusal)
        c.true(f"{label}: measured", False, f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- finding 1
def check_mixed_precision_below_root(c: Checker, rank: int) -> None:
    """FSDP casts the inputs of each unit's own forward: a unit below an unsharded root sees
    what the root computed on the raw inputs (review s10: they were cast first, 51% off), and a
    first layer outside any unit sees them as given (review s10: a TypeError)."""
    f64 = MixedPrecisionPolicy(param_dtype=torch.float64)
    X, y = data()

    # (a) float64 units below a float32 root that scales the inputs: float32 rounding, then cast
    plain = Scaled(make_mlp())
    sharded = copy.deepcopy(plain)
    fully_shard(sharded.net[0], mp_policy=f64)
    fully_shard(sharded.net, mp_policy=f64)
    net64 = copy.deepcopy(plain.net).double()
    ref = Emulated([("net.", net64, torch.float64)], pre=lambda x: x * 0.1)
    want = brute(ref, ref.named_for(), X, y)
    _measure(c, "float64 units below a float32 root", sharded, X, y, want, rtol=1e-10)

    # (b) only the last Linear a float64 unit: the first layers compute in float32 as given
    plain = make_mlp()
    sharded = copy.deepcopy(plain)
    fully_shard(sharded[4], mp_policy=f64)
    ref = Emulated(
        [
            ("", copy.deepcopy(plain[:4]), None),
            ("4.", copy.deepcopy(plain[4]).double(), torch.float64),
        ],
        pre=lambda x: x,
    )
    want = brute(ref, ref.named_for(), X, y)
    _measure(c, "only the last Linear a float64 unit", sharded, X, y, want, rtol=1e-5)

    # (c) the model a unit without a policy, its first layer a float64 unit (float32 output)
    sharded = copy.deepcopy(plain)
    fully_shard(
        sharded[0],
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.float64, output_dtype=torch.float32),
    )
    fully_shard(sharded)
    first = copy.deepcopy(plain[0]).double()
    ref = Emulated(
        [("0.", first, torch.float64), ("", copy.deepcopy(plain[1:]), torch.float32)],
        pre=lambda x: x,
    )
    want = brute(ref, ref.named_for(), X, y)  # a Sequential's slice keeps its indices
    _measure(c, "a float64 first unit in an unsharded-policy root", sharded, X, y, want, rtol=1e-5)

    # (d) the review's case: bfloat16 units below a root that centres inputs near 1000
    Xc, yc = data(torch.float64, shift=1000.0)
    plain = Scaled(make_mlp(torch.float64), scale=1.0, shift=1000.0)
    sharded = copy.deepcopy(plain).float()
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(sharded.net[0], mp_policy=bf16)
    fully_shard(sharded.net, mp_policy=bf16)
    want = brute(plain, dict(plain.named_parameters()), Xc, yc)  # float64: to bf16 precision
    _measure(c, "bfloat16 units below a centring root", sharded, Xc.float(), yc, want, rtol=3e-2)

    # (e) the review's case: only the last Linear a bfloat16 unit (was a TypeError)
    plain = make_mlp(torch.float64)
    sharded = copy.deepcopy(plain).float()
    fully_shard(sharded[4], mp_policy=bf16)
    want = brute(plain, dict(plain.named_parameters()), X.double(), y)
    _measure(c, "only the last Linear a bfloat16 unit", sharded, X, y, want, rtol=3e-2)


# --------------------------------------------------------------------------- finding 2
def _raises(c: Checker, what: str, fn: Callable[[], Any], *needles: str) -> None:
    try:
        fn()
    except NotImplementedError as exc:
        missing = [n for n in needles if n not in str(exc)]
        c.true(f"{what}: message", not missing, f"missing {missing} in: {exc}")
    except Exception as exc:  # noqa: BLE001 - recorded
        c.true(f"{what}: NotImplementedError", False, f"{type(exc).__name__}: {exc}")
    else:
        c.true(f"{what}: raises", False, "no error")


def check_submodule_not_a_unit(c: Checker, rank: int) -> None:
    """``outer.net`` whose own layers belong to the enclosing unit's group: refused up front,
    saying so and what to do (review s10: blamed tensor parallelism); training goes on."""
    ce = nn.CrossEntropyLoss()
    X, y = data(torch.float64)
    mine = my_shard(X, y, rank)
    plain = Wrapper(make_mlp(torch.float64))
    for case, units, names in (
        ("layers 0, 2 and the root sharded", (0, 2), "['4.weight', '4.bias']"),
        ("the root alone sharded", (), "['0.weight', '0.bias', '2.weight', '2.bias'] and 2 more"),
    ):
        outer = copy.deepcopy(plain)
        for i in units:
            fully_shard(outer.net[i])
        fully_shard(outer)
        needles = ("not a fully_shard unit itself", names, "fully_shard(outer.net)")
        _raises(
            c, f"{case}: diag_fisher", lambda o=outer: cl.diag_fisher(o.net, ce, mine), *needles
        )
        _raises(
            c,
            f"{case}: gradient_stats",
            lambda o=outer: cl.gradient_stats(o.net, ce, mine),
            *needles,
        )
        _raises(c, f"{case}: Diagnostics", lambda o=outer: cl.Diagnostics(o.net, ce), *needles)
        # nothing pending, nothing changed: the whole model is measured and trains as before
        got = cl.diag_fisher(outer, ce, mine)
        ref = brute(plain, dict(plain.named_parameters()), X, y)
        c.close(f"{case}: diag_fisher of the enclosing unit", dict(got), ref["fisher"], 1e-10)
        ce(outer(X[:6]), y[:6]).backward()
        want = torch.autograd.grad(ce(plain(X[:6]), y[:6]), list(plain.parameters()))
        c.close(
            f"{case}: the training step after",
            {k: p.grad.full_tensor() for k, p in outer.named_parameters()},
            dict(zip([k for k, _ in plain.named_parameters()], want)),
        )
    # a submodule that is a unit itself is measured
    outer = copy.deepcopy(plain)
    for m in (outer.net[0], outer.net, outer):
        fully_shard(m)
    ref = brute(plain.net, dict(plain.net.named_parameters()), X, y)
    c.close(
        "outer.net a unit: diag_fisher",
        dict(cl.diag_fisher(outer.net, ce, mine)),
        ref["fisher"],
        1e-10,
    )


# --------------------------------------------------------------------------- finding 3
def check_noise_scale_dp_fails_together(c: Checker, rank: int) -> None:
    """A failure in one rank's pass (a label out of range, an empty shard) is raised on every
    rank and leaves no collective pending (review s10: the others waited in the all-reduce,
    which the failed rank's next collective then met)."""
    ce = nn.CrossEntropyLoss()
    model = make_mlp(torch.float64)
    X, y = data(torch.float64)
    lo, hi = (0, CUT) if rank == 0 else (CUT, N)
    bad = y[lo:hi].clone()
    if rank == 0:
        bad[1] = 5  # 3 classes
    for case, shard, own in (
        ("label out of range on rank 0", (X[lo:hi], bad), ValueError),
        ("empty shard on rank 1", (X[lo:hi], y[lo:hi]) if rank == 0 else [], ValueError),
    ):
        failing = 0 if case.endswith("rank 0") else 1
        try:
            data_parallel_noise_scale(model, ce, shard)
            c.true(f"{case}: raises on rank {rank}", False, "no error")
        except Exception as exc:  # noqa: BLE001 - recorded
            if rank == failing:
                c.true(
                    f"{case}: its own error", isinstance(exc, own), f"{type(exc).__name__}: {exc}"
                )
            else:
                c.true(
                    f"{case}: the other rank names it",
                    isinstance(exc, RuntimeError) and f"rank(s) [{failing}]" in str(exc),
                    f"{type(exc).__name__}: {exc}",
                )
        # the next collective call pairs with the other rank's: the right numbers
        est = data_parallel_noise_scale(model, ce, (X[lo:hi], y[lo:hi]))
        full = brute(model, dict(model.named_parameters()), X, y)
        c.true(f"{case}: next call sees all {N} examples", est.num_examples == N, str(est))
        c.true(
            f"{case}: next call's big-batch gradient",
            abs(est.big_batch_sq - _mean_grad_sq(model, X, y)) <= 1e-10 * est.big_batch_sq,
            f"{est.big_batch_sq} vs {_mean_grad_sq(model, X, y)} ({full['loss']})",
        )

    # Diagnostics(on_error="warn") under DDP: every rank warns at the bad step, training goes on
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    values = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cl.Diagnostics(
            ddp, ce, quantities=("noise_scale_dp",), every=1, on_error="warn"
        ) as dg:
            for step in range(3):
                opt.zero_grad()
                ce(ddp(X[lo:hi]), y[lo:hi]).backward()  # a DDP all-reduce: must not meet curvlab's
                opt.step()
                targets = bad if step == 1 else y[lo:hi]
                record = dg.step(step, X[lo:hi], targets)
                values.append(None if record is None else record["values"].get("noise_scale_dp"))
    failed = [str(w.message) for w in caught if "step 1" in str(w.message)]
    c.true(
        "Diagnostics: step 1 warned on this rank",
        len(failed) == 1,
        str([str(w.message) for w in caught]),
    )
    c.true(
        "Diagnostics: steps 0 and 2 measured",
        values[0] is not None and values[2] is not None,
        str(values),
    )
    c.true("Diagnostics: step 1 skipped", values[1] is None, str(values))
    t = torch.tensor([float(v) for v in (values[0], values[2])], dtype=torch.float64)
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(gathered, t)
    c.true(
        "Diagnostics: the same records on every rank",
        torch.equal(gathered[0], gathered[1]),
        str(gathered),
    )


def _mean_grad_sq(model: nn.Module, X: Tensor, y: Tensor) -> float:
    g = torch.autograd.grad(nn.functional.cross_entropy(model(X), y), list(model.parameters()))
    return float(sum((t.double() ** 2).sum() for t in g))


# --------------------------------------------------------------------------- the worker
CHECKS = {
    "mixed precision": check_mixed_precision_below_root,
    "submodule": check_submodule_not_a_unit,
    "noise scale dp": check_noise_scale_dp_fails_together,
}


def worker(rank: int, name: str, init_file: str, out_dir: str) -> None:
    join_gloo(rank, WORLD, init_file, 30)
    c = Checker(rank)
    try:
        CHECKS[name](c, rank)
    except Exception:  # noqa: BLE001 - reported below
        c.failures.append(traceback.format_exc())
    finally:
        report = {"checks": c.count, "failures": c.failures}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        leave_process()  # report written: no interpreter teardown


@pytest.mark.parametrize("name", list(CHECKS))
def test_spawned(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(worker, args=(name, str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    failures = []
    for rank in range(WORLD):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["checks"] >= 8, report
        failures += report["failures"]
    assert not failures, "\n".join(failures)
