"""Review s25: regressions of session 24's fixes, checked against dense float64 brute force.

RG-1: ``checked_matmat`` read the probe block's version counter, which an inference tensor has not:
every estimator run inside ``torch.inference_mode()`` raised torch's "Inference tensors do not
track version counter" (an exact trace 912.94 and a Lanczos top eigenvalue 105.21 before).

RG-2: the math-attention mode was off inside the Python torch functions it passed on, among them
``torch.autograd.grad`` and ``Tensor.backward``: a non-reentrant checkpoint recomputed its block
there under the model's own ``sdpa_kernel(FLASH_ATTENTION)``, and ``kfac``,
``diag_fisher(backend="func")`` and the GGN and Hessian traces raised torch's raw
``CheckpointError``.

RG-3: ``as_data`` detached every batch tensor that requires grad: a model that differentiates
with respect to its inputs in its forward (a physics-informed network) raised "One of the
differentiated Tensors does not require grad" (a Hutchinson trace 2.49 +- 0.13 for 2.5285 before).

RG-4: ``TensorOperator`` of a sparse matrix raised torch's raw ``NotImplementedError`` (``amax``
on a sparse layout) in its symmetry check; its products had been exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

import curvlab as cl
from curvlab.estimators import (
    TensorOperator,
    exact_trace,
    hutchinson,
    hutchpp,
    lanczos_eigenvalues,
    slq,
)

DT = torch.float64
EPS = torch.finfo(DT).eps


def _flat(tensors: dict[str, Tensor] | list[Tensor], names: list[str] | None = None) -> Tensor:
    items = [tensors[n] for n in names] if names is not None else tensors
    return torch.cat([t.reshape(-1) for t in items])


# ----------------------------------------------------------------------------------- RG-1


def _spd(n: int, seed: int) -> Tensor:
    B = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return B @ B.T


ESTIMATORS = {
    "hutchinson": lambda op: hutchinson(op, num_probes=20, seed=0).value,
    "hutchpp": lambda op: hutchpp(op, num_matvecs=30, seed=0).value,
    "exact_trace": lambda op: exact_trace(op).value,
    "lanczos": lambda op: lanczos_eigenvalues(op, k=1, tol=1e-10, seed=0).values[0],
    "slq": lambda op: slq(op, num_steps=30, seed=0).nodes.sum(),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimators_inside_inference_mode(name: str) -> None:
    A = _spd(30, 0)
    want = ESTIMATORS[name](TensorOperator(A))  # the same call outside inference mode
    with torch.inference_mode():
        got = ESTIMATORS[name](TensorOperator(A))  # was RuntimeError: no version counter
    assert float(got) == float(want)
    if name == "exact_trace":
        assert abs(float(got) - float(A.trace())) <= 30 * EPS * float(A.diagonal().abs().sum())
    if name == "lanczos":
        top = float(torch.linalg.eigvalsh(A)[-1])
        assert abs(float(got) - top) <= 1e-8 * top


class _InPlace:
    """A product written into its input (``V.mul_``): refused inside inference mode too."""

    def __init__(self, d: Tensor) -> None:
        self.d, self.shape, self.dtype, self.device = d, (len(d), len(d)), d.dtype, d.device

    def matmat(self, V: Tensor) -> Tensor:
        return V.mul_(self.d[:, None]).clone()


def test_in_place_product_still_refused_inside_inference_mode() -> None:
    op = _InPlace(torch.linspace(-1, 3, 8, dtype=DT))
    with torch.inference_mode(), pytest.raises(ValueError, match="_InPlace.matmat modified"):
        hutchinson(op, num_probes=10, seed=0)


def test_model_trace_and_eigenvalues_inside_inference_mode() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)
    loss = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    theta = _flat(dict(model.named_parameters()), names).detach()

    def f(t: Tensor) -> Tensor:
        params, i = {}, 0
        for n, p in model.named_parameters():
            params[n] = t[i : i + p.numel()].view(p.shape)
            i += p.numel()
        return loss(functional_call(model, params, (X,)), y)

    H = torch.func.hessian(f)(theta)
    evals = torch.linalg.eigvalsh(H)
    with torch.inference_mode():
        tr = cl.trace(model, loss, (X, y), method="exact").value
        top = cl.eigenvalues(model, loss, (X, y), k=1, tol=1e-10, seed=0)
    D = H.shape[0]
    assert abs(float(tr) - float(H.trace())) <= D * 1e2 * EPS * float(H.diagonal().abs().sum())
    assert abs(float(top.values[0]) - float(evals[-1])) <= float(top.residuals[0]) + 1e-12


# ----------------------------------------------------------------------------------- RG-2


class _Block(nn.Module):
    """Causal self-attention under the model's own kernel selection; ``trip``, where set, is
    raised inside a backward pass's recomputation."""

    def __init__(self, kernel: SDPBackend | None) -> None:
        super().__init__()
        self.qkv, self.kernel = nn.Linear(8, 24), kernel
        self.trip: BaseException | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.trip is not None and torch._C._current_graph_task_id() != -1:
            raise self.trip
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, 2).permute(2, 0, 3, 1, 4)
        if self.kernel is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            with sdpa_kernel(self.kernel):
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.tanh(a.transpose(1, 2).reshape(b, t, 8))


