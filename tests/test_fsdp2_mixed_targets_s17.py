"""Review s17, FSDP2 with a casting ``MixedPrecisionPolicy``: the targets are not cast.

FSDP casts the inputs of a unit's forward to ``param_dtype``, never the targets: the user's
``loss_fn(model(x), y)`` scores float32 targets against bfloat16 outputs in float32 (torch
promotes). curvlab cast the targets to the output's dtype, so on MSE targets that sit closer to the
outputs than bfloat16's spacing it measured another objective (in review: the loss 19% low,
2.543e-06 for 3.150e-06; the gradient norm 29% low), and BCE targets of another dtype, which
curvlab refuses without FSDP, were silently rounded.

Each test spawns two gloo CPU ranks (one thread each) with a short timeout (:data:`TIMEOUT`); the
checks run inside the spawned world and report through one JSON file per rank. The references are
brute force in float64 (``torch.func``) on the bfloat16 outputs the sharded model computes.
"""

from __future__ import annotations

import copy
import json
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.func import functional_call, vjp

import curvlab as cl
from tests.distributed_checks import Checker, join_gloo, leave_process

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - builds without FSDP2
    fully_shard = None

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or fully_shard is None,
    reason="torch.distributed / FSDP2 (fully_shard) is not available",
)

TIMEOUT = 20
"""Seconds any collective may wait: a regression fails instead of hanging."""

WORLD, N, K = 2, 8, 3  # two ranks of four examples each (equal shards), three outputs
U32, U16 = 2.0**-24, 2.0**-8  # unit roundoff of float32 and bfloat16


def setup() -> tuple[nn.Linear, Tensor, dict[str, Tensor], Tensor]:
    """A float32 Linear whose outputs sit near 1.5 (bfloat16's spacing there: 2**-7), inputs, the
    bfloat16 parameters FSDP computes with, and those bfloat16 outputs."""
    gen = torch.Generator().manual_seed(0)
    plain = nn.Linear(4, K)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(K, 4, generator=gen) * 0.1)
        plain.bias.fill_(1.5)
    X = torch.randn(N, 4, generator=gen)
    b16 = {k: v.detach().bfloat16() for k, v in plain.named_parameters()}
    return plain, X, b16, functional_call(plain, b16, (X.bfloat16(),))


def sharded(plain: nn.Module) -> nn.Module:
    model = copy.deepcopy(plain)
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    return model


