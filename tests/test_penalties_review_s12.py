"""Review s12 of the penalties (curvlab.regularizers). Each case was wrong or failed before:

* a transformed ``output=`` of a compiled model (``compiled(X) / 2``) was replaced silently by the
  recomputed ``model(X)`` whenever any module was in train mode (0.6456 for 0.1335), and a change
  of up to 10% was accepted in eval mode (``* 1.05``: 0.6456 for 0.7249);
* a batch whose every target is ``ignore_index`` under ``"mean"`` made the penalty's gradient NaN
  (torch's own loss gives 0), and ``GradientNormPenalty(every=k)`` kept that NaN for k - 1 steps;
* ``nn.Hardsigmoid`` with ``output=`` (and any op without a second derivative) was accepted and
  the caller's ``backward()`` failed with torch's raw "derivative ... is not implemented";
* ``output=`` given as a tuple raised ``AttributeError`` ('tuple' object has no attribute
  'requires_grad').

References: the penalties by nested ``torch.func.grad`` in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, grad

from curvlab.regularizers import (
    FisherPenalty,
    GradientNormPenalty,
    fisher_penalty,
    gradient_penalty,
    input_gradient_penalty,
    random_label_penalty,
)

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _brute(
    model: nn.Module, objective: Callable[[Tensor], Tensor], inputs: Tensor
) -> tuple[float, dict[str, Tensor]]:
    """``P = ||grad_theta objective(model(inputs))||^2`` over the trainable parameters, and
    ``grad P``, by nested ``torch.func.grad`` (buffers and frozen parameters held fixed)."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def loss(theta: dict[str, Tensor]) -> Tensor:
        return objective(functional_call(model, {**theta, **fixed}, (inputs,)))

    def penalty(theta: dict[str, Tensor]) -> Tensor:
        return sum(g.pow(2).sum() for g in grad(loss)(theta).values())

    return float(penalty(trainable)), grad(penalty)(trainable)


def _grads(value: Tensor, model: nn.Module) -> dict[str, Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(value, [p for _, p in named])
    return {n: g for (n, _), g in zip(named, got)}


def _assert_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=k)


def _mlp(*middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), *(middle or (nn.Tanh(),)), nn.Linear(6, 3)).to(DT)


def _data(n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _compile(model: nn.Module) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="aot_eager")


# ------------------------------------------------------------------ 1. a compiled output=


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformed_compiled_output_is_refused_in_either_mode(mode: str) -> None:
    """Found in review: in train mode (no Dropout anywhere) ``output=compiled(X) / 2`` gave the
    penalty of ``model(X)``, 0.6456 where the logits passed give 0.1335; in eval mode ``* 1.05``
    was accepted (10% tolerance)."""
    model = getattr(_mlp(), mode)()
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    compiled = _compile(model)
    for transformed in (compiled(X) / 2, compiled(X) * 1.05, compiled(X) * 1.02):
        with pytest.raises(ValueError, match=r"not model\(inputs\).*more than 1%"):
            gradient_penalty(compiled, lf, X, y, output=transformed)
    # model(inputs) itself (at the top of the graph or below an eager no-op) is exact
    want, want_grad = _brute(model, lambda o: lf(o, y), X)
    for out in (compiled(X), 1.0 * compiled(X)):
        value = gradient_penalty(compiled, lf, X, y, output=out)
        assert float(value.detach()) == pytest.approx(want, rel=1e-10)
        _assert_close(_grads(value, model), want_grad)


