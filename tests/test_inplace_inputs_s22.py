"""A forward that writes into its own input (review s22 IP).

``x.div_(2)`` as preprocessing, or a first ``nn.SiLU/ELU/LeakyReLU/ReLU(inplace=True)`` applied
to the raw inputs: curvlab runs the model on the same data tensors several times in one call
(the examples-apart and layout probes, per-example passes, one forward pass per operator
product), and each pass repeated the write into the caller's tensors, so later passes measured
``X/2``, ``X/4``, ... (``diag_fisher(kind="exact")`` 9% off, ``trace(matrix="ggn")`` 2%, a
wrong :class:`MixedExamplesError`, autograd's raw "modified by an inplace operation"), and the
caller's ``X`` came back changed. Every quantity is that of the out-of-place twin at the data
as given, checked against dense float64 brute force (torch.func) written here, and the
caller's data is bit-identical after each call.

Tolerance: float64, at most 6 examples and 26 parameters; each entry is a sum of a few dozen
products, so curvlab's and the brute force's different summation orders differ by a few
hundred ulps of the largest entry at most; ``_RTOL = 1e3 * eps`` leaves margin, while the
defect's errors were ``>= 3e-3`` relative.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import curvlab as cl

DT = torch.float64
_RTOL = 1e3 * torch.finfo(DT).eps
CE = nn.CrossEntropyLoss()


class _Halving(nn.Module):
    """Input preprocessing in place (``x.div_(2)``); ``inplace=False``: its out-of-place twin."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.inplace = inplace
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x.div_(2.0) if self.inplace else x / 2.0
        return self.l2(torch.tanh(self.l1(x)))


class _DictHalving(nn.Module):
    """``model(**inputs)``: writes into ``inputs["x"]``; ``scale`` is an expanded tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x.mul_(scale))))


def _first(act: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(act(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


_MODELS: dict[str, Callable[[], nn.Module]] = {
    "div_": _Halving,
    "silu": _first(lambda: nn.SiLU(inplace=True)),
    "elu": _first(lambda: nn.ELU(inplace=True)),
    "leaky": _first(lambda: nn.LeakyReLU(0.1, inplace=True)),
    # idempotent: the BackPACK layout probe's rewrite of X invalidated the saved tensor
    "relu": lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 2)),
}


def _twin(model: nn.Module) -> nn.Module:
    """The same function written out of place."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return twin


def _problem(name: str, n: int = 6) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = _MODELS[name]().to(DT).eval()
    g = torch.Generator().manual_seed(11)
    X = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (n,), generator=g)
    return model, _twin(model), X, y


class _Brute:
    """Dense float64 quantities of ``CE(mean)`` on ``twin`` at ``(X, y)``."""

    def __init__(self, twin: nn.Module, X: Tensor, y: Tensor) -> None:
        named = [(k, p.detach()) for k, p in twin.named_parameters()]
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        theta = torch.cat([p.reshape(-1) for _, p in named])
        sizes = [p.numel() for _, p in named]

        def unflat(t: Tensor) -> dict[str, Tensor]:
            parts = torch.split(t, sizes)
            return {k: v.reshape(s) for k, v, s in zip(self.names, parts, self.shapes)}

        def out(t: Tensor, x: Tensor) -> Tensor:
            return functional_call(twin, unflat(t), (x,))

        def one(t: Tensor, x: Tensor, c: Tensor) -> Tensor:
            return F.cross_entropy(out(t, x[None]), c[None])

        n = X.shape[0]
        self.g = vmap(grad(one), in_dims=(None, 0, 0))(theta, X, y)  # (N, P): g_n
        self.emp = self.g.T @ self.g / n
        self.hess = hessian(lambda t: F.cross_entropy(out(t, X), y))(theta)
        J = jacrev(lambda t: out(t, X))(theta)  # (N, K, P)
        p = torch.softmax(out(theta, X), -1)
        h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # d^2 l_n / d out_n^2
        self.ggn = torch.einsum("nkp,nkl,nlq->pq", J, h_out, J) / n
        self.h_out = h_out
        self.unflat = unflat

    def flat(self, d: dict[str, Tensor]) -> Tensor:
        return torch.cat([d[k].reshape(-1) for k in self.names])


def _close(got: Tensor | float, want: Tensor) -> None:
    got = torch.as_tensor(got, dtype=DT)
    scale = want.abs().max()
    assert float((got - want).abs().max()) <= _RTOL * float(scale), (got, want)


def _unchanged(X: Tensor, X0: Tensor) -> None:
    assert torch.equal(X, X0), "curvlab wrote into the caller's inputs"


