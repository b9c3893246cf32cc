"""The backend contract: every primitive of every backend equals brute force wherever it answers.

For every backend of :data:`curvlab.backends.REGISTRY` (a new one is covered automatically) and
every primitive it declares, on tiny float64 models (tests/zoo.py, tests/problems.py, a few
models below that use a weight outside its layer, and a float64 CNN with average pooling, which
BackPACK's second-order rules cannot do), the primitive is run the way the engine runs it
(:func:`curvlab.quantities._sweep.sweep`): the backend is asked by name through
:func:`~curvlab.backends.candidates`, then the primitive runs inside
:func:`~curvlab._notrace.leave_no_trace` and the backend's ``extended`` session on the whole batch
as one chunk. Three outcomes are allowed:

* **refused**: ``candidates`` raises a ``ValueError`` that names the backend and what to use instead;
* **handed over**: the backend raises :class:`~curvlab.backends.Handover` while running;
* **answered**: then every raw value equals a dense float64 brute-force reference of the chunk's
  negative log-likelihood *sum* ``sum_n NLL_n`` (the loss with ``reduction="sum"``; primitives do not
  depend on the user's reduction), to ``rtol=1e-6``, and the model is left untouched.

Where docs/models.md promises that a backend computes a model (``func``: any differentiable model;
the hooks: Linear/Conv/Embedding/norm layers, tied weights included; BackPACK: plain
``nn.Sequential`` chains of its layers) refusing or handing over is a failure too, so the suite
cannot pass vacuously. Finally ``backend="auto"`` is checked on every zoo case (and a few MLP/CNN
problems, where it picks BackPACK): the backend it records never refuses the model when named,
named it gives the same numbers, and BackPACK never computes a tied or reused model; a weight
used outside its layer is never answered wrongly, whichever backend is asked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvlab as cl
from curvlab._data import call_model
from curvlab._losses import loss_spec
from curvlab._notrace import leave_no_trace
from curvlab._scan import scan_model
from curvlab.backends import AUTO_ORDER, REGISTRY, Handover, HooksBackend, candidates, model_facts
from curvlab.backends._base import PRIMITIVES
from curvlab.backends._validation import check_batchnorm
from tests import bruteforce as B
from tests import reference as R
from tests.problems import make_problem
from tests.zoo import CASES, ENTRIES, make_case

slow = pytest.mark.slow
DTYPE = torch.float64
SEED = 11  # of the generator handed to Monte-Carlo primitives (the test draws the same labels)
GPTS = ("tiny_gpt", "hf_gpt2")

# ------------------------------------------------------------------ models using a weight outside


class OutsideUse(nn.Module):
    """``lin``'s weight also enters outside ``lin``: ``h + h @ lin.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.lin(x))
        return self.head(h + h @ self.lin.weight)


class OnlyOutside(nn.Module):
    """``lin`` is never called: its parameters enter through ``F.linear`` in the model's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(F.linear(x, self.lin.weight, self.lin.bias)))


class DeadCall(nn.Module):
    """``lin`` runs but its output is discarded; its parameters reach the loss outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.lin(x)  # e.g. an auxiliary output computed for logging, not part of the loss
        return self.head(self.act(F.linear(x, self.lin.weight, self.lin.bias)))


