"""Review s22: a module registered under two names keeps its parameters through curvlab's
``torch.func`` passes, and K-FAC names a layer whose weight is set in its forward pass.

torch's ``functional_call`` (``tie_weights=True``) restored the stand-in of a module registered
under two names (``nn.ModuleList([block] * 3)``, ``seq[2] = seq[0]``) instead of its
``nn.Parameter``: after ``diag_fisher(kind="exact")`` a Hessian trace was 0.8206 for a true 1.1781
and the user's optimizer no longer trained the layer. Brute force here is a hand-written
functional forward of the same network in float64 (``torch.func`` on explicit tensors).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jacrev, vmap

import curvlab as cl
from curvlab.analysis import Diagnostics

DT = torch.float64
N, D, C = 4, 3, 3
EPS = torch.finfo(DT).eps


class Albert(nn.Module):
    """ALBERT-style cross-layer sharing: one block registered under three names."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.layers = nn.ModuleList([block] * 3)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _chain() -> nn.Module:
    """One Linear applied twice in a chain (``seq[2] = seq[0]``)."""
    seq = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D), nn.Tanh(), nn.Linear(D, C))
    seq[2] = seq[0]
    return seq


MODELS = {"albert": (Albert, 3), "chain": (_chain, 2)}


def _model(kind: str) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    model = MODELS[kind][0]().to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(N, D, generator=g, dtype=DT), torch.randint(0, C, (N,), generator=g)


def _flat_forward(kind: str, model: nn.Module):
    """``f(theta, x)``: the network's logits from a flat parameter vector, written out by hand
    (the shared block ``repeats`` times, then the head); ``theta`` in ``named_parameters`` order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    repeats = MODELS[kind][1]

    def f(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts, i = [], 0
        for s in shapes:
            k = math.prod(s)
            parts.append(theta[i : i + k].reshape(s))
            i += k
        w, b, wh, bh = parts
        for _ in range(repeats):
            x = torch.tanh(x @ w.T + b)
        return x @ wh.T + bh

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta, names, shapes


def _brute(kind: str, model: nn.Module) -> dict:
    """GGN, empirical Fisher, per-example, per-label squared gradient norms, the mean loss."""
    f, theta, names, shapes = _flat_forward(kind, model)
    X, y = _data()
    J = vmap(jacrev(f), in_dims=(None, 0))(theta, X)  # (N, C, P)
    p = torch.softmax(vmap(f, in_dims=(None, 0))(theta, X), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, H, J) / N

    def nll(t: torch.Tensor, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(f(t, x[None]), label[None])

    g = vmap(grad(nll), in_dims=(None, 0, 0))(theta, X, y)  # (N, P)
    ef = g.T @ g / N
    per_label = torch.stack(
        [vmap(grad(nll), in_dims=(None, 0, 0))(theta, X, torch.full_like(y, c)) for c in range(C)],
        1,
    )  # (N, C, P)

    def loss(t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(f(t, X), y)

    return {
        "ggn": ggn,
        "ef": ef,
        "grad": g.mean(0),
        "sq": per_label.pow(2).sum(-1),
        "loss": loss,
        "theta": theta,
        "names": names,
        "shapes": shapes,
    }


def _split(flat: torch.Tensor, names: list[str], shapes: list) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n, s in zip(names, shapes):
        k = math.prod(s)
        out[n] = flat[i : i + k].reshape(s)
        i += k
    return out


def _slots(model: nn.Module) -> dict:
    """Every module's ``_parameters`` and ``_buffers`` entries, by identity."""
    return {
        (id(m), table, name): t
        for m in model.modules()
        for table in ("_parameters", "_buffers")
        for name, t in getattr(m, table).items()
    }


def _assert_same_objects(model: nn.Module, before: dict) -> None:
    after = _slots(model)
    assert after.keys() == before.keys()
    moved = [k[1:] for k, t in before.items() if after[k] is not t]
    assert not moved, f"replaced by another object: {moved}"
    for p in model.parameters():
        assert isinstance(p, nn.Parameter) and p.is_leaf and p.requires_grad


def _close(a: torch.Tensor | float, b: torch.Tensor | float, scale: float) -> None:
    # float64 reductions of a few dozen terms of size ~scale: a few hundred eps of it
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT), rtol=0, atol=1e3 * EPS * scale
    )


ce = nn.CrossEntropyLoss()


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("backend", ["auto", "func"])
def test_diag_fisher_exact_keeps_the_shared_parameters(kind: str, backend: str) -> None:
    model = _model(kind)
    bf = _brute(kind, model)
    want = _split(torch.diagonal(bf["ggn"]), bf["names"], bf["shapes"])
    scale = float(bf["ggn"].abs().max())
    before = _slots(model)
    for _ in range(2):  # the second call on the model the first left behind
        got = cl.diag_fisher(model, ce, _data(), kind="exact", backend=backend)
        _assert_same_objects(model, before)
        assert set(got) == set(want)
        for n in want:
            _close(got[n], want[n], scale)


@pytest.mark.parametrize("kind", list(MODELS))
def test_fisher_norms_func_keeps_the_shared_parameters(kind: str) -> None:
    model = _model(kind)
    bf = _brute(kind, model)
    ef = bf["ef"]
    before = _slots(model)
    for _ in range(2):
        got = cl.fisher_norms(model, ce, _data(), backend="func")
        _assert_same_objects(model, before)
        _close(got.frobenius, torch.linalg.matrix_norm(ef), float(ef.abs().max()) * ef.shape[0])
        _close(got.diag_frobenius, torch.diagonal(ef).norm(), float(ef.abs().max()) * ef.shape[0])


