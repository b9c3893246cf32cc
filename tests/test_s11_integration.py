"""Review sweep s11, fixes made at integration (outside the fixers' files)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvlab as cl


def _problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (5,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


@pytest.mark.parametrize("fn", [cl.kfac, cl.fisher_norms])
def test_mc_samples_is_never_a_bool(fn):
    model, loss_fn, data = _problem()
    with pytest.raises(ValueError, match="mc_samples"):
        fn(model, loss_fn, data, kind="mc", mc_samples=True)


@pytest.mark.parametrize("fn", [cl.kfac, cl.fisher_norms])
@pytest.mark.parametrize(
    "kw, err",
    [({"seed": "a"}, ValueError), ({"seed": True}, ValueError), ({"generator": 5}, TypeError)],
)
def test_deterministic_kinds_refuse_bad_randomness(fn, kw, err):
    model, loss_fn, data = _problem()
    with pytest.raises(err, match="seed|generator"):
        fn(model, loss_fn, data, kind="exact", **kw)


def test_an_explicit_probe_batch_is_sized_with_the_operators_buffers():
    """``trace(batch_size=k, memory_budget=B)`` counted 2 vectors per probe where a batch holds
    up to :data:`PROBE_VECTORS` (the default sizing's count; 26% over the budget measured)."""
    from curvlab.estimators._trace import PROBE_VECTORS

    model, loss_fn, data = _problem()
    dim = sum(p.numel() for p in model.parameters())
    vec = dim * 8
    fits = PROBE_VECTORS * 3 * vec
    r = cl.trace(model, loss_fn, data, num_probes=6, batch_size=3, memory_budget=fits, seed=0)
    assert r.num_matvecs == 6
    with pytest.raises(cl.estimators.EstimatorMemoryError, match=f"{PROBE_VECTORS * 3} vectors"):
        cl.trace(model, loss_fn, data, num_probes=6, batch_size=3, memory_budget=fits - 1, seed=0)


def _wrapped_like_accelerate(model: nn.Module) -> nn.Module:
    """What ``Accelerator(mixed_precision="bf16").prepare`` does to a model's forward."""
    import types

    model._original_forward = model.forward
    plain = model.forward.__func__

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain(self, *args, **kwargs).float()

    model.forward = types.MethodType(forward, model)
    return model


def test_a_forward_wrapped_in_autocast_by_accelerate_is_measured_in_float():
    """accelerate (and the HF Trainer under bf16=True) leave an autocast wrapper on
    ``model.forward``; curvlab's passes computed inside it, in bfloat16 (an exact Tr(GGN) of
    4.22700 for 4.22577; found in review). They now call the original forward."""
    g = torch.Generator().manual_seed(1)
    plain = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    wrapped = _wrapped_like_accelerate(copy.deepcopy(plain))
    X = torch.randn(12, 6, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    assert wrapped(X).dtype == torch.float32 and not torch.equal(wrapped(X), plain(X))
    forward = wrapped.__dict__["forward"]
    for f in (
        lambda m: cl.trace(m, loss_fn, (X, y), matrix="ggn", method="exact").value,
        lambda m: cl.eigenvalues(m, loss_fn, (X, y), k=1, seed=0).values,
        lambda m: torch.cat([v.flatten() for v in cl.diag_fisher(m, loss_fn, (X, y)).values()]),
        lambda m: cl.gradient_stats(m, loss_fn, (X, y)).noise_scale,
    ):
        assert torch.equal(torch.as_tensor(f(wrapped)), torch.as_tensor(f(plain)))
        assert wrapped.__dict__["forward"] is forward  # the wrapper is put back


def test_fingerprints_of_tensors_past_two_to_the_24_entries():
    """``linspace`` in float32 rounded ``n - 1`` up to ``n``: an IndexError on a GPT-2-sized
    embedding (50257 x 768) or a batch of 128 ImageNet images (found in review)."""
    from curvlab._kept_batches import fingerprint

    n = 50257 * 768
    t = torch.arange(n, dtype=torch.int32)
    entries, total = fingerprint(t)
    assert entries[0] == 0 and entries[-1] == n - 1 and len(entries) == 64
    assert total == t.sum()


class _Counting(nn.Module):
    """Counts its calls in an integer buffer that never touches the output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_a_model_counting_its_calls_is_measured_over_several_batches():
    """The operators' state check refused any buffer a forward changes; an integer counter is
    not a value products read (found in review: exact trace refused on two batches)."""
    from torch.func import functional_call, hessian

    model = _Counting().double()
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (7,), generator=g)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(functional_call(model.net, {k[4:]: v for k, v in params.items()}, (X,)), y)

    want = torch.trace(hessian(loss)(flat0))
    got = cl.trace(model, loss_fn, batches, method="exact").value
    assert got == pytest.approx(float(want), rel=1e-10)


class _MaxNorm(nn.Module):
    def __init__(self, max_norm: float | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, max_norm=max_norm)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1))


def test_noise_scale_hessian_of_a_max_norm_embedding_is_brute_force():
    """The measurement's own forward renormalised the embedding's rows, and its operator took
    that for a change of the user's: refused (found in review). Brute force at the renormalised
    weights (the function every forward pass computes), within 5 standard errors."""
    from torch.func import functional_call, grad, hessian, vmap

    torch.manual_seed(0)
    model = _MaxNorm(1.0).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (12, 4), generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    before = model.emb.weight.detach().clone()
    rep = cl.analyze(
        model, loss_fn, (x, y), quantities=["noise_scale_hessian"], seed=0, num_probes=64
    )
    assert torch.equal(model.emb.weight.detach(), before)  # left as it was
    values = rep.to_dict()["entries"][0]["values"]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(x)  # renormalises the rows x looks up, as every forward of curvlab's does
    plain = _MaxNorm(None).double()
    plain.load_state_dict(twin.state_dict())
    names = [n for n, _ in plain.named_parameters()]
    shapes = [p.shape for _, p in plain.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in plain.parameters()])

    def unflat(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def one(flat, xi, yi):
        return loss_fn(functional_call(plain, unflat(flat), (xi[None],)), yi[None])

    def mean_loss(flat):
        return loss_fn(functional_call(plain, unflat(flat), (x,)), y)

    per = vmap(grad(one), in_dims=(None, 0, 0))(flat0, x, y)
    G = per.mean(0)
    H = hessian(mean_loss)(flat0)
    centred = per - G
    sigma = centred.T @ centred / len(y)
    want = float(torch.trace(H @ sigma) / (G @ H @ G))
    got, se = values["noise_scale_hessian"], values["noise_scale_hessian_stderr"]
    assert abs(got - want) <= 5 * se and se < 0.5 * abs(want)


def test_numpy_seeds_and_counts_are_taken():
    """``check_randomness`` accepts numpy integers; ``fisher_norms`` then passed one to
    ``manual_seed`` (TypeError), and ``Diagnostics`` refused ``every=np.int64(2)`` and
    ``explosion_until=5e3`` (found in review)."""
    import numpy as np

    model, loss_fn, data = _problem()
    a = cl.fisher_norms(model, loss_fn, data, kind="mc", seed=np.int64(2)).frobenius
    assert a == cl.fisher_norms(model, loss_fn, data, kind="mc", seed=2).frobenius
    d = cl.Diagnostics(model, loss_fn, every=np.int64(2), explosion_until=5e3)
    assert d.every == 2 and type(d.every) is int
    with pytest.raises(ValueError, match="explosion_until"):
        cl.Diagnostics(model, loss_fn, explosion_until=2.5)


class _Masked(nn.Module):
    """A bool mask buffer on the first layer's weight (pruning), and a used call counter."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, width)
        self.l2 = nn.Linear(width, 2)
        self.register_buffer("mask", torch.ones(width, 3, dtype=torch.bool))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        scale = 1.0 + 0.1 * int(self.calls % 2)  # the count changes the output
        w = self.l1.weight * self.mask
        return self.l2(torch.tanh(nn.functional.linear(x, w, self.l1.bias) * scale))


def _dense_hessian(model: _Masked, calls: int, X, y, loss_fn):
    """The Hessian of the forward as written, with the counter at ``calls`` before the call."""
    from torch.func import hessian

    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    mask = model.mask.clone()
    scale = 1.0 + 0.1 * ((calls + 1) % 2)

    def loss(flat):
        w1, b1, w2, b2, i = *[None] * 4, 0
        parts = []
        for s in shapes:
            parts.append(flat[i : i + s.numel()].reshape(s))
            i += s.numel()
        w1, b1, w2, b2 = parts
        h = torch.tanh(nn.functional.linear(X, w1 * mask, b1) * scale)
        return loss_fn(nn.functional.linear(h, w2, b2), y)

    return hessian(loss)(flat0)


@pytest.mark.parametrize("width", [4, 25000])
def test_integer_and_boolean_buffers_as_the_operator_was_built(width):
    """Small integer/bool buffers are copied at build (every product's forward starts from them:
    a counter the forward uses gives one matrix, the user's counter is not moved); a large one
    changed after build is refused (review s11: the state check had left them all out, and a
    pruning mask changed after build gave the new model's products silently)."""
    g = torch.Generator().manual_seed(5)
    model = _Masked(width).double()
    loss_fn = nn.CrossEntropyLoss()
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    op = cl.curvature_operator(model, loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])])
    v = torch.randn(op.shape[0], generator=g, dtype=torch.float64)
    small = width * 3 <= 64 * 1024
    if small:
        assert int(model.calls) == 0  # the user's counter was not moved
        # every forward pass starts from the count as built (0, then +1 inside the forward)
        H = _dense_hessian(model, 0, X, y, loss_fn)
        assert torch.allclose(op @ v, H @ v, rtol=1e-10, atol=1e-12)
        assert torch.allclose(op @ v, H @ v, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            model.mask[0, 0] = False  # as built: the copy is what products read
        assert torch.allclose(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    else:
        op @ v
        with torch.no_grad():
            model.mask[0, 0] = False
        with pytest.raises(RuntimeError, match="mask"):
            op @ v


@pytest.mark.parametrize(
    "call",
    [
        lambda m, lf, d: cl.diag_fisher(m, lf, d),
        lambda m, lf, d: cl.diag_fisher(m, lf, d, kind="exact"),
        lambda m, lf, d: cl.gradient_stats(m, lf, d),
        lambda m, lf, d: cl.kfac(m, lf, d, kind="empirical"),
        lambda m, lf, d: cl.diag_hessian(m, lf, d),
        lambda m, lf, d: cl.diag_hessian(m, lf, d, backend="func"),
        lambda m, lf, d: cl.fisher_norms(m, lf, d),
    ],
)
@pytest.mark.parametrize("sequence", [False, True])
def test_a_label_out_of_range_is_curvlabs_error_everywhere(call, sequence):
    """torch's ``IndexError: Target 3 is out of bounds`` reached the user from the paths that
    score the data's labels (it names neither ``ignore_index`` nor the fix; found in review)."""
    g = torch.Generator().manual_seed(0)
    if sequence:
        model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3)).double()
        X = torch.randint(0, 5, (4, 6), generator=g)
        y = torch.randint(0, 3, (4, 6), generator=g)
        y[1, 2] = 3
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        X = torch.randn(5, 3, generator=g, dtype=torch.float64)
        y = torch.tensor([0, 1, 3, 2, 1])
    with pytest.raises(ValueError, match=r"1 target\(s\) are neither a class index in \[0, 3\)"):
        call(model, nn.CrossEntropyLoss(), (X, y))
