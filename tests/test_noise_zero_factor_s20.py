"""NoisyOptimizer's one-pass paths on a loss multiplied by 0 (review s20).

The captured samplers (``DiagFisherNoise("empirical")``, ``FisherTraceNoise``, ``KFACNoise``)
read the layer-output gradients of the step's backward pass and divide them by the gradient the
pass gives the loss module's output (the loop's factor on the loss, times a GradScaler's scale).
A schedule weight of 0 on warm-up steps (``(loss_fn(model(x), y) * 0.0).backward()`` inside the
capture) gave that gradient 0: the division was 0/0, so the Fisher diagonal, the trace and the
noise were NaN and the parameters NaN after ``step()``, without an error; ``KFACNoise`` raised
torch's ``_LinAlgError`` from its SVD. The noise of a step does not depend on the loop's factor:
it must be that of the separate pass ``step(inputs=, targets=)`` on the step's batch.

The reference is that separate pass, with the same seed, on a model whose gradients come from the
same ``loss * 0`` backward: SGD with ``lr=1`` then moves the parameters by exactly the noise, so
the two runs must agree bit for bit. A tiny factor (``1e-3``) is still read in the one pass (no
call of the sampler's ``estimate``) and exact: the captured empirical Fisher diagonal against dense
float64 brute force (``torch.func``).
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
from torch.func import functional_call, grad, jacrev, vmap

from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    KFACNoise,
    NoiseSampler,
    NoisyOptimizer,
)
from tests.distributed_checks import Checker, join_gloo, leave_process, same_on_all_ranks

SEED = 7
EPS = torch.finfo(torch.float64).eps

SAMPLERS: dict[str, Callable[[], NoiseSampler]] = {
    "diag-empirical": lambda: DiagFisherNoise("empirical", scale=0.3),
    "diag-mc": lambda: DiagFisherNoise("mc", scale=0.3),
    "diag-exact": lambda: DiagFisherNoise("exact", scale=0.3),
    "trace": lambda: FisherTraceNoise(scale=0.3),
    "kfac": lambda: KFACNoise("empirical", scale=0.3),
    "full-empirical": lambda: FullFisherNoise("empirical", scale=0.3),
    "full-true": lambda: FullFisherNoise("true", scale=0.3),
}
ONE_PASS = ("diag-empirical", "trace", "kfac")  # the samplers that divide by the loss's gradient


def _mlp() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.6)
    return model


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=g
    )


def _counted(sampler: NoiseSampler) -> list[int]:
    """Count the sampler's separate passes (its ``estimate`` calls)."""
    calls = [0]
    estimate = sampler.estimate

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return estimate(*args, **kwargs)

    sampler.estimate = counting  # type: ignore[method-assign]
    return calls


def _one_pass_step(
    name: str, factor: float, path: str, loss_factor: float | None = None
) -> tuple[nn.Module, NoisyOptimizer, int]:
    """A noisy SGD step (``lr=1``) on ``loss * factor`` through ``capture()`` or a closure."""
    model, (x, y), ce = _mlp(), _data(), nn.CrossEntropyLoss()
    sampler = SAMPLERS[name]()
    calls = _counted(sampler)
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), sampler, model, ce, seed=SEED
    )
    if path == "capture":
        noisy.zero_grad()
        with noisy.capture(loss_factor=loss_factor):
            (ce(model(x), y) * factor).backward()
        noisy.step()
    else:

        def closure() -> Tensor:
            noisy.zero_grad()
            loss = ce(model(x), y) * factor
            loss.backward()
            return loss

        noisy.step(closure, loss_factor=loss_factor)
    return model, noisy, calls[0]


def _separate_step(name: str, factor: float) -> tuple[nn.Module, NoisyOptimizer]:
    """The same step with the noise of the separate pass ``step(inputs=, targets=)``."""
    model, (x, y), ce = _mlp(), _data(), nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), SAMPLERS[name](), model, ce, seed=SEED
    )
    noisy.zero_grad()
    (ce(model(x), y) * factor).backward()
    noisy.step(inputs=x, targets=y)
    return model, noisy


