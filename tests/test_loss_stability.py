"""The loss Hessian on confident outputs and on 16-bit logits, against float64 brute force.

* BCE: ``s (1 - s)`` rounded to 0 once ``s`` rounds to 1 (``z ~ 17`` in float32, ``z ~ 6`` in
  bfloat16), in LossSpec and in BackPACK's rule; now ``sigmoid(z) sigmoid(-z)`` on float32 logits.
* Cross-entropy GGN products ``p (v - p.v)`` cancelled at the true class of a classifier that fits
  its data (float32: 74% off at a mean loss of 2.5e-9); now shifted by ``v_c`` first.
* 16-bit logits were scored in their own dtype (bfloat16: exact Hessian trace 20% low).

The references are dense float64 matrices from torch.func on the same weights and data.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvlab as cl
from curvlab._losses import loss_spec


def _params(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in m.named_parameters()}


def _unflatten(m: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, p in m.named_parameters():
        out[k] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def _theta(m: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.detach().double().flatten() for v in d.values()])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _ggn(m64: nn.Module, x: Tensor, hess_of_output) -> Tensor:  # noqa: ANN001
    """Dense float64 GGN ``J^T Lambda J`` of the objective (``hess_of_output(f)``: ``Lambda``)."""
    theta = _theta(m64)
    f = functional_call(m64, _unflatten(m64, theta), (x,))
    J = jacrev(lambda t: functional_call(m64, _unflatten(m64, t), (x,)))(theta)
    J = J.reshape(f.numel(), -1)
    return J.T @ hess_of_output(f.detach()) @ J


def _bce_problem(dtype: torch.dtype, z0: float) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """A binary classifier that fits its positives: logits around ``z0``; a 16/32-bit model
    and its float64 copy (same weights)."""
    torch.manual_seed(0)
    X = torch.randn(64, 10, dtype=torch.float64)
    m = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    with torch.no_grad():
        m[2].weight.mul_(0.3)
        m[2].bias.fill_(z0)
    low = copy.deepcopy(m).to(dtype)
    return low, copy.deepcopy(low).double(), X.to(dtype), X.to(dtype).double()


def _bce_ggn(m64: nn.Module, x64: Tensor) -> Tensor:
    def lam(f: Tensor) -> Tensor:  # BCE(mean): sigma'(z) / N per output, float64
        return torch.diag((torch.sigmoid(f) * torch.sigmoid(-f)).flatten() / f.numel())

    return _ggn(m64, x64, lam)


@pytest.mark.parametrize(("dtype", "z0"), [(torch.float32, 17.0), (torch.bfloat16, 8.0)])
@pytest.mark.parametrize("backend", ["backpack", "func"])
def test_bce_confident_diag_fisher_exact(dtype, z0, backend):
    torch.set_num_threads(1)
    low, m64, x, x64 = _bce_problem(dtype, z0)
    y = torch.ones(64, 1, dtype=dtype)
    d = cl.diag_fisher(low, nn.BCEWithLogitsLoss(), (x, y), kind="exact", backend=backend)
    assert d.backend == backend
    ref = torch.diagonal(_bce_ggn(m64, x64))
    assert float(ref.min()) >= 0 and float(ref.norm()) > 0
    assert _rel(_flat(d), ref) < (1e-4 if dtype == torch.float32 else 0.03)  # was 1.0 (zeros)


@pytest.mark.parametrize(("dtype", "z0"), [(torch.float32, 17.0), (torch.bfloat16, 6.0)])
def test_bce_confident_ggn_trace_and_operator(dtype, z0):
    torch.set_num_threads(1)
    low, m64, x, x64 = _bce_problem(dtype, z0)
    y = torch.ones(64, 1, dtype=dtype)
    lf = nn.BCEWithLogitsLoss()
    G = _bce_ggn(m64, x64)
    tol = 1e-4 if dtype == torch.float32 else 0.03
    t = cl.trace(low, lf, (x, y), matrix="ggn", method="exact")
    assert abs(t.value - float(G.trace())) / float(G.trace()) < tol  # bfloat16 z ~ 6: 52% off
    op = cl.curvature_operator(low, lf, (x, y), matrix="ggn")
    A = op.matmat(torch.eye(op.shape[0], dtype=op.dtype)).double()
    assert _rel(A, G) < tol


def test_bce_draws_from_bfloat16_logits_keep_their_probability():
    """Labels drawn from bfloat16 logits 8: P(y = 0) = sigmoid(-8) = 3.4e-4 (was 0: bfloat16
    rounds sigmoid(8) to 1), so the MC Fisher of a confident BCE model is not 0."""
    spec = loss_spec(nn.BCEWithLogitsLoss())
    z = torch.full((1_000_000, 1), 8.0, dtype=torch.bfloat16)
    draws = spec.sample_targets(z, torch.Generator().manual_seed(0))
    p0 = float(torch.sigmoid(torch.tensor(-8.0, dtype=torch.float64)))
    zeros = float((draws == 0).double().mean())
    assert draws.dtype == torch.bfloat16
    assert abs(zeros - p0) < 5 * (p0 * (1 - p0) / z.numel()) ** 0.5


def _fitted_classifier(scale: float, keep: float) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 classifier whose head is scaled so that the median margin is ``scale``,
    restricted to the examples with a margin above ``keep * scale``; labels its argmax."""
    torch.manual_seed(0)
    X = torch.randn(64, 10, dtype=torch.float64)
    m = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    with torch.no_grad():
        top2 = m(X).topk(2, 1).values
        marg = (top2[:, 0] - top2[:, 1]).median()
        m[2].weight.mul_(scale / marg)
        m[2].bias.mul_(scale / marg)
        out = m(X)
        top2 = out.topk(2, 1).values
        ok = (top2[:, 0] - top2[:, 1]) > keep * scale
    return m, X[ok], out.argmax(1)[ok]