def _avgpool_cnn() -> nn.Module:
    """A plain ``nn.Sequential`` CNN with average pooling (BackPACK's rule for it is float32-only)."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)
    )


OUTSIDE = {"outside_use": OutsideUse, "only_outside": OnlyOutside, "dead_call": DeadCall}
EXTRA: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    **{name: (cls, (4,)) for name, cls in OUTSIDE.items()},
    "avgpool_cnn": (_avgpool_cnn, (2, 4, 4)),
}


def make_extra(name: str, reduction: str = "mean") -> SimpleNamespace:
    """``"<model>-<reduction>"`` of :data:`EXTRA`: 8 float64 examples, 3 classes, one batch."""
    ctor, shape = EXTRA[name]
    with torch.random.fork_rng():
        torch.manual_seed(21)
        model = ctor().to(DTYPE)
    gen = torch.Generator().manual_seed(22)
    X = torch.randn(8, *shape, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (8,), generator=gen)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    return SimpleNamespace(name=name, model=model, loss_fn=loss_fn, batches=[(X, y)], data=(X, y))


# ----------------------------------------------------------------------------------- the cases

ZOO_ONE = [f"{entry}-mean-one" for entry in ENTRIES] + [
    f"{entry}-sum-one" for entry in ("ln_mlp", "multilabel_bce", "seq_ce_gpt", "pixel_bce")
]
PROBLEMS = [
    "mlp-ce-mean-one",
    "mlp-bce-sum-one",
    "mlp-mse-mean-one",
    "cnn-ce-sum-one",
    "cnn-mse-mean-one",
    "res-ce-mean-one",
    "cnnbn-ce-mean-one",
    "conv1d-mse-sum-one",
]
EXTRA_CASES = [f"{name}-mean" for name in EXTRA]


def build(name: str) -> Any:
    """A fresh case: anything with ``.model``, ``.loss_fn``, ``.batches`` (one) and ``.data``."""
    if name.count("-") == 3:
        return make_problem(name)
    if name.count("-") == 1:
        return make_extra(*name.split("-"))
    return make_case(name)


def sum_name(name: str) -> str:
    """The same model and examples with reduction "sum" (the NLL sum is reduction-free)."""
    parts = name.split("-")
    parts[-2 if name.count("-") in (2, 3) else -1] = "sum"
    return "-".join(parts)


@functools.cache
def nll_dense(name: str) -> B.Dense:
    """Dense references of the NLL sum of case ``name`` (its loss with reduction "sum")."""
    case = build(sum_name(name))
    assert case.loss_fn.reduction == "sum" and len(case.batches) == 1
    return B.Dense(case)


def param_blocks(model: nn.Module) -> dict[str, tuple[slice, torch.Size]]:
    out, i = {}, 0
    for n, shape in B.param_shapes(model).items():
        out[n] = (slice(i, i + shape.numel()), shape)
        i += shape.numel()
    return out


def split_rows(model: nn.Module, rows: Tensor) -> dict[str, Tensor]:
    """``(R, D)`` rows as ``{name: (R, *shape)}``."""
    return {
        n: rows[:, s].reshape(rows.shape[0], *shape)
        for n, (s, shape) in param_blocks(model).items()
    }


def nll_grads(ref: B.Dense, labels: Tensor) -> Tensor:
    """``(N, D)``: ``grad NLL_n`` at ``labels`` (data or sampled), from the dense Jacobian."""
    sum_loss = B.with_reduction(ref.loss_fn, "sum")
    dL = torch.func.grad(lambda out: B.loss_value(sum_loss, out, labels))(ref.output)
    return torch.einsum("nfd,nf->nd", ref.jacobian, dL.reshape(ref.N, -1))


def prepared(ref: B.Dense) -> Tensor:
    """The reference output in curvlab's layout (GPT layout: classes moved to axis 1)."""
    out = ref.output
    return out.movedim(-1, 1) if B.gpt_layout(ref.loss_fn, out, ref.targets) else out


def draws(ref: B.Dense, count: int) -> list[Tensor]:
    """The labels a primitive draws from a generator seeded with :data:`SEED`, in order.

    Several draws are example-major: each example's ``count`` draws are consecutive in the
    stream (one draw of the output repeated ``count`` times per example), so that they do not
    depend on where chunks start.
    """
    gen = torch.Generator().manual_seed(SEED)
    spec = loss_spec(ref.loss_fn)
    out = prepared(ref)
    if count == 1:
        return [spec.sample_targets(out, gen, ref.targets)]
    targets = ref.targets
    if targets is not None:
        targets = targets.repeat_interleave(count, 0)
    drawn = spec.sample_targets(out.repeat_interleave(count, 0), gen, targets)
    return list(drawn.reshape(out.shape[0], count, *drawn.shape[1:]).unbind(1))