def test_compiled_output_of_a_train_mode_batchnorm_model_is_compared_and_exact() -> None:
    """BatchNorm in train mode draws no random number: the values are compared (a transformed
    output is refused) and the accepted one gives the brute force with batch statistics."""
    model = _mlp(nn.BatchNorm1d(6), nn.Tanh()).train()
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    compiled = _compile(model)
    with pytest.raises(ValueError, match=r"not model\(inputs\)"):
        gradient_penalty(compiled, lf, X, y, output=compiled(X) / 2)
    out = compiled(X)
    stats = [b.clone() for b in model.buffers()]  # after the step's own forward
    value = gradient_penalty(compiled, lf, X, y, output=out)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    # brute force with batch statistics and without touching the running ones
    probe = _mlp(nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh())
    probe.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "running" not in k and "num_" not in k}
    )
    want, want_grad = _brute(probe.train(), lambda o: lf(o, y), X)
    assert float(value.detach()) == pytest.approx(want, rel=1e-10)
    _assert_close(_grads(value, model), want_grad)


@pytest.mark.parametrize("random", [nn.Dropout(0.5), nn.RReLU()])
def test_compiled_output_of_a_model_drawing_random_numbers_is_accepted(random: nn.Module) -> None:
    """A forward that draws from the global RNG (Dropout, RReLU in train mode) differs from the
    recomputed one: only the shapes are compared, and a legitimate output is accepted."""
    model = _mlp(random, nn.Tanh()).train()
    X, y = _data()
    compiled = _compile(model)
    state = torch.get_rng_state()
    out = compiled(X)
    value = gradient_penalty(compiled, nn.CrossEntropyLoss(), X, y, output=out)
    assert torch.isfinite(value) and float(value.detach()) > 0
    with pytest.raises(ValueError, match=r"not model\(inputs\).*shape"):
        gradient_penalty(compiled, nn.CrossEntropyLoss(), X, y[:], output=compiled(X)[:, :2])
    assert not torch.equal(state, torch.get_rng_state())  # the model's own draws only


def test_compiled_output_under_bfloat16_autocast_is_accepted_and_exact() -> None:
    """bfloat16 autocast logits differ from the eager float32 ones by ~1% of the largest entry:
    a 16-bit computation is compared to 5%; the penalty is the float32 eager model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    model.append(nn.Linear(16, 3))
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    lf = nn.CrossEntropyLoss()
    compiled = _compile(model)
    eager = float(gradient_penalty(model, lf, X, y).detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(X)
        assert out.dtype == torch.bfloat16
        value = gradient_penalty(compiled, lf, X, y, output=out)
        with pytest.raises(ValueError, match=r"not model\(inputs\).*more than 5%"):
            gradient_penalty(compiled, lf, X, y, output=compiled(X) / 2)
    assert float(value.detach()) == pytest.approx(eager, rel=1e-6)


# ------------------------------------------------------------- 2. nothing counted under mean


class _Seq(nn.Module):
    """(N, T, D) floats -> (N, T, V) logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix, self.head = nn.Linear(3, 3), nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(x) + 0.3 * x.cumsum(1)))


def _seq_batch(seed: int, ignored: int | None, ignore_index: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(2, 3, 3, generator=g, dtype=DT)
    t = torch.randint(0, 4, (2, 3), generator=g)
    if ignored is not None:
        t[:] = ignore_index
    return xs, t


def _flat_loss(lf: nn.Module, out: Tensor, t: Tensor) -> Tensor:
    return lf(out.reshape(-1, out.shape[-1]), t.reshape(-1))


FUNCTIONS = {
    "gradient": lambda m, lf, x, t, out: gradient_penalty(m, lf, x, t, output=out, alpha=0.1),
    "fisher": lambda m, lf, x, t, out: fisher_penalty(m, lf, x, out, 0.1, seed=0, targets=t),
    "random": lambda m, lf, x, t, out: random_label_penalty(m, lf, x, out, 0.1, seed=0, targets=t),
    "input": lambda m, lf, x, t, out: input_gradient_penalty(m, lf, x, t, alpha=0.1),
    "gradient_own": lambda m, lf, x, t, out: gradient_penalty(m, lf, x, t, alpha=0.1),
}


@pytest.mark.parametrize("ignore_index", [-100, 0])
@pytest.mark.parametrize("penalty", sorted(FUNCTIONS))
def test_all_ignored_batch_has_a_nan_value_and_a_zero_gradient(penalty: str, ignore_index: int):
    """Found in review: torch's loss is NaN with a zero gradient on such a batch; with GP, FP or
    GP_r added, every gradient was NaN and an SGD step made the parameters NaN."""
    model, lf = _Seq().to(DT), nn.CrossEntropyLoss(ignore_index=ignore_index)
    xs, t = _seq_batch(0, ignored=True, ignore_index=ignore_index)
    out = model(xs)
    base = _flat_loss(lf, out, t)
    term = FUNCTIONS[penalty](model, lf, xs, t, out)
    assert torch.isnan(base) and torch.isnan(term)  # the documented value: NaN (0/0)
    (base + term).backward()
    for p in model.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))  # torch's: 0


