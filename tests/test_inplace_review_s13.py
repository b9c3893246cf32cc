"""Modules with ``inplace=True`` on the fast backends, and BackPACK's graph converter (review s13).

The hooks and BackPACK backends turned every module's ``inplace`` flag off while recording, so a
model relying on ``nn.ReLU(inplace=True)`` changing its argument (``self.act(h)`` with the result
unused, or ``r = h; h = self.act(h); ... + r``) was computed as another function: the empirical
Fisher diagonal 2.7x off under ``backend="auto"``, ``gradient_stats.mean`` 2x off the model's own
gradient. Now such a call runs out of place only where the graph shows that nothing else reads its
input (else the backend hands over to ``func``), and in place where its input needs no gradient.
ResNet blocks and ``nn.Sequential`` chains with in-place activations keep their fast backend.

BackPACK's graph converter (forced ``backend="backpack"``, second order) leaked raw
``AttributeError``/``RuntimeError`` on a parameter used outside its layer or a buffer read in
``forward``; now a ``ValueError`` naming it and the way out.

Every number is compared in float64 with a brute force: per-example gradients one example at a
time with ``torch.autograd.grad`` on the user's model as written, the GGN from per-example output
Jacobians.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvlab as cl
from tests import reference as R

DT = torch.float64
CE = nn.CrossEntropyLoss()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _unflat(model: nn.Module, v: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = v[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
    return out


def _per_example_grads(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``(N, d)``: the gradient of each example's cross-entropy, one example at a time."""
    rows = []
    for n in range(X.shape[0]):
        loss = F.cross_entropy(model(X[n : n + 1].clone()), y[n : n + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, _params(model))]))
    return torch.stack(rows)