# ----------------------------------------------------------------------------- the primitives


@dataclass(frozen=True)
class Variant:
    """One way the engine calls a primitive, and how to check what it returns."""

    primitive: str
    call: Callable[[Any, Any, Any, Tensor], Any]  # (backend, session, inputs, targets)
    check: Callable[[Any, B.Dense], None]  # (value, NLL-sum references)
    second_order: bool = False  # the session flag the engine opens it with
    sampled: int = 0  # label draws from the generator (for the reference)
    kwargs: dict = field(default_factory=dict)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def _check_output(value: Tensor, ref: B.Dense) -> None:
    B.assert_close(value.detach(), prepared(ref), rtol=1e-10, what="output")


def _sq(ref: B.Dense, rows: Tensor) -> dict[str, Tensor]:
    return B.split_diag(ref.model, rows.square().sum(0))


def check_sgs(value: tuple, ref: B.Dense) -> None:
    sq, grad, out = value
    B.assert_dicts_close(sq, _sq(ref, ref.contributions))
    B.assert_dicts_close(grad, ref.split(ref.gradient))
    _check_output(out, ref)


def check_sgs_no_grad(value: tuple, ref: B.Dense) -> None:
    sq, grad, out = value
    B.assert_dicts_close(sq, _sq(ref, ref.contributions))
    if grad:  # the gradient may be skipped; if it is there it must be right
        B.assert_dicts_close(grad, ref.split(ref.gradient))
    _check_output(out, ref)


def check_sgs_mc(value: tuple, ref: B.Dense) -> None:
    sq, grad, out = value
    a, b = (nll_grads(ref, labels) for labels in draws(ref, 2))
    expected = {k: (u + v) / 2 for (k, u), v in zip(_sq(ref, a).items(), _sq(ref, b).values())}
    B.assert_dicts_close(sq, expected)
    assert grad == {}, "no gradient at Monte-Carlo labels"
    _check_output(out, ref)


def check_sgs_with_sampled(value: tuple, ref: B.Dense) -> None:
    at_labels, grad, at_sampled, out = value
    B.assert_dicts_close(at_labels, _sq(ref, ref.contributions))
    B.assert_dicts_close(grad, ref.split(ref.gradient))
    (labels,) = draws(ref, 1)
    B.assert_dicts_close(at_sampled, _sq(ref, nll_grads(ref, labels)))
    _check_output(out, ref)


def check_batch_grad(value: dict, ref: B.Dense) -> None:
    B.assert_dicts_close(value, split_rows(ref.model, ref.contributions))


def check_batch_grad_sampled(value: dict, ref: B.Dense) -> None:
    (labels,) = draws(ref, 1)
    B.assert_dicts_close(value, split_rows(ref.model, nll_grads(ref, labels)))


def check_diag_ggn(value: dict, ref: B.Dense) -> None:
    B.assert_dicts_close(value, ref.diag("ggn"))


def check_diag_hessian(value: dict, ref: B.Dense) -> None:
    B.assert_dicts_close(value, ref.diag("hessian"))


def check_sqrt_ggn(value: dict, ref: B.Dense) -> None:
    """Factors ``(K, n, *shape)`` per parameter with ``sum_{k,n} v v^T`` the NLL-sum GGN."""
    blocks = param_blocks(ref.model)
    assert set(value) == set(blocks), (sorted(value), sorted(blocks))
    lead = {tuple(v.shape[:2]) for v in value.values()}
    assert len(lead) == 1, f"factors of different (K, n): {lead}"
    (K, n) = lead.pop()
    cols = []
    for name, (_, shape) in blocks.items():
        v = value[name]
        assert v.shape[2:] == shape, (name, v.shape, shape)
        cols.append(v.detach().reshape(K * n, -1))
    V = torch.cat(cols, dim=1)
    B.assert_close(V.T @ V, ref.ggn, what="sqrt_ggn: V^T V vs the NLL-sum GGN")


