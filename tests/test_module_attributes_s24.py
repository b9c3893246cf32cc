"""Review s24 (MZ-1, MZ-2): what a model's forward writes onto its modules, and the attention
kernel a model's forward picks itself.

MZ-1: the func backend runs the user's forward inside ``vmap(grad(functional_call))``; a tensor
the forward stored on a module (``self.last = h.detach()``, the old-style ``weight_norm`` /
``spectral_norm`` pre-hook's ``module.weight``) outlived the transform as a dead
``GradTrackingTensor`` holding one example's row: arithmetic on it raised torch's "escaped from
inside a function being vmapped", ``torch.save(model)`` raised ``NotImplementedError``.
``leave_no_trace`` now puts the user's objects back.

MZ-2: a model whose forward wraps its attention in its own ``sdpa_kernel(FLASH_ATTENTION)``
overrode curvlab's outer math kernel; Hessian and GGN products raised ``NotImplementedError``
naming ``aten::_scaled_dot_product_flash_attention_for_cpu_backward``. Checked against dense
float64 brute force (autograd through ``functional_call``, math kernel) written here.
"""

from __future__ import annotations

import io
import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import _get_current_function_mode_stack

import curvlab as cl
from curvlab._notrace import leave_no_trace, math_attention

DT = torch.float64


class Cache(nn.Module):
    """Keeps its last activation for inspection (a common pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.p, self.b = nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 3)
        self.last: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.p(self.a(x))
        self.last = h.detach()
        return self.b(h)


class Lazy(Cache):
    """Makes a table at its first forward, with its bookkeeping."""

    def forward(self, x: Tensor) -> Tensor:
        if not hasattr(self, "table"):
            self.table, self.table_rows = self.a.weight.detach() * 2, x.shape[0]
        return super().forward(x)


class Maps(Cache):
    """Appends each output to a plain list."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        self.maps.append(out.detach())
        return out