class _Checkpointed(nn.Module):
    def __init__(self, kernel: SDPBackend | None, ckpt: bool) -> None:
        super().__init__()
        self.blk, self.out, self.ckpt = _Block(kernel), nn.Linear(8, 3), ckpt

    def forward(self, x: Tensor) -> Tensor:
        h = checkpoint(self.blk, x, use_reentrant=False) if self.ckpt else self.blk(x)
        return self.out(h.mean(1))


def _attention_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(1)
    twin = _Checkpointed(None, False).to(DT)  # no kernel of its own, no checkpoint
    model = _Checkpointed(SDPBackend.FLASH_ATTENTION, True).to(DT)
    model.load_state_dict(twin.state_dict())
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 6, 8, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    return model, twin, X, y


def _dense_hessian_ggn(model: nn.Module, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The Hessian and the GGN of the mean cross-entropy in the parameters, math kernel."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = t[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def f(t: Tensor) -> Tensor:
        return functional_call(model, unflat(t), (X,))

    with sdpa_kernel(SDPBackend.MATH):
        H = torch.func.hessian(lambda t: F.cross_entropy(f(t), y))(theta)
        J = jacrev(f)(theta).reshape(-1, theta.numel())
        out = f(theta).detach()
        Lam = torch.func.hessian(lambda o: F.cross_entropy(o.reshape(out.shape), y))(
            out.reshape(-1)
        )
    return H, J.T @ Lam @ J


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_checkpointed_own_flash_kernel_exact_traces(matrix: str) -> None:
    model, twin, X, y = _attention_problem()
    H, G = _dense_hessian_ggn(twin, X, y)
    hooks = (
        dict(nn.modules.module._global_forward_pre_hooks),
        dict(nn.modules.module._global_forward_hooks),
    )
    M = H if matrix == "hessian" else G
    # was CheckpointError: the recomputation inside torch.autograd.grad ran the flash kernel
    tr = cl.trace(model, nn.CrossEntropyLoss(), (X, y), matrix=matrix, method="exact").value
    D = M.shape[0]
    assert abs(float(tr) - float(M.trace())) <= D * 1e2 * EPS * float(M.diagonal().abs().sum())
    if matrix == "hessian":
        diag = cl.diag_hessian(model, nn.CrossEntropyLoss(), (X, y))
        names = [n for n, _ in model.named_parameters()]
        torch.testing.assert_close(
            _flat(diag, names), H.diagonal(), rtol=0, atol=1e2 * EPS * float(H.abs().max())
        )
    assert not _get_current_function_mode_stack()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    # the recomputation's global module hooks are gone with the backward pass
    now = (
        dict(nn.modules.module._global_forward_pre_hooks),
        dict(nn.modules.module._global_forward_hooks),
    )
    assert now == hooks


def test_checkpointed_own_flash_kernel_first_order() -> None:
    model, twin, X, y = _attention_problem()
    names = [n for n, _ in twin.named_parameters()]
    params = {n: p.detach() for n, p in twin.named_parameters()}

    def one(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(twin, p, (x[None],)), t[None])

    with sdpa_kernel(SDPBackend.MATH):
        g = vmap(grad(one), in_dims=(None, 0, 0))(params, X, y)
    want = {n: (v**2).mean(0) for n, v in g.items()}  # empirical Fisher diagonal
    loss = nn.CrossEntropyLoss()
    # was CheckpointError (the func backend's backward recomputed the block on the flash kernel)
    got = cl.diag_fisher(model, loss, (X, y), backend="func")
    scale = float(_flat(want, names).abs().max())
    torch.testing.assert_close(
        _flat(got, names), _flat(want, names), rtol=0, atol=1e2 * EPS * scale
    )
    # KFAC's factors of the checkpointed model with its own kernel: those of the plain twin
    kf = cl.kfac(model, loss, (X, y), kind="empirical")
    kt = cl.kfac(twin, loss, (X, y), kind="empirical")
    assert set(kf) == set(kt) == {"blk.qkv", "out"}
    for n in kt:
        for got, want_ in ((kf[n].A, kt[n].A), (kf[n].G, kt[n].G)):
            tol = 1e2 * EPS * float(want_.abs().max())
            torch.testing.assert_close(got, want_, rtol=0, atol=tol)
    assert not _get_current_function_mode_stack()


# ----------------------------------------------------------------------------------- RG-3


class _PINN(nn.Module):
    """``u(x)`` and its input gradient ``du/dx``: a forward that differentiates in its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x: Tensor) -> Tensor:
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        return torch.cat([u, du], 1)


def _pinn_hessian(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """The dense Hessian of ``MSE(model(X), y)`` in the parameters by double backward, ``X`` a
    fresh leaf (the model differentiates in it)."""
    ps = list(model.parameters())
    x = X.detach().clone().requires_grad_(True)
    g = _flat(list(torch.autograd.grad(F.mse_loss(model(x), y), ps, create_graph=True)))
    rows = [_flat(list(torch.autograd.grad(g[i], ps, retain_graph=True))) for i in range(len(g))]
    return torch.stack(rows)


@pytest.mark.parametrize("case", ["leaf", "graph"])
def test_model_differentiating_in_its_inputs(case: str) -> None:
    torch.manual_seed(0)
    model = _PINN().to(DT)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 2, generator=g, dtype=DT).requires_grad_(True)
    X = base if case == "leaf" else 2.0 * base  # the graph case: computed from a leaf
    y = torch.randn(6, 3, generator=g, dtype=DT)
    H = _pinn_hessian(model, X, y)
    names = [n for n, _ in model.named_parameters()]
    D, loss = H.shape[0], nn.MSELoss()
    tol = 1e2 * EPS * float(H.abs().max())  # float64 sums of a few dozen terms per entry
    with warnings.catch_warnings():
        if case == "leaf":
            warnings.simplefilter("error")  # a plain leaf: no warning
        else:
            warnings.filterwarnings("ignore", message=".*autograd graph", category=RuntimeWarning)
        # was RuntimeError: One of the differentiated Tensors does not require grad
        tr = cl.trace(model, loss, (X, y), method="exact").value
        diag = cl.diag_hessian(model, loss, (X, y))
        top = cl.eigenvalues(model, loss, (X, y), k=1, tol=1e-10, seed=0)
    assert abs(float(tr) - float(H.trace())) <= D * tol
    torch.testing.assert_close(_flat(diag, names), H.diagonal(), rtol=0, atol=tol)
    # a Ritz value lies within its residual of an eigenvalue of H
    assert (
        abs(float(top.values[0]) - float(torch.linalg.eigvalsh(H)[-1]))
        <= float(top.residuals[0]) + tol
    )
    # the caller's tensors untouched: still a leaf that requires grad, no gradient left on it
    assert base.requires_grad and base.is_leaf and base.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_a_parameter_as_inputs_still_held_fixed_by_a_pinn() -> None:
    """The s24 fix holds for a forward that differentiates in its inputs: a parameter passed as
    the inputs is a fixed point of the Hessian, not differentiated through."""
    torch.manual_seed(0)
    model = _PINN().to(DT)
    X = nn.Parameter(torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=DT))
    y = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    H = _pinn_hessian(model, X, y)
    with pytest.warns(RuntimeWarning, match="trainable parameter"):
        tr = cl.trace(model, nn.MSELoss(), (X, y), method="exact").value
    assert abs(float(tr) - float(H.trace())) <= H.shape[0] * 1e2 * EPS * float(H.abs().max())
    assert X.grad is None


# ----------------------------------------------------------------------------------- RG-4


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensor_operator(layout: str) -> None:
    A = _spd(50, 0)
    S = A.to_sparse() if layout == "coo" else A.to_sparse_csr()
    op = TensorOperator(S)  # was NotImplementedError: aten::amax on a sparse layout
    tr = exact_trace(op).value
    assert abs(float(tr) - float(A.trace())) <= 50 * EPS * float(A.diagonal().abs().sum())
    top = lanczos_eigenvalues(op, k=1, tol=1e-12, seed=0)
    want = float(torch.linalg.eigvalsh(A)[-1])
    assert abs(float(top.values[0]) - want) <= float(top.residuals[0]) + 1e-10 * want
    dense = hutchinson(TensorOperator(A), num_probes=20, seed=0).value
    got = hutchinson(op, num_probes=20, seed=0).value
    assert abs(float(got) - float(dense)) <= 1e3 * EPS * float(A.abs().sum())


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensor_operator_not_symmetric_refused(layout: str) -> None:
    A = _spd(20, 1)
    A[3, 7] += 1.0  # off by 1 against ||A||_F ~ 500: far above rounding
    S = A.to_sparse() if layout == "coo" else A.to_sparse_csr()
    with pytest.raises(ValueError, match=r"not symmetric: max \|A - A\^T\| = 1"):
        TensorOperator(S)
    # a symmetric sparse matrix whose stored pattern is not (an explicit zero) passes
    B = torch.sparse_coo_tensor(
        torch.tensor([[0, 1, 0], [1, 0, 0]]), torch.tensor([2.0, 2.0, 0.0], dtype=DT), (2, 2)
    )
    assert float(exact_trace(TensorOperator(B)).value) == 0.0