def run_output_grads(be: Any, s: Any, X: Any, y: Tensor) -> tuple:
    """Two label sets (the data's and one draw), the graph kept between them as the engine does."""
    out = s.forward(X, y)
    other = s.spec.sample_targets(out, _gen(), y)
    taps, grads = be.output_grads(s, out, [y, other])
    info = [(t.name, t.grad_shape or tuple(t.output.shape)) for t in taps]
    return info, [[g.detach().clone() for g in gs] for gs in grads], [y, other]


def check_output_grads(value: tuple, ref: B.Dense) -> None:
    info, grads, label_sets = value
    expected = output_grads_reference(ref, info, label_sets)
    assert len(grads) == len(expected) == 2
    for got, want in zip(grads, expected):
        assert len(got) == len(want) == len(info)
        for (name, _), g, w in zip(info, got, want):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            B.assert_close(g, w, what=f"output gradient of module '{name}'")


def output_grads_reference(ref: B.Dense, info: list, label_sets: list[Tensor]) -> list:
    """``d NLL-sum / d (output of call i)`` of every recorded call, by brute force, per label set.

    A zero perturbation of the shape the backend reports (the output's, or for a module run on
    something other than the batch, its output broadcast over the examples) is added to each
    call's output by a forward hook; the gradients with respect to the perturbations are the
    output gradients. The model's in-place operations act on the perturbed tensors unchanged.
    """
    return [_perturbed_output_grads(ref, info, labels) for labels in label_sets]


def _perturbed_output_grads(ref: B.Dense, info: list, labels: Tensor) -> list[Tensor]:
    model = ref.model
    layers = HooksBackend.layers_of(model)
    assert layers is not None
    names = {id(layer.module): name for name, layer in layers.items()}
    deltas = [torch.zeros(shape, dtype=DTYPE, requires_grad=True) for _, shape in info]
    calls: list[str] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if not (isinstance(output, Tensor) and output.requires_grad):
            return None
        calls.append(names[id(module)])
        i = len(calls) - 1
        return output + deltas[i] if i < len(deltas) else None

    handles = [layer.module.register_forward_hook(hook) for layer in layers.values()]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            out = call_model(model, ref.inputs)
    finally:
        for h in handles:
            h.remove()
    assert calls == [name for name, _ in info], (calls, info)
    sum_loss = B.with_reduction(ref.loss_fn, "sum")
    gs = torch.autograd.grad(B.loss_value(sum_loss, out, labels), deltas, allow_unused=True)
    return [torch.zeros_like(d) if g is None else g for d, g in zip(deltas, gs)]