def _brute_empirical_diag() -> dict[str, Tensor]:
    """``(1/N) sum_n (grad NLL_n)^2`` (mean cross-entropy's empirical Fisher diagonal), float64."""
    model, (x, y) = _mlp(), _data()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def nll(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        out = functional_call(model, p, (xn[None],))
        return F.cross_entropy(out, yn[None])

    per = vmap(grad(nll), in_dims=(None, 0, 0))(params, x, y)
    return {k: (g**2).mean(0) for k, g in per.items()}


@pytest.mark.parametrize("path", ["capture", "closure"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_zero_factor_draws_the_separate_pass_noise(name: str, path: str) -> None:
    model, noisy, _ = _one_pass_step(name, 0.0, path)
    ref, _ = _separate_step(name, 0.0)
    for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.isfinite(p).all(), pname
        assert torch.equal(p, q), pname  # the same pass, the same draw, the same addition
    if name in ONE_PASS:  # the cached state is the separate pass's (finite)
        state = noisy._state
        parts = list(state.values()) if isinstance(state, dict) else [state]
        tensors = [t for v in parts for t in (v.values() if isinstance(v, dict) else [v])]
        assert all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("path", ["capture", "closure"])
def test_zero_factor_empirical_diag_is_the_brute_force_one(path: str) -> None:
    _, noisy, calls = _one_pass_step("diag-empirical", 0.0, path)
    assert calls == 1  # measured in the separate pass
    brute = _brute_empirical_diag()
    # float64 per-example products and sums of 8 terms: a few ulps (64 eps of margin)
    for k, v in brute.items():
        torch.testing.assert_close(
            noisy._state[k], v, rtol=64 * EPS, atol=64 * EPS * float(v.max())
        )


@pytest.mark.parametrize("path", ["capture", "closure"])
@pytest.mark.parametrize("name", ONE_PASS)
def test_tiny_factor_stays_in_the_one_pass_and_exact(name: str, path: str) -> None:
    model, noisy, calls = _one_pass_step(name, 1e-3, path)
    assert calls == 0  # read in the step's own backward pass
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if name == "diag-empirical":
        brute = _brute_empirical_diag()
        # the captured per-example gradients are those of 1e-3 * L, divided by 1e-3: a few ulps
        for k, v in brute.items():
            torch.testing.assert_close(
                noisy._state[k], v, rtol=64 * EPS, atol=64 * EPS * float(v.max())
            )
    elif name == "trace":
        brute = _brute_empirical_diag()
        want = sum(float(v.sum()) for v in brute.values()) / sum(v.numel() for v in brute.values())
        assert abs(float(noisy._state) - want) <= 64 * EPS * want
    else:  # K-FAC: the separate pass's (canonical factors: the same draw) to rounding
        ref, _ = _separate_step(name, 1e-3)
        grads_ref = {k: p.detach() for k, p in ref.named_parameters()}
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), grads_ref[k], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", ["capture", "closure"])
@pytest.mark.parametrize("name", ["full-empirical", "full-true"])
def test_full_fisher_fold_with_a_stated_factor_and_a_zero_weight(name: str, path: str) -> None:
    """``loss_factor=`` states the accumulation factor, the loop multiplies by a warm-up weight
    of 0 as well: the fold would have scaled its noise by 0 (no noise at all, silently); the step
    draws in the separate pass instead."""
    model, _, calls = _one_pass_step(name, 0.0, path, loss_factor=0.5)
    assert calls == 1
    ref, _ = _separate_step(name, 0.0)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def _scaled(loss: Tensor) -> Tensor:
    """``GradScaler.scale(loss)``: its product is passed unread (a finite, positive scale)."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**4).scale(loss)


ZERO = torch.tensor(0.0, dtype=torch.float64)
INF = float("inf")
BACKWARDS: dict[str, tuple[Callable[[Tensor], None], bool]] = {
    # name: (the backward pass of the loss, whether it gives the loss a gradient of 0 / non-finite)
    "loss * 0.0": (lambda loss: (loss * 0.0).backward(), True),
    "0 * loss": (lambda loss: (0 * loss).backward(), True),
    "loss * cpu 0": (lambda loss: (loss * ZERO).backward(), True),
    "-(loss * 0.0) * 3": (lambda loss: (-(loss * 0.0) * 3).backward(), True),
    "loss / inf": (lambda loss: (loss / INF).backward(), True),
    "loss * nan": (lambda loss: (loss * float("nan")).backward(), True),
    "backward(0)": (lambda loss: loss.backward(ZERO), True),
    "autograd.backward(0)": (lambda loss: torch.autograd.backward([loss], [ZERO]), True),
    "scaled loss * 0.0": (lambda loss: _scaled(loss * 0.0).backward(), True),
    "scaled loss": (lambda loss: _scaled(loss).backward(), False),
    "loss * 1e-3": (lambda loss: (loss * 1e-3).backward(), False),
    "loss / 4": (lambda loss: (loss / 4).backward(), False),
    "loss + 0 * loss": (lambda loss: (loss + 0 * loss).backward(), False),  # gradient 1
    "loss": (lambda loss: loss.backward(), False),
}


@pytest.mark.parametrize("name", list(BACKWARDS))
def test_zero_factor_is_found_in_the_graph_before_the_backward_pass(name: str) -> None:
    """The loss output's gradient is never read (on an accelerator a host synchronisation): a
    zero or non-finite constant readable on the host (a Python number, a CPU scalar) is found on
    the way from the pass's roots to the loss before the pass runs, on any device."""
    backward, vanishes = BACKWARDS[name]
    model, (x, y), ce = _mlp(), _data(), nn.CrossEntropyLoss()
    taps = DiagFisherNoise("empirical", scale=0.3).capture(model, ce, torch.Generator())
    assert taps is not None
    with taps:
        backward(ce(model(x), y))
    assert taps.gradient_vanished() is vanishes
    assert (taps.result() is None) is vanishes
    if not vanishes:  # the captured diagonal is exact, whatever the factor
        brute = _brute_empirical_diag()
        state = taps.result()
        for k, v in brute.items():
            torch.testing.assert_close(state[k], v, rtol=64 * EPS, atol=64 * EPS * float(v.max()))


def test_zero_factor_names_the_cause_where_the_separate_pass_cannot_run() -> None:
    """A loss input of selected positions cannot be rebuilt by the separate pass: a clear error
    naming the zero gradient, not NaN parameters."""
    model, (x, y), ce = _mlp(), _data(), nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), DiagFisherNoise(scale=0.3), model, ce
    )
    before = [p.detach().clone() for p in model.parameters()]
    noisy.zero_grad()
    with noisy.capture():
        (ce(model(x)[:6], y[:6]) * 0.0).backward()
    with pytest.raises(RuntimeError, match="gradient of 0"):
        noisy.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# --------------------------------------------------------------------------- DDP (two gloo ranks)
