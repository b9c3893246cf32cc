"""First-order curvature on an FSDP2 (``fully_shard``) model: 2 gloo CPU ranks, one process each.

Both ranks hold shards of every parameter and pass their own (uneven) shard of the data, in a
different number of batches; every first-order quantity must equal one process on all the data
(computed on each rank with an unsharded copy and ``process_group="local"``) on every rank.
The checks run inside one spawned world (:func:`worker`) and report through one JSON file per
rank; failures are collected, not raised, so both ranks keep issuing the same collectives.
"""

from __future__ import annotations

import copy
import json
import math
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import curvlab as cl
from curvlab import _fsdp
from curvlab.backends import _fsdp2
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    MultiplicativeNoise,
    NoisyOptimizer,
)
from tests.distributed_checks import Checker, join_gloo, leave_process, same_on_all_ranks

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - builds without FSDP2
    fully_shard = None

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or fully_shard is None,
    reason="torch.distributed / FSDP2 (fully_shard) is not available",
)

WORLD = 2
SIZES = [9, 14]  # examples per rank
FIRST_ORDER = ("loss", "grad_norm", "trace_empirical_fisher", "noise_scale", "trace_fisher")


# --------------------------------------------------------------------------- models and data
def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.6)
    return model


def make_mlp() -> nn.Module:
    return _init(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.tanh(self.fc1(self.ln(x))))