VARIANTS: dict[str, Variant] = {
    "sum_grad_squared": Variant(
        "sum_grad_squared", lambda be, s, X, y: be.sum_grad_squared(s, X, y), check_sgs
    ),
    "sum_grad_squared[with_grad=False]": Variant(
        "sum_grad_squared",
        lambda be, s, X, y: be.sum_grad_squared(s, X, y, with_grad=False),
        check_sgs_no_grad,
    ),
    "sum_grad_squared[mc_samples=2]": Variant(
        "sum_grad_squared",
        lambda be, s, X, y: be.sum_grad_squared(s, X, y, mc_samples=2, generator=_gen()),
        check_sgs_mc,
    ),
    "sum_grad_squared_with_sampled": Variant(
        "sum_grad_squared",
        lambda be, s, X, y: be.sum_grad_squared_with_sampled(s, X, y, _gen()),
        check_sgs_with_sampled,
    ),
    "batch_grad": Variant(
        "batch_grad", lambda be, s, X, y: be.batch_grad(s, X, y), check_batch_grad
    ),
    "batch_grad[second_order session]": Variant(
        "batch_grad", lambda be, s, X, y: be.batch_grad(s, X, y), check_batch_grad, True
    ),
    "batch_grad[sampled]": Variant(
        "batch_grad",
        lambda be, s, X, y: be.batch_grad(s, X, y, sampled=True, generator=_gen()),
        check_batch_grad_sampled,
    ),
    "diag_ggn": Variant("diag_ggn", lambda be, s, X, y: be.diag_ggn(s, X, y), check_diag_ggn, True),
    "diag_hessian": Variant(
        "diag_hessian", lambda be, s, X, y: be.diag_hessian(s, X, y), check_diag_hessian, True
    ),
    "sqrt_ggn": Variant("sqrt_ggn", lambda be, s, X, y: be.sqrt_ggn(s, X, y), check_sqrt_ggn, True),
    "output_grads": Variant("output_grads", run_output_grads, check_output_grads),
}
"""Every primitive of :data:`~curvlab.backends._base.PRIMITIVES`, each the ways the engine calls it
(sweep: ``second_order`` for all but ``sum_grad_squared``; fisher_norms and the in-loop measures:
first-order sessions for ``batch_grad``, ``output_grads`` and ``sum_grad_squared_with_sampled``)."""

REFUSED, HANDED_OVER, ANSWERED = "refused", "handed over", "answered"


def detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v) for v in value)
    return value


def attempt(name: str, backend: str, variant: str) -> tuple[str, str]:
    """Run one primitive on case ``name`` as the engine does; check it if it answers.

    Returns:
        (outcome, message): ``REFUSED``/``HANDED_OVER`` with the backend's reason, or ``ANSWERED``.
    """
    v = VARIANTS[variant]
    case = build(name)
    model, loss_fn = case.model, case.loss_fn
    ((X, y),) = case.batches
    spec = loss_spec(loss_fn)
    scan = scan_model(model)
    try:
        backends = candidates(backend, model_facts(scan), {v.primitive})
    except ValueError as e:
        msg = str(e)
        assert f"backend={backend!r}" in msg, f"the refusal does not name the backend: {msg}"
        assert "backend='func'" in msg or "backend='auto'" in msg, f"no way out offered: {msg}"
        assert "cannot compute this model exactly: " in msg and len(msg) > 80, msg
        return REFUSED, msg
    assert [b.name for b in backends] == [backend]
    (be,) = backends
    assert v.primitive in be.primitives
    check_batchnorm(scan)
    before = R.snapshot(model)
    try:
        with (
            leave_no_trace(model, scan=scan),
            be.extended(model, spec, second_order=v.second_order, scan=scan) as session,
        ):
            value = detached(v.call(be, session, X, y))
    except Handover as h:
        assert str(h), "a hand-over must say why"
        R.assert_untouched(model, before)
        return HANDED_OVER, str(h)
    R.assert_untouched(model, before)
    v.check(value, nll_dense(name))
    return ANSWERED, ""


# What docs/models.md promises each backend computes: refusing or handing over there is a failure.
HOOKS_MODELS = {*ENTRIES, "avgpool_cnn"} - {"temperature"}  # Linear/Conv/Embedding/norms, tied
FIRST_ORDER_PRIMITIVES = ("sum_grad_squared", "batch_grad")


def must_answer(name: str, backend: str, primitive: str) -> bool:
    entry = name.split("-")[0]
    if backend == "func":  # "torch.func never refuses a differentiable model"
        return True
    if backend == "hooks":
        return entry in HOOKS_MODELS or name in PROBLEMS
    if backend == "backpack":  # plain nn.Sequential chains of BackPACK's layers
        if entry in ("mlp", "cnn", "conv1d"):
            return True
        return entry in ("res", "cnnbn", "avgpool_cnn") and primitive in FIRST_ORDER_PRIMITIVES
    return False


