"""Review s23: the gradient-norm penalties given ``output=`` from the user's own forward pass.

* Under ``DistributedDataParallel(static_graph=True)`` the first step's output passes DDP's
  ``_DDPSink``, whose backward queues DDP's gradient all-reduce at the end of the backward pass
  that runs it, once. The penalty's inner ``torch.autograd.grad`` ran it, so the all-reduce came
  at the end of the penalty's pass and the step's real backward reduced nothing: each rank kept
  its own gradient (0.2998 off the ranks' average), silently. The penalty now runs its own
  forward on the module inside DDP in that output's place. Checked in one spawned world of 2 gloo
  ranks (one thread each, a short collective timeout) against torch.func on each rank's shard,
  averaged over the ranks, for ``static_graph`` True and False and ``find_unused_parameters``
  (whose sink only hands gradients through: its output is still used, no second forward).
* ``out.retain_grad()`` on the step's output: the penalty's inner gradient set ``out.grad`` (with
  ``every=1`` a tensor holding a graph) and the user's backward of ``loss + penalty`` added to it
  (a norm of 1.2219 for 0.4068). The output's ``.grad`` is now as it was after the call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad

from curvlab.regularizers import GradientNormPenalty, fisher_penalty, gradient_penalty
from tests.distributed_checks import Checker, run_named_world

DT = torch.float64
EPS = torch.finfo(DT).eps
ALPHA = 0.4
WORLD = 2
CALL_TIMEOUT_S = 20  # a collective left waiting fails after this
DEADLINE_S = 150  # a world running past this is killed and its test fails (spawning: seconds)


class Counted(nn.Module):
    """A small MLP that counts its forward passes (the penalty's own forward included)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tolerance(scale: float, model: nn.Module) -> float:
    """Float64 rounding of a double backward: each entry of the penalty's gradient sums products
    over the ``P`` parameters' gradient entries (a few roundings each), so ``4 P eps`` of the
    largest entry bounds the difference of two evaluation orders."""
    return 4 * n_params(model) * EPS * max(scale, 1.0)


def brute_total_grad(model: Counted, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """d/dtheta [L + ALPHA ||grad_theta L||^2], dense float64 torch.func, mean cross-entropy."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(pp: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model.net, _net(pp), (X,)), y)

    def total(pp: dict[str, Tensor]) -> Tensor:
        return loss(pp) + ALPHA * sum((g**2).sum() for g in grad(loss)(pp).values())

    return grad(total)(params)


def _net(pp: dict[str, Tensor]) -> dict[str, Tensor]:
    """``Counted``'s parameter names as those of its ``net``."""
    return {n.removeprefix("net."): v for n, v in pp.items()}


# ---------------------------------------------------------------- DDP static_graph (spawned)


def rank_batch(rank: int) -> tuple[Tensor, Tensor]:
    """Uneven shards: 3 examples on rank 0, 5 on rank 1."""
    g = torch.Generator().manual_seed(10 + rank)
    B = 3 if rank == 0 else 5
    return torch.randn(B, 3, dtype=DT, generator=g), torch.randint(0, 3, (B,), generator=g)


def check_ddp_penalty_output(c: Checker, rank: int) -> None:
    X, y = rank_batch(rank)
    loss_fn = nn.CrossEntropyLoss()
    for options in ({"static_graph": True}, {}, {"find_unused_parameters": True}):
        for every in (None, 1, 3):  # None: gradient_penalty, else GradientNormPenalty(every)
            what = f"DDP({options}), {'function' if every is None else f'every={every}'}"
            model = Counted()
            ddp = nn.parallel.DistributedDataParallel(model, **options)
            want = brute_total_grad(model, X, y)  # this rank's shard; DDP averages the ranks
            for v in want.values():
                dist.all_reduce(v)
                v /= WORLD
            pen = (
                None
                if every is None
                else GradientNormPenalty(ddp, loss_fn, "gradient", ALPHA, every)
            )
            for step in (1, 2):  # the first step has the static sink, the second does not
                model.calls = 0
                out = ddp(X)
                p = (
                    gradient_penalty(ddp, loss_fn, X, y, output=out, alpha=ALPHA)
                    if pen is None
                    else pen(X, y, output=out)
                )
                (loss_fn(out, y) + p).backward()
                # the output is reused (one forward) but at the static first step's sink; a
                # recomputation step there runs the penalty's own forward (every=3: step 1)
                recomputes = every in (None, 1) or step == 1
                forwards = 2 if options.get("static_graph") and step == 1 and recomputes else 1
                c.true(f"{what}, step {step}: forwards", model.calls == forwards, f"{model.calls}")
                got = dict(model.named_parameters())
                scale = max(float(v.abs().max()) for v in want.values())
                err = max(float((got[n].grad - want[n]).abs().max()) for n in want)
                tol = tolerance(scale, model)
                c.true(f"{what}, step {step}: .grad is the DDP average", err <= tol, f"{err:.3g}")
                model.zero_grad()


CHECKS: dict[str, Callable[[Checker, int], None]] = {"ddp_penalty_output": check_ddp_penalty_output}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_static_graph_penalty_output_is_all_reduced(tmp_path: Path) -> None:
    run_named_world(
        "tests.test_penalty_output_s23",
        "ddp_penalty_output",
        tmp_path,
        WORLD,
        CALL_TIMEOUT_S,
        DEADLINE_S,
    )


# ---------------------------------------------------------------- out.retain_grad()


def batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 3, dtype=DT, generator=g), torch.randint(0, 3, (6,), generator=g)


def brute_output_grad(model: Counted, X: Tensor, y: Tensor, penalised: bool) -> Tensor:
    """The gradient reaching the output's node in the backward of ``L + term``: d/d delta at 0
    of the objective with ``out = f(theta) + delta`` (torch.func, dense float64). ``penalised``:
    ``term = ALPHA ||grad_theta L||^2`` (every=1); else the term is the cached surrogate, which
    does not depend on the output."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(pp: dict[str, Tensor], delta: Tensor) -> Tensor:
        out = functional_call(model.net, _net(pp), (X,)) + delta
        return nn.functional.cross_entropy(out, y)

    def total(delta: Tensor) -> Tensor:
        value = loss(params, delta)
        if penalised:
            g = grad(loss)(params, delta)
            value = value + ALPHA * sum((v**2).sum() for v in g.values())
        return value

    return grad(total)(torch.zeros(X.shape[0], 3, dtype=DT))


Penalty = Callable[[Counted, Tensor, Tensor, Tensor], Tensor]
PENALTIES: dict[str, tuple[Penalty, bool]] = {
    "function": (
        lambda m, X, y, out: gradient_penalty(m, nn.CrossEntropyLoss(), X, y, out, ALPHA),
        True,
    ),
    "every=1": (
        lambda m, X, y, out: GradientNormPenalty(m, nn.CrossEntropyLoss(), "gradient", ALPHA, 1)(
            X, y, out
        ),
        True,
    ),
    "every=3": (
        lambda m, X, y, out: GradientNormPenalty(m, nn.CrossEntropyLoss(), "gradient", ALPHA, 3)(
            X, y, out
        ),
        False,
    ),
}


@pytest.mark.parametrize("name", list(PENALTIES))
def test_retained_output_grad_left_to_the_users_backward(name: str) -> None:
    penalty, penalised = PENALTIES[name]
    model = Counted()
    X, y = batch()
    out = model(X)
    out.retain_grad()
    p = penalty(model, X, y, out)
    assert out.grad is None, "the penalty call wrote out.grad"
    (nn.functional.cross_entropy(out, y) + p).backward()
    want = brute_output_grad(model, X, y, penalised)
    err = float((out.grad - want).abs().max())
    assert err <= tolerance(float(want.abs().max()), model), f"out.grad {err:.3g} off"
    # and the parameters' gradients are those of L + penalty (every=3: the same on its first,
    # recomputing, call)
    want_p = brute_total_grad(model, X, y)
    scale = max(float(v.abs().max()) for v in want_p.values())
    err = max(float((q.grad - want_p[n]).abs().max()) for n, q in model.named_parameters())
    assert err <= tolerance(scale, model), f".grad {err:.3g} off"


@pytest.mark.parametrize("every", [None, 1, 3])
def test_retained_output_grad_put_back_as_it_was(every: int | None) -> None:
    """An ``out.grad`` already there (an earlier backward) is the same tensor, unchanged, after
    the call; the Fisher penalty (drawn labels) too."""
    model = Counted()
    X, _ = batch()
    out = model(X)
    out.retain_grad()
    out.sum().backward(retain_graph=True)
    before = out.grad
    assert before is not None
    snapshot = before.clone()
    loss_fn = nn.CrossEntropyLoss()
    if every is None:
        fisher_penalty(model, loss_fn, X, output=out, alpha=ALPHA)
    else:
        GradientNormPenalty(model, loss_fn, "fisher", ALPHA, every)(X, output=out)
    assert out.grad is before and torch.equal(out.grad, snapshot)


def test_retained_grad_of_an_output_object_with_logits() -> None:
    """An output object with a ``.logits`` Tensor (a HuggingFace model's): its logits' ``.grad``
    is put back too."""

    class Output:
        def __init__(self, logits: Tensor) -> None:
            self.logits = logits

    model = Counted()
    X, y = batch()
    out = model(X)
    out.retain_grad()
    gradient_penalty(model, nn.CrossEntropyLoss(), X, y, output=Output(out), alpha=ALPHA)
    assert out.grad is None