def _ce_ggn(m64: nn.Module, x64: Tensor) -> Tensor:
    def lam(f: Tensor) -> Tensor:  # CE(mean): blockdiag(diag p - p p^T) / N, float64
        p = torch.softmax(f, 1)
        blocks = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        return torch.block_diag(*blocks) / f.shape[0]

    return _ggn(m64, x64, lam)


def test_float32_ce_ggn_operator_on_a_fitted_classifier():
    """Mean loss 2.5e-9: the float32 GGN operator was 74% off and asymmetric."""
    torch.set_num_threads(1)
    m, X, y = _fitted_classifier(20.0, 0.8)
    m32 = copy.deepcopy(m).float()
    m64 = copy.deepcopy(m32).double()
    x32 = X.float()
    G = _ce_ggn(m64, x32.double())
    op = cl.curvature_operator(m32, nn.CrossEntropyLoss(), (x32, y), matrix="ggn")
    A = op.matmat(torch.eye(op.shape[0])).double()
    assert _rel(A, G) < 1e-4
    assert float((A - A.T).norm() / A.norm()) < 1e-5
    top = cl.eigenvalues(m32, nn.CrossEntropyLoss(), (x32, y), matrix="ggn", k=1)
    ref = float(torch.linalg.eigvalsh(G)[-1])
    assert abs(float(top.values[0]) - ref) / ref < 1e-3


def test_bfloat16_ce_exact_hessian_trace_on_a_fitted_classifier():
    """bfloat16 logits (mean loss 1e-3) were scored in bfloat16: the exact trace 20% low."""
    torch.set_num_threads(1)
    m, X, y = _fitted_classifier(8.0, 0.6)
    m16 = copy.deepcopy(m).bfloat16()
    m64 = copy.deepcopy(m16).double()
    x16 = X.bfloat16()
    x64 = x16.double()
    theta = _theta(m64)

    def objective(t: Tensor) -> Tensor:
        out = functional_call(m64, _unflatten(m64, t), (x64,))
        return nn.functional.cross_entropy(out, y)

    ref = float(torch.autograd.functional.hessian(objective, theta).trace())
    t = cl.trace(m16, nn.CrossEntropyLoss(), (x16, y), matrix="hessian", method="exact")
    assert abs(t.value - ref) / ref < 0.03