def test_one_counted_target_is_still_exact() -> None:
    """The finite weight changes nothing where a target is counted (against brute force)."""
    model, lf = _Seq().to(DT), nn.CrossEntropyLoss()
    xs, t = _seq_batch(0, ignored=True, ignore_index=-100)
    t[1, 2] = 3
    value = gradient_penalty(model, lf, xs, t, output=model(xs))
    want, want_grad = _brute(model, lambda o: _flat_loss(lf, o, t), xs)
    assert float(value.detach()) == pytest.approx(want, rel=1e-10)
    _assert_close(_grads(value, model), want_grad)


@pytest.mark.parametrize("kind", ["fisher", "gradient", "random", "input"])
@pytest.mark.parametrize("every", [1, 3])
def test_class_does_not_keep_a_nan_recomputation(kind: str, every: int) -> None:
    """Found in review: FisherPenalty(every=4) after one all-padding batch returned a NaN term with
    a NaN gradient on the next 3 steps, where torch's loss was finite."""
    model, lf = _Seq().to(DT), nn.CrossEntropyLoss()
    pen = GradientNormPenalty(model, lf, kind, alpha=0.1, every=every, seed=0)
    terms, grads = [], []
    for step in range(4):
        xs, t = _seq_batch(step, ignored=True if step == 0 else None, ignore_index=-100)
        out = model(xs)
        term = pen(xs, t, output=out)
        value = float(term.detach())
        assert (value != value) == (step == 0)  # NaN exactly on the all-padding step
        assert step == 0 or float(pen.last_value) == value
        (_flat_loss(lf, out, t) + term).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert all(torch.isfinite(g).all() for g in grads[-1].values())
        model.zero_grad(set_to_none=True)
        terms.append((value, term, xs, t))
    if kind in ("gradient", "input"):  # deterministic: step 1 is recomputed, exactly
        _, term1, xs, t = terms[1]
        fn = FUNCTIONS[kind]
        want = fn(model, lf, xs, t, model(xs))
        assert terms[1][0] == pytest.approx(float(want.detach()), rel=1e-10)
    if every == 3:  # step 2 reuses step 1's value and penalty gradient (not step 0's NaN)
        assert terms[2][0] == terms[1][0]
        xs2, t2 = terms[2][2], terms[2][3]
        model.zero_grad(set_to_none=True)
        _flat_loss(lf, model(xs2), t2).backward()
        loss_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        xs1, t1 = terms[1][2], terms[1][3]
        out1 = model(xs1)
        _flat_loss(lf, out1, t1).backward()
        loss_grad1 = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        for n in loss_grad:  # the penalty part of steps 1 and 2 is the same gradient
            torch.testing.assert_close(
                grads[2][n] - loss_grad[n], grads[1][n] - loss_grad1[n], rtol=1e-9, atol=1e-12
            )


def test_fisher_penalty_class_after_an_all_padding_batch_recomputes_on_the_next_call() -> None:
    model, lf = _Seq().to(DT), nn.CrossEntropyLoss()
    pen = FisherPenalty(model, lf, alpha=0.1, every=10, seed=0)
    xs, t = _seq_batch(0, ignored=True, ignore_index=-100)
    assert torch.isnan(pen(xs, t, output=model(xs)))
    xs, t = _seq_batch(1, ignored=None, ignore_index=-100)
    first = pen(xs, t, output=model(xs))
    assert torch.isfinite(first)
    again = pen(xs, t, output=model(xs)).detach()
    assert float(again) == float(first.detach())  # kept for the next 8 calls