WORLD, SHARDS = 2, (3, 5)
TIMEOUT, DEADLINE = 10, 90  # seconds a collective may wait; the whole spawned world


def _shards() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(100)
    return [
        (
            torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for n in SHARDS
    ]


def _global_diag(model: nn.Module) -> dict[str, Tensor]:
    """``(1/N) sum_n (grad NLL_n)^2`` over both shards (float64 brute force)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for X, y in _shards():
        jac = jacrev(
            lambda p, X=X, y=y: F.cross_entropy(
                functional_call(model, p, (X,)), y, reduction="none"
            )
        )(params)
        for k in total:
            total[k] += jac[k].pow(2).sum(0)
    return {k: v / sum(SHARDS) for k, v in total.items()}


def _check_ddp(c: Checker, rank: int) -> None:
    """Rank 1's loss carries a weight of 0, rank 0's none: both ranks measure in the separate
    pass (agreed in the capture's one all-reduce), the global batch's diagonal, no NaN, no hang."""
    model = _mlp()
    want = _global_diag(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    ce = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), DiagFisherNoise(scale=0.3), ddp, ce, seed=SEED
    )
    X, y = _shards()[rank]
    noisy.zero_grad()
    with noisy.capture():
        (ce(ddp(X), y) * (0.0 if rank == 1 else 1.0)).backward()
    started = time.monotonic()
    noisy.step()
    c.true("no wait", time.monotonic() - started < TIMEOUT / 2, "waited for a timeout")
    scale = max(float(v.max()) for v in want.values())
    err = max(float((noisy._state[k] - v).abs().max()) for k, v in want.items())
    # sums of 8 squared float64 gradients of a few dozen operations each
    c.true("the global batch's diagonal", err <= 256 * EPS * scale, f"error {err:.3g}")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    c.true("finite parameters", bool(torch.isfinite(flat).all()))
    c.true("replicas bitwise identical", same_on_all_ranks(flat))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    join_gloo(rank, WORLD, init_file, TIMEOUT)
    c = Checker(rank)
    try:
        _check_ddp(c, rank)
    except Exception:  # noqa: BLE001 - reported below
        c.failures.append(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        report = {"checks": c.count, "failures": c.failures}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        leave_process()  # report written: no interpreter teardown


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_zero_factor_on_one_ddp_rank(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the spawned world did not finish within {DEADLINE} s (a hang)")
    failures = []
    for rank in range(WORLD):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["checks"] >= 4, report
        failures += report["failures"]
    assert not failures, "\n".join(failures)