def _empirical_diag(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The empirical Fisher diagonal of the mean cross-entropy: ``mean_n g_n**2``."""
    return _unflat(model, (_per_example_grads(model, X, y) ** 2).mean(0))


def _mean_grad(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    return _unflat(model, _per_example_grads(model, X, y).mean(0))


def _ggn_diag(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The GGN diagonal of the mean cross-entropy: ``mean_n diag(J_n^T (diag p - p p^T) J_n)``."""
    total = 0.0
    for n in range(X.shape[0]):
        out = model(X[n : n + 1].clone())[0]
        J = torch.stack(
            [
                torch.cat(
                    [
                        g.reshape(-1)
                        for g in torch.autograd.grad(o, _params(model), retain_graph=True)
                    ]
                )
                for o in out
            ]
        )
        p = out.detach().softmax(-1)
        H = torch.diag(p) - torch.outer(p, p)
        total = total + ((J.T @ H) * J.T).sum(1)
    return _unflat(model, total / X.shape[0])


def _close(actual: dict, expected: dict) -> None:
    R.assert_dicts_close(dict(actual), expected, rtol=1e-9, atol=1e-12)


def _data(n: int = 6, d: int = 3, classes: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=DT, generator=g)
    return X, torch.randint(0, classes, (n,), generator=g)


def _fresh(cls: type[nn.Module], *args: object) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return cls(*args).to(DT)


class _Discarded(nn.Module):
    """``self.act(h)`` with its result unused: the model relies on the in-place change."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.c = nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        self.act(h)
        return self.c(h)


class _Alias(nn.Module):
    """A residual kept under another name: ``r`` is ``relu(a(x))`` too after the call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(3, 4), nn.ReLU(inplace=True)
        self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        r = h
        h = self.act(h)
        return self.c(self.b(h) + r)


class _ViewOf(nn.Module):
    """The in-place module on a view: the base's first half changes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.c = nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        self.act(h[:, :2])
        return self.c(h)


class _ReturnsInput(nn.Module):
    """The model's output is the in-place module's argument."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(3, 2), nn.ReLU(inplace=True)
        with torch.no_grad():
            self.a.bias.sub_(1.0)  # some outputs negative, so the ReLU changes them

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        self.act(h)
        return h


def test_a_discarded_in_place_result_hands_over_and_is_exact() -> None:
    model = _fresh(_Discarded)
    X, y = _data()
    want = _empirical_diag(model, X, y)
    fisher = cl.diag_fisher(model, CE, (X, y))
    _close(fisher, want)  # was 2.7x off on the hooks
    assert fisher.backend == "func"
    stats = cl.gradient_stats(model, CE, (X, y))
    _close(stats.mean, _mean_grad(model, X, y))  # was 2x off the model's own gradient
    _close(cl.diag_fisher(model, CE, (X, y), kind="exact"), _ggn_diag(model, X, y))
    for backend in ("hooks", "backpack"):
        with pytest.raises(ValueError, match="module 'act' has inplace=True") as info:
            cl.diag_fisher(model, CE, (X, y), backend=backend)
        assert "backend='func'" in str(info.value)
    with pytest.raises(ValueError, match="module 'act' has inplace=True"):  # the converter's
        cl.diag_fisher(model, CE, (X, y), kind="exact", backend="backpack")
    assert model.act.inplace and "_curvlab_in_place" not in vars(model.act)


@pytest.mark.parametrize("cls", [_Alias, _ViewOf, _ReturnsInput])
def test_an_in_place_change_seen_through_an_alias_a_view_or_the_output_is_exact(
    cls: type[nn.Module],
) -> None:
    model = _fresh(cls)
    X, y = _data()
    assert (model.a(X) < 0).any()  # the in-place ReLU changes something
    fisher = cl.diag_fisher(model, CE, (X, y))
    _close(fisher, _empirical_diag(model, X, y))  # the alias: 3.7x off under auto
    assert fisher.backend == "func"
    with pytest.raises(ValueError, match="module 'act' has inplace=True"):
        cl.diag_fisher(model, CE, (X, y), backend="hooks")


def test_an_in_place_call_on_a_tensor_without_gradient_runs_in_place() -> None:
    # a frozen first layer: the activation's input needs no gradient, so the call runs in place
    # as written (the hooks stay); turning the flag off gave c the unrectified a(x)
    model = _fresh(_Discarded)
    model.a.requires_grad_(False)
    X, y = _data()
    fisher = cl.diag_fisher(model, CE, (X, y))
    _close(fisher, _empirical_diag(model, X, y))
    assert fisher.backend == "hooks"
    # BackPACK's graph converter turns the flag off; the call still runs in place
    ggn = cl.diag_fisher(model, CE, (X, y), kind="exact", backend="backpack")
    _close(ggn, _ggn_diag(model, X, y))
    assert model.act.inplace and "_curvlab_in_place" not in vars(model.act)


class _Twice(nn.Module):
    """One in-place ReLU used at two places (BackPACK's converter copies it); ``discard``: the
    second call's result unused."""

    def __init__(self, discard: bool) -> None:
        super().__init__()
        self.discard = discard
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(self.act(self.a(x)))
        if self.discard:
            self.act(h)
        else:
            h = self.act(h)
        return self.c(h)


@pytest.mark.parametrize("discard", [False, True])
def test_the_converter_copy_of_an_in_place_module_used_twice_is_checked(discard: bool) -> None:
    model = _fresh(_Twice, discard)
    X, y = _data()
    want = _ggn_diag(model, X, y)
    if discard:
        with pytest.raises(ValueError, match="module 'act' has inplace=True"):  # (the copy's)
            cl.diag_fisher(model, CE, (X, y), kind="exact", backend="backpack")
    else:
        _close(cl.diag_fisher(model, CE, (X, y), kind="exact", backend="backpack"), want)
    _close(cl.diag_fisher(model, CE, (X, y), kind="exact"), want)
    assert model.act.inplace and "_curvlab_in_place" not in vars(model.act)


def test_a_resnet_block_with_in_place_relu_keeps_the_hooks() -> None:
    resnet = pytest.importorskip("torchvision.models.resnet")
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(2, 4, 1, stride=2, bias=False), nn.BatchNorm2d(4))
    block = resnet.BasicBlock(2, 4, stride=2, downsample=down)
    model = nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).to(DT)
    for m in model.modules():  # eval mode with statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 2, 6, 6, dtype=DT, generator=g)
    y = torch.randint(0, 3, (5,), generator=g)
    before = R.snapshot(model)
    fisher = cl.diag_fisher(model, CE, (X, y))
    assert fisher.backend == "hooks"
    _close(fisher, _empirical_diag(model, X, y))
    stats = cl.gradient_stats(model, CE, (X, y))
    _close(stats.mean, _mean_grad(model, X, y))
    R.assert_untouched(model, before)


