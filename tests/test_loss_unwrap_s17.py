"""A ``torch.compile``'d loss is read as the module inside it at every test of the loss's kind, and
global module forward hooks are checked by what they do, not refused (review s17).

Brute force: dense float64 derivatives with ``torch.func`` of the loss written out here.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl

V, T, B, C = 7, 4, 3, 4  # T == C: both cross-entropy layouts fit (B, T, C) against (B, T)


def _seq_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(V, 3), nn.Linear(3, C)).double()


def _flat(model: nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    return params, torch.cat([p.flatten() for p in params.values()])


def _unflat(params: dict[str, torch.Tensor], w: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, p in params.items():
        out[k] = w[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def _eager_compiled(loss: nn.Module) -> nn.Module:
    """``torch.compile`` with the eager backend: the same ``OptimizedModule`` wrapper, no
    code generation (fast)."""
    return torch.compile(loss, backend="eager")


def test_classes_last_marks_a_compiled_loss() -> None:
    """``classes_last(torch.compile(ce))`` raised TypeError ("got OptimizedModule"); now it
    returns a compiled copy whose module is marked (the user's loss unmarked), and a T == C
    batch is read with the classes last: the exact Hessian trace is the brute-force one of
    ``CE(logits.reshape(-1, C), y.reshape(-1))``, not of torch's layout."""
    model = _seq_model()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, C, (B, T), generator=g)
    ce = nn.CrossEntropyLoss()
    compiled = _eager_compiled(ce)
    marked = cl.classes_last(compiled)
    assert type(marked) is type(compiled) and marked is not compiled
    assert not hasattr(ce, "curvlab_classes_last")  # the user's module is left as it is
    assert compiled._orig_mod is ce

    params, w0 = _flat(model)

    def loss(w: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, _unflat(params, w), (X,))
        return nn.functional.cross_entropy(out.reshape(-1, C), y.reshape(-1))

    want = float(torch.trace(hessian(loss)(w0)))
    got = cl.trace(model, marked, (X, y), method="exact").value
    # float64 sums of a few dozen terms: rounding far below 1e-10 relative
    assert got == pytest.approx(want, rel=1e-10)
    # the marked copy still computes torch's loss (the marker is read by curvlab only)
    logits = torch.randn(2, C, dtype=torch.float64)
    assert torch.equal(marked(logits, torch.tensor([0, 1])), ce(logits, torch.tensor([0, 1])))


def test_classes_last_refuses_a_compiled_loss_of_another_kind() -> None:
    with pytest.raises(TypeError, match=r"OptimizedModule \(compiled: torch.compile of MSELoss\)"):
        cl.classes_last(_eager_compiled(nn.MSELoss()))


def test_noise_separate_pass_reads_a_compiled_cross_entropy() -> None:
    """The noise samplers' separate pass tested ``isinstance(loss_fn, nn.CrossEntropyLoss)`` on
    the compiled wrapper and refused a flattened ``(B*T, C)`` loss input with a wrong culprit
    ("a reshape that splits the classes"); now the exact diagonal Fisher of the step is the
    brute-force diagonal GGN ``(1/M) sum_n diag(J_n^T (diag p_n - p_n p_n^T) J_n)``."""
    V2, T2, B2, C2 = 7, 5, 4, 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V2, 4), nn.Linear(4, C2)).double()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randint(0, V2, (B2, T2), generator=g), torch.randint(0, C2, (B2, T2), generator=g)
    loss_fn = _eager_compiled(nn.CrossEntropyLoss())
    sampler = cl.noise.DiagFisherNoise("exact", scale=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    noisy = cl.noise.NoisyOptimizer(opt, sampler, model, loss_fn, seed=0)

    def closure() -> torch.Tensor:
        noisy.zero_grad()
        loss = loss_fn(model(X).reshape(-1, C2), y.reshape(-1))
        loss.backward()
        return loss

    noisy.step(closure)

    params, w0 = _flat(model)
    f = lambda w: functional_call(model, _unflat(params, w), (X,)).reshape(-1, C2)  # noqa: E731
    J = jacrev(f)(w0)  # (B*T, C, P)
    p = f(w0).softmax(-1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    diag = torch.einsum("ncp,ncd,ndp->p", J, H, J) / (B2 * T2)
    want = _unflat(params, diag)
    state = noisy._state
    for name, value in want.items():
        torch.testing.assert_close(state[name], value, rtol=1e-10, atol=1e-14)


def _small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (6,), generator=g)


def test_a_global_logging_forward_hook_is_accepted() -> None:
    """A global forward hook that only observes (returns ``None``) was refused with TypeError;
    it leaves the loss as it is, so the exact Hessian trace is the brute-force one."""
    model, X, y = _small()
    params, w0 = _flat(model)

    def loss(w: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, _unflat(params, w), (X,))
        return nn.functional.cross_entropy(out, y)

    want = float(torch.trace(hessian(loss)(w0)))
    seen: list[str] = []

    def log_shapes(module: nn.Module, inputs: object, output: object) -> None:
        seen.append(type(module).__name__)
        logging.debug("%s -> %s", type(module).__name__, getattr(output, "shape", None))

    handle = nn.modules.module.register_module_forward_hook(log_shapes)
    try:
        got = cl.trace(model, nn.CrossEntropyLoss(), (X, y), method="exact").value
        cl.Diagnostics(model, nn.CrossEntropyLoss(), every=1).close()
    finally:
        handle.remove()
    assert got == pytest.approx(want, rel=1e-10)
    assert "CrossEntropyLoss" in seen  # the check called the loss module, with the hook


def test_a_global_pre_hook_that_changes_the_loss_input_is_refused() -> None:
    """A global forward pre-hook that scales the loss module's logits changes the loss torch
    computes: refused, naming the hook and both values on the batch."""
    model, X, y = _small()

    def sharpen(module: nn.Module, args: tuple) -> tuple | None:
        return (3 * args[0], args[1]) if isinstance(module, nn.CrossEntropyLoss) else None

    handle = nn.modules.module.register_module_forward_pre_hook(sharpen)
    try:
        with torch.no_grad():
            out = model(X)
        want = float(nn.functional.cross_entropy(out, y))
        hooked = float(nn.functional.cross_entropy(3 * out, y))
        assert abs(want - hooked) > 1e-3  # the hook makes a difference here
        with pytest.raises(TypeError, match=r"sharpen") as info:
            cl.trace(model, nn.CrossEntropyLoss(), (X, y), method="exact")
    finally:
        handle.remove()
    msg = str(info.value)
    assert f"{hooked:.6g}" in msg and f"{want:.6g}" in msg


def test_a_global_backward_hook_is_off_in_curvlab_passes() -> None:
    """Global backward hooks were refused (no forward value shows what they do); since review
    s19 they are off in curvlab's passes, as docs/models.md promises: a hook that would double
    every gradient changes nothing, it does not run, and it is registered again after the call."""
    model, X, y = _small()
    calls = []

    def doubling(module, grad_output):
        calls.append(type(module).__name__)
        return tuple(None if g is None else 2 * g for g in grad_output)

    want = cl.trace(model, nn.CrossEntropyLoss(), (X, y), method="exact").value
    handle = nn.modules.module.register_module_full_backward_pre_hook(doubling)
    try:
        got = cl.trace(model, nn.CrossEntropyLoss(), (X, y), method="exact").value
        assert calls == []
        model(X).sum().backward()  # still registered: the user's own backward runs it
        assert calls
    finally:
        handle.remove()
    assert got == want