def contract_params() -> list:
    """(case, backend, variant) for every registered backend and each of its primitives' variants;
    the GPTs' second-order ones (exact but costly through torch.func) are ``slow``."""
    out = []
    for backend, cls in REGISTRY.items():
        for variant, v in VARIANTS.items():
            if v.primitive not in cls.primitives:
                continue
            for name in ZOO_ONE + PROBLEMS + EXTRA_CASES:
                heavy = (
                    name.split("-")[0] in GPTS
                    and backend == "func"
                    and v.primitive in ("diag_ggn", "sqrt_ggn")
                )
                marks = [slow] if heavy else []
                out.append(pytest.param(name, backend, variant, marks=marks))
    return out


@pytest.mark.parametrize(("name", "backend", "variant"), contract_params())
def test_primitive_equals_bruteforce_or_declines(name: str, backend: str, variant: str) -> None:
    outcome, why = attempt(name, backend, variant)
    if must_answer(name, backend, VARIANTS[variant].primitive):
        assert outcome == ANSWERED, f"{backend} {outcome} on {name}: {why}"


def test_every_primitive_has_a_reference() -> None:
    """A new primitive (or one a backend declares beyond the protocol) must get a check here."""
    assert {v.primitive for v in VARIANTS.values()} == set(PRIMITIVES)
    assert set(AUTO_ORDER) == set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert cls.name == name
        assert cls.primitives and set(cls.primitives) <= PRIMITIVES, (name, cls.primitives)
        for primitive in cls.primitives:
            assert callable(getattr(cls, primitive, None)), (name, primitive)


ANSWER_CASES = ["mlp-ce-mean-one", "ln_mlp-mean-one", "cnn-mse-mean-one", "seq_ce_gpt-mean-one"]


@pytest.mark.parametrize(
    ("backend", "primitive"),
    [(b, p) for b, cls in REGISTRY.items() for p in sorted(cls.primitives)],
)
def test_every_backend_answers_somewhere(backend: str, primitive: str) -> None:
    """Not vacuous: each backend answers each of its primitives correctly on some model."""
    variant = next(k for k, v in VARIANTS.items() if v.primitive == primitive)
    outcomes = {}
    for name in ANSWER_CASES:
        outcomes[name] = attempt(name, backend, variant)
        if outcomes[name][0] == ANSWERED:
            return
    pytest.fail(f"{backend} never answered {primitive}: {outcomes}")


# ------------------------------------------------------------------------ auto picks exactly


def _stats(r: Any) -> dict[str, Tensor]:
    return {
        **{f"mean.{k}": v for k, v in r.mean.items()},
        **{f"variance.{k}": v for k, v in r.variance.items()},
        "trace_covariance": torch.tensor(r.trace_covariance, dtype=DTYPE),
        "noise_scale": torch.tensor(r.noise_scale, dtype=DTYPE),
    }


def _norms(r: Any) -> dict[str, Tensor]:
    return {
        "frobenius": torch.tensor(r.frobenius, dtype=DTYPE),
        "diag_frobenius": torch.tensor(r.diag_frobenius, dtype=DTYPE),
    }