def test_sequential_chains_with_in_place_modules_keep_their_fast_backends() -> None:
    torch.manual_seed(0)
    drop = nn.Dropout(0.5, inplace=True)  # eval mode: returns its input as it is
    model = (
        nn.Sequential(
            nn.Linear(3, 5),
            nn.ReLU(inplace=True),
            drop,
            nn.Linear(5, 4),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Linear(4, 3),
        )
        .to(DT)
        .eval()
    )
    X, y = _data(6, 3, 3)
    before = R.snapshot(model)
    fisher = cl.diag_fisher(model, CE, (X, y))
    assert fisher.backend == "hooks"
    _close(fisher, _empirical_diag(model, X, y))
    ggn = cl.diag_fisher(model, CE, (X, y), kind="exact")
    assert ggn.backend == "backpack"
    _close(ggn, _ggn_diag(model, X, y))
    forced = cl.diag_fisher(model, CE, (X, y), backend="backpack")
    _close(forced, fisher)
    R.assert_untouched(model, before)


def test_a_sequence_mlp_with_in_place_relu_keeps_the_hooks() -> None:
    # a Linear on (B, T, d) returns a view: changed in place it would lose its gradient edge
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(4, 5, 3, dtype=DT, generator=g)
    y = torch.randint(0, 3, (4, 5), generator=g)

    def lf(out: Tensor, t: Tensor) -> Tensor:  # example n's token sum
        return F.cross_entropy(out.reshape(-1, 3), t.reshape(-1), reduction="sum")

    fisher = cl.diag_fisher(model, CE, (X, y))
    assert fisher.backend == "hooks"
    rows = []
    for n in range(4):
        loss = lf(model(X[n : n + 1]), y[n : n + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, _params(model))]))
    G = torch.stack(rows) * 4 / 20  # example n's share of the mean over M = 20 tokens, times N
    _close(fisher, _unflat(model, (G**2).mean(0)))


class _TransposedWeight(nn.Module):
    """Parameters used outside their layers: ``F.linear(h, self.b.weight.t())``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(2, 4, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.linear(x, self.a.weight[:, :3], self.a.bias))
        return F.linear(h, self.b.weight.t())


class _Standardised(nn.Module):
    """Buffers read by the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 2)
        self.register_buffer("mu", torch.randn(3))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.l((x - self.mu) * self.scale)


@pytest.mark.parametrize(
    "cls, culprit", [(_TransposedWeight, "parameter 'a.weight'"), (_Standardised, "buffer 'mu'")]
)
def test_a_model_the_backpack_converter_cannot_convert_is_a_clear_error(
    cls: type[nn.Module], culprit: str
) -> None:
    model = _fresh(cls)
    X, y = _data(5, 3, 2)
    before = R.snapshot(model)
    with pytest.raises(ValueError, match="graph converter cannot convert") as info:
        cl.diag_fisher(model, CE, (X, y), kind="exact", backend="backpack")
    assert culprit in str(info.value) and "backend='func'" in str(info.value)
    R.assert_untouched(model, before)
    ggn = cl.diag_fisher(model, CE, (X, y), kind="exact")
    _close(ggn, _ggn_diag(model, X, y))