@pytest.mark.parametrize(
    ("name", "backend", "kind"),
    [
        (m, b, k)
        for m in _MODELS
        for b in ("auto", "hooks", "backpack", "func")
        for k in ("empirical", "exact")
        # the hooks backend is first-order; BackPACK's second order refuses a SiLU and an
        # operation outside modules (div_)
        if not (b == "hooks" and k == "exact")
        and not (b == "backpack" and k == "exact" and m in ("div_", "silu"))
    ],
)
def test_diag_fisher_is_the_out_of_place_twins(name: str, backend: str, kind: str) -> None:
    model, twin, X0, y = _problem(name)
    ref = _Brute(twin, X0, y)
    X = X0.clone()
    got = cl.diag_fisher(model, CE, (X, y), kind=kind, backend=backend)
    _close(ref.flat(got), torch.diagonal(ref.emp if kind == "empirical" else ref.ggn))
    _unchanged(X, X0)
    if backend == "backpack":  # answered by BackPACK itself (its layout probe on a copy)
        assert got.backend == "backpack"


@pytest.mark.parametrize("backend", ["auto", "func"])
def test_diag_fisher_mc_draws_as_on_the_twin(backend: str) -> None:
    # the MC Fisher's labels are drawn from the model's output: the same seed gives the twin's
    # draws only where every pass sees the data as given (its expectation is the GGN, checked
    # against brute force in the other tests)
    model, twin, X0, y = _problem("div_")
    X = X0.clone()
    got = cl.diag_fisher(model, CE, (X, y), kind="mc", mc_samples=3, seed=4, backend=backend)
    want = cl.diag_fisher(twin, CE, (X0, y), kind="mc", mc_samples=3, seed=4, backend=backend)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=_RTOL, atol=0.0)
    _unchanged(X, X0)


@pytest.mark.parametrize("backend", ["auto", "hooks", "func"])
@pytest.mark.parametrize("name", ["div_", "silu", "leaky"])
def test_gradient_stats(name: str, backend: str) -> None:
    model, twin, X0, y = _problem(name)
    ref = _Brute(twin, X0, y)
    X = X0.clone()
    st = cl.gradient_stats(model, CE, (X, y), backend=backend)
    mean = ref.g.mean(0)
    var = ((ref.g - mean) ** 2).mean(0)
    _close(ref.flat(st.mean), mean)
    _close(ref.flat(st.second_moment), (ref.g**2).mean(0))
    _close(ref.flat(st.variance), var)
    _close(st.trace_covariance, var.sum())
    _unchanged(X, X0)


@pytest.mark.parametrize("backend", ["auto", "func"])
@pytest.mark.parametrize("name", ["div_", "silu", "elu"])
def test_fisher_norms(name: str, backend: str) -> None:
    model, twin, X0, y = _problem(name)
    ref = _Brute(twin, X0, y)
    X = X0.clone()
    norms = cl.fisher_norms(model, CE, (X, y), backend=backend)
    _close(norms.frobenius, torch.linalg.norm(ref.emp))
    _close(norms.diag_frobenius, torch.linalg.norm(torch.diagonal(ref.emp)))
    _unchanged(X, X0)


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
@pytest.mark.parametrize("name", ["div_", "silu", "elu", "leaky"])
def test_exact_trace(name: str, matrix: str) -> None:
    model, twin, X0, y = _problem(name)
    ref = _Brute(twin, X0, y)
    X = X0.clone()
    got = cl.trace(model, CE, (X, y), matrix=matrix, method="exact")
    _close(got.value, torch.trace(ref.hess if matrix == "hessian" else ref.ggn))
    _unchanged(X, X0)


@pytest.mark.parametrize(
    ("name", "backend"),
    [(m, b) for m in ("div_", "relu", "silu") for b in ("auto", "columns")]
    + [("relu", "backpack"), ("elu", "backpack")],  # (BackPACK's second order: not div_, SiLU)
)
def test_diag_hessian(name: str, backend: str) -> None:
    model, twin, X0, y = _problem(name)
    ref = _Brute(twin, X0, y)
    X = X0.clone()
    got = cl.diag_hessian(model, CE, (X, y), backend=backend)
    _close(ref.flat(got), torch.diagonal(ref.hess))
    _unchanged(X, X0)