Quantity = tuple[frozenset, Callable[[Any, str], Any], Callable[[Any], dict[str, Tensor]]]
QUANTITIES: dict[str, Quantity] = {
    "diag_fisher_empirical": (
        frozenset({"sum_grad_squared"}),
        lambda c, b: cl.diag_fisher(c.model, c.loss_fn, c.data, kind="empirical", backend=b),
        dict,
    ),
    "diag_fisher_mc": (
        frozenset({"sum_grad_squared"}),
        lambda c, b: cl.diag_fisher(c.model, c.loss_fn, c.data, kind="mc", seed=3, backend=b),
        dict,
    ),
    "diag_fisher_exact": (
        frozenset({"diag_ggn"}),
        lambda c, b: cl.diag_fisher(c.model, c.loss_fn, c.data, kind="exact", backend=b),
        dict,
    ),
    "gradient_stats": (
        frozenset({"sum_grad_squared"}),
        lambda c, b: cl.gradient_stats(c.model, c.loss_fn, c.data, backend=b),
        _stats,
    ),
    "fisher_norms_empirical": (
        frozenset({"sum_grad_squared"}),
        lambda c, b: cl.fisher_norms(c.model, c.loss_fn, c.data, kind="empirical", backend=b),
        _norms,
    ),
    "fisher_norms_exact": (
        frozenset({"sqrt_ggn"}),
        lambda c, b: cl.fisher_norms(c.model, c.loss_fn, c.data, kind="exact", backend=b),
        _norms,
    ),
    "diag_hessian": (
        frozenset({"diag_hessian"}),
        lambda c, b: cl.diag_hessian(c.model, c.loss_fn, c.data, backend=b),
        dict,
    ),
}
FIRST_ORDER = (
    "diag_fisher_empirical",
    "diag_fisher_mc",
    "gradient_stats",
    "fisher_norms_empirical",
)
NEVER_BACKPACK = ("tiny_gpt", "shared_linear", "twice_linear")  # tied, tied, a module used twice


AUTO_PROBLEMS = [
    "mlp-ce-mean-three",
    "mlp-bce-sum-one",
    "cnn-mse-sum-one",
    "res-bce-mean-three",
    "cnnbn-ce-sum-one",
    "conv1d-mse-sum-one",
]
"""MLP/CNN problems, where ``auto`` picks BackPACK for second-order quantities (the zoo has none)."""


AUTO_THREE = (
    "multilabel_bce",
    "pixel_ce",
    "seq_ce_torch",
    "shared_linear",
    "twice_linear",
    "resblock",
)
"""Entries whose "three" batching (a hand-over restarts from the first batch) is in the fast set."""


def auto_params() -> list:
    """Every zoo case and quantity, and a few MLP/CNN problems. ``slow``: the GPTs' second-order
    ones (torch.func's exact GGN square root costs one VJP per logit) and the "three" batchings
    outside :data:`AUTO_THREE`."""
    out = []
    for name in CASES:
        entry, _, batching = name.split("-")
        for q in QUANTITIES:
            heavy = (entry in GPTS and q not in FIRST_ORDER) or (
                batching == "three" and entry not in AUTO_THREE
            )
            out.append(pytest.param(name, q, marks=[slow] if heavy else []))
    out += [pytest.param(name, q) for name in AUTO_PROBLEMS for q in QUANTITIES]
    return out


def assert_same_numbers(forced: dict[str, Tensor], auto: dict[str, Tensor]) -> None:
    B.assert_dicts_close(forced, {k: torch.as_tensor(v) for k, v in auto.items()}, rtol=1e-9)


@pytest.mark.parametrize(("name", "quantity"), auto_params())
def test_auto_picks_a_backend_that_can_and_it_agrees_when_named(name: str, quantity: str) -> None:
    needs, call, numbers = QUANTITIES[quantity]
    case = build(name)
    entry = name.split("-")[0]
    auto = call(case, "auto")
    who = auto.backend
    if quantity == "diag_hessian" and who == "columns":  # exact Hessian products, any model
        pass
    else:
        assert who in REGISTRY, who
        # (a) named, that backend does not refuse the model (raises ValueError otherwise)
        candidates(who, model_facts(scan_model(case.model)), needs)
    if entry in NEVER_BACKPACK:
        assert who != "backpack", f"BackPACK computed {name}, which it cannot do exactly"
    if entry == "mlp":  # the fastest backend that applies (docs/models.md)
        assert who == ("hooks" if quantity in FIRST_ORDER else "backpack"), who
    # (b) named, it gives the same numbers (auto itself equals brute force: test_any_model.py;
    # for the MLP/CNN problems it is checked here)
    forced = call(case, who)
    assert forced.backend == who
    assert_same_numbers(numbers(forced), numbers(auto))
    if name in AUTO_PROBLEMS and quantity != "diag_fisher_mc":
        assert_matches(numbers(auto), full_reference(case, quantity))