def _data(n: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _saves(model: nn.Module) -> None:
    torch.save(model, io.BytesIO())  # raised NotImplementedError (TensorWrapper) before the fix


_CALLS = {
    "diag_fisher": lambda m, d: cl.diag_fisher(m, nn.CrossEntropyLoss(), d, backend="func"),
    "gradient_stats": lambda m, d: cl.gradient_stats(m, nn.CrossEntropyLoss(), d, backend="func"),
    "eigenvalues": lambda m, d: cl.eigenvalues(m, nn.CrossEntropyLoss(), d, seed=0),
}


@pytest.mark.parametrize("call", sorted(_CALLS))
def test_cached_activation_is_the_users_after_the_call(call: str) -> None:
    torch.manual_seed(0)
    model = Cache().to(DT).eval()
    X, y = _data()
    model(X)
    mine = model.last
    _CALLS[call](model, (X, y))
    assert model.last is mine  # was a dead GradTrackingTensor of shape (1, 4) (func backend)
    assert model.last.shape == (5, 4)
    _saves(model)
    model.last + 0  # noqa: B018 - raised "escaped from inside a function being vmapped"


def test_func_results_unchanged_and_brute_force() -> None:
    """The empirical Fisher diagonal of the caching model by the func backend equals the dense
    float64 one, ``(1/N) sum_n g_n^2`` with ``g_n = grad of example n's loss`` (the mean
    convention); the attribute is put back after."""
    torch.manual_seed(0)
    model = Cache().to(DT).eval()
    X, y = _data()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss_n(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    rows = [jacrev(loss_n)(params, X[i], y[i]) for i in range(len(y))]
    model(X)
    mine = model.last
    got = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert got.backend == "func"
    for k in params:
        want = torch.stack([r[k] for r in rows]).square().mean(0)
        torch.testing.assert_close(got[k], want, rtol=1e-10, atol=1e-14)
    assert model.last is mine


def test_attribute_created_in_the_call_is_removed_with_its_bookkeeping() -> None:
    """A cache made lazily in curvlab's passes is curvlab's: it goes, and so does the plain
    bookkeeping of the same module (a cached length), which would otherwise describe a cache
    that is not there."""

    torch.manual_seed(0)
    model = Lazy().to(DT).eval()
    X, y = _data()
    cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert "table" not in vars(model) and "table_rows" not in vars(model)
    assert model.last is None  # as before the call (the user never ran a forward)
    _saves(model)


def test_tensors_in_a_plain_list_are_put_back_in_place() -> None:
    torch.manual_seed(0)
    model = Maps().to(DT).eval()
    X, y = _data()
    model(X)
    maps, first = model.maps, model.maps[0]
    cl.gradient_stats(model, nn.CrossEntropyLoss(), (X, y), backend="func")
    assert model.maps is maps and len(maps) == 1 and maps[0] is first
    _saves(model)


def test_put_back_when_the_block_raises_and_counters_kept() -> None:
    """Also on error; a module whose forward changes only plain non-tensor state (a call
    counter, no tensor) keeps it, as a custom buffer updated in place is kept."""
    torch.manual_seed(0)
    model = Cache().to(DT).eval()
    model.calls = 0
    X, _ = _data()
    model(X)
    mine = model.last
    with pytest.raises(ValueError, match="boom"), leave_no_trace(model):
        model(X[:2])
        model.extra = torch.zeros(2)
        raise ValueError("boom")
    assert model.last is mine and "extra" not in vars(model)
    with leave_no_trace(model):
        model.calls += 1
    assert model.calls == 1


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_old_style_weight_and_spectral_norm(norm: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old flavour is deprecated
        layer = getattr(torch.nn.utils, norm)(nn.Linear(3, 3))
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(3, 3)).to(DT).eval()
    X, y = _data()
    out = model(X).detach()
    weight = layer.weight
    for call in sorted(_CALLS):
        _CALLS[call](model, (X, y))
        assert layer.weight is weight, call  # the pre-hook's weight of the user's last forward
        _saves(model)
    torch.testing.assert_close(model(X), out, rtol=0, atol=0)


# --------------------------------------------------------------------- MZ-2: the model's own kernel


class OwnKernel(nn.Module):
    """Causal attention whose forward picks its kernel itself (``kernel``; ``None``: torch's)."""

    def __init__(self, kernel: SDPBackend | None) -> None:
        super().__init__()
        self.qkv, self.head, self.kernel = nn.Linear(3, 12), nn.Linear(4, 3), kernel

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, 2, 2).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(self.kernel) if self.kernel is not None else nullcontext():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(torch.tanh(o.transpose(1, 2).reshape(b, t, 4))).mean(1)


class OwnKernelMHA(nn.Module):
    """``nn.MultiheadAttention`` (its Python ``F.multi_head_attention_forward`` calls the
    attention) under the model's own kernel."""

    def __init__(self, kernel: SDPBackend | None) -> None:
        super().__init__()
        self.mha, self.head, self.kernel = (
            nn.MultiheadAttention(4, 2, batch_first=True),
            nn.Linear(4, 3),
            kernel,
        )
        self.inp = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        with sdpa_kernel(self.kernel) if self.kernel is not None else nullcontext():
            o, _ = self.mha(h, h, h, need_weights=False)
        return self.head(torch.tanh(o)).mean(1)


def _dense(model: nn.Module, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The Hessian and the GGN of the mean cross-entropy, dense float64, math kernel."""
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def unflat(t: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = t[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def f(t: Tensor) -> Tensor:
        return functional_call(model, unflat(t), (X,))

    with sdpa_kernel(SDPBackend.MATH):
        th = theta.clone().requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(f(th), y), th, create_graph=True)[0]
        H = torch.stack(
            [torch.autograd.grad(g[i], th, retain_graph=True)[0] for i in range(len(g))]
        )
        J = jacrev(f)(theta).reshape(-1, theta.numel())  # (N*C, D)
        out = f(theta).detach()
        Lam = torch.func.hessian(lambda o: F.cross_entropy(o.reshape(out.shape), y))(
            out.reshape(-1)
        )
    return H, J.T @ Lam @ J


@pytest.mark.parametrize("kind", [OwnKernel, OwnKernelMHA])
def test_models_own_flash_context_hessian_and_ggn_products(kind: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = kind(SDPBackend.FLASH_ATTENTION).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(5, 4, 3, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    twin = kind(None).to(DT).eval()  # the same weights, no kernel of its own
    twin.load_state_dict(model.state_dict())
    H, G = _dense(twin, X, y)
    v = torch.randn(H.shape[0], generator=g, dtype=DT)
    loss = nn.CrossEntropyLoss()
    # was NotImplementedError naming aten::_scaled_dot_product_flash_attention_for_cpu_backward
    hv = cl.curvature_operator(model, loss, (X, y), matrix="hessian").matvec(v)
    gv = cl.curvature_operator(model, loss, (X, y), matrix="ggn").matvec(v)
    # float64 rounding of sums over the D parameters, each side: D eps of the sum of magnitudes
    # (seen: 1e-16 of it)
    D, eps = H.shape[0], torch.finfo(DT).eps
    for got, M in ((hv, H), (gv, G)):
        torch.testing.assert_close(
            got, M @ v, rtol=0, atol=D * eps * float((M.abs() @ v.abs()).max())
        )
    tr = cl.trace(model, loss, (X, y), method="exact").value
    assert abs(float(tr) - float(H.trace())) <= D * eps * float(H.diagonal().abs().sum())
    assert not _get_current_function_mode_stack()  # nothing left behind
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_math_kernel_forced_keeps_every_argument() -> None:
    """Under curvlab's kernel selection an inner ``sdpa_kernel`` context of the model's computes
    what the math kernel computes, with ``attn_mask``, ``scale``, ``enable_gqa``, ``is_causal``
    and ``dropout_p`` (the same draws from the same seed)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 5, 3, generator=g, dtype=DT)
    k, v = (
        torch.randn(2, 2, 6, 3, generator=g, dtype=DT),
        torch.randn(2, 2, 6, 3, generator=g, dtype=DT),
    )
    mask = torch.randn(5, 6, generator=g, dtype=DT)
    cases = [
        {"attn_mask": mask, "scale": 0.3, "enable_gqa": True},
        {"is_causal": True, "enable_gqa": True},
        {"attn_mask": mask > 0, "enable_gqa": True, "dropout_p": 0.5},
    ]
    for kw in cases:
        torch.manual_seed(3)
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(q, k, v, **kw)
        torch.manual_seed(3)
        with math_attention(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            got = F.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not _get_current_function_mode_stack()


class DirectFused(OwnKernel):
    """Calls the fused kernel's aten op itself: no selection of curvlab's can reach it."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, 2, 2).permute(2, 0, 3, 1, 4)
        o = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)[0]
        return self.head(torch.tanh(o.transpose(1, 2).reshape(b, t, 4))).mean(1)


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_fused_kernel_out_of_reach_error_names_the_way_out(matrix: str) -> None:
    torch.manual_seed(0)
    model = DirectFused(None).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(5, 4, 3, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), (X, y), matrix=matrix)
    with pytest.raises(NotImplementedError, match="Call F.scaled_dot_product_attention"):
        op.matvec(torch.ones(op.shape[0], dtype=DT))


def test_noise_capture_layout_probe_puts_attributes_back() -> None:
    # review s24 regressions: the capture's first-step layout probe (2 examples, outside any
    # leave_no_trace block) left its activation on the module, not the training forward's
    class Caching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)
            self.last: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.l1(x))
            self.last = h.detach()
            return self.l2(h)

    torch.manual_seed(0)
    model = Caching().double()
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    lf = nn.CrossEntropyLoss()
    for sampler in (cl.noise.DiagFisherNoise(scale=0.1), cl.noise.KFACNoise(scale=0.1)):
        noisy = cl.noise.NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, lf, seed=0
        )
        noisy.zero_grad()
        with noisy.capture():
            lf(model(X), y).backward()
        mine = model.last
        noisy.step()
        assert model.last is mine and mine.shape == (8, 4)