# ------------------------------------------------------------ 3. no second derivative in torch


def _hardsigmoid_twin(model: nn.Module) -> nn.Module:
    class Clamp(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return (x + 3).clamp(0, 6) / 6

    return nn.Sequential(*[Clamp() if isinstance(m, nn.Hardsigmoid) else m for m in model])


def test_hardsigmoid_with_output_is_refused_before_the_backward_pass() -> None:
    """Found in review: accepted, then the caller's backward raised torch's raw 'derivative for
    aten::hardsigmoid_backward is not implemented'."""
    model = _mlp(nn.Hardsigmoid())
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    for call in (
        lambda: gradient_penalty(model, lf, X, y, output=model(X)),
        lambda: fisher_penalty(model, lf, X, output=model(X), seed=0),
        lambda: GradientNormPenalty(model, lf, "gradient", every=3)(X, y, output=model(X)),
    ):
        with pytest.raises(NotImplementedError, match=r"hardsigmoid_backward.*'1'.*output=None"):
            call()
    # the way out: output=None, exact against the clamp formula's brute force
    value = gradient_penalty(model, lf, X, y)
    want, want_grad = _brute(_hardsigmoid_twin(model), lambda o: lf(o, y), X)
    assert float(value.detach()) == pytest.approx(want, rel=1e-10)
    _assert_close(_grads(value, model), want_grad)


def test_hardsigmoid_behind_frozen_parameters_is_accepted_and_exact() -> None:
    """The check is exact: with nothing trainable before it, Hardsigmoid's second derivative is
    never needed (fine-tuning the head of a MobileNetV3), and output= keeps working."""
    model = _mlp(nn.Hardsigmoid())
    model[0].requires_grad_(False)
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    value = gradient_penalty(model, lf, X, y, output=model(X))
    want, want_grad = _brute(_hardsigmoid_twin(model), lambda o: lf(o, y), X)
    assert float(value.detach()) == pytest.approx(want, rel=1e-10)
    _assert_close(_grads(value, model), want_grad)


class _FunctionalHardsigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.hardsigmoid(self.a(x)))


class _Bags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bag(ids)))


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _OnceDifferentiable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(_Square.apply(self.a(x)))


@pytest.mark.parametrize(
    ("make", "inputs", "match"),
    [
        (_FunctionalHardsigmoid, "floats", r"hardsigmoid_backward.*\(x \+ 3\)\.clamp"),
        (_Bags, "ids", r"_embedding_bag_backward.*nn.Embedding"),
        (_OnceDifferentiable, "floats", r"once_differentiable"),
    ],
)
def test_ops_without_a_second_derivative_are_refused_with_the_way_out(
    make: type, inputs: str, match: str
) -> None:
    torch.manual_seed(0)
    model = make().to(DT)
    X, y = _data()
    if inputs == "ids":
        X = torch.randint(0, 10, (6, 3))
    lf = nn.CrossEntropyLoss()
    for call in (
        lambda: gradient_penalty(model, lf, X, y, output=model(X)),
        lambda: gradient_penalty(model, lf, X, y),
        lambda: random_label_penalty(model, lf, X, seed=0),
    ):
        with pytest.raises(NotImplementedError, match=match):
            call()
    assert all(p.grad is None for p in model.parameters())


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)
        return self.head(a[:, 0])


