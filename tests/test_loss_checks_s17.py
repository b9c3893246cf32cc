"""Loss-module checks (review s17): a loss whose result is changed by a hook, an instance
``forward`` or an overridden ``__call__`` was silently replaced by curvlab's own formula;
``classes_last`` was not honoured for class-probability targets; ``ignore_index`` with
probability targets (torch refuses) was computed; ``fisher_norms`` quoted a one-example probe's
shapes; a ``torch.compile``'d loss was refused as unsupported. Brute force: dense float64
autograd (torch.func)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import curvlab as cl
from curvlab._losses import loss_spec
from curvlab.noise._capture import Taps

DT = torch.float64


# ------------------------------------------------------------------------------ brute force


def _model(out: int = 3, inp: int = 4) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(inp, 5), nn.Tanh(), nn.Linear(5, out)).to(DT)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return m


def _flat(m: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _unflat(m: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, p in m.named_parameters():
        out[name] = theta[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _hessian_trace(m: nn.Module, objective: Callable[[Tensor], Tensor]) -> float:
    """``Tr(H)`` of ``theta -> objective(model output at theta)``, dense float64."""

    def L(theta: Tensor) -> Tensor:
        return objective(functional_call(m, _unflat(m, theta), (_X,)))

    return float(torch.func.hessian(L)(_flat(m)).trace())


_X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
_Y = torch.tensor([0, 1, 2, 0, 1, 2])


# ------------------------------------------------------------------------------ 1. changed calls


def _hooked() -> Iterator[tuple[str, nn.Module, str]]:
    """Loss modules whose call computes something else than the plain loss (the culprit named)."""
    a = nn.CrossEntropyLoss()
    a.register_forward_hook(lambda mod, inp, out: 2 * out)
    yield "forward hook", a, "forward hook"
    b = nn.CrossEntropyLoss()
    b.register_forward_pre_hook(lambda mod, args: (args[0] / 2, args[1]))
    yield "forward pre-hook", b, "forward pre-hook"
    c = nn.CrossEntropyLoss()
    c.register_full_backward_hook(lambda mod, gin, gout: (3 * gin[0], None))
    yield "backward hook", c, "backward hook"
    d = nn.CrossEntropyLoss()
    plain = d.forward
    d.forward = lambda inp, t: 3 * plain(inp, t)
    yield "instance forward", d, "forward"

    class Halved(nn.CrossEntropyLoss):
        def __call__(self, inp: Tensor, t: Tensor) -> Tensor:
            return 0.5 * super().__call__(inp, t)

    yield "subclass __call__", Halved(), "__call__"

    class Tripled(nn.CrossEntropyLoss):
        def _call_impl(self, *args: object, **kwargs: object) -> Tensor:
            return 3 * super()._call_impl(*args, **kwargs)

    yield "subclass _call_impl", Tripled(), "_call_impl"


@pytest.mark.parametrize("case", [c[0] for c in _hooked()])
def test_a_loss_whose_call_is_changed_is_refused_not_replaced(case: str) -> None:
    """Each of these changes what ``loss_fn(model(X), y)`` returns (brute force: the trace of
    its Hessian differs from the plain loss's); curvlab computed the plain loss's (Tr(H) 1.456
    for 2.912 with a hook doubling the loss), and now refuses, naming the culprit and the fix."""
    name, lf, culprit = next(c for c in _hooked() if c[0] == case)
    m = _model()
    if name != "backward hook":  # a backward hook changes the gradient, not the value
        wanted = _hessian_trace(m, lambda out: lf(out, _Y))
        plain = _hessian_trace(m, lambda out: nn.functional.cross_entropy(out, _Y))
        assert abs(wanted - plain) > 0.1 * abs(plain)  # the call really computes another loss
    with pytest.raises(TypeError, match=rf"{culprit}.*(fold|remove)") as info:
        cl.trace(m, lf, (_X, _Y), method="exact")
    assert "model's output" in str(info.value)


def test_a_global_module_hook_is_refused() -> None:
    """A global forward hook (``register_module_forward_hook``) applies to the loss module too:
    doubling every module's output doubles the loss torch computes, and curvlab's own formula
    would leave it out."""
    m = _model()
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: 2 * out if isinstance(mod, nn.CrossEntropyLoss) else None
    )
    try:
        with pytest.raises(TypeError, match=r"global.*forward hook.*register_module_forward_hook"):
            cl.trace(m, nn.CrossEntropyLoss(), (_X, _Y), method="exact")
    finally:
        handle.remove()


def test_curvlabs_own_hooks_on_the_loss_are_allowed() -> None:
    """The noise samplers' capture registers forward (pre-)hooks on the user's loss module while
    a training step runs: those are curvlab's own and change nothing, so the loss stays valid and
    the trace is the brute-force one."""
    m, lf = _model(), nn.CrossEntropyLoss()
    want = _hessian_trace(m, lambda out: nn.functional.cross_entropy(out, _Y))
    with Taps(m, lf):
        assert lf._forward_pre_hooks and lf._forward_hooks
        assert loss_spec(lf).kind == "cross_entropy"
        got = float(cl.trace(m, lf, (_X, _Y), method="exact").value)
    # float64 sums of 150 Hessian diagonal entries of order 1: rounding ~1e-14 relative
    assert got == pytest.approx(want, rel=1e-10)


def test_a_compiled_loss_is_its_original_module() -> None:
    """``torch.compile(nn.CrossEntropyLoss())`` computes the plain loss: accepted (it was
    "unsupported loss OptimizedModule"), the brute-force trace; a hook on the module inside is
    still refused."""
    m, lf = _model(), nn.CrossEntropyLoss()
    compiled = torch.compile(lf)
    want = _hessian_trace(m, lambda out: nn.functional.cross_entropy(out, _Y))
    got = float(cl.trace(m, compiled, (_X, _Y), method="exact").value)
    assert got == pytest.approx(want, rel=1e-10)
    lf.register_forward_hook(lambda mod, inp, out: 2 * out)
    with pytest.raises(TypeError, match="forward hook"):
        cl.trace(m, compiled, (_X, _Y), method="exact")


# ------------------------------------------------------------------------------ 2. classes_last


def _soft(shape: tuple[int, ...], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=DT), -1)


def test_classes_last_with_class_probabilities_is_refused_not_read_in_axis_1() -> None:
    """``classes_last`` promises every batch is read with the classes last; probability targets
    were read in axis 1 instead (T == C == 3, rows and columns summing to 1: Tr(H) 2.611 for the
    promised 3.199). Brute force: the two readings differ, so curvlab must not answer with
    either silently; it refuses, with the fix."""
    B, T, C = 2, 3, 3
    m = nn.Linear(4, C).to(DT)
    X = torch.randn(B, T, 4, generator=torch.Generator().manual_seed(2), dtype=DT)
    P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.2, 0.1, 0.7]], dtype=DT)
    q = P.expand(B, T, C).clone()

    def trace(last: bool) -> float:
        def L(theta: Tensor) -> Tensor:
            out = functional_call(m, _unflat(m, theta), (X,))
            if last:
                return nn.functional.cross_entropy(out.reshape(-1, C), q.reshape(-1, C))
            return nn.functional.cross_entropy(out, q)

        return float(torch.func.hessian(L)(_flat(m)).trace())

    assert abs(trace(True) - trace(False)) > 0.1
    lf = cl.classes_last(nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"classes_last.*class-probability.*movedim\(-1, 1\)"):
        cl.trace(m, lf, (X, q), method="exact")


def test_probabilities_with_the_classes_last_get_the_right_advice() -> None:
    """Unmarked ``(B, T, C)`` probabilities summing to 1 over the last axis (T != C): the sums
    over axis 1 fail, and the advice was to renormalise axis 1 (the wrong axis); it now says
    torch's probability targets hold the classes in axis 1, and how to move or flatten them."""
    m = nn.Linear(4, 3).to(DT)
    X = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    q = _soft((2, 5, 3), 4)
    with pytest.raises(ValueError, match=r"axis 1") as info:
        cl.trace(m, nn.CrossEntropyLoss(), (X, q), method="exact")
    msg = str(info.value)
    assert "last axis" in msg and "(B*T, C)" in msg and "movedim(-1, 1)" in msg
    assert "y / y.sum(1, keepdim=True)" not in msg


def test_probability_sums_of_targets_requiring_grad_raise_no_torch_warning() -> None:
    """The sums check converted a ``requires_grad`` tensor to a float: torch's UserWarning."""
    spec = loss_spec(nn.CrossEntropyLoss())
    out = torch.randn(4, 3, dtype=DT)
    q = _soft((4, 3), 5).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.prepare(out, q)


# ------------------------------------------------------------------------------ 3. ignore_index


@pytest.mark.parametrize("ignore_index", [0, 2])
def test_ignore_index_with_class_probabilities_is_refused_as_torch_does(ignore_index: int) -> None:
    """torch raises "ignore_index is not supported for floating point target" for
    ``ignore_index >= 0``; curvlab computed a number for a loss torch cannot take."""
    m = _model()
    q = _soft((6, 3), 6)
    lf = nn.CrossEntropyLoss(ignore_index=ignore_index)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        lf(m(_X), q)
    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index}.*class-probability"):
        cl.trace(m, lf, (_X, q), method="exact")
    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index}.*class-probability"):
        cl.gradient_stats(m, lf, (_X, q))


def test_a_negative_ignore_index_with_class_probabilities_is_taken_as_torch_does() -> None:
    """torch takes a negative ``ignore_index`` with probability targets (it has no effect)."""
    m = _model()
    q = _soft((6, 3), 7)
    lf = nn.CrossEntropyLoss(ignore_index=-1)
    want = _hessian_trace(m, lambda out: lf(out, q))
    got = float(cl.trace(m, lf, (_X, q), method="exact").value)
    assert got == pytest.approx(want, rel=1e-10)


# ------------------------------------------------------------------------------ 4. messages


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_fisher_norms_quotes_the_batch_shapes(kind: str) -> None:
    """The error named a one-example probe's shapes, "(1, 3)" for the user's (6, 3) logits."""
    m = _model()
    with pytest.raises(ValueError, match=r"\(6, 3\).*\(6, 1\)"):
        cl.fisher_norms(m, nn.CrossEntropyLoss(), (_X, _Y[:, None]), kind=kind)
    with pytest.raises(ValueError, match=r"\(6, 3\).*\(6, 1\)"):
        cl.fisher_norms(m, nn.MSELoss(), (_X, torch.zeros(6, 1, dtype=DT)), kind=kind)