def mine(rank: int, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    lo, hi = rank * N // WORLD, (rank + 1) * N // WORLD
    return X[lo:hi], y[lo:hi]


def _raises(c: Checker, what: str, fn: Callable[[], object], message: str) -> None:
    try:
        fn()
    except TypeError as exc:
        c.true(f"{what}: message", message in str(exc), f"{message!r} not in: {exc}")
    except Exception as exc:  # noqa: BLE001 - recorded
        c.true(f"{what}: TypeError", False, f"{type(exc).__name__}: {exc}")
    else:
        c.true(f"{what}: raises", False, "no error")


# --------------------------------------------------------------------------- the checks
def check_mse(c: Checker, rank: int) -> None:
    """float32 MSE targets within bfloat16's spacing of the bfloat16 outputs: the loss and the
    gradient norm are those of the user's ``MSELoss()(model(x), y)``, the targets exact."""
    gen = torch.Generator().manual_seed(1)
    plain, X, b16, out = setup()
    y = out.float() + 0.002 * torch.randn(N, K, generator=gen)  # residuals below 2**-7
    loss_fn = nn.MSELoss()
    with cl.Diagnostics(
        sharded(plain), loss_fn, quantities=("loss", "grad_norm"), every=1, on_error="raise"
    ) as dg:
        got = dg.step(0, *mine(rank, X, y))["values"]

    # brute force, float64: the loss of the bfloat16 outputs against the exact targets and its
    # gradient, the vector-Jacobian product of the (float64) layer with the loss's cotangent
    r = out.double() - y.double()
    loss = (r**2).mean()
    cot = 2 * r / r.numel()
    p64 = {k: v.double() for k, v in b16.items()}
    _, pullback = vjp(lambda p: functional_call(plain, p, (X.bfloat16().double(),)), p64)
    grads = pullback(cot)[0]
    norm = torch.cat([g.reshape(-1) for g in grads.values()]).norm()

    # the loss in float32: out - y rounds by u32 |y| per entry (the outputs are exact in float32),
    # d(sum r^2) <= 2 u32 max|y| sum|r|, plus the sum of N K float32 terms
    rtol_loss = 2 * U32 * float(y.abs().max() * r.abs().sum() / (r**2).sum()) + N * K * U32
    # the gradient from bfloat16 pieces: the cotangent rounded to the output's dtype, the layer's
    # per-example products and their accumulation, each at most u16 relative to |cot|^T |x|
    absolute = torch.cat(
        [(cot.abs().T @ X.bfloat16().double().abs()).reshape(-1), cot.abs().sum(0)]
    )
    rtol_grad = 4 * U16 * float(absolute.norm() / norm)
    # the bfloat16-rounded targets (the old cast) move both far beyond these tolerances
    rb = out.double() - y.bfloat16().double()
    c.true("the case separates", float((((rb**2).mean() - loss) / loss).abs()) > 10 * rtol_loss)
    c.true("the gradient tolerance is tight", rtol_grad < 0.05, f"{rtol_grad}")
    for name, value, want, rtol in (
        ("loss", got["loss"], loss, rtol_loss),
        ("grad_norm", got["grad_norm"], norm, rtol_grad),
    ):
        err = abs(float(value) - float(want)) / float(want)
        c.true(f"MSE {name}", err <= rtol, f"{float(value):.6g} vs {float(want):.6g} ({err:.3g})")


def check_bce(c: Checker, rank: int) -> None:
    """BCE targets of another dtype than the bfloat16 logits are refused as without FSDP (they
    were rounded to bfloat16 silently); converted, they are scored as the user's loss scores them."""
    gen = torch.Generator().manual_seed(2)
    plain, X, b16, out = setup()
    y = torch.rand(N, K, generator=gen)  # float32 probabilities
    loss_fn = nn.BCEWithLogitsLoss()
    message = "convert them: y.to(torch.bfloat16)"

    def measure(targets: Tensor) -> dict[str, float]:
        with cl.Diagnostics(
            sharded(plain), loss_fn, quantities=("loss",), every=1, on_error="raise"
        ) as dg:
            return dg.step(0, *mine(rank, X, targets))["values"]

    _raises(c, "BCE float32 targets, FSDP2", lambda: measure(y), message)
    bf16_model = copy.deepcopy(plain).bfloat16()
    _raises(
        c,
        "BCE float32 targets, no FSDP (the same rule)",
        lambda: cl.analyze(
            bf16_model, loss_fn, (X.bfloat16(), y), quantities=("loss",), process_group="local"
        ),
        message,
    )
    yb = y.bfloat16()
    got = measure(yb)["loss"]
    z, t = out.double(), yb.double()
    terms = nn.functional.softplus(z) - t * z
    want = terms.mean()
    # float32 evaluation: each term within a few u32 of softplus(z) + |t z|
    rtol = 4 * U32 * float((nn.functional.softplus(z) + (t * z).abs()).sum() / terms.sum())
    err = abs(float(got) - float(want)) / float(want)
    c.true("BCE bfloat16 targets: loss", err <= rtol, f"{float(got):.8g} vs {float(want):.8g}")


CHECKS: dict[str, tuple[Callable[[Checker, int], None], int]] = {
    # name: (check, least number of checks on a rank)
    "mse": (check_mse, 4),
    "bce": (check_bce, 3),
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
    mp.spawn(worker, args=(name, str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    failures = []
    for rank in range(WORLD):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["checks"] >= CHECKS[name][1], report
        failures += report["failures"]
    assert not failures, "\n".join(failures)