def test_fused_attention_output_is_refused_and_the_own_forward_runs_the_math_kernel() -> None:
    """The CPU flash kernel has no double backward: an output of it is refused naming the math
    kernel; the penalty's own forward runs the math kernel and is exact."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = _Attention().to(DT)
    g = torch.Generator().manual_seed(3)
    xs, t = torch.randn(2, 5, 4, generator=g, dtype=DT), torch.randint(0, 3, (2, 5), generator=g)
    lf = nn.CrossEntropyLoss()
    with pytest.raises(NotImplementedError, match=r"attention.*sdpa_kernel\(SDPBackend.MATH\)"):
        gradient_penalty(model, lf, xs, t, output=model(xs))
    value = gradient_penalty(model, lf, xs, t)
    with sdpa_kernel(SDPBackend.MATH):
        want, want_grad = _brute(model, lambda o: _flat_loss(lf, o, t), xs)
        out = model(xs)  # the way out named for output=: the math kernel in the forward
        via_output = gradient_penalty(model, lf, xs, t, output=out)
    assert float(value.detach()) == pytest.approx(want, rel=1e-10)
    assert float(via_output.detach()) == pytest.approx(want, rel=1e-10)
    _assert_close(_grads(value, model), want_grad)


# ------------------------------------------------------------------- 4. output= of a tuple


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.lin(x)
        return out, out.pow(2).mean()


def test_tuple_output_is_a_clear_type_error() -> None:
    """Found in review: AttributeError: 'tuple' object has no attribute 'requires_grad'."""
    torch.manual_seed(0)
    model = _TwoOutputs().to(DT)
    X, y = _data()
    lf = nn.CrossEntropyLoss()
    for output in (model(X), list(model(X))):
        for call in (
            lambda o=output: gradient_penalty(model, lf, X, y, output=o),
            lambda o=output: fisher_penalty(model, lf, X, output=o, seed=0),
            lambda o=output: random_label_penalty(model, lf, X, output=o, seed=0),
            lambda o=output: GradientNormPenalty(model, lf, "gradient", every=2)(X, y, output=o),
        ):
            with pytest.raises(TypeError, match=r"output= is a (tuple|list).*output=out\[0\]"):
                call()
    # the logits element is accepted and exact
    value = gradient_penalty(model, lf, X, y, output=model(X)[0])
    want, _ = _brute(nn.Sequential(model.lin), lambda o: lf(o, y), X)
    assert float(value.detach()) == pytest.approx(want, rel=1e-10)


class _FailOnce:
    """Wraps a penalty's ``_compute``: raises ``torch.OutOfMemoryError`` on call ``at`` (after the
    labels were drawn), like a double backward running out of memory."""

    def __init__(self, compute: Callable[..., Tensor], at: int) -> None:
        self.compute, self.at, self.n = compute, at, 0

    def __call__(self, *args: object, **kwargs: object) -> Tensor:
        value = self.compute(*args, **kwargs)
        self.n += 1
        if self.n == self.at:
            raise torch.OutOfMemoryError("simulated: out of memory in the double backward")
        return value


@pytest.mark.parametrize("kind", ["fisher", "gradient"])
def test_a_failed_recomputation_leaves_the_schedule_as_a_run_without_that_batch(kind: str) -> None:
    """A recomputation that raises (the loop catches it and skips the batch) counted as a call and
    advanced the label generator: the next step trained on a gradient cached ``every + 1`` steps
    earlier, and the run differed from one without that batch (found in review)."""
    gen = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(8, 4, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(6)
    ]
    loss_fn = nn.CrossEntropyLoss()

    def run(skip: int | None = None, fail: bool = False) -> tuple[nn.Module, list[int]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        pen = GradientNormPenalty(model, loss_fn, kind=kind, alpha=1.0, every=2, seed=0)
        if fail:  # the second recomputation (batch 2) raises
            pen._compute = _FailOnce(pen._compute, at=2)  # type: ignore[method-assign]
        calls = []
        for k, (X, y) in enumerate(batches):
            if k == skip:
                continue
            opt.zero_grad()
            out = model(X)
            try:
                term = pen(X, y, output=out)
            except torch.OutOfMemoryError:
                continue
            (loss_fn(out, y) + term).backward()
            opt.step()
            calls.append(pen.calls)
        return model, calls

    ref, ref_calls = run(skip=2)
    got, got_calls = run(fail=True)
    assert got_calls == ref_calls
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)