@pytest.mark.parametrize("kind", list(MODELS))
def test_gradient_stats_func_keeps_the_shared_parameters(kind: str) -> None:
    model = _model(kind)
    bf = _brute(kind, model)
    want = _split(bf["grad"], bf["names"], bf["shapes"])
    scale = float(bf["grad"].abs().max())
    before = _slots(model)
    for _ in range(2):
        got = cl.gradient_stats(model, ce, _data(), backend="func")
        _assert_same_objects(model, before)
        for n in want:
            _close(got.mean[n], want[n], scale)


@pytest.mark.parametrize("kind", list(MODELS))
def test_exact_ggn_trace_keeps_the_shared_parameters(kind: str) -> None:
    model = _model(kind)
    bf = _brute(kind, model)
    want = torch.trace(bf["ggn"])
    before = _slots(model)
    for _ in range(2):
        got = cl.trace(model, ce, _data(), matrix="ggn", method="exact")
        _assert_same_objects(model, before)
        _close(got.value, want, float(want))


@pytest.mark.parametrize("kind", list(MODELS))
def test_fisher_trace_keeps_the_shared_parameters(kind: str) -> None:
    model = _model(kind)
    bf = _brute(kind, model)
    # the value is the mean of ||grad l_n(yhat_n)||^2 over the drawn labels yhat_n: one of the
    # C^N combinations of the brute-force per-example, per-label squared norms
    sq = bf["sq"]
    combos = torch.stack(
        [sq[torch.arange(N), torch.tensor(c)].mean() for c in itertools.product(range(C), repeat=N)]
    )
    before = _slots(model)
    values = []
    for _ in range(2):
        got = cl.fisher_trace(model, ce, _data(), seed=0)
        _assert_same_objects(model, before)
        values.append(got.value)
        assert float((combos - got.value).abs().min()) <= 1e3 * EPS * float(sq.max())
    assert values[0] == values[1]


@pytest.mark.parametrize("kind", list(MODELS))
def test_critical_sharpness_keeps_the_shared_parameters(kind: str) -> None:
    model = _model(kind)
    bf = _brute(kind, model)
    lr, tol = 0.5, 1e-4
    g = torch.func.grad(bf["loss"])(bf["theta"])
    l0 = bf["loss"](bf["theta"])

    def rise(s: float) -> float:  # the loss along SGD's update -lr g, minus the current loss
        return float(bf["loss"](bf["theta"] - s * lr * g) - l0)

    lo, hi = 1e-3, 1e-3
    while rise(hi) <= 0:  # the first rise, on a grid finer than the search's factor of 2
        lo, hi = hi, hi * 1.1
    while hi - lo > 1e-3 * tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rise(mid) <= 0 else (lo, mid)
    want = 2 / (hi * lr)
    X, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    diag = Diagnostics(
        model,
        ce,
        ["critical_sharpness"],
        every=1,
        optimizer=opt,
        on_error="raise",
        options={"critical_tol": tol},
    )
    before = _slots(model)
    for step in range(2):
        record = diag.measure(step, X, y)
        _assert_same_objects(model, before)
        got = record["values"]["critical_sharpness"]
        assert abs(got - want) <= 2 * tol * want, (step, got, want)


# ---------------------------------------------------------------- kfac: a weight set in forward
class _Slice(nn.Module):
    """``lin``'s weight deleted and set in the forward to a slice of ``big`` (the parameter
    trained); ``l2`` an ordinary last layer."""

    def __init__(self, head: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.big = nn.Parameter(torch.randn(6, D, generator=g, dtype=DT))
        self.lin = nn.Linear(D, C, bias=False).to(DT)
        del self.lin.weight
        self.l2 = nn.Linear(C, C, bias=False).to(DT) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin.weight = self.big[:C]
        h = self.lin(x)
        if self.l2 is not None:
            h = self.l2(torch.tanh(h))
        return h + F.linear(x, self.big[C:])


def test_kfac_refuses_a_fresh_model_whose_only_layer_weight_is_set_in_forward() -> None:
    with pytest.raises(ValueError, match=r"layer 'lin' is left out: .*set in the forward"):
        cl.kfac(_Slice(head=False), ce, _data())


@pytest.mark.parametrize("ran", [False, True])
def test_kfac_leaves_out_a_layer_whose_weight_is_set_in_forward(ran: bool) -> None:
    model = _Slice(head=True)
    X, y = _data()
    X, y = X[:1], y[:1]  # one example: the last layer's K-FAC block is its GGN block exactly
    if ran:
        model(X)  # lin.weight now a plain tensor: a view of big
    got = cl.kfac(model, ce, (X, y), kind="exact")
    assert set(got) == {"l2"}
    assert "set in the forward" in got.info["left_out"]["lin"]
    # brute force: the GGN block of l2.weight, H_z kron h h^T (row-major W, one example)
    with torch.no_grad():
        h = torch.tanh(X @ model.big[:C].T)  # (1, C)
        p = torch.softmax(h @ model.l2.weight.T + X @ model.big[C:].T, -1)[0]
        want = torch.kron(torch.diag(p) - torch.outer(p, p), h.T @ h)
    _close(torch.kron(got["l2"].G, got["l2"].A), want, float(want.abs().max()))
    # a selection of l2 alone does not name lin
    assert set(cl.kfac(model, ce, (X, y), kind="exact", params="l2").info["left_out"]) == set()