class TinyLM(nn.Module):
    """Token and position embeddings, two residual blocks, a final LayerNorm, a tied head."""

    def __init__(self, vocab: int = 7, length: int = 4, d: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (B, T, V): the GPT layout


def make_lm() -> nn.Module:
    return _init(TinyLM().double(), seed=3)


def shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` every Linear / block, then the root (a copy: the original stays plain)."""
    model = copy.deepcopy(model)
    if isinstance(model, TinyLM):
        for block in model.blocks:
            fully_shard(block)
    elif isinstance(model, nn.Sequential):
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
    return fully_shard(model)


def mlp_data(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def lm_data(n: int, seed: int = 2) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 7, (n, 4), generator=gen)
    y = torch.randint(0, 7, (n, 4), generator=gen)
    y[:, 0] = -100  # ignored positions
    return idx, y


def my_shard(X: Tensor, y: Tensor, rank: int) -> list[tuple[Tensor, Tensor]]:
    """This rank's examples: two batches on rank 0, one on rank 1 (different batch counts)."""
    lo = sum(SIZES[:rank])
    hi = lo + SIZES[rank]
    if rank == 0:
        cut = lo + 4
        return [(X[lo:cut], y[lo:cut]), (X[cut:hi], y[cut:hi])]
    return [(X[lo:hi], y[lo:hi])]


# --------------------------------------------------------------------------- the checks
LOCAL = {"process_group": "local"}


def check_deterministic(c: Checker, rank: int) -> None:
    """Empirical and exact diagonals, gradient mean, variance, noise scale: one process's."""
    n = sum(SIZES)
    cases: list[tuple[str, Callable[[], nn.Module], Any, nn.Module]] = [
        ("mlp mean", make_mlp, mlp_data(n), nn.CrossEntropyLoss()),
        ("mlp sum", make_mlp, mlp_data(n), nn.CrossEntropyLoss(reduction="sum")),
        ("lm ignore_index", make_lm, lm_data(n), nn.CrossEntropyLoss()),
    ]
    for label, make, (X, y), loss_fn in cases:
        plain = make()
        sharded = shard(plain)
        mine, full = my_shard(X, y, rank), [(X, y)]
        names = [k for k, _ in plain.named_parameters()]
        for kind in ("empirical", "exact"):
            got = cl.diag_fisher(sharded, loss_fn, mine, kind=kind)
            want = cl.diag_fisher(plain, loss_fn, full, kind=kind, **LOCAL)
            c.close(f"{label} diag_fisher {kind}", dict(got), dict(want))
            c.true(f"{label} {kind} keys are the user's names", list(got) == names, str(list(got)))
            c.true(
                f"{label} {kind} full plain tensors",
                all(type(v) is Tensor for v in got.values()),
                str({k: type(v).__name__ for k, v in got.items()}),
            )
            c.true(f"{label} {kind} identical on every rank", same_on_all_ranks(_flat(got)))
        s = cl.gradient_stats(sharded, loss_fn, mine)
        r = cl.gradient_stats(plain, loss_fn, full, **LOCAL)
        c.close(f"{label} gradient mean", s.mean, r.mean)
        c.close(f"{label} gradient variance", s.variance, r.variance)
        c.close(f"{label} second moment", s.second_moment, r.second_moment)
        c.close(
            f"{label} noise scale",
            [s.trace_covariance, s.noise_scale, s.num_examples],
            [r.trace_covariance, r.noise_scale, r.num_examples],
        )
        c.true(f"{label} model still sharded", _all_dtensors(sharded))
    # params=: the selected block, keyed by the user's names
    X, y = mlp_data(n)
    plain = make_mlp()
    sharded = shard(plain)
    got = cl.diag_fisher(sharded, nn.CrossEntropyLoss(), my_shard(X, y, rank), params="2")
    want = cl.diag_fisher(plain, nn.CrossEntropyLoss(), (X, y), params="2", **LOCAL)
    c.close("params= diag_fisher", dict(got), dict(want))
    s = cl.gradient_stats(sharded, nn.CrossEntropyLoss(), my_shard(X, y, rank), params="0.weight")
    r = cl.gradient_stats(plain, nn.CrossEntropyLoss(), (X, y), params="0.weight", **LOCAL)
    c.close(
        "params= noise scale",
        [s.noise_scale, s.trace_covariance],
        [r.noise_scale, r.trace_covariance],
    )


def _flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.detach().reshape(-1).double() for v in d.values()])


def _all_dtensors(model: nn.Module) -> bool:
    return all(isinstance(p, DTensor) for p in model.parameters())


def check_monte_carlo(c: Checker, rank: int) -> None:
    """MC diagonals: identical on every rank, unbiased for the GGN diagonal."""
    X, y = mlp_data(sum(SIZES))
    loss_fn = nn.CrossEntropyLoss()
    plain = make_mlp()
    sharded = shard(plain)
    mine = my_shard(X, y, rank)
    exact = float(_flat(cl.diag_fisher(plain, loss_fn, (X, y), kind="exact", **LOCAL)).sum())
    traces = []
    for seed in range(30):
        d = cl.diag_fisher(sharded, loss_fn, mine, kind="mc", seed=seed)
        c.true(f"mc seed {seed} identical on every rank", same_on_all_ranks(_flat(d)))
        traces.append(float(_flat(d).sum()))
    t = torch.tensor(traces, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(traces)))
    c.true(
        "mc diag unbiased",
        abs(float(t.mean()) - exact) <= 4 * se + 1e-12,
        f"{float(t.mean())} vs {exact} (se {se})",
    )
    lm, (idx, ty) = make_lm(), lm_data(sum(SIZES))
    d = cl.diag_fisher(shard(lm), loss_fn, my_shard(idx, ty, rank), kind="mc", mc_samples=2)
    c.true("lm mc identical on every rank", same_on_all_ranks(_flat(d)))


def check_diagnostics(c: Checker, rank: int) -> None:
    """Diagnostics' first-order measurements of all shards, on every rank."""
    X, y = mlp_data(sum(SIZES), seed=5)
    loss_fn = nn.CrossEntropyLoss()
    plain = make_mlp()
    sharded = shard(plain)
    lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    with cl.Diagnostics(sharded, loss_fn, quantities=FIRST_ORDER, every=1, on_error="raise") as dg:
        rec = dg.step(0, X[lo:hi], y[lo:hi])
    want = cl.analyze(
        plain, loss_fn, (X, y), quantities=FIRST_ORDER[:4], on_error="raise", **LOCAL
    ).entries[0]["values"]
    got = rec["values"]
    c.close("diagnostics first order", {k: got[k] for k in want}, want)
    c.true(
        "diagnostics trace_fisher identical on every rank",
        same_on_all_ranks(torch.tensor([got["trace_fisher"]])),
    )
    c.true("diagnostics trace_fisher finite", math.isfinite(got["trace_fisher"]))


def _settings(model: nn.Module) -> list[tuple[bool, bool]]:
    """Each FSDP parameter group's (reshard after forward, reshard after backward)."""
    return [
        (g.post_forward_mesh_info is not None, g.reshard_after_backward)
        for m in model.modules()
        if hasattr(m, "_get_fsdp_state")
        for g in m._get_fsdp_state()._fsdp_param_groups
    ]


def check_mixed_precision(c: Checker, rank: int) -> None:
    """A bfloat16 MixedPrecisionPolicy: FSDP casts the inputs, curvlab computes in bfloat16."""
    X, y = mlp_data(sum(SIZES), seed=9)
    loss_fn = nn.CrossEntropyLoss()
    plain = make_mlp()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    sharded = copy.deepcopy(plain).float()
    for m in (sharded[0], sharded[2], sharded):
        fully_shard(m, mp_policy=policy)
    got = cl.diag_fisher(sharded, loss_fn, my_shard(X.float(), y, rank))
    want = cl.diag_fisher(plain, loss_fn, (X, y), **LOCAL)
    c.close("bfloat16 diagonal (to bfloat16 precision)", dict(got), dict(want), rtol=3e-2)


def check_training_untouched(c: Checker, rank: int) -> None:
    """The user's sharded gradients survive a call; training afterwards is FSDP's as before."""
    X, y = mlp_data(sum(SIZES), seed=7)
    loss_fn = nn.CrossEntropyLoss()
    plain = make_mlp()
    sharded = shard(plain)
    sharded[0].set_reshard_after_forward(False)  # a user's setting the call must keep
    loss_fn(sharded(X[:6]), y[:6]).backward()  # the same 6 examples on both ranks
    before = {k: p.grad.to_local().clone() for k, p in sharded.named_parameters()}
    settings = _settings(sharded)
    F = cl.diag_fisher(sharded, loss_fn, my_shard(X, y, rank))
    after = {k: p.grad.to_local() for k, p in sharded.named_parameters()}
    c.true("sharded .grad untouched", all(torch.equal(before[k], after[k]) for k in before))
    c.true("FSDP's settings kept", _settings(sharded) == settings, str(settings))
    for p in sharded.parameters():
        p.grad = None
    loss_fn(sharded(X[:6]), y[:6]).backward()
    ref = dict(zip(before, torch.autograd.grad(loss_fn(plain(X[:6]), y[:6]), plain.parameters())))
    c.close(
        "training gradient after the call",
        {k: p.grad.full_tensor() for k, p in sharded.named_parameters()},
        ref,
    )
    # the documented way to place a result like its parameter (no communication)
    placed = {
        k: distribute_tensor(F[k], p.device_mesh, p.placements, src_data_rank=None)
        for k, p in sharded.named_parameters()
    }
    c.true(
        "distribute_tensor places results like the parameters",
        all(
            placed[k].to_local().shape == p.to_local().shape
            and torch.equal(placed[k].full_tensor(), F[k])
            for k, p in sharded.named_parameters()
        ),
    )


class Wrapper(nn.Module):
    """A training wrapper around a network: the root of the sharding, ``net`` a submodule."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.extra = _init(nn.Linear(3, 3).double(), seed=5)

    def forward(self, x: Tensor) -> Tensor:
        return self.extra(self.net(x))


def _train_grads(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """One training forward and backward (FSDP's own); the full gradients by name."""
    loss_fn(model(X), y).backward()
    return {k: p.grad.full_tensor() for k, p in model.named_parameters()}


def check_lazy_init_untouched(c: Checker, rank: int) -> None:
    """A call before the first training forward leaves FSDP's root undecided (review s8): on a
    submodule of a larger FSDP tree (it became the root for good, and the training forward
    through the real root failed), on the real root, and on a model wrapped by a further
    ``fully_shard`` afterwards."""
    X, y = mlp_data(sum(SIZES), seed=13)
    loss_fn = nn.CrossEntropyLoss()
    plain = Wrapper(make_mlp())
    want_grads = dict(
        zip(
            [k for k, _ in plain.named_parameters()],
            torch.autograd.grad(loss_fn(plain(X[:6]), y[:6]), list(plain.parameters())),
        )
    )
    cases = ("submodule", "root", "wrapped later")
    for case in cases:
        outer = copy.deepcopy(plain)
        for m in (outer.net[0], outer.net[2], outer.net):
            fully_shard(m)
        if case != "wrapped later":
            fully_shard(outer)
        target = outer if case == "root" else outer.net
        try:
            got = cl.diag_fisher(target, loss_fn, my_shard(X, y, rank))
            want = cl.diag_fisher(plain if case == "root" else plain.net, loss_fn, (X, y), **LOCAL)
            c.close(f"lazy init, {case}: diag_fisher", dict(got), dict(want))
        except Exception as exc:  # noqa: BLE001 - recorded; the training below still runs
            c.true(f"lazy init, {case}: diag_fisher", False, f"{type(exc).__name__}: {exc}")
        if case == "wrapped later":
            fully_shard(outer)
        try:
            grads = _train_grads(outer, loss_fn, X[:6], y[:6])
            c.close(f"lazy init, {case}: the training step that follows", grads, want_grads)
        except Exception as exc:  # noqa: BLE001 - the defect: FSDP refused the real root
            c.true(f"lazy init, {case}: training forward", False, f"{type(exc).__name__}: {exc}")


class Scale(nn.Module):
    """A parameter outside any layer the hooks know."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


class Outside(nn.Module):
    """A Linear whose weight is used a second time outside the module."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = _init(nn.Linear(4, 3).double(), seed=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + x[:, :3] @ self.lin.weight[:, :3].T


def _raises(c: Checker, what: str, fn: Callable[[], Any], kind: type, *needles: str) -> None:
    try:
        fn()
    except kind as exc:
        msg = str(exc)
        missing = [n for n in needles if n not in msg]
        c.true(f"{what}: message", not missing, f"missing {missing} in: {msg}")
    except Exception as exc:  # noqa: BLE001 - recorded
        c.true(f"{what}: {kind.__name__}", False, f"{type(exc).__name__}: {exc}")
    else:
        c.true(f"{what}: raises", False, "no error")


def check_errors(c: Checker, rank: int) -> None:
    """What FSDP2 does not support is refused before any work, saying what to use."""
    X, y = mlp_data(sum(SIZES))
    loss_fn = nn.CrossEntropyLoss()
    sharded = shard(make_mlp())
    data = my_shard(X, y, rank)
    advice = ("first-order", "diag_fisher", "gradient_stats", "full_state_dict=True")
    calls: dict[str, Callable[[], Any]] = {
        "diag_hessian": lambda: cl.diag_hessian(sharded, loss_fn, data),
        "trace": lambda: cl.trace(sharded, loss_fn, data, num_probes=2, seed=0),
        "eigenvalues": lambda: cl.eigenvalues(sharded, loss_fn, data, k=1),
        "curvature_operator": lambda: cl.curvature_operator(sharded, loss_fn, data, "ggn"),
        "kfac": lambda: cl.kfac(sharded, loss_fn, data),
        "fisher_norms": lambda: cl.fisher_norms(sharded, loss_fn, data),
        "analyze": lambda: cl.analyze(sharded, loss_fn, data, quantities=("loss",)),
        "fisher_trace": lambda: cl.fisher_trace(sharded, loss_fn, data, seed=0),
        "sampler.sample": lambda: KFACNoise(scale=0.1).sample(sharded, loss_fn, X[:4], y[:4]),
        "NoisyOptimizer": lambda: NoisyOptimizer(
            torch.optim.SGD(sharded.parameters(), lr=0.1),
            MultiplicativeNoise(0.1),
            sharded,
            loss_fn,
        ),
    }
    for what, fn in calls.items():
        _raises(c, f"FSDP2 {what}", fn, NotImplementedError, "FSDP2", *advice)
    _raises(
        c,
        "FSDP2 Diagnostics second order",
        lambda: cl.Diagnostics(sharded, loss_fn, quantities=("loss", "trace_hessian")),
        NotImplementedError,
        "trace_hessian",
        "grad_norm",
    )
    # the local-only quantities got the DDP hint process_group='local', which FSDP2 refuses too
    # (review s20): the FSDP2 message, naming what it measures
    for name in ("noise_scale_hessian", "critical_sharpness"):
        _raises(
            c,
            f"FSDP2 Diagnostics {name}",
            lambda name=name: cl.Diagnostics(sharded, loss_fn, quantities=("loss", name)),
            NotImplementedError,
            "on an FSDP2 (fully_shard) model",
            "grad_norm",
        )
    _raises(
        c,
        "FSDP2 backend='func'",
        lambda: cl.diag_fisher(sharded, loss_fn, data, backend="func"),
        ValueError,
        "hooks",
    )
    odd = shard(nn.Sequential(nn.Linear(4, 3).double(), Scale()))
    _raises(
        c,
        "FSDP2 parameter outside known layers",
        lambda: cl.diag_fisher(odd, loss_fn, data),
        NotImplementedError,
        "1.s",
        "full_state_dict=True",
    )
    # review s24: a train-mode BatchNorm and an all-frozen model were refused as parameters
    # the hooks do not cover ("these are not: ['1.weight', '1.bias']" / "[]"); one process's
    # ValueError, on every rank, before the all-gather
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    bn_sharded = shard(bn)
    for what, fn in (
        ("one process", lambda: cl.diag_fisher(bn, loss_fn, (X, y), **LOCAL)),
        ("FSDP2", lambda: cl.diag_fisher(bn_sharded, loss_fn, data)),
    ):
        _raises(
            c,
            f"{what} train-mode BatchNorm",
            fn,
            ValueError,
            "BatchNorm1d at '1' is in train mode",
            "model.eval()",
        )
    frozen = shard(make_mlp()).requires_grad_(False)
    for what, fn in (
        ("diag_fisher", lambda: cl.diag_fisher(frozen, loss_fn, data)),
        ("gradient_stats", lambda: cl.gradient_stats(frozen, loss_fn, data)),
    ):
        _raises(c, f"FSDP2 {what} all frozen", fn, ValueError, "no trainable parameters")
    outside = shard(Outside())
    _raises(
        c,
        "FSDP2 weight used outside its module (found inside the pass)",
        lambda: cl.diag_fisher(outside, loss_fn, data),
        NotImplementedError,
        "enters the loss 2 times",
        "full_state_dict=True",
    )
    loss_fn(outside(X[:6]), y[:6]).backward()  # FSDP still trains after the refusal mid-pass
    ref = Outside()
    want = torch.autograd.grad(loss_fn(ref(X[:6]), y[:6]), ref.parameters())
    c.close(
        "training after a refusal mid-pass",
        {k: p.grad.full_tensor() for k, p in outside.named_parameters()},
        dict(zip([k for k, _ in ref.named_parameters()], want)),
    )
    limit = _fsdp2.MAX_EXACT_COLUMNS
    _fsdp2.MAX_EXACT_COLUMNS = 2
    try:
        _raises(
            c,
            "FSDP2 exact diagonal beyond its column budget",
            lambda: cl.diag_fisher(sharded, loss_fn, data, kind="exact"),
            NotImplementedError,
            "kind='mc'",
        )
    finally:
        _fsdp2.MAX_EXACT_COLUMNS = limit
    c.true(
        "models still sharded after the refusals",
        all(_all_dtensors(m) for m in (sharded, odd, outside, bn_sharded, frozen)),
    )
    # after a refusal inside the pass, the model still computes (and trains) normally
    got = cl.diag_fisher(sharded, loss_fn, data)
    want = cl.diag_fisher(make_mlp(), loss_fn, (X, y), **LOCAL)
    c.close("diag_fisher after the refusals", dict(got), dict(want))


# --------------------------------------------------------------------------- noise
NOISY_STEPS = 6  # each way of stepping twice
STEP_BATCH = 10  # examples per step, half on each rank (equal shards: FSDP2 averages gradients)
WAYS = ("closure", "capture", "inputs")


def _loss(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """The training loss; a GPT-layout output ``(B, T, V)`` flattened as training loops do."""
    out = model(X)
    if out.ndim == 3:
        return loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return loss_fn(out, y)


def _noisy_train(
    model: nn.Module,
    sampler: Any,
    loss_fn: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    lr: float = 0.1,
    **kw: Any,
) -> tuple[NoisyOptimizer, dict[int, Any]]:
    """SGD(momentum) + ``NoisyOptimizer`` over ``batches`` (one per step), cycling through the
    three ways of stepping; returns the optimizer and the measured state after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    noisy = NoisyOptimizer(opt, sampler, model, loss_fn, seed=11, **kw)
    states = []
    for step, (X, y) in enumerate(batches):
        way = WAYS[step % len(WAYS)]
        if way == "closure":

            def closure(X: Tensor = X, y: Tensor = y) -> Tensor:
                noisy.zero_grad()
                loss = _loss(model, loss_fn, X, y)
                loss.backward()
                return loss

            noisy.step(closure)
        elif way == "capture":
            noisy.zero_grad()
            with noisy.capture():
                _loss(model, loss_fn, X, y).backward()
            noisy.step()
        else:
            noisy.zero_grad()
            _loss(model, loss_fn, X, y).backward()
            noisy.step(inputs=X, targets=y)
        states.append(noisy._state)
    return noisy, dict(enumerate(states))


def _step_batches(data: Callable[..., tuple[Tensor, Tensor]], rank: int | None) -> list:
    """Each step's batch: all of it (``rank=None``) or this rank's equal half."""
    out = []
    for step in range(NOISY_STEPS):
        X, y = data(STEP_BATCH, seed=60 + step)
        if rank is not None:
            half = STEP_BATCH // WORLD
            X, y = X[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        out.append((X, y))
    return out


def _params(model: nn.Module) -> dict[str, Tensor]:
    """The (gathered, for a sharded model) parameters."""
    return {
        k: p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        for k, p in model.named_parameters()
    }


def _far(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return float((_flat(a) - _flat(b)).abs().max()) > 1e-3


def _noisy_cases() -> list[tuple[str, Callable[[], nn.Module], Callable[..., Any]]]:
    return [("mlp", make_mlp, mlp_data), ("lm", make_lm, lm_data)]


def check_noisy_optimizer(c: Checker, rank: int) -> None:
    """Training a sharded model with noise equals one process training on the whole batch.

    Each rank passes its (equal) half of every step's batch; the curvature is that of the whole
    batch and the noise one draw shared by every rank, of which each adds its part to its
    sharded gradient: after the steps the gathered parameters equal those of one process
    (``process_group="local"``, same seed) to 1e-6, and differ clearly from a run without noise.
    The MLP's 5- and 3-row weights and biases and the LM's 7-token (tied) embedding have a first
    dimension that 2 ranks shard unevenly.
    """
    loss_fn = nn.CrossEntropyLoss()
    samplers = [
        ("diag empirical", lambda: DiagFisherNoise("empirical", scale=0.3)),
        ("diag exact", lambda: DiagFisherNoise("exact", scale=0.3)),
        ("fisher trace", lambda: FisherTraceNoise(scale=0.3)),
    ]
    for label, make, data in _noisy_cases():
        plain = make()
        mine, full = _step_batches(data, rank), _step_batches(data, None)
        quiet = copy.deepcopy(plain)
        _noisy_train(quiet, IsotropicNoise(0.0), loss_fn, full, **LOCAL)
        trained = shard(plain)  # FSDP's settings after its first forward (the root's change)
        _loss(trained, loss_fn, *mine[0]).backward()
        settings = _settings(trained)
        for name, sampler in samplers:
            what = f"noisy {label} {name}"
            sharded = shard(plain)
            noisy, got = _noisy_train(sharded, sampler(), loss_fn, mine)
            ref = copy.deepcopy(plain)
            _, want = _noisy_train(ref, sampler(), loss_fn, full, **LOCAL)
            c.close(f"{what}: parameters after {NOISY_STEPS} steps", _params(sharded), _params(ref))
            c.close(f"{what}: curvature of the whole batch every step", got, want)
            c.true(f"{what}: the noise matters", _far(_params(sharded), _params(quiet)))
            c.true(f"{what}: still sharded", _all_dtensors(sharded))
            c.true(f"{what}: FSDP's settings kept", _settings(sharded) == settings)
            c.true(f"{what}: info says so", "separate pass" in noisy.info.get("fsdp2", ""))
    # Isotropic noise: no curvature, the same shared draw
    plain = make_mlp()
    sharded = shard(plain)
    noisy, _ = _noisy_train(sharded, IsotropicNoise(0.2), loss_fn, _step_batches(mlp_data, rank))
    ref = copy.deepcopy(plain)
    _noisy_train(ref, IsotropicNoise(0.2), loss_fn, _step_batches(mlp_data, None), **LOCAL)
    c.close("noisy isotropic: parameters", _params(sharded), _params(ref))
    # recompute_every=2: the state of steps 0, 2, 4 reused on the step after
    sharded = shard(plain)
    sampler = DiagFisherNoise("exact", scale=0.3)
    noisy, got = _noisy_train(
        sharded, sampler, loss_fn, _step_batches(mlp_data, rank), recompute_every=2
    )
    ref = copy.deepcopy(plain)
    _, want = _noisy_train(
        ref, sampler, loss_fn, _step_batches(mlp_data, None), recompute_every=2, **LOCAL
    )
    c.close("noisy recompute_every=2: parameters", _params(sharded), _params(ref))
    c.close("noisy recompute_every=2: states", got, want)
    c.true(
        "noisy recompute_every=2: reused",
        all(got[k] is got[k + 1] for k in range(0, NOISY_STEPS, 2)) and noisy._state_step == 4,
    )


@contextmanager
def _counting_passes() -> Iterator[list[int]]:
    """Count the FSDP2 route's passes (``unsharded`` blocks) inside the block."""
    count = [0]
    original = _fsdp2.unsharded

    @contextmanager
    def counted(model: nn.Module) -> Iterator[None]:
        count[0] += 1
        with original(model):
            yield

    _fsdp2.unsharded = counted
    try:
        yield count
    finally:
        _fsdp2.unsharded = original


def check_noisy_uneven(c: Checker, rank: int) -> None:
    """Uneven shards: the measured state is that of all ranks' examples (each way of stepping)."""
    loss_fn = nn.CrossEntropyLoss()
    lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    for label, make, data in _noisy_cases():
        X, y = data(sum(SIZES), seed=8)
        plain = make()
        for sampler in (DiagFisherNoise("empirical", scale=0.3), FisherTraceNoise(scale=0.3)):
            what = f"noisy uneven {label} {type(sampler).__name__}"
            want = dict(cl.diag_fisher(plain, loss_fn, (X, y), **LOCAL))
            if isinstance(sampler, FisherTraceNoise):
                want = _flat(want).mean()
            # lr=0: every step measures at the same parameters, one step per way of stepping
            mine = [(X[lo:hi], y[lo:hi])] * len(WAYS)
            with _counting_passes() as passes:
                _, got = _noisy_train(shard(plain), sampler, loss_fn, mine, lr=0.0)
            for way, state in zip(WAYS, got.values()):
                c.close(f"{what} {way}: state of all ranks' data", state, want)
            c.true(f"{what}: a separate pass every step", passes[0] == len(WAYS), str(passes))


def check_noisy_mc(c: Checker, rank: int) -> None:
    """Monte-Carlo diagonal: every rank measures the same state and adds its part of one draw,
    exactly as DistributedDataParallel does with the same shards and seed."""
    loss_fn = nn.CrossEntropyLoss()
    plain = make_mlp()
    mine = _step_batches(mlp_data, rank)
    sharded = shard(plain)
    _, got = _noisy_train(sharded, DiagFisherNoise("mc", scale=0.3), loss_fn, mine)
    c.true(
        "noisy mc: state identical on every rank", same_on_all_ranks(_flat(got[NOISY_STEPS - 1]))
    )
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
    _, want = _noisy_train(ddp, DiagFisherNoise("mc", scale=0.3), loss_fn, mine)
    c.close("noisy mc: states as under DDP", got, want)
    c.close("noisy mc: parameters as under DDP", _params(sharded), _params(ddp.module))


def check_noisy_mixed_precision(c: Checker, rank: int) -> None:
    """A bfloat16 ``MixedPrecisionPolicy`` (float32 sharded parameters and gradients, bf16
    compute): the noisy run stays one model on every rank, and its noise is that of the whole
    batch's diagonal (the first step's state against one process, to bf16 precision)."""
    loss_fn = nn.CrossEntropyLoss()
    plain = make_mlp().float()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    batches = [(X.float(), y) for X, y in _step_batches(mlp_data, rank)]
    full = [(X.float(), y) for X, y in _step_batches(mlp_data, None)]

    def sharded_copy() -> nn.Module:
        m = copy.deepcopy(plain)
        for mod in (m[0], m[2], m):
            fully_shard(mod, mp_policy=policy)
        return m

    noisy_model, quiet_model = sharded_copy(), sharded_copy()
    noisy, states = _noisy_train(
        noisy_model, DiagFisherNoise("empirical", scale=0.3), loss_fn, batches
    )
    _noisy_train(quiet_model, IsotropicNoise(0.0), loss_fn, batches)
    got = _params(noisy_model)
    c.true("mixed precision noisy: one model on every rank", same_on_all_ranks(_flat(got)))
    c.true("mixed precision noisy: finite", bool(torch.isfinite(_flat(got)).all()))
    c.true("mixed precision noisy: the noise matters", _far(got, _params(quiet_model)))
    want = cl.diag_fisher(plain, loss_fn, full[0], **LOCAL)
    c.close("mixed precision noisy: first state (bf16)", states[0], dict(want), rtol=3e-2)
    c.true(
        "mixed precision noisy: parameters stay float32 shards",
        all(p.dtype == torch.float32 and isinstance(p, DTensor) for p in noisy_model.parameters()),
    )


def check_noisy_resume(c: Checker, rank: int) -> None:
    """A run checkpointed mid-way (the model's shards, ``NoisyOptimizer.state_dict()``: the
    optimizer's sharded state, the generator, the cached full-size curvature) and resumed in a
    fresh sharded model and optimizer continues bit for bit as the uninterrupted run."""
    loss_fn = nn.CrossEntropyLoss()
    plain = make_mlp()
    batches = _step_batches(mlp_data, rank)

    def noisy_for(model: nn.Module, seed: int) -> NoisyOptimizer:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sampler = DiagFisherNoise("exact", scale=0.3)
        return NoisyOptimizer(opt, sampler, model, loss_fn, seed=seed, recompute_every=2)

    def step(model: nn.Module, noisy: NoisyOptimizer, X: Tensor, y: Tensor) -> None:
        noisy.zero_grad()
        _loss(model, loss_fn, X, y).backward()
        noisy.step(inputs=X, targets=y)

    whole = shard(plain)
    n1 = noisy_for(whole, seed=11)
    for X, y in batches:
        step(whole, n1, X, y)
    first = shard(plain)
    n2 = noisy_for(first, seed=11)
    for X, y in batches[:3]:  # step 3 reuses the state measured at step 2
        step(first, n2, X, y)
    saved_params = {k: p.detach().clone() for k, p in first.named_parameters()}
    saved = copy.deepcopy(n2.state_dict())
    again = shard(plain)
    with torch.no_grad():
        for k, p in again.named_parameters():
            p.copy_(saved_params[k])
    n3 = noisy_for(again, seed=0)  # the generator comes from the checkpoint
    n3.load_state_dict(saved)
    for X, y in batches[3:]:
        step(again, n3, X, y)
    got, want = _params(again), _params(whole)
    c.true(
        "noisy resume: bitwise the uninterrupted run",
        all(torch.equal(got[k], want[k]) for k in want),
        str({k: float((got[k] - want[k]).abs().max()) for k in want}),
    )
    c.true(
        "noisy resume: all steps taken, still sharded",
        n3.steps_taken == NOISY_STEPS and _all_dtensors(again),
    )


def check_noise_sample(c: Checker, rank: int) -> None:
    """``sampler.sample``: full plain draws, identical on every rank, one process's."""
    loss_fn = nn.CrossEntropyLoss()
    lo, hi = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    for label, make, data in _noisy_cases():
        X, y = data(sum(SIZES), seed=9)
        plain = make()
        sharded = shard(plain)
        for sampler in (
            DiagFisherNoise("empirical", scale=0.3),
            DiagFisherNoise("exact", scale=0.3),
            FisherTraceNoise(scale=0.3),
            IsotropicNoise(0.5),
        ):
            what = f"{label} {sampler!r}.sample"
            got = sampler.sample(sharded, loss_fn, X[lo:hi], y[lo:hi], seed=4)
            local = {} if isinstance(sampler, IsotropicNoise) else LOCAL  # data-free: no group
            want = sampler.sample(plain, loss_fn, X, y, seed=4, **local)
            c.close(what, got, want)
            c.true(f"{what}: full plain tensors", all(type(v) is Tensor for v in got.values()))
            c.true(f"{what}: identical on every rank", same_on_all_ranks(_flat(got)))
        got = DiagFisherNoise("mc", scale=0.3).sample(sharded, loss_fn, X[lo:hi], y[lo:hi])
        c.true(f"{label} mc sample identical on every rank", same_on_all_ranks(_flat(got)))
        c.true(f"{label} still sharded after sample", _all_dtensors(sharded))


def check_noise_errors(c: Checker, rank: int) -> None:
    """Samplers that do not run on FSDP2, and process_group='local', are refused clearly; the
    allowance to take an FSDP2 model is not left behind."""
    X, y = mlp_data(sum(SIZES))
    loss_fn = nn.CrossEntropyLoss()
    sharded = shard(make_mlp())

    def noisy(sampler: Any, **kw: Any) -> NoisyOptimizer:
        return NoisyOptimizer(
            torch.optim.SGD(sharded.parameters(), lr=0.1), sampler, sharded, loss_fn, **kw
        )

    supported = ("FSDP2", "DiagFisherNoise", "FisherTraceNoise", "full_state_dict=True")
    for sampler in (KFACNoise(scale=0.1), MultiplicativeNoise(0.1), FullFisherNoise(scale=0.1)):
        name = type(sampler).__name__
        _raises(
            c,
            f"FSDP2 NoisyOptimizer {name}",
            lambda s=sampler: noisy(s),
            NotImplementedError,
            f"NoisyOptimizer with {name}",
            *supported,
        )
        _raises(
            c,
            f"FSDP2 {name}.sample",
            lambda s=sampler: s.sample(sharded, loss_fn, X[:4], y[:4]),
            NotImplementedError,
            f"{name}.sample",
            *supported,
        )
    _raises(
        c,
        "FSDP2 NoisyOptimizer process_group='local'",
        lambda: noisy(DiagFisherNoise(scale=0.1), process_group="local"),
        ValueError,
        "process_group='local'",
        "FSDP2",
    )
    _raises(
        c,
        "FSDP2 sample process_group='local'",
        lambda: FisherTraceNoise(scale=0.1).sample(
            sharded, loss_fn, X[:4], y[:4], process_group="local"
        ),
        ValueError,
        "process_group='local'",
    )
    _raises(  # a collective (FSDP's all-gather): a rank calling alone would hang
        c,
        "FSDP2 diag_fisher process_group='local'",
        lambda: cl.diag_fisher(sharded, loss_fn, (X, y), process_group="local"),
        ValueError,
        "process_group='local'",
        "unsharded copy",
    )
    noisy(DiagFisherNoise(scale=0.1))
    c.true("NoisyOptimizer leaves no FSDP2 allowance behind", not _fsdp.take_allowance())
    _raises(
        c,
        "FSDP2 diag_hessian after a NoisyOptimizer",
        lambda: cl.diag_hessian(sharded, loss_fn, (X, y)),
        NotImplementedError,
        "FSDP2",
    )


# --------------------------------------------------------------------------- the worker
def worker(rank: int, init_file: str, out_dir: str) -> None:
    join_gloo(rank, WORLD, init_file, 60)
    c = Checker(rank)
    seconds: dict[str, float] = {}
    checks = [
        ("deterministic", check_deterministic),
        ("monte carlo", check_monte_carlo),
        ("diagnostics", check_diagnostics),
        ("mixed precision", check_mixed_precision),
        ("training untouched", check_training_untouched),
        ("lazy init untouched", check_lazy_init_untouched),
        ("errors", check_errors),
        ("noisy optimizer", check_noisy_optimizer),
        ("noisy uneven shards", check_noisy_uneven),
        ("noisy monte carlo", check_noisy_mc),
        ("noisy resume", check_noisy_resume),
        ("noisy mixed precision", check_noisy_mixed_precision),
        ("noise sample", check_noise_sample),
        ("noise errors", check_noise_errors),
    ]
    try:
        for name, fn in checks:
            t0 = time.perf_counter()
            c.run(name, lambda fn=fn: fn(c, rank))
            seconds[name] = round(time.perf_counter() - t0, 2)
    except Exception:  # noqa: BLE001 - reported below
        c.failures.append(traceback.format_exc())
    finally:
        report = {"checks": c.count, "failures": c.failures, "seconds": seconds}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        leave_process()  # report written: no interpreter teardown


def test_fsdp2_first_order_matches_one_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    failures = []
    for rank in range(WORLD):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["checks"] > 60, report
        failures += report["failures"]
    assert not failures, "\n".join(failures)