@pytest.mark.parametrize("matrix", ["hessian", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("name", ["div_", "silu"])
def test_operator_products_repeated(name: str, matrix: str) -> None:
    model, twin, X0, y = _problem(name)
    ref = _Brute(twin, X0, y)
    want_m = {"hessian": ref.hess, "ggn": ref.ggn, "empirical_fisher": ref.emp}[matrix]
    X = X0.clone()
    op = cl.curvature_operator(model, CE, (X, y), matrix=matrix)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):  # every product at the data as given, not at X/2, X/4, ...
        v = torch.randn(want_m.shape[0], generator=g, dtype=DT)
        _close(op @ v, want_m @ v)
    _unchanged(X, X0)


@pytest.mark.parametrize("name", ["div_", "silu"])
def test_kfac_exact(name: str) -> None:
    # each layer's A = mean_n a_n a_n^T of its inputs, and the last layer's G (its outputs are
    # the logits) = mean_n of the per-example loss Hessians in the logits
    model, twin, X0, y = _problem(name)
    ref = _Brute(twin, X0, y)
    seen: dict[str, Tensor] = {}  # each Linear's input, in call order
    hooks = [
        m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, i[0].detach()))
        for k, m in twin.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        twin(X0)
    for h in hooks:
        h.remove()
    X = X0.clone()
    got = cl.kfac(model, CE, (X, y), kind="exact")
    n = X0.shape[0]
    assert set(got) == set(seen)
    for layer, a in seen.items():
        _close(got[layer].A, a.T @ a / n)
    _close(got[list(seen)[-1]].G, ref.h_out.mean(0))
    _unchanged(X, X0)


@pytest.mark.parametrize(
    ("backend", "kind"), [("auto", "exact"), ("func", "exact"), ("hooks", "empirical")]
)
def test_mapping_inputs(backend: str, kind: str) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = _DictHalving().to(DT).eval()
    g = torch.Generator().manual_seed(11)
    X0 = torch.randn(6, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (6,), generator=g)
    scale = torch.full((1, 3), 0.5, dtype=DT).expand(6, 3)  # broadcast over the batch
    twin = _Halving(inplace=False).to(DT).eval()
    twin.load_state_dict(model.state_dict())
    ref = _Brute(twin, X0, y)
    X = X0.clone()
    got = cl.diag_fisher(model, CE, ({"x": X, "scale": scale}, y), kind=kind, backend=backend)
    _close(ref.flat(got), torch.diagonal(ref.emp if kind == "empirical" else ref.ggn))
    _unchanged(X, X0)


def test_fresh_inputs_copies_and_keeps_broadcast_axes() -> None:
    from curvlab._data import fresh_inputs

    x = torch.arange(6, dtype=DT).reshape(2, 3)
    wide = torch.ones(1, 3, dtype=DT).expand(1000, 3)
    fresh = fresh_inputs({"x": x, "wide": wide, "flag": True})
    assert fresh["flag"] is True
    fresh["x"].mul_(2)
    assert torch.equal(x, torch.arange(6, dtype=DT).reshape(2, 3))
    copy_ = fresh["wide"]
    assert copy_.shape == wide.shape and copy_.stride() == (0, 1)  # not 1000 rows of memory
    assert copy_.untyped_storage().data_ptr() != wide.untyped_storage().data_ptr()
    copy_[0].mul_(3)  # a write through a row reaches the copy's one row, not the caller's
    assert torch.equal(wide, torch.ones(1000, 3, dtype=DT))


@pytest.mark.parametrize("sampler", ["diag", "kfac"])
def test_noisy_optimizer_writes_into_no_step_data(sampler: str) -> None:
    # the capture's layout probe replayed the step's own call on the step's tensors (the user's
    # x, halved once more: X/4 after the first step), and the separate pass of
    # step(inputs=, targets=) halved them at each of its passes (a wrong MixedExamplesError)
    from curvlab.noise import DiagFisherNoise, KFACNoise, NoisyOptimizer

    model, _, X0, y = _problem("div_")
    make = DiagFisherNoise if sampler == "diag" else KFACNoise
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        make(large_batch=6, small_batch=2),
        model,
        CE,
        stop_fraction=1.0,
        total_steps=4,
        recompute_every=1,
    )
    for _ in range(2):
        X = X0.clone()

        def closure(X: Tensor = X) -> Tensor:
            noisy.zero_grad()
            loss = CE(model(X), y)
            loss.backward()
            return loss

        noisy.step(closure)
        assert torch.equal(X, X0 / 2.0)  # the user's own forward's write, once
    for _ in range(2):
        noisy.zero_grad()
        CE(model(X0.clone()), y).backward()
        X = X0.clone()
        noisy.step(inputs=X, targets=y)
        _unchanged(X, X0)


def test_critical_sharpness_line_search_on_copies() -> None:
    import warnings

    values = {}
    model, twin, X0, y = _problem("div_", n=16)
    for name, mod in (("inplace", model), ("twin", twin)):
        opt = torch.optim.SGD(mod.parameters(), lr=0.5)
        mod.zero_grad()
        CE(mod(X0.clone()), y).backward()
        diag = cl.Diagnostics(mod, CE, quantities=["critical_sharpness"], every=1, optimizer=opt)
        X = X0.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values[name] = diag.measure(0, X, y)["values"]["critical_sharpness"]
        _unchanged(X, X0)
    # the same forward passes on the same values: the same number to rounding
    assert abs(values["inplace"] - values["twin"]) <= _RTOL * abs(values["twin"])