@pytest.mark.parametrize("quantity", list(QUANTITIES))
@pytest.mark.parametrize("entry", NEVER_BACKPACK)
def test_backpack_named_on_tied_or_reused_is_a_clear_error(entry: str, quantity: str) -> None:
    case = make_case(f"{entry}-mean-one")
    call = QUANTITIES[quantity][1]
    with pytest.raises(ValueError, match=r"backend='backpack'.*(auto|func)"):
        call(case, "backpack")


def full_reference(case: Any, quantity: str) -> dict[str, Tensor] | None:
    """Brute force of a quantity of the full objective (``None``: Monte-Carlo, compared to func)."""
    ref = B.Dense(case)
    if quantity == "diag_fisher_empirical":
        return ref.diag("empirical_fisher")
    if quantity == "diag_fisher_exact":
        return ref.diag("ggn")
    if quantity == "diag_hessian":
        return ref.diag("hessian")
    if quantity == "gradient_stats":
        return {
            **{f"mean.{k}": v for k, v in ref.split(ref.grad_mean).items()},
            **{f"variance.{k}": v for k, v in ref.split(ref.grad_variance).items()},
            "trace_covariance": torch.tensor(ref.trace_covariance, dtype=DTYPE),
            "noise_scale": torch.tensor(ref.noise_scale, dtype=DTYPE),
        }
    if quantity.startswith("fisher_norms"):
        M = ref.matrix("empirical_fisher" if quantity.endswith("empirical") else "ggn")
        return {
            "frobenius": torch.linalg.matrix_norm(M),
            "diag_frobenius": torch.diagonal(M).norm(),
        }
    return None


def assert_matches(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    stats = "trace_covariance" in want  # scalars: relative to their own size
    if stats:
        for key in ("trace_covariance", "noise_scale"):
            B.assert_float_close(float(got.pop(key)), float(want[key]))
        want = {k: v for k, v in want.items() if k not in ("trace_covariance", "noise_scale")}
    B.assert_dicts_close(got, want)


@pytest.mark.parametrize("quantity", list(QUANTITIES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("model", list(OUTSIDE))
def test_weight_used_outside_its_layer_is_never_answered_wrong(
    model: str, reduction: str, quantity: str
) -> None:
    """``auto`` equals brute force; a named hooks or BackPACK backend equals it too or refuses."""
    needs, call, numbers = QUANTITIES[quantity]
    case = make_extra(model, reduction)
    want = full_reference(case, quantity)
    if want is None:  # Monte-Carlo: the same seed draws the same labels on every backend
        want = numbers(call(case, "func"))
    auto = call(case, "auto")
    assert_matches(numbers(auto), want)
    for backend in ("hooks", "backpack"):
        if not needs <= REGISTRY[backend].primitives:
            continue  # e.g. diag_hessian takes no backend="hooks" at all
        try:
            forced = call(case, backend)
        except ValueError as e:
            assert f"backend={backend!r}" in str(e), str(e)
            continue
        assert forced.backend == backend
        assert_matches(numbers(forced), want)


SECOND_ORDER = ("diag_fisher_exact", "fisher_norms_exact", "diag_hessian")


@pytest.mark.parametrize("quantity", SECOND_ORDER)
def test_float64_average_pooling_is_declined_by_backpack_not_a_crash(quantity: str) -> None:
    """BackPACK 1.7 builds its average-pooling kernels in the default dtype: on a float64 model
    its second-order rules fail. ``auto`` must fall back to an exact backend; named, a clear error.
    """
    needs, call, numbers = QUANTITIES[quantity]
    case = make_extra("avgpool_cnn", "sum")
    assert torch.get_default_dtype() != DTYPE
    auto = call(case, "auto")
    assert auto.backend != "backpack"
    assert_matches(numbers(auto), full_reference(case, quantity))
    with pytest.raises(ValueError, match=r"backend='backpack'.*average pooling"):
        call(case, "backpack")
