"""Review s20: which parameters a reentrant activation checkpoint hides, told from what ran.

``torch.utils.checkpoint(..., use_reentrant=True)`` runs its block under ``no_grad``: the block's
parameters get no gradient from ``torch.autograd.grad`` (curvlab's passes), only from
``loss.backward()``, which runs the checkpoint's node. Before, a parameter counted as hidden only
where it was absent from the output's graph, and the block was guessed from what the checkpointed
function holds:

* a weight used inside the checkpoint and again outside it (a head tied to the block's weight) is
  in the graph through its outside use: not refused, and its inside contribution was dropped
  silently (an exact Hessian trace 0.147 for 0.332, a gradient mean of norm 0.204 for 0.265);
* a lambda that holds ``self`` (``checkpoint(lambda z: self.blk(z), h)``) made the whole model
  the block: an unused trainable ``self.spare`` was refused as "run inside reentrant activation
  checkpointing" although the block was frozen and every number is right.

Now the modules that run inside a reentrant checkpoint's forward are recorded while curvlab's
forward pass runs (a global forward pre-hook, removed after it). The right numbers are checked
against dense float64 brute force with ``torch.func`` on the model without checkpointing.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.checkpoint import checkpoint

import curvlab as cl

DT = torch.float64


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 4, (6,), generator=g)


def _trace(model: nn.Module) -> float:
    """Brute force: the Hessian trace of the mean cross-entropy with respect to every trainable
    parameter of ``model``, from its dense Hessian (``model`` must not checkpoint)."""
    X, y = _data()
    chosen = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    names, shapes = list(chosen), [p.shape for p in chosen.values()]
    sizes = [p.numel() for p in chosen.values()]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.view(s) for t, s in zip(theta.split(sizes), shapes))))
        return F.cross_entropy(functional_call(model, {**parts, **rest}, (X,)), y)

    theta = torch.cat([p.reshape(-1) for p in chosen.values()])
    return float(torch.diagonal(hessian(loss)(theta)).sum())


def _exact_trace(model: nn.Module) -> float:
    return float(cl.trace(model, nn.CrossEntropyLoss(), _data(), method="exact").value)


def _global_pre_hooks() -> list:
    return list(nn.modules.module._global_forward_pre_hooks)


# ------------------------------------------------------------- a weight used inside and outside


class _Tied(nn.Module):
    """A frozen input layer, a block checkpointed with a weight its head uses again."""

    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.mode = mode  # None: no checkpointing (the brute force's function)
        self.inp = nn.Linear(4, 4).requires_grad_(False)
        self.blk = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.mode is not None:
            h.requires_grad_(True)  # (HF's enable_input_require_grads)
        if self.mode == "module":
            h = checkpoint(lambda z: torch.tanh(self.blk(z)), h, use_reentrant=True)
        else:
            h = torch.tanh(self.blk(h))
        return F.linear(h, self.blk.weight)  # the head tied to the block's weight


def _tied(mode: str | None) -> _Tied:
    torch.manual_seed(1)
    return _Tied(mode).to(DT)


_CALLS = {
    "trace": lambda m: _exact_trace(m),
    "gradient_stats": lambda m: cl.gradient_stats(m, nn.CrossEntropyLoss(), _data()),
    "diag_fisher": lambda m: cl.diag_fisher(m, nn.CrossEntropyLoss(), _data()),
}


@pytest.mark.parametrize("call", sorted(_CALLS))
def test_a_weight_used_inside_and_outside_a_reentrant_checkpoint_is_refused(call):
    # the right number differs from what the checkpoint leaves (the inside use counts)
    assert _exact_trace(_tied(None)) == pytest.approx(_trace(_tied(None)), rel=1e-10)
    with pytest.raises(ValueError, match=r"\['blk\.weight'\] run inside reentrant"):
        _CALLS[call](_tied("module"))
    assert _global_pre_hooks() == []


# ------------------------------------------------------ a lambda that holds the whole model


class _Held(nn.Module):
    """A block checkpointed through a lambda that holds ``self``; an unused trainable head."""

    def __init__(
        self,
        checkpointed: bool,
        frozen_block: bool,
        extra: bool = False,
        functional: bool = False,
        spare: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointed, self.functional = checkpointed, functional
        self.inp = nn.Linear(4, 4).requires_grad_(False)
        self.blk = nn.Linear(4, 4).requires_grad_(not frozen_block)
        self.head = nn.Linear(4, 4)
        self.spare = nn.Linear(4, 4).requires_grad_(spare)  # never called
        self.w2 = nn.Parameter(torch.eye(4)) if extra else None

    def _block(self, z: torch.Tensor) -> torch.Tensor:
        if self.functional:  # no module call: the block is told from what the lambda holds
            z = torch.tanh(F.linear(z, self.blk.weight, self.blk.bias))
        else:
            z = torch.tanh(self.blk(z))
        return z if self.w2 is None else z @ self.w2  # (w2: a functional use inside)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.checkpointed:
            h.requires_grad_(True)
            h = checkpoint(lambda z: self._block(z), h, use_reentrant=True)
        else:
            h = self._block(h)
        return self.head(h)


def _held(
    checkpointed: bool,
    frozen_block: bool,
    extra: bool = False,
    functional: bool = False,
    spare: bool = False,
) -> _Held:
    torch.manual_seed(1)
    return _Held(checkpointed, frozen_block, extra, functional, spare).to(DT)


def test_a_frozen_block_behind_a_lambda_holding_the_model_is_not_refused_and_exact():
    got = _exact_trace(_held(True, frozen_block=True))
    assert got == pytest.approx(_trace(_held(False, frozen_block=True)), rel=1e-10)
    assert _global_pre_hooks() == []


def test_a_trainable_block_behind_a_lambda_holding_the_model_names_the_block_alone():
    with pytest.raises(ValueError) as info:
        _exact_trace(_held(True, frozen_block=False))
    assert "['blk.weight', 'blk.bias'] run inside reentrant" in str(info.value)
    assert "spare" not in str(info.value)


def test_a_parameter_used_functionally_beside_a_module_call_is_refused():
    with pytest.raises(ValueError, match=r"\['w2'\] run inside reentrant"):
        _exact_trace(_held(True, frozen_block=True, extra=True))


def test_a_block_used_functionally_alone_is_still_refused():
    # no module runs inside: every trainable parameter absent from the graph counts (the lambda
    # holds the whole model), the unused spare head too
    with pytest.raises(ValueError, match=r"\['blk\.weight', 'blk\.bias', 'spare"):
        _exact_trace(_held(True, frozen_block=False, functional=True, spare=True))


def test_an_unused_trainable_parameter_beside_a_lambda_holding_the_model_is_refused_as_such():
    # a never-called module's weight cannot be told from one the block reads directly
    # (F.linear(h, self.proj.weight), below): refused, the message saying it may be unused
    with pytest.raises(ValueError) as info:
        _exact_trace(_held(True, frozen_block=True, spare=True))
    message = str(info.value)
    assert "['spare.weight', 'spare.bias'] run inside reentrant" in message
    assert "may simply be unused" in message and "requires_grad_(False)" in message


# ------------------------------------------------- a no_grad branch is no checkpoint; no trace


class _Teacher(nn.Module):
    """A trainable branch run under ``no_grad`` on purpose, beside a frozen checkpointed block:
    the branch gets no gradient in torch's own backward pass either. ``lambda_``: the block is
    checkpointed through a lambda that holds the whole model."""

    def __init__(self, checkpointed: bool, lambda_: bool = False) -> None:
        super().__init__()
        self.checkpointed, self.lambda_ = checkpointed, lambda_
        self.inp = nn.Linear(4, 4).requires_grad_(False)
        self.blk = nn.Linear(4, 4).requires_grad_(False)
        self.teacher = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(x)
        h = self.inp(x)
        if self.checkpointed:
            fn = (lambda z: torch.tanh(self.blk(z))) if self.lambda_ else self.blk
            h = checkpoint(fn, h.requires_grad_(True), use_reentrant=True)
        else:
            h = torch.tanh(self.blk(h)) if self.lambda_ else self.blk(h)
        return self.head(h) + t


@pytest.mark.parametrize("lambda_", [False, True])
def test_a_no_grad_branch_beside_a_frozen_checkpointed_block_is_not_refused(lambda_):
    # lambda_: the teacher ran outside the checkpoint (seen so), not blamed as run inside it
    torch.manual_seed(1)
    model = _Teacher(True, lambda_).to(DT)
    torch.manual_seed(1)
    plain = _Teacher(False, lambda_).to(DT)
    assert _exact_trace(model) == pytest.approx(_trace(plain), rel=1e-10)


# ------------- a parameter read directly inside a block whose function holds the whole model


class _Direct(nn.Module):
    """A frozen input layer and a bound method of the model checkpointed, which reads a trainable
    parameter directly: a ``ParameterList``'s (``self.ws[0]``) or a never-called ``Linear``'s
    (``F.linear(h, self.proj.weight, self.proj.bias)``); a module (``Tanh``) runs inside."""

    def __init__(self, checkpointed: bool, how: str) -> None:
        super().__init__()
        self.checkpointed, self.how = checkpointed, how
        self.inp = nn.Linear(4, 4).requires_grad_(False)
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(4, 4) / 2)])
        self.proj = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 4)
        (self.proj if how == "list" else self.ws).requires_grad_(False)

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        if self.how == "list":
            return self.act(h @ self.ws[0])
        return self.act(F.linear(h, self.proj.weight, self.proj.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.checkpointed:
            h = checkpoint(self._block, h.requires_grad_(True), use_reentrant=True)
        else:
            h = self._block(h)
        return self.head(h)


def _direct(checkpointed: bool, how: str) -> _Direct:
    torch.manual_seed(1)
    return _Direct(checkpointed, how).to(DT)


@pytest.mark.parametrize(
    ("how", "names"), [("list", "['ws.0']"), ("linear", "['proj.weight', 'proj.bias']")]
)
def test_a_parameter_read_directly_in_a_block_holding_the_model_is_refused(how, names):
    # before, only the modules seen to run were looked at: no gradient for the block's weight,
    # a trace missing its part, silently (review s20: 0.600 for 0.876, 0.710 for 0.868)
    # (the hidden weight's own block of the trace, exact in float64: far above rounding)
    right = _trace(_direct(False, how))
    without = _trace_without(_direct(False, how), "ws.0" if how == "list" else "proj")
    assert abs(right - without) > 1e-3
    with pytest.raises(ValueError) as info:
        _exact_trace(_direct(True, how))
    assert f"{names} run inside reentrant" in str(info.value)
    assert "may simply be unused" in str(info.value)
    assert _global_pre_hooks() == []


def _trace_without(model: nn.Module, prefix: str) -> float:
    """Brute force with the parameters under ``prefix`` frozen: what the graph alone gives."""
    for n, p in model.named_parameters():
        if n.startswith(prefix):
            p.requires_grad_(False)
    return _trace(model)


_ENCLOSED: list[dict[str, torch.Tensor | nn.Module]] = []  # reached as a global, not held


def _through_global(z: torch.Tensor) -> torch.Tensor:
    parts = _ENCLOSED[-1]
    return torch.tanh(parts["blk"](z)) * parts["scale"]


class _Encloses(nn.Module):
    """A submodule whose forward checkpoints a function holding no module (its modules reached
    through a global, which the function's closure does not hold) that reads the submodule's
    own parameter ``scale`` directly: the submodule ran outside the checkpoint, but its call
    encloses it."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = nn.Linear(4, 4).requires_grad_(False)
        self.scale = nn.Parameter(torch.full((4,), 1.5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _ENCLOSED[:] = [{"blk": self.blk, "scale": self.scale}]
        return checkpoint(_through_global, h, use_reentrant=True)


def test_a_parameter_of_the_module_that_calls_the_checkpoint_is_refused():
    torch.manual_seed(1)
    inp, head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 4)
    model = nn.Sequential(inp, _Encloses(), head).to(DT)
    model[0].register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    with pytest.raises(ValueError, match=r"\['1\.scale'\] run inside reentrant"):
        _exact_trace(model)


def test_the_recording_hook_is_removed_after_the_forward_raises():
    class _Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            checkpoint(self.blk, x.requires_grad_(True), use_reentrant=True)
            raise RuntimeError("the model's own failure")

    before = _global_pre_hooks()
    with pytest.raises(RuntimeError, match="the model's own failure"):
        _exact_trace(_Fails().to(DT))
    assert _global_pre_hooks() == before


# ------------------------------------------ the recording hook and a torch.compile'd submodule


def test_a_compiled_submodule_gives_no_global_hook_warning_and_the_eager_numbers():
    # torch warns at every call of an OptimizedModule while a global module hook exists (the
    # recording hook): the warning came at every curvlab call on a model with a compiled block
    import warnings

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    compiled = nn.Sequential(torch.compile(eager[0], backend="eager"), eager[1], eager[2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _exact_trace(compiled)
    assert not [w for w in caught if "global hooks" in str(w.message)]
    assert got == pytest.approx(_trace(eager), rel=1e-10)
    assert _global_pre_hooks() == []


# --------------------- a trainable tensor held by the checkpointed function (closure, partial)


def _gated(blk: nn.Module, gamma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(blk(z)) * gamma


class _GatedBy:
    """A plain object (no module) holding the block and ``gamma``: its bound method is the
    checkpointed function."""

    def __init__(self, blk: nn.Module, gamma: torch.Tensor) -> None:
        self.blk, self.gamma = blk, gamma

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return _gated(self.blk, self.gamma, z)


class _Gamma(nn.Module):
    """A frozen input layer and a frozen block whose output a trainable ``gamma`` scales inside
    the checkpoint, ``gamma`` reaching the checkpointed function through a closure cell, a
    ``functools.partial``'s arguments, a list, a dict or a ``SimpleNamespace`` in a closure, or
    a plain object a bound method is bound to (no module of the function holds it, and it is
    not the model); ``outside``: the head also uses ``gamma``; ``gate``: ``gamma``
    is computed by a trainable layer from the input (a tensor with a history, not a leaf)."""

    def __init__(
        self, mode: str | None, frozen: bool = False, outside: bool = False, gate: bool = False
    ) -> None:
        super().__init__()
        self.mode, self.outside, self.gate = mode, outside, gate
        self.inp = nn.Linear(4, 4).requires_grad_(False)
        self.blk = nn.Linear(4, 4).requires_grad_(False)
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 4), requires_grad=not frozen)
        self.gproj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        blk, gamma = self.blk, (torch.sigmoid(self.gproj(x)) if self.gate else self.gamma)
        if self.mode is None:
            h = _gated(blk, gamma, h)
        else:
            h.requires_grad_(True)  # (HF's enable_input_require_grads)
            if self.mode == "closure":
                fn = lambda z: torch.tanh(blk(z)) * gamma  # noqa: E731
            elif self.mode == "partial":
                fn = functools.partial(_gated, blk, gamma)
            elif self.mode == "list":  # the tensor in a list the closure holds
                held = [blk, gamma]
                fn = lambda z: _gated(held[0], held[1], z)  # noqa: E731
            elif self.mode == "dict":  # in a dict the closure holds
                by_name = {"blk": blk, "gamma": gamma}
                fn = lambda z: _gated(by_name["blk"], by_name["gamma"], z)  # noqa: E731
            elif self.mode == "namespace":  # a plain object's attribute
                ns = SimpleNamespace(blk=blk, gamma=gamma)
                fn = lambda z: _gated(ns.blk, ns.gamma, z)  # noqa: E731
            else:  # "method": a method of a plain object holding it
                fn = _GatedBy(blk, gamma).run
            h = checkpoint(fn, h, use_reentrant=True)
        out = self.head(h)
        return out * self.gamma if self.outside else out


def _gamma(mode: str | None, **kw: bool) -> _Gamma:
    torch.manual_seed(1)
    return _Gamma(mode, **kw).to(DT)


@pytest.mark.parametrize("mode", ["closure", "partial", "list", "dict", "namespace", "method"])
def test_a_trainable_tensor_held_by_the_checkpointed_function_is_refused(mode):
    # before, only the modules the function holds were looked at: gamma got no gradient,
    # silently (review s20: an exact Tr(H) 1.8189 for 1.8727, gamma's gradient mean 0; then
    # a dict, a SimpleNamespace or a plain object holding it was not looked into: the same)
    right = _trace(_gamma(None))
    without = _trace_without(_gamma(None), "gamma")
    assert abs(right - without) > 1e-3  # gamma's part of the trace is far above rounding
    for call in sorted(_CALLS):
        with pytest.raises(ValueError, match=r"\['gamma'\] run inside reentrant"):
            _CALLS[call](_gamma(mode))
    assert _global_pre_hooks() == []


@pytest.mark.parametrize("mode", ["closure", "partial", "dict", "namespace", "method"])
def test_a_frozen_tensor_held_by_the_checkpointed_function_is_accepted_and_exact(mode):
    got = _exact_trace(_gamma(mode, frozen=True))
    assert got == pytest.approx(_trace(_gamma(None, frozen=True)), rel=1e-10)


def test_a_held_trainable_tensor_also_used_outside_the_checkpoint_is_refused():
    # in the graph through the head's use: its part inside the block is dropped all the same
    with pytest.raises(ValueError, match=r"\['gamma'\] run inside reentrant"):
        _exact_trace(_gamma("closure", outside=True))


def test_a_held_tensor_computed_by_trainable_layers_names_them():
    # the gate's history is cut inside the block: gproj's part through it is dropped
    with pytest.raises(ValueError, match=r"\['gproj\.weight', 'gproj\.bias'\] run inside"):
        _exact_trace(_gamma("closure", frozen=True, gate=True))
    frozen = _gamma("closure", frozen=True, gate=True)
    frozen.gproj.requires_grad_(False)  # nothing trainable behind it: computed, exact
    plain = _gamma(None, frozen=True, gate=True)
    plain.gproj.requires_grad_(False)
    assert _exact_trace(frozen) == pytest.approx(_trace(plain), rel=1e-10)


def test_a_trainable_block_and_a_held_dict_tensor_are_both_named():
    # before, only the trainable block's parameters were named, not the dict's gamma
    model = _gamma("dict")
    model.blk.requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['gamma', 'blk\.weight', 'blk\.bias'\] run inside"):
        _exact_trace(model)


class _FunctionalCall(nn.Module):
    """A frozen template layer run inside the checkpoint with weights of the model through
    ``partial(functional_call, template, {...})`` (the dict holds the trainable ``w``)."""

    def __init__(self, checkpointed: bool, frozen: bool = False) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.inp = nn.Linear(4, 4).requires_grad_(False)
        self.tmpl = nn.Linear(4, 4).requires_grad_(False)
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 16).view(4, 4), requires_grad=not frozen)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        fn = functools.partial(
            functional_call, self.tmpl, {"weight": self.w, "bias": self.tmpl.bias}
        )
        if self.checkpointed:
            h = checkpoint(fn, h.requires_grad_(True), use_reentrant=True)
        else:
            h = fn(h)
        return self.head(torch.tanh(h))


def _functional(checkpointed: bool, frozen: bool = False) -> _FunctionalCall:
    torch.manual_seed(1)
    return _FunctionalCall(checkpointed, frozen).to(DT)


def test_a_trainable_weight_in_a_functional_call_dict_is_refused():
    # review s20: an exact Tr(H) 0.8287 for 1.0157, w's gradient mean 0, silently
    right = _trace(_functional(False))
    assert abs(right - _trace_without(_functional(False), "w")) > 1e-3
    for call in sorted(_CALLS):
        with pytest.raises(ValueError, match=r"\['w'\] run inside reentrant"):
            _CALLS[call](_functional(True))
    assert _global_pre_hooks() == []


def test_a_frozen_weight_in_a_functional_call_dict_is_accepted_and_exact():
    got = _exact_trace(_functional(True, frozen=True))
    assert got == pytest.approx(_trace(_functional(False, frozen=True)), rel=1e-10)
